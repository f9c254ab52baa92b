"""dirfast.Binning against the published label -> bin rules of each path.

``precision="labels"`` is np.histogram on the labels as they are (the STS-B-DIR LDS weights,
tasks.py); ``precision="float32"`` casts each label to float32 and compares it with float32
edges (the STS-B-DIR fds.py and util.py). Bad arguments are in test_bad_inputs.py.
"""

import warnings

import numpy as np
import pytest
import torch

import dirfast
from benchmarks import published
from dirfast import binning as binning_module
from testing import DEVICES, backend_device_params, gen

BINNINGS = {
    "stsb": lambda: dirfast.Binning.uniform(0, 5, 50),
    "odd-range": lambda: dirfast.Binning.uniform(-2.0, 3.0, 7),
    "ages": lambda: dirfast.Binning.integer(121),
    "depth": lambda: dirfast.Binning.integer(100, scale=10),
    "edges": lambda: dirfast.Binning([0.0, 0.1, 0.25, 1.0 / 3.0, 2.5, 10.0]),
}
NUMPY_DTYPES = [np.float64, np.float32, np.float16]


def expected_bins(binning, labels: np.ndarray, precision: str) -> list:
    """The published rule, written out: for uniform edges np.histogram's edges in the dtype
    the label is compared in (float32 for precision="float32", else the label's own; float64
    for integers), the first edge strictly above the label, minus 1; for integer binning
    ``int(label * scale)`` in that dtype; clamped into range."""
    n = binning.num_bins
    out = []
    for value in labels:
        if precision == "float32":
            value = np.float32(value)
        elif labels.dtype.kind in "iu":
            value = np.float64(value)
        if binning.is_integer:
            scale = value.dtype.type(10.0 if binning == dirfast.Binning.integer(n, scale=10) else 1.0)
            if value.dtype == np.float16:  # torch multiplies float16 by a Python scale in float32
                value, scale = np.float32(value), np.float32(scale)
            out.append(min(max(int(value * scale), 0), n - 1))
            continue
        low, high = float(binning.edges[0]), float(binning.edges[-1])  # Python floats, as the published range
        uniform = repr(binning).startswith("Binning.uniform")
        edges = published.histogram_edges(low, high, n, dtype=value.dtype) if uniform else binning.edges.astype(
            np.float32 if precision == "float32" else np.float64)
        out.append(published.edges_bin(value, edges))
    return out


def edge_labels(binning, dtype) -> np.ndarray:
    """Every edge, and the neighbouring values just below and above it, in ``dtype``."""
    edges = binning.edges.astype(dtype)
    below = np.nextafter(edges, np.array(-np.inf, dtype=dtype))
    above = np.nextafter(edges, np.array(np.inf, dtype=dtype))
    return np.concatenate([edges, below, above]).astype(dtype)


