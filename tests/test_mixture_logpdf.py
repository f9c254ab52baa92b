"""``dirfast::mixture_logpdf``: the contract every backend with a kernel for it meets, against a
float64 loop oracle that writes out the documented non-finite rules (or the float64 reference
for inputs too large for it): values and the four gradients, layouts and dtypes, weights of 0,
invalid components, infinite and NaN predictions, subnormal variances; the same cases for
``mixture_logpdf_with_grads`` (the value with each element's gradients in x and in a variance
added to every component, in one pass); the C++ float32 code's vector widths, bit for bit; and the
reference's memory, O(N + K) forward and backward.

Bad arguments are in test_bad_inputs.py; opcheck, torch.compile and the backend a backward runs
on in test_backends.py.
"""

import functools
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import dirfast
from dirfast.ops.mixture_logpdf import (mixture_logpdf_with_grads_unchecked, reference, reference_backward,
                                        reference_with_grads)
from testing import backend_device_params, gen, interpreted, on, same_bits_for_threads, stats_dtype, tol

BACKEND_DEVICE = list(backend_device_params(op="mixture_logpdf"))


# =========================================================================== the oracle
def loop_mixture_logpdf(x, means, variances, log_weights):
    """``log sum_k exp(lw_k) exp(-(x - m_k)^2 / (2 v_k)) / sqrt(v_k)``, its gradients in x, m, v
    and lw (upstream gradient 1), and each element's gradient in a variance added to every
    component, element by element in Python floats (max-shifted), as float64 tensors; with the documented rules written out: an invalid component (mean not
    finite; variance NaN, <= 0 or +inf; log-weight NaN or +inf) makes everything NaN; a NaN
    element gives NaN (and NaN component gradients); a log-weight of -inf leaves the component
    out; an element of density 0 (x = +-inf, or every weight 0) gives -inf and adds no gradient."""
    xs, ms, vs, lws = (t.detach().double().cpu().reshape(-1).tolist() for t in (x, means, variances, log_weights))
    k_all = len(ms)
    invalid = any(not math.isfinite(m) or not 0 < v < math.inf or math.isnan(lw) or lw == math.inf
                  for m, v, lw in zip(ms, vs, lws))
    out, gx, gshift = [], [], []
    gm, gv, gw = [0.0] * k_all, [0.0] * k_all, [0.0] * k_all
    for xi in xs:
        if invalid or math.isnan(xi):
            out.append(math.nan)
            gx.append(math.nan)
            gshift.append(math.nan)
            gm, gv, gw = [math.nan] * k_all, [math.nan] * k_all, [math.nan] * k_all
            continue
        terms = {k: lws[k] - 0.5 * math.log(vs[k]) - (xi - ms[k]) * (xi - ms[k]) / (2 * vs[k])
                 for k in range(k_all) if lws[k] != -math.inf}
        top = max(terms.values(), default=-math.inf)
        if top == -math.inf:
            out.append(-math.inf)
            gx.append(0.0)
            gshift.append(0.0)
            continue
        value = top + math.log(math.fsum(math.exp(t - top) for t in terms.values()))
        out.append(value)
        g, shift = 0.0, 0.0
        for k, t in terms.items():
            r = math.exp(t - value)
            if r == 0:  # adds nothing, also where (x - m) / v overflows
                continue
            d = (xi - ms[k]) / vs[k]
            g -= r * d
            gm[k] += r * d
            gv[k] += r * (0.5 * d * d - 0.5 / vs[k])
            shift += r * (0.5 * d * d - 0.5 / vs[k])
            gw[k] += r
        gx.append(g)
        gshift.append(shift)

    def as_tensor(values, like):
        return torch.tensor(values, dtype=torch.float64).reshape(like.shape)

    return as_tensor(out, x), (as_tensor(gx, x), as_tensor(gm, means), as_tensor(gv, variances),
                               as_tensor(gw, log_weights)), as_tensor(gshift, x)


