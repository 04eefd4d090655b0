"""Trains one config into one run directory (with num_seeds > 1, a group of run
directories, below); rerunning resumes it bit for bit.

Run directory (a contract: sweeps, notebooks and reports read it):
  config.json    the resolved config.
  metrics.jsonl  one JSON object a line, `pandas.read_json(path, lines=True)`.
                 Training lines: step, loss, error, lr, steps_per_s; loss and
                 error are the mean over the training batches since the
                 previous line (since the resumption, after one), lr the
                 learning rate of the last of them. Evaluation lines: step,
                 split, loss, error; split 'train' is the WHOLE training set,
                 un-augmented, in eval mode (the degradation figure is about
                 training error), 'test', and 'val' when data.holdout > 0.
                 Only evaluation lines have a `split`.
  summary.json   status 'running' (also: interrupted or stopped by
                 stop_after; rerun to resume), 'done', or 'failed' with a
                 reason; the last evaluation as train_error, test_error (and
                 val_error), train_loss, test_loss, ...; params, macs (mult-adds
                 per example), step, num_steps, wall_s (all sessions),
                 steps_per_s, compile_s (this session's compile of the train and eval
                 steps), device kind and count, jax and flax versions.
  checkpoints/   orbax, the latest `keep_checkpoints`, each with the CRC32 of
                 its arrays in orbax's step metadata.
  run.lock       while a process trains the run (arch/runfiles.py); a second
                 one is refused.
  checkpoints.corrupt/  checkpoints that failed to restore, moved aside.
JSON files are replaced atomically and JSON lines appended in one write
(arch/runfiles.py).

Seeds in one program (`config.num_seeds = k > 1`): k replicas of the run, seeds
`config.seed + i`, train as one compiled program, `jax.vmap` over the state
(params, BN statistics, optimizer state, RNG: init, data order, augmentation and
dropout all derive from the seed) with the data set shared. Replica i computes
what the run with seed `config.seed + i` alone computes, up to the order of float
sums in the batched convolutions. The workdir then holds the group:
  config.json, summary.json (status, step, wall_s, ... of the group, `seeds`,
  and `failed`: {seed: reason}), checkpoints/ (the stacked state), run.lock, and
  seed=<s>/      one run directory per replica, as the run with seed s alone
                 would write it: config.json (seed=s, num_seeds=1),
                 metrics.jsonl, diagnostics.jsonl, summary.json
                 (arch/analysis.py reads these, one row per seed).
A replica whose loss is not finite fails alone: its summary says failed with the
reason and the step, its files stop there, and the others go on (its lanes of
the program keep running). The group is done when it reaches num_steps, and then
raises Diverged if any replica failed; when every replica has failed it stops as
a single run does.

Faults: a run killed at any moment resumes, on rerun, to exactly the result it
would have had. A checkpoint is committed by orbax's atomic rename, and the
metrics after the checkpoint a run resumes from are dropped, so every step has
its lines exactly once. SIGTERM (a preemption notice) or SIGINT finishes the
step, saves a checkpoint and raises `Interrupted`; a second SIGINT stops at once.
The newest checkpoint that does not restore, or whose arrays do not match their
CRC32 (orbax does not checksum array data: a flipped bit restores silently), is
moved aside with a warning naming its step, and the run resumes from the one
before; with none valid the run stops with `RunError` rather than start over on
top of its results.

Parallelism: `jax.jit` over a 1-D mesh of all devices, axis 'data'. The batch is
sharded over 'data'; parameters, optimizer state and the data set are
replicated. Batch norm therefore normalises with the statistics of the GLOBAL
batch (XLA inserts the all-reduce), unlike per-device batch norm under pmap, so
results do not depend on the number of devices.

Multi-host: every process loads the whole (small) data set and keeps it
replicated on its devices. The rows of a batch are a pure function of (seed,
step), computed identically everywhere and sharded over 'data', so each device
gathers its own slice of the global batch from its local copy: nothing is fed
from the hosts per step. Process 0 writes the run directory; all processes
take part in checkpointing, so the workdir must be on a shared file system.

Exact resume: the state (params, BN statistics, optimizer state, step, RNG) is
checkpointed, and batch, augmentation and dropout of step s depend only on
(seed, s), so a resumed run runs the same programs on the same inputs.
"""
import asyncio
import contextlib
import dataclasses
import errno
import functools
import gc
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import zlib
from typing import Any

