// dirfast::bin_stats on CUDA: per-bucket count, mean and unbiased variance, x read once.
//
// Shifted sums: each bucket k has a reference row K[k] (its first row); one pass accumulates
// S1 = sum(x - K) and S2 = sum((x - K)^2), then mean = K + S1 / n, var = (S2 - S1^2 / n) / (n - 1).
// The shift keeps float32's relative accuracy at mean/std = 1000, where sum(x^2) loses all of it,
// and costs a pass over bin_idx only. Launches, no host synchronisation: memset, hist (counts and
// first rows), reference (K), one accumulate pass (choose_pass below), finalize. Counts are exact
// integer atomics; the float atomics vary the last bits of mean and var from run to run, so
// launch_sorted is the deterministic variant (one thread per (bucket, feature)), which the op
// runs when its `deterministic` argument says so (torch.use_deterministic_algorithms).
#include <algorithm>
#include <tuple>
#include <type_traits>

#include "checks.h"
#include "common.cuh"
#include "welford.h"

namespace dirfast {
namespace cuda {
namespace {

using ull = unsigned long long;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kTile = 64;                 // features per block of the shared-memory kernel
constexpr int kUnroll = 8;                // rows in flight per warp
constexpr int64_t kHistSharedBins = 2048;  // buckets the histogram keeps in shared memory (32 KiB)
constexpr size_t kMaxShared = 112 * 1024;  // shared memory of the privatised kernel, at most
constexpr size_t kDefaultShared = 48 * 1024;  // what a block gets without opting in
constexpr int kSortedThreads = 128;

template <typename T>
using acc_of = typename std::conditional<std::is_same<T, double>::value, double, float>::type;

// Element (r, f) of the features.
struct Addressing {
  int64_t inner, stride_p, stride_s, stride_f;
  __device__ __forceinline__ int64_t operator()(int64_t r, int64_t f) const {
    const int64_t p = r / inner;
    return p * stride_p + (r - p * inner) * stride_s + f * stride_f;
  }
};

inline Addressing addressing(const Features& x) {
  return Addressing{x.inner > 0 ? x.inner : 1, x.stride_p, x.stride_s, x.stride_f};
}

// ------------------------------------------------------------------------------ histogram
// count[k] += rows of k; first[k] = max over rows of k of (rows - r): the first row, 0 for none.
// Each block counts its rows in shared memory, then adds one integer atomic per bucket it met
// (same-address atomics serialise).
template <typename index_t>
__global__ void hist_kernel(const index_t* __restrict__ idx, int64_t rows, int64_t num_bins,
                            ull* __restrict__ count, ull* __restrict__ first) {
  extern __shared__ ull hist_shared[];
  const bool shared = num_bins <= kHistSharedBins;
  ull* s_count = hist_shared;
  ull* s_first = hist_shared + num_bins;
  if (shared) {
    for (int64_t k = threadIdx.x; k < num_bins; k += blockDim.x) s_count[k] = s_first[k] = 0;
    __syncthreads();
  }
  for (int64_t r = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; r < rows;
       r += int64_t(gridDim.x) * blockDim.x) {
    const int64_t k = bucket_of(idx, r, num_bins, -1);
    if (k < 0) continue;
    if (shared) {
      atomicAdd(&s_count[k], ull(1));
      atomicMax(&s_first[k], ull(rows - r));
    } else {
      atomicAdd(&count[k], ull(1));
      atomicMax(&first[k], ull(rows - r));
    }
  }
  if (shared) {
    __syncthreads();
    for (int64_t k = threadIdx.x; k < num_bins; k += blockDim.x) {
      if (s_count[k] == 0) continue;
      atomicAdd(&count[k], s_count[k]);
      atomicMax(&first[k], s_first[k]);
    }
  }
}

// ------------------------------------------------------------------------------ reference
// K[k][f] = x[first row of k][f] (0 for an empty bucket). The two-pass algorithm
// (the reference, dirfast.ops.bin_stats) is as accurate but reads x twice; this reads bin_idx (8 bytes per row)
// and B rows of x.
template <typename T, typename acc_t>
__global__ void reference_kernel(const T* __restrict__ x, Addressing at, int64_t rows,
                                 int64_t num_bins, int64_t dim, const ull* __restrict__ first,
                                 acc_t* __restrict__ ref) {
  const int64_t total = num_bins * dim;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t k = i / dim;
    const ull code = first[k];
    ref[i] = code == 0 ? acc_t(0) : to_acc<acc_t>(x[at(rows - int64_t(code), i - k * dim)]);
  }
}

// ------------------------------------------------------------------------------ accumulate
// Privatised rows: a block owns a tile of 64 features and a chunk of rows, and keeps partial
// sums S1, S2 (and its tile of K) for every bucket in shared memory. A warp reads a row's 64
// features with one vector load per lane (kUnroll rows in flight), adds them to the row's bucket
// with shared-memory atomics, and at the end the block adds its partials to the global sums with
// one float atomic per (bucket met, feature): rows-per-chunk times fewer atomics than elements.
//
// Shared-memory slot of the tile's features: lane l owns features 2l and 2l + 1, stored in
// slots l and 32 + l, so a warp's 32 lanes touch 32 consecutive slots (no bank conflict).
__device__ __forceinline__ int feature_of_slot(int slot) { return (slot % 32) * 2 + slot / 32; }

template <typename T, typename acc_t, typename index_t, bool PAIR>
__global__ void __launch_bounds__(kThreads)
    accumulate_shared_kernel(const T* __restrict__ x, const index_t* __restrict__ idx,
                             int64_t rows, int64_t dim, int64_t row_stride, int64_t num_bins,
                             int64_t rows_per_block, const acc_t* __restrict__ ref,
                             acc_t* __restrict__ sums) {
  extern __shared__ __align__(16) unsigned char shared_raw[];
  acc_t* s1 = reinterpret_cast<acc_t*>(shared_raw);  // [B][64]
  acc_t* s2 = s1 + num_bins * kTile;                  // [B][64]
  acc_t* sk = s2 + num_bins * kTile;                  // [B][64]: K of the tile
  int* present = reinterpret_cast<int*>(sk + num_bins * kTile);  // [B]
  const int64_t f0 = int64_t(blockIdx.x) * kTile;
  for (int64_t e = threadIdx.x; e < num_bins * kTile; e += blockDim.x) {
    const int64_t k = e / kTile;
    const int64_t f = f0 + feature_of_slot(int(e - k * kTile));
    s1[e] = acc_t(0);
    s2[e] = acc_t(0);
    sk[e] = f < dim ? ref[k * dim + f] : acc_t(0);
  }
  for (int64_t k = threadIdx.x; k < num_bins; k += blockDim.x) present[k] = 0;
  __syncthreads();

  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int64_t fa = f0 + 2 * lane;  // this lane's features: fa and fa + 1
  const bool in0 = fa < dim;
  const bool in1 = fa + 1 < dim;
  const int64_t r_begin = int64_t(blockIdx.y) * rows_per_block;
  const int64_t r_end = r_begin + rows_per_block < rows ? r_begin + rows_per_block : rows;
  for (int64_t r0 = r_begin + warp * kUnroll; r0 < r_end; r0 += kWarps * kUnroll) {
    int64_t k[kUnroll];
    acc_t a[kUnroll], b[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {  // all loads first: kUnroll rows in flight
      const int64_t r = r0 + u;
      k[u] = r < r_end ? bucket_of(idx, r, num_bins, -1) : -1;
      a[u] = b[u] = acc_t(0);
      if (k[u] >= 0 && in0) {
        const T* p = x + r * row_stride + fa;
        if (PAIR) {  // dim and row_stride even, x aligned: in0 implies in1
          const Vec<T, 2> v = load_vec<T, 2>(p);
          a[u] = to_acc<acc_t>(v.v[0]);
          b[u] = to_acc<acc_t>(v.v[1]);
        } else {
          a[u] = to_acc<acc_t>(p[0]);
          if (in1) b[u] = to_acc<acc_t>(p[1]);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (k[u] < 0) continue;
      const int64_t o = k[u] * kTile + lane;
      if (in0) {
        const acc_t d = a[u] - sk[o];
        atomicAdd(&s1[o], d);
        atomicAdd(&s2[o], d * d);
      }
      if (in1) {
        const acc_t d = b[u] - sk[o + 32];
        atomicAdd(&s1[o + 32], d);
        atomicAdd(&s2[o + 32], d * d);
      }
      if (lane == 0) present[k[u]] = 1;
    }
  }
  __syncthreads();
  const int64_t s2_offset = num_bins * dim;
  for (int64_t e = threadIdx.x; e < num_bins * kTile; e += blockDim.x) {
    const int64_t k = e / kTile;
    const int64_t f = f0 + feature_of_slot(int(e - k * kTile));
    if (!present[k] || f >= dim) continue;
    atomicAdd(&sums[k * dim + f], s1[e]);
    atomicAdd(&sums[s2_offset + k * dim + f], s2[e]);
  }
}

// Every element straight to the global sums with float atomics, threads along the contiguous
// axis (planes of pixels, or rows with too many buckets for shared memory). PIXELS: element i is
// (image, feature, pixel) with the pixel fastest (planes of pixels, stride_s == 1); else
// (row, feature) with the feature fastest.
template <typename T, typename acc_t, typename index_t, bool PIXELS>
__global__ void accumulate_direct_kernel(const T* __restrict__ x, Addressing at,
                                         const index_t* __restrict__ idx, int64_t rows,
                                         int64_t dim, int64_t num_bins,
                                         const acc_t* __restrict__ ref, acc_t* __restrict__ sums) {
  const int64_t total = rows * dim;
  const int64_t s2_offset = num_bins * dim;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    int64_t r, f;
    if (PIXELS) {
      const int64_t plane = i / at.inner;  // image * dim + feature
      const int64_t s = i - plane * at.inner;
      const int64_t p = plane / dim;
      f = plane - p * dim;
      r = p * at.inner + s;
    } else {
      r = i / dim;
      f = i - r * dim;
    }
    const int64_t k = bucket_of(idx, r, num_bins, -1);
    if (k < 0) continue;
    const acc_t d = to_acc<acc_t>(x[at(r, f)]) - ref[k * dim + f];
    atomicAdd(&sums[k * dim + f], d);
    atomicAdd(&sums[s2_offset + k * dim + f], d * d);
  }
}

// ------------------------------------------------------------------------------ grouped rows
// Counting sort of the rows by bucket: offsets (exclusive prefix sum of the counts, one block),
// then every row written to its bucket's range (order within a bucket: whatever the atomics give).
constexpr int kScanThreads = 1024;

__global__ void scan_kernel(const ull* __restrict__ count, int64_t num_bins, ull* __restrict__ offsets,
                            ull* __restrict__ cursor) {
  __shared__ ull partial[kScanThreads];
  const int64_t per = (num_bins + kScanThreads - 1) / kScanThreads;
  const int64_t begin = threadIdx.x * per;
  const int64_t end = begin + per < num_bins ? begin + per : num_bins;
  ull sum = 0;
  for (int64_t k = begin; k < end; ++k) sum += count[k];
  partial[threadIdx.x] = sum;
  __syncthreads();
  for (int step = 1; step < kScanThreads; step *= 2) {  // inclusive Hillis-Steele scan
    const ull add = threadIdx.x >= step ? partial[threadIdx.x - step] : 0;
    __syncthreads();
    partial[threadIdx.x] += add;
    __syncthreads();
  }
  ull running = partial[threadIdx.x] - sum;  // exclusive
  for (int64_t k = begin; k < end; ++k) {
    offsets[k] = running;
    cursor[k] = running;
    running += count[k];
  }
  if (threadIdx.x == kScanThreads - 1) offsets[num_bins] = partial[kScanThreads - 1];
}

template <typename index_t>
__global__ void scatter_kernel(const index_t* __restrict__ idx, int64_t rows, int64_t num_bins,
                               ull* __restrict__ cursor, int64_t* __restrict__ perm) {
  for (int64_t r = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; r < rows;
       r += int64_t(gridDim.x) * blockDim.x) {
    const int64_t k = bucket_of(idx, r, num_bins, -1);
    if (k >= 0) perm[atomicAdd(&cursor[k], ull(1))] = r;
  }
}

// Rows grouped by bucket: a warp walks kGroupedRows consecutive rows of the grouped order with
// VEC features per lane (one 16-byte load per row), keeping S1 and S2 of the current bucket in
// registers; when the bucket changes (a bucket boundary inside the range: one or two per range)
// or the range ends, it adds them to the global sums with one float atomic per feature. No shared
// memory, no atomics per element, several rows in flight per lane.
constexpr int kGroupedRows = 64;
constexpr int kGroupedUnroll = 4;

// S1 and S2 of the bucket a lane is walking, for its VEC features at f: added to the global sums
// (S1 at [bucket][f], S2 at s2_offset + [bucket][f]) when the bucket changes and at the end.
template <typename acc_t, int VEC>
struct BucketSums {
  int64_t bucket = -1;
  acc_t s1[VEC], s2[VEC], k_ref[VEC];

  __device__ __forceinline__ void flush(acc_t* sums, int64_t s2_offset, int64_t dim,
                                        int64_t f) const {
    if (bucket < 0) return;
    const int64_t at = bucket * dim + f;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      atomicAdd(&sums[at + j], s1[j]);
      atomicAdd(&sums[s2_offset + at + j], s2[j]);
    }
  }

  template <typename T>
  __device__ __forceinline__ void add(int64_t k, const Vec<T, VEC>& v, const acc_t* ref,
                                      acc_t* sums, int64_t s2_offset, int64_t dim, int64_t f) {
    if (k != bucket) {
      flush(sums, s2_offset, dim, f);
      bucket = k;
      const Vec<acc_t, VEC> kv = load_vec<acc_t, VEC>(ref + k * dim + f);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        k_ref[j] = kv.v[j];
        s1[j] = s2[j] = acc_t(0);
      }
    }
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const acc_t d = to_acc<acc_t>(v.v[j]) - k_ref[j];
      s1[j] += d;
      s2[j] += d * d;
    }
  }
};

template <typename T, typename acc_t, typename index_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    accumulate_grouped_kernel(const T* __restrict__ x, const index_t* __restrict__ idx,
                              int64_t dim, int64_t row_stride, int64_t num_bins,
                              const int64_t* __restrict__ perm, const ull* __restrict__ offsets,
                              const acc_t* __restrict__ ref, acc_t* __restrict__ sums) {
  const int lane = threadIdx.x % 32;
  const int64_t task = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int64_t valid = static_cast<int64_t>(offsets[num_bins]);
  const int64_t begin = task * kGroupedRows;
  if (begin >= valid) return;
  const int64_t end = begin + kGroupedRows < valid ? begin + kGroupedRows : valid;
  const int64_t f = (int64_t(blockIdx.y) * 32 + lane) * VEC;
  if (f >= dim) return;  // VEC divides dim: a lane's vector is all in or all out
  const int64_t s2_offset = num_bins * dim;
  BucketSums<acc_t, VEC> run;
  for (int64_t i0 = begin; i0 < end; i0 += kGroupedUnroll) {
    int64_t k[kGroupedUnroll];
    Vec<T, VEC> v[kGroupedUnroll];
#pragma unroll
    for (int u = 0; u < kGroupedUnroll; ++u) {  // loads first: kGroupedUnroll rows in flight
      k[u] = -1;
      if (i0 + u < end) {
        const int64_t r = perm[i0 + u];
        k[u] = static_cast<int64_t>(idx[r]);
        v[u] = load_vec<T, VEC>(x + r * row_stride + f);
      }
    }
#pragma unroll
    for (int u = 0; u < kGroupedUnroll; ++u) {
      if (k[u] >= 0) run.add(k[u], v[u], ref, sums, s2_offset, dim, f);
    }
  }
  run.flush(sums, s2_offset, dim, f);
}

// ------------------------------------------------------------------------------ finalize
// mean and var from (count, K, S1, S2); zeros for empty buckets.
template <typename acc_t>
__global__ void finalize_kernel(const ull* __restrict__ count, const acc_t* __restrict__ ref,
                                const acc_t* __restrict__ sums, int64_t num_bins, int64_t dim,
                                acc_t* __restrict__ mean, acc_t* __restrict__ var) {
  const int64_t total = num_bins * dim;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = static_cast<int64_t>(count[i / dim]);
    if (n == 0) {
      mean[i] = acc_t(0);
      var[i] = acc_t(0);
      continue;
    }
    const acc_t s1 = sums[i];
    const acc_t s2 = sums[total + i];
    var[i] = shifted_sums_variance<acc_t>(n, s1, s2);  // 0 for n == 1, never negative
    mean[i] = shifted_sums_mean<acc_t>(n, ref[i], s1, var[i]);
  }
}

