"""Runs a suite's cells and writes one record per cell.

Three parts, so that one measurement function serves every way of running a cell:

* **Measuring** (:class:`GroupSession`): the cells of one model x runner group on one loaded runner;
  ``measure(cell)`` returns a :class:`CellResult` (the record and its artifact files as text) and
  never writes anything. A failed cell (exception, OOM, a model that does not load, unknown peaks) is a
  failed record with its traceback (``failure.kind: exception``). :func:`run_unit` drives a session
  over a *unit* (a list of cells of one group, described by a JSON-able spec) and emits events; it is
  what a worker subprocess (``python -m moecap.worker``) and a Ray task or actor run.
* **Executors**: where units run. ``inline``: in this process, one loaded runner per group (debugging,
  library use; :func:`run_suite`'s default). ``local`` (:mod:`moecap.local_executor`): a worker
  subprocess per cell or per group, per-cell timeout, crashes isolated. ``ray``
  (:mod:`moecap.ray_executor`): Ray tasks / actors with the GPUs each cell needs.
* **The driver** (:func:`run_suite`): chooses the cells, claims them, writes every record into the
  :class:`~moecap.records.ResultStore` the moment it arrives (artifacts first, record last, each
  atomically) and keeps the run's manifest. Only the driver writes.

Which cells run:

* plain ``run_suite``: every cell without an ``ok`` record (failed ones are retried);
* ``force``: every cell;
* ``resume``: the cells the last unfinished run of this suite in this folder did not finish (see
  :func:`_resumable`): the same ``run_id`` continues.

A cell is run only while its driver holds its claim (:meth:`ResultStore.claim`); a cell recorded by
another process since this run started is left alone, so two drivers sharing a folder never run a cell
twice.

Failure kinds (``record.failure.kind``): ``exception`` (the cell raised; the measurement's own verdict),
``timeout`` (it ran past the cell timeout and its worker was killed), ``worker_died`` (its worker
process died: segfault, OOM kill, ``os._exit``), ``node_died`` (Ray lost the node), ``unschedulable``
(no node of the Ray cluster can hold it). A worker that dies is charged to the cell it was running (to
every cell it was loading the model for, when it died while loading); that cell is retried in a new
worker up to ``max_retries`` times, then recorded failed with ``failure.attempts``; cells the dead worker
had not started yet are simply run by a new worker. Timeouts, exceptions and unschedulable cells are
not retried.
"""

from __future__ import annotations

import itertools
import json
import signal
import sys
import threading
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol

from moecap.records import Claim, Record, ResultStore, RunManifest, new_run_id, now_iso
from moecap.registry import load_object, runner_entry
from moecap.suite import Cell, Suite, expand

EXECUTORS = ("inline", "local", "ray")
ISOLATION = ("cell", "group")
# failure kinds a --resume runs again: the cell was lost, it did not fail on its own
LOST_KINDS = ("worker_died", "node_died")


@dataclass
class CellOutcome:
    cell: Cell
    status: str  # ok | failed | skipped (already done, or recorded by another process) | busy (claimed elsewhere)
    record: Record | None = None
    path: str | None = None


@dataclass
class SuiteOutcome:
    run_id: str
    outcomes: list[CellOutcome] = field(default_factory=list)
    resumed: bool = False

    @property
    def failed(self) -> list[CellOutcome]:
        return [o for o in self.outcomes if o.status == "failed"]


