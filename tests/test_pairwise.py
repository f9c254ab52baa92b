"""The pairwise regularisers of ``dirfast.losses`` (Rank-N-Contrast, ConR, RankSim) against the
published functions as SPEC.md describes them (``benchmarks/published_pairwise.py``), in float64:
values and gradients; one and several label dimensions, ties in label distance, two-view
batches, unique-label batches; where dirfast departs from the published code (a sample
without positives, RankSim's subsample drawn on the device); torch.compile; and the pairs of
every rank under torch.distributed (``all_ranks``).

What each op computes on each backend is in tests/test_<op>.py; bad arguments in
test_bad_inputs.py.
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import dirfast
from benchmarks import published_pairwise as published
from dirfast.losses import ConRLoss, RankSimLoss, RnCLoss, conr_loss, ranksim_loss, rnc_loss
from testing import DEVICES, gen

F64 = dict(rtol=1e-9, atol=1e-11)


def _grad(fn, x):
    x = x.detach().clone().requires_grad_()
    value = fn(x)
    value.backward()
    return value.detach(), x.grad


def assert_same_loss(ours, theirs, x, **tol):
    """``ours(x)`` and ``theirs(x)`` agree in value and in their gradient in ``x``."""
    value, grad = _grad(ours, x)
    expected, expected_grad = _grad(theirs, x)
    torch.testing.assert_close(value, expected.to(value.dtype), **(tol or F64))
    torch.testing.assert_close(grad, expected_grad, **(tol or F64))


# =========================================================================== Rank-N-Contrast
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("label_dim, integer", [(1, True), (1, False), (3, True), (2, False)],
                         ids=["ties", "continuous", "3-d ties", "2-d"])
def test_rnc_matches_published(device, label_dim, integer):
    g = gen(1)
    bs, d = 9, 5
    features = torch.randn(bs, 2, d, generator=g, dtype=torch.float64).to(device)
    labels = (torch.randint(0, 4, (bs, label_dim), generator=g).double() if integer
              else torch.rand(bs, label_dim, generator=g, dtype=torch.float64)).to(device)
    for temperature in (2.0, 0.3):
        assert_same_loss(lambda f: rnc_loss(f, labels, temperature),
                         lambda f: published.rnc_loss(f, labels, temperature), features)
    assert_same_loss(lambda f: RnCLoss(temperature=2)(f, labels), lambda f: published.rnc_loss(f, labels, 2), features)


def test_rnc_identical_views_get_the_published_gradient():
    """Two identical views: a zero distance, whose gradient is 0 as torch's norm gives it."""
    g = gen(2)
    one = torch.randn(6, 1, 4, generator=g, dtype=torch.float64)
    features = torch.cat([one, one], 1)
    labels = torch.tensor([[1.0], [2.0], [2.0], [3.0], [5.0], [1.0]], dtype=torch.float64)
    assert_same_loss(lambda f: rnc_loss(f, labels), lambda f: published.rnc_loss(f, labels), features)


def test_rnc_integer_labels_and_one_dimensional_labels():
    g = gen(3)
    features = torch.randn(7, 2, 3, generator=g, dtype=torch.float64)
    ages = torch.randint(0, 5, (7,), generator=g)
    expected = published.rnc_loss(features, ages.double()[:, None])
    torch.testing.assert_close(rnc_loss(features, ages), expected, **F64)
    torch.testing.assert_close(rnc_loss(features, ages.double()), expected, **F64)


# =========================================================================== ConR
def _conr_batch(bs=10, d=6, seed=4, label_dim=1, device="cpu"):
    """Two views of ``bs`` samples, concatenated as training passes them: each sample's views are
    positives of each other; integer labels (ties) and close predictions (negatives)."""
    g = gen(seed)
    features = torch.randn(2 * bs, d, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 6, (bs, label_dim), generator=g).double()
    preds = labels + torch.randn(bs, label_dim, generator=g, dtype=torch.float64) * 2
    weights = torch.rand(bs, 1, generator=g, dtype=torch.float64) + 0.5
    two = lambda t: torch.cat([t, t]).to(device)  # noqa: E731
    return features.to(device), two(labels), two(preds), two(weights)