// ------------------------------------------------------------------------------ deterministic
template <typename T, typename acc_t>
__global__ void sorted_kernel(const T* __restrict__ x, Addressing at, int64_t dim,
                              int64_t num_bins, const int64_t* __restrict__ perm,
                              const int64_t* __restrict__ offsets, acc_t* __restrict__ mean,
                              acc_t* __restrict__ var) {
  const int64_t f = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (f >= dim) return;
  for (int64_t k = blockIdx.y; k < num_bins; k += gridDim.y) {
    const int64_t begin = offsets[k];
    const int64_t n = offsets[k + 1] - begin;
    if (n == 0) {
      mean[k * dim + f] = acc_t(0);
      var[k * dim + f] = acc_t(0);
      continue;
    }
    // The same shifted sums as the other kernels, K the bucket's first row, added in the
    // sorted order by this one thread: the same bits on every run.
    // S1 grows like n * (mean - K) when K is far from the mean; a compensated (Kahan) sum
    // keeps its rounding from reaching the mean (one thread, sequential: nothing to lose).
    const acc_t shift = to_acc<acc_t>(x[at(perm[begin], f)]);
    acc_t s1 = acc_t(0), s2 = acc_t(0), carry = acc_t(0);
    for (int64_t i = 1; i < n; ++i) {
      const acc_t d = to_acc<acc_t>(x[at(perm[begin + i], f)]) - shift;
      const acc_t y = d - carry;
      const acc_t t = s1 + y;
      carry = (t - s1) - y;
      s1 = t;
      s2 += d * d;
    }
    const acc_t v = shifted_sums_variance<acc_t>(n, s1, s2);
    mean[k * dim + f] = shifted_sums_mean<acc_t>(n, shift, s1, v);
    var[k * dim + f] = v;
  }
}

