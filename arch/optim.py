"""Optimizer and learning-rate schedule, chosen by name in the config.

The default is the ResNet paper's: SGD, momentum 0.9, weight decay 1e-4 on all
parameters (BN scales and biases included), added to the gradient before the
momentum (L2, as torch.optim.SGD does it, not decoupled).
"""
import jax.numpy as jnp
import optax

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
  """`config.optimizer`: name, momentum, nesterov, weight_decay, clip_norm.

  clip_norm > 0 clips the global gradient norm first (0: off).

  adamw uses `momentum` as beta1 and decoupled weight decay.
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
  return optax.chain(optax.clip_by_global_norm(clip), tx) if clip else tx
