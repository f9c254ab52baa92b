// dirfast::integer_bins on CPU: int(label * scale) clamped into [first, num_bins), counted from
// first, -1 for a NaN or infinite label, in one pass (the reference takes six torch ops, each a
// pass over the labels and most a fresh tensor).
//
// The same arithmetic as the reference, in float32 (float64 for float64 labels): the product
// rounds there (scale rounded to that dtype first, as torch's scalar multiply does), is clamped to
// [first, num_bins - 1] (below 2^24), then floored; elementwise, so the same bits for any thread
// count.
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "checks.h"
#include "parallel.h"

namespace dirfast {
namespace cpu {
namespace {

constexpr const char* kOp = "dirfast::integer_bins";
constexpr int64_t kGrainLabels = int64_t(1) << 16;  // the least labels a thread is given
constexpr int64_t kMaxBins = int64_t(1) << 24;     // MAX_BINS of dirfast/ops/integer_bins.py: exact in float32

// bins[i] of labels [begin, end): clamp(label * scale) into [lo, hi] (NaN to lo, unused), then
// truncated, counted from `first`; -1 where the label is NaN or infinite (label - label is not 0).
// It vectorises in both clones: no floor call, the clamped values being at least first >= 0,
// where the truncating conversion floors.
template <typename T, typename acc_t>
__attribute__((always_inline))
inline void bin_labels_body(const T* DIRFAST_RESTRICT labels, int64_t* DIRFAST_RESTRICT bins, int64_t begin,
                            int64_t end, acc_t scale, bool scaled, acc_t lo, acc_t hi, int64_t first) {
  for (int64_t i = begin; i < end; ++i) {
    const acc_t value = static_cast<acc_t>(labels[i]);
    const acc_t product = scaled ? value * scale : value;
    const acc_t clamped = product >= lo ? (product <= hi ? product : hi) : lo;
    const int64_t bin = static_cast<int64_t>(static_cast<int32_t>(clamped)) - first;
    bins[i] = value - value == acc_t(0) ? bin : int64_t(-1);
  }
}

#define DIRFAST_BIN_LABELS(T, acc_t)                                                                  \
  DIRFAST_V3_CLONES DIRFAST_NOINLINE void bin_labels(const T* labels, int64_t* bins, int64_t begin,   \
                                                     int64_t end, acc_t scale, bool scaled, acc_t lo, \
                                                     acc_t hi, int64_t first) {                       \
    bin_labels_body<T, acc_t>(labels, bins, begin, end, scale, scaled, lo, hi, first);                \
  }
DIRFAST_BIN_LABELS(float, float)
DIRFAST_BIN_LABELS(double, double)
DIRFAST_BIN_LABELS(c10::Half, float)
DIRFAST_BIN_LABELS(c10::BFloat16, float)
#undef DIRFAST_BIN_LABELS

Tensor integer_bins_cpu(const Tensor& labels, int64_t num_bins, double scale, int64_t first) {
  check_device_type(labels, "labels", kOp, torch::headeronly::DeviceType::CPU);
  check_float(labels, "labels", kOp);
  STD_TORCH_CHECK(num_bins >= 1 && num_bins <= kMaxBins, kOp, ": num_bins must be in [1, 2^24], got ", num_bins);
  STD_TORCH_CHECK(first >= 0 && first < num_bins, kOp, ": first must be in [0, num_bins), got ", first);
  STD_TORCH_CHECK(std::isfinite(scale) && scale > 0, kOp, ": scale must be a finite number > 0, got ", scale);
  Tensor bins = empty_sized_like(labels, ScalarType::Long);  // contiguous, as the fake kernel's
  if (labels.numel() == 0) return bins;
  const Tensor src = made_contiguous(labels);
  dispatch_float(labels.scalar_type(), kOp, [&](auto scalar) {
    using T = decltype(scalar);
    using acc_t = opmath_t<T>;
    const T* in = src.const_data_ptr<T>();
    int64_t* out = bins.mutable_data_ptr<int64_t>();
    parallel_for_ranges(labels.numel(), kGrainLabels, [&](int64_t begin, int64_t end) {
      bin_labels(in, out, begin, end, static_cast<acc_t>(scale), scale != 1.0, static_cast<acc_t>(first),
                 static_cast<acc_t>(num_bins - 1), first);
    });
  });
  return bins;
}

}  // namespace
}  // namespace cpu
}  // namespace dirfast

STABLE_TORCH_LIBRARY_IMPL(dirfast, CPU, m) {
  m.impl("integer_bins", TORCH_BOX(&dirfast::cpu::integer_bins_cpu));
}