def mixture_inputs(shape, k, dtype, device, seed, table_dtype=None):
    g = gen(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64) * 3
    means = torch.linspace(-4, 4, k, dtype=torch.float64) + 0.1 * torch.randn(k, generator=g, dtype=torch.float64)
    variances = torch.rand(k, generator=g, dtype=torch.float64) * 2 + 0.05
    log_weights = torch.log_softmax(torch.randn(k, generator=g, dtype=torch.float64), 0)
    table_dtype = table_dtype or stats_dtype(dtype)
    return (x.to(device, dtype), means.to(device, table_dtype), variances.to(device, table_dtype),
            log_weights.to(device, table_dtype))


def run(backend, inputs):
    """The output and the gradients of the four inputs (upstream gradient 1) on ``backend``."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    with dirfast.use_backend(backend):
        out = dirfast.ops.mixture_logpdf(*leaves)
        out.backward(torch.ones_like(out))
    return out.detach(), [leaf.grad for leaf in leaves]


def _close_to_largest(got, want, tolerance):
    """``got`` against the oracle's ``want``, NaN and infinities where it has them, relative to
    the largest finite magnitude of ``want`` (at least 1)."""
    finite = want[torch.isfinite(want)]
    scale = max(1.0, float(finite.abs().max())) if finite.numel() else 1.0
    torch.testing.assert_close(got.cpu().double() / scale, want / scale, equal_nan=True, **tolerance)


def check_mixture(backend, inputs, value_tol=None, grads=(0, 1, 2, 3)):
    """The value and the gradients numbered in ``grads`` (x, means, variances, log_weights)
    against the oracle, NaN and infinities where it has them; gradients relative to their
    largest finite magnitude. The same for ``mixture_logpdf_with_grads``: the value, each
    element's gradient in x and (with 2 in ``grads``) in a variance added to every component.
    Returns the output."""
    out, got_grads = run(backend, inputs)
    expected, expected_grads, expected_shift = loop_mixture_logpdf(*inputs)
    acc = stats_dtype(*(t.dtype for t in inputs))
    value_tol = value_tol or tol(acc)
    assert out.dtype == acc and out.shape == inputs[0].shape and out.device == inputs[0].device
    torch.testing.assert_close(out.cpu().double(), expected, equal_nan=True, **value_tol)
    for i in grads:
        leaf, grad, want = inputs[i], got_grads[i], expected_grads[i]
        assert grad.dtype == leaf.dtype and grad.shape == leaf.shape
        _close_to_largest(grad, want, tol(leaf.dtype) if leaf.dtype in (torch.float16, torch.bfloat16) else value_tol)
    fused = on(backend, mixture_logpdf_with_grads_unchecked, *inputs)
    assert all(t.dtype == acc and t.shape == inputs[0].shape and t.device == inputs[0].device for t in fused)
    torch.testing.assert_close(fused[0].cpu().double(), expected, equal_nan=True, **value_tol)
    _close_to_largest(fused[1], expected_grads[0], value_tol)
    if 2 in grads:
        _close_to_largest(fused[2], expected_shift, value_tol)
    return out


# =========================================================================== every backend
@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape, k", [((1,), 1), ((37,), 5), ((300, 1), 100), ((2, 1, 9, 13), 17), ((4100,), 3)])
def test_values_and_gradients(backend, device, dtype, shape, k):
    """Values and the four gradients, one component or many, any shape of predictions."""
    check_mixture(backend, mixture_inputs(shape, k, dtype, device, seed=k))


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
@pytest.mark.parametrize("x_dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_predictions(backend, device, x_dtype):
    """16-bit predictions are read exactly and computed in float32 (the output is float32, the
    gradient of x in x's dtype)."""
    check_mixture(backend, mixture_inputs((2, 1, 5, 7), 9, x_dtype, device, seed=50))


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
def test_layouts(backend, device):
    """Non-contiguous predictions (channels-last depth maps, a transposed view, a channel slice)
    give the values of their contiguous copy, in the predictions' shape."""
    x, m, v, lw = mixture_inputs((2, 3, 6, 5), 7, torch.float32, device, seed=51)
    for view in (x.contiguous(memory_format=torch.channels_last), x.transpose(2, 3), x[:, 1:2]):
        torch.testing.assert_close(on(backend, dirfast.ops.mixture_logpdf, view, m, v, lw),
                                   on(backend, dirfast.ops.mixture_logpdf, view.contiguous(), m, v, lw))
        check_mixture(backend, (view, m, v, lw))


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
def test_far_predictions_and_no_elements(backend, device):
    """Predictions far from every component (terms of -1e6) stay finite (the log-sum-exp is
    max-shifted), in float64 to the oracle's precision and in float32 to its rounding of such
    terms; up to 1e6 standard deviations away, the gradients of one component are exact; no
    elements, no work."""
    _, m, v, _ = mixture_inputs((1,), 6, torch.float64, device, seed=52)
    far = torch.tensor([-3000.0, 0.0, 2500.0], dtype=torch.float64, device=device)
    check_mixture(backend, (far, m, v, torch.zeros_like(m)))
    far32 = far.float()  # float32 terms of -1e6 carry rounding of ~0.1: values to 1e-6 relative
    out, grads = run(backend, (far32, m.float(), v.float(), torch.zeros_like(m).float()))
    torch.testing.assert_close(out.double().cpu(), loop_mixture_logpdf(far, m, v, torch.zeros_like(m))[0], rtol=1e-6, atol=0)
    assert all(bool(torch.isfinite(g).all()) for g in grads)
    # One component and float32 predictions 1e4 to 1e6 standard deviations from it (terms to
    # -5e11): each element's whole responsibility is that component's, so its gradient in x is
    # -x, and each adds 1 to the log-weight's (the C++ backward had rounded them to 0 past 1e5).
    x = torch.tensor([1e4, 1e5, 1e6, -1e6], device=device)
    one = torch.zeros(1, device=device), torch.ones(1, device=device), torch.zeros(1, device=device)
    _, (grad_x, grad_m, _, grad_w) = run(backend, (x, *one))
    torch.testing.assert_close(grad_x, -x, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad_m, x.sum().reshape(1), rtol=1e-6, atol=0)
    torch.testing.assert_close(grad_w, torch.full_like(grad_w, 4.0), rtol=1e-6, atol=0)
    empty = on(backend, dirfast.ops.mixture_logpdf, far32[:0], m.float(), v.float(), m.float())
    assert empty.shape == (0,) and empty.dtype == torch.float32


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
def test_far_predictions_shared_by_components(backend, device):
    """Float32 predictions 100 to 100,000 standard deviations from six components 1 / distance
    apart, whose terms (to -1e10) stay within a few units of one another, so each element's
    responsibility is shared: the gradient in x, the fused op's two, and the sums over the
    components of the others (the gradients of a shift of every mean, variance and log-weight)
    are the float64 oracle's to 1e-5, although the float32 log density there rounds by 2^-11
    to 2^9 (responsibilities exp(term - out) had put grad x 4e-4 off at 100 standard
    deviations, 5% at 1,000 and 500% at 100,000). Each component's own gradient is not
    checked: half an ulp of an input moves it by 2% at 1,000 standard deviations."""
    g = gen(57)
    for distance in (1e2, 1e3, 1e4, 1e5):
        x = distance * (1 + 0.5 * torch.rand(8, generator=g, dtype=torch.float64))
        m = torch.arange(6, dtype=torch.float64) / distance
        lw = torch.log_softmax(torch.randn(6, generator=g, dtype=torch.float64), 0)
        inputs = tuple(t.to(device, torch.float32) for t in (x, m, torch.ones(6), lw))
        expected, expected_grads, expected_shift = loop_mixture_logpdf(*inputs)
        out, grads = run(backend, inputs)
        fused = on(backend, mixture_logpdf_with_grads_unchecked, *inputs)
        close = dict(rtol=1e-5, atol=0)
        torch.testing.assert_close(out.cpu().double(), expected, rtol=1e-6, atol=0)
        torch.testing.assert_close(grads[0].cpu().double(), expected_grads[0], **close)
        for i in (1, 2, 3):  # a shift of every mean (-sum of grad x), variance, log-weight (the elements)
            torch.testing.assert_close(grads[i].sum().cpu().double(), expected_grads[i].sum(), **close)
        torch.testing.assert_close(fused[1].cpu().double(), expected_grads[0], **close)
        torch.testing.assert_close(fused[2].cpu().double(), expected_shift, **close)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
def test_gradcheck(backend, device):
    """The four gradients in float64, by finite differences (under Triton's interpreter in
    gradcheck's fast mode, a random projection of the Jacobian)."""
    inputs = [t.detach().requires_grad_() for t in mixture_inputs((3, 1, 2, 4), 4, torch.float64, device, seed=53)]
    with dirfast.use_backend(backend):
        assert torch.autograd.gradcheck(dirfast.ops.mixture_logpdf, inputs, fast_mode=interpreted(backend, device))


INF, NAN = math.inf, math.nan
# (name, index of the component changed, which table, its value): each makes the mixture invalid.
INVALID = [("mean_inf", 0, INF), ("mean_-inf", 0, -INF), ("mean_nan", 0, NAN), ("variance_0", 1, 0.0),
           ("variance_negative", 1, -1.0), ("variance_inf", 1, INF), ("variance_nan", 1, NAN),
           ("log_weight_nan", 2, NAN), ("log_weight_+inf", 2, INF)]


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("name, table, value", INVALID, ids=[case[0] for case in INVALID])
def test_an_invalid_component_makes_every_output_nan(backend, device, dtype, name, table, value):
    """One bad component among five (also an infinite prediction among the elements): every
    output and every gradient is NaN."""
    inputs = list(mixture_inputs((9,), 5, dtype, device, seed=54))
    inputs[0][3] = INF
    inputs[1 + table] = inputs[1 + table].clone()
    inputs[1 + table][2] = value
    out = check_mixture(backend, inputs)
    assert bool(torch.isnan(out).all())


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("k", [3, 8])  # 3: not a power of two (kernels pad the components)
def test_infinite_and_nan_predictions(backend, device, dtype, k):
    """x = +-inf has density 0: -inf with a zero gradient, and the other elements' values and
    component gradients as without it; a NaN x gives NaN there (and NaN component gradients)."""
    x, m, v, lw = mixture_inputs((6,), k, dtype, device, seed=55)
    x[1], x[4] = INF, -INF
    out = check_mixture(backend, (x, m, v, lw))
    assert bool(torch.isneginf(out[[1, 4]]).all()) and bool(torch.isfinite(out[[0, 2, 3, 5]]).all())
    x[2] = NAN
    out = check_mixture(backend, (x, m, v, lw))
    assert bool(torch.isnan(out[2])) and bool(torch.isneginf(out[[1, 4]]).all())


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
def test_density_zero_has_zero_gradient_whatever_the_upstream_one(backend, device):
    """An element of density 0 gets a zero gradient in x even where the upstream gradient is NaN
    or infinite; the others get theirs."""
    x, m, v, lw = mixture_inputs((4,), 3, torch.float32, device, seed=56)
    x[1], x[2] = INF, -INF
    x.requires_grad_()
    with dirfast.use_backend(backend):
        out = dirfast.ops.mixture_logpdf(x, m, v, lw)
    upstream = torch.tensor([1.0, NAN, INF, NAN], device=device)
    (grad,) = torch.autograd.grad(out, x, upstream)
    assert grad[1].item() == 0 and grad[2].item() == 0
    assert bool(torch.isfinite(grad[0])) and bool(torch.isnan(grad[3]))


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_weights_of_zero(backend, device, dtype):
    """A log-weight of -inf leaves its component out (its gradients 0); with every weight 0 each
    output is -inf with zero gradients, not NaN."""
    x, m, v, lw = mixture_inputs((64,), 6, dtype, device, seed=52)
    lw[[1, 4]] = -INF
    check_mixture(backend, (x, m, v, lw))
    _, grads = run(backend, (x, m, v, lw))
    assert all(bool((g[[1, 4]] == 0).all()) for g in grads[1:])
    out = check_mixture(backend, (x[:5], m, v, torch.full_like(lw, -INF)))
    assert bool(torch.isneginf(out).all())
    _, grads = run(backend, (x[:5], m, v, torch.full_like(lw, -INF)))
    assert all(bool((g == 0).all()) for g in grads)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
@pytest.mark.parametrize("dtype, tiny, step", [(torch.float32, 1e-40, 1e-20), (torch.float64, 1e-310, 1e-155)], ids=str)
# the gradient in a subnormal variance overflows (it is of order 1 / v): NumPy says so under Triton's interpreter
@pytest.mark.filterwarnings("ignore:invalid value encountered in reduce:RuntimeWarning")
def test_subnormal_variances(backend, device, dtype, tiny, step):
    """A positive subnormal variance is a valid, very narrow component, computed in full: near
    its mean it dominates the density (values far above 0), elsewhere it adds nothing, also where
    z = (x - m) / sqrt(v) is huge but z^2 finite (0.05: a term of 2^-126 for exp(-5e37) times z s
    ~ 5e38 once made the gradient in x 10-20); the gradients in x, the means and the log-weights,
    and in the other variances, are the oracle's (the subnormal variance's own gradient, of order
    1 / v, overflows the dtype and is left out)."""
    x = torch.tensor([0.0, step, 3 * step, 0.5, -2.0, 4.0, 0.05], dtype=dtype, device=device)
    m = torch.tensor([0.0, 1.0, -1.0], dtype=dtype, device=device)
    v = torch.tensor([tiny, 0.5, 2.0], dtype=dtype, device=device)
    lw = torch.tensor([-1.0, -0.5, -2.0], dtype=dtype, device=device)
    assert 0 < float(v[0]) < torch.finfo(dtype).tiny
    out = check_mixture(backend, (x, m, v, lw), grads=(0, 1, 3))
    assert bool((out[:3] > 30).all()) and bool(torch.isfinite(out).all())
    _, grads = run(backend, (x, m, v, lw))
    _, expected_grads, expected_shift = loop_mixture_logpdf(x, m, v, lw)
    torch.testing.assert_close(grads[2][1:].cpu().double(), expected_grads[2][1:], **tol(dtype))
    # off the narrow component the gradients are of order 1 (check_mixture scales them by 1e20)
    fused = on(backend, mixture_logpdf_with_grads_unchecked, x, m, v, lw)
    for got, want in ((grads[0], expected_grads[0]), (fused[1], expected_grads[0]), (fused[2], expected_shift)):
        torch.testing.assert_close(got[3:].cpu().double(), want[3:], **tol(dtype))


@functools.lru_cache(maxsize=None)
def _many(dtype, small):
    """Inputs (x, means, variances, log-weights, upstream gradient) in ``dtype`` and the float64
    reference's output and gradients on those values: elements over several of each kernel's
    chunks (16,384 in C++, 2^22 / K terms in the reference) with a partial last one, 300
    components (``small``: fewer, for Triton's interpreter)."""
    n, k = (3000, 100) if small else (16384 + 37, 300)
    g = gen(13)
    x = (torch.randn(n, generator=g, dtype=torch.float64) * 3).to(dtype)
    m = torch.linspace(-5, 5, k, dtype=torch.float64).to(dtype)
    v, lw = (torch.rand(k, generator=g) + 0.1).to(dtype), torch.randn(k, generator=g).to(dtype)
    upstream = torch.rand(n, generator=g).to(dtype)
    x64, m64, v64, lw64 = (t.double() for t in (x, m, v, lw))
    expected = reference(x64, m64, v64, lw64)
    backward = reference_backward(upstream.double(), x64, expected, m64, v64, lw64)
    return (x, m, v, lw, upstream), (expected, *backward), reference_with_grads(x64, m64, v64, lw64)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_many_elements_and_components(backend, device, dtype):
    """Many elements and components: the float64 reference's values and gradients, the
    component gradients summed chunk by chunk; the fused op's values and element gradients."""
    (*tables, upstream), (expected, *expected_grads), expected_fused = _many(dtype, interpreted(backend, device))
    inputs = [t.to(device, copy=True).requires_grad_() for t in tables]
    with dirfast.use_backend(backend):
        out = dirfast.ops.mixture_logpdf(*inputs)
        out.backward(upstream.to(device))
        fused = mixture_logpdf_with_grads_unchecked(*(t.detach() for t in inputs))
    t = tol(dtype) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.detach().cpu().double(), expected, **t)
    for got, want in [*((leaf.grad, want) for leaf, want in zip(inputs, expected_grads)), *zip(fused, expected_fused)]:
        scale = float(want.abs().max())
        torch.testing.assert_close(got.cpu().double() / scale, want / scale, **t)


