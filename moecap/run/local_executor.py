"""The local executor: each unit of cells runs in a worker subprocess (``python -m moecap.run.worker``).

Units: with ``isolate="cell"`` (the default) every cell gets a fresh worker, so no CUDA state, leaked
memory or crash carries over from one cell to the next (the model loads per cell); with
``isolate="group"`` one worker loads a model x runner group's model once and runs its cells in turn,
interleaving their repetitions when the suite has ``repeat`` > 1 (round i runs repetition i of every
cell; see :meth:`moecap.run.measure.GroupSession.measure_group`). Workers run one at a time (cells on one machine would contend for it).

A worker starts in its own session; the driver reads its events from a pipe and tees its output
(standard output and error) to this process's standard error, keeping the tail for failure records.

* Timeout (``cell_timeout_s``): loading the model and each cell each get that long, counted from the
  worker's event that starts them (with interleaved repetitions: each repetition's window); past it the worker's process group gets SIGTERM (its runner stops
  the servers it launched), then SIGKILL after ``kill_grace_s``. The cell (every cell the worker was
  loading the model for, when it was loading) is recorded failed, ``failure.kind: timeout``; not retried.
* A worker that dies (a signal, a non-zero exit, ``os._exit``) before its cells finished: the cell it
  was running is charged (see :meth:`moecap.run.Driver.charge`), retried in a new worker up to
  ``max_retries`` times, then recorded failed (``worker_died``) with the exit status or signal and the
  worker's output tail. Cells it had not started go to a new worker. The suite goes on.
* Ctrl-C / SIGTERM of ``moecap run``: results already sent are written, the worker's group is torn
  down as on a timeout, nothing is recorded for the interrupted cell, and the interrupt propagates.
"""

from __future__ import annotations

import collections
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from typing import Any

from typing import TYPE_CHECKING

from moecap.run.base import ExecutorOptions
from moecap.run.measure import CellResult
from moecap.run.worker import CELL_END
from moecap.run.signals import DeferredSignals
from moecap.suite import Cell

if TYPE_CHECKING:  # the driver imports this module (make_executor), never the other way round
    from moecap.run.driver import Driver

TAIL_CHARS = 4000
_EOF = object()


def _describe_exit(rc: int | None) -> str:
    if rc is None:
        return "did not exit"
    if rc < 0:
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = f"signal {-rc}"
        return f"was killed by {name} (exit status {rc})"
    return f"exited with status {rc}"


CELL_LOG_CHARS = 4 << 20  # a cell's log artifact keeps at most the last 4 MiB of its worker's output
_END_LINE = re.compile("\n?" + re.escape(CELL_END) + r"[^\n]*\n?")  # removed from echoed output


def _echo_own_line(line: str) -> None:
    """A worker's output line that is moecap's own progress (``moecap zoo: ...``, ``moecap: building ...``)
    goes to the console too; the libraries' bars and warnings stay in the cell's log."""
    if line.startswith("moecap"):
        try:
            sys.stderr.write(line.rsplit("\r", 1)[-1] + "\n")
            sys.stderr.flush()
        except (OSError, ValueError):
            pass


class _CellLogs:
    """A worker's output, filed per cell: lines accumulate for the cell in flight until the marker line
    the worker writes before the cell's result (``moecap.run.worker.CELL_END``); reads may cut anywhere."""

    def __init__(self, on_line: Any = None) -> None:
        self.on_line = on_line  # called with every complete output line (not the markers)
        self._lines: collections.deque[str] = collections.deque()  # the cell in flight's output lines ...
        self._size = 0  # ... their characters (at most about CELL_LOG_CHARS: the oldest go)
        self._partial = ""  # the line being written
        self._done: dict[str, str] = {}  # cell_id -> its output, once its end marker was read
        self._cond = threading.Condition()

    def feed(self, text: str) -> None:
        """Add output to the cell in flight, line by line; at a cell's end marker line, file what came
        before it as that cell's log."""
        with self._cond:
            lines = (self._partial + text).split("\n")
            self._partial = lines.pop()  # the line still being written (a progress bar's \r updates)
            if len(self._partial) > CELL_LOG_CHARS:  # no marker starts it: it is output
                lines.append(self._partial)
                self._partial = ""
            for line in lines:
                if line.startswith(CELL_END):
                    self._done[line[len(CELL_END):]] = "".join(self._lines)
                    self._lines.clear()
                    self._size = 0
                    self._cond.notify_all()
                    continue
                if self.on_line is not None:
                    self.on_line(line)
                self._lines.append(line + "\n")
                self._size += len(line) + 1
                while self._size > CELL_LOG_CHARS and len(self._lines) > 1:
                    self._size -= len(self._lines.popleft())

    def take(self, cell_id: str, wait_s: float = 5.0) -> str:
        """The worker's output for ``cell_id`` (its model's loading included, for the first cell): waits
        until the reader reaches the cell's end marker, which the worker wrote before its result."""
        with self._cond:
            self._cond.wait_for(lambda: cell_id in self._done, timeout=wait_s)
            if cell_id in self._done:
                return self._done.pop(cell_id)
            text = "".join(self._lines) + self._partial  # no marker (an old worker?): what there is
            self._lines.clear()
            self._size, self._partial = 0, ""
            return text


