"""The one table of figures: the typed report, its migration, bases, and readers that follow the table."""

from __future__ import annotations

import dataclasses
import json

import pytest
from pydantic import ValidationError

from moecap import figures
from moecap.records import SCHEMA_VERSION, Record, load_records, migrate, new_run_id, now_iso

REPORT = {
    "latency": {m: {"n": 4, "mean": 10.0, "std": 1.0, "median": 9.0, "p90": 12.0, "p99": 13.0}
                for m in ("ttft_ms", "tpot_ms", "itl_ms", "itl_per_token_ms", "e2el_ms")},
    "throughput": {"completed": 4, "failed": 1, "duration_s": 2.0, "input_tokens": 64, "output_tokens": 40,
                   "output_tokens_per_s": 20.0, "total_tokens_per_s": 52.0, "requests_per_s": 2.0},
    "utilization": {"basis": "traced", "decode": {"s_mbu": 0.5, "s_mfu": 0.01, "bytes": {"experts": 3.0, "total": 5.0}},
                    "peak": {"kind": "calibrated"}},
    "cost": {"usd_per_1m_output_tokens": 3.5, "usd_per_request": 0.01},
    "energy": {"available": True, "avg_power_w": 100.0, "joules_per_output_token": 0.25},
    "memory": {"host_rss_peak_bytes": 2**30},
    "quality": {"perplexity": {"tiny-code": {"perplexity": 5.5}},
                "lm_eval": {"tasks": {"t": {"metrics": {"acc": {"value": 0.75, "stderr": 0.02}}}}}},
}


def make(report=REPORT, **kw):
    return Record(run_id=new_run_id(), created_at=now_iso(), suite={"name": "s"}, cell_id="c1", status="ok",
                  config={"model": {"display_name": "m"}, "runner": {"display_name": "hf"}, "load": {"batch_size": 1}},
                  report=report, **kw)


def test_every_figure_declared_once_with_what_readers_need():
    keys = [f.key for f in figures.table()]
    assert len(keys) == len(set(keys))
    for f in figures.table():
        assert f.family in figures.FAMILIES and f.label and f.description, f
        assert f.threshold is None or f.higher_is_better is not None, f
    assert figures.value(REPORT, "ttft_ms_p50") == 9.0
    assert figures.value(REPORT, "ttft_ms_median") == 9.0  # an older name, through the aliases
    assert figures.value(REPORT, "peak_mem_gib") == 1.0
    assert figures.value(REPORT, "accuracy") == 0.75 and figures.value(REPORT, "perplexity") == 5.5
    assert figures.value(REPORT, "ppl:tiny-code") == 5.5 and figures.value(REPORT, "t:acc") == 0.75
    assert figures.value(REPORT, "s_mbu_prefill") is None
    assert figures.byte_components(REPORT, "decode") == {"experts": 3.0}
    with pytest.raises(KeyError, match="unknown figure 'nope'; known: ttft_ms_mean"):
        figures.get("nope")


def test_bases_per_family_are_recorded_and_shown():
    b = figures.bases(REPORT)
    assert b == {"latency": "measured", "throughput": "measured", "utilization": "traced", "energy": "measured",
                 "cost": "estimated", "memory": "measured", "quality": "measured"}
    assert figures.basis(REPORT, "s_mbu_decode") == "traced" and figures.basis(REPORT, "ppl:x") == "measured"
    assert figures.basis_summary(REPORT) == "util=traced (calibrated peak); cost=estimated"
    est = {**REPORT, "utilization": {**REPORT["utilization"], "basis": "recorded"}}
    assert figures.basis_summary(est) == "util=recorded (calibrated peak); cost=estimated"
    from moecap.leaderboard.data import record_row as lb_row
    from moecap.report import record_row

    # the report and the board say the same
    assert record_row(make())["basis"] == lb_row(make().model_dump())["basis"] == figures.basis_summary(REPORT)


