"""Re-scoring a finished cell for its workload's SLOs from its stored requests, without re-running it.

Goodput is the only figure an SLO changes, and every request's timeline is in the cell's
``requests.jsonl``; so when a suite's ``workloads[i].slo_ms`` changes (it is not part of the cell id),
the driver re-scores each finished cell: the throughput section (and each model's, for a multi-model
workload) recomputed by ``moecap.metrics.latency.summarize_requests`` from the stored requests, the record
rewritten atomically with ``rescored: {at, slo_ms, previous_slo_ms}``.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from moecap.figures import dig
from moecap.records import Record, ResultStore, now_iso
from moecap.suite import Cell


def _requests(store: ResultStore, rec: Record) -> list[Any] | None:
    from moecap.runners.base import RequestTrace

    rel = (rec.artifacts or {}).get("requests")
    path = store.dir / rel if rel else None
    if path is None or not path.is_file():
        return None
    names = {f.name for f in dataclasses.fields(RequestTrace)}
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            out.append(RequestTrace(**{k: v for k, v in row.items() if k in names}))
    return out


def needs_rescore(rec: Record | None, cell: Cell) -> bool:
    """An ok performance record whose goodput was scored for other SLOs than the workload's."""
    if rec is None or rec.status != "ok" or not cell.workload.measures_performance:
        return False
    return (dig(rec.report, ("throughput", "slo_ms")) or None) != (cell.workload.slo_ms or None)


def rescore(store: ResultStore, cell: Cell) -> Record | None:
    """The cell's record re-scored and rewritten; None when it needs none or its requests are gone.
    Read again here: the caller holds the cell's claim, and the record may have changed since it looked."""
    from moecap.metrics.latency import summarize_requests

    rec = store.load(cell.cell_id)
    if not needs_rescore(rec, cell):
        return None
    requests = _requests(store, rec)
    if requests is None:
        return None
    slo = dict(cell.workload.slo_ms) if cell.workload.slo_ms else None
    report = dict(rec.report)
    previous = dig(report, ("throughput", "slo_ms"))
    report["throughput"] = summarize_requests(requests, slo_ms=slo)["throughput"]
    if isinstance(report.get("per_model"), dict):
        report["per_model"] = {
            m: {**sec, "throughput": summarize_requests([r for r in requests if r.model == m],
                                                        slo_ms=slo)["throughput"]}
            for m, sec in report["per_model"].items()}
    report["rescored"] = {"at": now_iso(), "slo_ms": slo, "previous_slo_ms": previous}
    new = Record.model_validate({**rec.model_dump(), "report": report})
    store.write(new)
    return new
