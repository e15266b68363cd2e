"""Name -> implementation registries.

Entries are ``"module:attribute"`` strings, imported on first use, so that ``import moecap`` stays
free of torch, transformers, gradio, vllm and ray.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any


def load_object(path: str) -> Any:
    """Import ``"package.module:Attr"`` and return the attribute."""
    module, _, attr = path.partition(":")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


@dataclass(frozen=True)
class RunnerEntry:
    name: str
    cls: str  # "module:Class" of the Runner
    args: str  # "module:Model" of its pydantic argument model (importable without torch)
    loads: tuple[str, ...]  # load kinds it can drive: "batch", "concurrency", "rate"
    description: str


@dataclass(frozen=True)
class ModelEntry:
    name: str
    builder: str  # "module:function" returning the local model directory (built and cached on first use)
    description: str
    aliases: tuple[str, ...] = field(default_factory=tuple)


RUNNERS: dict[str, RunnerEntry] = {
    "hf": RunnerEntry(
        name="hf",
        cls="moecap.runners.hf:HFRunner",
        args="moecap.runners.args:HFRunnerArgs",
        loads=("batch",),
        description="Hugging Face transformers, in-process; static batches, per-pass timing, traced experts",
    ),
}

EMBEDDED_MODELS: dict[str, ModelEntry] = {
    "tiny-moe": ModelEntry(
        name="tiny-moe",
        builder="moecap.zoo.tiny_moe:ensure_tiny_moe",
        description="embedded default: a ~4M-parameter Mixtral-architecture MoE (8 experts, top-2) with a "
        "byte-level BPE tokenizer trained on the Python standard library's source; built locally, no download",
    ),
}


def runner_entry(name: str) -> RunnerEntry:
    try:
        return RUNNERS[name]
    except KeyError:
        raise KeyError(f"unknown runner {name!r}; registered runners: {', '.join(sorted(RUNNERS))}") from None


def register_runner(entry: RunnerEntry) -> None:
    RUNNERS[entry.name] = entry
