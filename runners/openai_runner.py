"""Serving runners over HTTP: an already-running OpenAI-compatible endpoint (``openai``), or a server
command moecap launches and stops itself (``server``).

Prompts are the workload's exact-length token-id lists (``moecap.workload.make_prompts``), sent as
``prompt: [ids]`` to ``/v1/completions`` (vLLM, SGLang and llama.cpp accept them), or decoded to text for
``/v1/chat/completions`` when ``chat``. The load generator (``moecap.runners.loadgen``) drives a max
concurrency (a ``batch_size`` load is taken as that concurrency) or an arrival rate. An HTTP endpoint
exposes no router, so no expert traces, no per-pass timings and no utilization: only client-side
request traces.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from moecap.runners.base import RunTrace, Runner

NO_TRACES = "an HTTP endpoint exposes no router traces"


class OpenAIRunner(Runner):
    name = "openai"
    remote = True  # the endpoint is not on this machine: not metered, priced only when the suite says on what

    def __init__(self, args: Any, hardware: Any):
        super().__init__(args, hardware)
        self.model_id: str | None = None
        self.served_model: str | None = None
        self.local_dir: str | None = None
        self.tokenizer: Any = None
        self._hf_config: dict[str, Any] = {}

    # -- endpoint -------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        return self.args.base_url

    def load(self, model: Any) -> None:
        from moecap.models import local_path_for

        self.model_id = model.id
        self.served_model = self.args.model or model.id
        local = None
        if not model.id.startswith("random:"):
            try:
                path = local_path_for(model.id)
            except Exception:
                path = None
            if path and os.path.isdir(path):
                local = path
        self.local_dir = local
        cfg_file = Path(local) / "config.json" if local else None
        self._hf_config = json.loads(cfg_file.read_text()) if cfg_file and cfg_file.is_file() else {}

    def _get_tokenizer(self) -> Any:
        if self.tokenizer is None:
            src = self.args.tokenizer or self.local_dir
            if src is None and self.model_id and not self.model_id.startswith("random:"):
                src = self.model_id  # a hub id: from the local HF cache or the hub
            if src is None:
                raise ValueError(
                    f"runner {self.name}: prompts need the model's vocabulary; set runner args.tokenizer "
                    "(a tokenizer path or hub id)"
                )
            from transformers import AutoTokenizer

            try:
                self.tokenizer = AutoTokenizer.from_pretrained(src)
            except Exception as err:
                raise ValueError(
                    f"runner {self.name}: cannot load the tokenizer {src!r} ({type(err).__name__}: {err}); "
                    "set runner args.tokenizer"
                ) from err
        return self.tokenizer

    def _prompts(self, workload: Any, salt: int | None = None) -> list[tuple[Any, int]]:
        """(prompt, input tokens the server will see) per request, in workload order; ``salt``: the
        first token of each prompt drawn for it (``moecap.workload.salt_prompts``)."""
        from moecap.workload import make_prompts, make_text_prompts

        tok = self._get_tokenizer()
        special = list(getattr(tok, "all_special_ids", []) or [])
        if self.prompt_format() == "text" and not self.args.chat:
            return make_text_prompts(workload, tok, special, salt=salt)
        prompts = make_prompts(workload, len(tok), tok, special, salt=salt)
        if self.args.chat:  # the chat template adds tokens: the server's usage says how many
            return [(tok.decode(p), None) for p in prompts]
        return [(p, len(p)) for p in prompts]

    def prompt_format(self) -> str:
        """``ids`` (token-id prompts) or ``text``."""
        return self.args.prompt_format

    def _request_models(self, n: int, seed: int) -> list[str]:
        """The served model of each request: the one model, or a seeded draw from ``args.models``."""
        if not self.args.models:
            return [self.served_model] * n
        import numpy as np

        names = list(self.args.models)
        w = np.asarray([self.args.models[k] for k in names], dtype=float)
        rng = np.random.default_rng(seed + 7919)
        return [names[i] for i in rng.choice(len(names), size=n, p=w / w.sum())]

    def server_prompt_cache(self) -> str:
        """What the server was told about its own prompt/prefix cache (engines that launch it say)."""
        return "not controlled (an external server)"

    def prompt_cache_policy(self, salt: int | None) -> dict[str, Any]:
        """How this run kept server caches from serving its prompts: recorded with the cell."""
        return {
            "unique_prompts": salt is not None,
            "salt": salt,
            "warmup_prompts": "distinct from the measured ones",
            "server": self.server_prompt_cache(),
        }

    def on_measure(self) -> None:
        """Called after the warm-up requests, right before the measured window (on a worker thread)."""

    def request_extra(self, workload: Any) -> dict[str, Any]:
        """Engine-specific fields added to every request body."""
        return {}

    def run(self, workload: Any, load: Any) -> RunTrace:
        from moecap.runners.loadgen import run_load

        if self.model_id is None:
            raise RuntimeError(f"runner {self.name}: run() before load()")
        salt = secrets.randbits(31) if self.args.unique_prompts else None
        prompts = self._prompts(workload, salt)
        extra_body = self.request_extra(workload) or None
        targets = self._request_models(len(prompts), workload.seed)
        n_warm = self.args.warmup_requests
        # the warm-up sends prompts of its own (another salt), so it never primes a cache for the
        # measured ones; the measured prompts are the workload's when unique_prompts is off
        warm_items: list[tuple[Any, int | None, str]] = []
        if n_warm:
            warm_salt = (salt if salt is not None else secrets.randbits(31)) ^ 0x5A5A5A5A
            warm = self._prompts(workload, warm_salt)
            warm_items = [(*warm[i % len(warm)], targets[i % len(targets)]) for i in range(n_warm)]
        if load.kind == "rate":
            concurrency, rate = None, load.rate
        else:
            concurrency, rate = (load.concurrency or load.batch_size), None

        async def go() -> list[Any]:
            from moecap.runners.openai_client import make_session, stream_request

            async with make_session(timeout_s=None) as session:
                counter = iter(range(10**12))

                async def send(item: tuple[Any, int | None, str], origin: float) -> Any:
                    prompt, n_in, target = item
                    trace = await stream_request(
                        session, self.base_url, target, prompt, workload.output_tokens,
                        workload.ignore_eos, self.args.chat, extra=extra_body, origin=origin, id=next(counter),
                        input_tokens=n_in, api_key=self._api_key(),
                        timeout_s=self.args.request_timeout_s,
                    )
                    trace.model = target
                    return trace

                return await run_load(
                    [(p, n, m) for (p, n), m in zip(prompts, targets)], send, concurrency=concurrency, rate=rate, arrival=load.arrival,
                    burstiness=load.burstiness, seed=workload.seed, warmup=warm_items,
                    on_measure=self.on_measure,
                )

        traces = asyncio.run(go())
        for i, t in enumerate(traces):  # ids in workload order (warm-up requests took ids too)
            t.id = i
        errors = Counter(t.error for t in traces if t.error)
        extra: dict[str, Any] = {"base_url": self.base_url, "served_model": self.served_model,
                                 "prompt_cache": self.prompt_cache_policy(salt)}
        retried = [t for t in traces if getattr(t, "extra", {}).get("connection_retries")]
        if retried:
            extra["connection_retries"] = {"requests": len(retried),
                                           "retries": sum(t.extra["connection_retries"] for t in retried)}
        if self.args.models:
            extra["models"] = dict(self.args.models)
        if errors:
            extra["errors"] = dict(errors.most_common(20))
        return RunTrace(
            passes=[],
            requests=traces,
            model_config=dict(self._hf_config),
            moe_layers=[],
            weight_bytes_per_param=0.0,
            kv_bytes_per_elem=0.0,
            kv_cache_expanded_mla=False,
            compute_dtype=self.compute_dtype(),
            device=self.device_name(),
            memory={},
            energy={},
            tracing={"traced": False, "reason": NO_TRACES},
            extra=extra,
        )

    def info(self) -> dict[str, Any]:
        out = super().info()
        out.update({"base_url": self.base_url, "served_model": self.served_model})
        return out

    def model_config(self) -> dict[str, Any] | None:
        return dict(self._hf_config) or None

    # -- quality over HTTP: prompt scoring with echo + logprobs --------------------------------
    # The scoring API moecap.quality uses (``tokenizer``, ``max_length``, ``token_nll``,
    # ``loglikelihood_tokens``, ``generate_tokens``), through the completions endpoint as lm-eval's
    # ``local-completions`` model does: ``echo: true`` + ``logprobs`` returns each prompt token's
    # log-probability. Servers that score without generating take ``max_tokens: 0``
    # (``score_max_tokens``); others generate one token, so a scored sequence leaves room for it.
    score_max_tokens = 1
    quality_model: str | None = None  # the served model scored (None: ``served_model``)

    def _auth(self) -> dict[str, str]:
        """The endpoint's bearer token, as the streaming client sends it."""
        key = self._api_key()
        return {"Authorization": f"Bearer {key}"} if key else {}

    def _api_key(self) -> str | None:
        return self.args.api_key.get_secret_value() if self.args.api_key else None

    def quality_models(self) -> list[str]:
        """The served models whose quality a cell measures (several for a multi-model workload)."""
        return list(self.args.models) if self.args.models else [self.served_model]

    @property
    def max_length(self) -> int:
        """The longest scored sequence: the server's ``max_model_len`` less the tokens it must generate."""
        if getattr(self, "_max_model_len", None) is None:
            import urllib.request

            req = urllib.request.Request(f"{self.base_url}/v1/models", headers=self._auth())
            with urllib.request.urlopen(req, timeout=30) as resp:
                cards = json.loads(resp.read())["data"]
            target = self.quality_model or self.served_model
            card = next((c for c in cards if c.get("id") == target), cards[0] if cards else {})
            n = card.get("max_model_len") or self._hf_config.get("max_position_embeddings") or 2048
            self._max_model_len = int(n)
        return self._max_model_len - self.score_max_tokens

    def _score(self, prompts: list[list[int]], batch_size: int, progress: Any,
               top: int = 0) -> list[list[tuple[float, float]]]:
        """Per prompt: (log p(token_t | tokens_<t), best alternative's log-probability) for t >= 1."""
        async def one(session: Any, sem: asyncio.Semaphore, ids: list[int]) -> list[tuple[float, float]]:
            body = {"model": self.quality_model or self.served_model, "prompt": ids, "echo": True,
                    "logprobs": top, "max_tokens": self.score_max_tokens, "temperature": 0.0}
            async with sem, session.post(f"{self.base_url}/v1/completions", json=body, headers=self._auth()) as resp:
                text = await resp.text()
                if resp.status != 200:
                    raise RuntimeError(f"runner {self.name}: scoring request failed: HTTP {resp.status}: {text[:500]}")
            lp = json.loads(text)["choices"][0]["logprobs"]
            values, tops = lp["token_logprobs"][1:len(ids)], (lp.get("top_logprobs") or [])[1:len(ids)]
            if len(values) != len(ids) - 1 or any(v is None for v in values):
                raise RuntimeError(f"runner {self.name}: the server returned no log-probabilities for the prompt "
                                   "(does it support echo with logprobs?)")
            best = [max((t or {}).values(), default=v) for v, t in zip(values, tops + [None] * len(values))]
            if progress is not None:
                progress.update(1)
            return [(float(v), float(b)) for v, b in zip(values, best)]

        async def go() -> list[list[tuple[float, float]]]:
            from moecap.runners.openai_client import make_session

            sem = asyncio.Semaphore(max(1, batch_size))
            async with make_session(timeout_s=self.args.request_timeout_s) as session:
                return list(await asyncio.gather(*[one(session, sem, p) for p in prompts]))

        return asyncio.run(go())

    def token_nll(self, windows: list[list[int]], batch_size: int = 8, progress: Any = None) -> list[tuple[float, int]]:
        """Per window: (sum of -log p(token_t | tokens_<t) over t >= 1, number of predicted tokens)."""
        return [(-sum(v for v, _ in s), len(s)) for s in self._score(windows, batch_size, progress)]

    def loglikelihood_tokens(self, requests: list[tuple[list[int], list[int]]], batch_size: int = 8,
                             progress: Any = None) -> list[tuple[float, bool]]:
        """Per (context, continuation): log p(continuation | context) and whether greedy decoding would
        produce it (each continuation token is the most likely one). Cut from the left to max_length."""
        seqs = [(ctx + cont)[-self.max_length:] for ctx, cont in requests]
        scored = self._score(seqs, batch_size, progress, top=1)
        out = []
        for (_, cont), s in zip(requests, scored):
            span = s[-len(cont):]
            out.append((sum(v for v, _ in span), all(v >= b - 1e-6 for v, b in span)))
        return out

    def generate_tokens(self, prompt: list[int], max_new_tokens: int, stop: Any = None) -> list[int]:
        """Greedy continuation of one prompt (the server stops at EOS); ``stop(tokens)`` cuts it after."""
        import urllib.request

        prompt = prompt[-max(1, self.max_length + self.score_max_tokens - max_new_tokens):]
        body = {"model": self.quality_model or self.served_model, "prompt": prompt, "max_tokens": max_new_tokens,
                "temperature": 0.0, "return_token_ids": True}
        req = urllib.request.Request(f"{self.base_url}/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json", **self._auth()})
        with urllib.request.urlopen(req, timeout=self.args.request_timeout_s) as resp:
            choice = json.loads(resp.read())["choices"][0]
        ids = choice.get("token_ids")
        if ids is None:
            raise RuntimeError(f"runner {self.name}: the server returned no token_ids (return_token_ids unsupported)")
        eos = getattr(self._get_tokenizer(), "eos_token_id", None)
        if ids and choice.get("finish_reason") == "stop" and ids[-1] == eos:
            ids = ids[:-1]
        if stop is not None:
            for i in range(1, len(ids) + 1):
                if stop(ids[:i]):
                    return ids[:i]
        return ids


