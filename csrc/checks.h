// The argument checks of the ops, shared by the CPU and CUDA kernels, so that a call through
// torch.ops.dirfast gets the same errors (each naming the argument) on every device. The Python
// front end (dirfast/ops) makes the same checks first, with Python's exception types.
#pragma once

#include <cmath>
#include <limits>
#include <string>
#include <string_view>
#include <tuple>
#include <utility>

#include "dirfast.h"
#include "smooth.h"

namespace dirfast {

inline void check_float(const Tensor& t, const char* name, const char* op) {
  STD_TORCH_CHECK(is_float(t.scalar_type()), op, ": ", name,
                  " must be float16, bfloat16, float32 or float64, got ", dtype_name(t.scalar_type()));
}

inline void check_device_type(const Tensor& t, const char* name, const char* op,
                              torch::headeronly::DeviceType device_type) {
  STD_TORCH_CHECK(t.device().type() == device_type, op, ": ", name, " must be a ",
                  device_type == torch::headeronly::DeviceType::CPU ? "CPU" : "CUDA",
                  " tensor, got one on ", device_of(t));
}

inline void check_same_device(const Tensor& t, const char* name, const Tensor& ref,
                              const char* ref_name, const char* op) {
  STD_TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " must be on the device of ",
                  ref_name, " (", device_of(ref), "), got one on ", device_of(t));
}

// x [N, D] or [B, C, *spatial] of a floating dtype on `device_type`, and bin_idx (int64 or
// int32) with one index per row: [N] or [B, *spatial].
inline void check_features_and_bins(const Tensor& x, const Tensor& bin_idx, const char* op,
                                    torch::headeronly::DeviceType device_type) {
  check_device_type(x, "x", op, device_type);
  check_same_device(bin_idx, "bin_idx", x, "x", op);
  check_float(x, "x", op);
  STD_TORCH_CHECK(x.dim() >= 2, op, ": x must be [N, D] or [B, C, *spatial], got shape ",
                  shape_of(x));
  STD_TORCH_CHECK(
      bin_idx.scalar_type() == ScalarType::Long || bin_idx.scalar_type() == ScalarType::Int, op,
      ": bin_idx must be int64 or int32, got ", dtype_name(bin_idx.scalar_type()));
  bool match = bin_idx.dim() == x.dim() - 1 && bin_idx.size(0) == x.size(0);
  for (int64_t d = 2; match && d < x.dim(); ++d) match = bin_idx.size(d - 1) == x.size(d);
  STD_TORCH_CHECK(match, op, ": bin_idx must have the shape of x without dim 1 (x has shape ",
                  shape_of(x), ": one index per row, features along dim 1), got ",
                  shape_of(bin_idx));
}

// bin_stats' outputs, like x: count [num_bins] int64, mean and var [num_bins, D] in acc. A num_bins
// beyond the index range, or too large for memory, is named in the error.
inline std::tuple<Tensor, Tensor, Tensor> bin_stats_outputs(const Tensor& x, int64_t num_bins, ScalarType acc,
                                                            const char* op) {
  STD_TORCH_CHECK(num_bins >= 1 && num_bins < (int64_t(1) << 31) - 1, op,
                  ": num_bins must be in [1, 2^31 - 2], got ", num_bins);
  try {
    return {empty({num_bins}, ScalarType::Long, x), empty({num_bins, x.size(1)}, acc, x),
            empty({num_bins, x.size(1)}, acc, x)};
  } catch (const std::exception& e) {
    STD_TORCH_CHECK(false, op, ": num_bins = ", num_bins, " is too many for memory: ", e.what());
  }
}

