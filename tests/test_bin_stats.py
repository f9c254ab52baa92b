"""``dirfast::bin_stats``: the contract every backend meets, against a float64 loop oracle (or
the float64 reference for inputs too large for it), then what only one backend has: Triton's
strategies and chunk sizes, the CUDA kernels' paths at GPU sizes.

Bad arguments are in test_bad_inputs.py; bitwise reproducibility across thread counts, opcheck
and torch.compile in test_backends.py.
"""

import functools

import pytest
import torch

import dirfast
from dirfast.ops.bin_stats import reference
from testing import (FLOAT_DTYPES, GPU, LAYOUTS, backend_device_params, backend_devices, deterministic, dtype_params,
                     features, gen, interpreted, num_threads, on, pairwise, rand_bins, rand_features, same_bits,
                     same_bits_for_threads, stats_dtype, tol)

BACKEND_DEVICE = list(backend_device_params())


# =========================================================================== the oracle
def loop_rows(x: torch.Tensor, bin_idx: torch.Tensor):
    """``[N, D]`` rows and ``[N]`` indices; dense ``[B, C, *S]`` becomes ``[B * prod(S), C]``."""
    if x.dim() == 2:
        return x, bin_idx.reshape(-1)
    return x.movedim(1, -1).flatten(0, -2), bin_idx.reshape(-1)


def loop_bin_stats(x: torch.Tensor, bin_idx: torch.Tensor, num_bins: int):
    """Per-bin count, mean and unbiased variance (0 if count <= 1), in float64, bin by bin.
    Rows whose index is outside [0, num_bins) belong to no bin."""
    rows, idx = loop_rows(x.detach().cpu().double(), bin_idx.detach().cpu().long())
    d = rows.shape[1]
    count = torch.zeros(num_bins, dtype=torch.int64)
    mean = torch.zeros(num_bins, d, dtype=torch.float64)
    var = torch.zeros(num_bins, d, dtype=torch.float64)
    for b in range(num_bins):
        members = rows[idx == b]
        n = members.shape[0]
        count[b] = n
        if n >= 1:
            mean[b] = members.sum(0) / n
        if n >= 2:
            var[b] = ((members - mean[b]) ** 2).sum(0) / (n - 1)
    return count, mean, var


def check_bin_stats(result, x, idx, num_bins, *, against="oracle", expected=None, atomics_per_address=None):
    """The one check of a ``bin_stats`` result: dtypes, shapes, device and contiguity, the counts
    exactly, the mean and variance within the accumulation dtype's tolerance of the float64 loop
    oracle (``against="reference"``: the float64 reference, for inputs too large for the loop;
    or the ``expected`` statistics given), empty bins 0, variance 0 in bins of one row and never
    negative.

    ``atomics_per_address``: the float32 sums of one (bin, feature) come from up to that many
    float additions in some order (the GPU kernels), so their rounding grows with it: about
    sqrt(n) half-ulps for float32 x (1e-6 sqrt(n)); for float16 / bfloat16 x every term is exact
    and the roundings of the running sum do not cancel (seen on an H200), so up to n ulps
    (1.2e-7 n)."""
    count, mean, var = result
    acc = stats_dtype(x.dtype)
    assert count.dtype == torch.int64 and count.shape == (num_bins,)
    assert mean.dtype == acc and var.dtype == acc, (mean.dtype, var.dtype)
    assert mean.shape == (num_bins, x.shape[1]) and var.shape == (num_bins, x.shape[1])
    assert mean.is_contiguous() and var.is_contiguous()
    assert count.device == x.device and mean.device == x.device and var.device == x.device
    if expected is not None:
        e_count, e_mean, e_var = expected
    elif against == "oracle":
        e_count, e_mean, e_var = loop_bin_stats(x, idx, num_bins)
    else:
        e_count, e_mean, e_var = reference(x.detach().cpu().double(), idx.cpu(), num_bins)
    count, mean, var = count.cpu(), mean.cpu(), var.cpu()
    assert torch.equal(count, e_count)
    t = tol(acc)
    if atomics_per_address and acc == torch.float32:
        growth = 1.2e-7 * atomics_per_address if x.element_size() == 2 else 1e-6 * atomics_per_address ** 0.5
        t = {"rtol": max(t["rtol"], growth), "atol": max(t["atol"], 1e-5)}
    torch.testing.assert_close(mean.double(), e_mean, **t)
    torch.testing.assert_close(var.double(), e_var, **t)
    assert torch.all(mean[count == 0] == 0) and torch.all(var[count <= 1] == 0) and torch.all(var >= 0)


# =========================================================================== every backend
@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
@pytest.mark.parametrize("dtype, layout, d", pairwise(FLOAT_DTYPES, LAYOUTS, [1, 5]),
                         ids=lambda v: str(v).replace("torch.", ""))
