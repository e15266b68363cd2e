"""What the serving scheduler needs from a model engine: the :class:`Backend` protocol.

``moecap serve`` (``moecap.engine.server``) and its batch scheduler (``moecap.engine.scheduler``) run
several models of one family through this protocol only, so any engine can sit behind them:

- :class:`SeparateModelsBackend` (``--backend separate``): every model fully loaded, each with its own
  weights — the "each child alone" baseline; switching between models costs nothing.
- ``ConsolidatedBackend`` (``--backend consolidated``, :mod:`moecap.engine.multi_backends`): fine-tuned
  children of one base MoE sharing one device, similar experts stored once; its ``activate()`` swaps the
  child's non-expert weights and reports how long that took.
- ``PartitionShareBackend`` (``--backend partition``, :mod:`moecap.engine.partition`): each child alone in a
  1/N share of a fast-memory budget, the experts that do not fit offloaded (the static-partition baseline).
  ``moecap serve --backend partition`` does not run it behind one scheduler: the command starts a router
  (:func:`moecap.engine.partition.serve_partition`) and one child server process per model, each building
  this backend for its one model with its share of memory and threads.

Backends are built by :func:`make_backend` from the kinds in :data:`BACKENDS` (``"module:Class"``
strings, loaded on first use: importing this module imports neither torch nor transformers).

Threading: the scheduler calls ``activate`` and ``forward`` from one worker thread only; the other
methods may be called from any thread (they only read what was fixed at load time).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:  # pragma: no cover
    import torch

# --backend choices: kind -> "module:Class" whose __init__(models, device=..., dtype=..., **kw) builds it.
# The CLI's --backend choices are this dict's keys.
BACKENDS: dict[str, str] = {
    "separate": "moecap.engine.backend:SeparateModelsBackend",
    "consolidated": "moecap.engine.multi_backends:ConsolidatedBackend",
    # the engine of one partition; `moecap serve --backend partition` runs one per child process, behind
    # a router (moecap.engine.partition.serve_partition)
    "partition": "moecap.engine.partition:PartitionShareBackend",
}


class BackendError(RuntimeError):
    """A backend that cannot be built or cannot do what was asked (unknown model, bad device ...)."""


@runtime_checkable
class Backend(Protocol):
    """Several causal LMs of one family (same tokenizer family and architecture), served by name."""

    def model_names(self) -> list[str]:
        """The served model names, in the order given."""
        ...

    def tokenizer(self, model: str) -> Any:
        """The model's transformers tokenizer (``decode``, ``eos_token_id``, ``pad_token_id``, ``len()``)."""
        ...

    def context_length(self, model: str) -> int:
        """The most tokens (prompt + completion) one sequence may hold."""
        ...

    def activate(self, model: str) -> float:
        """Make ``model`` the one ``forward`` runs; return the seconds spent switching (0.0 when it
        already was active). A consolidated engine swaps weights here."""
        ...

    def forward(self, model: str, input_ids: "torch.LongTensor", attention_mask: "torch.LongTensor",
                past_key_values: Any, position_ids: "torch.LongTensor | None" = None) -> tuple["torch.Tensor", Any]:
        """One forward pass of the active ``model`` over a batch.

        ``input_ids`` [B, T] (T = prompt length for the prefill, 1 per decode step); ``attention_mask``
        [B, past + T] with 0 at (left) padding; ``past_key_values`` None for the prefill, else the cache
        the previous call returned; ``position_ids`` [B, T]. Returns ``(logits [B, T, V], new cache)``.
        The scheduler reads only ``logits[:, -1]``. Raises when ``model`` is not the active one.
        """
        ...

    def device(self) -> "torch.device":
        """Where ``forward`` wants its inputs."""
        ...

    def memory(self) -> dict[str, int]:
        """Bytes by kind (weights, buffers, device allocations ...), for the records."""
        ...


def make_backend(kind: str, models: dict[str, str | Path], **kw: Any) -> Backend:
    """Build a backend of ``kind`` (a key of :data:`BACKENDS`) serving ``models`` (name -> source).

    Options set to None are left out (so a command line can pass every kind's options, unset ones None);
    an option the kind does not take is an error naming it.
    """
    import inspect

    from moecap.registry import load_object

    try:
        target = BACKENDS[kind]
    except KeyError:
        raise BackendError(f"unknown backend {kind!r}; available: {', '.join(sorted(BACKENDS))}") from None
    if not models:
        raise BackendError("no models to serve")
    cls = load_object(target)
    kw = {k: v for k, v in kw.items() if v is not None}
    params = inspect.signature(cls).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(kw) - set(params))
        if unknown:
            raise BackendError(f"the {kind} backend does not take option(s) {', '.join(unknown)}")
    return cls(models, **kw)


# -- helpers shared by backends -----------------------------------------------------------------

