"""``dirfast::accumulate_bin_stats_``: running per-bin (count, mean, M2) tables after a batch, on
every backend, against a float64 oracle over all the rows the tables hold; bins whose merge would
not be finite left as they were; the composite's few-rows path against its whole-table path.

Bad arguments are in test_bad_inputs.py; thread counts, opcheck and torch.compile in
test_backends.py; FDS.accumulate on top of it in test_fds.py.
"""

import pytest
import torch

import dirfast
from testing import (FLOAT_DTYPES, LAYOUTS, backend_device_params, features, gen, interpreted, on, pairwise,
                     same_bits, stats_dtype, tol)

BACKEND_DEVICE = list(backend_device_params())


def moments(rows: torch.Tensor, idx: torch.Tensor, num_bins: int):
    """Per-bin count, mean and M2 of ``rows`` [N, D] in float64, two passes (indices outside
    [0, num_bins) in no bin)."""
    rows, idx = rows.double(), idx.long()
    keep = (idx >= 0) & (idx < num_bins)
    rows, idx = rows[keep], idx[keep]
    count = torch.zeros(num_bins, dtype=torch.float64).index_add_(0, idx, torch.ones(idx.shape[0], dtype=torch.float64))
    total = torch.zeros(num_bins, rows.shape[1], dtype=torch.float64).index_add_(0, idx, rows)
    mean = total / count.clamp(min=1).unsqueeze(1)
    m2 = torch.zeros_like(mean).index_add_(0, idx, (rows - mean[idx]) ** 2)
    return count, mean, m2


def as_rows(x: torch.Tensor, idx: torch.Tensor):
    return (x, idx.reshape(-1)) if x.dim() == 2 else (x.movedim(1, -1).reshape(-1, x.shape[1]), idx.reshape(-1))


def running_tables(num_bins: int, d: int, held: torch.dtype, device, seed: int, shift: float):
    """Tables of an earlier set of rows (every other bin empty) and those rows."""
    g = gen(seed)
    rows = torch.randn(4 * num_bins, d, generator=g, dtype=torch.float64) * 1.5 + shift + 0.7
    idx = torch.randint(0, num_bins, (4 * num_bins,), generator=g)
    idx = torch.where(idx % 2 == 0, idx, -1)
    count, mean, m2 = moments(rows, idx, num_bins)
    return (count.to(device), mean.to(device, held), m2.to(device, held)), (rows, idx)


# layout, x dtype, tables' dtype, bins (few: whole tables; many: fewer rows than bins), index dtype
CASES = pairwise(LAYOUTS, FLOAT_DTYPES, (torch.float32, torch.float64), (5, 5000), (torch.int64, torch.int32))


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
@pytest.mark.parametrize("layout, dtype, held, num_bins, index_dtype", CASES,
                         ids=[f"{c[0]}-{str(c[1])[6:]}-{str(c[2])[6:]}-{c[3]}-{str(c[4])[6:]}" for c in CASES])
def test_matches_the_float64_oracle(backend, device, layout, dtype, held, num_bins, index_dtype):
    """The tables after the batch hold the count, mean and M2 of every row they were given, as one
    float64 pass over them all gives (the running tables are rounded to their dtype first); rows
    of no bin are counted, and the tables keep their dtypes."""
    high = 7 if num_bins > 7 else None  # many bins: the batch meets a few of them
    x, idx = features(layout, dtype, device, num_bins=num_bins, n=37, d=3, seed=31, shift=20.0, high=high)
    idx = idx.to(index_dtype)
    (count, mean, m2), (old_rows, old_idx) = running_tables(num_bins, 3, held, device, seed=32, shift=20.0)
    start_mean, start_m2 = mean.clone(), m2.clone()
    skipped = on(backend, dirfast.ops.accumulate_bin_stats_, count, mean, m2, x, idx)

    rows, flat = as_rows(x.cpu(), idx.cpu())
    expected = moments(torch.cat([old_rows, rows.double()]), torch.cat([old_idx, flat.long()]), num_bins)
    assert int(skipped) == int(((flat < 0) | (flat >= num_bins)).sum()) and skipped.dtype == torch.int64
    assert count.dtype == torch.float64 and mean.dtype == m2.dtype == held
    torch.testing.assert_close(count.cpu(), expected[0], rtol=0, atol=0)
    # the tables' own rounding, then the merge's in the dtype it computes in
    acc = stats_dtype(dtype, held)
    t = tol(torch.float32) if torch.float32 in (held, acc) else tol(torch.float64)
    torch.testing.assert_close(mean.cpu().double(), expected[1], **t)
    torch.testing.assert_close(m2.cpu().double(), expected[2], rtol=t["rtol"] * 10, atol=t["atol"] * 10)
    met = torch.zeros(num_bins, dtype=torch.bool)
    met[flat[(flat >= 0) & (flat < num_bins)].long()] = True
    same_bits(mean.cpu()[~met], start_mean.cpu()[~met])  # bins the batch does not meet: untouched
    same_bits(m2.cpu()[~met], start_m2.cpu()[~met])


