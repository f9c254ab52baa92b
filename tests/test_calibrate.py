"""``dirfast::calibrate`` and ``dirfast::calibrate_``: the contract every backend meets, against a
float64 loop oracle of the published rule (or the reference for large inputs), in place and out
of place, with its gradient; then what only one backend has: the C++ kernel keeping the bits of
the values it leaves alone, Triton's float64 clip bounds, the CUDA kernels at GPU sizes.

Bad arguments are in test_bad_inputs.py; opcheck, torch.compile and the backend a backward runs
on in test_backends.py.
"""

import math

import pytest
import torch

import dirfast
from dirfast.ops.calibrate import reference
from test_bin_stats import GPU_LAYOUTS, gpu_layout, loop_rows
from testing import (FLOAT_DTYPES, LAYOUTS, backend_device_params, backend_devices, dtype_params, features, gen,
                     interpreted, num_threads, on, pairwise, rand_bins, rand_features, rand_stats, same_bits,
                     same_bits_for_threads, stats_dtype, tol)

BACKEND_DEVICE = list(backend_device_params())


# =========================================================================== the oracle
def _scale(v1, v2, b, j, clip_min, clip_max):
    """The published rule for dimension ``j`` of bin ``b``: the scale sqrt(clamp(v2 / v1)), or
    None where the value is left unchanged (the bin's v1 sums below 1e-10, or v1 == 0 there)."""
    if float(v1[b].sum()) < 1e-10 or float(v1[b, j]) == 0:
        return None
    return math.sqrt(min(max(float(v2[b, j]) / float(v1[b, j]), clip_min), clip_max))


def loop_calibrate(x, bin_idx, m1, v1, m2, v2, clip_min=0.1, clip_max=10.0) -> torch.Tensor:
    """Bin by bin and dimension by dimension in float64, as the published smooth loop: the rows
    of bin ``b`` become ``(x - m1) * scale + m2``; rows outside [0, B) stay unchanged. Returns
    float64 in x's shape."""
    xd = x.detach().cpu().double()
    m1, v1, m2, v2 = (t.detach().cpu().double() for t in (m1, v1, m2, v2))
    rows, idx = loop_rows(xd, bin_idx.detach().cpu().long())
    out = rows.clone()
    for b in range(m1.shape[0]):
        members = idx == b
        if not members.any():
            continue
        for j in range(rows.shape[1]):
            scale = _scale(v1, v2, b, j, clip_min, clip_max)
            if scale is not None:
                out[members, j] = (rows[members, j] - m1[b, j]) * scale + m2[b, j]
    if x.dim() == 2:
        return out
    return out.reshape((x.shape[0],) + tuple(x.shape[2:]) + (x.shape[1],)).movedim(-1, 1)


def loop_calibrate_scale(bin_idx, v1, v2, d, clip_min=0.1, clip_max=10.0) -> torch.Tensor:
    """d(calibrate)/dx per row and dimension: the scale where calibrated, 1 where unchanged."""
    v1, v2 = v1.detach().cpu().double(), v2.detach().cpu().double()
    idx = bin_idx.reshape(-1).cpu().long()
    out = torch.ones(idx.numel(), d, dtype=torch.float64)
    for b in range(v1.shape[0]):
        for j in range(d):
            scale = _scale(v1, v2, b, j, clip_min, clip_max)
            if scale is not None:
                out[idx == b, j] = scale
    return out


