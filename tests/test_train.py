"""Training end to end: launch.py, resume, devices, processes, bad input.

Every run is ResNet-8 at half width on digits (conftest.TINY), so the whole file
takes a few minutes on 2 CPU cores; `reference` is the uninterrupted 1-device run
the others must reproduce.
"""
import json
import os
import pathlib
import socket
import subprocess

import jax
import numpy as np
import orbax.checkpoint as ocp
import pandas as pd
import pytest

import arch
from arch import optim
from arch import train
from conftest import (TINY, assert_one_line_error, clean_env, get_config, launch,
                      launch_command, ROOT)

SPEC = f'experiments/degradation.py:{TINY}'
EIGHT_DEVICES = '--xla_force_host_platform_device_count=8'


def metrics(workdir):
  return pd.read_json(os.path.join(workdir, 'metrics.jsonl'), lines=True)


def training_losses(workdir):
  m = metrics(workdir)
  m = m[m['split'].isna()] if 'split' in m else m
  return m.set_index('step')['loss']


def summary(workdir):
  with open(os.path.join(workdir, 'summary.json')) as f:
    return json.load(f)


def checkpoint(workdir, step):
  manager = ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, 'checkpoints')))
  return manager.restore(step, args=ocp.args.StandardRestore())


def snapshot(workdir):
  return {name: open(os.path.join(workdir, name), 'rb').read()
          for name in ('config.json', 'metrics.jsonl', 'summary.json')}


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('reference'))
  train.train(get_config(TINY), workdir)
  return workdir


def test_launch_train_end_to_end(tmp_path):
  workdir = str(tmp_path / 'run')
  proc = launch('train', '--config', SPEC, '--workdir', workdir)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.strip().splitlines()[-1].startswith('done: cifar_resnet on digits, 20 steps')
  assert sorted(os.listdir(workdir)) == ['checkpoints', 'config.json', 'diagnostics.jsonl',
                                         'metrics.jsonl', 'summary.json']
  assert json.load(open(os.path.join(workdir, 'config.json')))['model']['depth'] == 8
  m = metrics(workdir)
  lines = m[m['split'].isna()]
  assert list(lines['step']) == list(range(1, 21))
  assert {'loss', 'error', 'lr', 'steps_per_s'} <= set(m.columns)
  evals = m[m['split'].notna()]
  assert sorted(evals['split']) == ['test', 'train'] and set(evals['step']) == {20}
  s = summary(workdir)
  model = arch.build(get_config(TINY).model)
  assert s['status'] == 'done' and s['step'] == 20 and s['device_count'] == 1
  assert s['params'] == arch.count_params(model, (8, 8, 1))['params']
  assert s['macs'] == arch.count_macs(model, (8, 8, 1))
  assert 0 <= s['train_error'] <= 1 and 0 <= s['test_error'] <= 1 and s['wall_s'] > 0
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['10', '20']

  # The same command again: finished, nothing to do, nothing touched.
  before = snapshot(workdir)
  proc = launch('train', '--config', SPEC, '--workdir', workdir)
  assert proc.returncode == 0 and 'already finished' in proc.stdout, proc.stderr
  assert snapshot(workdir) == before

  # A different config in the same workdir: refused, one line, nothing lost.
  proc = launch('train', '--config', SPEC, '--workdir', workdir, '--config.seed=1')
  assert_one_line_error(proc, 'different config', 'seed: 0 -> 1', '--restart')
  assert snapshot(workdir) == before

  # ... unless --restart.
  proc = launch('train', '--config', SPEC, '--workdir', workdir, '--config.seed=1', '--restart')
  assert proc.returncode == 0, proc.stderr
  assert json.load(open(os.path.join(workdir, 'config.json')))['seed'] == 1
  assert list(training_losses(workdir).index) == list(range(1, 21))


def test_loss_falls(tmp_path):
  config = get_config(TINY)
  config.num_steps, config.log_every, config.eval_every = 100, 10, 100
  s = train.train(config, str(tmp_path))
  losses = training_losses(str(tmp_path))
  assert losses[100] < 0.5 * losses[10], losses
  assert s['test_error'] < 0.5  # chance is 0.9


