"""Bad input across the public API: each case is an input and the error it must raise (a type
and a message naming the argument) or the documented behaviour it must have.

The op cases run on every backend available here and must fail the same way on each; the
state cases check that a failed call changes nothing. README.md, "Numerics and bad input",
states the policies tested here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest
import torch

import dirfast
from dirfast import ops
from dirfast.presets import STS_B_DIR
from testing import BACKEND_NAMES, gen

OPS = torch.ops.dirfast
CPU_BACKENDS = [name for name in BACKEND_NAMES if dirfast.backends()[name]["available"]]


@dataclass
class Bad:
    id: str
    call: Callable
    error: type
    match: str

    def __repr__(self) -> str:
        return self.id


def x_idx(n=8, d=3, num_bins=3):
    g = gen(1)
    return torch.randn(n, d, generator=g), torch.randint(-1, num_bins + 1, (n,), generator=g)


def tables(num_bins=3, d=3):
    return torch.zeros(num_bins, d), torch.ones(num_bins, d), torch.zeros(num_bins, d), torch.full((num_bins, d), 2.0)


X, IDX = x_idx()
M1, V1, M2, V2 = tables()
W = torch.ones(3)

# =========================================================================== ops (every backend)
OP_CASES = [
    Bad("bin_stats x list", lambda: ops.bin_stats(X.tolist(), IDX, 3), TypeError, "x must be a torch.Tensor"),
    Bad("bin_stats x int", lambda: ops.bin_stats(X.long(), IDX, 3), TypeError, "x must be float"),
    Bad("bin_stats x complex", lambda: ops.bin_stats(X.to(torch.complex64), IDX, 3), TypeError, "x must be float"),
    Bad("bin_stats x 1-D", lambda: ops.bin_stats(X[:, 0], IDX, 3), ValueError, "x must be"),
    Bad("bin_stats x 0-D", lambda: ops.bin_stats(X[0, 0], IDX, 3), ValueError, "x must be"),
    Bad("bin_stats bin_idx float", lambda: ops.bin_stats(X, IDX.float(), 3), TypeError, "bin_idx"),
    Bad("bin_stats bin_idx uint8", lambda: ops.bin_stats(X, IDX.clamp(min=0).byte(), 3), TypeError, "bin_idx"),
    Bad("bin_stats bin_idx short", lambda: ops.bin_stats(X, IDX[:5], 3), ValueError, "bin_idx must have shape"),
    Bad("bin_stats bin_idx [N, 1]", lambda: ops.bin_stats(X, IDX[:, None], 3), ValueError, "bin_idx must have shape"),
    Bad("bin_stats dense bin_idx [B, 1, H, W]", lambda: ops.bin_stats(torch.zeros(2, 3, 4, 5),
        torch.zeros(2, 1, 4, 5, dtype=torch.long), 3), ValueError, "bin_idx must have shape"),
    Bad("bin_stats bin_idx numpy", lambda: ops.bin_stats(X, IDX.numpy(), 3), TypeError, "bin_idx"),
    Bad("bin_stats num_bins 0", lambda: ops.bin_stats(X, IDX, 0), ValueError, "num_bins"),
    Bad("bin_stats num_bins -1", lambda: ops.bin_stats(X, IDX, -1), ValueError, "num_bins"),
    Bad("bin_stats num_bins 2^40", lambda: ops.bin_stats(X, IDX, 2 ** 40), ValueError, "num_bins"),
    Bad("bin_stats num_bins float", lambda: ops.bin_stats(X, IDX, 3.0), TypeError, "num_bins"),
    Bad("bin_stats num_bins bool", lambda: ops.bin_stats(X, IDX, True), TypeError, "num_bins"),
    Bad("bin_stats num_bins tensor", lambda: ops.bin_stats(X, IDX, torch.tensor(3)), TypeError, "num_bins"),
    Bad("smooth_bins stats int", lambda: ops.smooth_bins(M1.long(), W), TypeError, "stats"),
    Bad("smooth_bins stats 3-D", lambda: ops.smooth_bins(torch.ones(3, 2, 2), W), ValueError, "stats"),
    Bad("smooth_bins no bins", lambda: ops.smooth_bins(torch.ones(0, 3), W), ValueError, "stats"),
    Bad("smooth_bins window even", lambda: ops.smooth_bins(M1, torch.ones(4)), ValueError, "window"),
    Bad("smooth_bins window empty", lambda: ops.smooth_bins(M1, torch.ones(0)), ValueError, "window"),
    Bad("smooth_bins window 2-D", lambda: ops.smooth_bins(M1, torch.ones(3, 1)), ValueError, "window"),
    Bad("smooth_bins window list", lambda: ops.smooth_bins(M1, [1.0, 1.0, 1.0]), TypeError, "window"),
    Bad("smooth_bins padding unknown", lambda: ops.smooth_bins(M1, W, "wrap"), ValueError, "padding"),
    Bad("smooth_bins padding None", lambda: ops.smooth_bins(M1, W, None), ValueError, "padding"),
    Bad("calibrate x int", lambda: ops.calibrate(X.long(), IDX, M1, V1, M2, V2), TypeError, "x must be float"),
    Bad("calibrate bin_idx short", lambda: ops.calibrate(X, IDX[:4], M1, V1, M2, V2), ValueError, "bin_idx"),
    Bad("calibrate src_mean 1-D", lambda: ops.calibrate(X, IDX, M1[0], V1, M2, V2), ValueError, "src_mean"),
    Bad("calibrate no bins", lambda: ops.calibrate(X, IDX, *(t[:0] for t in (M1, V1, M2, V2))), ValueError, "src_mean"),
    Bad("calibrate src_mean D mismatch", lambda: ops.calibrate(X, IDX, M1[:, :2], V1, M2, V2), ValueError, "src_mean"),
    Bad("calibrate src_var shape", lambda: ops.calibrate(X, IDX, M1, V1[:, :1], M2, V2), ValueError, "src_var"),
    Bad("calibrate dst_var bins", lambda: ops.calibrate(X, IDX, M1, V1, M2, V2[:2]), ValueError, "dst_var"),
    Bad("calibrate dst_mean int", lambda: ops.calibrate(X, IDX, M1, V1, M2.long(), V2), TypeError, "dst_mean"),
    Bad("calibrate clips reversed", lambda: ops.calibrate(X, IDX, M1, V1, M2, V2, 2.0, 1.0), ValueError, "clip_min"),
    Bad("calibrate clip_min negative", lambda: ops.calibrate(X, IDX, M1, V1, M2, V2, -1.0, 1.0), ValueError, "clip_min"),
    Bad("calibrate clip NaN", lambda: ops.calibrate(X, IDX, M1, V1, M2, V2, float("nan"), 1.0), ValueError, "clip_min"),
    Bad("calibrate clip beyond float32", lambda: ops.calibrate(X, IDX, M1, V1, M2, V2, 1e300, 1e301), ValueError, "clip"),
    Bad("calibrate clip str", lambda: ops.calibrate(X, IDX, M1, V1, M2, V2, "0.1"), TypeError, "clip_min"),
    Bad("calibrate clip bool", lambda: ops.calibrate(X, IDX, M1, V1, M2, V2, 0.1, True), TypeError, "clip_max"),
    Bad("mixture_logpdf x int", lambda: ops.mixture_logpdf(IDX, W, W, W), TypeError, "x must be float"),
    Bad("mixture_logpdf x list", lambda: ops.mixture_logpdf([1.0], W, W, W), TypeError, "x must be a torch.Tensor"),
    Bad("mixture_logpdf means 2-D", lambda: ops.mixture_logpdf(X, W[:, None], W, W), ValueError, "means"),
    Bad("mixture_logpdf no components", lambda: ops.mixture_logpdf(X, W[:0], W[:0], W[:0]), ValueError, "means"),
    Bad("mixture_logpdf variances short", lambda: ops.mixture_logpdf(X, W, W[:2], W), ValueError, "variances"),
    Bad("mixture_logpdf log_weights int", lambda: ops.mixture_logpdf(X, W, W, W.long()), TypeError, "log_weights"),
    Bad("calibrate_ expanded x", lambda: ops.calibrate_(torch.zeros(1, 3).expand(8, 3), IDX, M1, V1, M2, V2),
        RuntimeError, "share memory"),
    Bad("calibrate_ leaf requiring grad", lambda: ops.calibrate_(X.clone().requires_grad_(), IDX, M1, V1, M2, V2),
        RuntimeError, "leaf"),
    Bad("calibrate_ view of a leaf requiring grad", lambda: ops.calibrate_(
        torch.zeros(8, 4, requires_grad=True)[:, :3], IDX, M1, V1, M2, V2), RuntimeError, "view of a leaf"),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", OP_CASES, ids=repr)
def test_ops_reject(case, backend):
    with dirfast.use_backend(backend), pytest.raises(case.error, match=case.match):
        case.call()


# torch.ops.dirfast called directly: the C++ kernels check their arguments themselves.
DISPATCHER_CASES = [
    Bad("x int", lambda: OPS.bin_stats(X.long(), IDX, 3), RuntimeError, "x must be float"),
    Bad("bin_idx float", lambda: OPS.bin_stats(X, IDX.float(), 3), RuntimeError, "bin_idx"),
    Bad("bin_idx short", lambda: OPS.bin_stats(X, IDX[:5], 3), RuntimeError, "bin_idx"),
    Bad("num_bins 0", lambda: OPS.bin_stats(X, IDX, 0), RuntimeError, "num_bins"),
    Bad("m1 D", lambda: OPS.calibrate(X, IDX, M1[:, :2], V1, M2, V2), RuntimeError, "src_mean"),
    Bad("v2 bins", lambda: OPS.calibrate(X, IDX, M1, V1, M2, V2[:2]), RuntimeError, "dst_var"),
    Bad("clips reversed", lambda: OPS.calibrate(X, IDX, M1, V1, M2, V2, 2.0, 1.0), RuntimeError, "clip_min"),
    Bad("window even", lambda: OPS.smooth_bins(M1, torch.ones(4), "reflect"), RuntimeError, "window"),
    Bad("padding unknown", lambda: OPS.smooth_bins(M1, W, "circular"), RuntimeError, "padding"),
    Bad("stats 3-D", lambda: OPS.smooth_bins(torch.ones(2, 2, 2), W, "reflect"), RuntimeError, "stats"),
    Bad("calibrate_ expanded x", lambda: OPS.calibrate_(torch.zeros(1, 3).expand(8, 3), IDX, M1, V1, M2, V2),
        RuntimeError, "share memory"),
    Bad("mixture x int", lambda: OPS.mixture_logpdf(IDX, W, W, W), RuntimeError, "x must be float"),
    Bad("mixture means 2-D", lambda: OPS.mixture_logpdf(X, W[:, None], W, W), RuntimeError, "means"),
    Bad("mixture variances short", lambda: OPS.mixture_logpdf(X, W, W[:2], W), RuntimeError, "variances"),
    Bad("mixture backward grad shape", lambda: OPS.mixture_logpdf_backward(X[:2], X, X, W, W, W), RuntimeError, "grad"),
]


@pytest.mark.skipif("cpp" not in CPU_BACKENDS, reason="the C++ kernels are not built here")
@pytest.mark.parametrize("case", DISPATCHER_CASES, ids=repr)
def test_dispatcher_rejects(case):
    with pytest.raises(case.error, match=case.match):
        case.call()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_ops_behaviour_on_bad_values(backend):
    """Values are not checked (no host sync): an index outside [0, B) selects no bin (ignored by
    bin_stats, left unchanged by calibrate), and NaN features give NaN statistics, as torch ops."""
    with dirfast.use_backend(backend):
        idx = torch.tensor([0, 5, -1, 2 ** 40, 1, 0, 1, 2])
        count, mean, _ = ops.bin_stats(X, idx, 3)
        assert count.tolist() == [2, 2, 1]
        out = ops.calibrate(X, idx, M1, V1, M2, V2)
        assert torch.equal(out[1:4], X[1:4])
        x = X.clone()
        x[0, 0] = float("nan")
        _, mean, _ = ops.bin_stats(x, torch.zeros(8, dtype=torch.long), 3)
        assert torch.isnan(mean[0, 0]) and torch.isfinite(mean[0, 1:]).all()


def test_failed_calibrate_inplace_writes_nothing():
    for make in (lambda: X.clone().requires_grad_(), lambda: torch.zeros(1, 3).expand(8, 3)):
        x = make()
        before = x.detach().clone()
        with pytest.raises(RuntimeError):
            ops.calibrate_(x, IDX, M1, V1, M2, V2)
        assert torch.equal(x.detach(), before)


# =========================================================================== Binning, windows
BINNING_CASES = [
    Bad("integer num_bins 0", lambda: dirfast.Binning.integer(0), ValueError, "num_bins"),
    Bad("integer num_bins float", lambda: dirfast.Binning.integer(2.5), ValueError, "num_bins"),
    Bad("integer num_bins bool", lambda: dirfast.Binning.integer(True), ValueError, "num_bins"),
    Bad("integer num_bins 2^40", lambda: dirfast.Binning.integer(2 ** 40), ValueError, "num_bins"),
    Bad("integer scale 0", lambda: dirfast.Binning.integer(10, scale=0), ValueError, "scale"),
    Bad("integer scale NaN", lambda: dirfast.Binning.integer(10, scale=float("nan")), ValueError, "scale"),
    Bad("integer scale str", lambda: dirfast.Binning.integer(10, scale="10"), TypeError, "scale"),
    Bad("uniform low >= high", lambda: dirfast.Binning.uniform(5, 0, 10), ValueError, "low"),
    Bad("uniform empty range", lambda: dirfast.Binning.uniform(1, 1, 10), ValueError, "low"),
    Bad("uniform infinite high", lambda: dirfast.Binning.uniform(0, float("inf"), 10), ValueError, "high"),
    Bad("uniform NaN low", lambda: dirfast.Binning.uniform(float("nan"), 1, 10), ValueError, "low"),
    Bad("uniform low str", lambda: dirfast.Binning.uniform("0", 5, 10), TypeError, "low"),
    Bad("uniform num_bins 0", lambda: dirfast.Binning.uniform(0, 5, 0), ValueError, "num_bins"),
    Bad("edges too few", lambda: dirfast.Binning([1.0]), ValueError, "edges"),
    Bad("edges decreasing", lambda: dirfast.Binning([0.0, 2.0, 1.0]), ValueError, "edges"),
    Bad("edges repeated", lambda: dirfast.Binning([0.0, 1.0, 1.0]), ValueError, "edges"),
    Bad("edges NaN", lambda: dirfast.Binning([0.0, float("nan")]), ValueError, "edges"),
    Bad("edges 2-D", lambda: dirfast.Binning([[0.0, 1.0], [2.0, 3.0]]), ValueError, "edges"),
    Bad("edges str", lambda: dirfast.Binning("abc"), TypeError, "edges"),
    Bad("labels NaN", lambda: dirfast.Binning.integer(10)(torch.tensor([1.0, float("nan")])), ValueError, "finite"),
    Bad("labels inf", lambda: dirfast.Binning.uniform(0, 5, 50)(np.array([np.inf])), ValueError, "finite"),
    Bad("labels str", lambda: dirfast.Binning.integer(10)("abc"), TypeError, "labels"),
    Bad("labels None", lambda: dirfast.Binning.integer(10)(None), TypeError, "labels"),
    Bad("labels complex", lambda: dirfast.Binning.integer(10)(torch.ones(2, dtype=torch.complex64)), TypeError, "labels"),
    Bad("labels bool", lambda: dirfast.Binning.integer(10)(torch.ones(2, dtype=torch.bool)), TypeError, "labels"),
    Bad("labels ragged", lambda: dirfast.Binning.integer(10)([[1], [1, 2]]), TypeError, "labels"),
    Bad("precision unknown", lambda: dirfast.Binning.integer(10)([1.0], precision="float64"), ValueError, "precision"),
    Bad("window kernel unknown", lambda: dirfast.kernel_window("box", 5, 2), ValueError, "kernel"),
    Bad("window ks even", lambda: dirfast.kernel_window("gaussian", 4, 2), ValueError, "ks"),
    Bad("window ks 0", lambda: dirfast.kernel_window("triang", 0, 2), ValueError, "ks"),
    Bad("window ks float", lambda: dirfast.get_lds_kernel_window("gaussian", 5.0, 2), ValueError, "ks"),
    Bad("window ks 10^9", lambda: dirfast.kernel_window("gaussian", 10 ** 9 + 1, 2), ValueError, "ks"),
    Bad("window sigma 0", lambda: dirfast.kernel_window("gaussian", 5, 0), ValueError, "sigma"),
    Bad("window sigma negative", lambda: dirfast.get_lds_kernel_window("laplace", 5, -2), ValueError, "sigma"),
    Bad("window sigma 5e6", lambda: dirfast.kernel_window("gaussian", 5, 5e6), ValueError, "sigma"),
    Bad("window sigma inf", lambda: dirfast.kernel_window("gaussian", 5, float("inf")), ValueError, "sigma"),
    Bad("window sigma None", lambda: dirfast.kernel_window("gaussian", 5, None), TypeError, "sigma"),
    Bad("window sigma bool", lambda: dirfast.kernel_window("laplace", 5, True), TypeError, "sigma"),
    Bad("window normalize", lambda: dirfast.kernel_window("gaussian", 5, 2, normalize="l2"), ValueError, "normalize"),
]


@pytest.mark.parametrize("case", BINNING_CASES, ids=repr)
def test_binning_and_windows_reject(case):
    with pytest.raises(case.error, match=case.match):
        case.call()


def test_window_edge_cases_are_finite_and_fast():
    """A sigma so small that scipy divides 0 by 0 gives the delta; a very wide Gaussian (its
    radius 4 sigma far beyond the window) is folded in closed form, at once."""
    for kernel in ("gaussian", "laplace"):
        assert dirfast.kernel_window(kernel, 5, 1e-300).tolist() == [0, 0, 1, 0, 0]
        assert dirfast.kernel_window(kernel, 5, 1e-300, normalize="sum").tolist() == [0, 0, 1, 0, 0]
    wide = dirfast.kernel_window("gaussian", 5, 9e5)
    assert torch.isfinite(wide).all() and float(wide.min()) > 0.999999


# =========================================================================== grids of several dimensions
U10 = dirfast.Binning.uniform(0, 10, 10)
GRID = dirfast.GridBinning(U10, dirfast.Binning.integer(4))
GRID_Y = torch.rand(16, 2, generator=gen(40)) * 4
GRID_CASES = [
    Bad("grid of nothing", lambda: dirfast.GridBinning(), ValueError, "at least one"),
    Bad("grid of edges", lambda: dirfast.GridBinning(U10, [0, 1, 2]), TypeError, r"binnings\[1\]"),
    Bad("grid too large", lambda: dirfast.GridBinning(*[dirfast.Binning.integer(4096)] * 3), ValueError, "more than"),
    Bad("grid labels [N]", lambda: GRID(GRID_Y[:, 0]), ValueError, r"\[\.\.\., 2\]"),
    Bad("grid labels [N, 3]", lambda: GRID(torch.zeros(4, 3)), ValueError, r"\[\.\.\., 2\]"),
    Bad("grid LDS bucket_start", lambda: dirfast.LDS(GRID, bucket_start=1), ValueError, "bucket_start"),
    Bad("grid LDS labels [N]", lambda: dirfast.LDS(GRID).fit(GRID_Y[:, 0]), ValueError, "labels"),
    Bad("grid FDS bucket_num", lambda: dirfast.FDS(3, bucket_num=10, bucket_start=0, binning=GRID), ValueError,
        "bucket_num=40"),
    Bad("grid FDS bucket_start", lambda: dirfast.FDS(3, bucket_num=40, binning=GRID), ValueError, "bucket_start=0"),
    Bad("grid FDS fill_empty", lambda: dirfast.FDS(3, bucket_num=40, bucket_start=0, binning=GRID, fill_empty=True),
        ValueError, "fill_empty"),
    Bad("grid FDS labels [N]", lambda: dirfast.FDS(3, bucket_num=40, bucket_start=0, binning=GRID).update_running_stats(
        torch.randn(16, 3), GRID_Y[:, 0], 0), ValueError, r"labels \[N, 2\]"),
    Bad("grid FDS dense features", lambda: dirfast.FDS(3, bucket_num=40, bucket_start=0, binning=GRID).accumulate(
        torch.randn(2, 3, 4, 4), torch.zeros(2, 2, 4, 4)), ValueError, r"features must be \[N, D\]"),
    Bad("grid shot_metrics odd size", lambda: dirfast.metrics.shot_metrics(torch.zeros(5), torch.zeros(5), GRID_Y,
        binning=GRID), ValueError, r"\[N, 2\]"),
]


@pytest.mark.parametrize("case", GRID_CASES, ids=repr)
def test_grids_reject(case):
    with pytest.raises(case.error, match=case.match):
        case.call()


# =========================================================================== LDS
AGES = torch.randint(0, 100, (300,), generator=gen(2)).float()
INT121 = dirfast.Binning.integer(121)
LDS_CASES = [
    Bad("binning int", lambda: dirfast.LDS(121), TypeError, "binning"),
    Bad("binning None", lambda: dirfast.lds_weights(AGES, None), TypeError, "binning"),
    Bad("reweight unknown", lambda: dirfast.LDS(INT121, reweight="inv"), ValueError, "reweight"),
    Bad("reweight none with lds", lambda: dirfast.lds_weights(AGES, INT121, reweight="none"), ValueError, "reweight"),
    Bad("lds str", lambda: dirfast.LDS(INT121, lds="yes"), TypeError, "lds"),
    Bad("inverse_clip scalar", lambda: dirfast.lds_weights(AGES, INT121, inverse_clip=5), TypeError, "inverse_clip"),
    Bad("inverse_clip one value", lambda: dirfast.LDS(INT121, inverse_clip=(5,)), TypeError, "inverse_clip"),
    Bad("inverse_clip str", lambda: dirfast.LDS(INT121, inverse_clip="ab"), TypeError, "inverse_clip"),
    Bad("inverse_clip reversed", lambda: dirfast.LDS(INT121, inverse_clip=(10, 5)), ValueError, "inverse_clip"),
    Bad("inverse_clip negative", lambda: dirfast.LDS(INT121, inverse_clip=(-1, 5)), ValueError, "inverse_clip"),
    Bad("inverse_clip NaN", lambda: dirfast.LDS(INT121, inverse_clip=(float("nan"), 5)), ValueError, "inverse_clip"),
    Bad("ks even", lambda: dirfast.lds_weights(AGES, INT121, ks=4), ValueError, "ks"),
    Bad("kernel unknown", lambda: dirfast.LDS(INT121, kernel="box"), ValueError, "kernel"),
    Bad("padding unknown", lambda: dirfast.LDS(INT121, padding="wrap"), ValueError, "padding"),
    Bad("bucket_start past the bins", lambda: dirfast.LDS(INT121, bucket_start=121), ValueError, "bucket_start"),
    Bad("bucket_start float", lambda: dirfast.LDS(INT121, bucket_start=2.0), ValueError, "bucket_start"),
    Bad("fit NaN", lambda: dirfast.LDS(INT121).fit(torch.tensor([1.0, float("nan")])), ValueError, "finite"),
    Bad("fit inf", lambda: dirfast.lds_weights(np.array([np.inf]), INT121), ValueError, "finite"),
    Bad("fit empty", lambda: dirfast.LDS(INT121).fit([]), ValueError, "empty"),
    Bad("fit str", lambda: dirfast.lds_weights("abc", INT121), TypeError, "labels"),
    Bad("fit None", lambda: dirfast.LDS(INT121).fit(None), TypeError, "labels"),
    Bad("fit complex", lambda: dirfast.LDS(INT121).fit(torch.ones(3, dtype=torch.complex64)), TypeError, "labels"),
    Bad("weights before fit", lambda: dirfast.LDS(INT121).weights(AGES), RuntimeError, "fit"),
    Bad("weights before fit (none)", lambda: dirfast.LDS(INT121, reweight="none", lds=False).weights(AGES),
        RuntimeError, "fit"),
    Bad("weights str", lambda: dirfast.LDS(INT121).fit(AGES).weights("x"), TypeError, "labels"),
]


@pytest.mark.parametrize("case", LDS_CASES, ids=repr)
def test_lds_rejects(case):
    with pytest.raises(case.error, match=case.match):
        case.call()


def test_lds_weights_of_bad_labels():
    """weights() reads nothing on the host: a NaN or infinite label gets weight 0, for every
    reweighting; labels beyond the bins weigh as the edge bins."""
    for reweight, lds in (("sqrt_inv", True), ("inverse", True), ("none", False)):
        est = dirfast.LDS(INT121, reweight=reweight, lds=lds).fit(AGES)
        got = est.weights(torch.tensor([float("nan"), float("inf"), -float("inf"), 500.0, -5.0, 120.0, 0.0]))
        assert got[:3].tolist() == [0.0, 0.0, 0.0]
        assert got[3] == got[5] and got[4] == got[6] and bool((got[3:] > 0).all())


LDS_STATE_CASES = [
    ("update NaN", lambda est: est.update(torch.tensor([float("nan")])), ValueError),
    ("update empty", lambda est: est.update(torch.ones(0)), ValueError),
    ("load no counts", lambda est: est.load_state_dict({}), ValueError),
    ("load not a dict", lambda est: est.load_state_dict("state"), ValueError),
    ("load counts shape", lambda est: est.load_state_dict({"counts": torch.ones(5)}), ValueError),
    ("load counts NaN", lambda est: est.load_state_dict({"counts": torch.full((121,), float("nan"))}), ValueError),
    ("load counts negative", lambda est: est.load_state_dict({"counts": -torch.ones(121)}), ValueError),
    ("load counts str", lambda est: est.load_state_dict({"counts": "x"}), ValueError),
    ("load other settings", lambda est: est.load_state_dict(dirfast.LDS(INT121, reweight="inverse").fit(AGES).state_dict()),
     ValueError),
    ("load other edges", lambda est: est.load_state_dict(dict(est.state_dict(), edges=torch.arange(5.0))), ValueError),
    ("load other binning", lambda est: est.load_state_dict(dirfast.LDS(dirfast.Binning.integer(50)).fit(AGES).state_dict()),
     ValueError),
]


@pytest.mark.parametrize("name, call, error", LDS_STATE_CASES, ids=[c[0] for c in LDS_STATE_CASES])
def test_failed_lds_call_changes_nothing(name, call, error):
    est = dirfast.LDS(INT121).fit(AGES)
    counts, weights = est.empirical, est.weights(AGES)
    with pytest.raises(error):
        call(est)
    assert torch.equal(est.empirical, counts) and torch.equal(est.weights(AGES), weights)


# =========================================================================== FDS
FDS_CONSTRUCTION = [
    (dict(feature_dim=0), ValueError, "feature_dim"), (dict(feature_dim=2.0), TypeError, "feature_dim"),
    (dict(feature_dim=True), TypeError, "feature_dim"), (dict(feature_dim=4, bucket_num=0), ValueError, "bucket_num"),
    (dict(feature_dim=4, bucket_num=5, bucket_start=5), ValueError, "bucket_start"),
    (dict(feature_dim=4, bucket_start=-1), ValueError, "bucket_start"),
    (dict(feature_dim=4, start_update=1.5), TypeError, "start_update"),
    (dict(feature_dim=4, start_smooth="1"), TypeError, "start_smooth"),
    (dict(feature_dim=4, ks=4), ValueError, "ks"), (dict(feature_dim=4, kernel="box"), ValueError, "kernel"),
    (dict(feature_dim=4, sigma=0), ValueError, "sigma"), (dict(feature_dim=4, momentum=1.5), ValueError, "momentum"),
    (dict(feature_dim=4, momentum="a"), TypeError, "momentum"),
    (dict(feature_dim=4, momentum=float("nan")), ValueError, "momentum"),
    (dict(feature_dim=4, clip_min=2.0, clip_max=1.0), ValueError, "clip"),
    (dict(feature_dim=4, clip_min=float("nan")), ValueError, "clip_min"),
    (dict(feature_dim=4, clip_max="10"), TypeError, "clip_max"),
    (dict(feature_dim=4, binning="int"), TypeError, "binning"),
    (dict(feature_dim=4, bucket_num=50, binning=dirfast.Binning.integer(40)), ValueError, "binning"),
]


@pytest.mark.parametrize("kwargs, error, word", FDS_CONSTRUCTION, ids=lambda v: str(v)[:40] if isinstance(v, dict) else "")
def test_fds_construction_rejects(kwargs, error, word):
    with pytest.raises(error, match=word):
        dirfast.FDS(**kwargs)


def trained_fds():
    fds = dirfast.FDS(4, bucket_num=20, bucket_start=2)
    labels = torch.randint(0, 22, (64,), generator=gen(3)).float()
    fds.update_running_stats(torch.randn(64, 4, generator=gen(4)), labels, 0)
    fds.update_last_epoch_stats(1)
    fds.update_running_stats(torch.randn(64, 4, generator=gen(5)), labels, 1)
    fds.accumulate(torch.randn(64, 4, generator=gen(6)), labels)
    return fds


GOOD_X, GOOD_Y = torch.randn(8, 4, generator=gen(7)), torch.randint(0, 22, (8,), generator=gen(8)).float()
NAN_X = GOOD_X.clone().index_fill_(0, torch.tensor([2]), float("nan"))
NAN_Y = GOOD_Y.clone().index_fill_(0, torch.tensor([1]), float("nan"))
FDS_CASES = [  # (id, call(fds), error, match); each also checks that the failed call changed nothing
    ("features list", lambda f: f.update_running_stats(GOOD_X.tolist(), GOOD_Y, 2), TypeError, "features"),
    ("features int", lambda f: f.accumulate(GOOD_X.long(), GOOD_Y), TypeError, "features"),
    ("features 1-D", lambda f: f.update_running_stats(GOOD_X[:, 0], GOOD_Y, 2), ValueError, "features"),
    ("features D", lambda f: f.update_running_stats(torch.randn(8, 5), GOOD_Y, 2), ValueError, "feature_dim"),
    ("features NaN", lambda f: f.update_running_stats(NAN_X, GOOD_Y, 2), ValueError, "features must be finite"),
    ("features overflow", lambda f: f.update_running_stats(torch.randn(8, 4, generator=gen(9)) * 1e30, GOOD_Y, 2),
     ValueError, "overflow"),
    ("labels list", lambda f: f.update_running_stats(GOOD_X, GOOD_Y.tolist(), 2), TypeError, "labels"),
    ("labels NaN", lambda f: f.update_running_stats(GOOD_X, NAN_Y, 2), ValueError, "labels must be finite"),
    ("labels short", lambda f: f.accumulate(GOOD_X, GOOD_Y[:7]), ValueError, "labels must have shape"),
    ("labels [N, 2]", lambda f: f.smooth(GOOD_X.clone(), GOOD_Y.repeat(2, 1).t(), 2), ValueError, "labels must have shape"),
    ("labels complex", lambda f: f.smooth(GOOD_X.clone(), GOOD_Y.to(torch.complex64), 2), TypeError, "labels"),
    ("features on another device", lambda f: f.accumulate(GOOD_X.to("meta"), GOOD_Y.to("meta")), ValueError, "device"),
    ("labels only", lambda f: f.update_running_stats(GOOD_X, None, 2), ValueError, "features and labels"),
    ("no epoch", lambda f: f.update_running_stats(GOOD_X, GOOD_Y), TypeError, "epoch"),
    ("epoch float", lambda f: f.update_last_epoch_stats(2.0), TypeError, "epoch"),
    ("epoch str", lambda f: f.smooth(GOOD_X.clone(), GOOD_Y, "2"), TypeError, "epoch"),
    ("smooth a leaf requiring grad", lambda f: f.smooth(GOOD_X.clone().requires_grad_(), GOOD_Y, 2), RuntimeError, "leaf"),
    ("smooth inplace 1", lambda f: f.smooth(GOOD_X.clone(), GOOD_Y, 2, inplace=1), TypeError, "inplace"),
    ("load shape", lambda f: f.load_state_dict(dict(f.state_dict(), running_mean=torch.ones(3, 4))), RuntimeError,
     "running_mean"),
    ("load NaN", lambda f: f.load_state_dict(dict(f.state_dict(), running_var=torch.full((18, 4), float("nan")))),
     RuntimeError, "running_var"),
    ("load not a tensor", lambda f: f.load_state_dict(dict(f.state_dict(), num_samples_tracked="x")), RuntimeError,
     "num_samples_tracked"),
    ("load missing key", lambda f: f.load_state_dict({k: v for k, v in f.state_dict().items() if k != "epoch"}),
     RuntimeError, "epoch"),
    ("load accumulators shape", lambda f: f.load_state_dict(dict(f.state_dict(), accumulated_mean=torch.ones(2))),
     RuntimeError, "accumulated_mean"),
    ("load published other D", lambda f: f.load_state_dict(dirfast.FDS(3, bucket_num=20, bucket_start=2).state_dict()),
     RuntimeError, "running_mean"),
]


def snapshot(fds):
    state = {k: v.clone() for k, v in fds.state_dict().items()}
    state["aliased"] = torch.tensor(fds.running_mean_last_epoch is fds.running_mean)
    return state


@pytest.mark.parametrize("name, call, error, match", FDS_CASES, ids=[c[0] for c in FDS_CASES])
def test_failed_fds_call_changes_nothing(name, call, error, match):
    fds = trained_fds()
    before = snapshot(fds)
    with pytest.raises(error, match=match):
        call(fds)
    after = snapshot(fds)
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key


def test_fds_keeps_statistics_finite_on_the_training_path():
    """accumulate() reads nothing on the host: a row with a NaN label and a bucket whose batch
    holds a NaN or overflowing feature are left out (and counted), the rest goes in."""
    fds = trained_fds()
    fds.clear_accumulated()
    y = torch.tensor([5.0, 5.0, 6.0, 6.0, float("nan"), 7.0, 7.0, 8.0])
    x = torch.randn(8, 4, generator=gen(10))
    x[0, 1] = float("nan")     # bucket of label 5: left out
    x[5] = 3e38                # bucket of label 7: its statistics overflow, left out
    fds.accumulate(x, y)
    counts = fds.accumulated_count
    assert counts[6 - 2] == 2 and counts[8 - 2] == 1 and counts[5 - 2] == 0 and counts[7 - 2] == 0
    assert int(fds.num_samples_skipped) == 5
    fds.update_running_stats(epoch=2)
    assert all(torch.isfinite(t).all() for t in fds.state_dict().values())
    out = fds.smooth(x.clone(), y, 2)  # smooth leaves the NaN-label row as it is
    assert torch.equal(out[4], x[4])


@pytest.mark.parametrize("cast", ["half", "bfloat16", "double"])
def test_fds_statistics_keep_their_dtype(cast):
    """Casting the module (model.half()) moves the statistics but keeps their precision, as
    BatchNorm's counter: a bucket of 160,000 pixels does not overflow float16."""
    fds = trained_fds()
    getattr(fds, cast)()
    assert fds.running_mean.dtype == torch.float32 and fds.accumulated_count.dtype == torch.float64
    assert fds.running_mean_last_epoch is fds.running_mean  # the published aliasing survives
    features = torch.randn(160000, 4, generator=gen(11)).to(getattr(torch, {"half": "float16", "bfloat16": "bfloat16",
                                                                             "double": "float64"}[cast]))
    fds.accumulate(features, torch.full((160000,), 5.0))
    fds.update_running_stats(epoch=2)
    assert int(fds.num_samples_tracked[3]) > 160000
    assert all(torch.isfinite(t).all() for t in fds.state_dict().values())


