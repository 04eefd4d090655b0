"""The conv unit every network is made of: conv -> norm -> activation.

Normalisation and activation are plain string fields so an ablation can switch
them from a config without touching code.
"""
import contextlib
import functools
from typing import Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from arch import kernels

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


def batch_norm(train, name=None, use_scale=True, epsilon=1e-5, relu=False):
  """BatchNorm in train (batch statistics) or eval (running statistics) mode,
  followed by a ReLU if `relu`.

  The two-pass variance, E[(x - E[x])^2]: Flax's default one-pass form,
  E[x^2] - E[x]^2, cancels on near-constant channels (the digits' borders), which
  makes a run depend on the order of float sums, hence on the device count.
  In train mode on oneDNN (`onednn_norms`) it is `OnednnBatchNorm`, with the
  ReLU fused in; otherwise `nn.BatchNorm`. Both have the same variables, and
  both are called as `norm(x, residual=None, with_norm=False)`: `residual` is
  added before the ReLU, `with_norm` also returns ||norm(x)||.
  """
  if _onednn_norm(train):
    return OnednnBatchNorm(momentum=0.9, epsilon=epsilon, use_scale=use_scale, relu=relu,
                           name=name)
  norm = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=epsilon,
                      use_scale=use_scale, use_fast_variance=False, name=name)

  def apply(x, residual=None, with_norm=False):
    branch = norm(x)
    y = branch if residual is None else branch + residual
    y = nn.relu(y) if relu else y
    return (y, jnp.linalg.norm(branch)) if with_norm else y
  return apply


def _onednn_norm(train):
  return train and _onednn_on(_ONEDNN_NORMS)


def fan_out(x, train):
  """(x, x): a residual block's input for its branch and its shortcut. In train
  mode on oneDNN their gradients are summed by a oneDNN kernel: XLA's add is a
  parallel loop that moves the rest of the backward pass to another of its
  threads, whose oneDNN threads are asleep (`arch.kernels.fan_out`)."""
  if _onednn_norm(train) and x.dtype == jnp.float32:
    return kernels.fan_out(x)
  return x, x


