"""Inception blocks and networks: GoogLeNet (Inception v1) and Inception v3.

Blocks (every conv is an `arch.layers.ConvUnit`; a conv has a bias exactly when
`norm='none'`):

* `NaiveInception`: 1x1, 3x3, 5x5 convs and a 3x3 max-pool in parallel,
  concatenated (Szegedy et al. 2014, Figure 2a).
* `InceptionV1`: the same with 1x1 reductions (Figure 2b), its fields named
  after the columns of GoogLeNet's Table 1; `factorize_5x5` swaps the 5x5 conv
  for two 3x3 convs (Inception v3, Figure 5).
* `SpatialConv`: one n x n conv, or its v3 factorizations (Szegedy et al. 2015,
  section 3) at equal width: `'stack3x3'` (5x5 -> two 3x3, 18/25 of the cost)
  and `'asymmetric'` (n x n -> 1xn then nx1, 2/n of the cost).
* `InceptionA..E`: the five module kinds of Keras' InceptionV3 (35x35,
  35->17 reduction, 17x17 with factorized 7x7, 17->8 reduction, 8x8 expanded).

Networks:

* `googlenet`: Table 1 without the auxiliary heads, original design: convs with
  bias, ReLU, no normalisation (`norm='batch'` for a BN variant), global average
  pool, dropout (paper 0.4; knob, default 0), FC 1024 -> classes. LRN layers are
  left out (they have no parameters). Pools use SAME padding, which gives Caffe's
  ceil-mode sizes at 224 (112, 56, 28, 14, 7) and works down to 1x1 inputs.
  Exact count at 224x224x3, 1000 classes: 6,998,552 parameters, 1.583G
  multiply-adds. The paper says "about 6.8M": its Table 1 params column
  (2.7K+112K+159K+380K+364K+437K+463K+580K+840K+1072K+1388K+1000K = 6,797.7K)
  counts weights only and rounds per layer. Weights alone are exactly
  6,990,272 (the 9,408-weight 7x7 conv1 is listed as 2.7K, i.e. with ~1 input
  channel); the 8,280 conv and FC biases make 6,998,552.
* `inception_v3`: exactly Keras' InceptionV3 (`conv2d_bn`: conv without bias,
  BN without scale, epsilon 1e-3; 5x5 conv in mixed0-2 as TF-slim/Keras have
  it; avg-pool branches exclude padding as TF does). 23,851,784 parameters
  (trainable 23,817,352) at 299x299x3. Knobs for ablations:
  `factorize_5x5=True` uses two 3x3 convs in mixed0-2 as in the paper's Figure 5;
  `factorize_7x7=False` replaces every 1x7/7x1 pair of mixed4-7 by one 7x7
  conv of the same widths.

Small inputs: InceptionV3's VALID stem and reductions need >= 75x75 (Keras'
minimum). Smaller inputs are bilinearly resized up to `min_input_size` (75)
before the stem, so the architecture stays exactly the published one; 0 turns
that off. GoogLeNet needs no resize (`min_input_size=0`).
"""
from typing import Optional

import flax.linen as nn
import jax.numpy as jnp

from arch import layers
from arch.registry import register
from arch.layers import ClassifierHead, check_choice, check_common_args, resize_to_min

FACTORIZATIONS = ('none', 'stack3x3', 'asymmetric')


class _Convs:
  """Mixin: `self._conv(...)` makes a ConvUnit with the block's norm settings."""

  def _conv(self, features, kernel, name, strides=1, padding='SAME'):
    return layers.ConvUnit(features, kernel, strides, padding=padding,
                           use_bias=self.norm == 'none', norm=self.norm,
                           bn_scale=self.bn_scale, bn_epsilon=self.bn_epsilon, name=name)


def max_pool3(x, strides=1, padding='SAME'):
  return nn.max_pool(x, (3, 3), (strides, strides), padding=padding)


def avg_pool3(x):
  """3x3/1 SAME average pool that, like TF/Keras, does not count the padding."""
  return nn.avg_pool(x, (3, 3), (1, 1), padding='SAME', count_include_pad=False)