def test_layouts_and_dtypes(backend, device, dtype, layout, d):
    """Every memory layout (read in place or copied) in every dtype, one feature or a block of
    four feature planes and one more, rows with indices -1 and B among them."""
    x, idx = features(layout, dtype, device, num_bins=6, n=41, d=d, seed=d)
    check_bin_stats(on(backend, dirfast.ops.bin_stats, x, idx, 6), x, idx, 6)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
@pytest.mark.parametrize("n, d, num_bins", [(1, 1, 1), (2, 1, 1), (7, 5, 1), (37, 3, 1), (129, 17, 11), (300, 2, 97),
                                            (64, 130, 3)])
def test_sizes(backend, device, n, d, num_bins):
    """One row, one bin, more bins than rows, and more features than a tile holds (130)."""
    x, idx = features("rows", torch.float32, device, num_bins=num_bins, n=n, d=d, seed=n)
    check_bin_stats(on(backend, dirfast.ops.bin_stats, x, idx, num_bins), x, idx, num_bins)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
def test_special_bins(backend, device):
    """Empty bins, bins of one row (whose mean is that row, exactly), ignored rows, an input
    whose rows all select no bin, an empty input, features of dimension 0, int32 indices."""
    x = rand_features(8, 4, device=device, seed=5)
    idx = torch.tensor([5, 2, 5, 7, -1, 5, 7, 5], device=device)  # bin 2: 1 row; 5: 4; 7: 2
    for index in (idx, idx.int()):
        count, mean, var = on(backend, dirfast.ops.bin_stats, x, index, 9)
        check_bin_stats((count, mean, var), x, idx, 9)
        assert count.tolist() == [0, 0, 1, 0, 0, 4, 0, 2, 0]
        assert torch.equal(mean[2], x[1])
    count, mean, var = on(backend, dirfast.ops.bin_stats, x, torch.tensor([-1, 9, 12, -5, 9, 9, -1, 10], device=device), 9)
    assert count.sum() == 0 and torch.all(mean == 0) and torch.all(var == 0)
    count, mean, var = on(backend, dirfast.ops.bin_stats, x[:0], idx[:0], 4)
    assert count.tolist() == [0] * 4 and mean.shape == (4, 4) and torch.all(mean == 0) and torch.all(var == 0)
    count, mean, var = on(backend, dirfast.ops.bin_stats, x[:, :0], idx, 9)
    assert count.tolist() == [0, 0, 1, 0, 0, 4, 0, 2, 0] and mean.shape == (9, 0) and var.shape == (9, 0)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_non_finite_features(backend, device, dtype):
    """A NaN or an infinity in a feature makes that feature's mean NaN, whichever row of its bin
    holds it (first, later or last, alone or not), and its variance NaN in a bin of two or more
    rows, as the reference has it (not 0, which calibrate would read as "no spread"); its bin's
    other features and the other bins are untouched; a bin of one row keeps variance 0."""
    x = rand_features(9, 3, device=device, seed=7).to(dtype)
    x[0, 0], x[3, 1], x[6, 2], x[8, 0] = float("nan"), float("inf"), float("-inf"), float("nan")
    x[1, 2], x[2, 1], x[5, 0] = float("inf"), float("-inf"), float("inf")  # later, last, alone
    idx = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3, 4], device=device)  # bins 2 and 4: one row each
    count, mean, var = on(backend, dirfast.ops.bin_stats, x, idx, 5)
    e_count, e_mean, e_var = reference(x.cpu().double(), idx.cpu(), 5)
    assert torch.equal(count.cpu(), e_count)
    not_finite = torch.tensor([[1, 1, 1], [0, 1, 0], [1, 0, 0], [0, 0, 1], [1, 0, 0]], dtype=torch.bool)
    assert torch.equal(torch.isnan(mean.cpu()), not_finite) and torch.equal(torch.isnan(e_mean), not_finite)
    assert torch.equal(torch.isnan(var.cpu()), not_finite & (count.cpu() > 1)[:, None])
    torch.testing.assert_close(var.cpu().double(), e_var, equal_nan=True, **tol(var.dtype))
    torch.testing.assert_close(mean.cpu().double(), e_mean, equal_nan=True, **tol(mean.dtype))


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
@pytest.mark.parametrize("scale", [1e20, 1e30])
def test_variance_beyond_float32_is_inf(backend, device, scale):
    """Finite float32 features whose variance float32 cannot hold: +inf on every backend (the
    shifted sums' S2 - S1^2 / n had given inf - inf = NaN for some data), the mean finite."""
    x = rand_features(10, 3, device=device, seed=9) * scale
    idx = torch.tensor([0, 1] * 5, device=device)
    count, mean, var = on(backend, dirfast.ops.bin_stats, x, idx, 2)
    assert count.tolist() == [5, 5] and bool(torch.isfinite(mean).all())
    assert bool(torch.isposinf(var).all()), var


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
def test_sums_that_square_beyond_float32(backend, device):
    """100,000 float32 rows alternating 0 and 2e15 in one bin: the variance, 1e30, fits float32,
    but a sum of the rows' distances to one of them (about 1e20) does not square in it; the GPU
    kernels' shifted sums had returned 0."""
    x = torch.tensor([0.0, 2e15], device=device).repeat(50_000).unsqueeze(1)
    count, mean, var = on(backend, dirfast.ops.bin_stats, x, torch.zeros(100_000, dtype=torch.int64, device=device), 1)
    expected = x.double().var(0)
    torch.testing.assert_close(var.double(), expected.reshape(1, 1), rtol=1e-3, atol=0)
    torch.testing.assert_close(mean.double(), x.double().mean(0).reshape(1, 1), rtol=1e-5, atol=0)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
