"""Reading and writing a run directory's small JSON files atomically.

A kill at any moment leaves either the old file or the new one, never half of one:
write to a temporary file beside it, flush to disk, then rename over it.
"""
import json
import os


def write_json(path, data):
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'w') as f:
    json.dump(data, f, indent=1, default=str)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def read_json(path):
  """The file's contents, or {} when it does not exist yet."""
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    return {}
