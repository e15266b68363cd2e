"""Tables of records: ``moecap report`` and the end-of-run summary."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any, Sequence

from moecap.records import Record

# (column, header, path into the record, format)
COLUMNS: list[tuple[str, str, tuple[str, ...], str]] = [
    ("model", "model", ("config", "model", "display_name"), "s"),
    ("runner", "runner", ("config", "runner", "display_name"), "s"),
    ("workload", "workload", ("config", "workload", "display_name"), "s"),
    ("load", "load", (), "load"),
    ("status", "status", ("status",), "s"),
    ("ttft_ms_median", "TTFT p50 ms", ("report", "latency", "ttft_ms", "median"), ".1f"),
    ("ttft_ms_p99", "TTFT p99 ms", ("report", "latency", "ttft_ms", "p99"), ".1f"),
    ("tpot_ms_median", "TPOT p50 ms", ("report", "latency", "tpot_ms", "median"), ".2f"),
    ("itl_ms_p99", "ITL p99 ms", ("report", "latency", "itl_ms", "p99"), ".2f"),
    ("output_tokens_per_s", "out tok/s", ("report", "throughput", "output_tokens_per_s"), ".1f"),
    ("requests_per_s", "req/s", ("report", "throughput", "requests_per_s"), ".2f"),
    ("s_mbu_prefill", "S-MBU pre", ("report", "utilization", "prefill", "s_mbu"), ".3f"),
    ("s_mbu_decode", "S-MBU dec", ("report", "utilization", "decode", "s_mbu"), ".3f"),
    ("s_mfu_prefill", "S-MFU pre", ("report", "utilization", "prefill", "s_mfu"), ".3f"),
    ("s_mfu_decode", "S-MFU dec", ("report", "utilization", "decode", "s_mfu"), ".4f"),
    ("experts_per_layer_decode", "experts/layer dec", ("report", "utilization", "decode", "mean_active_experts_per_layer"), ".2f"),
    ("j_per_token", "J/tok", ("report", "energy", "joules_per_output_token"), ".3g"),
    ("usd_per_1m_output_tokens", "$/1M out", ("report", "cost", "usd_per_1m_output_tokens"), ".3g"),
    ("utilization_basis", "util", ("report", "utilization", "basis"), "s"),
    ("peak", "peak", ("report", "utilization", "peak", "kind"), "s"),
    ("peak_mem_gib", "peak mem GiB", (), "mem"),
]


def dig(d: Any, path: Sequence[str]) -> Any:
    """``d[path[0]][path[1]]...``, or None where a level is missing or not a dict."""
    for k in path:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _load_str(rec: dict[str, Any]) -> str | None:
    load = dig(rec, ("config", "load")) or {}
    for key, prefix in (("batch_size", "bs="), ("concurrency", "conc="), ("rate", "rate=")):
        if load.get(key) is not None:
            return f"{prefix}{load[key]}"
    return None


def _peak_mem(rec: dict[str, Any]) -> float | None:
    mem = dig(rec, ("report", "memory")) or {}
    v = mem.get("device_peak_allocated_bytes") or mem.get("host_rss_peak_bytes") or mem.get("host_peak_rss_process_bytes")
    return v / 2**30 if v else None


def _quality_columns(d: dict[str, Any]) -> dict[str, Any]:
    """``ppl:<dataset>`` (token perplexity) and ``<task>:<metric>`` (lm-eval) columns of a record."""
    out: dict[str, Any] = {}
    quality = dig(d, ("report", "quality")) or {}
    for ds, res in (quality.get("perplexity") or {}).items():
        out[f"ppl:{ds}"] = res.get("perplexity")
    for task, res in (quality.get("lm_eval") or {}).get("tasks", {}).items():
        for metric, value in (res.get("metrics") or {}).items():
            if isinstance(value, dict):  # {"value": ..., "stderr": ...}
                value = value.get("value")
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[f"{task}:{metric}"] = value
    return out


def record_row(rec: Record | dict[str, Any]) -> dict[str, Any]:
    d = rec.model_dump() if isinstance(rec, Record) else rec
    row: dict[str, Any] = {"cell_id": d.get("cell_id")}
    for col, _, path, fmt in COLUMNS:
        if fmt == "load":
            row[col] = _load_str(d)
        elif fmt == "mem":
            row[col] = _peak_mem(d)
        else:
            row[col] = dig(d, path)
    row.update(_quality_columns(d))
    return row


def _columns(rows: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(key, header, format) of the fixed columns, then the quality columns any row has."""
    cols = [(c[0], c[1], c[3]) for c in COLUMNS]
    fixed = {"cell_id", *(c[0] for c in COLUMNS)}
    extra = sorted({k for r in rows for k in r if k not in fixed})
    return cols + [(k, k, ".2f" if k.startswith("ppl:") else ".4g") for k in extra]


def _fmt(v: Any, fmt: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if fmt in ("s", "load"):
        return str(v)
    if fmt == "mem":
        fmt = ".3f"
    try:
        return format(v, fmt)
    except (TypeError, ValueError):
        return str(v)


def format_rows(rows: list[dict[str, Any]], fmt: str = "table") -> str:
    if fmt == "json":
        return json.dumps(rows, indent=2, default=str)
    cols = _columns(rows)
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=["cell_id"] + [c[0] for c in cols])
        writer.writeheader()
        writer.writerows(rows)
        return buf.getvalue()
    headers = [c[1] for c in cols]
    cells = [[_fmt(r.get(c[0]), c[2]) for c in cols] for r in rows]
    if fmt == "markdown":
        lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in cells]
        return "\n".join(lines)
    if fmt != "table":
        raise ValueError(f"unknown format {fmt!r}; allowed: table, csv, json, markdown")
    return render_table(headers, cells)


def render_table(headers: list[str], cells: list[list[str]]) -> str:
    """A fixed-width text table: headers, a rule, one line per row."""
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    out = ["  ".join(h.ljust(w) for h, w in zip(headers, widths))]
    out.append("  ".join("-" * w for w in widths))
    out += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(out)


def report(paths: Sequence[str | Path], fmt: str = "table") -> str:
    from moecap.records import load_records

    rows = []
    for p in paths:
        rows.extend(record_row(rec) for _, rec in load_records(p))
    if not rows:
        return "no records found under " + ", ".join(str(p) for p in paths)
    return format_rows(rows, fmt)