@pytest.mark.parametrize("shape", [(2, 0, 3), (3, 0, 2, 2)])
def test_dense_input_without_channels(backend, device, shape):
    """Dense ``x`` of C = 0 channels: every backend counts each bin's rows and gives ``[B, 0]``
    tables (the reference reshaped them to (-1, 0), which torch refuses), and so does
    accumulate_bin_stats_, which takes its statistics from bin_stats."""
    x = torch.zeros(shape, device=device)
    idx = rand_bins((shape[0],) + shape[2:], 3, low=-1, device=device, seed=3)
    count, mean, var = on(backend, dirfast.ops.bin_stats, x, idx, 3)
    check_bin_stats((count, mean, var), x, idx, 3)
    assert count.tolist() == [int((idx == b).sum()) for b in range(3)] and mean.shape == var.shape == (3, 0)
    running = (torch.ones(3, dtype=torch.float64, device=device), torch.zeros(3, 0, device=device),
               torch.zeros(3, 0, device=device))
    left_out = on(backend, dirfast.ops.accumulate_bin_stats_, *running, x, idx)
    assert running[0].tolist() == [1 + n for n in count.tolist()] and int(left_out) == int((idx < 0).sum())


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
@pytest.mark.parametrize("dtype", list(dtype_params()))
def test_zero_variance_dimension(backend, device, dtype):
    """A dead (all-zero) feature has variance exactly 0 (calibrate then leaves it alone, as the
    published code does); a constant non-zero feature has variance ~0."""
    x = rand_features(30, 4, dtype=dtype, device=device, seed=7)
    x[:, 1] = 0
    x[:, 3] = 0.1
    idx = rand_bins(30, 3, device=device, seed=8)
    count, mean, var = on(backend, dirfast.ops.bin_stats, x, idx, 3)
    assert torch.all(var[:, 1] == 0) and torch.all(var[:, 3].abs() < 1e-12)
    check_bin_stats((count, mean, var), x, idx, 3)


@functools.lru_cache(maxsize=None)
def _large_cases(small: bool):
    """(x, idx, num_bins, float64 reference statistics) with many rows: chunks of rows merged in
    a fixed order, more bins than rows, every row in one bin, dense tiles cut across images
    (``small``: fewer and smaller, for Triton's interpreter, where the chunk size is a parameter
    instead: test_triton_strategies)."""
    g = gen(50)
    if small:
        cases = [(torch.randn(4001, 7, generator=g) + 3, torch.randint(-1, 98, (4001,), generator=g), 97),
                 (torch.randn(2, 5, 31, 37, generator=g), torch.randint(-1, 12, (2, 31, 37), generator=g), 11)]
    else:
        cases = [(torch.randn(70001, 8, generator=g) + 3, torch.randint(-1, 98, (70001,), generator=g), 97),
                 (torch.randn(30001, 1, generator=g), torch.randint(-1, 65537, (30001,), generator=g), 65536),
                 (torch.randn(50000, 5, generator=g), torch.zeros(50000, dtype=torch.int64), 3),
                 (torch.randn(4, 7, 101, 103, generator=g).bfloat16(), torch.randint(-1, 12, (4, 101, 103), generator=g),
                  11),
                 (torch.randn(3, 5, 61, 67, generator=g, dtype=torch.float64) + 3,
                  torch.randint(-1, 98, (3, 61, 67), generator=g), 97)]
    return [(x, idx, num_bins, reference(x.double(), idx, num_bins)) for x, idx, num_bins in cases]


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
def test_large_inputs(backend, device):
    """Enough elements for the kernels' multi-chunk, multi-program paths and their merges; a bin
    of one row, wherever that row lies, has that row as its mean, exactly."""
    for x, idx, num_bins, expected in _large_cases(interpreted(backend, device)):
        x, idx = x.to(device), idx.to(device)
        count, mean, var = on(backend, dirfast.ops.bin_stats, x, idx, num_bins)
        check_bin_stats((count, mean, var), x, idx, num_bins, expected=expected)
        one = (count == 1).cpu()
        assert torch.equal(mean.cpu()[one].double(), expected[1][one])


@functools.lru_cache(maxsize=None)
def _far_from_zero(shape):
    """float32 features ``shape`` ([N, D] or dense) whose 4 bins have mean / std = 10,000, their
    bins, and the float64 reference's mean and variance of those float32 values."""
    x = (torch.randn(*shape, generator=gen(11), dtype=torch.float64) + 1e4).float()
    idx = torch.randint(0, 4, shape[:1] + shape[2:], generator=gen(12))
    return x, idx, reference(x.double(), idx, 4)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
