"""How many behaviour changes the test suite catches: a mutation check, run by hand.

Each mutation below changes one behaviour of dirfast (a line of its code, as it reads in this
tree or in the tree before the ops moved to one module each). For each one the runner copies the
tree, applies the mutation and runs the test suite, the files that cover the mutated code first,
stopping at the first failure: a failure kills the mutation; a green suite means it survived.

    python tests/mutations.py [--tree PATH] [--only ID ...] [--timeout SECONDS]

The tree is this checkout by default; its compiled extension (built in place) is copied with it.
Prints one line per mutation and the counts of survivors and of mutations whose text is no longer
in the code ("not applicable": the entry needs updating); exits 1 if there are any of either.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Mutation(NamedTuple):
    id: str
    what: str
    edits: tuple  # (path, old, new) alternatives: the first whose old text is in its file is applied
    tests: tuple  # the test files that cover the mutated code, run first


M = Mutation
MUTATIONS = [
    # The five that survived the suite of the lean-core round (issue 22).
    M("preset-lds-bucket-start", "Preset.lds() given bucket_start instead of lds_bucket_start",
      (("dirfast/presets.py", "bucket_start=self.lds_bucket_start)", "bucket_start=self.bucket_start)"),),
      ("test_presets.py", "test_data.py")),
    M("lds-floor-densest", "the weight of bins the fit never saw taken from the densest bin, not the sparsest",
      (("dirfast/lds.py", "top = torch.where(finite, values, -torch.inf).amax()",
        "top = torch.where(finite, values, torch.inf).amin()"),),
      ("test_lds.py",)),
    M("lds-settings-padding", "padding dropped from LDS's saved settings",
      (("dirfast/lds.py", '"inverse_clip", "padding", "bucket_start")', '"inverse_clip", "bucket_start")'),),
      ("test_lds.py",)),
    M("regions-unlisted-medium", "shot_metrics(regions=...) counting unlisted bins as medium-shot",
      (("dirfast/metrics.py", "of_bin = np.full(num_bins, 2)", "of_bin = np.full(num_bins, 1)"),),
      ("test_metrics.py", "test_presets.py")),
    M("spearman-lowest-rank", "Spearman's tied values given their lowest rank, not the mean of theirs",
      (("dirfast/metrics.py", "np.repeat((starts + ends + 1) / 2, ends - starts)",
        "np.repeat(starts + 1.0, ends - starts)"),),
      ("test_metrics.py", "test_data.py")),
    M("preset-no-correlations", "STS_B_DIR.shot_metrics without the evaluator's correlations",
      (("dirfast/presets.py",
        "exact_error=self.exact_error,\n                            correlations=self.correlations)",
        "exact_error=self.exact_error)"),),
      ("test_data.py",)),
    M("fds-dense-in-place", "FDS.smooth writing dense maps in place by default (the NYUD2-DIR module copies them)",
      (("dirfast/fds.py", "inplace = features.dim() == 2", "inplace = True"),),
      ("test_fds.py",)),
    M("lds-numpy-settings", "LDS keeping ks and sigma as given (a NumPy scalar fails torch.load's weights_only)",
      (("dirfast/lds.py", "str(kernel), int(ks), float(sigma)", "kernel, ks, sigma"),),
      ("test_lds.py",)),
    M("bandwidth-unchecked", "dirfast.bandwidth.silverman computing on its labels unchecked",
      (("dirfast/bandwidth.py", 'return _silverman(validate.finite_values("values", values))',
        "return _silverman(values)"),),
      ("test_bad_inputs.py",)),
    M("in-place-leaf-view", "the in-place check letting a view made to require grad through (written, then refused)",
      (("dirfast/ops/_checks.py", "        if base.is_leaf:\n", "        if base.is_leaf and base.requires_grad:\n"),),
      ("test_bad_inputs.py",)),
    M("warning-at-dirfast", "warnings attributed to dirfast's own frame instead of the user's line",
      (("dirfast/_validate.py", "    warnings.warn(message, UserWarning, stacklevel=level)",
        "    warnings.warn(message, UserWarning, stacklevel=2)"),),
      ("test_binning.py", "test_density.py")),
    M("mixture-weights-unnormalised", "GaussianMixture weights not normalised",
      (("dirfast/mixture.py", "self.weights = means, variances, weights / weights.sum()",
        "self.weights = means, variances, weights"),),
      ("test_balanced_mse.py",)),
    # Our own, across the API and the ops.
    M("fds-momentum-none", "FDS with momentum=None weighs the old statistics by n / tracked",
      (("dirfast/fds.py", "factor = 1 - n / tracked.clamp(min=1)", "factor = n / tracked.clamp(min=1)"),),
      ("test_fds.py",)),
    M("fds-fill-left", "fill_empty takes the left neighbour instead of the mean of both",
      (("dirfast/fds.py", "running[k] = (running[k - 1] + running[k + 1]) / 2.0", "running[k] = running[k - 1]"),),
      ("test_fds.py", "test_presets.py")),
    M("fds-snapshot-copy", "the published snapshot sharing replaced by a copy",
      (("dirfast/fds.py", "self._snapshot_follows = not self.copy_snapshot", "self._snapshot_follows = False"),),
      ("test_fds.py",)),
    M("bin-stats-biased-variance", "the reference variance divided by n instead of n - 1",
      (("dirfast/ops/bin_stats.py", "/ (n - 1).clamp(min=1)).clamp(min=0)", "/ n.clamp(min=1)).clamp(min=0)"),
       ("dirfast/reference.py", "/ (n - 1).clamp(min=1)).clamp(min=0)", "/ n.clamp(min=1)).clamp(min=0)")),
      ("test_bin_stats.py", "test_ops.py")),
    M("calibrate-threshold", "a bucket left alone below a variance sum of 1e-3 instead of 1e-10",
      (("dirfast/ops/calibrate.py", "< 1e-10) | (src_var == 0)", "< 1e-3) | (src_var == 0)"),
       ("dirfast/reference.py", "< 1e-10) | (src_var == 0)", "< 1e-3) | (src_var == 0)")),
      ("test_calibrate.py", "test_ops.py")),
    M("calibrate-backward-unclipped", "calibrate's gradient without the variance-ratio clamp",
      (("dirfast/ops/calibrate.py", "zeros, src_var, zeros, dst_var, *ctx.clips)",
        'zeros, src_var, zeros, dst_var, 0.0, float("inf"))'),
       ("dirfast/contract.py", "zeros, src_var, zeros, dst_var, *ctx.clips)",
        'zeros, src_var, zeros, dst_var, 0.0, float("inf"))')),
      ("test_calibrate.py", "test_ops.py", "test_fds.py")),
    M("smooth-reflect-repeats-edge", "reflect padding repeating the edge bin (scipy's reflect)",
      (("dirfast/ops/smooth_bins.py", "j = torch.where(j >= num_bins, period - j, j)",
        "j = torch.where(j >= num_bins, period - 1 - j, j)"),
       ("dirfast/reference.py", "j = torch.where(j >= num_bins, period - j, j)",
        "j = torch.where(j >= num_bins, period - 1 - j, j)")),
      ("test_smooth_bins.py", "test_ops.py")),
    M("mixture-grad-weights-halved", "the reference gradient in the log-weights halved",
      (("dirfast/ops/mixture_logpdf.py", "grad_w += r.sum(0)", "grad_w += 0.5 * r.sum(0)"),
       ("dirfast/reference.py", "grad_w += gr.sum(0)", "grad_w += 0.5 * gr.sum(0)")),
      ("test_mixture_logpdf.py", "test_ops.py")),
    M("focal-sigmoid", "focal losses with sigmoid(beta |d|) instead of 2 sigmoid(beta |d|) - 1",
      (("dirfast/losses.py", 'else 2 * torch.sigmoid(scaled) - 1', 'else torch.sigmoid(scaled)'),),
      ("test_losses.py",)),
    M("huber-no-half", "Huber's quadratic part without its 1/2",
      (("dirfast/losses.py", "0.5 * l1 ** 2 / beta", "l1 ** 2 / beta"),),
      ("test_losses.py",)),
    M("lds-no-truncation", "the published integer truncation of the inverse re-weighting dropped",
      (("dirfast/lds.py", "effective = effective.trunc()", "effective = effective"),),
      ("test_lds.py", "test_data.py")),
    M("binning-edges-left", "edge binning with the first edge at or above the label (right=False)",
      (("dirfast/binning.py", "bins = (torch.searchsorted(edges, values.contiguous(), right=True) - 1)",
        "bins = (torch.searchsorted(edges, values.contiguous(), right=False) - 1)"),),
      ("test_binning.py", "test_data.py")),
    M("density-no-floor", "DenseWeight without its eps floor",
      (("dirfast/density.py", "return weights.clamp_(min=self.eps).mul_(", "return weights.mul_("),),
      ("test_density.py",)),
    M("gmean-arithmetic", "the shot metrics' geometric mean replaced by the arithmetic one",
      (("dirfast/metrics.py", "gmean = float(np.exp(np.mean(np.log(np.where(absolute == 0, exact_error, absolute)))))",
        "gmean = float(np.mean(absolute))"),),
      ("test_metrics.py", "test_data.py")),
    M("use-backend-no-restore", "use_backend not restoring the previous selection",
      (("dirfast/ops/_dispatch.py", "        _selection.name = previous\n", "        pass\n"),),
      ("test_backends.py", "test_api.py")),
    # The training tools' round (fifteenth session).
    M("fds-not-following-updates", "the published snapshot sharing copied at the snapshot only, not after updates",
      (("dirfast/fds.py", "        if self._snapshot_follows:  # the published sharing, see copy_snapshot\n",
        "        if False:\n"),),
      ("test_fds.py",)),
    M("fds-load-ends-sharing", "every load ends the published snapshot sharing",
      (("dirfast/fds.py", "        self._snapshot_follows = follows\n", "        self._snapshot_follows = False\n"),),
      ("test_fds.py",)),
    M("accumulate-in-backward", "FDS.accumulate counting a checkpointed batch again in the backward pass",
      (("dirfast/fds.py", "        if recomputing_in_backward():\n            return\n", ""),),
      ("test_fds.py",)),
    M("reset-parameters-keeps-epoch", "FDS.reset_parameters keeping the epoch counter, as reset() does",
      (("dirfast/fds.py", "        self.epoch.fill_(self.start_update)\n", ""),),
      ("test_fds.py",)),
    M("second-order-unchecked", "a backward with create_graph=True through kernels without derivatives let through",
      (("dirfast/ops/_dispatch.py", "    if torch.is_grad_enabled() and not (twice and ctx.kernel.dispatched):",
        "    if False:"),),
      ("test_backends.py",)),
    M("lds-sample-scale-float64",
      "lds_weights scaled by a float64 sum and quotient, not as NumPy computes the published ones",
      (("dirfast/lds.py", "factor = unscaled.size / unscaled.sum()",
        "factor = np.float64(unscaled.size) / unscaled.sum(dtype=np.float64)"),),
      ("test_presets.py", "test_data.py")),
    M("lds-tables-floor-densest", "a bin whose inverse passes float32 scaled as the densest bin, not the sparsest",
      (("dirfast/lds.py", "sparsest = torch.where(fits, effective, torch.inf).amin()",
        "sparsest = torch.where(fits, effective, -torch.inf).amax()"),),
      ("test_lds.py",)),
    M("lds-weights-rounded-twice", "LDS.weights rounding 1 / effective to float32 before the scale (twice, not once)",
      (("dirfast/lds.py", "_floored((scale / base).float())",
        "_floored((scale * (1.0 / base).float().double()).float())"),),
      ("test_presets.py",)),
    M("bin-stats-variance-gradient-biased", "the variance's gradient in x divided by n, not n - 1",
      (("dirfast/ops/bin_stats.py", "2 * grad_var / (n - 1).clamp(min=1)", "2 * grad_var / n.clamp(min=1)"),),
      ("test_bin_stats.py",)),
    M("fds-inference-state-unchecked", "FDS state made under inference mode written until torch refuses",
      (("dirfast/fds.py", "            if buffer.is_inference():", "            if False:"),),
      ("test_fds.py",)),
    M("bin-stats-gradient-rounded-mean", "the variance's gradient from deviations to the saved, rounded mean",
      (("dirfast/ops/bin_stats.py",
        "    deviation = deviation - per_row(drift[:-1] / n.clamp(min=1))\n", ""),),
      ("test_bin_stats.py",)),
    M("smooth-constant-gradient-unmasked", "constant padding's zeros multiplied into the gradients (0 * inf)",
      (("dirfast/ops/smooth_bins.py", 'if ctx.padding == "constant":  # a tap outside', 'if False:  # a tap outside'),),
      ("test_smooth_bins.py",)),
    M("conr-weights-derivative-silent", "ConR's weights that require grad let through (their gradient None)",
      (("dirfast/ops/conr_loss.py", '_dispatch.without_derivative("conr_loss", "weights")', ""),),
      ("test_backends.py",)),
]


def _copy_tree(tree: str, into: str) -> str:
    """A copy of the checkout, with the team's ../shared beside it (a link) where the checkout has
    one: the real-label tests read it, and skip without it."""
    dst = os.path.join(into, "tree")
    shutil.copytree(tree, dst, symlinks=True,
                    ignore=shutil.ignore_patterns(".git", "build", "__pycache__", ".pytest_cache", ".benchmarks"))
    shared = os.path.join(os.path.abspath(tree), os.pardir, "shared")
    if os.path.isdir(shared):
        os.symlink(os.path.normpath(shared), os.path.join(into, "shared"))
    return dst


def _apply(mutation: Mutation, tree: str) -> str:
    """Apply the mutation's first applicable edit; return the file it changed ("" when none applies)."""
    for path, old, new in mutation.edits:
        full = os.path.join(tree, path)
        if not os.path.exists(full):
            continue
        with open(full) as handle:
            text = handle.read()
        if text.count(old) == 1:
            with open(full, "w") as handle:
                handle.write(text.replace(old, new))
            return path
    return ""


