"""Compile every Triton kernel of dirfast for a GPU, on a machine without one:
``python tests/triton_compile.py [--arch 90] [--cases NAME,...] [--json PATH]``.

The ops run on small CPU tensors with the launch sizes they choose on a GPU (not the
interpreter's), and every launch is compiled -- not run -- for ``sm_<arch>`` by the installed
Triton, through a stand-in for its CUDA driver that only names the target. For each kernel and
case it prints the shared memory the compiled kernel asks for and, from the ``ptxas`` Triton
bundles, its registers per thread and spills. So a session without a GPU learns whether a Triton
change compiles for the GPU at all, and what it costs on chip, before GPU time is spent (the GPU
machines run triton 3.6, CI and development 3.7: run it under both where both are installed).

Triton must not run under its interpreter here: with ``TRITON_INTERPRET`` set, the script starts
itself again without it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # dirfast from this checkout, installed or not
    sys.path.insert(0, ROOT)
if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):  # before triton is imported
    os.environ.pop("TRITON_INTERPRET")
    os.execv(sys.executable, [sys.executable, os.path.abspath(__file__), *sys.argv[1:]])

import torch  # noqa: E402
import triton  # noqa: E402
import triton.runtime.jit  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402


class _TargetOnlyDriver:
    """What Triton's JIT asks of the active driver to compile (not launch) a kernel."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


class _Compile:
    """Stands in for a @triton.jit kernel of a dirfast module: ``kernel[grid](...)`` compiles the
    launch (JITFunction.warmup: the same binding and specialisation as a launch) and records it."""

    def __init__(self, fn, record):
        self.fn, self.record = fn, record

    def __getitem__(self, grid):
        def compile_launch(*args, **kwargs):
            kernel = self.fn.warmup(*args, grid=grid, **kwargs)
            self.record(self.fn.fn.__name__, kwargs.get("num_warps", 4), kernel)
        return compile_launch


def _ptxas_report(ptx: str, arch: int) -> dict:
    """Registers per thread and spill bytes of ``ptx``, from the ptxas bundled with Triton."""
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        return {}
    suffix = "a" if arch >= 90 else ""
    with tempfile.TemporaryDirectory() as folder:
        source = os.path.join(folder, "kernel.ptx")
        with open(source, "w") as handle:
            handle.write(ptx)
        done = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}{suffix}", source, "-o",
                               os.path.join(folder, "kernel.cubin")], capture_output=True, text=True)
    text = done.stdout + done.stderr
    registers = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    return {"registers": int(registers.group(1)) if registers else None,
            "spill_bytes": int(spills.group(1)) + int(spills.group(2)) if spills else None}


