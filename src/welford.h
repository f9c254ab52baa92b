// Welford's running (count, mean, M2) and Chan's merge of two such partials.
//
// Torch-free and header-only (every function DIRFAST_HOST_DEVICE): the CPU kernels
// (csrc/cpu/bin_stats.cpp, accumulate_bin_stats.cpp, through csrc/bucket_rows.h) use the row
// functions and Chan's merge, the CUDA kernels (csrc/cuda/bin_stats.cu) shifted_sums_variance and
// shifted_sums_mean. M2 is the sum of squared deviations from the mean; the unbiased variance is
// M2 / (n - 1). Accumulate in float (float16, bfloat16 and float32 inputs) or double (float64
// inputs): `acc_t` below.
//
// Numerics: a running mean of x itself rounds at x's scale, and its error reaches M2: relative to
// the variance, about 1e-7 times mean/std in float32 (1e-4 at 1,000 standard deviations from zero,
// 2e-3 at 10,000). Shifted updates take each row's difference from a shift close to the rows,
// exact (Sterbenz) where they are within a factor 2 of it, and the running mean is the mean of
// those differences, so the variance stays near float32's rounding wherever the bucket is (tested
// at mean/std = 10,000 against float64). The CPU kernels run plain updates, which cost one
// subtraction less per value, and redo a bucket shifted where they may have lost accuracy
// (welford_shift; csrc/cpu/bin_stats.cpp); the CUDA kernels shift every bucket by its first row.
// Welford's update never forms sum(x^2) - n*mean^2; each M2 increment is a product of two numbers
// of the same sign and each Chan increment a square, so M2 never goes negative.
#pragma once

#include "convert.h"
#include "macros.h"

#include <cstdint>
#include <type_traits>