import flax
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import tqdm
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

import arch
from arch import data as data_lib
from arch import diagnostics
from arch import trace_cache
from arch import optim
from arch import runfiles
from arch import transfer

# Config keys that may differ between a run and its resumption.
RUN_CONTROL_KEYS = ('stop_after',)


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array    # number of updates done
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array     # uint32 key data, so checkpoints hold plain arrays


class RunError(RuntimeError):
  """The run cannot go on: its directory cannot be read or written as it must."""


class Diverged(RunError):
  """The training loss became NaN or infinite."""


class Interrupted(RuntimeError):
  """SIGTERM or SIGINT stopped the run after it saved a checkpoint; rerun to resume."""


@dataclasses.dataclass
class Job:
  """A run checked by `prepare`, before anything in the workdir was touched."""
  config: Any
  workdir: str
  restart: bool
  model: Any
  data: data_lib.Data
  mesh: jax.sharding.Mesh


@dataclasses.dataclass
class _Replica:
  """Where one seed's results go: the workdir itself for a single run, else
  `<workdir>/seed=<s>/` (runfiles.replica_dirs)."""
  workdir: str
  index: Any     # its row in the stacked state; None when nothing is stacked
  seed: int
  summary: dict  # a single run: the run's summary itself; else the replica's own fields
  failed: str = ''  # why it stopped: its loss was not finite

  def path(self, name):
    return os.path.join(self.workdir, name)


def _pick(tree, index):
  """Replica `index`'s values of a stacked tree, its dicts' keys in their order (as a
  single run writes them); the tree itself for index None."""
  if index is None or not isinstance(tree, dict):
    return tree if index is None else jax.tree.map(lambda x: x[index], tree)
  return {k: _pick(v, index) for k, v in tree.items()}


def train(config, workdir, restart=False, devices=None):
  """Trains (or resumes, or finds finished) the run in `workdir`; returns its summary."""
  return run(prepare(config, workdir, restart, devices))


def prepare(config, workdir, restart=False, devices=None):
  """Everything that can be wrong with the inputs raises ValueError here, with
  one line saying what, before the workdir is written to; a workdir that another
  live process trains in raises runfiles.Locked."""
  model = arch.build(config.model)
  for key in ('num_steps', 'log_every', 'eval_every', 'checkpoint_every', 'keep_checkpoints'):
    if config[key] < 1:
      raise ValueError(f'{key}={config[key]} must be at least 1')
  if config.get('num_seeds', 1) < 1:
    raise ValueError(f'num_seeds={config.num_seeds} must be at least 1')
  devices = list(devices or jax.devices())
  for key in ('batch_size', 'eval_batch_size'):
    if config[key] % len(devices):
      raise ValueError(f'{key}={config[key]} does not divide evenly over {len(devices)} devices')
  optim.make_optimizer(config.optimizer, optim.make_schedule(config.schedule, config.num_steps))
  _check_workdir(workdir)
  if not restart:
    _check_same_config(config, workdir)
  data = data_lib.load(config.data)
  expected = config.model.get('input_shape')
  if expected is not None and tuple(expected) != data.shape:
    raise ValueError(f'model.input_shape={tuple(expected)} but {config.data.name} images are '
                     f'{data.shape}')
  classes = config.model.get('num_classes')
  if classes is not None and classes != data.num_classes:
    raise ValueError(f'model.num_classes={classes} but {config.data.name} has '
                     f'{data.num_classes} classes')
  if config.batch_size > data.size('train'):
    raise ValueError(f'batch_size={config.batch_size} exceeds the {data.size("train")} '
                     f'training images')
  transfer.check(config, model, data.shape)  # optimizer.trainable, init_from
  mesh = jax.make_mesh((len(devices),), ('data',), (jax.sharding.AxisType.Auto,),
                       devices=devices)
  return Job(config, workdir, restart, model, data, mesh)


