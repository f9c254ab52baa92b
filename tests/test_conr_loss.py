"""``dirfast::conr_loss``: the reference against a float64 loop oracle written from the definition
(values and gradients, every published variant), then every backend against the reference:
sizes, anchor subsets, ties, identical and zero rows, the four dtypes, layouts, a small
temperature and the smallest accepted one, NaN and empty cases; gradcheck, opcheck,
torch.compile, the C++ kernels' bits for any number of threads, and the memory of the reference
and the C++ kernels (no [m, m, D]).

Bad arguments are in test_bad_inputs.py; the backend a backward runs on in test_backends.py.
"""

import math

import pytest
import torch

import dirfast
from dirfast.ops.conr_loss import reference, reference_backward
from test_mixture_logpdf import PeakLiveBytes
from testing import backend_device_params, gen, interpreted, on, same_bits_for_threads, stats_dtype, tol

BACKEND_DEVICE = list(backend_device_params(op="conr_loss"))
# (w, tau, e, push, exp0_terms, anchor_in_divisor): the defaults, AgeDB-DIR, NYUD2-DIR, and the rest
VARIANTS = [(1.0, 0.07, 0.01, "exp", True, False), (1.0, 0.2, 0.1, "exp", False, False),
            (1.0, 0.3, 0.2, "linear", True, True), (1.0, 0.25, 0.2, "linear", False, True),
            (0.5, 0.5, -0.3, "exp", True, True), (1.5, 0.1, 0.05, "linear", True, False)]


# =========================================================================== the oracle
def loop_conr(features, labels, preds, weights, w, tau, e, push, exp0_terms, anchor_in_divisor, offset, count):
    """The definition, anchor by anchor and key by key in float64 torch scalars (differentiable
    in ``features``): the positive sum written as published, every key adding exp(prod) when a
    positive and exp(0) otherwise (with ``exp0_terms``), the log of the plain sum (no shift)."""
    z = features.double()
    m = z.shape[0]
    ys, ps, ws = (t.detach().double().cpu().tolist() for t in (labels, preds, weights))
    q = [z[j] / torch.linalg.vector_norm(z[j]).clamp_min(1e-12) for j in range(m)]
    outs = []
    for a in range(count):
        i = offset + a
        dist = [sum(abs(u - v) for u, v in zip(ys[i], ys[j])) for j in range(m)]
        pdist = [sum(abs(u - v) for u, v in zip(ps[i], ps[j])) for j in range(m)]
        positives = [j for j in range(m) if j != i and dist[j] <= w]
        negatives = [j for j in range(m) if dist[j] > w and pdist[j] <= w]
        if not positives or not negatives:
            outs.append(z.sum() * 0.0)
            continue
        prod = [torch.dot(q[i], q[j]) / tau for j in range(m)]
        push_w = [ws[i] * (math.exp(e * dist[j]) if push == "exp" else e * dist[j]) for j in range(m)]
        neg = sum(push_w[j] * torch.exp(prod[j]) for j in negatives)
        if exp0_terms:
            pos = sum(torch.exp(prod[j]) if j in positives else torch.exp(prod[j] * 0.0) for j in range(m))
        else:
            pos = sum(torch.exp(prod[j]) for j in positives)
        div = len(positives) + (1 if anchor_in_divisor else 0)
        outs.append(-sum(prod[j] - torch.log(pos + neg) for j in positives) / div)
    return torch.stack(outs) if outs else z.new_zeros(0)


