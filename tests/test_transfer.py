"""Transfer learning: few-shot data, a new head on a loaded backbone, frozen
parameters left bitwise as they were, strict loading.

One ResNet-8 at half width (conftest.TINY) trained on digits 0-4 is the source
of every run here; the transfer runs take 5 steps on 10 images of each of the
digits 5-9.
"""
import os

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import traverse_util

from arch import data as data_lib
from arch import optim
from arch import train
from arch import transfer
from conftest import TINY, assert_one_line_error, launch
from experiments import transfer as experiment

SHORT = 'batch_size=25,num_steps=5,checkpoint_every=5,eval_every=5'


def transfer_config(source, arg):
  return experiment.get_config(f'{TINY},{SHORT},init_from={source},{arg}')


def params_at(workdir, step):
  manager = ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, 'checkpoints')))
  state = manager.restore(step, args=ocp.args.StandardRestore())
  return {k: traverse_util.flatten_dict(state[k], sep='/') for k in ('params', 'batch_stats')}


@pytest.fixture(scope='module')
def source(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('pretrain'))
  train.train(experiment.get_config(f'pretrain,{TINY}'), workdir)
  return workdir


def changed(before, after, prefix):
  """{path: whether it changed} for the paths under top-level modules starting with `prefix`."""
  return {p: not np.array_equal(before[p], after[p]) for p in after if p.startswith(prefix)}


def test_classes_and_train_per_class():
  def load(**kw):
    return data_lib.load(ml_collections.ConfigDict(dict(name='digits', classes=(5, 6, 7, 8, 9),
                                                        **kw)))
  ten, five = load(train_per_class=10), load(train_per_class=5)
  assert ten.num_classes == 5 and ten.ranges == {'train': (0, 50), 'test': (50, 230)}
  assert np.bincount(ten.labels[:50]).tolist() == [10] * 5
  # Every test image of the digits 5-9, label i for digit 5 + i.
  whole = data_lib.load(ml_collections.ConfigDict(dict(name='digits')))
  test = whole.labels[1437:] >= 5
  assert np.array_equal(ten.images[50:], whole.images[1437:][test])
  assert np.array_equal(ten.labels[50:], whole.labels[1437:][test] - 5)
  assert load().ranges['train'] == (0, 716)
  # The 5-shot images are among the 10-shot ones (a fixed order, not a seed's).
  rows = {(x.tobytes(), y) for x, y in zip(ten.images[:50], ten.labels[:50])}
  assert all((x.tobytes(), y) in rows for x, y in zip(five.images[:25], five.labels[:25]))
  with pytest.raises(ValueError, match='train_per_class=200 must be between 1 and'):
    load(train_per_class=200)
  with pytest.raises(ValueError, match=r'data.classes=\(5, 5\)'):
    data_lib.load(ml_collections.ConfigDict(dict(name='digits', classes=(5, 5))))


def test_new_head_on_the_loaded_backbone(source, tmp_path):
  config = transfer_config(source, 'mode=features')
  job = train.prepare(config, str(tmp_path / 'run'))
  schedule = optim.make_schedule(config.schedule, config.num_steps)
  init = train.make_functions(job, optim.make_optimizer(config.optimizer, schedule), schedule)[0]
  with jax.threefry_partitionable(False):  # as train._run initialises
    fresh = init()
  state = transfer.load_backbone(job, fresh)
  pretrained = params_at(source, 20)
  loaded = traverse_util.flatten_dict(jax.device_get(state.params), sep='/')
  assert set(loaded) == set(pretrained['params'])
  for path, value in loaded.items():
    if path.startswith('head/'):  # same shape as the source's, and still new
      assert np.array_equal(value, fresh.params['head'][path.split('/')[1]])
      assert not np.array_equal(value, pretrained['params'][path])
    else:
      assert np.array_equal(value, pretrained['params'][path]), path


def test_feature_extraction_freezes_the_backbone(source, tmp_path):
  workdir = str(tmp_path / 'features')
  assert train.train(transfer_config(source, 'mode=features'), workdir)['status'] == 'done'
  before, after = params_at(source, 20), params_at(workdir, 5)
  frozen = changed(before['params'], after['params'], 's')  # stem, stage*
  assert frozen and not any(frozen.values()), frozen
  # Documented: frozen BatchNorm layers still track the new data's statistics.
  assert all(changed(before['batch_stats'], after['batch_stats'], 'stage1').values())


def test_fine_tuning_trains_exactly_the_last_stage_and_head(source, tmp_path):
  workdir = str(tmp_path / 'finetune')
  train.train(transfer_config(source, 'mode=finetune,stages=1'), workdir)
  before, after = params_at(source, 20)['params'], params_at(workdir, 5)['params']
  trained = changed(before, after, '')
  assert {p for p, c in trained.items() if c} == {p for p in after
                                                   if p.startswith(('stage3', 'head'))}


def test_mismatched_checkpoint_is_one_line(source, tmp_path):
  workdir = tmp_path / 'deeper'
  proc = launch('train', '--config', f'experiments/transfer.py:{TINY},{SHORT},depth=14,'
                f'init_from={source}', '--workdir', workdir)
  assert_one_line_error(proc, f'init_from={source}',
                        'params/stage1_block2/conv1/bn/bias is in this model, not in the checkpoint')
  assert not workdir.exists()


@pytest.mark.parametrize('arg, words', [
    ('width=1.0', 'params/stage1_block1/conv1/bn/bias has shape (8,) in the checkpoint, (16,) '
                  'in this model'),
    ('optimizer.trainable=stage9', "optimizer.trainable='stage9' matches no parameter"),
    ('num_seeds=2', 'not supported'),
])
def test_bad_transfer_is_refused(source, tmp_path, arg, words):
  with pytest.raises(ValueError) as e:
    train.prepare(transfer_config(source, arg), str(tmp_path / 'run'))
  assert words in str(e.value)
  assert not (tmp_path / 'run').exists()


def test_missing_source_names_the_pretraining_command(tmp_path):
  missing = str(tmp_path / 'nothing')
  with pytest.raises(ValueError) as e:
    train.prepare(transfer_config(missing, ''), str(tmp_path / 'run'))
  assert (f'init_from={missing} is not a finished run (no summary.json); run first: python '
          f'launch.py train --config experiments/transfer.py:pretrain,depth=8,width=0.5 '
          f'--workdir {missing}') in str(e.value)