class OnednnBatchNorm(nn.Module):
  """Train-mode `nn.BatchNorm` (+ ReLU) as one oneDNN kernel (`arch.kernels.batch_norm`).

  The same variables, initial values and running-average update as
  `nn.BatchNorm`, so checkpoints and parameter counts do not depend on which
  one ran. XLA:CPU spends more on batch norm's passes over memory than oneDNN
  spends on the convolutions around them (BENCHMARKS.md). A `residual` (with
  `relu`) is added in the same kernel: a residual block's sum.
  """
  momentum: float = 0.9
  epsilon: float = 1e-5
  use_scale: bool = True
  relu: bool = False

  @nn.compact
  def __call__(self, x, residual=None, with_norm=False):
    if x.ndim != 4 or x.dtype != jnp.float32:
      raise ValueError(f'OnednnBatchNorm takes f32 NHWC images, got {x.dtype} {x.shape}; '
                       'trace the model inside arch.layers.onednn_convs(False)')
    features = (x.shape[-1],)
    ra_mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros(features, jnp.float32))
    ra_var = self.variable('batch_stats', 'var', lambda: jnp.ones(features, jnp.float32))
    scale = (self.param('scale', nn.initializers.ones, features, jnp.float32) if self.use_scale
             else jnp.ones(features, x.dtype))
    bias = self.param('bias', nn.initializers.zeros, features, jnp.float32)
    y, mean, var = kernels.batch_norm(x, scale, bias, self.epsilon, self.relu, residual)
    if not self.is_initializing():
      ra_mean.value, ra_var.value = _running_averages(self.momentum, ra_mean.value, ra_var.value,
                                                      mean, var)
    if not with_norm:
      return y
    return y, _branch_norm(x.size // x.shape[-1], self.epsilon, scale, bias, var)


# Jitted, so that tracing a deep net binds each once per layer, not each jnp op
# in them (tracing, not XLA, is most of a warm compile: BENCHMARKS.md).
@functools.partial(jax.jit, static_argnums=0)
def _running_averages(momentum, ra_mean, ra_var, mean, var):
  return (momentum * ra_mean + (1 - momentum) * mean, momentum * ra_var + (1 - momentum) * var)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _branch_norm(count, epsilon, scale, bias, var):
  """||scale * x_hat + bias|| from the statistics, without the image (which the
  norm kernel never writes out before the ReLU): per channel, x_hat sums to zero
  and its squares to count * var / (var + epsilon)."""
  return jnp.sqrt(count * jnp.sum(scale ** 2 * var / (var + epsilon) + bias ** 2))


# ---- XLA:CPU workarounds (BENCHMARKS.md has the measurements). -------------------

@contextlib.contextmanager
def _setting(cell, value):
  """Sets a module-level switch (a one-element list) for the `with` body."""
  saved = cell[0]
  cell[0] = value
  try:
    yield
  finally:
    cell[0] = saved


_WORKAROUNDS = [True]


def xla_cpu_workarounds(enabled=True):
  """Turns the two workarounds below on or off for the models traced inside, so
  `benchmarks/throughput.py --before` can time the code as it was, side by side."""
  return _setting(_WORKAROUNDS, enabled)


_ONEDNN = [None]
_ONEDNN_NORMS = [None]


@contextlib.contextmanager
def onednn_convs(enabled=True):
  """Sends the plain convs and train-mode batch norms of the models traced inside
  to oneDNN (True) or keeps them in XLA (False); `benchmarks/throughput.py --xla`
  times both side by side.

  The default (None) is oneDNN when its library loaded (arch/kernels), the backend
  is CPU and the process has one device. Multi-device programs keep XLA: the SPMD
  partitioner knows nothing of a custom call, so it gathers the whole batch onto
  every device and each computes every image's conv (right, but N times the
  work: 4x slower than XLA on 8 host devices). Like `xla_cpu_workarounds`, it
  acts when a model is traced: jax's trace cache does not see it, so re-jit a
  function after switching.
  """
  with _setting(_ONEDNN, enabled), _setting(_ONEDNN_NORMS, enabled):
    yield


def switches():
  """The settings above, as they stand: part of `arch.trace_cache`'s key."""
  return (_WORKAROUNDS[0], _ONEDNN[0], _ONEDNN_NORMS[0], _IN_LOOP[0])


def onednn_norms(enabled=True):
  """Batch norms alone (inside `onednn_convs`), so the two kernels' gains can be
  timed apart: `benchmarks/throughput.py --xla-norms`."""
  return _setting(_ONEDNN_NORMS, enabled)


def _onednn_on(setting=_ONEDNN):
  if setting[0] is None:
    return jax.default_backend() == 'cpu' and jax.device_count() == 1 and kernels.available()
  return setting[0] and kernels.available()


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None):
  """`lax.conv_general_dilated` for `nn.Conv`, on oneDNN or with CPU pathologies routed around.

  On CPU, plain convolutions (NHWC x HWIO f32, one group, no dilation) go to
  oneDNN (`arch.kernels.conv`, see `onednn_convs`): XLA:CPU's kernel gradients
  are its slowest convolutions. Without oneDNN, two XLA:CPU workarounds:

  When the image is smaller than the kernel (3x3 on the 2x2 maps of the 8x8
  digits' last stage), XLA swaps the conv's operands and XLA:CPU then runs it
  as a naive loop, 10-20x slower than the same FLOPs elsewhere. Those convs are
  computed as im2col (shifted slices, one dot) instead: the same sums, in a
  different order.

  With or without oneDNN, depthwise convs (MobileNet, Xception) are a sum of
  shifted slices times the kernel's taps (`depthwise_conv`): XLA:CPU runs
  grouped convolutions' gradients as slow loops, 6x the time of that fused
  elementwise form (BENCHMARKS.md).
  Everything else goes to lax unchanged.
  """
  args = dict(lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
              dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
              precision=precision)
  nhwc = (lhs.ndim == 4 and not _dilated(lhs_dilation) and not _dilated(rhs_dilation)
          and _is_nhwc(dimension_numbers, lhs.ndim))
  if nhwc:
    window, strides = rhs.shape[:-2], tuple(window_strides)
    pads = padding
    if isinstance(pads, str):
      pads = lax.padtype_to_pads(lhs.shape[1:3], window, strides, pads)
    pads = tuple(map(tuple, pads))
    no_crop = min(min(p) for p in pads) >= 0  # negative pads crop: lax only
    plain = feature_group_count == 1
    if plain and no_crop and lhs.dtype == rhs.dtype == jnp.float32 and _onednn_on():
      return kernels.conv(lhs, rhs, strides, pads)
    if _WORKAROUNDS[0] and plain and any(i < k for i, k in zip(lhs.shape[1:3], window)):
      return im2col_conv(lhs, rhs, strides, pads, precision)
    if (_WORKAROUNDS[0] and no_crop and feature_group_count == lhs.shape[-1] > 1
        and rhs.shape[-2] == 1):
      return depthwise_conv(lhs, rhs, strides, pads)
    if _WORKAROUNDS[0] and plain and _IN_LOOP[0]:
      return canonical_conv(lhs, rhs, strides, pads)
  return lax.conv_general_dilated(lhs, rhs, window_strides, padding, **args)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def canonical_conv(x, kernel, strides, pads):
  """NHWC x HWIO convolution whose gradients are convolutions in that same
  canonical layout, with the transposes written out.

  Inside a loop body (`nn.scan`), XLA:CPU leaves autodiff's convolutions in
  their swapped dimension orders (`f01b_i01o->01bf`) and runs them as naive
  loops, 10-100x slower than its conv library; out of loops it canonicalizes
  them itself. Same sums as `lax`'s gradients.
  """
  return _nhwc_conv(x, kernel, strides, pads)