def calibration_stats(num_bins, d, dtype, device="cpu", seed=4):
    """Random statistics with the published special cases in the first bins (num_bins >= 4):
    bin 0: src_var == 0 everywhere (sum < 1e-10: unchanged); bin 1: src_var tiny but not zero,
    summing below 1e-10 (unchanged); bin 2: some dims with src_var == 0 (those unchanged); bin 3:
    ratios far outside [0.1, 10] (clipped); with num_bins >= 5, bin 4: src_var 1e-10 in every dim,
    summing to at least 1e-10 (calibrated: the threshold is that sum, not a larger one)."""
    src_mean, src_var, dst_mean, dst_var = rand_stats(num_bins, d, dtype=torch.float64, seed=seed)
    if num_bins >= 4:
        src_var[0] = 0
        src_var[1] = 1e-12
        src_var[2, ::2] = 0
        src_var[3] = 0.01
        dst_var[3, : (d + 1) // 2] = 5.0  # ratio 500 -> clipped to 10
        dst_var[3, (d + 1) // 2:] = 1e-5  # ratio 1e-3 -> clipped to 0.1
    if num_bins >= 5:
        src_var[4] = 1e-10
    return tuple(t.to(dtype=dtype, device=device) for t in (src_mean, src_var, dst_mean, dst_var))


def calibrate_tol(dtype):
    t = tol(dtype)
    if dtype == torch.float32:  # x * s + t against (x - m) * s + m: cancellation at |m * s| ~ 10
        t["atol"] = 2e-5
    return t


def check_calibrate(got, x, idx, stats, **clips):
    """The result has x's dtype, shape and device and the oracle's values."""
    assert got.dtype == x.dtype and got.shape == x.shape and got.device == x.device
    torch.testing.assert_close(got.cpu().double(), loop_calibrate(x, idx, *stats, **clips), **calibrate_tol(x.dtype))


# =========================================================================== every backend
@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
@pytest.mark.parametrize("dtype, layout, d", pairwise(FLOAT_DTYPES, LAYOUTS, [1, 5]),
                         ids=lambda v: str(v).replace("torch.", ""))
def test_layouts_and_dtypes(backend, device, dtype, layout, d):
    """The oracle's values in every layout and dtype, x untouched, and the strides of
    torch.empty_like(x) (the fake kernel's)."""
    x, idx = features(layout, dtype, device, num_bins=6, n=43, d=d, seed=20 + d)
    stats = calibration_stats(6, d, stats_dtype(dtype), device)
    before = x.clone()
    got = on(backend, dirfast.ops.calibrate, x, idx, *stats)
    check_calibrate(got, x, idx, stats)
    assert got.stride() == torch.empty_like(x).stride()
    assert torch.equal(x, before)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
@pytest.mark.parametrize("dtype, layout", pairwise(FLOAT_DTYPES, LAYOUTS), ids=lambda v: str(v).replace("torch.", ""))
def test_in_place_equals_out_of_place(backend, device, dtype, layout):
    """calibrate_ writes exactly what calibrate returns into x (strided views included, whose
    untouched neighbours stay as they were) and returns x itself."""
    x, idx = features(layout, dtype, device, num_bins=6, n=41, d=3, seed=50)
    stats = calibration_stats(6, 3, stats_dtype(dtype), device)
    expected = on(backend, dirfast.ops.calibrate, x, idx, *stats)
    base = x._base if x._base is not None else x
    outside = base.clone()
    assert on(backend, dirfast.ops.calibrate_, x, idx, *stats) is x
    same_bits(x, expected)
    mask = torch.ones_like(base, dtype=torch.bool)
    mask.as_strided(x.shape, x.stride(), x.storage_offset() - base.storage_offset()).fill_(False)
    assert torch.equal(base[mask], outside[mask])


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_rows_and_dimensions_left_unchanged(backend, device, dtype):
    """The published zero-variance rules and rows of no bin: those values come back unchanged,
    the others do not."""
    stats = calibration_stats(6, 4, dtype, device)
    x = rand_features(8, 4, dtype=dtype, device=device, seed=3)
    idx = torch.tensor([0, 1, 2, -1, 6, 100, 3, 4], device=device)
    got = on(backend, dirfast.ops.calibrate, x, idx, *stats)
    for row in (0, 1, 3, 4, 5):  # sum(src_var) < 1e-10, and indices outside [0, B)
        assert torch.equal(got[row], x[row]), row
    assert torch.equal(got[2, ::2], x[2, ::2])  # dims with src_var == 0
    assert not torch.any(got[2, 1::2] == x[2, 1::2]) and not torch.any(got[6:] == x[6:])
    check_calibrate(got, x, idx, stats)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
@pytest.mark.parametrize("clip_min, clip_max", [(0.1, 10.0), (0.5, 2.0), (0.0, 100.0), (1.0, 1.0), (0.0, math.inf)])
def test_clips(backend, device, clip_min, clip_max):
    """Other clamp bounds of the variance ratio, a single ratio, and no upper clamp."""
    x, idx = features("dense", torch.float32, device, num_bins=5, d=3, seed=12)
    stats = calibration_stats(5, 3, torch.float32, device)
    got = on(backend, dirfast.ops.calibrate, x, idx, *stats, clip_min=clip_min, clip_max=clip_max)
    check_calibrate(got, x, idx, stats, clip_min=clip_min, clip_max=clip_max)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
def test_an_infinite_scale_is_no_number(backend, device):
    """No upper clamp and a ratio beyond float32 (1e20 / 1e-20): the scale is infinite and x * s + t
    is NaN or infinite in that dimension of the bin's rows, as the reference has it (the docstring's
    rule); the other dimensions are calibrated."""
    x = rand_features(6, 3, dtype=torch.float32, device=device, seed=5)
    idx = torch.tensor([0, 0, 1, 1, 1, 1], device=device)
    m1, m2 = torch.full((2, 3), 0.5, device=device), torch.zeros(2, 3, device=device)
    v1, v2 = torch.ones(2, 3, device=device), torch.ones(2, 3, device=device)
    v1[1, 0], v2[1, 0] = 1e-20, 1e20
    x[2:, 0] = torch.tensor([-2.0, -0.5, 0.5, 2.0])
    stats = (m1, v1, m2, v2)
    got = on(backend, dirfast.ops.calibrate, x, idx, *stats, clip_min=0.0, clip_max=math.inf)
    assert not torch.isfinite(got[2:, 0]).any()
    torch.testing.assert_close(got, reference(x, idx, *stats, clip_min=0.0, clip_max=math.inf), equal_nan=True)
    torch.testing.assert_close(got[:, 1:], x[:, 1:] - 0.5)
    torch.testing.assert_close(got[:2, 0], x[:2, 0] - 0.5)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
@pytest.mark.parametrize("x_dtype, table_dtype", [(torch.float16, torch.float32), (torch.bfloat16, torch.float64),
                                                  (torch.float32, torch.float64), (torch.float64, torch.float32),
                                                  (torch.float32, torch.float16)], ids=str)
def test_mixed_dtypes(backend, device, x_dtype, table_dtype):
    """The arithmetic is float64 when x or the tables are, float32 otherwise; the result has x's
    dtype."""
    x, idx = features("rows", x_dtype, device, num_bins=6, n=40, d=3)
    stats = calibration_stats(6, 3, table_dtype, device)
    check_calibrate(on(backend, dirfast.ops.calibrate, x, idx, *stats), x, idx, stats)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
@pytest.mark.parametrize("layout", ["rows", "dense"])
@pytest.mark.parametrize("table_dtype", [torch.float32, torch.float64], ids=str)
def test_statistics_in_any_strides(backend, device, layout, table_dtype):
    """Tables in other strides give the bits of their contiguous copies: transposed (as the
    published smoothing leaves them), every other column of a wider table, one row broadcast to
    every bin; 150 bins and 13 features, so blocks of bins (and of features: 8, 4 and 1 at a time
    for float32 where AVX2 runs) end part-way."""
    num_bins, d = 150, 13
    x, idx = features(layout, torch.float32, device, num_bins=num_bins, n=300, d=d, low=-1, high=num_bins + 1,
                      seed=80)
    stats = calibration_stats(num_bins, d, table_dtype, device)
    wide = calibration_stats(num_bins, 2 * d, table_dtype, device, seed=5)
    expected = on(backend, dirfast.ops.calibrate, x, idx, *stats)
    transposed = [t.t().contiguous().t() for t in stats]
    same_bits(on(backend, dirfast.ops.calibrate, x, idx, *transposed), expected)
    columns = [t[:, ::2] for t in wide]
    same_bits(on(backend, dirfast.ops.calibrate, x, idx, *columns),
              on(backend, dirfast.ops.calibrate, x, idx, *(t.contiguous() for t in columns)))
    broadcast = [t[5:6].expand(num_bins, d) for t in stats]
    same_bits(on(backend, dirfast.ops.calibrate, x, idx, *broadcast),
              on(backend, dirfast.ops.calibrate, x, idx, *(t.contiguous() for t in broadcast)))


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
def test_sizes(backend, device):
    """One bin, one row, many rows and bins, more bins than rows or pixels, an empty input."""
    cases = [(5, 2, 1), (1, 1, 1), (300, 2, 4096)]
    if not interpreted(backend, device):
        cases += [(20011, 7, 97), (3001, 3, 65536)]
    for n, d, num_bins in cases:
        x = rand_features(n, d, device=device, seed=n)
        idx = rand_bins(n, num_bins + 1, low=-1, device=device, seed=n + 1)
        stats = calibration_stats(num_bins, d, torch.float32, device)
        torch.testing.assert_close(on(backend, dirfast.ops.calibrate, x, idx, *stats).cpu(),
                                   reference(x.cpu(), idx.cpu(), *(t.cpu() for t in stats)), **calibrate_tol(torch.float32))
    shape = (2, 5, 13, 17) if interpreted(backend, device) else (3, 5, 61, 67)
    x = torch.randn(*shape, generator=gen(62)).to(device)
    idx = rand_bins(shape[:1] + shape[2:], 98, low=-1, device=device, seed=63)
    stats = calibration_stats(97, 5, torch.float32, device)
    torch.testing.assert_close(on(backend, dirfast.ops.calibrate, x, idx, *stats).cpu(),
                               reference(x.cpu(), idx.cpu(), *(t.cpu() for t in stats)), **calibrate_tol(torch.float32))
    assert on(backend, dirfast.ops.calibrate, x[:0], idx[:0], *stats).shape == (0,) + shape[1:]
    empty = x[:0].clone()
    assert on(backend, dirfast.ops.calibrate_, empty, idx[:0], *stats) is empty


def gradcheck_inputs(layout, device, seed):
    """Small float64 inputs (gradcheck perturbs every element twice) with rows in every special
    bin and outside the range; ``x`` requires grad."""
    g = gen(seed)
    if layout == "rows":
        x = torch.randn(9, 3, generator=g, dtype=torch.float64)
        idx = torch.tensor([0, 1, 2, 3, 4, 5, -1, 6, 2])
    else:
        x = torch.randn(1, 3, 2, 4, generator=g, dtype=torch.float64)
        idx = torch.tensor([[[0, 1, 2, 3], [4, 5, -1, 3]]])
        if layout == "dense_channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
    stats = calibration_stats(6, 3, torch.float64, device)
    return x.to(device).requires_grad_(True), idx.to(device), stats


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
@pytest.mark.parametrize("layout", ["rows", "dense", "dense_channels_last"])
@pytest.mark.parametrize("inplace", [False, True], ids=["calibrate", "calibrate_"])
def test_gradcheck(backend, device, layout, inplace):
    """Gradients in x in float64, out of place and through the in-place form (to what x came
    from); under Triton's interpreter in gradcheck's fast mode (a random projection of the
    Jacobian), whose every element test_gradient_is_the_scale checks."""
    x, idx, stats = gradcheck_inputs(layout, device, seed=30)

    def fn(inp):
        if inplace:
            return on(backend, dirfast.ops.calibrate_, inp * 1.0, idx, *stats)
        return on(backend, dirfast.ops.calibrate, inp, idx, *stats)

    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-6, fast_mode=interpreted(backend, device))


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_gradient_is_the_scale(backend, device, dtype):
    """d out / d x = sqrt(clamp(dst_var / src_var)) where calibrated, 1 where unchanged, in x's
    dtype."""
    stats = calibration_stats(6, 4, torch.float32, device)
    x = rand_features(30, 4, dtype=dtype, device=device, seed=14).requires_grad_(True)
    idx = rand_bins(30, 7, low=-1, device=device, seed=15)  # includes -1 and 6 (= B): no bin
    g = rand_features(30, 4, dtype=dtype, device=device, seed=16)
    with dirfast.use_backend(backend):
        dirfast.ops.calibrate(x, idx, *stats).backward(g)
    assert x.grad.dtype == dtype
    expected = g.double().cpu() * loop_calibrate_scale(idx, stats[1], stats[3], 4)
    torch.testing.assert_close(x.grad.cpu().double(), expected, **tol(dtype))


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
@pytest.mark.parametrize("layout", ["rows", "dense"])
def test_unchanged_values_keep_their_bits(backend, device, layout):
    """Rows outside [0, B), bins whose src_var sums below 1e-10 and dims with src_var == 0 are
    copied (x * 1 + -0.0): the sign of -0.0 included (the reference and Triton had added +0.0)."""
    x, idx = features(layout, torch.float32, device, num_bins=6, n=96, d=4, low=-2, high=8, seed=7)
    if layout == "rows":
        x[:20] = -0.0
    else:
        x[:, :, 0] = -0.0
    stats = [t.to(device) for t in rand_stats(6, 4)]
    stats[1][0], stats[1][1], stats[1][2, ::2] = 0, 1e-12, 0
    got = on(backend, dirfast.ops.calibrate, x, idx, *stats).cpu()
    x, idx = x.cpu(), idx.cpu()
    (gx, flat), (xx, _) = loop_rows(got, idx), loop_rows(x, idx)
    keep = (flat < 0) | (flat >= 6) | (flat == 0) | (flat == 1)
    assert keep.any() and (xx[keep] == 0).any()
    same_bits(gx[keep], xx[keep])
    same_bits(gx[flat == 2][:, ::2], xx[flat == 2][:, ::2])
    assert not torch.equal(gx[flat == 4], xx[flat == 4])


# =========================================================================== C++ only
@pytest.mark.skipif(not dirfast.backends()["cpp"]["available"],
                    reason=f"cpp unavailable: {dirfast.backends()['cpp']['reason']}")
@pytest.mark.parametrize("layout", ["rows", "dense"])
def test_cpp_float16_converts_like_torch(layout):
    """float16 x goes to float32 and back through the C++ kernels' own conversions (src/convert.h):
    on every one of the 65,536 float16 values, x * s + t rounds to the bits torch gives for
    (x.float() * s + t).half(), with s in {0.5, 1, 1.5, 2} and t multiples of 1/8 (exact, so the
    float32 arithmetic is the same on both sides), and rows of no bin give x back; NaN stays NaN."""
    x = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.float16).reshape(1024, 64)
    g = gen(95)
    idx = torch.randint(-1, 4, (1024,), generator=g)
    src_mean = torch.randint(-16, 16, (4, 64), generator=g) / 8
    dst_mean = torch.randint(-16, 16, (4, 64), generator=g) / 8
    src_var = torch.ones(4, 64)
    dst_var = torch.tensor([0.25, 1.0, 2.25, 4.0]).repeat_interleave(16).reshape(4, 16).repeat(1, 4)
    scale = dst_var.sqrt()
    shift = dst_mean - src_mean * scale
    rows = idx >= 0
    expected_rows = x.clone()
    expected_rows[rows] = (x[rows].float() * scale[idx[rows]] + shift[idx[rows]]).half()
    if layout == "dense":  # [B, C, H, W] with one bin per pixel: each map of 64 channels x 16 x 64 pixels
        x_in, idx_in = x.reshape(1, 16, 64, 64).permute(0, 3, 1, 2).contiguous(), idx.reshape(1, 16, 64)
        got = on("cpp", dirfast.ops.calibrate, x_in, idx_in, src_mean, src_var, dst_mean, dst_var)
        got = got.permute(0, 2, 3, 1).reshape(1024, 64)
    else:
        got = on("cpp", dirfast.ops.calibrate, x, idx, src_mean, src_var, dst_mean, dst_var)
    nan = expected_rows.isnan()
    assert torch.equal(got.isnan(), nan)
    same_bits(got[~nan], expected_rows[~nan])


