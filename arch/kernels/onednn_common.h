// What the oneDNN handlers (onednn_conv.cc, onednn_norm.cc) share.
#ifndef ARCH_KERNELS_ONEDNN_COMMON_H_
#define ARCH_KERNELS_ONEDNN_COMMON_H_

#include <cstdlib>
#include <exception>
#include <new>
#include <string>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace arch_onednn {

inline const dnnl::engine& Engine() {
  static const dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// A 64-byte aligned buffer, kept per thread and grown on demand: scratchpads and
// reordered kernels are needed on every call, and fresh pages cost more than the
// small convolutions of the 8x8 digits.
struct Buffer {
  void* data = nullptr;
  size_t size = 0;
  ~Buffer() { std::free(data); }
  void* Get(size_t bytes) {
    if (bytes > size) {
      std::free(data);
      size = (bytes + 4095) / 4096 * 4096;
      data = std::aligned_alloc(64, size);
      if (!data) throw std::bad_alloc();
    }
    return data;
  }
};

// A user-managed scratchpad, so concurrent calls never share oneDNN's.
inline dnnl::primitive_attr UserScratchpad() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

// An f32 NHWC image; `nchw` gives its sizes in oneDNN's logical order.
inline dnnl::memory::desc Nhwc(const dnnl::memory::dims& nchw) {
  return {nchw, dnnl::memory::data_type::f32, dnnl::memory::format_tag::nhwc};
}

// `body()`, with oneDNN's (or the allocator's) exceptions turned into an FFI
// error named by `prefix`: an exception must not cross into XLA.
template <typename Body>
xla::ffi::Error Guarded(const char* prefix, Body body) {
  try {
    return body();
  } catch (const std::exception& e) {
    return xla::ffi::Error::Internal(std::string(prefix) + e.what());
  }
}

}  // namespace arch_onednn

#endif  // ARCH_KERNELS_ONEDNN_COMMON_H_