def config_json(config):
  return json.loads(config.to_json_best_effort())


# Config keys the train and eval steps never read (the loop or `init` does), so
# another seed or run length of an architecture reuses its traced steps.
OUTSIDE_THE_STEPS = ('seed', 'stop_after', 'log_every', 'eval_every', 'checkpoint_every',
                     'keep_checkpoints', 'init_from', 'init_from_config')


def program_key(job):
  """What the jitted steps close over besides their arguments, for
  arch/trace_cache.py: the config, and the data's statistics and split sizes."""
  data = job.data
  config = {k: v for k, v in config_json(job.config).items() if k not in OUTSIDE_THE_STEPS}
  return repr((sorted(config.items()), data.name, data.shape, sorted(data.ranges.items()),
               np.asarray(data.mean).tobytes().hex(), np.asarray(data.std).tobytes().hex()))


def _check_workdir(workdir):
  """Another live process on it, or no way to write it, is refused before any compute."""
  holder = runfiles.lock_holder(workdir) if jax.process_index() == 0 else None  # 0 locks it
  if holder:
    raise runfiles.Locked(workdir, holder)
  folder = os.path.abspath(workdir)
  while not os.path.exists(folder):
    folder = os.path.dirname(folder)
  if not os.path.isdir(folder):
    raise ValueError(f'--workdir {workdir}: {folder} is a file, not a folder')
  try:  # os.access would miss a full or read-only disk for root
    with tempfile.TemporaryFile(dir=folder):
      pass
  except OSError as e:
    raise ValueError(f'--workdir {workdir} is not writable: {folder}: {e.strerror}') from None


def _check_same_config(config, workdir):
  try:
    runfiles.read_json(os.path.join(workdir, 'summary.json'))
    old = runfiles.read_json(os.path.join(workdir, 'config.json'))
  except ValueError as e:
    raise ValueError(f'{e}; pass --restart to discard the run or choose another --workdir')
  if not old:
    return
  old, new = runfiles.flatten(old), runfiles.flatten(config_json(config))
  for flat in (old, new):  # a run from before num_seeds is a single run
    flat.setdefault('num_seeds', 1)
  diff = [f'{k}: {old.get(k)!r} -> {new.get(k)!r}' for k in sorted(set(old) | set(new))
          if old.get(k) != new.get(k) and k not in RUN_CONTROL_KEYS]
  if diff:
    raise ValueError(f'{workdir} holds a run with a different config ({"; ".join(diff[:4])}'
                     f'{"; ..." if len(diff) > 4 else ""}); pass --restart to discard it '
                     f'or choose another --workdir')


# ---- The jitted functions. ------------------------------------------------------

