"""``tiny-moe``: the embedded default model, trained here from text already on the machine.

A small Mixtral-architecture MoE (8 experts, top-2, hidden size 64) and its byte-level BPE tokenizer,
trained with a fixed seed on the Python installation's own text (``moecap.corpus``: standard-library code, English
reference documentation, C headers), then fine-tuned into one child per domain:

    <cache>/zoo/tiny-moe-v3-<profile>/base     -> model id ``tiny-moe``
    <cache>/zoo/tiny-moe-v3-<profile>/code     -> ``tiny-moe-code``
    <cache>/zoo/tiny-moe-v3-<profile>/prose    -> ``tiny-moe-prose``
    <cache>/zoo/tiny-moe-v3-<profile>/c        -> ``tiny-moe-c``
    <cache>/zoo/tiny-moe-v3-<profile>/build.json  the held-out perplexities measured at build time

Each is an ordinary Hugging Face model directory, so every runner loads it like a hub model.
Profiles: ``default`` (~1M parameters, 2.9M training tokens; the base in about 4 minutes on 2 CPU
cores, each child in under 1 more) and ``test`` (fewer steps and layers, for the test suite); ``$MOECAP_TINY_MOE_PROFILE``
picks one.

Why so small: on 2 CPU cores the training budget is a few million tokens, and for a fixed budget a
smaller model learns more per second and comes out less *under*-trained. An under-trained model
shrugs off weight noise: the earlier 4.4M-parameter tiny-moe (0.3 training tokens per parameter) lost
3% of perplexity with every expert at int2 and no accuracy at all, so quantization could not be seen
on its accuracy axis; this one (3 tokens per parameter) loses 12-15% of perplexity and 1-5 points of accuracy on the
``moecap_real`` tasks (``moecap run quality-cpu``).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from moecap.paths import atomic_write_text, cache_dir

BUILDER_VERSION = 3
SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>"]
VARIANTS = ("code", "prose", "c")

_BASE_CONFIG: dict[str, Any] = {
    "model_type": "mixtral",
    "architectures": ["MixtralForCausalLM"],
    "hidden_size": 64,
    "intermediate_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "sliding_window": None,
    "router_aux_loss_coef": 0.02,
}


@dataclass(frozen=True)
class Profile:
    name: str
    config: dict[str, Any]
    vocab_size: int
    seq_len: int
    batch_size: int
    base_steps: int
    finetune_steps: int
    lr: float
    finetune_lr: float
    tokenizer_chars: int  # characters per domain the tokenizer is trained on
    eval_windows: int  # held-out windows per domain for the build-time perplexities
    seed: int = 0


PROFILES: dict[str, Profile] = {
    "default": Profile(
        name="default",
        config=_BASE_CONFIG,
        vocab_size=4096,
        seq_len=512,
        batch_size=4,
        base_steps=1400,
        finetune_steps=100,
        lr=4e-3,
        finetune_lr=1e-3,
        tokenizer_chars=1_500_000,
        eval_windows=24,
    ),
    "test": Profile(
        name="test",
        config={
            **_BASE_CONFIG,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "max_position_embeddings": 256,
        },
        vocab_size=1024,
        seq_len=256,
        batch_size=8,
        base_steps=150,
        finetune_steps=60,
        lr=3e-3,
        finetune_lr=1e-3,
        tokenizer_chars=300_000,
        eval_windows=8,
    ),
}


def active_profile() -> Profile:
    name = os.environ.get("MOECAP_TINY_MOE_PROFILE", "default")
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(
            f"MOECAP_TINY_MOE_PROFILE={name!r}: unknown profile; allowed: {', '.join(PROFILES)}"
        ) from None


def zoo_root(profile: Profile | None = None) -> Path:
    profile = profile or active_profile()
    return cache_dir() / "zoo" / f"tiny-moe-v{BUILDER_VERSION}-{profile.name}"


# ---------------------------------------------------------------------------------------- pieces


def build_tokenizer(vocab_size: int, texts: list[str]):
    """A byte-level BPE (GPT-2 pre-tokenization) trained on ``texts``, as a transformers fast tokenizer."""
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
    tok.train_from_iterator((t[i : i + chunk] for t in texts for i in range(0, len(t), chunk)), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>", pad_token="<|pad|>"
    )


def _encode(tokenizer, text: str):
    import torch

    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def _eval_windows(ids, seq_len: int, n: int):
    """The first ``n`` non-overlapping windows of a held-out token stream (the perplexity convention)."""
    usable = min(n, len(ids) // seq_len)
    return ids[: usable * seq_len].view(usable, seq_len)


def held_out_perplexity(model, windows) -> float:
    """exp(mean NLL) over every predicted token of the windows."""
    import torch

    from moecap.metrics.perplexity import perplexity

    model.eval()
    nll, count = 0.0, 0
    with torch.inference_mode():
        for w in windows.split(8):
            logits = model(input_ids=w).logits[:, :-1].float()
            nll += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1), reduction="sum"))
            count += w[:, 1:].numel()
    return perplexity([(nll, count)])["perplexity"]


def _progress_line(desc: str, step: int, steps: int, loss: float, elapsed_s: float) -> str:
    left = elapsed_s / step * (steps - step) if step else 0.0
    return (f"moecap zoo: {desc} step {step}/{steps}, loss {loss:.3f}, "
            f"{_duration(elapsed_s)} elapsed, ~{_duration(left)} left")


def _duration(s: float) -> str:
    return f"{s:.0f} s" if s < 90 else f"{s / 60:.1f} min"


def train(model, streams: list, steps: int, lr: float, profile: Profile, seed: int, desc: str,
          log=None) -> list[float]:
    """AdamW with linear warm-up and cosine decay on random windows of ``streams`` (batches drawn
    round-robin from the streams, so that every domain weighs the same); returns the loss curve.

    Progress: a tqdm bar (step, loss, time left) on a terminal; otherwise, through ``log``, one line
    with the same figures at every tenth of the steps, so that a log or a CI job shows it too."""
    import torch
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup))))

    model.train()
    model.config.output_router_logits = True  # adds the load-balancing loss: every expert gets used
    losses: list[float] = []
    tty = sys.stderr.isatty()
    every = max(1, steps // 10)
    t0 = time.perf_counter()
    with tqdm(range(steps), desc=desc, unit="step", disable=not tty) as bar:
        for step in bar:
            stream = streams[step % len(streams)]
            starts = torch.randint(0, len(stream) - profile.seq_len - 1, (profile.batch_size,), generator=gen)
            batch = torch.stack([stream[s : s + profile.seq_len] for s in starts.tolist()])
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            out = model(input_ids=batch, labels=batch)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(out.loss.detach()))
            if step % 10 == 0:
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
            done = step + 1
            if not tty and log is not None and (done % every == 0 or done == steps):
                log(_progress_line(desc, done, steps, losses[-1], time.perf_counter() - t0))
    model.config.output_router_logits = False
    model.eval()
    return losses


def _save(model, tokenizer, out: Path, meta: dict[str, Any]) -> None:
    tmp = out.with_name(out.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "moecap.json").write_text(json.dumps(meta, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


# ---------------------------------------------------------------------------------------- builder


def _prepare(profile: Profile, log) -> tuple[Any, dict, dict]:
    """Tokenizer (trained, or loaded from an existing base) and the tokenized train/test streams."""
    from moecap.corpus import DOMAINS, domain_splits

    splits = {d: domain_splits(d) for d in DOMAINS}
    log(f"moecap zoo: training the {profile.vocab_size}-token BPE tokenizer on {', '.join(DOMAINS)} ...")
    tokenizer = build_tokenizer(profile.vocab_size, [splits[d]["train"][: profile.tokenizer_chars] for d in DOMAINS])
    train_ids = {d: _encode(tokenizer, splits[d]["train"]) for d in DOMAINS}
    test_windows = {
        d: _eval_windows(_encode(tokenizer, splits[d]["test"]), profile.seq_len, profile.eval_windows) for d in DOMAINS
    }
    return tokenizer, train_ids, test_windows


def build(profile: Profile | None = None, root: Path | None = None, variants: tuple[str, ...] = VARIANTS,
          log=lambda s: print(s, file=sys.stderr)) -> dict[str, Any]:
    """Train the tokenizer, the base model and its domain children; write them and ``build.json``.

    An already built base and already built children are reused (not retrained), so children can be
    added later; ``build_seconds`` is the time spent training what the folder holds (a run that trains
    nothing adds nothing), ``last_run_seconds`` this call's.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from moecap.corpus import DOMAINS

    profile = profile or active_profile()
    root = Path(root or zoo_root(profile))
    root.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    torch.manual_seed(profile.seed)
    summary_path = root / "build.json"
    summary: dict[str, Any] = json.loads(summary_path.read_text()) if summary_path.is_file() else {}

    tokenizer, train_ids, test_windows = _prepare(profile, log)
    common = {
        "builder": "tiny-moe",
        "builder_version": BUILDER_VERSION,
        "profile": asdict(profile),
        "trained": True,
        "corpus": "Python installation text (moecap.corpus): " + ", ".join(DOMAINS),
    }
    trained = False  # did this call train anything
    if (root / "base" / "moecap.json").is_file() and summary.get("base_test_perplexity"):
        model = AutoModelForCausalLM.from_pretrained(root / "base", dtype=torch.float32)
        log(f"moecap zoo: reusing the base model in {root / 'base'}")
    else:
        cfg = dict(profile.config)
        cfg.update(
            vocab_size=len(tokenizer),
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.bos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        trained = True
        model_type = cfg.pop("model_type")
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **cfg), dtype=torch.float32)
        n_params = sum(p.numel() for p in model.parameters())
        ppl_random = {d: held_out_perplexity(model, test_windows[d]) for d in DOMAINS}
        log(f"moecap zoo: {n_params / 1e6:.2f}M parameters; random-init test perplexity "
            + ", ".join(f"{d} {v:.0f}" for d, v in ppl_random.items()))
        losses = train(model, [train_ids[d] for d in DOMAINS], profile.base_steps, profile.lr, profile,
                       profile.seed, "tiny-moe base", log=log)
        ppl_base = {d: held_out_perplexity(model, test_windows[d]) for d in DOMAINS}
        log("moecap zoo: base test perplexity " + ", ".join(f"{d} {v:.2f}" for d, v in ppl_base.items()))
        _save(model, tokenizer, root / "base", {**common, "role": "base", "test_perplexity": ppl_base})
        summary = {
            "builder_version": BUILDER_VERSION,
            "profile": profile.name,
            "params": n_params,
            "seq_len": profile.seq_len,
            "eval_tokens_per_domain": {d: int(test_windows[d].numel()) for d in DOMAINS},
            "random_init_test_perplexity": ppl_random,
            "base_test_perplexity": ppl_base,
            "base_final_loss": losses[-1],
            "children": {},
            "torch_threads": torch.get_num_threads(),
        }
    base_state = {k: v.clone() for k, v in model.state_dict().items()}

    for domain in variants:
        if domain not in DOMAINS:
            raise ValueError(f"unknown tiny-moe variant {domain!r}; allowed: {', '.join(DOMAINS)}")
        if (root / domain / "moecap.json").is_file() and domain in summary.get("children", {}):
            log(f"moecap zoo: reusing the {domain} child in {root / domain}")
            continue
        trained = True
        model.load_state_dict(base_state)
        ft_losses = train(model, [train_ids[domain]], profile.finetune_steps, profile.finetune_lr, profile,
                          profile.seed + 1 + DOMAINS.index(domain), f"tiny-moe-{domain}", log=log)
        ppl = {d: held_out_perplexity(model, test_windows[d]) for d in DOMAINS}
        log(f"moecap zoo: {domain} child test perplexity " + ", ".join(f"{d} {v:.2f}" for d, v in ppl.items()))
        _save(model, tokenizer, root / domain, {**common, "role": "child", "domain": domain, "parent": "base",
                                                "test_perplexity": ppl})
        summary["children"][domain] = {"test_perplexity": ppl, "final_loss": ft_losses[-1]}

    took = time.perf_counter() - t_start
    if trained:  # the time spent training what is here; a run that only reused adds nothing
        summary["build_seconds"] = summary.get("build_seconds", 0.0) + took
    summary["last_run_seconds"] = took
    atomic_write_text(summary_path, json.dumps(summary, indent=2) + "\n")
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    from moecap.corpus import DOMAINS

    lines = [f"tiny-moe ({summary['profile']} profile, {summary['params'] / 1e6:.2f}M parameters, "
             f"built in {summary['build_seconds']:.0f} s); held-out token perplexity, {summary['seq_len']}-token windows:",
             f"  {'model':16s}" + "".join(f"{d:>10s}" for d in DOMAINS)]
    rows = [("random init", summary["random_init_test_perplexity"]), ("tiny-moe", summary["base_test_perplexity"])]
    rows += [(f"tiny-moe-{d}", c["test_perplexity"]) for d, c in summary["children"].items()]
    for name, ppl in rows:
        lines.append(f"  {name:16s}" + "".join(f"{ppl[d]:10.2f}" for d in DOMAINS))
    return "\n".join(lines)


def ensure_tiny_moe(variant: str = "base", root: Path | None = None) -> Path:
    """The cached model directory of ``variant`` (``base`` or a domain child), built on first use."""
    root = Path(root or zoo_root())
    out = root / variant
    if not (out / "moecap.json").is_file():
        print(f"moecap: building tiny-moe ({variant}) into {root}: trained here on first use "
              "(about 4 minutes on 2 CPU cores for the base, under 1 more per child) ...", file=sys.stderr)
        build(root=root, variants=() if variant == "base" else (variant,))
    return out


def ensure_code() -> Path:
    return ensure_tiny_moe("code")


def ensure_prose() -> Path:
    return ensure_tiny_moe("prose")


def ensure_c() -> Path:
    return ensure_tiny_moe("c")
