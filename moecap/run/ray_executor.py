"""The Ray executor: cells run as Ray tasks (or, per model x runner group, Ray actors) on a Ray cluster.

``ray.init(address=options.address)``: ``None`` starts a local cluster (or joins the one ``RAY_ADDRESS``
names); ``auto``, ``host:port`` or ``ray://...`` join an existing one. The driver calls ``ray.shutdown()``
at the end only if it was the one that called ``ray.init`` (a process that already had Ray initialised,
a test for instance, keeps it; shutting down a driver's own connection never stops a cluster it joined).
moecap must be installed on every node, with whatever the runners need (torch, the engines).

What a cell asks Ray for (:func:`cell_demand`):

* ``num_gpus``: the GPUs the runner uses: 0 on ``device: cpu`` and for the ``openai`` runner (an
  endpoint elsewhere); ``tensor_parallel_size x pipeline_parallel_size x data_parallel_size`` for
  vLLM, ``tp_size x dp_size`` for SGLang; otherwise 1, or for ``device: auto`` 1 only if the cluster
  has GPUs. Ray sets ``CUDA_VISIBLE_DEVICES`` to the GPUs it grants, so ``cuda:N`` in a suite counts
  among those.
* the GPU type (``--gpu-type H100``): Ray's own ``accelerator_type`` option, for cells with GPUs. Ray
  detects the type of each node's GPUs and advertises it as the resource ``accelerator_type:<TYPE>``
  (``H100``, ``A100``, ``L4``, ... as in ``ray.util.accelerators``), so a cell asking for an H100 lands
  on an H100 node with no cluster configuration (a custom resource such as ``GPU_TYPE:H100`` would
  have to be declared on every node by hand).
* ``num_cpus`` (``--cpus-per-cell``, default 1) and ``memory`` (``--memory-gb``, if given).

A cell that no alive node can hold is recorded failed at once (``unschedulable``) instead of waiting
for ever (on an autoscaling cluster, bring the nodes up first).

Isolation: ``cell`` (default): a task per cell in a fresh worker process (``max_calls=1``) that loads
the model, measures the cell and returns its record and artifact files (workers may be on machines that
do not share the results folder; the driver writes them as they arrive, via ``ray.wait``). ``group``: a
Ray actor per model x runner group loads the model once; each cell is one method call, returned (and
written) as it finishes.

Failures: application errors never reach Ray (the worker records them as failed records). A worker or
node lost (``WorkerCrashedError``, ``ActorDiedError``, ``NodeDiedError``, ``OutOfMemoryError``, ...) is
retried by the driver, not by Ray (Ray's own ``max_retries`` is 0): the cell that was running is
charged and run again in a new task or actor up to ``--max-retries`` times (default 1), then recorded
failed with the error (``worker_died`` / ``node_died``); cells an actor had not started yet go to a new
actor. Doing it in the driver lets one mechanism serve tasks and actors, keeps a dead actor's finished
cells finished and its queued cells alive, and puts the attempt count in the record. Progress: workers
post ``loading``/``start`` events to a small actor the driver polls, which drives the progress bar and
the per-cell timeout (``--cell-timeout-s``: the task is cancelled with ``force=True``, the actor
killed; recorded ``timeout``, not retried). Ctrl-C: finished results are written, every task and actor
is cancelled or killed, nothing is recorded for the interrupted cells.
"""

from __future__ import annotations

import itertools
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from typing import TYPE_CHECKING

from moecap.run.base import ExecutorOptions
from moecap.run.measure import CellResult, cells_of_spec, run_unit, session_of_spec
from moecap.run.signals import DeferredSignals
from moecap.suite import Cell

if TYPE_CHECKING:  # the driver imports this module (make_executor), never the other way round
    from moecap.run.driver import Driver


def cell_gpus(cell: Cell, cluster_has_gpus: bool) -> int:
    """GPUs a cell's runner uses (see the module doc)."""
    args = cell.runner.args or {}
    device = args.get("device") or cell.suite.hardware.device
    if cell.runner.type == "openai" or device == "cpu":
        return 0
    if device == "auto" and not cluster_has_gpus:
        return 0
    if cell.runner.type == "vllm":
        return int((args.get("tensor_parallel_size") or 1) * (args.get("pipeline_parallel_size") or 1)
                   * (args.get("data_parallel_size") or 1))
    if cell.runner.type == "sglang":
        return int((args.get("tp_size") or 1) * (args.get("dp_size") or 1))
    return 1


