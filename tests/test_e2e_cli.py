"""End to end through the real CLI, in subprocesses: suites on the embedded model on this CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

SMALL = [
    "--set", "workloads.0.num_prompts=4",
    "--set", "workloads.0.output_tokens=8",
    "--set", "workloads.1.perplexity.max_windows=16",
    "--set", "workloads.1.lm_eval.limit=20",
]


def moecap(*args, cwd=None, check=None):
    env = dict(os.environ)  # carries MOECAP_CACHE_DIR from conftest: built models and calibrations are reused
    proc = subprocess.run(
        [sys.executable, "-m", "moecap", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=900
    )
    if check is not None:
        assert proc.returncode == check, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


def records(folder: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory, tiny_moe_dir):
    out = tmp_path_factory.mktemp("results")
    proc = moecap("run", "quickstart", "-o", str(out), *SMALL, check=0)
    return out, proc


def test_quickstart_records(quickstart_run):
    out, proc = quickstart_run
    recs = records(out / "quickstart")
    assert len(recs) == 3
    quality = {k: v for k, v in recs.items() if "__quality__" in k}
    assert len(quality) == 1
    (qrec,) = quality.values()
    assert qrec["status"] == "ok", qrec.get("error")
    ppl = qrec["report"]["quality"]["perplexity"]
    assert set(ppl) == {"tiny-code", "tiny-prose", "tiny-c"}
    vocab = qrec["report"]["model"]["vocab_size"]
    for res in ppl.values():
        # trained: far below a uniform guess over the vocabulary
        assert 1 < res["perplexity"] < vocab / 4 and res["windows"] == 16 and res["context_length"] == 256
    lm = qrec["report"]["quality"]["lm_eval"]["tasks"]
    assert set(lm) == {"moecap_real_code", "moecap_real_prose", "moecap_real_c"}
    for res in lm.values():
        assert res["n_samples"]["effective"] == 20 and 0 <= res["metrics"]["acc"]["value"] <= 1
    perf = {k: v for k, v in recs.items() if k not in quality}
    for cell_id, rec in perf.items():
        assert rec["status"] == "ok", rec.get("error")
        assert rec["schema_version"] == 2 and rec["cell_id"] == cell_id
        basis = rec["report"]["basis"]  # each figure family says how it was obtained
        assert basis["utilization"] == "traced" and basis["latency"] == basis["throughput"] == "measured"
        assert basis["cost"] == "estimated"
        rep = rec["report"]
        # S-MBU and S-MFU against the calibrated CPU ceilings
        util = rep["utilization"]
        assert util["peak"]["kind"] == "calibrated"
        for phase in ("prefill", "decode"):
            assert 0 < util[phase]["s_mbu"] <= 1, (phase, util[phase])
            assert 0 < util[phase]["s_mfu"] <= 1, (phase, util[phase])
            b = util[phase]["bytes"]
            assert b["experts"] > 0 and b["attention"] > 0 and b["lm_head"] > 0
        assert util["decode"]["bytes"]["kv_read"] > 0
        assert util["prefill"]["passes"] == 4 // rec["config"]["load"]["batch_size"]
        lat = rep["latency"]
        assert lat["ttft_ms"]["n"] == 4 and lat["ttft_ms"]["median"] > 0
        assert lat["tpot_ms"]["median"] > 0 and lat["itl_ms"]["n"] == 4 * 7
        assert rep["throughput"]["output_tokens"] == 4 * 8 and rep["throughput"]["failed"] == 0
        assert rep["throughput"]["output_tokens_per_s"] > 0
        assert rep["model"]["total_params"] > 100_000
        assert rec["environment"]["packages"]["transformers"] == "5.23.0"
        assert rec["config"]["runner"]["device"] == "cpu"
        # the quickstart's settings for repeatable numbers (issue 21): one torch thread, 5 repetitions,
        # and the gate thresholds calibrated for them, carried to moecap compare in the record
        assert rec["config"]["runner"]["torch_threads"] == 1 and rep["repetitions"]["n"] == 5
        assert rec["suite"]["gate"]["thresholds"] == {"throughput": 7, "utilization": 7}

        # per-pass trace with non-empty expert unions; per-request timestamps
        passes = [json.loads(x) for x in (out / "quickstart" / rec["artifacts"]["passes"]).read_text().splitlines()]
        assert len(passes) == (4 // rec["config"]["load"]["batch_size"]) * 8
        k = 2
        n_layers = rec["report"]["model"]["num_layers"]
        for p in passes:
            assert len(p["expert_counts"]) == n_layers
            for row in p["expert_counts"]:
                assert sum(row) == sum(p["new_tokens"]) * k and any(row)
            assert p["bytes"] > 0 and p["flops"] > 0
        reqs = [json.loads(x) for x in (out / "quickstart" / rec["artifacts"]["requests"]).read_text().splitlines()]
        assert len(reqs) == 4 and all(r["output_tokens"] == 8 for r in reqs)
        # the record's ITL is the per-chunk definition over the requests it kept (a token is a chunk here)
        from moecap.metrics.latency import percentile

        gaps = [b - a for r in reqs for a, b in zip(r["token_times_s"], r["token_times_s"][1:])]
        assert lat["itl_ms"]["median"] == pytest.approx(1e3 * percentile(gaps, 50))
        assert lat["itl_ms"]["mean"] == pytest.approx(1e3 * sum(gaps) / len(gaps))
    # the end-of-run summary table
    assert "S-MBU decode" in proc.stdout and "3 ok, 0 failed" in proc.stdout and "tiny-code ppl" in proc.stdout


def test_run_prints_a_line_per_cell_and_files_library_output_in_cell_logs(quickstart_run):
    """Issue 18: cells' output was interleaved with transformers' and lm-eval's progress bars, and a run
    whose output was no terminal showed no progress. Each cell now prints one start line and one result
    line; the libraries' output goes to the cell's cell.log artifact."""
    out, proc = quickstart_run
    lines = proc.stderr.splitlines()
    starts = [line for line in lines if line.startswith("moecap: [") and line.endswith(" ...")]
    results = [line for line in lines if line.startswith("moecap: [") and ": ok" in line]
    assert [line.split("]")[0] for line in starts] == ["moecap: [1/3", "moecap: [2/3", "moecap: [3/3"], lines
    assert len(results) == 3 and any("TTFT p50" in r for r in results) and any("ppl tiny-c " in r and "tiny-code" in r for r in results)
    assert "Loading weights" not in proc.stderr and "it/s]" not in proc.stderr, proc.stderr[-2000:]
    for cell, rec in records(out / "quickstart").items():
        log = out / "quickstart" / rec["artifacts"]["cell_log"]
        assert log.is_file() and "Loading weights" in log.read_text(), cell
        assert "moecap-cell-end" not in log.read_text()


def test_verbose_run_shows_library_output_too(tmp_path, tiny_moe_dir):
    proc = moecap("--verbose", "run", "quickstart", "-o", str(tmp_path), *SMALL, "--set", "loads=[{batch_size: 1}]",
                  check=0)
    assert "Loading weights" in proc.stderr and "moecap: [1/2]" in proc.stderr
    assert "moecap-cell-end" not in proc.stderr


def test_report_shows_records(quickstart_run):
    out, _ = quickstart_run
    table = moecap("report", str(out), check=0).stdout
    assert "tiny-moe" in table and "bs=1" in table and "bs=4" in table and "TTFT p50 (ms)" in table
    # issue 18: the quality cell gets a table of its own: perplexity per data set, every task's metric
    # with its standard error, one column each
    perf_table, quality_table = table.split("\n\n")[:2]
    assert "bs=1" in perf_table and "tiny-prose ppl" not in perf_table
    header = quality_table.splitlines()[0]
    for col in ("tiny-code ppl", "tiny-prose ppl", "tiny-c ppl", "moecap_real_code:acc", "moecap_real_prose:acc",
                "moecap_real_c:acc"):
        assert col in header, header
    assert quality_table.count(" ± ") >= 3
    rows = json.loads(moecap("report", str(out), "--format", "json", check=0).stdout)
    assert len(rows) == 3 and sum(r["s_mbu_decode"] is not None and 0 < r["s_mbu_decode"] <= 1 for r in rows) == 2
    assert sum(r.get("ppl:tiny-code") is not None for r in rows) == 1
    csv_text = moecap("report", str(out), "--format", "csv", check=0).stdout
    assert csv_text.startswith("cell_id,") and "moecap_real_code:acc stderr" in csv_text.splitlines()[0]
    assert moecap("report", str(out), "--format", "markdown", check=0).stdout.startswith("| model")


def test_rerun_skips_done_cells_unless_forced(quickstart_run):
    out, _ = quickstart_run
    before = {k: v["run_id"] for k, v in records(out / "quickstart").items()}
    proc = moecap("run", "quickstart", "-o", str(out), *SMALL, check=0)
    assert "3 of 3 cells already have an ok record" in proc.stderr
    assert {k: v["run_id"] for k, v in records(out / "quickstart").items()} == before
    proc = moecap("run", "quickstart", "-o", str(out), *SMALL, "--set", "loads=[{batch_size: 4}]", "--force", check=0)
    after = records(out / "quickstart")
    changed = [k for k in after if after[k]["run_id"] != before[k]]
    # --force re-ran the cells this suite now has (bs4 and quality); bs1 kept its record
    assert len(changed) == 2 and not any("__bs1__" in k for k in changed)


def test_dry_run_lists_cells():
    proc = moecap("run", "quickstart", "--dry-run", check=0)
    assert "3 cells" in proc.stdout and "bs1" in proc.stdout and "bs4" in proc.stdout and "quality | noload" in proc.stdout


def test_broken_suite_fails_before_running(tmp_path):
    bad = {
        "name": "bad",
        "models": [{"id": "tiny-moe"}],
        "runners": [{"type": "hf", "args": {"dtype": "fp8"}}],
        "workloads": [{"input_tokens": 8, "output_tokens": 2, "num_prompts": 1, "promts": 3}],
        "loads": [{"batch_size": 1}],
        "output": {"dir": str(tmp_path / "out")},
    }
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    proc = moecap("run", str(path), check=2)
    assert str(path) in proc.stderr and "workloads[0].promts" in proc.stderr and "input_tokens" in proc.stderr
    assert "runners[0].args" in proc.stderr and "dtype" in proc.stderr
    assert not (tmp_path / "out").exists()  # nothing ran


def test_unknown_model_id_is_a_clear_error(tmp_path):
    proc = moecap("run", "quickstart", "--set", "models.0.id=tiny-mixtral", "-o", str(tmp_path), check=2)
    assert "models[0].id" in proc.stderr and "unknown model 'tiny-mixtral'" in proc.stderr and "tiny-moe" in proc.stderr
    assert not any(tmp_path.iterdir())


def test_failing_cell_is_recorded_and_suite_goes_on(tmp_path, tiny_moe_dir):
    out = tmp_path / "out"
    suite = {
        "name": "mixed",
        "models": [
            {"id": "tiny-moe"},
            # an OLMoE-architecture model with random weights, shrunk to run on a CPU
            {
                "id": "random:olmoe-1b-7b",
                "overrides": {
                    "hidden_size": 64, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                    "num_key_value_heads": 4, "num_experts": 8, "num_experts_per_tok": 2, "vocab_size": 512,
                },
            },
        ],
        "runners": [{"type": "hf"}],
        "workloads": [
            {"name": "ok", "input_tokens": 16, "output_tokens": 4, "num_prompts": 2},
            # text prompts need a tokenizer: fine for tiny-moe, a failure for a random: model
            {"name": "text", "source": "text", "input_tokens": 16, "output_tokens": 4, "num_prompts": 2},
        ],
        "loads": [{"batch_size": 2}],
        "hardware": {"device": "cpu"},
        "output": {"dir": str(out)},
    }
    path = tmp_path / "mixed.yaml"
    path.write_text(yaml.safe_dump(suite))
    proc = moecap("run", str(path), check=1)  # non-zero: a cell failed
    recs = records(out / "mixed")
    status = {k.split("__")[0] + "/" + k.split("__")[2]: v["status"] for k, v in recs.items()}
    assert status == {
        "tiny-moe/ok": "ok",
        "tiny-moe/text": "ok",
        "olmoe-1b-7b-random-2L/ok": "ok",
        "olmoe-1b-7b-random-2L/text": "failed",
    }
    failed = next(v for k, v in recs.items() if v["status"] == "failed")
    assert "Traceback" in failed["error"] and "needs a tokenizer" in failed["error"]
    assert "FAILED" in proc.stderr and "3 ok, 1 failed" in proc.stdout
    # the random OLMoE cell traced its experts too (a second family end to end)
    olmoe = next(v for k, v in recs.items() if k.startswith("olmoe") and v["status"] == "ok")
    assert olmoe["report"]["model"]["family"] == "olmoe" and olmoe["report"]["utilization"]["decode"]["s_mbu"] > 0

    # a re-run retries only the failed cell and loses no completed record
    ok_before = {k: v["run_id"] for k, v in recs.items() if v["status"] == "ok"}
    moecap("run", str(path), check=1)
    recs2 = records(out / "mixed")
    assert {k: v["run_id"] for k, v in recs2.items() if k in ok_before} == ok_before


def test_models_and_runners_listing():
    assert "tiny-moe" in moecap("models", check=0).stdout
    assert "random:mixtral-8x7b" in moecap("models", check=0).stdout
    assert "hf" in moecap("runners", check=0).stdout


def test_records_have_energy_and_cost(quickstart_run):
    out, _ = quickstart_run
    for rec in records(out / "quickstart").values():
        if "__quality__" in rec["cell_id"]:  # explicit reasons, not silence
            assert "no measured serving window" in rec["report"]["energy"]["reason"]
            assert rec["report"]["cost"]["available"] is False
            continue
        energy = rec["report"]["energy"]
        # this VM exposes no RAPL counters: energy is unavailable and the record says why
        assert energy["available"] or energy["reason"]
        assert energy["host_rss_peak_bytes"] > 0
        cost = rec["report"]["cost"]
        assert cost["usd_per_1m_output_tokens"] > 0 and cost["usd_per_request"] > 0
        assert cost["power_source"] in ("measured", "tdp")
        inputs = cost["inputs"]
        assert inputs["cpu"]["price_usd"] > 0 and inputs["dram_gb"] > 0 and inputs["pue"] >= 1
        # $ per 1M output tokens = total $/h x run hours / output tokens x 1e6
        expect = cost["usd_per_hour"]["total"] * cost["run_hours"] / cost["output_tokens"] * 1e6
        assert cost["usd_per_1m_output_tokens"] == pytest.approx(expect)


def test_cost_what_if_reprices_without_rerunning(quickstart_run):
    out, _ = quickstart_run
    before = {k: v["run_id"] for k, v in records(out / "quickstart").items()}
    base = json.loads(moecap("cost", str(out), "--format", "json", check=0).stdout)
    assert len(base) == 2
    for row in base:  # nothing changed: the what-if equals the record
        assert row["$/1M out (what-if)"] == pytest.approx(row["$/1M out (record)"])
    dear = json.loads(moecap("cost", str(out), "--set", "usd_per_kwh=1.0", "--format", "json", check=0).stdout)
    assert all(d["$/1M out (what-if)"] > b["$/1M out (what-if)"] for d, b in zip(dear, base))
    gpu = json.loads(
        moecap("cost", str(out), "--hardware", "NVIDIA H100 80GB HBM3", "--format", "json", check=0).stdout
    )
    assert all(g["capital $/h"] > b["capital $/h"] and g["cloud $/1M out"] > 0 for g, b in zip(gpu, base))
    bad = moecap("cost", str(out), "--set", "pue_factor=2", check=2)
    assert "pue_factor" in bad.stderr and "usd_per_kwh" in bad.stderr
    assert {k: v["run_id"] for k, v in records(out / "quickstart").items()} == before  # nothing re-ran


def test_publish_and_leaderboard_commands(quickstart_run, tmp_path):
    """`moecap publish` to a local target, then `moecap leaderboard` on it over real HTTP on 127.0.0.1."""
    import urllib.request

    from conftest import free_port, running_server

    out, _ = quickstart_run
    target = tmp_path / "published"
    proc = moecap("publish", str(out), "--to", str(target), check=0)
    assert "published 3 record(s)" in proc.stdout
    assert len(list((target / "quickstart").glob("*.json"))) == 3
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.json").write_text(json.dumps({"schema_version": 1, "cell_id": "x", "status": "exploded"}))
    assert "nothing published" in moecap("publish", str(bad), "--to", str(tmp_path / "t2"), check=2).stderr
    assert not (tmp_path / "t2").exists()

    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    cmd = [sys.executable, "-m", "moecap", "leaderboard", str(target), "--port", str(port)]
    with running_server(cmd, url, deadline_s=120, env=dict(os.environ, GRADIO_ANALYTICS_ENABLED="False")):
        page = urllib.request.urlopen(url, timeout=10).read().decode()
        assert "gradio" in page.lower()


@pytest.mark.slow
def test_first_run_shows_training_progress_on_the_console(tmp_path):
    """Issue 18: on a first run tiny-moe is trained inside the cell's worker; its progress (step, loss,
    time left) reaches the console, not only the cell's log, while the libraries' bars stay out."""
    import yaml

    suite = {"name": "first", "models": [{"id": "tiny-moe"}], "runners": [{"type": "hf"}],
             "workloads": [{"name": "w", "input_tokens": 16, "output_tokens": 4, "num_prompts": 2}],
             "loads": [{"batch_size": 1}], "hardware": {"device": "cpu", "calibrate": "never",
                                                        "peaks": {"mem_bandwidth_gbs": 10.0, "tflops": {"fp32": 1.0}}},
             "output": {"dir": str(tmp_path / "results")}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(suite))
    env = {**os.environ, "MOECAP_CACHE_DIR": str(tmp_path / "empty-cache"), "MOECAP_TINY_MOE_PROFILE": "test"}
    proc = subprocess.run([sys.executable, "-m", "moecap", "run", str(tmp_path / "s.yaml")], capture_output=True,
                          text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    err = proc.stderr
    assert "moecap: building tiny-moe" in err and "moecap zoo: tiny-moe base step 150/150, loss" in err, err[-3000:]
    assert "Loading weights" not in err and "it/s]" not in err


def test_repeat_keeps_every_repetition_and_reports_medians_with_intervals(tmp_path, tiny_moe_dir):
    """Issue 21: `moecap run --repeat N` runs each performance cell's measured window N times; the record
    keeps every repetition's traces, each figure's median, interval and spread, and its value is the
    median; the table and the leaderboard show the interval."""
    from moecap import figures
    from moecap.leaderboard.data import display_frame, load_results

    proc = moecap("run", "quickstart", "-o", str(tmp_path), "--repeat", "3",
                  "--set", "workloads=[{name: r, source: random, input_tokens: 32, output_tokens: 8, num_prompts: 4, "
                  "ignore_eos: true}]", "--set", "loads=[{batch_size: 2}]", check=0)
    (rec,) = records(tmp_path / "quickstart").values()
    reps = rec["report"]["repetitions"]
    assert reps["n"] == 3 and 1 <= reps["sections_from"] <= 3
    thr = reps["figures"]["output_tokens_per_s"]
    assert len(thr["values"]) == 3 and thr["median"] == sorted(thr["values"])[1]
    assert thr["interval"] == [min(thr["values"]), max(thr["values"])] and thr["coverage"] == 0.75
    # the sections are one real repetition's: the one whose throughput is the median
    assert rec["report"]["throughput"]["output_tokens_per_s"] == thr["median"]
    assert figures.value(rec["report"], "ttft_ms_p50") == reps["figures"]["ttft_ms_p50"]["median"]
    for i in (1, 2, 3):  # every repetition's raw traces
        for kind in ("passes", "requests"):
            path = tmp_path / "quickstart" / rec["artifacts"][f"{kind}.r{i}"]
            assert path.is_file() and path.read_text().strip()
    assert f"{reps['figures']['ttft_ms_p50']['median']:.2f}" in proc.stdout
    shown = display_frame(load_results(tmp_path)).iloc[0]
    lo, hi = thr["interval"]
    assert shown["Output throughput (tok/s)"] == f"{thr['median']:.1f} [{lo:.1f}–{hi:.1f}]"
    bad = moecap("run", "quickstart", "-o", str(tmp_path / "x"), "--repeat", "0", check=2)
    assert "repeat" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize("executor", [["--executor", "inline"], ["--isolate", "group"]])
def test_repetitions_interleave_across_a_groups_cells(tmp_path, tiny_moe_dir, executor):
    """Issue 21: where one process runs a group's cells (inline, --isolate group), round i runs repetition
    i of every cell, so a drift of the machine hits all cells alike: both cells start before either
    finishes, and each record still has all of its own repetitions."""
    proc = moecap("run", "quickstart", "-o", str(tmp_path), "--repeat", "2", *executor,
                  "--set", "workloads=[{name: r, source: random, input_tokens: 16, output_tokens: 4, num_prompts: 2, "
                  "ignore_eos: true}]", "--set", "loads=[{batch_size: 1}, {batch_size: 2}]", check=0)
    lines = proc.stderr.splitlines()
    first_start = next(i for i, ln in enumerate(lines) if "[1/2]" in ln and ln.endswith("..."))
    second_start = next(i for i, ln in enumerate(lines) if "[2/2]" in ln and ln.endswith("..."))
    first_done = next(i for i, ln in enumerate(lines) if "[1/2]" in ln and ": ok:" in ln)
    assert first_start < second_start < first_done, proc.stderr[-3000:]
    recs = records(tmp_path / "quickstart")
    assert len(recs) == 2
    for rec in recs.values():
        assert rec["status"] == "ok" and rec["report"]["repetitions"]["n"] == 2
        assert {f"passes.r{i}" for i in (1, 2)} <= set(rec["artifacts"])
        assert all(a.startswith(rec["cell_id"] + "/") for a in rec["artifacts"].values())
