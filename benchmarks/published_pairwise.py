"""The published pairwise regularisers, written out from ``SPEC.md`` ("The pairwise
regularisers") as the oracle of the parity tests and the baseline of ``benchmarks.pairwise``.

Their code is CC BY-NC-SA 4.0 (ConR, RankSim) or carries no licence (Rank-N-Contrast), so
nothing here is copied from it: each function is the SPEC's description of what the published
code computes, in the published *formulation* (the same tensors, loops and host reads), so that
its time and memory are those of the published code. Do not vectorise anything here.

Two choices the SPEC leaves open: RankSim's ``torch.argsort`` calls are made with ``stable=True``
(the AgeDB-DIR one is not stable: between tied values its result is unspecified; the STS-B-DIR
code sorts stably, the order dirfast documents); RankSim's subsample is drawn with
Python's ``random`` as published, so a test compares on batches of unique labels (no draw).
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F


# ------------------------------------------------------------------------------ Rank-N-Contrast
def rnc_loss(features, labels, temperature=2.0):
    """RnCLoss(temperature, label_diff="l1", feature_sim="l2").forward: features [bs, 2, D] (two
    views), labels [bs, label_dim]. Builds the [n, n, D] difference tensor and loops over the
    n - 1 positives with an [n, n - 1] mask each (O(n^3) time)."""
    features = torch.cat([features[:, 0], features[:, 1]], dim=0)  # [n, D], n = 2 bs
    labels = labels.repeat(2, 1)                                      # [n, label_dim]
    label_diffs = torch.abs(labels[:, None, :] - labels[None, :, :]).sum(dim=-1)
    logits = -(features[:, None, :] - features[None, :, :]).norm(2, dim=-1) / temperature
    logits_max, _ = torch.max(logits, dim=1, keepdim=True)
    logits = logits - logits_max.detach()
    exp_logits = logits.exp()
    n = logits.shape[0]
    off_diagonal = (1 - torch.eye(n, device=logits.device)).bool()
    logits = logits.masked_select(off_diagonal).view(n, n - 1)
    exp_logits = exp_logits.masked_select(off_diagonal).view(n, n - 1)
    label_diffs = label_diffs.masked_select(off_diagonal).view(n, n - 1)
    loss = 0.0
    for k in range(n - 1):
        pos_logits = logits[:, k]
        pos_label_diffs = label_diffs[:, k]
        neg_mask = (label_diffs >= pos_label_diffs.view(-1, 1)).float()
        pos_log_probs = pos_logits - torch.log((neg_mask * exp_logits).sum(dim=-1))
        loss = loss - (pos_log_probs / (n * (n - 1))).sum()
    return loss


# ------------------------------------------------------------------------------ ConR
def conr_loss(features, targets, preds, w=1, weights=1, t=0.2, e=0.01):
    """The AgeDB-DIR ConR: features [N, D], targets and detached preds [N, 1], weights [N, 1] or 1.
    Its first line overwrites ``t`` with 0.07 (the IMDB-WIKI-DIR function, :func:`conr_loss_imdb`,
    keeps it). The positive sum masks non-positives to 0 before exp: each adds exp(0) = 1."""
    t = 0.07
    return _conr(features, targets, preds, w, weights, t, e)


def conr_loss_imdb(features, targets, preds, w=1, weights=1, t=0.07, e=0.01):
    """The IMDB-WIKI-DIR ConR: as :func:`conr_loss`, with ``tau = t``."""
    return _conr(features, targets, preds, w, weights, t, e)


def _conr(features, targets, preds, w, weights, t, e):
    q = F.normalize(features, dim=1)
    k = F.normalize(features, dim=1)
    l_dist = torch.abs(targets - targets.flatten()[None, :])
    p_dist = torch.abs(preds - preds.flatten()[None, :])
    pos_i = l_dist.le(w)
    neg_i = (~l_dist.le(w)) * p_dist.le(w)
    for i in range(pos_i.shape[0]):
        pos_i[i][i] = 0
    prod = torch.einsum("nc,kc->nk", [q, k]) / t
    pos = prod * pos_i
    neg = prod * neg_i
    pushing_w = weights * torch.exp(l_dist * e)
    neg_exp_dot = (pushing_w * torch.exp(neg) * neg_i).sum(1)
    no_neg_flag = neg_i.sum(1).bool()
    denom = pos_i.sum(1)
    loss = ((-torch.log(torch.div(torch.exp(pos), torch.exp(pos).sum(1).unsqueeze(-1) + neg_exp_dot.unsqueeze(-1)))
             * pos_i).sum(1) / denom)
    return (weights * (loss * no_neg_flag).unsqueeze(-1)).mean()


def conr_loss_nyud2(feature, depth, output, weights, w=0.2, t=0.07, e=0.2):
    """The NYUD2-DIR ConR: one sample per image (label the mean depth, prediction the mean
    output, weight the mean weight), tau = t, a linear pushing weight ``l * weights * e``, a
    divisor that counts the anchor itself, and an unweighted mean."""
    n = feature.shape[0]
    targets = depth.reshape(n, -1).mean(1, keepdim=True)
    preds = output.reshape(n, -1).mean(1, keepdim=True)
    weights = weights.reshape(n, -1).mean(1, keepdim=True)
    q = F.normalize(feature.reshape(n, -1), dim=1)
    l_dist = torch.abs(targets - targets.flatten()[None, :])
    p_dist = torch.abs(preds - preds.flatten()[None, :])
    pos_i = l_dist.le(w)
    neg_i = (~l_dist.le(w)) * p_dist.le(w)
    denom = pos_i.sum(1)  # before the anchor is taken out: it counts itself
    for i in range(n):
        pos_i[i][i] = 0
    prod = torch.einsum("nc,kc->nk", [q, q]) / t
    pos = prod * pos_i
    neg = prod * neg_i
    pushing_w = l_dist * weights * e
    neg_exp_dot = (pushing_w * torch.exp(neg) * neg_i).sum(1)
    no_neg_flag = neg_i.sum(1).bool()
    loss = ((-torch.log(torch.div(torch.exp(pos), torch.exp(pos).sum(1).unsqueeze(-1) + neg_exp_dot.unsqueeze(-1)))
             * pos_i).sum(1) / denom)
    return (loss * no_neg_flag).mean()


# ------------------------------------------------------------------------------ RankSim
def rank(seq):
    """0-based position of each entry of each row when sorted in descending order: the published
    ``argsort(argsort(seq).flip(1))`` with stable sorts (ties: the later entry first)."""
    return torch.argsort(torch.argsort(seq, stable=True).flip(1), stable=True)


def rank_normalised(seq):
    return (rank(seq) + 1).float() / seq.size()[1]


class TrueRanker(torch.autograd.Function):
    """The feature ranks with the blackbox backward of Vlastelica et al. (2020)."""

    @staticmethod
    def forward(ctx, sequence, lambda_val):
        ranks = rank_normalised(sequence)
        ctx.lambda_val = lambda_val
        ctx.save_for_backward(sequence, ranks)
        return ranks

    @staticmethod
    def backward(ctx, grad_output):
        sequence, ranks = ctx.saved_tensors
        sequence_prime = sequence + ctx.lambda_val * grad_output
        ranks_prime = rank_normalised(sequence_prime)
        return -(ranks - ranks_prime) / (ctx.lambda_val + 1e-8), None


def ranksim_loss(features, targets, lambda_val):
    """batchwise_ranking_regularizer: one random sample per distinct label when a label repeats
    (``random.choice``, one host read per label), then a Python loop over the rows of the cosine
    similarity matrix. Returns the SUM over rows of each row's rank MSE."""
    loss = 0
    unique = torch.unique(targets)
    if len(unique) < len(targets):
        picked = [random.choice((targets == target).nonzero()[:, 0]).item() for target in unique]
        x, y = features[picked], targets[picked]
    else:
        x, y = features, targets
    xn = F.normalize(x.view(x.size(0), -1))
    xxt = torch.matmul(xn, xn.permute(1, 0))
    for i in range(len(y)):
        label_ranks = rank_normalised(-torch.abs(y[i] - y).transpose(0, 1))
        feature_ranks = TrueRanker.apply(xxt[i].unsqueeze(dim=0), lambda_val)
        loss += F.mse_loss(feature_ranks, label_ranks)
    return loss
