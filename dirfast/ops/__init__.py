"""The fused operations of dirfast, one module each, all ``torch.library`` ops in the ``dirfast``
namespace (``torch.ops.dirfast.<name>``) with fake kernels, so ``torch.compile(fullgraph=True)``
and ``torch.export`` see through them.

Each module holds its op's whole Python story: the schema, the argument checks of the public
function, the fake kernel, the autograd, the pure-PyTorch reference and the Triton entry. The
compiled kernels (``dirfast._C`` on CPU, ``dirfast._C_cuda`` on CUDA) register themselves for the
same ops when they load; :func:`backends` says what can run here.
"""

from .. import _ext
from . import _common
from ._checks import FLOAT_DTYPES  # the dtypes the ops compute in, for dirfast._validate
from ._checks import as_float, in_place_problem  # for dirfast._validate's numbers, dirfast._autograd's in-place checks
from ._dispatch import refuse_unsupported_derivatives  # for the Balanced MSE losses' own autograd nodes
from ._common import acc_dtype
from ._dispatch import (BACKENDS, CPU_THREADS, backends, get_backend, get_cpu_threads, set_backend, set_cpu_threads,
                        use_backend)
from .bin_stats import bin_stats
from .integer_bins import integer_bins
from .accumulate_bin_stats import accumulate_bin_stats_
from .smooth_bins import PADDINGS, smooth_bins
from .calibrate import calibrate, calibrate_  # noqa: I001 (the order of definition is the order reported)
from .mixture_logpdf import mixture_logpdf
from .rnc_loss import rnc_loss
from .conr_loss import conr_loss
from .ranksim_loss import ranksim_loss

_ext.load()  # after the schemas: the compiled kernels register for them
_common.register_triton_for_cuda()

__all__ = [
    "BACKENDS", "CPU_THREADS", "PADDINGS", "acc_dtype", "accumulate_bin_stats_", "backends", "bin_stats", "calibrate",
    "calibrate_", "conr_loss", "get_backend", "get_cpu_threads", "integer_bins", "mixture_logpdf", "ranksim_loss",
    "rnc_loss", "set_backend", "set_cpu_threads", "smooth_bins", "use_backend",
]
