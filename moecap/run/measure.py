"""Measuring: one function for in-process, subprocess and Ray workers (a group session on one loaded
runner, the unit a worker runs, the cell's configuration as recorded)."""

from __future__ import annotations

import json
import sys
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

from moecap.records import Record, now_iso
from moecap.registry import load_object, runner_entry
from moecap.run.assemble import _remote_cost, build_report, price_run
from moecap.suite import Cell, Suite, expand


def _suite_info(suite: Suite) -> dict[str, Any]:
    info = {"name": suite.name, "source": suite.source, "description": suite.description}
    if suite.gate is not None:  # moecap compare's thresholds for these records
        info["gate"] = suite.gate.model_dump()
    return info


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


def request_verdict(trace: Any, workload: Any) -> tuple[dict[str, Any], str | None]:
    """What a cell's requests say of it: ({failed, short, total, budget, ...}, why the cell fails or None).

    A request failed when it has an error; under ``ignore_eos`` a completed request with fewer tokens than
    ``output_tokens`` was cut short by the server (flagged, and counted against the budget too). The cell
    fails when failed + short requests exceed ``workload.max_failed_fraction`` of all requests."""
    requests = list(trace.requests)
    failed = [r for r in requests if r.error or not r.token_times_s]
    short = []
    if workload.ignore_eos and workload.output_tokens:
        short = [r for r in requests if not r.error and r.token_times_s and r.output_tokens < workload.output_tokens]
    total = len(requests)
    bad = len(failed) + len(short)
    info: dict[str, Any] = {"total": total, "failed": len(failed), "short": len(short),
                            "max_failed_fraction": workload.max_failed_fraction}
    if short:
        info["short_outputs"] = {"expected": workload.output_tokens,
                                 "got_min": min(r.output_tokens for r in short),
                                 "ids": [r.id for r in short[:20]]}
    if total and bad / total > workload.max_failed_fraction:
        why = [f"{len(failed)} of {total} requests failed"] if failed else []
        if short:
            why.append(f"{len(short)} of {total} requests stopped short of output_tokens={workload.output_tokens} "
                       f"under ignore_eos (fewest: {info['short_outputs']['got_min']})")
        errors: dict[str, int] = {}
        for r in failed:
            errors[str(r.error)] = errors.get(str(r.error), 0) + 1
        top = "; ".join(f"{n}x {e[:200]}" for e, n in sorted(errors.items(), key=lambda kv: -kv[1])[:3])
        return info, (" and ".join(why) + f" (allowed: {workload.max_failed_fraction:.0%}, the workload's "
                      "max_failed_fraction)" + (f": {top}" if top else ""))
    return info, None


def _perf_window(runner: Any, cell: Cell, peaks: Any, store: "ArtifactSink", hw: dict[str, Any] | None,
                 i: int, n: int) -> tuple[dict[str, Any], dict[str, str], str | None]:
    """Repetition ``i`` (from 0) of ``n`` of a performance cell's measured window: its report, its raw
    traces as artifacts (``passes.rI``/``requests.rI`` with several repetitions), and why its requests
    fail the cell (None: they do not)."""
    trace = runner.run(cell.workload, cell.load)
    rep, rows = build_report(trace, peaks, cell.workload.slo_ms)
    rep["requests"], why = request_verdict(trace, cell.workload)
    rep["cost"] = price_run(rep, hw, cell.suite.cost)
    if getattr(runner, "remote", False):
        rep["cost"] = _remote_cost(rep["cost"], cell.suite.cost)
    by_index = {r["index"]: r for r in rows}
    suffix = f".r{i + 1}" if n > 1 else ""
    arts = {
        "passes": store.write_artifact(cell.cell_id, f"passes{suffix}.jsonl",
                                       ({**p.to_dict(), **by_index.get(p.index, {})} for p in trace.passes)),
        "requests": store.write_artifact(cell.cell_id, f"requests{suffix}.jsonl", (r.to_dict() for r in trace.requests)),
    }
    return rep, arts, (f"repetition {i + 1} of {n}: {why}" if why and n > 1 else why)


