"""Name -> implementation registries.

Entries are ``"module:attribute"`` strings, imported on first use, so that ``import moecap`` stays
free of torch, transformers, gradio, vllm and ray.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
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
    quality: bool = False  # can score tokens (token_nll, loglikelihood_tokens): perplexity, lm-eval
    traces_passes: bool = False  # produces per-pass traces, so S-MBU/S-MFU (and hardware peaks) apply
    # a server moecap launches on this machine: decode S-MBU/S-MFU estimated from its streamed timestamps
    estimates_passes: bool = False


@dataclass(frozen=True)
class ModelEntry:
    name: str
    builder: str  # "module:function" returning the local model directory (built and cached on first use)
    description: str


RUNNERS: dict[str, RunnerEntry] = {
    "hf": RunnerEntry(
        name="hf",
        cls="moecap.runners.hf:HFRunner",
        args="moecap.runners.args:HFRunnerArgs",
        loads=("batch",),
        description="Hugging Face transformers, in-process; static batches, per-pass timing, traced experts",
        quality=True,
        traces_passes=True,
    ),
    "engine": RunnerEntry(
        name="engine",
        cls="moecap.runners.engine:EngineRunner",
        args="moecap.runners.args:EngineRunnerArgs",
        loads=("batch",),
        description="moecap's engine: experts placed on the fast device or host memory, full precision or "
        "int8/int4 (a plan, a preset or fractions), otherwise as hf; traced experts, quality",
        quality=True,
        traces_passes=True,
    ),
    "openai": RunnerEntry(
        name="openai",
        cls="moecap.runners.openai_runner:OpenAIRunner",
        args="moecap.runners.args:OpenAIRunnerArgs",
        loads=("batch", "concurrency", "rate"),
        description="an already-running OpenAI-compatible endpoint (vLLM, SGLang, llama.cpp, ...); "
        "client-side request traces only (no expert traces)",
        quality=False,
    ),
    "server": RunnerEntry(
        name="server",
        cls="moecap.runners.openai_runner:ServedRunner",
        args="moecap.runners.args:ServedRunnerArgs",
        loads=("batch", "concurrency", "rate"),
        description="a server command moecap launches, benchmarks over OpenAI-compatible HTTP, and stops",
        quality=False,
        estimates_passes=True,
    ),
    "moecap-serve": RunnerEntry(
        name="moecap-serve",
        cls="moecap.runners.moecap_serve:MoecapServeRunner",
        args="moecap.runners.args:MoecapServeRunnerArgs",
        loads=("batch", "concurrency", "rate"),
        description="moecap serve (our engine's OpenAI-compatible server), launched and stopped by moecap: one "
        "model or several children of one base (separate, consolidated, partition backends); switch/swap times "
        "and backend memory from its /stats; quality scored through the server",
        quality=True,
        estimates_passes=True,
    ),
    "llamacpp": RunnerEntry(
        name="llamacpp",
        cls="moecap.runners.llamacpp:LlamaCppRunner",
        args="moecap.runners.args:LlamaCppRunnerArgs",
        loads=("batch", "concurrency", "rate"),
        description="llama.cpp (llama-cpp-python's server) on a GGUF export of the model, launched and stopped "
        "by moecap; expert placement with n_cpu_moe / override_tensor",
        quality=False,
        estimates_passes=True,
    ),
    "vllm": RunnerEntry(
        name="vllm",
        cls="moecap.runners.vllm:VLLMRunner",
        args="moecap.runners.args:VLLMRunnerArgs",
        loads=("batch", "concurrency", "rate"),
        description="vLLM's OpenAI-compatible server (vllm serve), launched and stopped by moecap; token-id "
        "prompts; no expert traces (vLLM exposes none to a streaming client)",
        quality=False,
        traces_passes=False,
        estimates_passes=True,
    ),
    "sglang": RunnerEntry(
        name="sglang",
        cls="moecap.runners.sglang:SGLangRunner",
        args="moecap.runners.args:SGLangRunnerArgs",
        loads=("batch", "concurrency", "rate"),
        description="SGLang's server (sglang.launch_server), launched and stopped by moecap; token-id prompts; "
        "with record_experts, per-layer expert counts from SGLang's expert distribution recorder",
        quality=False,
        traces_passes=False,
        estimates_passes=True,
    ),
}

EMBEDDED_MODELS: dict[str, ModelEntry] = {
    "tiny-moe": ModelEntry(
        name="tiny-moe",
        builder="moecap.zoo.tiny_moe:ensure_tiny_moe",
        description="embedded default: a ~4.4M-parameter Mixtral-architecture MoE (8 experts, top-2) and its BPE "
        "tokenizer, trained here on the Python installation's code, documentation and C headers",
    ),
    **{
        f"tiny-moe-{d}": ModelEntry(
            name=f"tiny-moe-{d}",
            builder=f"moecap.zoo.tiny_moe:ensure_{d}",
            description=f"tiny-moe fine-tuned on the {d} corpus (a child of tiny-moe, for expert consolidation)",
        )
        for d in ("code", "prose", "c")
    },
}


def runner_entry(name: str) -> RunnerEntry:
    try:
        return RUNNERS[name]
    except KeyError:
        raise KeyError(f"unknown runner {name!r}; registered runners: {', '.join(sorted(RUNNERS))}") from None


def register_runner(entry: RunnerEntry) -> None:
    RUNNERS[entry.name] = entry
