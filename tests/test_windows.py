"""Kernel windows: dirfast.get_lds_kernel_window and dirfast.kernel_window against scipy."""

import numpy as np
import pytest
import torch

import dirfast
from benchmarks import published

KERNELS = ["gaussian", "triang", "laplace"]
SIZES = [1, 3, 5, 7, 9, 15]
SIGMAS = [0.5, 1, 2, 3.5]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("ks", SIZES)
@pytest.mark.parametrize("sigma", SIGMAS)
def test_lds_window_matches_published(kernel, ks, sigma):
    got = dirfast.get_lds_kernel_window(kernel, ks, sigma)
    assert isinstance(got, np.ndarray)
    expected = published.lds_window(kernel, ks, sigma)
    assert got.shape == (ks,)
    # LDS truncates smoothed counts (a quirk of the published code), so the window must match to the last bits.
    np.testing.assert_allclose(got, expected, rtol=1e-15, atol=0)
    assert got.max() == pytest.approx(1.0)


def test_lds_gaussian_window_spec_fact():
    """The published window: ks=5, sigma=2 gives 0.858, 0.946, 1, 0.946, 0.858 (tails folded back by scipy's
    reflect mode: NOT a sampled Gaussian)."""
    got = dirfast.get_lds_kernel_window("gaussian", 5, 2)
    np.testing.assert_array_equal(np.round(got, 3), [0.858, 0.946, 1.0, 0.946, 0.858])
    sampled = np.exp(-np.arange(-2, 3) ** 2 / (2 * 2.0**2))
    assert not np.allclose(got, sampled / sampled.max(), atol=1e-2)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("ks", [1, 3, 5, 9])
@pytest.mark.parametrize("sigma", [1, 2, 3])
def test_kernel_window_max_is_lds_window(kernel, ks, sigma):
    got = dirfast.kernel_window(kernel, ks, sigma, normalize="max")
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float64 and got.shape == (ks,)
    np.testing.assert_allclose(got.numpy(), published.lds_window(kernel, ks, sigma), rtol=1e-15, atol=0)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("ks", [1, 3, 5, 9])
@pytest.mark.parametrize("sigma", [1, 2, 3])
def test_kernel_window_sum_is_fds_window(kernel, ks, sigma):
    got = dirfast.kernel_window(kernel, ks, sigma, normalize="sum")
    assert got.dtype == torch.float64 and got.shape == (ks,)
    assert float(got.sum()) == pytest.approx(1.0, abs=1e-6)
    # the published FDS gaussian is built from a float32 delta: float32-level agreement
    np.testing.assert_allclose(got.numpy(), published.fds_window(kernel, ks, sigma), rtol=1e-6, atol=1e-7)


def test_kernel_window_defaults():
    np.testing.assert_allclose(dirfast.kernel_window().numpy(), published.lds_window("gaussian", 5, 2.0), rtol=1e-15)


def test_fds_window_matches_published_module():
    from benchmarks.published import PublishedFDS

    for kernel in KERNELS:
        for ks, sigma in [(5, 2), (3, 1), (7, 3)]:
            expected = PublishedFDS._get_kernel_window(kernel, ks, sigma).double()
            got = dirfast.kernel_window(kernel, ks, sigma, normalize="sum")
            torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)



@pytest.mark.parametrize("ks,sigma", [(101, 2e4), (9, 3e3), (1001, 55.5)])
def test_wide_gaussian_window_is_scipys(ks, sigma):
    """A Gaussian far wider than the window (its tails folded back many times) keeps scipy's bits."""
    from scipy.ndimage import gaussian_filter1d

    delta = np.zeros(ks)
    delta[ks // 2] = 1.0
    expected = gaussian_filter1d(delta, sigma)
    np.testing.assert_array_equal(dirfast.get_lds_kernel_window("gaussian", ks, sigma), expected / expected.max())


@pytest.mark.parametrize("sigma,error", [("x", TypeError), (float("nan"), ValueError), (0.0, ValueError)])
def test_triang_checks_the_sigma_it_ignores(sigma, error):
    with pytest.raises(error, match="sigma"):
        dirfast.kernel_window("triang", 5, sigma)