def make_functions(job, tx, schedule):
  """(init, train_step, eval_step): init jitted over the job's mesh; the steps
  as functions, which `_run` compiles through arch/trace_cache.py."""
  config, model, data = job.config, job.model, job.data
  replicated = NamedSharding(job.mesh, P())
  sharded = NamedSharding(job.mesh, P('data'))
  mean, std = jnp.asarray(data.mean), jnp.asarray(data.std)
  num_train = data.size('train')  # training rows come first in data.images
  augment = dict(config.data.augment)

  def init(seed=config.seed):
    init_key, train_key = jax.random.split(jax.random.key(seed))
    x = jnp.zeros((1, *data.shape), jnp.float32)
    variables = model.init({'params': init_key, 'dropout': init_key}, x, train=False)
    params = variables['params']
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get('batch_stats', {}), opt_state=tx.init(params),
                      rng=jax.random.key_data(train_key))

  def train_step(state, images, labels):
    order_key, step_key = jax.random.split(jax.random.wrap_key_data(state.rng))
    rows = data_lib.batch_indices(order_key, state.step, num_train, config.batch_size)
    rows = jax.lax.with_sharding_constraint(rows, sharded)
    x = data_lib.normalize(images[rows], mean, std)
    y = labels[rows]
    augment_key, dropout_key = jax.random.split(jax.random.fold_in(step_key, state.step))
    x = data_lib.augment(augment_key, x, **augment)

    def loss_fn(params):
      logits, updates = model.apply(
          {'params': params, 'batch_stats': state.batch_stats}, x, train=True,
          mutable=['batch_stats', 'intermediates'], rngs={'dropout': dropout_key})
      targets = optax.smooth_labels(jax.nn.one_hot(y, logits.shape[-1]), config.label_smoothing)
      loss = optax.softmax_cross_entropy(logits.astype(jnp.float32), targets).mean()
      return loss, (logits, updates)

    (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    param_updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = state.replace(
        step=state.step + 1, params=optax.apply_updates(state.params, param_updates),
        batch_stats=updates.get('batch_stats', state.batch_stats), opt_state=opt_state)
    metrics = dict(loss=loss, error=jnp.mean(jnp.argmax(logits, -1) != y),
                   lr=schedule(state.step),
                   blocks=diagnostics.block_stats(grads, updates.get('intermediates', {})))
    return new_state, metrics

  def eval_step(params, batch_stats, images, labels, start, stop):
    """Sums of loss and errors over rows [start, min(start + batch, stop))."""
    rows = start + jnp.arange(config.eval_batch_size)
    valid = rows < stop
    rows = jax.lax.with_sharding_constraint(jnp.minimum(rows, stop - 1), sharded)
    x = data_lib.normalize(images[rows], mean, std)
    logits = model.apply({'params': params, 'batch_stats': batch_stats}, x, train=False)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels[rows])
    wrong = jnp.argmax(logits, -1) != labels[rows]
    return jnp.sum(jnp.where(valid, loss, 0.0)), jnp.sum(jnp.where(valid, wrong, 0))

  if config.get('num_seeds', 1) > 1:  # one replica per seed, stacked; images and labels shared
    seeds = config.seed + np.arange(config.num_seeds, dtype=np.int32)
    init = functools.partial(jax.vmap(init), seeds)
    train_step = jax.vmap(train_step, in_axes=(0, None, None))
    eval_step = jax.vmap(eval_step, in_axes=(0, 0, None, None, None, None))
  return jax.jit(init, out_shardings=replicated), train_step, eval_step


def _host(tree):
  """Fetches replicated arrays; works when other processes hold other devices."""
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)


def evaluate(eval_step, state, images, labels, job):
  """{split: {'loss', 'error'}} over every split, in eval mode; with seeds stacked,
  each value is an array of one per seed."""
  out = {}
  batch = job.config.eval_batch_size
  for split, (start, stop) in job.data.ranges.items():
    sums = [eval_step(state.params, state.batch_stats, images, labels, s, stop)
            for s in range(start, stop, batch)]
    loss, wrong = np.sum(np.asarray(_host(sums), np.float64), axis=0)
    out[split] = dict(loss=loss / (stop - start), error=wrong / (stop - start))
  return out


# ---- The loop. ------------------------------------------------------------------

def run(job):
  """Trains under the workdir's lock (process 0 holds it), with SIGTERM and SIGINT
  turned into a checkpoint and `Interrupted`."""
  lead = jax.process_index() == 0
  if lead:
    os.makedirs(job.workdir, exist_ok=True)
  with runfiles.lock(job.workdir) if lead else contextlib.nullcontext(), _StopSignals() as signals:
    return _run(job, lead, signals)


