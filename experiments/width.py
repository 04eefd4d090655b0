"""Going wider: width multiplier k in {0.5, 1, 2, 4} at a fixed depth, plain and residual.

  python launch.py sweep --config experiments/width.py --workdir runs/width
  python launch.py report --workdir runs/width

`model.width` multiplies the CIFAR ResNet's 16/32/64 filters (arch/resnet.py),
so a width-k net has about k^2 the parameters and multiply-adds. The depth is
fixed at DEPTH, where a width-4 member still trains in minutes on one CPU core.
The config is the degradation experiment's (same recipe and argument syntax);
`seeds=3` adds seeds 1 and 2.
"""
from arch import analysis, sweep
from experiments import degradation

CLAIM = ('Zagoruyko & Komodakis 2016 (Wide Residual Networks): at a fixed depth, widening a '
         'residual network by a factor k lowers its error, while its parameters and FLOPs grow '
         'as about k^2.')
DEPTH = 14
WIDTHS = (4.0, 2.0, 1.0, 0.5)  # costliest first
SHORTCUTS = ('A', 'none')
SMALL = 0.01  # a difference of 1 point (3.6 of the 360 test digits) is within noise


def get_config(arg=''):
  model = degradation.base_config().model.to_dict()
  model['depth'] = DEPTH
  return degradation.get_config(arg, model=model)


def get_sweep(arg=''):
  """Every width, residual (option A) and plain; widest first."""
  _, overrides = degradation.parse_arg(arg)
  return sweep.product(**{'model.width': WIDTHS, 'model.shortcut': SHORTCUTS,
                          'seed': list(range(overrides.get('seeds', 1)))})


def verdict(runs, small=SMALL):
  """Residual nets' test error (mean over seeds) from the narrowest to the widest:
  agrees when it falls by more than `small` and never rises by more than
  `small` from one width to the next; disagrees when it rises by more than
  `small` overall; otherwise inconclusive (within noise)."""
  if 'model.shortcut' not in runs:
    return 'inconclusive: no runs with a model.shortcut column'
  widths, stats = sorted(WIDTHS), {}
  for shortcut in SHORTCUTS:
    try:
      stats[shortcut] = analysis.variant_stats(runs[runs['model.shortcut'] == shortcut],
                                               'model.width', widths)
    except ValueError as e:
      return f'inconclusive: shortcut {shortcut}: {e}'
  residual = stats['A']['error']
  numbers = '; '.join(
      f'{"ResNet" if s == "A" else "plain"} test error ' +
      ', '.join(f'k={k:g} {stats[s]["error"][k]:.2f}' for k in widths) for s in SHORTCUTS)
  exponents = ', '.join(f'{cost} ~ k^{analysis.power_law_exponent(widths, stats["A"][cost]):.2f}'
                        for cost in ('params', 'macs'))
  line = f'{numbers} (%); {exponents}'
  change = residual.iloc[-1] - residual.iloc[0]
  worst_step = residual.diff().max()
  if change < -100 * small and worst_step <= 100 * small:
    return f'agrees: {line}'
  if change > 100 * small:
    return f'disagrees: {line}'
  return f'inconclusive: {line}; ResNet error changes by {change:+.2f} points, within {100 * small:.0f}'
