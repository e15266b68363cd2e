"""Runs a suite's cells and writes one record per cell.

Cells sharing a model and a runner reuse one loaded model. A failed cell (exception, OOM, a model that
does not load, unknown peaks) is recorded with its traceback and the suite goes on. Cells whose record
is already ``ok`` are skipped unless ``force``.
"""

from __future__ import annotations

import itertools
import sys
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

from moecap.records import Record, ResultStore, new_run_id, now_iso
from moecap.registry import load_object, runner_entry
from moecap.suite import Cell, Suite, expand


@dataclass
class CellOutcome:
    cell: Cell
    status: str  # ok | failed | skipped (already done)
    record: Record | None = None
    path: str | None = None


@dataclass
class SuiteOutcome:
    run_id: str
    outcomes: list[CellOutcome] = field(default_factory=list)

    @property
    def failed(self) -> list[CellOutcome]:
        return [o for o in self.outcomes if o.status == "failed"]


def _suite_info(suite: Suite) -> dict[str, Any]:
    return {"name": suite.name, "source": suite.source, "description": suite.description}


def _cell_config(cell: Cell, runner_info: dict[str, Any] | None, hw: dict[str, Any] | None) -> dict[str, Any]:
    cfg = cell.config_dict()
    cfg["model"]["display_name"] = cell.model.display_name
    cfg["runner"]["display_name"] = cell.runner.display_name
    if runner_info:
        cfg["runner"].update({k: v for k, v in runner_info.items() if k != "args"})
        cfg["runner"]["resolved_args"] = runner_info.get("args")
    cfg["workload"]["display_name"] = cell.workload.display_name
    if cell.load is not None:
        cfg["load"]["kind"] = cell.load.kind
        if cell.load.kind == "rate":  # the arrival process is part of the load even at its defaults
            cfg["load"].update(arrival=cell.load.arrival, burstiness=cell.load.burstiness)
    cfg["hardware"] = {"settings": cell.suite.hardware.model_dump(mode="json"), "detected": hw}
    cfg["cost_settings"] = dict(cell.suite.cost)
    return cfg