namespace dirfast {

// The unbiased variance of n samples with sum of squared deviations m2: 0 when n <= 1.
template <typename acc_t>
DIRFAST_HOST_DEVICE inline acc_t welford_variance(int64_t n, acc_t m2) {
  if (n <= 1) return acc_t(0);
  const acc_t var = m2 / static_cast<acc_t>(n - 1);
  return var < acc_t(0) ? acc_t(0) : var;  // a NaN (from a NaN or infinite feature) stays
}

// The unbiased variance of n samples from their shifted sums S1 = sum(x - K) and S2 =
// sum((x - K)^2) (the CUDA kernels), as S2 - S1 (S1 / n): S1 ~ n (mean - K) can square beyond
// acc_t where the variance does not. +inf where S2 overflowed but S1 did not (a spread beyond
// acc_t, where the difference would be inf - inf), as the Welford loops of the CPU give.
template <typename acc_t>
DIRFAST_HOST_DEVICE inline acc_t shifted_sums_variance(int64_t n, acc_t s1, acc_t s2) {
  const bool overflowed = s2 == s2 && s2 - s2 != acc_t(0) && s1 - s1 == acc_t(0);  // S2 inf, S1 finite
  if (overflowed) return n <= 1 ? acc_t(0) : s2;
  return welford_variance<acc_t>(n, s2 - s1 * (s1 / static_cast<acc_t>(n)));
}

// The mean of n >= 1 samples from their shift K (one of them) and S1 = sum(x - K) (the CUDA
// kernels): K + S1 / n, or NaN where a feature was not finite (K is then not finite, or the
// variance var NaN), as the CPU kernel and the reference give whichever row holds it.
template <typename acc_t>
DIRFAST_HOST_DEVICE inline acc_t shifted_sums_mean(int64_t n, acc_t shift, acc_t s1, acc_t var) {
  const acc_t mean = shift + s1 / static_cast<acc_t>(n);
  const bool finite_shift = shift - shift == acc_t(0);
  return finite_shift && var == var ? mean : shift - shift + var;  // the NaN of either
}

// Whether a bucket's plain updates may have lost the accuracy of its variance var (>= 0, from
// them) in a feature of mean `mean`: var > 0 and |mean| over 20 standard deviations in float32
// (their error, about 1e-7 mean / std of the variance, may pass 2e-6 there), 1e6 in float64. As
// an int (0 or 1), so that a loop or-ing it over features vectorises; the mean scaled down before
// it is squared overflows only where it is far indeed.
template <typename acc_t>
DIRFAST_HOST_DEVICE inline int welford_far(acc_t mean, acc_t var) {
  const acc_t scaled = mean * (sizeof(acc_t) == 4 ? acc_t(0.05) : acc_t(1e-6));
  return static_cast<int>(var > acc_t(0)) & static_cast<int>(scaled * scaled > var);
}

// The variance a bucket of n >= 2 rows reports from its M2 (denominator n - 1): never negative,
// and NaN where its mean is not finite (a non-finite feature: M2 may be infinite when the
// infinite row began a chunk).
template <typename acc_t>
DIRFAST_HOST_DEVICE inline acc_t welford_reported_variance(acc_t m2, acc_t mean, acc_t denominator) {
  const acc_t var = m2 / denominator;
  return (var < acc_t(0) ? acc_t(0) : var) + (mean - mean);
}

// ------------------------------------------------------------------------------ rows of D
// Welford's update and Chan's merge on a row of D features at once (the CPU kernel): the loops
// have no dependence between features and take restrict pointers, so the compiler vectorises them.

// The shift of plain updates: none. The row updates below take a row of shift_t: NoShift for
// plain updates, acc_t (a bucket's welford_shift) for shifted ones.
struct NoShift {};

// x less the shift's feature d (x itself for plain updates).
template <typename acc_t, typename shift_t>
DIRFAST_HOST_DEVICE inline acc_t less_shift(acc_t x, const shift_t* DIRFAST_RESTRICT shift, int64_t d) {
  if constexpr (std::is_same_v<shift_t, NoShift>) {
    return x;
  } else {
    return x - shift[d];
  }
}

// Row `offset` of a table of shifts (nothing for plain updates).
template <typename shift_t>
DIRFAST_HOST_DEVICE inline const shift_t* shift_row(const shift_t* table, int64_t offset) {
  if constexpr (std::is_same_v<shift_t, NoShift>) {
    return table;
  } else {
    return table + offset;
  }
}

// First sample of a bucket (or of a piece of it): mean = x - shift, m2 = 0.
template <typename acc_t, typename in_t, typename shift_t>
DIRFAST_HOST_DEVICE inline void welford_row_init(acc_t* DIRFAST_RESTRICT mean,
                                                 acc_t* DIRFAST_RESTRICT m2,
                                                 const in_t* DIRFAST_RESTRICT x,
                                                 const shift_t* DIRFAST_RESTRICT shift, int64_t dim) {
  for (int64_t d = 0; d < dim; ++d) {
    mean[d] = less_shift<acc_t, shift_t>(to_acc<acc_t>(x[d]), shift, d);
    m2[d] = acc_t(0);
  }
}

// One sample x added to a running (mean, m2) of n - 1 samples, inv_n = 1 / n (n >= 2).
template <typename acc_t>
DIRFAST_HOST_DEVICE inline void welford_step(acc_t& mean, acc_t& m2, acc_t x, acc_t inv_n) {
  const acc_t delta = x - mean;
  mean = mean + delta * inv_n;
  m2 += delta * (x - mean);
}

// The n-th sample (n >= 2) of a bucket, inv_n = 1 / n.
template <typename acc_t, typename in_t, typename shift_t>
DIRFAST_HOST_DEVICE inline void welford_row_add(acc_t* DIRFAST_RESTRICT mean,
                                                acc_t* DIRFAST_RESTRICT m2,
                                                const in_t* DIRFAST_RESTRICT x,
                                                const shift_t* DIRFAST_RESTRICT shift, int64_t dim,
                                                acc_t inv_n) {
  for (int64_t d = 0; d < dim; ++d) {
    welford_step<acc_t>(mean[d], m2[d], less_shift<acc_t, shift_t>(to_acc<acc_t>(x[d]), shift, d), inv_n);
  }
}

// Samples n+1 .. n+4 of a bucket (n >= 1), rows x0 .. x3, inv[j] = 1 / (n + 1 + j): the four
// updates of welford_row_add in turn, with the same bits, but mean and m2 are loaded and stored
// once per four rows instead of once per row.
template <typename acc_t, typename in_t, typename shift_t>
DIRFAST_HOST_DEVICE inline void welford_row_add4(acc_t* DIRFAST_RESTRICT mean,
                                                 acc_t* DIRFAST_RESTRICT m2,
                                                 const in_t* DIRFAST_RESTRICT x0,
                                                 const in_t* DIRFAST_RESTRICT x1,
                                                 const in_t* DIRFAST_RESTRICT x2,
                                                 const in_t* DIRFAST_RESTRICT x3,
                                                 const shift_t* DIRFAST_RESTRICT shift, int64_t dim,
                                                 const acc_t* DIRFAST_RESTRICT inv) {
  const acc_t i0 = inv[0], i1 = inv[1], i2 = inv[2], i3 = inv[3];
  for (int64_t d = 0; d < dim; ++d) {
    acc_t m = mean[d];
    acc_t q = m2[d];
    welford_step<acc_t>(m, q, less_shift<acc_t, shift_t>(to_acc<acc_t>(x0[d]), shift, d), i0);
    welford_step<acc_t>(m, q, less_shift<acc_t, shift_t>(to_acc<acc_t>(x1[d]), shift, d), i1);
    welford_step<acc_t>(m, q, less_shift<acc_t, shift_t>(to_acc<acc_t>(x2[d]), shift, d), i2);
    welford_step<acc_t>(m, q, less_shift<acc_t, shift_t>(to_acc<acc_t>(x3[d]), shift, d), i3);
    mean[d] = m;
    m2[d] = q;
  }
}

// The mean a bucket reports from its running mean m (plain updates; shifted ones: m + shift):
// NaN where m is not finite (a NaN or an infinite feature met: x - shift or the update made a
// NaN or an infinity), so a non-finite feature gives a NaN mean whichever row holds it, as in
// the reference. Arithmetic, not a select (m - m is 0 or NaN): the loops vectorise.
template <typename acc_t>
DIRFAST_HOST_DEVICE inline acc_t welford_reported_mean(acc_t m, acc_t shift = acc_t(0)) {
  return (m + shift) + (m - m);
}

// The mean of a bucket of shifted updates from its running mean, in place
// (welford_reported_mean).
template <typename acc_t>
DIRFAST_HOST_DEVICE inline void welford_row_unshift(acc_t* DIRFAST_RESTRICT mean,
                                                    const acc_t* DIRFAST_RESTRICT shift, int64_t dim) {
  for (int64_t d = 0; d < dim; ++d) mean[d] = welford_reported_mean<acc_t>(mean[d], shift[d]);
}

// The two weights of Chan's merge of partial a (na samples) with partial b (nb samples):
// frac_b = nb / (na + nb) and cross = na * nb / (na + nb), computed in double once per
// (bucket, partial) and rounded to acc_t.
template <typename acc_t>
struct ChanWeights {
  acc_t frac_b;
  acc_t cross;
};

template <typename acc_t>
DIRFAST_HOST_DEVICE inline ChanWeights<acc_t> chan_weights(int64_t na, int64_t nb) {
  const double n = static_cast<double>(na) + static_cast<double>(nb);
  ChanWeights<acc_t> w;
  w.frac_b = static_cast<acc_t>(static_cast<double>(nb) / n);
  w.cross = static_cast<acc_t>(static_cast<double>(na) * static_cast<double>(nb) / n);
  return w;
}

// The shift of a feature's shifted updates, from its plain updates' mean and variance (>= 0):
// the mean where welford_far (the rows lie within a factor 2 of it, bar outliers), 0 elsewhere,
// which keeps the plain updates' bits there; never a row far from the others, whose difference
// from a spread near acc_t's limit would overflow.
template <typename acc_t>
DIRFAST_HOST_DEVICE inline acc_t welford_shift(acc_t mean, acc_t var) {
  return welford_far<acc_t>(mean, var) ? mean : acc_t(0);
}

// The shifts (welford_shift) of a bucket of n rows, mean and M2 from plain updates, into shift;
// returns whether the bucket is redone with shifted updates: n >= 2 and some feature welford_far.
template <typename acc_t>
DIRFAST_HOST_DEVICE inline bool welford_row_shift(acc_t* DIRFAST_RESTRICT shift, const acc_t* DIRFAST_RESTRICT mean,
                                                  const acc_t* DIRFAST_RESTRICT m2, int64_t n, int64_t dim) {
  if (n <= 1) return false;
  const acc_t denominator = static_cast<acc_t>(n - 1);
  int far = 0;
  for (int64_t d = 0; d < dim; ++d) {
    const acc_t var = welford_reported_variance<acc_t>(m2[d], mean[d], denominator);
    far |= welford_far<acc_t>(mean[d], var);
    shift[d] = welford_shift<acc_t>(mean[d], var);
  }
  return far != 0;
}

// Partial b (nb samples) merged into partial a (na samples, both at least one), both of the
// differences from the same shift, D features:
// Chan, Golub and LeVeque,
//   delta = mean_b - mean_a;  mean = mean_a + delta * nb / n;
//   M2 = M2_a + M2_b + delta^2 * na * nb / n.
template <typename acc_t>
DIRFAST_HOST_DEVICE inline void chan_merge_row(acc_t* DIRFAST_RESTRICT mean_a,
                                               acc_t* DIRFAST_RESTRICT m2_a,
                                               const acc_t* DIRFAST_RESTRICT mean_b,
                                               const acc_t* DIRFAST_RESTRICT m2_b, int64_t dim,
                                               ChanWeights<acc_t> w) {
  for (int64_t d = 0; d < dim; ++d) {
    const acc_t delta = mean_b[d] - mean_a[d];
    mean_a[d] += delta * w.frac_b;
    m2_a[d] += m2_b[d] + delta * delta * w.cross;
  }
}

}  // namespace dirfast
