"""oneDNN convolutions for XLA:CPU, through XLA FFI custom calls.

XLA:CPU computes the kernel gradients of this project's convolutions at ~20
GFLOP/s (BENCHMARKS.md, finding 4); oneDNN's backward-weights kernels are
5-13x faster at the CIFAR ResNets' shapes, its forward ones ~2x. `conv` is an NHWC x HWIO f32 convolution whose forward
pass and both gradients are the three handlers of `onednn_conv.cc`, built by
`make kernels` into `_onednn_conv.so`. When that library is missing or does not
load, `available()` is False (with one warning line) and `arch.layers` keeps
its pure-XLA convolutions.
"""
import ctypes
import functools
import logging
import os

import jax
import numpy as np

LIBRARY = os.path.join(os.path.dirname(os.path.abspath(__file__)), '_onednn_conv.so')
TARGETS = {'onednn_conv_forward': 'OnednnConvForward',
           'onednn_conv_backward_data': 'OnednnConvBackwardData',
           'onednn_conv_backward_weights': 'OnednnConvBackwardWeights'}


def load(path=LIBRARY):
  """Registers the handlers in `path` with XLA:CPU; False (and one warning) if it fails."""
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


def _call(target, out_shape, a, b, strides, pads):
  if not available():
    raise RuntimeError(f'arch.kernels: {LIBRARY} did not load; `make kernels` builds it')
  # Under jax.vmap (config.num_seeds) the handlers take one replica a call.
  return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(out_shape, a.dtype),
                          vmap_method='sequential')(
      a, b, strides=np.asarray(strides, np.int64), pads=np.asarray(pads, np.int64).reshape(-1))


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
