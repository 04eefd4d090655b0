"""ResNets: the CIFAR 6n+2 family (He et al. 2015, section 4.2), ResNet50 and ResNet50V2.

The CIFAR nets are the degradation experiment's subjects: a 3x3 conv, three
stages of n blocks at 16/32/64 filters (times `width`), global pooling and a
linear classifier, 6n+2 weighted layers. The ImageNet nets follow Keras's
applications layer for layer, so their parameter counts match Keras exactly.
"""
from typing import Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from arch.layers import ConvUnit, activation, batch_norm, global_avg_pool, in_loop_body
from arch.registry import register
from arch.residual import BasicBlock, BottleneckBlock, PreActBlock, check_shortcut

CIFAR_BLOCKS = ('basic', 'preact')


class ScannedBlocks(nn.Module):
  """`length` identical blocks run by `nn.scan`: one traced block, so compile
  time does not grow with depth. Parameters and BN statistics are stacked on a
  leading axis of size `length` under `block/` (`scan_params` maps an unrolled
  net's parameters to this layout)."""
  block: str
  features: int
  shortcut: str
  length: int
  train: bool = False
  remat: bool = False  # recompute each block's activations in the backward pass

  @nn.compact
  def __call__(self, x):
    cls = PreActBlock if self.block == 'preact' else BasicBlock
    body = nn.remat(_Carry) if self.remat else _Carry
    scan = nn.scan(body, variable_axes={'params': 0, 'batch_stats': 0, 'intermediates': 0},
                   split_rngs={'params': True}, length=self.length)
    with in_loop_body():  # XLA:CPU's convs in loop bodies need canonical gradients
      return scan(cls, self.features, self.shortcut, self.train, name='block')(x)[0]


class _Carry(nn.Module):
  """One block as a scan body: (carry) -> (carry, no output)."""
  cls: type
  features: int
  shortcut: str
  train: bool

  @nn.compact
  def __call__(self, x, _=None):
    return self.cls(self.features, 1, self.shortcut, name='block')(x, self.train), None


class CifarResNet(nn.Module):
  """6n+2 layers; `block='preact'` gives the pre-activation (v2) variant.

  `scan_blocks=True` runs blocks 2..n of each stage (identical in shape) with
  `nn.scan` under `stage{s}_scanned`: the same function and parameter count,
  a compile time that no longer grows with n. `scan_blocks='remat'` also
  recomputes the scanned blocks' activations in the backward pass (memory). Per-block diagnostics then cover
  only each stage's first block (the scanned ones are not named `*block*`).
  """
  blocks_per_stage: int
  width: float = 1.0
  shortcut: str = 'A'
  block: str = 'basic'
  num_classes: int = 10
  scan_blocks: Union[bool, str] = False

  @nn.compact
  def __call__(self, x, train=False):
    preact = self.block == 'preact'
    filters = [max(1, round(f * self.width)) for f in (16, 32, 64)]
    x = ConvUnit(filters[0], 3, norm='none' if preact else 'batch', act='none' if preact else 'relu',
                 name='stem')(x, train)
    block_cls = PreActBlock if preact else BasicBlock
    for stage, features in enumerate(filters):
      for i in range(self.blocks_per_stage):
        if self.scan_blocks and i == 1:
          x = ScannedBlocks(self.block, features, self.shortcut, self.blocks_per_stage - 1, train,
                            remat=self.scan_blocks == 'remat', name=f'stage{stage + 1}_scanned')(x)
          break
        strides = 2 if stage > 0 and i == 0 else 1
        x = block_cls(features, strides, self.shortcut, name=f'stage{stage + 1}_block{i + 1}')(x, train)
    if preact:
      x = nn.relu(batch_norm(train, 'final_bn')(x))
    return nn.Dense(self.num_classes, name='head')(global_avg_pool(x))


