"""The Runner interface and the raw traces runners produce.

Runners produce traces only (timestamps, per-pass timings, per-layer expert counts); ``moecap.metrics``
turns traces into figures. A runner never computes a figure.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Any

from moecap.runners.args import RunnerArgs


@dataclass
class PassTrace:
    """One forward pass of the model over a batch."""

    index: int
    phase: str  # "prefill" | "decode"
    batch: int  # index of the static batch (or scheduler step) the pass belongs to
    new_tokens: list[int]  # tokens fed per request in this pass
    context_lens: list[int]  # tokens already in the KV cache per request, before the pass
    logits_tokens: int  # positions whose logits the pass computed (LM-head work)
    start_s: float
    end_s: float
    # expert_counts[i][e]: tokens routed to expert e in MoE layer moe_layers[i] during this pass;
    # None when the runner could not trace the router
    expert_counts: list[list[int]] | None = None
    # host_calls: [layer, expert, mode] for each host-memory expert the pass ran (our engine): mode "cpu"
    # (computed by the host), "copy" (copied over the link, then computed on the fast device) or
    # "copy_cached" (a copy already on the fast device); None when the runner has no host tier
    host_calls: list[list[Any]] | None = None

    @property
    def time_s(self) -> float:
        return self.end_s - self.start_s

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["time_s"] = self.time_s
        return d


@dataclass
class RequestTrace:
    """One request, as its client saw it (times in seconds from the run's origin)."""

    id: int
    input_tokens: int
    send_s: float
    token_times_s: list[float] = field(default_factory=list)  # arrival time of each output token
    batch: int | None = None
    error: str | None = None
    model: str | None = None  # the served model the request asked for (multi-model workloads)
    # what the client received: the arrival of each chunk that carried output and its token count. Empty
    # when every token arrived on its own (in-process runners): then the chunks are the tokens
    chunk_times_s: list[float] = field(default_factory=list)
    chunk_tokens: list[int] = field(default_factory=list)
    dispatch_s: float | None = None  # when the load generator handed it to the client (None: = send_s)
    finish_s: float | None = None  # when the response (or the failure) was complete (None: last token)

    @property
    def output_tokens(self) -> int:
        return len(self.token_times_s)

    def chunks(self) -> tuple[list[float], list[int]]:
        """(arrival time, tokens) of every chunk that carried output, in order."""
        if self.chunk_times_s:
            return list(self.chunk_times_s), list(self.chunk_tokens)
        return list(self.token_times_s), [1] * len(self.token_times_s)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["output_tokens"] = self.output_tokens
        return d


@dataclass
class RunTrace:
    """Everything a runner observed in one cell, plus what metrics need to interpret it."""

    passes: list[PassTrace]
    requests: list[RequestTrace]
    model_config: dict[str, Any]  # the HF config (architecture), for model accounting
    moe_layers: list[int]  # layer index of each row of PassTrace.expert_counts
    weight_bytes_per_param: float  # storage precision of the weights as loaded
    kv_bytes_per_elem: float  # KV-cache dtype size
    kv_cache_expanded_mla: bool  # True when an MLA model's cache holds full K/V (transformers does)
    compute_dtype: str
    device: str
    memory: dict[str, Any] = field(default_factory=dict)
    energy: dict[str, Any] = field(default_factory=dict)  # moecap.energy result over the measured window
    tracing: dict[str, Any] = field(default_factory=dict)  # how experts were traced, or why not
    extra: dict[str, Any] = field(default_factory=dict)
    # bytes of each routed expert as stored, per MoE layer (quantized / mixed-precision experts);
    # None: every expert is stored like the rest of the weights (weight_bytes_per_param)
    expert_bytes: dict[int, list[float]] | None = None
    # where each routed expert is stored, per MoE layer: "fast" or "host" (our engine's placement plan);
    # None: every weight is on the fast device
    expert_placements: dict[int, list[str]] | None = None
    # devices the model ran on (tensor x pipeline x data parallel): utilization is against that many peaks
    devices: int = 1
    # bytes per parameter of each accounting component as stored (attention, router, experts,
    # shared_experts, dense_ffn, lm_head), e.g. from a GGUF's tensor types; None: weight_bytes_per_param
    component_bytes_per_param: dict[str, float] | None = None


class Runner(ABC):
    """A backend under test. Lifecycle: ``load(model)`` once, ``run(...)`` per cell, ``close()``."""

    name: str = "?"

    def __init__(self, args: RunnerArgs, hardware: Any):
        self.args = args
        self.hardware = hardware

    @abstractmethod
    def load(self, model: Any) -> None:
        """Load (or launch) the model described by a ``ModelConfig``."""

    @abstractmethod
    def run(self, workload: Any, load: Any) -> RunTrace:
        """Serve one workload under one load and return the raw traces."""

    def close(self) -> None:
        """Release the model, processes and device memory."""

    def info(self) -> dict[str, Any]:
        """Runner name, version and resolved settings, for the record."""
        return {"name": self.name, "args": self.args.model_dump(mode="json")}

    def log_artifacts(self) -> dict[str, str]:
        """Text logs produced since the last call (e.g. a launched server's output), by artifact name."""
        return {}

    def device_name(self) -> str:
        """``cpu`` or ``cuda:N``: where the measured work ran."""
        return "cpu"

    def compute_dtype(self) -> str:
        """The dtype the model computes in (picks the FLOPS peak)."""
        return "float32"

    def model_config(self) -> dict[str, Any] | None:
        """The loaded model's Hugging Face config (architecture), for model accounting."""
        return None