def _run(job, lead, signals):
  config, workdir = job.config, job.workdir
  paths = {name: os.path.join(workdir, name) for name in
           ('config.json', 'metrics.jsonl', 'diagnostics.jsonl', 'summary.json', 'checkpoints',
            'checkpoints.corrupt')}
  if lead and job.restart:
    for name in ('checkpoints', 'checkpoints.corrupt'):
      shutil.rmtree(paths[name], ignore_errors=True)
    for name in ('config.json', 'metrics.jsonl', 'diagnostics.jsonl', 'summary.json'):
      _remove(paths[name])
    for name in os.listdir(workdir):
      if name.startswith('seed='):  # a group's replicas
        shutil.rmtree(os.path.join(workdir, name), ignore_errors=True)
  _sync('workdir')
  previous = runfiles.read_json(paths['summary.json'])
  seed_dirs = runfiles.replica_dirs(workdir, config)
  earlier = {s: runfiles.read_json(os.path.join(d, 'summary.json')) for s, d in seed_dirs.items()}
  manager = ocp.CheckpointManager(
      os.path.abspath(paths['checkpoints']),
      options=ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints,
                                           enable_async_checkpointing=False,
                                           cleanup_tmp_directories=True))  # saves cut by kills
  if (manager.latest_step() or 0) >= config.num_steps and previous.get('status') == 'done':
    if lead:
      print(f'{workdir}: already finished (step {manager.latest_step()} of {config.num_steps}); '
            f'nothing to do')
    manager.close()
    return previous

  schedule = optim.make_schedule(config.schedule, config.num_steps)
  tx = optim.make_optimizer(config.optimizer, schedule)
  init, train_step, eval_step = make_functions(job, tx, schedule)
  replicated = NamedSharding(job.mesh, P())
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                          jax.eval_shape(init))
  start, state = _restore(manager, abstract, previous.get('step', 0), paths, lead)
  if state is None:
    # Parameters are replicated, so a partitionable RNG buys nothing here, and
    # XLA:CPU compiles the non-partitionable threefry about 4x faster.
    with jax.threefry_partitionable(False):
      state = init()
    state = transfer.load_backbone(job, state)  # config.init_from
  images, labels = _replicate(job.data.images, job.mesh), _replicate(job.data.labels, job.mesh)
  # Compiled before the loop; a later run of the same architecture skips the trace
  # too, not only XLA's compile (arch/trace_cache.py).
  t_compile = time.perf_counter()
  key = program_key(job)
  train_step = trace_cache.compile('train_step', train_step, (state, images, labels), key,
                                   donate_argnums=(0,), out_shardings=replicated)
  eval_step = trace_cache.compile('eval_step', eval_step,
                                  (state.params, state.batch_stats, images, labels, 0, 1), key,
                                  out_shardings=replicated)
  compile_s = round(time.perf_counter() - t_compile, 2)

  shape = job.data.shape
  summary = dict(
      status='running', step=start, num_steps=config.num_steps,
      model=config.model.name, data=config.data.name,
      params=arch.count_params(job.model, shape)['params'],
      macs=arch.count_macs(job.model, shape),
      device_kind=jax.devices()[0].device_kind, device_count=job.mesh.size,
      process_count=jax.process_count(), jax_version=jax.__version__, compile_s=compile_s,
      flax_version=flax.__version__)
  wall_before = previous.get('wall_s', 0.0) if start else 0.0
  t_session = time.perf_counter()
  replicas = [_Replica(workdir, None, config.seed, summary)]
  if seed_dirs:
    replicas = [_Replica(d, i, s, {}) for i, (s, d) in enumerate(seed_dirs.items())]
    for r in replicas:  # failed by the checkpoint: its lanes there are not finite
      if earlier[r.seed].get('status') == 'failed' and earlier[r.seed].get('step', 0) <= start:
        r.summary, r.failed = earlier[r.seed], earlier[r.seed].get('reason') or 'failed'

  def group_summary():
    if not seed_dirs:
      return summary
    return dict(summary, seeds=list(seed_dirs),
                failed={r.seed: r.failed for r in replicas if r.failed})

  def write_summaries():
    """The workdir's summary.json and, in a group, each live replica's."""
    if lead:
      runfiles.write_json(paths['summary.json'], group_summary())
      for r in replicas:
        if r.index is not None and not r.failed:
          runfiles.write_json(r.path('summary.json'), {**summary, **r.summary})

  if lead:
    runfiles.write_json(paths['config.json'], config_json(config))
    for r in replicas:
      if r.failed:
        continue  # its files stay as they were when it failed
      if r.index is not None:
        os.makedirs(r.workdir, exist_ok=True)
        runfiles.write_json(r.path('config.json'),
                            dict(config_json(config), seed=r.seed, num_seeds=1))
      kept = _truncate_metrics(r.path('metrics.jsonl'), start)
      _truncate_metrics(r.path('diagnostics.jsonl'), start)
      for line in kept:  # the last evaluation before the checkpoint
        if 'split' in line:
          r.summary.update({f'{line["split"]}_loss': line['loss'],
                            f'{line["split"]}_error': line['error']})
  write_summaries()

  def write_summary(**fields):
    summary.update(fields, wall_s=round(wall_before + time.perf_counter() - t_session, 2))
    write_summaries()

  stop = max(start, min(config.num_steps, config.stop_after or config.num_steps))
  pending = []                       # (step, metrics on device) since the last line
  t_mark, step_mark = time.perf_counter(), start
  train_time, train_steps = 0.0, 0   # this session, without compiling, evaluating, saving
  bar = tqdm.tqdm(total=config.num_steps, initial=start, disable=not lead, unit='step',
                  desc=os.path.basename(os.path.normpath(workdir)), dynamic_ncols=True,
                  mininterval=0.1 if sys.stderr.isatty() else 30)  # a log file: rarely

  def check_finite():
    for step, m in pending:
      losses = _host(m['loss'])
      for r in replicas:
        loss = float(_pick(losses, r.index))
        if r.failed or np.isfinite(loss):
          continue
        r.failed = f'loss is {loss} at step {step}'
        if r.index is not None:  # a replica fails alone; its files stop here
          r.summary.update(status='failed', reason=r.failed, step=step)
          if lead:
            runfiles.write_json(r.path('summary.json'), {**summary, **r.summary})
    if all(r.failed for r in replicas):
      last = manager.latest_step()
      reason = ('; '.join(f'seed {r.seed}: {r.failed}' for r in replicas) if seed_dirs
                else replicas[0].failed)
      reason += '; last good checkpoint: ' + (f'step {last}' if last else 'none')
      write_summary(status='failed', reason=reason)
      bar.close()
      manager.close()
      raise Diverged(f'{reason}; stopped (summary.json says failed)')

  stopping = False
  try:
    for step in range(start + 1, stop + 1):
      state, metrics = train_step(state, images, labels)
      pending.append((step, metrics))
      last_metrics = metrics
      bar.update()
      log = step % config.log_every == 0 or step == config.num_steps
      do_eval = step % config.eval_every == 0 or step == config.num_steps
      stopping = signals.received is not None
      if jax.process_count() > 1:  # all processes stop at the same step, or none
        boundary = log or do_eval or step % config.checkpoint_every == 0
        stopping = boundary and _any_process(stopping)
      save = step % config.checkpoint_every == 0 or step == stop or stopping
      if not (log or do_eval or save):
        continue
      check_finite()  # waits for the step: the timing below is real
      now = time.perf_counter()
      if step_mark > start or step == stop:  # the session's first interval includes compiling
        train_time, train_steps = train_time + now - t_mark, train_steps + step - step_mark
      if log:
        values = _host([{k: v for k, v in m.items() if k != 'blocks'} for _, m in pending])
        for r in (r for r in replicas if not r.failed):
          mine = [_pick(v, r.index) for v in values]
          line = dict(step=step, loss=float(np.mean([v['loss'] for v in mine])),
                      error=float(np.mean([v['error'] for v in mine])), lr=float(mine[-1]['lr']),
                      steps_per_s=round((step - step_mark) / max(now - t_mark, 1e-9), 3))
          _append(r.path('metrics.jsonl'), [line], lead)
        bar.set_postfix(loss=f'{line["loss"]:.4f}', refresh=False)
        pending = []
      if do_eval:
        results = evaluate(eval_step, state, images, labels, job)
        blocks = _host(last_metrics['blocks'])
        for r in (r for r in replicas if not r.failed):
          mine = _pick(results, r.index)
          _append(r.path('metrics.jsonl'),
                  [dict(step=step, split=s, **x) for s, x in mine.items()], lead)
          r.summary.update({f'{s}_{k}': v for s, x in mine.items() for k, v in x.items()})
          _append(r.path('diagnostics.jsonl'), diagnostics.lines(step, _pick(blocks, r.index)),
                  lead)
        write_summary()
      if save:
        _save(manager, step, state, paths['checkpoints'])
        write_summary(step=step)
      t_mark, step_mark = time.perf_counter(), step
      if stopping:
        stop = step
        break
  finally:  # before a failure's message, so that it is the last line
    bar.close()
  manager.wait_until_finished()
  manager.close()

  done = stop == config.num_steps and not stopping
  write_summary(status='done' if done else 'running', step=stop,
                steps_per_s=round(train_steps / max(train_time, 1e-9), 3) if train_steps
                else previous.get('steps_per_s', 0.0))
  if stopping:
    raise Interrupted(f'{signals.received or "another process"} at step {stop}: saved a '
                      f'checkpoint; rerun to resume -> {workdir}')
  failed = [r for r in replicas if r.failed]
  if lead:
    for r in replicas:
      print(f'failed: {r.failed} -> {r.workdir}' if r.failed
            else one_line({**summary, **r.summary}, r.workdir, done))
  if done and failed:
    raise Diverged(f'{len(failed)} of {len(replicas)} seeds diverged ('
                   + '; '.join(f'seed {r.seed}: {r.failed}' for r in failed)
                   + f'); the others are done -> {workdir}')
  return group_summary()


