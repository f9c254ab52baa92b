// What the CUDA glue files (csrc/cuda/<op>.cpp) share: the current stream, the SM count, and the
// translation of tensors into the C descriptors of src/dirfast_cuda.h.
//
// This code is compiled by the host compiler against the torch headers only: it takes the
// stream through c10's device-generic interface (c10::Stream::native_handle), not through
// ATen/cuda, so dirfast._C links against libc10 / libtorch_cpu alone and imports on a machine
// with a CPU-only torch (where the CUDA kernels are compiled but never called).
#pragma once

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include <mutex>
#include <vector>

#include "dirfast_cuda.h"
#include "layout.h"

namespace dirfast {
namespace cuda {

// The stream torch would launch on for `device` (what at::cuda::getCurrentCUDAStream gives).
inline cudaStream_t current_stream(const at::Device& device) {
  const c10::Stream stream =
      c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(device);
  return static_cast<cudaStream_t>(stream.native_handle());
}

// Streaming multiprocessors of `device`, asked once per device.
inline int sm_count(const at::Device& device) {
  static std::mutex mutex;
  static std::vector<int> counts;
  const int index = device.index();
  std::lock_guard<std::mutex> lock(mutex);
  if (index >= static_cast<int>(counts.size())) counts.resize(index + 1, 0);
  if (counts[index] == 0) {
    int value = 0;
    cudaDeviceGetAttribute(&value, cudaDevAttrMultiProcessorCount, index);
    counts[index] = value > 0 ? value : 1;
  }
  return counts[index];
}

inline int dtype_code(at::ScalarType type) {
  switch (type) {
    case at::kFloat: return DIRFAST_FLOAT32;
    case at::kDouble: return DIRFAST_FLOAT64;
    case at::kHalf: return DIRFAST_FLOAT16;
    case at::kBFloat16: return DIRFAST_BFLOAT16;
    default: TORCH_CHECK(false, "dirfast: unsupported dtype ", type);
  }
}

// The C descriptor of x read in `layout` (kRows or kPlanar, csrc/layout.h).
inline DirfastFeatures features(const at::Tensor& x, const Layout& layout) {
  DirfastFeatures f;
  f.data = x.data_ptr();
  f.dtype = dtype_code(x.scalar_type());
  f.rows = layout.rows;
  f.dim = layout.dim;
  if (layout.kind == Layout::kRows) {
    f.inner = layout.rows;
    f.stride_p = 0;
    f.stride_s = layout.row_stride;
    f.stride_f = 1;
  } else {
    f.inner = layout.inner;
    f.stride_p = layout.batch_stride;
    f.stride_s = 1;
    f.stride_f = layout.feature_stride;
  }
  return f;
}

inline DirfastOutput output(at::Tensor& y, const Layout& layout) {
  const DirfastFeatures f = features(y, layout);
  return DirfastOutput{y.data_ptr(), f.stride_p, f.stride_s, f.stride_f};
}

inline DirfastBins bins(const at::Tensor& idx, int64_t num_bins) {
  return DirfastBins{idx.data_ptr(), idx.scalar_type() == at::kLong ? 1 : 0, num_bins};
}

inline void check_launch(cudaError_t status, const char* op) {
  TORCH_CHECK(status == cudaSuccess, op, ": CUDA kernel launch failed: ",
              cudaGetErrorString(status));
}

}  // namespace cuda
}  // namespace dirfast
