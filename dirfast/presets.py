"""The published settings of each DIR benchmark, one name per dataset.

The published scripts (YyzHarry/imbalanced-regression, MIT) set LDS, FDS and the evaluation
differently per dataset, and nothing in the module signatures says so: the FDS clip, the
binning of continuous labels, the fill of empty buckets, the shot regions. A :class:`Preset`
holds them all, each value cited from the file it comes from (``STS_B_DIR.lds_weights(scores)``,
``STS_B_DIR.fds(feature_dim)``, ``STS_B_DIR.shot_metrics(preds, labels, train_labels)``). The
windows are those of each README's LDS / FDS command (gaussian, ks 5, sigma 2); the argparse
defaults of some train.py differ.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, overload

import numpy as np
import torch

from . import _validate as validate
from ._types import ArrayLike, NotTensor
from .binning import Binning
from .fds import FDS
from .lds import LDS, LDS_SCALES, refuse_sync
from .metrics import shot_metrics
from .pairwise import ConRLoss

__all__ = ["Preset", "ConRSetting", "AGEDB_DIR", "IMDB_WIKI_DIR", "STS_B_DIR", "NYUD2_DIR", "PRESETS", "get"]


@dataclass(frozen=True)
class ConRSetting:
    """The published ConR arguments of one dataset (``ConR(..., w, weights, t, e)``), and the
    form of its function (see :func:`dirfast.losses.conr_loss`)."""

    w: float
    t: float
    e: float
    form: str = "published"

    def __post_init__(self):
        ConRLoss(self.w, self.t, self.e, self.form)  # the loss's own checks, before the setting exists


@dataclass(frozen=True)
class Preset:
    """The published LDS, FDS and evaluation settings of one DIR benchmark.

    ``lds()``, ``fds()`` and ``shot_metrics()`` build the dirfast objects with them; any keyword
    overrides a setting (``AGEDB_DIR.fds(512, sigma=1)``).
    """

    name: str
    lds_binning: Binning             # labels -> bins of the LDS weights
    fds_binning: Binning             # labels -> FDS buckets (and the shot regions' bins)
    # LDS
    reweight: str
    lds_kernel: str
    lds_ks: int
    lds_sigma: float
    inverse_clip: tuple | None
    lds_padding: str = "constant"
    lds_bucket_start: int = 0
    lds_scale: str = "samples"       # lds_weights' scale: a float32 sum over the samples, or from the counts
    # FDS
    bucket_num: int = 100
    bucket_start: int = 0
    fds_kernel: str = "gaussian"
    fds_ks: int = 5
    fds_sigma: float = 2.0
    momentum: float = 0.9
    start_update: int = 0
    start_smooth: int = 1
    clip_min: float = 0.1
    clip_max: float = 10.0
    fill_empty: bool = False
    # evaluation: by exact label (bin_shots=False) or by bin, with thresholds or fixed regions
    bin_shots: bool = False
    many_shot_thr: float = 100
    low_shot_thr: float = 20
    shot_regions: dict | None = field(default=None, hash=False)
    exact_error: float = 0.0         # an exact prediction's error in the G-mean (shot_metrics)
    correlations: bool = False       # shot_metrics gives Pearson's and Spearman's correlations too
    # ConR (Keramati et al., ICLR 2024): None where it published no setting
    conr_setting: ConRSetting | None = None

    def __post_init__(self):
        if not isinstance(self.name, str):
            raise TypeError(f"name must be a str, got {type(self.name).__name__}")
        validate.choice("lds_scale", self.lds_scale, LDS_SCALES)
        # read here and nowhere else (fill_empty also by FDS): a str or None would be taken for its
        # truth value
        for name in ("fill_empty", "bin_shots", "correlations"):
            validate.boolean(name, getattr(self, name))
        if self.conr_setting is not None and not isinstance(self.conr_setting, ConRSetting):
            raise TypeError(f"conr_setting must be a dirfast.presets.ConRSetting or None, got "
                            f"{type(self.conr_setting).__name__}")

    def lds(self, **overrides: Any) -> LDS:
        """An (unfitted) :class:`~dirfast.LDS` with this dataset's settings. Under
        ``torch.distributed`` its fit sums the ranks' counts: where every rank holds the whole
        training set, as the published scripts do, pass ``sync=False`` (or use :meth:`lds_weights`)."""
        settings: dict[str, Any]  # keyword arguments of several types
        settings = dict(reweight=self.reweight, lds=True, kernel=self.lds_kernel, ks=self.lds_ks,
                        sigma=self.lds_sigma, inverse_clip=self.inverse_clip, padding=self.lds_padding,
                        bucket_start=self.lds_bucket_start)
        settings.update(overrides)
        return LDS(self.lds_binning, **settings)

    @overload
    def lds_weights(self, labels: torch.Tensor, **overrides: Any) -> torch.Tensor: ...
    @overload
    def lds_weights(self, labels: NotTensor, **overrides: Any) -> np.ndarray: ...
    def lds_weights(self, labels: ArrayLike, **overrides: Any) -> torch.Tensor | np.ndarray:
        """The published per-sample LDS weights of the training ``labels`` (see
        :func:`dirfast.lds_weights`; no ``sync`` or ``process_group``)."""
        refuse_sync("Preset.lds_weights", overrides)
        return self.lds(sync=False, **overrides)._fit_weights(labels, scale=self.lds_scale)

    def fds(self, feature_dim: int, **overrides: Any) -> FDS:
        """An :class:`~dirfast.FDS` module with this dataset's settings."""
        settings: dict[str, Any]  # keyword arguments of several types
        settings = dict(bucket_num=self.bucket_num, bucket_start=self.bucket_start, start_update=self.start_update,
                        start_smooth=self.start_smooth, kernel=self.fds_kernel, ks=self.fds_ks, sigma=self.fds_sigma,
                        momentum=self.momentum, binning=self.fds_binning, fill_empty=self.fill_empty,
                        clip_min=self.clip_min, clip_max=self.clip_max)
        settings.update(overrides)
        return FDS(feature_dim, **settings)

    def conr(self, **overrides: Any) -> ConRLoss:
        """A :class:`~dirfast.losses.ConRLoss` with this dataset's published ConR arguments."""
        if self.conr_setting is None:
            raise ValueError(f"ConR published no setting for {self.name}: build dirfast.losses.ConRLoss directly")
        settings: dict[str, Any]  # keyword arguments of several types
        settings = dict(w=self.conr_setting.w, t=self.conr_setting.t, e=self.conr_setting.e, form=self.conr_setting.form)
        settings.update(overrides)
        return ConRLoss(**settings)

    def shot_metrics(self, preds: ArrayLike, labels: ArrayLike,
                     train_labels: ArrayLike | None = None) -> dict[str, dict[str, float]]:
        """Many-, medium- and few-shot errors as this dataset's published evaluation defines them.
        Predictions in label units: the published STS-B-DIR model predicts score / 5 (its targets
        are divided by 5), and its scorer multiplies the predictions by 5 first; do the same."""
        if self.shot_regions is not None:  # train_labels are not needed, but checked when given (as shot_metrics)
            return shot_metrics(preds, labels, train_labels, binning=self.fds_binning, regions=self.shot_regions,
                                exact_error=self.exact_error, correlations=self.correlations)
        return shot_metrics(preds, labels, train_labels, self.many_shot_thr, self.low_shot_thr,
                            binning=self.fds_binning if self.bin_shots else None, exact_error=self.exact_error,
                            correlations=self.correlations)


