"""Fault injection with real processes and real signals: runs and sweeps killed at
random moments (mid-save included), SIGTERM, corrupt checkpoints, a full disk,
two processes on one run directory, two launchers on one sweep.

Kill moments come from named seeds; a failure prints its plan, and
`ARCH_FAULT_SEED=<seed> pytest tests/test_faults.py -k <test>` replays it (the
moments are steps and delays, so a replay hits the same steps, give or take the
machine's speed).
"""
import atexit
import os
import random
import re
import shutil
import signal
import subprocess
import tempfile
import time

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pandas as pd
import pytest

from arch import runfiles
from arch import train
from conftest import (ROOT, TINY, assert_one_line_error, clean_env, get_config, launch,
                      launch_command)

KILL_SEED = int(os.environ.get('ARCH_FAULT_SEED', 1206))
SWEEP_SEED = int(os.environ.get('ARCH_FAULT_SEED', 2409))

SLOW_SAVE = 'slow_save=0.2'  # seconds inside every save, before its commit rename


def frozen(arg, extra=''):
  """The source of an experiment file whose get_config returns the degradation
  config for `arg` as it was when the tests were collected: a recipe edited while
  they run must not pass for a run that resumed to another result."""
  return (f'import ml_collections\n\n'
          f'def get_config(arg=""):\n'
          f'  return ml_collections.ConfigDict({get_config(arg).to_dict()!r})\n{extra}')


def write(path, text):
  with open(path, 'w') as f:
    f.write(text)
  return path


# TINY for 30 steps with a checkpoint every 3: many saves to land in.
RUN_CONFIG = frozen(f'{TINY},num_steps=30,eval_every=10,checkpoint_every=3')
FROZEN_DIR = tempfile.mkdtemp(prefix='arch-test-faults-')
atexit.register(shutil.rmtree, FROZEN_DIR, True)
SPEC = write(os.path.join(FROZEN_DIR, 'run.py'), RUN_CONFIG)


def run_config():
  """SPEC's config, for runs in this process."""
  namespace = {}
  exec(RUN_CONFIG, namespace)
  return namespace['get_config']()


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """The uninterrupted run every interrupted one must reproduce bit for bit."""
  workdir = str(tmp_path_factory.mktemp('reference'))
  train.train(run_config(), workdir)
  return workdir


def start(workdir, env=None):
  """`launch.py train` in the background, its output appended to `<workdir>.out`."""
  with open(f'{workdir}.out', 'a') as out:
    proc = subprocess.Popen(launch_command('train', '--config', SPEC, '--workdir', workdir),
                            cwd=ROOT, env=env or clean_env(), stdout=out, stderr=out)
  proc.out = f'{workdir}.out'
  return proc


def wait_for(condition, proc=None, timeout=120, what=''):
  """Polls `condition` every 10 ms; fails if `proc` exits first."""
  deadline = time.time() + timeout
  while not condition():
    if proc is not None and proc.poll() is not None:
      pytest.fail(f'exited with {proc.returncode} before {what}: {tail(proc)}')
    if time.time() > deadline:
      pytest.fail(f'timed out waiting for {what() if callable(what) else what}')
    time.sleep(0.01)


def tail(proc):
  return open(proc.out).read()[-2000:] if hasattr(proc, 'out') else ''


def trained_to(workdir):
  """The last step with a training line in metrics.jsonl."""
  lines = runfiles.read_lines(os.path.join(workdir, 'metrics.jsonl'))
  return max((l['step'] for l in lines if 'split' not in l), default=0)


def saving(workdir, at_least):
  """A save of a step >= `at_least` is under way: orbax's temporary folder exists."""
  try:
    names = os.listdir(os.path.join(workdir, 'checkpoints'))
  except FileNotFoundError:
    return False
  return any(int(m.group(1)) >= at_least for m in
             (re.match(r'(\d+)\.orbax-checkpoint-tmp', n) for n in names) if m)


def checkpoint(workdir, step):
  manager = ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, 'checkpoints')))
  return manager.restore(step, args=ocp.args.StandardRestore())