// ------------------------------------------------------------------------------ host side
// What the current device allows: shared memory per block (opt-in) and per SM, asked once.
struct SharedLimits {
  size_t per_block = kDefaultShared;
  size_t per_sm = kDefaultShared;
};

SharedLimits shared_limits() {
  static SharedLimits cache[64];
  static bool known[64] = {};
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= 64) {
    cudaGetLastError();
    return SharedLimits();
  }
  if (!known[device]) {
    int per_block = 0, per_sm = 0;
    if (cudaDeviceGetAttribute(&per_block, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) == cudaSuccess &&
        cudaDeviceGetAttribute(&per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device) == cudaSuccess) {
      cache[device].per_block = static_cast<size_t>(per_block);
      cache[device].per_sm = static_cast<size_t>(per_sm);
    } else {
      cudaGetLastError();  // keep the defaults; leave no error behind for check_launch()
    }
    known[device] = true;
  }
  return cache[device];
}

size_t shared_bytes(int64_t num_bins, size_t acc) {
  return static_cast<size_t>(num_bins) * (3 * kTile * acc + sizeof(int));
}

// The accumulate pass of a call, from the shapes, strides and alignment of x and the shared
// memory of the device: the one decision behind both the workspace size and launch().
enum class Pass {
  kNone,        // no rows or no features: nothing to accumulate
  kGrouped,     // 16-byte aligned rows of at least 32 vectors: rows grouped by bucket
  kPrivatised,  // other rows, B small enough for shared memory (kRows if the opt-in is refused)
  kPlanes,      // planes of pixels: direct atomics along the pixels
  kRows,        // rows: direct atomics along the features
};

