"""Transfer learning (issue #7): a network trained on one task, reused on another.

The digits default: a ResNet-20 learns digits 0-4 from all their training
images (`pretrain`); then digits 5-9 are learned from `shots` labelled images a
class in one of three modes, with the same recipe:
  features  the pretrained backbone, frozen, and a new head (feature extraction);
  finetune  the pretrained backbone; its last `stages` stages and a new head train;
  scratch   the same network from a random initialisation, on the same images.
The sweep compares features, fine-tuning the last stage and all three, and
scratch, at 5, 10 and 20 images a class.

  python launch.py train --config experiments/transfer.py:pretrain --workdir runs/transfer_pretrain
  python launch.py sweep --config experiments/transfer.py --workdir runs/transfer
  python launch.py report --workdir runs/transfer

The pretraining is its own first command: the transfer runs read its newest
checkpoint (`init_from`, arch/transfer.py) and, while it is not finished, say
to run it. One run: `experiments/transfer.py:mode=finetune,stages=2,shots=5`.

The argument is degradation.py's (a preset and `key=value` overrides) plus
`mode`, `stages` (1 to 3), `shots` (images a class) and `seeds` (the sweep's
seeds 0..n-1). Presets: `pretrain`; `digits`, the default, a transfer; and for
a GPU `cifar10` (a ResNet-20 on CIFAR-10, the paper's recipe, into
runs/transfer_cifar10) and `cifar100` (transferred to CIFAR-100, 50 images a
class by default; needs `--config.data.data_dir`).
"""
from ml_collections import config_dict

from arch import analysis, sweep
from experiments import degradation

CLAIM = ('Yosinski et al. 2014 (How transferable are features in deep neural networks?): '
         'the last layers\' features are specific to the task they were learned on, so '
         'freezing them costs accuracy on another task, while a network initialised with '
         'transferred features and fine-tuned generalises better than one trained from scratch.')
SMALL = 1.0  # points of test error: 1.8 of the 180 test digits 5-9
MODES = ('features', 'finetune', 'scratch')
SWEEP_SHOTS = {'digits': (5, 10, 20), 'cifar100': (10, 50, 100)}


def pretrain(config):
  """Digits 0-4, all 721 of their training images; degradation's digits recipe."""
  config.data.classes = (0, 1, 2, 3, 4)
  config.model.num_classes = 5


def digits(config):
  """Digits 5-9 from `shots` images a class (10 by default), from runs/transfer_pretrain.

  300 steps of batch 25 (the 5-shot set is 25 images), lr 0.1 after 25 steps of
  warmup, divided by 10 at steps 200 and 260: 150 epochs of 50 images.
  """
  config.data.classes = (5, 6, 7, 8, 9)
  config.data.train_per_class = 10
  config.model.num_classes = 5
  config.init_from = 'runs/transfer_pretrain'
  config.init_from_config = 'experiments/transfer.py:pretrain'
  config.batch_size = 25
  config.num_steps = 300
  config.schedule.warmup_steps = 25
  config.schedule.boundaries = (200, 260)
  config.eval_every, config.checkpoint_every = 100, 300


def cifar10(config):
  """The pretraining for GPU users: degradation's CIFAR-10 recipe, ResNet-20."""
  degradation.cifar10(config)


def cifar100(config):
  """CIFAR-100 from 50 images a class (5,000), from runs/transfer_cifar10: 4,000
  steps of batch 128 (about 100 epochs), lr 0.1 divided by 10 at 2,000 and 3,000."""
  degradation.cifar10(config)
  config.data.name = 'cifar100'
  config.data.train_per_class = 50
  config.model.num_classes = 100
  config.init_from = 'runs/transfer_cifar10'
  config.init_from_config = 'experiments/transfer.py:cifar10'
  config.num_steps = 4_000
  config.schedule.boundaries = (2_000, 3_000)
  config.eval_every, config.checkpoint_every = 500, 500


PRESETS = {f.__name__: f for f in (pretrain, digits, cifar10, cifar100)}
TRANSFERS = ('digits', 'cifar100')  # the others train the networks they start from


def base_config():
  c = degradation.base_config()
  c.data.classes = config_dict.placeholder(tuple)  # kept and relabelled 0..k-1 (arch/data.py)
  c.data.train_per_class = 0  # 0: every training image
  c.optimizer.trainable = ''  # regex of the parameters that train; '': all (arch/optim.py)
  c.init_from = ''  # a finished run whose backbone starts this one (arch/transfer.py)
  c.init_from_config = ''  # the --config that trains init_from, for the error that says so
  return c


