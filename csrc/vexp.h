// exp on a GCC float vector of any lane count, with Cephes' expf polynomial: about 1 ulp on
// [-87.3, 88.3]; inputs below give 2^-126 instead of 0, -inf gives 0, NaN stays NaN. What the
// float32 kernels that sum many exponentials use (mixture_logpdf, conr_loss) instead of a
// scalar std::exp per element.
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>

namespace dirfast {

// Lanes floats (and int32s) as one GCC vector, at any alignment of the memory they come from.
template <int64_t Lanes>
struct FloatVec {
  typedef float f __attribute__((vector_size(Lanes * sizeof(float)), aligned(4)));
  typedef int32_t i __attribute__((vector_size(Lanes * sizeof(int32_t)), aligned(4)));
};

template <typename VF>
inline VF load_vec(const float* p) {
  VF v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename VF>
inline void store_vec(float* p, VF v) {
  std::memcpy(p, &v, sizeof(v));
}

// VF: the float vector type, VI: the int32 vector of the same lane count.
template <typename VF, typename VI>
inline VF vexp(VF x) {
  const VI minus_inf = x == -std::numeric_limits<float>::infinity();
  x = x < -87.3f ? VF{} - 87.3f : x;
  x = x > 88.3f ? VF{} + 88.3f : x;
  const VF fx = x * 1.44269504088896341f + 0.5f;
  VF n = __builtin_convertvector(__builtin_convertvector(fx, VI), VF);  // floor(fx) for any sign:
  n = n > fx ? n - 1.0f : n;                                             // truncation, corrected
  x = x - n * 0.693359375f;
  x = x - n * -2.12194440e-4f;
  VF y = VF{} + 1.9875691500e-4f;
  y = y * x + 1.3981999507e-3f;
  y = y * x + 8.3334519073e-3f;
  y = y * x + 4.1665795894e-2f;
  y = y * x + 1.6666665459e-1f;
  y = y * x + 5.0000001201e-1f;
  y = y * (x * x) + x + 1.0f;
  const VI bits = (__builtin_convertvector(n, VI) + 127) << 23;
  const VF result = y * (VF)bits;  // a cast between vector types reinterprets the bits
  return minus_inf ? VF{} : result;
}

}  // namespace dirfast
