// A fresh CPU output that a kernel writes whole, mapped in huge pages where Linux gives them.
//
// A new tensor's memory is mapped on its first write, a page fault per 4 KiB page: for a
// 128 MiB output, most of what a clone of it costs (benchmarks/results/cpu/huge-pages.txt).
// Transparent huge pages advised on the 2 MiB-aligned span of the output before anything is
// written make that one fault per 2 MiB. The advice changes no value, only how the memory is
// mapped; where transparent huge pages are off, or off Linux, it does nothing.
//
// Only for outputs of at least kHugePageOutputBytes: glibc maps an allocation that large on
// its own (its mmap threshold stops growing at 32 MiB on 64-bit), so the advice lands on memory
// no one has touched and splits no mapping another allocation shares.
#pragma once

#include <cstddef>
#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "dirfast.h"

namespace dirfast {

constexpr size_t kHugePageOutputBytes = size_t(32) << 20;

// torch.empty_like(x) (same strides, not initialised), its pages advised huge when it is large.
inline Tensor empty_output_like(const Tensor& x) {
  Tensor y = torch::stable::empty_like(x);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const size_t bytes = static_cast<size_t>(y.numel()) * y.element_size();
  if (bytes >= kHugePageOutputBytes) {
    constexpr uintptr_t kHuge = uintptr_t(2) << 20;
    const uintptr_t begin = reinterpret_cast<uintptr_t>(y.mutable_data_ptr());
    const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1);
    const uintptr_t last = (begin + bytes) & ~(kHuge - 1);
    // A hint: when it is refused (EINVAL where the kernel has no THP), the pages stay small.
    if (last > first) (void)madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
  }
#endif
  return y;
}

}  // namespace dirfast