@pytest.mark.parametrize("layout", ["rows", "dense"])
@pytest.mark.parametrize("det", [False, True], ids=["default", "deterministic"])
def test_float32_accuracy_far_from_zero(backend, device, layout, det):
    """The accuracy criterion: float32 variance within 1e-4 (relative) and the mean within 1e-6
    of float64 sums of the same float32 values when a bin's mean is 10,000 times its standard
    deviation (a naive sum of squares loses every digit; a running mean of the features
    themselves, as the C++ kernels kept, lost 4e-4 of the variance), in either mode."""
    if interpreted(backend, device):
        shape = (1500, 4) if layout == "rows" else (2, 4, 24, 32)
    elif torch.device(device).type == "cuda":  # the grouped-rows and the plane kernels
        shape = (40000, 256) if layout == "rows" else (4, 16, 48, 64)
    else:  # bins spread over every chunk of the C++ kernels
        shape = (48000, 16) if layout == "rows" else (4, 16, 100, 120)
    x, idx, (_, e_mean, e_var) = _far_from_zero(shape)
    with deterministic(det):
        count, mean, var = on(backend, dirfast.ops.bin_stats, x.to(device), idx.to(device), 4)
    assert torch.all(count.cpu() > 100) and torch.all(e_var > 0.5)
    assert ((var.cpu().double() - e_var).abs() / e_var).max() < 1e-4
    assert ((mean.cpu().double() - e_mean).abs() / e_mean.abs()).max() < 1e-6


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
@pytest.mark.parametrize("layout", ["rows", "dense"])
def test_deterministic_mode_is_bitwise_reproducible(backend, device, layout):
    """torch.use_deterministic_algorithms(True): two runs give the same bits (on a GPU, no
    float atomics), and the right statistics."""
    if torch.device(device).type == "cuda":
        g = gen(13)
        x = torch.randn(30000, 200, generator=g).cuda() if layout == "rows" else torch.randn(4, 32, 60, 80, generator=g).cuda()
        idx = torch.randint(-1, 61, (x.shape[0],) + tuple(x.shape[2:]), generator=g).cuda()
        against = "reference"
    else:
        x, idx = features(layout, torch.float32, device, num_bins=60, n=200, d=5, seed=13)
        against = "oracle"
    with deterministic():
        first = on(backend, dirfast.ops.bin_stats, x, idx, 60)
        second = on(backend, dirfast.ops.bin_stats, x, idx, 60)
    for a, b in zip(first, second):
        same_bits(a, b)
    check_bin_stats(first, x, idx, 60, against=against)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
@pytest.mark.parametrize("layout", ["rows", "rows_column_major", "dense", "dense_channels_last"])
def test_gradients(backend, device, layout):
    """``mean`` and ``var`` are differentiable in ``x`` (float64 gradcheck; a bin of one row, whose
    variance is 0 whatever its row, and rows of no bin among them), on the backend of the forward;
    an infinite feature in a row of no bin gives no NaN gradient."""
    x, idx = features(layout, torch.float64, device, num_bins=4, n=13, d=3, seed=31)
    idx = idx.clone()
    idx.view(-1)[:3] = torch.tensor([3, -1, 4])  # bin 3 holds one row; -1 and 4 select none
    idx.masked_fill_(idx == 3, 0)
    idx.view(-1)[0] = 3
    x = x.detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: on(backend, dirfast.ops.bin_stats, t, idx, 4)[1:], (x,),
                                    fast_mode=interpreted(backend, device))
    outside = (idx < 0) | (idx >= 4)
    spread = x.detach().clone().movedim(1, -1)
    spread[outside] = float("inf")
    spread = spread.movedim(-1, 1).requires_grad_()
    _, mean, var = on(backend, dirfast.ops.bin_stats, spread, idx, 4)
    (grad,) = torch.autograd.grad(mean.sum() + var.sum(), spread)
    assert torch.isfinite(grad).all() and (grad.movedim(1, -1)[outside] == 0).all()


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
def test_variance_gradient_at_mean_1e4_std(backend, device):
    """float32 rows of mean 1e4 and std 1: the variance's gradient keeps float32's accuracy (its
    deviations corrected for the rounding of the saved mean, 1e-3 against a spread of 1), against
    float64 autograd through the reference."""
    n = 60 if interpreted(backend, device) else 600
    x = (torch.randn(n, 2, generator=gen(33), dtype=torch.float64) + 1e4).float().to(device)
    idx = torch.randint(0, 3, (n,), generator=gen(34)).to(device)
    upstream = torch.randn(3, 2, generator=gen(35), dtype=torch.float64).to(device)
    got = x.clone().requires_grad_()
    (on(backend, dirfast.ops.bin_stats, got, idx, 3)[2] * upstream.float()).sum().backward()
    exact = x.double().requires_grad_()
    (reference(exact, idx, 3)[2] * upstream).sum().backward()
    assert (got.grad.double() - exact.grad).abs().max() <= 1e-6 * exact.grad.abs().max()