template <typename T>
Pass choose_pass(const Features& x, int64_t num_bins, const SharedLimits& limits) {
  if (x.rows <= 0 || x.dim <= 0) return Pass::kNone;
  constexpr int VEC = 16 / sizeof(T);
  const bool rows = x.stride_f == 1 && x.inner == x.rows;
  if (rows && x.dim % VEC == 0 && x.dim >= 32 * VEC && ceil_div(x.dim, 32 * VEC) <= 65535 &&
      vec_aligned<T, VEC>(x.data, x.stride_s)) {
    return Pass::kGrouped;
  }
  if (rows && shared_bytes(num_bins, sizeof(acc_of<T>)) <= std::min(kMaxShared, limits.per_block)) {
    return Pass::kPrivatised;
  }
  return x.stride_s == 1 && x.stride_f != 1 ? Pass::kPlanes : Pass::kRows;
}

// The workspace of a call taking `pass`, 256-byte aligned pieces: first[B] (the histogram's first
// rows) and the sums S1, S2 [2][B][D] next to it (one memset clears both), the reference rows
// K [B][D]; for the grouped pass only, the counting sort's offsets [B + 1], cursor [B] and the
// grouped row numbers perm [N].
struct Workspace {
  ull* first;
  void* sums;
  void* ref;
  ull* offsets;
  ull* cursor;
  int64_t* perm;
};

