"""Inception's 1x1 reductions (Szegedy et al. 2014, section 4, Figure 2): naive vs reduced.

  python launch.py sweep --config experiments/bottleneck.py --workdir runs/bottleneck
  python launch.py report --workdir runs/bottleneck
  python launch.py summary --config experiments/bottleneck.py:module=naive

`small_inception` (arch/small.py): GoogLeNet's modules 3a, 3b, 4a, 4b at 1/8 of
their Table 1 widths, built from naive modules (1x1, 3x3, 5x5 convs and a
max-pool, concatenated) or from the same modules with 1x1 reductions before the
3x3 and 5x5 convs and a 1x1 projection after the pool. Both keep each module's
#1x1, #3x3 and #5x5 outputs. The argument is degradation.py's: a preset
(`digits` default, `cifar10`), `key=value` overrides (a bare key is a model
field: `module=naive`, `width=0.25`), and `seeds=N` for the sweep.
"""
from arch import analysis, sweep
from experiments import degradation

CLAIM = ('Szegedy et al. 2014, "Going Deeper with Convolutions" (GoogLeNet): 1x1 convolutions '
         'that reduce the channels before the 3x3 and 5x5 convolutions of an Inception module '
         'save most of its computation at little cost in accuracy.')
MODEL = dict(name='small_inception', module='reduced', width=0.125, num_classes=10,
             input_shape=(8, 8, 1))
LARGE_SAVING = 0.5     # "a large cost saving": at least half the mult-adds
LITTLE_COST = 1.0      # "little accuracy cost": at most 1 point of test error, or the seed spread

# Digits: the degradation recipe at half length (lr/10 at 200 and 262 of 300 steps):
# these 5-9 layer nets converge in it, and three seeds fit the 10-minute sweep.
DIGITS_STEPS = 300


def get_config(arg=''):
  return degradation.get_config(arg, MODEL, digits_steps=DIGITS_STEPS)


def get_sweep(arg=''):
  """Naive and reduced, seeds 0-2 (`seeds=N`); the naive net, 5x the cost, first."""
  _, overrides = degradation.parse_arg(arg)
  return sweep.product(**{'model.module': ['naive', 'reduced'],
                          'seed': list(range(overrides.get('seeds', 3)))})


def verdict(runs):
  try:
    stats = analysis.variant_stats(runs, 'model.module', ('naive', 'reduced'))
  except ValueError as e:
    return f'inconclusive: {e}'
  naive, reduced = stats.loc['naive'], stats.loc['reduced']
  saving = 1 - reduced.macs / naive.macs
  cost = reduced.error - naive.error
  spread = max(naive.spread, reduced.spread)
  numbers = (f'reduced {reduced.macs / 1e6:.2f}M mult-adds vs naive {naive.macs / 1e6:.2f}M '
             f'({saving:.0%} fewer), {reduced.params:,.0f} vs {naive.params:,.0f} params; '
             f'test error {reduced.error:.2f}% vs {naive.error:.2f}% ({cost:+.2f} points, '
             f'{"within" if abs(cost) <= spread else "beyond"} the seed spread of {spread:.2f}; '
             f'mean of {stats.seeds.min()} seeds)')
  if saving >= LARGE_SAVING and cost <= max(LITTLE_COST, spread):
    return f'agrees: {numbers}'
  return f'disagrees: {numbers}'
