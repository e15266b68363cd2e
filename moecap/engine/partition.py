"""``moecap serve --backend partition``: the static-partition (MIG-style) baseline, one process per child.

Expert consolidation is compared with a device split statically between the children: each child alone
in its share of memory and compute, never waiting on another. Serving every child through one scheduler
thread would make the children queue behind each other, which no real split does; so here each child is
its own server process with its own worker, and the ``moecap serve`` process is a router in front of them.

Processes
    The front process (``moecap serve CHILD... --backend partition --fast-budget-gb G``; aiohttp, no torch)
    starts one child server per served model: ``python -m moecap.engine.partition`` (:func:`child_main`),
    which serves that one model with the ordinary ``moecap serve`` machinery
    (:func:`moecap.engine.server.serve` over a :class:`PartitionShareBackend`, its own batch scheduler and
    worker thread). The front waits until every child answers its ``/health``, then serves.

Ports
    The front binds its own address first (a taken port fails at once) and, per child, a listening socket
    on 127.0.0.1, port 0, which it hands to the child (``pass_fds``): the child's port is known before the
    child starts and no other process can take it in between. Children listen on loopback only and want a
    random internal key (``secrets``; passed in the environment, never in argv) on every endpoint but
    ``/health``; the clients' key (``--api-key`` / ``$MOECAP_API_KEY``) is checked at the front.

Memory
    Each child gets ``G / N`` of the fast-device budget for its weights: its non-expert layers first, the
    experts that do not fit in the rest placed in host memory by the engine's planner
    (:func:`moecap.engine.planner.make_plan` with ``fast_budget_bytes``) and expert store
    (:func:`moecap.engine.store.install`).

Compute
    On a CPU each child gets ``max(1, T // N)`` threads, T being the threads this process may use
    (``$OMP_NUM_THREADS`` when set, else the CPUs of its affinity mask): ``torch.set_num_threads`` in the
    child, ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` / ``OPENBLAS_NUM_THREADS`` in its environment, and, when
    there are at least N CPUs, its own disjoint set of CPUs (``sched_setaffinity``). On CUDA each child is
    its own process with its own context and streams; under MPS (a control pipe present)
    ``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`` is ``100 // N`` unless already set. MIG and every other GPU
    setting are left alone.

Endpoints of the front
    - ``POST /v1/completions``, ``POST /v1/chat/completions``: the body is read (413 beyond
      ``--max-request-bytes``) and parsed as ``moecap serve`` does (the same 400s), the request's ``model``
      picks the child (unknown or missing: the same error as ``moecap serve``), and the body goes to that
      child unchanged; its answer (JSON, or the Server-Sent Events stream) is relayed as it arrives. A
      client that goes away closes the child's connection, which stops its row.
    - ``GET /v1/models``, ``GET /v1/models/{id}``: the children's model cards, in the order given.
    - ``GET /health``: 200 when every child answers its own ``/health``, with each child's pid, port,
      CPUs and torch threads; 503 naming the children that do not (and while shutting down).
    - ``GET /stats``: the children's ``/stats`` merged into the one-server shape the ``moecap-serve`` runner
      reads: ``batches`` (renumbered: a batch first seen by a later ``/stats`` call gets a higher ``index``,
      so "index above the last one seen" still selects a window; ``start_s`` on the front's clock),
      ``requests``, ``totals`` (sums), ``queued``, ``running``, ``config``, ``backend`` (``partition``) and
      ``memory`` (sums over the children, plus ``expert_bytes_fast:NAME``, ``expert_bytes_host:NAME``,
      ``fast_budget_bytes:NAME`` ... per child and ``fast_budget_bytes`` / ``per_child_fast_budget_bytes``),
      and ``partition``: the split (budget, threads) and per child its pid, port, CPUs, torch threads,
      totals and memory.

Failures
    A child that cannot start: the front stops the others and exits 2, naming the child and quoting the
    end of its output. A child that dies while serving: requests for it get 503 naming it (a stream that
    already started ends with an error event and ``[DONE]``); the other children go on.

Teardown
    Each child runs in its own session (process group), its output relayed line by line to the front's
    stderr. On SIGTERM/SIGINT, a normal exit or an exception, the front SIGTERMs every child's group (the
    children end their open streams cleanly) and SIGKILLs whatever is left after
    :data:`CHILD_STOP_TIMEOUT_S`. If the front dies without that (SIGKILL), its children die with it: each
    asks the kernel for SIGKILL when its parent dies (``prctl(PR_SET_PDEATHSIG)``, Linux) and also watches
    its parent's pid (any platform).

:class:`PartitionShareBackend` (``BACKENDS["partition"]``) is the engine of one partition: in a child
process it holds that child alone in its share. Built in one process with several models (the
``make_backend`` API), it is the older emulation by memory budgets only, all models behind one worker.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from moecap.engine.backend import BackendError, SeparateModelsBackend

# How long the children may take to load before the front gives up on them.
CHILD_START_TIMEOUT_S = 1800.0
# After SIGTERM, how long the children have to stop before SIGKILL.
CHILD_STOP_TIMEOUT_S = 10.0
# A child's internal key travels in this variable (never argv); the child removes it from its environment.
CHILD_KEY_ENV = "MOECAP_PARTITION_CHILD_KEY"
# Lines of a child's output kept for the error message when it fails.
CHILD_LOG_LINES = 40
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
MPS_PERCENT_ENV = "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_DONE = b"data: [DONE]\n\n"  # how every complete stream of moecap serve ends


# -- the engine of one partition ---------------------------------------------------------------------

class PartitionShareBackend(SeparateModelsBackend):
    """Each served model alone in a ``fast_budget_gb / N`` share of the fast-device memory: its
    non-expert layers first, the experts that do not fit in the rest offloaded to host memory (the
    engine's planner and expert store). A partition child serves one model with its whole share."""

    def __init__(self, models: dict[str, str | Path], device: str = "cpu", dtype: str = "auto",
                 max_model_len: int | None = None, fast_budget_gb: float | None = None):
        from moecap.engine.planner import make_plan
        from moecap.engine.store import CostModel, install

        if fast_budget_gb is None:
            raise BackendError("the partition backend needs --fast-budget-gb (the device memory the children share)")
        if not fast_budget_gb > 0:
            raise BackendError(f"--fast-budget-gb must be > 0, got {fast_budget_gb}")
        super().__init__(models, device=device, dtype=dtype, max_model_len=max_model_len)
        self.fast_budget_bytes = fast_budget_gb * 1e9
        self.share_bytes = self.fast_budget_bytes / len(self._models)
        self.partition: dict[str, Any] = {"fast_budget_bytes": self.fast_budget_bytes,
                                          "per_child_bytes": self.share_bytes}
        self.stores: dict[str, list[Any]] = {}
        self._non_expert: dict[str, int] = {}
        for name, model in self._models.items():
            non_expert = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".experts." not in n)
            budget = max(0.0, self.share_bytes - non_expert)  # the share holds the non-expert layers first
            plan = make_plan(model, None, 0.0, "int8", 0.0, fast_budget_bytes=budget, name=f"partition-{name}")
            self.stores[name] = install(model, plan, self._device, CostModel())
            self._non_expert[name] = non_expert
            self.partition[name] = plan.summary()

    def memory(self) -> dict[str, int]:
        out = super().memory()
        fast = host = 0
        for name, stores in self.stores.items():
            tiers = [s.tier_nbytes() for s in stores]
            f, h = sum(t["fast"] for t in tiers), sum(t["host"] for t in tiers)
            out[f"expert_bytes_fast:{name}"] = f
            out[f"expert_bytes_host:{name}"] = h
            out[f"non_expert_bytes:{name}"] = self._non_expert[name]
            out[f"fast_budget_bytes:{name}"] = int(self.share_bytes)
            fast += f
            host += h
        out.update({"expert_bytes": fast + host, "expert_bytes_fast": fast, "expert_bytes_host": host,
                    "fast_budget_bytes": int(self.fast_budget_bytes)})
        return out


