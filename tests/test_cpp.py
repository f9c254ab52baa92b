"""What is particular to the C++ CPU kernels (csrc/cpu/*.cpp): chunks of rows merged in a fixed
order (large inputs, more bins than rows, one bucket for every row), the planar tiles of dense
inputs across chunks, unchanged values keeping their bits, smooth_bins giving the reference's
bits in every dtype, mixture_logpdf's chunks of elements, and the same bits for any number of
threads. The op contract they share
with every backend is tested in test_ops.py.
"""

import contextlib

import pytest
import torch

import dirfast
import dirfast.reference as reference
from dirfast import contract
from testing import FLOAT_DTYPES, check_bin_stats, features, gen, rand_stats

pytestmark = pytest.mark.skipif(not dirfast.backends()["cpp"]["available"],
                                reason=f"cpp backend unavailable: {dirfast.backends()['cpp']['reason']}")
OPS = torch.ops.dirfast


@contextlib.contextmanager
def num_threads(n):
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def same_bits(a, b):
    """Equal values, the sign of zeros included."""
    assert a.shape == b.shape and a.dtype == b.dtype
    assert torch.equal(a, b) and torch.equal(torch.signbit(a), torch.signbit(b))


def test_kernels_are_registered_for_cpu():
    for op in contract.SCHEMAS:
        assert contract.has_device_kernel(op, "CPU"), op


@pytest.mark.parametrize("n, d, num_bins", [(70001, 8, 97), (30001, 1, 65536), (4097, 3, 11)])
def test_bin_stats_chunks(n, d, num_bins):
    """16 chunks of rows not a multiple of anything, and more bins than rows (sparse partials)."""
    x, idx = features("rows", torch.float32, num_bins=num_bins, n=n, d=d, seed=n, shift=3.0)
    check_bin_stats(OPS.bin_stats(x, idx, num_bins), x, idx, num_bins, against="reference")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_bin_stats_dense_tiles_across_chunks(dtype):
    """A dense tensor whose pixel tiles and chunks cut through batch items at odd places."""
    g = gen(3)
    x = torch.randn(4, 7, 101, 103, generator=g).to(dtype)
    idx = torch.randint(-1, 12, (4, 101, 103), generator=g)
    check_bin_stats(OPS.bin_stats(x, idx, 11), x, idx, 11, against="reference")


def test_bin_stats_one_bucket_and_single_rows():
    """Every row in one bucket (all chunks merged into it), and buckets of one row far apart."""
    x = torch.randn(50000, 5, generator=gen(4))
    idx = torch.zeros(50000, dtype=torch.long)
    check_bin_stats(OPS.bin_stats(x, idx, 3), x, idx, 3, against="reference")
    idx = torch.arange(50000) % 7
    idx[idx >= 5] = -1
    idx[123], idx[40000] = 5, 6
    count, mean, var = OPS.bin_stats(x, idx, 7)
    assert count[5] == 1 and count[6] == 1
    assert torch.equal(mean[5], x[123]) and torch.equal(mean[6], x[40000])


@pytest.mark.parametrize("layout", ["rows", "dense"])
def test_bin_stats_accuracy_across_chunks(layout):
    """float32 variance within 1e-4 of float64 at mean / std = 1000 with buckets spread over all
    16 chunks (Chan's merge of the chunks' Welford partials)."""
    if layout == "rows":
        x = torch.randn(48000, 16, generator=gen(5), dtype=torch.float64) + 1000.0
        idx = torch.randint(0, 3, (48000,), generator=gen(6))
    else:
        x = torch.randn(4, 16, 100, 120, generator=gen(5), dtype=torch.float64) + 1000.0
        idx = torch.randint(0, 3, (4, 100, 120), generator=gen(6))
    x = x.float()
    count, mean, var = OPS.bin_stats(x, idx, 3)
    _, e_mean, e_var = reference.bin_stats(x.double(), idx, 3)
    assert torch.all(count > 10000)
    assert ((var.double() - e_var).abs() / e_var).max() < 1e-4
    assert ((mean.double() - e_mean).abs() / e_mean.abs()).max() < 1e-6


