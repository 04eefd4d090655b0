"""VGG (Simonyan & Zisserman, 2014): configurations D (`vgg16`) and E (`vgg19`).

Built as `keras.applications.VGG16/VGG19` build them: 3x3 convs with bias and
ReLU, no normalisation, 2x2 max-pool after each stage, then flatten -> fc1 4096
-> fc2 4096 -> predictions. Keras has no dropout; the paper used 0.5 on fc1/fc2
(`dropout` knob, default 0). `norm='batch'` gives the common VGG-BN variant
(convs then lose their bias).

Exact totals at 224x224x3, 1000 classes: vgg16 138,357,544 and vgg19
143,667,240 params; 15.47G and 19.63G multiply-adds. The flatten->fc1 weight
depends on the input size (7x7x512 at 224; 1x1x512 at 32), so the parameter
count does too, as in Keras.

Small inputs: five 2x2 VALID pools need at least 32x32 (Keras' own minimum).
Smaller inputs (8x8 digits) are bilinearly resized up to `min_input_size` (32)
before the first conv; the layers themselves are unchanged. Set it to 0 to
disable (then inputs must be >= 32).
"""
from typing import Sequence

import flax.linen as nn

from arch import layers
from arch.layers import ClassifierHead, check_choice, check_common_args, resize_to_min
from arch.registry import register


class VGGStage(nn.Module):
  """`num_convs` 3x3 convs of `features` channels, then a 2x2/2 max-pool."""
  features: int
  num_convs: int
  norm: str = 'none'
  act: str = 'relu'

  @nn.compact
  def __call__(self, x, train=False):
    for i in range(self.num_convs):
      x = layers.ConvUnit(self.features, 3, use_bias=self.norm == 'none', norm=self.norm,
                          act=self.act, name=f'conv{i + 1}')(x, train)
    return nn.max_pool(x, (2, 2), (2, 2), padding='VALID')


class VGGHead(nn.Module):
  """flatten -> fc1 -> ReLU -> dropout -> fc2 -> ReLU -> dropout -> predictions."""
  num_classes: int
  hidden: int = 4096
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, train=False):
    x = x.reshape(x.shape[0], -1)
    for name in ('fc1', 'fc2'):
      x = nn.relu(nn.Dense(self.hidden, name=name)(x))
      x = nn.Dropout(self.dropout)(x, deterministic=not train)
    return nn.Dense(self.num_classes, name='predictions')(x)


class VGG(nn.Module):
  """Stages `block1..block5`, then `head`."""
  convs_per_stage: Sequence[int] = (2, 2, 3, 3, 3)
  widths: Sequence[int] = (64, 128, 256, 512, 512)
  num_classes: int = 1000
  hidden: int = 4096
  dropout: float = 0.0
  norm: str = 'none'
  min_input_size: int = 32

  @nn.compact
  def __call__(self, x, train=False):
    x = resize_to_min(x, self.min_input_size)
    for i, (n, w) in enumerate(zip(self.convs_per_stage, self.widths)):
      x = VGGStage(w, n, norm=self.norm, name=f'block{i + 1}')(x, train)
    return VGGHead(self.num_classes, self.hidden, self.dropout, name='head')(x, train)


def _vgg(net, convs, num_classes, dropout, norm, min_input_size):
  check_common_args(net, num_classes, dropout, min_input_size)
  check_choice(net, 'norm', norm, layers.NORMS)
  return VGG(convs, num_classes=num_classes, dropout=dropout, norm=norm,
             min_input_size=min_input_size)


@register('vgg16')
def vgg16(num_classes=1000, dropout=0.0, norm='none', min_input_size=32):
  return _vgg('vgg16', (2, 2, 3, 3, 3), num_classes, dropout, norm, min_input_size)


@register('vgg19')
def vgg19(num_classes=1000, dropout=0.0, norm='none', min_input_size=32):
  return _vgg('vgg19', (2, 2, 4, 4, 4), num_classes, dropout, norm, min_input_size)
