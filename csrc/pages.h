// A fresh CPU output's pages mapped before a kernel writes it, in one call per piece.
//
// A new tensor's memory is mapped on its first write, a page fault per 4 KiB page: on this
// project's VMs most of what a large clone costs. MADV_POPULATE_WRITE (Linux 5.14) maps a range in
// the kernel's own loop, without a fault per page; threads take pieces of it. Only for memory
// nobody has touched: its first page is asked with mincore, since populating pages already mapped
// walks them again for nothing (benchmarks/results/cpu/out-of-place-zen4.md, design-constants.md).
// The pages are the allocator's ordinary ones: huge pages for an output can cost more on VMs that
// hand free memory back to their host (benchmarks/huge_pages.py,
// benchmarks/results/cpu/huge-pages.txt).
// Changes no value; refused (an older kernel, no memory left) or off Linux, it does nothing and
// the pages fault as they are written.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>  // madvise, mincore
#include <unistd.h>
#endif

#include "dirfast.h"
#include "parallel.h"

namespace dirfast {

#if defined(__linux__)
// MADV_POPULATE_WRITE's value in the kernel's ABI, for C libraries whose headers predate it (a wheel
// built on an old glibc); a kernel before 5.14 refuses it.
constexpr int kMadvPopulateWrite = 23;
#endif
constexpr int64_t kPopulateBytes = int64_t(4) << 20;     // smaller outputs fault as they are written
constexpr int64_t kPopulatePieceBytes = int64_t(8) << 20;  // the least a thread maps

// Maps the pages of y's memory (a tensor just allocated, dense) when it is large and untouched.
inline void populate_output(const Tensor& y) {
#if defined(__linux__)
  const int64_t bytes = y.numel() * static_cast<int64_t>(y.element_size());
  if (bytes < kPopulateBytes) return;
  const long page_size = sysconf(_SC_PAGESIZE);
  if (page_size <= 0) return;
  const uintptr_t page = static_cast<uintptr_t>(page_size);
  const uintptr_t begin = reinterpret_cast<uintptr_t>(y.data_ptr());
  const uintptr_t first = (begin + page - 1) & ~(page - 1);
  const uintptr_t last = (begin + static_cast<uintptr_t>(bytes)) & ~(page - 1);
  if (last <= first) return;
  unsigned char resident = 0;
  if (mincore(reinterpret_cast<void*>(first), page, &resident) != 0 || (resident & 1)) return;
  const int64_t pages = static_cast<int64_t>((last - first) / page);
  const int64_t grain = std::max<int64_t>(1, kPopulatePieceBytes / static_cast<int64_t>(page));
  parallel_for_ranges(pages, grain, [&](int64_t b, int64_t e) {
    // A hint: refused, the pages fault as before.
    (void)madvise(reinterpret_cast<void*>(first + b * page), (e - b) * page, kMadvPopulateWrite);
  });
#else
  (void)y;
#endif
}

}  // namespace dirfast
