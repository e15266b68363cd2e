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
    return cols + [("basis", "basis", "s"), ("peak", "peak", "s")]


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
    for f in figures.shown("report"):
        row[f.key] = f.value(report)
    row["basis"] = figures.basis_summary(report) if report else None
    row["peak"] = figures.peak_kind(report)
    row.update({k: v for k, (v, _, _) in figures.quality_values(report).items()})
    return row


def figure_value(rec: Record | dict[str, Any], key: str) -> Any:
    """One figure of a record (any figure of the table, or a quality figure), by key."""
    from moecap import figures

    d = rec.model_dump() if isinstance(rec, Record) else rec
    return figures.value(d.get("report") if isinstance(d.get("report"), dict) else {}, key)


def _columns(rows: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(key, header, format) of the fixed columns, then the quality columns any row has."""
    cols = columns()
    fixed = {"cell_id", *(c[0] for c in cols)}
    extra = sorted({k for r in rows for k in r if k not in fixed})
    return cols + [(k, k, ".2f" if k.startswith("ppl:") else ".4g") for k in extra]


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
