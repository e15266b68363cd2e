"""``moecap compare``: two real quickstart runs on this CPU, and copies of one with regressions injected.

The injected changes retime a run consistently: every timestamp of its traces goes through one
monotone warp, and the record's figures are recomputed from the warped traces with moecap's own
metric functions, so figures and samples tell the same story, as they would after a real slowdown.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from moecap.compare import MIN_SAMPLES, Samples, main, parse_threshold, shift_test
from moecap.retime import hiccup, retime_results, slower

# enough prompts that every gated timing figure has >= MIN_SAMPLES samples at batch 4 (6 batches)
RUN_ARGS = [
    "--set", "workloads.0.num_prompts=24",
    "--set", "workloads.0.output_tokens=8",
    "--set", "workloads.1.perplexity.max_windows=16",
    "--set", "workloads.1.lm_eval.limit=20",
    "--repeat", "1",  # one repetition: the gate falls back to the traces (repetitions: repeated_runs below)
]
SUITE = "quickstart"


def run_quickstart(out: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "moecap", "run", SUITE, "-o", str(out), *RUN_ARGS],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tiny_moe_dir):
    """The quickstart suite run twice, back to back, into two folders."""
    base = tmp_path_factory.mktemp("baseline")
    cur = tmp_path_factory.mktemp("current")
    run_quickstart(base)
    run_quickstart(cur)
    return base, cur


def compare(capsys, *argv: str) -> tuple[int, str, str]:
    """The real command line in this process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse's usage errors
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, out, err


def compare_json(capsys, *argv: str) -> tuple[int, dict]:
    rc, out, err = compare(capsys, *argv, "--format", "json")
    assert rc in (0, 1, 3), err
    return rc, json.loads(out)


def rows(data: dict, metric: str) -> list[dict]:
    return [m for c in data["cells"] for m in c["metrics"] if m["metric"] == metric]


def perf_records(root: Path) -> list[Path]:
    return [p for p in sorted((root / SUITE).glob("*.json")) if json.loads(p.read_text())["artifacts"].get("passes")]


def retime(src: Path, dst: Path, warp_for, run_id: str | None = None) -> Path:
    """A copy of the result folder ``src`` with every performance record's traces warped and its
    figures recomputed from them (``moecap.retime``: the calibration benchmark injects with it too)."""
    return retime_results(src, dst, warp_for, run_id)


# ---------------------------------------------------------------------------------------------------