def scan_params(unrolled, blocks_per_stage):
  """An unrolled CIFAR net's variables (params or batch_stats) in the
  `scan_blocks=True` layout: blocks 2..n of each stage stacked on axis 0."""
  out = {k: v for k, v in unrolled.items() if '_block' not in k or k.endswith('_block1')}
  for stage in (1, 2, 3):
    blocks = [unrolled[f'stage{stage}_block{i}'] for i in range(2, blocks_per_stage + 1)]
    if blocks:
      out[f'stage{stage}_scanned'] = {'block': {'block': jax.tree.map(
          lambda *leaves: jnp.stack(leaves), *blocks)}}
  return out


@register('cifar_resnet')
def cifar_resnet(depth=20, width=1.0, shortcut='A', block='basic', num_classes=10,
                 scan_blocks=False):
  """`shortcut='none'` is the paper's plain net of the same depth. `scan_blocks`
  compiles each stage's repeated blocks once (for the 1000-layer nets)."""
  if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
    raise ValueError(f'cifar_resnet depth must be 6n+2 with n >= 1 (8, 14, 20, 32, 44, 56, 110, '
                     f'1202, ...); got {depth!r}')
  if not width > 0:
    raise ValueError(f'cifar_resnet width must be > 0; got {width!r}')
  if block not in CIFAR_BLOCKS:
    raise ValueError(f'unknown cifar_resnet block {block!r}; choose one of {", ".join(CIFAR_BLOCKS)}')
  check_shortcut(shortcut)
  if shortcut == 'A' and width * 16 < 1:
    raise ValueError(f'width {width} leaves no channels')
  if scan_blocks not in (False, True, 'remat'):
    raise ValueError(f"cifar_resnet scan_blocks must be False, True or 'remat'; got {scan_blocks!r}")
  return CifarResNet((depth - 2) // 6, width, shortcut, block, num_classes, scan_blocks)


class ImageNetResNet(nn.Module):
  """7x7/2 stem, 3x3/2 max-pool, bottleneck stages, global pool, classifier.

  `preact=True` is ResNet50V2: a bias-only stem and a final BN-ReLU instead of
  normalising inside the stem.
  """
  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  preact: bool = False
  shortcut: str = 'B'
  num_classes: int = 1000

  @nn.compact
  def __call__(self, x, train=False):
    eps = 1.001e-5  # Keras's value, kept so imported weights behave identically
    x = ConvUnit(64, 7, 2, padding=((3, 3), (3, 3)), use_bias=True, bn_epsilon=eps,
                 norm='none' if self.preact else 'batch', act='none' if self.preact else 'relu',
                 name='stem')(x, train)
    x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    for stage, blocks in enumerate(self.stage_sizes):
      features = 64 * 2 ** stage
      for i in range(blocks):
        strides = 2 if stage > 0 and i == 0 else 1
        name = f'stage{stage + 1}_block{i + 1}'
        if self.preact:
          x = PreActBlock(features, strides, self.shortcut, bottleneck=True, use_bias=True,
                          bn_epsilon=eps, name=name)(x, train)
        else:
          x = BottleneckBlock(features, strides, self.shortcut, stride_in_1x1=True, use_bias=True,
                              bn_epsilon=eps, name=name)(x, train)
    if self.preact:
      x = activation('relu')(batch_norm(train, 'final_bn', epsilon=eps)(x))
    return nn.Dense(self.num_classes, name='head')(global_avg_pool(x))


@register('resnet50')
def resnet50(num_classes=1000, shortcut='B'):
  """Keras ResNet50: Caffe-style, stride on the first 1x1, biases on every conv."""
  check_shortcut(shortcut)
  return ImageNetResNet(preact=False, shortcut=shortcut, num_classes=num_classes)


@register('resnet50_v2')
def resnet50_v2(num_classes=1000, shortcut='B'):
  """Keras ResNet50V2 (pre-activation). Keras strides in each stage's last block;
  we stride in the first, as the paper does: same parameters, slightly fewer
  multiply-adds."""
  check_shortcut(shortcut)
  return ImageNetResNet(preact=True, shortcut=shortcut, num_classes=num_classes)
