"""The pairwise regularisers added to DIR training: Rank-N-Contrast, ConR and RankSim, on the
fused ops ``dirfast.ops.rnc_loss``, ``conr_loss`` and ``ranksim_loss``.

Each function takes the published arguments and gives the published value (SPEC.md, "The
pairwise regularisers"); where dirfast departs from the published code it says so: a sample
with no positive partner adds 0 (the published ConR divides 0 by 0), RankSim breaks ties in
index order (the published ``argsort`` is not stable) and draws its one-sample-per-label subset
on the device from ``generator`` (the published code reads every label on the host).

``all_ranks=True`` (off by default, as published) makes the pairs span the global batch under
``torch.distributed``: the keys are gathered from every rank, the anchors are this rank's rows,
and the gradient flows through this rank's rows only (as BMC's ``all_ranks``).

Implemented from the papers and SPEC.md: the published code of these losses is not MIT
(CC BY-NC-SA 4.0, or no licence) and none of it is copied here.
"""

from __future__ import annotations

import torch
from torch import nn

from . import _validate as validate
from . import distributed, ops
from ._types import ProcessGroup

__all__ = ["rnc_loss", "conr_loss", "ranksim_loss", "RnCLoss", "ConRLoss", "RankSimLoss", "CONR_FORMS"]

# ConR's forms: the published AgeDB-DIR / IMDB-WIKI-DIR function, the paper's equation, and the
# published NYUD2-DIR function. (push, exp(0) terms in the positive sum, anchor in the divisor,
# weighted mean, per-image inputs)
CONR_FORMS = {
    "published": ("exp", True, False, True, False),
    "paper": ("exp", False, False, True, False),
    "nyud2": ("linear", True, True, False, True),
}


def _labels(name: str, value, rows: int, device, features_dtype) -> torch.Tensor:
    """Labels of a batch as [rows, L]: a tensor of real numbers, [rows] or [rows, L]; integer
    labels take the arithmetic dtype of the features (the ops take floating labels)."""
    validate.real_tensor(name, validate.tensor(name, value))
    if value.dim() not in (1, 2) or value.shape[0] != rows or (value.dim() == 2 and value.shape[1] == 0):
        raise ValueError(f"{name} must be [{rows}] or [{rows}, L], one label per sample of features (whose first "
                         f"dimension is {rows}), got shape {tuple(value.shape)}")
    if value.device != device:
        raise ValueError(f"{name} is on {value.device} but features are on {device}")
    value = value if value.is_floating_point() else value.to(ops.acc_dtype(features_dtype))
    return value.reshape(rows, -1)


def _features(value, dims: str) -> torch.Tensor:
    """Features of a batch: ``[bs, views, D]`` (``"views"``), ``[N, D]`` (``"rows"``) or ``[N, *]``
    (``"flat"``), floating, with at least one sample, not on the meta device."""
    validate.floating("features", value)
    shapes = {"views": (value.dim() == 3, "[bs, views, D] (the published two views: [bs, 2, D])"),
              "rows": (value.dim() == 2, "[N, D]"), "flat": (value.dim() >= 2, "[N, D] or [N, *] (flattened per sample)")}
    right, expected = shapes[dims]
    if not right:
        raise ValueError(f"features must be {expected}, got shape {tuple(value.shape)}")
    if value.shape[0] == 0:
        raise ValueError("features must hold at least one sample")
    if value.is_meta:
        raise ValueError("features is on the meta device, which holds no values to read")
    return value


def _keys(local: torch.Tensor, all_ranks: bool, process_group) -> tuple:
    """(keys, offset): the rows every anchor is paired with, and where this rank's rows start in
    them. With ``all_ranks`` under torch.distributed, every rank's rows in rank order, this rank's
    slice being ``local`` itself (so its gradient flows); else ``local``."""
    if not (all_ranks and distributed.is_distributed(process_group)):
        return local, 0
    gathered, first = distributed.all_gather_rows(local, process_group)
    return torch.cat([gathered[:first], local, gathered[first + local.shape[0]:]]), first