def run(mutation: Mutation, tree: str, timeout: float) -> tuple:
    """(outcome, seconds): "killed", "survived", "not applicable" or "timeout"."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dirfast-mutation-") as work:
        copy = _copy_tree(tree, work)
        if not _apply(mutation, copy):
            return "not applicable", 0.0
        tests = os.path.join(copy, "tests")
        first = [name for name in mutation.tests if os.path.exists(os.path.join(tests, name))]
        rest = sorted(name for name in os.listdir(tests) if name.startswith("test_") and name.endswith(".py")
                      and name not in first)
        env = dict(os.environ, PYTHONPATH=copy, PYTHONDONTWRITEBYTECODE="1")
        try:
            done = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *first, *rest],
                                  cwd=tests, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return "timeout", time.perf_counter() - start
    return ("survived" if done.returncode == 0 else "killed"), time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", default=ROOT, help="the checkout to mutate (default: this one)")
    parser.add_argument("--only", nargs="+", help="mutation ids to run (default: all)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per mutation")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.only or m.id in args.only]
    survivors = stale = 0
    for mutation in chosen:
        outcome, seconds = run(mutation, args.tree, args.timeout)
        survivors += outcome == "survived"
        stale += outcome == "not applicable"  # its text is no longer in the code: the entry needs updating
        print(f"{outcome:15s} {seconds:6.0f} s  {mutation.id}: {mutation.what}", flush=True)
    print(f"{len(chosen)} mutations, {survivors} survived, {stale} not applicable (tree: {args.tree})")
    return 1 if survivors or stale else 0


if __name__ == "__main__":
    sys.exit(main())