def test_two_real_runs(two_runs, tmp_path):
    """Two runs of the same suite through the real CLI (python -m moecap.compare): every cell matched and
    compared on its traces, the deterministic quality figures unchanged, and no gated regression that
    rests on noise. A strict exit 0 would be a timed assert on a shared machine: another process can
    make the second run really slower, and then a flagged regression is the right answer; so the test
    checks that any flagged regression is backed by a significant shift beyond its threshold."""
    base, cur = two_runs
    report = tmp_path / "report.md"
    proc = subprocess.run([sys.executable, "-m", "moecap.compare", str(base), str(cur), "--report", str(report)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode in (0, 1), proc.stderr
    assert report.read_text() == proc.stdout
    assert proc.stdout.startswith("# moecap compare")
    assert "| metric | gated | baseline | current | change |" in proc.stdout

    proc = subprocess.run([sys.executable, "-m", "moecap.compare", str(base), str(cur), "--format", "json"],
                          capture_output=True, text=True, timeout=300)
    data = json.loads(proc.stdout)
    assert data["exit_status"] == proc.returncode
    assert [c["status"] for c in data["cells"]] == ["compared"] * 3
    by_desc = {c["description"]: c for c in data["cells"]}
    quality = next(c for d, c in by_desc.items() if "quality" in d)
    assert {m["metric"] for m in quality["metrics"]} >= {"ppl:tiny-code", "ppl:tiny-prose", "ppl:tiny-c",
                                                         "moecap_real_code:acc"}
    for m in quality["metrics"]:  # same model, same data, same seed: the same numbers
        assert m["gated"] and m["verdict"] == "ok" and m["change"] == 0, m

    for cell in data["cells"]:
        if cell is quality:
            continue
        gated = {m["metric"]: m for m in cell["metrics"] if m["gated"]}
        assert set(gated) == {"output_tokens_per_s", "ttft_ms_p50", "ttft_ms_p99", "tpot_ms_p50",
                              "tpot_ms_p99", "s_mbu_prefill", "s_mbu_decode"}
        for m in gated.values():  # every gated timing figure was judged on paired samples
            sig = m["significance"]
            assert sig["tested"] and sig["paired"] and sig["n_baseline"] >= MIN_SAMPLES, m
            assert "paired bootstrap" in m["basis"]
    regressions = [m for c in data["cells"] for m in c["metrics"] if m["verdict"] == "regression"]
    for m in regressions:  # a real, consistent slowdown of the second run, never an outlier or jitter
        assert m["significance"]["significant"] and m["significance"]["ci"][0] > 1, m
    assert data["exit_status"] == (1 if regressions else 0)


def test_injected_10_percent_slowdown_is_flagged(two_runs, tmp_path, capsys):
    _, cur = two_runs
    slow = retime(cur, tmp_path / "slow", slower(1.1))
    for path in perf_records(slow):  # the injection is what it says: 10 % slower
        rec = json.loads(path.read_text())
        orig = json.loads((cur / SUITE / path.name).read_text())
        assert rec["report"]["throughput"]["output_tokens_per_s"] == pytest.approx(
            orig["report"]["throughput"]["output_tokens_per_s"] / 1.1)
        assert rec["report"]["utilization"]["decode"]["s_mbu"] == pytest.approx(
            orig["report"]["utilization"]["decode"]["s_mbu"] / 1.1)

    report = tmp_path / "cmp.json"
    rc, out, err = compare(capsys, cur, slow, "--format", "json", "--report", report)
    assert rc == 1, out + err
    data = json.loads(out)
    assert json.loads(report.read_text()) == data and data["exit_status"] == 1
    thr = rows(data, "output_tokens_per_s")
    assert len(thr) == 2
    for m in thr:
        assert m["verdict"] == "regression" and m["gated"]
        assert m["change"] == pytest.approx(1 / 1.1 - 1)
        sig = m["significance"]
        assert sig["paired"] and sig["significant"] and sig["time_ratio"] == pytest.approx(1.1)
    for m in rows(data, "s_mbu_decode"):
        assert m["verdict"] == "regression"
    assert all(m["verdict"] == "ok" for m in rows(data, "ppl:tiny-code"))

    rc, out, _ = compare(capsys, cur, slow)
    assert rc == 1 and "**❌" in out and "## Gated findings" in out
    assert any(line.startswith("| output_tokens_per_s | yes |") and "❌ regression" in line
               for line in out.splitlines())

    # the gate is configurable: a wider threshold, or a gate on other metrics, lets it pass
    rc, data = compare_json(capsys, cur, slow, "--gate", "output_tokens_per_s", "--threshold", "output_tokens_per_s=15")
    assert rc == 0 and all(m["verdict"] == "ok" and m["threshold"] == 0.15 for m in rows(data, "output_tokens_per_s"))
    rc, data = compare_json(capsys, cur, slow, "--gate", "none")
    assert rc == 0 and all(m["verdict"] == "reported" and not m["gated"] for m in rows(data, "output_tokens_per_s"))
    rc, data = compare_json(capsys, cur, slow, "--gate", "quality")
    assert rc == 0
    rc, data = compare_json(capsys, cur, slow, "--gate", "quality", "--gate", "throughput")
    assert rc == 1 and all(m["verdict"] == "regression" for m in rows(data, "total_tokens_per_s"))
    rc, data = compare_json(capsys, cur, slow, "--no-gate", "*")
    assert rc == 0
    rc, data = compare_json(capsys, cur, slow, "--no-gate", "all")
    assert rc == 0
    rc, data = compare_json(capsys, cur, slow, "--gate", "default", "--no-gate", "throughput", "--no-gate", "latency",
                            "--no-gate", "utilization")
    assert rc == 0 and all(m["verdict"] == "reported" for m in rows(data, "output_tokens_per_s"))
    assert all(m["gated"] for m in rows(data, "ppl:tiny-code"))
    rc, data = compare_json(capsys, cur, slow, "--gate", "ttft_ms_p50", "--threshold", "latency=5%")
    assert rc == 1 and {m["metric"] for c in data["cells"] for m in c["metrics"] if m["verdict"] == "regression"} \
        == {"ttft_ms_p50"}
    rc, data = compare_json(capsys, cur, slow, "--gate", "ppl:wikitext2")
    assert rc == 0 and any("'ppl:wikitext2' matched no metric" in n for n in data["notes"])


def test_history_is_the_run_to_run_noise(two_runs, tmp_path, capsys):
    """A whole run shifted by the machine (another tenant) moves every pass alike, which no within-run
    test can tell from a regression. Earlier runs of the same cell (--history) show how far identical
    runs wander: a slowdown inside that spread is noise, one well beyond it is caught, and the report
    says the smallest change the data could catch. The baseline's own run is never its own history."""
    _, cur = two_runs
    slow = retime(cur, tmp_path / "slow", slower(1.1))
    rc, data = compare_json(capsys, cur, slow)
    assert rc == 1  # alone, a 10 % slower run is a regression
    wide = [retime(cur, tmp_path / f"wide{i}", slower(f), f"past-wide-{i}") for i, f in enumerate((1.06, 0.95))]
    history = [a for p in wide for a in ("--history", str(p))]
    rc, data = compare_json(capsys, cur, slow, *history)
    assert rc == 0, [m for c in data["cells"] for m in c["metrics"] if m["verdict"] == "regression"]
    for m in rows(data, "output_tokens_per_s"):
        sig = m["significance"]
        assert sig["kind"] == "runs" and sig["source"] == "run-to-run spread" and sig["n_history_runs"] == 2
        assert sig["worse_factor"] == pytest.approx(1.1) and not sig["significant"]
        assert sig["run_to_run_sd"] == pytest.approx(0.0548, abs=0.002)  # logs of 1/1.06, 1/0.95, 1
        assert sig["detectable_change"] > 0.3 and m["verdict"] == "noise"
    assert any("warning: the history gives 2 earlier runs" in n for n in data["notes"])
    rc, out, _ = compare(capsys, cur, slow, *history)
    assert "| detects |" in out and "run-to-run spread of 2 earlier runs" in out
    much_slower = retime(cur, tmp_path / "much", slower(1.6), "much-slower")
    rc, data = compare_json(capsys, cur, much_slower, *history)
    assert rc == 1 and all(m["verdict"] == "regression" for m in rows(data, "output_tokens_per_s"))

    # a machine that wanders little: the same 10 % slowdown stands out of it
    tight = [retime(cur, tmp_path / f"tight{i}", slower(f), f"past-tight-{i}")
             for i, f in enumerate((1.01, 0.99, 1.015, 0.995, 1.0))]
    history = [a for p in tight for a in ("--history", str(p))]
    rc, data = compare_json(capsys, cur, slow, *history)
    assert rc == 1 and not any("warning" in n for n in data["notes"])
    for m in rows(data, "output_tokens_per_s"):
        assert m["verdict"] == "regression" and m["significance"]["significant"]
        assert m["significance"]["detectable_change"] < 0.1

    # the baseline (or the current run) given as its own history is not counted, and is said so
    rc, data = compare_json(capsys, cur, slow, "--history", str(cur), "--history", str(slow))
    assert rc == 1 and any("not counted" in n and "0 of" in n for n in data["notes"])
    assert all(m["significance"]["kind"] == "traces" for m in rows(data, "output_tokens_per_s"))
    # one run given twice counts once
    rc, data = compare_json(capsys, cur, slow, "--history", str(tight[0]), "--history", str(tight[0]))
    assert any("counted once" in n for n in data["notes"])
    rc, out, err = compare(capsys, cur, slow, "--history", str(tmp_path / "nope"))
    assert rc == 2 and "nope" in err


def test_improvement_is_not_flagged(two_runs, tmp_path, capsys):
    _, cur = two_runs
    slow = retime(cur, tmp_path / "slow", slower(1.1))
    rc, data = compare_json(capsys, slow, cur)  # the current run is the faster one
    assert rc == 0 and data["gated_regressions"] == 0
    for m in rows(data, "output_tokens_per_s") + rows(data, "s_mbu_decode"):
        assert m["verdict"] == "improved" and m["change"] == pytest.approx(0.1)
    assert not [m for c in data["cells"] for m in c["metrics"] if m["icon"] != "✅"]


def test_a_single_stalled_pass_is_noise(two_runs, tmp_path, capsys):
    """One decode pass stalls for a fifth of the run: the throughput figure drops far past its threshold,
    but the shift rests on one pass of many, and the paired bootstrap says so."""
    _, cur = two_runs
    stalled = retime(cur, tmp_path / "stalled", hiccup(0.25))
    rc, data = compare_json(capsys, cur, stalled)
    assert rc == 0, [m for c in data["cells"] for m in c["metrics"] if m["verdict"] == "regression"]
    for metric in ("output_tokens_per_s", "s_mbu_decode"):
        for m in rows(data, metric):
            assert m["verdict"] == "noise" and m["change"] < -0.05, m
            assert m["significance"]["tested"] and not m["significance"]["significant"]
    rc, out, _ = compare(capsys, cur, stalled)
    assert rc == 0 and "⚠️ beyond threshold, not significant" in out and "**✅ no gated finding**" in out


def test_cell_that_failed_now_fails_the_gate(two_runs, tmp_path, capsys):
    _, cur = two_runs
    broken = tmp_path / "broken"
    shutil.copytree(cur, broken)
    victim = perf_records(broken)[-1]
    rec = json.loads(victim.read_text())
    rec.update(status="failed", report={}, artifacts={},
               error="Traceback (most recent call last):\n  ...\nRuntimeError: CUDA out of memory")
    victim.write_text(json.dumps(rec))

    rc, out, _ = compare(capsys, cur, broken)
    assert rc == 3  # a finding about the cell, distinct from a figure's regression
    assert "1 cell failed, missing, extra or unreadable" in out and "RuntimeError: CUDA out of memory" in out
    rc, data = compare_json(capsys, cur, broken)
    (failed,) = [c for c in data["cells"] if c["status"] == "failed_now"]
    assert failed["cell_id"] == rec["cell_id"] and failed["failing"]

    # the other way round the baseline is not ok: that cell is skipped, the others pass
    rc, data = compare_json(capsys, broken, cur)
    assert rc == 0
    assert [c["status"] for c in data["cells"]].count("baseline_not_ok") == 1

    # a cell missing from current fails the gate closed (issue 17: it printed "no gated regression", exit 0)
    victim.unlink()
    rc, data = compare_json(capsys, cur, broken)
    assert rc == 3 and [c["status"] for c in data["cells"]].count("only_baseline") == 1


def test_the_gate_fails_closed_on_missing_extra_and_unreadable_cells(two_runs, tmp_path, capsys):
    """Issue 17: CUR lacking 1 or 5 of 6 cells, or holding a truncated record, passed the gate; a
    schema-valid record with an odd field crashed compare with a traceback and exit status 1."""
    _, cur = two_runs
    base = cur  # the same figures on both sides: only the cell findings can fail the gate
    files = sorted((cur / SUITE).glob("*.json"))
    tried = handled = 0
    missed = []
    for keep in (len(files) - 1, 1):  # lacks one cell, lacks all but one
        part = tmp_path / f"part{keep}"
        (part / SUITE).mkdir(parents=True)
        for f in files[:keep]:
            shutil.copy(f, part / SUITE / f.name)
        rc, data = compare_json(capsys, base, part)
        tried += 1
        ok = rc == 3 and [c["status"] for c in data["cells"]].count("only_baseline") == len(files) - keep
        handled += ok
        missed += [] if ok else [(f"keep {keep}", rc, [c["status"] for c in data["cells"]])]
    truncated = tmp_path / "truncated"
    shutil.copytree(cur, truncated)
    victim = sorted((truncated / SUITE).glob("*.json"))[0]
    victim.write_text(victim.read_text()[: len(victim.read_text()) // 2])
    rc, out, err = compare(capsys, base, truncated)
    tried += 1
    ok = rc == 3 and "current record unreadable: not readable JSON" in out and "Traceback" not in out + err
    handled += ok
    missed += [] if ok else [("truncated", rc, out[-600:], err[-300:])]
    odd = tmp_path / "odd"
    shutil.copytree(cur, odd)
    victim = perf_records(odd)[0]
    rec = json.loads(victim.read_text())
    rec["report"]["throughput"]["completed"] = "four"
    victim.write_text(json.dumps(rec))
    rc, out, err = compare(capsys, base, odd)
    tried += 1
    ok = rc == 3 and "report.throughput.completed" in out and "Traceback" not in out + err
    handled += ok
    missed += [] if ok else [("odd field", rc, out[-600:], err[-300:])]
    extra = tmp_path / "extra"
    shutil.copytree(cur, extra)
    rec = json.loads(files[0].read_text())
    rec["cell_id"] = rec["cell_id"] + "x"
    (extra / SUITE / (rec["cell_id"] + ".json")).write_text(json.dumps(rec))
    rc, data = compare_json(capsys, base, extra)
    tried += 1
    ok = rc == 3 and [c["status"] for c in data["cells"]].count("only_current") == 1
    handled += ok
    missed += [] if ok else [("extra", rc, [c["status"] for c in data["cells"]])]
    assert (tried, handled) == (5, 5), missed


def test_an_internal_error_has_its_own_exit_status(two_runs, capsys, monkeypatch):
    from moecap import compare as cmp_mod

    base, cur = two_runs
    monkeypatch.setattr(cmp_mod, "format_markdown", lambda c: 1 / 0)
    rc, out, err = compare(capsys, base, cur)
    assert rc == 4 and "internal error (a bug in moecap" in err and "ZeroDivisionError" in err and out == ""


def test_bad_inputs_exit_2_and_name_the_path(two_runs, tmp_path, capsys):
    base, cur = two_runs
    missing = tmp_path / "no-such-folder"
    rc, out, err = compare(capsys, missing, cur)
    assert rc == 2 and str(missing) in err and "does not exist" in err and "baseline" in err and out == ""
    rc, _, err = compare(capsys, base, missing)
    assert rc == 2 and str(missing) in err and "current" in err

    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "notes.json").write_text('{"not": "a record"}')
    rc, _, err = compare(capsys, empty, cur)
    assert rc == 2 and str(empty) in err and "no moecap records" in err

    other = tmp_path / "other-suite"
    shutil.copytree(cur, other)
    for path in (other / SUITE).glob("*.json"):
        rec = json.loads(path.read_text())
        rec["suite"]["name"] = "renamed"
        path.write_text(json.dumps(rec))
    rc, _, err = compare(capsys, base, other)
    assert rc == 2 and "no cell of current" in err and str(other) in err and "suites: renamed" in err

    rc, _, err = compare(capsys, base)
    assert rc == 2 and "BASELINE and CURRENT" in err

    # a single record file is a valid side
    one = sorted((cur / SUITE).glob("*.json"))[0]
    rc, data = compare_json(capsys, base, one)
    assert [c["status"] for c in data["cells"]].count("compared") == 1


@pytest.mark.parametrize("arg, message", [
    ("throughput", "expected METRIC=PCT"),
    ("=5", "expected METRIC=PCT"),
    ("throughput=abc", "'abc' is not a number"),
    ("no_such_metric=5", "unknown metric 'no_such_metric'"),
    ("ttft_ms_p99=-5", "must be a finite percentage >= 0"),
])
def test_threshold_parse_errors_are_clear(arg, message, capsys, tmp_path):
    rc, out, err = compare(capsys, tmp_path, tmp_path, "--threshold", arg)
    assert rc == 2 and "argument --threshold" in err and message in err and arg in err, err


def test_threshold_and_gate_parsing():
    assert parse_threshold("output_tokens_per_s=7.5%") == ("output_tokens_per_s", 0.075)
    assert parse_threshold("ttft_ms_*=25") == ("ttft_ms_*", 0.25)
    assert parse_threshold(" accuracy = 3 ") == ("accuracy", 0.03)
    assert parse_threshold("moecap_mc_code:acc=1") == ("moecap_mc_code:acc", 0.01)


def test_gate_parse_error(capsys, tmp_path):
    rc, _, err = compare(capsys, tmp_path, tmp_path, "--gate", "throughtput")
    assert rc == 2 and "argument --gate" in err and "unknown metric 'throughtput'" in err


def test_list_metrics(capsys):
    rc, out, _ = compare(capsys, "--list-metrics")
    assert rc == 0 and "output_tokens_per_s" in out and "ppl:<dataset>" in out and "s_mbu_decode" in out


def test_shift_test_on_known_samples():
    """The bootstrap itself, on samples whose answer is known (deterministic: seeded)."""
    keys = [(i,) for i in range(40)]
    base = Samples([1.0 + 0.01 * (i % 7) for i in range(40)], keys, "passes")
    same = shift_test(base, base, "mean")
    assert same.tested and same.paired and same.ratio == 1.0 and not same.significant
    slow = shift_test(base, Samples([1.1 * v for v in base.values], keys, "passes"), "median")
    assert slow.lo == pytest.approx(1.1) and slow.significant
    # unpaired (different passes): still clearly slower
    other = Samples([1.2 + 0.01 * (i % 5) for i in range(30)], [(i, "x") for i in range(30)], "passes")
    t = shift_test(base, other, "median")
    assert not t.paired and t.significant and t.lo > 1.1
    few = shift_test(Samples([1.0] * (MIN_SAMPLES - 1), keys[:MIN_SAMPLES - 1], "passes"),
                     Samples([2.0] * (MIN_SAMPLES - 1), keys[:MIN_SAMPLES - 1], "passes"), "mean")
    assert not few.tested and "too few" in few.describe()


def test_t_quantiles():
    from moecap.compare import t_quantile

    for df, want in ((1, 12.706), (2, 4.303), (3, 3.182), (4, 2.776), (5, 2.571), (10, 2.228), (30, 2.042)):
        assert t_quantile(0.975, df) == pytest.approx(want, rel=0.005)
    assert t_quantile(0.5, 7) == pytest.approx(0.0, abs=1e-12)


def _figures(name: str, base: list[float], cur: list[float], history: list[list[float]] = ()):
    from moecap.compare import Figure, static_by_name
    from moecap.figures import median_interval

    spec = static_by_name()[name]

    def fig(vals):
        return Figure(spec, median_interval(vals)[0], reps=tuple(vals) if len(vals) > 1 else ())
    return spec, fig(base), fig(cur), [fig(h) for h in history]


def test_one_rule_at_the_threshold():
    """A change that is exactly the threshold is within it for every figure, whichever way the figure is
    better and whatever the data: a 10 % slowdown is throughput ×1/1.10, TPOT ×1.10, S-MBU ×1/1.10, and a
    relative threshold is always a slowdown (throughput 5 %: ×1/1.05)."""
    from moecap.compare import OK, REGRESSION, Settings, _CellSampling, compare_metric

    class NoTraces(_CellSampling):
        def __init__(self):
            self.why = "none"

        def test(self, spec):
            return None

    for name, thr in (("output_tokens_per_s", 0.05), ("tpot_ms_p50", 0.10), ("s_mbu_decode", 0.05),
                      ("ttft_ms_p99", 0.20)):
        for reps in (1, 3):
            for scale in (1.0, 7.3, 1e-3):
                spec, fb, fc, _ = _figures(name, [scale * (1 + 0.001 * i) for i in range(reps)], [0.0] * reps)
                worse = 1 + thr
                vals = [v / worse if spec.higher_is_better else v * worse for v in (fb.reps or (fb.value,))]
                _, _, fc, _ = _figures(name, list(fb.reps or (fb.value,)), vals)
                at = compare_metric(name, fb, fc, NoTraces(), Settings())
                assert at.verdict == OK, (name, reps, scale, at.basis)
                past = [v / 1.0001 if spec.higher_is_better else v * 1.0001 for v in vals]
                _, _, fc2, _ = _figures(name, list(fb.reps or (fb.value,)), past)
                beyond = compare_metric(name, fb, fc2, NoTraces(), Settings())
                assert beyond.verdict == REGRESSION, (name, reps, scale, beyond.basis)
    # the threshold of a throughput is a slowdown: -9.1 % is 10 % slower, beyond 5 %; -4.8 % is 5 %
    spec, fb, fc, _ = _figures("output_tokens_per_s", [100.0], [100 / 1.05])
    m = compare_metric("output_tokens_per_s", fb, fc, NoTraces(), Settings())
    assert m.verdict == OK and m.change == pytest.approx(-0.047619, abs=1e-6)


def test_repetitions_decide_with_their_spread():
    """Repetitions give the noise: a shift as large as their spread is noise, one well outside it is a
    regression; the smallest detectable change follows the spread and the counts."""
    from moecap.compare import NOISE, REGRESSION, Settings, compare_metric, run_test

    class NoTraces:
        why = "none"

        def test(self, spec):
            return None

        def why_untested(self, spec):
            return "none"

    noisy = [100.0, 88.0, 112.0, 95.0, 105.0]
    spec, fb, fc, _ = _figures("output_tokens_per_s", noisy, [v / 1.08 for v in noisy[::-1]])
    m = compare_metric("output_tokens_per_s", fb, fc, NoTraces(), Settings())
    assert m.verdict == NOISE and m.test.n_base == 5 and m.test.source == "repetitions"
    assert m.test.factor == pytest.approx(1.08) and m.test.lo < 1 < m.test.hi and m.test.detectable > 0.08
    quiet = [100.0, 100.5, 99.5, 100.2, 99.8]
    spec, fb, fc, _ = _figures("output_tokens_per_s", quiet, [v / 1.08 for v in quiet])
    m = compare_metric("output_tokens_per_s", fb, fc, NoTraces(), Settings())
    assert m.verdict == REGRESSION and m.test.significant and m.test.detectable < 0.08
    more = run_test(spec, *_figures("output_tokens_per_s", noisy * 3, noisy * 3)[1:3], (), 0.05, 0.95)
    fewer = run_test(spec, *_figures("output_tokens_per_s", noisy, noisy)[1:3], (), 0.05, 0.95)
    assert more.detectable < fewer.detectable  # more repetitions, smaller detectable change
    # with history, the larger of the two spreads rules: runs that wander more than repetitions do
    spec, fb, fc, hist = _figures("output_tokens_per_s", quiet, [v / 1.08 for v in quiet],
                                  [[v * f for v in quiet] for f in (0.9, 1.1, 0.95, 1.05)])
    m = compare_metric("output_tokens_per_s", fb, fc, NoTraces(), Settings(), hist)
    assert m.test.source == "run-to-run spread" and m.test.n_history == 4 and m.verdict == NOISE
    # a figure with a zero: no ratio, the threshold decides
    assert isinstance(run_test(spec, *_figures("output_tokens_per_s", [0.0, 1.0], [1.0, 1.0])[1:3], (), 0.05,
                               0.95), str)


def test_import_is_light():
    code = ("import sys, moecap.compare\n"
            "print(','.join(m for m in ('torch', 'transformers', 'numpy', 'scipy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""


REPEAT_ARGS = ["--set", "workloads=[{name: w, source: random, input_tokens: 32, output_tokens: 8, num_prompts: 8, "
               "ignore_eos: true}]", "--set", "loads=[{batch_size: 4}]", "--repeat", "3"]


@pytest.fixture(scope="module")
def repeated_runs(tmp_path_factory, tiny_moe_dir):
    """The quickstart's model at batch 4, three repetitions a run, run twice."""
    out = []
    for side in ("rep-baseline", "rep-current"):
        d = tmp_path_factory.mktemp(side)
        proc = subprocess.run([sys.executable, "-m", "moecap", "run", SUITE, "-o", str(d), *REPEAT_ARGS],
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr
        out.append(d)
    return out


def test_compare_decides_from_repetitions(repeated_runs, tmp_path, capsys):
    """Records with repetitions are judged on them, not on one repetition's traces: every gated timing
    figure's interval comes from the 3 vs 3 repetitions, with its detectable change; a slowdown of every
    repetition by 30 % is caught; the injected copy's repetitions are what the warp made of each."""
    base, cur = repeated_runs
    rec = json.loads(perf_records(base)[0].read_text())
    assert rec["report"]["repetitions"]["n"] == 3 and "passes.r3" in rec["artifacts"]
    rc, data = compare_json(capsys, base, cur)
    gated = [m for c in data["cells"] for m in c["metrics"] if m["gated"]]
    assert gated and all(m["significance"]["kind"] == "runs" for m in gated)
    for m in gated:
        sig = m["significance"]
        assert sig["n_baseline"] == sig["n_current"] == 3 and sig["source"] == "repetitions"
        assert sig["detectable_change"] >= m["threshold"] and sig["df"] == 4
        if m["verdict"] == "regression":  # a real, whole-run slowdown of the second run
            assert sig["significant"]
    slow = retime(cur, tmp_path / "slow", slower(1.3))
    r0 = json.loads(perf_records(cur)[0].read_text())["report"]["repetitions"]["figures"]
    r1 = json.loads(perf_records(slow)[0].read_text())["report"]["repetitions"]["figures"]
    assert [b / a for a, b in zip(r0["tpot_ms_p50"]["values"], r1["tpot_ms_p50"]["values"])] == \
        pytest.approx([1.3] * 3)
    assert r1["output_tokens_per_s"]["median"] == pytest.approx(r0["output_tokens_per_s"]["median"] / 1.3)
    rc, data = compare_json(capsys, cur, slow)
    assert rc == 1
    for m in rows(data, "output_tokens_per_s") + rows(data, "tpot_ms_p50"):
        assert m["verdict"] == "regression" and m["significance"]["worse_factor"] == pytest.approx(1.3)


def test_a_suites_gate_sets_the_thresholds_and_the_command_line_wins(two_runs, tmp_path, capsys):
    """Issue 21: the thresholds a suite carries (``gate.thresholds``, recorded in each record's ``suite``)
    are the comparison's, above each metric's default; ``--threshold`` still wins; the notes say so."""
    _, cur = two_runs
    base = tmp_path / "base"
    shutil.copytree(cur, base)
    for path in (base / SUITE).glob("*.json"):
        rec = json.loads(path.read_text())
        rec["suite"]["gate"] = {"thresholds": {"throughput": 12, "utilization": 12, "latency": 12}, "note": "measured"}
        path.write_text(json.dumps(rec))
    slow = retime(cur, tmp_path / "slow", slower(1.1), "slow")
    rc, data = compare_json(capsys, base, slow)
    assert rc == 0 and all(m["threshold"] == 0.12 and m["verdict"] == "ok" for m in rows(data, "output_tokens_per_s"))
    assert any("suite 'quickstart' sets its gate's thresholds" in n and "throughput=12%" in n and "(measured)" in n
               for n in data["notes"])
    rc, data = compare_json(capsys, base, slow, "--threshold", "throughput=5")
    assert rc == 1 and all(m["threshold"] == 0.05 for m in rows(data, "output_tokens_per_s"))