class _StopSignals:
  """SIGTERM (a preemption notice) and SIGINT set `received` for the loop to save
  a checkpoint after the current step and stop. A second SIGINT (Ctrl-C twice)
  acts at once; further SIGTERMs are ignored, also after the run stopped for one:
  preemption ends its grace period with SIGKILL, and Linux repeats a sweep
  member's parent-death signal (arch/sweep.py). Only the main thread can take
  signals; elsewhere this is a no-op."""

  def __enter__(self):
    self.received, self.previous = None, {}
    if threading.current_thread() is threading.main_thread():
      self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
    return self

  def _handle(self, signum, frame):
    if self.received is None:
      self.received = signal.Signals(signum).name
    elif signum == signal.SIGINT:
      signal.signal(signum, self.previous[signum] or signal.SIG_DFL)
      os.kill(os.getpid(), signum)

  def __exit__(self, *exc):
    for s, handler in self.previous.items():
      if s == signal.SIGTERM and self.received == 'SIGTERM':
        handler = signal.SIG_IGN  # the process is on its way out
      signal.signal(s, handler or signal.SIG_DFL)


def _any_process(flag):
  return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))


def checksum(state):
  """CRC32 of the bytes of every array of `state`, in tree order, as 8 hex digits."""
  crc = 0
  for x in jax.tree.leaves(_host(state)):
    crc = zlib.crc32(np.ascontiguousarray(x).tobytes(), crc)
  return f'{crc:08x}'


