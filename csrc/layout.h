// The one C++ model of how the kernels walk a feature tensor x of shape [N, D] or
// [B, C, *spatial] in place, on CPU and on CUDA.
//
// A "row" is one sample: a row of [N, D], or one pixel (b, *spatial) of a dense tensor. Rows are
// numbered in the C order of bin_idx ([N] or [B, *spatial]). Two memory layouts are read and
// written without a copy; anything else (e.g. a tensor sliced along its last axis) is copied once
// by the kernel, the only copy of x any kernel makes (besides calibrate's out-of-place copy of x
// into its output when it visits the rows bucket by bucket).
#pragma once

#include <vector>

#include "dirfast.h"

namespace dirfast {

// The layout a kernel reads a tensor in (kNone: neither, copied first):
//   kRows    element (r, d) at r * row_stride + d: [N, D] row-major (row_stride may exceed D),
//            channels-last dense tensors, any D == 1 tensor whose rows collapse to one stride;
//   kPlanar  element (b, c, s) at b * batch_stride + c * feature_stride + s, where s runs over the
//            flattened spatial positions with unit stride: contiguous [B, C, *spatial] (each
//            channel plane read along the spatial axis), and column-major [N, D] (viewed as
//            [1, D, N]).
struct Layout {
  enum Kind { kNone, kRows, kPlanar };
  Kind kind = kNone;
  int64_t rows = 0;            // N, or B * prod(spatial)
  int64_t dim = 0;             // D (features along dim 1)
  int64_t row_stride = 0;      // kRows
  int64_t batch = 0;           // kPlanar: B (1 for a column-major [N, D])
  int64_t inner = 0;           // kPlanar: positions per batch item (prod(spatial), or N)
  int64_t batch_stride = 0;    // kPlanar
  int64_t feature_stride = 0;  // kPlanar
};

// Whether the dims `order` (outermost first) of t collapse into one dimension, ignoring dims of
// size 1; `stride` gets the stride of the collapsed dimension (`fallback` when all have size 1).
inline bool collapse(const Tensor& t, const std::vector<int64_t>& order, int64_t fallback,
                     int64_t* stride) {
  std::vector<int64_t> kept;
  for (int64_t d : order) {
    if (t.size(d) != 1) kept.push_back(d);
  }
  if (kept.empty()) {
    *stride = fallback;
    return true;
  }
  for (size_t i = 0; i + 1 < kept.size(); ++i) {
    if (t.stride(kept[i]) != t.stride(kept[i + 1]) * t.size(kept[i + 1])) return false;
  }
  *stride = t.stride(kept.back());
  return true;
}

// The layout of t, or kNone when it is neither (then the caller makes it contiguous).
inline Layout classify(const Tensor& t) {
  Layout layout;
  const int64_t n = t.dim();
  layout.dim = t.size(1);
  int64_t spatial = 1;
  for (int64_t d = 2; d < n; ++d) spatial *= t.size(d);
  layout.rows = t.size(0) * spatial;

  std::vector<int64_t> row_dims{0};
  for (int64_t d = 2; d < n; ++d) row_dims.push_back(d);
  int64_t stride = 0;
  if ((layout.dim <= 1 || t.stride(1) == 1) && collapse(t, row_dims, layout.dim, &stride)) {
    layout.kind = Layout::kRows;
    layout.row_stride = stride;
    return layout;
  }
  if (n == 2) {
    if (t.size(0) <= 1 || t.stride(0) == 1) {  // column-major [N, D]: [1, D, N]
      layout.kind = Layout::kPlanar;
      layout.batch = 1;
      layout.inner = t.size(0);
      layout.batch_stride = 0;
      layout.feature_stride = t.stride(1);
    }
    return layout;
  }
  std::vector<int64_t> spatial_dims;
  for (int64_t d = 2; d < n; ++d) spatial_dims.push_back(d);
  if (collapse(t, spatial_dims, 1, &stride) && stride == 1) {
    layout.kind = Layout::kPlanar;
    layout.batch = t.size(0);
    layout.inner = spatial;
    layout.batch_stride = t.stride(0);
    layout.feature_stride = t.stride(1);
  }
  return layout;
}

// A tensor with the values of x in a layout of the given kind (x itself when it already is).
inline Tensor in_layout(const Tensor& x, Layout::Kind kind) {
  if (classify(x).kind == kind) return x;
  if (kind == Layout::kRows) {
    return movedim(torch::stable::contiguous(movedim(x, 1, -1)), -1, 1);
  }
  return torch::stable::contiguous(x);
}

// The layout x is read in: its own when it has one, else that of a contiguous copy.
inline Tensor readable(const Tensor& x) {
  return classify(x).kind == Layout::kNone ? torch::stable::contiguous(x) : x;
}

// What an elementwise kernel reads and where it writes, for x and an output y shaped like it (y
// may be x): y itself when it has a layout the kernels walk and x can be read in the same kind of
// layout (x as it is, or copied once); otherwise a fresh contiguous output, which the caller
// copies into y afterwards (`out` is then not y).
struct InOut {
  Tensor x, out;
  Layout lx, ly;
};

inline InOut plan_in_out(const Tensor& x, const Tensor& y) {
  InOut plan{x, y, {}, classify(y)};
  if (plan.ly.kind != Layout::kNone) plan.x = in_layout(x, plan.ly.kind);
  if (plan.ly.kind == Layout::kNone || classify(plan.x).kind != plan.ly.kind) {  // odd strides
    plan.out = empty_sized_like(x, x.scalar_type());
    plan.ly = classify(plan.out);
    plan.x = torch::stable::contiguous(x);
  }
  plan.lx = classify(plan.x);
  STD_TORCH_CHECK(plan.lx.kind == plan.ly.kind && plan.lx.kind != Layout::kNone,
                  "dirfast: internal error: no common layout for x and its output");
  return plan;
}

// The rows listed bucket by bucket, in row order within a bucket (the placing pass of a stable
// counting sort): row r goes to order[start[k] ...] for its bucket k = bucket_of(r), given each
// bucket's first position start[k] (its counts' prefix sum); a row of bucket -1 is left out.
template <typename BucketOf>
inline void list_rows_by_bucket(int64_t rows, const int64_t* start, int64_t buckets, BucketOf&& bucket_of,
                                int64_t* order) {
  std::vector<int64_t> next(start, start + buckets);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t k = bucket_of(r);
    if (k >= 0) order[next[k]++] = r;
  }
}

}  // namespace dirfast
