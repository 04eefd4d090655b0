"""Sweeps: an experiment's `get_sweep(arg)` lists members; each runs as its own process.

A member is a dict of dotted config overrides, e.g. {'model.depth': 56, 'seed': 1}.
It runs as `launch.py train` in `<workdir>/<member name>/`, so a sweep is nothing
but many ordinary runs, and a rerun skips every member whose summary says done.
"""
import concurrent.futures
import importlib.util
import itertools
import json
import os
import subprocess
import sys
import threading

from arch import runfiles

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, 'launch.py')


def product(**axes):
  """Every combination: product(**{'model.depth': [20, 56], 'seed': [0, 1]}) -> 4 members."""
  keys = list(axes)
  return [dict(zip(keys, values)) for values in itertools.product(*axes.values())]


def zipped(**axes):
  """Axes advanced together: zipped(a=[1, 2], b=[3, 4]) -> [{a: 1, b: 3}, {a: 2, b: 4}]."""
  lengths = {k: len(v) for k, v in axes.items()}
  if len(set(lengths.values())) > 1:
    raise ValueError(f'zipped axes differ in length: {lengths}')
  return [dict(zip(axes, values)) for values in zip(*axes.values())]


def member_name(overrides):
  """'depth=56,shortcut=none,seed=1': the last part of each key, unless two collide."""
  leaves = [k.split('.')[-1] for k in overrides]
  keys = [k if leaves.count(k.split('.')[-1]) > 1 else k.split('.')[-1] for k in overrides]
  return ','.join(f'{k}={overrides[full]}' for k, full in zip(keys, overrides))


def split_spec(spec):
  """'experiments/x.py:arg' -> ('experiments/x.py', 'arg')."""
  path, _, arg = spec.partition(':')
  return path, arg


def load_experiment(path):
  """Imports an experiment file; errors name the file and what is wrong with it."""
  if not os.path.isfile(path):
    raise ValueError(f'experiment file {path!r} does not exist')
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except SyntaxError as e:
    raise ValueError(f'experiment file {path!r} has a syntax error at line {e.lineno}: {e.msg}')
  for fn in ('get_config', 'get_sweep'):
    if not callable(getattr(module, fn, None)):
      raise ValueError(f'experiment file {path!r} defines no {fn}(arg)')
  return module


def apply_overrides(config, overrides):
  """A copy of `config` with dotted overrides set; an unknown key is a ValueError."""
  config = config.copy_and_resolve_references()
  for key, value in overrides.items():
    node, *_, leaf = [config, *key.split('.')]
    for part in key.split('.')[:-1]:
      if part not in node:
        raise ValueError(f'sweep key {key!r}: the config has no {part!r}')
      node = node[part]
    if leaf not in node:
      raise ValueError(f'sweep key {key!r}: the config has no {leaf!r}')
    node[leaf] = value
  return config


def expand(spec, extra=None):
  """The members of a sweep, each checked against the config before anything runs.

  `extra` are overrides given on the sweep's command line: applied to every
  member but not part of its name, so a rerun with other extras meets runs
  with a different config and refuses them rather than mixing results.
  """
  path, arg = split_spec(spec)
  module = load_experiment(path)
  config = module.get_config(arg)
  own = module.get_sweep(arg)
  names = [member_name(m) for m in own]
  members = [{**(extra or {}), **m} for m in own]
  if len(set(names)) != len(names):
    raise ValueError(f'sweep {spec!r} has duplicate members')
  for overrides in members:
    apply_overrides(config, overrides)
  return [dict(name=n, overrides=m) for n, m in zip(names, members)]


def train_command(spec, workdir, overrides):
  """The `launch.py train` command line of one member."""
  flags = [f'--config.{k}={v}' for k, v in overrides.items()]
  return [sys.executable, LAUNCH, 'train', f'--config={spec}', f'--workdir={workdir}', *flags]


def member_status(workdir):
  return runfiles.read_json(os.path.join(workdir, 'summary.json')).get('status', 'pending')


def member_env(sweep_dir):
  """The members of a sweep share a persistent compilation cache, so a repeated
  architecture (another seed, a rerun) does not compile again; even small
  programs are cached. An explicit JAX_COMPILATION_CACHE_DIR wins."""
  env = dict(os.environ)
  env.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(sweep_dir, 'jax_cache'))
  env.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
  env.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')
  return env