def test_resume_is_exact(reference, tmp_path):
  workdir = str(tmp_path)
  config = get_config(TINY)
  config.stop_after = 13
  s = train.train(config, workdir)
  assert s['status'] == 'running' and s['step'] == 13
  # Killed between checkpoints, mid-line: metrics reached step 13, the checkpoint is 10.
  ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, 'checkpoints'))).delete(13)
  assert training_losses(workdir).index.max() == 13
  with open(os.path.join(workdir, 'metrics.jsonl'), 'a') as f:
    f.write('{"step": 14, "lo')

  config.stop_after = None  # run control: may change between sessions
  assert train.train(config, workdir)['status'] == 'done'
  ours, theirs = checkpoint(workdir, 20), checkpoint(reference, 20)
  assert jax.tree.structure(ours) == jax.tree.structure(theirs)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # bitwise
  pd.testing.assert_frame_equal(metrics(workdir).drop(columns='steps_per_s'),
                                metrics(reference).drop(columns='steps_per_s'))


def test_eight_devices_match_one(reference, tmp_path):
  proc = launch('train', '--config', SPEC, '--workdir', tmp_path,
                env=clean_env(XLA_FLAGS=EIGHT_DEVICES))
  assert proc.returncode == 0, proc.stderr
  assert summary(str(tmp_path))['device_count'] == 8
  np.testing.assert_allclose(training_losses(str(tmp_path)), training_losses(reference),
                             rtol=1e-4)


