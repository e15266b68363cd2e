"""Runners for the executor tests, named in suites by import path (``moecap_test_runners:FakeRunner``,
with ``tests/`` on ``PYTHONPATH``). They need no model and no torch: each cell returns a small trace of
fake requests, unless its arguments make it misbehave on purpose for one load:

* ``crash_on``: the worker process exits at once (``os._exit(1)``), as a segfault or an OOM kill would;
* ``hang_on``: it sleeps for an hour, with a child process in its process group (both must be killed);
* ``fail_on``: it raises (an application error: a failed record, not a dead worker);
* ``gate_on`` + ``gate``: it waits until the file ``gate`` exists (an interrupt lands meanwhile).

Loads are named by their batch size. Every attempt at a cell appends ``pid`` to
``<marks>/<workload>__bs<N>`` first, so a test can count how often each cell ran and in which process.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from moecap.runners.args import RunnerArgs
from moecap.runners.base import RequestTrace, Runner, RunTrace


class FakeArgs(RunnerArgs):
    marks: str
    crash_on: list[int] = []
    hang_on: list[int] = []
    fail_on: list[int] = []
    gate_on: list[int] = []
    gate: str | None = None
    sleep_s: float = 0.0


class FakeRunner(Runner):
    """A runner that serves fake requests (no model), or crashes, hangs or fails on purpose."""

    name = "fake"
    args_model = FakeArgs
    loads = ("batch",)

    def load(self, model) -> None:
        self.model = model

    def run(self, workload, load) -> RunTrace:
        args: FakeArgs = self.args
        bs = load.batch_size
        marks = Path(args.marks)
        marks.mkdir(parents=True, exist_ok=True)
        with open(marks / f"{workload.display_name}__bs{bs}", "a") as fh:
            fh.write(f"{os.getpid()}\n")
        if bs in args.crash_on:
            os._exit(1)
        if bs in args.hang_on:
            child = subprocess.Popen(["sleep", "3600"])
            (marks / f"{workload.display_name}__bs{bs}.child").write_text(str(child.pid))
            time.sleep(3600)
        if bs in args.fail_on:
            raise RuntimeError(f"fake failure at batch size {bs}")
        if bs in args.gate_on:
            while not (args.gate and os.path.exists(args.gate)):
                time.sleep(0.05)
        if args.sleep_s:
            time.sleep(args.sleep_s)
        t = 0.0
        requests = []
        for i in range(workload.num_prompts):
            times = [t + 0.01 * (k + 1) for k in range(workload.output_tokens)]
            requests.append(RequestTrace(id=i, input_tokens=workload.input_tokens, send_s=t, token_times_s=times))
        return RunTrace(passes=[], requests=requests, model_config={}, moe_layers=[], weight_bytes_per_param=0.0,
                        kv_bytes_per_elem=2.0, kv_cache_expanded_mla=False, compute_dtype="float32", device="cpu")
