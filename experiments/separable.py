"""The Xception hypothesis (Chollet 2017): standard vs depthwise-separable convs, and
the paper's Figure 10 ablation of the activation between depthwise and pointwise.

  python launch.py sweep --config experiments/separable.py --workdir runs/separable
  python launch.py report --workdir runs/separable
  python launch.py summary --config experiments/separable.py:conv=standard

`separable_net` (arch/small.py): a 3x3 stem, then four 3x3 blocks at 32
channels on the digits' 8x8, each ending in BN-ReLU: a standard conv, or a
separable one (depthwise 3x3, then pointwise 1x1) with no activation, ReLU or
ELU in between (`mid_act`, no BN in between, as in Xception). Equal depth and
width, so the separable net costs 1/32 + 1/9 of the standard one in its blocks.
The argument is degradation.py's: a preset (`digits` default, `cifar10`),
`key=value` overrides (a bare key is a model field: `mid_act=elu`), `seeds=N`.
"""
from arch import analysis, sweep
from experiments import degradation

CLAIM = ('Chollet 2017, "Xception: Deep Learning with Depthwise Separable Convolutions" '
         '(Figure 10): with no activation between the depthwise and the pointwise convolution '
         'a separable-conv network trains to a better accuracy than with ELU or ReLU there.')
MODEL = dict(name='separable_net', conv='separable', mid_act='none', features=32, depth=4,
             num_classes=10, input_shape=(8, 8, 1))
MID_ACTS = ('none', 'relu', 'elu')

# Digits: the degradation recipe at half length (lr/10 at 200 and 262 of 300 steps):
# these 5-9 layer nets converge in it, and three seeds fit the 10-minute sweep.
DIGITS_STEPS = 300


def get_config(arg=''):
  return degradation.get_config(arg, MODEL, digits_steps=DIGITS_STEPS)


def get_sweep(arg=''):
  """Standard (7x the mult-adds, first), then separable with each mid_act; seeds 0-2 (`seeds=N`)."""
  _, overrides = degradation.parse_arg(arg)
  nets = sweep.zipped(**{'model.conv': ['standard'] + ['separable'] * len(MID_ACTS),
                         'model.mid_act': ['none', *MID_ACTS]})
  return [{**net, **seed} for net in nets
          for seed in sweep.product(seed=list(range(overrides.get('seeds', 3))))]


def verdict(runs):
  """Agrees when 'none' has the lowest mean test error among the separable nets
  by more than the seed spread (max - min over seeds); inconclusive when the best
  and 'none' are within it."""
  if 'model.conv' not in runs or 'model.mid_act' not in runs:
    return 'inconclusive: no runs with model.conv and model.mid_act columns'
  # One column for the four nets: standard, none, relu, elu.
  runs = runs.assign(net=runs['model.mid_act'].where(runs['model.conv'] == 'separable', 'standard'))
  try:
    stats = analysis.variant_stats(runs, 'net', ('standard', *MID_ACTS))
  except ValueError as e:
    return f'inconclusive: {e}'
  acts = stats.loc[list(MID_ACTS)]
  none = acts.loc['none']
  rival = acts.drop(index='none').error.idxmin()  # the best of relu, elu
  margin = acts.loc[rival].error - none.error
  spread = acts.spread.max()
  standard = stats.loc['standard']
  numbers = (f'test error none {none.error:.2f}%, relu {acts.loc["relu"].error:.2f}%, '
             f'elu {acts.loc["elu"].error:.2f}% (seed spread {spread:.2f}); separable '
             f'{none.macs / 1e6:.2f}M mult-adds vs standard {standard.macs / 1e6:.2f}M at '
             f'{standard.error:.2f}%; mean of {stats.seeds.min()} seeds')
  if abs(margin) <= spread:
    return f'inconclusive: none vs {rival} within the seed spread; {numbers}'
  return f'{"agrees" if margin > 0 else "disagrees"}: {numbers}'