@pytest.mark.parametrize("device", DEVICES)
def test_conr_matches_published_agedb_and_imdb(device):
    features, targets, preds, weights = _conr_batch(device=device)
    for w, e in ((1.0, 0.01), (2.0, 0.3)):
        # AgeDB-DIR: the published function uses tau = 0.07 whatever t it is given
        assert_same_loss(lambda f: conr_loss(f, targets, preds, w, weights, 0.07, e),
                         lambda f: published.conr_loss(f, targets, preds, w, weights, 0.2, e), features)
        assert_same_loss(lambda f: conr_loss(f, targets, preds, w, weights, 0.5, e),
                         lambda f: published.conr_loss_imdb(f, targets, preds, w, weights, 0.5, e), features)
    assert_same_loss(lambda f: conr_loss(f, targets, preds),  # weights 1, the published default
                     lambda f: published.conr_loss(f, targets, preds), features)
    assert_same_loss(lambda f: ConRLoss()(f, targets, preds, weights),
                     lambda f: published.conr_loss(f, targets, preds, weights=weights), features)


def test_conr_several_label_dimensions_use_the_l1_distance():
    """[N, L] targets: the published 1-D function applied to the L1 distance is what we compute;
    checked by a 2-D batch whose second dimension is constant (the same distances as 1-D)."""
    features, targets, preds, weights = _conr_batch(seed=5)
    flat = conr_loss(features, targets, preds, 1.0, weights)
    padded = conr_loss(features, torch.cat([targets, torch.ones_like(targets)], 1),
                       torch.cat([preds, torch.ones_like(preds)], 1), 1.0, weights)
    torch.testing.assert_close(padded, flat, **F64)


def test_conr_paper_form_drops_the_exp0_terms():
    """The paper's form: the positive sum over positives only (the published one adds 1 for each
    non-positive). Written out here per anchor."""
    features, targets, preds, weights = _conr_batch(seed=6)
    w, t, e = 1.0, 0.2, 0.05
    q = torch.nn.functional.normalize(features, dim=1)
    prod = q @ q.T / t
    total = 0.0
    n = features.shape[0]
    for i in range(n):
        l_dist, p_dist = (targets[i] - targets[:, 0]).abs(), (preds[i] - preds[:, 0]).abs()
        pos = [j for j in range(n) if j != i and l_dist[j] <= w]
        neg = [j for j in range(n) if l_dist[j] > w and p_dist[j] <= w]
        if not neg or not pos:
            continue
        denominator = sum(torch.exp(prod[i, j]) for j in pos) + sum(
            weights[i, 0] * torch.exp(e * l_dist[j]) * torch.exp(prod[i, j]) for j in neg)
        total = total + weights[i, 0] * -sum(prod[i, j] - torch.log(denominator) for j in pos) / len(pos)
    torch.testing.assert_close(conr_loss(features, targets, preds, w, weights, t, e, form="paper"), total / n, **F64)


@pytest.mark.parametrize("form", ["published", "nyud2"])
def test_conr_gradient_is_the_features_only(form):
    """Targets, predictions and weights that require grad get none (constants, documented), not
    the part of one that the outer ``weights_i * loss_i`` factor alone would give."""
    features, targets, preds, weights = _conr_batch()
    targets, weights = targets.clone().requires_grad_(), weights.clone().requires_grad_()
    leaf = features.clone().requires_grad_()
    conr_loss(leaf, targets, preds, 1.0, weights, 0.07, 0.2, form=form).backward()
    assert leaf.grad is not None and bool(leaf.grad.abs().sum() > 0)
    assert targets.grad is None and weights.grad is None