@pytest.mark.skipif(not dirfast.backends()["cpp"]["available"],
                    reason=f"cpp unavailable: {dirfast.backends()['cpp']['reason']}")
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpp_float32_forward_beyond_its_term_buffer(x_dtype):
    """The C++ float32 forward keeps at most 16 KiB of terms per vector of elements from its max
    pass (256 to 1,024 components by vector width) and recomputes the others: 1,100 components,
    elements in a partial last vector, infinite and NaN elements among them; the float64
    reference's values (and, with the element gradients, the fused op's), and the same bits for
    1 and 2 threads."""
    x, m, v, lw = mixture_inputs((3000 + 5,), 1100, torch.float32, "cpu", seed=60)
    x[-3:] = torch.tensor([math.inf, math.nan, -math.inf])
    x = x.to(x_dtype)
    out = on("cpp", dirfast.ops.mixture_logpdf, x, m, v, lw)
    fused = on("cpp", mixture_logpdf_with_grads_unchecked, x, m, v, lw)
    tables64 = (m.double(), v.double(), lw.double())
    expected = reference_with_grads(x.double(), *tables64)
    torch.testing.assert_close(reference(x.double(), *tables64), expected[0], equal_nan=True)
    for got, want in zip((out, *fused), (expected[0], *expected)):
        torch.testing.assert_close(got.double(), want, equal_nan=True, rtol=1e-5, atol=1e-5)
    same_bits_for_threads(lambda: [on("cpp", dirfast.ops.mixture_logpdf, x, m, v, lw),
                                   *on("cpp", mixture_logpdf_with_grads_unchecked, x, m, v, lw)])


