"""Trains one config into one run directory; rerunning resumes it bit for bit.

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
                 steps_per_s, device kind and count, jax and flax versions.
  checkpoints/   orbax, the latest `keep_checkpoints`.
JSON files are replaced atomically (arch/runfiles.py).

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
import dataclasses
import json
import os
import shutil
import sys
import time
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
from arch import optim
from arch import runfiles

# Config keys that may differ between a run and its resumption.
RUN_CONTROL_KEYS = ('stop_after',)


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array    # number of updates done
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array     # uint32 key data, so checkpoints hold plain arrays


class Diverged(RuntimeError):
  """The training loss became NaN or infinite."""


@dataclasses.dataclass
class Job:
  """A run checked by `prepare`, before anything in the workdir was touched."""
  config: Any
  workdir: str
  restart: bool
  model: Any
  data: data_lib.Data
  mesh: jax.sharding.Mesh


def train(config, workdir, restart=False, devices=None):
  """Trains (or resumes, or finds finished) the run in `workdir`; returns its summary."""
  return run(prepare(config, workdir, restart, devices))


def prepare(config, workdir, restart=False, devices=None):
  """Everything that can be wrong with the inputs raises ValueError here, with
  one line saying what, before the workdir is written to."""
  model = arch.build(config.model)
  for key in ('num_steps', 'log_every', 'eval_every', 'checkpoint_every', 'keep_checkpoints'):
    if config[key] < 1:
      raise ValueError(f'{key}={config[key]} must be at least 1')
  devices = list(devices or jax.devices())
  for key in ('batch_size', 'eval_batch_size'):
    if config[key] % len(devices):
      raise ValueError(f'{key}={config[key]} does not divide evenly over {len(devices)} devices')
  optim.make_optimizer(config.optimizer, optim.make_schedule(config.schedule, config.num_steps))
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
  mesh = jax.make_mesh((len(devices),), ('data',), (jax.sharding.AxisType.Auto,),
                       devices=devices)
  return Job(config, workdir, restart, model, data, mesh)


def config_json(config):
  return json.loads(config.to_json_best_effort())


def _check_same_config(config, workdir):
  old = runfiles.read_json(os.path.join(workdir, 'config.json'))
  if not old:
    return
  old, new = _flatten(old), _flatten(config_json(config))
  diff = [f'{k}: {old.get(k)!r} -> {new.get(k)!r}' for k in sorted(set(old) | set(new))
          if old.get(k) != new.get(k) and k not in RUN_CONTROL_KEYS]
  if diff:
    raise ValueError(f'{workdir} holds a run with a different config ({"; ".join(diff[:4])}'
                     f'{"; ..." if len(diff) > 4 else ""}); pass --restart to discard it '
                     f'or choose another --workdir')


def _flatten(tree, prefix=''):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f'{prefix}{k}.'))
    else:
      out[prefix + k] = v
  return out


# ---- The jitted functions. ------------------------------------------------------

def make_functions(job, tx, schedule):
  """(init, train_step, eval_step), jitted over the job's mesh."""
  config, model, data = job.config, job.model, job.data
  replicated = NamedSharding(job.mesh, P())
  sharded = NamedSharding(job.mesh, P('data'))
  mean, std = jnp.asarray(data.mean), jnp.asarray(data.std)
  num_train = data.size('train')  # training rows come first in data.images
  augment = dict(config.data.augment)

  def init():
    init_key, train_key = jax.random.split(jax.random.key(config.seed))
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

  return (jax.jit(init, out_shardings=replicated),
          jax.jit(train_step, donate_argnums=0, out_shardings=(replicated, replicated)),
          jax.jit(eval_step, out_shardings=replicated))


def _host(tree):
  """Fetches replicated arrays; works when other processes hold other devices."""
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)


