// oneDNN batch normalization (+ ReLU) for XLA:CPU, as XLA FFI custom-call handlers.
//
// Training mode only (batch statistics over N, H, W of an NHWC f32 image):
// the forward pass returns the output, the batch mean and the biased batch
// variance; the backward pass the gradients of the image, scale and shift.
// XLA:CPU runs batch norm as 4-6 separate loops and reductions over memory at
// a third of the bandwidth PyTorch's fused kernels reach (BENCHMARKS.md);
// oneDNN's are those fused kernels. With `relu`, the ReLU is fused too and its
// mask travels to the backward pass in oneDNN's workspace, a buffer the caller
// sizes at one byte per element (the handler checks it is large enough).
// Eval mode (running statistics) stays in XLA: one fused elementwise loop.

#include <array>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>

#include "arch/kernels/onednn_common.h"
#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using Tag = memory::format_tag;

namespace {

using arch_onednn::Engine;
using arch_onednn::Guarded;
using arch_onednn::Nhwc;
using arch_onednn::UserScratchpad;

// pass (0 forward, 1 backward), N, H, W, C, relu, epsilon's bits.
using Key = std::array<int64_t, 7>;

struct Norm {
  dnnl::primitive primitive;
  memory::desc workspace, scratchpad;
};

memory::desc Channels(int64_t c) { return {{c}, memory::data_type::f32, Tag::x}; }

dnnl::normalization_flags Flags(bool relu) {
  auto flags = dnnl::normalization_flags::use_scale | dnnl::normalization_flags::use_shift;
  return relu ? flags | dnnl::normalization_flags::fuse_norm_relu : flags;
}

dnnl::batch_normalization_forward::primitive_desc ForwardDesc(const memory::dims& nchw,
                                                              bool relu, float epsilon) {
  return {Engine(), dnnl::prop_kind::forward_training, Nhwc(nchw), Nhwc(nchw), epsilon,
          Flags(relu), UserScratchpad()};
}

const Norm& Cached(int64_t pass, const memory::dims& nchw, bool relu, float epsilon) {
  static std::mutex mutex;
  static std::map<Key, std::unique_ptr<Norm>> cache;
  int32_t eps_bits;
  std::memcpy(&eps_bits, &epsilon, sizeof eps_bits);
  Key key = {pass, nchw[0], nchw[2], nchw[3], nchw[1], relu, eps_bits};
  std::lock_guard<std::mutex> lock(mutex);
  auto& entry = cache[key];
  if (!entry) {
    auto forward = ForwardDesc(nchw, relu, epsilon);
    if (pass == 0) {
      entry.reset(new Norm{dnnl::batch_normalization_forward(forward), forward.workspace_desc(),
                           forward.scratchpad_desc()});
    } else {
      dnnl::batch_normalization_backward::primitive_desc pd(
          Engine(), dnnl::prop_kind::backward, Nhwc(nchw), Nhwc(nchw), Nhwc(nchw), epsilon,
          Flags(relu), forward, UserScratchpad());
      entry.reset(new Norm{dnnl::batch_normalization_backward(pd), pd.workspace_desc(),
                           pd.scratchpad_desc()});
    }
  }
  return *entry;
}

void* Scratch(size_t bytes) {
  thread_local arch_onednn::Buffer buffer;
  return buffer.Get(bytes);
}

using F32x4 = ffi::Buffer<ffi::F32, 4>;
using F32x1 = ffi::Buffer<ffi::F32, 1>;
using U8x1 = ffi::Buffer<ffi::U8, 1>;

memory::dims Nchw(const F32x4& x) {
  auto d = x.dimensions();
  return {d[0], d[3], d[1], d[2]};
}

// Runs pass 0 (forward) or 1 (backward) on `args`, the image's and the
// per-channel buffers, adding the scratchpad and, with `relu`, the workspace.
ffi::Error Execute(int64_t pass, const memory::dims& nchw, const F32x1& scale, void* workspace,
                   size_t workspace_bytes, float epsilon, int64_t relu,
                   std::unordered_map<int, memory> args) {
  return Guarded("onednn_norm: ", [&] {
    if (scale.element_count() != static_cast<size_t>(nchw[1])) {
      return ffi::Error::InvalidArgument("onednn_norm: scale/shift length != image channels");
    }
    const Norm& norm = Cached(pass, nchw, relu != 0, epsilon);
    if (norm.workspace.get_size() > workspace_bytes) {
      return ffi::Error::InvalidArgument("onednn_norm: workspace buffer too small for oneDNN's");
    }
    const auto& e = Engine();
    args[DNNL_ARG_SCRATCHPAD] = memory(norm.scratchpad, e, Scratch(norm.scratchpad.get_size()));
    if (relu) args[DNNL_ARG_WORKSPACE] = memory(norm.workspace, e, workspace);
    dnnl::stream stream(e);
    norm.primitive.execute(stream, args);
    stream.wait();
    return ffi::Error::Success();
  });
}

memory Image(const memory::dims& nchw, float* data) { return {Nhwc(nchw), Engine(), data}; }
memory PerChannel(const memory::dims& nchw, float* data) {
  return {Channels(nchw[1]), Engine(), data};
}

ffi::Error Forward(F32x4 x, F32x1 scale, F32x1 shift, ffi::Result<F32x4> y,
                   ffi::Result<F32x1> mean, ffi::Result<F32x1> variance,
                   ffi::Result<U8x1> workspace, float epsilon, int64_t relu) {
  auto nchw = Nchw(x);
  return Execute(0, nchw, scale, workspace->untyped_data(), workspace->size_bytes(), epsilon, relu,
                 {{DNNL_ARG_SRC, Image(nchw, x.typed_data())},
                  {DNNL_ARG_DST, Image(nchw, y->typed_data())},
                  {DNNL_ARG_SCALE, PerChannel(nchw, scale.typed_data())},
                  {DNNL_ARG_SHIFT, PerChannel(nchw, shift.typed_data())},
                  {DNNL_ARG_MEAN, PerChannel(nchw, mean->typed_data())},
                  {DNNL_ARG_VARIANCE, PerChannel(nchw, variance->typed_data())}});
}

ffi::Error Backward(F32x4 x, F32x4 dy, F32x1 scale, F32x1 mean, F32x1 variance, U8x1 workspace,
                    ffi::Result<F32x4> dx, ffi::Result<F32x1> dscale, ffi::Result<F32x1> dshift,
                    float epsilon, int64_t relu) {
  auto nchw = Nchw(x);
  return Execute(1, nchw, scale, workspace.untyped_data(), workspace.size_bytes(), epsilon, relu,
                 {{DNNL_ARG_SRC, Image(nchw, x.typed_data())},
                  {DNNL_ARG_DIFF_DST, Image(nchw, dy.typed_data())},
                  {DNNL_ARG_SCALE, PerChannel(nchw, scale.typed_data())},
                  {DNNL_ARG_MEAN, PerChannel(nchw, mean.typed_data())},
                  {DNNL_ARG_VARIANCE, PerChannel(nchw, variance.typed_data())},
                  {DNNL_ARG_DIFF_SRC, Image(nchw, dx->typed_data())},
                  {DNNL_ARG_DIFF_SCALE, PerChannel(nchw, dscale->typed_data())},
                  {DNNL_ARG_DIFF_SHIFT, PerChannel(nchw, dshift->typed_data())}});
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnNormForward, Forward,
                              ffi::Ffi::Bind()
                                  .Arg<F32x4>()
                                  .Arg<F32x1>()
                                  .Arg<F32x1>()
                                  .Ret<F32x4>()
                                  .Ret<F32x1>()
                                  .Ret<F32x1>()
                                  .Ret<U8x1>()
                                  .Attr<float>("epsilon")
                                  .Attr<int64_t>("relu"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnNormBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Arg<F32x4>()
                                  .Arg<F32x4>()
                                  .Arg<F32x1>()
                                  .Arg<F32x1>()
                                  .Arg<F32x1>()
                                  .Arg<U8x1>()
                                  .Ret<F32x4>()
                                  .Ret<F32x1>()
                                  .Ret<F32x1>()
                                  .Attr<float>("epsilon")
                                  .Attr<int64_t>("relu"));

// A fusion barrier with no work: its output aliases its input (the caller sets
// input_output_aliases), so XLA cannot fuse across it and nothing is copied;
// without the alias it copies. For `arch.layers.materialize`.
namespace {
ffi::Error Barrier(ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> y) {
  if (y->untyped_data() != x.untyped_data()) {
    std::memcpy(y->untyped_data(), x.untyped_data(), x.size_bytes());
  }
  return ffi::Error::Success();
}
}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FusionBarrier, Barrier,
                              ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>());
