"""Injecting a known change into a result folder: every timestamp of its traces through one monotone warp.

This is how the regression gate is tested and calibrated (``tests/test_compare.py``,
``benchmarks/gate_calibration.py``): a copy of a real run made exactly 10 % slower, or with one stalled
pass, whose records tell the same story as their traces, as they would after a real change:

* each performance record's traces (``passes``/``requests`` and every repetition's ``passes.rI``/
  ``requests.rI``) are warped, each file once;
* the record's latency, throughput and per-pass figures are recomputed from its warped traces with
  moecap's own metric functions; utilization and cost, which divide fixed bytes, FLOPs and prices by a
  time, are rescaled by the change of that time;
* with repetitions, every repetition's value of every figure is scaled by the change the warp made to
  that repetition's own traces, and the medians, intervals and spreads are recomputed.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

Warp = Callable[[float], float]
WarpFor = Callable[[list[dict[str, Any]]], Warp]


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def slower(factor: float) -> WarpFor:
    """Every interval of the run stretched by ``factor``: a uniformly slower system."""
    return lambda passes: (lambda t: t * factor)


def hiccup(share_of_duration: float) -> WarpFor:
    """One decode pass in the middle of the run stalls; everything after it starts that much later."""
    def warp_for(passes: list[dict[str, Any]]) -> Warp:
        decode = [p for p in passes if p["phase"] == "decode"]
        stalled = decode[len(decode) // 2]
        run_s = max(p["end_s"] for p in passes) - min(p["start_s"] for p in passes)
        delay = share_of_duration * run_s
        return lambda t: t + delay if t > stalled["start_s"] else t
    return warp_for


def _warp_traces(passes: list[dict[str, Any]], requests: list[dict[str, Any]], warp: Warp) -> None:
    for p in passes:
        p["start_s"], p["end_s"] = warp(p["start_s"]), warp(p["end_s"])
        p["time_s"] = p["end_s"] - p["start_s"]
    for r in requests:
        if r.get("send_s") is not None:
            r["send_s"] = warp(r["send_s"])
        r["token_times_s"] = [warp(t) for t in r.get("token_times_s") or []]
        if r.get("chunk_times_s"):
            r["chunk_times_s"] = [warp(t) for t in r["chunk_times_s"]]


def _retimed_report(report: dict[str, Any], passes: list[dict[str, Any]], requests: list[dict[str, Any]],
                    new_passes: list[dict[str, Any]], new_requests: list[dict[str, Any]]) -> dict[str, Any]:
    """``report`` (whose sections came from ``passes``/``requests``) as the warped traces give it."""
    from moecap.metrics.latency import pass_latency, summarize_requests

    rep = copy.deepcopy(report)
    old_duration = (rep.get("throughput") or {}).get("duration_s")
    rep.update(summarize_requests([SimpleNamespace(**r) for r in new_requests]))
    rep["pass_latency"] = pass_latency([SimpleNamespace(**p) for p in new_passes])
    for phase in ("prefill", "decode"):
        util = (rep.get("utilization") or {}).get(phase)
        if not isinstance(util, dict):
            continue
        old = sum(p["time_s"] for p in passes if p.get("phase") == phase)
        new = sum(p["time_s"] for p in new_passes if p.get("phase") == phase)
        if old > 0 and new > 0:
            scale = old / new
            if util.get("time_s") is not None:
                util["time_s"] = util["time_s"] / scale
            for key in ("s_mbu", "s_mfu", "achieved_bandwidth_gbs", "achieved_tflops"):
                if isinstance(util.get(key), (int, float)):
                    util[key] *= scale
    new_duration = rep["throughput"]["duration_s"]
    cost = rep.get("cost")
    if isinstance(cost, dict) and old_duration and new_duration:
        for key in ("run_seconds", "run_hours", "run_usd", "usd_per_1m_output_tokens", "usd_per_request"):
            if isinstance(cost.get(key), (int, float)):
                cost[key] *= new_duration / old_duration
    return rep


def retime_results(src: Path, dst: Path, warp_for: WarpFor, run_id: str | None = None) -> Path:
    """Copy the result folder ``src`` to ``dst`` with every performance record's traces warped (see the
    module's docstring). ``warp_for(passes)`` returns the monotone map of timestamps for one trace.
    ``run_id``: give the copy's records this run id (a stand-in for another run, e.g. as history)."""
    from moecap import figures

    shutil.copytree(src, dst)
    for path in sorted(dst.rglob("*.json")):
        try:
            rec = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            continue
        renamed = run_id is not None and isinstance(rec, dict) and "run_id" in rec
        if renamed:
            rec["run_id"] = run_id
        arts = rec.get("artifacts") if isinstance(rec, dict) else None
        if not isinstance(arts, dict) or not arts.get("passes") or not arts.get("requests"):
            if renamed:  # no traces to warp (a quality record): only its run id changes
                path.write_text(json.dumps(rec, indent=2), encoding="utf-8")
            continue
        reps = {"": ("passes", "requests")}
        n = (rec.get("report") or {}).get("repetitions", {}).get("n") or 1
        for i in range(1, n + 1):
            if f"passes.r{i}" in arts:
                reps[f".r{i}"] = (f"passes.r{i}", f"requests.r{i}")
        pairs = {arts[pk]: arts[rk] for pk, rk in reps.values()}  # passes file -> its requests file
        before: dict[str, tuple[list, list]] = {}
        after: dict[str, tuple[list, list]] = {}
        for p_rel, r_rel in pairs.items():
            passes, requests = read_jsonl(path.parent / p_rel), read_jsonl(path.parent / r_rel)
            for p in passes:  # an older record may carry only start and end
                if p.get("time_s") is None:
                    p["time_s"] = p["end_s"] - p["start_s"]
            before[p_rel] = (passes, requests)
            new_p, new_r = copy.deepcopy(passes), copy.deepcopy(requests)
            _warp_traces(new_p, new_r, warp_for(new_p))
            after[p_rel] = (new_p, new_r)
            write_jsonl(path.parent / p_rel, new_p)
            write_jsonl(path.parent / r_rel, new_r)
        report = rec["report"]
        summary = (report.get("repetitions") or {}).get("figures") or {}
        base_report = {k: v for k, v in report.items() if k != "repetitions"}
        for suffix, (pk, _) in reps.items():
            p_old, r_old = before[arts[pk]]
            p_new, r_new = after[arts[pk]]
            if suffix:  # a repetition: scale its values by what the warp did to its own traces
                old_rep = _retimed_report(base_report, p_old, r_old, p_old, r_old)
                new_rep = _retimed_report(base_report, p_old, r_old, p_new, r_new)
                i = int(suffix[2:]) - 1
                for key, entry in summary.items():
                    f = figures.get(key)
                    a, b = figures.number(f.value(old_rep)), figures.number(f.value(new_rep))
                    if a and b is not None:
                        entry["values"][i] = entry["values"][i] * b / a
        p_old, r_old = before[arts["passes"]]
        p_new, r_new = after[arts["passes"]]
        new_report = _retimed_report(base_report, p_old, r_old, p_new, r_new)
        if summary:
            for key, entry in summary.items():
                med, lo, hi, cov = figures.median_interval(entry["values"])
                entry.update(median=med, interval=[lo, hi], coverage=cov,
                             spread=(max(entry["values"]) - min(entry["values"])) / abs(med) if med else None)
            new_report["repetitions"] = report["repetitions"]
        rec["report"] = new_report
        path.write_text(json.dumps(rec, indent=2), encoding="utf-8")
    return dst