class SpatialConv(_Convs, nn.Module):
  """An n x n conv (stride 1, SAME), or an equal-width v3 factorization of it.

  factorize='none':       one n x n conv to `features`.
  factorize='stack3x3':   (n-1)/2 stacked 3x3 convs (5x5 -> two 3x3; 7x7 -> three).
  factorize='asymmetric': 1xn then nx1 (`first='nx1'` for the other order).
  Intermediate convs have `mid_features` channels (default `features`).
  """
  features: int
  kernel_size: int = 3
  factorize: str = 'none'
  mid_features: Optional[int] = None
  first: str = '1xn'
  norm: str = 'batch'
  bn_scale: bool = True
  bn_epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x, train=False):
    n = self.kernel_size
    mid = self.mid_features or self.features
    if self.factorize == 'none':
      return self._conv(self.features, n, f'conv{n}x{n}')(x, train)
    if self.factorize == 'stack3x3':
      if n < 3 or n % 2 == 0:
        raise ValueError(f'stack3x3 factorizes odd kernels >= 3, got kernel_size={n}')
      k = (n - 1) // 2
      for i in range(k):
        x = self._conv(self.features if i == k - 1 else mid, 3, f'conv3x3_{i + 1}')(x, train)
      return x
    if self.factorize == 'asymmetric':
      if self.first not in ('1xn', 'nx1'):
        raise ValueError(f"first must be '1xn' or 'nx1', got {self.first!r}")
      kernels = [(1, n), (n, 1)] if self.first == '1xn' else [(n, 1), (1, n)]
      x = self._conv(mid, kernels[0], f'conv{kernels[0][0]}x{kernels[0][1]}')(x, train)
      return self._conv(self.features, kernels[1], f'conv{kernels[1][0]}x{kernels[1][1]}')(x, train)
    raise ValueError(f'unknown factorize {self.factorize!r}; choose one of '
                     f'{", ".join(FACTORIZATIONS)}')


class NaiveInception(_Convs, nn.Module):
  """1x1, 3x3, 5x5 convs and a 3x3 max-pool on the same input, concatenated."""
  f1: int
  f3: int
  f5: int
  norm: str = 'none'
  bn_scale: bool = True
  bn_epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x, train=False):
    return jnp.concatenate([
        self._conv(self.f1, 1, 'branch1x1')(x, train),
        self._conv(self.f3, 3, 'branch3x3')(x, train),
        self._conv(self.f5, 5, 'branch5x5')(x, train),
        max_pool3(x),
    ], axis=-1)


class InceptionV1(_Convs, nn.Module):
  """GoogLeNet's module: fields are Table 1's columns.

  Output channels: f1 + f3 + f5 + pool_proj.
  """
  f1: int          # #1x1
  f3_reduce: int   # #3x3 reduce
  f3: int          # #3x3
  f5_reduce: int   # #5x5 reduce
  f5: int          # #5x5
  pool_proj: int   # pool proj
  factorize_5x5: bool = False
  norm: str = 'none'
  bn_scale: bool = True
  bn_epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x, train=False):
    b1 = self._conv(self.f1, 1, 'branch1x1')(x, train)
    b3 = self._conv(self.f3_reduce, 1, 'branch3x3_reduce')(x, train)
    b3 = self._conv(self.f3, 3, 'branch3x3')(b3, train)
    b5 = self._conv(self.f5_reduce, 1, 'branch5x5_reduce')(x, train)
    b5 = SpatialConv(self.f5, 5, 'stack3x3' if self.factorize_5x5 else 'none', norm=self.norm,
                     bn_scale=self.bn_scale, bn_epsilon=self.bn_epsilon, name='branch5x5')(b5, train)
    bp = self._conv(self.pool_proj, 1, 'branch_pool_proj')(max_pool3(x), train)
    return jnp.concatenate([b1, b3, b5, bp], axis=-1)


# --- Inception v3 modules (Keras `mixed0`..`mixed10`), conv2d_bn defaults. ---

class _V3(_Convs):
  norm = 'batch'
  bn_scale = False
  bn_epsilon = 1e-3


class InceptionA(_V3, nn.Module):
  """35x35 module (mixed0-2): 1x1 64 | 1x1 48 -> 5x5 64 | 1x1 64 -> 3x3 96 -> 3x3 96 | avg -> 1x1."""
  pool_features: int
  factorize_5x5: bool = False

  @nn.compact
  def __call__(self, x, train=False):
    b1 = self._conv(64, 1, 'branch1x1')(x, train)
    b5 = self._conv(48, 1, 'branch5x5_reduce')(x, train)
    b5 = SpatialConv(64, 5, 'stack3x3' if self.factorize_5x5 else 'none', norm=self.norm,
                     bn_scale=self.bn_scale, bn_epsilon=self.bn_epsilon, name='branch5x5')(b5, train)
    b3 = self._conv(64, 1, 'branch3x3dbl_reduce')(x, train)
    b3 = self._conv(96, 3, 'branch3x3dbl_1')(b3, train)
    b3 = self._conv(96, 3, 'branch3x3dbl_2')(b3, train)
    bp = self._conv(self.pool_features, 1, 'branch_pool')(avg_pool3(x), train)
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(_V3, nn.Module):
  """35 -> 17 reduction (mixed3): 3x3/2 384 | 1x1 64 -> 3x3 96 -> 3x3/2 96 | max-pool/2."""

  @nn.compact
  def __call__(self, x, train=False):
    b3 = self._conv(384, 3, 'branch3x3', strides=2, padding='VALID')(x, train)
    bd = self._conv(64, 1, 'branch3x3dbl_reduce')(x, train)
    bd = self._conv(96, 3, 'branch3x3dbl_1')(bd, train)
    bd = self._conv(96, 3, 'branch3x3dbl_2', strides=2, padding='VALID')(bd, train)
    return jnp.concatenate([b3, bd, max_pool3(x, 2, 'VALID')], axis=-1)