def free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_match_one(reference, tmp_path):
  common = ['train', '--config', SPEC, '--workdir', tmp_path, '--num_processes=2',
            f'--coordinator_address=127.0.0.1:{free_port()}']
  procs = [subprocess.Popen(launch_command(*common, f'--process_id={i}'), cwd=ROOT,
                            env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for i in range(2)]
  try:
    outputs = [p.communicate(timeout=300) for p in procs]
  finally:
    for p in procs:
      p.kill()
  for i, (p, (out, err)) in enumerate(zip(procs, outputs)):
    assert p.returncode == 0, err
    assert f'process {i} of 2: 2 devices, 1 local' in out
  s = summary(str(tmp_path))
  assert s['process_count'] == 2 and s['device_count'] == 2 and s['status'] == 'done'
  np.testing.assert_allclose(training_losses(str(tmp_path)), training_losses(reference),
                             rtol=1e-4)


def test_tfds_cifar10_mock(tmp_path):
  import tensorflow_datasets as tfds
  config = get_config('cifar10,depth=8,width=0.5,batch_size=16,eval_batch_size=32,num_steps=3,'
                      'log_every=1,eval_every=3,checkpoint_every=3')
  config.data.data_dir = str(tmp_path / 'tfds')
  with tfds.testing.mock_data(num_examples=40):
    s = train.train(config, str(tmp_path / 'run'))
  assert s['status'] == 'done' and s['data'] == 'cifar10' and np.isfinite(s['test_loss'])
  assert list(training_losses(str(tmp_path / 'run')).index) == [1, 2, 3]


def test_divergence_fails_the_run(tmp_path):
  # lr 0.05 until step 11, then 5e28: diverges after the checkpoint of step 10.
  proc = launch('train', '--config', SPEC, '--workdir', tmp_path, '--config.schedule.factor=1e30',
                '--config.schedule.boundaries=(11,)')
  last = proc.stderr.strip().splitlines()[-1]
  assert proc.returncode == 1 and last.startswith('error: loss is'), proc.stderr
  assert 'last good checkpoint: step 10' in last, last
  s = summary(str(tmp_path))
  assert s['status'] == 'failed' and s['reason'].startswith('loss is')
  assert 'last good checkpoint: step 10' in s['reason']


@pytest.mark.parametrize('args,words', [
    (['--config.bogus=1'], ["unknown config key 'bogus'"]),
    (['--config.data.bogus=1'], ["unknown config key 'bogus'", '--config.data.bogus']),
    (['--config', 'experiments/degradation.py:bogus=1'], ["unknown config key 'bogus'"]),
    (['--config.model.name=no_net'], ["unknown model 'no_net'", 'cifar_resnet']),
    (['--config.data.name=no_data'], ["unknown data set 'no_data'"]),
    (['--config.data.name=cifar10', '--config.data.data_dir=EMPTY'], ['not prepared', 'tfds build']),
    (['--config.optimizer.name=lbfgs'], ["unknown optimizer 'lbfgs'", 'sgd']),
    (['--config.schedule.name=step'], ["unknown schedule 'step'", 'piecewise']),
    (['--config.batch_size=12', 'XLA_FLAGS'], ['batch_size=12', '8 devices']),
    (['--config.num_steps=abc'], ['--config.num_steps=abc', 'invalid literal for int']),
    (['--config.model.depth=9'], ['depth must be 6n+2', 'got 9']),
    (['--config.model.width=0'], ['width must be > 0']),
    (['--config', 'TMP/syntax.py'], ['syntax.py has a syntax error at line 2']),
    (['--config', 'TMP/no_get_config.py'], ['no_get_config.py defines no get_config']),
    (['--config', 'TMP/raises.py'], ['get_config raised RuntimeError: boom']),
    (['--workdir', 'TMP/file/run'], ['is a file, not a folder']),
])
def test_bad_input_is_one_line(tmp_path, args, words):
  (tmp_path / 'syntax.py').write_text('def get_config(arg=""):\n  return (\n')
  (tmp_path / 'no_get_config.py').write_text('CONFIG = None\n')
  (tmp_path / 'raises.py').write_text('def get_config(arg=""):\n  raise RuntimeError("boom")\n')
  (tmp_path / 'file').write_text('')
  env = clean_env(XLA_FLAGS=EIGHT_DEVICES) if 'XLA_FLAGS' in args else clean_env()
  args = [a.replace('EMPTY', str(tmp_path)).replace('TMP', str(tmp_path))
          for a in args if a != 'XLA_FLAGS']
  config = [] if '--config' in args else ['--config', SPEC]
  workdir = tmp_path / 'run'
  if '--workdir' in args:
    workdir = pathlib.Path(args.pop(args.index('--workdir') + 1))
    args.remove('--workdir')
  proc = launch('train', *config, *args, '--workdir', workdir, env=env)
  assert_one_line_error(proc, *words)
  assert not workdir.exists()


def test_corrupt_run_file_is_refused(tmp_path):
  (tmp_path / 'config.json').write_text('{"seed": 0, "mod')
  proc = launch('train', '--config', SPEC, '--workdir', tmp_path)
  assert_one_line_error(proc, 'config.json is corrupt', '--restart')
  assert sorted(os.listdir(tmp_path)) == ['config.json']


def test_summary_command():
  proc = launch('summary', '--config', 'experiments/degradation.py:depth=8')
  assert proc.returncode == 0, proc.stderr
  params = arch.count_params(arch.build(get_config('depth=8').model), (8, 8, 1))['params']
  assert f'{params:,}' in proc.stdout and proc.stdout.startswith('cifar_resnet')


def test_schedules():
  config = get_config('')  # the schedule spelled out: the recipe's defaults may change
  config.schedule.update(name='piecewise', lr=0.1, warmup_steps=0, boundaries=(1000, 1500),
                         factor=0.1)
  s = optim.make_schedule(config.schedule, 2000)  # 0.1, /10 at 1000 and 1500
  np.testing.assert_allclose([s(0), s(999), s(1000), s(1500)], [0.1, 0.1, 0.01, 0.001], rtol=1e-6)
  config.schedule.update(name='cosine', warmup_steps=10)
  s = optim.make_schedule(config.schedule, 110)
  np.testing.assert_allclose([s(0), s(9), s(10), s(60), s(110)], [0.01, 0.1, 0.1, 0.05, 0],
                             atol=1e-6)
