"""The driver of a run: runs a suite's cells and writes one record per cell.

Three parts, so that one measurement function serves every way of running a cell:

* **Measuring** (:class:`moecap.run.measure.GroupSession`): the cells of one model x runner group on one loaded runner;
  ``measure(cell)`` returns a :class:`CellResult` (the record and its artifact files as text) and
  never writes anything. A failed cell (exception, OOM, a model that does not load, unknown peaks) is a
  failed record with its traceback (``failure.kind: exception``). :func:`run_unit` drives a session
  over a *unit* (a list of cells of one group, described by a JSON-able spec) and emits events; it is
  what a worker subprocess (``python -m moecap.run.worker``) and a Ray task or actor run.
* **Executors**: where units run. ``inline``: in this process, one loaded runner per group (debugging,
  library use; :func:`run_suite`'s default). ``local`` (:mod:`moecap.run.local_executor`): a worker
  subprocess per cell or per group, per-cell timeout, crashes isolated. ``ray``
  (:mod:`moecap.run.ray_executor`): Ray tasks / actors with the GPUs each cell needs.
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
(no node of the Ray cluster can hold it), ``requests`` (the cell ran, but more of its requests failed or
stopped short than the workload's ``max_failed_fraction`` allows; its figures and requests are kept). A
worker that dies is charged to the cell it was running (to
every cell it was loading the model for, when it died while loading); that cell is retried in a new
worker up to ``max_retries`` times, then recorded failed with ``failure.attempts``; cells the dead worker
had not started yet are simply run by a new worker. Timeouts, exceptions and unschedulable cells are
not retried.
"""

from __future__ import annotations

import itertools
import sys
from typing import Any, Callable, Protocol

from moecap.records import Claim, Record, ResultStore, RunManifest, new_run_id, now_iso
from moecap.run.base import EXECUTORS, LOST_KINDS, CellOutcome, ExecutorOptions, SuiteOutcome
from moecap.run.measure import CellResult, GroupSession, _cell_config, _suite_info, unit_spec, worker_environment
from moecap.run.signals import _terminate_as_exit
from moecap.suite import Cell, Suite, expand


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
        self._numbers: dict[str, int] = {}  # cell_id -> its place in this run's progress lines
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

    def say(self, text: str) -> None:
        """A line of progress, printed around the progress bar when one is drawn."""
        if self.bar is not None and not getattr(self.bar, "disable", True):
            with self.bar.external_write_mode():
                self.log(text)
        else:
            self.log(text)

    def _position(self, cell: Cell) -> str:
        total = self.bar.total if self.bar is not None and self.bar.total else len(self.cells)
        if cell.cell_id not in self._numbers:
            self._numbers[cell.cell_id] = len(self._numbers) + 1
        return f"[{self._numbers[cell.cell_id]}/{total}]"

    def started(self, cell: Cell) -> None:
        """One line per cell as it starts (also when the output is no terminal), and the bar's status."""
        self.status(cell.describe())
        self.say(f"moecap: {self._position(cell)} {cell.describe()} ...")

    def attach_log(self, result: CellResult, text: str) -> None:
        """The worker's own output while it ran the cell (libraries' progress bars, warnings) as the
        cell's ``cell.log`` artifact, with the runner's secrets scrubbed."""
        if not text.strip():
            return
        from moecap.redact import scrub, secret_values

        rec = result.record
        rel = f"{rec.cell_id}/cell.log"
        result.files[rel] = scrub(text, secret_values(rec.config))
        rec.artifacts = {**rec.artifacts, "cell_log": rel}

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
        from moecap.report import result_line

        where = f" ({cell.cell_id})" if rec.status != "ok" else ""  # a failed cell: where its record is
        self.say(f"moecap: {self._position(cell)} {cell.describe()}{where}: {result_line(rec)}")
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
            cells = driver.take(group)
            if not cells:
                continue
            session = GroupSession(driver.suite, driver.run_id, driver.environment(), driver.log)
            try:
                driver.status(f"loading {cells[0].model.display_name}")
                session.load(cells[0])
                started = lambda c, first: driver.started(c) if first else None  # noqa: E731
                for cell, result in session.measure_group(cells, started):
                    check_interrupted()  # a Ctrl-C/SIGTERM stopped the servers mid-cell: record nothing of it
                    driver.deliver(cell, result)
            finally:
                session.close()


def make_executor(kind: str, options: ExecutorOptions | None = None) -> Executor:
    options = options or ExecutorOptions()
    if kind == "inline":
        return InlineExecutor()
    if kind == "local":
        from moecap.run.local_executor import LocalExecutor

        return LocalExecutor(options)
    if kind == "ray":
        from moecap.run.ray_executor import RayExecutor

        return RayExecutor(options)
    raise ValueError(f"--executor {kind!r}: allowed {', '.join(EXECUTORS)}")


# ------------------------------------------------------------------------------------------------
# which cells run; resuming


def _rescore(store: ResultStore, cell: Cell, run_id: str, rec: Record | None) -> Record | None:
    """A finished cell (``rec``, its record as last read) re-scored for its workload's SLOs, under its
    claim (None: nothing to do)."""
    from moecap.run.rescore import needs_rescore, rescore

    if not needs_rescore(rec, cell):
        return None
    claim = store.claim(cell.cell_id, run_id)
    if claim is None:  # another process is running it: it will score it itself
        return None
    try:
        return rescore(store, cell)
    finally:
        claim.release()


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
            rec = store.load(cell.cell_id)
            rescored = _rescore(store, cell, run_id, rec)
            if rescored is not None:  # the workload's SLOs changed: the stored requests are scored again
                outcome.outcomes.append(CellOutcome(cell, "rescored", rescored, str(store.record_path(cell.cell_id))))
                continue
            outcome.outcomes.append(CellOutcome(cell, "skipped", path=str(store.record_path(cell.cell_id))))
            skipped_ok += rec is not None and rec.status == "ok"
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
