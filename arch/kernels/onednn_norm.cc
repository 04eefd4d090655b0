// oneDNN batch normalization (+ ReLU) for XLA:CPU, as XLA FFI custom-call handlers.
//
// Training mode only (batch statistics over N, H, W of an NHWC f32 image):
// the forward pass returns the output, the batch mean and the biased batch
// variance; the backward pass the gradients of the image, scale and shift.
// XLA:CPU runs batch norm as 4-6 separate loops and reductions over memory at
// a third of the bandwidth PyTorch's fused kernels reach (BENCHMARKS.md);
// oneDNN's are those fused kernels. `act` 1 fuses the following ReLU; act 2
// adds a second image (a residual block's shortcut) before the ReLU, so a basic
// block's sum is this kernel too and XLA runs no elementwise loop between the
// convs (each such loop moves the chain to another XLA thread, whose OpenMP team
// is cold). The ReLU's mask travels to the backward pass in oneDNN's workspace,
// a buffer the caller sizes at one byte per element (the handler checks it is
// large enough).
// Eval mode (running statistics) stays in XLA: one fused elementwise loop.

#include <algorithm>
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

// pass (0 forward, 1 backward), N, H, W, C, act, epsilon's bits.
using Key = std::array<int64_t, 7>;

enum Act : int64_t { kNone = 0, kRelu = 1, kAddRelu = 2 };

struct Norm {
  dnnl::primitive norm;  // the batch norm, forward or backward
  memory::desc workspace, scratchpad;
  // act 2 only. Forward: relu(y + residual) after the norm, a binary add with a
  // ReLU post-op; backward: the ReLU's gradient, from its output, before the norm's.
  // (oneDNN's CPU norms do not implement fuse_norm_add_relu.)
  dnnl::primitive add_relu;
  memory::desc add_relu_scratchpad;
};

memory::desc Channels(int64_t c) { return {{c}, memory::data_type::f32, Tag::x}; }

dnnl::normalization_flags Flags(int64_t act) {
  auto flags = dnnl::normalization_flags::use_scale | dnnl::normalization_flags::use_shift;
  return act == kRelu ? flags | dnnl::normalization_flags::fuse_norm_relu : flags;
}

dnnl::batch_normalization_forward::primitive_desc ForwardDesc(const memory::dims& nchw,
                                                              int64_t act, float epsilon) {
  return {Engine(), dnnl::prop_kind::forward_training, Nhwc(nchw), Nhwc(nchw), epsilon,
          Flags(act), UserScratchpad()};
}

void AddRelu(int64_t pass, const memory::dims& nchw, Norm* entry) {
  const auto image = Nhwc(nchw);
  const auto relu = dnnl::algorithm::eltwise_relu_use_dst_for_bwd;
  if (pass == 0) {
    auto attr = UserScratchpad();
    dnnl::post_ops ops;
    ops.append_eltwise(relu, 0.f, 0.f);
    attr.set_post_ops(ops);
    dnnl::binary::primitive_desc pd(Engine(), dnnl::algorithm::binary_add, image, image, image,
                                    attr);
    entry->add_relu = dnnl::binary(pd);
    entry->add_relu_scratchpad = pd.scratchpad_desc();
  } else {
    dnnl::eltwise_forward::primitive_desc hint(Engine(), dnnl::prop_kind::forward_training, relu,
                                               image, image, 0.f, 0.f);
    dnnl::eltwise_backward::primitive_desc pd(Engine(), relu, image, image, image, 0.f, 0.f, hint,
                                              UserScratchpad());
    entry->add_relu = dnnl::eltwise_backward(pd);
    entry->add_relu_scratchpad = pd.scratchpad_desc();
  }
}

