"""Many seeds in one program (config.num_seeds): each replica is the run with its seed.

`group` trains seeds 1 and 2 of conftest.TINY as one vmapped program, as a member
of a sweep directory; the tests hold its replicas against separate runs, the
analysis, a resumed group and a replica that diverges.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pandas as pd
import pytest

from arch import analysis
from arch import sweep
from arch import train
from conftest import TINY, get_config

GROUP = f'{TINY},seed=1,num_seeds=2'


def read(workdir, name):
  if name.endswith('.jsonl'):
    return pd.read_json(os.path.join(workdir, name), lines=True)
  with open(os.path.join(workdir, name)) as f:
    return json.load(f)


def lines(workdir, name):
  """metrics.jsonl or diagnostics.jsonl, without the timing column."""
  return read(workdir, name).drop(columns='steps_per_s', errors='ignore')


def checkpoint(workdir, step):
  manager = ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, 'checkpoints')))
  return manager.restore(step, args=ocp.args.StandardRestore())


@pytest.fixture(scope='module')
def group(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('sweep') / 'depth=8')
  return workdir, train.train(get_config(GROUP), workdir)


def test_replica_is_the_run_with_its_seed(group, tmp_path):
  workdir, _ = group
  alone, replica = str(tmp_path), os.path.join(workdir, 'seed=2')  # replica 1: seed 1 + 1
  train.train(get_config(f'{TINY},seed=2'), alone)
  assert read(replica, 'config.json') == read(alone, 'config.json')
  # Vmapped convolutions may sum in another order: equal to float tolerance. (On
  # this CPU the parameters came out bitwise equal, the logged losses within 5e-8.)
  for name in ('metrics.jsonl', 'diagnostics.jsonl'):
    pd.testing.assert_frame_equal(lines(replica, name), lines(alone, name), rtol=1e-4, atol=1e-6)
  for ours, theirs in zip(jax.tree.leaves(checkpoint(workdir, 20)),
                          jax.tree.leaves(checkpoint(alone, 20)), strict=True):
    np.testing.assert_allclose(ours[1], theirs, rtol=1e-4, atol=1e-6)


def test_layout_and_analysis(group):
  workdir, summary = group
  assert sorted(os.listdir(workdir)) == ['checkpoints', 'config.json', 'seed=1', 'seed=2',
                                         'summary.json']
  for seed in (1, 2):
    replica = os.path.join(workdir, f'seed={seed}')
    assert sorted(os.listdir(replica)) == ['config.json', 'diagnostics.jsonl', 'metrics.jsonl',
                                           'summary.json']
    assert read(replica, 'summary.json')['status'] == 'done'
  assert summary['status'] == 'done' and summary['seeds'] == [1, 2] and summary['failed'] == {}
  assert sweep.member_status(workdir) == 'done'  # a sweep skips the finished group
  assert train.train(get_config(GROUP), workdir) == read(workdir, 'summary.json')  # nothing to do
  for path in (os.path.dirname(workdir), workdir):  # the sweep, the group
    runs, metrics = analysis.load(path)
    assert list(runs['run']) == ['depth=8,seed=1', 'depth=8,seed=2']
    assert list(runs['seed']) == [1, 2] and list(runs['status']) == ['done', 'done']
    assert sorted(set(metrics['seed'])) == [1, 2] and metrics['step'].max() == 20


def nan_loss(make_functions, index, step):
  """make_functions whose training loss of replica `index` is NaN from `step` on."""
  def patched(job, tx, schedule):
    init, train_step, eval_step = make_functions(job, tx, schedule)

    def poisoned(state, images, labels):  # traced: train.py compiles it
      state, metrics = train_step(state, images, labels)
      nan = jnp.where(state.step[index] >= step, jnp.nan, metrics['loss'][index])
      return state, dict(metrics, loss=metrics['loss'].at[index].set(nan))
    return init, poisoned, eval_step
  return patched


def test_resume_is_exact_and_a_diverged_seed_fails_alone(group, tmp_path, monkeypatch):
  reference, workdir = group[0], str(tmp_path)
  monkeypatch.setattr(train, 'make_functions', nan_loss(train.make_functions, index=1, step=5))
  config = get_config(GROUP)
  config.stop_after = 13
  s = train.train(config, workdir)
  assert s['status'] == 'running' and s['failed'] == {2: 'loss is nan at step 5'}
  # Killed between checkpoints: resumes from step 10, after seed 2 failed.
  ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, 'checkpoints'))).delete(13)
  config.stop_after = None
  with pytest.raises(train.Diverged, match=r'1 of 2 seeds diverged \(seed 2: loss is nan at step 5\)'):
    train.train(config, workdir)

  s = read(workdir, 'summary.json')
  assert s['status'] == 'done' and s['failed'] == {'2': 'loss is nan at step 5'}
  failed = read(os.path.join(workdir, 'seed=2'), 'summary.json')
  assert failed['status'] == 'failed' and failed['step'] == 5
  assert list(read(os.path.join(workdir, 'seed=2'), 'metrics.jsonl')['step']) == [1, 2, 3, 4]
  # Seed 1 went on, bitwise the uninterrupted group's (the NaN was only in the metrics).
  for name in ('metrics.jsonl', 'diagnostics.jsonl'):
    pd.testing.assert_frame_equal(lines(os.path.join(workdir, 'seed=1'), name),
                                  lines(os.path.join(reference, 'seed=1'), name))
  for ours, theirs in zip(jax.tree.leaves(checkpoint(workdir, 20)),
                          jax.tree.leaves(checkpoint(reference, 20)), strict=True):
    np.testing.assert_array_equal(ours, theirs)


def test_bad_num_seeds(tmp_path):
  with pytest.raises(ValueError, match='num_seeds=0 must be at least 1'):
    train.prepare(get_config(f'{TINY},num_seeds=0'), str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()
