"""The Triton kernels at the launch sizes they pick on a GPU, run on CPU under Triton's
interpreter, against the reference backend.

Under the interpreter every Triton op picks small tiles and few programs (it pays per program,
not per element: ``dirfast.triton._common.INTERPRET``), so the other Triton tests never run the
tiles a GPU runs. Here the ops take their GPU sizes, on inputs sized to cross each GPU tile,
chunk and key block at least once, with a masked tail: the index arithmetic and masks of the GPU
launches are checked on every CI run, without a GPU. Whether each launch compiles for a GPU, and
its registers, is ``tests/triton_compile.py``'s check (test_backends.py runs it).
"""

import pytest
import torch

import dirfast
from testing import deterministic, gen, on, tol

pytestmark = pytest.mark.skipif(
    not dirfast.backends()["triton"]["available"], reason=f"triton: {dirfast.backends()['triton']['reason']}")

DTYPES = [pytest.param(torch.float32, id="float32"), pytest.param(torch.float64, id="float64")]


@pytest.fixture(autouse=True)
def gpu_launch_sizes(monkeypatch):
    """The Triton ops choose their launch sizes as on a GPU, and accept the CPU tensors that the
    interpreter runs them on."""
    from dirfast.triton import _common

    if not _common.INTERPRET:
        pytest.skip("Triton is compiled here (a GPU): the other Triton tests run these sizes")
    monkeypatch.setattr(_common, "INTERPRET", False)
    monkeypatch.setattr(_common, "check_device", lambda tensor, op: None)


def rand(*shape, dtype=torch.float32, seed=0, requires_grad=False):
    x = torch.randn(*shape, generator=gen(seed), dtype=torch.float64).to(dtype)
    return x.requires_grad_(requires_grad)


def same_as_reference(fn, inputs, dtype):
    """``fn(*inputs)`` and the gradients of its sum on the Triton backend, against the reference
    backend's, for the inputs that require grad (None for one the op gives no gradient: both)."""
    results = []
    for backend in ("triton", "reference"):
        leaves = [t.detach().clone().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t
                  for t in inputs]
        out = on(backend, fn, *leaves)
        outs = list(out) if isinstance(out, (tuple, list)) else [out]
        wanted = [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]
        grads = list(torch.autograd.grad(sum(o.sum() for o in outs), wanted, allow_unused=True)) if wanted else []
        results.append([o.detach() for o in outs] + grads)
    got, want = results
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert (g is None) == (w is None)
        if g is not None:
            torch.testing.assert_close(g, w, equal_nan=True, **tol(dtype))


# bin_stats: rows in chunks of 512, read 64 rows at a time ("csr", when bins hold >= 64 rows each,
# and always when deterministic); bins of few rows, or pixels contiguous, scatter from 8K-element
# tiles ("direct") into a per-program histogram up to 256 bins and into global memory beyond.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, num_bins, exact", [
    pytest.param((1100, 5), 7, False, id="rows-csr"),
    pytest.param((2600, 5), 2, False, id="rows-csr-3-chunks-a-bin"),
    pytest.param((2600, 5), 2, True, id="rows-deterministic-3-chunks-a-bin"),
    pytest.param((1100, 5), 300, False, id="rows-direct-global-bins"),
    pytest.param((1100, 5), 300, True, id="rows-deterministic-many-bins"),
    pytest.param((1100, 130), 7, True, id="rows-deterministic-two-feature-blocks"),
    pytest.param((2, 5, 40, 40), 9, False, id="dense-direct-2-tiles-an-image"),
    pytest.param((1500, 3), 30, False, id="rows-direct-histogram"),
])
def test_bin_stats(shape, num_bins, exact, dtype):
    x = rand(*shape, dtype=dtype)
    idx = torch.randint(-1, num_bins + 1, (shape[0],) + shape[2:], generator=gen(1))
    with deterministic(exact):
        same_as_reference(dirfast.ops.bin_stats, (x, idx, num_bins), dtype)


def calibration_tables(num_bins, d, dtype):
    means = [rand(num_bins, d, dtype=dtype, seed=s) for s in (2, 3)]
    variances = [rand(num_bins, d, dtype=dtype, seed=s).abs() + 0.05 for s in (4, 5)]
    return means[0], variances[0], means[1], variances[1]