def _cases():
    """(name, call) pairs: each op on the layouts and dtypes the GPU benchmarks and tests use, at
    sizes that pick the same kernels and launch sizes (rows enough for the "csr" strategy)."""
    from dirfast.triton import bin_stats, calibrate, conr_loss, mixture_logpdf, ranksim_loss, rnc_loss, smooth_bins

    gen = torch.Generator().manual_seed(0)
    cases = []
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        tag = str(dtype).replace("torch.", "")
        rows = torch.randn(8192, 512, generator=gen).to(dtype)
        rows_idx = torch.randint(0, 97, (8192,), generator=gen)
        dense = torch.randn(2, 64, 24, 32, generator=gen).to(dtype)
        dense_idx = torch.randint(0, 100, (2, 24, 32), generator=gen)
        for name in bin_stats.STRATEGIES:
            cases.append((f"bin_stats rows {tag} {name}",
                          lambda x=rows, i=rows_idx, s=name: bin_stats.bin_stats(x, i, 97, strategy=s)))
            cases.append((f"bin_stats dense {tag} {name}",
                          lambda x=dense, i=dense_idx, s=name: bin_stats.bin_stats(x, i, 100, strategy=s)))
        cases.append((f"bin_stats rows {tag} deterministic",
                      lambda x=rows, i=rows_idx: bin_stats.bin_stats(x, i, 97, deterministic=True)))
        stats = [torch.rand(97, 512, generator=gen) + 0.1 for _ in range(4)]  # src/dst mean and var
        dense_stats = [torch.rand(100, 64, generator=gen) + 0.1 for _ in range(4)]
        cases.append((f"calibrate rows {tag}", lambda x=rows, i=rows_idx, s=stats: calibrate.calibrate(x, i, *s)))
        cases.append((f"calibrate dense {tag}",
                      lambda x=dense, i=dense_idx, s=dense_stats: calibrate.calibrate(x, i, *s)))
        table = torch.rand(100, 2048, generator=gen).to(dtype)
        window = torch.tensor([0.25, 0.5, 0.25], dtype=dtype)
        cases.append((f"smooth_bins {tag}", lambda t=table, w=window: smooth_bins.smooth_bins(t, w, "reflect")))
        for k in (8, 100):  # GAI's components, BNI's NYUD2-DIR bins
            pred = torch.rand(2, 1, 24, 32, generator=gen).to(dtype) * 10
            tables = [torch.rand(k, generator=gen, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
                      + 0.1 for _ in range(3)]
            cases.append((f"mixture_logpdf K={k} {tag}",
                          lambda x=pred, t=tables: mixture_logpdf.mixture_logpdf(x, *t)))
            cases.append((f"mixture_logpdf_backward K={k} {tag}", lambda x=pred, t=tables: mixture_logpdf.mixture_logpdf_backward(
                torch.ones(x.shape, dtype=t[0].dtype), x, torch.zeros(x.shape, dtype=t[0].dtype), *t)))
            cases.append((f"mixture_logpdf_with_grads K={k} {tag}",
                          lambda x=pred, t=tables: mixture_logpdf.mixture_logpdf_with_grads(x, *t)))
        z, y = torch.randn(512, 128, generator=gen).to(dtype), torch.randint(0, 100, (512, 1), generator=gen).to(dtype)
        cases.append((f"rnc_loss {tag}", lambda z=z, y=y: rnc_loss.rnc_loss(z, y, 2.0, 0, 512)))
        cases.append((f"rnc_loss_backward {tag}", lambda z=z, y=y: rnc_loss.rnc_loss_backward(
            torch.ones(512, dtype=torch.float64 if z.dtype == torch.float64 else torch.float32), z, y, 2.0, 0, 512)))
        conr = (torch.randn(512, 512, generator=gen).to(dtype), torch.rand(512, 1, generator=gen).to(dtype) * 50,
                torch.rand(512, 1, generator=gen).to(dtype) * 50, torch.rand(512, generator=gen).to(dtype))
        options = (1.0, 0.07, 0.01, True, True, False, 0, 512)
        cases.append((f"conr_loss {tag}", lambda t=conr: conr_loss.conr_loss(*t, *options)))
        cases.append((f"conr_loss_backward {tag}", lambda t=conr: conr_loss.conr_loss_backward(
            torch.ones(512, dtype=torch.float64 if dtype == torch.float64 else torch.float32), *t, *options)))
        rank = (torch.randn(256, 512, generator=gen).to(dtype), torch.randperm(1024, generator=gen)[:256, None].to(dtype),
                torch.ones(256, dtype=torch.bool))
        cases.append((f"ranksim_loss {tag}", lambda t=rank: ranksim_loss.ranksim_loss(*t, 2.0, 0, 256)))
        cases.append((f"ranksim_loss_backward {tag}", lambda t=rank: ranksim_loss.ranksim_loss_backward(
            torch.ones(256, dtype=torch.float64 if dtype == torch.float64 else torch.float32), *t, 2.0, 0, 256)))
    return cases


def compile_all(arch: int = 90, only=None, shard=(0, 1)) -> list:
    """Compile every kernel launch of the cases (those whose name contains one of ``only``; of
    those, every ``shard[1]``-th from the ``shard[0]``-th) for sm_<arch>; one row per (case, kernel)."""
    driver.set_active(_TargetOnlyDriver(arch))
    from dirfast.triton import _common, bin_stats, calibrate, conr_loss, mixture_logpdf, ranksim_loss, rnc_loss, smooth_bins

    _common.check_device = lambda tensor, op: None  # CPU tensors stand in for CUDA ones

    rows, case_name = [], [""]

    def record(kernel, warps, compiled):
        rows.append({"case": case_name[0], "kernel": kernel, "num_warps": warps,
                     "shared_bytes": compiled.metadata.shared,
                     "approximate_sqrt": compiled.asm["ptx"].count("sqrt.approx"),
                     **_ptxas_report(compiled.asm["ptx"], arch)})

    for module in (bin_stats, calibrate, conr_loss, mixture_logpdf, ranksim_loss, rnc_loss, smooth_bins):
        for name, value in list(vars(module).items()):
            if isinstance(value, triton.runtime.jit.JITFunction) and name.endswith("_kernel"):
                setattr(module, name, _Compile(value, record))
    cases = [(name, call) for name, call in _cases() if not only or any(part in name for part in only)]
    for name, call in cases[shard[0]::shard[1]]:
        case_name[0] = name
        call()
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python tests/triton_compile.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90: H100/H200)")
    parser.add_argument("--cases", help="comma-separated parts of case names to keep (default: all)")
    parser.add_argument("--shard", default="0/1", metavar="K/N",
                        help="compile every N-th case from the K-th (0 <= K < N), to share the cases among processes")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    args = parser.parse_args(argv)
    only = [part for part in (args.cases or "").split(",") if part]
    try:
        shard = tuple(int(part) for part in args.shard.split("/"))
        if len(shard) != 2 or not 0 <= shard[0] < shard[1]:
            raise ValueError
    except ValueError:
        parser.error(f"--shard must be K/N with 0 <= K < N, got {args.shard!r}")
    rows = compile_all(args.arch, only, shard)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"triton": triton.__version__, "arch": args.arch, "rows": rows}, handle, indent=1)
    print(f"triton {triton.__version__}, sm_{args.arch}: {len(rows)} kernel launches compiled")
    print(f"{'case':<38} {'kernel':<18} {'warps':>5} {'shared B':>9} {'regs':>5} {'spill B':>7}")
    for row in rows:
        print(f"{row['case']:<38} {row['kernel']:<18} {row['num_warps']:>5} {row['shared_bytes']:>9} "
              f"{row.get('registers') or '?':>5} {row.get('spill_bytes') if row.get('spill_bytes') is not None else '?':>7}")


if __name__ == "__main__":
    main()