def _tables_for_widths():
    """(name, means, variances, log_weights) float32 tables for the width test: K from 1 to 1,100
    (beyond the two-pass term buffer), weights of 0, all weights 0, an invalid component, a
    subnormal variance (its c_k 46 nats above the rest: the other elements take the two passes),
    widely spread variances, a narrow component."""
    g = gen(61)
    out = []
    for k in (1, 3, 10, 100, 1100):
        m = torch.randn(k, generator=g) * 2
        v = torch.rand(k, generator=g) + 0.05
        lw = torch.log_softmax(torch.randn(k, generator=g), 0)
        out.append((f"K={k}", m, v, lw))
    m, v, lw = out[2][1:]
    out += [("weights of 0", m, v, torch.where(torch.arange(10) % 3 == 0, -math.inf, lw)),
            ("all weights 0", m, v, torch.full((10,), -math.inf)),
            ("NaN weight", m, v, torch.where(torch.arange(10) == 4, math.nan, lw)),
            ("subnormal variance", m, torch.where(torch.arange(10) == 2, 1e-40, v), lw),
            ("spread variances", m, torch.logspace(-6, 6, 10), lw),
            ("one narrow component", m, torch.where(torch.arange(10) == 0, 1e-8, v), lw)]
    return out


@pytest.mark.skipif(dirfast._ext.CPU is None, reason=f"cpp unavailable: {dirfast._ext.CPU_REASON}")
@pytest.mark.parametrize("grads", [False, True], ids=["forward", "with_grads"])
def test_cpp_float32_forward_same_bits_for_every_vector_width(grads):
    """The C++ float32 forward (and the one with the element gradients) gives the same bits with
    its AVX-512 and AVX2 code (intrinsics) and the baseline's, as it promises: in one pass over the
    components and in two for the elements whose terms all lie far below the largest component
    (or that are not finite), in partial last vectors too; the op runs the widest code this
    machine has, and its values are the float64 reference's. Widths the machine lacks are left out
    (the hook returns None)."""
    lanes_of = dirfast._ext.CPU._mixture_logpdf_lanes
    op = mixture_logpdf_with_grads_unchecked if grads else dirfast.ops.mixture_logpdf
    oracle = reference_with_grads if grads else lambda *args: (reference(*args),)
    g = gen(62)
    x = torch.cat([torch.randn(1990, generator=g) * 4, torch.tensor(
        [math.inf, -math.inf, math.nan, 1e30, -1e30, 0.0, 50.0, -80.0, 1e4, 3e-3, -0.5])])
    x = x[torch.randperm(x.numel(), generator=g)]
    for name, m, v, lw in _tables_for_widths():
        args = [t.float().numpy().tobytes() for t in (m, v, lw)]
        for n in (x.numel(), 37):
            xb = x[:n].numpy().tobytes()
            outs = {lanes: lanes_of(xb, *args, lanes, grads) for lanes in (16, 8, 4)}
            ran = {lanes: torch.frombuffer(bytearray(o), dtype=torch.int32) for lanes, o in outs.items() if o}
            assert 4 in ran
            for lanes, got in ran.items():
                assert torch.equal(got, ran[4]), (name, n, lanes)
            got = on("cpp", op, x[:n], m, v, lw)
            got = list(got) if grads else [got]
            assert torch.equal(torch.cat(got).view(torch.int32), ran[max(ran)]), (name, n)
            want = [w.float() for w in oracle(x[:n].double(), m.double(), v.double(), lw.double())]  # inf past float32
            torch.testing.assert_close(got[0], want[0], equal_nan=True, rtol=2e-6, atol=2e-6, msg=name)
            finite = torch.isfinite(want[0])  # (a density 0 in float32 has gradients 0, not float64's)
            for g_got, g_want in zip(got[1:], want[1:]):
                _close_to_largest(g_got[finite], g_want[finite].double(), dict(rtol=1e-5, atol=1e-5))