def cell_demand(cell: Cell, options: ExecutorOptions, cluster_has_gpus: bool) -> dict[str, Any]:
    """The Ray options that place a cell: num_cpus, num_gpus, memory, accelerator_type."""
    gpus = cell_gpus(cell, cluster_has_gpus)
    out: dict[str, Any] = {"num_cpus": options.cpus_per_cell, "num_gpus": gpus}
    if options.memory_gb:
        out["memory"] = int(options.memory_gb * 1e9)
    if gpus and options.gpu_type:
        out["accelerator_type"] = options.gpu_type
    return out


def unplaceable(demand: dict[str, Any], nodes: list[dict[str, Any]]) -> str | None:
    """Why no alive node can hold ``demand`` (None if one can)."""
    need = {"CPU": demand.get("num_cpus") or 0, "GPU": demand.get("num_gpus") or 0,
            "memory": demand.get("memory") or 0}
    acc = demand.get("accelerator_type")
    if acc:
        need[f"accelerator_type:{acc}"] = 0.001
    for node in nodes:
        res = node.get("Resources") or {}
        if all(res.get(k, 0) >= v for k, v in need.items() if v):
            return None

    def show(res: dict[str, Any]) -> str:
        keys = ["CPU", "GPU"] + sorted(k for k in res if k.startswith("accelerator_type:"))
        parts = [f"{k}={res[k]:g}" for k in keys if k in res]
        if "memory" in res:
            parts.append(f"memory={res['memory'] / 1e9:.1f}GB")
        return "{" + ", ".join(parts) + "}"

    wanted = ", ".join(f"{k}={v / 1e9:.1f}GB" if k == "memory" else (k if k.startswith("accelerator_type:") else f"{k}={v:g}")
                       for k, v in need.items() if v)
    offers = "; ".join(show(n.get("Resources") or {}) for n in nodes) or "no alive node"
    return (f"no node of the Ray cluster can hold this cell: it needs {wanted} (from the runner's arguments, "
            f"--gpu-type, --cpus-per-cell, --memory-gb); the nodes offer: {offers}")


# ---------------------------------------------------------------------------------------------------
# what runs on the Ray workers (module-level, so that Ray imports them by reference)


class _Progress:
    """A mailbox the workers post progress events to and the driver drains."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def put(self, event: dict[str, Any]) -> None:
        self.events.append(event)

    def drain(self) -> list[dict[str, Any]]:
        out, self.events = self.events, []
        return out


def _stdout_to_stderr() -> None:
    try:
        os.dup2(2, 1)
    except OSError:
        pass


def _unit_task(spec: dict[str, Any], progress: Any) -> list[dict[str, Any]]:
    """A Ray task: measure the spec's cells, return their results (record + artifact files)."""
    _stdout_to_stderr()
    results: list[dict[str, Any]] = []

    def emit(ev: dict[str, Any]) -> None:
        if ev["event"] == "result":
            results.append(ev)
        else:
            progress.put.remote({**ev, "unit": spec["unit"]})

    run_unit(spec, emit)
    return results


class _GroupActor:
    """A Ray actor holding one loaded runner for a model x runner group."""

    def __init__(self, spec: dict[str, Any], progress: Any):
        _stdout_to_stderr()
        self.spec = spec
        self.progress = progress
        _, cells, self.session = session_of_spec(spec)
        self.cells = {c.cell_id: c for c in cells}
        self.first = cells[0]

    def _post(self, ev: dict[str, Any]) -> None:
        self.progress.put.remote({**ev, "unit": self.spec["unit"]})

    def load(self) -> bool:
        self._post({"event": "loading"})
        self.session.load(self.first)
        self._post({"event": "loaded", "ok": self.session.load_error is None})
        return True

    def measure(self, cell_id: str) -> dict[str, Any]:
        from moecap.runners.server import check_interrupted

        self._post({"event": "start", "cell_id": cell_id})
        res = self.session.measure(self.cells[cell_id])
        check_interrupted()
        return {"event": "result", "cell_id": cell_id, **res.to_dict()}

    def close(self) -> bool:
        self.session.close()
        return True


# ---------------------------------------------------------------------------------------------------
# the driver side


def _node_lost(err: BaseException, rex: Any) -> bool:
    """Whether Ray reports the worker's node (not just the worker) as gone."""
    if isinstance(err, (rex.NodeDiedError, rex.LocalRayletDiedError)) or getattr(err, "preempted", False):
        return True
    text = str(err).lower()
    return "node has died" in text or "node died" in text or "node was preempted" in text


@dataclass
class _Unit:
    uid: int
    cells: list[Cell]
    task_ref: Any = None
    actor: Any = None
    refs: list[Any] = field(default_factory=list)  # actor: measure refs, in cell order
    loaded: bool = False
    phase: str | None = None  # "loading" or the running cell_id
    phase_t: float = 0.0
    timed_out: str | None = None
    finished: set[str] = field(default_factory=set)
    dead: bool = False

    def unfinished(self) -> list[Cell]:
        return [c for c in self.cells if c.cell_id not in self.finished]