# -- the split ---------------------------------------------------------------------------------------

def cpu_share(n: int) -> tuple[int, int, list[list[int]] | None]:
    """(T, threads per child, CPUs per child or None) for ``n`` children: T is the threads this process
    may use (``$OMP_NUM_THREADS`` when set, else its affinity mask's CPUs), each child gets ``max(1, T // n)``
    threads and, when ``T >= n``, its own disjoint CPUs."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = list(range(os.cpu_count() or 1))
    total = len(cpus)
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        total = min(total, int(env))
    threads = max(1, total // n)
    sets = [cpus[i * threads:(i + 1) * threads] for i in range(n)] if total >= n else None
    return total, threads, sets


def _mps_present() -> bool:
    """Whether an NVIDIA MPS control daemon seems to run (its pipe directory exists)."""
    pipe = os.environ.get("CUDA_MPS_PIPE_DIRECTORY") or "/tmp/nvidia-mps"
    return os.path.exists(os.path.join(pipe, "control"))


class PartitionError(RuntimeError):
    """The partition could not be started (a child failed, a bad option)."""


class _Child:
    """One child server process: its socket, its process, the tail of its output."""

    def __init__(self, name: str, source: str, index: int):
        self.name, self.source, self.index = name, source, index
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.tail: collections.deque[str] = collections.deque(maxlen=CHILD_LOG_LINES)
        self.reader: threading.Thread | None = None
        self.info: dict[str, Any] = {}  # the child's "process" record from its /health
        self.cards: list[dict[str, Any]] = []
        self.threads = 1
        self.cpus: list[int] | None = None
        self.env: dict[str, str] = {}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def output_tail(self, lines: int = CHILD_LOG_LINES) -> str:
        return "\n".join(f"  {ln}" for ln in list(self.tail)[-lines:]) or "  (no output)"

    def exit_text(self) -> str:
        rc = None if self.proc is None else self.proc.poll()
        if rc is None:
            return "is running"
        return f"exited with status {rc}" if rc >= 0 else f"was killed by signal {-rc} ({_signame(-rc)})"

    def down_message(self) -> str:
        return (f"partition child {self.name!r} (pid {self.pid}) {self.exit_text()}; "
                f"its requests cannot be served")


def _signame(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return str(num)


def _relay(child: _Child) -> None:
    """Read the child's output line by line: keep the tail, copy it to our stderr with the child's name."""
    assert child.proc is not None and child.proc.stdout is not None
    for raw in child.proc.stdout:
        line = raw.decode("utf-8", "replace").rstrip("\n")
        child.tail.append(line)
        try:
            sys.stderr.write(f"[partition {child.name}] {line}\n")
            sys.stderr.flush()
        except (OSError, ValueError):  # our stderr is gone: keep draining the pipe
            pass


def _spawn(child: _Child, key: str, opts: dict[str, Any], n: int) -> None:
    """Start ``child``'s server process on a socket bound here (127.0.0.1, port 0)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen(1024)
        child.port = sock.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if k not in ("MOECAP_API_KEY", CHILD_KEY_ENV)}
        env[CHILD_KEY_ENV] = key
        env["PYTHONUNBUFFERED"] = "1"
        for var in THREAD_ENV:
            env[var] = str(child.threads)
        if _mps_present() and MPS_PERCENT_ENV not in env:
            env[MPS_PERCENT_ENV] = str(max(1, 100 // n))
        # the child imports this package as the front did, even without an installed moecap
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        child.env = {k: env[k] for k in (*THREAD_ENV, MPS_PERCENT_ENV) if k in env}
        cmd = [sys.executable, "-m", "moecap.engine.partition", "--name", child.name, "--model", child.source,
               "--fd", str(sock.fileno()), "--parent-pid", str(os.getpid()), "--threads", str(child.threads),
               "--cpus", ",".join(map(str, child.cpus or [])), "--fast-budget-gb", repr(opts["share_gb"]),
               "--device", str(opts["device"]), "--dtype", str(opts["dtype"]),
               "--max-batch-size", str(opts["max_batch_size"]), "--max-wait-s", str(opts["max_wait_s"]),
               "--max-consecutive-batches", str(opts["max_consecutive_batches"]),
               "--max-request-bytes", str(opts["max_request_bytes"])]
        if opts.get("max_model_len"):
            cmd += ["--max-model-len", str(opts["max_model_len"])]
        child.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      env=env, pass_fds=(sock.fileno(),), start_new_session=True)
    finally:
        sock.close()  # the child holds it now: when the child dies, connections are refused, not queued
    child.reader = threading.Thread(target=_relay, args=(child,), daemon=True, name=f"moecap-partition-{child.name}")
    child.reader.start()


def _get_json(url: str, key: str | None = None, timeout_s: float = 2.0) -> Any:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        return json.loads(resp.read())


def _wait_ready(children: list[_Child], key: str, timeout_s: float) -> None:
    """Block until every child answers its /health; PartitionError naming the first that exits or hangs."""
    deadline = time.monotonic() + timeout_s
    pending = list(children)
    while pending:
        for child in list(pending):
            if not child.alive():
                if child.reader is not None:
                    child.reader.join(2.0)  # its last lines
                raise PartitionError(f"partition child {child.name!r} ({child.source}, pid {child.pid}) "
                                     f"{child.exit_text()} before it was ready; its output ends:\n{child.output_tail()}")
            try:
                health = _get_json(child.url + "/health", timeout_s=1.0)
            except (OSError, ValueError):
                continue
            try:
                child.cards = list(_get_json(child.url + "/v1/models", key, timeout_s=30)["data"])
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise PartitionError(f"partition child {child.name!r} (pid {child.pid}) is up but its /v1/models "
                                     f"failed: {type(err).__name__}: {err}") from None
            child.info = dict(health.get("process") or {})
            pending.remove(child)
        if pending and time.monotonic() > deadline:
            names = ", ".join(repr(c.name) for c in pending)
            raise PartitionError(f"partition child(ren) {names} not ready within {timeout_s:.0f} s; the output of "
                                 f"{pending[0].name!r} ends:\n{pending[0].output_tail()}")
        if pending:
            time.sleep(0.1)


def _signal_groups(children: list[_Child], sig: int) -> None:
    for child in children:
        # only a child not yet reaped: its pid (= its group id) cannot have been reused
        if child.proc is not None and child.proc.returncode is None:
            try:
                os.killpg(child.proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass


def stop_children(children: list[_Child], timeout_s: float = CHILD_STOP_TIMEOUT_S) -> None:
    """SIGTERM every child's process group, SIGKILL what is left after ``timeout_s``; reap them."""
    for sig, wait in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
        if not any(c.alive() for c in children):
            break
        _signal_groups(children, sig)
        end = time.monotonic() + wait
        for child in children:
            if child.proc is None:
                continue
            try:
                child.proc.wait(max(0.0, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
    if any(c.alive() for c in children):  # a process group that outlived its leader: once more
        _signal_groups(children, signal.SIGKILL)
    for child in children:
        if child.proc is not None:
            try:
                child.proc.wait(1.0)
            except subprocess.TimeoutExpired:
                pass
        if child.reader is not None:
            child.reader.join(1.0)


# -- the router ----------------------------------------------------------------------------------------

class _BatchIds:
    """Front-wide batch indices: a child batch first seen by a later /stats call gets a higher index, so a
    client's "batches above the highest index I saw" is the batches since, as with one server."""

    def __init__(self) -> None:
        self._ids: dict[tuple[str, int], int] = {}
        self._next = 0

    def assign(self, seen: list[tuple[float, int, str, int]]) -> dict[tuple[str, int], int]:
        """``seen``: (start on the front's clock, child order, child, child's index) of every listed batch."""
        for start, _, name, idx in sorted(s for s in seen if (s[2], s[3]) not in self._ids):
            self._ids[(name, idx)] = self._next
            self._next += 1
        low: dict[str, int] = {}
        for _, _, name, idx in seen:
            low[name] = min(low.get(name, idx), idx)
        # forget what the children no longer list (their history is bounded)
        self._ids = {k: v for k, v in self._ids.items() if k[0] not in low or k[1] >= low[k[0]]}
        return dict(self._ids)


def _add_numbers(into: dict[str, Any], more: dict[str, Any]) -> None:
    for k, v in more.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            into[k] = into.get(k, 0) + v


class PartitionRouter:
    """The front's aiohttp application over the running children (see the module doc)."""

    def __init__(self, children: list[_Child], key: str, api_key: str | None, max_request_bytes: int,
                 split: dict[str, Any]):
        from moecap.engine.server import api_key_bytes

        self.children = {c.name: c for c in children}
        self.models = [c.name for c in children]
        self._key = key
        self._api_key = api_key_bytes(api_key)
        self.max_request_bytes = int(max_request_bytes)
        self.split = dict(split)
        self._origin_unix = time.time()
        self._batch_ids = _BatchIds()
        self._session: Any = None
        self._shutting_down = False
        self._stop_children_on_shutdown = True

    @property
    def requires_api_key(self) -> bool:
        return self._api_key is not None

    def app(self) -> Any:
        """moecap serve's endpoints, access and errors (OpenAI's error object), answered by the children."""
        from moecap.engine.server import openai_app

        return openai_app(self, self.forward_generation, self.forward_generation)

    async def _on_startup(self, app: Any) -> None:
        import aiohttp

        # no overall timeout: a generation may stream for as long as it takes
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                              timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
                                              auto_decompress=False)

    async def _on_shutdown(self, app: Any) -> None:
        # no new connections already; the children abort what they run, so open streams end cleanly
        self._shutting_down = True
        if self._stop_children_on_shutdown:
            children = list(self.children.values())
            _signal_groups(children, signal.SIGTERM)
            await asyncio.get_running_loop().run_in_executor(None, stop_children, children)

    async def _on_cleanup(self, app: Any) -> None:
        if self._session is not None:
            await self._session.close()

    # -- errors (as moecap serve's) -----------------------------------------------------------------------
    def _check_model(self, name: Any) -> _Child:
        """The child serving ``name``, or moecap serve's own error for a missing or unknown model."""
        from moecap.engine.server import check_model_name

        return self.children[check_model_name(name, self.models)]

    def _down(self, child: _Child, why: str | None = None) -> Any:
        from moecap.engine.server import ApiError

        msg = child.down_message() if not child.alive() else (
            f"partition child {child.name!r} (pid {child.pid}) is not answering: {why}")
        return ApiError(503, msg, code="partition_child_unavailable")

    # -- simple endpoints ---------------------------------------------------------------------------------
    def _front_process(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "role": "partition-router", "clock_origin_unix": self._origin_unix}

    def _child_record(self, child: _Child) -> dict[str, Any]:
        return {"pid": child.pid, "port": child.port, "alive": child.alive(), "threads": child.threads,
                "cpus": child.cpus, "env": dict(child.env), "torch_threads": child.info.get("torch_threads"),
                "fast_budget_bytes": int(self.split["per_child_fast_budget_bytes"]), "process": dict(child.info)}

    async def _child_get(self, child: _Child, path: str, timeout_s: float) -> Any:
        import aiohttp

        if not child.alive():
            raise self._down(child)
        try:
            async with self._session.get(child.url + path, headers={"Authorization": f"Bearer {self._key}"},
                                         timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
                body = await resp.json(content_type=None)
                if resp.status != 200:
                    raise self._down(child, f"{path} answered {resp.status}: {body}")
                return body
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as err:
            raise self._down(child, f"{type(err).__name__}: {err}") from None

    async def health(self, request: Any) -> Any:
        from moecap.engine.server import ApiError, _json_response, error_body

        if self._shutting_down:
            return _json_response(503, {"status": "shutting down"})
        replies = await asyncio.gather(*(self._child_get(c, "/health", 5.0) for c in self.children.values()),
                                       return_exceptions=True)
        children, down = {}, []
        for child, reply in zip(self.children.values(), replies):
            rec = self._child_record(child)
            if isinstance(reply, ApiError):
                rec["status"], rec["error"] = "unavailable", reply.message
                down.append(reply.message)
            elif isinstance(reply, BaseException):
                raise reply
            else:
                rec["status"] = reply.get("status")
            children[child.name] = rec
        out = {"status": "unavailable" if down else "ok", "models": self.models, "backend": "partition",
               "process": self._front_process(), "children": children}
        if down:
            out.update(error_body("; ".join(down), "service_unavailable_error", None, "partition_child_unavailable"))
        return _json_response(503 if down else 200, out)

    async def list_models(self, request: Any) -> Any:
        from moecap.engine.server import _json_response

        return _json_response(200, {"object": "list", "data": [card for c in self.children.values() for card in c.cards]})

    async def get_model(self, request: Any) -> Any:
        from moecap.engine.server import _json_response

        child = self._check_model(request.match_info["model"])
        card = next(c for c in child.cards if c.get("id") == child.name)
        return _json_response(200, card)

    # -- /stats --------------------------------------------------------------------------------------------
    async def stats(self, request: Any) -> Any:
        from moecap.engine.server import ApiError, _json_response

        order = list(self.children.values())
        replies = await asyncio.gather(*(self._child_get(c, "/stats", 30.0) for c in order), return_exceptions=True)
        ok: dict[str, dict[str, Any]] = {}
        per_child: dict[str, dict[str, Any]] = {}
        for child, reply in zip(order, replies):
            rec = self._child_record(child)
            if isinstance(reply, ApiError):
                rec["error"] = reply.message
            elif isinstance(reply, BaseException):
                raise reply
            else:
                ok[child.name] = reply
                rec.update({"totals": reply.get("totals"), "queued": reply.get("queued"),
                            "running": reply.get("running"), "memory": reply.get("memory")})
                rec["process"] = reply.get("process") or rec["process"]
            per_child[child.name] = rec
        offsets = {name: float((s.get("process") or {}).get("clock_origin_unix", self._origin_unix)) - self._origin_unix
                   for name, s in ok.items()}
        position = {c.name: i for i, c in enumerate(order)}
        seen = [(b["start_s"] + offsets[name], position[name], name, b["index"])
                for name, s in ok.items() for b in s.get("batches", [])]
        ids = self._batch_ids.assign(seen)
        batches, requests = [], []
        totals: dict[str, Any] = {}
        memory: dict[str, Any] = {}
        queued: dict[str, int] = {}
        running = 0
        for name, s in ok.items():
            for b in s.get("batches", []):
                batches.append({**b, "index": ids[(name, b["index"])], "start_s": b["start_s"] + offsets[name],
                                "child_index": b["index"]})
            for r in s.get("requests", []):
                requests.append({**r, "batch": ids.get((name, r["batch"])) if r.get("batch") is not None else None})
            _add_numbers(totals, s.get("totals") or {})
            mem = s.get("memory") or {}
            _add_numbers(memory, mem)
            if "error" in mem:
                memory[f"error:{name}"] = mem["error"]
            queued.update(s.get("queued") or {})
            running += int(s.get("running") or 0)
        batches.sort(key=lambda b: b["index"])
        memory["fast_budget_bytes"] = int(self.split["fast_budget_bytes"])
        memory["per_child_fast_budget_bytes"] = int(self.split["per_child_fast_budget_bytes"])
        config = next((s.get("config") for s in ok.values()), None)
        out = {
            "config": config,
            "models": self.models,
            # every child keeps its own model active; the latest batch's is the one a window starts after
            "active_model": batches[-1]["model"] if batches else None,
            "queued": queued,
            "running": running,
            "totals": totals,
            "batches": batches,
            "requests": requests,
            "backend": "partition",
            "process": self._front_process(),
            "memory": memory,
            "partition": {**self.split, "children": per_child},
        }
        return _json_response(200, out)

    # -- generation ----------------------------------------------------------------------------------------
    async def forward_generation(self, request: Any) -> Any:
        from moecap.engine.server import ApiError, read_body

        if self._shutting_down:
            raise ApiError(503, "the server is shutting down")
        raw, body = await read_body(request, self.max_request_bytes)
        child = self._check_model(body.get("model"))
        return await self._forward(request, child, raw)

    async def _forward(self, request: Any, child: _Child, raw: bytes) -> Any:
        """POST ``raw`` to the same path of ``child``; relay its answer (JSON whole, SSE as it arrives)."""
        import aiohttp
        from aiohttp import web

        from moecap.engine.server import _SSE_HEADERS, _sse

        if not child.alive():
            raise self._down(child)
        headers = {"Authorization": f"Bearer {self._key}", "Content-Type": "application/json"}
        try:
            upstream = await self._session.post(child.url + request.path, data=raw, headers=headers)
        except (aiohttp.ClientError, asyncio.TimeoutError) as err:
            raise self._down(child, f"{type(err).__name__}: {err}") from None
        try:
            ctype = upstream.headers.get("Content-Type", "application/json")
            if "text/event-stream" not in ctype:
                try:
                    payload = await upstream.read()
                except (aiohttp.ClientError, asyncio.TimeoutError) as err:
                    raise self._down(child, f"{type(err).__name__}: {err}") from None
                return web.Response(status=upstream.status, body=payload, headers={"Content-Type": ctype})
            resp = web.StreamResponse(status=upstream.status, headers=_SSE_HEADERS)
            await resp.prepare(request)
            tail, why = b"", None
            try:
                async for chunk in upstream.content.iter_any():
                    await resp.write(chunk)
                    tail = (tail + chunk)[-len(_DONE):]
            except (aiohttp.ClientError, asyncio.TimeoutError) as err:  # the child went away mid-stream
                why = f"{type(err).__name__}: {err}"
            if why is not None or tail != _DONE:  # cut off (a complete stream ends with [DONE])
                for _ in range(20):  # the child's exit, if that is what cut it, says more than the socket
                    if not child.alive():
                        break
                    await asyncio.sleep(0.01)
                err_obj = self._down(child, why or "the stream ended without [DONE]")
                await resp.write((b"" if tail.endswith(b"\n\n") else b"\n\n") + _sse(err_obj.body()) + _sse("[DONE]"))
            await resp.write_eof()
            return resp
        finally:
            upstream.close()  # a client that went away: the child sees its connection close and stops the row


# -- the front ---------------------------------------------------------------------------------------------

def serve_partition(models: dict[str, str], host: str = "127.0.0.1", port: int = 8000, max_batch_size: int = 8,
                    max_wait_s: float | None = 2.0, max_consecutive_batches: int | None = 4, device: str = "auto",
                    dtype: str = "auto", api_key: str | None = None, max_request_bytes: int | None = None,
                    fast_budget_gb: float | None = None, max_model_len: int | None = None,
                    child_start_timeout_s: float = CHILD_START_TIMEOUT_S, **other: Any) -> int:
    """``moecap serve MODEL... --backend partition``: start one child server per model, route to them until
    SIGTERM/SIGINT, stop them; return the exit status (2 when the partition cannot start). ``other``: options
    of other backends, an error when set."""
    from aiohttp import web

    from moecap.engine.server import (DEFAULT_MAX_REQUEST_BYTES, SHUTDOWN_TIMEOUT_S, _host_port, _listen,
                                      _raise_interrupt)

    unknown = sorted(k for k, v in other.items() if v is not None)
    if unknown:
        print(f"moecap serve: the partition backend does not take option(s) {', '.join(unknown)}", file=sys.stderr)
        return 2
    if not models:
        print("moecap serve: no models to serve", file=sys.stderr)
        return 2
    if fast_budget_gb is None:
        print("moecap serve: the partition backend needs --fast-budget-gb (the device memory the children share)",
              file=sys.stderr)
        return 2
    if not fast_budget_gb > 0:
        print("moecap serve: --fast-budget-gb must be > 0", file=sys.stderr)
        return 2
    max_request_bytes = DEFAULT_MAX_REQUEST_BYTES if max_request_bytes is None else int(max_request_bytes)
    sock = _listen(host, port, api_key, max_request_bytes)
    if sock is None:
        return 2
    actual = sock.getsockname()[1]
    n = len(models)
    total, threads, cpu_sets = cpu_share(n)
    share = fast_budget_gb * 1e9 / n
    split = {"fast_budget_bytes": fast_budget_gb * 1e9, "per_child_fast_budget_bytes": share, "children_n": n,
             "threads_total": total, "threads_per_child": threads, "cpus_pinned": cpu_sets is not None}
    key = secrets.token_urlsafe(32)
    children = [_Child(name, str(source), i) for i, (name, source) in enumerate(models.items())]
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_interrupt) if main else None
    try:
        t0 = time.perf_counter()
        print(f"moecap serve: starting {n} partition child server(s) ({share / 1e9:g} GB of fast memory and "
              f"{threads} thread(s) each{', own CPUs' if cpu_sets else ''}): "
              + ", ".join(f"{k}={v}" for k, v in models.items()), flush=True)
        from moecap.models import local_path_for

        for child in children:  # embedded names are built here, once, not by N children at once
            try:
                child.source = str(local_path_for(child.source))
            except Exception as err:
                raise PartitionError(f"could not resolve model {child.name!r} ({child.source}): "
                                     f"{type(err).__name__}: {err}") from err
        opts = {"share_gb": share / 1e9, "device": device, "dtype": dtype, "max_batch_size": max_batch_size,
                "max_wait_s": max_wait_s, "max_consecutive_batches": max_consecutive_batches,
                "max_request_bytes": max_request_bytes, "max_model_len": max_model_len}
        for child in children:
            child.threads = threads
            child.cpus = cpu_sets[child.index] if cpu_sets else None
            _spawn(child, key, opts, n)
        _wait_ready(children, key, child_start_timeout_s)
        if main:
            signal.signal(signal.SIGTERM, previous)
            previous = None
        router = PartitionRouter(children, key, api_key, max_request_bytes, split)
        print(f"moecap serve: {', '.join(router.models)} in {n} partition(s) ("
              + ", ".join(f"{c.name}: pid {c.pid}, 127.0.0.1:{c.port}" for c in children)
              + f") started in {time.perf_counter() - t0:.1f} s; listening on http://{_host_port(host, actual)}"
              + (" (API key required)" if router.requires_api_key else ""), flush=True)
        web.run_app(router.app(), sock=sock, print=None, access_log=None, handler_cancellation=True,
                    shutdown_timeout=SHUTDOWN_TIMEOUT_S)
    except PartitionError as err:
        print(f"moecap serve: {err}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("moecap serve: interrupted while starting the partition", file=sys.stderr)
        return 130
    finally:
        if main and previous is not None:
            signal.signal(signal.SIGTERM, previous)
        stop_children(children)
        sock.close()
    print("moecap serve: stopped", flush=True)
    return 0


# -- a child ---------------------------------------------------------------------------------------------

def _die_with_parent(parent_pid: int) -> None:
    """End this process when ``parent_pid`` (the front) does, however it ends: the kernel's parent-death
    signal on Linux, and a thread that watches the parent pid (any platform, and the front's SIGKILL
    between our start and the prctl call)."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watch, name="moecap-partition-watchdog", daemon=True).start()


def _none_or(kind: Any) -> Any:
    def parse(text: str) -> Any:
        return None if text.lower() == "none" else kind(text)

    return parse


def child_main(argv: list[str] | None = None) -> int:
    """One partition child: serve one model on the socket the front handed over (``--fd``) with this
    process's share of threads and memory. Started by :func:`serve_partition`, not by hand."""
    p = argparse.ArgumentParser(prog="python -m moecap.engine.partition",
                                description="one child server of moecap serve --backend partition")
    p.add_argument("--name", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--fd", type=int, required=True, help="the listening socket, inherited from the front")
    p.add_argument("--parent-pid", type=int, required=True)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--cpus", default="", help="comma-separated CPUs to run on (empty: any)")
    p.add_argument("--fast-budget-gb", type=float, required=True)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--max-wait-s", type=_none_or(float), default=2.0)
    p.add_argument("--max-consecutive-batches", type=_none_or(int), default=4)
    p.add_argument("--max-request-bytes", type=int, default=None)
    args = p.parse_args(argv)
    _die_with_parent(args.parent_pid)
    key = os.environ.pop(CHILD_KEY_ENV, None)
    if not key:
        print(f"moecap partition child: no internal key in ${CHILD_KEY_ENV}", file=sys.stderr)
        return 2
    sock = socket.socket(fileno=args.fd)
    sock.setblocking(False)
    cpus = [int(c) for c in args.cpus.split(",") if c.strip()]
    if cpus and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cpus)  # before torch starts its thread pools
    import torch

    torch.set_num_threads(max(1, args.threads))
    from moecap.engine.server import DEFAULT_MAX_REQUEST_BYTES, serve

    info = {"pid": os.getpid(), "role": "partition-child", "name": args.name, "parent_pid": os.getppid(),
            "torch_threads": torch.get_num_threads(),
            "cpus": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "fast_budget_bytes": int(args.fast_budget_gb * 1e9),
            **{var.lower(): os.environ.get(var) for var in (*THREAD_ENV, MPS_PERCENT_ENV)}}
    return serve({args.name: args.model}, host="127.0.0.1", port=sock.getsockname()[1], backend="partition",
                 max_batch_size=args.max_batch_size, max_wait_s=args.max_wait_s,
                 max_consecutive_batches=args.max_consecutive_batches, device=args.device, dtype=args.dtype,
                 api_key=key, max_request_bytes=args.max_request_bytes or DEFAULT_MAX_REQUEST_BYTES, sock=sock,
                 process_info=info, fast_budget_gb=args.fast_budget_gb, max_model_len=args.max_model_len)


if __name__ == "__main__":
    sys.exit(child_main())
