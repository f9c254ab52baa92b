"""``dirfast::rnc_loss``: the reference against a float64 loop oracle written from the definition
(values and gradients), then every backend against the reference: row counts down to 1 and 2,
anchor subsets (offset, count, count = 0), one or several labels, ties in label distance,
identical feature rows, the four dtypes, non-contiguous inputs, small temperatures down to the
smallest accepted one (against a second oracle, each sum shifted by its largest term), NaN input;
gradcheck, torch.compile, the same bits for any number of CPU threads, and memory without an
[m, m, D] tensor.

Bad arguments are in test_bad_inputs.py; opcheck and the backend a backward runs on in
test_backends.py.
"""

import math
import sys

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import dirfast
from dirfast.ops.rnc_loss import reference, reference_backward
from testing import backend_device_params, gen, interpreted, same_bits_for_threads, stats_dtype, tol

BACKEND_DEVICE = list(backend_device_params(op="rnc_loss"))
TINY32 = float(torch.finfo(torch.float32).tiny)  # 1.18e-38, the smallest temperature float32 takes
NOT_INTERPRETED = [p for p in BACKEND_DEVICE if not interpreted(*p.values)]


# =========================================================================== the oracle
def loop_rnc(z, y, temperature, offset=0, count=None):
    """The definition, one anchor, key and sum term at a time (O(m^3)), in float64 torch scalars so
    that autograd gives its gradient: ``-1/(m-1) sum_{j != i} (s_ij - log S_ij)`` with
    ``S_ij = sum_{k != i, d_ik >= d_ij} exp(s_ik)``, ``s = -||z_i - z_j|| / t`` (torch's norm: a
    zero distance has gradient 0) and ``d`` the L1 label distance."""
    m = z.shape[0]
    count = m - offset if count is None else count
    labels = y.double().tolist()
    out = []
    for i in range(offset, offset + count):
        if m == 1:
            out.append((z[i] * 0).sum())  # no keys: 0 (differentiable, for the test's autograd)
            continue
        d = [sum(abs(a - b) for a, b in zip(labels[i], labels[j])) for j in range(m)]
        s = [-torch.linalg.vector_norm(z[i] - z[j]) / temperature for j in range(m)]
        total = z.new_zeros(())
        for j in range(m):
            if j != i:
                total = total + s[j] - torch.log(sum(torch.exp(s[k]) for k in range(m) if k != i and d[k] >= d[j]))
        out.append(-total / (m - 1))
    return torch.stack(out) if out else z[:0, 0] * 0


def loop_rnc_shifted(z, y, temperature):
    """:func:`loop_rnc` with each sum taken relative to its largest term: ``s_ij - log S_ij =
    (low - r_ij) / t - log sum_{k in S_ij} exp((low - r_ik) / t)``, ``low`` the smallest distance
    in ``S_ij`` -- every exponent <= 0, so float64 holds it at any temperature, where loop_rnc's
    plain exps underflow to 0 (a log of 0) once the distances over t pass about 700."""
    m = z.shape[0]
    labels = y.double().tolist()
    out = []
    for i in range(m):
        d = [sum(abs(a - b) for a, b in zip(labels[i], labels[j])) for j in range(m)]
        r = [torch.linalg.vector_norm(z[i] - z[j]) for j in range(m)]
        total = z.new_zeros(())
        for j in range(m):
            if j != i:
                suffix = [k for k in range(m) if k != i and d[k] >= d[j]]
                low = torch.stack([r[k] for k in suffix]).min()
                total = total + (low - r[j]) / temperature - torch.log(
                    sum(torch.exp((low - r[k]) / temperature) for k in suffix))
        out.append(-total / (m - 1))
    return torch.stack(out)


def rnc_inputs(m, D, L, dtype=torch.float32, seed=0, labels="integer", duplicate=True):
    """Features ``[m, D]`` and labels ``[m, L]``: integer labels in [0, 3] (many ties in label
    distance) or real ones, and (``duplicate``, m >= 4) row 3 a copy of row 1 (a zero distance)."""
    g = gen(seed)
    z = torch.randn(m, D, generator=g, dtype=torch.float64)
    if duplicate and m >= 4:
        z[3] = z[1]
    y = torch.randint(0, 4, (m, L), generator=g).double() if labels == "integer" else \
        torch.rand(m, L, generator=g, dtype=torch.float64) * 10
    return z.to(dtype), y.to(dtype)


