"""The published pairwise regularisers as SPEC.md describes them ("The pairwise regularisers"):
the oracle of the parity tests and the baseline of ``benchmarks.pairwise``.

Their code is CC BY-NC-SA 4.0 (ConR, RankSim) or carries no licence (Rank-N-Contrast), so none
of it is here: each function is written from the SPEC's equations, in the published
*formulation* the SPEC describes (the same tensor sizes, Python loops and host reads), so that
its time and memory are those of the published code. Do not vectorise anything here.

Two choices the SPEC leaves open: RankSim's ranks break ties as the published double argsort
does with stable sorts (the later of two tied entries ranks first; the AgeDB-DIR code's sort is
not stable, the STS-B-DIR code's is, the order dirfast documents); RankSim's subsample is drawn
with Python's ``random`` as published, so a test compares on batches of unique labels (no draw).
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F


# ------------------------------------------------------------------------------ Rank-N-Contrast
def rnc_loss(features, labels, temperature=2.0):
    """RnC with L1 label distances and negative L2 feature distances: features [bs, 2, D] (two
    views, stacked view by view into n = 2 bs rows), labels [bs, label_dim] (repeated). Builds
    the [n, n, D] difference tensor, then one [n, n - 1] mask per positive column (O(n^3))."""
    bs = features.shape[0]
    rows = features.transpose(0, 1).reshape(2 * bs, -1)
    targets = labels.repeat(2, 1)
    n = rows.shape[0]
    label_distance = (targets[:, None, :] - targets[None, :, :]).abs().sum(-1)
    similarity = -(rows[:, None, :] - rows[None, :, :]).norm(2, dim=-1) / temperature
    similarity = similarity - similarity.max(dim=1, keepdim=True).values.detach()  # the value is unchanged
    others = ~torch.eye(n, dtype=torch.bool, device=rows.device)
    similarity = similarity[others].reshape(n, n - 1)
    label_distance = label_distance[others].reshape(n, n - 1)
    exp_similarity = similarity.exp()
    total = 0.0
    for column in range(n - 1):
        # S_ij: every k != i at least as far from i in label as j (j itself included); a float
        # mask, as published, which autograd keeps for every column
        at_least_as_far = (label_distance >= label_distance[:, column:column + 1]).float()
        log_denominator = (exp_similarity * at_least_as_far).sum(-1).log()
        total = total + (similarity[:, column] - log_denominator).sum()
    return -total / (n * (n - 1))


# ------------------------------------------------------------------------------ ConR
def conr_loss(features, targets, preds, w=1, weights=1, t=0.2, e=0.01):
    """The AgeDB-DIR ConR: features [N, D], targets and detached preds [N, 1], weights [N, 1] or 1.
    QUIRK: tau is 0.07 whatever ``t`` is (the IMDB-WIKI-DIR function, :func:`conr_loss_imdb`,
    uses ``t``)."""
    return _conr(features, targets, preds, w, weights, 0.07, e)


def conr_loss_imdb(features, targets, preds, w=1, weights=1, t=0.07, e=0.01):
    """The IMDB-WIKI-DIR ConR: as :func:`conr_loss`, with ``tau = t``."""
    return _conr(features, targets, preds, w, weights, t, e)


def _pairs(targets, preds, w):
    """|y_i - y_j|, and the positive and negative masks of each anchor (row): positives are
    within w in label, the anchor left out one row at a time (a Python loop, as published);
    negatives are beyond w in label and within w in prediction."""
    label_gap = (targets - targets.reshape(1, -1)).abs()
    pred_gap = (preds - preds.reshape(1, -1)).abs()
    near = label_gap <= w
    negative = ~near & (pred_gap <= w)
    positive = near.clone()
    for anchor in range(positive.shape[0]):
        positive[anchor, anchor] = False
    return label_gap, near, positive, negative


def _conr_rows(similarity, positive, negative, push, divisor):
    """loss_i = -1/divisor_i sum_{j in P(i)} (prod_ij - log(pos_i + neg_i)), 0 where Q(i) is
    empty. QUIRK: pos_i sums exp over the whole row with non-positives masked to 0, so each
    adds exp(0) = 1."""
    # As published, the positive exponentials are computed twice (numerator and denominator),
    # which is part of the cost this baseline keeps.
    neg_sum = (push * (similarity * negative).exp() * negative).sum(1)
    denominator = (similarity * positive).exp().sum(1) + neg_sum
    share = (similarity * positive).exp() / denominator[:, None]  # the published softmax form
    per_pair = -share.log() * positive
    return per_pair.sum(1) / divisor * negative.any(1)


def _conr(features, targets, preds, w, weights, tau, e):
    # the queries and keys normalised apart, as published (the same values, twice the cost)
    queries, keys = F.normalize(features, dim=1), F.normalize(features, dim=1)
    similarity = queries @ keys.T / tau
    label_gap, _, positive, negative = _pairs(targets, preds, w)
    push = weights * (label_gap * e).exp()
    loss = _conr_rows(similarity, positive, negative, push, positive.sum(1))
    return (weights * loss[:, None]).mean()


def conr_loss_nyud2(feature, depth, output, weights, w=0.2, t=0.07, e=0.2):
    """The NYUD2-DIR ConR: one sample per image (label the mean depth, prediction the mean
    output, weight the mean weight), tau = t, a linear pushing weight ``l * weights * e``, a
    divisor that counts the anchor itself, and an unweighted mean."""
    def per_image(maps):
        return maps.flatten(1).mean(dim=1).unsqueeze(1)

    targets, preds, image_weights = per_image(depth), per_image(output), per_image(weights)
    unit = F.normalize(feature.flatten(1), dim=1)
    similarity = unit @ unit.T / t
    label_gap, near, positive, negative = _pairs(targets, preds, w)
    loss = _conr_rows(similarity, positive, negative, label_gap * image_weights * e, near.sum(1))
    return loss.mean()


# ------------------------------------------------------------------------------ RankSim
def descending_ranks(values):
    """Each entry's 0-based place in its row sorted in descending order, the later of two tied
    entries first: the stable ascending order reversed, inverted by a second sort (as published)."""
    descending = torch.argsort(values, dim=1, stable=True).flip(1)
    return torch.argsort(descending, dim=1, stable=True)


def normalised_ranks(values):
    """(rank + 1) / M over each row of M entries."""
    return (descending_ranks(values) + 1).float() / values.shape[1]


class _BlackboxRanks(torch.autograd.Function):
    """Normalised ranks, differentiated as Vlastelica et al. (2020) do: the gradient is the change
    of the ranks when the input moves by lambda times the incoming gradient, over -lambda."""

    @staticmethod
    def forward(ctx, values, lambda_val):
        ranks = normalised_ranks(values)
        ctx.save_for_backward(values, ranks)
        ctx.lambda_val = lambda_val
        return ranks

    @staticmethod
    def backward(ctx, grad_ranks):
        values, ranks = ctx.saved_tensors
        moved = normalised_ranks(values + ctx.lambda_val * grad_ranks)
        return (moved - ranks) / (ctx.lambda_val + 1e-8), None


def ranksim_loss(features, targets, lambda_val):
    """RankSim: where a label repeats, one row per distinct label drawn with ``random.choice``
    (one host read per label); then, a row at a time in Python, the MSE between the normalised
    ranks of the row's cosine similarities and of its negated label distances. Returns the SUM
    over rows."""
    labels = torch.unique(targets)
    if len(labels) < len(targets):
        kept = [random.choice((targets == label).nonzero()[:, 0]).item() for label in labels]
        features, targets = features[kept], targets[kept]
    unit = F.normalize(features.reshape(features.shape[0], -1))
    cosine = unit @ unit.T
    total = 0
    for row in range(len(targets)):
        label_ranks = normalised_ranks(-(targets[row] - targets).abs().T)
        feature_ranks = _BlackboxRanks.apply(cosine[row:row + 1], lambda_val)
        total = total + F.mse_loss(feature_ranks, label_ranks)
    return total