def test_conr_matches_published_nyud2():
    """Per-image labels, predictions and weights from depth maps; linear pushing; the anchor in the divisor."""
    g = gen(7)
    b = 8
    features = torch.randn(b, 3, 2, 2, generator=g, dtype=torch.float64)
    depth = torch.rand(b, 1, 4, 5, generator=g, dtype=torch.float64) * 2
    depth[b // 2:] = depth[:b // 2]  # every image has a positive partner
    output = depth + torch.randn(b, 1, 4, 5, generator=g, dtype=torch.float64) * 0.3
    weights = torch.rand(b, 1, 4, 5, generator=g, dtype=torch.float64) + 0.5
    assert_same_loss(lambda f: conr_loss(f, depth, output, 0.2, weights, 0.07, 0.2, form="nyud2"),
                     lambda f: published.conr_loss_nyud2(f, depth, output, weights), features)
    assert_same_loss(lambda f: dirfast.presets.NYUD2_DIR.conr()(f, depth, output, weights),
                     lambda f: published.conr_loss_nyud2(f, depth, output, weights, t=0.2), features)  # train.py's t


def test_conr_nyud2_refuses_empty_maps():
    """NYUD2's per-image maps are averaged: a map of no values has a NaN mean, which paired with
    nothing (loss 0) or made the loss NaN (weights). Each is refused, naming its argument."""
    features = torch.randn(4, 3, generator=gen(7), dtype=torch.float64)
    maps = torch.rand(4, 1, 2, 2, generator=gen(8), dtype=torch.float64)
    assert torch.isfinite(conr_loss(features, maps, maps, weights=maps, form="nyud2"))
    for name, empty in (("targets", torch.ones(4, 0)), ("preds", torch.ones(4, 1, 0, 2)),
                        ("weights", torch.ones(4, 0))):
        args = dict(targets=maps, preds=maps, weights=maps, form="nyud2")
        args[name] = empty.double()
        with pytest.raises(ValueError, match=f"{name} must not be empty"):
            conr_loss(features, **args)
        with pytest.raises(ValueError, match=f"{name} must not be empty"):
            ConRLoss(form="nyud2")(features, args["targets"], args["preds"], args["weights"])
    assert torch.isfinite(conr_loss(features, maps[:, 0, 0, 0], maps[:, 0, 0, 0], form="nyud2"))  # [N]: one value each


def test_conr_sample_without_positives_adds_zero():
    """The published code divides 0 by 0 (NaN) for an anchor with no positive; dirfast adds 0.
    A lonely sample far from every other in label and prediction is nobody's partner, so in the
    paper's form (no exp(0) terms, which count the batch) the others' losses are unchanged."""
    features, targets, preds, weights = _conr_batch(bs=6, seed=8)
    lonely_features = torch.cat([features, torch.randn(1, features.shape[1], generator=gen(9), dtype=torch.float64)])
    lonely = lambda t, v: torch.cat([t, torch.full((1, 1), v, dtype=t.dtype)])  # noqa: E731
    args = (lonely_features, lonely(targets, 100.0), lonely(preds, 1000.0), 1.0, lonely(weights, 1.0))
    assert torch.isnan(published.conr_loss(*args))
    got = conr_loss(*args)
    assert torch.isfinite(got)
    per_anchor = dirfast.ops.conr_loss(args[0], args[1], args[2], args[4][:, 0])
    assert per_anchor[-1] == 0 and torch.isfinite(per_anchor).all()
    n = features.shape[0]
    torch.testing.assert_close(conr_loss(*args, form="paper"),
                               conr_loss(features, targets, preds, 1.0, weights, form="paper") * n / (n + 1), **F64)


def test_scalars_must_be_finite_in_the_dtype_of_the_loss():
    """``t`` (and ``1/t``), ``e``, a number ``weights`` and RnC's ``temperature`` must be finite in
    the dtype the loss is computed in: refused on float32 inputs, computed on float64 ones. A
    module refuses at construction what float64 cannot hold, at forward what the batch's dtype
    cannot, as the function does."""
    features, targets, preds, weights = _conr_batch(bs=4, seed=5)
    views, labels = features.reshape(4, 2, -1), targets[:4, 0]
    for kwargs in ({"t": 1e-40}, {"e": 1e39}, {"weights": 1e39}):
        name = next(iter(kwargs))
        with pytest.raises(ValueError, match=f"{name} must be .*float32"):
            conr_loss(features.float(), targets.float(), preds.float(), **kwargs)
        assert torch.isfinite(conr_loss(features, targets, preds, **kwargs))
    with pytest.raises(ValueError, match="temperature must be .*float32"):
        rnc_loss(views.float(), labels.float(), 1e-39)
    assert torch.isfinite(rnc_loss(views, labels, 1e-39))
    module = RnCLoss(temperature=1e-39)  # float64 holds it
    with pytest.raises(ValueError, match="temperature"):
        module(views.float(), labels.float())
    torch.testing.assert_close(module(views, labels), rnc_loss(views, labels, 1e-39), **F64)
    with pytest.raises(ValueError, match="lambda_val must be .*float32"):
        ranksim_loss(features.float(), targets.float(), 1e39)
    assert torch.isfinite(ranksim_loss(features, targets, 1e39))


def test_conr_linear_push_needs_a_non_negative_e():
    """The NYUD2 form pushes with ``weights_i * e * l_ij``: a negative ``e`` would make the sum in
    the log negative (NaN), so it is refused; the exp push takes any finite ``e``."""
    features, targets, preds, _ = _conr_batch(bs=4, seed=6)
    with pytest.raises(ValueError, match="e must be >= 0"):
        conr_loss(features, targets, preds, e=-0.01, form="nyud2")
    with pytest.raises(ValueError, match="e must be >= 0"):
        ConRLoss(e=-0.01, form="nyud2")
    assert torch.isfinite(conr_loss(features, targets, preds, e=-0.01, form="published"))
    assert ConRLoss(e=-0.01, form="paper").e == -0.01


# =========================================================================== RankSim
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lambda_val", [2.0, 0.5])
def test_ranksim_matches_published_on_unique_labels(device, lambda_val):
    """Unique labels (no subsample): values and the blackbox gradient, ties in label distance
    (labels at equal distance on either side) ranked as the published ranking with a stable sort
    ranks them (the later first)."""
    g = gen(10)
    m = 12
    features = torch.randn(m, 7, generator=g, dtype=torch.float64).to(device)
    targets = torch.randperm(40, generator=g)[:m].double()[:, None].to(device)
    assert_same_loss(lambda f: ranksim_loss(f, targets, lambda_val),
                     lambda f: published.ranksim_loss(f, targets, lambda_val), features, rtol=1e-6, atol=1e-7)
    assert_same_loss(lambda f: RankSimLoss(lambda_val)(f, targets),
                     lambda f: published.ranksim_loss(f, targets, lambda_val), features, rtol=1e-6, atol=1e-7)


def test_ranksim_subsample_keeps_one_row_per_label_reproducibly():
    """With repeated labels the loss is the published loss on one row per label in label order
    (ties between labels at equal distance ranked as there), the row drawn from ``generator``: the
    same seed, the same rows; other seeds, other rows."""
    g = gen(11)
    features = torch.randn(20, 5, generator=g, dtype=torch.float64)
    targets = torch.randint(0, 6, (20, 1), generator=g).double()
    kept = set()
    for seed in range(8):
        keep = dirfast.pairwise._one_per_label(targets, torch.Generator().manual_seed(seed))
        assert sorted(targets[keep, 0].tolist()) == sorted(set(targets[:, 0].tolist()))
        kept.add(tuple(keep.tolist()))
        value = ranksim_loss(features, targets, 2.0, torch.Generator().manual_seed(seed))
        rows = keep.nonzero()[:, 0]
        rows = rows[torch.sort(targets[rows, 0]).indices]  # the published subset lists them by label
        torch.testing.assert_close(value, published.ranksim_loss(features[rows], targets[rows], 2.0).double(),
                                   rtol=1e-6, atol=1e-7)
        again = ranksim_loss(features, targets, 2.0, torch.Generator().manual_seed(seed))
        assert torch.equal(value, again)
    assert len(kept) > 1


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # torch.func.jvp's own
def test_ranksim_refused_derivative_draws_nothing():
    """A call refused for a derivative the op has not (forward mode, torch.func's transforms)
    changes nothing: it draws no subsample, from ``generator`` nor from torch's default one,
    and names the function called. The draw came first, so the error left both advanced."""
    features, targets = torch.randn(8, 4, generator=gen(12)), torch.tensor([1.0, 1, 2, 2, 3, 3, 4, 4])
    calls = {"jvp": lambda f: torch.func.jvp(f, (features,), (torch.ones_like(features),)),
             "grad": lambda f: torch.func.grad(f)(features)}
    for name, call in calls.items():
        for generator in (None, torch.Generator().manual_seed(3)):
            default, own = torch.get_rng_state(), None if generator is None else generator.get_state()
            with pytest.raises(NotImplementedError, match="dirfast.losses.ranksim_loss"):
                call(lambda f: ranksim_loss(f, targets, generator=generator))
            assert torch.equal(torch.get_rng_state(), default), name
            assert generator is None or torch.equal(generator.get_state(), own), name


# =========================================================================== torch.compile
def test_losses_compile_fullgraph():
    """No host read in any of the three (a graph break would fail fullgraph)."""
    features, targets, preds, weights = _conr_batch(bs=5, seed=12)
    features = features.float().requires_grad_()
    targets, preds, weights = targets.float(), preds.float(), weights.float()

    def total(f):
        views = f.reshape(2, 5, -1).transpose(0, 1)
        return (rnc_loss(views, targets[:5]) + conr_loss(f, targets, preds, 1.0, weights)
                + ranksim_loss(f, targets))

    torch._dynamo.reset()
    compiled = torch.compile(total, fullgraph=True, backend="aot_eager")
    torch.manual_seed(0)  # the same draw of RankSim's subsample in both
    value = compiled(features)
    grad = torch.autograd.grad(value, features)[0]
    torch.manual_seed(0)
    expected = total(features)
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, torch.autograd.grad(expected, features)[0], rtol=1e-5, atol=1e-6)