# =========================================================================== losses, metrics
P, T = torch.randn(8, 1, generator=gen(12)), torch.randn(8, 1, generator=gen(13))
LOSS_CASES = [
    Bad(f"{name} {what}", (lambda fn=getattr(dirfast.losses, name), a=a: fn(*a)), error, match)
    for name in dirfast.losses.__all__ if name.startswith("weighted_")
    for what, a, error, match in [
        ("[N, 1] vs [N]", (P, T[:, 0]), ValueError, "same shape"),
        ("numpy inputs", (P.numpy(), T), TypeError, "inputs"),
        ("None targets", (P, None), TypeError, "targets"),
        ("weights [5]", (P, T, torch.ones(5)), ValueError, "weights"),
        ("weights [N, N]", (P, T, torch.ones(8, 8)), ValueError, "weights"),
        ("weights [N] for [N, 1]", (P, T, torch.ones(8)), ValueError, "weights"),
        ("weights numpy", (P, T, np.ones((8, 1))), TypeError, "weights"),
    ]
] + [
    Bad("huber beta negative", lambda: dirfast.losses.weighted_huber_loss(P, T, beta=-1.0), ValueError, "beta"),
    Bad("huber beta NaN", lambda: dirfast.losses.weighted_huber_loss(P, T, beta=float("nan")), ValueError, "beta"),
    Bad("huber beta str", lambda: dirfast.losses.weighted_huber_loss(P, T, beta="1"), TypeError, "beta"),
    Bad("focal beta 0", lambda: dirfast.losses.weighted_focal_mse_loss(P, T, beta=0), ValueError, "beta"),
    Bad("focal gamma negative", lambda: dirfast.losses.weighted_focal_l1_loss(P, T, gamma=-1), ValueError, "gamma"),
    Bad("focal activate", lambda: dirfast.losses.weighted_focal_l1_loss(P, T, activate="relu"), ValueError, "activate"),
]