class InceptionC(_V3, nn.Module):
  """17x17 module (mixed4-7) with 7x7 convs factorized into 1x7 and 7x1.

  1x1 192 | 1x1 c7 -> 1x7 c7 -> 7x1 192 | 1x1 c7 -> (7x1, 1x7) c7 -> (7x1 c7, 1x7 192) | avg -> 1x1 192.
  `factorize_7x7=False`: each 1x7/7x1 pair is one 7x7 conv of the pair's output width.
  """
  c7: int
  factorize_7x7: bool = True

  def _seven(self, features, first, name):
    return SpatialConv(features, 7, 'asymmetric' if self.factorize_7x7 else 'none',
                       mid_features=self.c7, first=first, norm=self.norm,
                       bn_scale=self.bn_scale, bn_epsilon=self.bn_epsilon, name=name)

  @nn.compact
  def __call__(self, x, train=False):
    b1 = self._conv(192, 1, 'branch1x1')(x, train)
    b7 = self._conv(self.c7, 1, 'branch7x7_reduce')(x, train)
    b7 = self._seven(192, '1xn', 'branch7x7')(b7, train)
    bd = self._conv(self.c7, 1, 'branch7x7dbl_reduce')(x, train)
    bd = self._seven(self.c7, 'nx1', 'branch7x7dbl_1')(bd, train)
    bd = self._seven(192, 'nx1', 'branch7x7dbl_2')(bd, train)
    bp = self._conv(192, 1, 'branch_pool')(avg_pool3(x), train)
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(_V3, nn.Module):
  """17 -> 8 reduction (mixed8): 1x1 192 -> 3x3/2 320 | 1x1 192 -> 1x7 -> 7x1 -> 3x3/2 192 | max-pool/2."""

  @nn.compact
  def __call__(self, x, train=False):
    b3 = self._conv(192, 1, 'branch3x3_reduce')(x, train)
    b3 = self._conv(320, 3, 'branch3x3', strides=2, padding='VALID')(b3, train)
    b7 = self._conv(192, 1, 'branch7x7x3_reduce')(x, train)
    b7 = SpatialConv(192, 7, 'asymmetric', norm=self.norm, bn_scale=self.bn_scale,
                     bn_epsilon=self.bn_epsilon, name='branch7x7x3')(b7, train)
    b7 = self._conv(192, 3, 'branch7x7x3_3x3', strides=2, padding='VALID')(b7, train)
    return jnp.concatenate([b3, b7, max_pool3(x, 2, 'VALID')], axis=-1)


class InceptionE(_V3, nn.Module):
  """8x8 module with expanded filter bank (mixed9, mixed10): 320+768+768+192 = 2048 channels."""

  @nn.compact
  def __call__(self, x, train=False):
    b1 = self._conv(320, 1, 'branch1x1')(x, train)
    b3 = self._conv(384, 1, 'branch3x3_reduce')(x, train)
    b3 = jnp.concatenate([self._conv(384, (1, 3), 'branch3x3_1x3')(b3, train),
                          self._conv(384, (3, 1), 'branch3x3_3x1')(b3, train)], axis=-1)
    bd = self._conv(448, 1, 'branch3x3dbl_reduce')(x, train)
    bd = self._conv(384, 3, 'branch3x3dbl')(bd, train)
    bd = jnp.concatenate([self._conv(384, (1, 3), 'branch3x3dbl_1x3')(bd, train),
                          self._conv(384, (3, 1), 'branch3x3dbl_3x1')(bd, train)], axis=-1)
    bp = self._conv(192, 1, 'branch_pool')(avg_pool3(x), train)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3Stem(_V3, nn.Module):
  """299 -> 35: 3x3/2 32 V, 3x3 32 V, 3x3 64, max/2, 1x1 80 V, 3x3 192 V, max/2 (V = VALID)."""

  @nn.compact
  def __call__(self, x, train=False):
    x = self._conv(32, 3, 'conv1', strides=2, padding='VALID')(x, train)
    x = self._conv(32, 3, 'conv2', padding='VALID')(x, train)
    x = self._conv(64, 3, 'conv3')(x, train)
    x = max_pool3(x, 2, 'VALID')
    x = self._conv(80, 1, 'conv4', padding='VALID')(x, train)
    x = self._conv(192, 3, 'conv5', padding='VALID')(x, train)
    return max_pool3(x, 2, 'VALID')