class ServedRunner(OpenAIRunner):
    """Launches ``args.command`` (``{port}``, ``{model}`` substituted) as a ``ServerProcess`` in ``load()``,
    waits for ``ready_path``, benchmarks it like ``openai``; ``close()`` stops the whole process group."""

    name = "server"
    remote = False

    def server_prompt_cache(self) -> str:
        return "not controlled (the suite's command runs as given)"

    def __init__(self, args: Any, hardware: Any):
        from moecap.hardware import detect_hardware

        super().__init__(args, hardware)
        self.server: Any = None
        self.port: int | None = None
        self.log_path: str | None = None
        self.startup_s: float | None = None
        self._log_offset = 0
        # the server runs here, on the device the suite names: meter it, price it, take its peaks
        hw = detect_hardware(getattr(hardware, "device", "auto") or "auto")
        self._device = "cpu" if hw.accelerator == "cpu" else f"cuda:{hw.device_index}"

    @property
    def base_url(self) -> str:
        return f"http://{self.args.host}:{self.port}"

    def device_name(self) -> str:
        return self._device

    # -- what subclasses (one per engine) provide --------------------------------------------
    def model_argument(self, model: Any) -> str:
        """What the server command is given as its model: the local directory, else the id."""
        from moecap.models import local_path_for

        if self.local_dir:
            return self.local_dir
        return model.id if model.id.startswith("random:") else str(local_path_for(model.id))

    def server_command(self, model_arg: str) -> list[str]:
        import sys

        subs = {"{port}": str(self.port), "{host}": self.args.host, "{model}": model_arg, "{python}": sys.executable}
        out = []
        for c in self.args.command:
            for k, v in subs.items():
                c = c.replace(k, v)
            out.append(c)
        return out

    def ready_path(self) -> str:
        return self.args.ready_path

    def server_env(self) -> dict[str, str] | None:
        if not self.args.env:
            return None
        return {**os.environ, **{k: str(v) for k, v in self.args.env.items()}}

    def on_server_ready(self) -> None:
        """Called once the server answers (e.g. to start an engine's own recording)."""

    def log_artifacts(self) -> dict[str, str]:
        """The server's log since the last call: each cell's record gets the part written while it ran
        (the first one also the start-up)."""
        if not self.log_path:
            return {}
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(self._log_offset)
                data = fh.read()
        except OSError:
            return {}
        self._log_offset += len(data)
        if not data:
            return {}
        from moecap.redact import scrub, secret_values

        secrets_ = secret_values(self.args.model_dump()) | secret_values(self.args.env or {})
        return {"server.log": scrub(data.decode("utf-8", errors="replace"), secrets_)}

    def storage_bytes(self) -> tuple[float | None, float]:
        """(bytes per weight, bytes per KV element) as the server stores them; None: unknown."""
        return self.args.weight_bytes_per_param, self.args.kv_bytes_per_elem

    # -- lifecycle ---------------------------------------------------------------------------
    def load(self, model: Any) -> None:
        from moecap.runners.server import ServerProcess, free_port, listeners, port_in_use

        super().load(model)
        self.port = self.args.port or free_port(self.args.host)
        if self.args.port and port_in_use(self.args.host, self.port):
            holders = listeners(self.port)
            raise RuntimeError(
                f"runner {self.name}: port {self.port} on {self.args.host} is already in use"
                + (f" (pid {', '.join(map(str, holders))})" if holders else "")
                + ": moecap would measure whatever answers there; set another runners[].args.port, or leave "
                "it unset for a free one")
        cmd = self.server_command(self.model_argument(model))
        fd, self.log_path = tempfile.mkstemp(prefix=f"moecap-{self.name}-{self.port}-", suffix=".log")
        os.close(fd)
        self._log_offset = 0
        self.close()
        self.server = ServerProcess(cmd, self.log_path, env=self.server_env()).start()
        try:
            self.startup_s = self.server.wait_ready(self.base_url + self.ready_path(), self.args.startup_timeout_s)
            self.server.check_owns(self.port)  # the process answering is the one we started
            self.on_server_ready()
        except BaseException:
            self.close()
            raise

    def run(self, workload: Any, load: Any) -> RunTrace:
        """As ``openai``, with energy and peak memory of the server's processes over the measured window."""
        from moecap.energy import EnergyTracker

        # the server's own processes (not the guard that leads its group), with their descendants
        tracker = EnergyTracker(self._device, pids=self.server.server_pids() or [self.server.pid],
                                include_self=False).start()
        try:
            trace = super().run(workload, load)
        finally:
            energy = tracker.stop()
        trace.energy = energy
        trace.devices = self.world_size() if hasattr(self, "world_size") else 1
        w, kv = self.storage_bytes()
        if w:
            trace.weight_bytes_per_param, trace.kv_bytes_per_elem = float(w), float(kv)
        trace.memory = {
            k: energy[k]
            for k in ("host_rss_peak_bytes", "device_memory_peak_bytes", "process_device_memory_peak_bytes")
            if energy.get(k)
        }
        return trace

    def close(self) -> None:
        if self.server is not None:
            self.server.stop(self.args.stop_timeout_s)
            self.server = None

    def info(self) -> dict[str, Any]:
        out = super().info()
        out.update({"server_log": self.log_path, "server_startup_s": self.startup_s,
                    "server_command": self.server.cmd if self.server is not None else None,
                    "server_pid": (self.server.server_pids() or [None])[0] if self.server is not None else None,
                    "server_group": self.server.pgid if self.server is not None else None})
        return out
