"""``dirfast::ranksim_loss``: the reference against a float64 loop oracle written from the
definition (values, and the blackbox backward transcribed formula by formula, with the chain
through C = q q^T and F.normalize left to torch.autograd on per-row scalars); every backend
against the reference (sizes, label dims, anchor subsets, kept subsets, count = 0, m = 1 and 2,
every dtype, non-contiguous inputs) and against the oracle on inputs whose arithmetic is exact
(identical feature rows, tied label distances: real ties, broken by key index everywhere, the
higher first); NaN;
opcheck; torch.compile; the C++ kernel's bits for any thread count; the reference's memory.

gradcheck does not apply: the ranks are piecewise constant and the backward is a surrogate.
Bad arguments are in test_bad_inputs.py.
"""

import math

import pytest
import torch

import dirfast
from dirfast.ops.ranksim_loss import reference, reference_backward
from test_mixture_logpdf import PeakLiveBytes
from testing import backend_device_params, gen, interpreted, same_bits_for_threads, stats_dtype, tol

BACKEND_DEVICE = list(backend_device_params(op="ranksim_loss"))


# =========================================================================== the oracle
def loop_ranksim(features, labels, keep, lambda_val, offset, count, grad):
    """(out, gradient in features) of RankSim from the definition, in float64 Python loops: per
    anchor, ranks by counting (``#{k : v_k > v_j or v_k == v_j and k > j}`` over the kept keys:
    the later of tied keys first, as the published ranking with a stable sort),
    the loss, and the surrogate ``dC`` of the blackbox backward; then torch.autograd through
    ``sum dC_ij q_i . q_j`` with ``q`` each row's F.normalize."""
    z = features.detach().double().cpu()
    y = labels.detach().double().cpu().tolist()
    keep = keep.cpu().tolist()
    g = grad.detach().double().cpu().tolist()
    m = z.shape[0]
    kept = [j for j in range(m) if keep[j]]
    size = len(kept)
    rows = z.tolist()
    q = [[v / max(math.sqrt(sum(w * w for w in row)), 1e-12) for v in row] for row in rows]

    def rn(v):
        return {j: (sum(1 for k in kept if v[k] > v[j] or (v[k] == v[j] and k > j)) + 1) / size for j in kept}

    out, d_cos = [], {}
    for a in range(count):
        i = offset + a
        if not keep[i]:
            out.append(0.0)
            continue
        c = {j: math.fsum(q[i][d] * q[j][d] for d in range(len(q[i]))) for j in kept}
        l = {j: sum(abs(y[i][k] - y[j][k]) for k in range(len(y[i]))) for j in kept}
        bad = any(math.isnan(c[j]) or math.isnan(l[j]) for j in kept)
        rc, rl = rn(c), rn({j: -l[j] for j in kept})
        out.append(math.nan if bad else math.fsum((rc[j] - rl[j]) ** 2 for j in kept) / size)
        shifted = {j: c[j] + lambda_val * (g[a] * 2 * (rc[j] - rl[j]) / size) for j in kept}
        rs = rn(shifted)
        for j in kept:
            d_cos[i, j] = math.nan if bad else -(rc[j] - rs[j]) / (lambda_val + 1e-8)
    leaf = z.clone().requires_grad_()
    qs = [leaf[r] / torch.linalg.vector_norm(leaf[r]).clamp_min(1e-12) for r in range(m)]
    total = leaf.sum() * 0
    for (i, j), d in d_cos.items():
        total = total + d * torch.dot(qs[i], qs[j])
    total.backward()
    return torch.tensor(out, dtype=torch.float64), leaf.grad


# =========================================================================== inputs
def make_inputs(m, d, num_labels=1, keep="all", dtype=torch.float32, device="cpu", seed=0, label_range=4):
    """Normal features, integer labels in [0, label_range] (tied distances), and keep: every row,
    a random subset, or none."""
    g = gen(seed)
    features = torch.randn(m, d, generator=g, dtype=torch.float64)
    labels = torch.randint(0, label_range + 1, (m, num_labels), generator=g).double()
    flags = {"all": torch.ones(m, dtype=torch.bool), "none": torch.zeros(m, dtype=torch.bool),
             "some": torch.rand(m, generator=g) < 0.7}[keep]
    return features.to(device, dtype), labels.to(device, stats_dtype(dtype)), flags.to(device)


