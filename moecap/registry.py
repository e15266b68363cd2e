"""Name -> implementation registries.

Entries are ``"module:attribute"`` strings, imported on first use, so that ``import moecap`` stays
free of torch, transformers, gradio, vllm and ray.

Plugin runners: a suite's ``runners[i].type`` may also name a runner by import path,
``"package.module:Attr"`` (any runner type containing ``:``), where ``Attr`` is a :class:`RunnerEntry`
or a ``Runner`` subclass. For a class, the entry comes from its class attributes: ``args_model`` (its
pydantic argument model; default: no arguments), ``loads`` (default: all load kinds), ``quality``,
``traces_passes``, ``estimates_passes`` (default False). The module must be importable wherever the
cells run (worker subprocesses inherit ``PYTHONPATH``; Ray workers need it on their nodes).
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
    # why a ``random:`` model (random weights, no checkpoint, no tokenizer) cannot run here, unless one of
    # ``random_model_unless`` is set in the runner's args; None: random models run
    random_model_refusal: str | None = None
    random_model_unless: tuple[str, ...] = ()


@dataclass(frozen=True)
class ModelEntry:
    name: str
    builder: str  # "module:function" returning the local model directory (built and cached on first use)
    description: str


def plugin_runner_entry(path: str) -> RunnerEntry:
    """The entry of a runner named by import path (``"module:Class"``, see the module doc)."""
    obj = load_object(path)
    if isinstance(obj, RunnerEntry):
        return obj if obj.name == path else RunnerEntry(**{**obj.__dict__, "name": path})
    if not isinstance(obj, type):
        raise TypeError(f"runner {path!r} is a {type(obj).__name__}, not a Runner class or a RunnerEntry")
    args_model = getattr(obj, "args_model", None)
    args = f"{args_model.__module__}:{args_model.__qualname__}" if args_model is not None else \
        "moecap.runners.args:RunnerArgs"
    doc = (obj.__doc__ or "").strip().splitlines()
    return RunnerEntry(
        name=path, cls=path, args=args,
        loads=tuple(getattr(obj, "loads", ("batch", "concurrency", "rate"))),
        description=doc[0] if doc else f"plugin runner {path}",
        quality=bool(getattr(obj, "quality", False)),
        traces_passes=bool(getattr(obj, "traces_passes", False)),
        estimates_passes=bool(getattr(obj, "estimates_passes", False)),
    )


class _Runners(dict):
    """The registered runners; a name with ``:`` resolves a plugin runner by import path on lookup
    (not listed, not cached: ``moecap runners`` shows the registered ones)."""

    def _plugin(self, key: Any) -> RunnerEntry | None:
        if not isinstance(key, str) or ":" not in key:
            return None
        try:
            return plugin_runner_entry(key)
        except Exception as err:  # the suite validator then reports an unknown runner
            import logging

            logging.getLogger(__name__).warning("runner %r cannot be loaded: %s: %s", key, type(err).__name__, err)
            return None

    def __missing__(self, key: Any) -> RunnerEntry:
        entry = self._plugin(key)
        if entry is None:
            raise KeyError(key)
        return entry

    def get(self, key: Any, default: Any = None) -> Any:
        if dict.__contains__(self, key):
            return dict.__getitem__(self, key)
        entry = self._plugin(key)
        return default if entry is None else entry

    def __contains__(self, key: Any) -> bool:
        return dict.__contains__(self, key) or self._plugin(key) is not None


RUNNERS: dict[str, RunnerEntry] = _Runners({
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
        random_model_refusal="a random: model has no tokenizer, and HTTP prompts are built from one",
        random_model_unless=("tokenizer",),
    ),
    "server": RunnerEntry(
        name="server",
        cls="moecap.runners.openai_runner:ServedRunner",
        args="moecap.runners.args:ServedRunnerArgs",
        loads=("batch", "concurrency", "rate"),
        description="a server command moecap launches, benchmarks over OpenAI-compatible HTTP, and stops",
        quality=False,
        estimates_passes=True,
        random_model_refusal="a random: model has no tokenizer, and HTTP prompts are built from one",
        random_model_unless=("tokenizer",),
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
        random_model_refusal="a random: model has no tokenizer, and HTTP prompts are built from one",
        random_model_unless=("tokenizer",),
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
        random_model_refusal="a random: model has no checkpoint or tokenizer to export to GGUF",
        random_model_unless=("gguf", "tokenizer"),
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
        random_model_refusal="a random: model has random weights and no checkpoint, and vLLM loads a checkpoint",
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
        random_model_refusal="a random: model has random weights and no checkpoint, and SGLang loads a checkpoint",
    ),
})

EMBEDDED_MODELS: dict[str, ModelEntry] = {
    "tiny-moe": ModelEntry(
        name="tiny-moe",
        builder="moecap.zoo.tiny_moe:ensure_tiny_moe",
        description="embedded default: a ~1M-parameter Mixtral-architecture MoE (8 experts, top-2) and its BPE "
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