size_t aligned(size_t bytes) { return (bytes + 255) / 256 * 256; }

// Carves the workspace at `base` (nullptr: only its size, returned in *bytes).
Workspace carve(void* base, int64_t num_bins, int64_t dim, int64_t rows, size_t acc, Pass pass,
                size_t* bytes = nullptr) {
  char* const start = static_cast<char*>(base);
  size_t at = 0;
  auto take = [&](size_t size) {
    char* piece = start == nullptr ? nullptr : start + at;
    at += aligned(size);
    return piece;
  };
  Workspace ws{};
  ws.first = reinterpret_cast<ull*>(take(num_bins * sizeof(ull)));
  ws.sums = take(2 * num_bins * dim * acc);
  ws.ref = take(num_bins * dim * acc);
  if (pass == Pass::kGrouped) {
    ws.offsets = reinterpret_cast<ull*>(take((num_bins + 1) * sizeof(ull)));
    ws.cursor = reinterpret_cast<ull*>(take(num_bins * sizeof(ull)));
    ws.perm = reinterpret_cast<int64_t*>(take(rows * sizeof(int64_t)));
  }
  if (bytes != nullptr) *bytes = at;
  return ws;
}

int grid_for(int64_t work, int num_sms, int per_sm = 8) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(ceil_div(work, kThreads),
                                                                 int64_t(num_sms) * per_sm)));
}