# ------------------------------------------------------------------------------ Rank-N-Contrast
def rnc_loss(features: torch.Tensor, labels: torch.Tensor, temperature: float = 2.0, *, all_ranks: bool = False,
             process_group: ProcessGroup | None = None) -> torch.Tensor:
    """Rank-N-Contrast (Zha et al., NeurIPS 2023): ``RnCLoss(temperature)(features, labels)``.

    Args:
        features: ``[bs, 2, D]``, two augmented views of each sample (any number of views
            works: they are stacked, ``n = views * bs`` rows).
        labels: ``[bs]`` or ``[bs, label_dim]``; the label distance is L1.
        temperature: of the logits ``-||z_i - z_j|| / temperature``; a normal number in the
            dtype the loss is computed in (float32, float64 for float64 inputs), so that it and
            ``1 / temperature`` are finite there: ``temperature >= 1.18e-38`` in float32.
        all_ranks: pair this rank's rows with the rows of every rank (torch.distributed).

    Returns the mean over anchors ``i`` and partners ``j != i`` of ``-(s_ij - log S_ij)``, where
    ``S_ij`` sums ``exp(s_ik)`` over every ``k != i`` at least as far from ``i`` in label as ``j``.
    O(n^2 log n) time (a sort per row and a suffix log-sum-exp), O(n^2) memory at most; the
    published code is O(n^3) and builds ``[n, n, D]``.
    """
    features = _features(features, "views")
    temperature = validate.positive("temperature", temperature)
    all_ranks = validate.boolean("all_ranks", all_ranks)
    validate.process_group("process_group", process_group)
    bs, views = features.shape[0], features.shape[1]
    if views == 0:
        raise ValueError("features must hold at least one view: [bs, views, D] with views >= 1")
    y = _labels("labels", labels, bs, features.device, features.dtype)
    validate.in_dtype("temperature", temperature, ops.acc_dtype(features.dtype, y.dtype), reciprocal=True)
    z = features.transpose(0, 1).reshape(views * bs, features.shape[2])  # view 0's rows, then view 1's
    y = y.repeat(views, 1)
    keys, first = _keys(z, all_ranks, process_group)
    key_labels, _ = _keys(y, all_ranks, process_group)
    return ops.rnc_loss(keys, key_labels, temperature, first, z.shape[0]).mean()


class RnCLoss(distributed.SharesProcessGroup, nn.Module):
    """Rank-N-Contrast as the published module: ``RnCLoss(temperature=2, label_diff="l1",
    feature_sim="l2")(features, labels)`` (see :func:`rnc_loss`). Only the published label
    distance (``"l1"``) and feature similarity (``"l2"``: negative Euclidean distance) exist.
    ``temperature`` is refused here when no dtype can compute with it (float64), in ``forward``
    when the batch's dtype cannot (as :func:`rnc_loss`)."""

    def __init__(self, temperature: float = 2, label_diff: str = "l1", feature_sim: str = "l2", *,
                 all_ranks: bool = False, process_group: ProcessGroup | None = None) -> None:
        super().__init__()
        temperature = validate.positive("temperature", temperature)
        self.temperature = validate.in_dtype("temperature", temperature, torch.float64, reciprocal=True)
        self.label_diff = validate.choice("label_diff", label_diff, ("l1",))
        self.feature_sim = validate.choice("feature_sim", feature_sim, ("l2",))
        self.all_ranks = validate.boolean("all_ranks", all_ranks)
        self.process_group = validate.process_group("process_group", process_group)

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return rnc_loss(features, labels, self.temperature, all_ranks=self.all_ranks,
                        process_group=self.process_group)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, label_diff={self.label_diff!r}, feature_sim={self.feature_sim!r}"


# ------------------------------------------------------------------------------ ConR
def _per_sample(name: str, value, n: int, device, dtype, dense: bool) -> torch.Tensor:
    """``value`` as one number per sample, ``[n, L]``: [n] or [n, L]; with ``dense`` (NYUD2) any
    [n, *] averaged per sample, each map holding at least one value (the mean of none is NaN)."""
    if dense:
        validate.floating(name, value)
        if value.dim() < 1 or value.shape[0] != n:
            raise ValueError(f"{name} must be [{n}, *] (one map per image), got shape {tuple(value.shape)}")
        if 0 in value.shape[1:]:
            raise ValueError(f"{name} must not be empty: each of its {n} maps needs at least one value, got shape "
                             f"{tuple(value.shape)}")
        if value.device != device:
            raise ValueError(f"{name} is on {value.device} but features are on {device}")
        return value.reshape(n, -1).mean(1, keepdim=True)
    return _labels(name, value, n, device, dtype)


def _sample_weights(weights, n: int, device, dtype, dense: bool) -> torch.Tensor:
    """ConR's ``weights``: a real number (1: unweighted; >= 0 and finite in ``dtype``) or one
    weight per sample (its values are not read)."""
    if not isinstance(weights, torch.Tensor):
        value = validate.in_dtype("weights", validate.real("weights", weights, 0.0), dtype)
        return torch.full((n,), value, dtype=dtype, device=device)
    if dense:
        return _per_sample("weights", weights, n, device, dtype, True).reshape(n)
    validate.floating("weights", weights)
    if weights.numel() != n or weights.dim() > 2 or (weights.dim() == 2 and weights.shape[1] != 1):
        raise ValueError(f"weights must be a number, [{n}] or [{n}, 1] (one weight per sample), got shape "
                         f"{tuple(weights.shape)}")
    if weights.device != device:
        raise ValueError(f"weights is on {weights.device} but features are on {device}")
    return weights.reshape(n)


