// The argument checks of the ops, shared by the CPU kernels and the CUDA glue, so every backend
// rejects the same inputs with the same messages (each names the argument): the dtypes, shapes
// and devices of x, bin_idx, the calibrate tables, stats and window; the padding names; and the
// in-place calibrate's refusal of an x whose elements share memory.
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include "dirfast_schemas.h"

#include <limits>
#include <string>
#include <utility>
#include <vector>

namespace dirfast {

// The floating dtypes the ops take.
inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// The checks every op makes of its tensors, each naming the tensor (`name`) in its message: t on
// `device_type`; t on the device of `ref`; t of a floating dtype the ops take.
inline void check_device_type(const at::Tensor& t, const char* name, const char* op,
                              c10::DeviceType device_type) {
  TORCH_CHECK(t.device().type() == device_type, op, ": ", name, " must be a ",
              c10::DeviceTypeName(device_type), " tensor, got one on ", t.device());
}

inline void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& ref,
                              const char* ref_name, const char* op) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " must be on the device of ", ref_name,
              " (", ref.device(), "), got one on ", t.device());
}

inline void check_float(const at::Tensor& t, const char* name, const char* op) {
  TORCH_CHECK(is_supported_float(t.scalar_type()), op, ": ", name,
              " must be float16, bfloat16, float32 or float64, got ", t.scalar_type());
}

// The argument checks of an op on (x, bin_idx), named in the messages; both on `device_type`
// (and on one device).
inline void check_features_and_bins(const at::Tensor& x, const at::Tensor& bin_idx,
                                    const char* op,
                                    c10::DeviceType device_type = c10::DeviceType::CPU) {
  check_device_type(x, "x", op, device_type);
  check_same_device(bin_idx, "bin_idx", x, "x", op);
  check_float(x, "x", op);
  TORCH_CHECK(x.dim() >= 2, op, ": x must be [N, D] or [B, C, *spatial], got shape ", x.sizes());
  TORCH_CHECK(bin_idx.scalar_type() == at::kLong || bin_idx.scalar_type() == at::kInt, op,
              ": bin_idx must be int64 or int32, got ", bin_idx.scalar_type());
  std::vector<int64_t> expected{x.size(0)};
  for (int64_t d = 2; d < x.dim(); ++d) expected.push_back(x.size(d));
  TORCH_CHECK(bin_idx.sizes() == at::IntArrayRef(expected), op, ": bin_idx must have shape ",
              at::IntArrayRef(expected), " to match x of shape ", x.sizes(),
              " (one index per row, features along dim 1), got ", bin_idx.sizes());
}

// The arguments of calibrate / calibrate_: the tables src_mean, src_var, dst_mean, dst_var are
// [B, D] on the device of x.
inline void check_calibrate_args(const at::Tensor& x, const at::Tensor& bin_idx,
                                 const at::Tensor& src_mean, const at::Tensor& src_var,
                                 const at::Tensor& dst_mean, const at::Tensor& dst_var,
                                 double clip_min, double clip_max, const char* op,
                                 c10::DeviceType device_type) {
  check_features_and_bins(x, bin_idx, op, device_type);
  const int64_t dim = x.size(1);
  TORCH_CHECK(src_mean.dim() == 2 && src_mean.size(1) == dim, op,
              ": src_mean must be [B, D] with D = ", dim, " (x.shape[1]), got shape ",
              src_mean.sizes());
  TORCH_CHECK(src_mean.size(0) < std::numeric_limits<int32_t>::max(), op,
              ": src_mean must have fewer than 2^31 - 1 bins, got ", src_mean.size(0));
  const std::pair<const char*, const at::Tensor*> tables[] = {
      {"src_mean", &src_mean}, {"src_var", &src_var},
      {"dst_mean", &dst_mean}, {"dst_var", &dst_var}};
  for (const auto& entry : tables) {
    const at::Tensor& table = *entry.second;
    check_same_device(table, entry.first, x, "x", op);
    check_float(table, entry.first, op);
    TORCH_CHECK(table.sizes() == src_mean.sizes(), op, ": ", entry.first, " must have shape ",
                src_mean.sizes(), " (that of src_mean), got ", table.sizes());
  }
  TORCH_CHECK(clip_min >= 0 && clip_min <= clip_max, op,
              ": clip_min and clip_max must satisfy 0 <= clip_min <= clip_max, got ", clip_min,
              " and ", clip_max);
}

// The arguments of smooth_bins: stats [B] or [B, D], an odd 1-D window, on one device.
inline void check_smooth_bins_args(const at::Tensor& stats, const at::Tensor& window,
                                   const char* op, c10::DeviceType device_type) {
  check_device_type(stats, "stats", op, device_type);
  check_same_device(window, "window", stats, "stats", op);
  check_float(stats, "stats", op);
  check_float(window, "window", op);
  TORCH_CHECK((stats.dim() == 1 || stats.dim() == 2) && stats.size(0) >= 1, op,
              ": stats must be [B] or [B, D] with B >= 1, got shape ", stats.sizes());
  TORCH_CHECK(window.dim() == 1 && window.size(0) % 2 == 1, op,
              ": window must be 1-D with an odd length, got shape ", window.sizes());
}

// The padding argument of smooth_bins, as the value of dirfast::Padding (src/smooth.h): its index
// in kPaddings (generated from dirfast/_schema.py).
inline int parse_padding(c10::string_view padding, const char* op) {
  const std::string name(padding.data(), padding.size());
  std::string known;
  for (size_t i = 0; i < sizeof(kPaddings) / sizeof(kPaddings[0]); ++i) {
    if (name == kPaddings[i]) return static_cast<int>(i);
    known += (i ? ", '" : "'") + std::string(kPaddings[i]) + "'";
  }
  TORCH_CHECK(false, op, ": padding must be one of ", known, ", got '", name, "'");
}

// calibrate_ writes every element of x once: an expanded x (elements sharing memory) cannot be.
inline void check_calibrate_inplace(const at::Tensor& x) {
  TORCH_CHECK(at::has_internal_overlap(x) != at::MemOverlap::Yes,
              "dirfast::calibrate_: x has elements that share memory (an expanded tensor); "
              "calibrate it out of place");
}

}  // namespace dirfast
