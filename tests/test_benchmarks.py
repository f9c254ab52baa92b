"""The benchmark commands run (tiny sizes): benchmarks.run, benchmarks.balanced_mse, benchmarks.gpu
on the CPU, one training run of every method of benchmarks.accuracy, benchmarks.density_table,
and the rules of their one timer (benchmarks.timing). What they measure is not asserted here."""

import os
import subprocess
import sys

import pytest

from benchmarks import accuracy, density_table, real_labels, timing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(*args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def run_module(*args):
    result = run_python("-m", *args)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_benchmarks_run():
    out = run_module("benchmarks.run", "--quick", "--ops", "bin_stats,calibrate", "--sizes", "512x8", "--check")
    assert "published" in out and "clone" in out


def test_benchmarks_balanced_mse():
    out = run_module("benchmarks.balanced_mse", "--quick", "--shape", "2,1,8,10")
    assert "published" in out and "dirfast-reference" in out and "load:" in out


def test_benchmarks_pairwise():
    from benchmarks import pairwise

    for loss in ("rnc", "conr", "ranksim"):
        rows = pairwise.run_case(loss, 16, 4, "cpu", quick=True, with_compiled=False)
        assert [row["provider"] for row in rows][0] == "published" and len(rows) >= 2
        for row in rows[1:]:  # every provider computes the published loss and gradient
            assert row["value_difference"] < 1e-5 and row["max_grad_difference"] < 1e-4, row


def test_benchmarks_gpu_script_runs_on_the_cpu():
    out = run_module("benchmarks.gpu", "--device", "cpu", "--scale", "4096", "--quick")
    assert "FDS epoch update" in out and "published" in out and "GPU backends by speed" in out


def _contenders(log, names="abc"):
    return {name: timing.Contender(lambda name=name: log.append(name)) for name in names}


def test_timer_interleaves_contenders_in_rotating_order():
    """A warm-up and a calibration call each, then rounds of one block per contender, the order
    rotated by one each round; one sample per round."""
    log = []
    out = timing.compare(_contenders(log), timing.Rules(repeats=3, min_block_s=0.0, budget_s=0.0))
    assert log == list("aabbcc") + list("abc") + list("bca") + list("cab")
    assert all(len(t.samples) == 3 and t.inner == 1 for t in out.values())


def test_timer_blocks_are_long_enough_and_failures_stay_apart():
    log = []
    calls = _contenders(log, "a")
    calls["bad"] = timing.Contender(lambda: 1 / 0)
    out = timing.compare(calls, timing.Rules(repeats=3, min_block_s=0.002, budget_s=0.0))
    assert isinstance(out["bad"], ZeroDivisionError)
    assert out["a"].inner > 1 and len(log) >= 3 * out["a"].inner
    with pytest.raises(ValueError, match="at least 3"):
        timing.Rules(repeats=1, min_block_s=0.0, budget_s=0.0)  # never a single sample


def test_load_report_warns_when_the_machine_is_busy(monkeypatch):
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    line, busy = timing.load_report("cpu")
    assert line.startswith("load:") and not busy and "WARNING" not in line
    monkeypatch.setattr(os, "getloadavg", lambda: (os.cpu_count() + 1.0, 1.0, 1.0))
    line, busy = timing.load_report("cpu")
    assert busy and "WARNING: the machine is busy" in line


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
    stdout = run_module("benchmarks.density_table", "--quick", "--out", str(out))
    text = out.read_text()
    assert text.rstrip("\n") == stdout.rstrip("\n") and "| 30 |" in text and "| 2.5 |" in text


def test_density_table_without_the_package(tmp_path, monkeypatch):
    ages = train_ages()
    monkeypatch.setattr(density_table, "package", lambda: None)
    out = tmp_path / "table.md"
    assert density_table.main(["--out", str(out)]) == 0
    text = out.read_text()
    assert text.count("not installed") == 2 and f"| 30 | {int((ages == 30).sum())} |" in text
    assert "denseweight's bandwidth" not in text and "### Time" not in text


def test_tools_need_the_label_files_and_say_so(tmp_path, capsys):
    """Without the team's label files (an empty --data), density_table and make_plots exit 1
    with one line and write nothing; their --help names the label files."""
    with pytest.raises(SystemExit):
        density_table.main(["--help"])
    assert "real label files" in capsys.readouterr().out
    assert density_table.main(["--data", str(tmp_path), "--out", str(tmp_path / "table.md")]) == 1
    message = capsys.readouterr().err
    assert len(message.strip().splitlines()) == 1 and "--data" in message
    result = run_python("docs/make_plots.py", "--data", str(tmp_path), "--out", str(tmp_path / "images"))
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not list(tmp_path.iterdir())