def conr_inputs(m, d, num_labels, dtype, device="cpu", seed=0, spread=None):
    """Features, integer labels in [0, spread] (default 4 / L: ties in the label distances, and
    at the threshold w = 1), predictions that make negatives, and positive weights; float64
    generated, then ``dtype``."""
    g = gen(seed)
    spread = max(1, 4 // num_labels) if spread is None else spread
    features = torch.randn(m, d, generator=g, dtype=torch.float64)
    labels = torch.randint(0, spread + 1, (m, num_labels), generator=g).double()
    # predictions closer than the labels: pairs of distant labels and similar predictions
    preds = 0.4 * labels + 0.3 / num_labels * torch.randn(m, num_labels, generator=g, dtype=torch.float64)
    weights = torch.rand(m, generator=g, dtype=torch.float64) + 0.5
    return tuple(t.to(device, dtype) for t in (features, labels, preds, weights))


def run(backend, tensors, options, upstream=None):
    """The output on ``backend`` and the gradient of ``features`` for ``upstream`` (default 1)."""
    features, *rest = tensors
    leaf = features.detach().clone().requires_grad_()
    with dirfast.use_backend(backend):
        out = dirfast.ops.conr_loss(leaf, *rest, *options)
        out.backward(torch.ones_like(out) if upstream is None else upstream)
    return out.detach(), leaf.grad


def expected(tensors, options, upstream=None):
    """The reference's output and gradient in the arithmetic dtype, from the same inputs."""
    out = reference(*tensors, *options)
    g = torch.ones_like(out) if upstream is None else upstream
    return out, reference_backward(g, *tensors, *options)


def assert_grad_close(got, want, dtype):
    """Gradients relative to their largest magnitude (a zero row's gradient is of order 1e12)."""
    assert got.dtype == want.dtype and got.shape == want.shape
    scale = max(1.0, float(want.double().abs().max())) if want.numel() else 1.0
    torch.testing.assert_close(got.cpu().double() / scale, want.cpu().double() / scale, equal_nan=True, **tol(dtype))


def resolve(options, m):
    """``options`` with offset and count appended when it has six entries (all the rows)."""
    return tuple(options) + ((0, m) if len(options) == 6 else ())


# =========================================================================== the reference
@pytest.mark.parametrize("variant", VARIANTS, ids=[f"{v[3]}-exp0={v[4]}-div={v[5]}-e={v[2]}" for v in VARIANTS])
@pytest.mark.parametrize("m, num_labels, offset, count", [(7, 1, 0, 7), (7, 2, 2, 3), (6, 1, 5, 1), (5, 3, 0, 5)])
def test_reference_matches_the_oracle(variant, m, num_labels, offset, count):
    """Values and gradients (upstream weights of both signs) of every published variant, the
    anchors all rows or a subset, labels of one to three columns with ties."""
    options = variant + (offset, count)
    tensors = next(t for t in (conr_inputs(m, 3, num_labels, torch.float64, seed=seed) for seed in range(100))
                   if bool((reference(*t, *options) != 0).any()))  # the first inputs with pairs
    upstream = torch.randn(count, generator=gen(1), dtype=torch.float64)
    out, grad = expected(tensors, options, upstream)
    leaf = tensors[0].clone().requires_grad_()
    want = loop_conr(leaf, *tensors[1:], *options)
    (want_grad,) = torch.autograd.grad((want * upstream).sum(), leaf, allow_unused=True)
    assert out.dtype == torch.float64 and out.shape == (count,)
    torch.testing.assert_close(out, want.detach(), **tol(torch.float64))
    torch.testing.assert_close(grad, want_grad, **tol(torch.float64))


def test_oracle_cases_hold_the_rules():
    """The two zero rules and the threshold tie: no negatives gives 0, no positives gives 0 (not
    NaN), and a label distance equal to w is a positive."""
    features = torch.randn(4, 3, generator=gen(2), dtype=torch.float64)
    weights = torch.ones(4, dtype=torch.float64)
    labels = torch.tensor([[0.0], [1.0], [5.0], [9.0]], dtype=torch.float64)
    preds = torch.tensor([[0.0], [0.5], [20.0], [40.0]], dtype=torch.float64)  # no similar prediction
    options = VARIANTS[0] + (0, 4)
    assert torch.equal(reference(features, labels, preds, weights, *options), torch.zeros(4, dtype=torch.float64))
    preds = torch.tensor([[0.0], [0.5], [1.0], [40.0]], dtype=torch.float64)  # row 2 a negative of rows 0, 1
    out = reference(features, labels, preds, weights, *options)
    torch.testing.assert_close(out, loop_conr(features, labels, preds, weights, *options))
    assert out[0] != 0 and out[1] != 0 and out[2] == 0 and out[3] == 0  # rows 2 and 3 have no positive


@pytest.mark.parametrize("push", ["exp", "linear"])
def test_zero_weight_drops_the_negatives(push):
    """weights_i = 0 removes the negatives' terms (and they do not set the shift, which a large
    e * l would otherwise push above every positive): the loss of the same rows with neg = 0."""
    features, labels, preds, weights = conr_inputs(7, 3, 1, torch.float64, seed=3, spread=6)
    preds = labels * 0.1
    zero = weights.clone()
    zero[:] = 0.0
    options = (1.0, 0.05, 30.0 if push == "exp" else 300.0, push, False, False, 0, 7)
    out = reference(features, labels, preds, zero, *options)
    torch.testing.assert_close(out, loop_conr(features, labels, preds, zero, *options))
    assert bool(torch.isfinite(out).all()) and bool((out != 0).any())


# =========================================================================== every backend
# (m, D, L, offset, count): all rows, subsets at either end and in the middle, one anchor,
# no anchor, one row, two rows
SIZES = [(12, 8, 1, 0, None), (11, 5, 2, 3, 4), (10, 7, 3, 0, 6), (9, 4, 1, 8, 1), (7, 3, 1, 7, 0),
         (1, 4, 1, 0, None), (2, 3, 1, 0, None), (2, 3, 2, 1, 1)]
LARGE = [(300, 48, 1, 0, None), (257, 33, 2, 40, 100), (129, 16, 1, 0, 128)]  # not interpreted


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
@pytest.mark.parametrize("m, d, num_labels, offset, count", SIZES + LARGE)
@pytest.mark.parametrize("variant", [0, 2, 5])
def test_values_and_gradients(backend, device, m, d, num_labels, offset, count, variant):
    """Float64 values and gradients of each backend are the reference's, for every size, anchor
    subset and variant."""
    if m > 12 and interpreted(backend, device):
        pytest.skip("Triton's interpreter: tiny sizes only")
    tensors = conr_inputs(m, d, num_labels, torch.float64, device, seed=m * d + variant)
    count = m - offset if count is None else count
    options = VARIANTS[variant] + (offset, count)
    upstream = torch.randn(count, generator=gen(4), dtype=torch.float64).to(device)
    out, grad = run(backend, tensors, options, upstream)
    want, want_grad = expected(tensors, options, upstream)
    assert out.shape == (count,) and out.dtype == torch.float64 and out.device == tensors[0].device
    torch.testing.assert_close(out, want, **tol(torch.float64))
    assert_grad_close(grad, want_grad, torch.float64)
    if count == 0 or m == 1:
        assert not bool(grad.any())


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_dtypes(backend, device, dtype):
    """Each dtype in and computed in float32 (float64 for float64): the reference's values on
    the same inputs, the gradient in the features' dtype; a float64 weights tensor makes the
    whole computation float64."""
    m = 12 if interpreted(backend, device) else 64
    tensors = conr_inputs(m, 8, 1, dtype, device, seed=5)
    acc = stats_dtype(dtype)
    options = VARIANTS[1] + (0, m)
    out, grad = run(backend, tensors, options)
    want, want_grad = expected(tensors, options)
    assert out.dtype == acc and grad.dtype == dtype
    torch.testing.assert_close(out, want, **tol(acc))
    assert_grad_close(grad, want_grad, dtype if dtype in (torch.float16, torch.bfloat16) else acc)
    mixed = tensors[:3] + (tensors[3].double(),)
    out64, _ = run(backend, mixed, options)
    assert out64.dtype == torch.float64
    torch.testing.assert_close(out64, expected(mixed, options)[0], **tol(torch.float64))


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
def test_layouts(backend, device):
    """Non-contiguous features (transposed, sliced), labels and predictions (columns of a wider
    tensor) and weights (strided) give the values and gradients of their contiguous copies."""
    m, d = 10, 6
    features, labels, preds, weights = conr_inputs(m, d, 2, torch.float32, device, seed=6)
    views = (features.T.contiguous().T, torch.cat([labels, preds], 1)[:, :2], torch.cat([preds, labels], 1)[:, :2],
             torch.stack([weights, weights], 1)[:, 0])
    assert not any(v.is_contiguous() for v in views[:3])
    sliced = torch.randn(m, 2 * d, generator=gen(7)).to(device)[:, ::2]
    options = VARIANTS[2] + (1, 8)
    for tensors in (views, (sliced, labels, preds, weights)):
        out, grad = run(backend, tensors, options)
        contiguous = tuple(t.contiguous() for t in tensors)
        want, want_grad = run(backend, contiguous, options)
        torch.testing.assert_close(out, want)
        torch.testing.assert_close(grad, want_grad)
        assert grad.shape == (m, d)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
def test_identical_and_zero_rows(backend, device):
    """Identical feature rows (prod = 1 / tau) and a zero row (its q is 0; its gradient is
    grad_q / 1e-12, as F.normalize's) are the reference's."""
    features, labels, preds, weights = conr_inputs(9, 5, 1, torch.float64, device, seed=8)
    features[3] = features[1]
    features[4] = features[1] * 3.0
    features[6] = 0.0
    options = VARIANTS[0] + (0, 9)
    out, grad = run(backend, (features, labels, preds, weights), options)
    want, want_grad = expected((features, labels, preds, weights), options)
    torch.testing.assert_close(out, want, **tol(torch.float64))
    assert_grad_close(grad, want_grad, torch.float64)
    assert float(grad[6].abs().max()) > 1e6


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
def test_small_temperature_does_not_overflow(backend, device):
    """tau = 0.004 puts prod up to 250, beyond float32's exp: the shifted sums stay finite in
    float32 and agree with the float64 reference to float32 rounding of prod."""
    m = 12 if interpreted(backend, device) else 48
    tensors = conr_inputs(m, 6, 1, torch.float32, device, seed=9)
    options = (1.0, 0.004, 0.01, "exp", True, False, 0, m)
    out, grad = run(backend, tensors, options)
    want, want_grad = expected(tuple(t.double() for t in tensors), options)
    assert bool(torch.isfinite(out).all()) and bool(torch.isfinite(grad).all())
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-3)
    scale = float(want_grad.abs().max())
    torch.testing.assert_close(grad.double() / scale, want_grad / scale, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
def test_smallest_temperature_stays_finite(backend, device):
    """tau = 1.18e-38, float32's smallest normal and the smallest accepted: losses up to 2 / tau
    (1.7e38) and coefficients of grad / tau are the float64 reference's to float32 rounding.
    |P| log(pos + neg) and the positives' summed products (each near |P| / tau) pass float32's
    range there, as does grad |P| / tau in the backward (they gave inf - inf: NaN losses and
    gradients from |P| = 4)."""
    m = 12 if interpreted(backend, device) else 48
    tiny = float(torch.finfo(torch.float32).tiny)
    features, *rest = conr_inputs(m, 6, 1, torch.float32, device, seed=12)
    tensors = (features * 4.0, *rest)  # norms of about 10: the gradient, grad_q / norm, well inside float32
    options = (1.0, tiny, 0.01, "exp", True, False, 0, m)
    want, want_grad = expected(tuple(t.double() for t in tensors), options)
    assert float(want.max()) > 1e37 and float(want.max()) < 3e38
    out, grad = run(backend, tensors, options)
    assert bool(torch.isfinite(out).all()) and bool(torch.isfinite(grad).all())
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=0)
    scale = float(want_grad.abs().max())
    torch.testing.assert_close(grad.double() / scale, want_grad / scale, rtol=0, atol=1e-5)
    # An anchor whose largest term is a pushed negative of weight 0.05 (its sum below 1): the
    # coefficients take each term's share of the sum before tau (grad |P| / total / tau was inf,
    # and the gradient NaN, on the C++ and Triton kernels)
    tensors = (torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1]], device=device), torch.tensor([[0.0], [0.5], [5.0]],
               device=device), torch.tensor([[0.0], [0.0], [0.5]], device=device),
               torch.tensor([0.05, 1.0, 1.0], device=device))
    options = (1.0, tiny, 0.1, "exp", False, False, 0, 1)
    want, want_grad = expected(tuple(t.double() for t in tensors), options)
    out, grad = run(backend, tensors, options)
    assert bool(torch.isfinite(grad).all())
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=0)
    scale = float(want_grad.abs().max())
    torch.testing.assert_close(grad.double() / scale, want_grad / scale, rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
def test_nan_inputs(backend, device):
    """A NaN feature makes NaN every anchor it is paired with (and its own), the others as
    without it; a NaN label puts its row in no pair (its anchor 0); NaN weights give NaN only
    to their anchor."""
    tensors = conr_inputs(10, 4, 1, torch.float32, device, seed=11)
    options = VARIANTS[2] + (0, 10)
    good, _ = run(backend, tensors, options)
    row, other = (int(i) for i in torch.nonzero(good.cpu() != 0)[:2, 0])  # anchors with pairs
    features = tensors[0].clone()
    features[row, 1] = math.nan
    out, _ = run(backend, (features,) + tensors[1:], options)
    want, _ = expected((features,) + tensors[1:], options)
    torch.testing.assert_close(out, want, equal_nan=True, **tol(torch.float32))
    assert bool(torch.isnan(out[row])) and bool(torch.isfinite(out).any())
    labels = tensors[1].clone()
    labels[row, 0] = math.nan
    out, grad = run(backend, (tensors[0], labels) + tensors[2:], options)
    torch.testing.assert_close(out, expected((tensors[0], labels) + tensors[2:], options)[0], **tol(torch.float32))
    assert out[row] == 0 and bool(torch.isfinite(grad).all())
    weights = tensors[3].clone()
    weights[other] = math.nan
    out, _ = run(backend, tensors[:3] + (weights,), options)
    keep = torch.arange(10) != other
    assert bool(torch.isnan(out[other])) and torch.equal(out[keep], good[keep])


@pytest.mark.parametrize("backend, device", [p for p in BACKEND_DEVICE if p.values[0] in ("reference", "cpp")])
def test_gradcheck(backend, device):
    """The features' gradient by finite differences, through the public op, in float64."""
    features, labels, preds, weights = conr_inputs(8, 4, 2, torch.float64, device, seed=12)
    for variant, offset, count in ((VARIANTS[0], 0, 8), (VARIANTS[3], 2, 5)):
        leaf = features.clone().requires_grad_()
        with dirfast.use_backend(backend):
            assert torch.autograd.gradcheck(
                lambda f: dirfast.ops.conr_loss(f, labels, preds, weights, *variant, offset, count), (leaf,))


# =========================================================================== the C++ kernel's two paths
def member_share(tensors, options):
    """The share of the count x m pairs in an anchor's sums (a positive, or a negative of
    non-zero push): the C++ kernel takes its sparse path at most 20%, its GEMM path above."""
    _, labels, preds, weights = (t.double() for t in tensors)
    w, _, e, push, _, _, offset, count = options
    l = torch.cdist(labels[offset:offset + count], labels, p=1)
    d = torch.cdist(preds[offset:offset + count], preds, p=1)
    l[torch.arange(count), torch.arange(offset, offset + count)] = math.nan  # the self pair
    coef = weights[offset:offset + count, None] * (1.0 if push == "exp" else e * l)
    member = (l <= w) | ((l > w) & (d <= w) & (coef != 0))
    return float(member.double().mean()) if member.numel() else 0.0


# (m, D, L, offset, count, spread): the sparse path (labels spread wide: few pairs within w)
# with all rows, subsets, D below, at and off a multiple of the vector width, members in runs
# not a multiple of four; and the GEMM path (labels close) at the same sizes
SPARSE = [(200, 37, 1, 0, 200, 60), (150, 16, 2, 30, 70, 16), (97, 5, 1, 96, 1, 60), (64, 64, 3, 0, 20, 7)]
DENSE = [(200, 37, 1, 0, 200, 2), (150, 16, 1, 30, 70, 2), (64, 64, 1, 0, 20, 2)]


@pytest.mark.skipif(not dirfast.backends()["cpp"]["available"], reason="the C++ kernels are not built here")
@pytest.mark.parametrize("m, d, num_labels, offset, count, spread", SPARSE + DENSE)
@pytest.mark.parametrize("variant", range(len(VARIANTS)))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_cpp_paths_match_the_reference(m, d, num_labels, offset, count, spread, variant, dtype):
    """Both paths of the C++ kernel (sparse dot products over the members, or GEMMs over all
    pairs, chosen by the members' share) give the reference's values and gradients."""
    tensors = conr_inputs(m, d, num_labels, dtype, seed=m + d + variant, spread=spread)
    options = VARIANTS[variant] + (offset, count)
    share = member_share(tensors, options)
    assert share < 0.18 if (m, d, num_labels, offset, count, spread) in SPARSE else share > 0.3
    upstream = torch.randn(count, generator=gen(20), dtype=dtype)
    out, grad = run("cpp", tensors, options, upstream)
    want, want_grad = expected(tensors, options, upstream)
    assert bool((want != 0).any())  # anchors with pairs
    torch.testing.assert_close(out, want, **tol(dtype))
    assert_grad_close(grad, want_grad, dtype)


@pytest.mark.skipif(not dirfast.backends()["cpp"]["available"], reason="the C++ kernels are not built here")
@pytest.mark.parametrize("spread", [40, 2], ids=["sparse", "gemm"])
def test_cpp_paths_special_rows(spread):
    """On both paths: identical and zero rows, a NaN label (its row in no pair), zero weights (no
    negatives), a small temperature, float16 features; and a NaN feature (NaN in the anchors it
    is paired with and its own; the values only, as test_nan_inputs)."""
    m = 120
    tensors = conr_inputs(m, 20, 1, torch.float64, seed=21, spread=spread)
    features, labels, preds, weights = (t.clone() for t in tensors)
    features[3] = features[1]
    features[6] = 0.0
    labels[12, 0] = math.nan
    weights[15:30] = 0.0
    special = (features, labels, preds, weights)
    for tensors_, options_ in ((special, VARIANTS[0] + (0, m)), (special, VARIANTS[3] + (5, 60)),
                               (tuple(t.float() for t in tensors), (1.0, 0.004, 0.01, "exp", True, False, 0, m)),
                               ((tensors[0].half(),) + tensors[1:], VARIANTS[2] + (10, 50))):
        share = member_share(tensors_, options_)
        assert share < 0.18 if spread == 40 else share > 0.3
        out, grad = run("cpp", tensors_, options_)
        want, want_grad = expected(tensors_, options_)
        assert bool(torch.isfinite(out).all()) and bool((out != 0).any())
        torch.testing.assert_close(out, want, **tol(out.dtype))
        assert_grad_close(grad, want_grad, tensors_[0].dtype)
    out, _ = run("cpp", special, VARIANTS[0] + (0, m))
    assert out[12] == 0
    features[9, 2] = math.nan
    out, _ = run("cpp", special, VARIANTS[0] + (0, m))
    torch.testing.assert_close(out, expected(special, VARIANTS[0] + (0, m))[0], equal_nan=True,
                               **tol(torch.float64))
    assert bool(torch.isnan(out[9])) and bool(torch.isfinite(out).any())


# =========================================================================== the op's registration
def test_opcheck():
    """torch.library.opcheck of the forward and backward ops as the dispatcher runs them here
    (schema, fake kernel, autograd registration), float32 and float64, with and without subsets."""
    for dtype, options in ((torch.float32, VARIANTS[0] + (0, 9)), (torch.float64, VARIANTS[2] + (3, 4)),
                           (torch.float16, VARIANTS[1] + (9, 0))):
        features, labels, preds, weights = conr_inputs(9, 5, 2, dtype, seed=13)
        torch.library.opcheck(torch.ops.dirfast.conr_loss.default,
                              (features.requires_grad_(), labels, preds, weights, *options))
        grad = torch.randn(options[-1], generator=gen(14)).to(stats_dtype(dtype))
        torch.library.opcheck(torch.ops.dirfast.conr_loss_backward.default,
                              (grad, features.detach(), labels, preds, weights, *options))


@pytest.mark.parametrize("backend", ["auto", "cpp"])
def test_compile_fullgraph(backend):
    """torch.compile(fullgraph=True) traces the op and its backward through the dispatcher: the
    loss and gradient of eager."""
    features, labels, preds, weights = conr_inputs(16, 6, 1, torch.float32, seed=15)

    def step(f, w):
        return (w * dirfast.ops.conr_loss(f * 2.0, labels, preds, weights, tau=0.2, offset=4, count=10)).mean()

    results = []
    with dirfast.use_backend(backend):
        for fn in (torch.compile(step, backend="aot_eager", fullgraph=True), step):
            leaf = features.clone().requires_grad_()
            loss = fn(leaf, weights[4:14])
            loss.backward()
            results.append((loss.detach(), leaf.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


@pytest.mark.skipif(not dirfast.backends()["cpp"]["available"], reason="the C++ kernels are not built here")
def test_cpp_same_bits_for_any_thread_count():
    """Forward and backward give the same bits with 1 and 2 threads, rows spread over several
    tasks, on both paths (sparse: labels spread over 0..40; GEMM: over 0..2) and both GEMM
    gradient paths (all anchors, and a subset of under half the rows)."""
    upstream = torch.rand(600, generator=gen(17))
    ops = torch.ops.dirfast
    cases = [(conr_inputs(600, 24, 2, torch.float32, seed=16, spread=40), VARIANTS[0] + (0, 600)),
             (conr_inputs(600, 24, 2, torch.float32, seed=16, spread=40), VARIANTS[2] + (100, 250)),
             (conr_inputs(600, 24, 1, torch.float32, seed=16, spread=2), VARIANTS[0] + (0, 600)),
             (conr_inputs(600, 24, 1, torch.float32, seed=16, spread=2), VARIANTS[2] + (100, 250))]
    assert [member_share(t, o) < 0.1 for t, o in cases] == [True, True, False, False]
    assert [member_share(t, o) > 0.5 for t, o in cases] == [False, False, True, True]

    def run_all():
        results = []
        for tensors, options in cases:
            g = upstream[:options[-1]]
            results += [ops.conr_loss(*tensors, *options), ops.conr_loss_backward(g, *tensors, *options)]
        return results

    same_bits_for_threads(run_all, (1, 2, 1))


# =========================================================================== memory
def test_reference_memory_has_no_m_m_d_tensor():
    """The reference's forward and backward hold [count, m] matrices, never an [m, m, D] (or
    [m, m, L]) tensor: the peak stays far below one [m, m, D] float32 tensor."""
    m, d = 96, 256
    tensors = conr_inputs(m, d, 1, torch.float32, seed=18)
    options = VARIANTS[0] + (0, m)
    with PeakLiveBytes(*tensors) as forward:
        out = reference(*tensors, *options)
    grad = torch.ones_like(out)
    with PeakLiveBytes(grad, *tensors) as backward:
        reference_backward(grad, *tensors, *options)
    cube = 4 * m * m * d
    assert forward.peak < cube / 8 and backward.peak < cube / 8, (forward.peak, backward.peak, cube)


@pytest.mark.skipif(not dirfast.backends()["cpp"]["available"], reason="the C++ kernels are not built here")
def test_cpp_memory_has_no_m_m_d_tensor():
    """The C++ kernels' allocations (as torch's profiler records them, inside the op too): none
    near an [m, m, D] float32 tensor; the largest is an [m, m] or [m, D] matrix."""
    m, d = 96, 256
    tensors = conr_inputs(m, d, 1, torch.float32, seed=19)
    options = VARIANTS[0] + (0, m)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        out = torch.ops.dirfast.conr_loss(*tensors, *options)
        torch.ops.dirfast.conr_loss_backward(torch.ones_like(out), *tensors, *options)
    sizes = [event.cpu_memory_usage for event in prof.events() if event.cpu_memory_usage > 0]
    assert sizes, "the profiler recorded the allocations"
    assert max(sizes) <= 4 * max(m * m, m * d), (max(sizes), m, d)
