"""What the source distribution carries (everything a build from it compiles) and what a wheel
carries (every file of the package, its py.typed marker included, and nothing an earlier build
left behind)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOP_LEVEL = ("setup.py", "pyproject.toml", "README.md", "LICENSE", "MANIFEST.in")


def _sources() -> set:
    """Every file of the checkout that a build reads: the C++ and CUDA sources and headers, the
    package's modules, the build files (no caches, no built libraries)."""
    found = set(TOP_LEVEL)
    for folder in ("csrc", "src", "dirfast"):
        for path in (ROOT / folder).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix not in (".so", ".o", ".pyc"):
                found.add(path.relative_to(ROOT).as_posix())
    return found


def test_the_sdist_carries_every_source_and_no_tests(tmp_path):
    # From a copy of the sources alone (as a fresh clone has them), with no extension configured
    # (DIRFAST_NO_EXT=1): MANIFEST.in, not the extensions' source lists, must bring every file.
    tree, sources = tmp_path / "tree", _sources()
    for name in sources | {"tests/conftest.py"}:
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, tree / name)
    env = dict(os.environ, DIRFAST_NO_EXT="1")
    subprocess.run([sys.executable, "setup.py", "-q", "sdist", "--dist-dir", str(tmp_path / "dist")], cwd=tree,
                   env=env, check=True, capture_output=True)
    (archive,) = (tmp_path / "dist").glob("dirfast-*.tar.gz")
    with tarfile.open(archive) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    assert sources - names == set()
    assert not any(name.startswith("tests/") for name in names)


def test_a_wheel_carries_the_package_and_nothing_an_earlier_build_left(tmp_path):
    # pip builds in the checkout and setuptools packs all of build/lib*/: a CUDA kernels' library
    # from a build against a CUDA torch, or a module since removed, must not reach a later wheel.
    # Pure Python (DIRFAST_NO_EXT=1) builds in seconds; a build with the kernels goes the same way.
    tree = tmp_path / "tree"
    for name in _sources():
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, tree / name)
    left = tree / "build" / "lib" / "dirfast"
    left.mkdir(parents=True)
    (left / "_C_cuda.abi3.so").write_text("a library of an earlier build")
    (left / "removed_module.py").write_text("x = 1")
    env = dict(os.environ, DIRFAST_NO_EXT="1")
    subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-q",
                    "--wheel-dir", str(tmp_path / "dist")], cwd=tree, env=env, check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("dirfast-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    package = {name for name in _sources() if name.startswith("dirfast/")}
    assert "dirfast/py.typed" in package and package - names == set(), sorted(package - names)
    assert not {"dirfast/_C_cuda.abi3.so", "dirfast/removed_module.py"} & names, sorted(names)