# =========================================================================== C++ kernel only
needs_cpp = pytest.mark.skipif(not dirfast.backends()["cpp"]["available"],
                               reason=f"cpp unavailable: {dirfast.backends()['cpp']['reason']}")


@functools.lru_cache(maxsize=None)
def _cpp_rows_case(way: str, dtype: torch.dtype):
    """Rows ([N, D]) inputs for the ways of the C++ kernel: "gathered" (long rows, bucket tables
    far larger than a cache: rows gathered bucket by bucket), "either" (long rows, small tables:
    x scanned in order by one thread, rows gathered by several) and "chunked" (short rows: chunks
    of rows into tables merged in order). In each, one bucket holds most rows, so that it is cut
    into several segments (N / 16 rows each) or spans every chunk, split between 2 and 3 threads;
    indices -1 and B select no bucket. The odd buckets (7 among them) are far from zero, which the
    kernel redoes with shifted updates (src/welford.h): 5,000 standard deviations in float32 and
    float64, 50 in float16 and bfloat16; the even ones 2.5."""
    g = gen(60)
    n, d, num_bins = {"gathered": (16000, 512, 4000), "either": (8000, 128, 10), "chunked": (20000, 24, 10)}[way]
    idx = torch.randint(-1, num_bins + 1, (n,), generator=g)
    idx[torch.rand(n, generator=g) < 0.6] = 7
    far = 1e4 if dtype in (torch.float32, torch.float64) else 100.0
    offset = torch.where(idx % 2 == 1, far, 5.0)[:, None]
    x = (torch.randn(n, d, generator=g, dtype=torch.float64) * 2 + offset).to(dtype)
    return x, idx, num_bins, reference(x.double(), idx, num_bins)


@needs_cpp
@pytest.mark.parametrize("way", ["gathered", "either", "chunked"])
@pytest.mark.parametrize("dtype", list(dtype_params()))
def test_cpp_rows_ways(way, dtype):
    """Each way of the C++ kernel for rows, each dtype, int64 and int32 indices: the reference's
    statistics, and the same bits for 1, 2 and 3 threads (whichever way each takes)."""
    x, idx, num_bins, expected = _cpp_rows_case(way, dtype)
    assert int((idx == 7).sum()) > 3 * x.shape[0] / 16  # bucket 7: several segments
    result = on("cpp", dirfast.ops.bin_stats, x, idx, num_bins)
    check_bin_stats(result, x, idx, num_bins, expected=expected)
    same_bits_for_threads(lambda: on("cpp", dirfast.ops.bin_stats, x, idx.int(), num_bins), (1, 2, 3))
    for a, b in zip(result, on("cpp", dirfast.ops.bin_stats, x, idx.int(), num_bins)):
        same_bits(a, b)


@needs_cpp
@pytest.mark.parametrize("way", ["gathered", "either", "chunked"])
def test_cpp_a_far_bucket_changes_no_other(way):
    """A bucket moved far from zero is redone with shifted updates; every other bucket keeps the
    bits it had (the chunked way had redone the whole pass), on 1 and 2 threads."""
    x, idx, num_bins, _ = _cpp_rows_case(way, torch.float32)
    x = x - torch.where(idx % 2 == 1, 1e4, 0.0)[:, None]  # every bucket near zero
    moved = x.clone()
    moved[idx == 3] += 1e4
    for threads in (1, 2):
        with num_threads(threads):
            before = on("cpp", dirfast.ops.bin_stats, x, idx, num_bins)
            after = on("cpp", dirfast.ops.bin_stats, moved, idx, num_bins)
        others = torch.arange(num_bins) != 3
        for a, b in zip(before, after):
            same_bits(a[others], b[others])
        expected = reference(moved.double(), idx, num_bins)
        torch.testing.assert_close(after[2][3].double(), expected[2][3], **tol(torch.float32))