def _push_strength(e, push: str) -> float:
    """ConR's ``e``: a finite number, >= 0 for the linear push (a negative pushing weight would
    make the sum in the log negative)."""
    return validate.real("e", e, 0.0 if push == "linear" else None)


def conr_loss(features: torch.Tensor, targets: torch.Tensor, preds: torch.Tensor, w: float = 1.0,
              weights: torch.Tensor | float = 1.0, t: float = 0.07, e: float = 0.01, *, form: str = "published",
              all_ranks: bool = False, process_group: ProcessGroup | None = None) -> torch.Tensor:
    """ConR (Keramati, Meng, Evans, ICLR 2024), the contrastive regulariser of the published
    ``ConR(features, targets, preds, w, weights, t, e)``.

    Positives of an anchor are the samples within ``w`` of its label; negatives, those farther
    in label but within ``w`` in prediction, pushed with weight ``weights_i * exp(e * l_ij)``.

    Args:
        features: ``[N, D]`` (NYUD2: ``[N, *]``, flattened per image). Training passes both
            views concatenated, as published.
        targets, preds: ``[N]``, ``[N, 1]`` or ``[N, L]`` (L1 distance). NYUD2: any ``[N, *]``,
            averaged per image (each image's map not empty).
        w: the label (and prediction) window. weights: a number (>= 0) or the per-sample LDS
            weights (>= 0; their values are not read). Only ``features`` get a gradient:
            ``targets``, ``preds`` (which the published code detaches) and ``weights`` are
            constants, as labels and LDS weights are.
        t: the temperature. The published AgeDB-DIR function ignores its ``t`` (default 0.2) and
            uses 0.07, the default here; ``dirfast.presets.AGEDB_DIR.conr`` says so.
        e: the pushing strength (>= 0 for ``"nyud2"``, whose linear push ``weights_i * e * l_ij``
            would be negative).
        form: ``"published"`` (AgeDB-DIR / IMDB-WIKI-DIR: the positive sum counts ``exp(0) = 1``
            for every non-positive, the anchor included), ``"paper"`` (the paper's equation,
            without those terms), or ``"nyud2"`` (per-image labels, predictions and weights; a
            linear pushing weight ``weights_i * e * l_ij``; a divisor that counts the anchor;
            an unweighted mean).

    ``t`` (the logits are cosines over ``t``) must be a normal number, and ``1 / t``, ``e`` and a
    number ``weights`` finite, in the dtype the loss is computed in (float32, float64 for float64
    inputs): in float32, ``t >= 1.18e-38`` and ``|e|, weights <= 3.4e38``.

    Returns the mean over anchors of ``weights_i * loss_i`` (``"nyud2"``: of ``loss_i``). An anchor
    without negatives adds 0, as published; one without positives adds 0 too, where the
    published code gives NaN (0/0).
    """
    form = validate.choice("form", form, tuple(CONR_FORMS))
    push, exp0_terms, anchor_in_divisor, weighted, dense = CONR_FORMS[form]
    features = _features(features, "flat" if dense else "rows")
    w, t, e = validate.real("w", w, 0.0), validate.positive("t", t), _push_strength(e, push)
    all_ranks = validate.boolean("all_ranks", all_ranks)
    validate.process_group("process_group", process_group)
    n = features.shape[0]
    z = features.reshape(n, -1)
    y = _per_sample("targets", targets, n, z.device, z.dtype, dense)
    p = _per_sample("preds", preds, n, z.device, z.dtype, dense).detach()
    if p.shape != y.shape:
        raise ValueError(f"preds must have the shape of targets ({tuple(targets.shape)}), got {tuple(preds.shape)}")
    acc = ops.acc_dtype(z.dtype, y.dtype, p.dtype)
    validate.in_dtype("t", t, acc, reciprocal=True)
    validate.in_dtype("e", e, acc)
    # a constant, as inside the op (which differentiates features only): a gradient through the
    # outer weights_i alone would be half of one
    weight = _sample_weights(weights, n, z.device, ops.acc_dtype(z.dtype, y.dtype), dense).detach()
    keys, first = _keys(z, all_ranks, process_group)
    y_keys, p_keys, weight_keys = [_keys(value, all_ranks, process_group)[0] for value in (y, p, weight)]
    loss = ops.conr_loss(keys, y_keys, p_keys, weight_keys, w=w, tau=t, e=e, push=push,
                         exp0_terms=exp0_terms, anchor_in_divisor=anchor_in_divisor, offset=first, count=n)
    return (weight * loss).mean() if weighted else loss.mean()