L = dirfast.losses
C10, W10 = torch.linspace(-3, 3, 10), torch.ones(10)
GMM = {"means": torch.zeros(2, 1), "variances": torch.ones(2, 1, 1), "weights": torch.tensor([0.5, 0.5])}
BALANCED_CASES = [
    Bad("bmc [N, 1] vs [N]", lambda: L.bmc_loss(P, T[:, 0], 1.0), ValueError, "same shape"),
    Bad("bmc [B, 1, H, W]", lambda: L.bmc_loss(torch.zeros(2, 1, 3, 3), torch.zeros(2, 1, 3, 3), 1.0), ValueError,
        r"pred must be \[N\] or \[N, d\]"),
    Bad("bmc empty", lambda: L.bmc_loss(P[:0], T[:0], 1.0), ValueError, "empty"),
    Bad("bmc int pred", lambda: L.bmc_loss(P.long(), T, 1.0), TypeError, "pred"),
    Bad("bmc noise_var 0", lambda: L.bmc_loss(P, T, 0.0), ValueError, "noise_var"),
    Bad("bmc noise_var NaN", lambda: L.bmc_loss(P, T, float("nan")), ValueError, "noise_var"),
    Bad("bmc noise_var str", lambda: L.bmc_loss(P, T, "1"), TypeError, "noise_var"),
    Bad("bmc noise_var [2]", lambda: L.bmc_loss(P, T, torch.ones(2)), ValueError, "noise_var"),
    Bad("bmc all_ranks 1", lambda: L.bmc_loss(P, T, 1.0, all_ranks=1), TypeError, "all_ranks"),
    Bad("bni weights shape", lambda: L.bni_loss(P, T, 1.0, C10, W10[:9]), ValueError, "bucket_weights"),
    Bad("bni centers 2-D", lambda: L.bni_loss(P, T, 1.0, C10[:, None], W10), ValueError, "bucket_centers"),
    Bad("bni centers str", lambda: L.bni_loss(P, T, 1.0, "abc", W10), TypeError, "bucket_centers"),
    Bad("bni module negative weight", lambda: L.BNILoss(1.0, C10, -W10), ValueError, "bucket_weights"),
    Bad("bni module init 0", lambda: L.BNILoss(0.0, C10, W10), ValueError, "init_noise_sigma"),
    Bad("bni from_lds unfitted", lambda: L.BNILoss.from_lds(dirfast.LDS(dirfast.Binning.integer(5))), RuntimeError,
        "fitted"),
    Bad("bni from_lds not an LDS", lambda: L.BNILoss.from_lds([1, 2]), TypeError, "lds"),
    Bad("gai gmm path", lambda: L.GAILoss(1.0, "gmm.pkl"), TypeError, "joblib.load"),
    Bad("gai gmm missing key", lambda: L.gai_loss(P, T, {"means": GMM["means"]}, 1.0), ValueError, "gmm"),
    Bad("gai gmm negative variance", lambda: L.gai_loss(P, T, dict(GMM, variances=-GMM["variances"]), 1.0),
        ValueError, "variances"),
    Bad("gai gmm weights shape", lambda: L.gai_loss(P, T, dict(GMM, weights=torch.ones(3)), 1.0), ValueError, "means"),
    Bad("gai 2-D mixture on [N, 1]", lambda: L.gai_loss(P, T, {"means": torch.zeros(2, 2), "variances": torch.ones(2, 2),
                                                               "weights": torch.ones(2)}, 1.0), ValueError, r"\[N, 2\]"),
    Bad("gai learn_noise 1", lambda: L.GAILoss(1.0, GMM, learn_noise=1), TypeError, "learn_noise"),
    Bad("fit_gmm NaN", lambda: dirfast.mixture.fit_gmm(torch.tensor([1.0, float("nan"), 2.0]), 1), ValueError, "finite"),
    Bad("fit_gmm too few labels", lambda: dirfast.mixture.fit_gmm(torch.ones(3), 4), ValueError, "at least"),
    Bad("fit_gmm components 0", lambda: dirfast.mixture.fit_gmm(torch.ones(3), 0), ValueError, "num_components"),
    Bad("fit_gmm empty", lambda: dirfast.mixture.fit_gmm(torch.ones(0), 1), ValueError, "empty"),
]


