"""Every README block that starts with "# example:" runs, as a script, to completion and without
a warning; every results file the READMEs quote exists."""

import glob
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _examples():
    with open(os.path.join(ROOT, "README.md")) as handle:
        text = handle.read()
    blocks = re.findall(r"```python\n(# example: ([^\n]+)\n.*?)```", text, flags=re.S)
    return [pytest.param(code, id=name.strip().replace(" ", "-")) for code, name in blocks]


EXAMPLES = _examples()


def test_readme_has_the_examples():
    names = {param.id for param in EXAMPLES}
    assert {"presets", "training-loop", "distributed", "epoch-hooks", "depth-maps", "balanced-mse",
            "fds-after-relu", "several-dimensions", "density-weights", "diagnostics", "pairwise-regularisers"} <= names, names


@pytest.mark.parametrize("code", EXAMPLES)
def test_readme_example_runs(code, tmp_path):
    script = tmp_path / "example.py"
    script.write_text(code)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Warning" not in result.stderr, f"the example prints a warning:\n{result.stderr}"


def _named_results(text):
    """The files a README names in backquotes (`a.md`, `cpu/b-{1,2}thread.txt`, `c-*.txt`), braces
    expanded."""
    def expand(name):
        braces = re.search(r"\{([^}]*)\}", name)
        if not braces:
            return [name]
        return [full for alternative in braces.group(1).split(",")
                for full in expand(name[:braces.start()] + alternative + name[braces.end():])]
    return sorted({full for name in re.findall(r"`([\w./*{},-]+\.(?:md|txt|json))`", text) for full in expand(name)})


@pytest.mark.parametrize("readme", ["README.md", os.path.join("benchmarks", "results", "README.md")])
def test_readme_names_only_files_that_exist(readme):
    """A results file a README quotes is there: under the root, benchmarks/results/ or its cpu/."""
    with open(os.path.join(ROOT, readme)) as handle:
        names = _named_results(handle.read())
    bases = [ROOT] + [os.path.join(ROOT, "benchmarks", "results", *sub) for sub in ([], ["cpu"])]
    missing = [name for name in names if not any(glob.glob(os.path.join(base, name)) for base in bases)]
    assert len(names) > 10 and not missing, missing