@dataclass
class ExecutorOptions:
    """How cells are run (``moecap run --help`` describes each)."""

    isolate: str = "cell"
    """``cell``: a fresh worker per cell (the model loads per cell); ``group``: one worker per model x
    runner group, the model loaded once for its cells."""
    cell_timeout_s: float | None = None
    """Per phase of a worker: loading the model, then each cell; past it the worker is killed and the
    cell recorded failed (``timeout``)."""
    max_retries: int = 1
    """New workers for a cell whose worker died (crash, OOM kill, lost node)."""
    kill_grace_s: float = 10.0
    """SIGTERM to a worker's process group, then SIGKILL after this long."""
    address: str | None = None
    """Ray: the cluster (``ray.init(address=...)``); None: a local cluster (or ``RAY_ADDRESS``)."""
    gpu_type: str | None = None
    """Ray: the accelerator type cells that need GPUs must land on (``H100``, ``A100``, ...)."""
    cpus_per_cell: float = 1.0
    """Ray: CPUs each cell reserves."""
    memory_gb: float | None = None
    """Ray: host memory each cell reserves, GB (1e9 B)."""

    def describe(self, kind: str) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": kind}
        if kind != "inline":
            out.update(isolate=self.isolate, cell_timeout_s=self.cell_timeout_s, max_retries=self.max_retries)
        if kind == "ray":
            out.update(address=self.address, gpu_type=self.gpu_type, cpus_per_cell=self.cpus_per_cell,
                       memory_gb=self.memory_gb)
        return out


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
    client = {k: trace.extra[k] for k in ("prompt_cache", "connection_retries") if trace.extra.get(k)}
    if client:  # how the HTTP client kept caches and its own connections out of the figures
        report["client"] = client
    if trace.extra.get("server"):  # what the server itself recorded over the window (moecap serve's /stats)
        from moecap.metrics.serving import server_window

        report["server"] = server_window(trace.extra["server"])
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
    devices = max(1, int(getattr(trace, "devices", 1) or 1))
    if peaks is not None and devices > 1:  # a cell on N devices is measured against N devices' peaks
        peaks = peaks.times(devices)
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
        if trace.expert_bytes and trace.expert_placements:
            from moecap.metrics.utilization import tier_traffic

            tier_peaks = dict((trace.extra.get("engine") or {}).get("tier_peaks") or {})
            tier_peaks["fast_Bps"] = peaks.mem_bandwidth_Bps
            if not tier_peaks.get("split"):  # one memory: the host tier is the same DRAM as the fast one
                tier_peaks.setdefault("host_Bps", peaks.mem_bandwidth_Bps)
            tiers = tier_traffic(trace.passes, acc, trace.moe_layers, trace.weight_bytes_per_param,
                                 trace.kv_bytes_per_elem, trace.expert_bytes, trace.expert_placements, tier_peaks,
                                 expanded_mla=trace.kv_cache_expanded_mla)
            for phase, row in tiers.items():
                report["utilization"][phase]["tiers"] = row
            report["utilization"]["tiers_basis"] = (
                "bytes by where they were read: fast (non-expert weights, KV, resident experts, copied host "
                "experts), link (host experts copied in the pass), host (host experts computed by the host); "
                "each against its own peak; s_mbu stays the combined figure (all bytes over the fast peak)")
            report["utilization"]["expert_placements"] = {str(k): v for k, v in trace.expert_placements.items()}
    elif trace.requests and acc is not None and trace.weight_bytes_per_param > 0 and acc.moe_layers:
        report["utilization"] = _estimated_utilization(trace, acc, peaks)
    else:
        report["utilization"] = {"available": False, "reason": trace.tracing.get("reason", "experts not traced")}
    if devices > 1:
        _per_device(report["utilization"], devices)
    return report, rows


def _per_device(util: dict[str, Any], devices: int) -> None:
    """Each phase's achieved rates per device beside the totals (the work spread evenly over them:
    utilization against N peaks is each device's mean utilization)."""
    for phase in ("prefill", "decode"):
        ph = util.get(phase)
        if not isinstance(ph, dict) or "achieved_bandwidth_gbs" not in ph:
            continue
        ph["per_device"] = {
            "devices": devices,
            "achieved_bandwidth_gbs": ph["achieved_bandwidth_gbs"] / devices,
            "achieved_tflops": (ph.get("achieved_tflops") or 0.0) / devices,
            "s_mbu": ph.get("s_mbu"),
            "s_mfu": ph.get("s_mfu"),
        }


