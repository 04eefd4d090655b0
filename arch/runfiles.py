"""A run directory's small files: JSON written atomically, and the run lock.

A kill at any moment leaves either the old file or the new one, never half of one:
write to a temporary file beside it, flush to disk, then rename over it.

`run.lock` keeps a second process from training into a run directory while a
first one does. It is an flock(2) lock, so the kernel drops it when its holder
dies, however it dies: that is the stale-lock rule, with no guessing from pids.
The file names its holder (pid, host, since) for the message the second process
prints, and is removed when the holder finishes. Across hosts on a shared file
system it holds where the file system supports flock (NFSv4, Lustre mounted with
-o flock); where it does not, a warning says that the run is unlocked.
"""
import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time

LOCK = 'run.lock'

# Exit status of `launch.py train`; sweeps act on it.
EXIT_FAILED = 1        # diverged, or the run directory cannot be read or written
EXIT_BAD_INPUT = 2     # a mistake in the config, data set or workdir; nothing written
EXIT_LOCKED = 3        # another live process holds the workdir's run.lock
EXIT_INTERRUPTED = 75  # SIGTERM or SIGINT: checkpointed, rerun to resume (EX_TEMPFAIL)


def write_json(path, data):
  write_text(path, json.dumps(data, indent=1, default=str))


def write_lines(path, lines):
  """Replaces `path` with one JSON object a line."""
  write_text(path, ''.join(json.dumps(line) + '\n' for line in lines))


def write_text(path, text):
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'w') as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def append_lines(path, lines):
  """Appends JSON lines in one write(2): a kill leaves all of them or none, and a
  full disk at worst a cut last line, which `read_lines` skips."""
  data = ''.join(json.dumps(line) + '\n' for line in lines).encode()
  if not data:
    return
  fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
  try:
    os.write(fd, data)
  finally:
    os.close(fd)


def read_lines(path):
  """The JSON objects of a .jsonl file, without a last line cut short; [] if absent."""
  if not os.path.exists(path):
    return []
  lines = []
  with open(path) as f:
    for line in f:
      try:
        lines.append(json.loads(line))
      except json.JSONDecodeError:  # the last line, cut short by a kill or a full disk
        pass
  return lines


def read_json(path):
  """The file's contents, or {} when it does not exist yet; ValueError naming the
  file when it is not JSON (these files are only ever replaced whole)."""
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    return {}
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f'{path} is corrupt, not JSON ({e})') from None


# ---- The run lock. ---------------------------------------------------------------

class Locked(RuntimeError):
  """Another live process holds the run directory's lock."""

  def __init__(self, workdir, holder):
    super().__init__(
        f'{workdir} is in use by pid {holder.get("pid", "?")} on {holder.get("host", "?")} '
        f'(since {holder.get("since", "?")}); wait for it to finish or stop it (the lock of a '
        f'process that died frees itself)')


def lock_holder(workdir):
  """Who holds `workdir`'s lock ({'pid', 'host', 'since'}), or None when nobody does."""
  try:
    fd = os.open(os.path.join(workdir, LOCK), os.O_RDONLY)
  except OSError:  # none there, or no folder to hold one
    return None
  try:
    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    return None  # closing the file drops this shared lock again
  except BlockingIOError:
    return _holder(fd)
  except OSError:  # no flock on this file system: nothing to go by
    return None
  finally:
    os.close(fd)


@contextlib.contextmanager
def lock(workdir):
  """Holds `workdir`'s run lock for the block; raises `Locked` naming the holder."""
  path = os.path.join(workdir, LOCK)
  while True:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      _flock(fd)
    except BlockingIOError:
      holder = _holder(fd)
      os.close(fd)
      raise Locked(workdir, holder) from None
    except OSError as e:
      if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        raise
      print(f'warning: {path}: this file system has no flock ({e.strerror}); the run is '
            f'not protected from a second process', file=sys.stderr)
      break
    try:  # the lock of a file its last holder removed while we opened it protects nothing
      if os.stat(path).st_ino == os.fstat(fd).st_ino:
        break
    except FileNotFoundError:
      pass
    os.close(fd)
  holder = dict(pid=os.getpid(), host=socket.gethostname(),
                since=time.strftime('%Y-%m-%d %H:%M:%S'))
  os.ftruncate(fd, 0)
  os.pwrite(fd, json.dumps(holder).encode(), 0)
  try:
    yield
  finally:
    try:
      os.remove(path)  # before unlocking: a process waiting for it then makes a new one
    except OSError:
      pass
    os.close(fd)


def _flock(fd, tries=5):
  """An exclusive lock, retried for a moment: `lock_holder` takes a shared one for
  an instant to look."""
  for i in range(tries):
    try:
      return fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      if i == tries - 1:
        raise
      time.sleep(0.05)


def _holder(fd):
  try:
    return json.loads(os.pread(fd, 4096, 0) or b'{}')
  except (OSError, ValueError):  # written an instant from now
    return {}


def flatten(tree, prefix=''):
  """{'model': {'depth': 20}} -> {'model.depth': 20}: configs compared or tabulated by key."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(flatten(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


def replica_dirs(workdir, config):
  """{seed: run directory} of a group, `config.num_seeds` > 1 seeds trained in one
  program (arch/train.py): `<workdir>/seed=<s>/` from `config.seed` on; {} for a single run."""
  seed, count = config['seed'], config.get('num_seeds', 1)
  if count == 1:
    return {}
  return {s: os.path.join(workdir, f'seed={s}') for s in range(seed, seed + count)}
