"""The degradation experiment (He et al. 2016, Sec. 4.2): plain vs residual nets.

  python launch.py train --config experiments/degradation.py --workdir runs/r20
  python launch.py train --config experiments/degradation.py:depth=56,shortcut=none ...
  python launch.py train --config experiments/degradation.py:cifar10,depth=110 ...

The argument is a comma-separated list: at most one preset name (`digits`, the
default, `fashion_mnist`, `cifar10`) and `key=value` overrides. A bare key is a
model field (depth, width, shortcut, block) or a top-level key (batch_size,
seed, ...); a dotted key (`data.holdout=5000`) is a path. Values are Python
literals, else strings. `parse_arg` and `apply_overrides` are shared with sweeps.
"""
import ast

import ml_collections
from ml_collections import config_dict

from arch import sweep


def digits(config):
  """8x8 digits, no download: the default, small enough for a CPU sweep.

  The recipe is the paper's, scaled down: SGD, momentum 0.9, weight decay 1e-4,
  batch 128, lr 0.1 divided by 10 at steps 400 and 525, 600 steps (~53 epochs
  of the 1437 training digits), plus 50 steps of linear warmup, which lets a
  ResNet-56 start at lr 0.1 on every seed (the paper warms up ResNet-110 for
  the same reason). Tried and dropped: batch 64 without warmup (one ResNet-56
  seed in three stuck at 35% training error) and clipping the gradient norm at 1
  (it rescues the plain nets too, which then converge after the lr drop).
  """
  del config  # the base config is the digits one


def fashion_mnist(config):
  """28x28 Fashion-MNIST from the Debian package; ~32 epochs."""
  config.model.input_shape = (28, 28, 1)
  config.data.name = 'fashion_mnist'
  config.data.augment = ml_collections.ConfigDict(dict(crop_pad=2, flip=True))
  config.batch_size = 128
  config.num_steps = 15_000
  config.schedule.boundaries = (7_500, 11_250)
  config.log_every, config.eval_every, config.checkpoint_every = 100, 1_000, 1_000


def cifar10(config):
  """The paper's CIFAR-10 recipe: batch 128, lr 0.1 divided by 10 at 32k and 48k
  steps, stop at 64k, weight decay 1e-4, momentum 0.9, 4-pixel pad + random
  crop + flip. The paper's 45k/5k split is `data.holdout=5000`."""
  config.model.input_shape = (32, 32, 3)
  config.data.name = 'cifar10'
  config.data.augment = ml_collections.ConfigDict(dict(crop_pad=4, flip=True))
  config.batch_size = 128
  config.schedule.warmup_steps = 0  # the paper warms up only ResNet-110: schedule.warmup_steps=400
  config.num_steps = 64_000
  config.schedule.boundaries = (32_000, 48_000)
  config.log_every, config.eval_every, config.checkpoint_every = 100, 2_000, 2_000


PRESETS = {f.__name__: f for f in (digits, fashion_mnist, cifar10)}


def base_config():
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.num_seeds = 1  # > 1: seeds seed, seed + 1, ... as one vmapped program (arch/train.py)
  c.model = ml_collections.ConfigDict(dict(
      name='cifar_resnet', depth=20, width=1.0, shortcut='A', block='basic', num_classes=10,
      input_shape=(8, 8, 1)))
  c.data = ml_collections.ConfigDict(dict(
      name='digits',
      data_dir=config_dict.placeholder(str),  # TFDS data_dir, or a folder of idx files
      holdout=0,  # training images moved to a 'val' split
      augment=ml_collections.ConfigDict(dict(crop_pad=1, flip=False)),  # digits: no flip
  ))
  c.batch_size = 128
  c.eval_batch_size = 512
  # The digits recipe (see digits() above): 600 steps of batch 128, ~53 epochs.
  c.num_steps = 600
  c.optimizer = ml_collections.ConfigDict(dict(
      name='sgd', momentum=0.9, nesterov=False, weight_decay=1e-4, clip_norm=0.0))
  c.schedule = ml_collections.ConfigDict(dict(
      name='piecewise', lr=0.1, warmup_steps=50, boundaries=(400, 525), factor=0.1))
  c.label_smoothing = 0.0
  c.log_every = 20
  c.eval_every = 100
  c.checkpoint_every = 300
  c.keep_checkpoints = 3
  # Run control, not part of the experiment: stop (resumably) after this step.
  c.stop_after = config_dict.placeholder(int)
  return c


def parse_arg(arg, presets=PRESETS):
  """'cifar10,depth=56,shortcut=none' -> ('cifar10', {'depth': 56, 'shortcut': 'none'}).
  Another experiment passes its own `presets` (its default is also 'digits')."""
  preset, overrides = 'digits', {}
  for item in filter(None, (arg or '').split(',')):
    key, eq, value = item.partition('=')
    key = key.strip()
    if not eq:
      if key not in presets:
        raise ValueError(f'unknown preset {key!r}; presets: {", ".join(presets)}')
      preset = key
      continue
    try:
      overrides[key] = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
      overrides[key] = value.strip()
  return preset, overrides


def apply_overrides(config, overrides):
  for key, value in overrides.items():
    path = f'model.{key}' if key in config.model else key  # a bare model field
    *parents, leaf = path.split('.')
    node = config
    for p in parents:
      node = node.get(p)
      if not isinstance(node, ml_collections.ConfigDict):
        break
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
      raise ValueError(f'unknown config key {key!r} in the config argument')
    node[leaf] = value
  return config


def get_config(arg='', model=None, digits_steps=None):
  """For experiments built on this recipe: `model`, another `config.model` (a
  dict); `digits_steps`, the digits recipe at another length (`rescale`)."""
  preset, overrides = parse_arg(arg)
  overrides.pop('seeds', None)  # a sweep-only key, read by get_sweep
  config = base_config()
  if model is not None:
    config.model = ml_collections.ConfigDict(model)
  PRESETS[preset](config)
  if digits_steps and preset == 'digits':
    rescale(config, digits_steps)
  apply_overrides(config, overrides)
  config.lock()
  return config


def rescale(config, num_steps):
  """The schedule over `num_steps`: the same warmup, the lr drops at the same
  fractions of the run."""
  config.schedule.boundaries = tuple(round(b * num_steps / config.num_steps)
                                     for b in config.schedule.boundaries)
  config.checkpoint_every = min(config.checkpoint_every, num_steps)
  config.num_steps = num_steps


def get_sweep(arg=''):
  """Depths 20, 32, 44, 56 (plus 110 for cifar10), plain and option A; `seeds=3`
  adds seeds 1 and 2. Deepest first, so parallel workers finish together."""
  preset, overrides = parse_arg(arg)
  depths = (110, 56, 44, 32, 20) if preset == 'cifar10' else (56, 44, 32, 20)
  return sweep.product(**{'model.depth': depths, 'model.shortcut': ['none', 'A'],
                          'seed': list(range(overrides.get('seeds', 1)))})