def _nhwc_conv(x, kernel, strides, pads, lhs_dilation=None, rhs_dilation=None):
  return lax.conv_general_dilated(x, kernel, strides, pads, lhs_dilation, rhs_dilation,
                                  dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def _canonical_fwd(x, kernel, strides, pads):
  return _nhwc_conv(x, kernel, strides, pads), (x, kernel)


def _canonical_bwd(strides, pads, res, dy):
  x, kernel = res
  k, n, o = kernel.shape[:2], x.shape[1:3], dy.shape[1:3]
  # dx: dy dilated by the strides, correlated with the flipped, io-swapped kernel.
  dx_pads = [(kk - 1 - lo, nn_ - 1 - (oo - 1) * s + lo)
             for kk, nn_, oo, s, (lo, _) in zip(k, n, o, strides, pads)]
  flipped = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)
  dx = _nhwc_conv(dy, flipped, (1, 1), dx_pads, lhs_dilation=strides)
  # dkernel: batch <-> channels swapped, so the batch is contracted as features.
  dk_pads = [(lo, kk - nn_ - lo + (oo - 1) * s) for kk, nn_, oo, s, (lo, _) in zip(k, n, o, strides, pads)]
  dk = _nhwc_conv(x.transpose(3, 1, 2, 0), dy.transpose(1, 2, 0, 3), (1, 1), dk_pads,
                  rhs_dilation=strides)
  return dx, dk.transpose(1, 2, 0, 3)


canonical_conv.defvjp(_canonical_fwd, _canonical_bwd)

_IN_LOOP = [False]


def in_loop_body():
  """Models traced inside use `canonical_conv` (see there); for `nn.scan` bodies."""
  return _setting(_IN_LOOP, True)


def shifted_slices(x, window, strides, padding):
  """The kh*kw (strided) slices of padded NHWC `x` that a kh x kw kernel's taps
  see, in the kernel's row-major order."""
  kh, kw = window
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(x.shape[1:3], (kh, kw), strides, padding)
  (pt, pb), (pl, pr) = padding
  x = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  ho = (x.shape[1] - kh) // strides[0] + 1
  wo = (x.shape[2] - kw) // strides[1] + 1
  return [x[:, i:i + strides[0] * (ho - 1) + 1:strides[0], j:j + strides[1] * (wo - 1) + 1:strides[1], :]
          for i in range(kh) for j in range(kw)]


def im2col_conv(x, kernel, strides, padding, precision=None):
  """NHWC x HWIO convolution as one dot over the kh*kw shifted (strided) slices."""
  kh, kw, cin, cout = kernel.shape
  cols = jnp.concatenate(shifted_slices(x, (kh, kw), strides, padding), axis=-1)
  return lax.dot_general(cols, kernel.reshape(kh * kw * cin, cout), (((3,), (0,)), ((), ())),
                         precision=precision)


