"""The conv unit every network is made of: conv -> norm -> activation.

Normalisation and activation are plain string fields so an ablation can switch
them from a config without touching code.
"""
from typing import Sequence, Union

import flax.linen as nn
import jax.numpy as jnp

ACTIVATIONS = {
    'relu': nn.relu,
    'relu6': nn.relu6,
    'elu': nn.elu,
    'swish': nn.swish,
    'none': lambda x: x,
}
NORMS = ('batch', 'none')


def activation(name):
  if name not in ACTIVATIONS:
    raise ValueError(f'unknown activation {name!r}; choose one of {", ".join(ACTIVATIONS)}')
  return ACTIVATIONS[name]


def pair(v):
  return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def batch_norm(train, name=None, use_scale=True, epsilon=1e-5):
  """BatchNorm in train (batch statistics) or eval (running statistics) mode.

  The two-pass variance, E[(x - E[x])^2]: Flax's default one-pass form,
  E[x^2] - E[x]^2, cancels on near-constant channels (the digits' borders), which
  makes a run depend on the order of float sums, hence on the device count.
  """
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=epsilon,
                      use_scale=use_scale, use_fast_variance=False, name=name)


class ConvUnit(nn.Module):
  """conv -> (batch norm | none) -> activation.

  `groups=-1` means depthwise (one group per input channel).
  """
  features: int
  kernel_size: Union[int, Sequence[int]] = 3
  strides: Union[int, Sequence[int]] = 1
  padding: str = 'SAME'
  use_bias: bool = False
  norm: str = 'batch'
  act: str = 'relu'
  groups: int = 1
  bn_scale: bool = True
  bn_epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x, train=False):
    if self.norm not in NORMS:
      raise ValueError(f'unknown norm {self.norm!r}; choose one of {", ".join(NORMS)}')
    groups = x.shape[-1] if self.groups == -1 else self.groups
    x = nn.Conv(self.features, pair(self.kernel_size), pair(self.strides), padding=self.padding,
                use_bias=self.use_bias, feature_group_count=groups, name='conv')(x)
    if self.norm == 'batch':
      x = batch_norm(train, 'bn', self.bn_scale, self.bn_epsilon)(x)
    return activation(self.act)(x)


def global_avg_pool(x):
  return jnp.mean(x, axis=(1, 2))
