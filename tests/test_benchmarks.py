"""The benchmark commands run (tiny sizes): benchmarks.run, benchmarks.balanced_mse and one
training run of every method of benchmarks.accuracy. What they measure is not asserted here."""

import os
import subprocess
import sys

import pytest

from benchmarks import accuracy

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