@pytest.mark.parametrize("case", BALANCED_CASES, ids=repr)
def test_balanced_mse_rejects(case):
    with pytest.raises(case.error, match=case.match):
        case.call()


@pytest.mark.parametrize("case", LOSS_CASES, ids=repr)
def test_losses_reject(case):
    with pytest.raises(case.error, match=case.match):
        case.call()


def test_huber_beta_zero_is_l1_with_finite_gradients():
    pred = torch.tensor([[0.0], [1.0], [-2.0]], requires_grad=True)
    target = torch.tensor([[0.0], [0.5], [1.0]])
    loss = dirfast.losses.weighted_huber_loss(pred, target, beta=0)
    loss.backward()
    assert float(loss.detach()) == pytest.approx(float(dirfast.losses.weighted_l1_loss(pred, target).detach()))
    assert torch.isfinite(pred.grad).all()


TRAIN, TEST = np.arange(300) % 50, np.arange(60) % 50 + 0.0
SM = dirfast.metrics.shot_metrics
BMAE, BMSE, INT50 = dirfast.metrics.balanced_mae, dirfast.metrics.balanced_mse, dirfast.Binning.integer(50)
METRIC_CASES = [
    Bad("thresholds inverted", lambda: SM(TEST, TEST, TRAIN, many_shot_thr=10, low_shot_thr=20), ValueError, "low_shot_thr"),
    Bad("threshold str", lambda: SM(TEST, TEST, TRAIN, many_shot_thr="100"), TypeError, "many_shot_thr"),
    Bad("threshold NaN", lambda: SM(TEST, TEST, TRAIN, low_shot_thr=float("nan")), TypeError, "low_shot_thr"),
    Bad("binning str", lambda: SM(TEST, TEST, TRAIN, binning="uniform"), TypeError, "binning"),
    Bad("binning int", lambda: SM(TEST, TEST, TRAIN, binning=50), TypeError, "binning"),
    Bad("preds NaN", lambda: SM(TEST * np.nan, TEST, TRAIN), ValueError, "preds"),
    Bad("train_labels inf", lambda: SM(TEST, TEST, np.full(300, np.inf)), ValueError, "train_labels"),
    Bad("preds str", lambda: SM("abc", TEST, TRAIN), TypeError, "preds"),
    Bad("sizes differ", lambda: SM(TEST[:5], TEST, TRAIN), ValueError, "preds and labels"),
    Bad("no train_labels", lambda: SM(TEST, TEST), TypeError, "train_labels"),
    Bad("regions without binning", lambda: SM(TEST, TEST, regions={"many": [1]}), ValueError, "binning"),
    Bad("regions past the bins", lambda: SM(TEST, TEST, binning=dirfast.Binning.integer(50), regions={"many": [99]}),
        ValueError, "regions"),
    Bad("regions overlap", lambda: SM(TEST, TEST, binning=dirfast.Binning.integer(50),
                                      regions={"many": [1], "low": [1]}), ValueError, "more than one region"),
    Bad("regions unknown name", lambda: SM(TEST, TEST, binning=dirfast.Binning.integer(50), regions={"few": [1]}),
        ValueError, "regions"),
    Bad("balanced binning missing", lambda: BMAE(TEST, TEST, None), TypeError, "binning"),
    Bad("balanced binning str", lambda: BMSE(TEST, TEST, "fd"), TypeError, "binning"),
    Bad("balanced sizes differ", lambda: BMAE(TEST[:5], TEST, INT50), ValueError, "preds and labels"),
    Bad("balanced empty", lambda: BMSE([], [], INT50), ValueError, "empty"),
    Bad("balanced labels NaN", lambda: BMAE(TEST, TEST * np.nan, INT50), ValueError, "labels"),
    Bad("balanced preds str", lambda: BMSE("abc", TEST, INT50), TypeError, "preds"),
    Bad("balanced grid odd size", lambda: BMAE(torch.zeros(5), torch.zeros(5), GRID), ValueError,
        r"preds must be \[N, 2\]"),
]