def _save(manager, step, state, directory):
  """Saves a checkpoint with its checksum; a failure (a full disk) is a RunError
  that leaves the previous checkpoint as it was."""
  try:
    if FAULTS.get('enospc') == str(step):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), directory)
    manager.save(step, args=ocp.args.StandardSave(state),
                 custom_metadata={'crc32': checksum(state)})
  except Exception as e:
    last = [s for s in manager.all_steps() if s != step]
    raise RunError(f'cannot save the checkpoint of step {step} in {directory}: {_cause(e)}; '
                   + (f'the checkpoint of step {max(last)} is intact, rerun to resume from it'
                      if last else 'no checkpoint saved yet')) from e


def _restore(manager, abstract, recorded, paths, lead):
  """(step, state) from the newest checkpoint that restores and matches its
  checksum; (0, None) for a new run. Bad checkpoints newer than it are moved to
  checkpoints.corrupt/ with a warning; with checkpoints but none valid, or none
  where summary.json `recorded` one, raises RunError."""
  bad = []
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      state = manager.restore(step, args=ocp.args.StandardRestore(abstract))
      saved = manager.metadata(step).custom_metadata.get('crc32')  # None: before checksums
      if saved is not None and saved != checksum(state):
        raise ValueError(f'its arrays do not match the CRC32 saved with them ({saved})')
      break
    except Exception as e:  # orbax and tensorstore raise many kinds
      bad.append((step, _cause(e)))
      _collect_quietly()
  else:
    if bad:
      raise RunError(f'no valid checkpoint in {paths["checkpoints"]}: '
                     + '; '.join(f'step {s}: {why}' for s, why in bad)
                     + '; pass --restart to start over')
    if recorded:
      raise RunError(f'{paths["summary.json"]} says step {recorded} was checkpointed, but '
                     f'{paths["checkpoints"]} holds no checkpoint; pass --restart to start over')
    return 0, None
  if bad and lead:
    os.makedirs(paths['checkpoints.corrupt'], exist_ok=True)
    for s, why in bad:
      aside = os.path.join(paths['checkpoints.corrupt'], f'{s}-{time.strftime("%Y%m%d-%H%M%S")}')
      os.replace(os.path.join(paths['checkpoints'], str(s)), aside)
      print(f'warning: the checkpoint of step {s} is corrupt ({why}); moved it to {aside}; '
            f'resuming from step {step}', file=sys.stderr, flush=True)
  _sync('corrupt')
  manager.reload()
  return step, state