def test_renaming_a_figure_in_the_table_renames_it_everywhere(monkeypatch):
    """The report table, the leaderboard and compare read the table at call time."""
    table = [dataclasses.replace(f, key="out_tps") if f.key == "output_tokens_per_s" else f
             for f in figures.FIGURES]
    monkeypatch.setattr(figures, "FIGURES", table)
    rec = make()
    from moecap import compare
    from moecap.leaderboard import data as lb
    from moecap.report import columns, format_rows, record_row

    assert "out_tps" in [c[0] for c in columns()] and "output_tokens_per_s" not in [c[0] for c in columns()]
    assert record_row(rec)["out_tps"] == 20.0
    assert "out_tps" in format_rows([record_row(rec)], "csv").splitlines()[0]
    assert lb.record_row(rec.model_dump())["out_tps"] == 20.0
    assert "out_tps" in [c.key for c in lb.COLUMNS] and "out_tps" in lb.COLUMN_BY_KEY
    figs = compare.record_figures(rec)
    assert figs["out_tps"].value == 20.0 and "output_tokens_per_s" not in figs
    assert "out_tps" in compare.STATIC_BY_NAME


def test_the_report_is_typed_and_a_wrong_type_names_its_field():
    bad = json.loads(json.dumps(REPORT))
    bad["throughput"]["completed"] = "four"
    with pytest.raises(ValidationError) as err:
        make(report=bad)
    assert "report.throughput.completed" in str(err.value)
    bad = json.loads(json.dumps(REPORT))
    bad["utilization"]["basis"] = "guessed"
    with pytest.raises(ValidationError, match="report.utilization.basis"):
        make(report=bad)
    # sections keep keys this version does not know (newer records load)
    newer = json.loads(json.dumps(REPORT))
    newer["throughput"]["future_figure"] = 1
    newer["future_section"] = {"x": 1}
    rec = make(report=newer)
    assert rec.report["throughput"]["future_figure"] == 1 and rec.report["future_section"] == {"x": 1}


def test_schema_1_records_load_through_the_one_migration(tmp_path):
    old = make().model_dump()
    old["schema_version"] = 1
    old["report"].pop("basis", None)
    assert "basis" not in old["report"]
    (tmp_path / "c1.json").write_text(json.dumps(old))
    ((_, rec),) = load_records(tmp_path)
    assert rec.schema_version == SCHEMA_VERSION and rec.model_extra["migrated_from"] == 1
    assert rec.report["basis"]["utilization"] == "traced"
    assert any("schema 1" in n for n in rec.report["notes"])
    from moecap.leaderboard.data import load_results

    df = load_results(tmp_path)
    assert df["basis"].iloc[0] == "util=traced (calibrated peak); cost=estimated" and df["output_tokens_per_s"].iloc[0] == 20.0
    assert migrate({"schema_version": SCHEMA_VERSION, "x": 1}) == {"schema_version": SCHEMA_VERSION, "x": 1}


def test_median_interval_is_the_order_statistic_interval():
    """The distribution-free interval of a median: [x_(k), x_(n-k+1)], the largest k with coverage >= 95 %
    (binomial tables: n=10 -> (2, 9), n=20 -> (6, 15)); too few values: the range, with its coverage."""
    from moecap.figures import median_interval

    assert median_interval(range(10)) == (4.5, 1.0, 8.0, pytest.approx(1 - 2 * 11 / 1024))
    assert median_interval(range(20))[1:3] == (5.0, 14.0)
    med, lo, hi, cov = median_interval([3.0, 1.0, 2.0])
    assert (med, lo, hi) == (2.0, 1.0, 3.0) and cov == 0.75  # 1 - 2 / 2**3
    assert median_interval([5.0]) == (5.0, 5.0, 5.0, 0.0)
    with pytest.raises(ValueError):
        median_interval([])


def test_repetitions_give_every_figure_its_median_interval_and_spread():
    from moecap.figures import repetition_summary

    runs = [{**REPORT, "throughput": {**REPORT["throughput"], "output_tokens_per_s": v}} for v in (100.0, 90.0, 120.0)]
    summary = repetition_summary(runs)
    thr = summary["output_tokens_per_s"]
    assert thr["values"] == [100.0, 90.0, 120.0] and thr["median"] == 100.0
    assert thr["interval"] == [90.0, 120.0] and thr["coverage"] == 0.75 and thr["spread"] == pytest.approx(0.3)
    # the figure's value is the median over the repetitions, whatever the sections hold
    rep = {**runs[2], "repetitions": {"n": 3, "figures": summary}}
    assert figures.value(rep, "output_tokens_per_s") == 100.0
    assert figures.value(runs[2], "output_tokens_per_s") == 120.0
    assert set(summary) >= {"ttft_ms_p50", "tpot_ms_p50", "usd_per_1m_output_tokens", "s_mbu_decode"}