def lines(workdir, name='metrics.jsonl'):
  return pd.read_json(os.path.join(workdir, name), lines=True)


def summary(workdir):
  return runfiles.read_json(os.path.join(workdir, 'summary.json'))


def assert_same_run(workdir, reference, num_steps=30):
  """Final state bit for bit, every metrics and diagnostics line exactly once and as
  in the reference, and a complete summary.json."""
  ours, theirs = checkpoint(workdir, num_steps), checkpoint(reference, num_steps)
  assert jax.tree.structure(ours) == jax.tree.structure(theirs)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # bitwise
  m = lines(workdir)
  training = m[m['split'].isna()]
  assert list(training['step']) == list(range(1, num_steps + 1))  # no duplicates, no gaps
  assert not m[m['split'].notna()].duplicated(['step', 'split']).any()
  pd.testing.assert_frame_equal(m.drop(columns='steps_per_s'),
                                lines(reference).drop(columns='steps_per_s'))
  pd.testing.assert_frame_equal(lines(workdir, 'diagnostics.jsonl'),
                                lines(reference, 'diagnostics.jsonl'))
  s, r = summary(workdir), summary(reference)
  assert s['status'] == 'done' and s['step'] == num_steps
  assert set(s) == set(r)
  timing = {'wall_s', 'steps_per_s', 'compile_s'}
  assert {k: v for k, v in s.items() if k not in timing} == \
      {k: v for k, v in r.items() if k not in timing}
  assert not os.path.exists(os.path.join(workdir, runfiles.LOCK))
  assert not saving(workdir, 0)  # temporary folders of cut saves are cleaned up


def kill_plan(seed, num_steps=30):
  """Four kills at training steps, two of them inside a save, and one during start-up
  (imports, compiling, restoring), in a seeded order: (kind, step, delay_s)."""
  rng = random.Random(seed)
  steps = sorted(rng.sample(range(2, num_steps - 3), 4))
  kinds = ['save', 'save', 'step', 'step']
  rng.shuffle(kinds)
  plan = [(k, s, round(rng.uniform(0, 0.15), 3)) for k, s in zip(kinds, steps)]
  plan.insert(rng.randrange(len(plan) + 1), ('startup', None, round(rng.uniform(0.5, 3), 2)))
  return plan


def test_random_kills_resume_exactly(reference, tmp_path):
  """SIGKILL at seeded moments, rerun until done: the result of an uninterrupted run."""
  workdir = str(tmp_path / 'run')
  env = clean_env(ARCH_FAULTS=SLOW_SAVE)
  plan = kill_plan(KILL_SEED)
  print(f'KILL_SEED={KILL_SEED}: {plan}')
  kills = []
  for kind, step, delay in plan:
    target = max(step or 0, trained_to(workdir) + 1)  # past where the last one got
    proc = start(workdir, env=env)
    if kind == 'startup':
      time.sleep(delay)
    elif kind == 'step':
      wait_for(lambda: trained_to(workdir) >= target, proc, what=f'step {target}')
      time.sleep(delay)
    else:
      wait_for(lambda: saving(workdir, target), proc, what=f'a save at step >= {target}')
    assert proc.poll() is None, f'finished before the kill: {tail(proc)}'
    proc.kill()
    proc.wait()
    # A save's temporary folder still there: the kill landed inside the save.
    kills.append((kind, trained_to(workdir), kind != 'startup' and saving(workdir, target)))
    # Whenever it dies, its JSON files are whole, and its lock is stale: the kernel
    # dropped it with the process, though the file stays.
    for name in ('config.json', 'summary.json'):
      runfiles.read_json(os.path.join(workdir, name))
    assert runfiles.lock_holder(workdir) is None
  print(f'killed at (kind, metrics step, mid-save): {kills}')
  assert len(kills) == 5 and sum(mid_save for *_, mid_save in kills) >= 2, kills

  proc = launch('train', '--config', SPEC, '--workdir', workdir)
  assert proc.returncode == 0, proc.stderr
  assert_same_run(workdir, reference)


