"""Optimizer and learning-rate schedule, chosen by name in the config.

The default is the ResNet paper's: SGD, momentum 0.9, weight decay 1e-4 on all
parameters (BN scales and biases included), added to the gradient before the
momentum (L2, as torch.optim.SGD does it, not decoupled).

`optimizer.trainable` (a regex; unset: everything trains) freezes the parameters
whose path it does not match: they get zero updates, weight decay included, so
they stay bitwise as they were (transfer learning, arch/transfer.py).
"""
import re

import jax.numpy as jnp
import optax
from flax import traverse_util

OPTIMIZERS = ('sgd', 'adamw')
SCHEDULES = ('constant', 'piecewise', 'cosine')


def make_schedule(config, num_steps):
  """`config.schedule`: name, lr, warmup_steps, and for piecewise boundaries/factor.

  piecewise: lr times `factor` at each of `boundaries` (absolute steps).
  cosine:    cosine decay from lr to 0 between warmup_steps and num_steps.
  warmup:    linear from lr/warmup_steps to lr over the first warmup_steps.
  """
  lr, warmup = config.lr, config.warmup_steps
  if config.name == 'constant':
    main = optax.constant_schedule(lr)
  elif config.name == 'piecewise':
    main = optax.piecewise_constant_schedule(lr, {int(b): config.factor for b in config.boundaries})
  elif config.name == 'cosine':
    cosine = optax.cosine_decay_schedule(lr, max(num_steps - warmup, 1))
    main = lambda step: cosine(jnp.maximum(step - warmup, 0))
  else:
    raise ValueError(f'unknown schedule {config.name!r}; choose one of {", ".join(SCHEDULES)}')
  if not warmup:
    return main
  return lambda step: main(step) * jnp.minimum(1.0, (step + 1) / warmup)


def make_optimizer(config, schedule):
  """`config.optimizer`: name, momentum, nesterov, weight_decay, clip_norm, trainable.

  clip_norm > 0 clips the global gradient norm first (0: off).

  adamw uses `momentum` as beta1 and decoupled weight decay.

  trainable: a regex; a parameter trains when it matches the start of its path,
  e.g. 'stage3_block1/conv1/kernel': 'head' trains the classifier only,
  'stage3|head' the last stage too. The others go through optax.set_to_zero.
  """
  if config.name == 'sgd':
    tx = optax.chain(optax.add_decayed_weights(config.weight_decay),
                     optax.sgd(schedule, config.momentum, config.nesterov))
  elif config.name == 'adamw':
    tx = optax.adamw(schedule, b1=config.momentum, weight_decay=config.weight_decay,
                     nesterov=config.nesterov)
  else:
    raise ValueError(f'unknown optimizer {config.name!r}; choose one of {", ".join(OPTIMIZERS)}')
  clip = config.get('clip_norm', 0.0)
  tx = optax.chain(optax.clip_by_global_norm(clip), tx) if clip else tx
  trainable = config.get('trainable')
  if not trainable:
    return tx
  _compile(trainable)  # a bad regex fails here, in train.prepare
  return optax.multi_transform({'train': tx, 'frozen': optax.set_to_zero()},
                               lambda params: trainable_labels(trainable, params))


def trainable_labels(trainable, params):
  """'train' or 'frozen' for every parameter; a regex that matches none is an error."""
  pattern = _compile(trainable)
  labels = traverse_util.path_aware_map(
      lambda path, _: 'train' if pattern.match('/'.join(path)) else 'frozen', params)
  if 'train' not in traverse_util.flatten_dict(labels).values():
    raise ValueError(f'optimizer.trainable={trainable!r} matches no parameter; top-level '
                     f'modules: {", ".join(sorted(params))}')
  return labels


def _compile(trainable):
  try:
    return re.compile(trainable)
  except re.error as e:
    raise ValueError(f'optimizer.trainable={trainable!r} is not a regex: {e}') from None
