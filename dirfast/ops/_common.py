"""What every dirfast op shares: the ``dirfast`` library, the accumulation-dtype rule, and the
registration of an op (schema, fake, reference, Triton entry) with ``torch.library``.

torch's dispatcher is the one dispatcher: each op's reference is its ``CompositeExplicitAutograd``
kernel, which a compiled kernel registered for a device key (the C++ CPU kernels, the CUDA
kernels) takes precedence over; on a GPU without compiled CUDA kernels the op's Triton entry is
registered for the CUDA key (:func:`register_triton_for_cuda`).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

NAMESPACE = "dirfast"
LIBRARY = torch.library.Library(NAMESPACE, "FRAGMENT")


# The padding modes of smooth_bins; a mode's number (its index here) is what its kernels receive
# (src/smooth.h numbers them the same).
PADDINGS = ("reflect", "replicate", "constant", "symmetric")


def acc_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype the ops compute in for inputs of ``dtypes``: float64 when any of them is
    float64, else float32 (float16 and bfloat16 are computed in float32). The C++ kernels apply
    the same rule (csrc/dirfast.h)."""
    for dtype in dtypes:
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtypes must be torch.dtype values, got {type(dtype).__name__}")
        if dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise TypeError(f"dtypes must be float16, bfloat16, float32 or float64 (what the ops compute from), "
                            f"got {dtype}")
    return torch.float64 if torch.float64 in dtypes else torch.float32


class Op(NamedTuple):
    """An op: its name; the pure-PyTorch reference (its definition); its Triton entry (None when
    it has none); and ``overload``, ``torch.ops.dirfast.<name>.default``, the call through torch's
    dispatcher (a plain field: torch.compile traces it on every torch dirfast supports)."""

    name: str
    reference: Callable
    triton: Callable | None
    overload: object

    @property
    def qualname(self) -> str:
        return f"{NAMESPACE}::{self.name}"

    def has_kernel(self, dispatch_key: str) -> bool:
        """Whether a kernel is registered for ``dispatch_key`` itself (not only the composite)."""
        return torch._C._dispatch_has_kernel_for_dispatch_key(self.qualname, dispatch_key)


OPS: dict = {}  # name -> Op, in the order the ops are defined


def define(schema: str, reference: Callable, fake: Callable, triton: Callable | None = None) -> Op:
    """Define ``dirfast::<op>`` from ``schema`` with its reference (the composite kernel, on any
    device without a compiled one) and its fake kernel; returns the :class:`Op`."""
    name = schema.split("(", 1)[0]
    LIBRARY.define(schema)
    LIBRARY.impl(name, reference, "CompositeExplicitAutograd")
    torch.library.register_fake(f"{NAMESPACE}::{name}", fake, lib=LIBRARY)
    overload = getattr(getattr(torch.ops, NAMESPACE), name).default
    for device_type in AUTOCAST_DEVICES:
        _register_without_autocast(name, overload, device_type)
    OPS[name] = Op(name, reference, triton, overload)
    return OPS[name]


# The devices whose autocast the ops step out of (_register_without_autocast).
AUTOCAST_DEVICES = ("cpu", "cuda")


def _register_without_autocast(name: str, overload, device_type: str) -> None:
    """Run ``overload`` with ``device_type``'s autocast off for everything it calls, its inputs
    as they are: each op computes in the dtype :func:`acc_dtype` gives, and a kernel that calls an
    ATen op (the pairwise ops' GEMMs) gets that op's result in that dtype, not autocast's (a
    custom op otherwise falls through the Autocast key with autocast still on inside it). As
    ``torch.library.register_autocast`` does, less its casts; a kernel for the Python dispatcher
    too, which torch.compile traces with. Only runs inside an enabled autocast region."""
    key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)
    key = getattr(torch._C.DispatchKey, key_name)

    def without_autocast(*args, **kwargs):
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(key)):
            return overload(*args, **kwargs)

    overload.py_impl(key)(without_autocast)
    LIBRARY.impl(name, lambda _keys, *args, **kwargs: without_autocast(*args, **kwargs), key_name, with_keyset=True)


def register_triton_for_cuda() -> None:
    """Make each op's Triton entry its CUDA kernel where no compiled CUDA kernel is registered
    (the entries import Triton on their first call)."""
    for op in OPS.values():
        if op.triton is not None and not op.has_kernel("CUDA"):
            LIBRARY.impl(op.name, op.triton, "CUDA")


# ---------------------------------------------------------------- row arithmetic of the pairwise ops
# F.normalize of the feature rows, its backward, and the L1 distances of label rows: written once for
# the references and the Triton entries of conr_loss and ranksim_loss, so every backend computes them alike.
NORMALIZE_EPS = 1e-12  # F.normalize's: a row of norm below it is divided by it instead


def normalize_rows(features: torch.Tensor, acc: torch.dtype):
    """``(q, norms)``: the rows of ``features`` in ``acc`` over ``max(norm, NORMALIZE_EPS)``, and the norms
    ``[m, 1]``."""
    z = features.to(acc)
    norms = torch.linalg.vector_norm(z, dim=1, keepdim=True)
    return z / norms.clamp_min(NORMALIZE_EPS), norms


def normalize_rows_backward(grad_q: torch.Tensor, q: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """The gradient in ``z`` of ``q = z / max(||z||, NORMALIZE_EPS)`` from the gradient in ``q``."""
    along = (q * grad_q).sum(1, keepdim=True)
    return torch.where(norms >= NORMALIZE_EPS, (grad_q - q * along) / norms, grad_q / NORMALIZE_EPS)


def centred_rows(z: torch.Tensor) -> torch.Tensor:
    """The rows of ``z`` less their mean: for sums of row differences taken as products
    (``w @ z - w.sum() * z_i``, RnC's backward), whose terms are then of the rows' spread and do
    not cancel where the rows share an offset far larger than it."""
    return z - z.mean(0, keepdim=True)


def l1_distances(values: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """``[count, m]`` L1 distances of the anchor rows to every row of ``values``, summed over the
    label columns in order (as every kernel sums them)."""
    dist = torch.zeros(anchors.shape[0], values.shape[0], dtype=values.dtype, device=values.device)
    for k in range(values.shape[1]):  # the label dimensions (few), not the rows
        dist += (anchors[:, k:k + 1] - values[:, k]).abs()
    return dist


def descending_order(values: torch.Tensor) -> torch.Tensor:
    """Each row's columns in descending order of value (NaN first), ties by column index, the
    higher first (RankSim's tie rule): a stable descending sort of the flipped row."""
    last = values.shape[1] - 1
    return last - torch.sort(values.flip(1), dim=1, descending=True, stable=True).indices
