"""Sweeps: an experiment's `get_sweep(arg)` lists members; each runs as its own process.

A member is a dict of dotted config overrides, e.g. {'model.depth': 56, 'seed': 1}.
It runs as `launch.py train` in `<workdir>/<member name>/`, so a sweep is nothing
but many ordinary runs, and a rerun skips every member whose summary says done.

Faults: a member that another live process holds (its run.lock: a second
launcher on the same sweep directory, or a member a killed launcher left
running) is waited for, not run, and then skipped when done or resumed here;
launchers take unlocked members first. So two launchers never run a member
twice, and both finish with every member done. Locally, each member gets
SIGTERM when its launcher dies, so a killed sweep leaves its members
checkpointed (exit status 75) rather than training on unseen.
"""
import concurrent.futures
import ctypes
import importlib.util
import itertools
import os
import signal
import subprocess
import sys
import threading
import time

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
  except Exception as e:
    raise ValueError(f'experiment file {path!r} failed to import: {type(e).__name__}: {e}')
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
    try:
      node[leaf] = value
    except TypeError as e:  # ml_collections keeps each field's type
      raise ValueError(f'sweep key {key!r}={value!r}: {e}') from None
  return config


def expand(spec, extra=None):
  """The members of a sweep, each checked against the config before anything runs.

  `extra` are overrides given on the sweep's command line: applied to every
  member but not part of its name, so a rerun with other extras meets runs
  with a different config and refuses them rather than mixing results.
  """
  path, arg = split_spec(spec)
  module = load_experiment(path)
  try:
    config = module.get_config(arg)
    own = module.get_sweep(arg)
  except Exception as e:  # a bug in the experiment file: one line, naming it
    raise ValueError(f'{spec}: {type(e).__name__}: {e}') from None
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
  try:
    return runfiles.read_json(os.path.join(workdir, 'summary.json')).get('status', 'pending')
  except ValueError:  # corrupt: the member's own run says so when it starts
    return 'unreadable'


def member_env(sweep_dir):
  """The members of a sweep share a persistent compilation cache, so a repeated
  architecture (another seed, a rerun) does not compile again; even small
  programs are cached. An explicit JAX_COMPILATION_CACHE_DIR wins."""
  env = dict(os.environ)
  env.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(sweep_dir, 'jax_cache'))
  env.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
  env.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')
  return env


def run_member(spec, workdir, overrides, cores=None, wait=True, poll_s=0.5):
  """Runs one member to completion; returns (status, reason), status 'done',
  'failed', or 'interrupted' (by a signal, after a checkpoint: a rerun resumes it).
  A member another live process holds is waited for, or with `wait=False` left
  to it: ('busy', None). Used locally and by submitit."""
  log = os.path.join(workdir, 'train.log')
  os.makedirs(workdir, exist_ok=True)
  parent = os.getpid()
  while True:
    while runfiles.lock_holder(workdir):
      if not wait:
        return 'busy', None
      time.sleep(poll_s)
    if member_status(workdir) == 'done':
      return 'done', None
    with open(log, 'a') as out:
      proc = subprocess.run(train_command(spec, workdir, overrides), stdout=out,
                            stderr=subprocess.STDOUT, preexec_fn=lambda: _in_child(cores, parent),
                            cwd=ROOT, env=member_env(os.path.dirname(os.path.abspath(workdir))))
    if proc.returncode != runfiles.EXIT_LOCKED:  # else taken since we looked: wait again
      break
  status = member_status(workdir)
  if proc.returncode == 0 and status == 'done':
    return 'done', None
  try:
    reason = runfiles.read_json(os.path.join(workdir, 'summary.json')).get('reason')
  except ValueError:
    reason = None
  reason = reason or last_line(log) or f'exit code {proc.returncode}'
  if proc.returncode == runfiles.EXIT_INTERRUPTED or proc.returncode < 0:
    return 'interrupted', reason
  return 'failed', reason


try:
  _prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here, not after fork
except (OSError, AttributeError):  # not Linux
  _prctl = None
PR_SET_PDEATHSIG = 1


def _in_child(cores, parent):
  """Before exec, in the member's process: pin it to `cores`, and have Linux send
  it SIGTERM when the launcher's thread that started it dies (and again as it
  passes to each other thread that dies with the launcher: train ignores repeats)."""
  if cores:
    os.sched_setaffinity(0, cores)
  if _prctl is not None:
    _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the launcher died before that
      os.kill(os.getpid(), signal.SIGTERM)


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


def split_done(workdir, members):
  """(members still to run, {name: ('done', None)} for those whose summary says done)."""
  todo = [m for m in members if member_status(os.path.join(workdir, m['name'])) != 'done']
  return todo, {m['name']: ('done', None) for m in members if m not in todo}


def run_local(spec, workdir, members, workers, progress=True):
  """Runs the members not yet done with `workers` processes; returns {name: (status, reason)}.

  Each worker takes the next member that no other live process holds; one that
  another process takes first goes back in the queue; when every member left is
  held, the worker waits for one of them (run_member)."""
  from tqdm import tqdm
  record = SweepRecord(workdir, spec, members)
  todo, results = split_done(workdir, members)
  for name in results:
    record.set(name, 'done')
  lock = threading.Lock()
  bar = tqdm(total=len(members), initial=len(results), desc='sweep', unit='run',
             disable=not progress)

  def take():
    """(the next member or None when none is left, whether to wait for it)."""
    with lock:
      free = [m for m in todo if not runfiles.lock_holder(os.path.join(workdir, m['name']))]
      member = (free or todo or [None])[0]
      if member:
        todo.remove(member)
      return member, not free

  def work(cores):
    while True:
      member, wait = take()
      if member is None:
        return
      record.set(member['name'], 'running')
      status, reason = run_member(spec, os.path.join(workdir, member['name']),
                                  member['overrides'], cores, wait=wait)
      if status == 'busy':  # another launcher took it first: back in the queue
        with lock:
          todo.append(member)
        continue
      record.set(member['name'], status, reason)
      with lock:
        results[member['name']] = (status, reason)
        bar.update()
        if status != 'done':
          bar.write(f'member {member["name"]} {status}: {reason}')

  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    for future in [pool.submit(work, cores) for cores in core_slots(workers)]:
      future.result()
  bar.close()
  return results


def run_submitit(spec, workdir, members, executor_params, cluster=None):
  """Submits the members not yet done as one job array through submitit.

  `cluster=None` lets submitit pick SLURM when it is there; 'local' runs the
  same submission path as local processes (what the tests use).
  """
  import submitit
  record = SweepRecord(workdir, spec, members)
  todo, results = split_done(workdir, members)
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