@needs_cpp
@pytest.mark.parametrize("way", ["gathered", "either", "chunked"])
@pytest.mark.parametrize("far", [True, False], ids=["far", "near"])
def test_cpp_non_finite_feature_in_a_later_piece(way, far):
    """Bucket 7 of each way is cut into pieces (segments or chunks) merged in order. An infinity
    in every one of its rows from the middle on (feature 0: later pieces begin with it) or in one
    middle row (feature 1) makes the mean and the variance NaN there, as the reference has it
    (Chan's merge of a piece that began with an infinity had made the variance infinite), with
    redone shifted updates (far from zero) and plain ones (near it)."""
    x, idx, num_bins, _ = _cpp_rows_case(way, torch.float32)
    x = x.clone() if far else x - torch.where(idx % 2 == 1, 1e4, 0.0)[:, None]
    rows = (idx == 7).nonzero().flatten()
    x[rows[len(rows) // 2:], 0] = float("inf")
    x[rows[len(rows) // 2], 1] = float("-inf")
    count, mean, var = on("cpp", dirfast.ops.bin_stats, x, idx, num_bins)
    e_count, e_mean, e_var = reference(x.double(), idx, num_bins)
    assert torch.isnan(mean[7, :2]).all() and torch.isnan(var[7, :2]).all()
    torch.testing.assert_close(mean.double(), e_mean, equal_nan=True, **tol(mean.dtype))
    torch.testing.assert_close(var.double(), e_var, equal_nan=True, **tol(var.dtype))


@needs_cpp
@pytest.mark.parametrize("way", ["gathered", "either", "chunked"])
def test_cpp_far_bucket_with_a_spread_beyond_float32(way):
    """Bucket 7 (far from zero: redone with shifted updates) with a feature that spans more than
    float32's range (its first row 0.9 of the largest float32, its last -0.6 of it): that feature
    keeps its plain updates, so its mean is finite and its variance infinite, as in the reference
    (a shift by the first row had overflowed the last row's difference into a NaN mean); the
    far features keep their accuracy."""
    x, idx, num_bins, _ = _cpp_rows_case(way, torch.float32)
    x = x.clone()
    rows = (idx == 7).nonzero().flatten()
    big = torch.finfo(torch.float32).max
    x[rows[0], 1], x[rows[-1], 1] = 0.9 * big, -0.6 * big
    count, mean, var = on("cpp", dirfast.ops.bin_stats, x, idx, num_bins)
    e_count, e_mean, e_var = reference(x.double(), idx, num_bins)
    assert torch.isfinite(mean[7, 1]) and var[7, 1] == float("inf")
    torch.testing.assert_close(mean.double(), e_mean, **tol(torch.float32))
    others = torch.ones_like(var, dtype=torch.bool)
    others[7, 1] = False
    torch.testing.assert_close(var.double()[others], e_var[others], **tol(torch.float32))


# =========================================================================== Triton only
needs_triton = pytest.mark.skipif(not dirfast.backends()["triton"]["available"],
                                  reason=f"triton unavailable: {dirfast.backends()['triton']['reason']}")
TRITON_DEVICE = backend_devices("triton")[0]


def triton_bin_stats(x, idx, num_bins, deterministic=False, **path):
    from dirfast.triton import bin_stats as kernels

    return kernels.bin_stats(x, idx, num_bins, deterministic, **path)


@needs_triton
@pytest.mark.parametrize("strategy", ["csr", "direct"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_triton_strategies(layout, strategy):
    """Both work decompositions on every layout, with chunks of 4 and 8 rows (bins cut in
    several chunks), whatever the layout would choose."""
    x, idx = features(layout, torch.float32, TRITON_DEVICE, num_bins=6, seed=len(layout))
    for chunk_rows in (4, 8):
        check_bin_stats(triton_bin_stats(x, idx, 6, strategy=strategy, chunk_rows=chunk_rows), x, idx, 6)


@needs_triton
@pytest.mark.parametrize("dtype", list(dtype_params()))
@pytest.mark.parametrize("det", [False, True], ids=["atomic", "deterministic"])
def test_triton_dtypes_and_modes(dtype, det):
    """Every dtype in the atomic and the deterministic variants, bins of one chunk and of
    several."""
    x, idx = features("rows", dtype, TRITON_DEVICE, num_bins=6, n=70, d=5, seed=3)
    check_bin_stats(triton_bin_stats(x, idx, 6, det, chunk_rows=4), x, idx, 6)
    check_bin_stats(triton_bin_stats(x, idx, 6, det), x, idx, 6)


@needs_triton
def test_triton_rejects_an_unknown_strategy():
    """A misspelt strategy is an error, not a silent fallback."""
    x, idx = features("rows", torch.float32, TRITON_DEVICE)
    with pytest.raises(ValueError, match="strategy"):
        triton_bin_stats(x, idx, 5, strategy="tiles")


# =========================================================================== CUDA kernels only
needs_cuda = pytest.mark.skipif(not dirfast.backends()["cuda"]["available"],
                                reason=f"cuda unavailable: {dirfast.backends()['cuda']['reason']}")
GPU_LAYOUTS = ["rows", "rows_wide", "rows_strided", "rows_odd_d", "rows_misaligned", "column_major", "sliced",
               "dense", "dense_odd", "channels_last"]


def gpu_layout(name: str, n=3000, d=96, seed=0):
    """``(x, idx)`` on the GPU in a layout the CUDA kernels walk in their own way (vector loads,
    scalar tails, planes), or one they copy (``sliced``); 40 bins and indices -1 and 40."""
    g = gen(seed)
    idx = torch.randint(-1, 41, (n,), generator=g).cuda()
    base = torch.randn(n, 2 * d + 2, generator=g).cuda()
    dense = torch.randn(3, 24, 20, 52, generator=g).cuda()
    idx_dense = torch.randint(-1, 41, (3, 20, 52), generator=g).cuda()
    return {
        "rows": lambda: (base[:, :d].contiguous(), idx),
        "rows_wide": lambda: (torch.randn(n, 4 * d, generator=g).cuda(), idx),  # the grouped kernel
        "rows_strided": lambda: (base[:, :d], idx),  # row stride 2d + 2: vector loads still aligned
        "rows_odd_d": lambda: (base[:, : d - 1].contiguous(), idx),  # scalar paths
        "rows_misaligned": lambda: (base[:, 1 : d + 1], idx),  # scalar paths
        "column_major": lambda: (base[:, :d].t().contiguous().t(), idx),
        "sliced": lambda: (base[::2, 1::2][:, :d], idx[::2]),  # copied once
        "dense": lambda: (dense, idx_dense),
        "dense_odd": lambda: (torch.randn(2, 5, 7, 9, generator=g).cuda(), torch.randint(-1, 41, (2, 7, 9), generator=g).cuda()),
        "channels_last": lambda: (dense.contiguous(memory_format=torch.channels_last), idx_dense),
    }[name]()


# The accumulate kernels of csrc/cuda/bin_stats.cu: one of them runs per call.
ACCUMULATE_KERNELS = ("accumulate_grouped_kernel", "accumulate_shared_kernel", "accumulate_direct_kernel")


def check_cuda_kernel(expected, x, idx, num_bins, atomics_per_address=None):
    """The CUDA bin_stats against the reference, and of the accumulate kernels only ``expected``
    ran (torch.profiler's kernel names, demangled or mangled)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        result = on("cuda", dirfast.ops.bin_stats, x, idx, num_bins)
        torch.cuda.synchronize()
    check_bin_stats(result, x, idx, num_bins, against="reference", atomics_per_address=atomics_per_address)
    names = {event.key for event in prof.key_averages()}
    ran = {k for k in ACCUMULATE_KERNELS if any(k + "<" in name or k + "I" in name for name in names)}
    assert ran == {expected}, f"ran {ran or 'none'} of {ACCUMULATE_KERNELS}"


@needs_cuda
@pytest.mark.parametrize("layout", GPU_LAYOUTS)
@pytest.mark.parametrize("det", [False, True], ids=["atomic", "deterministic"])
def test_cuda_layouts(layout, det):
    """Every layout the CUDA kernels walk in their own way (or copy), in either mode."""
    x, idx = gpu_layout(layout)
    with deterministic(det):
        check_bin_stats(on("cuda", dirfast.ops.bin_stats, x, idx, 40), x, idx, 40, against="reference")


@needs_cuda
@pytest.mark.parametrize("dtype", list(dtype_params()))
@pytest.mark.parametrize("num_bins", [1, 97, 300, 5000])  # 300, 5000: too many for shared memory
@pytest.mark.parametrize("dim", [130, 256])  # 256: rows grouped by bin (16-byte rows, >= 32 vectors)
def test_cuda_dtypes_and_bin_counts(dtype, num_bins, dim):
    """Every dtype with int32 indices, bins that fit shared memory and bins that do not."""
    g = gen(num_bins)
    x = torch.randn(20000, dim, generator=g).to(dtype=dtype, device="cuda")
    idx = torch.randint(-2, num_bins + 2, (20000,), generator=g).cuda().int()
    check_bin_stats(on("cuda", dirfast.ops.bin_stats, x, idx, num_bins), x, idx, num_bins, against="reference")


@needs_cuda
@pytest.mark.parametrize("dtype", list(dtype_params()))
@pytest.mark.parametrize("num_bins, n", [(1, 5000), (7, 20000), (97, 20000), (3000, 2000)])
@pytest.mark.parametrize("dim", [264, 512, 1032])  # 264, 1032: lanes past the last feature in every dtype
def test_cuda_grouped_kernel(dtype, num_bins, n, dim):
    """The kernel that walks rows grouped by bin (rows of 16-byte vectors, dim >= 32 vectors): a
    warp's rows in one bin, a few, and many bins of one or two rows; rows of no bin."""
    g = gen(num_bins + dim)
    x = (torch.randn(n, dim, generator=g) * 3 + 10).to(dtype=dtype, device="cuda")
    idx = torch.randint(-2, num_bins + 2, (n,), generator=g).cuda()
    largest_bin = int(torch.bincount(idx[(idx >= 0) & (idx < num_bins)].cpu(), minlength=1).max())
    check_cuda_kernel("accumulate_grouped_kernel", x, idx, num_bins, atomics_per_address=largest_bin)


@needs_cuda
@pytest.mark.parametrize("case", ["int32_bins", "row_stride", "few_rows", "one_row"])
def test_cuda_grouped_kernel_layouts(case):
    """int32 indices, rows with a stride past dim, and fewer valid rows than a warp's range."""
    g = gen(31)
    n, dim, num_bins = {"few_rows": 50, "one_row": 1}.get(case, 3000), 256, 9
    x = torch.randn(n, dim + 8, generator=g).cuda()
    x = x[:, :dim] if case == "row_stride" else x[:, :dim].contiguous()  # 16-byte aligned rows either way
    idx = torch.randint(-1, num_bins, (n,), generator=g).cuda()
    if case == "int32_bins":
        idx = idx.int()
    if case == "one_row":
        idx[0] = 4
    check_cuda_kernel("accumulate_grouped_kernel", x, idx, num_bins)


@needs_cuda
@pytest.mark.parametrize("dtype", list(dtype_params()))
@pytest.mark.parametrize("num_bins", [1, 40, 100, 5000])
@pytest.mark.parametrize("case", ["depth", "depth_odd_width", "random", "column_major"])
def test_cuda_plane_kernel(dtype, num_bins, case):
    """Planes of pixels: bins that follow the image rows, 64 pixels wide (nearly every warp's 32
    pixels in one bin) or 53 wide with noise (warps straddling rows and bins), random bins
    (every warp mixed), and [N, D] stored column-major (one plane per feature)."""
    g = gen(num_bins + 7)
    if case == "column_major":
        x = (torch.randn(3001, 24, generator=g) * 2 + 5).t().contiguous().t()
        idx = torch.randint(-1, num_bins + 1, (3001,), generator=g)
    else:
        width = 64 if case == "depth" else 53
        x = torch.randn(3, 24, 37, width, generator=g) * 2 + 5
        rows = torch.linspace(0, num_bins - 1, 37).view(1, 37, 1).expand(3, 37, width)
        if case == "random":
            idx = torch.randint(-1, num_bins + 1, (3, 37, width), generator=g)
        else:
            noise = 0.01 if case == "depth" else 0.3
            idx = (rows + torch.randn(3, 37, width, generator=g) * noise).round().long()
            idx[0, :2] = -1  # no bin
            idx[1, -1, :10] = num_bins  # outside [0, B)
    x, idx = x.to(dtype=dtype, device="cuda"), idx.cuda()
    largest_bin = int(torch.bincount(idx[(idx >= 0) & (idx < num_bins)].flatten().cpu(), minlength=1).max())
    check_cuda_kernel("accumulate_direct_kernel", x, idx, num_bins, atomics_per_address=largest_bin)


@needs_cuda
@pytest.mark.parametrize("dtype, num_bins", [(torch.float32, 148), (torch.float32, 149),
                                             (torch.float64, 74), (torch.float64, 75)], ids=str)
def test_cuda_at_the_shared_memory_limit(dtype, num_bins):
    """The largest bin count of the shared-memory kernel (112 KiB) and the first past it. Past
    the limit every element is a float atomic on S1 = sum(x - K): its rounding grows with
    n * |mean - K| (K, the first row, may be 3 std from the mean), so a float32 mean near 0 carries
    an absolute error of a few 1e-6 at n ~ 200, as many float32 ulps of the data's scale."""
    g = gen(num_bins)
    x = torch.randn(30000, 100, generator=g).to(dtype=dtype, device="cuda")
    idx = torch.randint(-1, num_bins + 1, (30000,), generator=g).cuda()
    count, mean, var = on("cuda", dirfast.ops.bin_stats, x, idx, num_bins)
    e_count, e_mean, e_var = reference(x.double().cpu(), idx.cpu(), num_bins)
    assert torch.equal(count.cpu(), e_count)
    mean_tol = dict(rtol=2e-5, atol=1e-5) if (dtype, num_bins) == (torch.float32, 149) else tol(dtype)
    torch.testing.assert_close(mean.cpu().double(), e_mean, **mean_tol)
    torch.testing.assert_close(var.cpu().double(), e_var, **tol(dtype))


@needs_cuda
@pytest.mark.parametrize("det", [False, True], ids=["atomic", "deterministic"])
def test_cuda_one_channel_depth_maps(det):
    """[B, 1, H, W]: one feature, rows of one element."""
    g = gen(14)
    x = torch.randn(4, 1, 60, 80, generator=g).cuda()
    idx = torch.randint(-1, 51, (4, 60, 80), generator=g).cuda()
    with deterministic(det):
        check_bin_stats(on("cuda", dirfast.ops.bin_stats, x, idx, 50), x, idx, 50, against="reference")


@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")
@needs_triton
def test_triton_gpu_sizes():
    """Triton on a GPU at its launch sizes: several column blocks, both modes, dense maps."""
    g = gen(50)
    x = torch.randn(20000, 300, generator=g).cuda()
    idx = torch.randint(-1, 101, (20000,), generator=g).cuda()
    for det in (False, True):
        check_bin_stats(triton_bin_stats(x, idx, 100, det), x, idx, 100, against="reference")
    xd = torch.randn(4, 32, 60, 80, generator=g).cuda()
    idxd = torch.randint(-1, 97, (4, 60, 80), generator=g).cuda()
    check_bin_stats(triton_bin_stats(xd, idxd, 97), xd, idxd, 97, against="reference")
