// What every kernel file includes: torch's stable ABI (torch/csrc/stable, torch/headeronly) and
// the few helpers the kernels share on top of it -- the accumulation-dtype rule, dtype dispatch,
// calls into ATen through the dispatcher, and the text of error messages.
//
// Only the stable C shims and header-only code are used, so the compiled extension runs on every
// torch from the TORCH_TARGET_VERSION it is built for (setup.py) onwards.
#pragma once

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Exception.h>
#include <torch/headeronly/util/Half.h>
#include <torch/headeronly/util/shim_utils.h>

#include <array>
#include <cstdint>
#include <initializer_list>
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "convert.h"
#include "macros.h"

namespace dirfast {

using torch::stable::Tensor;
using torch::headeronly::ScalarType;

// ---------------------------------------------------------------------------- dtypes
// The accumulation rule of every op (the same as dirfast.ops._common.acc_dtype): float64 when
// any of the tensors is float64, else float32 -- float16 and bfloat16 are computed in float32.
inline ScalarType acc_type(std::initializer_list<ScalarType> types) {
  for (ScalarType t : types) {
    if (t == ScalarType::Double) return ScalarType::Double;
  }
  return ScalarType::Float;
}

// The C++ type arithmetic on a T is done in: float for the 16-bit floats, T otherwise.
template <typename T>
struct Opmath {
  using type = T;
};
template <>
struct Opmath<c10::Half> {
  using type = float;
};
template <>
struct Opmath<c10::BFloat16> {
  using type = float;
};
template <typename T>
using opmath_t = typename Opmath<T>::type;

// float16 to and from the accumulation dtype through src/convert.h's masks (c10's conversions,
// the same bits, but they vectorise for AVX2); a float64 result goes through float, as
// c10::Half(double) does.
template <>
inline float to_acc<float, c10::Half>(c10::Half v) {
  return half_bits_to_float(v.x);
}
template <>
inline double to_acc<double, c10::Half>(c10::Half v) {
  return static_cast<double>(half_bits_to_float(v.x));
}
template <>
inline c10::Half from_acc<c10::Half, float>(float v) {
  return c10::Half(float_to_half_bits(v), c10::Half::from_bits());
}
template <>
inline c10::Half from_acc<c10::Half, double>(double v) {
  return c10::Half(float_to_half_bits(static_cast<float>(v)), c10::Half::from_bits());
}

inline bool is_float(ScalarType t) {
  return t == ScalarType::Float || t == ScalarType::Double || t == ScalarType::Half ||
         t == ScalarType::BFloat16;
}

// The name a Python user knows the dtype by.
inline std::string dtype_name(ScalarType t) {
  switch (t) {
    case ScalarType::Float: return "torch.float32";
    case ScalarType::Double: return "torch.float64";
    case ScalarType::Half: return "torch.float16";
    case ScalarType::BFloat16: return "torch.bfloat16";
    case ScalarType::Long: return "torch.int64";
    case ScalarType::Int: return "torch.int32";
    default: return std::string("torch.") + torch::headeronly::toString(t);
  }
}

// body(T()) with T the C++ type of a floating dtype; `op` names the caller in the error.
template <typename Body>
void dispatch_float(ScalarType t, const char* op, Body&& body) {
  switch (t) {
    case ScalarType::Float: body(float()); return;
    case ScalarType::Double: body(double()); return;
    case ScalarType::Half: body(c10::Half()); return;
    case ScalarType::BFloat16: body(c10::BFloat16()); return;
    default: STD_TORCH_CHECK(false, op, ": unsupported dtype ", dtype_name(t));
  }
}

// body(float()) or body(double()): the accumulation type `t` (acc_type's result).
template <typename Body>
void dispatch_acc(ScalarType t, Body&& body) {
  if (t == ScalarType::Double) {
    body(double());
  } else {
    body(float());
  }
}

// body(int64_t()) or body(int32_t()): the type of a bin_idx tensor.
template <typename Body>
void dispatch_index(ScalarType t, Body&& body) {
  if (t == ScalarType::Long) {
    body(int64_t());
  } else {
    body(int32_t());
  }
}

// ---------------------------------------------------------------------------- messages
inline std::string shape_of(const Tensor& t) {
  std::ostringstream out;
  out << '[';
  for (int64_t d = 0; d < t.dim(); ++d) out << (d ? ", " : "") << t.size(d);
  out << ']';
  return out.str();
}

inline std::string device_of(const Tensor& t) {
  const auto device = t.device();
  std::string name;
  switch (device.type()) {
    case torch::headeronly::DeviceType::CPU: return "cpu";
    case torch::headeronly::DeviceType::CUDA: name = "cuda"; break;
    case torch::headeronly::DeviceType::Meta: return "meta";
    default: name = "device type " + std::to_string(static_cast<int>(device.type()));
  }
  return device.index() >= 0 ? name + ":" + std::to_string(device.index()) : name;
}

// ---------------------------------------------------------------------------- ATen ops
// An ATen op called through the dispatcher with a stack of StableIValues; returns output 0.
template <size_t N>
Tensor call_aten(const char* name, const char* overload, std::array<StableIValue, N> stack) {
  static_assert(N >= 1, "an ATen op returns through stack[0]");
  TORCH_ERROR_CODE_CHECK(
      torch_call_dispatcher(name, overload, stack.data(), TORCH_ABI_VERSION));
  return torch::stable::detail::to<Tensor>(stack[0]);
}

inline Tensor movedim(const Tensor& t, int64_t source, int64_t destination) {
  using torch::stable::detail::from;
  return call_aten<3>("aten::movedim", "int", {from(t), from(source), from(destination)});
}

// Bytes per element of the dtypes the kernels allocate.
inline int64_t element_size(ScalarType t) {
  switch (t) {
    case ScalarType::Double:
    case ScalarType::Long: return 8;
    case ScalarType::Float:
    case ScalarType::Int: return 4;
    case ScalarType::Half:
    case ScalarType::BFloat16: return 2;
    default: return 1;
  }
}

// torch::stable::new_empty(like, sizes, dtype). A failure says what could not be allocated:
// built for torch 2.10's stable ABI, torch's own message ("not enough memory") does not come
// back through the C shim, only "... API call failed at <header>, line ...".
inline Tensor empty(std::initializer_list<int64_t> sizes, ScalarType dtype, const Tensor& like) {
  try {
    return torch::stable::new_empty(like, torch::headeronly::IntHeaderOnlyArrayRef(sizes), dtype);
  } catch (const std::exception&) {
    std::ostringstream what;
    double bytes = static_cast<double>(element_size(dtype));
    what << "could not allocate a [";
    for (auto it = sizes.begin(); it != sizes.end(); ++it) {
      what << (it == sizes.begin() ? "" : ", ") << *it;
      bytes *= static_cast<double>(*it);
    }
    what.precision(3);
    what << "] " << dtype_name(dtype) << " tensor (" << bytes / double(int64_t(1) << 30) << " GiB) on "
         << device_of(like);
    throw std::runtime_error(what.str());
  }
}

inline Tensor empty_sized_like(const Tensor& like, ScalarType dtype) {
  return torch::stable::new_empty(like, like.sizes(), dtype);
}

// t in `dtype`, t contiguous, or both: t itself when it already is. torch::stable::to and
// contiguous are dispatcher calls, a cost even when they return t (a noticeable part of a small
// calibrate call: benchmarks/results/cpu/design-constants.md), so they are called only for a
// tensor they change.
inline Tensor in_dtype(const Tensor& t, ScalarType dtype) {
  return t.scalar_type() == dtype ? t : torch::stable::to(t, dtype);
}
inline Tensor made_contiguous(const Tensor& t) { return t.is_contiguous() ? t : torch::stable::contiguous(t); }
inline Tensor contiguous_as(const Tensor& t, ScalarType dtype) { return made_contiguous(in_dtype(t, dtype)); }

// A tensor with the strides of torch.empty_like(like) (a fake kernel's), written by write(out)
// into a contiguous tensor `out` of like's shape and dtype: the result itself when it is
// contiguous, else a buffer copied into it.
template <typename Write>
Tensor write_like(const Tensor& like, Write&& write) {
  Tensor result = torch::stable::empty_like(like);
  if (like.numel() == 0) return result;
  Tensor out = result.is_contiguous() ? result : empty_sized_like(like, like.scalar_type());
  write(out);
  if (out.get() != result.get()) torch::stable::copy_(result, out);
  return result;
}

// Whether two elements of t share memory for certain (a dimension of stride 0 and size > 1: an
// expanded tensor), as at::has_internal_overlap's "Yes".
inline bool has_internal_overlap(const Tensor& t) {
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (t.size(d) > 1 && t.stride(d) == 0) return true;
  }
  return false;
}

}  // namespace dirfast