def depthwise_conv(x, kernel, strides, padding):
  """Depthwise NHWC x HWIO convolution (one group per input channel, kernel
  (kh, kw, 1, C * multiplier)) as the sum of the kh*kw shifted slices, each
  times its tap: elementwise work that XLA fuses, forward and backward."""
  kh, kw, _, cout = kernel.shape
  x = jnp.repeat(x, cout // x.shape[-1], axis=-1)  # output channel o reads input o // multiplier
  taps = kernel.reshape(kh * kw, cout)
  return sum(s * t for s, t in zip(shifted_slices(x, (kh, kw), strides, padding), taps))


def _dilated(d):
  return d is not None and any(v != 1 for v in d)


def _is_nhwc(dn, ndim):
  if dn is None:
    return False
  dn = lax.conv_dimension_numbers((1,) * ndim, (1,) * ndim, dn)
  return tuple(dn.lhs_spec) == (0, 3, 1, 2) and tuple(dn.rhs_spec) == (3, 2, 0, 1) \
      and tuple(dn.out_spec) == (0, 3, 1, 2)


# `nn.Conv` itself (same parameters, same `arch.count_macs`), with the routing above.
Conv = functools.partial(nn.Conv, conv_general_dilated=conv_general_dilated)


def materialize(x):
  """`x`, computed once: a fusion barrier for the residual stream.

  Each block output is `relu(bn(conv) + previous output)`, all elementwise, so
  XLA:CPU fuses the whole chain of earlier blocks into every loop that reads a
  block's output (the weight-gradient transposes, the ReLU masks): the work
  grows with the square of the depth, and a residual net ran up to 1.5-2.5x
  slower than the plain net of equal depth. XLA expands `optimization_barrier`
  before fusion, so the barrier is a product with the identity matrix, which
  XLA leaves alone: exact for finite values (x * 1 + 0s; subnormals flush to
  zero, as in every XLA:CPU op); an inf in one channel turns the pixel's other
  channels to NaN, in a run that has already diverged.
  """
  if not _WORKAROUNDS[0]:
    return x
  if _onednn_on():  # the same barrier as a custom call that aliases x: no work at all
    return kernels.fusion_barrier(x)
  eye = jnp.eye(x.shape[-1], dtype=x.dtype)
  return lax.dot_general(x, eye, (((x.ndim - 1,), (0,)), ((), ())),
                         precision=lax.Precision.HIGHEST)


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
  def __call__(self, x, train=False, residual=None, with_branch_norm=False):
    """act(norm(conv(x)) + residual), the residual if given.

    `with_branch_norm` also returns ||norm(conv(x))||, the branch a residual
    block's diagnostics compare with its input. With a batch norm and a ReLU the
    norm, the sum and the ReLU are one oneDNN kernel in train mode.
    """
    if self.norm not in NORMS:
      raise ValueError(f'unknown norm {self.norm!r}; choose one of {", ".join(NORMS)}')
    groups = x.shape[-1] if self.groups == -1 else self.groups
    x = Conv(self.features, pair(self.kernel_size), pair(self.strides), padding=self.padding,
             use_bias=self.use_bias, feature_group_count=groups, name='conv')(x)
    if self.norm == 'batch' and self.act == 'relu':
      norm = batch_norm(train, 'bn', self.bn_scale, self.bn_epsilon, relu=True)
      y, branch_norm = norm(x, residual, with_norm=True)
      in_kernel = isinstance(norm, OnednnBatchNorm)
    else:
      if self.norm == 'batch':
        x = batch_norm(train, 'bn', self.bn_scale, self.bn_epsilon)(x)
      branch_norm = jnp.linalg.norm(x)
      y = activation(self.act)(x if residual is None else x + residual)
      in_kernel = False
    if residual is not None and not in_kernel:  # a custom call's output needs no barrier
      y = materialize(y)
    return (y, branch_norm) if with_branch_norm else y


def global_avg_pool(x):
  return jnp.mean(x, axis=(1, 2))


# ---- Shared by the zoo networks (arch/vgg.py, inception.py, separable.py). ----

def resize_to_min(x, min_size):
  """Resizes NHWC `x` (bilinear) so both spatial sides are >= min_size.

  A no-op when `min_size` is 0/None or the input is already large enough, so a
  network at its published resolution is exactly the published network.
  """
  if not min_size:
    return x
  n, h, w, c = x.shape
  if h >= min_size and w >= min_size:
    return x
  return jax.image.resize(x, (n, max(h, min_size), max(w, min_size), c), 'bilinear')


class ClassifierHead(nn.Module):
  """Global average pool -> dropout -> dense (Keras' `avg_pool` + `predictions`)."""
  num_classes: int
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, train=False):
    x = global_avg_pool(x)
    x = nn.Dropout(self.dropout)(x, deterministic=not train)
    return nn.Dense(self.num_classes, name='predictions')(x)


def check_common_args(net, num_classes, dropout=0.0, min_input_size=0):
  """ValueError naming the bad value, for the knobs every zoo network has."""
  if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
    raise ValueError(f'{net}: num_classes must be a positive int, got {num_classes!r}')
  if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
    raise ValueError(f'{net}: dropout must be in [0, 1), got {dropout!r}')
  if min_input_size is not None and (not isinstance(min_input_size, int) or min_input_size < 0):
    raise ValueError(f'{net}: min_input_size must be a non-negative int, got {min_input_size!r}')


def check_choice(net, knob, value, choices):
  if value not in choices:
    raise ValueError(f'{net}: {knob} must be one of {", ".join(map(repr, choices))}, '
                     f'got {value!r}')
