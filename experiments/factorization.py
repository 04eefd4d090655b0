"""Inception v3's factorized convolutions (Szegedy et al. 2015, sections 3.1-3.2).

  python launch.py sweep --config experiments/factorization.py --workdir runs/factorization
  python launch.py report --workdir runs/factorization
  python launch.py summary --config experiments/factorization.py:conv=1x7+7x1

`factorization_net` (arch/small.py): a 3x3 stem, then four blocks of one spatial
conv at 32 channels, every conv conv-BN-ReLU, all at the digits' 8x8: '5x5'
against two 3x3 ('3x3x2'), '7x7' against 1x7 then 7x1 ('1x7+7x1'), at equal
width (the intermediate convs keep the 32 channels). The argument is
degradation.py's: a preset (`digits` default, `cifar10`), `key=value` overrides
(a bare key is a model field: `conv=3x3x2`, `features=64`), `seeds=N`.
"""
from arch import analysis, sweep
from experiments import degradation

CLAIM = ('Szegedy et al. 2015, "Rethinking the Inception Architecture" (Inception v3): at equal '
         'width, two 3x3 convolutions replace a 5x5 one with 28% fewer multiply-adds, and 1xn '
         'then nx1 replace an nxn one at 2/n of the cost, with no loss of accuracy.')
MODEL = dict(name='factorization_net', conv='5x5', features=32, depth=4, num_classes=10,
             input_shape=(8, 8, 1))
PAIRS = (('5x5', '3x3x2'), ('7x7', '1x7+7x1'))  # (full, factorized)

# Digits: the degradation recipe at half length (lr/10 at 200 and 262 of 300 steps):
# these 5-9 layer nets converge in it, and three seeds fit the 10-minute sweep.
DIGITS_STEPS = 300


def get_config(arg=''):
  return degradation.get_config(arg, MODEL, digits_steps=DIGITS_STEPS)


def get_sweep(arg=''):
  """The four convs, seeds 0-2 (`seeds=N`), the most mult-adds first (7x7, 5x5, 3x3x2, 1x7+7x1)."""
  _, overrides = degradation.parse_arg(arg)
  return sweep.product(**{'model.conv': ['7x7', '5x5', '3x3x2', '1x7+7x1'],
                          'seed': list(range(overrides.get('seeds', 3)))})


def verdict(runs):
  """Agrees when each factorized net costs less and its mean test error is at
  most the full conv's plus the seed spread (max - min over seeds)."""
  try:
    stats = analysis.variant_stats(runs, 'model.conv', [c for pair in PAIRS for c in pair])
  except ValueError as e:
    return f'inconclusive: {e}'
  parts, agrees = [], True
  for full, factorized in PAIRS:
    a, b = stats.loc[full], stats.loc[factorized]
    saving = 1 - b.macs / a.macs
    worse = b.error - a.error
    spread = max(a.spread, b.spread)
    agrees &= saving > 0 and worse <= spread
    parts.append(f'{factorized} {saving:.0%} fewer mult-adds than {full}, test error '
                 f'{b.error:.2f}% vs {a.error:.2f}% ({worse:+.2f} points, '
                 f'{"within" if abs(worse) <= spread else "beyond"} the seed spread of {spread:.2f})')
  return (f'{"agrees" if agrees else "disagrees"}: {"; ".join(parts)}; '
          f'mean of {stats.seeds.min()} seeds')
