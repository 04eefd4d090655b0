"""oneDNN convolutions and batch norm for XLA:CPU, through XLA FFI custom calls.

XLA:CPU computes the kernel gradients of this project's convolutions at ~20
GFLOP/s (BENCHMARKS.md, finding 4); oneDNN's backward-weights kernels are
5-13x faster at the CIFAR ResNets' shapes, its forward ones ~2x. `conv` is an NHWC x HWIO f32 convolution whose forward
pass and both gradients are the three handlers of `onednn_conv.cc`. XLA:CPU
runs a train-mode batch norm as 4-6 passes over memory at ~8 GB/s; `batch_norm`
(`onednn_norm.cc`) is oneDNN's fused kernel, forward and backward, optionally
with the following ReLU, or with a residual block's sum and ReLU. `make
kernels` builds both into `_onednn.so`. When that library is missing or does
not load, `available()` is False (with one warning line) and `arch.layers`
keeps its pure-XLA convolutions and `nn.BatchNorm`.
"""
import ctypes
import functools
import logging
import os
import sys

import jax
import numpy as np

LIBRARY = os.path.join(os.path.dirname(os.path.abspath(__file__)), '_onednn.so')
TARGETS = {'onednn_conv_forward': 'OnednnConvForward',
           'onednn_conv_backward_data': 'OnednnConvBackwardData',
           'onednn_conv_backward_weights': 'OnednnConvBackwardWeights',
           'onednn_norm_forward': 'OnednnNormForward',
           'onednn_norm_backward': 'OnednnNormBackward',
           'onednn_norm_add_relu_forward': 'OnednnNormAddReluForward',
           'onednn_norm_add_relu_backward': 'OnednnNormAddReluBackward',
           'onednn_add': 'OnednnAdd',
           'fusion_barrier': 'FusionBarrier'}


# libgomp (oneDNN's threads) reads these when it loads. By default a calling
# thread's team sleeps after ~100 spins when threads outnumber cores, as they do
# beside XLA's pool, and waking it costs more than a small conv: ResNet-56 on the
# digits, 96 -> 72 ms a step (BENCHMARKS.md). 1000 spins keep idle cores idle.
OPENMP_DEFAULTS = {'OMP_WAIT_POLICY': 'ACTIVE', 'GOMP_SPINCOUNT': '1000'}


def keep_freed_memory():
  """Makes glibc keep freed memory for reuse instead of unmapping it.

  XLA:CPU allocates a program's temporaries as one buffer per execution (258 MB
  for a ResNet-20 step at batch 128) from its worker threads, whose malloc
  arenas always mmap such sizes and unmap them on free: every step then faults
  in 60,000 fresh zeroed pages, 25-50 ms of kernel time a step. One arena, no
  mmap and no trimming make the next step reuse the same pages. Linux/glibc
  only; a no-op elsewhere. Called on import (`arch/__init__.py`), before jax
  starts its threads; ARCH_SYSTEM_MALLOC=1 leaves malloc as it is.
  """
  if os.environ.get('ARCH_SYSTEM_MALLOC') == '1' or not sys.platform.startswith('linux'):
    return False
  try:
    libc = ctypes.CDLL('libc.so.6')
    m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8  # malloc.h
    return bool(libc.mallopt(m_arena_max, 1) and libc.mallopt(m_mmap_max, 0)
                and libc.mallopt(m_trim_threshold, -1))  # -1: never trim
  except (OSError, AttributeError):  # not glibc
    return False


def load(path=LIBRARY):
  """Registers the handlers in `path` with XLA:CPU; False (and one warning) if it fails."""
  for name, value in OPENMP_DEFAULTS.items():
    os.environ.setdefault(name, value)
  try:
    library = ctypes.cdll.LoadLibrary(path)
    for target, symbol in TARGETS.items():
      jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)),
                                  platform='cpu')
  except (OSError, AttributeError) as e:
    logging.getLogger(__name__).warning(
        'arch.kernels: oneDNN convolutions off, pure XLA instead (%s; `make kernels` builds it)',
        str(e).splitlines()[0])
    return False
  return True


@functools.cache
def available():
  """Whether the oneDNN handlers are registered (loads them once, on first use)."""
  return load()


def _ffi(target, outputs, *args, vmap_method='sequential', input_output_aliases=None, **attrs):
  if not available():
    raise RuntimeError(f'arch.kernels: {LIBRARY} did not load; `make kernels` builds it')
  # Under jax.vmap (config.num_seeds) the handlers take one replica a call.
  return jax.ffi.ffi_call(target, outputs, vmap_method=vmap_method,
                          input_output_aliases=input_output_aliases)(*args, **attrs)


