"""The ``moecap-serve`` runner: our engine's HTTP server (``moecap serve``), launched, benchmarked over its
OpenAI-compatible API like any other server, and stopped.

It serves one model, or several fine-tuned children of one base side by side with one of the server's
backends (``separate``, ``consolidated``, ``partition``; see :mod:`moecap.engine.multi_backends`). With a
multi-model workload (``models: {child: share}``) each request picks its child, so the record's
``per_model`` section holds each child's turnaround (E2E latency), TTFT and throughput on the same trace.

What only this server can tell a client is added to the record as ``report.server``: from its ``/stats``
over the measured window (after the warm-up requests; the runner keeps the raw batches, and
``metrics.serving.server_window`` computes the figures), the batches the scheduler ran (sizes, per
model), the model switches and the time each one took (the consolidated backend swaps a child's
non-expert layers; the others switch for free), the prefill and decode time, and the backend's memory
(pooled expert bytes, fast/host tiers).

Quality (perplexity, lm-eval) is measured through the server too (echo + logprobs scoring), once per
served model of a multi-model workload: the figures are those of exactly what was served.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.request
from typing import Any

from moecap.runners.base import RunTrace
from moecap.runners.openai_runner import ServedRunner


def _get_json(url: str, headers: dict[str, str] | None = None, timeout_s: float = 30) -> Any:
    req = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        return json.loads(resp.read())


def server_window(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """The raw record of what the scheduler did between two ``/stats`` snapshots: the batches it ran in
    between, the model active before them, the backend and its memory (``metrics.serving.server_window``
    turns it into the record's figures)."""
    first = max((b["index"] for b in before.get("batches", [])), default=-1)
    return {
        "backend": after.get("backend"),
        "config": after.get("config"),
        "memory": after.get("memory"),
        "previous_model": next((b["model"] for b in reversed(before.get("batches", []))), before.get("active_model")),
        "batches": [b for b in after.get("batches", []) if b["index"] > first],
    }


class MoecapServeRunner(ServedRunner):
    name = "moecap-serve"
    score_max_tokens = 0  # our server scores a prompt without generating

    def server_prompt_cache(self) -> str:
        return "none (moecap serve keeps no prompt cache)"

    def served_specs(self, model: Any) -> list[str]:
        if self.args.serve:
            return list(self.args.serve)
        if self.args.models:
            return list(self.args.models)
        # one model, served under a plain name (a path is no model name)
        self.served_model = self.args.model or model.display_name.replace("/", "--")
        return [f"{self.served_model}={self.model_argument(model)}"]

    def load(self, model: Any) -> None:
        self._model = model
        super().load(model)
        self._get_tokenizer()  # the quality API reads runner.tokenizer

    def server_command(self, model_arg: str) -> list[str]:
        a = self.args
        device = a.device or getattr(self.hardware, "device", None) or "auto"
        cmd = [sys.executable, "-m", "moecap", "serve", *self.served_specs(self._model), "--backend", a.backend,
               "--host", a.host, "--port", str(self.port), "--device", device, "--dtype", a.dtype,
               "--max-batch-size", str(a.max_batch_size), "--max-wait-s", str(a.max_wait_s),
               "--max-consecutive-batches", str(a.max_consecutive_batches)]
        for flag, value in (("--base", a.base), ("--threshold", a.threshold),
                            ("--consolidation-plan", a.consolidation_plan), ("--shared", a.shared),
                            ("--fast-budget-gb", a.fast_budget_gb), ("--max-model-len", a.max_model_len)):
            if value is not None:
                cmd += [flag, str(value)]
        return cmd

    def ready_path(self) -> str:
        return "/health"

    def server_env(self) -> dict[str, str] | None:
        """The server requires the runner's ``api_key`` if it has one (through the environment, never
        argv), and no key from the user's shell otherwise."""
        env = {**os.environ, **{k: str(v) for k, v in (self.args.env or {}).items()}}
        env.pop("MOECAP_API_KEY", None)  # moecap serve's key variable (moecap.engine.server.API_KEY_ENV)
        key = self._api_key()
        if key:
            env["MOECAP_API_KEY"] = key
        return env

    def on_server_ready(self) -> None:
        served = [c["id"] for c in _get_json(self.base_url + "/v1/models", self._auth())["data"]]
        wanted = list(self.args.models or []) or [self.served_model]
        missing = [m for m in wanted if m not in served]
        if missing:
            raise ValueError(f"runner {self.name}: the server serves {served}, not {missing} "
                             "(runner args models / model must name served models)")

    def storage_bytes(self) -> tuple[float | None, float]:
        """Bytes per weight and per KV element: the dtype's (float32 on a CPU, bfloat16 on a GPU for auto)."""
        if self.args.weight_bytes_per_param:
            return self.args.weight_bytes_per_param, self.args.kv_bytes_per_elem
        dtype = self.args.dtype
        if dtype == "auto":
            dtype = "float32" if self.device_name() == "cpu" else "bfloat16"
        size = 4.0 if dtype == "float32" else 2.0
        return size, size

    def on_measure(self) -> None:
        self._before = _get_json(self.base_url + "/stats", self._auth())  # after the warm-up: the window starts here

    def run(self, workload: Any, load: Any) -> RunTrace:
        self._before = None
        trace = super().run(workload, load)
        try:
            if self._before is None:
                raise RuntimeError("no /stats snapshot at the start of the measured window")
            trace.extra["server"] = server_window(self._before, _get_json(self.base_url + "/stats", self._auth()))
        except Exception as err:  # the figures above stand without the server's own
            trace.extra["server"] = {"available": False, "reason": f"{type(err).__name__}: {err}"}
        return trace

    def compute_dtype(self) -> str:
        dtype = self.args.dtype
        if dtype == "auto":
            return "float32" if self.device_name() == "cpu" else "bfloat16"
        return dtype
