// Conversions between a kernel's input dtype and its accumulation dtype: to_acc and from_acc.
//
// Torch-free and header-only. The primaries are static_cast; csrc/dirfast.h specialises them for
// c10::Half with half_bits_to_float and float_to_half_bits below: c10's own IEEE binary16
// arithmetic (torch/headeronly/util/Half.h, the code it runs when not built for F16C) with its
// selects written as bit masks. c10's selects compile to branches that g++ does not vectorise for
// AVX2, so a float16 row would be converted a value at a time in the x86-64-v3 clones; these give
// the same bits (every binary16 value, every float32 value) and vectorise.
#pragma once

#include "macros.h"

#include <cstdint>

namespace dirfast {

template <typename To, typename From>
DIRFAST_HOST_DEVICE inline To bits_as(From v) {
  static_assert(sizeof(To) == sizeof(From), "bits_as: sizes differ");
  To out;
  __builtin_memcpy(&out, &v, sizeof(To));
  return out;
}

// The float of IEEE binary16 bits h (exact).
DIRFAST_HOST_DEVICE inline float half_bits_to_float(uint16_t h) {
  const uint32_t w = static_cast<uint32_t>(h) << 16;
  const uint32_t sign = w & UINT32_C(0x80000000);
  const uint32_t two_w = w + w;
  // normal inputs: the exponent rebiased by a multiply (0x1.0p-112f), infinities and NaNs too
  const float normalized = bits_as<float>((two_w >> 4) + (UINT32_C(0xE0) << 23)) * bits_as<float>(UINT32_C(15) << 23);
  // subnormal inputs and zeros: the mantissa under exponent 126, less 0.5
  const float denormalized = bits_as<float>((two_w >> 17) | (UINT32_C(126) << 23)) - 0.5f;
  const uint32_t subnormal = 0u - static_cast<uint32_t>(two_w < (UINT32_C(1) << 27));
  return bits_as<float>(sign | (bits_as<uint32_t>(denormalized) & subnormal) |
                        (bits_as<uint32_t>(normalized) & ~subnormal));
}

// The IEEE binary16 bits of f, rounded to nearest even; every NaN gives 0x7E00 with f's sign.
DIRFAST_HOST_DEVICE inline uint16_t float_to_half_bits(float f) {
  const uint32_t w = bits_as<uint32_t>(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & UINT32_C(0x80000000);
  // |f| scaled to infinity (0x1.0p+112f) and back (0x1.0p-110f): overflows become infinite
  float base = (bits_as<float>(w & UINT32_C(0x7FFFFFFF)) * bits_as<float>(UINT32_C(239) << 23)) *
               bits_as<float>(UINT32_C(17) << 23);
  uint32_t bias = shl1_w & UINT32_C(0xFF000000);
  bias = bias < UINT32_C(0x71000000) ? UINT32_C(0x71000000) : bias;  // a max, not a branch
  base = bits_as<float>((bias >> 1) + UINT32_C(0x07800000)) + base;
  const uint32_t bits = bits_as<uint32_t>(base);
  const uint32_t nonsign = ((bits >> 13) & UINT32_C(0x00007C00)) + (bits & UINT32_C(0x00000FFF));
  const uint32_t nan = 0u - static_cast<uint32_t>(shl1_w > UINT32_C(0xFF000000));
  return static_cast<uint16_t>((sign >> 16) | (UINT32_C(0x7E00) & nan) | (nonsign & ~nan));
}

// v in the accumulation dtype acc_t, and back.
template <typename acc_t, typename T>
DIRFAST_HOST_DEVICE inline acc_t to_acc(T v) {
  return static_cast<acc_t>(v);
}

template <typename T, typename acc_t>
DIRFAST_HOST_DEVICE inline T from_acc(acc_t v) {
  return static_cast<T>(v);
}

}  // namespace dirfast