ORACLE_CASES = [  # m, D, L, offset, count
    (1, 3, 1, 0, 1), (2, 3, 1, 0, 2), (2, 4, 2, 1, 1), (6, 3, 1, 0, 6), (7, 4, 2, 2, 3), (8, 2, 3, 5, 3),
    (5, 3, 1, 2, 0)]


@pytest.mark.parametrize("m, D, L, offset, count", ORACLE_CASES)
@pytest.mark.parametrize("labels", ["integer", "real"])
def test_reference_is_the_definition(m, D, L, offset, count, labels):
    """The reference's values and its backward (a random upstream gradient) are the oracle's, with
    ties in label distance and a pair of identical rows."""
    z, y = rnc_inputs(m, D, L, torch.float64, seed=m + 10 * L, labels=labels)
    leaf = z.clone().requires_grad_()
    expected = loop_rnc(leaf, y, 1.5, offset, count)
    upstream = torch.rand(count, generator=gen(count), dtype=torch.float64)
    expected_grad, = torch.autograd.grad((expected * upstream).sum(), leaf, allow_unused=True, materialize_grads=True)
    torch.testing.assert_close(reference(z, y, 1.5, offset, count), expected.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(reference_backward(upstream, z, y, 1.5, offset, count), expected_grad,
                               rtol=1e-10, atol=1e-12)


def test_published_loss_is_the_mean(monkeypatch):
    """Over all n rows, the published loss -1/(n(n-1)) sum_i sum_{j != i} (s_ij - log S_ij) is the
    mean of the per-anchor losses; the reference splits its anchors into chunks without a seam."""
    z, y = rnc_inputs(9, 4, 1, torch.float64, seed=3)
    whole = reference(z, y, 2.0, 0, 9)
    torch.testing.assert_close(whole.mean(), loop_rnc(z, y, 2.0).mean(), rtol=1e-12, atol=0)
    upstream = torch.rand(9, generator=gen(4), dtype=torch.float64)
    whole_grad = reference_backward(upstream, z, y, 2.0, 0, 9)
    monkeypatch.setattr(sys.modules["dirfast.ops.rnc_loss"], "CHUNK_PAIRS", 20)  # two anchors per chunk
    torch.testing.assert_close(reference(z, y, 2.0, 0, 9), whole, rtol=1e-14, atol=0)
    torch.testing.assert_close(reference_backward(upstream, z, y, 2.0, 0, 9), whole_grad, rtol=1e-12, atol=1e-15)


# =========================================================================== every backend
def run(backend, z, y, temperature=2.0, offset=0, count=None, upstream=None):
    """Output and feature gradient (for ``upstream``, default random) on ``backend``."""
    leaf = z.detach().clone().requires_grad_()
    with dirfast.use_backend(backend):
        out = dirfast.ops.rnc_loss(leaf, y, temperature, offset, count)
        if upstream is None:
            upstream = torch.rand(out.shape, generator=gen(out.numel()), dtype=torch.float64).to(out)
        out.backward(upstream)
    return out.detach(), leaf.grad, upstream


def check(backend, z, y, temperature=2.0, offset=0, count=None, value_tol=None, grad_tol=None):
    """Values and gradients on ``backend`` against the float64 reference on the same inputs
    (gradients relative to their largest magnitude); returns them."""
    out, grad, upstream = run(backend, z, y, temperature, offset, count)
    acc = stats_dtype(z.dtype, y.dtype)
    count = z.shape[0] - offset if count is None else count
    assert out.dtype == acc and out.shape == (count,) and out.device == z.device
    assert grad.dtype == z.dtype and grad.shape == z.shape
    z64, y64 = z.detach().cpu().double(), y.cpu().double()
    expected = reference(z64, y64, temperature, offset, count)
    expected_grad = reference_backward(upstream.cpu().double(), z64, y64, temperature, offset, count)
    torch.testing.assert_close(out.cpu().double(), expected, equal_nan=True, **(value_tol or tol(acc)))
    scale = max(1.0, float(expected_grad.abs().max())) if expected_grad.numel() else 1.0
    grad_tol = grad_tol or tol(z.dtype)  # written back in the features' dtype
    torch.testing.assert_close(grad.cpu().double() / scale, expected_grad / scale, equal_nan=True, **grad_tol)
    return out, grad


SMALL_CASES = [  # m, D, L, offset, count (under Triton's interpreter too: m <= 12, D <= 8)
    (1, 3, 1, 0, None), (2, 3, 1, 0, None), (2, 5, 2, 1, 1), (7, 4, 1, 0, None), (9, 5, 2, 3, 4),
    (12, 8, 3, 0, None), (12, 1, 1, 2, 9), (10, 3, 1, 4, 0), (11, 6, 1, 11, 0)]
LARGER_CASES = [(40, 37, 1, 5, 30), (33, 16, 2, 0, None), (130, 9, 1, 60, 70), (64, 130, 4, 1, 62)]


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("labels", ["integer", "real"])
def test_values_and_gradients(backend, device, dtype, labels):
    """Rows from 1 to 130, one to four labels, anchor subsets and none, ties in label distance,
    identical rows (Triton's interpreter: the small cases only)."""
    cases = SMALL_CASES + ([] if interpreted(backend, device) else LARGER_CASES)
    for seed, (m, D, L, offset, count) in enumerate(cases):
        z, y = rnc_inputs(m, D, L, dtype, seed=seed, labels=labels)
        check(backend, z.to(device), y.to(device), 1.5, offset, count)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
@pytest.mark.parametrize("z_dtype, y_dtype", [(torch.float16, torch.float32), (torch.bfloat16, torch.bfloat16),
                                              (torch.float32, torch.float64), (torch.bfloat16, torch.float64)], ids=str)
def test_dtypes(backend, device, z_dtype, y_dtype):
    """16-bit inputs are computed in float32, anything with float64 in float64; the gradient comes
    in the features' dtype."""
    z, y = rnc_inputs(10, 6, 2, seed=20)
    check(backend, z.to(device, z_dtype), y.to(device, y_dtype), 2.0, 1, 8)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
def test_non_contiguous_inputs(backend, device):
    """Transposed and sliced features, strided labels: the values and gradients of contiguous
    copies."""
    z, y = rnc_inputs(11, 7, 2, seed=21)
    views = [(z.t().contiguous().t(), y), (torch.cat([z, z], 1)[:, ::2], y[:, :1]),
             (z, torch.cat([y, y], 0)[::2]), (z[:, 1:5], y.t().contiguous().t())]
    for zv, yv in views:
        zv, yv = zv.to(device), yv.to(device)
        out, grad = check(backend, zv, yv, 2.0, 2, 7)
        contiguous = run(backend, zv.contiguous(), yv.contiguous(), 2.0, 2, 7)
        torch.testing.assert_close(out, contiguous[0])
        torch.testing.assert_close(grad, contiguous[1])


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
def test_tie_order_does_not_matter(backend, device):
    """Permuting the rows (features and labels together) permutes the losses and gradients: a tie
    group's sum does not depend on the order of its members; and one label, or the same label
    next to a constant one, gives the same losses (the C++ merges one finite label's keys
    instead of sorting them)."""
    z, y = rnc_inputs(9, 4, 1, seed=22)
    z, y = z.to(device), y.to(device)
    perm = torch.randperm(9, generator=gen(5)).to(device)
    out, grad, upstream = run(backend, z, y)
    out_p, grad_p, _ = run(backend, z[perm], y[perm], upstream=upstream[perm])
    torch.testing.assert_close(out_p, out[perm])
    torch.testing.assert_close(grad_p, grad[perm])
    out_2, grad_2, _ = run(backend, z, torch.cat([y, torch.full_like(y, 7.0)], 1), upstream=upstream)
    torch.testing.assert_close(out_2, out)
    torch.testing.assert_close(grad_2, grad)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
@pytest.mark.parametrize("dtype, temperature, grad_tol", [
    (torch.float64, 0.01, dict(rtol=0, atol=1e-9)), (torch.float64, 1e-4, dict(rtol=0, atol=1e-9)),
    # logits of -4e3 (float32) or -4e5 carry rounding of 2e-4 (or 4e-11), which the weights
    # exp(s_k - log S_j) amplify
    (torch.float32, 0.01, dict(rtol=0, atol=1e-3))], ids=str)
def test_small_temperatures_stay_finite(backend, device, dtype, temperature, grad_tol):
    """Logits of -4e3 and -4e5 (exp underflows to 0 even in float64 at the latter) give finite
    losses and gradients, the float64 reference's: the suffix sums are log-sum-exps, never plain
    sums of exp."""
    z, y = rnc_inputs(12, 8, 1, dtype, seed=23, labels="real", duplicate=False)
    z, y = (z * 10).to(device), y.to(device)
    value_tol = dict(rtol=2e-5 if dtype == torch.float32 else 1e-12, atol=0)
    out, grad = check(backend, z, y, temperature, value_tol=value_tol, grad_tol=grad_tol)
    assert bool(torch.isfinite(out).all()) and bool(torch.isfinite(grad).all())
    assert float(out.min()) > 1.0  # far from 0: the logits differ by hundreds


@pytest.mark.parametrize("temperature", [1.5, 1e-3, 1e-20, 1e-300], ids=str)
def test_reference_at_any_temperature(temperature):
    """The float64 reference is the shifted oracle at any temperature down to 1e-300 (values and
    gradients; ties in label distance, identical rows): its sums keep the scale, a distance, apart
    from the sum of exps. (As log-sum-exps of -r / t they lost log(tie group size) once r / t
    passed 1e16, and the gradients were wrong by factors.)"""
    z, y = rnc_inputs(9, 4, 1, torch.float64, seed=31)
    leaf = z.clone().requires_grad_()
    want = loop_rnc_shifted(leaf, y, temperature)
    upstream = torch.rand(9, generator=gen(9), dtype=torch.float64)
    want_grad, = torch.autograd.grad((want * upstream).sum(), leaf)
    torch.testing.assert_close(reference(z, y, temperature, 0, 9), want.detach(), rtol=1e-12, atol=0)
    scale = float(want_grad.abs().max())
    torch.testing.assert_close(reference_backward(upstream, z, y, temperature, 0, 9) / scale, want_grad / scale,
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
@pytest.mark.parametrize("temperature", [1e-6, 1e-20, TINY32], ids=["1e-6", "1e-20", "tiny"])
def test_float32_down_to_the_smallest_temperature(backend, device, temperature):
    """In float32, from 1e-6 down to the smallest accepted temperature (float32's smallest normal,
    losses near 1e38): losses and gradients are the float64 reference's to float32 rounding, with
    ties in label distance and identical rows. The logits -r / t pass float32's range there (they
    were -inf: NaN losses), and log S = -low / t + log(total) rounded log(total) away from about
    t = 1e-6 (gradients wrong by factors); the per-pair weights dL/ds / (r t) overflowed too."""
    z, y = rnc_inputs(12, 8, 1, seed=32)
    if temperature == TINY32:
        distances = torch.cdist(z.double(), z.double())
        assert float(distances.max()) / temperature > float(torch.finfo(torch.float32).max)
        assert float(reference(z.double(), y.double(), temperature, 0, 12).max()) < 3e38  # float32 has it
    out, grad = check(backend, z.to(device), y.to(device), temperature, value_tol=dict(rtol=1e-5, atol=0),
                      grad_tol=dict(rtol=0, atol=1e-5))
    assert bool(torch.isfinite(out).all()) and bool(torch.isfinite(grad).all())


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
def test_rows_far_from_the_origin(backend, device):
    """Float32 rows 1,000 from the origin and about 0.01 from one another: the gradients are the
    float64 reference's to float32 rounding. The reference and Triton backwards took the sums of
    row differences as products of the rows themselves, which cancelled (3e-2 off)."""
    z, y = rnc_inputs(12, 8, 1, seed=33)
    z = (1000.0 + 0.01 * z.double()).float()
    check(backend, z.to(device), y.to(device), 0.5, grad_tol=dict(rtol=0, atol=1e-5))


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
def test_nan_input_gives_nan(backend, device):
    """Values are not checked: a NaN feature, or a NaN label, makes every loss and gradient NaN
    (each anchor's sums reach that row), without an error or a hang."""
    z, y = rnc_inputs(7, 3, 1, seed=24)
    for bad in ("features", "labels"):
        zb, yb = z.clone(), y.clone()
        (zb if bad == "features" else yb)[4, 0] = math.nan
        out, grad, _ = run(backend, zb.to(device), yb.to(device))
        assert bool(torch.isnan(out).all()) and bool(torch.isnan(grad).all()), bad


@pytest.mark.parametrize("backend, device", [p for p in NOT_INTERPRETED if p.values[0] in ("auto", "reference", "cpp")])
def test_gradcheck(backend, device):
    """The feature gradient by finite differences, in float64, anchors a subset of the rows."""
    z, y = rnc_inputs(7, 3, 2, torch.float64, seed=25, duplicate=False)
    leaf = z.to(device).requires_grad_()
    with dirfast.use_backend(backend):
        assert torch.autograd.gradcheck(lambda f: dirfast.ops.rnc_loss(f, y.to(device), 0.7, 2, 4), (leaf,))


@pytest.mark.parametrize("backend, device", [p for p in BACKEND_DEVICE if p.values[0] in ("auto", "cpp")])
def test_compile_fullgraph(backend, device):
    """torch.compile(fullgraph=True) traces the op (its fake kernel) and its backward through the
    dispatcher: the loss and gradient of eager."""
    z, y = rnc_inputs(10, 5, 1, seed=26)
    z, y = z.to(device), y.to(device)

    def step(z, scale):
        return dirfast.ops.rnc_loss(z * scale, y, 2.0, 1, 8).mean()

    results = []
    with dirfast.use_backend(backend):
        for fn in (torch.compile(step, backend="aot_eager", fullgraph=True), step):
            leaf = z.clone().requires_grad_()
            loss = fn(leaf, torch.tensor(1.5, device=device))
            loss.backward()
            results.append((loss.detach(), leaf.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


@pytest.mark.skipif(not dirfast.backends()["cpp"]["available"], reason="the C++ kernels are not built here")
def test_cpp_same_bits_for_any_thread_count():
    """The C++ forward and backward give the same bits with 1, 2 or 3 threads: one label (keys
    merged) and two (keys sorted), all rows or a subset as anchors."""
    ops = torch.ops.dirfast
    z, y = rnc_inputs(300, 40, 2, seed=27, labels="real")
    upstream = torch.rand(300, generator=gen(6))

    def once():
        out = []
        for labels, offset, count in ((y[:, :1], 0, 300), (y, 17, 250)):
            out.append(ops.rnc_loss(z, labels, 2.0, offset, count))
            out.append(ops.rnc_loss_backward(upstream[:count], z, labels, 2.0, offset, count))
        return out

    same_bits_for_threads(once, (1, 2, 3))


@pytest.mark.parametrize("backend, device", [p for p in NOT_INTERPRETED
                                             if p.values[0] in ("reference", "cpp") and p.values[1] == "cpu"])
def test_no_m_by_m_by_d_tensor(backend, device):
    """Forward and backward never allocate an [m, m, D] tensor (the published code's differences),
    nor anything near it: the largest allocation (torch's CPU allocator, as the profiler records
    it) is an [m, m] matrix at most."""
    m, D = 96, 64
    z, y = rnc_inputs(m, D, 1, seed=28)
    z, y = z.to(device), y.to(device)
    run(backend, z, y)  # warm up
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run(backend, z, y)
    largest = max(event.cpu_memory_usage for event in prof.events() if event.name.startswith("aten::empty"))
    assert 0 < largest <= m * m * 8, f"largest allocation {largest} bytes; [m, m, D] float32 is {m * m * D * 4}"