# =========================================================================== all_ranks
WORLD, LOCAL = 2, 6


def _ddp_batch():
    g = gen(13)
    features = torch.randn(WORLD * LOCAL, 2, 4, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 5, (WORLD * LOCAL, 1), generator=g).double()
    preds = labels + torch.randn(WORLD * LOCAL, 1, generator=g, dtype=torch.float64)
    return features, labels, preds


def _ddp_worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        features, labels, preds = _ddp_batch()
        rows = slice(rank * LOCAL, (rank + 1) * LOCAL)
        result = {}
        for name, fn in _DDP_LOSSES.items():
            local = features[rows].clone().requires_grad_()
            loss = fn(local, labels[rows], preds[rows], True)
            loss.backward()
            result[name] = (loss.detach(), local.grad)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


_DDP_LOSSES = {
    "rnc": lambda f, y, p, all_ranks: rnc_loss(f, y, all_ranks=all_ranks),
    "conr": lambda f, y, p, all_ranks: conr_loss(f[:, 0], y, p, all_ranks=all_ranks),
    "ranksim": lambda f, y, p, all_ranks: ranksim_loss(f[:, 0], y, generator=torch.Generator().manual_seed(5),
                                                       all_ranks=all_ranks),
}


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo "
                    "is not available")
def test_all_ranks_pairs_span_the_global_batch():
    """Each rank's loss is its own rows as anchors against every rank's rows as keys, and its
    gradient flows through its own rows: as one process computing that on the whole batch."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_ddp_worker, args=(os.path.join(out_dir, "init"), out_dir), nprocs=WORLD, join=True)
        ranks = [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(WORLD)]
    features, labels, preds = _ddp_batch()
    for rank in range(WORLD):
        rows = slice(rank * LOCAL, (rank + 1) * LOCAL)
        local = features[rows].clone().requires_grad_()
        whole = torch.cat([features[:rows.start], local, features[rows.stop:]])
        # the single-process equivalents, through the ops with this rank's rows as anchors
        z = whole.transpose(0, 1)  # keys in rank order, each rank's two views stacked
        keys = torch.cat([z[:, r * LOCAL:(r + 1) * LOCAL].reshape(2 * LOCAL, -1) for r in range(WORLD)])
        key_labels = torch.cat([labels[r * LOCAL:(r + 1) * LOCAL].repeat(2, 1) for r in range(WORLD)])
        # RankSim: every rank draws its rows' priorities from its own generator (seeded alike
        # here), and all ranks keep the same global subset
        priority = torch.rand(LOCAL, generator=torch.Generator().manual_seed(5), dtype=torch.float64).repeat(WORLD)
        keep = dirfast.pairwise._highest_priority(labels, priority)
        expected = {
            "rnc": dirfast.ops.rnc_loss(keys, key_labels, 2.0, 2 * LOCAL * rank, 2 * LOCAL).mean(),
            "conr": (dirfast.ops.conr_loss(whole[:, 0], labels, preds, torch.ones(WORLD * LOCAL, dtype=torch.float64),
                                           offset=LOCAL * rank, count=LOCAL)).mean(),
            "ranksim": dirfast.ops.ranksim_loss(whole[:, 0], labels, keep, 2.0, LOCAL * rank, LOCAL).sum(),
        }
        for name, value in expected.items():
            grad = torch.autograd.grad(value, local)[0]
            torch.testing.assert_close(ranks[rank][name][0], value.detach(), **F64, msg=name)
            torch.testing.assert_close(ranks[rank][name][1], grad, **F64, msg=name)
            alone = _DDP_LOSSES[name](features[rows], labels[rows], preds[rows], False)
            assert not torch.allclose(alone, value.detach()), f"{name}: the gather changed nothing"