def _assemble(runs: list[tuple[dict[str, Any], dict[str, str], str | None]]
              ) -> tuple[dict[str, Any], dict[str, str], str | None]:
    """A performance cell's report from its repetitions' windows (see :func:`_perf_window`).

    The record's sections are one real repetition's (the median one on output throughput), so that they
    stay consistent with each other; with several repetitions every figure's value is its median over
    them (``report.repetitions``) and every repetition's raw traces are kept."""
    n = len(runs)
    problem = next((why for _, _, why in runs if why), None)
    order = sorted(range(n), key=lambda i: runs[i][0].get("throughput", {}).get("output_tokens_per_s") or 0.0)
    chosen = order[(n - 1) // 2]
    report, arts = runs[chosen][0], dict(runs[chosen][1])
    if n > 1:
        from moecap.figures import repetition_summary

        report["repetitions"] = {"n": n, "sections_from": chosen + 1,
                                 "figures": repetition_summary([r for r, _, _ in runs])}
        for i, (_, a, _) in enumerate(runs, 1):
            arts.update({f"{kind}.r{i}": path for kind, path in a.items()})
    return report, arts, problem


def _finish_report(runner: Any, cell: Cell, report: dict[str, Any]) -> dict[str, Any]:
    """A cell's report after its performance windows: quality, or what a quality-only cell leaves out,
    and the basis of each figure family."""
    if not cell.workload.measures_performance:
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
    return report


def repeat_count(cell: Cell) -> int:
    return max(1, int(getattr(cell.suite, "repeat", 1) or 1))


def _measure_cell(
    runner: Any, cell: Cell, peaks: Any, store: "ArtifactSink", hw: dict[str, Any] | None
) -> tuple[dict[str, Any], dict[str, str], str | None]:
    """Run one cell on a loaded runner: performance (traces -> figures, artifacts; its repetitions back
    to back) and/or quality; with why its requests fail it (None: they do not)."""
    report: dict[str, Any] = {}
    arts: dict[str, str] = {}
    problem = None
    if cell.workload.measures_performance:
        n = repeat_count(cell)
        report, arts, problem = _assemble([_perf_window(runner, cell, peaks, store, hw, i, n) for i in range(n)])
    return _finish_report(runner, cell, report), arts, problem


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

    def _failed_load(self, cell: Cell) -> CellResult:
        sink = ArtifactSink()
        arts = _save_logs(self.runner, sink, cell) if self.runner is not None else {}
        rec = self._record(cell, "failed", error=self.load_error, config=_cell_config(cell, None, self.hw_dict),
                           artifacts=arts, failure={"kind": "exception"})
        return CellResult(rec, sink.files)

    def _result(self, cell: Cell, info: Any, sink: "ArtifactSink", report: dict[str, Any], arts: dict[str, str],
                problem: str | None) -> CellResult:
        arts.update(_save_logs(self.runner, sink, cell))
        if problem is None:
            rec = self._record(cell, "ok", config=_cell_config(cell, info, self.hw_dict), report=report, artifacts=arts)
        else:  # its requests failed it: the figures and every request stay for the post-mortem
            rec = self._record(cell, "failed", error=problem, config=_cell_config(cell, info, self.hw_dict),
                               report=report, artifacts=arts, failure={"kind": "requests"})
        return CellResult(rec, sink.files)

    def _raised(self, cell: Cell, info: Any) -> CellResult:
        err = traceback.format_exc()
        sink = ArtifactSink()  # artifacts of a half-measured cell are not kept
        rec = self._record(cell, "failed", error=err, config=_cell_config(cell, info, self.hw_dict),
                           artifacts=_save_logs(self.runner, sink, cell), failure={"kind": "exception"})
        _free_device_memory()
        return CellResult(rec, sink.files)

    def measure(self, cell: Cell) -> CellResult:
        if not self.loaded:
            self.load(cell)
        if self.load_error is not None:
            return self._failed_load(cell)
        info = None
        sink = ArtifactSink()
        try:
            info = self.runner.info()
            report, arts, problem = _measure_cell(self.runner, cell, self.peaks, sink, self.hw_dict)
            return self._result(cell, info, sink, report, arts, problem)
        except Exception:
            return self._raised(cell, info)

    def measure_group(self, cells: list[Cell], on_start: Callable[[Cell, bool], None] = lambda c, first: None
                      ) -> Iterator[tuple[Cell, CellResult]]:
        """Measure ``cells`` (loaded for the first), yielding each cell's result as it is done.

        With ``repeat`` > 1 and two or more performance cells, the repetitions are interleaved: round i
        runs repetition i of every cell in turn, so that a drift of the machine (another tenant, clocks,
        heat) hits every cell alike instead of the cells that happened to run during it; a cell's result
        comes after its last round (a cell whose window raises fails then and leaves the rounds). Quality
        cells follow. Otherwise the cells run one after the other, each with its repetitions back to
        back. ``on_start(cell, first)`` is called before every measured window (first: the cell's first)."""
        if not self.loaded:
            self.load(cells[0])
        perf = [c for c in cells if c.workload.measures_performance]
        n = repeat_count(cells[0])
        if self.load_error is not None or n < 2 or len(perf) < 2:
            for cell in cells:
                on_start(cell, True)
                yield cell, self.measure(cell)
            return
        state: dict[str, dict[str, Any]] = {c.cell_id: {"runs": [], "sink": ArtifactSink(), "info": None}
                                            for c in perf}
        live = list(perf)
        for i in range(n):
            for cell in list(live):
                st = state[cell.cell_id]
                on_start(cell, i == 0)
                try:
                    if i == 0:
                        st["info"] = self.runner.info()
                    st["runs"].append(_perf_window(self.runner, cell, self.peaks, st["sink"], self.hw_dict, i, n))
                    if i < n - 1:
                        continue
                    report, arts, problem = _assemble(st["runs"])
                    result = self._result(cell, st["info"], st["sink"],
                                          _finish_report(self.runner, cell, report), arts, problem)
                except Exception:
                    result = self._raised(cell, st["info"])
                live.remove(cell)
                yield cell, result
        for cell in cells:
            if not cell.workload.measures_performance:
                on_start(cell, True)
                yield cell, self.measure(cell)

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
        # "start": a cell's first measured window; "window": a later one of interleaved repetitions
        starts = lambda c, first: emit({"event": "start" if first else "window", "cell_id": c.cell_id})  # noqa: E731
        for cell, res in session.measure_group(cells, starts):
            check_interrupted()  # a SIGTERM stopped the servers mid-cell: report nothing of it
            emit({"event": "result", "cell_id": cell.cell_id, **res.to_dict()})
    finally:
        session.close()


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