def exact_inputs(dtype, device, seed):
    """Features whose arithmetic is exact in every dtype and order: rows of prototypes with four
    entries +-1 (norm 2, q = +-1/2), some scaled by 2 and many repeated (identical rows: tied
    similarities), integer labels (tied distances), 8 rows kept of 11 (M = 8: ranks / M exact)."""
    g = gen(seed)
    prototypes = torch.zeros(4, 8, dtype=torch.float64)
    for p in range(4):
        cols = torch.randperm(8, generator=g)[:4]
        prototypes[p, cols] = torch.randint(0, 2, (4,), generator=g).double() * 2 - 1
    pick = torch.randint(0, 4, (11,), generator=g)
    features = prototypes[pick] * torch.where(torch.rand(11, 1, generator=g) < 0.3, 2.0, 1.0)
    labels = torch.randint(0, 3, (11, 1), generator=g).double()
    keep = torch.ones(11, dtype=torch.bool)
    keep[torch.randperm(11, generator=g)[:3]] = False
    return features.to(device, dtype), labels.to(device, dtype), keep.to(device)


def run(backend, features, labels, keep, lambda_val, offset, count, upstream):
    """The output and the gradient of the features (upstream gradient ``upstream``) on ``backend``."""
    leaf = features.detach().clone().requires_grad_()
    with dirfast.use_backend(backend):
        out = dirfast.ops.ranksim_loss(leaf, labels, keep, lambda_val, offset, count)
        out.backward(upstream)
    return out.detach(), leaf.grad


def close_grads(got, want, dtype, acc):
    """Gradients compared relative to their largest magnitude."""
    assert got.dtype == dtype
    scale = max(float(want.abs().max()), 1e-30) if want.numel() else 1.0
    t = tol(dtype) if dtype in (torch.float16, torch.bfloat16) else tol(acc)
    torch.testing.assert_close(got.cpu().double() / scale, want.cpu().double() / scale, **t)


# =========================================================================== the reference against the oracle
ORACLE_CASES = [  # m, D, L, keep, offset, count, seed
    (1, 3, 1, "all", 0, 1, 1), (2, 4, 1, "all", 0, 2, 2), (2, 4, 1, "all", 1, 1, 3), (9, 5, 1, "some", 0, 9, 4),
    (10, 6, 2, "some", 3, 5, 5), (8, 3, 3, "all", 2, 6, 6), (6, 4, 1, "none", 0, 6, 7), (7, 3, 1, "all", 7, 0, 8)]


@pytest.mark.parametrize("m, d, num_labels, keep, offset, count, seed", ORACLE_CASES)
def test_reference_matches_the_oracle(m, d, num_labels, keep, offset, count, seed):
    """Values and the surrogate gradient: single rows, anchor subsets, kept subsets, no row
    kept, no anchor, several label dimensions; lambda 2 (the README's) and 0.7."""
    features, labels, flags = make_inputs(m, d, num_labels, keep, torch.float64, seed=seed)
    upstream = torch.rand(count, generator=gen(seed), dtype=torch.float64) + 0.5
    for lam in (2.0, 0.7):
        want, want_grad = loop_ranksim(features, labels, flags, lam, offset, count, upstream)
        got = reference(features, labels, flags, lam, offset, count)
        got_grad = reference_backward(upstream, features, labels, flags, lam, offset, count)
        assert got.dtype == torch.float64 and got.shape == (count,)
        torch.testing.assert_close(got, want, **tol(torch.float64))
        close_grads(got_grad, want_grad, torch.float64, torch.float64)


def test_reference_zero_row_and_exact_ties():
    """A zero feature row (F.normalize's eps branch: grad_q / 1e-12) and exactly tied
    similarities and label distances."""
    features, labels, flags = exact_inputs(torch.float64, "cpu", seed=9)
    features[4] = 0
    upstream = torch.linspace(0.5, 2.0, 11, dtype=torch.float64)
    want, want_grad = loop_ranksim(features, labels, flags, 2.0, 0, 11, upstream)
    torch.testing.assert_close(reference(features, labels, flags, 2.0, 0, 11), want, **tol(torch.float64))
    got_grad = reference_backward(upstream, features, labels, flags, 2.0, 0, 11)
    if flags[4]:
        assert float(got_grad[4].abs().max()) > 1e6 or float(want_grad[4].abs().max()) == 0
    close_grads(got_grad, want_grad, torch.float64, torch.float64)


