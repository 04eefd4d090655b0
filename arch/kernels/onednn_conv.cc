// oneDNN 2-D convolutions for XLA:CPU, as XLA FFI custom-call handlers.
//
// f32, NHWC images x HWIO kernels, one group, any strides and non-negative
// explicit pads: the forward pass, the input (data) gradient and the kernel
// (weights) gradient. XLA:CPU's own weight-gradient convolutions run at ~20
// GFLOP/s on this project's nets (BENCHMARKS.md, finding 4); oneDNN's direct
// backward-weights kernels are the reason this file exists.
//
// Activations stay NHWC (oneDNN's brgemm/jit kernels take it natively, and a
// reorder of an activation costs as much as the transposes XLA inserts). The
// kernel is `format_tag::any`: oneDNN picks its blocked weight layout and the
// small HWIO <-> blocked reorders happen here. Primitive creation costs
// milliseconds, so primitives are built once per (pass, shape, strides, pads)
// and cached for the life of the process. Run to run results are bitwise equal
// for a fixed OMP_NUM_THREADS (oneDNN splits the work statically).

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <string>

#include "arch/kernels/onednn_common.h"
#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using Tag = memory::format_tag;

namespace {

using arch_onednn::Buffer;
using arch_onednn::Engine;
using arch_onednn::Guarded;
using arch_onednn::Nhwc;
using arch_onednn::UserScratchpad;

enum Pass : int64_t { kForward, kBackwardData, kBackwardWeights };

// Everything a primitive depends on: pass, N, H, W, C, KH, KW, O, OH, OW,
// strides (2), pads (top, bottom, left, right).
using Key = std::array<int64_t, 16>;

struct Geometry {
  int64_t n, h, w, c, kh, kw, o, oh, ow, sh, sw, pt, pb, pl, pr, kc;  // kc: kernel's in-channels
  memory::dims src() const { return {n, c, h, w}; }
  memory::dims weights() const { return {o, c, kh, kw}; }
  memory::dims dst() const { return {n, o, oh, ow}; }
  memory::dims strides() const { return {sh, sw}; }
  memory::dims pad_l() const { return {pt, pl}; }
  memory::dims pad_r() const { return {pb, pr}; }
};

struct Conv {
  dnnl::primitive primitive;
  memory::desc weights;     // the layout oneDNN chose for the kernel (or its gradient)
  memory::desc scratchpad;  // user-managed, so concurrent calls never share one
  dnnl::reorder reorder;    // HWIO -> `weights` (a gradient: back); empty if the same
};

memory::desc Any(const memory::dims& dims) { return {dims, memory::data_type::f32, Tag::any}; }
memory::desc Hwio(const Geometry& g) { return {g.weights(), memory::data_type::f32, Tag::hwio}; }

dnnl::convolution_forward::primitive_desc ForwardDesc(const Geometry& g) {
  return {Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
          Nhwc(g.src()), Any(g.weights()), Nhwc(g.dst()), g.strides(), g.pad_l(), g.pad_r(),
          UserScratchpad()};
}

Conv Build(Pass pass, const Geometry& g) {
  auto forward = ForwardDesc(g);
  Conv conv;
  if (pass == kForward) {
    conv = {dnnl::convolution_forward(forward), forward.weights_desc(), forward.scratchpad_desc()};
  } else if (pass == kBackwardData) {
    dnnl::convolution_backward_data::primitive_desc pd(
        Engine(), dnnl::algorithm::convolution_direct, Nhwc(g.src()), Any(g.weights()),
        Nhwc(g.dst()), g.strides(), g.pad_l(), g.pad_r(), forward, UserScratchpad());
    conv = {dnnl::convolution_backward_data(pd), pd.weights_desc(), pd.scratchpad_desc()};
  } else {
    dnnl::convolution_backward_weights::primitive_desc pd(
        Engine(), dnnl::algorithm::convolution_direct, Nhwc(g.src()), Any(g.weights()),
        Nhwc(g.dst()), g.strides(), g.pad_l(), g.pad_r(), forward, UserScratchpad());
    conv = {dnnl::convolution_backward_weights(pd), pd.diff_weights_desc(), pd.scratchpad_desc()};
  }
  if (conv.weights != Hwio(g)) {
    conv.reorder = pass == kBackwardWeights
        ? dnnl::reorder(dnnl::reorder::primitive_desc(Engine(), conv.weights, Engine(), Hwio(g)))
        : dnnl::reorder(dnnl::reorder::primitive_desc(Engine(), Hwio(g), Engine(), conv.weights));
  }
  return conv;
}

const Conv& Cached(Pass pass, const Geometry& g) {
  static std::mutex mutex;
  static std::map<Key, std::unique_ptr<Conv>> cache;
  Key key = {pass, g.n, g.h, g.w, g.c, g.kh, g.kw, g.o, g.oh, g.ow, g.sh, g.sw, g.pt, g.pb, g.pl, g.pr};
  std::lock_guard<std::mutex> lock(mutex);
  auto& entry = cache[key];
  if (!entry) entry = std::make_unique<Conv>(Build(pass, g));
  return *entry;
}

float* Data(ffi::Buffer<ffi::F32, 4>& b) { return b.typed_data(); }
float* Data(ffi::Result<ffi::Buffer<ffi::F32, 4>>& b) { return b->typed_data(); }

ffi::Error Run(Pass pass, const Geometry& g, float* src, float* weights, float* dst) {
  if (g.sh < 1 || g.sw < 1 || std::min({g.pt, g.pb, g.pl, g.pr}) < 0) {
    return ffi::Error::InvalidArgument("onednn_conv: strides must be >= 1 and pads >= 0");
  }
  if (g.c != g.kc) {
    return ffi::Error::InvalidArgument("onednn_conv: kernel input channels != image channels");
  }
  return Guarded("onednn_conv: ", [&] {
    const Conv& conv = Cached(pass, g);
    thread_local Buffer scratch, blocked;
    const auto& engine = Engine();
    memory user_weights(Hwio(g), engine, weights);
    memory conv_weights = user_weights;
    bool reorder = static_cast<bool>(conv.reorder);
    if (reorder) conv_weights = memory(conv.weights, engine, blocked.Get(conv.weights.get_size()));
    dnnl::stream stream(engine);
    if (reorder && pass != kBackwardWeights) conv.reorder.execute(stream, user_weights, conv_weights);
    memory src_m(Nhwc(g.src()), engine, src), dst_m(Nhwc(g.dst()), engine, dst);
    memory scratch_m(conv.scratchpad, engine, scratch.Get(conv.scratchpad.get_size()));
    if (pass == kForward) {
      conv.primitive.execute(stream, {{DNNL_ARG_SRC, src_m}, {DNNL_ARG_WEIGHTS, conv_weights},
                                      {DNNL_ARG_DST, dst_m}, {DNNL_ARG_SCRATCHPAD, scratch_m}});
    } else if (pass == kBackwardData) {
      conv.primitive.execute(stream, {{DNNL_ARG_DIFF_SRC, src_m}, {DNNL_ARG_WEIGHTS, conv_weights},
                                      {DNNL_ARG_DIFF_DST, dst_m}, {DNNL_ARG_SCRATCHPAD, scratch_m}});
    } else {
      conv.primitive.execute(stream, {{DNNL_ARG_SRC, src_m}, {DNNL_ARG_DIFF_WEIGHTS, conv_weights},
                                      {DNNL_ARG_DIFF_DST, dst_m}, {DNNL_ARG_SCRATCHPAD, scratch_m}});
      if (reorder) conv.reorder.execute(stream, conv_weights, user_weights);
    }
    stream.wait();
    return ffi::Error::Success();
  });
}

// Strides (2) and pads (4) of another length leave the geometry invalid (stride 0).
Geometry Make(ffi::Span<const int64_t> x, ffi::Span<const int64_t> k, ffi::Span<const int64_t> y,
              ffi::Span<const int64_t> strides, ffi::Span<const int64_t> pads) {
  if (strides.size() != 2 || pads.size() != 4) return {};
  return {x[0], x[1], x[2], x[3], k[0], k[1], k[3], y[1], y[2],
          strides[0], strides[1], pads[0], pads[1], pads[2], pads[3], k[2]};
}

using F32x4 = ffi::Buffer<ffi::F32, 4>;
using Ints = ffi::Span<const int64_t>;

ffi::Error Forward(F32x4 x, F32x4 kernel, ffi::Result<F32x4> y, Ints strides, Ints pads) {
  auto g = Make(x.dimensions(), kernel.dimensions(), y->dimensions(), strides, pads);
  return Run(kForward, g, Data(x), Data(kernel), Data(y));
}

ffi::Error BackwardData(F32x4 dy, F32x4 kernel, ffi::Result<F32x4> dx, Ints strides, Ints pads) {
  auto g = Make(dx->dimensions(), kernel.dimensions(), dy.dimensions(), strides, pads);
  return Run(kBackwardData, g, Data(dx), Data(kernel), Data(dy));
}

ffi::Error BackwardWeights(F32x4 x, F32x4 dy, ffi::Result<F32x4> dkernel, Ints strides, Ints pads) {
  auto g = Make(x.dimensions(), dkernel->dimensions(), dy.dimensions(), strides, pads);
  return Run(kBackwardWeights, g, Data(x), Data(dkernel), Data(dy));
}

}  // namespace

#define ONEDNN_CONV_BINDING                                                                \
  ffi::Ffi::Bind().Arg<F32x4>().Arg<F32x4>().Ret<F32x4>().Attr<Ints>("strides").Attr<Ints>( \
      "pads")

XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnConvForward, Forward, ONEDNN_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnConvBackwardData, BackwardData, ONEDNN_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnConvBackwardWeights, BackwardWeights, ONEDNN_CONV_BINDING);
