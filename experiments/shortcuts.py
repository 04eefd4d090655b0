"""Shortcut options none, A, B, C at depths 20 and 56 (He et al. 2015, Table 3).

  python launch.py sweep --config experiments/shortcuts.py --workdir runs/shortcuts
  python launch.py report --workdir runs/shortcuts

'none' is the plain net; A the identity, zero-padded where the shape changes (no
parameters); B a 1x1 projection only there; C a projection on every block
(arch/residual.py). The paper's Table 3 (ImageNet, ResNet-34, top-1 error):
plain 28.54, A 25.03, B 24.52, C 24.19. The config is the degradation
experiment's (same recipe and argument syntax); `seeds=3` adds seeds 1 and 2.
"""
from arch import analysis, sweep
from experiments import degradation

CLAIM = ('He et al. 2015 (Deep Residual Learning, Table 3): projection shortcuts are not '
         'essential: B is slightly better than the zero-padded identity A and C marginally '
         'better than B (top-1 error 25.03, 24.52, 24.19 on ImageNet), while all three fix '
         "the plain net's degradation.")
DEPTHS = (56, 20)
SHORTCUTS = ('none', 'A', 'B', 'C')
SMALL = 0.01  # a difference of 1 point (3.6 of the 360 test digits) is within noise


def get_config(arg=''):
  return degradation.get_config(arg)


def get_sweep(arg=''):
  """Depths 56 and 20, each with all four shortcuts; costliest first."""
  _, overrides = degradation.parse_arg(arg)
  return sweep.product(**{'model.depth': DEPTHS, 'model.shortcut': SHORTCUTS[::-1],
                          'seed': list(range(overrides.get('seeds', 1)))})


def verdict(runs, small=SMALL):
  """Agrees when A, B and C are within `small` of each other at both depths and
  each beats the plain net at depth 56 by more than `small`; test errors, mean
  over seeds."""
  if 'model.depth' not in runs:
    return 'inconclusive: no runs with a model.depth column'
  errors = {}
  for depth in DEPTHS:
    try:
      stats = analysis.variant_stats(runs[runs['model.depth'] == depth], 'model.shortcut', SHORTCUTS)
    except ValueError as e:
      return f'inconclusive: depth {depth}: {e}'
    errors[depth] = stats['error']  # %
  numbers = '; '.join(f'depth {d} test error ' + ', '.join(f'{s} {errors[d][s]:.2f}' for s in SHORTCUTS)
                      for d in DEPTHS) + ' (%)'
  options = {d: errors[d][list('ABC')] for d in DEPTHS}
  depth = max(DEPTHS, key=lambda d: options[d].max() - options[d].min())
  spread = options[depth].max() - options[depth].min()
  fixed = all(errors[56][s] < errors[56]['none'] - 100 * small for s in 'ABC')
  line = (f'{numbers}; A/B/C differ by up to {spread:.2f} points ({options[depth].idxmax()} '
          f'worst, {options[depth].idxmin()} best, at depth {depth})')
  if spread <= 100 * small and fixed:
    return f'agrees: {line}, within {100 * small:.0f}, and all beat plain-56'
  why = []
  if spread > 100 * small:
    why.append(f'more than {100 * small:.0f}')
  if not fixed:
    why.append('not all beat plain-56')
  return f'disagrees: {line}; {" and ".join(why)}'