# =========================================================================== every backend
CASES = [  # m, D, L, keep, offset, count, seed; the first ones fit Triton's interpreter (m <= 12)
    (1, 3, 1, "all", 0, 1, 11), (2, 4, 1, "all", 0, 2, 12), (2, 4, 1, "all", 1, 1, 13), (9, 5, 1, "some", 0, 9, 14),
    (12, 8, 2, "some", 3, 6, 15), (12, 8, 1, "all", 12, 0, 16), (10, 3, 3, "none", 0, 10, 17),
    (70, 33, 1, "some", 5, 60, 18), (64, 8, 2, "all", 0, 64, 19)]
SMALL = 7


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_backends_match_the_reference(backend, device, dtype, case):
    """Values and gradients of the public op (autograd included) against the reference."""
    if case >= SMALL and interpreted(backend, device):
        pytest.skip("too large for Triton's interpreter")
    m, d, num_labels, keep, offset, count, seed = CASES[case]
    features, labels, flags = make_inputs(m, d, num_labels, keep, dtype, device, seed, label_range=9)
    upstream = (torch.rand(count, generator=gen(seed), dtype=torch.float64) + 0.5).to(device, dtype)
    out, grad = run(backend, features, labels, flags, 2.0, offset, count, upstream)
    assert out.dtype == dtype and out.shape == (count,) and out.device == features.device
    torch.testing.assert_close(out, reference(features, labels, flags, 2.0, offset, count), **tol(dtype))
    close_grads(grad, reference_backward(upstream, features, labels, flags, 2.0, offset, count), dtype, dtype)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_exact_ties_match_the_oracle(backend, device, dtype):
    """Identical feature rows and tied label distances, in exact arithmetic: every backend
    breaks the ties by key index (the higher first) as the oracle does, in every dtype (16-bit inputs computed in
    float32, the gradient returned in their dtype); anchors a subset, lambda 2 and 0.5."""
    features, labels, flags = exact_inputs(dtype, device, seed=20)
    upstream = torch.tensor([1.0, 0.5, 2.0, 1.0, 1.0, 0.25, 1.0, 4.0], dtype=dtype, device=device)
    for lam in (2.0, 0.5):
        out, grad = run(backend, features, labels, flags, lam, 2, 8, upstream)
        want, want_grad = loop_ranksim(features, labels, flags, lam, 2, 8, upstream)
        acc = stats_dtype(dtype)
        assert out.dtype == acc
        torch.testing.assert_close(out.cpu().double(), want, **tol(acc))
        close_grads(grad, want_grad, dtype, acc)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_inputs(backend, device, dtype):
    """16-bit features and labels on random data: float32 losses, gradients in their dtype."""
    features, labels, flags = make_inputs(10, 6, 1, "some", dtype, device, seed=21)
    labels = labels.to(dtype)
    upstream = torch.ones(10, device=device)
    out, grad = run(backend, features, labels, flags, 2.0, 0, 10, upstream)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, reference(features, labels, flags, 2.0, 0, 10), **tol(torch.float32))
    close_grads(grad, reference_backward(upstream, features, labels, flags, 2.0, 0, 10), dtype, torch.float32)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