def trainable(mode, stages=1, block='basic'):
  """optimizer.trainable of a mode: 'head', 'stage3|head', ..., '' (all)."""
  if mode not in MODES:
    raise ValueError(f'unknown mode {mode!r}; modes: {", ".join(MODES)}')
  if mode == 'features':
    return 'head'
  if mode == 'scratch':
    return ''
  if stages not in (1, 2, 3):
    raise ValueError(f'stages={stages!r}: a cifar_resnet has 3 stages to fine-tune')
  last = [f'stage{s}' for s in range(4 - stages, 4)] + (['final_bn'] if block == 'preact' else [])
  return '|'.join(last + ['head'])


def get_config(arg=''):
  preset, overrides = degradation.parse_arg(arg, PRESETS)
  overrides.pop('seeds', None)  # a sweep-only key, read by get_sweep
  mode, stages = overrides.pop('mode', None), overrides.pop('stages', 1)
  shots = overrides.pop('shots', None)
  config = base_config()
  PRESETS[preset](config)
  if preset not in TRANSFERS and (mode or shots):
    raise ValueError(f'mode and shots are for the transfer presets ({", ".join(TRANSFERS)}), '
                     f'not {preset}')
  if preset in TRANSFERS:
    mode = mode or 'features'
    config.optimizer.trainable = trainable(mode, stages, overrides.get('block', 'basic'))
    if mode == 'scratch':
      config.init_from = config.init_from_config = ''
    else:  # the pretraining of the same network
      model = ','.join(f'{k}={v}' for k, v in overrides.items() if k in config.model)
      config.init_from_config += f',{model}' if model else ''
    if shots:
      config.data.train_per_class = shots
  degradation.apply_overrides(config, overrides)
  config.lock()
  return config


def sweep_modes(stages=(1, 3), block='basic'):
  """{name: overrides} of the modes a sweep compares: features, finetune<k> for
  each k in `stages`, scratch (which clears init_from and trains everything)."""
  modes = {'features': {'optimizer.trainable': trainable('features')}}
  for k in stages:
    modes[f'finetune{k}'] = {'optimizer.trainable': trainable('finetune', k, block)}
  modes['scratch'] = {'optimizer.trainable': trainable('scratch'), 'init_from': ''}
  return modes


def get_sweep(arg=''):
  """Features, fine-tuning the last stage and all three, and scratch, at 5, 10
  and 20 images a class (CIFAR-100: 10, 50, 100); `stages=k` fine-tunes k stages
  only; `seeds=3` adds seeds 1 and 2."""
  preset, overrides = degradation.parse_arg(arg, PRESETS)
  if preset not in TRANSFERS:
    raise ValueError(f'{preset} is one run, not a sweep: launch.py train --config '
                     f'experiments/transfer.py:{preset} --workdir DIR')
  stages = (overrides['stages'],) if 'stages' in overrides else (1, 3)
  modes = sweep_modes(stages, overrides.get('block', 'basic'))
  rest = sweep.product(**{'data.train_per_class': SWEEP_SHOTS[preset],
                          'seed': list(range(overrides.get('seeds', 1)))})
  return [{**m, **r} for m in modes.values() for r in rest]


def mode_of(runs):
  """Each run's mode (a row of analysis.load's table), named as in sweep_modes."""
  names = {m['optimizer.trainable']: name for name, m in sweep_modes((1, 2, 3)).items()}
  names.update({m['optimizer.trainable']: name
                for name, m in sweep_modes((1, 2, 3), 'preact').items()})
  return ['scratch' if not init_from else names.get(regex, regex)
          for init_from, regex in zip(runs['init_from'].fillna(''),
                                      runs['optimizer.trainable'].fillna(''))]


def verdict(runs, small=SMALL):
  """Agrees when the network fine-tuned the most (the largest k of finetune<k>)
  beats scratch at the fewest shots and is never worse by more than `small`
  points, and the frozen backbone (features) is worse than it at every number
  of shots; test errors, mean over seeds."""
  if 'data.train_per_class' not in runs or 'init_from' not in runs:
    return 'inconclusive: no runs with data.train_per_class and init_from columns'
  runs = runs.assign(mode=mode_of(runs))
  modes = [m for m in sweep_modes((1, 2, 3)) if m in set(runs['mode'])]
  tuned = max((m for m in modes if m.startswith('finetune')), default=None)
  if tuned is None:
    return 'inconclusive: no fine-tuned runs'
  errors = {}
  for shots, group in runs.groupby('data.train_per_class'):
    try:
      errors[shots] = analysis.variant_stats(group, 'mode', modes)['error']
    except ValueError as e:
      return f'inconclusive: {shots} shots: {e}'
  fewest = min(errors)
  agrees = (errors[fewest][tuned] < errors[fewest]['scratch'] - small
            and all(e[tuned] <= e['scratch'] + small and e['features'] > e[tuned]
                    for e in errors.values()))
  numbers = '; '.join(f'{shots} shots: ' + ', '.join(f'{m} {e[m]:.2f}' for m in modes)
                      for shots, e in errors.items())
  return f'{"agrees" if agrees else "disagrees"}: {numbers} (test error, %)'