template <typename T, typename index_t>
void launch(const Features& x, const index_t* idx, int64_t num_bins, int64_t* count, void* mean, void* var,
            void* workspace, int num_sms, cudaStream_t stream) {
  using acc_t = acc_of<T>;
  const int64_t dim = x.dim;
  const int64_t rows = x.rows;
  const SharedLimits limits = shared_limits();
  const Pass pass = choose_pass<T>(x, num_bins, limits);
  const Workspace ws = carve(workspace, num_bins, dim, rows, sizeof(acc_t), pass);
  ull* counts = reinterpret_cast<ull*>(count);
  acc_t* sums = static_cast<acc_t*>(ws.sums);
  acc_t* ref = static_cast<acc_t*>(ws.ref);
  const T* px = static_cast<const T*>(x.data);
  const Addressing at = addressing(x);
  // first[] and the sums are adjacent in the workspace (carve): one memset clears both.
  const size_t first_and_sums =
      static_cast<size_t>(static_cast<char*>(ws.sums) - reinterpret_cast<char*>(ws.first)) +
      2 * num_bins * dim * sizeof(acc_t);
  STD_TORCH_CHECK(cudaMemsetAsync(counts, 0, num_bins * sizeof(ull), stream) == cudaSuccess &&
                      cudaMemsetAsync(ws.first, 0, first_and_sums, stream) == cudaSuccess,
                  "dirfast::bin_stats: cudaMemsetAsync failed");
  if (rows > 0) {
    const size_t hist_shared = num_bins <= kHistSharedBins ? 2 * num_bins * sizeof(ull) : 0;
    hist_kernel<index_t><<<grid_for(rows, num_sms, 4), kThreads, hist_shared, stream>>>(
        idx, rows, num_bins, counts, ws.first);
  }
  const int64_t table = num_bins * dim;
  if (pass != Pass::kNone) {
    reference_kernel<T, acc_t><<<grid_for(table, num_sms), kThreads, 0, stream>>>(
        px, at, rows, num_bins, dim, ws.first, ref);
    bool privatised = false;
    if (pass == Pass::kGrouped) {
      constexpr int VEC = 16 / sizeof(T);
      scan_kernel<<<1, kScanThreads, 0, stream>>>(counts, num_bins, ws.offsets, ws.cursor);
      scatter_kernel<index_t><<<grid_for(rows, num_sms, 4), kThreads, 0, stream>>>(
          idx, rows, num_bins, ws.cursor, ws.perm);
      // Row ranges along x (2^31 - 1 blocks), feature tiles along y (dim <= 65,535 * 32 * VEC).
      const dim3 grid(static_cast<unsigned>(ceil_div(rows, int64_t(kWarps) * kGroupedRows)),
                      static_cast<unsigned>(ceil_div(dim, 32 * VEC)));
      accumulate_grouped_kernel<T, acc_t, index_t, VEC><<<grid, kThreads, 0, stream>>>(
          px, idx, dim, x.stride_s, num_bins, ws.perm, ws.offsets, ref, sums);
    } else if (pass == Pass::kPrivatised) {
      const size_t shared = shared_bytes(num_bins, sizeof(acc_t));
      const int64_t tiles = ceil_div(dim, kTile);
      const int64_t per_sm =
          std::max<int64_t>(1, std::min<int64_t>(4, int64_t(limits.per_sm / (shared + 1024))));
      int64_t chunks = std::max<int64_t>(1, ceil_div(int64_t(num_sms) * per_sm, tiles));
      chunks = std::min<int64_t>({chunks, ceil_div(rows, 256), 65535});
      const int64_t rows_per_block = ceil_div(rows, chunks);
      const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(ceil_div(rows, rows_per_block)));
      const bool pair = dim % 2 == 0 && vec_aligned<T, 2>(px, x.stride_s);
      auto run = [&](auto kernel) {
        if (shared > kDefaultShared &&
            cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                 static_cast<int>(shared)) != cudaSuccess) {
          cudaGetLastError();  // not granted: the direct kernel below instead
          return false;
        }
        kernel<<<grid, kThreads, shared, stream>>>(px, idx, rows, dim, x.stride_s, num_bins,
                                                   rows_per_block, ref, sums);
        return true;
      };
      privatised = pair ? run(accumulate_shared_kernel<T, acc_t, index_t, true>)
                        : run(accumulate_shared_kernel<T, acc_t, index_t, false>);
    }
    if (pass == Pass::kPlanes) {
      accumulate_direct_kernel<T, acc_t, index_t, true>
          <<<grid_for(rows * dim, num_sms, 16), kThreads, 0, stream>>>(px, at, idx, rows, dim,
                                                                       num_bins, ref, sums);
    } else if (pass == Pass::kRows || (pass == Pass::kPrivatised && !privatised)) {
      accumulate_direct_kernel<T, acc_t, index_t, false>
          <<<grid_for(rows * dim, num_sms, 16), kThreads, 0, stream>>>(px, at, idx, rows, dim,
                                                                       num_bins, ref, sums);
    }
  }
  if (table > 0) {
    finalize_kernel<acc_t><<<grid_for(table, num_sms), kThreads, 0, stream>>>(
        counts, ref, sums, num_bins, dim, static_cast<acc_t*>(mean), static_cast<acc_t*>(var));
  }
}


