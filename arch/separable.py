"""Depthwise-separable convolutions and the networks made of them.

Blocks:

* `SeparableConv`: k x k depthwise conv, then 1x1 pointwise conv. Between them an
  optional norm (`mid_norm`) and activation (`mid_act`: 'none' | 'relu' | 'elu',
  the Xception paper's Figure 10 ablation; 'relu6' for MobileNet); after the
  pointwise conv `norm` and `act`. From M to N channels at stride 1 it costs
  (1/N + 1/k^2) of the full k x k conv (MobileNet, section 3.1).
* `XceptionReduction` (entry-flow modules and the first exit-flow module),
  `XceptionMiddle` (middle flow) and `SeparableStack` (last two exit-flow convs).
* `MobileNetBlock`: MobileNet v1's depthwise 3x3-BN-ReLU6 -> pointwise 1x1-BN-ReLU6
  with width multiplier `alpha` (and `depth_multiplier`).
* `InvertedResidual`: MobileNet v2's expand 1x1 (factor t) -> depthwise 3x3 ->
  linear 1x1 projection, residual when stride 1 and channels match.
  `linear_bottleneck=False` adds ReLU6 after the projection (the paper's
  ablation); `residual=False` drops the shortcut.

Networks, exactly as keras.applications builds them (1000 classes):

* `xception` at 299x299x3: 22,910,480 = 22,855,952 trainable + 54,528 BN stats.
  BN epsilon 1e-3, no conv biases. Children `stem` (Keras block1),
  `entry1..3` (block2-4), `middle1..8` (block5-12), `exit1` (block13),
  `exit2` (block14), `head`.
* `mobilenet` (v1) at 224x224x3, alpha 1: 4,253,864; 569M multiply-adds (the
  paper's figure). Channels are int(c * alpha) as in Keras; the classifier is a
  1x1 conv with bias on the pooled 1x1 map, as in Keras (same parameters as a
  dense layer).
* `mobilenet_v2` at 224x224x3, alpha 1: 3,538,984. Channels are
  `make_divisible(int(c * alpha), 8)`, the first conv make_divisible(32 alpha),
  the last conv 1280 (1280 alpha when alpha > 1); BN epsilon 1e-3.

Keras' stride-2 convs pad (0, 1) explicitly and use VALID, which equals SAME on
even sizes; here they are SAME. Keras' BN momentum (0.99 / 0.999) differs from
`arch.layers.batch_norm`'s 0.9; that changes no count.

Small inputs: the MobileNets are all SAME-padded and work on any size (8x8 ends
at 1x1). Xception's two VALID stem convs need >= 7; Keras requires 71, and the
network resizes smaller inputs (bilinear) up to `min_input_size` (71) before
the stem, keeping the published architecture; set 0 to feed e.g. 32x32 as is.
"""
import flax.linen as nn
import jax.numpy as jnp

from arch import layers
from arch.registry import register
from arch.layers import ClassifierHead, check_choice, check_common_args, resize_to_min

MID_ACTS = ('none', 'relu', 'elu')


def make_divisible(v, divisor=8, min_value=None):
  """Keras/TF-slim channel rounding: nearest multiple of `divisor`, never below 90% of v."""
  min_value = min_value or divisor
  new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
  if new_v < 0.9 * v:
    new_v += divisor
  return new_v


class SeparableConv(nn.Module):
  """depthwise k x k -> [mid_norm] -> [mid_act] -> pointwise 1x1 -> [norm] -> [act]."""
  features: int
  kernel_size: int = 3
  strides: int = 1
  depth_multiplier: int = 1
  padding: str = 'SAME'
  use_bias: bool = False
  mid_norm: str = 'none'
  mid_act: str = 'none'
  norm: str = 'batch'
  act: str = 'none'
  bn_scale: bool = True
  bn_epsilon: float = 1e-3

  @nn.compact
  def __call__(self, x, train=False):
    x = layers.ConvUnit(x.shape[-1] * self.depth_multiplier, self.kernel_size, self.strides,
                        padding=self.padding, use_bias=False, norm=self.mid_norm,
                        act=self.mid_act, groups=-1, bn_scale=self.bn_scale,
                        bn_epsilon=self.bn_epsilon, name='depthwise')(x, train)
    return layers.ConvUnit(self.features, 1, use_bias=self.use_bias, norm=self.norm,
                           act=self.act, bn_scale=self.bn_scale, bn_epsilon=self.bn_epsilon,
                           name='pointwise')(x, train)


# --- Xception (Chollet 2017) ---

class XceptionStem(nn.Module):
  """3x3/2 32 VALID -> 3x3 64 VALID, each conv-BN-ReLU (Keras block1)."""

  @nn.compact
  def __call__(self, x, train=False):
    x = layers.ConvUnit(32, 3, 2, padding='VALID', bn_epsilon=1e-3, name='conv1')(x, train)
    return layers.ConvUnit(64, 3, 1, padding='VALID', bn_epsilon=1e-3, name='conv2')(x, train)