def _call(target, out_shape, a, b, strides, pads):
  return _ffi(target, jax.ShapeDtypeStruct(out_shape, a.dtype), a, b,
              strides=np.asarray(strides, np.int64), pads=np.asarray(pads, np.int64).reshape(-1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv(x, kernel, strides, pads):
  """NHWC x HWIO f32 convolution, one group; `pads` ((top, bottom), (left, right)), >= 0.

  Same sums as `lax.conv_general_dilated`, in oneDNN's order.
  """
  n, h, w, _ = x.shape
  kh, kw, _, o = kernel.shape
  (pt, pb), (pl, pr) = pads
  out = (n, (h + pt + pb - kh) // strides[0] + 1, (w + pl + pr - kw) // strides[1] + 1, o)
  return _call('onednn_conv_forward', out, x, kernel, strides, pads)


def _conv_fwd(x, kernel, strides, pads):
  return conv(x, kernel, strides, pads), (x, kernel)


def _conv_bwd(strides, pads, residuals, dy):
  x, kernel = residuals
  dx = _call('onednn_conv_backward_data', x.shape, dy, kernel, strides, pads)
  dkernel = _call('onednn_conv_backward_weights', kernel.shape, x, dy, strides, pads)
  return dx, dkernel


conv.defvjp(_conv_fwd, _conv_bwd)


def batch_norm(x, scale, bias, epsilon, relu, residual=None):
  """Train-mode batch norm of NHWC f32 `x` over N, H, W (+ ReLU if `relu`).

  Returns the output, the batch mean and the biased batch variance, as
  `nn.BatchNorm(use_fast_variance=False)` computes them: y = (x - mean) /
  sqrt(var + epsilon) * scale + bias, the variance from a second pass over
  x - mean. With `residual` (x's shape; needs `relu`) the output is
  relu(y + residual), a residual block's sum in the same kernel. The statistics
  carry no gradient (they feed running averages).
  """
  if residual is None:
    y, mean, var = _norm(x, scale, bias, float(epsilon), bool(relu))
  else:
    if not relu:
      raise ValueError('kernels.batch_norm: a residual is added before a ReLU only (relu=True)')
    y, mean, var = _norm_add_relu(x, residual, scale, bias, float(epsilon))
  return y, jax.lax.stop_gradient(mean), jax.lax.stop_gradient(var)


def _norm_outputs(x):
  """The forward handlers' outputs: y, mean, variance."""
  channels = jax.ShapeDtypeStruct(x.shape[-1:], x.dtype)
  return (jax.ShapeDtypeStruct(x.shape, x.dtype), channels, channels)


def _norm_call(x, scale, bias, epsilon, relu):
  # oneDNN's ReLU mask: a bit or a byte per element by version; a byte is enough.
  workspace = jax.ShapeDtypeStruct((x.size if relu else 1,), np.uint8)
  return _ffi('onednn_norm_forward', _norm_outputs(x) + (workspace,), x, scale, bias,
              epsilon=np.float32(epsilon), act=np.int64(relu))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _norm(x, scale, bias, epsilon, relu):
  return _norm_call(x, scale, bias, epsilon, relu)[:3]


def _norm_fwd(x, scale, bias, epsilon, relu):
  y, mean, var, workspace = _norm_call(x, scale, bias, epsilon, relu)
  return (y, mean, var), (x, scale, mean, var, workspace)


def _norm_grads(x, residual_grad):
  """The backward handler's outputs: dx, (dresidual,) dscale, dshift."""
  image = jax.ShapeDtypeStruct(x.shape, x.dtype)
  channels = jax.ShapeDtypeStruct(x.shape[-1:], x.dtype)
  return (image, image, channels, channels) if residual_grad else (image, channels, channels)


def _norm_bwd(epsilon, relu, residuals, cotangents):
  x, scale, mean, var, workspace = residuals
  dy = cotangents[0]  # the statistics' cotangents are zero: `batch_norm` stops them
  return _ffi('onednn_norm_backward', _norm_grads(x, False), x, dy, scale, mean, var, workspace,
              epsilon=np.float32(epsilon), act=np.int64(relu))


_norm.defvjp(_norm_fwd, _norm_bwd)


def _add_relu_call(x, residual, scale, bias, epsilon):
  return _ffi('onednn_norm_add_relu_forward', _norm_outputs(x), x, residual, scale, bias,
              epsilon=np.float32(epsilon))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _norm_add_relu(x, residual, scale, bias, epsilon):
  return _add_relu_call(x, residual, scale, bias, epsilon)


def _norm_add_relu_fwd(x, residual, scale, bias, epsilon):
  y, mean, var = _add_relu_call(x, residual, scale, bias, epsilon)
  return (y, mean, var), (x, y, scale, mean, var)


def _norm_add_relu_bwd(epsilon, residuals, cotangents):
  x, y, scale, mean, var = residuals
  return _ffi('onednn_norm_add_relu_backward', _norm_grads(x, True), x, y, cotangents[0], scale,
              mean, var, epsilon=np.float32(epsilon))  # dx, dresidual, dscale, dbias


_norm_add_relu.defvjp(_norm_add_relu_fwd, _norm_add_relu_bwd)


@jax.custom_jvp
def fusion_barrier(x):
  """`x` itself, computed once: XLA fuses nothing across a custom call, and the
  output aliases the input, so it costs no copy. Tangents pass straight through."""
  return _ffi('fusion_barrier', jax.ShapeDtypeStruct(x.shape, x.dtype), x,
              vmap_method='broadcast_all', input_output_aliases={0: 0})


fusion_barrier.defjvp(lambda primals, tangents: (fusion_barrier(*primals), tangents[0]))


@jax.custom_vjp
def fan_out(x):
  """(x, x) for two readers, e.g. a residual block's branch and shortcut, whose
  cotangents are then summed by oneDNN (`onednn_add`) rather than by an XLA
  loop, which would hand the rest of the backward pass to another thread."""
  return x, x


def _fan_out_fwd(x):
  return (x, x), None


def _fan_out_bwd(_, cotangents):
  a, b = cotangents
  return (_ffi('onednn_add', jax.ShapeDtypeStruct(a.shape, a.dtype), a, b),)


fan_out.defvjp(_fan_out_fwd, _fan_out_bwd)
