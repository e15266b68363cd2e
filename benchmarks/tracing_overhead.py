"""Expert-tracing overhead on decode passes (goal: < 1 % of the decode pass time).

Alternates traced and untraced rounds of decode passes on the same model and prompts, in ABBA order
(so both see the same context lengths, and a drift in background load hits both alike); each round
starts from a fresh, untimed prefill. An untraced round runs the model as it is without moecap (no
tracer attached: no wrapper, no hook); a traced round runs it with the tracer attached and recording
every pass, as a run does. The traced time includes the collection the HF runner does after each batch (one
bincount over the batch's passes and one device-to-host copy), charged evenly to the traced passes.
Reports the ratio of the medians measured in this one run, and with ``--repeats N`` the median of N
such runs' ratios with their range.

    python benchmarks/tracing_overhead.py                         # tiny-moe on the CPU
    python benchmarks/tracing_overhead.py --model random:mixtral-8x7b --set num_hidden_layers=4 \
        --device cuda --dtype bfloat16 --batch 8
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import yaml
from transformers import DynamicCache

from moecap.models import load_causal_lm
from moecap.runners.tracing import ExpertTracer
from moecap.suite import ModelConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-moe")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (random: models)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--steps", type=int, default=48, help="timed decode passes per round")
    ap.add_argument("--rounds", type=int, default=8, help="rounds per repeat, traced and untraced in turn (ABBA)")
    ap.add_argument("--repeats", type=int, default=1, help="independent measurements (each of --rounds rounds); "
                    "the figure is the median of their ratios")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()

    overrides = {k: yaml.safe_load(v) for k, _, v in (s.partition("=") for s in args.set)}
    model, _, _ = load_causal_lm(
        ModelConfig(id=args.model, overrides=overrides), args.device, getattr(torch, args.dtype), "sdpa"
    )
    cuda = args.device.startswith("cuda")

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    tracer = ExpertTracer(model)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.prompt), generator=gen).to(args.device)

    plain: list[float] = []
    traced: list[float] = []

    def one_round(mode: bool, keep: bool) -> None:
        """A fresh prefill, then decode passes, all traced (the tracer attached for the round and
        recording every pass, as in a run) or all untraced (no tracer attached at all)."""
        if mode:
            tracer.attach()
        cache = DynamicCache(config=model.config)
        out = model(input_ids=ids, past_key_values=cache, use_cache=True)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        times = []
        for _ in range(args.steps):
            sync()
            t0 = time.perf_counter()
            if mode:
                tracer.begin_pass()
            out = model(input_ids=tok, past_key_values=cache, use_cache=True)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            if mode:
                tracer.end_pass(defer=True)  # as the runner does for decode passes
            sync()
            times.append(time.perf_counter() - t0)
        if mode:
            # the runner counts a batch's deferred passes at its end: charge that evenly to the traced passes
            t0 = time.perf_counter()
            counts = tracer.flush()
            flush_s = time.perf_counter() - t0
            assert len(counts) == args.steps and all(c is not None for c in counts)
            times = [t + flush_s / args.steps for t in times]
            tracer.detach()
        if keep:
            (traced if mode else plain).extend(times)

    ratios: list[float] = []
    with torch.inference_mode():
        one_round(True, keep=False)  # warm-up, both ways
        one_round(False, keep=False)
        for _ in range(max(1, args.repeats)):
            start_p, start_t = len(plain), len(traced)
            for r in range(args.rounds):  # traced, untraced, untraced, traced, ...: a drift hits both alike
                one_round(r % 4 in (0, 3), keep=True)
            ratios.append(statistics.median(traced[start_t:]) / statistics.median(plain[start_p:]) - 1.0)

    med_plain = statistics.median(plain)
    med_traced = statistics.median(traced)
    result = {
        "model": args.model,
        "overrides": overrides,
        "device": args.device,
        "dtype": args.dtype,
        "batch": args.batch,
        "moe_layers": len(tracer.layers),
        "decode_passes_each": len(plain),
        "median_decode_pass_ms_untraced": med_plain * 1e3,
        "median_decode_pass_ms_traced": med_traced * 1e3,
        "overhead_ratio": statistics.median(ratios),
        "overhead_ratio_per_repeat": ratios,
        "overhead_ratio_range": [min(ratios), max(ratios)],
        "goal": "< 0.01 (median of the repeats)",
    }
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