def corrupt(workdir, step, how):
  """Flips a byte in (orbax restores it silently) or truncates the largest array file."""
  folder = os.path.join(workdir, 'checkpoints', str(step))
  files = [os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs
           if os.sep + 'd' + os.sep in os.path.join(d, f)]
  path = max(files, key=os.path.getsize)
  data = bytearray(open(path, 'rb').read())
  if how == 'flip':
    data[len(data) // 2] ^= 0xFF
  else:
    data = data[:len(data) // 3]
  open(path, 'wb').write(bytes(data))


# Orbax leaves the coroutines of a failed restore to the garbage collector.
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_corrupt_checkpoints_fall_back(reference, tmp_path, capfd):
  workdir = str(tmp_path / 'run')
  config = run_config()
  config.stop_after = 12
  train.train(config, workdir)  # checkpoints 6, 9, 12
  corrupt(workdir, 12, 'flip')
  corrupt(workdir, 9, 'truncate')
  capfd.readouterr()
  config.stop_after = None
  train.train(config, workdir)
  err = capfd.readouterr().err
  assert re.search(r'warning: the checkpoint of step 12 is corrupt \(.*CRC32.*\).*resuming from '
                   r'step 6', err), err
  assert 'warning: the checkpoint of step 9 is corrupt' in err, err
  assert sorted(n.split('-')[0] for n in os.listdir(os.path.join(workdir, 'checkpoints.corrupt'))) \
      == ['12', '9']
  assert_same_run(workdir, reference)


# Orbax leaves the coroutines of a failed restore to the garbage collector.
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_no_valid_checkpoint_stops(tmp_path):
  workdir = str(tmp_path / 'run')
  config = run_config()
  config.stop_after = 6
  train.train(config, workdir)  # checkpoints 3, 6
  corrupt(workdir, 6, 'flip')
  corrupt(workdir, 3, 'truncate')
  files = {n: open(os.path.join(workdir, n), 'rb').read()
           for n in ('config.json', 'metrics.jsonl', 'summary.json')}
  config.stop_after = None
  with pytest.raises(train.RunError, match=r'no valid checkpoint in .*: step 6: .*; step 3: .*'
                                           r'--restart'):
    train.train(config, workdir)
  # Checkpoints gone altogether, while summary.json says there was one: no silent restart.
  for step in (3, 6):
    os.rename(os.path.join(workdir, 'checkpoints', str(step)), os.path.join(workdir, str(step)))
  with pytest.raises(train.RunError, match='says step 6 was checkpointed, but'):
    train.train(config, workdir)
  assert files == {n: open(os.path.join(workdir, n), 'rb').read() for n in files}


def mount_tmpfs(path, size):
  os.makedirs(path)
  return subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', path],
                        capture_output=True).returncode == 0


def test_full_disk_keeps_the_last_checkpoint(reference, tmp_path):
  """A real full disk (a 2 MB tmpfs) where mount works, else a test hook that fails
  the save with ENOSPC. Either way the run stops with one clear line, the previous
  checkpoint stays valid, and after freeing space the run resumes exactly."""
  fs = str(tmp_path / 'fs')
  real = mount_tmpfs(fs, '2m')
  try:
    workdir = os.path.join(fs, 'run')
    config = run_config()
    config.stop_after = 9
    train.train(config, workdir)  # checkpoints 3, 6, 9
    filler = os.path.join(fs, 'filler')
    if real:  # leave 100 kB: metrics fit, the checkpoint of step 12 (~280 kB) does not
      free = os.statvfs(fs).f_bavail * os.statvfs(fs).f_frsize
      with open(filler, 'wb') as f:
        f.write(b'\0' * (free - 100_000))
      env = clean_env()
    else:
      env = clean_env(ARCH_FAULTS='enospc=12')
    proc = launch('train', '--config', SPEC, '--workdir', workdir, env=env)
    errors = [l for l in proc.stderr.splitlines() if l.startswith('error: ')]
    assert proc.returncode == runfiles.EXIT_FAILED and len(errors) == 1, proc.stderr
    assert re.search(r'cannot save the checkpoint of step 12 .*No space left on device.*; '
                     r'the checkpoint of step 9 is intact', errors[0]), errors[0]
    assert summary(workdir)['step'] == 9
    if real:
      # A read-only disk: refused before anything runs, nothing written.
      before = {n: open(os.path.join(workdir, n), 'rb').read() for n in ('metrics.jsonl',
                                                                          'summary.json')}
      assert subprocess.run(['mount', '-o', 'remount,ro', fs]).returncode == 0
      proc = launch('train', '--config', SPEC, '--workdir', workdir)
      assert_one_line_error(proc, 'not writable', 'Read-only file system')
      assert before == {n: open(os.path.join(workdir, n), 'rb').read() for n in before}
      assert subprocess.run(['mount', '-o', 'remount,rw', fs]).returncode == 0
      os.remove(filler)
    proc = launch('train', '--config', SPEC, '--workdir', workdir)
    assert proc.returncode == 0, proc.stderr
    assert_same_run(workdir, reference)
  finally:
    if real:
      subprocess.run(['umount', fs])


def test_second_process_is_refused_then_sigterm_resumes(reference, tmp_path):
  """A second `train` on a live run's workdir is refused (with --restart too) and
  touches nothing; SIGTERM then stops the first with a checkpoint, resumably."""
  workdir = str(tmp_path / 'run')
  first = start(workdir, env=clean_env(ARCH_FAULTS='slow_save=0.5'))  # alive for a while
  wait_for(lambda: trained_to(workdir) >= 7, first, what='step 7')
  before = open(os.path.join(workdir, 'config.json'), 'rb').read()
  for args in ([], ['--restart']):
    proc = launch('train', '--config', SPEC, '--workdir', workdir, *args)
    assert proc.returncode == runfiles.EXIT_LOCKED, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), proc.stderr
    assert f'is in use by pid {first.pid} on ' in lines[0], lines[0]
  assert open(os.path.join(workdir, 'config.json'), 'rb').read() == before

  assert first.poll() is None, tail(first)
  first.send_signal(signal.SIGTERM)
  first.wait(timeout=120)
  assert first.returncode == runfiles.EXIT_INTERRUPTED, tail(first)
  last = tail(first).strip().splitlines()[-1]
  step = int(re.match(r'interrupted: SIGTERM at step (\d+): saved a checkpoint; rerun to resume',
                      last).group(1))
  s = summary(workdir)
  assert s['status'] == 'running' and s['step'] == step
  assert str(step) in os.listdir(os.path.join(workdir, 'checkpoints'))
  assert trained_to(workdir) == step  # nothing past the checkpoint
  assert not os.path.exists(os.path.join(workdir, runfiles.LOCK))

  proc = launch('train', '--config', SPEC, '--workdir', workdir)
  assert proc.returncode == 0, proc.stderr
  assert_same_run(workdir, reference)


