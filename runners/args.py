"""Argument schemas of the runners (pydantic only: importable without torch).

A suite's ``runners[i].args`` is validated against the runner's schema before anything runs.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationInfo, field_validator, model_validator


class RunnerArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")


_DEVICE_RE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")


def _check_device(v: str | None) -> str | None:
    if v is not None and not _DEVICE_RE.match(v):
        raise ValueError(f"device must be one of auto, cpu, cuda, cuda:N; got {v!r}")
    return v


class HFRunnerArgs(RunnerArgs):
    """Hugging Face transformers, in-process."""

    device: str | None = None
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``; unset: the suite's ``hardware.device``."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights and compute dtype; ``auto``: bfloat16 on a GPU, float32 on a CPU."""
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] | None = "sdpa"
    warmup_batches: int = 1
    """Untimed batches run first (same shapes), so that kernel selection and allocation stay out of the figures."""
    trace_experts: bool = True
    """Record, per pass and MoE layer, which experts the router really chose (needed for S-MBU)."""
    num_threads: int | None = None
    """torch intra-op threads on a CPU; unset: torch's default."""

    @field_validator("device")
    @classmethod
    def _device(cls, v: str | None) -> str | None:
        return _check_device(v)

    @field_validator("warmup_batches")
    @classmethod
    def _warmup(cls, v: int) -> int:
        if v < 0:
            raise ValueError("warmup_batches must be >= 0")
        return v


_URL_RE = re.compile(r"^https?://[^\s/]+")


