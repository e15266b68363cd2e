"""Resolving and loading the models a suite names.

- an embedded model (``tiny-moe``): built locally on first use and cached;
- ``random:<config>``: random weights on a real architecture config (built-in name, config.json path or
  a hub id whose config is fetched), for throughput runs where weights cannot be downloaded;
- a local model directory or a Hugging Face id: real weights through ``from_pretrained``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moecap.registry import EMBEDDED_MODELS, load_object


class ModelLoadError(RuntimeError):
    """A model that could not be loaded; the message says which and why."""


_PRIVATE_CONFIG_KEYS = ("_source", "_name_or_path", "transformers_version")


def random_config_dict(ref: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The architecture config behind ``random:<ref>``, with overrides applied."""
    from moecap.metrics.accounting import builtin_config_names, load_builtin_config

    if ref in builtin_config_names():
        cfg = load_builtin_config(ref)
    else:
        p = Path(ref).expanduser()
        if p.is_dir():
            p = p / "config.json"
        if p.is_file():
            cfg = json.loads(p.read_text(encoding="utf-8"))
        else:
            try:
                from transformers import AutoConfig

                cfg = AutoConfig.from_pretrained(ref).to_dict()
            except Exception as err:  # offline, private or misspelt
                raise ModelLoadError(
                    f"random:{ref}: could not fetch the config of {ref!r} from the Hugging Face hub ({err}); "
                    f"built-in configs work offline: {', '.join(builtin_config_names())}"
                ) from err
    cfg = {k: v for k, v in cfg.items() if k not in _PRIVATE_CONFIG_KEYS}
    # random weights are never quantized checkpoints (gpt-oss ships MXFP4 experts)
    cfg.pop("quantization_config", None)
    for key, value in (overrides or {}).items():
        cfg[key] = value
    if "num_hidden_layers" in (overrides or {}) and isinstance(cfg.get("layer_types"), list):
        cfg["layer_types"] = cfg["layer_types"][: cfg["num_hidden_layers"]]
    return cfg


def hf_config_from_dict(cfg: dict[str, Any]):
    from transformers import AutoConfig

    cfg = dict(cfg)
    model_type = cfg.pop("model_type")
    return AutoConfig.for_model(model_type, **cfg)


def parse_model_specs(specs: list[str]) -> dict[str, str]:
    """``MODEL`` or ``NAME=MODEL`` arguments (``moecap serve``'s) -> {served name: source}. A directory is
    served under its folder name, anything else (an embedded name, a hub id) under itself."""
    import os

    out: dict[str, str] = {}
    for spec in specs:
        name, sep, source = spec.partition("=")
        if not sep or not name or "/" in name or os.sep in name:
            name, source = "", spec
        if not source:
            raise ValueError(f"{spec!r}: empty model")
        if not name:
            p = Path(source).expanduser()
            name = p.resolve().name if p.is_dir() else source
        if name in out:
            raise ValueError(f"two models are served as {name!r}; name them with NAME=MODEL")
        out[name] = source
    if not out:
        raise ValueError("no models given")
    return out


def local_path_for(model_id: str) -> str:
    """Embedded names become their (built on first use) cache folder; other ids pass through."""
    entry = EMBEDDED_MODELS.get(model_id)
    if entry is not None:
        return str(load_object(entry.builder)())
    return model_id


def load_causal_lm(model_cfg: Any, device: str, dtype: Any, attn_implementation: str | None):
    """Return ``(model, tokenizer or None, source)`` with the model in eval mode on ``device``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"dtype": dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation

    if model_cfg.id.startswith("random:"):
        ref = model_cfg.id.split(":", 1)[1]
        config = hf_config_from_dict(random_config_dict(ref, model_cfg.overrides))
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, **kwargs)
        return model.eval(), None, {"kind": "random", "config": ref, "overrides": model_cfg.overrides}

    path = local_path_for(model_cfg.id)
    kind = "embedded" if model_cfg.id in EMBEDDED_MODELS else ("local" if Path(path).is_dir() else "hub")
    if model_cfg.overrides:
        raise ModelLoadError(
            f"model {model_cfg.id!r}: 'overrides' change the architecture and apply to random: models only"
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            revision=model_cfg.revision,
            trust_remote_code=model_cfg.trust_remote_code,
            device_map=device,
            **kwargs,
        )
    except OSError as err:
        hint = (
            " (no network? set HF_HUB_OFFLINE=1 with a populated cache, or use a local directory, "
            "'random:<config>' or an embedded model)"
            if kind == "hub"
            else ""
        )
        raise ModelLoadError(f"could not load model {model_cfg.id!r}: {err}{hint}") from err
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            path, revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code
        )
    except Exception:  # a model without a tokenizer still runs random-token workloads
        tokenizer = None
    return model.eval(), tokenizer, {"kind": kind, "path": path, "revision": model_cfg.revision}