class RayExecutor:
    """Cells as Ray tasks or actors (see the module doc)."""

    def __init__(self, options: ExecutorOptions | None = None, poll_s: float = 0.5):
        self.options = options or ExecutorOptions()
        self.poll_s = poll_s

    def run(self, driver: Driver, groups: list[list[Cell]]) -> None:
        try:
            import ray
        except ImportError:
            raise RuntimeError("--executor ray needs Ray: pip install 'moecap[ray]'") from None
        own = not ray.is_initialized()
        if own:
            driver.status("starting Ray" if self.options.address is None else f"joining Ray at {self.options.address}")
            on_term = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
            ray.init(address=self.options.address, log_to_driver=True)
            if on_term is not None:  # ray.init installs its own SIGTERM handler: keep the run's (clean teardown)
                signal.signal(signal.SIGTERM, on_term)
        try:
            self._run(ray, driver, groups)
        finally:
            if own:
                ray.shutdown()

    def _run(self, ray: Any, driver: Driver, groups: list[list[Cell]]) -> None:
        from ray import exceptions as rex

        opts = self.options
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        has_gpus = any((n.get("Resources") or {}).get("GPU", 0) > 0 for n in nodes)
        progress = ray.remote(num_cpus=0)(_Progress).remote()
        task_fn = ray.remote(max_calls=1)(_unit_task)
        actor_cls = ray.remote(_GroupActor)
        counter = itertools.count()
        units: dict[int, _Unit] = {}
        pending: dict[Any, tuple[_Unit, str]] = {}

        def submit(cells: list[Cell]) -> None:
            cells = driver.take(cells)
            if not cells:
                return
            demand = cell_demand(cells[0], opts, has_gpus)
            why = unplaceable(demand, nodes)
            if why is not None:
                for cell in cells:
                    driver.fail(cell, "unschedulable", why)
                return
            u = _Unit(next(counter), cells)
            units[u.uid] = u
            spec = driver.spec(cells, unit=u.uid)
            if opts.isolate == "cell":
                u.task_ref = task_fn.options(**demand, max_retries=0, retry_exceptions=False).remote(spec, progress)
                pending[u.task_ref] = (u, "task")
            else:
                u.actor = actor_cls.options(**demand, max_restarts=0, max_task_retries=0).remote(spec, progress)
                pending[u.actor.load.remote()] = (u, "load")
                for cell in cells:
                    ref = u.actor.measure.remote(cell.cell_id)
                    u.refs.append(ref)
                    pending[ref] = (u, cell.cell_id)

        def end_unit(u: _Unit) -> None:
            u.dead = True
            for ref in [r for r, (owner, _) in pending.items() if owner is u]:
                pending.pop(ref, None)
            if u.actor is not None:
                try:
                    ray.kill(u.actor, no_restart=True)
                except Exception:
                    pass

        def deliver(u: _Unit, results: list[dict[str, Any]]) -> None:
            for ev in results:
                cell = next((c for c in u.cells if c.cell_id == ev.get("cell_id")), None)
                if cell is not None and cell.cell_id not in u.finished:
                    driver.deliver(cell, CellResult.from_dict(ev))
                    u.finished.add(cell.cell_id)
                    if u.phase == cell.cell_id:
                        u.phase = None

        def died(u: _Unit, err: BaseException) -> None:
            """The unit's worker is gone (or was killed for a timeout)."""
            for ref in u.refs:  # cells the actor finished before it died: their results are in
                if ref in pending:
                    try:
                        value = ray.get(ref, timeout=0)
                    except Exception:
                        continue
                    pending.pop(ref, None)
                    deliver(u, [value])
            unfinished = u.unfinished()
            end_unit(u)
            if u.timed_out is not None:
                kind, info = "timeout", {"timeout_s": opts.cell_timeout_s}
                error = f"timed out after {opts.cell_timeout_s:g} s (--cell-timeout-s): its Ray worker was killed"
                loading = u.timed_out == "loading"
                in_flight = next((c for c in unfinished if c.cell_id == u.timed_out), None)
            elif isinstance(err, rex.RayTaskError) or getattr(err, "actor_init_failed", False):
                # moecap's worker code raised (a bug, a moecap that differs on the node): not a lost worker
                for cell in unfinished:
                    driver.fail(cell, "exception", f"the Ray worker raised:\n{err}")
                return
            elif isinstance(err, (rex.TaskUnschedulableError, rex.ActorUnschedulableError, rex.RuntimeEnvSetupError)):
                for cell in unfinished:
                    driver.fail(cell, "unschedulable", f"{type(err).__name__}: {err}")
                return
            else:
                node = _node_lost(err, rex)
                kind = "node_died" if node else "worker_died"
                info = {"ray_error": type(err).__name__}
                error = f"Ray lost the cell's {'node' if node else 'worker'}: {type(err).__name__}: {err}"
                loading = not u.loaded if u.actor is not None else u.phase == "loading"
                in_flight = unfinished[0] if unfinished else None
            again = driver.charge(unfinished, in_flight, loading, kind, error, opts.max_retries, **info)
            if again:
                submit(again)

        def handle(ref: Any) -> None:
            u, what = pending.pop(ref)
            if u.dead:
                return
            try:
                value = ray.get(ref)
            except Exception as err:
                if what == "close":
                    end_unit(u)
                elif isinstance(err, rex.RayTaskError) and what not in ("task", "load") and u.timed_out is None:
                    cell = next(c for c in u.cells if c.cell_id == what)  # one cell's call raised; the actor lives
                    u.finished.add(what)
                    driver.fail(cell, "exception", f"the Ray worker raised:\n{err}")
                else:
                    died(u, err)
                return
            if what == "task":
                deliver(u, value)
                rest = u.unfinished()
                end_unit(u)
                for cell in rest:  # the worker returned without them: never silently dropped
                    driver.fail(cell, "exception", "the Ray task returned no result for this cell")
            elif what == "load":
                u.loaded = True
            elif what == "close":
                end_unit(u)
            else:
                deliver(u, [value])
                if not u.unfinished():
                    pending[u.actor.close.remote()] = (u, "close")

        def poll_progress() -> None:
            try:
                events = ray.get(progress.drain.remote(), timeout=30)
            except Exception:
                return
            now = time.monotonic()
            for ev in events:
                u = units.get(ev.get("unit"))
                if u is None or u.dead:
                    continue
                kind = ev.get("event")
                if kind == "loading":
                    u.phase, u.phase_t = "loading", now
                    driver.status(f"loading {u.cells[0].model.display_name}")
                elif kind == "loaded":
                    u.loaded = True
                    if u.phase == "loading":
                        u.phase = None
                elif kind == "start" and ev.get("cell_id") not in u.finished:
                    u.phase, u.phase_t = ev.get("cell_id"), now
                    cell = next((c for c in u.cells if c.cell_id == u.phase), None)
                    if cell is not None:
                        driver.started(cell)
            running = sum(1 for x in units.values() if not x.dead and x.phase)
            if running > 1:
                driver.status(f"{running} running")

        def check_timeouts() -> None:
            if not opts.cell_timeout_s:
                return
            now = time.monotonic()
            for u in units.values():
                if u.dead or u.timed_out is not None or u.phase is None:
                    continue
                if now - u.phase_t > opts.cell_timeout_s:
                    u.timed_out = u.phase
                    driver.log(f"moecap: {'loading the model' if u.phase == 'loading' else 'cell ' + u.phase} ran "
                               f"past --cell-timeout-s {opts.cell_timeout_s:g}: stopping its Ray worker")
                    try:
                        if u.actor is not None:
                            ray.kill(u.actor, no_restart=True)
                        else:
                            ray.cancel(u.task_ref, force=True)
                    except Exception as err:
                        driver.log(f"moecap: could not stop it: {err}")

        signals = DeferredSignals()
        try:
            with signals:  # Ctrl-C / SIGTERM: raised by the loop, between polls
                for group in groups:
                    for unit_cells in ([[c] for c in group] if opts.isolate == "cell" else [group]):
                        submit(unit_cells)
                while pending:
                    signals.check()
                    ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=self.poll_s)
                    poll_progress()
                    for ref in ready:
                        if ref in pending:
                            handle(ref)
                    check_timeouts()
        except BaseException:
            self._teardown(ray, driver, pending, deliver)
            raise
        finally:
            try:
                ray.kill(progress)
            except Exception:
                pass

    @staticmethod
    def _teardown(ray: Any, driver: Driver, pending: dict[Any, tuple[_Unit, str]], deliver: Any) -> None:
        """An interrupt: write what already finished, then cancel every task and kill every actor."""
        try:
            ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=0)
        except Exception:
            ready = []
        for ref in ready:
            u, what = pending[ref]
            if what in ("load", "close") or u.dead:
                continue
            try:
                value = ray.get(ref, timeout=5)
                deliver(u, value if what == "task" else [value])
            except Exception:
                pass
        seen: set[int] = set()
        for ref, (u, what) in list(pending.items()):
            try:
                if u.actor is not None:
                    if u.uid not in seen:
                        ray.kill(u.actor, no_restart=True)
                elif what == "task":
                    ray.cancel(ref, force=True)
            except Exception:
                pass
            seen.add(u.uid)


__all__ = ["RayExecutor", "cell_demand", "cell_gpus", "unplaceable", "cells_of_spec"]
