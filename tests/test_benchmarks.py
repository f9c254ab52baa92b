"""The benchmark commands run (tiny sizes): benchmarks.run, benchmarks.balanced_mse,
benchmarks.fds_accumulate, benchmarks.threads, benchmarks.binning, benchmarks.gpu on the CPU, one
training run of every method of benchmarks.accuracy, benchmarks.density_table, and the rules of
their one timer (benchmarks.timing). What they measure is not asserted here."""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from benchmarks import accuracy, density_table, real_labels, timing, vectorised

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(*args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def run_module(*args):
    result = run_python("-m", *args)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_benchmarks_run():
    out = run_module("benchmarks.run", "--quick", "--ops", "bin_stats,calibrate,calibrate_,fds_epoch,fds_smooth",
                     "--sizes", "512x8", "--bins", "97,300", "--check")
    table = out[out.index("case "):]
    for row in ("published", "torch", "compiled", "cpp", "clone", "read pass", "in-place pass", "300 bins",
                "fds_smooth 512x8 300 bins", "x yardstick", "x faster than alternative"):
        assert row in table, row
    assert table.count("vs reference") == 8, "every compiled formulation is checked before it is timed"
    assert "MISMATCH" not in out and "failed" not in out


def test_benchmarks_run_mixture_and_density():
    out = run_module("benchmarks.run", "--quick", "--ops", "mixture_logpdf,density", "--mixture-sizes", "64x30",
                     "--K", "4,9", "--labels", "500", "--providers", "published,torch,compiled,cpp,exp limit,FFTKDE,"
                     "dirfast,dirfast fit")
    table = out[out.index("case "):]
    for row in ("mixture_logpdf 64x30 K=4", "mixture_logpdf 64x30 K=9", "exp limit", "density 500 labels",
                "dirfast fit"):
        assert row in table, row
    assert table.count("vs reference") == 2 and "failed" not in out
    assert ("p' ok" in table) == (importlib.util.find_spec("KDEpy") is not None), "FFTKDE's density is checked"


def test_benchmarks_binning(capsys):
    """benchmarks.binning on a few labels, in this process: a uniform, an integer and a grid
    case, every provider checked against dirfast's bins before it is timed; a --cases that
    matches nothing is a usage error."""
    from benchmarks import binning

    binning.main(["--quick", "--labels", "300", "--cases", "float32 (FDS),ages,grid"])
    table = capsys.readouterr().out
    lines = table.splitlines()
    for row in ("STS-B scores float32 (FDS)", "ages float32, integer(121)", "two targets, 100 x 100 grid"):
        for provider in ("dirfast", "torch", "compiled", "numpy", "clone"):
            assert any(line.startswith(row) and f" {provider} " in line for line in lines), (row, provider)
    assert table.count("    300 ") == 15
    with pytest.raises(SystemExit):
        binning.main(["--cases", "no such case"])
    assert "matches none of" in capsys.readouterr().err


def test_a_compiled_formulation_that_differs_fails_and_is_not_timed(monkeypatch):
    from benchmarks import alternatives, cases, run

    wrong = lambda x, *rest: vectorised.torch_calibrate(x * 1.01, *rest)  # noqa: E731
    monkeypatch.setattr(alternatives, "compiled", lambda op: wrong)
    case = cases.Case("calibrate", "64x4", "cpu", bins=5)
    rows = run._measure_case(case, ["torch", "compiled"], timing.Rules(3, 0.0, 0.0), check=False)
    assert rows[0]["median_ms"] is not None
    assert rows[1]["median_ms"] is None and rows[1]["note"].startswith("failed: Mismatch")


def test_the_vectorised_formulations_are_the_references():
    """The "torch" and "compiled" formulations of bin_stats (one pass), calibrate_ and
    mixture_logpdf give the dirfast references, dense inputs, rows outside the bins and invalid
    components included."""
    import dirfast

    g = torch.Generator().manual_seed(0)
    x, bins = torch.randn(3, 4, 5, 6, generator=g), torch.randint(-1, 8, (3, 5, 6), generator=g)
    for got, expected in zip(vectorised.torch_bin_stats_moments(x, bins, 7), dirfast.ops.bin_stats(x, bins, 7)):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    stats = [torch.randn(7, 4, generator=g), torch.rand(7, 4, generator=g), torch.randn(7, 4, generator=g),
             torch.rand(7, 4, generator=g)]
    stats[1][2] = 0  # a bin left unchanged
    expected = dirfast.ops.calibrate(x, bins, *stats)
    work = x.clone()
    assert vectorised.torch_calibrate_(work, bins, *stats) is work
    torch.testing.assert_close(work, expected)
    means, variances = torch.linspace(-1, 1, 5), torch.rand(5, generator=g) + 0.1
    log_weights = torch.randn(5, generator=g)
    for lw, v in ((log_weights, variances), (torch.full((5,), -torch.inf), variances),
                  (log_weights, torch.where(torch.arange(5) == 2, 0.0, variances))):
        with dirfast.use_backend("reference"):
            expected = dirfast.ops.mixture_logpdf(x, means, v, lw)
        for chunk in (None, 7):
            got = vectorised.torch_mixture_logpdf(x, means, v, lw, chunk)
            torch.testing.assert_close(got, expected, equal_nan=True)


def test_the_exp_limit_is_scaled_to_the_whole_work():
    from benchmarks import alternatives, cases

    limit = alternatives.ExpLimit(10 * alternatives.ExpLimit.CHUNK * alternatives.ExpLimit.REPEATS)
    assert limit.factor == 10 / torch.get_num_threads()
    threads = torch.get_num_threads()
    limit()
    assert torch.get_num_threads() == threads, "one thread while it runs, then the threads of the run"
    timed = cases.scaled(timing.Contender(limit), timing.Timing([1.0, 2.0, 3.0]))
    assert timed.median_ms == pytest.approx(2e3 * limit.factor)


def test_the_in_place_pass_is_timed_as_calibrate_is():
    from benchmarks import cases

    case = next(c for c in cases.cases(("calibrate_",), ["64x4"], ["cpu"], [97], [5], ["2x1x3x3"], [100]))
    op, yardstick = cases.runner(case, "reference"), cases.runner(case, "in-place pass")
    assert op.setup is not None and yardstick.setup is not None, "both restore their copy before each call"
    work = yardstick.fn()
    work.add_(1)
    yardstick.setup()
    assert torch.equal(work, cases.inputs("64x4", "cpu")["x"]), "the pass's copy is x again before each call"


def test_the_sweeps_name_their_cases():
    from benchmarks import cases

    found = [case.name for case in cases.cases(("bin_stats", "fds_epoch", "mixture_logpdf", "density"),
                                                ["64x4", "2x4x3x3"], ["cpu"], [97, 300], [5], ["2x1x3x3"], [100])]
    assert found == ["bin_stats 64x4", "bin_stats 64x4 300 bins", "bin_stats 2x4x3x3", "fds_epoch 64x4",
                     "fds_epoch 2x4x3x3", "mixture_logpdf 2x1x3x3 K=5", "density 100 labels"]


def test_benchmarks_balanced_mse():
    out = run_module("benchmarks.balanced_mse", "--quick", "--shape", "2,1,8,10", "--batches", "16", "--md-rows",
                     "12,20", "--dims", "3")
    table = out[out.index("case "):]
    scalar = ("published", "compiled", "dirfast-reference", "dirfast-cpp", "clone")
    for case, names in [*((case, scalar) for case in ("bmc 16x1", "bni 2x1x8x10", "gai 2x1x8x10")),
                        *((case, ("published", "compiled", "dirfast", "clone")) for case in ("bmc 12x3", "gai 20x3"))]:
        for provider in names:
            assert any(line.startswith(case) and line.split()[2] == provider for line in table.splitlines()), \
                (case, provider)
    assert "load:" in out


def test_benchmarks_fds_accumulate():
    out = run_module("benchmarks.fds_accumulate", "--quick", "--size", "64x8", "--buckets", "40,300")
    table = out[out.index("size "):]
    for k in ("40", "300"):  # fewer rows than buckets, and more
        for row in ("accumulate cpp", "accumulate reference", "torch", "compiled", "bin_stats, all buckets", "clone"):
            assert any(line.split()[1:2] == [k] and row in line for line in table.splitlines()), (k, row)


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


def test_timer_runs_each_contender_on_its_threads():
    """A contender with threads runs every call (warm-up, calibration, rounds) on them; the
    process's threads are set back after each block, and a contender without keeps them."""
    before = torch.get_num_threads()
    seen = {1: set(), 2: set(), None: set()}
    calls = {n: timing.Contender(lambda n=n: seen[n].add(torch.get_num_threads()), threads=n) for n in (1, 2)}
    calls[None] = timing.Contender(lambda: seen[None].add(torch.get_num_threads()))
    timing.compare(calls, timing.Rules(repeats=3, min_block_s=0.0, budget_s=0.0))
    assert seen == {1: {1}, 2: {2}, None: {before}}
    assert torch.get_num_threads() == before


def test_benchmarks_threads():
    out = run_module("benchmarks.threads", "--quick", "--threads", "1,2", "--cpu-threads", "all", "--sizes", "64x8",
                     "--bins", "97,300", "--ops", "bin_stats,calibrate_,fds_smooth,mixture_logpdf,density", "--K", "10",
                     "--mixture-sizes", "16x30", "--labels", "300")
    table = out[out.index("case "):]
    for case in ("bin_stats 64x8", "bin_stats 64x8 300 bins", "calibrate_ 64x8 300 bins", "fds_smooth 64x8 300 bins",
                 "mixture_logpdf 16x30 K=10", "density 300"):
        for threads in ("1", "2"):  # each case on each thread count, its speed-up over one thread
            assert any(line.startswith(case + " ") and line.split()[-3] == threads for line in table.splitlines()), \
                (case, threads)
    assert "slower than on 1 thread: " in table and "load:" in out and "cpu threads all," in out
    for bad in (["--threads", "2"], ["--threads", "2,1"], ["--ops", "fds_epoch"], ["--cpu-threads", "some"]):
        result = run_python("-m", "benchmarks.threads", *bad)
        assert result.returncode == 2 and "error:" in result.stderr, bad


def test_benchmarks_threads_skips_a_case_that_cannot_run(monkeypatch, capsys):
    from benchmarks import cases, threads

    def unavailable(case, provider):
        raise cases.Unavailable("not built here")

    monkeypatch.setattr(cases, "runner", unavailable)
    before = torch.get_num_threads()
    try:
        threads.main(["--quick", "--ops", "bin_stats", "--sizes", "64x8", "--bins", "97"])
    finally:
        torch.set_num_threads(before)
    out = capsys.readouterr().out
    assert "bin_stats 64x8: skipped: not built here" in out and "slower than on 1 thread: none" in out


def test_load_report_warns_when_the_machine_is_busy(monkeypatch):
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    monkeypatch.setattr(timing, "others_busy", lambda: pytest.fail("a quiet load average is not checked again"))
    line, busy = timing.load_report("cpu")
    assert line.startswith("load:") and not busy and "WARNING" not in line
    monkeypatch.setattr(os, "getloadavg", lambda: (os.cpu_count() + 1.0, 1.0, 1.0))
    for measured, expected in ((os.cpu_count() + 1.0, True), (None, True), (0.1, False)):
        monkeypatch.setattr(timing, "others_busy", lambda: measured)
        line, busy = timing.load_report("cpu")
        assert busy == expected and ("WARNING: the machine is busy" in line) == expected, measured


def test_others_busy_counts_the_cores_other_work_used(monkeypatch, tmp_path):
    stat = tmp_path / "stat"
    stat.write_text("cpu  10 1 20 300 40 5 6 7 0 0\ncpu0 1 1 1 1 1 1 1 1 0 0\n")
    assert timing._cpu_jiffies(str(stat)) == (49, 389), "idle and I/O wait are not busy; steal is"
    assert timing._cpu_jiffies(os.devnull) is None
    # 2 of 4 cores busy over the window (busy, total jiffies); then /proc/stat unreadable.
    readings = iter([(1000, 4000), (1200, 4400)])
    monkeypatch.setattr(timing, "_cpu_jiffies", lambda: next(readings))
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    assert timing.others_busy(0.01) == pytest.approx(2.0, abs=0.5)
    monkeypatch.setattr(timing, "_cpu_jiffies", lambda: None)
    assert timing.others_busy(0.01) is None


def test_results_name_the_cpu_generation(tmp_path):
    """'AMD EPYC' alone hid which host a result came from: the first processor's family and
    model, and torch's vector ISA, go with every result (only the ISA where there is no cpuinfo)."""
    capability = torch.backends.cpu.get_cpu_capability()
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\ncpu family\t: 25\nmodel\t\t: 17\nmodel name\t: AMD EPYC\n\n"
                       "processor\t: 1\ncpu family\t: 23\nmodel\t\t: 49\n")
    assert timing.cpu_identity(str(cpuinfo)) == f"family 25 model 17, {capability}"
    assert timing.cpu_identity(str(tmp_path / "absent")) == capability
    assert timing.machine_info()["cpu_id"] == timing.cpu_identity()


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