# calibrate: the (s, t) tables in [256 or fewer, 8] tiles of buckets x features (transposed when
# pixels are contiguous); the rows in tiles of 8K elements, 512 wide along the contiguous axis.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("in_place", [False, True], ids=["out-of-place", "in-place"])
@pytest.mark.parametrize("layout", ["rows", "rows_column_major", "dense", "dense_channels_last"])
def test_calibrate(layout, in_place, dtype):
    num_bins = 300
    shapes = {"rows": (1500, 5), "rows_column_major": (5, 1500), "dense": (2, 5, 20, 32),
              "dense_channels_last": (2, 5, 20, 32)}
    x = rand(*shapes[layout], dtype=dtype, requires_grad=not in_place)
    if layout == "rows_column_major":
        x = x.detach().t().requires_grad_(not in_place)
    elif layout == "dense_channels_last":
        x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(not in_place)
    idx = torch.randint(-1, num_bins + 1, (x.shape[0],) + tuple(x.shape[2:]), generator=gen(1))
    tables = calibration_tables(num_bins, 5, dtype)
    if in_place:
        got, want = x.clone(), x.clone()
        on("triton", dirfast.ops.calibrate_, got, idx, *tables)
        on("reference", dirfast.ops.calibrate_, want, idx, *tables)
        torch.testing.assert_close(got, want, **tol(dtype))
    else:
        same_as_reference(dirfast.ops.calibrate, (x, idx, *tables), dtype)


# smooth_bins: tiles of 4K statistics, up to 128 features wide.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("padding", dirfast.ops.PADDINGS)
@pytest.mark.parametrize("num_bins, d, width", [(300, 40, 5), (70, 200, 9)])
def test_smooth_bins(num_bins, d, width, padding, dtype):
    stats = rand(num_bins, d, dtype=dtype)
    window = torch.rand(width, generator=gen(6), dtype=torch.float64).to(dtype)
    same_as_reference(dirfast.ops.smooth_bins, (stats, window, padding), dtype)


# mixture_logpdf: 256 elements (128 in float64) x 8 components a tile.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [3, 20])
def test_mixture_logpdf(k, dtype):
    x = rand(700, dtype=dtype, requires_grad=True)
    means = rand(k, dtype=dtype, seed=2, requires_grad=True)
    variances = (rand(k, dtype=dtype, seed=3).abs() + 0.1).requires_grad_()
    log_weights = rand(k, dtype=dtype, seed=4, requires_grad=True)
    same_as_reference(dirfast.ops.mixture_logpdf, (x, means, variances, log_weights), dtype)


def pairwise_inputs(m, d, dtype):
    features = rand(m, d, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, 12, (m, 1), generator=gen(7)).to(dtype)  # ties in every row
    return features, labels


# rnc_loss: pair tiles of 32 x 32 rows, 8 features (4 in float64) at a time; rows of up to 1,024
# entries. Anchors 5..44 of 70 rows: every tile and the last, masked, one.
@pytest.mark.parametrize("dtype", DTYPES)
def test_rnc_loss(dtype):
    features, labels = pairwise_inputs(70, 11, dtype)
    same_as_reference(lambda f, y: dirfast.ops.rnc_loss(f, y, 2.0, 5, 40), (features, labels), dtype)


# rnc_loss, conr_loss, ranksim_loss over a row of 1,100 keys: key blocks of 1,024 and a tail.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", ["rnc_loss", "conr_loss", "ranksim_loss"])
def test_pairwise_long_rows(op, dtype):
    m, count = 1100, 4
    features, labels = pairwise_inputs(m, 6, dtype)
    if op == "rnc_loss":
        fn = lambda f, y: dirfast.ops.rnc_loss(f, y, 2.0, 3, count)  # noqa: E731
        inputs = (features, labels)
    elif op == "conr_loss":
        preds = rand(m, 1, dtype=dtype, seed=8, requires_grad=True)
        weights = torch.rand(m, generator=gen(9), dtype=torch.float64).to(dtype)
        fn = lambda f, y, p, w: dirfast.ops.conr_loss(f, y, p, w, offset=3, count=count)  # noqa: E731
        inputs = (features, labels, preds, weights)
    else:
        fn = lambda f, y: dirfast.ops.ranksim_loss(f, y, offset=3, count=count)  # noqa: E731
        inputs = (features, labels)
    same_as_reference(fn, inputs, dtype)
