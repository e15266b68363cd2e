"""vLLM as a served backend: ``vllm serve`` launched by moecap on the suite's model, benchmarked over its
OpenAI-compatible API like every other server, and stopped (its whole process group) afterwards.

- The model: a local Hugging Face directory (embedded models and local paths) or a hub id (vLLM loads it
  from the Hugging Face cache or the hub); ``random:`` models have no checkpoint and are refused.
- Requests: the workload's exact-length token-id prompts as ``prompt: [ids]`` on ``/v1/completions``;
  ``ignore_eos`` is a native vLLM sampling parameter (the client already sends it).
- Device: the suite's hardware device (a GPU). With ``cuda:N`` and a one-GPU server moecap sets
  ``CUDA_VISIBLE_DEVICES`` so that the server runs on the device it meters; a multi-GPU server gets the
  visible devices as they are (set ``env.CUDA_VISIBLE_DEVICES`` to choose them).

Flags, and where their spelling was checked (vLLM's CLI of late 2025 / early 2026):

- ``vllm serve <model>`` (positional model), ``--served-model-name``, ``--host``, ``--port``, ``--dtype``,
  ``--tensor-parallel-size``, ``--pipeline-parallel-size``, ``--max-model-len``, ``--max-num-seqs``,
  ``--max-num-batched-tokens``, ``--gpu-memory-utilization``, ``--kv-cache-dtype``, ``--quantization``,
  ``--enforce-eager``, ``--seed``, ``--trust-remote-code``, ``--revision``: vLLM's engine-argument reference
  (docs.vllm.ai "Engine Arguments") and ``vllm/engine/arg_utils.py``.
- ``--data-parallel-size`` and ``--enable-expert-parallel``: docs.vllm.ai "Expert Parallel Deployment"
  (v0.10 to v0.12: "Enable EP by setting the --enable-expert-parallel flag"; ``vllm serve ...
  --data-parallel-size N --enable-expert-parallel``).
- ``--no-enable-prefix-caching``: the boolean-optional form of ``--enable-prefix-caching``; vLLM V1 turns
  prefix caching on by default, so turning it off must be said (used this way across vLLM's own tests and
  benchmarks).
- Not passed: ``--disable-log-requests``. It was deprecated in v0.10 for ``--enable-log-requests`` (off by
  default) and removed in v0.12.0 (``AsyncEngineArgs.disable_log_requests`` in v0.10.1.1:
  "This will be removed in v0.12.0"), so passing it would break current vLLM.
- Readiness: ``GET /health`` answers 200 once the engine is up (``vllm/entrypoints/openai/api_server.py``;
  NVIDIA NeMo Evaluator's vLLM deployment docs use ``health: /health``).

Expert routing: vLLM offers nothing a streaming benchmark can read, so this runner records none and says
so in every record (``tracing.reason``); with the HF config known, decode S-MBU/S-MFU are estimated from
the streamed timestamps with expert unions from uniform routing (``metrics.serving``). What vLLM has:

- EPLB (``--enable-eplb``, ``--eplb-config '{"log_balancedness": true}'``; ``EPLBConfig`` in
  ``vllm/config/parallel.py``, v0.10.2 to v0.24): with expert parallelism the engine keeps a window of
  per-expert loads for rebalancing and can log a balancedness figure; no endpoint returns the counts.
- ``--enable-return-routed-experts`` (vllm-project/vllm#28284, merged January 2026; docs "Routed Experts
  Replay"): the expert ids each MoE layer chose for every token, in the response body (``routed_experts``,
  ``prompt_routed_experts``), for RL routing replay. Only non-streaming responses carry them, their encoding
  changed between releases (JSON lists, then base64 ``.npy``), and the newest form requires prefix caching
  and Model Runner V2. moecap streams every request to time each token, so using it would change what is
  measured; ``record_experts`` is therefore refused for vLLM (see ``VLLMRunnerArgs``).

``EngineServedRunner`` below is what the vLLM and SGLang runners share (launcher, device, storage precision,
record); ``moecap.runners.sglang`` builds on it.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from moecap.runners.base import RunTrace
from moecap.runners.openai_runner import ServedRunner

VLLM_NO_TRACES = (
    "vLLM exposes no expert-routing statistics to a streaming client (EPLB load is only logged; "
    "--enable-return-routed-experts rides on non-streaming responses)"
)

_DTYPE_BYTES = {"bfloat16": 2.0, "float16": 2.0, "float32": 4.0}


def resolve_program(name: str) -> str:
    """A bare program name as the server launcher: the one beside moecap's own interpreter (its
    environment's ``bin/``, where ``pip install vllm`` puts ``vllm``) if there is one, else the first on
    ``PATH``, else the name unchanged (the launch then fails with the server's own error). A path stays."""
    if os.sep in name or (os.altsep and os.altsep in name):
        return name
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which(name) or name


def pinned_gpu(device: str | None, world_size: int, env_overrides: dict[str, str],
               environ: dict[str, str] | os._Environ) -> str | None:
    """``CUDA_VISIBLE_DEVICES`` for a one-GPU server that the suite puts on ``cuda:N`` (None: leave the
    environment as it is: another device spec, a multi-GPU server, or the user chose in ``env``).
    ``N`` counts the devices moecap itself sees, so an inherited ``CUDA_VISIBLE_DEVICES`` list is indexed."""
    if not device or not device.startswith("cuda:") or world_size != 1 or "CUDA_VISIBLE_DEVICES" in env_overrides:
        return None
    index = int(device.split(":", 1)[1])
    visible = [d.strip() for d in (environ.get("CUDA_VISIBLE_DEVICES") or "").split(",") if d.strip()]
    if visible:
        return visible[index] if index < len(visible) else None
    return str(index)


def kv_bytes_for(kv_cache_dtype: str | None, activation_bytes: float | None) -> float | None:
    """Bytes per KV-cache element for an engine's ``kv_cache_dtype`` (None: unknown)."""
    name = (kv_cache_dtype or "auto").lower()
    if name == "auto":
        return activation_bytes
    if name.startswith("fp8"):
        return 1.0
    if name in ("bf16", "bfloat16", "fp16", "float16", "half"):
        return 2.0
    if name in ("fp32", "float32", "float"):
        return 4.0
    return None  # fp4 and other packed formats: scales make it more than a nominal size


def cached_hub_config(model_id: str, revision: str | None = None) -> dict[str, Any]:
    """A hub model's ``config.json`` from the local Hugging Face cache (nothing is downloaded); {}: absent."""
    try:
        from huggingface_hub import try_to_load_from_cache

        path = try_to_load_from_cache(model_id, "config.json", revision=revision)
        if isinstance(path, str) and os.path.isfile(path):
            with open(path, encoding="utf-8") as fh:
                cfg = json.load(fh)
            return cfg if isinstance(cfg, dict) else {}
    except Exception:
        pass
    return {}


class EngineServedRunner(ServedRunner):
    """A serving engine's own OpenAI-compatible server (vLLM, SGLang) launched with real engine flags."""

    engine = "?"  # the engine's Python distribution name

    def __init__(self, args: Any, hardware: Any):
        super().__init__(args, hardware)
        self.model_cfg: Any = None

    # -- what each engine provides -------------------------------------------------------------
    def world_size(self) -> int:
        """GPUs the server takes."""
        return 1

    # -- shared --------------------------------------------------------------------------------
    def model_argument(self, model: Any) -> str:
        if model.id.startswith("random:"):
            raise ValueError(
                f"runner {self.name}: model {model.id!r} has random weights and no checkpoint; {self.engine} "
                "loads a checkpoint: give a local model directory, an embedded model or a hub id"
            )
        self.model_cfg = model
        return super().model_argument(model)

    def load(self, model: Any) -> None:
        super().load(model)
        if not self._hf_config and not model.id.startswith("random:"):
            # a hub id the engine loads itself: its config from the local Hugging Face cache, when there
            self._hf_config = cached_hub_config(model.id, getattr(model, "revision", None))

    def launcher_argv(self) -> list[str]:
        argv = list(self.args.launcher)
        argv[0] = resolve_program(argv[0])
        return argv

    def model_flags(self) -> list[str]:
        """``--trust-remote-code`` / ``--revision`` from the runner args and the suite's model entry."""
        out: list[str] = []
        if self.args.trust_remote_code or getattr(self.model_cfg, "trust_remote_code", False):
            out.append("--trust-remote-code")
        revision = getattr(self.model_cfg, "revision", None)
        if revision:
            out += ["--revision", str(revision)]
        return out

    def server_env(self) -> dict[str, str] | None:
        env = {**os.environ, **{k: str(v) for k, v in self.args.env.items()}}
        pin = pinned_gpu(getattr(self.hardware, "device", None), self.world_size(), self.args.env, os.environ)
        if pin is not None:
            env["CUDA_VISIBLE_DEVICES"] = pin
        return env

    def ready_path(self) -> str:
        return "/health"

    def resolved_dtype(self) -> str | None:
        """The compute dtype the engine picks: ``args.dtype``, or for ``auto`` the engines' rule (bf16 for
        a bf16 checkpoint, fp16 for an fp16 or fp32 one); None when the checkpoint's dtype is unknown."""
        if self.args.dtype != "auto":
            return self.args.dtype
        cfg = self._hf_config or {}
        text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}
        stored = cfg.get("torch_dtype") or cfg.get("dtype") or text.get("torch_dtype") or text.get("dtype")
        if stored == "bfloat16":
            return "bfloat16"
        if stored in ("float16", "float32", "half", "float"):
            return "float16"
        return None

    def compute_dtype(self) -> str:
        return self.resolved_dtype() or "bfloat16"

    def storage_bytes(self) -> tuple[float | None, float]:
        """Bytes per weight and per KV element as the engine stores them: from ``dtype`` and
        ``kv_cache_dtype`` (weights unknown when quantized), unless the runner args say."""
        a = self.args
        if a.weight_bytes_per_param:
            return a.weight_bytes_per_param, a.kv_bytes_per_elem
        act = _DTYPE_BYTES.get(self.resolved_dtype() or "")
        quantized = bool(a.quantization) or bool((self._hf_config or {}).get("quantization_config"))
        weight = None if quantized else act
        if "kv_bytes_per_elem" in a.model_fields_set:
            return weight, a.kv_bytes_per_elem
        kv = kv_bytes_for(a.kv_cache_dtype, act)
        return weight, kv if kv is not None else a.kv_bytes_per_elem

    def engine_version(self) -> str | None:
        """The engine's version when the launcher runs from moecap's own environment (else unknown)."""
        prog = Path(self.launcher_argv()[0])
        if prog.parent != Path(sys.executable).parent:
            return None
        try:
            from importlib.metadata import version

            return version(self.engine)
        except Exception:
            return None

    def info(self) -> dict[str, Any]:
        out = super().info()
        out.update({"engine": self.engine, "engine_version": self.engine_version(),
                    "launcher": self.launcher_argv()})
        return out


