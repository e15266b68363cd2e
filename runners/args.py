"""Argument schemas of the runners (pydantic only: importable without torch).

A suite's ``runners[i].args`` is validated against the runner's schema before anything runs.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class RunnerArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")


_DEVICE_RE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")


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
        if v is not None and not _DEVICE_RE.match(v):
            raise ValueError(f"device must be one of auto, cpu, cuda, cuda:N; got {v!r}")
        return v

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
    api_key: str | None = None
    request_timeout_s: float | None = Field(default=600, gt=0)
    warmup_requests: int = Field(default=1, ge=0)
    """Untimed requests sent (and awaited) before the measured window."""
    prompt_format: Literal["ids", "text"] = "ids"
    """``ids``: token-id prompts of exact length (vLLM, SGLang, llama.cpp's llama-server); ``text``: texts
    that the model's tokenizer encodes to exactly that length (servers that take text only)."""
    slo_ms: dict[str, float] | None = None
    """Goodput SLOs, e.g. ``{ttft_ms: 500, tpot_ms: 50}`` (keys: ttft_ms, tpot_ms, e2el_ms)."""

    @field_validator("slo_ms")
    @classmethod
    def _slo(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v:
            bad = sorted(set(v) - {"ttft_ms", "tpot_ms", "e2el_ms"})
            if bad:
                raise ValueError(f"unknown SLO keys {bad}; allowed: ttft_ms, tpot_ms, e2el_ms")
            if any(not x > 0 for x in v.values()):
                raise ValueError("SLO values must be > 0")
        return v


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
    """argv of the server; ``{port}``, ``{host}`` and ``{model}`` (the local model path or id) are substituted."""
    ready_path: str = "/health"


_BUFT_RE = re.compile(r"^(?P<pattern>.+)=(?P<buft>[A-Za-z0-9_:.\-]+)$")


class LlamaCppRunnerArgs(_LaunchArgs):
    """llama.cpp through ``llama-cpp-python[server]`` (``python -m llama_cpp.server``), on a GGUF file that
    moecap exports from the suite's Hugging Face model unless ``gguf`` names one."""

    prompt_format: Literal["ids", "text"] = "text"
    """llama-cpp-python's server takes text prompts only."""
    gguf: str | None = None
    """An existing GGUF file to serve; unset: export the suite model (cached under ``<cache>/gguf``)."""
    weight_type: Literal["f32", "f16", "bf16", "q8_0"] = "f32"
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
    """Decode threads; unset: llama-cpp-python's default (half the cores)."""
    n_threads_batch: int | None = Field(default=None, ge=1)
    n_batch: int = Field(default=512, ge=1)
    n_ubatch: int = Field(default=512, ge=1)
    flash_attn: bool = False
    use_mmap: bool = True
    python: str | None = None
    """Interpreter that has llama-cpp-python; unset: moecap's own."""
    extra_args: list[str] = Field(default_factory=list)
    """Further ``llama_cpp.server`` flags, passed verbatim."""
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
