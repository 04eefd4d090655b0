"""MobileNet's width multiplier alpha in {0.25, 0.5, 0.75, 1} (Howard et al. 2017, Table 6).

  python launch.py sweep --config experiments/mobilenet_alpha.py --workdir runs/mobilenet_alpha
  python launch.py report --workdir runs/mobilenet_alpha

Alpha thins every layer: int(channels * alpha) (arch/separable.py). The
pointwise 1x1 convs, nearly all of the cost, scale as alpha^2; the stem,
the depthwise convs and the classifier only as alpha.

The network. On digits (the default) it is a digits-sized MobileNet v1: the
published net with its stem at stride 1 and its first 5 blocks (64, 128/2, 128,
256/2, 256 channels), so the 8x8 digits go 8x8 -> 4x4 -> 2x2 and every
depthwise conv sees a real neighbourhood, as the ResNet paper's CIFAR nets are
the ImageNet design cut to small images (136k parameters, 1.0M mult-adds at
alpha 1). The published net as is reaches 1x1 by its 4th block on 8x8 input, so
10 of its 13 blocks would be 3x3 depthwise convs on a single pixel: a 3.2M
parameter MLP on 1437 training images, which says little about MobileNet.
Resizing the digits up to 32x32 instead would cost 16x the mult-adds in the
first layers for no new information. The `cifar10` preset trains the published
MobileNet v1 (stride-2 stem, all 13 blocks) at 32x32, with the degradation
experiment's CIFAR recipe. Everything else (recipe, argument syntax) is the
degradation experiment's; `alpha=0.5` overrides the model's alpha.
"""
from arch import analysis, sweep
from experiments import degradation

CLAIM = ('Howard et al. 2017 (MobileNets, Table 6): the width multiplier alpha cuts '
         'multiply-adds and parameters roughly by alpha^2 (569M, 325M, 149M, 41M mult-adds '
         'at alpha 1, 0.75, 0.5, 0.25) while accuracy falls off smoothly (70.6, 68.4, 63.7, '
         '50.6% ImageNet top-1).')
ALPHAS = (1.0, 0.75, 0.5, 0.25)  # costliest first
SMALL = 0.01  # a difference of 1 point (3.6 of the 360 test digits) is within noise
# "Roughly alpha^2": the cost's exponent in alpha. It is at most 2 (the alpha-linear
# layers pull it down); the paper's own mult-adds give 1.90.
QUADRATIC = (1.5, 2.05)

DIGITS_MODEL = dict(name='mobilenet', alpha=1.0, depth_multiplier=1, dropout=0.0,
                    min_input_size=0, stem_strides=1, num_blocks=5, num_classes=10,
                    input_shape=(8, 8, 1))
PUBLISHED_MODEL = dict(DIGITS_MODEL, stem_strides=2, num_blocks=13)  # cifar10: the preset sets 32x32x3


def get_config(arg=''):
  preset, _ = degradation.parse_arg(arg)
  return degradation.get_config(arg, model=PUBLISHED_MODEL if preset == 'cifar10' else DIGITS_MODEL)


def get_sweep(arg=''):
  """The four alphas, widest first, each with seeds 0-2 (`seeds=N` for N): the
  nets are small (12 runs in minutes) and their error differences too."""
  _, overrides = degradation.parse_arg(arg)
  return sweep.product(**{'model.alpha': ALPHAS, 'seed': list(range(overrides.get('seeds', 3)))})


def verdict(runs, small=SMALL):
  """Disagrees when a cost does not scale as roughly alpha^2 (exponent outside
  QUADRATIC) or a thinner net beats a wider one by more than `small`; agrees when
  besides alpha 0.25 is worse than alpha 1 by more than `small`; otherwise the
  accuracy side is within noise: inconclusive. Test errors are means over seeds."""
  alphas = sorted(ALPHAS)
  try:
    stats = analysis.variant_stats(runs, 'model.alpha', alphas)
  except ValueError as e:
    return f'inconclusive: {e}'
  exponents = {cost: analysis.power_law_exponent(alphas, stats[cost]) for cost in ('macs', 'params')}
  error = stats['error']
  reversal = max(error[a] - error[b] for a in alphas for b in alphas if a > b)  # wider worse by
  loss = error[alphas[0]] - error[alphas[-1]]
  line = (f'mult-adds ~ alpha^{exponents["macs"]:.2f}, params ~ alpha^{exponents["params"]:.2f}; '
          'test error ' + ', '.join(f'alpha={a:g} {error[a]:.2f}' for a in alphas) + ' (%)')
  if not all(QUADRATIC[0] <= e <= QUADRATIC[1] for e in exponents.values()):
    return f'disagrees: {line}; a cost is not roughly alpha^2'
  if reversal > 100 * small:
    return f'disagrees: {line}; a wider net is worse by {reversal:.2f} points'
  if loss > 100 * small:
    return f'agrees: {line}; alpha 0.25 costs {loss:.2f} points'
  return f'inconclusive: {line}; cost ~ alpha^2, but the error changes by {loss:+.2f} points, within noise'
