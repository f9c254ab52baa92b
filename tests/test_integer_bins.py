"""``dirfast::integer_bins``: ``int(label * scale)`` clamped into range and counted from ``first``,
-1 for NaN and infinite labels, on every backend against numpy's arithmetic in the same dtype.

Bad arguments are in test_bad_inputs.py; thread counts and opcheck in test_backends.py;
``Binning.integer`` on top of it in test_binning.py.
"""

import numpy as np
import pytest
import torch

import dirfast
from testing import FLOAT_DTYPES, backend_device_params, dtype_params, gen, on

BACKEND_DEVICE = list(backend_device_params())
SPECIAL = [float("nan"), float("inf"), -float("inf"), 1e30, -1e30, 3e38, -0.0, 0.0, 2.0, 2.9999999, 3.0, -2.5, 99.0,
           99.5, 100.0, 1e6]


def numpy_bins(labels: torch.Tensor, num_bins: int, scale: float, first: int) -> torch.Tensor:
    """The bins in numpy, in float32 (float64 for float64 labels): product, clip, floor."""
    dtype = np.float64 if labels.dtype == torch.float64 else np.float32
    values = labels.detach().cpu().double().numpy().astype(dtype)  # exact: every input dtype fits
    with np.errstate(over="ignore", invalid="ignore"):
        product = values * dtype(scale) if scale != 1.0 else values
        bins = np.floor(np.clip(product, dtype(first), dtype(num_bins - 1))) - first
    bins[~np.isfinite(values)] = -1
    return torch.from_numpy(bins.astype(np.int64))


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
@pytest.mark.parametrize("dtype", list(dtype_params(FLOAT_DTYPES)))
@pytest.mark.parametrize("num_bins, scale, first", [(100, 1.0, 0), (100, 10.0, 3), (7, 0.3, 0), (1, 2.5, 0)])
def test_matches_numpy(backend, device, dtype, num_bins, scale, first):
    """Random labels around the range and the special values (NaN, +-inf, huge, signed zeros,
    whole numbers and the floats next to them), in 1-D, dense [B, 1, H, W] and transposed
    layouts: int64 bins of the labels' shape, those of numpy."""
    g = gen(51)
    flat = torch.cat([torch.tensor(SPECIAL, dtype=torch.float64), torch.randn(984, generator=g, dtype=torch.float64) * 40 + 30])
    labels = flat.to(dtype)
    for shaped in (labels, labels.reshape(2, 1, 20, 25), labels.reshape(40, 25).t()):
        got = on(backend, dirfast.ops.integer_bins, shaped.to(device), num_bins, scale, first)
        assert got.dtype == torch.int64 and got.shape == shaped.shape and got.device.type == torch.device(device).type
        assert torch.equal(got.cpu(), numpy_bins(shaped, num_bins, scale, first))


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
def test_empty_labels(backend, device):
    got = on(backend, dirfast.ops.integer_bins, torch.zeros(0, 3, device=device), 10)
    assert got.shape == (0, 3) and got.dtype == torch.int64