const Norm& Cached(int64_t pass, const memory::dims& nchw, int64_t act, float epsilon) {
  static std::mutex mutex;
  static std::map<Key, std::unique_ptr<Norm>> cache;
  int32_t eps_bits;
  std::memcpy(&eps_bits, &epsilon, sizeof eps_bits);
  Key key = {pass, nchw[0], nchw[2], nchw[3], nchw[1], act, eps_bits};
  std::lock_guard<std::mutex> lock(mutex);
  auto& entry = cache[key];
  if (!entry) {
    auto forward = ForwardDesc(nchw, act, epsilon);
    auto norm = std::make_unique<Norm>();
    if (pass == 0) {
      norm->norm = dnnl::batch_normalization_forward(forward);
      norm->workspace = forward.workspace_desc();
      norm->scratchpad = forward.scratchpad_desc();
    } else {
      dnnl::batch_normalization_backward::primitive_desc pd(
          Engine(), dnnl::prop_kind::backward, Nhwc(nchw), Nhwc(nchw), Nhwc(nchw), epsilon,
          Flags(act), forward, UserScratchpad());
      norm->norm = dnnl::batch_normalization_backward(pd);
      norm->workspace = pd.workspace_desc();
      norm->scratchpad = pd.scratchpad_desc();
    }
    if (act == kAddRelu) AddRelu(pass, nchw, norm.get());
    entry = std::move(norm);
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
using Args = std::unordered_map<int, memory>;

memory::dims Nchw(const F32x4& x) {
  auto d = x.dimensions();
  return {d[0], d[3], d[1], d[2]};
}

memory Image(const memory::dims& nchw, float* data) { return {Nhwc(nchw), Engine(), data}; }
memory PerChannel(const memory::dims& nchw, float* data) {
  return {Channels(nchw[1]), Engine(), data};
}

// Runs pass 0 (forward) or 1 (backward) of the norm on `norm_args`, the image's
// and the per-channel buffers, adding the scratchpad and, with the ReLU fused,
// the workspace. With act 2 the add + ReLU runs on `add_relu_args` after the
// forward norm or before the backward one.
ffi::Error Execute(int64_t pass, const memory::dims& nchw, const F32x1& scale, void* workspace,
                   size_t workspace_bytes, float epsilon, int64_t act, Args norm_args,
                   Args add_relu_args = {}) {
  return Guarded("onednn_norm: ", [&] {
    if (scale.element_count() != static_cast<size_t>(nchw[1])) {
      return ffi::Error::InvalidArgument("onednn_norm: scale/shift length != image channels");
    }
    if (act != kNone && act != kRelu && act != kAddRelu) {
      return ffi::Error::InvalidArgument("onednn_norm: act is 0 (none), 1 (relu) or 2 (add, relu)");
    }
    const Norm& norm = Cached(pass, nchw, act, epsilon);
    if (act == kRelu && norm.workspace.get_size() > workspace_bytes) {
      return ffi::Error::InvalidArgument("onednn_norm: workspace buffer too small for oneDNN's");
    }
    const auto& e = Engine();
    void* scratch = Scratch(std::max(norm.scratchpad.get_size(),
                                     norm.add_relu_scratchpad.get_size()));
    norm_args[DNNL_ARG_SCRATCHPAD] = memory(norm.scratchpad, e, scratch);
    if (act == kRelu) norm_args[DNNL_ARG_WORKSPACE] = memory(norm.workspace, e, workspace);
    dnnl::stream stream(e);
    if (act == kAddRelu) {
      add_relu_args[DNNL_ARG_SCRATCHPAD] = memory(norm.add_relu_scratchpad, e, scratch);
      if (pass == 1) norm.add_relu.execute(stream, add_relu_args);
      norm.norm.execute(stream, norm_args);
      if (pass == 0) norm.add_relu.execute(stream, add_relu_args);
    } else {
      norm.norm.execute(stream, norm_args);
    }
    stream.wait();
    return ffi::Error::Success();
  });
}

Args ForwardArgs(const memory::dims& nchw, F32x4& x, F32x1& scale, F32x1& shift, F32x4& y,
                 F32x1& mean, F32x1& variance) {
  return {{DNNL_ARG_SRC, Image(nchw, x.typed_data())},
          {DNNL_ARG_DST, Image(nchw, y.typed_data())},
          {DNNL_ARG_SCALE, PerChannel(nchw, scale.typed_data())},
          {DNNL_ARG_SHIFT, PerChannel(nchw, shift.typed_data())},
          {DNNL_ARG_MEAN, PerChannel(nchw, mean.typed_data())},
          {DNNL_ARG_VARIANCE, PerChannel(nchw, variance.typed_data())}};
}

Args BackwardArgs(const memory::dims& nchw, F32x4& x, float* dy, F32x1& scale, F32x1& mean,
                  F32x1& variance, F32x4& dx, F32x1& dscale, F32x1& dshift) {
  return {{DNNL_ARG_SRC, Image(nchw, x.typed_data())},
          {DNNL_ARG_DIFF_DST, Image(nchw, dy)},
          {DNNL_ARG_SCALE, PerChannel(nchw, scale.typed_data())},
          {DNNL_ARG_MEAN, PerChannel(nchw, mean.typed_data())},
          {DNNL_ARG_VARIANCE, PerChannel(nchw, variance.typed_data())},
          {DNNL_ARG_DIFF_SRC, Image(nchw, dx.typed_data())},
          {DNNL_ARG_DIFF_SCALE, PerChannel(nchw, dscale.typed_data())},
          {DNNL_ARG_DIFF_SHIFT, PerChannel(nchw, dshift.typed_data())}};
}

bool SameShape(const F32x4& a, const F32x4& b) {
  auto da = a.dimensions(), db = b.dimensions();
  return std::equal(da.begin(), da.end(), db.begin(), db.end());
}

ffi::Error Forward(F32x4 x, F32x1 scale, F32x1 shift, ffi::Result<F32x4> y,
                   ffi::Result<F32x1> mean, ffi::Result<F32x1> variance,
                   ffi::Result<U8x1> workspace, float epsilon, int64_t act) {
  if (act == kAddRelu) return ffi::Error::InvalidArgument("onednn_norm: act 2 has its own handler");
  auto nchw = Nchw(x);
  return Execute(0, nchw, scale, workspace->untyped_data(), workspace->size_bytes(), epsilon, act,
                 ForwardArgs(nchw, x, scale, shift, *y, *mean, *variance));
}

ffi::Error Backward(F32x4 x, F32x4 dy, F32x1 scale, F32x1 mean, F32x1 variance, U8x1 workspace,
                    ffi::Result<F32x4> dx, ffi::Result<F32x1> dscale, ffi::Result<F32x1> dshift,
                    float epsilon, int64_t act) {
  if (act == kAddRelu) return ffi::Error::InvalidArgument("onednn_norm: act 2 has its own handler");
  auto nchw = Nchw(x);
  return Execute(1, nchw, scale, workspace.untyped_data(), workspace.size_bytes(), epsilon, act,
                 BackwardArgs(nchw, x, dy.typed_data(), scale, mean, variance, *dx, *dscale,
                              *dshift));
}

// y = relu(norm(x) + residual), a residual block's sum. The backward pass takes
// that y (for the ReLU's mask) and also returns the residual's gradient.
ffi::Error AddReluForward(F32x4 x, F32x4 residual, F32x1 scale, F32x1 shift,
                          ffi::Result<F32x4> y, ffi::Result<F32x1> mean,
                          ffi::Result<F32x1> variance, float epsilon) {
  if (!SameShape(x, residual)) {
    return ffi::Error::InvalidArgument("onednn_norm: residual shape != image shape");
  }
  auto nchw = Nchw(x);
  float* out = y->typed_data();
  return Execute(0, nchw, scale, nullptr, 0, epsilon, kAddRelu,
                 ForwardArgs(nchw, x, scale, shift, *y, *mean, *variance),
                 {{DNNL_ARG_SRC_0, Image(nchw, out)},
                  {DNNL_ARG_SRC_1, Image(nchw, residual.typed_data())},
                  {DNNL_ARG_DST, Image(nchw, out)}});
}

ffi::Error AddReluBackward(F32x4 x, F32x4 y, F32x4 dy, F32x1 scale, F32x1 mean, F32x1 variance,
                           ffi::Result<F32x4> dx, ffi::Result<F32x4> dresidual,
                           ffi::Result<F32x1> dscale, ffi::Result<F32x1> dshift, float epsilon) {
  auto nchw = Nchw(x);
  float* dsum = dresidual->typed_data();  // the sum's gradient: the residual's and the norm's
  return Execute(1, nchw, scale, nullptr, 0, epsilon, kAddRelu,
                 BackwardArgs(nchw, x, dsum, scale, mean, variance, *dx, *dscale, *dshift),
                 {{DNNL_ARG_DST, Image(nchw, y.typed_data())},
                  {DNNL_ARG_DIFF_DST, Image(nchw, dy.typed_data())},
                  {DNNL_ARG_DIFF_SRC, Image(nchw, dsum)}});
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
                                  .Attr<int64_t>("act"));

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
                                  .Attr<int64_t>("act"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnNormAddReluForward, AddReluForward,
                              ffi::Ffi::Bind()
                                  .Arg<F32x4>()
                                  .Arg<F32x4>()
                                  .Arg<F32x1>()
                                  .Arg<F32x1>()
                                  .Ret<F32x4>()
                                  .Ret<F32x1>()
                                  .Ret<F32x1>()
                                  .Attr<float>("epsilon"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnNormAddReluBackward, AddReluBackward,
                              ffi::Ffi::Bind()
                                  .Arg<F32x4>()
                                  .Arg<F32x4>()
                                  .Arg<F32x4>()
                                  .Arg<F32x1>()
                                  .Arg<F32x1>()
                                  .Arg<F32x1>()
                                  .Ret<F32x4>()
                                  .Ret<F32x4>()
                                  .Ret<F32x1>()
                                  .Ret<F32x1>()
                                  .Attr<float>("epsilon"));

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

// a + b for f32 arrays of one shape, on oneDNN's threads: the gradient of a
// residual block's input, whose branch and shortcut both read it
// (`arch.kernels.fan_out`). As an XLA loop it is a parallel task whose
// continuation can move the rest of the step to another thread.
namespace {
ffi::Error Add(ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
               ffi::Result<ffi::Buffer<ffi::F32>> sum) {
  return Guarded("onednn_add: ", [&] {
    if (a.element_count() != b.element_count()) {
      return ffi::Error::InvalidArgument("onednn_add: operands differ in size");
    }
    const int64_t n = static_cast<int64_t>(a.element_count());
    static std::mutex mutex;
    static std::map<int64_t, std::unique_ptr<dnnl::binary>> cache;
    const dnnl::binary* add;
    memory::desc flat({n}, memory::data_type::f32, Tag::x);
    {
      std::lock_guard<std::mutex> lock(mutex);
      auto& entry = cache[n];
      if (!entry) {
        entry = std::make_unique<dnnl::binary>(
            dnnl::binary::primitive_desc(Engine(), dnnl::algorithm::binary_add, flat, flat, flat));
      }
      add = entry.get();
    }
    const auto& e = Engine();
    dnnl::stream stream(e);
    add->execute(stream, {{DNNL_ARG_SRC_0, memory(flat, e, a.typed_data())},
                          {DNNL_ARG_SRC_1, memory(flat, e, b.typed_data())},
                          {DNNL_ARG_DST, memory(flat, e, sum->typed_data())}});
    stream.wait();
    return ffi::Error::Success();
  });
}
}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnAdd, Add,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
