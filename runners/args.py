"""Argument schemas of the runners (pydantic only: importable without torch).

A suite's ``runners[i].args`` is validated against the runner's schema before anything runs.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, field_validator


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
