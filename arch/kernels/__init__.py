"""oneDNN convolutions and batch norm for XLA:CPU, through XLA FFI custom calls.

XLA:CPU computes the kernel gradients of this project's convolutions at ~20
GFLOP/s (BENCHMARKS.md, finding 4); oneDNN's backward-weights kernels are
5-13x faster at the CIFAR ResNets' shapes, its forward ones ~2x. `conv` is an NHWC x HWIO f32 convolution whose forward
pass and both gradients are the three handlers of `onednn_conv.cc`. XLA:CPU
runs a train-mode batch norm as 4-6 passes over memory at ~8 GB/s; `batch_norm`
(`onednn_norm.cc`) is oneDNN's fused kernel, forward and backward, optionally
with the following ReLU. `make kernels` builds both into `_onednn.so`. When that
library is missing or does not load, `available()` is False (with one warning
line) and `arch.layers` keeps its pure-XLA convolutions and `nn.BatchNorm`.
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


def batch_norm(x, scale, bias, epsilon, relu):
  """Train-mode batch norm of NHWC f32 `x` over N, H, W (+ ReLU if `relu`).

  Returns the output, the batch mean and the biased batch variance, as
  `nn.BatchNorm(use_fast_variance=False)` computes them: y = (x - mean) /
  sqrt(var + epsilon) * scale + bias, the variance from a second pass over
  x - mean. The statistics carry no gradient (they feed running averages).
  """
  y, mean, var = _norm(x, scale, bias, float(epsilon), bool(relu))
  return y, jax.lax.stop_gradient(mean), jax.lax.stop_gradient(var)


def _norm_call(x, scale, bias, epsilon, relu):
  c = x.shape[-1]
  channels = jax.ShapeDtypeStruct((c,), x.dtype)
  # oneDNN's ReLU mask: a bit or a byte per element by version; a byte is enough.
  workspace = jax.ShapeDtypeStruct((x.size if relu else 1,), np.uint8)
  return _ffi('onednn_norm_forward', (jax.ShapeDtypeStruct(x.shape, x.dtype), channels, channels,
                                      workspace),
              x, scale, bias, epsilon=np.float32(epsilon), relu=np.int64(relu))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _norm(x, scale, bias, epsilon, relu):
  return _norm_call(x, scale, bias, epsilon, relu)[:3]


def _norm_fwd(x, scale, bias, epsilon, relu):
  y, mean, var, workspace = _norm_call(x, scale, bias, epsilon, relu)
  return (y, mean, var), (x, scale, mean, var, workspace)


def _norm_bwd(epsilon, relu, residuals, cotangents):
  x, scale, mean, var, workspace = residuals
  dy = cotangents[0]  # the statistics' cotangents are zero: `batch_norm` stops them
  channels = jax.ShapeDtypeStruct(scale.shape, x.dtype)
  return _ffi('onednn_norm_backward', (jax.ShapeDtypeStruct(x.shape, x.dtype), channels, channels),
              x, dy, scale, mean, var, workspace, epsilon=np.float32(epsilon), relu=np.int64(relu))


_norm.defvjp(_norm_fwd, _norm_bwd)


@jax.custom_jvp
def fusion_barrier(x):
  """`x` itself, computed once: XLA fuses nothing across a custom call, and the
  output aliases the input, so it costs no copy. Tangents pass straight through."""
  return _ffi('fusion_barrier', jax.ShapeDtypeStruct(x.shape, x.dtype), x,
              vmap_method='broadcast_all', input_output_aliases={0: 0})


fusion_barrier.defjvp(lambda primals, tangents: (fusion_barrier(*primals), tangents[0]))