// calibrate's statistics: src_mean, src_var, dst_mean, dst_var, each [B, D] of a floating dtype
// on the device of x, D = x.shape[1]; and its clips.
inline void check_calibrate_args(const Tensor& x, const Tensor& bin_idx, const Tensor& src_mean,
                                 const Tensor& src_var, const Tensor& dst_mean,
                                 const Tensor& dst_var, double clip_min, double clip_max,
                                 const char* op, torch::headeronly::DeviceType device_type) {
  check_features_and_bins(x, bin_idx, op, device_type);
  STD_TORCH_CHECK(src_mean.dim() == 2 && src_mean.size(1) == x.size(1), op,
                  ": src_mean must be [B, D] with D = ", x.size(1), " (x.shape[1]), got shape ",
                  shape_of(src_mean));
  STD_TORCH_CHECK(src_mean.size(0) >= 1 && src_mean.size(0) < (int64_t(1) << 31) - 1, op,
                  ": src_mean must have between 1 and 2^31 - 2 bins, got ", src_mean.size(0));
  const char* names[] = {"src_mean", "src_var", "dst_mean", "dst_var"};
  const Tensor* tables[] = {&src_mean, &src_var, &dst_mean, &dst_var};
  for (int i = 0; i < 4; ++i) {
    check_same_device(*tables[i], names[i], x, "x", op);
    check_float(*tables[i], names[i], op);
    STD_TORCH_CHECK(tables[i]->dim() == 2 && tables[i]->size(0) == src_mean.size(0) &&
                        tables[i]->size(1) == src_mean.size(1),
                    op, ": ", names[i], " must have shape ", shape_of(src_mean),
                    " (that of src_mean), got ", shape_of(*tables[i]));
  }
  STD_TORCH_CHECK(clip_min >= 0 && clip_min <= clip_max, op,
                  ": clip_min and clip_max must satisfy 0 <= clip_min <= clip_max, got ",
                  clip_min, " and ", clip_max);
  // The ratio is clamped in float32 for float32 x: a bound beyond its range would be inf there
  // (clip_max = inf is no upper clamp; an infinite clip_min makes every s inf).
  constexpr double float32_max = std::numeric_limits<float>::max();
  STD_TORCH_CHECK(clip_min <= float32_max && (clip_max <= float32_max || std::isinf(clip_max)), op,
                  ": clip_min and clip_max must be at most ", float32_max, " (float32), clip_max may be inf; got ",
                  clip_min, " and ", clip_max);
}

// calibrate_ writes every element of x once: an expanded x (elements sharing memory) cannot be.
inline void check_writable_in_place(const Tensor& x, const char* op) {
  STD_TORCH_CHECK(!has_internal_overlap(x), op,
                  ": x has elements that share memory (an expanded tensor); calibrate it out of "
                  "place");
}

// Whether the memory spans of two tensors (from their first to their last element) overlap.
inline bool spans_overlap(const Tensor& a, const Tensor& b) {
  auto span = [](const Tensor& t) {
    int64_t last = 0;
    for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
    const char* first = static_cast<const char*>(t.data_ptr());
    return std::pair<const char*, const char*>{first, first + (last + 1) * static_cast<int64_t>(t.element_size())};
  };
  if (a.numel() == 0 || b.numel() == 0) return false;
  const auto [a0, a1] = span(a);
  const auto [b0, b1] = span(b);
  return a0 < b1 && b0 < a1;
}