class ConRLoss(distributed.SharesProcessGroup, nn.Module):
    """ConR as a module: ``ConRLoss(w=1.0, t=0.07, e=0.01, form="published")(features, targets,
    preds, weights=1.0)`` (see :func:`conr_loss`; ``dirfast.presets.<DATASET>.conr()`` builds
    the published setting of each dataset). ``t`` and ``e`` are refused here when no dtype can
    compute with them (float64), in ``forward`` when the batch's dtype cannot (as :func:`conr_loss`)."""

    def __init__(self, w: float = 1.0, t: float = 0.07, e: float = 0.01, form: str = "published", *,
                 all_ranks: bool = False, process_group: ProcessGroup | None = None) -> None:
        super().__init__()
        form = validate.choice("form", form, tuple(CONR_FORMS))
        w, t, e = validate.real("w", w, 0.0), validate.positive("t", t), _push_strength(e, CONR_FORMS[form][0])
        self.w, self.t = w, validate.in_dtype("t", t, torch.float64, reciprocal=True)
        self.e, self.form = e, form
        self.all_ranks = validate.boolean("all_ranks", all_ranks)
        self.process_group = validate.process_group("process_group", process_group)

    def forward(self, features: torch.Tensor, targets: torch.Tensor, preds: torch.Tensor,
                weights: torch.Tensor | float = 1.0) -> torch.Tensor:
        return conr_loss(features, targets, preds, self.w, weights, self.t, self.e, form=self.form,
                         all_ranks=self.all_ranks, process_group=self.process_group)

    def extra_repr(self) -> str:
        return f"w={self.w}, t={self.t}, e={self.e}, form={self.form!r}"


# ------------------------------------------------------------------------------ RankSim
def _one_per_label(labels: torch.Tensor, generator) -> torch.Tensor:
    """A bool mask keeping one row per distinct label row, drawn uniformly at random from
    ``generator`` (on the labels' device; None: torch's default) without reading the labels on
    the host: each row gets a random priority, and a row is kept when no row of the same label
    has a higher one (ties in priority go to the lower index)."""
    return _highest_priority(labels, _priorities(labels.shape[0], labels.device, generator))


def _priorities(n: int, device: torch.device, generator) -> torch.Tensor:
    """n float64 priorities, uniform in [0, 1), from ``generator`` (None: torch's default).
    uniform_ rather than torch.rand(n, generator=...): the same numbers, and torch 2.11's
    rand.generator cannot trace a symbolic n under torch.compile."""
    return torch.empty(n, device=device, dtype=torch.float64).uniform_(generator=generator)


def _highest_priority(labels: torch.Tensor, priority: torch.Tensor) -> torch.Tensor:
    """Row i is kept when no row j of the same label row (every column ==: a NaN matches
    nothing, -0 matches +0) has priority[j] > priority[i], or an equal priority and j < i. By
    sorts of n values, no [n, n] temporary (and no host read): the rows put in label order by
    stable sorts on each column, last first, so equal label rows are adjacent; a row starts a
    group where it differs from the previous one; then rows ordered by (group, priority
    descending, index) -- stable sorts from index order -- and the first of each group kept."""
    n = priority.shape[0]
    device = priority.device
    y = labels + 0.0  # -0 -> +0, so that the sorts cannot separate equal labels
    order = torch.arange(n, device=device)
    for k in reversed(range(y.shape[1])):
        order = order[torch.sort(y[order, k], stable=True).indices]
    ordered = y[order]
    starts = torch.ones(n, dtype=torch.bool, device=device)
    starts[1:] = (ordered[1:] != ordered[:-1]).any(1)
    group = torch.empty(n, dtype=torch.int64, device=device).scatter_(0, order, torch.cumsum(starts, 0))
    by = torch.sort(priority, descending=True, stable=True).indices
    by = by[torch.sort(group[by], stable=True).indices]
    first = torch.ones(n, dtype=torch.bool, device=device)
    first[1:] = group[by[1:]] != group[by[:-1]]
    return torch.zeros(n, dtype=torch.bool, device=device).scatter_(0, by, first)


