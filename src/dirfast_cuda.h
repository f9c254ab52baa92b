// The C interface of the CUDA kernels (src/*.cu): plain functions on raw device pointers, sizes
// and a cudaStream_t, with no torch type anywhere. The torch glue (csrc/cuda/*.cpp) checks the
// tensors, allocates outputs and scratch with the caching allocator, takes the current stream,
// and calls these. Every launcher only enqueues work on `stream` (no host synchronisation, no
// allocation), so the calls can be captured in a CUDA graph; each returns the launch status.
// bin_idx is contiguous, one index per row; rows whose index is outside [0, num_bins) select no
// bucket (bin_stats ignores them, calibrate leaves them unchanged).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#ifdef __cplusplus
extern "C" {
#endif

// Element types of features and statistics.
enum DirfastDtype { DIRFAST_FLOAT32 = 0, DIRFAST_FLOAT64 = 1, DIRFAST_FLOAT16 = 2, DIRFAST_BFLOAT16 = 3 };

// A feature tensor is described by strides, as in the CPU layout (csrc/layout.h): row r (a
// sample of [N, D], or a pixel of [P, C, *spatial]) is p = r / inner, s = r % inner, and its
// feature f sits at  p * stride_p + s * stride_s + f * stride_f  (elements). Two cases are fast:
//   stride_f == 1  rows of features ([N, D] row-major, channels-last), inner == rows;
//   stride_s == 1  planes of pixels (contiguous [P, C, *spatial]; column-major [N, D]).
typedef struct DirfastFeatures {
  const void* data;  // x (read only)
  int dtype;         // DirfastDtype
  int64_t rows;
  int64_t inner;
  int64_t dim;
  int64_t stride_p;
  int64_t stride_s;
  int64_t stride_f;
} DirfastFeatures;

// Where an op writes features shaped like its input (strides in elements, as above).
typedef struct DirfastOutput {
  void* data;
  int64_t stride_p;
  int64_t stride_s;
  int64_t stride_f;
} DirfastOutput;

typedef struct DirfastBins {
  const void* data;   // contiguous, one per row
  int is_int64;       // int64 when nonzero, else int32
  int64_t num_bins;   // B
} DirfastBins;

// ---------------------------------------------------------------------------------- bin_stats
// Per-bucket count (int64 [B]), mean and unbiased variance ([B, D], float32 for float16 /
// bfloat16 / float32 x, float64 for float64 x: the accumulation type). Shifted sums with float
// atomics; `workspace` holds dirfast_cuda_bin_stats_workspace() bytes (any content, 256-byte
// aligned); `num_sms` sizes the grid.
size_t dirfast_cuda_bin_stats_workspace(DirfastFeatures x, DirfastBins bins);
cudaError_t dirfast_cuda_bin_stats(DirfastFeatures x, DirfastBins bins, int64_t* count, void* mean,
                                   void* var, void* workspace, int num_sms, cudaStream_t stream);

// The deterministic variant, with no float atomics: `perm` lists the rows grouped by bucket
// (a stable sort of the indices, rows outside [0, B) last) and `offsets` (int64 [B + 1]) where
// each bucket's rows start in it. Each (bucket, feature) is one thread's pass over its rows in
// that order (the shifted sums above): the same bits on every run. Writes mean and var only.
cudaError_t dirfast_cuda_bin_stats_sorted(DirfastFeatures x, int64_t num_bins, const int64_t* perm,
                                          const int64_t* offsets, void* mean, void* var,
                                          cudaStream_t stream);

// ---------------------------------------------------------------------------------- calibrate
// y = x * s[b] + t[b] (src/calibrate.h); y is laid out like x (the same fast case, its own
// strides) and may be x itself (in place). The statistics the rows are whitened with (src_mean,
// src_var) and re-coloured with (dst_mean, dst_var) are contiguous [B, D] of `acc_dtype` (float32
// or float64), the arithmetic type. `workspace` holds dirfast_cuda_calibrate_workspace() bytes.
size_t dirfast_cuda_calibrate_workspace(DirfastFeatures x, DirfastBins bins, int acc_dtype);
cudaError_t dirfast_cuda_calibrate(DirfastFeatures x, DirfastOutput y, DirfastBins bins,
                                   const void* src_mean, const void* src_var, const void* dst_mean,
                                   const void* dst_var, int acc_dtype, double clip_min,
                                   double clip_max, void* workspace, int num_sms,
                                   cudaStream_t stream);

// -------------------------------------------------------------------------------- smooth_bins
// out[b, c] = sum_k w[k] stats[b + k - h, c] (src/smooth.h) for contiguous [B, columns] stats
// and out of `dtype`; `window` holds the ks taps in `dtype`, `window64` the same in float64
// (scipy's symmetry test); padding 0 reflect, 1 replicate, 2 constant, 3 symmetric.
cudaError_t dirfast_cuda_smooth_bins(const void* stats, void* out, int dtype, int64_t num_bins,
                                     int64_t columns, const void* window, const double* window64,
                                     int64_t ks, int padding, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
