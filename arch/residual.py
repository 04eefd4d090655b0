"""Residual blocks (He et al. 2015, 2016) with the shortcut as a knob.

Shortcut options, as in the ResNet paper section 4.1 and Table 3:
  'none': a plain block, the same layers with no addition (the paper's plain nets);
  'A':    identity; when the shape changes, subsample and zero-pad the extra
          channels, so it adds no parameters;
  'B':    identity, but a 1x1 projection (conv + BN) when the shape changes;
  'C':    a 1x1 projection always.
Plain and option-A nets of equal depth therefore have exactly the same parameters,
which is what makes the degradation comparison fair.
"""
import flax.linen as nn
import jax.numpy as jnp

from arch.layers import Conv, ConvUnit, activation, batch_norm, fan_out, materialize

SHORTCUTS = ('none', 'A', 'B', 'C')


def record_branch_ratio(module, branch_norm, x):
  """Sows ||F(x)|| / ||x|| for the diagnostics: the ResNet paper argues that
  residual blocks learn to keep F(x) small. Free unless 'intermediates' is mutable."""
  module.sow('intermediates', 'branch_ratio', branch_norm / (jnp.linalg.norm(x) + 1e-12))


def check_shortcut(shortcut):
  if shortcut not in SHORTCUTS:
    raise ValueError(f'unknown shortcut {shortcut!r}; choose one of {", ".join(SHORTCUTS)}')


class Shortcut(nn.Module):
  """The identity or projection path added to a block's output."""
  features: int
  strides: int = 1
  kind: str = 'A'
  use_bias: bool = False
  norm: bool = True  # False for pre-activation blocks, whose sum is normalised later
  bn_epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x, train=False):
    reshape = self.strides != 1 or x.shape[-1] != self.features
    if self.kind == 'C' or (self.kind == 'B' and reshape):
      return ConvUnit(self.features, 1, self.strides, use_bias=self.use_bias,
                      norm='batch' if self.norm else 'none', act='none',
                      bn_epsilon=self.bn_epsilon, name='projection')(x, train)
    if self.strides != 1:
      x = x[:, ::self.strides, ::self.strides, :]
    extra = self.features - x.shape[-1]
    if extra < 0:
      raise ValueError(f'shortcut A cannot reduce channels {x.shape[-1]} -> {self.features}')
    return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, extra))) if extra else x


class BasicBlock(nn.Module):
  """Two 3x3 conv units; the sum goes through the activation (post-activation, v1)."""
  features: int
  strides: int = 1
  shortcut: str = 'A'
  act: str = 'relu'
  norm: str = 'batch'

  @nn.compact
  def __call__(self, x, train=False):
    x, x_shortcut = fan_out(x, train) if self.shortcut != 'none' else (x, None)
    y = ConvUnit(self.features, 3, self.strides, norm=self.norm, act=self.act, name='conv1')(x, train)
    shortcut = (None if x_shortcut is None else
                Shortcut(self.features, self.strides, self.shortcut, name='shortcut')(x_shortcut, train))
    y, branch_norm = ConvUnit(self.features, 3, norm=self.norm, act=self.act, name='conv2')(
        y, train, residual=shortcut, with_branch_norm=True)
    record_branch_ratio(self, branch_norm, x)
    return y


class BottleneckBlock(nn.Module):
  """1x1 reduce -> 3x3 -> 1x1 expand to `expansion * features` (v1).

  `stride_in_1x1` puts the stride on the first 1x1 as in the original Caffe and
  Keras ResNet50; otherwise it is on the 3x3 ("v1.5", torchvision).
  """
  features: int
  strides: int = 1
  shortcut: str = 'B'
  expansion: int = 4
  stride_in_1x1: bool = False
  use_bias: bool = False
  act: str = 'relu'
  bn_epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x, train=False):
    s1, s3 = (self.strides, 1) if self.stride_in_1x1 else (1, self.strides)
    unit = dict(use_bias=self.use_bias, bn_epsilon=self.bn_epsilon)
    x, x_shortcut = fan_out(x, train) if self.shortcut != 'none' else (x, None)
    y = ConvUnit(self.features, 1, s1, act=self.act, name='conv1', **unit)(x, train)
    y = ConvUnit(self.features, 3, s3, act=self.act, name='conv2', **unit)(y, train)
    out = self.features * self.expansion
    shortcut = (None if x_shortcut is None else
                Shortcut(out, self.strides, self.shortcut, name='shortcut', **unit)(x_shortcut, train))
    y, branch_norm = ConvUnit(out, 1, act=self.act, name='conv3', **unit)(
        y, train, residual=shortcut, with_branch_norm=True)
    record_branch_ratio(self, branch_norm, x)
    return y


class PreActBlock(nn.Module):
  """Pre-activation block (He et al. 2016): BN -> act -> conv, sum left un-normalised.

  `bottleneck=False` is two 3x3 convs, `True` is 1x1-3x3-1x1 with `expansion`.
  A projection shortcut reads the pre-activated input, as in the paper. Convs
  whose output is added rather than normalised take a bias when `use_bias`
  (the Keras ResNet50V2 layout).
  """
  features: int
  strides: int = 1
  shortcut: str = 'B'
  bottleneck: bool = False
  expansion: int = 4
  use_bias: bool = False
  act: str = 'relu'
  bn_epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x, train=False):
    act = activation(self.act)
    pre = act(batch_norm(train, 'preact_bn', epsilon=self.bn_epsilon)(x))
    unit = dict(act=self.act, bn_epsilon=self.bn_epsilon)
    if self.bottleneck:
      out = self.features * self.expansion
      y = ConvUnit(self.features, 1, name='conv1', **unit)(pre, train)
      y = ConvUnit(self.features, 3, self.strides, name='conv2', **unit)(y, train)
      y = Conv(out, (1, 1), use_bias=self.use_bias, name='conv3')(y)
    else:
      out = self.features
      y = ConvUnit(self.features, 3, self.strides, name='conv1', **unit)(pre, train)
      y = Conv(out, (3, 3), use_bias=self.use_bias, name='conv2')(y)
    record_branch_ratio(self, jnp.linalg.norm(y), x)
    if self.shortcut == 'none':
      return y
    reshape = self.strides != 1 or x.shape[-1] != out
    projects = self.shortcut == 'C' or (self.shortcut == 'B' and reshape)
    # A projection sees the pre-activated input; an identity carries x untouched.
    return materialize(y + Shortcut(out, self.strides, self.shortcut, self.use_bias, norm=False,
                                    name='shortcut')(pre if projects else x, train))