@pytest.mark.parametrize("backend, device", [p for p in BACKEND_DEVICE if not interpreted(*p.values)])
@pytest.mark.parametrize("d", [6, 64])
def test_one_large_bin(backend, device, d):
    """A bin holding most of a large batch against the oracle: short rows (the C++ kernel's
    bin_stats path) and rows of 256 bytes (its rows grouped by bin, the large bin reduced in
    several pieces merged in order)."""
    g = gen(33)
    x = (torch.randn(20000, d, generator=g, dtype=torch.float64) * 2 + 500).float().to(device)
    idx = torch.where(torch.rand(20000, generator=g) < 0.95, 1, torch.randint(-1, 4, (20000,), generator=g)).to(device)
    (count, mean, m2), (old_rows, old_idx) = running_tables(4, d, torch.float32, device, seed=34, shift=500.0)
    on(backend, dirfast.ops.accumulate_bin_stats_, count, mean, m2, x, idx)
    expected = moments(torch.cat([old_rows, x.cpu().double()]), torch.cat([old_idx, idx.cpu()]), 4)
    torch.testing.assert_close(count.cpu(), expected[0], rtol=0, atol=0)
    torch.testing.assert_close(mean.cpu().double(), expected[1], rtol=1e-6, atol=0)
    torch.testing.assert_close(m2.cpu().double(), expected[2], rtol=1e-4, atol=0)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
@pytest.mark.parametrize("num_bins", [4, 40])
def test_a_bin_whose_merge_is_not_finite_keeps_its_statistics(backend, device, num_bins):
    """A bin whose batch holds a NaN or an infinite feature, or whose merged M2 the tables' dtype
    cannot hold (float64 rows into float32 tables: M2 4.5e38 from three rows), keeps its bits and
    its rows are counted as skipped with the rows of no bin; the other bins merge."""
    x = torch.randn(12, 2, generator=gen(35), dtype=torch.float64)
    idx = torch.tensor([0, 0, 1, 1, 2, 2, 2, 3, 3, -1, num_bins, 3])
    x[0, 1] = float("nan")             # bin 0
    x[2, 0] = float("inf")             # bin 1
    x[4:7, 0] = torch.tensor([0.0, 0.0, 2.6e19], dtype=torch.float64)  # bin 2: M2 beyond float32
    (count, mean, m2), _ = running_tables(num_bins, 2, torch.float32, device, seed=36, shift=0.0)
    before = [t.clone() for t in (count, mean, m2)]
    skipped = on(backend, dirfast.ops.accumulate_bin_stats_, count, mean, m2, x.to(device), idx.to(device))
    assert int(skipped) == 2 + 2 + 3 + 2
    for table, old in zip((count, mean, m2), before):
        same_bits(table[:3], old[:3])
        same_bits(table[4:], old[4:])
    assert float(count[3]) == float(before[0][3]) + 3 and bool(torch.isfinite(m2).all())
    assert not torch.equal(mean[3], before[1][3])


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
@pytest.mark.parametrize("offset", [0.0, 30.0], ids=["near-zero", "far"])
def test_fewer_rows_than_bins_gives_the_bits_of_the_whole_tables(backend, device, offset):
    """The composite takes a batch of fewer rows than bins over the bins it meets; the same batch
    padded with rows of no bin past the bin count takes the whole tables: the same bits (repeated
    bins, a bin left out as not finite, rows of no bin), batch after batch, near zero and 15
    standard deviations from it (where the C++ kernels redo some buckets with shifted updates).
    The batch's buckets hold one to three rows: for larger ones the C++ paths' M2 differ by
    rounding (the grouped path merges its M2, the whole-table path bin_stats' var * (n - 1))."""
    g = gen(37)
    small, padded = (running_tables(50, 4, torch.float32, device, seed=38, shift=offset)[0] for _ in range(2))
    for step in range(3):
        x = torch.randn(12, 4, generator=g) * 2 + offset
        idx = torch.randint(0, 12, (12,), generator=g)
        idx[0] = -1
        if step == 1:
            x[3, 2] = float("inf")
        pad_x, pad_idx = torch.randn(40, 4, generator=g), torch.full((40,), -1)
        a = on(backend, dirfast.ops.accumulate_bin_stats_, *small, x.to(device), idx.to(device))
        b = on(backend, dirfast.ops.accumulate_bin_stats_, *padded, torch.cat([x, pad_x]).to(device),
               torch.cat([idx, pad_idx]).to(device))
        for s, p in zip(small, padded):
            same_bits(s, p)
        assert int(a) + 40 == int(b)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICE)
def test_an_empty_batch_changes_nothing(backend, device):
    (count, mean, m2), _ = running_tables(5, 3, torch.float32, device, seed=39, shift=0.0)
    before = [t.clone() for t in (count, mean, m2)]
    skipped = on(backend, dirfast.ops.accumulate_bin_stats_, count, mean, m2, torch.zeros(0, 3, device=device),
                 torch.zeros(0, dtype=torch.long, device=device))
    assert int(skipped) == 0
    for table, old in zip((count, mean, m2), before):
        same_bits(table, old)


def test_tables_that_share_memory_are_refused():
    """mean and m2 (or count) must be tensors of their own: overlapping views are a ValueError
    naming both, and nothing is written."""
    x, idx = torch.randn(6, 2), torch.tensor([0, 1, 1, 2, 0, 1])
    count = torch.zeros(3, dtype=torch.float64)
    both = torch.zeros(3, 3)
    for mean, m2 in ((both[:, :2], both[:, 1:]), (both[:, :2], both[:, :2])):
        with pytest.raises(ValueError, match="mean and m2 share memory"):
            dirfast.ops.accumulate_bin_stats_(count, mean, m2, x, idx)
        assert not both.any() and not count.any()
    apart = torch.zeros(3, 2), torch.zeros(3, 2)
    dirfast.ops.accumulate_bin_stats_(count, *apart, x, idx)
    assert count.tolist() == [2.0, 3.0, 1.0]