# agedb-dir: datasets.py (_prepare_weights: max_target=121, int(label), clip 5..1000),
# README.md (--reweight sqrt_inv --lds --lds_ks 5 --lds_sigma 2; --fds_ks 5 --fds_sigma 2),
# train.py (FDS bucket_num=100, bucket_start=3, fds_mmt=0.9, start_update=0, start_smooth=1;
# shot_metrics(many_shot_thr=100, low_shot_thr=20) on exact labels), utils.py
# (calibrate_mean_var clip_min=0.1, clip_max=10), fds.py (labels are the bucket indices).
AGEDB_DIR = Preset(
    name="AgeDB-DIR", lds_binning=Binning.integer(121), fds_binning=Binning.integer(100),
    reweight="sqrt_inv", lds_kernel="gaussian", lds_ks=5, lds_sigma=2.0, inverse_clip=(5, 1000),
    bucket_num=100, bucket_start=3, clip_min=0.1, clip_max=10.0,
    many_shot_thr=100, low_shot_thr=20, conr_setting=ConRSetting(w=1.0, t=0.07, e=0.01))

# imdb-wiki-dir: the same files as agedb-dir; train.py has bucket_start=0. ConR: t=0.07 is used.
IMDB_WIKI_DIR = Preset(
    name="IMDB-WIKI-DIR", lds_binning=Binning.integer(121), fds_binning=Binning.integer(100),
    reweight="sqrt_inv", lds_kernel="gaussian", lds_ks=5, lds_sigma=2.0, inverse_clip=(5, 1000),
    bucket_num=100, bucket_start=0, clip_min=0.1, clip_max=10.0,
    many_shot_thr=100, low_shot_thr=20, conr_setting=ConRSetting(w=1.0, t=0.07, e=0.01))

