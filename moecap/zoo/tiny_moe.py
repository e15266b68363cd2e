"""``tiny-moe``: the embedded default model.

A small Mixtral-architecture MoE (8 experts, top-2) with a byte-level BPE tokenizer trained on the
Python standard library's source. This builder makes it with deterministic random weights (seed 0);
it is saved as an ordinary Hugging Face model directory, so every runner loads it like a hub model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from moecap.paths import cache_dir

BUILDER_VERSION = 1

TINY_MOE_CONFIG: dict[str, Any] = {
    "model_type": "mixtral",
    "architectures": ["MixtralForCausalLM"],
    "vocab_size": 4096,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "sliding_window": None,
    "router_aux_loss_coef": 0.02,
}

SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>"]


def tiny_moe_dir(root: Path | None = None) -> Path:
    return (root or cache_dir() / "zoo") / f"tiny-moe-random-v{BUILDER_VERSION}"


def build_tokenizer(vocab_size: int, text: str):
    """A byte-level BPE (GPT-2 pre-tokenization) trained on ``text``, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    chunk = 1 << 16
    tok.train_from_iterator((text[i : i + chunk] for i in range(0, len(text), chunk)), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>", pad_token="<|pad|>"
    )


def build_tiny_moe(out_dir: Path, config: dict[str, Any] | None = None, text_chars: int = 2_000_000) -> Path:
    """Build the tokenizer and the random-weight model into ``out_dir`` (replaced atomically)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from moecap.corpus import stdlib_text

    cfg = dict(config or TINY_MOE_CONFIG)
    tokenizer = build_tokenizer(cfg["vocab_size"], stdlib_text(text_chars))
    cfg["vocab_size"] = len(tokenizer)
    cfg["eos_token_id"] = tokenizer.eos_token_id
    cfg["bos_token_id"] = tokenizer.bos_token_id
    cfg["pad_token_id"] = tokenizer.pad_token_id
    model_type = cfg.pop("model_type")
    hf_config = AutoConfig.for_model(model_type, **cfg)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "moecap.json").write_text(
        json.dumps({"builder": "tiny-moe", "builder_version": BUILDER_VERSION, "trained": False, "seed": 0}, indent=2)
    )
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


def ensure_tiny_moe(root: Path | None = None) -> Path:
    """The cached model directory, built on first use."""
    out = tiny_moe_dir(root)
    if not (out / "moecap.json").is_file():
        import sys

        print(f"moecap: building tiny-moe into {out} (first use, a few seconds) ...", file=sys.stderr)
        build_tiny_moe(out)
    return out