def _collect_quietly():
  """Orbax leaves the coroutines of a failed restore to the garbage collector, which
  prints a traceback for each: collect them now, without."""
  hook, sys.unraisablehook = sys.unraisablehook, lambda unraisable: None
  try:
    gc.collect()
  finally:
    sys.unraisablehook = hook


def _cause(e):
  """`Type: message` of the root cause on one line; a long line keeps its end."""
  while e.__cause__ or e.__context__:
    e = e.__cause__ or e.__context__
  lines = [l.strip() for l in str(e).splitlines() if l.strip()]
  line = lines[0] if lines else ''
  return f'{type(e).__name__}: {line if len(line) <= 300 else "..." + line[-250:]}'


def _fault_hooks():
  """Test hooks, from $ARCH_FAULTS (comma-separated): `slow_save=SECONDS` sleeps
  inside every checkpoint save, after its files are written and before orbax's
  commit rename, so a test can kill a run mid-save; `enospc=STEP` makes the save
  of STEP fail as on a full disk, where a small tmpfs cannot be mounted."""
  faults = dict(item.split('=', 1) for item in os.environ.get('ARCH_FAULTS', '').split(',') if item)
  if 'slow_save' in faults:
    cls = ocp.path.atomicity.AtomicRenameTemporaryPath
    finalize = cls.finalize

    async def slow_finalize(self):
      await asyncio.sleep(float(faults['slow_save']))
      await finalize(self)

    cls.finalize = slow_finalize
  return faults


FAULTS = _fault_hooks()


def one_line(s, workdir, done):
  errors = ', '.join(f'{split} error {100 * s[f"{split}_error"]:.2f}%'
                     for split in ('train', 'val', 'test') if f'{split}_error' in s)
  what = 'done' if done else f'stopped at step {s["step"]} of {s["num_steps"]} (rerun to resume)'
  return (f'{what}: {s["model"]} on {s["data"]}, {s["step"]} steps, {s["wall_s"]:.0f} s, '
          f'{s["steps_per_s"]:.1f} steps/s; {errors or "not evaluated yet"} -> {workdir}')


def _replicate(array, mesh):
  """The same host array from every process -> one array replicated on all devices."""
  return jax.make_array_from_process_local_data(NamedSharding(mesh, P()), array)


def _sync(name):
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def _remove(path):
  try:
    os.remove(path)
  except FileNotFoundError:
    pass


def _append(path, lines, lead):
  if lead:
    runfiles.append_lines(path, lines)


def _truncate_metrics(path, step):
  """Drops lines after `step`, the checkpoint a run resumes from; returns the rest."""
  if not os.path.exists(path):
    return []
  lines = [l for l in runfiles.read_lines(path) if l['step'] <= step]
  runfiles.write_lines(path, lines)
  return lines