# sts-b-dir: tasks.py (np.histogram over [0, 5] with bucket_num=50 bins, no clip),
# README.md (--reweight inverse --lds --lds_ks 5 --lds_sigma 2; --fds_ks 5 --fds_sigma 2),
# train.py (bucket_num=50, bucket_start=0, fds_mmt=0.9), fds.py (float32 histogram edges,
# the fill of empty buckets), util.py (calibrate_mean_var clip_min=0.5, clip_max=2; the shot
# lists of STSShotAverage, which are the bins with more than 100 / fewer than 30 training
# scores under the float32 binning: the same regions; its metrics, Pearson and Spearman too).
STS_B_DIR = Preset(
    name="STS-B-DIR", lds_binning=Binning.uniform(0.0, 5.0, 50), fds_binning=Binning.uniform(0.0, 5.0, 50),
    reweight="inverse", lds_kernel="gaussian", lds_ks=5, lds_sigma=2.0, inverse_clip=None,
    bucket_num=50, bucket_start=0, clip_min=0.5, clip_max=2.0, fill_empty=True,
    bin_shots=True, many_shot_thr=100, low_shot_thr=30, exact_error=1e-10, correlations=True)

# nyud2-dir: util.py and loaddata.py (bin = int(depth * float32(10)), 100 bins; the shot lists
# of Evaluator), loaddata.py (_get_bucket_weights: the counts from bucket_start=7 on, smoothed
# with convolve1d(mode="reflect"), bins below 7 weighted as bin 7, no clip), README.md
# (--reweight inverse --lds --lds_ks 5 --lds_sigma 2; --fds_ks 5 --fds_sigma 2), train.py
# (bucket_num=100, bucket_start=7, fds_mmt=0.9), util.py (calibrate_mean_var clip_min=0.2,
# clip_max=5). ConR (SPEC.md): ConR(feature, depth, output, weights, w=0.2, t=0.07, e=0.2), per image,
# called by the ConR repository's nyud2-dir/train.py with t=args.t (default 0.2; its README's
# command "train.py --conr -w 0.2 --beta 0.2 -e 0.2" leaves it), so the published runs use t = 0.2.
NYUD2_DIR = Preset(
    name="NYUD2-DIR", lds_binning=Binning.integer(100, scale=10.0), fds_binning=Binning.integer(100, scale=10.0),
    reweight="inverse", lds_kernel="gaussian", lds_ks=5, lds_sigma=2.0, inverse_clip=None,
    lds_padding="symmetric", lds_bucket_start=7, lds_scale="counts",
    bucket_num=100, bucket_start=7, clip_min=0.2, clip_max=5.0,
    conr_setting=ConRSetting(w=0.2, t=0.2, e=0.2, form="nyud2"),
    bin_shots=True, shot_regions={
        "many": [9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32,
                 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 45, 47, 49],
        "median": [7, 8, 46, 48, 50, 51, 52, 53, 54, 55, 56, 58, 60, 61, 63],
        "low": [0, 1, 2, 3, 4, 5, 6, 57, 59, 62] + list(range(64, 100)),
    })

PRESETS = {preset.name: preset for preset in (AGEDB_DIR, IMDB_WIKI_DIR, STS_B_DIR, NYUD2_DIR)}


def get(name: str) -> Preset:
    """The preset of a dataset by name: ``"AgeDB-DIR"``, ``"IMDB-WIKI-DIR"``, ``"STS-B-DIR"`` or
    ``"NYUD2-DIR"`` (case, ``-`` and ``_`` do not matter)."""
    def key(text):
        return str(text).lower().replace("_", "-")

    for preset_name, preset in PRESETS.items():
        if key(name) == key(preset_name):
            return preset
    raise ValueError(f"name must be one of the presets {list(PRESETS)}, got {name!r}")