def run_member(spec, workdir, overrides, cores=None):
  """Runs one member to completion; returns (status, reason). Used locally and by submitit."""
  log = os.path.join(workdir, 'train.log')
  os.makedirs(workdir, exist_ok=True)
  preexec = (lambda: os.sched_setaffinity(0, cores)) if cores else None
  with open(log, 'a') as out:
    proc = subprocess.run(train_command(spec, workdir, overrides), stdout=out,
                          stderr=subprocess.STDOUT, preexec_fn=preexec, cwd=ROOT,
                          env=member_env(os.path.dirname(os.path.abspath(workdir))))
  summary = runfiles.read_json(os.path.join(workdir, 'summary.json'))
  if proc.returncode == 0 and summary.get('status') == 'done':
    return 'done', None
  reason = summary.get('reason') or last_line(log) or f'exit code {proc.returncode}'
  return 'failed', reason


def last_line(path):
  try:
    with open(path) as f:
      lines = [l.strip() for l in f if l.strip()]
    return lines[-1] if lines else None
  except OSError:
    return None


def core_slots(workers):
  """Splits this process's cores into `workers` disjoint sets (shared round-robin
  when there are more workers than cores), so parallel members do not fight over
  the same core."""
  cores = sorted(os.sched_getaffinity(0))
  if workers >= len(cores):
    return [{cores[i % len(cores)]} for i in range(workers)]
  return [set(cores[i::workers]) for i in range(workers)]


class SweepRecord:
  """`<workdir>/sweep.json`: the members and their status, rewritten atomically."""

  def __init__(self, workdir, spec, members):
    self.path = os.path.join(workdir, 'sweep.json')
    self.lock = threading.Lock()
    old = {m['name']: m for m in runfiles.read_json(self.path).get('members', [])}
    self.data = dict(experiment=spec, members=[
        dict(m, status=old.get(m['name'], {}).get('status', 'pending'),
             reason=old.get(m['name'], {}).get('reason')) for m in members])
    self.save()

  def set(self, name, status, reason=None):
    with self.lock:
      for m in self.data['members']:
        if m['name'] == name:
          m['status'], m['reason'] = status, reason
      self.save()

  def save(self):
    runfiles.write_json(self.path, self.data)


def run_local(spec, workdir, members, workers, progress=True):
  """Runs the members not yet done with `workers` processes; returns {name: (status, reason)}."""
  from tqdm import tqdm
  record = SweepRecord(workdir, spec, members)
  todo = [m for m in members if member_status(os.path.join(workdir, m['name'])) != 'done']
  results = {m['name']: ('done', None) for m in members if m not in todo}
  for name in results:
    record.set(name, 'done')
  slots = core_slots(workers)
  free = list(range(workers))
  free_lock = threading.Lock()

  def work(member):
    with free_lock:
      slot = free.pop()
    try:
      record.set(member['name'], 'running')
      status, reason = run_member(spec, os.path.join(workdir, member['name']),
                                  member['overrides'], slots[slot])
    finally:
      with free_lock:
        free.append(slot)
    record.set(member['name'], status, reason)
    return member['name'], status, reason

  bar = tqdm(total=len(members), initial=len(results), desc='sweep', unit='run',
             disable=not progress)
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    for name, status, reason in map(lambda f: f.result(),
                                    concurrent.futures.as_completed(
                                        [pool.submit(work, m) for m in todo])):
      results[name] = (status, reason)
      bar.update()
      if status != 'done':
        bar.write(f'member {name} failed: {reason}')
  bar.close()
  return results


def run_submitit(spec, workdir, members, executor_params, cluster=None):
  """Submits the members not yet done as one job array through submitit.

  `cluster=None` lets submitit pick SLURM when it is there; 'local' runs the
  same submission path as local processes (what the tests use).
  """
  import submitit
  record = SweepRecord(workdir, spec, members)
  todo = [m for m in members if member_status(os.path.join(workdir, m['name'])) != 'done']
  results = {m['name']: ('done', None) for m in members if m not in todo}
  executor = submitit.AutoExecutor(folder=os.path.join(workdir, 'submitit'), cluster=cluster)
  executor.update_parameters(**executor_params)
  jobs = executor.map_array(run_member, [spec] * len(todo),
                            [os.path.join(workdir, m['name']) for m in todo],
                            [m['overrides'] for m in todo]) if todo else []
  for member, job in zip(todo, jobs):
    record.set(member['name'], 'running')
  for member, job in zip(todo, jobs):
    try:
      status, reason = job.result()
    except Exception as e:  # the job itself died (node failure, time limit)
      status, reason = 'failed', f'{type(e).__name__}: {str(e).strip().splitlines()[-1]}'
    results[member['name']] = (status, reason)
    record.set(member['name'], status, reason)
  return results