def evaluate(eval_step, state, images, labels, job):
  """{split: {'loss', 'error'}} over every split, in eval mode."""
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
  config, workdir = job.config, job.workdir
  lead = jax.process_index() == 0
  paths = {name: os.path.join(workdir, name) for name in
           ('config.json', 'metrics.jsonl', 'diagnostics.jsonl', 'summary.json', 'checkpoints')}
  if lead and job.restart:
    shutil.rmtree(paths['checkpoints'], ignore_errors=True)
    for name in ('config.json', 'metrics.jsonl', 'diagnostics.jsonl', 'summary.json'):
      _remove(paths[name])
  if lead:
    os.makedirs(workdir, exist_ok=True)
  _sync('workdir')
  manager = ocp.CheckpointManager(
      os.path.abspath(paths['checkpoints']),
      options=ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints,
                                           enable_async_checkpointing=False))
  start = manager.latest_step() or 0
  if start >= config.num_steps:
    if lead:
      print(f'{workdir}: already finished (step {start} of {config.num_steps}); nothing to do')
    manager.close()
    return runfiles.read_json(paths['summary.json'])

  schedule = optim.make_schedule(config.schedule, config.num_steps)
  tx = optim.make_optimizer(config.optimizer, schedule)
  init, train_step, eval_step = make_functions(job, tx, schedule)
  if start:
    replicated = NamedSharding(job.mesh, P())
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                            jax.eval_shape(init))
    state = manager.restore(start, args=ocp.args.StandardRestore(abstract))
  else:
    # Parameters are replicated, so a partitionable RNG buys nothing here, and
    # XLA:CPU compiles the non-partitionable threefry about 4x faster.
    with jax.threefry_partitionable(False):
      state = init()
  images, labels = _replicate(job.data.images, job.mesh), _replicate(job.data.labels, job.mesh)

  shape = job.data.shape
  summary = dict(
      status='running', step=start, num_steps=config.num_steps,
      model=config.model.name, data=config.data.name,
      params=arch.count_params(job.model, shape)['params'],
      macs=arch.count_macs(job.model, shape),
      device_kind=jax.devices()[0].device_kind, device_count=job.mesh.size,
      process_count=jax.process_count(), jax_version=jax.__version__,
      flax_version=flax.__version__)
  wall_before = runfiles.read_json(paths['summary.json']).get('wall_s', 0.0) if start else 0.0
  t_session = time.perf_counter()
  if lead:
    runfiles.write_json(paths['config.json'], config_json(config))
    kept = _truncate_metrics(paths['metrics.jsonl'], start)
    _truncate_metrics(paths['diagnostics.jsonl'], start)
    for line in kept:  # the last evaluation before the checkpoint
      if 'split' in line:
        summary.update({f'{line["split"]}_loss': line['loss'], f'{line["split"]}_error': line['error']})
    runfiles.write_json(paths['summary.json'], summary)

  def write_summary(**fields):
    summary.update(fields, wall_s=round(wall_before + time.perf_counter() - t_session, 2))
    if lead:
      runfiles.write_json(paths['summary.json'], summary)

  stop = max(start, min(config.num_steps, config.stop_after or config.num_steps))
  pending = []                       # (step, metrics on device) since the last line
  t_mark, step_mark = time.perf_counter(), start
  train_time, train_steps = 0.0, 0   # this session, without compiling, evaluating, saving
  bar = tqdm.tqdm(total=config.num_steps, initial=start, disable=not lead, unit='step',
                  desc=os.path.basename(os.path.normpath(workdir)), dynamic_ncols=True,
                  mininterval=0.1 if sys.stderr.isatty() else 30)  # a log file: rarely

  def check_finite():
    for step, m in pending:
      loss = float(_host(m['loss']))
      if not np.isfinite(loss):
        reason = f'loss is {loss} at step {step}'
        write_summary(status='failed', reason=reason)
        bar.close()
        manager.close()
        raise Diverged(f'{reason}; stopped (summary.json says failed)')

  for step in range(start + 1, stop + 1):
    state, metrics = train_step(state, images, labels)
    pending.append((step, metrics))
    last_metrics = metrics
    bar.update()
    log = step % config.log_every == 0 or step == config.num_steps
    do_eval = step % config.eval_every == 0 or step == config.num_steps
    save = step % config.checkpoint_every == 0 or step == stop
    if not (log or do_eval or save):
      continue
    check_finite()  # waits for the step: the timing below is real
    now = time.perf_counter()
    if step_mark > start or step == stop:  # the session's first interval includes compiling
      train_time, train_steps = train_time + now - t_mark, train_steps + step - step_mark
    if log:
      values = _host([{k: v for k, v in m.items() if k != 'blocks'} for _, m in pending])
      line = dict(step=step, loss=float(np.mean([v['loss'] for v in values])),
                  error=float(np.mean([v['error'] for v in values])), lr=float(values[-1]['lr']),
                  steps_per_s=round((step - step_mark) / max(now - t_mark, 1e-9), 3))
      _append(paths['metrics.jsonl'], [line], lead)
      bar.set_postfix(loss=f'{line["loss"]:.4f}', refresh=False)
      pending = []
    if do_eval:
      results = evaluate(eval_step, state, images, labels, job)
      _append(paths['metrics.jsonl'],
              [dict(step=step, split=s, **r) for s, r in results.items()], lead)
      write_summary(**{f'{s}_{k}': v for s, r in results.items() for k, v in r.items()})
      _append(paths['diagnostics.jsonl'],
              diagnostics.lines(step, _host(last_metrics['blocks'])), lead)
    if save:
      manager.save(step, args=ocp.args.StandardSave(state))
      write_summary(step=step)
    t_mark, step_mark = time.perf_counter(), step
  bar.close()
  manager.wait_until_finished()
  manager.close()

  done = stop == config.num_steps
  write_summary(status='done' if done else 'running', step=stop,
                steps_per_s=round(train_steps / max(train_time, 1e-9), 3))
  if lead:
    print(one_line(summary, workdir, done))
  return summary


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
    with open(path, 'a') as f:
      f.writelines(json.dumps(line) + '\n' for line in lines)


def _truncate_metrics(path, step):
  """Drops lines after `step`, the checkpoint a run resumes from; returns the rest."""
  if not os.path.exists(path):
    return []
  lines = []
  with open(path) as f:
    for l in f:
      try:
        lines.append(json.loads(l))
      except json.JSONDecodeError:  # the last line, cut short by a kill
        pass
  lines = [l for l in lines if l['step'] <= step]
  tmp = f'{path}.tmp'
  with open(tmp, 'w') as f:
    f.writelines(json.dumps(l) + '\n' for l in lines)
  os.replace(tmp, path)
  return lines