class _ServingArgs(RunnerArgs):
    """What the HTTP serving runners share."""

    model: str | None = None
    """Model id sent in requests (the server's served model name); unset: the suite model's ``id``."""
    tokenizer: str | None = None
    """Tokenizer (local path or hub id) for building prompts; unset: the model's, when it is local."""
    chat: bool = False
    """Send ``/v1/chat/completions`` with text prompts instead of token ids to ``/v1/completions``."""
    api_key: SecretStr | None = None
    """A bearer token for the endpoint; never written to a record (dumps show it masked)."""
    request_timeout_s: float | None = Field(default=600, gt=0)
    warmup_requests: int = Field(default=1, ge=0)
    """Untimed requests sent (and awaited) before the measured window (prompts of their own, never the
    measured ones)."""
    unique_prompts: bool = True
    """Start every prompt of a run with a token drawn for that run (the salt is recorded), so that no
    server cache (llama.cpp's prompt cache, vLLM's or SGLang's prefix cache) serves a prompt from an
    earlier run or from the warm-up; false sends the workload's prompts exactly as they are."""
    prompt_format: Literal["ids", "text"] = "ids"
    """``ids``: token-id prompts of exact length (vLLM, SGLang, llama.cpp's llama-server); ``text``: texts
    that the model's tokenizer encodes to exactly that length (servers that take text only)."""
    models: dict[str, float] | None = None
    """A multi-model (multi-tenant) workload: served model name -> share of the requests, e.g.
    ``{tiny-moe-code: 0.6, tiny-moe-prose: 0.3, tiny-moe-c: 0.1}``; each request draws its model (seeded);
    the record adds per-model latency and throughput (turnaround = E2E latency per request)."""

    @field_validator("models")
    @classmethod
    def _models(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v is not None:
            if not v:
                raise ValueError("models must name at least one served model")
            bad = {k: w for k, w in v.items() if not w > 0}
            if bad:
                raise ValueError(f"models: shares must be > 0; got {bad}")
        return v

    @model_validator(mode="before")
    @classmethod
    def _slo_moved(cls, data: Any) -> Any:
        if isinstance(data, dict) and "slo_ms" in data:
            raise ValueError("slo_ms belongs to the workload now (workloads[i].slo_ms): a changed SLO then "
                             "re-scores the stored requests instead of re-running the cells")
        return data


class OpenAIRunnerArgs(_ServingArgs):
    """An already-running OpenAI-compatible endpoint (vLLM, SGLang, llama.cpp server, ...)."""

    base_url: str
    """``http(s)://host:port`` of the server (no ``/v1``)."""

    @field_validator("base_url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not _URL_RE.match(v):
            raise ValueError(f"base_url must start with http:// or https:// and name a host; got {v!r}")
        return v.rstrip("/").removesuffix("/v1")


class _LaunchArgs(_ServingArgs):
    """What the runners that launch (and always stop) their own server share."""

    host: str = "127.0.0.1"
    port: int | None = Field(default=None, gt=0, lt=65536)
    """Unset: a free port."""
    startup_timeout_s: float = Field(default=600, gt=0)
    """Deadline for the server to answer its readiness probe (loading weights counts)."""
    stop_timeout_s: float = Field(default=15, gt=0)
    """SIGTERM grace before the whole process group is SIGKILLed."""
    env: dict[str, str] = Field(default_factory=dict)
    """Extra environment variables of the server process."""
    weight_bytes_per_param: float | None = Field(default=None, gt=0)
    """Bytes per weight as the server stores them (2 for bf16, 1 for fp8); with it, the record carries
    decode S-MBU/S-MFU estimated from the streamed timestamps. Engine runners that know it set it."""
    kv_bytes_per_elem: float = Field(default=2.0, gt=0)
    """Bytes per KV-cache element (2 for a bf16/fp16 cache, 1 for fp8)."""


class ServedRunnerArgs(_LaunchArgs):
    """A server command moecap launches itself (and always stops), then benchmarks over HTTP."""

    command: list[str] = Field(min_length=1)
    """argv of the server; ``{port}``, ``{host}``, ``{model}`` (the local model path or id) and ``{python}``
    (moecap's own interpreter) are substituted."""
    ready_path: str = "/health"


_BUFT_RE = re.compile(r"^(?P<pattern>.+)=(?P<buft>[A-Za-z0-9_:.\-]+)$")


class LlamaCppRunnerArgs(_LaunchArgs):
    """llama.cpp serving a GGUF file that moecap exports from the suite's Hugging Face model unless ``gguf``
    names one: through llama.cpp's own C++ ``llama-server`` (continuous batching over parallel slots), or,
    as a fallback, llama-cpp-python's server (one request at a time: records say ``serialised``)."""

    server: Literal["auto", "llama-server", "llama-cpp-python"] = "auto"
    """``llama-server``: llama.cpp's C++ server (``server_binary``, ``$MOECAP_LLAMA_SERVER``, moecap's own
    build from ``moecap llamacpp build``, or ``llama-server`` on PATH); ``llama-cpp-python``: its Python
    server, which serves one request at a time; ``auto``: llama-server when one is found, else the Python
    server."""
    server_binary: str | None = None
    """Path of the ``llama-server`` to launch (a release binary, your own build)."""
    parallel: int | None = Field(default=None, ge=1, le=1024)
    """llama-server's parallel slots (``-np``): requests decoded together; unset: llama-server's own
    default. The KV cache is one pool shared by the slots (``--kv-unified``), so every request may use
    the whole context."""
    prompt_format: Literal["ids", "text"] | None = None
    """``ids``: token-id prompts of exactly the workload's length (llama-server takes them); ``text``: texts
    that encode to it (what llama-cpp-python's server needs); unset: ``ids`` on llama-server, else ``text``."""
    gguf: str | None = None
    """An existing GGUF file to serve; unset: export the suite model (cached under ``<cache>/gguf``)."""
    weight_type: Literal["f32", "f16", "bf16", "q8_0", "q4_0"] = "f32"
    """Weight storage of the export (ignored with ``gguf``)."""
    n_ctx: int = Field(default=0, ge=0)
    """Context size; 0: the model's training context."""
    n_gpu_layers: int | None = None
    """Layers offloaded to the GPU (-1: all); unset: all on a GPU device, 0 on a CPU."""
    n_cpu_moe: int = Field(default=0, ge=0)
    """Keep the expert tensors of the first N layers in host memory (llama.cpp's ``--n-cpu-moe``)."""
    override_tensor: list[str] = Field(default_factory=list)
    """llama.cpp tensor buffer overrides, ``REGEX=BUFFER_TYPE`` (``--override-tensor``), e.g.
    ``blk\\.(1[0-9])\\.ffn_.*_exps=CPU``."""
    n_threads: int | None = Field(default=None, ge=1)
    """Decode threads; unset: the server's default."""
    n_threads_batch: int | None = Field(default=None, ge=1)
    n_batch: int = Field(default=512, ge=1)
    n_ubatch: int = Field(default=512, ge=1)
    flash_attn: bool = False
    use_mmap: bool = True
    python: str | None = None
    """Interpreter that has llama-cpp-python (its server only); unset: moecap's own."""
    extra_args: list[str] = Field(default_factory=list)
    """Further flags of the server that runs (``llama-server`` or ``llama_cpp.server``), passed verbatim."""
    verbose: bool = False
    """llama.cpp's own load and timing logs in the server log."""

    @field_validator("override_tensor")
    @classmethod
    def _overrides(cls, v: list[str]) -> list[str]:
        for item in v:
            m = _BUFT_RE.match(item)
            if not m:
                raise ValueError(f"override_tensor entries are REGEX=BUFFER_TYPE (e.g. 'ffn_.*_exps=CPU'); got {item!r}")
            try:
                re.compile(m["pattern"])
            except re.error as err:
                raise ValueError(f"override_tensor {item!r}: bad regular expression ({err})") from None
        return v

    @field_validator("gguf")
    @classmethod
    def _gguf(cls, v: str | None) -> str | None:
        if v is not None and not v.endswith(".gguf"):
            raise ValueError(f"gguf must name a .gguf file; got {v!r}")
        return v


# --------------------------------------------------------------------------------------------------
# vLLM and SGLang, launched by moecap (runners/vllm.py, runners/sglang.py). Each field maps to one engine
# flag whose spelling was checked against the engine's own CLI definition or documentation of late
# 2025 / early 2026; the runner modules list the flags and where each was verified. Unset optional
# fields are not passed, so the engine's own default applies.
# --------------------------------------------------------------------------------------------------

_ENGINE_VALUE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


def _engine_value(field: str, v: str | None) -> str | None:
    """A single engine choice such as ``fp8`` or ``flashinfer``: the engines add choices between releases,
    so the value's form is checked here and the engine itself rejects an unknown one at start-up."""
    if v is not None and not _ENGINE_VALUE_RE.match(v):
        raise ValueError(
            f"{field} must be one engine choice (letters, digits, '_', '.', '-'; e.g. 'fp8'); got {v!r}"
        )
    return v


def _launcher(v: list[str]) -> list[str]:
    if not v or any(not isinstance(a, str) or not a.strip() for a in v):
        raise ValueError(f"launcher must be a non-empty list of non-empty argv words; got {v!r}")
    return v


def _no_owned_flags(v: list[str], owned: tuple[str, ...], engine: str) -> list[str]:
    for item in v:
        flag = item.split("=", 1)[0]
        if flag in owned:
            raise ValueError(
                f"extra_args must not set {flag}: moecap sets {', '.join(owned)} itself when it launches "
                f"{engine} (use the runner args host, port and model instead)"
            )
    return v


class _EngineLaunchArgs(_LaunchArgs):
    """What the vLLM and SGLang schemas share: the launcher, verbatim extra flags (never the ones moecap
    sets itself), remote code, expert recording."""

    OWNED_FLAGS: ClassVar[tuple[str, ...]] = ("--host", "--port", "--served-model-name", "--model")
    ENGINE: ClassVar[str] = "the engine"

    trust_remote_code: bool = False
    """``--trust-remote-code`` (also passed when the suite's model sets ``trust_remote_code``)."""
    extra_args: list[str] = Field(default_factory=list)
    """Further server flags, appended verbatim."""

    @field_validator("launcher", check_fields=False)
    @classmethod
    def _launcher(cls, v: list[str]) -> list[str]:
        return _launcher(v)

    @field_validator("extra_args")
    @classmethod
    def _extra(cls, v: list[str]) -> list[str]:
        return _no_owned_flags(v, cls.OWNED_FLAGS, cls.ENGINE)


class VLLMRunnerArgs(_EngineLaunchArgs):
    """vLLM's OpenAI-compatible server (``vllm serve``), launched and stopped by moecap.

    The command is ``launcher + [model] + flags``: ``launcher`` defaults to ``["vllm", "serve"]``; point it
    at another environment with ``["/opt/vllm/bin/vllm", "serve"]``, or use the module entry point with
    ``["/opt/vllm/bin/python", "-m", "vllm.entrypoints.openai.api_server", "--model"]`` (the model path is
    placed right after the launcher, so a launcher ending in ``--model`` works). A bare program name is
    looked up first beside moecap's own interpreter (its environment's ``bin/``), then on ``PATH``.
    """

    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """``--dtype``; ``auto``: bf16 for bf16 checkpoints, fp16 for fp16/fp32 ones (vLLM's rule)."""
    tensor_parallel_size: int | None = Field(default=None, ge=1)
    """``--tensor-parallel-size``: GPUs each layer is split over."""
    pipeline_parallel_size: int | None = Field(default=None, ge=1)
    """``--pipeline-parallel-size``."""
    data_parallel_size: int | None = Field(default=None, ge=1)
    """``--data-parallel-size``: engine replicas (with ``enable_expert_parallel``: the EP group)."""
    enable_expert_parallel: bool = False
    """``--enable-expert-parallel``: experts sharded over the TP x DP GPUs instead of tensor-split."""
    max_model_len: int | None = Field(default=None, gt=0)
    """``--max-model-len``: context length; unset: the model's."""
    max_num_seqs: int | None = Field(default=None, gt=0)
    """``--max-num-seqs``: requests in one scheduler step."""
    max_num_batched_tokens: int | None = Field(default=None, gt=0)
    """``--max-num-batched-tokens``: tokens in one scheduler step (the chunked-prefill budget)."""
    gpu_memory_utilization: float | None = Field(default=None, gt=0, le=1)
    """``--gpu-memory-utilization``: fraction of GPU memory vLLM may take (weights + KV cache), in (0, 1]."""
    kv_cache_dtype: str | None = None
    """``--kv-cache-dtype``, e.g. ``auto``, ``fp8``, ``fp8_e4m3``, ``fp8_e5m2``."""
    quantization: str | None = None
    """``--quantization``, e.g. ``fp8``, ``awq``, ``gptq_marlin``; unset: what the checkpoint says."""
    enforce_eager: bool = False
    """``--enforce-eager``: no CUDA graphs."""
    enable_prefix_caching: bool = False
    """``--enable-prefix-caching`` / ``--no-enable-prefix-caching``. Off by default here (vLLM's default is
    on) so that repeated prompt prefixes do not flatter prefill figures."""
    seed: int | None = Field(default=None, ge=0)
    """``--seed``."""
    ENGINE: ClassVar[str] = "vLLM"

    launcher: list[str] = Field(default_factory=lambda: ["vllm", "serve"])
    """argv that starts the server; the model path follows it (see the class doc)."""
    record_experts: bool = False
    """Not available for vLLM: it must stay false (see the validator's message)."""

    @field_validator("kv_cache_dtype", "quantization")
    @classmethod
    def _values(cls, v: str | None, info: ValidationInfo) -> str | None:
        return _engine_value(info.field_name, v)


    @field_validator("record_experts")
    @classmethod
    def _record(cls, v: bool) -> bool:
        if v:
            raise ValueError(
                "record_experts is not available for vLLM: its EPLB load statistics are only logged (and only "
                "with expert parallelism), and its routed-experts return (--enable-return-routed-experts) rides "
                "on non-streaming responses, while moecap streams to time every token; set it false (expert "
                "unions are then estimated, and the record says so)"
            )
        return v

    @model_validator(mode="after")
    def _budget(self) -> "VLLMRunnerArgs":
        if (self.max_num_batched_tokens is not None and self.max_num_seqs is not None
                and self.max_num_batched_tokens < self.max_num_seqs):
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_num_seqs "
                f"({self.max_num_seqs}): every scheduled sequence needs at least one token of the step's budget"
            )
        return self


class SGLangRunnerArgs(_EngineLaunchArgs):
    """SGLang's server (``python -m sglang.launch_server``), launched and stopped by moecap.

    The command is ``launcher + ["--model-path", model] + flags``; ``launcher`` defaults to
    ``["python", "-m", "sglang.launch_server"]`` (a bare ``python`` is the one beside moecap's own
    interpreter when there is one, else the first on ``PATH``); another environment:
    ``["/opt/sglang/bin/python", "-m", "sglang.launch_server"]``.
    """

    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """``--dtype``; ``auto``: bf16 for bf16 checkpoints, fp16 for fp16/fp32 ones (SGLang's rule)."""
    tp_size: int | None = Field(default=None, ge=1)
    """``--tp-size``: tensor parallelism."""
    dp_size: int | None = Field(default=None, ge=1)
    """``--dp-size``: data parallelism (engine replicas)."""
    ep_size: int | None = Field(default=None, ge=1)
    """``--ep-size``: expert parallelism inside the TP group (must divide ``tp_size``)."""
    mem_fraction_static: float | None = Field(default=None, gt=0, lt=1)
    """``--mem-fraction-static``: fraction of GPU memory for weights + KV cache pool, in (0, 1)."""
    max_running_requests: int | None = Field(default=None, ge=1)
    """``--max-running-requests``."""
    chunked_prefill_size: int | None = None
    """``--chunked-prefill-size``: tokens per prefill chunk; -1 disables chunking."""
    context_length: int | None = Field(default=None, gt=0)
    """``--context-length``; unset: the model's."""
    kv_cache_dtype: str | None = None
    """``--kv-cache-dtype``, e.g. ``auto``, ``fp8_e4m3``, ``fp8_e5m2``, ``bf16``."""
    quantization: str | None = None
    """``--quantization``, e.g. ``fp8``, ``awq``, ``w8a8_fp8``; unset: what the checkpoint says."""
    disable_radix_cache: bool = True
    """``--disable-radix-cache``: on by default here (SGLang caches prefixes by default) so that repeated
    prompt prefixes do not flatter prefill figures."""
    disable_cuda_graph: bool = False
    """``--disable-cuda-graph``."""
    attention_backend: str | None = None
    """``--attention-backend``, e.g. ``flashinfer``, ``fa3``, ``triton``."""
    moe_runner_backend: str | None = None
    """``--moe-runner-backend``, e.g. ``auto``, ``triton``, ``deep_gemm``, ``flashinfer_cutlass``."""
    moe_a2a_backend: str | None = None
    """``--moe-a2a-backend``: expert-parallel all-to-all, e.g. ``none``, ``deepep``, ``mooncake``."""
    random_seed: int | None = Field(default=None, ge=0)
    """``--random-seed``."""
    OWNED_FLAGS: ClassVar[tuple[str, ...]] = ("--host", "--port", "--served-model-name", "--model-path", "--model")
    ENGINE: ClassVar[str] = "SGLang"

    launcher: list[str] = Field(default_factory=lambda: ["python", "-m", "sglang.launch_server"])
    """argv that starts the server; ``--model-path <model>`` follows it."""
    record_experts: bool = False
    """Record per-layer expert activation counts (and per-pass expert unions) of every cell's measured
    window with SGLang's expert distribution recorder (``--expert-distribution-recorder-mode stat``). The
    model's SGLang implementation must support it (DeepSeek, Qwen2/3-MoE, ...; SGLang refuses to start
    otherwise). Adds a little work to every forward pass."""

    @field_validator("kv_cache_dtype", "quantization", "attention_backend", "moe_runner_backend", "moe_a2a_backend")
    @classmethod
    def _values(cls, v: str | None, info: ValidationInfo) -> str | None:
        return _engine_value(info.field_name, v)

    @field_validator("chunked_prefill_size")
    @classmethod
    def _chunk(cls, v: int | None) -> int | None:
        if v is not None and v != -1 and v <= 0:
            raise ValueError(f"chunked_prefill_size must be a positive number of tokens, or -1 (no chunking); got {v}")
        return v


    @model_validator(mode="after")
    def _parallel(self) -> "SGLangRunnerArgs":
        tp = self.tp_size or 1
        if self.ep_size is not None and tp % self.ep_size:
            raise ValueError(
                f"ep_size ({self.ep_size}) must divide tp_size ({tp}): SGLang splits the tensor-parallel group "
                "into ep_size expert groups"
            )
        if self.record_experts and (self.dp_size or 1) > 1:
            raise ValueError(
                "record_experts supports dp_size 1 only: with data parallelism SGLang's recorder runs per "
                "replica, and moecap reads one dump"
            )
        return self


# --------------------------------------------------------------------------------------------------
# moecap's own engine (runners/engine.py, moecap/engine/)
# --------------------------------------------------------------------------------------------------

ENGINE_PRESETS = ("resident", "offload-all", "int8-all", "int4-all", "int3-all", "int2-all")


class EnginePlanSpec(RunnerArgs):
    """A plan described by fractions (``moecap.engine.planner.make_plan``), or, with ``precisions``, a
    mixture of precisions under a fast-memory budget (``moecap.engine.planner.mixed_plan``: every expert
    its own precision and tier, by activation frequency x quantization sensitivity)."""

    quantize_fraction: float = Field(default=0.0, ge=0, le=1)
    """Share of all routed experts quantized (cheapest first: activation frequency x sensitivity)."""
    precision: Literal["int8", "int4", "int3", "int2"] = "int4"
    offload_fraction: float = Field(default=0.0, ge=0, le=1)
    """Share of all routed experts placed in host memory (least used first)."""
    fast_budget_gb: float | None = Field(default=None, gt=0)
    """Fast-device memory for experts, GB (1e9 B); more experts go to host memory until they fit."""
    precisions: list[Literal["int8", "int4", "int3", "int2"]] | None = None
    """Mixed plan: the precisions an expert may step down to (below full), e.g. [int8, int4]; needs a
    budget (``fast_budget_gb`` or ``fast_budget_fraction``)."""
    fast_budget_fraction: float | None = Field(default=None, gt=0, le=1)
    """Mixed plan: the budget as a share of all routed experts' bytes at full precision."""
    max_error: float | None = Field(default=None, ge=0)
    """Mixed plan: the most expected output error quantization may add (activation-weighted mean relative
    squared error of expert outputs); what does not fit then goes to host memory."""

    @model_validator(mode="after")
    def _modes(self) -> "EnginePlanSpec":
        if self.precisions is not None:
            if not self.precisions:
                raise ValueError("precisions must name at least one of int8, int4, int3, int2")
            if self.quantize_fraction or self.offload_fraction:
                raise ValueError("a mixed plan (precisions) is sized by its budget: drop quantize_fraction and "
                                 "offload_fraction")
            if (self.fast_budget_gb is None) == (self.fast_budget_fraction is None):
                raise ValueError("a mixed plan (precisions) needs exactly one of fast_budget_gb, fast_budget_fraction")
        elif self.fast_budget_fraction is not None or self.max_error is not None:
            raise ValueError("fast_budget_fraction and max_error belong to a mixed plan: set precisions too, "
                             "e.g. precisions: [int8, int4]")
        return self


class CalibrationSpec(RunnerArgs):
    """Calibration text: a local file (``path``) or a data set through ``datasets`` (``dataset``)."""

    path: str | None = None
    """A .txt, .jsonl or .json file."""
    dataset: str | None = None
    config: str | None = None
    split: str = "train"
    field: str = "text"
    """The text field of each record (jsonl, json, data set)."""
    max_documents: int = Field(default=2000, gt=0)

    @model_validator(mode="after")
    def _one(self) -> "CalibrationSpec":
        if (self.path is None) == (self.dataset is None):
            raise ValueError("calibration needs exactly one of path (a local file) or dataset (an id for `datasets`)")
        return self


class EngineSelect(RunnerArgs):
    """Serve the configuration a measured frontier (``moecap engine pareto``) picks under a constraint."""

    frontier: str
    """frontier.json (or the folder holding it)."""
    max_perplexity: float | None = Field(default=None, gt=0)
    """Best throughput among configurations with perplexity <= this."""
    min_tokens_per_s: float | None = Field(default=None, gt=0)
    """Best perplexity among configurations with at least this decode throughput."""


class EngineRunnerArgs(HFRunnerArgs):
    """moecap's engine: its own decoder, streamed from the checkpoint into an expert placement plan
    (``moecap.engine.model``); ``attn_implementation`` does not apply (the engine has its own attention)."""

    plan: str | EnginePlanSpec = "resident"
    """A preset (resident, offload-all, int8-all, int4-all, int3-all, int2-all), a plan JSON file (``moecap engine pareto``
    writes them), fractions ``{quantize_fraction, precision, offload_fraction, fast_budget_gb}``, or a
    mixture of precisions ``{precisions: [int8, int4], fast_budget_gb | fast_budget_fraction, max_error}``."""
    group_size: int = Field(default=64, gt=0)
    """Quantization group size (weights per scale along the input dimension)."""
    offload_mode: Literal["auto", "cpu", "copy"] = "auto"
    """Host experts: ``cpu`` computes them on the CPU (activations travel), ``copy`` moves the expert to
    the fast device, ``auto`` picks per call from the token count (the cost model)."""
    host_gflops: float | None = Field(default=None, gt=0)
    """CPU matmul rate for the cost model (GFLOP/s); unset: measured on the machine on first use and
    cached (``moecap engine rates``), with each precision's host-kernel bandwidth."""
    link_gbs: float | None = Field(default=None, gt=0)
    """Host-to-device bandwidth for the cost model, GB/s; unset: the pinned copy measured on first use."""
    cache_size: int = Field(default=2, ge=0)
    """Host experts kept on the fast device per layer after a copy or prefetch."""
    prefetch: int = Field(default=2, ge=0)
    """On a GPU, the next layer's N most used host experts are copied while the current layer routes."""
    profile_windows: int = Field(default=8, ge=0)
    """Calibration windows (of ``profile_tokens`` tokens) for activation frequency and sensitivity."""
    profile_tokens: int = Field(default=128, ge=8)
    calibration: str | CalibrationSpec = "embedded"
    """What the plan is calibrated on: ``embedded`` (the embedded corpora's train splits), a local
    .txt/.jsonl/.json file, or ``{dataset, config, split, field}`` (through ``datasets``)."""
    select: EngineSelect | None = None
    """Take the plan from a measured frontier under a constraint (replaces ``plan``)."""

    @field_validator("plan")
    @classmethod
    def _plan(cls, v: str | EnginePlanSpec) -> str | EnginePlanSpec:
        if isinstance(v, str) and v not in ENGINE_PRESETS and not v.endswith(".json"):
            raise ValueError(f"plan must be one of {', '.join(ENGINE_PRESETS)}, a .json plan file, or "
                             f"{{quantize_fraction, precision, offload_fraction, fast_budget_gb}}; got {v!r}")
        return v


class MoecapServeRunnerArgs(_LaunchArgs):
    """``moecap serve`` (our engine's OpenAI-compatible server), launched and stopped by moecap: one model,
    or several fine-tuned children of one base served side by side (``separate``), consolidated
    (``consolidated``) or in a static partition of a fast-memory budget (``partition``). With a
    multi-model workload (``models: {name: share}``) each request picks its child; the suite's model is the
    family's reference (tokenizer, architecture)."""

    serve: list[str] = Field(default_factory=list)
    """The served models, as ``moecap serve`` takes them (``tiny-moe-code``, a directory, ``NAME=MODEL``);
    unset: the keys of ``models``, else the suite's model."""
    backend: Literal["separate", "consolidated", "partition"] = "separate"
    base: str | None = None
    """consolidated: the children's base model (unset: the parent their ``moecap.json`` names)."""
    threshold: float | None = Field(default=None, ge=0)
    """consolidated: share an expert when its output distance to the base's is at most this."""
    consolidation_plan: str | None = None
    """consolidated: a plan file from ``moecap engine consolidate`` instead of a threshold."""
    shared: Literal["mean", "base"] | None = None
    """consolidated: the shared copy is the sharers' mean (default) or the base's expert."""
    fast_budget_gb: float | None = Field(default=None, gt=0)
    """partition (required): fast-device memory split evenly between the children; consolidated:
    pooled experts beyond it stay in host memory."""
    max_model_len: int | None = Field(default=None, gt=1)
    max_batch_size: int = Field(default=8, ge=1)
    max_wait_s: float = Field(default=2.0, ge=0)
    """Fairness bound: a model whose oldest request waited this long goes next."""
    max_consecutive_batches: int = Field(default=4, ge=1)
    device: str | None = None
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``; unset: the suite's ``hardware.device``."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"

    _CONSOLIDATED_ONLY: ClassVar[tuple[str, ...]] = ("base", "threshold", "consolidation_plan", "shared")

    @field_validator("device")
    @classmethod
    def _device(cls, v: str | None) -> str | None:
        return _check_device(v)

    @model_validator(mode="after")
    def _backend_options(self) -> "MoecapServeRunnerArgs":
        if self.backend != "consolidated":
            given = [k for k in self._CONSOLIDATED_ONLY if getattr(self, k) is not None]
            if given:
                raise ValueError(f"{', '.join(given)}: only for backend consolidated (backend is {self.backend})")
        if self.backend == "separate" and self.fast_budget_gb is not None:
            raise ValueError("fast_budget_gb: only for backends partition and consolidated")
        if self.backend == "partition" and self.fast_budget_gb is None:
            raise ValueError("backend partition needs fast_budget_gb (the fast-device memory the children share)")
        if self.threshold is not None and self.consolidation_plan is not None:
            raise ValueError("give threshold or consolidation_plan, not both")
        return self