@pytest.mark.skipif(not dirfast.backends()["cpp"]["available"],
                    reason=f"cpp unavailable: {dirfast.backends()['cpp']['reason']}")
@pytest.mark.parametrize("dtype, table_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float64)],
                         ids=str)
@pytest.mark.parametrize("d", [1024, 1003])
def test_cpp_many_bins_rows_grouped(dtype, table_dtype, d):
    """Tables of more than 16 MB and rows of at least 512 bytes: the C++ kernel groups the rows by bin
    (2 x 2,101 x 1,024 or 1,003 float32 values here, the latter just over 16 MiB, and twice that in
    float64) and computes the next bin's scale and shift a slice of features per row of this one
    (1,003 features: a tail after the slices). The reference's values on padded rows, rows of no bin
    and the values left alone bit for bit, in place equal to out of place, with transposed tables,
    the bits of rows calibrated a few at a time (each bin's scale and shift computed whole), and the
    same bits for 1 and 2 threads."""
    num_bins, n = 2100, 3000
    stats = calibration_stats(num_bins, d, table_dtype)
    x = rand_features(n, d + 8, dtype=dtype, seed=40)[:, :d]  # rows d + 8 apart
    idx = rand_bins(n, num_bins + 1, low=-1, seed=41)
    idx[:8] = torch.tensor([0, 1, 2, 3, 4, -1, num_bins, 0])
    got = on("cpp", dirfast.ops.calibrate, x, idx, *stats)
    torch.testing.assert_close(got, reference(x, idx, *stats), **calibrate_tol(dtype))
    keep = (idx < 0) | (idx >= num_bins) | (idx == 0)  # (bin 1's variances of 1e-12 sum above 1e-10)
    same_bits(got[keep], x[keep])
    same_bits(got[idx == 2][:, ::2], x[idx == 2][:, ::2])
    inplace = x.clone()
    on("cpp", dirfast.ops.calibrate_, inplace, idx, *stats)
    same_bits(inplace, got)
    transposed = [t.t().contiguous().t() for t in stats]  # read a block of bins at a time
    same_bits(on("cpp", dirfast.ops.calibrate, x, idx, *transposed), got)
    for rows in (slice(0, 8), slice(1000, 1100)):  # under one index in 16 bins: the met bins compacted
        same_bits(on("cpp", dirfast.ops.calibrate, x[rows], idx[rows], *transposed), got[rows])
    same_bits_for_threads(lambda: [on("cpp", dirfast.ops.calibrate, x, idx, *stats),
                                   on("cpp", dirfast.ops.calibrate, x, idx, *transposed)])


