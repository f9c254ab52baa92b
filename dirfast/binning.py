"""Mapping labels to bins, as the published DIR code does for each kind of label."""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["Binning"]


class Binning:
    """Maps labels to int64 bin indices in ``[0, num_bins - 1]``.

    Build one with :meth:`integer` (ages: ``int(label)``), :meth:`uniform` (equal-width bins, as
    STS-B-DIR and NYUD2-DIR), or ``Binning(edges)`` for any increasing edges. Calling it on a
    tensor (or array-like) of labels returns int64 indices on the labels' device, clamped into
    range: labels below the first bin join it, labels above the last join it.

    Example::

        >>> Binning.integer(121)(torch.tensor([0.0, 30.7, 200.0]))
        tensor([  0,  30, 120])
    """

    def __init__(self, edges) -> None:
        edges = np.asarray(edges, dtype=np.float64)
        if edges.ndim != 1 or edges.size < 2:
            raise ValueError(f"edges must be 1-D with at least 2 values, got shape {edges.shape}")
        if not np.all(np.isfinite(edges)) or not np.all(np.diff(edges) > 0):
            raise ValueError("edges must be finite and strictly increasing")
        self._edges = edges
        self._integer = False
        self._edges_on = {}  # device -> edges tensor, so binning never copies from the host again

    @classmethod
    def integer(cls, num_bins: int) -> "Binning":
        """Bins ``0 .. num_bins - 1`` of integer labels: ``bin = int(label)`` (truncated toward
        zero, as the published age code), clamped into range."""
        if isinstance(num_bins, bool) or not isinstance(num_bins, (int, np.integer)) or num_bins < 1:
            raise ValueError(f"num_bins must be a positive int, got {num_bins!r}")
        binning = cls(np.arange(int(num_bins) + 1, dtype=np.float64))
        binning._integer = True
        return binning

    @classmethod
    def uniform(cls, low: float, high: float, num_bins: int) -> "Binning":
        """``num_bins`` equal bins over ``[low, high]`` with numpy's histogram edges.

        As the published STS-B-DIR code, the edges are those ``np.histogram`` gives for float32
        data, a label falls in the bin whose right edge is the first strictly above it, and
        ``high`` itself goes to the last bin.
        """
        if isinstance(num_bins, bool) or not isinstance(num_bins, (int, np.integer)) or num_bins < 1:
            raise ValueError(f"num_bins must be a positive int, got {num_bins!r}")
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise ValueError(f"low and high must be finite with low < high, got {low} and {high}")
        edges = np.histogram_bin_edges(np.array([], dtype=np.float32), bins=int(num_bins),
                                       range=(low, high))
        return cls(edges)

    @property
    def num_bins(self) -> int:
        return self._edges.size - 1

    @property
    def edges(self) -> np.ndarray:
        """The ``num_bins + 1`` bin edges (float64 NumPy array)."""
        return self._edges.copy()

    def __repr__(self) -> str:
        if self._integer:
            return f"Binning.integer({self.num_bins})"
        return f"Binning(edges of {self.num_bins} bins over [{self._edges[0]:g}, {self._edges[-1]:g}])"

    def __eq__(self, other) -> bool:
        return isinstance(other, Binning) and np.array_equal(self._edges, other._edges)

    def __call__(self, labels, check: bool = True) -> torch.Tensor:
        """Bin indices (int64, on the labels' device) of ``labels`` (any shape).

        With ``check`` (the default), NaN or infinite labels raise ValueError; that check reads
        the labels on the host, so the training-path callers inside dirfast turn it off.
        """
        if not isinstance(labels, torch.Tensor):
            labels = torch.as_tensor(np.asarray(labels, dtype=np.float64))
        if labels.is_complex() or labels.dtype == torch.bool:
            raise TypeError(f"labels must be real numbers, got {labels.dtype}")
        # The finiteness check reads the labels on the host: skipped inside torch.compile graphs.
        if (check and labels.is_floating_point() and not torch.compiler.is_compiling()
                and not bool(torch.isfinite(labels).all())):
            raise ValueError("labels must be finite: found NaN or infinite values")
        last = self.num_bins - 1
        if self._integer:
            # int(label) truncates toward zero; clamp in float first so huge labels cannot overflow.
            return labels.double().clamp(-1.0, float(last + 1)).trunc().long().clamp(0, last)
        edges = self._edges_on.get(labels.device)
        if edges is None:
            edges = self._edges_on[labels.device] = torch.as_tensor(self._edges, device=labels.device)
        idx = torch.searchsorted(edges, labels.double().contiguous(), right=True) - 1
        return idx.clamp(0, last)