@pytest.mark.parametrize("layout", ["rows", "dense"])
def test_calibrate_unchanged_values_keep_their_bits(layout):
    """Rows outside [0, B), buckets whose src_var sums below 1e-10 and dims with src_var == 0
    are copied (x * 1 + -0.0): the sign of -0.0 included."""
    x, idx = features(layout, torch.float32, num_bins=6, n=96, d=4, low=-2, high=8, seed=7)
    if layout == "rows":
        x[:20] = -0.0
    else:
        x[:, :, 0] = -0.0
    stats = list(rand_stats(6, 4))
    stats[1][0], stats[1][1], stats[1][2, ::2] = 0, 1e-12, 0
    got = OPS.calibrate(x, idx, *stats)
    rows = lambda t: t.movedim(1, -1).reshape(-1, 4)  # noqa: E731
    gx, xx, flat = rows(got), rows(x), idx.reshape(-1)
    keep = (flat < 0) | (flat >= 6) | (flat == 0) | (flat == 1)
    assert keep.any() and (xx[keep] == 0).any()
    same_bits(gx[keep], xx[keep])
    same_bits(gx[flat == 2][:, ::2], xx[flat == 2][:, ::2])
    assert not torch.equal(gx[flat == 4], xx[flat == 4])


def test_calibrate_more_bins_than_pixels():
    """Only the buckets in use get a scale and shift."""
    x, idx = features("dense", torch.float32, num_bins=65536, d=3, seed=2)
    stats = rand_stats(65536, 3)
    torch.testing.assert_close(OPS.calibrate(x, idx, *stats), reference.calibrate(x, idx, *stats),
                               rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("padding", dirfast.ops.PADDINGS)
def test_smooth_bins_same_bits_as_reference(dtype, padding):
    """float16 and bfloat16 too: every operation rounds to the dtype, as the reference does."""
    g = gen(5)
    for num_bins, ks in ((10, 5), (4, 7), (1, 3), (97, 5)):
        for w in (torch.rand(ks, generator=g, dtype=torch.float64) + 0.1, dirfast.kernel_window("gaussian", ks, 2.0)):
            stats = torch.randn(num_bins, 3, generator=g).to(dtype)
            same_bits(OPS.smooth_bins(stats, w, padding), reference.smooth_bins(stats, w, padding))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_mixture_logpdf_across_chunks(dtype):
    """Elements over several chunks of 16,384 with a partial last lane group: the values and the
    four gradients of the reference, the component gradients summed chunk by chunk."""
    g = gen(13)
    x = (torch.randn(2 * 16384 + 37, generator=g, dtype=torch.float64) * 3).to(dtype)
    means = torch.linspace(-5, 5, 33, dtype=dtype)
    variances, log_weights = (torch.rand(33, generator=g) + 0.1).to(dtype), torch.randn(33, generator=g).to(dtype)
    out = OPS.mixture_logpdf(x, means, variances, log_weights)
    grad = torch.rand(x.shape, generator=g).to(dtype)
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else {}
    torch.testing.assert_close(out, reference.mixture_logpdf(x, means, variances, log_weights), **tolerance)
    for got, expected in zip(OPS.mixture_logpdf_backward(grad, x, out, means, variances, log_weights),
                             reference.mixture_logpdf_backward(grad, x, out, means, variances, log_weights)):
        scale = float(expected.abs().max())
        torch.testing.assert_close(got / scale, expected / scale, **tolerance)


def test_bitwise_deterministic_across_threads():
    g = gen(12)
    rows = torch.randn(70001, 24, generator=g) * 3 + 100
    rows_idx = torch.randint(-1, 98, (70001,), generator=g)
    dense = torch.randn(3, 16, 97, 101, generator=g)
    dense_idx = torch.randint(-1, 98, (3, 97, 101), generator=g)
    w = dirfast.kernel_window("gaussian", 5, 2.0, normalize="sum")

    def run():
        out = []
        for x, idx in ((rows, rows_idx), (dense, dense_idx), (rows.half(), rows_idx.int())):
            count, mean, var = OPS.bin_stats(x, idx, 97)
            m2, v2 = OPS.smooth_bins(mean, w, "reflect"), OPS.smooth_bins(var, w, "reflect")
            out += [count, mean, var, m2, v2, OPS.calibrate(x, idx, mean, var, m2, v2, 0.1, 10.0)]
        y = rows[:, 0] / 30
        density = OPS.mixture_logpdf(y, mean[:, 0] / 30, var[:, 0] / 900 + 0.1, torch.zeros(97))
        out += [density, *OPS.mixture_logpdf_backward(torch.ones_like(y), y, density, mean[:, 0] / 30,
                                                      var[:, 0] / 900 + 0.1, torch.zeros(97))]
        return out

    results = []
    for threads in (1, 2, 3, 2):
        with num_threads(threads):
            results.append(run())
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)