@pytest.mark.parametrize("name", BINNINGS)
@pytest.mark.parametrize("dtype", NUMPY_DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("precision", ["labels", "float32"])
@pytest.mark.parametrize("as_tensor", [False, True], ids=["numpy", "torch"])
def test_labels_at_and_next_to_every_edge(name, dtype, precision, as_tensor):
    binning = BINNINGS[name]()
    labels = edge_labels(binning, dtype)
    got = binning(torch.from_numpy(labels) if as_tensor else labels, precision=precision, check=False)
    assert got.dtype == torch.int64 and got.shape == labels.shape
    assert got.tolist() == expected_bins(binning, labels, precision)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_arithmetic_bins_are_the_searched_bins(dtype):
    """Where Binning proved its arithmetic guess within one bin of every label's bin
    (_arithmetic_guess), it bins many labels on CPU by the guess and one step against the edges:
    labels at, next to and between the edges of uniform binnings, wide and one-float-narrow
    bins, far out of range and not finite, get the bins a search of the same edges gives.
    Uneven edges are searched."""
    g = gen(11)
    one = float(np.spacing(np.ones(1, _numpy(dtype)))[0])
    cases = [(0, 5, 50), (-2, 3, 7), (0, 1, 1), (-1e6, 1e6, 99991), (1, 1 + 64 * one, 64), (1, 1 + 100 * one, 37),
             (1e-30, 3e-30, 1000), (-7.3, -7.1, 3)] + [
        (low, low + width, max(1, min(n, int(width / (abs(low) + width) * 2 ** 20))))  # bins of 8 floats or more
        for low, width, n in zip((torch.randn(8, generator=g) * 100).tolist(),
                                 (10 ** torch.empty(8).uniform_(-3, 4, generator=g)).tolist(),
                                 torch.randint(1, 5000, (8,), generator=g).tolist())]
    proved = 0
    for low, high, n in cases:
        binning = dirfast.Binning.uniform(low, high, n)
        edges, guess = binning._edges_tensor(dtype, torch.device("cpu"))
        proved += guess is not None
        inside = torch.rand(binning_module._GUESS_FROM, generator=g, dtype=torch.float64).mul(1.2 * (high - low)).add(low - 0.1 * (high - low))
        labels = torch.cat([torch.from_numpy(edge_labels(binning, _numpy(dtype))).to(dtype), inside.to(dtype),
                            torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30, -1e30], dtype=dtype)])
        want = (torch.searchsorted(edges, labels, right=True) - 1).clamp(0, n - 1)
        want = torch.where(torch.isfinite(labels), want, -1)
        assert torch.equal(binning(labels, check=False), want), (low, high, n)
    assert proved >= len(cases) - 2  # the guess is the rule, not the exception
    for uneven in ([0.0, 0.1, 0.25, 1.0 / 3.0, 2.5, 10.0], [0.0, 7.0, 8.0, 9.0, 10.0]):  # guesses behind, ahead
        binning = dirfast.Binning(uneven)
        edges, guess = binning._edges_tensor(dtype, torch.device("cpu"))
        labels = torch.linspace(-1, 11, 1201, dtype=dtype)
        assert guess is None
        assert torch.equal(binning(labels), (torch.searchsorted(edges, labels.to(edges.dtype), right=True) - 1).clamp(
            0, binning.num_bins - 1))


def _numpy(dtype: torch.dtype):
    return np.float32 if dtype == torch.float32 else np.float64


@pytest.mark.parametrize("name", BINNINGS)
def test_integer_labels_bin_as_float64(name):
    binning = BINNINGS[name]()
    labels = np.arange(-3, 130, dtype=np.int64)
    for precision in ("labels", "float32"):
        assert binning(labels, precision=precision).tolist() == expected_bins(binning, labels, precision)
        assert binning(torch.from_numpy(labels).int(), precision=precision).tolist() == expected_bins(
            binning, labels, precision)


@pytest.mark.parametrize("device", DEVICES)
def test_bfloat16_labels_against_bfloat16_edges(device):
    """bfloat16 labels are compared with the edges rounded to bfloat16 (their own precision)."""
    binning = dirfast.Binning.uniform(0, 5, 50)
    labels = torch.rand(2000, generator=gen(3)).mul(5).bfloat16()
    edges = torch.from_numpy(binning.edges).bfloat16().float()
    expected = (torch.searchsorted(edges, labels.float(), right=True) - 1).clamp(0, 49)
    assert torch.equal(binning(labels.to(device)).cpu(), expected)


def test_the_two_paths_differ_as_published():
    """float64 scores: 0.2 is bin 2 on both paths; 0.6 is bin 5 for the LDS weights (the float64
    edge is 0.6000000000000001) and bin 6 for FDS (float32)."""
    binning = dirfast.Binning.uniform(0, 5, 50)
    scores = np.array([0.2, 0.6])
    assert binning(scores).tolist() == [2, 5] == published.published_stsb_weight_bins(scores).tolist()
    assert binning(scores, precision="float32").tolist() == [2, 6] == [published.published_stsb_fds_bucket(s)
                                                                      for s in scores]
    assert binning(scores.astype(np.float32)).tolist() == [2, 6]


@pytest.mark.parametrize("device", DEVICES)
def test_shape_device_and_clamping(device):
    binning = dirfast.Binning.uniform(0, 5, 50)
    labels = torch.tensor([[-1.0, -0.001], [5.0, 5.001]], device=device)
    got = binning(labels)
    assert got.shape == (2, 2) and got.device == labels.device
    assert got.tolist() == [[0, 0], [49, 49]]
    labels = torch.tensor([0.0, 30.7, 120.9, 1e9, -3.0])
    assert dirfast.Binning.integer(121)(labels, check=False).tolist() == [0, 30, 120, 120, 0]