class InceptionV3(nn.Module):
  """Children: `stem`, `mixed0`..`mixed10`, `head`."""
  num_classes: int = 1000
  dropout: float = 0.0
  factorize_5x5: bool = False
  factorize_7x7: bool = True
  min_input_size: int = 75

  @nn.compact
  def __call__(self, x, train=False):
    x = resize_to_min(x, self.min_input_size)
    x = InceptionV3Stem(name='stem')(x, train)
    for i, pool_features in enumerate((32, 64, 64)):
      x = InceptionA(pool_features, self.factorize_5x5, name=f'mixed{i}')(x, train)
    x = InceptionB(name='mixed3')(x, train)
    for i, c7 in enumerate((128, 160, 160, 192)):
      x = InceptionC(c7, self.factorize_7x7, name=f'mixed{4 + i}')(x, train)
    x = InceptionD(name='mixed8')(x, train)
    x = InceptionE(name='mixed9')(x, train)
    x = InceptionE(name='mixed10')(x, train)
    return ClassifierHead(self.num_classes, self.dropout, name='head')(x, train)


# --- GoogLeNet ---

# Table 1: #1x1, #3x3 reduce, #3x3, #5x5 reduce, #5x5, pool proj.
GOOGLENET_MODULES = {
    '3a': (64, 96, 128, 16, 32, 32),       # 256
    '3b': (128, 128, 192, 32, 96, 64),     # 480
    '4a': (192, 96, 208, 16, 48, 64),      # 512
    '4b': (160, 112, 224, 24, 64, 64),     # 512
    '4c': (128, 128, 256, 24, 64, 64),     # 512
    '4d': (112, 144, 288, 32, 64, 64),     # 528
    '4e': (256, 160, 320, 32, 128, 128),   # 832
    '5a': (256, 160, 320, 32, 128, 128),   # 832
    '5b': (384, 192, 384, 48, 128, 128),   # 1024
}


class GoogLeNetStem(_Convs, nn.Module):
  """conv1 7x7/2 64, max 3x3/2, conv2 1x1 64 -> 3x3 192, max 3x3/2 (224 -> 28)."""
  norm: str = 'none'
  bn_scale: bool = True
  bn_epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x, train=False):
    x = self._conv(64, 7, 'conv1', strides=2)(x, train)
    x = max_pool3(x, 2)
    x = self._conv(64, 1, 'conv2_reduce')(x, train)
    x = self._conv(192, 3, 'conv2')(x, train)
    return max_pool3(x, 2)


class GoogLeNet(nn.Module):
  """Children: `stem`, `inception3a`..`inception5b`, `head` (max-pools after 3b and 4e)."""
  num_classes: int = 1000
  dropout: float = 0.0
  norm: str = 'none'
  factorize_5x5: bool = False
  min_input_size: int = 0

  @nn.compact
  def __call__(self, x, train=False):
    x = resize_to_min(x, self.min_input_size)
    x = GoogLeNetStem(norm=self.norm, name='stem')(x, train)
    for key, fields in GOOGLENET_MODULES.items():
      x = InceptionV1(*fields, factorize_5x5=self.factorize_5x5, norm=self.norm,
                      name=f'inception{key}')(x, train)
      if key in ('3b', '4e'):
        x = max_pool3(x, 2)
    return ClassifierHead(self.num_classes, self.dropout, name='head')(x, train)


@register('googlenet')
def googlenet(num_classes=1000, dropout=0.0, norm='none', factorize_5x5=False, min_input_size=0):
  check_common_args('googlenet', num_classes, dropout, min_input_size)
  check_choice('googlenet', 'norm', norm, layers.NORMS)
  check_choice('googlenet', 'factorize_5x5', factorize_5x5, (False, True))
  return GoogLeNet(num_classes, dropout, norm, bool(factorize_5x5), min_input_size)


@register('inception_v3')
def inception_v3(num_classes=1000, dropout=0.0, factorize_5x5=False, factorize_7x7=True,
                 min_input_size=75):
  check_common_args('inception_v3', num_classes, dropout, min_input_size)
  check_choice('inception_v3', 'factorize_5x5', factorize_5x5, (False, True))
  check_choice('inception_v3', 'factorize_7x7', factorize_7x7, (False, True))
  return InceptionV3(num_classes, dropout, bool(factorize_5x5), bool(factorize_7x7),
                     min_input_size)