@pytest.mark.parametrize("case", METRIC_CASES, ids=repr)
def test_metrics_reject(case):
    with pytest.raises(case.error, match=case.match):
        case.call()


def test_equal_thresholds_split_without_overlap():
    got = SM(TEST + 0.5, TEST, TRAIN, many_shot_thr=6, low_shot_thr=6)
    assert got["median"]["mse"] == pytest.approx(0.25) and np.isnan(got["many"]["mse"]) and np.isnan(got["low"]["mse"])


# =========================================================================== backends, presets
BACKEND_CASES = [
    Bad("unknown name", lambda: dirfast.set_backend("bogus"), ValueError, "bogus"),
    Bad("not a str", lambda: dirfast.set_backend(3), ValueError, "backend"),
    Bad("wrong case", lambda: dirfast.use_backend("CPP").__enter__(), ValueError, "CPP"),
    Bad("preset unknown", lambda: dirfast.presets.get("bogus"), ValueError, "bogus"),
] + [Bad(f"{name} unavailable", (lambda name=name: dirfast.set_backend(name)), RuntimeError, "not available")
     for name in BACKEND_NAMES if not dirfast.backends()[name]["available"]]


@pytest.mark.parametrize("case", BACKEND_CASES, ids=repr)
def test_backend_selection_rejects(case):
    with dirfast.use_backend("reference"):
        with pytest.raises(case.error, match=case.match):
            case.call()
        assert dirfast.get_backend() == "reference", "a failed selection changes nothing"