def _peak_info(peaks: Any, compute_dtype: str, flops: float | None) -> dict[str, Any]:
    """Which peak a record's utilization used (for N devices: their sum, and one device's)."""
    devices = int(peaks.details.get("devices", 1)) if isinstance(peaks.details, dict) else 1
    out = {"kind": peaks.kind, "source": peaks.source, "device": peaks.device, "devices": devices,
           "mem_bandwidth_gbs": peaks.mem_bandwidth_Bps / 1e9, "compute_dtype": compute_dtype,
           "tflops": flops / 1e12 if flops else None}
    if devices > 1:
        out["per_device"] = {"device": peaks.details.get("per_device"),
                             "mem_bandwidth_gbs": peaks.mem_bandwidth_Bps / 1e9 / devices,
                             "tflops": flops / 1e12 / devices if flops else None}
    return out


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
    per_component = getattr(trace, "component_bytes_per_param", None)
    decode = estimated_decode_utilization(
        trace.requests, acc, per_component or trace.weight_bytes_per_param, trace.kv_bytes_per_elem, bw, flops,
        routing_stats=trace.extra.get("routing_stats"), expanded_mla=trace.kv_cache_expanded_mla,
        recorded_passes={"tokens": trace.extra["pass_tokens"], "unions": trace.extra["pass_expert_unions"]}
        if trace.extra.get("pass_tokens") and trace.extra.get("pass_expert_unions") else None,
    )
    # "recorded": the server's own routing record priced the experts (timing still from the client);
    # "estimated": uniform routing
    basis = "recorded" if trace.extra.get("routing_stats") else "estimated"
    return {
        "basis": basis,
        "decode": decode,
        "prefill": {"available": False, "reason": "not estimated from a client: TTFT includes queueing and the "
                    "decode work of requests sharing the prefill's passes"},
        "peak": peak if peak is not None else {"kind": None, "reason": "no hardware peaks (the run log says why): "
                                               "bytes, FLOPs and achieved rates are still given"},
        "weight_bytes_per_param": trace.weight_bytes_per_param,
        **({"component_bytes_per_param": dict(per_component),
            "weight_bytes_source": trace.extra.get("weight_bytes_source")} if per_component else {}),
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

    from moecap import figures

    measured = figures.value(report, "avg_power_w")
    try:
        inputs = build_cost_inputs(
            hw or {}, settings, avg_power_w=measured, power_source="measured" if measured else "tdp"
        )
        got = {k: figures.value(report, k) for k in ("duration_s", "output_tokens", "completed_requests")}
        missing = [k for k, v in got.items() if v is None]
        if missing:
            raise KeyError(f"the report has no {', '.join(missing)}")
        return cost_report(inputs, got["duration_s"], int(got["output_tokens"]), int(got["completed_requests"]))
    except (ValueError, KeyError) as err:
        return {"available": False, "reason": f"{type(err).__name__}: {err}"}


def _measure_cell(
    runner: Any, cell: Cell, peaks: Any, store: "ArtifactSink", hw: dict[str, Any] | None
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
    from moecap.figures import bases

    report["basis"] = bases(report)  # per figure family: measured, traced, recorded or estimated
    return report, arts


# ------------------------------------------------------------------------------------------------
# measuring: one function for in-process, subprocess and Ray workers


class ArtifactSink:
    """A cell's artifact files, kept in memory (paths relative to the suite's results folder) until the
    driver writes them: a worker may run on a machine that does not share the results folder."""

    def __init__(self) -> None:
        self.files: dict[str, str] = {}

    def write_artifact(self, cell_id: str, name: str, rows: Iterable[dict[str, Any]]) -> str:
        return self.write_text_artifact(
            cell_id, name, "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in rows))

    def write_text_artifact(self, cell_id: str, name: str, text: str) -> str:
        rel = f"{cell_id}/{name}"
        self.files[rel] = text
        return rel


@dataclass
class CellResult:
    """What measuring a cell produces: its record and its artifact files (relative path -> text)."""

    record: Record
    files: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"record": self.record.model_dump(mode="json"), "files": self.files}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CellResult":
        return cls(Record.model_validate(data["record"]), dict(data.get("files") or {}))


def worker_environment(argv: list[str] | None = None, executor: dict[str, Any] | None = None) -> dict[str, Any]:
    """The record's ``environment``: collected where the cell runs; ``argv`` is the driver's command."""
    from moecap.environment import collect_environment

    env = collect_environment()
    if argv is not None:
        env["argv"] = list(argv)
    if executor is not None:
        env["executor"] = dict(executor)
    return env


class GroupSession:
    """Measures cells of one model x runner group on one loaded runner.

    ``load(cell)`` loads the runner for the group (hardware detection, peaks, the model); it never
    raises for a load that fails: every cell measured afterwards gets a failed record with that
    traceback. ``measure(cell)`` returns the cell's :class:`CellResult` and writes nothing.
    ``close()`` releases the runner (and the servers it launched)."""

    def __init__(self, suite: Suite, run_id: str, environment: dict[str, Any],
                 log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)):
        self.suite = suite
        self.run_id = run_id
        self.environment = environment
        self.log = log
        self.runner: Any = None
        self.hw_dict: dict[str, Any] | None = None
        self.peaks: Any = None
        self.load_error: str | None = None
        self.loaded = False

    def load(self, first: Cell) -> None:
        from moecap.hardware import detect_hardware, resolve_peaks
        from moecap.runners.server import check_interrupted

        suite = self.suite
        user_peaks = suite.hardware.peaks.model_dump() if suite.hardware.peaks is not None else None
        try:
            entry = runner_entry(first.runner.type)
            args = load_object(entry.args).model_validate(first.runner.args)
            self.runner = load_object(entry.cls)(args, suite.hardware)
            hw = detect_hardware(self.runner.device_name())
            self.hw_dict = hw.to_dict()
            # an endpoint moecap did not launch: no utilization, no peaks needed
            if entry.traces_passes:
                self.peaks = resolve_peaks(hw, self.runner.compute_dtype(), user=user_peaks,
                                           calibrate_if_missing=suite.hardware.calibrate == "auto")
            elif entry.estimates_passes:  # estimated utilization: peaks help, their absence fails nothing
                try:
                    self.peaks = resolve_peaks(hw, self.runner.compute_dtype(), user=user_peaks,
                                               calibrate_if_missing=suite.hardware.calibrate == "auto")
                except Exception as err:
                    self.log(f"moecap: no hardware peaks for estimated utilization ({type(err).__name__}: {err})")
                    if user_peaks:  # the suite's bandwidth still prices S-MBU; S-MFU waits for that dtype's peak
                        from moecap.hardware import peaks_from_user

                        try:
                            self.peaks = peaks_from_user(user_peaks, device=hw.device_name)
                        except Exception:
                            self.peaks = None
            self.runner.load(first.model)
        except Exception:
            check_interrupted()
            self.load_error = traceback.format_exc()
        self.loaded = True

    def _record(self, cell: Cell, status: str, **kw: Any) -> Record:
        return Record(run_id=self.run_id, created_at=now_iso(), suite=_suite_info(self.suite), cell_id=cell.cell_id,
                      status=status, environment=self.environment, **kw)

    def measure(self, cell: Cell) -> CellResult:
        if not self.loaded:
            self.load(cell)
        sink = ArtifactSink()
        if self.load_error is not None:
            arts = _save_logs(self.runner, sink, cell) if self.runner is not None else {}
            rec = self._record(cell, "failed", error=self.load_error, config=_cell_config(cell, None, self.hw_dict),
                               artifacts=arts, failure={"kind": "exception"})
            return CellResult(rec, sink.files)
        info = None
        try:
            info = self.runner.info()
            report, arts = _measure_cell(self.runner, cell, self.peaks, sink, self.hw_dict)
            arts.update(_save_logs(self.runner, sink, cell))
            rec = self._record(cell, "ok", config=_cell_config(cell, info, self.hw_dict), report=report, artifacts=arts)
        except Exception:
            err = traceback.format_exc()
            sink = ArtifactSink()  # artifacts of a half-measured cell are not kept
            rec = self._record(cell, "failed", error=err, config=_cell_config(cell, info, self.hw_dict),
                               artifacts=_save_logs(self.runner, sink, cell), failure={"kind": "exception"})
            _free_device_memory()
        return CellResult(rec, sink.files)

    def close(self) -> None:
        runner, self.runner = self.runner, None
        if runner is not None:
            runner.close()


def unit_spec(suite: Suite, cells: list[Cell], run_id: str, executor: dict[str, Any],
              argv: list[str] | None = None, unit: int | None = None) -> dict[str, Any]:
    """A JSON-able description of a unit of work (cells of one model x runner group) for a worker."""
    return {
        "suite": suite.model_dump(mode="json"),
        "source": suite.source,
        "cells": [c.cell_id for c in cells],
        "run_id": run_id,
        "argv": list(sys.argv if argv is None else argv),
        "executor": executor,
        "unit": unit,
    }


def cells_of_spec(spec: dict[str, Any]) -> tuple[Suite, list[Cell]]:
    """The suite and the cells a unit spec names (validated again where the worker runs)."""
    suite = Suite.model_validate(spec["suite"])
    suite.source = spec.get("source")
    by_id = {c.cell_id: c for c in expand(suite)}
    missing = [cid for cid in spec["cells"] if cid not in by_id]
    if missing:
        raise ValueError(f"the worker's moecap expands this suite to other cells: {missing} are unknown here "
                         "(is the same moecap version installed where the worker runs?)")
    return suite, [by_id[cid] for cid in spec["cells"]]


def session_of_spec(spec: dict[str, Any], log: Callable[[str], None] | None = None
                    ) -> tuple[Suite, list[Cell], GroupSession]:
    suite, cells = cells_of_spec(spec)
    env = worker_environment(spec.get("argv"), spec.get("executor"))
    return suite, cells, GroupSession(suite, spec["run_id"], env, **({"log": log} if log else {}))


def run_unit(spec: dict[str, Any], emit: Callable[[dict[str, Any]], None]) -> None:
    """Measure a unit's cells on one loaded runner, emitting events as they happen:
    ``{"event": "loading"}``, ``{"event": "loaded", "ok": bool}``, ``{"event": "start", "cell_id"}``,
    ``{"event": "result", "cell_id", "record", "files"}`` (see :class:`CellResult`)."""
    from moecap.runners.server import check_interrupted

    _, cells, session = session_of_spec(spec)
    try:
        emit({"event": "loading"})
        session.load(cells[0])
        emit({"event": "loaded", "ok": session.load_error is None})
        for cell in cells:
            emit({"event": "start", "cell_id": cell.cell_id})
            res = session.measure(cell)
            check_interrupted()  # a SIGTERM stopped the servers mid-cell: report nothing of it
            emit({"event": "result", "cell_id": cell.cell_id, **res.to_dict()})
    finally:
        session.close()


# ------------------------------------------------------------------------------------------------
# the driver: claims, records, progress, the run manifest


class Driver:
    """What an executor reports to: it claims cells before they run and writes each record as it arrives.

    Executors call :meth:`take` right before dispatching cells (it returns those this process may run),
    :meth:`started` when a cell starts, :meth:`deliver` with each result, :meth:`fail` for a cell whose
    worker could not produce a record (timeout, crash, lost node), and :meth:`charge` to count a dead
    worker against a cell."""

    def __init__(self, suite: Suite, store: ResultStore, run_id: str, cells: list[Cell], executor: dict[str, Any],
                 snapshot: dict[str, tuple[str, str] | None], log: Callable[[str], None], bar: Any):
        self.suite = suite
        self.store = store
        self.run_id = run_id
        self.cells = cells
        self.executor = executor
        self.snapshot = snapshot  # cell_id -> (run_id, status) of its record when the run started
        self.log = log
        self.bar = bar
        self.outcomes: dict[str, CellOutcome] = {}
        self.claims: dict[str, Claim] = {}
        self.charges: dict[str, int] = {}
        self._env: dict[str, Any] | None = None

    # -- claims
    def take(self, cells: list[Cell]) -> list[Cell]:
        """The cells this process may run now: it holds (or has just taken) their claims and nobody recorded
        them since this run started. The others get their outcome here."""
        out = []
        for cell in cells:
            cid = cell.cell_id
            if cid in self.claims:
                out.append(cell)
                continue
            claim = self.store.claim(cid, self.run_id)
            if claim is None:
                holder = self.store.claim_holder(cid)
                self.log(f"moecap: cell {cid} is being run by another moecap process "
                         f"(pid {holder.get('pid', '?')} on {holder.get('host', '?')}, run {holder.get('run_id', '?')})")
                self.outcomes[cid] = CellOutcome(cell, "busy")
                self._progress()
                continue
            rec = self.store.load(cid)
            now = (rec.run_id, rec.status) if rec is not None else None
            if now != self.snapshot.get(cid) and rec is not None and rec.run_id != self.run_id:
                claim.release()
                self.log(f"moecap: cell {cid} was recorded ({rec.status}) by run {rec.run_id} meanwhile; left as is")
                self.outcomes[cid] = CellOutcome(cell, "skipped", path=str(self.store.record_path(cid)))
                self._progress()
                continue
            self.claims[cid] = claim
            out.append(cell)
        return out

    def release_all(self) -> None:
        for claim in self.claims.values():
            claim.release()
        self.claims.clear()

    # -- progress and results
    def _progress(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def status(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(text)

    def started(self, cell: Cell) -> None:
        self.status(cell.describe())

    def spec(self, cells: list[Cell], unit: int | None = None) -> dict[str, Any]:
        return unit_spec(self.suite, cells, self.run_id, self.executor, unit=unit)

    def deliver(self, cell: Cell, result: CellResult, retried: bool = True) -> None:
        """Write a finished cell's artifacts and record (atomically, record last), release its claim."""
        rec = result.record
        if retried and self.charges.get(cell.cell_id):  # a worker's record, after an earlier worker died
            rec.environment = {**rec.environment,
                               "executor": {**rec.environment.get("executor", {}),
                                            "attempt": self.charges[cell.cell_id] + 1}}
        path = self.store.write_result(rec, result.files)
        self.outcomes[cell.cell_id] = CellOutcome(cell, rec.status, rec, str(path))
        claim = self.claims.pop(cell.cell_id, None)
        if claim is not None:
            claim.release()
        if rec.status == "failed":
            last = (rec.error or "").strip().splitlines()[-1:] or ["?"]
            self.log(f"moecap: cell {cell.cell_id} FAILED: {last[0]}")
        self._progress()

    def environment(self) -> dict[str, Any]:
        if self._env is None:
            self._env = worker_environment(None, self.executor)
        return self._env

    def fail(self, cell: Cell, kind: str, error: str, **info: Any) -> None:
        """Record a cell whose worker produced no record (its worker died, timed out, could not be placed)."""
        rec = Record(run_id=self.run_id, created_at=now_iso(), suite=_suite_info(self.suite), cell_id=cell.cell_id,
                     status="failed", error=error, config=_cell_config(cell, None, None),
                     environment=self.environment(), failure={"kind": kind, **info})
        self.deliver(cell, CellResult(rec, {}), retried=False)

    def charge(self, cells: list[Cell], in_flight: Cell | None, loading: bool, kind: str, error: str,
               max_retries: int, **info: Any) -> list[Cell]:
        """A worker died (``kind``: worker_died, node_died, timeout) before finishing ``cells`` (the unit's
        unfinished cells, in order). Charge the cell it was running (every cell, if it died loading the
        model), record those out of retries (a timeout never retries) and return the cells to run again."""
        if not cells:
            return []
        charged = list(cells) if loading else [in_flight if in_flight in cells else cells[0]]
        again = []
        for cell in cells:
            if cell not in charged:
                again.append(cell)
                continue
            n = self.charges[cell.cell_id] = self.charges.get(cell.cell_id, 0) + 1
            if kind == "timeout" or n > max_retries:
                what = "while loading the model" if loading else "while running the cell"
                tries = "" if kind == "timeout" else f"; attempt {n} of {n}, --max-retries {max_retries}"
                self.fail(cell, kind, f"{error} ({what}{tries})", attempts=n, **info)
            else:
                self.log(f"moecap: cell {cell.cell_id}: {error}; running it again "
                         f"(retry {n} of {max_retries}, --max-retries)")
                again.append(cell)
        return again


class Executor(Protocol):
    def run(self, driver: Driver, groups: list[list[Cell]]) -> None:
        """Run the groups' cells (each group: consecutive cells of one model x runner), reporting to
        ``driver``; return when every cell has an outcome, raise on an interrupt."""


class InlineExecutor:
    """Cells run in this process, one loaded runner per model x runner group (the model loads when the
    group's first claimed cell runs). No timeout, no crash isolation: for debugging and library use."""

    def run(self, driver: Driver, groups: list[list[Cell]]) -> None:
        from moecap.runners.server import check_interrupted

        for group in groups:
            session: GroupSession | None = None
            try:
                for cell in group:
                    if not driver.take([cell]):
                        continue
                    if session is None:
                        session = GroupSession(driver.suite, driver.run_id, driver.environment(), driver.log)
                        driver.status(f"loading {cell.model.display_name}")
                        session.load(cell)
                    driver.started(cell)
                    result = session.measure(cell)
                    check_interrupted()  # a Ctrl-C/SIGTERM stopped the servers mid-cell: record nothing of it
                    driver.deliver(cell, result)
            finally:
                if session is not None:
                    session.close()


def make_executor(kind: str, options: ExecutorOptions | None = None) -> Executor:
    options = options or ExecutorOptions()
    if kind == "inline":
        return InlineExecutor()
    if kind == "local":
        from moecap.local_executor import LocalExecutor

        return LocalExecutor(options)
    if kind == "ray":
        from moecap.ray_executor import RayExecutor

        return RayExecutor(options)
    raise ValueError(f"--executor {kind!r}: allowed {', '.join(EXECUTORS)}")


# ------------------------------------------------------------------------------------------------
# which cells run; resuming


class ResumeError(ValueError):
    """``--resume`` cannot continue the run it found (the message says why and what to do)."""


def _resumable(store: ResultStore, cell_ids: list[str]) -> tuple[RunManifest, Claim] | None:
    """The run ``--resume`` continues: the most recently started run of this suite in this folder that
    did not finish and that no live process drives (its lock is free); with its lock, now ours. None when
    the most recent such run finished, or there is none."""
    for manifest in store.manifests():
        lock = store.lock_run(manifest.run_id)
        if lock is None:  # a live process drives it: not ours to resume
            continue
        if manifest.status == "finished":
            lock.release()
            return None
        if manifest.cells != cell_ids:
            lock.release()
            gone = len(set(manifest.cells) - set(cell_ids))
            new = len(set(cell_ids) - set(manifest.cells))
            raise ResumeError(
                f"--resume: the interrupted run {manifest.run_id} ran other cells ({len(manifest.cells)} cells; "
                f"{gone} of them are not in the suite as given now, which has {new} new ones): give the same "
                "suite and --set options, or run without --resume"
            )
        return manifest, lock
    return None


def _unfinished(store: ResultStore, manifest: RunManifest) -> list[str]:
    """Cells of an interrupted run still to do: in its todo list and neither ok nor failed on their own
    (an exception or a timeout) in that run. Cells whose worker or node was lost run again."""
    out = []
    for cid in manifest.todo:
        rec = store.load(cid)
        if rec is None:
            out.append(cid)
        elif rec.status == "ok":
            continue
        elif rec.run_id != manifest.run_id or (getattr(rec, "failure", None) or {}).get("kind") in LOST_KINDS:
            out.append(cid)
    return out


def run_suite(
    suite: Suite,
    force: bool = False,
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
    *,
    executor: str = "inline",
    options: ExecutorOptions | None = None,
    resume: bool = False,
) -> SuiteOutcome:
    """Run a suite's cells through ``executor`` (``inline``, ``local``, ``ray``) and return the outcomes.

    Records are written as cells finish. On an interrupt (KeyboardInterrupt, SIGTERM: ``SystemExit``)
    the workers are torn down, nothing is recorded for the interrupted cells, the run's manifest says
    ``interrupted`` and the exception propagates; ``resume=True`` continues such a run later."""
    from tqdm.auto import tqdm

    from moecap.runners.server import reset_interrupt

    if force and resume:
        raise ResumeError("--force and --resume exclude each other: --force re-runs every cell, --resume only the "
                          "cells an interrupted run did not finish")
    options = options or ExecutorOptions()
    store = ResultStore(suite.output.dir, suite.name)
    cells = expand(suite)
    ids = [c.cell_id for c in cells]
    run_lock: Claim | None = None
    manifest: RunManifest | None = None
    found = _resumable(store, ids) if resume else None
    outcome_resumed = False
    if found is not None:
        manifest, run_lock = found
        run_id = manifest.run_id
        todo_ids = set(_unfinished(store, manifest))
        outcome_resumed = True
        log(f"moecap: resuming run {run_id}: {len(todo_ids)} of its {len(manifest.todo)} cells are unfinished")
    else:
        if resume:
            log("moecap: --resume: no interrupted run of this suite in this folder; starting a new run")
        run_id = new_run_id()
        todo_ids = {cid for cid in ids if force or not store.is_done(cid)}
    exec_info = options.describe(executor)
    runner = make_executor(executor, options)

    snapshot: dict[str, tuple[str, str] | None] = {}
    outcome = SuiteOutcome(run_id=run_id, resumed=outcome_resumed)
    todo: list[Cell] = []
    skipped_ok = 0
    for cell in cells:
        if cell.cell_id in todo_ids:
            rec = store.load(cell.cell_id)
            snapshot[cell.cell_id] = (rec.run_id, rec.status) if rec is not None else None
            todo.append(cell)
        else:
            outcome.outcomes.append(CellOutcome(cell, "skipped", path=str(store.record_path(cell.cell_id))))
            skipped_ok += store.is_done(cell.cell_id)
    if skipped_ok and not outcome_resumed:
        log(f"moecap: {skipped_ok} of {len(cells)} cells already have an ok record (use --force to re-run them)")
    if not todo and manifest is None:  # nothing to run: no run to record
        return outcome

    if manifest is None:
        run_lock = store.lock_run(run_id)
        manifest = RunManifest(run_id=run_id, suite=suite.name, source=suite.source, cells=ids,
                               todo=[c.cell_id for c in todo], started_at=now_iso())
    manifest.status, manifest.reason, manifest.ended_at = "running", None, None
    manifest.executor = exec_info
    manifest.drivers.append(RunManifest.driver_info(list(sys.argv)))
    store.write_manifest(manifest)

    reset_interrupt()
    bar = tqdm(total=len(todo), desc="cells", unit="cell", disable=None)
    driver = Driver(suite, store, run_id, cells, exec_info, snapshot, log, bar)
    groups = [list(g) for _, g in itertools.groupby(todo, key=lambda c: (id(c.model), id(c.runner)))]
    restore, terminated = _terminate_as_exit()
    try:
        runner.run(driver, groups)
        manifest.status = "finished"
    except BaseException as err:
        manifest.status = "interrupted"
        if isinstance(err, SystemExit) and terminated:  # a library (Ray) may turn our SystemExit into its own
            err = SystemExit(128 + terminated[0])
            manifest.reason = f"SIGTERM: SystemExit: {err}"
            raise err from None
        manifest.reason = f"{type(err).__name__}: {err}".rstrip(": ")
        raise
    finally:
        restore()
        bar.close()
        driver.release_all()
        manifest.ended_at = now_iso()
        try:
            store.write_manifest(manifest)
        finally:
            if run_lock is not None:
                run_lock.release()
        outcome.outcomes.extend(driver.outcomes.values())
        order = {cid: i for i, cid in enumerate(ids)}
        outcome.outcomes.sort(key=lambda o: order[o.cell.cell_id])
    return outcome


class DeferredSignals:
    """While an executor's driver loop runs: SIGINT and SIGTERM only set a flag, which the loop turns into
    ``KeyboardInterrupt`` / ``SystemExit(128 + signum)`` at a point of its choosing (:meth:`check`).

    An exception raised by a signal handler can land anywhere, also inside ``queue.Queue.get`` between
    the acquisition of its lock and the ``try`` that releases it; the lock then stays held and the
    clean-up that drains the queue waits for ever. The driver loops only wait on queues and on Ray with
    short timeouts, so a deferred signal is seen within one poll. Outside the main thread: nothing."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "DeferredSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    self._previous[sig] = signal.signal(sig, self._on_signal)
                except (ValueError, OSError):
                    pass
        return self

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum = signum

    def check(self) -> None:
        """Raise for a signal that arrived: ``KeyboardInterrupt`` for SIGINT, ``SystemExit`` for SIGTERM."""
        if self.signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.signum is not None:
            raise SystemExit(128 + self.signum)

    def __exit__(self, *exc: Any) -> None:
        for sig, previous in self._previous.items():
            try:
                if signal.getsignal(sig) == self._on_signal:
                    signal.signal(sig, previous)
            except (ValueError, OSError):
                pass
        self._previous.clear()


def _terminate_as_exit() -> tuple[Callable[[], None], list[int]]:
    """While a run goes on, SIGTERM raises ``SystemExit(143)`` (so workers, claims and the manifest are
    cleaned up as for Ctrl-C) instead of killing the process outright. Returns the undo, and a list that
    gets the signal number once one arrived."""
    got: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        return (lambda: None), got

    def on_term(signum: int, frame: Any) -> None:
        got.append(signum)
        raise SystemExit(128 + signum)

    try:
        previous = signal.signal(signal.SIGTERM, on_term)
    except (ValueError, OSError):
        return (lambda: None), got

    def restore() -> None:
        try:
            if signal.getsignal(signal.SIGTERM) is on_term:
                signal.signal(signal.SIGTERM, previous)
        except (ValueError, OSError):
            pass

    return restore, got


def _save_logs(runner: Any, store: Any, cell: Cell) -> dict[str, str]:
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