@pytest.mark.skipif(not dirfast.backends()["cpp"]["available"],
                    reason=f"cpp unavailable: {dirfast.backends()['cpp']['reason']}")
@pytest.mark.parametrize("transposed", [False, True], ids=["contiguous", "transposed"])
def test_cpp_small_batch_grouped(transposed):
    """A training batch (at most 2^20 elements, rows of at least 512 bytes, fewer rows than table
    values) is grouped by bin whatever the size of the tables: the bits its rows get in a call of
    more than 2^20 elements (tables written first), the reference's values, in place equal to out
    of place, and the same bits for 1 and 2 threads."""
    num_bins, n, d = 97, 2100, 512  # 2,100 x 512 is just over 2^20 elements
    stats = calibration_stats(num_bins, d, torch.float32)
    if transposed:
        stats = [t.t().contiguous().t() for t in stats]
    x = rand_features(n, d, seed=80)
    idx = rand_bins(n, num_bins + 1, low=-1, seed=81)
    whole = on("cpp", dirfast.ops.calibrate, x, idx, *stats)
    for rows in (slice(0, 256), slice(1000, 1003), slice(2099, 2100)):
        batch = on("cpp", dirfast.ops.calibrate, x[rows], idx[rows], *stats)
        same_bits(batch, whole[rows])
        torch.testing.assert_close(batch, reference(x[rows], idx[rows], *stats), **calibrate_tol(torch.float32))
        inplace = x[rows].clone()
        on("cpp", dirfast.ops.calibrate_, inplace, idx[rows], *stats)
        same_bits(inplace, batch)
    same_bits_for_threads(lambda: [on("cpp", dirfast.ops.calibrate, x[:256], idx[:256], *stats)])