class XceptionReduction(nn.Module):
  """[ReLU] sep f0 -BN- ReLU sep f1 -BN- max 3x3/2, plus a 1x1/2 conv-BN shortcut.

  `pre_act=False` for the first entry module, whose input is already activated.
  """
  features: tuple = (128, 128)
  pre_act: bool = True
  mid_act: str = 'none'

  @nn.compact
  def __call__(self, x, train=False):
    f0, f1 = self.features
    shortcut = layers.ConvUnit(f1, 1, 2, act='none', bn_epsilon=1e-3, name='shortcut')(x, train)
    if self.pre_act:
      x = nn.relu(x)
    x = SeparableConv(f0, mid_act=self.mid_act, name='sepconv1')(x, train)
    x = SeparableConv(f1, mid_act=self.mid_act, name='sepconv2')(nn.relu(x), train)
    x = nn.max_pool(x, (3, 3), (2, 2), padding='SAME')
    return x + shortcut


class XceptionMiddle(nn.Module):
  """`num_convs` x (ReLU, sep, BN), identity shortcut."""
  features: int = 728
  num_convs: int = 3
  mid_act: str = 'none'

  @nn.compact
  def __call__(self, x, train=False):
    y = x
    for i in range(self.num_convs):
      y = SeparableConv(self.features, mid_act=self.mid_act, name=f'sepconv{i + 1}')(nn.relu(y), train)
    return x + y


class SeparableStack(nn.Module):
  """sep-BN-ReLU per entry of `features` (Xception's block14: 1536, 2048)."""
  features: tuple = (1536, 2048)
  mid_act: str = 'none'

  @nn.compact
  def __call__(self, x, train=False):
    for i, f in enumerate(self.features):
      x = SeparableConv(f, mid_act=self.mid_act, act='relu', name=f'sepconv{i + 1}')(x, train)
    return x


class Xception(nn.Module):
  num_classes: int = 1000
  dropout: float = 0.0
  mid_act: str = 'none'
  num_middle: int = 8
  min_input_size: int = 71

  @nn.compact
  def __call__(self, x, train=False):
    x = resize_to_min(x, self.min_input_size)
    x = XceptionStem(name='stem')(x, train)
    for i, f in enumerate((128, 256, 728)):
      x = XceptionReduction((f, f), pre_act=i > 0, mid_act=self.mid_act, name=f'entry{i + 1}')(x, train)
    for i in range(self.num_middle):
      x = XceptionMiddle(728, mid_act=self.mid_act, name=f'middle{i + 1}')(x, train)
    x = XceptionReduction((728, 1024), mid_act=self.mid_act, name='exit1')(x, train)
    x = SeparableStack((1536, 2048), mid_act=self.mid_act, name='exit2')(x, train)
    return ClassifierHead(self.num_classes, self.dropout, name='head')(x, train)


@register('xception')
def xception(num_classes=1000, dropout=0.0, mid_act='none', num_middle=8, min_input_size=71):
  check_common_args('xception', num_classes, dropout, min_input_size)
  check_choice('xception', 'mid_act', mid_act, MID_ACTS)
  if isinstance(num_middle, bool) or not isinstance(num_middle, int) or num_middle < 0:
    raise ValueError(f'xception: num_middle must be a non-negative int, got {num_middle!r}')
  return Xception(num_classes, dropout, mid_act, num_middle, min_input_size)


# --- MobileNet v1 (Howard et al. 2017) ---

class MobileNetBlock(nn.Module):
  """depthwise 3x3 -BN-ReLU6 -> pointwise 1x1 to int(features * alpha) -BN-ReLU6."""
  features: int
  alpha: float = 1.0
  strides: int = 1
  depth_multiplier: int = 1
  act: str = 'relu6'

  @nn.compact
  def __call__(self, x, train=False):
    return SeparableConv(int(self.features * self.alpha), 3, self.strides, self.depth_multiplier,
                         mid_norm='batch', mid_act=self.act, norm='batch', act=self.act,
                         name='sep')(x, train)


class ConvHead(nn.Module):
  """MobileNet v1's classifier: global average pool (kept 1x1) -> dropout -> 1x1 conv with bias."""
  num_classes: int
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, train=False):
    x = jnp.mean(x, axis=(1, 2), keepdims=True)
    x = nn.Dropout(self.dropout)(x, deterministic=not train)
    x = nn.Conv(self.num_classes, (1, 1), name='conv_preds')(x)
    return x.reshape(x.shape[0], self.num_classes)


# (features, stride) of the 13 separable blocks.
MOBILENET_BLOCKS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1),
                    (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1))


