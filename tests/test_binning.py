"""dirfast.Binning against the published label -> bin rules (SPEC.md, Binning)."""

import numpy as np
import pytest
import torch

import dirfast
import oracle
from testing import DEVICES, gen


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int64, torch.int32], ids=str)
def test_integer_binning(device, dtype):
    b = dirfast.Binning.integer(121)
    assert b.num_bins == 121
    if dtype.is_floating_point:
        values = [0.0, 0.4, 1.0, 5.7, 30.999, 119.5, 120.0, 120.9, 121.0, 150.0, -0.5, -3.0, 1e9]
    else:
        values = [0, 1, 5, 30, 119, 120, 121, 150, -3, 10**6]
    labels = torch.tensor(values, dtype=dtype, device=device)
    got = b(labels)
    assert got.dtype == torch.int64 and got.device == labels.device and got.shape == labels.shape
    # SPEC: b(y) = min(B - 1, int(y)); dirfast clamps below at 0 too
    expected = [oracle.integer_bin(v, 121) for v in labels.cpu().tolist()]
    assert got.cpu().tolist() == expected


def test_integer_binning_random_and_shapes():
    b = dirfast.Binning.integer(50)
    labels = torch.rand(4, 1, 6, generator=gen(1), dtype=torch.float64) * 70 - 10
    got = b(labels)
    assert got.shape == labels.shape
    expected = [oracle.integer_bin(v, 50) for v in labels.reshape(-1).tolist()]
    assert got.reshape(-1).tolist() == expected


@pytest.mark.parametrize("device", DEVICES)
def test_uniform_binning_stsb_float32(device):
    """STS-B-DIR: 50 bins over [0, 5] with numpy's histogram edges. The published loader makes
    the scores np.float32, so the edges are float32 too: 3.800 (as float32) sits ON the float32
    edge 3.8 and goes to bin 38 (float64 edges would say 37)."""
    b = dirfast.Binning.uniform(0, 5, 50)
    assert b.num_bins == 50
    scores = np.array([0.0, 0.1, 0.143, 0.2, 0.3, 0.7, 1.0, 2.5, 3.8, 3.85, 4.6, 4.9, 4.95, 4.999, 5.0],
                      dtype=np.float32)
    rand = (torch.rand(500, generator=gen(2), dtype=torch.float64) * 5).float().numpy()
    grid = (np.arange(0, 501) / 100).astype(np.float32)  # every 0.01, as the 3-decimal scores
    labels = np.concatenate([scores, rand, grid])
    edges = oracle.histogram_edges(0.0, 5.0, 50, dtype=np.float32)
    expected = [oracle.edges_bin(v, edges) for v in labels]
    got = b(torch.tensor(labels, device=device))
    assert got.dtype == torch.int64 and got.device.type == torch.device(device).type
    assert got.cpu().tolist() == expected
    # and it agrees with np.histogram's own counts on the same float32 data
    counts = np.histogram(labels, bins=50, range=(0.0, 5.0))[0]
    np.testing.assert_array_equal(np.bincount(got.cpu().numpy(), minlength=50), counts)
    assert int(b(torch.tensor([3.8], dtype=torch.float32))[0]) == 38


def test_uniform_binning_clamps():
    b = dirfast.Binning.uniform(0, 5, 50)
    got = b(torch.tensor([-1.0, -0.001, 5.0, 5.001, 100.0]))
    assert got.tolist() == [0, 0, 49, 49, 49]


@pytest.mark.parametrize("num_bins", [1, 3, 10])
def test_uniform_binning_other_ranges(num_bins):
    b = dirfast.Binning.uniform(-2.0, 3.0, num_bins)
    labels = np.concatenate([(np.random.default_rng(3).random(200) * 5 - 2), [-2.0, 3.0]]).astype(np.float32)
    edges = oracle.histogram_edges(-2.0, 3.0, num_bins, dtype=np.float32)
    expected = [oracle.edges_bin(v, edges) for v in labels]
    assert b(torch.tensor(labels)).tolist() == expected


def test_edges_binning():
    edges = [0.0, 1.0, 2.5, 10.0]
    b = dirfast.Binning(edges)
    assert b.num_bins == 3
    labels = [0.0, 0.5, 1.0, 2.4999, 2.5, 9.99, 10.0, -3.0, 11.0]
    expected = [oracle.edges_bin(v, np.array(edges)) for v in labels]
    assert expected == [0, 0, 1, 1, 2, 2, 2, 0, 2]
    assert b(torch.tensor(labels, dtype=torch.float64)).tolist() == expected


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("make", [lambda: dirfast.Binning.integer(10), lambda: dirfast.Binning.uniform(0, 5, 50),
                                  lambda: dirfast.Binning([0.0, 1.0, 2.0])])
def test_binning_rejects_non_finite(make, bad):
    with pytest.raises(ValueError, match="label"):
        make()(torch.tensor([1.0, bad, 2.0]))


def test_binning_bad_construction():
    with pytest.raises(ValueError, match="num_bins"):
        dirfast.Binning.integer(0)
    with pytest.raises(ValueError, match="num_bins"):
        dirfast.Binning.uniform(0, 5, 0)
    with pytest.raises(ValueError):
        dirfast.Binning.uniform(5, 0, 10)
    with pytest.raises(ValueError, match="edges"):
        dirfast.Binning([0.0, 2.0, 1.0])
    with pytest.raises(ValueError, match="edges"):
        dirfast.Binning([1.0])