def test_non_contiguous_inputs(backend, device):
    """Transposed features, strided labels and keep give the results of their contiguous copies."""
    g = gen(22)
    features = torch.randn(6, 11, generator=g, dtype=torch.float64).to(device).t()
    labels = torch.randint(0, 5, (11, 4), generator=g).double().to(device)[:, ::2]
    keep = (torch.rand(22, generator=g) < 0.8).to(device)[::2]
    assert not (features.is_contiguous() or labels.is_contiguous() or keep.is_contiguous())
    upstream = torch.rand(7, generator=g, dtype=torch.float64).to(device)
    out, grad = run(backend, features, labels, keep, 1.5, 2, 7, upstream)
    want, want_grad = run(backend, features.contiguous(), labels.contiguous(), keep.contiguous(), 1.5, 2, 7, upstream)
    torch.testing.assert_close(out, want, **tol(torch.float64))
    torch.testing.assert_close(grad, want_grad, **tol(torch.float64))
    torch.testing.assert_close(out, reference(features, labels, keep, 1.5, 2, 7), **tol(torch.float64))


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
def test_nan_features_give_nan(backend, device):
    """A NaN in a kept row makes every kept anchor's loss and every gradient NaN; anchors not
    kept stay 0. A NaN in a row not kept changes nothing else."""
    features, labels, flags = make_inputs(8, 4, 1, "all", torch.float32, device, seed=23)
    flags[5] = False
    features[2, 1] = math.nan
    out, grad = run(backend, features, labels, flags, 2.0, 0, 8, torch.ones(8, device=device))
    assert bool(torch.isnan(out[flags]).all()) and float(out[5]) == 0
    assert bool(torch.isnan(grad[flags]).all())
    clean = features.clone()
    clean[2] = 1.0
    clean[5, 0] = math.nan  # row 5 is not kept: a key of no anchor, an anchor of loss 0
    out, _ = run(backend, clean, labels, flags, 2.0, 0, 8, torch.ones(8, device=device))
    torch.testing.assert_close(out, reference(clean, labels, flags, 2.0, 0, 8))
    assert bool(torch.isfinite(out).all())


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
def test_labels_get_no_gradient(backend, device):
    """Only the features are differentiated (the label ranks get no gradient)."""
    features, labels, flags = make_inputs(6, 3, 1, "all", torch.float64, device, seed=24)
    labels.requires_grad_()
    leaf = features.clone().requires_grad_()
    with dirfast.use_backend(backend):
        dirfast.ops.ranksim_loss(leaf, labels, flags).sum().backward()
    assert labels.grad is None and leaf.grad is not None


def test_defaults_keep_every_row_and_anchor():
    """keep=None, lambda_val=2, offset=0, count=None: every row an anchor and a key."""
    features, labels, flags = make_inputs(7, 3, 1, "all", torch.float64, seed=25)
    torch.testing.assert_close(dirfast.ops.ranksim_loss(features, labels),
                               reference(features, labels, flags, 2.0, 0, 7))
    torch.testing.assert_close(dirfast.ops.ranksim_loss(features, labels, offset=3),
                               reference(features, labels, flags, 2.0, 3, 4))


# =========================================================================== op contract
def test_opcheck():
    """torch.library.opcheck of the forward (with autograd) and backward ops as the dispatcher
    runs them here, float32 and float64, anchors a subset."""
    ops = torch.ops.dirfast
    for dtype, keep, offset, count in ((torch.float32, "some", 2, 5), (torch.float64, "all", 0, 9)):
        features, labels, flags = make_inputs(9, 4, 2, keep, dtype, seed=26)
        torch.library.opcheck(ops.ranksim_loss.default,
                              (features.clone().requires_grad_(), labels, flags, 2.0, offset, count))
        grad = torch.rand(count, generator=gen(27)).to(dtype)
        torch.library.opcheck(ops.ranksim_loss_backward.default, (grad, features, labels, flags, 2.0, offset, count))