# ---- Sweeps. -------------------------------------------------------------------

# Three seeds of TINY, with nothing heavy to import.
SWEEP_EXPERIMENT = frozen(TINY, '''
def get_sweep(arg=''):
  return [{'seed': s} for s in range(3)]
''')
MEMBERS = ['seed=0', 'seed=1', 'seed=2']
DETERMINISTIC = ['run', 'seed', 'status', 'train_error', 'test_error', 'params', 'macs']


@pytest.fixture(scope='module')
def experiment(tmp_path_factory):
  path = tmp_path_factory.mktemp('experiments') / 'seeds.py'
  path.write_text(SWEEP_EXPERIMENT)
  return str(path)


def sweep_command(experiment, workdir):
  """Members one at a time, with a command-line override that every member gets."""
  return launch_command('sweep', f'--config={experiment}', '--workdir', workdir, '--workers', 1,
                        '--config.checkpoint_every=5')


def report(workdir):
  proc = launch('report', '--workdir', workdir)
  assert proc.returncode == 0, proc.stderr
  return pd.read_csv(os.path.join(workdir, 'summary.csv'))[DETERMINISTIC]


@pytest.fixture(scope='module')
def uninterrupted(experiment, tmp_path_factory):
  """Two launchers at once on one sweep directory: neither runs a member twice,
  and both finish with every member done. Its report is the uninterrupted one."""
  workdir = str(tmp_path_factory.mktemp('sweep'))
  procs = [subprocess.Popen(sweep_command(experiment, workdir), cwd=ROOT, env=clean_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for _ in range(2)]
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  return workdir, procs, outputs


@pytest.mark.parametrize('change,words', [
    (('def get_sweep', 'def get_members'), ['defines no get_sweep']),
    (('range(3)', 'range(3'), ['bad.py has a syntax error at line 7']),
    (("{'seed': s}", "{'seed': str(s)}"), ["sweep key 'seed'='0'"]),
])
def test_sweep_input_mistakes_at_dry_run(tmp_path, change, words):
  """One line each, before anything runs or is written (an unknown member key:
  tests/test_sweep.py)."""
  path = tmp_path / 'bad.py'
  path.write_text(SWEEP_EXPERIMENT.replace(*change))
  proc = launch('sweep', f'--config={path}', '--workdir', tmp_path / 'w', '--dry_run')
  assert_one_line_error(proc, *words)
  assert not (tmp_path / 'w').exists()


def test_two_launchers_never_run_a_member_twice(uninterrupted):
  workdir, procs, outputs = uninterrupted
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out
    assert 'sweep: 3 of 3 members done' in out, out
  for name in MEMBERS:
    log = open(os.path.join(workdir, name, 'train.log')).read()
    assert log.count('done: cifar_resnet') == 1, log  # trained once
    assert 'interrupted' not in log
    assert list(lines(os.path.join(workdir, name)).query('split.isna()')['step']) == \
        list(range(1, 21))


def test_killed_sweep_reruns_only_what_is_missing(experiment, uninterrupted, tmp_path):
  rng = random.Random(SWEEP_SEED)
  victim, step = rng.choice([1, 2]), rng.randrange(3, 18)  # a member, and a step in it
  print(f'SWEEP_SEED={SWEEP_SEED}: kill the sweep at step {step} of {MEMBERS[victim]}')
  workdir = str(tmp_path / 'sweep')
  member = os.path.join(workdir, MEMBERS[victim])
  with open(tmp_path / 'sweep.out', 'w') as out:  # saves slowed down: the member lasts
    proc = subprocess.Popen(sweep_command(experiment, workdir), cwd=ROOT,
                            env=clean_env(ARCH_FAULTS='slow_save=0.15'), stdout=out, stderr=out)
  wait_for(lambda: trained_to(member) >= step, proc, what=f'step {step} of {MEMBERS[victim]}')
  proc.kill()
  proc.wait()
  # The member learns of it (SIGTERM from Linux), checkpoints and stops.
  log = os.path.join(member, 'train.log')
  wait_for(lambda: 'interrupted: SIGTERM at step' in open(log).read(), timeout=60,
           what=lambda: f'the member to stop: {open(log).read()[-2000:]}')
  assert runfiles.lock_holder(member) is None and summary(member)['status'] == 'running'
  done = {n: {f: open(os.path.join(workdir, n, f), 'rb').read()
              for f in ('metrics.jsonl', 'summary.json', 'train.log')} for n in MEMBERS[:victim]}
  assert all(summary(os.path.join(workdir, n))['status'] == 'done' for n in done)
  assert not any(os.path.exists(os.path.join(workdir, n, 'summary.json'))
                 for n in MEMBERS[victim + 1:])

  proc = subprocess.run(sweep_command(experiment, workdir), cwd=ROOT, env=clean_env(),
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  for name, files in done.items():  # untouched
    assert files == {f: open(os.path.join(workdir, name, f), 'rb').read() for f in files}
  for name in MEMBERS:
    assert list(lines(os.path.join(workdir, name)).query('split.isna()')['step']) == \
        list(range(1, 21))
  pd.testing.assert_frame_equal(report(workdir), report(uninterrupted[0]))
