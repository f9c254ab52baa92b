"""Build dirfast and its compiled kernels on torch's stable ABI.

``dirfast._C``, the CPU kernels (csrc/cpu/*.cpp), is always built: C++ against torch's stable
C shims and header-only API only (``TORCH_TARGET_VERSION`` 2.10) and Python's limited API, so
one ``cp310-abi3`` wheel serves every CPython >= 3.10 and every torch >= 2.10. A failed build
fails the install with the compiler's message.

``dirfast._C_cuda``, the CUDA kernels (csrc/cuda/*.cu, on the same stable footing), is built
when the installed torch has CUDA and an nvcc of the same major CUDA version is found, or when
FORCE_CUDA=1 asks for it (then a missing nvcc is an error). Without it, dirfast runs its Triton
kernels on a GPU.

Switches (environment variables, read here only):
  DIRFAST_NO_EXT=1      pure Python: no compiled kernels (dirfast runs its reference kernels).
  FORCE_CUDA=1          build the CUDA kernels whatever torch is installed.
  CUDA_HOME             the CUDA toolkit (else nvcc on PATH, else /usr/local/cuda).
  TORCH_CUDA_ARCH_LIST  GPU architectures (default "8.0;9.0+PTX": A100, H100 and later).
  MAX_JOBS              parallel compile jobs.
"""

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup
from setuptools.command.build import build

HERE = os.path.dirname(os.path.abspath(__file__))
TORCH_TARGET = "0x020a000000000000"  # torch 2.10: the oldest torch the compiled kernels run on
PY_LIMITED_API = "0x030A0000"  # CPython 3.10
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"


def _flag(name):
    return os.environ.get(name, "0") not in ("", "0")


def _say(message):
    print(f"dirfast: {message}", file=sys.stderr)


def _cuda_home():
    """The CUDA toolkit to build the CUDA kernels with, or None to build without them."""
    import torch

    if not (torch.version.cuda or _flag("FORCE_CUDA")):
        _say("the installed torch has no CUDA: building the CPU kernels only (FORCE_CUDA=1 builds the CUDA "
             "kernels too)")
        return None
    nvcc = shutil.which("nvcc")
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
                 os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None, "/usr/local/cuda"):
        if (home and os.path.exists(os.path.join(home, "bin", "nvcc"))
                and os.path.exists(os.path.join(home, "include", "cuda_runtime_api.h"))):
            return _matching_toolkit(home, torch.version.cuda)
    if _flag("FORCE_CUDA"):
        raise RuntimeError("FORCE_CUDA=1 but nvcc was not found: set CUDA_HOME or put nvcc on PATH")
    _say("nvcc not found: building without the CUDA kernels (Triton runs on the GPU); set CUDA_HOME, or "
         "FORCE_CUDA=1 to require them")
    return None


def _matching_toolkit(home, torch_cuda):
    """``home``, or None when its nvcc's major CUDA version differs from torch's (torch's build
    refuses that pair: without FORCE_CUDA=1 the install goes on without the CUDA kernels)."""
    if not torch_cuda or _flag("FORCE_CUDA"):
        return home
    nvcc = os.path.join(home, "bin", "nvcc")
    try:
        found = re.search(r"release (\d+)\.", subprocess.run([nvcc, "--version"], capture_output=True, text=True,
                                                             timeout=60).stdout)
    except (OSError, subprocess.SubprocessError):
        found = None
    if found is None or found.group(1) == torch_cuda.split(".")[0]:
        return home
    _say(f"{nvcc} is CUDA {found.group(1)}, torch was built with CUDA {torch_cuda}: building without the CUDA "
         f"kernels (Triton runs on the GPU); set CUDA_HOME to a CUDA {torch_cuda.split('.')[0]} toolkit to build them")
    return None


class FreshBuild(build):
    """``build`` into an emptied ``build/lib*/dirfast``: pip builds in the checkout, and setuptools
    puts everything it finds there into the wheel, so the CUDA kernels of an earlier build against a
    CUDA torch, or a module since removed, would go into a later wheel (the sources' compiled
    objects stay, so a rebuild only links)."""

    def run(self):
        shutil.rmtree(os.path.join(self.build_lib, "dirfast"), ignore_errors=True)
        super().run()


def _extensions():
    if _flag("DIRFAST_NO_EXT"):
        _say("DIRFAST_NO_EXT set: pure Python, no compiled kernels")
        return {"cmdclass": {"build": FreshBuild}}
    cuda_home = _cuda_home()
    if cuda_home:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    import torch
    from torch.utils import cpp_extension
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    if cuda_home and not cpp_extension.CUDA_HOME:
        # A CPU-only torch knows no toolkit (FORCE_CUDA=1): point its build at the one found here.
        cpp_extension.CUDA_HOME = cuda_home

    stable = [("TORCH_TARGET_VERSION", TORCH_TARGET), ("Py_LIMITED_API", PY_LIMITED_API)]
    # No debug information and a stripped library: the wheel carries code only. (-Wno-psabi: the
    # AVX-512 clones of the mixture kernel pass 64-byte vectors between internal functions.)
    release = ["-O3", "-g0", "-fvisibility=hidden", "-Wno-psabi"]
    common = dict(include_dirs=[os.path.join(HERE, "csrc"), os.path.join(HERE, "src")], define_macros=stable,
                  extra_link_args=["-s"], py_limited_api=True)
    modules = [CppExtension("dirfast._C", sources=["csrc/module.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp")),
                            extra_compile_args={"cxx": release}, **common)]
    if cuda_home:
        lib = os.path.join(cuda_home, "lib64") if os.path.isdir(os.path.join(cuda_home, "lib64")) else \
            os.path.join(cuda_home, "lib")
        torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
        # The stable C shims of CUDA (the current stream) live in libtorch_cuda, absent from a CPU-only
        # torch: FORCE_CUDA=1 then still compiles and links the module, which such a torch never loads.
        torch_cuda = ["torch_cuda"] if glob.glob(os.path.join(torch_lib, "libtorch_cuda*")) else []
        modules.append(CppExtension(
            "dirfast._C_cuda", sources=["csrc/cuda/module.cpp"] + sorted(glob.glob("csrc/cuda/*.cu")),
            extra_compile_args={"cxx": release, "nvcc": ["-O3", "--expt-relaxed-constexpr"]},
            library_dirs=[lib], libraries=["cudart"] + torch_cuda, runtime_library_dirs=[lib],
            **dict(common, define_macros=stable + [("USE_CUDA", "1")])))
        _say(f"building the CUDA kernels with {os.path.join(cuda_home, 'bin', 'nvcc')} for "
             f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
    return {"ext_modules": modules, "cmdclass": {"build": FreshBuild, "build_ext": BuildExtension},
            "options": {"bdist_wheel": {"py_limited_api": "cp310"}}}


setup(**_extensions())