// keys[r] = the bucket of row r, num_bins for a row that selects none (sorted last).
template <typename index_t>
__global__ void keys_kernel(const index_t* __restrict__ idx, int64_t rows, int64_t num_bins,
                            int64_t* __restrict__ keys) {
  for (int64_t r = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; r < rows;
       r += int64_t(gridDim.x) * blockDim.x) {
    keys[r] = bucket_of(idx, r, num_bins, num_bins);
  }
}

// The row numbers in the order of a stable sort of keys (torch's sort, through the dispatcher).
Tensor stable_order(const Tensor& keys) {
  using torch::stable::detail::from;
  std::array<StableIValue, 4> stack{from(keys), from(std::optional<bool>(true)), from(int64_t(0)), from(false)};
  TORCH_ERROR_CODE_CHECK(torch_call_dispatcher("aten::sort", "stable", stack.data(), TORCH_ABI_VERSION));
  const Tensor values = torch::stable::detail::to<Tensor>(stack[0]);  // released with this scope
  return torch::stable::detail::to<Tensor>(stack[1]);
}

// The deterministic variant, with no float atomics: the counts (exact integer atomics) and each
// bucket's first position in the grouped order (a scan), the rows grouped by a stable sort of
// their buckets, then one thread's pass per (bucket, feature) in that order (sorted_kernel).
template <typename T, typename index_t>
void launch_sorted(const Features& x, const index_t* idx, int64_t num_bins, int64_t* count, void* mean,
                   void* var, const Tensor& like, int num_sms, cudaStream_t stream) {
  using acc_t = acc_of<T>;
  const int64_t rows = x.rows;
  Tensor scratch = empty({3 * num_bins + 1}, ScalarType::Long, like);  // first[B], offsets[B + 1], cursor[B]
  ull* counts = reinterpret_cast<ull*>(count);
  ull* first = reinterpret_cast<ull*>(scratch.mutable_data_ptr<int64_t>());
  ull* offsets = first + num_bins;
  STD_TORCH_CHECK(cudaMemsetAsync(counts, 0, num_bins * sizeof(ull), stream) == cudaSuccess &&
                      cudaMemsetAsync(first, 0, num_bins * sizeof(ull), stream) == cudaSuccess,
                  "dirfast::bin_stats: cudaMemsetAsync failed");
  Tensor keys = empty({rows}, ScalarType::Long, like);
  if (rows > 0) {
    const size_t hist_shared = num_bins <= kHistSharedBins ? 2 * num_bins * sizeof(ull) : 0;
    hist_kernel<index_t><<<grid_for(rows, num_sms, 4), kThreads, hist_shared, stream>>>(idx, rows, num_bins,
                                                                                         counts, first);
    keys_kernel<index_t><<<grid_for(rows, num_sms, 4), kThreads, 0, stream>>>(idx, rows, num_bins,
                                                                              keys.mutable_data_ptr<int64_t>());
  }
  scan_kernel<<<1, kScanThreads, 0, stream>>>(counts, num_bins, offsets, offsets + num_bins + 1);
  check_launch("dirfast::bin_stats");
  if (x.dim == 0) return;
  const Tensor perm = torch::stable::contiguous(stable_order(keys));
  // Features along x (up to 2^31 - 1 blocks), buckets along y (looped past 65,535).
  const dim3 grid(static_cast<unsigned>(ceil_div(x.dim, kSortedThreads)),
                  static_cast<unsigned>(std::min<int64_t>(num_bins, 65535)));
  sorted_kernel<T, acc_t><<<grid, kSortedThreads, 0, stream>>>(
      static_cast<const T*>(x.data), addressing(x), x.dim, num_bins, perm.const_data_ptr<int64_t>(),
      reinterpret_cast<const int64_t*>(offsets), static_cast<acc_t*>(mean), static_cast<acc_t*>(var));
}