class _Worker:
    """One worker subprocess: its events queue, its output (echoed with ``echo``; kept per cell for its
    ``cell.log``, and a tail for failures), its process group."""

    def __init__(self, python: str, spec: dict[str, Any], echo: bool = False):
        self.echo = echo
        # moecap's own lines (building tiny-moe, its training progress) reach the console without --verbose
        self.logs = _CellLogs(on_line=None if echo else _echo_own_line)
        rfd, wfd = os.pipe()
        try:
            self.proc = subprocess.Popen(
                [python, "-m", "moecap.run.worker", str(wfd)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, pass_fds=(wfd,), start_new_session=True,
            )
        except BaseException:
            os.close(rfd)
            os.close(wfd)
            raise
        os.close(wfd)
        self.events: queue.Queue = queue.Queue()
        self._tail: collections.deque[str] = collections.deque()
        self._tail_len = 0
        self._lock = threading.Lock()
        self._ev_thread = threading.Thread(target=self._read_events, args=(rfd,), daemon=True)
        self._out_thread = threading.Thread(target=self._read_output, daemon=True)
        self._ev_thread.start()
        self._out_thread.start()
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(json.dumps(spec).encode())
            self.proc.stdin.close()
        except (BrokenPipeError, OSError):  # it died at once: its exit status tells why
            pass

    def _read_events(self, rfd: int) -> None:
        with os.fdopen(rfd, "r", encoding="utf-8") as fh:
            for line in fh:
                line = line.strip()
                if not line:
                    continue
                try:
                    self.events.put(json.loads(line))
                except ValueError:
                    self.events.put({"event": "garbled", "line": line[:200]})
        self.events.put(_EOF)

    def _read_output(self) -> None:
        out = self.proc.stdout
        assert out is not None
        while True:
            chunk = out.read1(65536) if hasattr(out, "read1") else out.read(65536)
            if not chunk:
                return
            text = chunk.decode("utf-8", errors="replace")
            if self.echo:
                try:
                    sys.stderr.write(_END_LINE.sub("", text))
                    sys.stderr.flush()
                except (OSError, ValueError):
                    pass
            self.logs.feed(text)
            with self._lock:
                self._tail.append(text)
                self._tail_len += len(text)
                while self._tail_len - len(self._tail[0]) > TAIL_CHARS and len(self._tail) > 1:
                    self._tail_len -= len(self._tail.popleft())

    def take_log(self, cell_id: str, wait_s: float = 5.0) -> str:
        return self.logs.take(cell_id, wait_s)

    def join_events(self, timeout: float) -> None:
        self._ev_thread.join(timeout=timeout)

    def tail(self) -> str:
        self._out_thread.join(timeout=2)
        with self._lock:
            return _END_LINE.sub("", "".join(self._tail))[-TAIL_CHARS:]

    def signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def wait_exit(self, grace_s: float) -> int | None:
        """Reap a worker whose events have ended (stopping it if it does not exit within ``grace_s``)."""
        try:
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
        return self.stop(grace_s)

    def stop(self, grace_s: float) -> int | None:
        """SIGTERM to the worker's process group, SIGKILL after ``grace_s``; reap the worker."""
        if self.proc.poll() is None:
            self.signal_group(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass
        self.signal_group(signal.SIGKILL)  # anything left in its group (children it started)
        return self.proc.wait()


class LocalExecutor:
    """Cells in worker subprocesses on this machine (see the module doc)."""

    def __init__(self, options: ExecutorOptions | None = None, python: str = sys.executable, poll_s: float = 0.2):
        self.options = options or ExecutorOptions()
        self.python = python
        self.poll_s = poll_s

    def run(self, driver: Driver, groups: list[list[Cell]]) -> None:
        units: collections.deque[list[Cell]] = collections.deque(
            [[c] for g in groups for c in g] if self.options.isolate == "cell" else groups)
        with DeferredSignals() as self._signals:  # Ctrl-C / SIGTERM: raised by the loop, between polls
            while units:
                self._signals.check()
                cells = driver.take(units.popleft())
                if cells:
                    again = self._run_worker(driver, cells)
                    if again:
                        units.appendleft(again)

    def _run_worker(self, driver: Driver, cells: list[Cell]) -> list[Cell]:
        """Run one worker over ``cells``; return the cells to run again in a new worker."""
        opts = self.options
        by_id = {c.cell_id: c for c in cells}
        finished: set[str] = set()
        phase: str | None = None  # "loading", or the cell_id running
        deadline: float | None = None
        timed_out: str | None = None
        loaded = False
        worker = _Worker(self.python, driver.spec(cells), echo=opts.verbose)
        driver.status(f"starting a worker for {cells[0].describe()}")

        def handle(ev: dict[str, Any]) -> None:
            nonlocal phase, deadline, loaded
            kind = ev.get("event")
            now = time.monotonic()
            if kind == "loading":
                phase = "loading"
                driver.status(f"loading {cells[0].model.display_name}")
            elif kind == "loaded":
                loaded, phase = True, None
            elif kind == "start" and ev.get("cell_id") in by_id:
                phase = ev["cell_id"]
                driver.started(by_id[phase])
            elif kind == "window" and ev.get("cell_id") in by_id:  # a later window of interleaved repetitions
                phase = ev["cell_id"]
            elif kind == "result" and ev.get("cell_id") in by_id:
                result = CellResult.from_dict(ev)
                driver.attach_log(result, worker.take_log(ev["cell_id"]))
                driver.deliver(by_id[ev["cell_id"]], result)
                finished.add(ev["cell_id"])
                phase = None
            else:
                return
            deadline = now + opts.cell_timeout_s if (opts.cell_timeout_s and phase) else None

        try:
            while True:
                self._signals.check()
                try:
                    ev = worker.events.get(timeout=self.poll_s)
                except queue.Empty:
                    if deadline is not None and timed_out is None and time.monotonic() > deadline:
                        timed_out = phase
                        driver.log(f"moecap: {'loading the model' if phase == 'loading' else 'cell ' + str(phase)} "
                                   f"ran past --cell-timeout-s {opts.cell_timeout_s:g}: stopping its worker")
                        worker.stop(opts.kill_grace_s)
                    continue
                if ev is _EOF:
                    break
                handle(ev)
            rc = worker.wait_exit(opts.kill_grace_s)  # it exits by itself once its events end
        except BaseException:  # an interrupt: keep what finished, tear the worker down, record nothing else
            self._drain(worker, handle)
            worker.stop(opts.kill_grace_s)
            worker.join_events(timeout=5)
            self._drain(worker, handle)
            raise

        unfinished = [c for c in cells if c.cell_id not in finished]
        if not unfinished:
            return []
        tail = worker.tail()
        loading = (timed_out or phase) == "loading" or not loaded
        in_flight = by_id.get(timed_out or phase or "")
        if timed_out is not None:
            error = (f"timed out after {opts.cell_timeout_s:g} s (--cell-timeout-s): the worker's process group "
                     f"was killed")
            kind, info = "timeout", {"timeout_s": opts.cell_timeout_s}
        else:
            error = f"the worker process {_describe_exit(rc)}"
            kind, info = "worker_died", {"exit_status": rc}
            if rc is not None and rc < 0:
                info["signal"] = _signal_name(-rc)
        if tail.strip():
            error += f"\n--- the worker's output (last {TAIL_CHARS} characters) ---\n{tail}"
        return driver.charge(unfinished, in_flight, loading, kind, error, opts.max_retries, **info)

    @staticmethod
    def _drain(worker: _Worker, handle: Any) -> None:
        """Write the results a worker already sent (never lose a finished record)."""
        while True:
            try:
                ev = worker.events.get_nowait()
            except queue.Empty:
                return
            if ev is not _EOF and ev.get("event") == "result":
                handle(ev)


def _signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return str(sig)