def test_non_finite_labels():
    """Checked (the default), a NaN or infinite label raises; unchecked (the training path, no
    host sync), it gets index -1, which every op treats as no bin."""
    for binning in (b() for b in BINNINGS.values()):
        labels = torch.tensor([1.0, float("nan"), float("inf"), -float("inf"), 2.0])
        with pytest.raises(ValueError, match="finite"):
            binning(labels)
        got = binning(labels, check=False)
        assert got[1:4].tolist() == [-1, -1, -1]
        assert got[0] >= 0 and got[4] >= 0


@pytest.mark.parametrize("backend, device", list(backend_device_params()))
def test_float64_labels_beyond_float32_join_the_edge_bins(backend, device):
    """Integer binning with precision="float32": finite float64 labels beyond float32's range join
    the edge bins, as with precision="labels" and with searched edges (cast as they are, they would
    be inf: no bin), on every backend; NaN and infinite labels still get -1."""
    big = float(torch.finfo(torch.float32).max)
    labels = torch.tensor([1e39, -1e39, 1e300, big * (1 + 2 ** -40), 0.7, float("nan"), float("inf"),
                           -float("inf")], dtype=torch.float64, device=device)
    with dirfast.use_backend(backend):
        for binning, want in ((dirfast.Binning.integer(10), [9, 0, 9, 9, 0, -1, -1, -1]),
                              (dirfast.Binning.integer(10, scale=10), [9, 0, 9, 9, 7, -1, -1, -1])):
            got = binning(labels, precision="float32", check=False)
            assert got.tolist() == want
            assert torch.equal(got, binning(labels, check=False))
            from_2 = [max(b, 2) - 2 if b >= 0 else -1 for b in want]  # FDS's bucket_start
            assert binning._bins_from(labels, "float32", False, 2).tolist() == from_2
            assert binning(labels[:4], precision="float32").tolist() == want[:4]  # checked: finite, accepted


def test_integer_scale_must_be_finite_in_float32():
    """Labels are scaled in float32 (dirfast.ops.integer_bins refuses such a scale too): beyond it,
    0 * inf would make the bins depend on the backend."""
    with pytest.raises(ValueError, match="scale must be .*float32"):
        dirfast.Binning.integer(10, scale=1e39)
    with pytest.raises(ValueError, match="scale"):
        dirfast.ops.integer_bins(torch.zeros(2), 10, 1e39)
    assert dirfast.Binning.integer(10, scale=3e38)(torch.tensor([0.0, 1.0])).tolist() == [0, 9]


@pytest.mark.parametrize("name", BINNINGS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64, torch.int64], ids=str)
def test_bins_counted_from_a_first_bin_as_fds_buckets_them(name, dtype):
    """FDS's buckets (bucket_start = first): every bin below ``first`` joins it, the bins count
    from it, and a label of no bin (NaN, infinite) stays -1, as clamping the bins would give;
    labels far out of range, negative fractions and signed zeros included."""
    binning = BINNINGS[name]()
    g = gen(7)
    labels = torch.cat([torch.randn(300, generator=g, dtype=torch.float64) * binning.num_bins / 2 + 1,
                        torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30, -1e30, -0.5, -0.0, 0.0, 1e300])])
    labels = labels.to(dtype) if dtype.is_floating_point else labels.nan_to_num(0.0, 0.0, 0.0).clamp(-500, 500).to(dtype)
    for precision in ("labels", "float32"):
        bins = binning(labels, precision=precision, check=False)
        for first in sorted({0, 1, 3, binning.num_bins - 1}):
            want = torch.where(bins >= 0, bins.clamp(first, binning.num_bins - 1) - first, -1)
            assert torch.equal(binning._bins_from(labels, precision, False, first), want), (precision, first)


