"""Transfer learning: a run initialised from another run's checkpoint.

`config.init_from` names a finished run directory (unset or '': none). Its
backbone, every variable (params and BN statistics) outside the top-level
module `head`, replaces the new run's freshly initialised one; the head keeps
its fresh initialisation, a new classifier even where the shapes match. Every
model in arch/ names its classifier `head`. The optimizer state is the fresh
one: for SGD and AdamW it does not depend on the parameters' values.
`config.init_from_config`, if set, is the `--config` that trains init_from: the
error for a missing or unfinished init_from gives the command to run first.

Loading is strict: every backbone variable must exist in both networks with
the same shape, checked in train.prepare from the two configs before the new
workdir is touched; the first mismatch (params before batch_stats, each in
sorted path order) is a ValueError that names it. The weights come from the source's newest checkpoint that
restores and matches its CRC32, through train.py's own restore.

Freezing is the optimizer's: `optimizer.trainable` (arch/optim.py) gives the
frozen parameters zero updates. BatchNorm in frozen layers still normalises with
the batch's statistics while training, and its running averages follow the new
data (PyTorch's behaviour with requires_grad off, not Keras's frozen BN, which
runs in inference mode): the evaluation uses statistics of the new task.
"""
import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec as P

import arch
from arch import optim
from arch import runfiles
from arch import train  # train imports this module too: only used inside functions

HEAD = 'head'


def check(config, model, shape):
  """train.prepare's checks of `optimizer.trainable` and `init_from`: ValueError
  naming the problem. Does nothing (and traces nothing) when both are unset."""
  trainable, source = config.optimizer.get('trainable'), config.get('init_from')
  if not (trainable or source):
    return
  variables = _abstract_variables(model, shape)
  if trainable:
    optim.trainable_labels(trainable, variables['params'])
  if not source:
    return
  if config.get('num_seeds', 1) > 1:
    raise ValueError(f'init_from with num_seeds={config.num_seeds} is not supported; '
                     f'train one seed a run')
  source_config = read_source(config)
  source_shape = source_config.model.get('input_shape')
  if source_shape is not None and tuple(source_shape) != tuple(shape):
    raise ValueError(f'init_from={source} was trained on {tuple(source_shape)} images; this '
                     f'run\'s are {tuple(shape)}')
  mismatch = first_mismatch(_abstract_variables(arch.build(source_config.model), shape),
                            variables)
  if mismatch:
    raise ValueError(f'init_from={source} does not fit this model: {mismatch}')


def read_source(config):
  """The config of the finished run `config.init_from`; if it is not one, a
  ValueError that says which command trains it (`init_from_config`)."""
  source = config.init_from
  try:
    status = runfiles.read_json(os.path.join(source, 'summary.json')).get('status')
    why = 'no summary.json' if status is None else f'status {status}'
  except ValueError as e:  # unreadable
    status, why = None, str(e)
  if status != 'done':
    how = config.get('init_from_config')
    command = (f'python launch.py train --config {how} --workdir {source}' if how
               else f'launch.py train --workdir {source} with the config that pretrains it')
    raise ValueError(f'init_from={source} is not a finished run ({why}); run first: {command}')
  source_config = ml_collections.ConfigDict(
      runfiles.read_json(os.path.join(source, 'config.json')))
  if source_config.get('num_seeds', 1) > 1:
    raise ValueError(f'init_from={source} is a group of {source_config.num_seeds} seeds '
                     f'trained as one program, which is not supported; train the source alone')
  return source_config


def first_mismatch(source, target):
  """The first backbone variable (params first, then batch_stats, each in sorted
  path order) that is missing from one of two variable trees or differs in
  shape; None when they fit."""
  flat = [{'/'.join(k): v.shape for k, v in traverse_util.flatten_dict(tree).items()
           if k[1] != HEAD} for tree in (source, target)]
  for path in sorted(set(flat[0]) | set(flat[1]), key=lambda p: (not p.startswith('params/'), p)):
    there, here = flat[0].get(path), flat[1].get(path)
    if there is None:
      return f'{path} is in this model, not in the checkpoint'
    if here is None:
      return f'{path} is in the checkpoint, not in this model'
    if there != here:
      return f'{path} has shape {there} in the checkpoint, {here} in this model'
  return None


def load_backbone(job, state):
  """`state`, freshly initialised, with the backbone of `init_from`'s newest
  valid checkpoint; `state` itself when init_from is unset."""
  source = job.config.get('init_from')
  if not source:
    return state
  source_config = read_source(job.config)
  source_job = dataclasses.replace(job, config=source_config,
                                   model=arch.build(source_config.model))
  schedule = optim.make_schedule(source_config.schedule, source_config.num_steps)
  init = train.make_functions(source_job, optim.make_optimizer(source_config.optimizer, schedule),
                              schedule)[0]
  replicated = NamedSharding(job.mesh, P())
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                          jax.eval_shape(init))
  paths = {name: os.path.join(source, name)
           for name in ('summary.json', 'checkpoints', 'checkpoints.corrupt')}
  manager = ocp.CheckpointManager(os.path.abspath(paths['checkpoints']),
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  # Not the lead: a corrupt checkpoint stays where it is, in the other run.
  step, loaded = train._restore(manager, abstract, 1, paths, lead=False)
  newest = max(manager.all_steps())
  manager.close()
  if step != newest and jax.process_index() == 0:
    print(f'warning: init_from={source}: the checkpoint of step {newest} does not restore; '
          f'using step {step}', file=sys.stderr, flush=True)

  def backbone(fresh, pretrained):
    return {name: fresh[name] if name == HEAD else pretrained[name] for name in fresh}

  return state.replace(params=backbone(state.params, loaded.params),
                       batch_stats=backbone(state.batch_stats, loaded.batch_stats))


def _abstract_variables(model, shape):
  """The shapes of `model`'s variables for images of `shape`, without computing them."""
  def init():
    key = jax.random.key(0)
    return model.init({'params': key, 'dropout': key}, jnp.zeros((1, *shape)), train=False)
  return jax.eval_shape(init)
