"""The leaderboard data layer (moecap.leaderboard.data) and publishing (moecap.leaderboard.publish)."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from moecap import figures
from moecap.leaderboard import data as lb
from moecap.leaderboard.publish import publish, validate_record
from moecap.records import Record, ResultStore

# figures copied from a real `moecap run quickstart` on a 2-core CPU (tiny-moe test profile)
LATENCY = {
    "ttft_ms": {"n": 4, "mean": 829.05, "median": 829.05, "p90": 829.05, "p99": 901.2},
    "tpot_ms": {"n": 4, "mean": 351.41, "median": 351.41, "p90": 351.41, "p99": 351.41},
    "itl_ms": {"n": 28, "mean": 351.41, "median": 355.94, "p90": 396.0, "p99": 396.0},
    "e2el_ms": {"n": 4, "mean": 3288.93, "median": 3288.93, "p90": 3288.93, "p99": 3288.93},
}
THROUGHPUT = {"completed": 4, "failed": 0, "duration_s": 3.289, "output_tokens": 32, "output_tokens_per_s": 9.7296, "requests_per_s": 1.2162}
UTIL = {
    "prefill": {"passes": 1, "tokens": 512, "bytes": {"total": 2199552.0}, "s_mbu": 0.000111, "s_mfu": 0.00296},
    "decode": {"passes": 7, "tokens": 28, "bytes": {"total": 19000000.0}, "s_mbu": 0.000191, "s_mfu": 0.0000301},
    "peak": {"kind": "calibrated", "mem_bandwidth_gbs": 33.0, "tflops": 0.187},
}
QUALITY = {
    "perplexity": {
        "tiny-code": {"perplexity": 147.137, "nll_mean": 4.99, "windows": 4},
        "tiny-prose": {"perplexity": 164.34, "nll_mean": 5.10, "windows": 4},
    },
    "lm_eval": {
        "lm_eval_version": "0.4.13",
        "tasks": {
            "moecap_mc_code": {"metrics": {"acc": {"value": 0.32, "stderr": 0.047}, "acc_norm": {"value": 0.27, "stderr": 0.04}}},
            "moecap_mc_prose": {"metrics": {"acc": {"value": 0.28, "stderr": 0.045}, "acc_norm": {"value": 0.31, "stderr": 0.04}}},
        },
    },
}


def config(model="tiny-moe", runner="hf", dtype="float32", device="AMD EPYC", load=None, attn="sdpa"):
    return {
        "model": {"id": model, "display_name": model},
        "runner": {
            "type": runner,
            "display_name": runner,
            "dtype": dtype,
            "device": "cpu",
            "resolved_args": {"device": None, "dtype": dtype, "attn_implementation": attn, "warmup_batches": 1},
        },
        "workload": {"display_name": "quality" if load is None else "random-in128-out32"},
        "load": load,
        "hardware": {"detected": {"device_name": device, "accelerator": "cpu", "device_count": 1}},
    }


def perf_record(cell_id, bs=4, tok_s=9.7296, ttft=829.05, usd=6.57, joules=None, created="2026-11-25T03:00:00+00:00", **cfg):
    lat = copy.deepcopy(LATENCY)
    lat["ttft_ms"]["median"] = ttft
    thr = dict(THROUGHPUT, output_tokens_per_s=tok_s)
    return Record(
        run_id="r1",
        created_at=created,
        suite={"name": "quickstart"},
        cell_id=cell_id,
        status="ok",
        config=config(load={"batch_size": bs, "kind": "batch"}, **cfg),
        report={
            "latency": lat,
            "throughput": thr,
            "utilization": copy.deepcopy(UTIL),
            "energy": {"available": joules is not None, "joules_per_output_token": joules},
            "cost": {"usd_per_1m_output_tokens": usd},
        },
    )


def quality_record(cell_id, created="2026-11-25T03:00:00+00:00", quality=None, **cfg):
    return Record(
        run_id="r1",
        created_at=created,
        suite={"name": "quickstart"},
        cell_id=cell_id,
        status="ok",
        config=config(**cfg),
        report={"quality": copy.deepcopy(quality or QUALITY)},
    )


def write(root: Path, rec: Record, artifacts: bool = False) -> Path:
    store = ResultStore(root, rec.suite["name"])
    if artifacts:
        rec.artifacts = {
            "passes": store.write_artifact(rec.cell_id, "passes.jsonl", [{"pass": 0, "tokens": 4}]),
            "requests": store.write_artifact(rec.cell_id, "requests.jsonl", [{"id": 0}]),
        }
    return store.write(rec)


@pytest.fixture
def results(tmp_path):
    root = tmp_path / "results"
    write(root, perf_record("tiny__hf__bs1", bs=1, tok_s=5.0, ttft=300.0, usd=5.2), artifacts=True)
    write(root, perf_record("tiny__hf__bs4", bs=4, tok_s=9.7, ttft=829.0, usd=6.57, joules=0.5), artifacts=True)
    write(root, quality_record("tiny__hf__quality"))
    write(root, perf_record("big__vllm__bs8", bs=8, tok_s=120.0, ttft=50.0, usd=1.0, model="big-moe", runner="vllm",
                            dtype="bfloat16", device="NVIDIA H100 80GB HBM3"))
    return root


# ---------------------------------------------------------------- loading


def test_load_results_columns_and_values(results):
    df = lb.load_results(results)
    assert len(df) == 4
    assert [c.key for c in lb.COLUMNS] == list(df.columns[: len(lb.COLUMNS)])
    row = df.set_index("cell_id").loc["tiny__hf__bs4"]
    assert row["model"] == "tiny-moe" and row["system"] == "hf (attn=sdpa)" and row["precision"] == "float32"
    assert row["hardware"] == "AMD EPYC" and row["load"] == "bs=4" and row["batch_size"] == 4
    assert row["ttft_ms_p50"] == 829.0 and row["ttft_ms_p99"] == 901.2 and row["tpot_ms_p50"] == 351.41
    assert row["itl_ms_p99"] == 396.0 and row["e2el_ms_p50"] == 3288.93
    assert row["output_tokens_per_s"] == 9.7 and row["requests_per_s"] == 1.2162
    assert row["s_mbu_decode"] == 0.000191 and row["s_mfu_prefill"] == 0.00296
    assert row["j_per_token"] == 0.5 and row["usd_per_1m_output_tokens"] == 6.57
    assert row["status"] == "ok" and row["suite"] == "quickstart"
    assert row["record_path"].endswith("quickstart/tiny__hf__bs4.json")
    assert math.isnan(row["accuracy"]) and math.isnan(df.set_index("cell_id").loc["tiny__hf__bs1", "j_per_token"])
    q = df.set_index("cell_id").loc["tiny__hf__quality"]
    assert q["accuracy"] == pytest.approx(0.30) and q["perplexity"] == pytest.approx(147.137)
    assert q["ppl:tiny-prose"] == pytest.approx(164.34) and q["moecap_mc_code:acc_norm"] == pytest.approx(0.27)
    assert q["load"] is None and pd.isna(q["batch_size"]) and math.isnan(q["ttft_ms_p50"])
    assert df["output_tokens_per_s"].dtype == "float64" and str(df["batch_size"].dtype) == "Int64"
    dyn = [c.key for c in lb.columns_for(df)[len(lb.COLUMNS):]]
    assert "ppl:tiny-code" in dyn and "moecap_mc_prose:acc" in dyn


def test_old_schema_record_gives_nan(tmp_path):
    old = {
        "schema_version": 0,
        "cell_id": "old-cell",
        "status": "ok",
        "suite": {"name": "legacy"},
        "config": {"model": {"display_name": "m"}, "runner": {"display_name": "hf"}},
        "report": {"latency": {"ttft_ms": {"median": 12.5}}},  # no throughput / energy / cost / quality
    }
    (tmp_path / "legacy").mkdir()
    (tmp_path / "legacy" / "old-cell.json").write_text(json.dumps(old))
    df = lb.load_results(tmp_path)
    assert len(df) == 1
    row = df.iloc[0]
    assert row["ttft_ms_p50"] == 12.5 and row["system"] == "hf"
    for k in ("output_tokens_per_s", "j_per_token", "usd_per_1m_output_tokens", "accuracy", "perplexity", "s_mbu_decode"):
        assert math.isnan(row[k])
    assert row["hardware"] is None and row["precision"] is None and row["created_at"] is None


def test_corrupt_and_foreign_json_are_skipped_with_a_warning(results):
    (results / "quickstart" / "broken.json").write_text("{not json")
    (results / "quickstart" / "other.json").write_text(json.dumps({"hello": 1}))
    with pytest.warns(UserWarning) as rec:
        df = lb.load_results(results)
    msgs = " ".join(str(w.message) for w in rec)
    assert "broken.json" in msgs and "other.json" in msgs
    assert len(df) == 4


def test_empty_folder_gives_empty_frame_with_all_columns(tmp_path):
    df = lb.load_results(tmp_path)
    assert df.empty and all(c.key in df.columns for c in lb.COLUMNS)
    assert lb.pareto_front(df, [("output_tokens_per_s", True), ("ttft_ms_p50", False)]).empty
    assert lb.display_frame(df).columns[0] == "Model"


def test_hf_source_uses_snapshot_download(results, monkeypatch):
    import huggingface_hub

    calls = {}

    def fake(**kw):
        calls.update(kw)
        return str(results)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    df = lb.load_results("hf://datasets/org/moecap-results@v1")
    assert len(df) == 4
    assert calls["repo_id"] == "org/moecap-results" and calls["repo_type"] == "dataset" and calls["revision"] == "v1"
    assert lb.parse_hf_source("hf://datasets/a/b") == ("a/b", None, None)
    with pytest.raises(ValueError):
        lb.parse_hf_source("hf://models/a/b")


def test_system_name_includes_salient_settings():
    assert lb.system_name({"display_name": "vllm", "resolved_args": {"tensor_parallel_size": 2, "enable_expert_parallel": True,
                                                                      "gpu_memory_utilization": 0.9}}) == "vllm (tp=2, ep=on)"
    assert lb.system_name({"display_name": "sglang", "resolved_args": {"tensor_parallel_size": 1}}) == "sglang"


# ---------------------------------------------------------------- merge_quality


def test_merge_quality_fills_matching_performance_rows(results):
    # a newer quality record of the same group wins; another hardware gets nothing
    newer = copy.deepcopy(QUALITY)
    newer["lm_eval"]["tasks"]["moecap_mc_code"]["metrics"]["acc"]["value"] = 0.5
    write(results, quality_record("tiny__hf__quality2", created="2026-12-01T00:00:00+00:00", quality=newer))
    df = lb.load_results(results)
    m = lb.merge_quality(df).set_index("cell_id")
    assert m.loc["tiny__hf__bs1", "accuracy"] == pytest.approx(0.39)
    assert m.loc["tiny__hf__bs4", "perplexity"] == pytest.approx(147.137)
    assert m.loc["tiny__hf__bs4", "ppl:tiny-prose"] == pytest.approx(164.34)
    assert math.isnan(m.loc["big__vllm__bs8", "accuracy"])
    assert m.loc["tiny__hf__quality", "accuracy"] == pytest.approx(0.30)  # quality rows unchanged and kept
    assert len(m) == len(df) and math.isnan(df.set_index("cell_id").loc["tiny__hf__bs1", "accuracy"])  # input untouched


def test_merge_quality_needs_same_precision(results):
    write(results, perf_record("tiny__hf__bf16", dtype="bfloat16"))
    m = lb.merge_quality(lb.load_results(results)).set_index("cell_id")
    assert math.isnan(m.loc["tiny__hf__bf16", "accuracy"])


def test_quality_is_merged_per_figure_from_one_record_with_its_set(results):
    # a newer quality record measures perplexity only, on another set (8 windows of tiny-prose): the
    # performance rows take perplexity, its set and window count from it, and accuracy (with its set,
    # samples and stderr) from the older record that has accuracy; never a mix within one figure
    newer = {"perplexity": {"tiny-prose": {"perplexity": 99.0, "windows": 8, "context_length": 256}}}
    write(results, quality_record("tiny__hf__ppl8", created="2026-12-01T00:00:00+00:00", quality=newer))
    m = lb.merge_quality(lb.load_results(results)).set_index("cell_id")
    row = m.loc["tiny__hf__bs4"]
    assert row["perplexity"] == 99.0 and row["ppl_set"] == "tiny-prose (8 windows x 256 tok)"
    assert row["ppl_windows"] == 8 and row["ppl:tiny-prose"] == 99.0
    assert math.isnan(row["ppl:tiny-code"])  # the older record's other data set is not mixed in
    assert row["accuracy"] == pytest.approx(0.30) and row["acc_set"] == "moecap_mc_code, moecap_mc_prose"
    assert row["accuracy_stderr"] == pytest.approx(math.sqrt(0.047**2 + 0.045**2) / 2)
    assert row["quality_cell"] == "tiny__hf__ppl8, tiny__hf__quality"
    assert m.loc["tiny__hf__quality", lb.MERGED] and m.loc["tiny__hf__ppl8", lb.MERGED]
    assert not m.loc["tiny__hf__bs4", lb.MERGED] and not m.loc["big__vllm__bs8", lb.MERGED]
    assert m.loc["tiny__hf__quality", "ppl_set"] == "tiny-code (4 windows)"  # no context length recorded


def test_workload_names_what_ran():
    wl = lambda **w: lb.record_row({"cell_id": "x", "config": {"workload": w}, "report": {}})["workload"]  # noqa: E731
    assert wl(name="random-in128-out32", input_tokens=128, output_tokens=32) == "random-in128-out32"
    # a suite's --set changed the lengths but not the name: the row says what really ran
    assert wl(name="random-in128-out32", input_tokens=128, output_tokens=8) == "random-in128-out32 (in128-out8)"
    assert wl(display_name="sharegpt", name="sg") == "sharegpt" and wl(input_tokens=64, output_tokens=16) == "in64-out16"
    assert lb.record_row({"cell_id": "x", "config": {}, "report": {}})["workload"] is None


def test_quality_sets_of_a_real_lm_eval_section():
    q = {"lm_eval": {"tasks": {
        "a": {"metrics": {"acc": {"value": 0.5, "stderr": 0.03}}, "n_samples": {"effective": 100}, "num_fewshot": 0},
        "b": {"metrics": {"acc": {"value": 0.7, "stderr": None}}, "n_samples": {"effective": 400}, "num_fewshot": 5},
    }}}
    sets = lb.quality_sets({"quality": q})
    assert sets["acc_set"] == "a, b (n=100-400/task, 0/5-shot)" and sets["acc_samples"] == 500
    assert sets["accuracy_stderr"] is None  # one task has no stderr: no combined one
    assert lb.quality_sets({})["ppl_set"] is None


def test_display_shows_why_a_figure_is_missing_and_utilization_in_percent(results):
    m = lb.merge_quality(lb.load_results(results))
    disp = lb.display_frame(m).set_index(m["cell_id"])
    assert disp.loc["tiny__hf__bs1", "Energy (J/tok)"] == "n/a (no power meter)"
    assert disp.loc["tiny__hf__bs4", "Energy (J/tok)"] == 0.5
    assert disp.loc["tiny__hf__quality", "TTFT p50 (ms)"] == "n/a (quality run)"
    assert disp.loc["big__vllm__bs8", "Accuracy"] == "n/a (no quality run)"
    assert disp.loc["tiny__hf__bs4", "Accuracy"] == "0.300 ± 0.033"  # sqrt(0.047² + 0.045²) / 2 = 0.0325
    assert disp.loc["tiny__hf__bs4", "S-MBU decode (%)"] == pytest.approx(0.02)  # 0.000191 -> 0.0191 %
    assert lb.COLUMN_BY_KEY["s_mbu_decode"].unit == "%"
    failed = lb.record_row({"cell_id": "x", "status": "failed", "config": {}, "report": {}})
    assert failed[lb.WHY]["output_tokens_per_s"] == "failed"


def test_basis_names_peaks_power_and_prices():
    rep = {"basis": {"utilization": "estimated", "cost": "estimated", "latency": "measured"},
           "utilization": {"peak": {"kind": "datasheet"}},
           "cost": {"power_source": "measured", "inputs": {"sources": {"gpu.price_usd": "override cost.gpu_price_usd"}}}}
    assert figures.basis_summary(rep) == "util=estimated (datasheet peak); cost=estimated (measured power, user prices)"
    assert figures.basis_summary({"basis": {"latency": "measured"}}) == "measured"


# ---------------------------------------------------------------- Pareto


def front(rows, axes):
    return lb.pareto_front(pd.DataFrame(rows), axes).tolist()


def test_pareto_two_axes_minimize_and_maximize():
    rows = {"tok": [10, 20, 15, 5, 20], "lat": [1, 2, 3, 0.5, 2.5]}
    # maximize tok, minimize lat: (10,1) (20,2) (5,0.5) on; (15,3) dominated by (20,2); (20,2.5) dominated by (20,2)
    assert front(rows, [("tok", True), ("lat", False)]) == [True, True, False, True, False]
    # minimize both: only (5, 0.5)
    assert front(rows, [("tok", False), ("lat", False)]) == [False, False, False, True, False]
    # maximize both: (20, 2.5) dominates everything but (15, 3)
    assert front(rows, [("tok", True), ("lat", True)]) == [False, False, True, False, True]


def test_pareto_three_axes():
    rows = {"a": [1, 2, 1, 0], "b": [1, 1, 2, 0], "c": [1, 0, 0, 0]}
    # maximize all: (1,1,1) not dominated; (2,1,0) on (best a); (1,2,0) on (best b); (0,0,0) dominated
    assert front(rows, [("a", True), ("b", True), ("c", True)]) == [True, True, True, False]


def test_pareto_nan_inf_and_missing_never_on_front_nor_dominate():
    rows = {"tok": [10, np.nan, 100, 8, 1e9], "lat": [1, 0.0, np.inf, 2, None]}
    # (nan, 0) would dominate; (100, inf) and (1e9, None) are invalid: none of them is on or dominates
    assert front(rows, [("tok", True), ("lat", False)]) == [True, False, False, False, False]
    assert front(rows, [("tok", True), ("missing", False)]) == [False] * 5


def test_pareto_ties_are_all_on_the_front():
    rows = {"x": [1, 1, 2], "y": [5, 5, 1]}
    assert front(rows, [("x", True), ("y", True)]) == [True, True, True]
    assert front({"x": [3, 3], "y": [4, 4]}, [("x", False), ("y", False)]) == [True, True]


def test_pareto_keeps_index_and_checks_axes():
    df = pd.DataFrame({"x": [1.0, 2.0], "y": [2.0, 1.0]}, index=[7, 3])
    s = lb.pareto_front(df, [("x", True), ("y", True)])
    assert list(s.index) == [7, 3] and s.dtype == bool and s.all()
    with pytest.raises(ValueError):
        lb.pareto_front(df, [("x", True)] * 4)


# ---------------------------------------------------------------- filters, display, export


def test_filters_and_search(results):
    df = lb.load_results(results)
    assert set(lb.filter_frame(df, systems=["vllm (attn=sdpa)"])["cell_id"]) == {"big__vllm__bs8"}
    assert set(lb.filter_frame(df, models=["tiny-moe"], loads=["bs=1", "bs=4"])["cell_id"]) == {"tiny__hf__bs1", "tiny__hf__bs4"}
    assert set(lb.filter_frame(df, hardware=["AMD EPYC"], precisions=["float32"])["cell_id"]) == {
        "tiny__hf__bs1", "tiny__hf__bs4", "tiny__hf__quality"}
    assert len(lb.filter_frame(df, systems=None, models=None)) == 4  # None: no filter
    assert lb.filter_frame(df, systems=[], models=None).empty  # an empty selection allows nothing
    assert set(lb.filter_frame(df, search="h100")["cell_id"]) == {"big__vllm__bs8"}
    assert set(lb.filter_frame(df, search="  QUALITY ")["cell_id"]) == {"tiny__hf__quality"}
    assert lb.filter_frame(df, search="bs=1", precisions=["bfloat16"]).empty
    assert lb.choices(df, "precision") == ["bfloat16", "float32"]


def test_display_frame_labels_units_and_rounding(results):
    df = lb.load_results(results)
    disp = lb.display_frame(df)
    assert list(disp.columns) == [lb.COLUMN_BY_KEY[k].header for k in lb.default_keys()]
    assert "TTFT p50 (ms)" in disp.columns and "Output throughput (tok/s)" in disp.columns and "Model" in disp.columns
    d2 = lb.display_frame(df, ["model", "e2el_ms_p50", "ppl:tiny-code", "moecap_mc_code:acc", "nope"], na=False)
    assert list(d2.columns) == ["Model", "E2E latency p50 (ms)", "PPL tiny-code", "moecap_mc_code acc"]
    assert d2["E2E latency p50 (ms)"].iloc[0] == 3288.9
    assert d2["PPL tiny-code"].dropna().iloc[0] == 147.14


def test_to_csv_round_trips(results):
    df = lb.load_results(results)
    text = lb.to_csv(df)
    assert text.splitlines()[0].startswith("model,system,precision,hardware,workload,load")
    back = pd.read_csv(__import__("io").StringIO(text))
    assert len(back) == 4 and back["output_tokens_per_s"].max() == 120.0


# ---------------------------------------------------------------- publish


def test_publish_to_local_folder_keeps_layout_and_artifacts(results, tmp_path):
    target = tmp_path / "published"
    out = publish([results], target)
    assert sorted(Path(p).name for p in out) == sorted(p.name for p in (results / "quickstart").glob("*.json"))
    for name in ("tiny__hf__bs1", "tiny__hf__bs4"):
        rec = validate_record(target / "quickstart" / f"{name}.json")
        assert (target / "quickstart" / rec.artifacts["passes"]).read_text() == (results / "quickstart" / rec.artifacts["passes"]).read_text()
        assert (target / "quickstart" / name / "requests.jsonl").is_file()
    assert not list(target.rglob("*.tmp"))
    df = lb.load_results(target)
    assert len(df) == 4 and str(target) in df["record_path"].iloc[0]
    publish([results / "quickstart" / "tiny__hf__bs1.json"], target)  # republishing one record is fine


def test_publish_rejects_invalid_records_and_writes_nothing(results, tmp_path):
    bad = json.loads((results / "quickstart" / "tiny__hf__bs1.json").read_text())
    bad.update(cell_id="bad1", status="failed", error=None)
    (results / "quickstart" / "bad1.json").write_text(json.dumps(bad))
    worse = dict(bad, cell_id="bad2", status="done")
    (results / "quickstart" / "bad2.json").write_text(json.dumps(worse))
    target = tmp_path / "published"
    with pytest.raises(ValueError) as err:
        publish([results], target)
    msg = str(err.value)
    assert "bad1.json" in msg and "'error'" in msg and "bad2.json" in msg and "'status'" in msg
    assert not target.exists()
    with pytest.raises(ValueError, match="bad1.json.*error"):
        validate_record(results / "quickstart" / "bad1.json")


def test_validate_record_catches_missing_fields_and_artifacts(results):
    p = results / "quickstart" / "tiny__hf__bs4.json"
    assert validate_record(p).cell_id == "tiny__hf__bs4"
    d = json.loads(p.read_text())
    d.pop("run_id")
    p.write_text(json.dumps(d))
    with pytest.raises(ValueError, match="tiny__hf__bs4.json.*run_id"):
        validate_record(p)
    (results / "quickstart" / "tiny__hf__bs1" / "passes.jsonl").unlink()
    with pytest.raises(ValueError, match="artifacts.passes"):
        validate_record(results / "quickstart" / "tiny__hf__bs1.json")


def test_publish_to_hf_makes_one_dataset_commit(results, monkeypatch):
    import huggingface_hub

    seen = {}

    class FakeApi:
        def __init__(self, token=None):
            seen["token"] = token

        def upload_folder(self, **kw):
            seen.update(kw)
            seen["files"] = sorted(p.relative_to(kw["folder_path"]).as_posix() for p in Path(kw["folder_path"]).rglob("*") if p.is_file())

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setenv("HF_TOKEN", "hf_env")
    out = publish([results], "hf://datasets/org/res", message="add")
    assert seen["repo_id"] == "org/res" and seen["repo_type"] == "dataset" and seen["commit_message"] == "add"
    assert seen["token"] == "hf_env" and "quickstart/tiny__hf__bs4/passes.jsonl" in seen["files"]
    assert "hf://datasets/org/res/quickstart/tiny__hf__bs4.json" in out


# ---------------------------------------------------------------- real `moecap run` output


@pytest.mark.slow
def test_real_quickstart_records(tmp_path_factory, tiny_moe_dir):
    out = tmp_path_factory.mktemp("lb-real")
    proc = subprocess.run(
        [sys.executable, "-m", "moecap", "run", "quickstart", "-o", str(out),
         "--set", "workloads.0.num_prompts=4", "--set", "workloads.0.output_tokens=8",
         "--set", "workloads.1.perplexity.max_windows=4", "--set", "workloads.1.lm_eval.limit=10"],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        df = lb.merge_quality(lb.load_results(out))
    assert len(df) == 3 and set(df["status"]) == {"ok"}
    perf = df[df["load"].notna()]
    assert set(perf["load"]) == {"bs=1", "bs=4"} and set(perf["batch_size"]) == {1, 4}
    for k in ("ttft_ms_p50", "tpot_ms_p50", "output_tokens_per_s", "requests_per_s", "s_mbu_decode", "s_mfu_prefill", "usd_per_1m_output_tokens",
              "accuracy", "perplexity"):
        assert perf[k].notna().all() and (perf[k] > 0).all(), k
    assert (df["system"] == "hf (attn=sdpa)").all() and df["hardware"].notna().all()
    assert lb.pareto_front(perf, [("output_tokens_per_s", True), ("ttft_ms_p50", False)]).any()
    published = publish([out], out.parent / "lb-real-published")
    assert len(published) == 3 and len(lb.load_results(out.parent / "lb-real-published")) == 3


def test_publish_copies_regular_files_inside_the_results_folder_only(results, tmp_path):
    """Issue 17: publish copied symlinked files from outside the results folder."""
    outside = tmp_path / "outside.txt"
    outside.write_text("private")
    (results / "quickstart" / "tiny__hf__bs1" / "notes.txt").symlink_to(outside)
    target = tmp_path / "published"
    with pytest.raises(ValueError, match="notes.txt: a symbolic link; publish copies regular files only"):
        publish([results], target)
    assert not target.exists() or not list(target.rglob("*.json"))


def test_publish_is_all_or_nothing_and_redacts_secrets(results, tmp_path, monkeypatch):
    import moecap.leaderboard.publish as pub

    rec_path = results / "quickstart" / "tiny__hf__bs4.json"
    rec = json.loads(rec_path.read_text())  # a record of an older version that still holds a key
    rec["config"]["runner"]["args"] = {"api_key": "sk-live-0123456789"}
    rec["environment"] = {"argv": ["moecap", "run", "s.yaml", "--set", "runners.0.args.api_key=sk-live-0123456789"]}
    rec_path.write_text(json.dumps(rec))
    target = tmp_path / "published"
    calls = {"n": 0}
    real = pub._atomic_copy

    def flaky(src, dst):  # the disk fills up half way
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(28, "No space left on device")
        real(src, dst)

    monkeypatch.setattr(pub, "_atomic_copy", flaky)
    with pytest.raises(pub.PublishError, match="No space left"):
        publish([results], target)
    assert not list(target.rglob("*.json")) and not list(target.rglob("*.jsonl"))  # nothing half-published
    monkeypatch.setattr(pub, "_atomic_copy", real)
    publish([results], target)
    text = (target / "quickstart" / "tiny__hf__bs4.json").read_text()
    assert "sk-live-0123456789" not in text and "***redacted***" in text
    assert len(list(target.rglob("*.json"))) == 4 and not list(target.rglob(".moecap-publish-*"))


def test_publish_to_an_unreachable_hub_is_one_line_and_exit_1(results, tmp_path):
    """Issue 17: publishing offline ended in an httpx traceback (and exit 0 behind a pipe). Real
    huggingface_hub against an endpoint where nothing listens."""
    from conftest import free_port

    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}", "HF_TOKEN": "hf_unused_0123456789",
           "HF_HUB_DISABLE_TELEMETRY": "1"}
    proc = subprocess.run([sys.executable, "-m", "moecap", "publish", str(results), "--to", "hf://datasets/org/res"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("moecap publish: nothing published: cannot publish to hf://datasets/org/res")
    assert "hf_unused_0123456789" not in proc.stderr


def test_redact_covers_args_argv_env_and_headers():
    from moecap.redact import REDACTED, redact, scrub, secret_values

    data = {"args": {"api_key": "k-123456", "model": "m", "env": {"HF_TOKEN": "hf_abcdef", "PATH": "/bin"}},
            "argv": ["x", "--api-key", "k-123456", "--set", "runners.0.args.api_key=k-123456", "--model", "m"],
            "error": "HTTP 401 with Authorization: Bearer k-123456"}
    out = redact(data)
    assert out["args"]["api_key"] == REDACTED and out["args"]["model"] == "m"
    assert out["args"]["env"] == {"HF_TOKEN": REDACTED, "PATH": "/bin"}
    assert out["argv"] == ["x", "--api-key", REDACTED, "--set", f"runners.0.args.api_key={REDACTED}", "--model", "m"]
    assert "k-123456" not in json.dumps(out)
    assert secret_values(data) == {"k-123456", "hf_abcdef"}
    assert scrub("started with key k-123456 and hf_abcdef", secret_values(data)).count(REDACTED) == 2


def test_secret_names_and_figure_names_are_told_apart():
    from moecap.redact import is_secret_name

    for name in ("api_key", "hf_token", "OPENAI_API_KEY", "--api-key", "Authorization", "password", "apiKey",
                 "runners.0.args.api_key", "GITHUB_TOKEN", "aws_secret_access_key", "token", "auth_token"):
        assert is_secret_name(name), name
    for name in ("output_tokens", "output_tokens_per_s", "usd_per_1m_output_tokens", "max_tokens", "tokenizer",
                 "keys", "key_cache", "input_tokens", "completion_tokens", "model", "joules_per_output_token",
                 "bos_token", "pad_token", "max_new_token"):
        assert not is_secret_name(name), name


def test_precision_shows_what_the_experts_are_stored_in():
    """Engine plans and GGUF exports are labelled by their weights, not by the activation dtype."""
    assert lb.precision_label({"type": "hf", "dtype": "bfloat16"}) == "bfloat16"
    engine = {"type": "engine", "dtype": "float32", "plan": {"name": "int4-all", "experts": 32, "int4_experts": 32}}
    assert lb.precision_label(engine) == "int4 experts, float32"
    mixed = {"type": "engine", "dtype": "bfloat16", "plan": {"experts": 32, "int8_experts": 8, "int4_experts": 16}}
    assert lb.precision_label(mixed) == "experts 25% int8 + 50% int4 + 25% full, bfloat16"
    resident = {"type": "engine", "dtype": "float32", "plan": {"experts": 32, "fast_experts": 32}}
    assert lb.precision_label(resident) == "float32"
    assert lb.precision_label({"type": "llamacpp", "dtype": "int8", "weight_type": "q4_0"}) == "q4_0 GGUF"
    # the engine's attention is its own: no attn= from the hf arguments it inherits
    assert lb.system_name({"type": "engine", "display_name": "int2", "resolved_args": {"attn_implementation": "sdpa"},
                           "attn_implementation": "engine (torch scaled_dot_product_attention)"}) == "int2"