# =========================================================================== the reference's memory
class PeakLiveBytes(TorchDispatchMode):
    """The peak, over the ops run while active, of the bytes held by the storages those ops
    created and that are still alive (on any device, without allocator statistics): a weak
    reference per storage, checked after every op."""

    def __init__(self, *inputs):
        super().__init__()
        self.known = {t.untyped_storage()._cdata for t in inputs}  # the inputs are not counted
        self.live, self.peak = {}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.multiprocessing.reductions import StorageWeakRef

        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                if storage._cdata not in self.known and storage._cdata not in self.live:
                    self.live[storage._cdata] = (StorageWeakRef(storage), storage.nbytes())
        self.live = {key: (ref, size) for key, (ref, size) in self.live.items() if not ref.expired()}
        self.peak = max(self.peak, sum(size for _, size in self.live.values()))
        return out


def test_reference_memory_is_o_of_n_plus_k():
    """The reference keeps no [N, K] matrix, forward, backward or fused: with K = 512, going from
    N = 20,000 to 60,000 elements adds a few bytes per element (its O(N) vectors), not the
    2 KiB per element of the [N, K] float32 terms or of chunks' matrices kept for later, and
    the peak stays within a few [chunk, K] matrices."""
    k = 512
    peaks = {}
    for n in (20000, 60000):
        x, m, v, lw = mixture_inputs((n,), k, torch.float32, "cpu", seed=56)
        with PeakLiveBytes(x, m, v, lw) as forward:
            out = reference(x, m, v, lw)
        grad = torch.ones_like(out)
        with PeakLiveBytes(grad, x, out, m, v, lw) as backward:
            reference_backward(grad, x, out, m, v, lw)
        with PeakLiveBytes(x, m, v, lw) as fused:
            reference_with_grads(x, m, v, lw)
        peaks[n] = (forward.peak, backward.peak, fused.peak)
    matrix = 4 * 8192 * k  # one [chunk, K] float32 matrix (chunks of 2^22 / K elements)
    for i, name in enumerate(("forward", "backward", "fused")):
        per_element = (peaks[60000][i] - peaks[20000][i]) / 40000
        assert per_element <= 64, f"{name}: {per_element:.0f} bytes more per element"
        assert peaks[60000][i] <= 10 * matrix, f"{name}: peak {peaks[60000][i]} bytes"