def _published_order(z, y, keep):
    """The rows in the published subset's order: where a label repeats, the code keeps one row per
    label in ascending label order (``torch.unique``); with every label distinct, the batch as it
    is. Ties rank by position, so the order matters; chosen on the device (no host read)."""
    n = y.shape[0]
    repeats = keep.sum() < n
    by_label = torch.sort(y[:, 0], stable=True).indices
    order = torch.where(repeats, by_label, torch.arange(n, device=y.device))
    return z[order], y[order], keep[order]


def ranksim_loss(features: torch.Tensor, targets: torch.Tensor, lambda_val: float = 2.0,
                 generator: torch.Generator | None = None, *, all_ranks: bool = False,
                 process_group: ProcessGroup | None = None) -> torch.Tensor:
    """RankSim (Gong, Mori, Tung, ICML 2022): the published ``batchwise_ranking_regularizer``.

    Where a label occurs more than once, one sample per distinct label is kept, drawn on the
    device from ``generator`` (reproducible; no host read); then each kept row's ranking of the
    cosine similarities is matched to its ranking of the label distances: the SUM over kept rows
    of the mean squared difference of the normalised ranks. Ties (equal similarities, or labels
    at equal distance on either side) rank the later row first, deterministically: the published
    ranking with a stable sort, as the STS-B-DIR code sorts (the AgeDB-DIR ``argsort`` is not
    stable), the kept rows in the published order (by label where a label repeats, as its
    ``torch.unique`` lists them; scalar labels, one process). The backward is the published blackbox differentiation of the
    ranks, with ``lambda_val`` its interpolation strength (train.py's ``--interpolation_lambda``).

    Args:
        features: ``[N, D]`` or ``[N, *]`` (flattened per sample).
        targets: ``[N]`` or ``[N, L]`` (L1 label distance).
        lambda_val: > 0, finite in the dtype the loss is computed in (float32, float64 for
            float64 inputs): at most 3.4e38 in float32.
        generator: a ``torch.Generator`` on the features' device for the subsample (leave it
            None under ``torch.compile(fullgraph=True)``, which cannot take a generator).
        all_ranks: rank against the rows of every rank (torch.distributed); each rank's loss is
            the sum over its own kept rows.
    """
    features = _features(features, "flat")
    lambda_val = validate.positive("lambda_val", lambda_val)
    all_ranks = validate.boolean("all_ranks", all_ranks)
    validate.process_group("process_group", process_group)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    n = features.shape[0]
    z = features.reshape(n, -1)
    y = _labels("targets", targets, n, z.device, z.dtype)
    validate.in_dtype("lambda_val", lambda_val, ops.acc_dtype(z.dtype, y.dtype))
    if generator is not None and generator.device.type != z.device.type:
        raise ValueError(f"generator is on {generator.device} but features are on {z.device}")
    # before the subsample is drawn: a call the op refuses must leave the generators as they were
    ops.refuse_unsupported_derivatives("ranksim_loss", (z, y), name="dirfast.losses.ranksim_loss")
    keys, first = _keys(z, all_ranks, process_group)
    if keys is z:
        keep = _one_per_label(y, generator)
        key_labels = y
        if y.shape[1] == 1:  # the published subset lists its rows by label (torch.unique), which decides ties
            keys, key_labels, keep = _published_order(keys, key_labels, keep)
    else:  # every rank draws its own priorities; all ranks then agree on the kept rows
        priority = _priorities(n, z.device, generator)
        key_labels, _ = _keys(y, True, process_group)
        keep = _highest_priority(key_labels, _keys(priority, True, process_group)[0])
    return ops.ranksim_loss(keys, key_labels, keep, lambda_val, first, n).sum()


class RankSimLoss(distributed.SharesProcessGroup, nn.Module):
    """RankSim as a module: ``RankSimLoss(lambda_val=2.0)(features, targets, generator=None)``
    (see :func:`ranksim_loss`). Training adds ``gamma * loss``; the RankSim README trains with
    gamma = 100 and lambda = 2."""

    def __init__(self, lambda_val: float = 2.0, *, all_ranks: bool = False,
                 process_group: ProcessGroup | None = None) -> None:
        super().__init__()
        self.lambda_val = validate.positive("lambda_val", lambda_val)
        self.all_ranks = validate.boolean("all_ranks", all_ranks)
        self.process_group = validate.process_group("process_group", process_group)

    def forward(self, features: torch.Tensor, targets: torch.Tensor,
                generator: torch.Generator | None = None) -> torch.Tensor:
        return ranksim_loss(features, targets, self.lambda_val, generator, all_ranks=self.all_ranks,
                            process_group=self.process_group)

    def extra_repr(self) -> str:
        return f"lambda_val={self.lambda_val}"