std::tuple<Tensor, Tensor, Tensor> bin_stats_cuda(const Tensor& x, const Tensor& bin_idx, int64_t num_bins,
                                                  bool deterministic) {
  const char* op = "dirfast::bin_stats";
  check_features_and_bins(x, bin_idx, op, torch::headeronly::DeviceType::CUDA);
  const auto guard = device_guard(x);
  const ScalarType acc = acc_type({x.scalar_type()});
  const std::tuple<Tensor, Tensor, Tensor> outputs = bin_stats_outputs(x, num_bins, acc, op);
  Tensor count = std::get<0>(outputs), mean = std::get<1>(outputs), var = std::get<2>(outputs);
  const Tensor xr = readable(x);  // a copy only for layouts the kernels do not walk
  const Features fx = features(xr, classify(xr));
  const Tensor idx = torch::stable::contiguous(bin_idx);
  const int num_sms = sm_count(x);
  const cudaStream_t stream = current_stream(x);
  dispatch_cuda_float(x.scalar_type(), op, [&](auto scalar) {
    using T = decltype(scalar);
    dispatch_index(idx.scalar_type(), [&](auto index) {
      using index_t = decltype(index);
      const index_t* pi = idx.const_data_ptr<index_t>();
      int64_t* pc = count.mutable_data_ptr<int64_t>();
      if (deterministic) {
        launch_sorted<T, index_t>(fx, pi, num_bins, pc, mean.mutable_data_ptr(), var.mutable_data_ptr(), x,
                                  num_sms, stream);
        return;
      }
      const Pass pass = choose_pass<T>(fx, num_bins, shared_limits());
      size_t bytes = 0;
      carve(nullptr, num_bins, fx.dim, fx.rows, sizeof(acc_of<T>), pass, &bytes);
      Tensor workspace = empty({static_cast<int64_t>(bytes)}, ScalarType::Byte, x);
      launch<T, index_t>(fx, pi, num_bins, pc, mean.mutable_data_ptr(), var.mutable_data_ptr(),
                         workspace.mutable_data_ptr(), num_sms, stream);
    });
  });
  check_launch(op);
  return std::make_tuple(count, mean, var);
}

}  // namespace
}  // namespace cuda
}  // namespace dirfast

STABLE_TORCH_LIBRARY_IMPL(dirfast, CUDA, m) {
  m.impl("bin_stats", TORCH_BOX(&dirfast::cuda::bin_stats_cuda));
}