class VLLMRunner(EngineServedRunner):
    name = "vllm"
    engine = "vllm"

    def server_prompt_cache(self) -> str:
        return ("prefix caching on (--enable-prefix-caching)" if self.args.enable_prefix_caching
                else "prefix caching off (--no-enable-prefix-caching)")

    def world_size(self) -> int:
        a = self.args
        return (a.tensor_parallel_size or 1) * (a.pipeline_parallel_size or 1) * (a.data_parallel_size or 1)

    def server_command(self, model_arg: str) -> list[str]:
        a = self.args
        cmd = self.launcher_argv() + [
            model_arg,
            "--served-model-name", self.served_model,
            "--host", a.host, "--port", str(self.port),
            "--dtype", a.dtype,
        ]
        for flag, value in (
            ("--tensor-parallel-size", a.tensor_parallel_size),
            ("--pipeline-parallel-size", a.pipeline_parallel_size),
            ("--data-parallel-size", a.data_parallel_size),
            ("--max-model-len", a.max_model_len),
            ("--max-num-seqs", a.max_num_seqs),
            ("--max-num-batched-tokens", a.max_num_batched_tokens),
            ("--gpu-memory-utilization", a.gpu_memory_utilization),
            ("--kv-cache-dtype", a.kv_cache_dtype),
            ("--quantization", a.quantization),
            ("--seed", a.seed),
        ):
            if value is not None:
                cmd += [flag, str(value)]
        if a.enable_expert_parallel:
            cmd.append("--enable-expert-parallel")
        if a.enforce_eager:
            cmd.append("--enforce-eager")
        # vLLM V1 caches prefixes unless told not to: the boolean-optional flag's --no- form says so
        cmd.append("--enable-prefix-caching" if a.enable_prefix_caching else "--no-enable-prefix-caching")
        cmd += self.model_flags()
        return cmd + list(a.extra_args)

    def run(self, workload: Any, load: Any) -> RunTrace:
        trace = super().run(workload, load)
        trace.tracing = {"traced": False, "source": None, "reason": VLLM_NO_TRACES}
        return trace
