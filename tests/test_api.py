"""The package surface: backends(), set_backend / use_backend, import without optional parts."""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import dirfast
import dirfast.reference
from testing import BACKEND_NAMES, backend_params, rand_bins, rand_features

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_public_api_names():
    for name in ["get_lds_kernel_window", "kernel_window", "Binning", "lds_weights", "LDS", "FDS", "losses", "metrics",
                 "ops", "backends", "set_backend", "use_backend"]:
        assert hasattr(dirfast, name), name
    for name in ["bin_stats", "smooth_bins", "calibrate"]:
        assert callable(getattr(dirfast.ops, name)), name
        assert callable(getattr(dirfast.reference, name)), name
        assert hasattr(torch.ops.dirfast, name), name
    for name in ["weighted_mse_loss", "weighted_l1_loss", "weighted_focal_mse_loss", "weighted_focal_l1_loss",
                 "weighted_huber_loss"]:
        assert callable(getattr(dirfast.losses, name)), name
    assert callable(dirfast.metrics.shot_metrics)


def test_backends_report():
    report = dirfast.backends()
    assert set(BACKEND_NAMES) <= set(report)
    for name, info in report.items():
        assert isinstance(info["available"], bool), name
        assert isinstance(info["reason"], str), name
        if not info["available"]:
            assert info["reason"].strip(), f"{name}: unavailable without a reason"
    assert report["reference"]["available"]
    assert isinstance(report["cuda"]["compiled"], bool)
    if not torch.cuda.is_available():
        assert not report["cuda"]["available"]
    if report["cuda"]["available"]:
        assert report["cuda"]["compiled"]


@pytest.mark.parametrize("name", list(backend_params()))
def test_set_backend_available(name):
    dirfast.set_backend(name)
    assert dirfast.get_backend() == name
    dirfast.set_backend("auto")
    assert dirfast.get_backend() == "auto"