// accumulate_bin_stats_: count [B] float64, mean and m2 [B, D] of one dtype (float32 or float64),
// D = x.shape[1], all on the device of x, each writable and apart from the others; and x against
// bin_idx as bin_stats takes them.
inline void check_accumulate_args(const Tensor& count, const Tensor& mean, const Tensor& m2, const Tensor& x,
                                  const Tensor& bin_idx, const char* op, torch::headeronly::DeviceType device_type) {
  check_features_and_bins(x, bin_idx, op, device_type);
  STD_TORCH_CHECK(count.scalar_type() == ScalarType::Double, op, ": count must be torch.float64, got ",
                  dtype_name(count.scalar_type()));
  STD_TORCH_CHECK(count.dim() == 1 && count.size(0) >= 1 && count.size(0) < (int64_t(1) << 31) - 1, op,
                  ": count must be [B] with between 1 and 2^31 - 2 bins, got shape ", shape_of(count));
  const char* names[] = {"count", "mean", "m2"};
  const Tensor* tables[] = {&count, &mean, &m2};
  for (int i = 0; i < 3; ++i) {
    check_same_device(*tables[i], names[i], x, "x", op);
    STD_TORCH_CHECK(!has_internal_overlap(*tables[i]), op, ": ", names[i],
                    " has elements that share memory (an expanded tensor): it cannot be written in place");
  }
  for (int i = 1; i < 3; ++i) {
    STD_TORCH_CHECK(tables[i]->scalar_type() == ScalarType::Float || tables[i]->scalar_type() == ScalarType::Double,
                    op, ": ", names[i], " must be torch.float32 or torch.float64, got ",
                    dtype_name(tables[i]->scalar_type()));
    STD_TORCH_CHECK(tables[i]->dim() == 2 && tables[i]->size(0) == count.size(0) && tables[i]->size(1) == x.size(1),
                    op, ": ", names[i], " must be [B, D] = [", count.size(0), ", ", x.size(1),
                    "] (B from count, D = x.shape[1]), got shape ", shape_of(*tables[i]));
  }
  STD_TORCH_CHECK(m2.scalar_type() == mean.scalar_type(), op, ": m2 must have the dtype of mean (",
                  dtype_name(mean.scalar_type()), "), got ", dtype_name(m2.scalar_type()));
  for (int i = 0; i < 3; ++i) {
    for (int j = i + 1; j < 3; ++j) {
      STD_TORCH_CHECK(!spans_overlap(*tables[i], *tables[j]), op, ": ", names[i], " and ", names[j],
                      " share memory: each must be a tensor of its own");
    }
  }
}

// smooth_bins: stats [B] or [B, D] with B >= 1, an odd 1-D window, both floating, one device.
inline void check_smooth_bins_args(const Tensor& stats, const Tensor& window, const char* op,
                                   torch::headeronly::DeviceType device_type) {
  check_device_type(stats, "stats", op, device_type);
  check_same_device(window, "window", stats, "stats", op);
  check_float(stats, "stats", op);
  check_float(window, "window", op);
  STD_TORCH_CHECK((stats.dim() == 1 || stats.dim() == 2) && stats.size(0) >= 1, op,
                  ": stats must be [B] or [B, D] with B >= 1, got shape ", shape_of(stats));
  STD_TORCH_CHECK(window.dim() == 1 && window.size(0) % 2 == 1, op,
                  ": window must be 1-D with an odd length, got shape ", shape_of(window));
}

// The padding argument of smooth_bins as a mode of src/smooth.h.
inline Padding parse_padding(std::string_view padding, const char* op) {
  std::string known;
  for (int i = 0; i < kNumPaddings; ++i) {
    if (padding == kPaddingNames[i]) return static_cast<Padding>(i);
    known += (i ? ", '" : "'") + std::string(kPaddingNames[i]) + "'";
  }
  STD_TORCH_CHECK(false, op, ": padding must be one of ", known, ", got '", std::string(padding), "'");
  return Padding::kReflect;
}

// mixture_logpdf: x of a floating dtype on `device_type`; means, variances, log_weights 1-D of
// one length K >= 1, floating, on the device of x.
inline void check_mixture_args(const Tensor& x, const Tensor& means, const Tensor& variances,
                               const Tensor& log_weights, const char* op,
                               torch::headeronly::DeviceType device_type) {
  check_device_type(x, "x", op, device_type);
  check_float(x, "x", op);
  STD_TORCH_CHECK(means.dim() == 1 && means.numel() >= 1, op,
                  ": means must be 1-D with at least one component, got shape ", shape_of(means));
  const char* names[] = {"means", "variances", "log_weights"};
  const Tensor* tables[] = {&means, &variances, &log_weights};
  for (int i = 0; i < 3; ++i) {
    check_same_device(*tables[i], names[i], x, "x", op);
    check_float(*tables[i], names[i], op);
    STD_TORCH_CHECK(tables[i]->dim() == 1 && tables[i]->size(0) == means.size(0), op, ": ",
                    names[i], " must have shape ", shape_of(means), " (that of means), got ",
                    shape_of(*tables[i]));
  }
}

}  // namespace dirfast
