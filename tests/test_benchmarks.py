"""The benchmark commands run (tiny sizes): benchmarks.run, benchmarks.balanced_mse, one
training run of every method of benchmarks.accuracy, and benchmarks.density_table. What they
measure is not asserted here."""

import os
import subprocess
import sys

import pytest

from benchmarks import accuracy, density_table, real_labels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_module(*args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_benchmarks_run():
    out = run_module("benchmarks.run", "--quick", "--ops", "bin_stats,calibrate", "--sizes", "512x8", "--check")
    assert "published" in out and "clone" in out


def test_benchmarks_balanced_mse():
    out = run_module("benchmarks.balanced_mse", "--quick", "--shape", "2,1,8,10")
    assert "published" in out and "dirfast-reference" in out


@pytest.mark.parametrize("method", accuracy.METHODS)
def test_accuracy_method_trains(method):
    """Each method of the accuracy benchmark beats a constant prediction of 5 (test MSE 100 / 12)."""
    result = accuracy.run_one(("normal", 0, method, "fast"))
    assert result["method"] == method and 0 <= result["test_mse"] < 100 / 12


def train_ages():
    ages, scores = real_labels.agedb_ages("train"), real_labels.stsb_scores("train")
    if ages is None or scores is None:
        pytest.skip(f"the AgeDB-DIR or STS-B-DIR labels are not under {real_labels.DATA}")
    return ages


def test_density_table_runs(tmp_path):
    train_ages()
    out = tmp_path / "table.md"
    stdout = run_module("benchmarks.density_table", "--out", str(out))
    text = out.read_text()
    assert text.rstrip("\n") == stdout.rstrip("\n") and "| 30 |" in text and "| 2.5 |" in text


def test_density_table_without_the_package_or_the_labels(tmp_path, monkeypatch, capsys):
    ages = train_ages()
    monkeypatch.setattr(density_table, "package", lambda: None)
    out = tmp_path / "table.md"
    assert density_table.main(["--out", str(out)]) == 0
    text = out.read_text()
    assert text.count("not installed") == 2 and f"| 30 | {int((ages == 30).sum())} |" in text
    assert "denseweight's bandwidth" not in text and "### Time" not in text
    monkeypatch.setattr(real_labels, "agedb_ages", lambda *args, **kwargs: None)
    capsys.readouterr()
    assert density_table.main(["--out", str(tmp_path / "none.md")]) == 0
    assert "not found" in capsys.readouterr().out and not (tmp_path / "none.md").exists()