def test_integer_binning_warns_about_fractional_labels():
    """The warning points at the caller's line, however the labels reach the binning."""
    labels = torch.tensor([0.143, 2.0, 4.6])
    for call in (lambda: dirfast.Binning.integer(50)(labels),
                 lambda: dirfast.lds_weights(labels, dirfast.Binning.integer(50)),
                 lambda: dirfast.FDS(3, bucket_num=50).update_running_stats(torch.ones(3, 3), labels, 0)):
        with pytest.warns(UserWarning, match="Binning.uniform") as record:
            call()
        assert [w.filename for w in record] == [__file__]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dirfast.Binning.integer(50)(torch.tensor([1.0, 2.0]))  # integer-valued floats: no warning
        dirfast.Binning.integer(50)(torch.tensor([0.143]), check=False)  # the training path reads nothing
        dirfast.Binning.integer(100, scale=10)(torch.tensor([1.234]))  # depths: fractional by design


def test_centers_and_repr():
    binning = dirfast.Binning.uniform(0, 5, 50)
    np.testing.assert_allclose(binning.centers, np.arange(50) * 0.1 + 0.05)
    assert repr(binning) == "Binning.uniform(0, 5, 50)"
    assert repr(dirfast.Binning.integer(100, scale=10)) == "Binning.integer(100, scale=10)"
    wide = dirfast.Binning.auto(torch.tensor([1e8, 1e8], dtype=torch.float64))  # edges 1e8 -+ 0.5: every digit
    assert eval(repr(wide), {"Binning": dirfast.Binning}) == wide
    assert dirfast.Binning.integer(10) != dirfast.Binning([float(i) for i in range(11)])
    assert dirfast.Binning.uniform(0, 5, 50) == dirfast.Binning.uniform(0, 5, 50)
    np.testing.assert_array_equal(dirfast.Binning([0.0, 1e308, 1.7e308]).centers, [5e307, 1.35e308])  # no overflow


def test_equal_binnings_hash_alike():
    """A Binning (and a GridBinning) can key a dict or sit in a set, as the frozen presets that
    hold them: equal ones hash alike, edges of -0.0 and 0.0 included."""
    table = {dirfast.Binning.uniform(0, 5, 50): "sts-b", dirfast.Binning([-0.0, 1.0]): "signed zero",
             dirfast.GridBinning(dirfast.Binning.integer(3), dirfast.Binning.integer(4)): "grid"}
    assert table[dirfast.Binning.uniform(0.0, 5.0, 50)] == "sts-b"
    assert table[dirfast.Binning([0.0, 1.0])] == "signed zero"
    assert table[dirfast.GridBinning([dirfast.Binning.integer(3), dirfast.Binning.integer(4)])] == "grid"
    assert len({dirfast.Binning.integer(10), dirfast.Binning([float(i) for i in range(11)])}) == 2
    assert len({preset: name for name, preset in dirfast.presets.PRESETS.items()}) == 4


def test_depth_buckets_match_the_published_rule():
    """NYUD2-DIR: min(int(depth * float32(10)), 99) on float32 depths (util.py, loaddata.py)."""
    depth = (torch.rand(5000, generator=gen(7), dtype=torch.float64) * 11).float()
    depth = torch.cat([depth, torch.arange(0, 101).float() / 10])
    expected = [published.published_nyud2_bin(np.float32(v)) for v in depth.tolist()]
    assert dirfast.Binning.integer(100, scale=10)(depth, precision="float32").tolist() == expected


def test_ranges_a_precision_cannot_hold_say_so():
    """numpy's "Too many bins for data range" and NaN bin counts became dirfast errors that say
    what is wrong and what to do."""
    narrow = dirfast.Binning.uniform(1.0, 1.0 + 1e-9, 10)  # float64 edges: fine
    assert narrow(torch.tensor([1.0 + 5e-10], dtype=torch.float64)).tolist() == [5]
    with pytest.raises(ValueError, match="precision='labels', or widen the range"):
        narrow(torch.tensor([1.0], dtype=torch.float64), precision="float32")
    for low, high in ((1.0, 1.0 + 1e-15), (-1e308, 1e308)):
        with pytest.raises(ValueError, match=r"low=.* and high=.*: widen or rescale the range"):
            dirfast.Binning.uniform(low, high, 10)
    with pytest.raises(ValueError, match="labels span .*: rescale them"):
        dirfast.Binning.auto(torch.tensor([-1e308, 0.0, 1e308], dtype=torch.float64))