class MobileNet(nn.Module):
  """Children: `stem`, `block1`..`block13`, `head`.

  `stem_strides=1` and `num_blocks` < 13 make the small-image variant (as the
  ResNet paper's CIFAR nets are for ImageNet's): the first blocks of the same
  net, so 8x8 digits keep a 2x2 map at block 5 instead of reaching 1x1 at block 4.
  """
  num_classes: int = 1000
  alpha: float = 1.0
  depth_multiplier: int = 1
  dropout: float = 0.0
  min_input_size: int = 0
  stem_strides: int = 2
  num_blocks: int = len(MOBILENET_BLOCKS)

  @nn.compact
  def __call__(self, x, train=False):
    x = resize_to_min(x, self.min_input_size)
    x = layers.ConvUnit(int(32 * self.alpha), 3, self.stem_strides, act='relu6', bn_epsilon=1e-3,
                        name='stem')(x, train)
    for i, (f, s) in enumerate(MOBILENET_BLOCKS[:self.num_blocks]):
      x = MobileNetBlock(f, self.alpha, s, self.depth_multiplier, name=f'block{i + 1}')(x, train)
    return ConvHead(self.num_classes, self.dropout, name='head')(x, train)


def _check_alpha(net, alpha):
  if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
    raise ValueError(f'{net}: alpha must be a positive number, got {alpha!r}')
  if int(32 * alpha) < 1:
    raise ValueError(f'{net}: alpha={alpha!r} leaves the first conv with no channels')


@register('mobilenet')
def mobilenet(num_classes=1000, alpha=1.0, depth_multiplier=1, dropout=0.0, min_input_size=0,
              stem_strides=2, num_blocks=len(MOBILENET_BLOCKS)):
  """Keras' default dropout is 1e-3; the paper's alpha values are 0.25, 0.5, 0.75, 1.
  The published net has stem_strides=2 and all 13 blocks."""
  check_common_args('mobilenet', num_classes, dropout, min_input_size)
  _check_alpha('mobilenet', alpha)
  if isinstance(depth_multiplier, bool) or not isinstance(depth_multiplier, int) or depth_multiplier < 1:
    raise ValueError(f'mobilenet: depth_multiplier must be a positive int, got {depth_multiplier!r}')
  check_choice('mobilenet', 'stem_strides', stem_strides, (1, 2))
  check_choice('mobilenet', 'num_blocks', num_blocks, tuple(range(1, len(MOBILENET_BLOCKS) + 1)))
  return MobileNet(num_classes, float(alpha), depth_multiplier, dropout, min_input_size,
                   stem_strides, num_blocks)


# --- MobileNet v2 (Sandler et al. 2018) ---

class InvertedResidual(nn.Module):
  """[1x1 to t * C_in -BN-ReLU6] -> depthwise 3x3/s -BN-ReLU6 -> 1x1 to `features` -BN (linear).

  The expansion conv is skipped when t == 1. Residual when stride 1 and
  C_in == features.
  """
  features: int
  expansion: int = 6
  strides: int = 1
  linear_bottleneck: bool = True
  residual: bool = True
  act: str = 'relu6'

  @nn.compact
  def __call__(self, x, train=False):
    cin = x.shape[-1]
    y = x
    if self.expansion != 1:
      y = layers.ConvUnit(self.expansion * cin, 1, act=self.act, bn_epsilon=1e-3,
                          name='expand')(y, train)
    y = SeparableConv(self.features, 3, self.strides, mid_norm='batch', mid_act=self.act,
                      norm='batch', act='none' if self.linear_bottleneck else self.act,
                      name='depthwise_project')(y, train)
    if self.residual and self.strides == 1 and cin == self.features:
      y = y + x
    return y


# MobileNetV2 Table 2: (expansion t, channels c, repeats n, first stride s).
MOBILENET_V2_STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                       (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


class MobileNetV2(nn.Module):
  """Children: `stem`, `block0`..`block16` (Keras' block ids), `last_conv`, `head`."""
  num_classes: int = 1000
  alpha: float = 1.0
  dropout: float = 0.0
  linear_bottleneck: bool = True
  residual: bool = True
  min_input_size: int = 0

  @nn.compact
  def __call__(self, x, train=False):
    x = resize_to_min(x, self.min_input_size)
    x = layers.ConvUnit(make_divisible(32 * self.alpha), 3, 2, act='relu6', bn_epsilon=1e-3,
                        name='stem')(x, train)
    block = 0
    for t, c, n, s in MOBILENET_V2_STAGES:
      for i in range(n):
        x = InvertedResidual(make_divisible(int(c * self.alpha)), t, s if i == 0 else 1,
                             self.linear_bottleneck, self.residual, name=f'block{block}')(x, train)
        block += 1
    last = make_divisible(1280 * self.alpha) if self.alpha > 1.0 else 1280
    x = layers.ConvUnit(last, 1, act='relu6', bn_epsilon=1e-3, name='last_conv')(x, train)
    return ClassifierHead(self.num_classes, self.dropout, name='head')(x, train)


@register('mobilenet_v2')
def mobilenet_v2(num_classes=1000, alpha=1.0, dropout=0.0, linear_bottleneck=True, residual=True,
                 min_input_size=0):
  check_common_args('mobilenet_v2', num_classes, dropout, min_input_size)
  _check_alpha('mobilenet_v2', alpha)
  check_choice('mobilenet_v2', 'linear_bottleneck', linear_bottleneck, (True, False))
  check_choice('mobilenet_v2', 'residual', residual, (True, False))
  return MobileNetV2(num_classes, float(alpha), dropout, bool(linear_bottleneck), bool(residual),
                     min_input_size)
