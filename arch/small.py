"""Digits-sized networks for the Inception and Xception ablations (issue #7).

Each is one knob away from its twin, at equal depth and width, so a sweep over
the knob compares exactly one design decision. They are built from the zoo's
blocks (`arch/inception.py`, `arch/separable.py`), use batch norm everywhere
(so every variant trains at the degradation recipe's lr 0.1), and work on any
input size (SAME padding): 8x8 digits by default, 32x32 CIFAR for GPU users.

* `small_inception(module='reduced'|'naive', width)`: GoogLeNet's inception
  3a, 3b, (max-pool /2), 4a, 4b at `width` x their Table 1 widths, after a
  3x3 stem of `width` x 192 channels. 'naive' keeps each module's #1x1, #3x3
  and #5x5 convs but drops the 1x1 reductions and the pool projection (the
  paper's Figure 2a), so the pooled input passes through and the width grows.
* `factorization_net(conv, features, depth)`: a 3x3 stem, then `depth` blocks of
  one spatial conv at `features` channels, all at full resolution: '5x5' or its
  Inception-v3 factorization '3x3x2' (two 3x3, 18/25 of the cost), '7x7' or
  '1x7+7x1' (2/7 of the cost). Every conv is conv-BN-ReLU.
* `separable_net(conv, mid_act, features, depth)`: the same skeleton with 3x3
  blocks, 'standard' convs or depthwise-separable ones (1/features + 1/9 of
  the cost), with the Xception paper's ablation between depthwise and pointwise:
  `mid_act` 'none' | 'relu' | 'elu'.
"""
import flax.linen as nn

from arch import layers
from arch.inception import GOOGLENET_MODULES, InceptionV1, NaiveInception, SpatialConv, max_pool3
from arch.layers import ClassifierHead, check_choice, check_common_args
from arch.registry import register
from arch.separable import MID_ACTS, SeparableConv

INCEPTION_MODULES = ('3a', '3b', '4a', '4b')  # a 2x2 max-pool before 4a, as in GoogLeNet
INCEPTION_KINDS = ('reduced', 'naive')
FACTORIZATIONS = {  # conv -> (kernel size, SpatialConv.factorize)
    '5x5': (5, 'none'), '3x3x2': (5, 'stack3x3'), '7x7': (7, 'none'), '1x7+7x1': (7, 'asymmetric')}
SEPARABLE_CONVS = ('standard', 'separable')
BN_EPSILON = 1e-3  # SeparableConv's (Keras') default; every net here uses it


def inception_fields(width):
  """{'3a': (#1x1, #3x3 reduce, #3x3, #5x5 reduce, #5x5, pool proj), ...}: Table 1 x width,
  at least one channel each."""
  return {name: tuple(max(1, int(round(f * width))) for f in GOOGLENET_MODULES[name])
          for name in INCEPTION_MODULES}


def stem(features, x, train):
  return layers.ConvUnit(features, 3, bn_epsilon=BN_EPSILON, name='stem')(x, train)


class SmallInception(nn.Module):
  """Children: `stem`, `inception3a`, `inception3b`, `inception4a`, `inception4b`, `head`."""
  module: str = 'reduced'
  width: float = 0.125
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train=False):
    x = stem(max(1, int(round(192 * self.width))), x, train)
    for name, (f1, f3r, f3, f5r, f5, pool_proj) in inception_fields(self.width).items():
      if name == '4a':
        x = max_pool3(x, 2)
      if self.module == 'naive':
        block = NaiveInception(f1, f3, f5, norm='batch', bn_epsilon=BN_EPSILON,
                               name=f'inception{name}')
      else:
        block = InceptionV1(f1, f3r, f3, f5r, f5, pool_proj, norm='batch', bn_epsilon=BN_EPSILON,
                            name=f'inception{name}')
      x = block(x, train)
    return ClassifierHead(self.num_classes, name='head')(x, train)


class FactorizationNet(nn.Module):
  """Children: `stem`, `block1`..`block{depth}`, `head`."""
  conv: str = '5x5'
  features: int = 32
  depth: int = 4
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train=False):
    kernel, factorize = FACTORIZATIONS[self.conv]
    x = stem(self.features, x, train)
    for i in range(self.depth):
      x = SpatialConv(self.features, kernel, factorize, bn_epsilon=BN_EPSILON,
                      name=f'block{i + 1}')(x, train)
    return ClassifierHead(self.num_classes, name='head')(x, train)


class SeparableNet(nn.Module):
  """Children: `stem`, `block1`..`block{depth}`, `head`. Each block ends in BN-ReLU."""
  conv: str = 'separable'
  mid_act: str = 'none'
  features: int = 32
  depth: int = 4
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train=False):
    x = stem(self.features, x, train)
    for i in range(self.depth):
      if self.conv == 'standard':
        block = layers.ConvUnit(self.features, 3, bn_epsilon=BN_EPSILON, name=f'block{i + 1}')
      else:
        block = SeparableConv(self.features, 3, mid_act=self.mid_act, act='relu',
                              bn_epsilon=BN_EPSILON, name=f'block{i + 1}')
      x = block(x, train)
    return ClassifierHead(self.num_classes, name='head')(x, train)


def _check_positive_int(net, knob, value):
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f'{net}: {knob} must be a positive int, got {value!r}')


@register('small_inception')
def small_inception(module='reduced', width=0.125, num_classes=10):
  check_common_args('small_inception', num_classes)
  check_choice('small_inception', 'module', module, INCEPTION_KINDS)
  if isinstance(width, bool) or not isinstance(width, (int, float)) or not width > 0:
    raise ValueError(f'small_inception: width must be a positive number, got {width!r}')
  return SmallInception(module, float(width), num_classes)


@register('factorization_net')
def factorization_net(conv='5x5', features=32, depth=4, num_classes=10):
  check_common_args('factorization_net', num_classes)
  check_choice('factorization_net', 'conv', conv, tuple(FACTORIZATIONS))
  _check_positive_int('factorization_net', 'features', features)
  _check_positive_int('factorization_net', 'depth', depth)
  return FactorizationNet(conv, features, depth, num_classes)


@register('separable_net')
def separable_net(conv='separable', mid_act='none', features=32, depth=4, num_classes=10):
  check_common_args('separable_net', num_classes)
  check_choice('separable_net', 'conv', conv, SEPARABLE_CONVS)
  check_choice('separable_net', 'mid_act', mid_act, MID_ACTS)
  if conv == 'standard' and mid_act != 'none':
    raise ValueError(f"separable_net: mid_act={mid_act!r} needs conv='separable' "
                     "(a standard conv has no intermediate activation)")
  _check_positive_int('separable_net', 'features', features)
  _check_positive_int('separable_net', 'depth', depth)
  return SeparableNet(conv, mid_act, features, depth, num_classes)
