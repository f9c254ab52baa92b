"""Draw the README's diagnostics plots on the team's real AgeDB-DIR training ages.

    python docs/make_plots.py [--data DIR | --labels CSV] [--out DIR]

Writes ``agedb-label-distribution.png`` (the published AgeDB-DIR LDS: empirical and effective
label density, weights) and ``agedb-fds-diagnostics.png`` (the published AgeDB-DIR FDS after
two epochs of synthetic features that depend smoothly on the age, plus noise) into ``--out``
(default docs/images). Needs the team's labels file (columns ``age,split``; team machines only):
``agedb-dir-labels.csv`` in ``--data DIR`` (default ../shared/data beside the checkout), or
``--labels CSV``; without it, exits with status 1 and draws nothing.
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # this checkout's dirfast and benchmarks (the label reader)

try:
    import matplotlib
except ImportError:
    sys.exit("make_plots: needs matplotlib (pip install matplotlib)")
matplotlib.use("Agg")

import torch  # noqa: E402

import dirfast.plot  # noqa: E402
from benchmarks import real_labels  # noqa: E402
from dirfast.presets import AGEDB_DIR  # noqa: E402

OUT = os.path.join(ROOT, "docs", "images")
FEATURE_DIM = 32
DPI = 100


def synthetic_features(ages: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``[N, FEATURE_DIM]`` features whose mean and spread vary smoothly with the age, plus
    noise: the per-bucket estimates are noisy where ages are rare, which smoothing evens out."""
    frequencies = torch.linspace(0.5, 3.0, FEATURE_DIM)
    phases = torch.linspace(0.0, 3.0, FEATURE_DIM)
    signal = torch.sin(ages[:, None] / 100 * frequencies * torch.pi + phases)
    spread = 0.5 + ages[:, None] / 100
    return signal + spread * torch.randn(ages.shape[0], FEATURE_DIM, generator=generator)


def main(argv=None) -> int:
    parser = real_labels.parser("python docs/make_plots.py", "Draw the README's diagnostics plots.")
    parser.add_argument("--labels", metavar="CSV", default=None,
                        help="the AgeDB-DIR labels CSV (age,split) itself (default: agedb-dir-labels.csv in --data)")
    parser.add_argument("--out", default=OUT, help="the folder the PNG files go to (default: %(default)s)")
    args = parser.parse_args(argv)
    labels = args.labels or real_labels.agedb_path(args.data)
    ages = real_labels.agedb_ages("train", labels)
    if ages is None:
        print(f"make_plots: nothing to draw: {os.path.abspath(labels)} not found (the team's labels file; pass "
              "--data DIR or --labels CSV)", file=sys.stderr)
        return 1
    ages = torch.from_numpy(ages).float()
    os.makedirs(args.out, exist_ok=True)

    lds = AGEDB_DIR.lds().fit(ages)
    ax, _ = dirfast.plot.plot_label_distribution(lds)
    ax.set_title(f"AgeDB-DIR training ages ({len(ages)}): LDS, sqrt_inv, gaussian ks=5 sigma=2")
    ax.set_xlabel("age")
    ax.figure.savefig(os.path.join(args.out, "agedb-label-distribution.png"), dpi=DPI)

    fds = AGEDB_DIR.fds(feature_dim=FEATURE_DIM)
    generator = torch.Generator().manual_seed(0)
    for epoch in range(2):  # the published order at the end of each epoch
        fds.update_last_epoch_stats(epoch)
        fds.update_running_stats(synthetic_features(ages, generator), ages, epoch)
    axes = dirfast.plot.plot_fds_diagnostics(fds)
    axes[0].set_title(f"AgeDB-DIR FDS after 2 epochs ({FEATURE_DIM} synthetic features: smooth in age + noise)")
    axes[-1].set_xlabel("bucket (age)")
    axes[0].figure.savefig(os.path.join(args.out, "agedb-fds-diagnostics.png"), dpi=DPI)
    print(f"make_plots: wrote agedb-label-distribution.png and agedb-fds-diagnostics.png to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