@pytest.mark.skipif(not dirfast.backends()["cpp"]["available"],
                    reason=f"cpp unavailable: {dirfast.backends()['cpp']['reason']}")
@pytest.mark.parametrize("table_dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("n, d", [(3000, 64), (256, 512)], ids=["tables", "grouped"])
def test_cpp_transposed_tables_read_in_pieces(n, d, table_dtype):
    """Each thread's piece copies a transposed table's block for its own bins only, from the
    group of the piece's first bin to that of its last (8 floats or 4 doubles): pieces that start
    and end inside blocks, through the s and t tables (rows of 256 bytes) and grouped by bin (a
    training batch), give the bits of contiguous tables on 1, 2 and 3 threads."""
    num_bins = 1000
    stats = calibration_stats(num_bins, d, table_dtype)
    transposed = [t.t().contiguous().t() for t in stats]
    x = rand_features(n, d, seed=82)
    idx = rand_bins(n, num_bins + 1, low=-1, seed=83)
    expected = on("cpp", dirfast.ops.calibrate, x, idx, *stats)
    for threads in (1, 2, 3):
        with num_threads(threads):
            same_bits(on("cpp", dirfast.ops.calibrate, x, idx, *transposed), expected)


@pytest.mark.skipif(not dirfast.backends()["cpp"]["available"],
                    reason=f"cpp unavailable: {dirfast.backends()['cpp']['reason']}")
@pytest.mark.parametrize("num_bins", [97, 2100], ids=["tables", "grouped"])
def test_cpp_fresh_output_written_as_in_place(num_bins):
    """A fresh float32 output of more than 16 MiB (its pages mapped first, rows of 4,000 bytes
    written with non-temporal stores over their whole lines, plain ones at either end): the bits
    calibrate_ leaves in x, from a strided x, with 1 and 2 threads; the reference's values."""
    n, d = 4200, 1000
    stats = calibration_stats(num_bins, d, torch.float32)
    x = rand_features(n, d + 3, seed=70)[:, 1:d + 1]  # rows 4,012 bytes apart, 4 bytes in
    idx = rand_bins(n, num_bins + 1, low=-1, seed=71)
    got = on("cpp", dirfast.ops.calibrate, x, idx, *stats)
    torch.testing.assert_close(got, reference(x, idx, *stats), **calibrate_tol(torch.float32))
    inplace = x.clone()
    on("cpp", dirfast.ops.calibrate_, inplace, idx, *stats)
    same_bits(got, inplace)
    same_bits_for_threads(lambda: [on("cpp", dirfast.ops.calibrate, x, idx, *stats)])


@pytest.mark.skipif(not dirfast.backends()["cpp"]["available"],
                    reason=f"cpp unavailable: {dirfast.backends()['cpp']['reason']}")
@pytest.mark.parametrize("channels", [8, 21])
def test_cpp_dense_float32_channel_blocks(channels):
    """Dense float32 maps on the CPU go 8 channels x 8 pixels at a time where AVX2 runs (the
    leftover channels and pixels one at a time): the oracle's values, and the bits of the same
    maps channels-last (read as rows), in place and out of place; 21 channels and 105 pixels per
    map leave both kinds of leftovers, on 1 and 2 threads."""
    g = gen(90)
    x = torch.randn(3, channels, 15, 7, generator=g) * 2 + 1
    idx = torch.randint(-1, 12, (3, 15, 7), generator=g)
    stats = calibration_stats(11, channels, torch.float32)
    got = on("cpp", dirfast.ops.calibrate, x, idx, *stats)
    check_calibrate(got, x, idx, stats)
    rows = on("cpp", dirfast.ops.calibrate, x.contiguous(memory_format=torch.channels_last), idx, *stats)
    same_bits(got, rows)
    inplace = x.clone()
    on("cpp", dirfast.ops.calibrate_, inplace, idx, *stats)
    same_bits(inplace, got)
    same_bits_for_threads(lambda: [on("cpp", dirfast.ops.calibrate, x, idx, *stats)])


@pytest.mark.skipif(not dirfast.backends()["cpp"]["available"],
                    reason=f"cpp unavailable: {dirfast.backends()['cpp']['reason']}")
@pytest.mark.parametrize("layout", ["rows", "dense"])
def test_cpp_tables_larger_than_the_index(layout):
    """More table values than rows (B x D > rows): the C++ kernel computes only the buckets some
    row uses, in both table layouts; the reference's values, rows of no bin bit for bit."""
    x, idx = features(layout, torch.float32, num_bins=500, n=40, d=6, seed=70)
    idx.view(-1)[:2] = torch.tensor([-1, 500])
    stats = calibration_stats(500, 6, torch.float32)
    got = on("cpp", dirfast.ops.calibrate, x, idx, *stats)
    torch.testing.assert_close(got, reference(x, idx, *stats), **calibrate_tol(torch.float32))
    (gx, flat), (xx, _) = loop_rows(got, idx), loop_rows(x, idx)
    keep = (flat < 0) | (flat >= 500)
    assert int(keep.sum()) >= 2
    same_bits(gx[keep], xx[keep])


@pytest.mark.skipif(not dirfast.backends()["cpp"]["available"],
                    reason=f"cpp unavailable: {dirfast.backends()['cpp']['reason']}")
@pytest.mark.parametrize("layout, num_bins, d, index_dtype, table_dtype", [
    ("rows", 2000, 7, torch.int64, torch.float32),
    ("rows", 2000, 7, torch.int32, torch.float64),
    ("dense", 5000, 8, torch.int64, torch.float32),
    ("rows", 2500, 1024, torch.int64, torch.float32),  # uncopied, tables of this size group the rows
], ids=str)
def test_cpp_few_of_many_bins_with_transposed_tables(layout, num_bins, d, index_dtype, table_dtype):
    """Indices under one in 16 of the bins, tables transposed (the published smoothing's): the C++
    kernel copies the met bins' statistics out first; the bits of the contiguous tables, in place
    and out, for 1 and 2 threads, the published special bins and indices of no bin included."""
    x, idx = features(layout, torch.float32, num_bins=num_bins, n=60, d=d, seed=71)
    idx = idx.to(index_dtype)
    idx.view(-1)[:8] = torch.tensor([0, 1, 2, 3, 4, -1, num_bins, num_bins - 1])
    stats = calibration_stats(num_bins, d, table_dtype)
    transposed = [t.t().contiguous().t() for t in stats]
    expected = on("cpp", dirfast.ops.calibrate, x, idx, *stats)
    torch.testing.assert_close(expected, reference(x, idx, *stats), **calibrate_tol(torch.float32))
    same_bits_for_threads(lambda: [on("cpp", dirfast.ops.calibrate, x, idx, *transposed)])
    same_bits(on("cpp", dirfast.ops.calibrate, x, idx, *transposed), expected)
    inplace = x.clone()
    on("cpp", dirfast.ops.calibrate_, inplace, idx, *transposed)
    same_bits(inplace, expected)


# =========================================================================== Triton only
@pytest.mark.skipif(not dirfast.backends()["triton"]["available"],
                    reason=f"triton unavailable: {dirfast.backends()['triton']['reason']}")
@pytest.mark.parametrize("clip_min, clip_max", [(0.1, 10.0), (0.5, 2.0), (0.0, math.inf), (1.0 / 3.0, 3.0)])
def test_triton_float64_clip_bounds_exact(clip_min, clip_max):
    """Kernel arguments reach Triton as float32: a float64 clip bound travels as two float32
    numbers whose sum is the bound (to ~1e-15), so float64 statistics clip where the reference
    does, ratios on the bounds included."""
    device = backend_devices("triton")[0]
    x, idx = features("rows", torch.float64, device, num_bins=6, d=4, seed=22)
    stats = list(rand_stats(6, 4, dtype=torch.float64, device=device))
    at_bounds = [clip_min or 0.5, clip_max if clip_max < math.inf else 1e6, 3.0, 1.0 / 3.0]
    stats[3] = stats[1] * torch.tensor(at_bounds, dtype=torch.float64, device=device)
    got = on("triton", dirfast.ops.calibrate, x, idx, *stats, clip_min, clip_max)
    torch.testing.assert_close(got, reference(x, idx, *stats, clip_min, clip_max), rtol=1e-12, atol=1e-12)


# =========================================================================== CUDA kernels only
needs_cuda = pytest.mark.skipif(not dirfast.backends()["cuda"]["available"],
                                reason=f"cuda unavailable: {dirfast.backends()['cuda']['reason']}")


def check_cuda(x, idx, stats, inplace=False):
    """The CUDA kernel (in place or not) against the reference at GPU sizes, rows of no bin
    unchanged, the input untouched out of place."""
    before = x.clone()
    if inplace:
        got = on("cuda", dirfast.ops.calibrate_, x, idx, *stats)
    else:
        got = on("cuda", dirfast.ops.calibrate, x, idx, *stats)
        assert torch.equal(x, before) and got.stride() == torch.empty_like(x).stride()
    torch.testing.assert_close(got, reference(before, idx, *stats), **calibrate_tol(x.dtype))
    untouched = (idx < 0) | (idx >= stats[0].shape[0])
    assert torch.equal(got.movedim(1, -1)[untouched], before.movedim(1, -1)[untouched])


@needs_cuda
@pytest.mark.parametrize("layout", GPU_LAYOUTS)
@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
def test_cuda_layouts(layout, inplace):
    """Every layout the CUDA kernels walk in their own way (or copy), in and out of place."""
    x, idx = gpu_layout(layout, seed=3)
    if inplace and layout == "sliced":
        x = x.clone()
    check_cuda(x, idx, calibration_stats(40, x.shape[1], torch.float32, "cuda"), inplace=inplace)


@needs_cuda
@pytest.mark.parametrize("dtype", list(dtype_params()))
@pytest.mark.parametrize("table_dtype", [torch.float32, torch.float64], ids=str)
def test_cuda_dtypes(dtype, table_dtype):
    """Every dtype of x with float32 and float64 tables, rows and dense maps."""
    g = gen(7)
    x = torch.randn(4000, 72, generator=g).to(dtype=dtype, device="cuda")
    check_cuda(x, torch.randint(-1, 31, (4000,), generator=g).cuda(), calibration_stats(30, 72, table_dtype, "cuda"))
    xd = torch.randn(2, 8, 16, 24, generator=g).to(dtype=dtype, device="cuda")
    check_cuda(xd, torch.randint(-1, 31, (2, 16, 24), generator=g).cuda(), calibration_stats(30, 8, table_dtype, "cuda"))


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("offset", [0, 1])
def test_cuda_low_precision_aligned_and_not(dtype, offset):
    """16-byte vectors of 16-bit values only when the rows start aligned (offset 0)."""
    g = gen(15)
    base = torch.randn(3000, 65, generator=g).to(dtype=dtype, device="cuda")
    idx = torch.randint(-1, 21, (3000,), generator=g).cuda()
    check_cuda(base[:, offset : offset + 64], idx, calibration_stats(20, 64, torch.float32, "cuda"))


@needs_cuda
def test_cuda_one_channel_depth_maps():
    """[B, 1, H, W]: one feature, rows of one element."""
    g = gen(14)
    x = torch.randn(4, 1, 60, 80, generator=g).cuda()
    check_cuda(x, torch.randint(-1, 51, (4, 60, 80), generator=g).cuda(), calibration_stats(50, 1, torch.float32, "cuda"))