def build_report(trace: Any, peaks: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Turn a RunTrace into the record's report section (and per-pass rows for the artifacts)."""
    from moecap.metrics.accounting import from_hf_config
    from moecap.metrics.latency import pass_latency, summarize_requests
    from moecap.metrics.utilization import utilization

    acc = from_hf_config(trace.model_config) if trace.model_config else None
    report: dict[str, Any] = summarize_requests(trace.requests, slo_ms=trace.extra.get("goodput_slo_ms") or None)
    if trace.extra.get("errors"):
        report["errors"] = dict(trace.extra["errors"])
    if trace.extra.get("server"):  # what the server itself recorded over the window (moecap serve's /stats)
        report["server"] = trace.extra["server"]
    models = sorted({r.model for r in trace.requests if getattr(r, "model", None)})
    if len(models) > 1 or trace.extra.get("models"):  # a multi-model workload: each model's own figures
        slo = trace.extra.get("goodput_slo_ms") or None
        report["per_model"] = {
            m: {**summarize_requests([r for r in trace.requests if r.model == m], slo_ms=slo),
                "requests": sum(1 for r in trace.requests if r.model == m)}
            for m in models
        }
    report["pass_latency"] = pass_latency(trace.passes)
    if acc is not None:
        report["model"] = acc.summary()
    report["memory"] = trace.memory
    report["tracing"] = trace.tracing
    if trace.energy:
        from moecap.energy import per_token

        report["energy"] = {**trace.energy, **per_token(trace.energy, report["throughput"]["output_tokens"])}
    rows: list[dict[str, Any]] = []
    if trace.tracing.get("traced") and trace.passes and acc is not None and peaks is not None:
        phases, rows = utilization(
            trace.passes,
            acc,
            trace.moe_layers,
            trace.weight_bytes_per_param,
            trace.kv_bytes_per_elem,
            peaks.mem_bandwidth_Bps,
            peaks.flops_for(trace.compute_dtype),
            expanded_mla=trace.kv_cache_expanded_mla,
            expert_bytes=trace.expert_bytes,
        )
        report["utilization"] = {
            **phases,
            "basis": "traced",
            "peak": _peak_info(peaks, trace.compute_dtype, peaks.flops_for(trace.compute_dtype)),
            "weight_bytes_per_param": trace.weight_bytes_per_param,
            "kv_bytes_per_elem": trace.kv_bytes_per_elem,
        }
        if trace.expert_bytes:
            report["utilization"]["expert_bytes"] = {str(k): v for k, v in trace.expert_bytes.items()}
    elif trace.requests and acc is not None and trace.weight_bytes_per_param > 0 and acc.moe_layers:
        report["utilization"] = _estimated_utilization(trace, acc, peaks)
    else:
        report["utilization"] = {"available": False, "reason": trace.tracing.get("reason", "experts not traced")}
    return report, rows


def _peak_info(peaks: Any, compute_dtype: str, flops: float | None) -> dict[str, Any]:
    """Which peak a record's utilization used."""
    return {"kind": peaks.kind, "source": peaks.source, "device": peaks.device,
            "mem_bandwidth_gbs": peaks.mem_bandwidth_Bps / 1e9, "compute_dtype": compute_dtype,
            "tflops": flops / 1e12 if flops else None}


def _estimated_utilization(trace: Any, acc: Any, peaks: Any) -> dict[str, Any]:
    """A server's decode S-MBU/S-MFU estimated from client-side timestamps (metrics.serving)."""
    from moecap.metrics.serving import estimated_decode_utilization

    bw = flops = None
    peak: dict[str, Any] | None = None
    if peaks is not None:
        bw = peaks.mem_bandwidth_Bps
        try:
            flops = peaks.flops_for(trace.compute_dtype)
        except ValueError:
            flops = None
        peak = _peak_info(peaks, trace.compute_dtype, flops)
    decode = estimated_decode_utilization(
        trace.requests, acc, trace.weight_bytes_per_param, trace.kv_bytes_per_elem, bw, flops,
        routing_stats=trace.extra.get("routing_stats"), expanded_mla=trace.kv_cache_expanded_mla,
    )
    return {
        "basis": "estimated",
        "decode": decode,
        "prefill": {"available": False, "reason": "not estimated from a client: TTFT includes queueing and the "
                    "decode work of requests sharing the prefill's passes"},
        "peak": peak if peak is not None else {"kind": None, "reason": "no hardware peaks (the run log says why): "
                                               "bytes, FLOPs and achieved rates are still given"},
        "weight_bytes_per_param": trace.weight_bytes_per_param,
        "kv_bytes_per_elem": trace.kv_bytes_per_elem,
    }


def _remote_cost(cost: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    """An endpoint on another machine: this machine's hardware prices nothing. Priced by the hardware the
    suite's cost section names (``gpu_key``/``gpus``), else by its cloud rate alone, else not at all."""
    if {"gpu_key", "gpus"} & set(settings):
        return {**cost, "note": "remote endpoint: GPUs as named in the suite's cost section"}
    if cost.get("cloud"):
        return {"model": "cloud", "usd_per_1m_output_tokens": cost["cloud_usd_per_1m_output_tokens"],
                "cloud": cost["cloud"], "cloud_usd_per_1m_output_tokens": cost["cloud_usd_per_1m_output_tokens"],
                "run_hours": cost.get("run_hours"), "output_tokens": cost.get("output_tokens"),
                "note": "remote endpoint: priced by the suite's cloud rate only"}
    return {"available": False, "reason": "the endpoint runs on another machine: name its hardware (cost.gpu_key "
            "or cost.gpus) or its rental price (cost.cloud_usd_per_hour) in the suite to price it"}


def price_run(report: dict[str, Any], hw: dict[str, Any] | None, settings: dict[str, Any]) -> dict[str, Any]:
    """The record's cost section: measured power when the run had it, else TDP; never fails the cell."""
    from moecap.catalog import build_cost_inputs
    from moecap.metrics.cost import cost_report

    energy = report.get("energy") or {}
    measured = energy.get("avg_power_w") if energy.get("available") else None
    try:
        inputs = build_cost_inputs(
            hw or {}, settings, avg_power_w=measured, power_source="measured" if measured else "tdp"
        )
        thr = report["throughput"]
        return cost_report(inputs, thr["duration_s"], thr["output_tokens"], thr["completed"])
    except (ValueError, KeyError) as err:
        return {"available": False, "reason": f"{type(err).__name__}: {err}"}


def _measure_cell(
    runner: Any, cell: Cell, peaks: Any, store: ResultStore, hw: dict[str, Any] | None
) -> tuple[dict[str, Any], dict[str, str]]:
    """Run one cell on a loaded runner: performance (traces -> figures, artifacts) and/or quality."""
    report: dict[str, Any] = {}
    arts: dict[str, str] = {}
    if cell.workload.measures_performance:
        trace = runner.run(cell.workload, cell.load)
        report, rows = build_report(trace, peaks)
        report["cost"] = price_run(report, hw, cell.suite.cost)
        if getattr(runner, "remote", False):
            report["cost"] = _remote_cost(report["cost"], cell.suite.cost)
        by_index = {r["index"]: r for r in rows}
        arts = {
            "passes": store.write_artifact(
                cell.cell_id, "passes.jsonl", ({**p.to_dict(), **by_index.get(p.index, {})} for p in trace.passes)
            ),
            "requests": store.write_artifact(cell.cell_id, "requests.jsonl", (r.to_dict() for r in trace.requests)),
        }
    else:
        reason = "a quality-only cell serves no requests: there is no measured serving window to meter or price"
        report["energy"] = {"available": False, "reason": reason}
        report["cost"] = {"available": False, "reason": reason}
        if runner.model_config() is not None:
            from moecap.metrics.accounting import from_hf_config

            report["model"] = from_hf_config(runner.model_config()).summary()
    if cell.workload.measures_quality:
        from moecap.quality.evaluate import evaluate_quality

        report["quality"] = evaluate_quality(runner, cell.workload)
    return report, arts


def run_suite(
    suite: Suite,
    force: bool = False,
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
) -> SuiteOutcome:
    from tqdm.auto import tqdm

    from moecap.environment import collect_environment
    from moecap.runners.server import check_interrupted, reset_interrupt
    from moecap.hardware import detect_hardware, resolve_peaks

    store = ResultStore(suite.output.dir, suite.name)
    outcome = SuiteOutcome(run_id=new_run_id())
    env = collect_environment()
    cells = expand(suite)
    todo: list[Cell] = []
    for cell in cells:
        if not force and store.is_done(cell.cell_id):
            outcome.outcomes.append(CellOutcome(cell, "skipped", path=str(store.record_path(cell.cell_id))))
        else:
            todo.append(cell)
    skipped = len(cells) - len(todo)
    if skipped:
        log(f"moecap: {skipped} of {len(cells)} cells already have an ok record (use --force to re-run them)")

    user_peaks = None
    if suite.hardware.peaks is not None:
        user_peaks = suite.hardware.peaks.model_dump()

    def record_of(cell: Cell, status: str, **kw: Any) -> Record:
        return Record(
            run_id=outcome.run_id,
            created_at=now_iso(),
            suite=_suite_info(suite),
            cell_id=cell.cell_id,
            status=status,
            environment=env,
            **kw,
        )

    def finish(cell: Cell, rec: Record) -> None:
        path = store.write(rec)
        outcome.outcomes.append(CellOutcome(cell, rec.status, rec, str(path)))
        if rec.status == "failed":
            last = (rec.error or "").strip().splitlines()[-1:] or ["?"]
            log(f"moecap: cell {cell.cell_id} FAILED: {last[0]}")

    reset_interrupt()
    bar = tqdm(total=len(todo), desc="cells", unit="cell", disable=None)
    try:
        groups = itertools.groupby(todo, key=lambda c: (id(c.model), id(c.runner)))
        for _, group_iter in groups:
            group = list(group_iter)
            first = group[0]
            runner = None
            hw_dict = None
            try:
                entry = runner_entry(first.runner.type)
                args = load_object(entry.args).model_validate(first.runner.args)
                runner = load_object(entry.cls)(args, suite.hardware)
                hw = detect_hardware(runner.device_name())
                hw_dict = hw.to_dict()
                peaks = None  # an endpoint moecap did not launch: no utilization, no peaks needed
                if entry.traces_passes:
                    peaks = resolve_peaks(
                        hw,
                        runner.compute_dtype(),
                        user=user_peaks,
                        calibrate_if_missing=suite.hardware.calibrate == "auto",
                    )
                elif entry.estimates_passes:  # estimated utilization: peaks help, their absence fails nothing
                    try:
                        peaks = resolve_peaks(hw, runner.compute_dtype(), user=user_peaks,
                                              calibrate_if_missing=suite.hardware.calibrate == "auto")
                    except Exception as err:
                        peaks_error = f"{type(err).__name__}: {err}"
                        log(f"moecap: no hardware peaks for estimated utilization ({peaks_error})")
                bar.set_postfix_str(f"loading {first.model.display_name}")
                runner.load(first.model)
            except Exception:
                check_interrupted()
                err = traceback.format_exc()
                for cell in group:
                    arts = _save_logs(runner, store, cell) if runner is not None else {}
                    finish(cell, record_of(cell, "failed", error=err, config=_cell_config(cell, None, hw_dict),
                                           artifacts=arts))
                    bar.update(1)
                if runner is not None:
                    runner.close()
                continue
            try:
                for cell in group:
                    bar.set_postfix_str(cell.describe())
                    info = None
                    try:
                        info = runner.info()
                        report, arts = _measure_cell(runner, cell, peaks, store, hw_dict)
                        arts.update(_save_logs(runner, store, cell))
                        rec = record_of(
                            cell, "ok", config=_cell_config(cell, info, hw_dict), report=report, artifacts=arts
                        )
                    except Exception:
                        rec = record_of(
                            cell, "failed", error=traceback.format_exc(), config=_cell_config(cell, info, hw_dict),
                            artifacts=_save_logs(runner, store, cell),
                        )
                        _free_device_memory()
                    check_interrupted()  # a Ctrl-C/SIGTERM stopped the servers mid-cell: record nothing of it
                    finish(cell, rec)
                    bar.update(1)
            finally:
                runner.close()
    finally:
        bar.close()
    outcome.outcomes.sort(key=lambda o: cells.index(o.cell))
    return outcome


def _save_logs(runner: Any, store: ResultStore, cell: Cell) -> dict[str, str]:
    """The runner's logs since the last cell (a launched server's output) as the cell's artifacts."""
    try:
        logs = runner.log_artifacts()
        return {name.replace(".", "_"): store.write_text_artifact(cell.cell_id, name, text)
                for name, text in logs.items()}
    except Exception:  # a log is never worth losing the record over
        return {}


def _free_device_memory() -> None:
    """After a failure (e.g. CUDA OOM), give cached device memory back before the next cell."""
    import gc

    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
