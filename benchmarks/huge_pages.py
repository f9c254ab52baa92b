"""Whether transparent huge pages would pay for a fresh output: ``python -m benchmarks.huge_pages``.

A new tensor's memory is mapped on its first write, a page fault per 4 KiB page: most of what a
clone of 128 MiB costs. Advising huge pages (``madvise(MADV_HUGEPAGE)`` on the 2 MiB-aligned span,
what torch's ``THP_MEM_ALLOC_ENABLE=1`` does) makes that a fault per 2 MiB. dirfast tried it for
calibrate's output (56f753a) and took it out (benchmarks/results/cpu/huge-pages.txt): on a VM whose
balloon takes back free memory in 2 MiB blocks (virtio free page reporting), a huge page can be
one the host has to map again, and the first output after other work freed memory took 2-3x a
clone. This times, for float32 features of 8, 32 and 128 MiB on the threads torch has:

* back to back, interleaved (medians of 15): ``x.clone()`` and the same copy into
  ``torch.empty_like(x)`` advised onto huge pages;
* each of them once right after the published per-bucket calibrate loop over 10,000 bins (which
  allocates and frees much memory), three times (128 MiB only).

Prints the kernel's THP setting and whether free pages are reported to a hypervisor. Linux only.
"""

from __future__ import annotations

import ctypes
import os
import statistics
import time

import torch

from . import cases
from .published import published_calibrate

MADV_HUGEPAGE = 14
HUGE = 2 << 20


def advised_empty_like(x, libc):
    y = torch.empty_like(x)
    begin = y.data_ptr()
    first = (begin + HUGE - 1) & ~(HUGE - 1)
    last = (begin + y.numel() * y.element_size()) & ~(HUGE - 1)
    if last > first and libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), MADV_HUGEPAGE):
        raise OSError(ctypes.get_errno(), "madvise(MADV_HUGEPAGE) failed")
    return y


def _ms(f):
    t0 = time.perf_counter()
    out = f()
    elapsed = time.perf_counter() - t0
    del out
    return elapsed * 1e3


def main(rounds=15):
    libc = ctypes.CDLL(None, use_errno=True)
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
        thp = f.read().strip()
    order = "/sys/module/page_reporting/parameters/page_reporting_order"
    reporting = open(order).read().strip() if os.path.exists(order) else "none"
    print(f"transparent_hugepage: {thp}; free page reporting order: {reporting}; threads "
          f"{torch.get_num_threads()}; load before {os.getloadavg()}")
    for mib in (8, 32, 128):
        x = torch.randn(mib << 18 >> 9, 512)
        work = {"clone": lambda: x.clone(), "copy to huge pages": lambda: advised_empty_like(x, libc).copy_(x)}
        times = {k: [] for k in work}
        for _ in range(rounds):
            for name, f in work.items():
                times[name].append(_ms(f))
        for name, t in times.items():
            print(f"{mib:4d} MiB back to back  {name:20s} {statistics.median(t):8.2f} ms")
    t = cases.inputs("65536x512", "cpu", 10000)
    x = t["x"]
    work = {"clone": lambda: x.clone(), "copy to huge pages": lambda: advised_empty_like(x, libc).copy_(x)}
    for name, f in work.items():
        after = []
        for _ in range(3):
            published_calibrate(*(t[k] for k in ("x", "bin_idx", "m1", "v1", "m2", "v2")))  # output freed here
            after.append(_ms(f))
        print(f" 128 MiB after the published loop  {name:20s} " + ", ".join(f"{a:.1f}" for a in after) + " ms")
    print(f"load after {os.getloadavg()}")


if __name__ == "__main__":
    main()
