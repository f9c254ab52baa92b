"""The fused operations every dirfast backend implements: the front end.

Each is a ``torch.library`` op in the ``dirfast`` namespace (``torch.ops.dirfast.<name>``,
defined in :mod:`dirfast.contract`) with a fake kernel, so ``torch.compile(fullgraph=True)`` and
``torch.export`` see through it. The functions here check their arguments and call the kernel of
the selected backend (:func:`set_backend`, :func:`use_backend`); :func:`backends` says which can
run here.
"""

from ..contract import PADDINGS, SCHEMAS
from ._dispatch import BACKENDS, backends, get_backend, set_backend, use_backend
from .bin_stats import bin_stats
from .calibrate import calibrate, calibrate_
from .mixture_logpdf import mixture_logpdf
from .smooth_bins import smooth_bins

__all__ = [
    "BACKENDS", "PADDINGS", "SCHEMAS", "backends", "bin_stats", "calibrate", "calibrate_", "get_backend",
    "mixture_logpdf", "set_backend", "smooth_bins", "use_backend",
]