def test_preset_rejects_unknown_settings():
    with pytest.raises(TypeError, match="bogus"):
        STS_B_DIR.fds(4, bogus=1)


# =========================================================================== DenseWeight, Binning.auto
DENSE = dirfast.DenseWeight(alpha=0.5).fit(AGES)
DENSE_STATE = DENSE.state_dict()
DENSE_CASES = [
    Bad("alpha str", lambda: dirfast.DenseWeight(alpha="1"), TypeError, "alpha"),
    Bad("alpha bool", lambda: dirfast.DenseWeight(alpha=True), TypeError, "alpha"),
    Bad("alpha negative", lambda: dirfast.density_weights(AGES, alpha=-1.0), ValueError, "alpha"),
    Bad("alpha NaN", lambda: dirfast.DenseWeight(alpha=float("nan")), ValueError, "alpha"),
    Bad("eps zero", lambda: dirfast.DenseWeight(eps=0.0), ValueError, "eps"),
    Bad("eps above 1", lambda: dirfast.density_weights(AGES, eps=2.0), ValueError, "eps"),
    Bad("eps None", lambda: dirfast.DenseWeight(eps=None), TypeError, "eps"),
    Bad("bandwidth unknown rule", lambda: dirfast.DenseWeight(bandwidth="isj"), ValueError, "bandwidth"),
    Bad("bandwidth zero", lambda: dirfast.DenseWeight(bandwidth=0.0), ValueError, "bandwidth"),
    Bad("bandwidth negative", lambda: dirfast.density_weights(AGES, bandwidth=-1), ValueError, "bandwidth"),
    Bad("bandwidth inf", lambda: dirfast.DenseWeight(bandwidth=float("inf")), ValueError, "bandwidth"),
    Bad("bandwidth None", lambda: dirfast.DenseWeight(bandwidth=None), TypeError, "bandwidth"),
    Bad("bandwidth bool", lambda: dirfast.DenseWeight(bandwidth=True), TypeError, "bandwidth"),
    Bad("bandwidth list", lambda: dirfast.DenseWeight(bandwidth=[1.0]), TypeError, "bandwidth"),
    Bad("grid_size float", lambda: dirfast.DenseWeight(grid_size=4096.0), TypeError, "grid_size"),
    Bad("grid_size bool", lambda: dirfast.DenseWeight(grid_size=True), TypeError, "grid_size"),
    Bad("grid_size too small", lambda: dirfast.DenseWeight(grid_size=8), ValueError, "grid_size"),
    Bad("grid_size too large", lambda: dirfast.density_weights(AGES, grid_size=1 << 20), ValueError, "grid_size"),
    Bad("fit empty", lambda: DENSE.fit(torch.ones(0)), ValueError, "empty"),
    Bad("fit NaN", lambda: DENSE.fit(torch.tensor([1.0, float("nan")])), ValueError, "finite"),
    Bad("fit inf", lambda: DENSE.fit(np.array([1.0, np.inf])), ValueError, "finite"),
    Bad("fit str", lambda: DENSE.fit("abc"), TypeError, "labels"),
    Bad("fit None", lambda: DENSE.fit(None), TypeError, "labels"),
    Bad("fit complex", lambda: DENSE.fit(torch.ones(3, dtype=torch.complex64)), TypeError, "labels"),
    Bad("fit overflowing spread", lambda: DENSE.fit(torch.tensor([0.0, 1e308], dtype=torch.float64)), ValueError,
        "rescale the labels"),
    Bad("fit overflowing bandwidth", lambda: dirfast.density_weights([0.0, 1.0], bandwidth=1e308), ValueError,
        "rescale the labels"),
    Bad("fit all equal (rule)", lambda: DENSE.fit(torch.full((5,), 3.0)), ValueError, "bandwidth"),
    Bad("fit one label (rule)", lambda: dirfast.density_weights([4.0], bandwidth="scott"), ValueError, "bandwidth"),
    Bad("weights before fit", lambda: dirfast.DenseWeight().weights(AGES), RuntimeError, "fit"),
    Bad("density before fit", lambda: dirfast.DenseWeight().density(AGES), RuntimeError, "fit"),
    Bad("weights str", lambda: DENSE.weights("x"), TypeError, "labels"),
    Bad("load not a dict", lambda: DENSE.load_state_dict("state"), ValueError, "state"),
    Bad("load empty dict", lambda: DENSE.load_state_dict({}), ValueError, "fitted"),
    Bad("load other alpha", lambda: DENSE.load_state_dict(dirfast.DenseWeight().fit(AGES).state_dict()),
        ValueError, "alpha"),
    Bad("load other bandwidth", lambda: DENSE.load_state_dict(dict(DENSE_STATE, bandwidth="scott")),
        ValueError, "bandwidth"),
    Bad("load no density", lambda: DENSE.load_state_dict({k: v for k, v in DENSE_STATE.items() if k != "density"}),
        ValueError, "density"),
    Bad("load density shape", lambda: DENSE.load_state_dict(dict(DENSE_STATE, density=torch.zeros(5))),
        ValueError, "density"),
    Bad("load density above 1", lambda: DENSE.load_state_dict(dict(DENSE_STATE, density=DENSE_STATE["density"] + 1)),
        ValueError, "density"),
    Bad("load density NaN", lambda: DENSE.load_state_dict(
        dict(DENSE_STATE, density=torch.full_like(DENSE_STATE["density"], float("nan")))), ValueError, "density"),
    Bad("load step str", lambda: DENSE.load_state_dict(dict(DENSE_STATE, step="x")), ValueError, "not a number"),
    Bad("load step negative", lambda: DENSE.load_state_dict(dict(DENSE_STATE, step=-1.0)), ValueError, "step"),
    Bad("load low inf", lambda: DENSE.load_state_dict(dict(DENSE_STATE, low=float("inf"))), ValueError, "low"),
    Bad("auto rule unknown", lambda: dirfast.Binning.auto(AGES, rule="sturges"), ValueError, "rule"),
    Bad("auto rule None", lambda: dirfast.Binning.auto(AGES, rule=None), ValueError, "rule"),
    Bad("auto max_bins 0", lambda: dirfast.Binning.auto(AGES, max_bins=0), ValueError, "max_bins"),
    Bad("auto max_bins float", lambda: dirfast.Binning.auto(AGES, max_bins=10.0), TypeError, "max_bins"),
    Bad("auto max_bins bool", lambda: dirfast.Binning.auto(AGES, max_bins=True), TypeError, "max_bins"),
    Bad("auto empty", lambda: dirfast.Binning.auto([]), ValueError, "empty"),
    Bad("auto NaN", lambda: dirfast.Binning.auto(torch.tensor([1.0, float("nan")])), ValueError, "finite"),
    Bad("auto str", lambda: dirfast.Binning.auto("abc"), TypeError, "labels"),
]


@pytest.mark.parametrize("case", DENSE_CASES, ids=repr)
def test_density_rejects_and_changes_nothing(case):
    """Each bad call raises its error naming the argument, and the fitted DENSE stays as it was."""
    weights, density = DENSE.weights(AGES), DENSE.density(AGES)
    with pytest.raises(case.error, match=case.match):
        case.call()
    assert torch.equal(DENSE.weights(AGES), weights) and torch.equal(DENSE.density(AGES), density)
    assert DENSE.state_dict().keys() == DENSE_STATE.keys() and DENSE.fitted_bandwidth == DENSE_STATE["fitted_bandwidth"]
