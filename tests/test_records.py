"""Records: atomic writes, tolerant loading, the report table."""

import json
import logging

from moecap.records import Record, ResultStore, load_records, new_run_id, now_iso
from moecap.report import format_rows, record_row


def make(cell_id="c1", status="ok", **kw):
    return Record(run_id=new_run_id(), created_at=now_iso(), suite={"name": "s"}, cell_id=cell_id, status=status, **kw)


def test_write_is_atomic_and_roundtrips(tmp_path):
    store = ResultStore(tmp_path, "s")
    path = store.write(make(report={"throughput": {"output_tokens_per_s": 12.5}}))
    assert path.name == "c1.json"
    assert [p.name for p in path.parent.iterdir()] == ["c1.json"]  # no temp file left behind
    assert store.load("c1").report["throughput"]["output_tokens_per_s"] == 12.5
    assert store.is_done("c1")
    store.write(make(status="failed", error="Traceback ..."))
    assert not store.is_done("c1")


def test_artifacts_are_jsonl(tmp_path):
    store = ResultStore(tmp_path, "s")
    rel = store.write_artifact("c1", "passes.jsonl", ({"i": i} for i in range(3)))
    lines = (store.dir / rel).read_text().splitlines()
    assert [json.loads(x)["i"] for x in lines] == [0, 1, 2]


def test_loader_tolerates_unknown_keys_and_skips_corrupt(tmp_path, caplog):
    store = ResultStore(tmp_path, "s")
    store.write(make("good"))
    newer = make("newer").model_dump()
    newer["some_future_section"] = {"x": 1}
    newer["schema_version"] = 99
    (store.dir / "newer.json").write_text(json.dumps(newer))
    (store.dir / "corrupt.json").write_text("{ not json")
    (store.dir / "other.json").write_text(json.dumps({"not": "a record"}))
    with caplog.at_level(logging.WARNING):
        recs = load_records(tmp_path)
    assert sorted(r.cell_id for _, r in recs) == ["good", "newer"]
    assert any("corrupt.json" in m for m in caplog.messages)
    assert store.load("corrupt") is None


def test_report_formats():
    rec = make(
        config={"model": {"display_name": "m"}, "runner": {"display_name": "hf"}, "load": {"batch_size": 4}},
        report={"latency": {"ttft_ms": {"median": 12.345}}, "utilization": {"decode": {"s_mbu": 0.5}}},
    )
    row = record_row(rec)
    assert row["load"] == "bs=4" and row["ttft_ms_p50"] == 12.345 and row["s_mbu_decode"] == 0.5
    table = format_rows([row])
    assert "TTFT p50 (ms)" in table and "12.3" in table and "0.500" in table
    md = format_rows([row], "markdown")
    assert md.startswith("| model |")
    csv = format_rows([row], "csv")
    assert csv.splitlines()[0].startswith("cell_id,model")
    assert json.loads(format_rows([row], "json"))[0]["cell_id"] == "c1"


def test_a_record_on_disk_is_strict_json(tmp_path):
    """NaN and inf figures (a zero-length window) are written as null: other JSON readers choke on NaN."""
    store = ResultStore(tmp_path, "s")
    path = store.write(make(report={"throughput": {"output_tokens_per_s": float("nan")}, "x": float("inf")}))
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text)["report"]["throughput"]["output_tokens_per_s"] is None
