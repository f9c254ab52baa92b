"""The package is typed (PEP 561: dirfast/py.typed): every public function and method has its
arguments and result annotated, and a type checker (mypy) reads them from a user's code."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import textwrap

import dirfast

from testing import public_modules

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _public_callables():
    """(qualified name, function) of every public function, and of every class's constructor,
    ``__call__``, public methods and property getters that dirfast defines (inherited ones
    included: ``LDS.fit`` is ``FittedEstimator.fit``)."""
    seen = set()
    for module in public_modules():
        for name in module.__all__:
            value = getattr(module, name)
            if inspect.isclass(value):
                for attr in dir(value):
                    if attr.startswith("_") and attr not in ("__init__", "__call__"):
                        continue
                    member = inspect.getattr_static(value, attr)
                    if isinstance(member, property):
                        member = member.fget
                    function = member.__func__ if isinstance(member, (classmethod, staticmethod)) else member
                    if inspect.isfunction(function) and function.__module__.startswith("dirfast") \
                            and function not in seen:
                        seen.add(function)
                        yield f"{module.__name__}.{name}.{attr}", function
            elif inspect.isfunction(value) and value not in seen:
                seen.add(value)
                yield f"{module.__name__}.{name}", value


def test_every_public_signature_is_annotated():
    callables = dict(_public_callables())
    functions = set(callables.values())
    assert len(callables) > 90 and {dirfast.metrics.shot_metrics, dirfast.FDS.smooth, dirfast.LDS.fit,
                                    dirfast.Binning.__call__, dirfast.DenseWeight.fitted_bandwidth.fget} <= functions
    missing = {}
    for name, function in callables.items():
        signature = inspect.signature(function)
        unannotated = [p.name for p in signature.parameters.values()
                       if p.annotation is inspect.Parameter.empty and p.name not in ("self", "cls")]
        if signature.return_annotation is inspect.Signature.empty:
            unannotated.append("return")
        if unannotated:
            missing[name] = unannotated
    assert not missing, missing


GOOD = """
    from __future__ import annotations

    import numpy as np
    import torch

    import dirfast
    from dirfast.losses import BMCLoss, ConRLoss, RnCLoss, weighted_focal_mse_loss
    from dirfast.metrics import shot_metrics
    from dirfast.presets import STS_B_DIR

    labels = np.random.default_rng(0).uniform(0, 5, 256).astype(np.float32)
    binning: dirfast.Binning = dirfast.Binning.uniform(0.0, 5.0, 50)
    weights: np.ndarray = dirfast.lds_weights(labels, binning, inverse_clip=[5, 1000])
    tensor_weights: torch.Tensor = dirfast.lds_weights(torch.from_numpy(labels), binning)
    preset_weights: torch.Tensor = STS_B_DIR.lds_weights(torch.from_numpy(labels))
    density: np.ndarray = dirfast.density_weights(labels, grid_size=512)
    lds: dirfast.LDS = dirfast.LDS(binning).fit(labels)
    one_weight: torch.Tensor = lds.weights(2.5)
    bandwidth: float | None = dirfast.DenseWeight().fit(labels).fitted_bandwidth
    grid = dirfast.GridBinning(binning, dirfast.Binning.integer(4))
    pairs = np.stack([labels, labels], 1)
    grid_weights: torch.Tensor = dirfast.LDS(grid).fit(pairs).weights(pairs)
    per_sample: torch.Tensor = lds.weights(torch.from_numpy(labels))
    fds = dirfast.FDS(8, bucket_num=50, bucket_start=0, momentum=None)
    features = torch.randn(256, 8)
    smoothed: torch.Tensor = fds.smooth(features, torch.from_numpy(labels), 0, inplace=False)
    loss: torch.Tensor = weighted_focal_mse_loss(features[:, 0], torch.from_numpy(labels), per_sample, beta=0.5)
    loss = loss + RnCLoss(temperature=2.0)(features.view(128, 2, 8), torch.from_numpy(labels[:128]))
    loss = loss + ConRLoss(w=0.5)(features, torch.from_numpy(labels), features[:, 0].detach(), weights=2.0)
    loss = loss + BMCLoss(1.0)(features[:, :1], torch.from_numpy(labels)[:, None])
    regions: dict[str, dict[str, float]] = shot_metrics(labels + 0.1, labels, labels, 100, 20.5, binning,
                                                        correlations=True)
    pearson: float = STS_B_DIR.shot_metrics(labels, labels, labels)["overall"]["pearson"]
    count, mean, var = dirfast.ops.bin_stats(features, torch.zeros(256, dtype=torch.long), 4)
    with dirfast.use_backend("reference") as backend:
        out: torch.Tensor = dirfast.ops.calibrate(features, torch.zeros(256, dtype=torch.long), mean, var, mean, var)
"""

BAD = """
    import torch

    import dirfast
    from dirfast.metrics import shot_metrics

    fds = dirfast.FDS("8")
    weights: torch.Tensor = dirfast.lds_weights([1.0], dirfast.Binning.integer(4))
    errors: float = shot_metrics([1.0], [1.0], [1.0])["overall"]
"""


def test_a_type_checker_reads_the_signatures(tmp_path):
    """mypy on user code, dirfast's own bodies not reported (``--follow-imports=silent``): code
    that calls the API as documented passes (the weight functions give a tensor for a tensor, else
    an array), and each misuse in BAD is found on its line (a feature dimension as a string;
    lds_weights' array, for a list, taken as a tensor; a region's dict taken as a float)."""
    (tmp_path / "good.py").write_text(textwrap.dedent(GOOD).lstrip())
    (tmp_path / "bad.py").write_text(textwrap.dedent(BAD).lstrip())  # BAD's first line is line 1
    env = dict(os.environ, MYPYPATH=ROOT)
    command = [sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "cache"), "--follow-imports=silent",
               "--ignore-missing-imports", "--no-error-summary", "--hide-error-context", "good.py", "bad.py"]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    errors = [line for line in done.stdout.splitlines() if ": error:" in line]
    assert done.returncode == 1 and not done.stderr, done.stdout + done.stderr
    assert [line.split(": error:")[0] for line in errors] == ["bad.py:6", "bad.py:7", "bad.py:8"], errors
    assert 'Argument 1 to "FDS" has incompatible type "str"; expected "int"' in errors[0]


def test_dirfast_type_checks(tmp_path):
    """mypy on dirfast's own code, with the project's settings (pyproject.toml): no errors, so an
    annotation that no longer matches its body shows here."""
    command = [sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "cache"), "dirfast"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
