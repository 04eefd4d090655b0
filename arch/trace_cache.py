"""Programs traced by an earlier process, reused: jax.export beside the compilation cache.

The persistent compilation cache (on for sweeps, `arch/sweep.py`) skips XLA's
compile but not JAX's tracing, which is Python work per layer: an unrolled
ResNet-110's warm compile was 0.83 s of tracing in 1.5 s (BENCHMARKS.md).
`compile` keys a program by a name, the function's module and qualified name,
the caller's `key` (what the function closes over: the config, the data's
statistics), the arguments' shapes, dtypes and shardings, the library versions
and a hash of the `arch` sources (and of the files of models registered from
elsewhere), and keeps its StableHLO (`jax.export`) in
`<compilation cache dir>/arch_traces`. A later process with the same key
deserializes it instead of tracing, and XLA's compile of it is the compilation
cache's hit. Off (plain `jax.jit`) without a
compilation cache directory, across several processes, or with
ARCH_TRACE_CACHE=0. An unreadable entry is traced afresh and rewritten.
"""
import functools
import hashlib
import inspect
import logging
import os
import pickle
import sys

import flax
import jax
import jaxlib
import optax

from arch import kernels, layers, registry

_SOURCES = os.path.dirname(os.path.abspath(__file__))


def directory():
  """Where the exported programs go, or None when the cache is off."""
  return _directory(jax.config.jax_compilation_cache_dir, os.environ.get('ARCH_TRACE_CACHE'),
                    jax.process_count())


def _directory(compilation_cache_dir, switch, process_count):
  if not compilation_cache_dir or switch == '0' or process_count > 1:
    return None
  return os.path.join(compilation_cache_dir, 'arch_traces')


@functools.cache
def _code_digest():
  """The `arch` sources and the kernels' library: what a traced program depends on."""
  digest = hashlib.sha256()
  paths = [os.path.join(root, name) for root, _, names in os.walk(_SOURCES) for name in names
           if name.endswith('.py') or name == os.path.basename(kernels.LIBRARY)]
  for path in sorted(paths):
    digest.update(os.path.relpath(path, _SOURCES).encode())
    with open(path, 'rb') as f:
      digest.update(f.read())
  return digest.hexdigest()


def _models_digest():
  """The source files of models registered from outside `arch` (an experiment's
  own net): editing one must not reuse its old trace. A builder with no source
  file (defined in a notebook cell) is keyed by its address, so its program is
  never reused across processes."""
  digest = hashlib.sha256()
  for name, builder in sorted(registry.builders().items()):
    try:
      path = inspect.getsourcefile(builder)
    except TypeError:
      path = None
    if path and os.path.exists(path):
      if not os.path.abspath(path).startswith(_SOURCES + os.sep):  # arch/: _code_digest
        with open(path, 'rb') as f:
          digest.update(name.encode() + f.read())
    else:
      digest.update(f'{name}: {builder!r}'.encode())
  return digest.hexdigest()


def _describe(leaf):
  sharding = getattr(leaf, 'sharding', None)
  return (getattr(leaf, 'shape', ()), str(getattr(leaf, 'dtype', type(leaf))),
          getattr(leaf, 'weak_type', False), str(sharding))


def _identity(fn):
  """Which function: its module and qualified name, through jit/vmap wrappers."""
  fn = inspect.unwrap(fn)
  return f'{getattr(fn, "__module__", "")}.{getattr(fn, "__qualname__", type(fn).__name__)}'


def cache_key(name, fn, key, leaves, in_tree, options):
  """A hex digest of everything the traced program depends on."""
  parts = (name, _identity(fn), key, [_describe(leaf) for leaf in leaves], str(in_tree), options,
           jax.__version__, jaxlib.__version__, flax.__version__, optax.__version__,
           sys.version_info[:2], _code_digest(), _models_digest(), kernels.available(),
           layers.switches(), jax.default_backend(), jax.device_count(),
           jax.config.jax_enable_x64, jax.config.jax_default_matmul_precision)
  return hashlib.sha256(repr(parts).encode()).hexdigest()[:32]


def compile(name, fn, args, key, donate_argnums=(), out_shardings=None):  # noqa: A001
  """`jax.jit(fn, ...).lower(*args).compile()`, as a function of pytrees like `args`,
  tracing `fn` only if no earlier process exported it under the same key.

  `key`: a string for what `fn` closes over (its config, constants); the
  arguments' shapes, dtypes and shardings are added here. `out_shardings`: one
  sharding for every output, or None.
  """
  jit_options = dict(out_shardings=out_shardings) if out_shardings is not None else {}
  folder = directory()
  if folder is None:
    return jax.jit(fn, donate_argnums=donate_argnums, **jit_options).lower(*args).compile()
  leaves, in_tree = jax.tree.flatten(args)
  donated = [i for i, leaf_arg in enumerate(_arg_of_leaf(args)) if leaf_arg in donate_argnums]
  path = os.path.join(folder, f'{name}-{cache_key(name, fn, key, leaves, in_tree, repr(jit_options))}')
  exported, out_tree = _load(path)
  if exported is None:
    exported, out_tree = _export(fn, in_tree, leaves, jit_options)
    _save(path, exported, out_tree)
  compiled = jax.jit(exported.call, donate_argnums=tuple(donated)).lower(*leaves).compile()

  def call(*call_args):
    return jax.tree.unflatten(out_tree, compiled(*jax.tree.leaves(call_args)))
  return call


def _arg_of_leaf(args):
  """For each leaf of `args`, the index of the argument it belongs to."""
  return [i for i, arg in enumerate(args) for _ in jax.tree.leaves(arg)]


def _export(fn, in_tree, leaves, jit_options):
  out_trees = []

  def flat(*flat_args):
    out, out_tree = jax.tree.flatten(fn(*jax.tree.unflatten(in_tree, flat_args)))
    out_trees.append(out_tree)
    return out

  checks = [jax.export.DisabledSafetyCheck.custom_call(target) for target in kernels.TARGETS]
  exported = jax.export.export(jax.jit(flat, **jit_options), disabled_checks=checks)(*leaves)
  return exported, out_trees[-1]


def _load(path):
  if not os.path.exists(path):
    return None, None
  try:
    with open(path, 'rb') as f:
      serialized, out_tree = pickle.load(f)
    return jax.export.deserialize(bytearray(serialized)), out_tree
  except Exception as e:  # noqa: BLE001 -- a torn or foreign file: trace afresh, overwrite
    logging.getLogger(__name__).warning('arch.trace_cache: %s unreadable (%s); tracing again',
                                        path, str(e).splitlines()[0] if str(e) else type(e).__name__)
    return None, None


def _save(path, exported, out_tree):
  """Written whole or not at all (a rename), so a killed process leaves no torn entry."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  temporary = f'{path}.{os.getpid()}.tmp'
  with open(temporary, 'wb') as f:
    pickle.dump((bytes(exported.serialize()), out_tree), f)
  os.replace(temporary, path)
