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
using arch_onednn::UserScratchpad;

// pass (0 forward, 1 backward), N, H, W, C, relu, epsilon's bits.
using Key = std::array<int64_t, 7>;

struct Norm {
  dnnl::primitive primitive;
  memory::desc workspace, scratchpad;
};

memory::desc Nhwc(const memory::dims& nchw) { return {nchw, memory::data_type::f32, Tag::nhwc}; }
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

ffi::Error Check(const memory::dims& nchw, const F32x1& scale, size_t workspace_bytes,
                 const Norm& norm) {
  if (scale.element_count() != static_cast<size_t>(nchw[1])) {
    return ffi::Error::InvalidArgument("onednn_norm: scale/shift length != image channels");
  }
  if (norm.workspace.get_size() > workspace_bytes) {
    return ffi::Error::InvalidArgument("onednn_norm: workspace buffer too small for oneDNN's");
  }
  return ffi::Error::Success();
}

template <typename Body>
ffi::Error Guarded(Body body) {
  try {
    return body();
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string("onednn_norm: ") + e.what());
  }
}

ffi::Error Forward(F32x4 x, F32x1 scale, F32x1 shift, ffi::Result<F32x4> y,
                   ffi::Result<F32x1> mean, ffi::Result<F32x1> variance,
                   ffi::Result<U8x1> workspace, float epsilon, int64_t relu) {
  return Guarded([&] {
    auto nchw = Nchw(x);
    const Norm& norm = Cached(0, nchw, relu != 0, epsilon);
    auto status = Check(nchw, scale, workspace->size_bytes(), norm);
    if (status.failure()) return status;
    const auto& e = Engine();
    dnnl::stream stream(e);
    std::unordered_map<int, memory> args = {
        {DNNL_ARG_SRC, memory(Nhwc(nchw), e, x.typed_data())},
        {DNNL_ARG_DST, memory(Nhwc(nchw), e, y->typed_data())},
        {DNNL_ARG_SCALE, memory(Channels(nchw[1]), e, scale.typed_data())},
        {DNNL_ARG_SHIFT, memory(Channels(nchw[1]), e, shift.typed_data())},
        {DNNL_ARG_MEAN, memory(Channels(nchw[1]), e, mean->typed_data())},
        {DNNL_ARG_VARIANCE, memory(Channels(nchw[1]), e, variance->typed_data())},
        {DNNL_ARG_SCRATCHPAD, memory(norm.scratchpad, e, Scratch(norm.scratchpad.get_size()))}};
    if (relu) args[DNNL_ARG_WORKSPACE] = memory(norm.workspace, e, workspace->untyped_data());
    norm.primitive.execute(stream, args);
    stream.wait();
    return ffi::Error::Success();
  });
}

ffi::Error Backward(F32x4 x, F32x4 dy, F32x1 scale, F32x1 mean, F32x1 variance, U8x1 workspace,
                    ffi::Result<F32x4> dx, ffi::Result<F32x1> dscale, ffi::Result<F32x1> dshift,
                    float epsilon, int64_t relu) {
  return Guarded([&] {
    auto nchw = Nchw(x);
    const Norm& norm = Cached(1, nchw, relu != 0, epsilon);
    auto status = Check(nchw, scale, workspace.size_bytes(), norm);
    if (status.failure()) return status;
    const auto& e = Engine();
    dnnl::stream stream(e);
    std::unordered_map<int, memory> args = {
        {DNNL_ARG_SRC, memory(Nhwc(nchw), e, x.typed_data())},
        {DNNL_ARG_DIFF_DST, memory(Nhwc(nchw), e, dy.typed_data())},
        {DNNL_ARG_SCALE, memory(Channels(nchw[1]), e, scale.typed_data())},
        {DNNL_ARG_MEAN, memory(Channels(nchw[1]), e, mean.typed_data())},
        {DNNL_ARG_VARIANCE, memory(Channels(nchw[1]), e, variance.typed_data())},
        {DNNL_ARG_DIFF_SRC, memory(Nhwc(nchw), e, dx->typed_data())},
        {DNNL_ARG_DIFF_SCALE, memory(Channels(nchw[1]), e, dscale->typed_data())},
        {DNNL_ARG_DIFF_SHIFT, memory(Channels(nchw[1]), e, dshift->typed_data())},
        {DNNL_ARG_SCRATCHPAD, memory(norm.scratchpad, e, Scratch(norm.scratchpad.get_size()))}};
    if (relu) args[DNNL_ARG_WORKSPACE] = memory(norm.workspace, e, workspace.untyped_data());
    norm.primitive.execute(stream, args);
    stream.wait();
    return ffi::Error::Success();
  });
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
