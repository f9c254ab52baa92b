"""dirfast: fast Deep Imbalanced Regression (LDS, FDS and Balanced MSE) for PyTorch.

An accelerated drop-in for the published DIR code (Yang et al., ICML 2021): the same numbers,
computed by fused kernels (C++ on CPU, Triton and CUDA C++ on GPU) behind a pure-PyTorch
reference. See README.md for a migration guide.
"""

from . import losses, metrics, mixture, ops, presets
from .binning import Binning, GridBinning
from .density import DenseWeight, density_weights
from .fds import FDS
from .lds import LDS, lds_weights
from .ops import backends, get_backend, get_cpu_threads, set_backend, set_cpu_threads, use_backend
from .windows import get_lds_kernel_window, kernel_window

__version__ = "0.1.0"

__all__ = [
    "Binning", "DenseWeight", "FDS", "GridBinning", "LDS", "backends", "density_weights", "get_backend",
    "get_cpu_threads", "get_lds_kernel_window", "kernel_window", "lds_weights", "losses", "metrics", "mixture", "ops",
    "presets", "set_backend", "set_cpu_threads", "use_backend",
]