@pytest.mark.parametrize("backend", ["auto", "reference", "cpp"])
def test_compile_fullgraph(backend):
    """torch.compile(fullgraph=True) traces the op and its backward: loss and gradient of eager."""
    if not dirfast.backends().get(backend, {"available": True})["available"]:
        pytest.skip(f"{backend} unavailable")
    features, labels, flags = make_inputs(12, 5, 1, "some", torch.float32, seed=28)

    def step(x):
        return dirfast.ops.ranksim_loss(x * 1.0, labels, flags, 2.0, 2, 8).sum()

    results = []
    with dirfast.use_backend(backend):
        for fn in (torch.compile(step, backend="aot_eager", fullgraph=True), step):
            leaf = features.clone().requires_grad_()
            loss = fn(leaf)
            loss.backward()
            results.append((loss.detach(), leaf.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


def _cpp_path_inputs(path):
    """Inputs that send the C++ kernel down one of its paths (see csrc/cpu/ranksim_loss.cpp)."""
    g = gen(40)
    m, d = 100, 24
    features = torch.randn(m, d, generator=g)
    labels = torch.randperm(4 * m, generator=g)[:m].float()[:, None] / 4
    keep = torch.ones(m, dtype=torch.bool)
    offset, count = 0, m
    if path == "clustered":  # 90 rows within a bucket or two: an insertion sort past its budget
        # +-1 entries, D = 1024: every similarity a multiple of 2 / 1024, exact in any order
        d = 1024
        features = torch.randint(0, 2, (m, d), generator=g).float() * 2 - 1
        flips = torch.rand(90, d, generator=g) < torch.rand(90, 1, generator=g) * 0.003
        features[:90] = torch.where(flips, -features[0], features[0])
    elif path == "infinite label":  # 1-D labels with an infinity: distances and a sort per row
        labels[7] = math.inf
    elif path == "several labels":
        labels = torch.randint(0, 30, (m, 2), generator=g).float()
    elif path == "some anchors":  # not every key an anchor: no symmetric matrix, two products
        keep = torch.rand(m, generator=g) < 0.9
        offset, count = 10, 70
    elif path == "duplicate labels":  # ties in label distance on one side and on both sides
        labels = torch.randint(0, 12, (m, 1), generator=g).float() / 2
    return features, labels, keep, offset, count


@pytest.mark.skipif(not dirfast.backends()["cpp"]["available"], reason="the C++ kernels are not built here")
@pytest.mark.parametrize("path", ["plain", "clustered", "infinite label", "several labels", "some anchors",
                                  "duplicate labels"])
def test_cpp_paths_match_the_reference(path):
    """Each path of the C++ kernel (M >= 64: the bucketed rank sort; its std::sort hand-over;
    the label merge or the per-row distances; the symmetric or the general similarities and
    gradient products) against the reference, in float32."""
    features, labels, keep, offset, count = _cpp_path_inputs(path)
    upstream = torch.rand(count, generator=gen(41)) + 0.5
    out, grad = run("cpp", features, labels, keep, 2.0, offset, count, upstream)
    torch.testing.assert_close(out, reference(features, labels, keep, 2.0, offset, count), equal_nan=True,
                               **tol(torch.float32))
    want = reference_backward(upstream, features, labels, keep, 2.0, offset, count)
    assert torch.equal(torch.isnan(grad), torch.isnan(want))
    close_grads(torch.nan_to_num(grad), torch.nan_to_num(want), torch.float32, torch.float32)


@pytest.mark.skipif(not dirfast.backends()["cpp"]["available"], reason="the C++ kernels are not built here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_cpp_same_bits_for_any_thread_count(dtype):
    """Forward and backward give the same bits with 1 and 2 threads (rows split across tasks)."""
    features, labels, flags = make_inputs(96, 40, 1, "some", dtype, seed=29, label_range=30)
    upstream = torch.rand(90, generator=gen(30)).to(dtype)
    ops = torch.ops.dirfast
    same_bits_for_threads(lambda: (ops.ranksim_loss(features, labels, flags, 2.0, 3, 90),
                                   ops.ranksim_loss_backward(upstream, features, labels, flags, 2.0, 3, 90)))


def test_reference_never_holds_m_by_m_by_d():
    """The reference's forward and backward peak far below one [m, m, D] tensor (m = 64,
    D = 256: 4 MiB in float32): their temporaries are [chunk, m] and [m, D]."""
    features, labels, flags = make_inputs(64, 256, 1, "all", torch.float32, seed=31)
    cube = 64 * 64 * 256 * 4
    with PeakLiveBytes(features, labels, flags) as forward:
        out = reference(features, labels, flags, 2.0, 0, 64)
    grad = torch.ones_like(out)
    with PeakLiveBytes(grad, features, labels, flags) as backward:
        reference_backward(grad, features, labels, flags, 2.0, 0, 64)
    assert forward.peak < cube / 8 and backward.peak < cube / 4, (forward.peak, backward.peak)
