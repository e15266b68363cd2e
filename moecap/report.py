"""Tables of records: ``moecap report`` and the end-of-run summary."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any, Sequence

from moecap.figures import dig  # re-exported: callers import it from here
from moecap.records import Record

# the record's identity: (column, header, path into the record, format)
IDENTITY: list[tuple[str, str, tuple[str, ...], str]] = [
    ("model", "model", ("config", "model", "display_name"), "s"),
    ("runner", "runner", ("config", "runner", "display_name"), "s"),
    ("workload", "workload", ("config", "workload", "display_name"), "s"),
    ("load", "load", (), "load"),
    ("status", "status", ("status",), "s"),
]


def columns() -> list[tuple[str, str, str]]:
    """(key, header, format) of the table's fixed columns: the identity, the figures the figure table
    shows in reports (``moecap.figures``), then the basis of each figure family that is not plainly
    measured and the kind of peak utilization used."""
    from moecap import figures

    cols = [(c[0], c[1], c[3]) for c in IDENTITY]
    cols += [(f.key, f.header, f".{f.decimals}f") for f in figures.shown("report")]
    return cols + [("repetitions", "reps", "d"), ("basis", "basis", "s"), ("peak", "peak", "s")]


def __getattr__(name: str) -> Any:  # COLUMNS follows the figure table (read at access)
    if name == "COLUMNS":
        return columns()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _load_str(rec: dict[str, Any]) -> str | None:
    load = dig(rec, ("config", "load")) or {}
    for key, prefix in (("batch_size", "bs="), ("concurrency", "conc="), ("rate", "rate=")):
        if load.get(key) is not None:
            return f"{prefix}{load[key]}"
    return None


def record_row(rec: Record | dict[str, Any]) -> dict[str, Any]:
    from moecap import figures

    d = rec.model_dump() if isinstance(rec, Record) else rec
    report = d.get("report") if isinstance(d.get("report"), dict) else {}
    row: dict[str, Any] = {"cell_id": d.get("cell_id")}
    for col, _, path, fmt in IDENTITY:
        row[col] = _load_str(d) if fmt == "load" else dig(d, path)
    reps = report.get("repetitions") if isinstance(report.get("repetitions"), dict) else {}
    summary = reps.get("figures") if isinstance(reps.get("figures"), dict) else {}
    row["repetitions"] = reps.get("n") if reps else (1 if report.get("throughput") else None)
    for f in figures.shown("report"):
        row[f.key] = f.value(report)
        iv = (summary.get(f.key) or {}).get("interval") if isinstance(summary.get(f.key), dict) else None
        if isinstance(iv, list) and len(iv) == 2:  # the interval of the median over the repetitions
            row[f.key + LOW], row[f.key + HIGH] = iv
    row["basis"] = figures.basis_summary(report) if report else None
    row["peak"] = figures.peak_kind(report)
    for k, (v, se, _) in figures.quality_values(report).items():
        row[k] = v
        if se is not None:
            row[k + STDERR] = se
    return row


STDERR = " stderr"  # a quality figure's standard error sits beside it under "<key> stderr"
LOW, HIGH = " lo", " hi"  # with repetitions: the interval of a figure's median, under "<key> lo" / "<key> hi"
_AUX = (STDERR, LOW, HIGH)


def result_line(rec: Record) -> str:
    """A finished cell in one line: its status and headline figures (the end of a cell's progress)."""
    from moecap import figures

    report = rec.report if isinstance(rec.report, dict) else {}
    if rec.status != "ok":
        last = (rec.error or "").strip().splitlines()[-1:] or ["?"]
        return f"{rec.status.upper()}: {last[0]}"
    parts = []
    for key, label, unit, fmt in (("ttft_ms_p50", "TTFT p50", " ms", ".1f"), ("tpot_ms_p50", "TPOT p50", " ms", ".2f"),
                                  ("output_tokens_per_s", "out", " tok/s", ".1f"), ("s_mbu_decode", "S-MBU decode", "", ".3f")):
        v = figures.value(report, key)
        if v is not None:
            parts.append(f"{label} {format(v, fmt)}{unit}")
    quality = figures.quality_values(report)
    ppl = [f"{k.removeprefix('ppl:')} {v:.2f}" for k, (v, _, _) in quality.items() if k.startswith("ppl:")]
    if ppl:
        parts.append("ppl " + ", ".join(ppl))
    acc = [f"{k.split(':')[0]} {v:.3f}" + (f"±{se:.3f}" if se is not None else "")
           for k, (v, se, _) in quality.items() if k.endswith(":acc")]
    if acc:
        parts.append("acc " + ", ".join(acc))
    return "ok" + (": " + " · ".join(parts) if parts else "")


def figure_value(rec: Record | dict[str, Any], key: str) -> Any:
    """One figure of a record (any figure of the table, or a quality figure), by key."""
    from moecap import figures

    d = rec.model_dump() if isinstance(rec, Record) else rec
    return figures.value(d.get("report") if isinstance(d.get("report"), dict) else {}, key)


def _quality_keys(rows: list[dict[str, Any]], fixed: set[str] | None = None) -> list[str]:
    """The quality figures (``ppl:<dataset>``, ``<task>:<metric>``) any row has: perplexities first.
    ``fixed``: the keys that are no quality figure (default: the identity and the table's figures)."""
    fixed = fixed if fixed is not None else {"cell_id", *(c[0] for c in columns())}
    keys = {k for r in rows for k in r if k not in fixed and not k.endswith(_AUX)}
    return sorted(keys, key=lambda k: (not k.startswith("ppl:"), k))


def _quality_fmt(key: str) -> str:
    return ".2f" if key.startswith("ppl:") else ".3f"


def _columns(rows: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(key, header, format) of the fixed columns (each figure with repetitions followed by the interval
    of its median, ``<key> lo``/``<key> hi``), then each quality figure and its standard error."""
    cols = []
    for c in columns():
        cols.append(c)
        if any(r.get(c[0] + LOW) is not None for r in rows):
            cols += [(c[0] + LOW, c[1] + " lo", c[2]), (c[0] + HIGH, c[1] + " hi", c[2])]
    for k in _quality_keys(rows):
        cols.append((k, k, _quality_fmt(k)))
        if any(r.get(k + STDERR) is not None for r in rows):
            cols.append((k + STDERR, k + STDERR, _quality_fmt(k)))
    return cols


def _quality_table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Quality cells, one row each: perplexity per data set, then every task's metric as ``value ± stderr``,
    one column per figure, so that a reader compares down a column."""
    keys = _quality_keys(rows)
    ident = [c for c in columns()[:len(IDENTITY)] if c[0] != "load"]
    headers = [c[1] for c in ident] + [k.removeprefix("ppl:") + " ppl" if k.startswith("ppl:") else k for k in keys]
    cells = []
    for r in rows:
        line = [_fmt(r.get(c[0]), c[2]) for c in ident]
        for k in keys:
            v, se = r.get(k), r.get(k + STDERR)
            line.append(_fmt(v, _quality_fmt(k)) + (f" ± {_fmt(se, _quality_fmt(k))}" if v is not None and se is not None else ""))
        cells.append(line)
    return headers, cells


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_safe(value: Any) -> Any:
    """A text cell that a spreadsheet would run as a formula (it starts with ``=``, ``+``, ``-``, ``@``,
    a tab or a carriage return) gets a leading ``'`` (OWASP's advice); numbers and other text pass."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def _fmt(v: Any, fmt: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if fmt in ("s", "load"):
        return str(v)
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
        writer.writerows({k: csv_safe(v) for k, v in r.items()} for r in rows)
        return buf.getvalue()
    if fmt not in ("table", "markdown"):
        raise ValueError(f"unknown format {fmt!r}; allowed: table, csv, json, markdown")
    # two tables: performance figures of the load cells, quality figures of the cells that have them
    fixed = columns()
    keys = {"cell_id", *(c[0] for c in fixed)}
    has_quality = [bool(_quality_keys([r], keys)) for r in rows]
    perf = [r for r, q in zip(rows, has_quality) if not q or r.get("load") is not None]
    quality = [r for r, q in zip(rows, has_quality) if q]
    render = _markdown if fmt == "markdown" else render_table
    parts = []
    if perf:
        def cell(r: dict[str, Any], c: tuple[str, str, str]) -> str:
            text = _fmt(r.get(c[0]), c[2])
            if r.get(c[0] + LOW) is not None and r.get(c[0]) is not None:  # median [interval] over repetitions
                text += f" [{_fmt(r[c[0] + LOW], c[2])}–{_fmt(r[c[0] + HIGH], c[2])}]"
            return text
        parts.append(render([c[1] for c in fixed], [[cell(r, c) for c in fixed] for r in perf]))
    if quality:
        parts.append(render(*_quality_table(quality)))
    return "\n\n".join(parts)


def _markdown(headers: list[str], cells: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)


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