_DTYPES = {"float32": "float32", "fp32": "float32", "float": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16", "half": "float16"}


def resolve_device(device: str | None) -> "torch.device":
    """``auto`` (or None): the first CUDA device when there is one, else the CPU; else ``torch.device(device)``."""
    import torch

    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise BackendError(f"invalid device {device!r}: {err}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BackendError(f"device {device!r} asked for, but no CUDA device is available")
    return dev


def resolve_dtype(dtype: str | None, device: "torch.device") -> "torch.dtype":
    """``auto``: float32 on the CPU, bfloat16 on a GPU that supports it (else float16)."""
    import torch

    if dtype in (None, "", "auto"):
        if device.type == "cpu":
            return torch.float32
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            return torch.float16
        return torch.bfloat16
    name = _DTYPES.get(str(dtype).lower().removeprefix("torch."))
    if name is None:
        raise BackendError(f"invalid dtype {dtype!r}; allowed: auto, float32, bfloat16, float16")
    return getattr(torch, name)


def config_context_length(config: Any, default: int = 2048) -> int:
    """The longest sequence a Hugging Face config allows."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    text = getattr(config, "text_config", None)
    if text is not None and text is not config:
        return config_context_length(text, default)
    return default


def _ids(value: Any) -> set[int]:
    if value is None:
        return set()
    if isinstance(value, int):
        return {value}
    return {int(v) for v in value if v is not None}


def eos_ids(tokenizer: Any, generation_config: Any = None) -> list[int]:
    """Every token id that ends a sequence: the tokenizer's and the generation config's."""
    eos = _ids(tokenizer.eos_token_id)
    if generation_config is not None:
        eos |= _ids(getattr(generation_config, "eos_token_id", None))
    return sorted(eos)


def module_memory(module: Any) -> tuple[int, int]:
    """(parameter bytes, buffer bytes) of a torch module, counting shared tensors once."""
    seen: set[int] = set()
    params = buffers = 0
    for p in module.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            params += p.numel() * p.element_size()
    for b in module.buffers():
        if b.data_ptr() not in seen:
            seen.add(b.data_ptr())
            buffers += b.numel() * b.element_size()
    return params, buffers


def device_memory(device: "torch.device") -> dict[str, int]:
    """The CUDA caching allocator's figures for ``device`` (empty on the CPU)."""
    import torch

    if device.type != "cuda" or not torch.cuda.is_available():
        return {}
    return {
        "device_allocated": int(torch.cuda.memory_allocated(device)),
        "device_reserved": int(torch.cuda.memory_reserved(device)),
        "device_peak_allocated": int(torch.cuda.max_memory_allocated(device)),
    }


class SeparateModelsBackend:
    """Every model fully loaded on one device, each with its own weights (the "each child alone"
    baseline). ``activate`` only records which model is active: it is free.

    ``models``: served name -> a local Hugging Face model directory, an embedded model name
    (``tiny-moe-code``, resolved with ``moecap.models.local_path_for``) or a hub id.
    ``max_model_len`` caps every model's context length.
    """

    def __init__(self, models: dict[str, str | Path], device: str = "cpu", dtype: str = "auto",
                 max_model_len: int | None = None, trust_remote_code: bool = False):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from moecap.models import local_path_for

        if not models:
            raise BackendError("no models to serve")
        self._device = resolve_device(device)
        self._dtype = resolve_dtype(dtype, self._device)
        self._models: dict[str, Any] = {}
        self._tokenizers: dict[str, Any] = {}
        self._context: dict[str, int] = {}
        self._eos: dict[str, list[int]] = {}
        self._sources: dict[str, str] = {}
        self._active: str | None = None
        for name, source in models.items():
            try:
                path = str(local_path_for(str(source)))
                model = AutoModelForCausalLM.from_pretrained(path, dtype=self._dtype,
                                                             trust_remote_code=trust_remote_code)
                tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
            except Exception as err:
                raise BackendError(f"could not load model {name!r} from {source!s}: {type(err).__name__}: {err}") from err
            model = model.to(self._device).eval()
            ctx = config_context_length(model.config)
            if max_model_len:
                ctx = min(ctx, int(max_model_len))
            self._models[name] = model
            self._tokenizers[name] = tokenizer
            self._context[name] = ctx
            self._eos[name] = eos_ids(tokenizer, getattr(model, "generation_config", None))
            self._sources[name] = path
        self._torch = torch

    # -- the protocol ----------------------------------------------------------------------
    def model_names(self) -> list[str]:
        return list(self._models)

    def tokenizer(self, model: str) -> Any:
        return self._tokenizers[self._check(model)]

    def context_length(self, model: str) -> int:
        return self._context[self._check(model)]

    def activate(self, model: str) -> float:
        self._active = self._check(model)
        return 0.0  # every model is resident: nothing to move

    def forward(self, model: str, input_ids: Any, attention_mask: Any, past_key_values: Any,
                position_ids: Any = None) -> tuple[Any, Any]:
        if model != self._active:
            raise BackendError(f"forward() for {model!r} while {self._active!r} is the active model")
        with self._torch.inference_mode():
            out = self._models[model](input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                      past_key_values=past_key_values, use_cache=True)
        return out.logits, out.past_key_values

    def device(self) -> Any:
        return self._device

    def memory(self) -> dict[str, int]:
        out: dict[str, int] = {"weights": 0, "buffers": 0, "expert_bytes": 0}
        for name, model in self._models.items():
            params, buffers = module_memory(model)
            out["weights"] += params
            out["buffers"] += buffers
            out[f"weights:{name}"] = params
            out["expert_bytes"] += sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                                       if ".experts." in n)
        out.update(device_memory(self._device))
        return out

    # -- extras the scheduler and server use when a backend has them ------------------------
    def eos_token_ids(self, model: str) -> list[int]:
        """Every token id that ends a sequence (tokenizer and generation config)."""
        return list(self._eos[self._check(model)])

    def source(self, model: str) -> str:
        """Where the model was loaded from."""
        return self._sources[self._check(model)]

    def dtype(self) -> Any:
        return self._dtype

    def _check(self, model: str) -> str:
        if model not in self._models:
            raise BackendError(f"unknown model {model!r}; served: {', '.join(self._models)}")
        return model