def spy_on_reference(monkeypatch, name: str) -> list:
    """Replace dirfast.reference.<name> by a wrapper that records its calls; returns the record."""
    calls = []
    original = getattr(dirfast.reference, name)

    def spy(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(dirfast.reference, name, spy)
    return calls


def test_use_backend_restores(monkeypatch):
    calls = spy_on_reference(monkeypatch, "bin_stats")
    x, idx = rand_features(10, 2), rand_bins(10, 3)
    with dirfast.use_backend("reference"):
        assert dirfast.get_backend() == "reference"
        dirfast.ops.bin_stats(x, idx, 3)
        with dirfast.use_backend("auto"):
            assert dirfast.get_backend() == "auto"
        assert dirfast.get_backend() == "reference"
    assert len(calls) == 1, "the reference backend calls dirfast.reference directly"
    assert dirfast.get_backend() == "auto"
    with pytest.raises(KeyError):
        with dirfast.use_backend("reference"):
            raise KeyError("boom")
    assert dirfast.get_backend() == "auto", "restored after an exception"
    dirfast.set_backend("reference")
    with dirfast.use_backend("auto"):
        pass
    assert dirfast.get_backend() == "reference", "restores the previous selection, not the default"


def _run_python(code, **env):
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = ROOT + os.pathsep + full_env.get("PYTHONPATH", "")
    full_env.update(env)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env,
                         cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


CHECK_OPS = """
    import torch
    x = torch.arange(12.0).reshape(6, 2)
    idx = torch.tensor([0, 0, 1, 2, -1, 2])
    count, mean, var = dirfast.ops.bin_stats(x, idx, 3)
    w = dirfast.kernel_window("gaussian", 5, 2.0, normalize="sum")
    sm = dirfast.ops.smooth_bins(mean, w)
    out = dirfast.ops.calibrate(x, idx, mean, var + 1, sm, var + 2)
    result["count"] = count.tolist()
    result["mean"] = mean.tolist()
    result["cuda_initialized"] = torch.cuda.is_initialized()
"""


def test_import_with_extension_disabled():
    """DIRFAST_NO_EXT=1: pure Python, the ops defined from Python, cpp/cuda unavailable with a
    reason, and the ops still work."""
    code = textwrap.dedent("""
        import json, dirfast
        result = {"backends": dirfast.backends()}
    """) + textwrap.dedent(CHECK_OPS) + "print(json.dumps(result))\n"
    result = _run_python(code, DIRFAST_NO_EXT="1")
    for name in ("cpp", "cuda"):
        assert not result["backends"][name]["available"]
        assert result["backends"][name]["reason"]
    assert result["backends"]["reference"]["available"]
    assert result["count"] == [2, 1, 2]
    assert result["mean"] == [[1.0, 2.0], [4.0, 5.0], [8.0, 9.0]]
    assert not result["cuda_initialized"]


def test_import_without_extension_and_triton():
    """A machine where dirfast._C was never built and Triton is missing: import works."""
    code = textwrap.dedent("""
        import sys, json
        sys.modules["dirfast._C"] = None   # 'import dirfast._C' now raises ImportError
        sys.modules["triton"] = None
        import dirfast
        result = {"backends": dirfast.backends()}
    """) + textwrap.dedent(CHECK_OPS) + "print(json.dumps(result))\n"
    result = _run_python(code)
    for name in ("cpp", "cuda", "triton"):
        assert not result["backends"][name]["available"], name
        assert result["backends"][name]["reason"], name
    assert result["count"] == [2, 1, 2]
    assert not result["cuda_initialized"]


def test_inplace_backward_runs_on_the_forward_backend(monkeypatch):
    """The backward of calibrate_ runs on the backend of its forward, whatever is selected (or
    in whatever thread autograd runs it) by then."""
    calls = spy_on_reference(monkeypatch, "calibrate")
    x = rand_features(6, 3).requires_grad_(True)
    idx = rand_bins(6, 2)
    stats = (torch.zeros(2, 3), torch.ones(2, 3), torch.zeros(2, 3), torch.full((2, 3), 4.0))
    with dirfast.use_backend("reference"):
        out = dirfast.ops.calibrate_(x * 1.0, idx, *stats)
    calls.clear()
    out.sum().backward()
    assert len(calls) == 1, "the backward called the reference"
    torch.testing.assert_close(x.grad, torch.full_like(x, 2.0))


def _dirfast_imports():
    """{module: {imported dirfast modules and (module, name) pairs}} from the source of every
    module of the package (module-level and deferred imports alike)."""
    import ast
    import pathlib

    root = pathlib.Path(dirfast.__file__).parent
    modules = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        package = name if parts[-1] == "__init__" else name.rsplit(".", 1)[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges |= {(alias.name, None) for alias in node.names if alias.name.startswith("dirfast")}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[:len(anchor) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                if base.startswith("dirfast"):
                    edges |= {(base, alias.name) for alias in node.names}
            elif isinstance(node, ast.Attribute) and node.attr == "import_module":
                edges.add(("importlib", "import_module"))
        modules[name] = edges
    return modules


def test_imports_point_one_way():
    """Public API -> ops front end -> dispatch -> backends -> contract: no import cycle between
    dirfast's modules, no importlib reach-back, no private name or module of another package,
    and no backend importing the front end."""
    modules = _dirfast_imports()

    def target(base, name):
        """The module an import binds: base.name when that is a module (the compiled dirfast._C
        too), else base."""
        if name and f"{base}.{name}" in modules:
            return f"{base}.{name}"
        package = importlib.import_module(base)
        if name and hasattr(package, "__path__") and importlib.util.find_spec(f"{base}.{name}") is not None:
            return f"{base}.{name}"
        return base

    graph = {m: {target(b, n) for b, n in edges if b != "importlib"} - {m} for m, edges in modules.items()}
    for module, edges in modules.items():
        assert ("importlib", "import_module") not in edges, f"{module} imports a module by name"
        package = module if module in ("dirfast",) or hasattr(importlib.import_module(module), "__path__") \
            else module.rsplit(".", 1)[0]
        for base, name in edges:
            if base == "importlib":
                continue
            imported = target(base, name)
            parts = imported.split(".")
            for i, part in enumerate(parts):  # a private module belongs to the package above it
                owner = ".".join(parts[:i])
                if part.startswith("_") and not (module == owner or module.startswith(owner + ".")):
                    raise AssertionError(f"{module} imports {imported}, private to {owner}")
            if name and name.startswith("_") and imported == base and base.rsplit(".", 1)[0] != package:
                raise AssertionError(f"{module} imports the private {name} of {base}")
        if module.startswith("dirfast.triton"):
            assert not any(t.startswith("dirfast.ops") for t in graph[module]), f"{module} imports the front end"
    visiting, done = set(), set()

    def visit(module, path):
        if module in done:
            return
        assert module not in visiting, "import cycle: " + " -> ".join(path + [module])
        visiting.add(module)
        for other in sorted(graph.get(module, ())):
            if other in modules:
                visit(other, path + [module])
        visiting.discard(module)
        done.add(module)

    for module in sorted(modules):
        visit(module, [])
