"""Decode speed of moecap's engine against transformers and llama.cpp, on one model, in one run.

    python benchmarks/engine_vs_llamacpp.py [--rounds 5] [--steps 128] [--json out.json]
    python benchmarks/engine_vs_llamacpp.py --breakdown          # also the per-layer time breakdown
    python benchmarks/engine_vs_llamacpp.py --served             # also llama.cpp served over HTTP (moecap run)
    # with a GPU: a random Mixtral-8x7B with 8 layers in bf16, resident and offloaded
    python benchmarks/engine_vs_llamacpp.py --model random:mixtral-8x7b --layers 8 --device cuda --dtype bfloat16 \\
        --configs resident,int4-host --fast-budget-gb 8

The model (default): a 114M-parameter Mixtral-architecture model (6 layers, hidden 512, intermediate
1408, 8 experts top-2, 8 heads), random weights, the embedded tiny-moe tokenizer, float32, saved once
under ``$MOECAP_CACHE_DIR/bench/`` and exported to GGUF (f32, q8_0, q4_0) by moecap's exporter.

Every configuration is measured the same way, interleaved round by round (so that drift on a shared
machine hits all alike): batch 1, a 64-token prompt, then ``--steps`` greedy decode steps, each step's
logits argmax'd on the host; TPOT = (last token - first token) / (tokens - 1), vLLM's definition; the
median over rounds is reported. Configurations:

- ``transformers``: the Hugging Face model, eager (sdpa attention), ``DynamicCache``;
- ``engine full`` / ``int8`` / ``int4``: the engine with every expert resident at that precision;
- ``engine mixed``: a mixture of precisions (int8/int4 per expert by frequency x sensitivity, profiled on
  the embedded corpora) under a budget of 40 % of the experts' full-precision bytes;
- ``llama.cpp f32`` / ``q8_0`` / ``q4_0``: the same weights in GGUF, llama.cpp's own decode loop called
  in-process through llama-cpp-python (``Llama.eval``: the C library, no server), with as many threads as
  torch uses. (llama.cpp's q8_0/q4_0 quantize every matrix, attention and LM head included; the engine
  quantizes the routed experts only, and keeps the rest in the model's dtype.)

``--served`` adds the figures the issue's table used: ``moecap run`` of the ``llamacpp`` runner
(llama-cpp-python's OpenAI server, measured over HTTP) and of the ``engine`` runner, TPOT p50 of each cell.

Ratios are llama.cpp's TPOT over the configuration's (> 1: faster than llama.cpp). Goals (issue 15):
engine full >= 0.8x llama.cpp f32, engine int8 >= 1.0x llama.cpp q8_0, int4 faster than int8 faster than
full, full-precision greedy tokens identical to transformers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

MIXTRAL_114M = dict(vocab_size=4096, hidden_size=512, intermediate_size=1408, num_hidden_layers=6,
                    num_attention_heads=8, num_key_value_heads=8, head_dim=64, num_local_experts=8,
                    num_experts_per_tok=2, max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0,
                    tie_word_embeddings=False, sliding_window=None)


def build_checkpoint(out: Path, config: dict[str, Any] | None = None, seed: int = 0) -> Path:
    """A random-weight Mixtral-architecture checkpoint with the embedded tokenizer, written once."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, MixtralConfig

    from moecap.models import local_path_for

    if (out / "model.safetensors").is_file() or (out / "model.safetensors.index.json").is_file():
        return out
    cfg = MixtralConfig(**(config or MIXTRAL_114M))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(local_path_for("tiny-moe")).save_pretrained(tmp)
    tmp.rename(out)
    return out


# ------------------------------------------------------------------------------------- decoders
class Decoder:
    """One configuration: ``prefill(prompt)`` then ``step()`` returns the next greedy token."""

    name = ""
    tokens: list[int]

    def run(self, prompt: list[int], steps: int) -> tuple[float, list[int]]:
        """TPOT in seconds over ``steps`` greedy tokens after the prompt, and the tokens."""
        self.prefill(prompt)
        times = [time.perf_counter()]
        toks = [self.first]
        for _ in range(steps - 1):
            toks.append(self.step())
            times.append(time.perf_counter())
        return (times[-1] - times[0]) / (len(times) - 1), toks

    def prefill(self, prompt: list[int]) -> None: ...

    def step(self) -> int: ...


class TorchDecoder(Decoder):
    def __init__(self, name: str, model: Any, new_cache: Callable[[int], Any], keep_last: bool, device: str):
        import torch

        self.torch = torch
        self.name, self.model, self.new_cache, self.keep_last, self.device = name, model, new_cache, keep_last, device

    def _call(self, ids: Any) -> int:
        kw = {"logits_to_keep": 1} if self.keep_last else {}
        out = self.model(input_ids=ids, past_key_values=self.cache, use_cache=True, **kw)
        tok = out.logits[:, -1].argmax(-1)
        self.next = tok[:, None]
        return int(tok)

    def prefill(self, prompt: list[int]) -> None:
        with self.torch.inference_mode():
            self.cache = self.new_cache(len(prompt) + 512)
            self.first = self._call(self.torch.tensor([prompt], device=self.device))

    def step(self) -> int:
        with self.torch.inference_mode():
            return self._call(self.next)


class LlamaDecoder(Decoder):
    def __init__(self, name: str, gguf: Path, threads: int):
        from llama_cpp import Llama

        self.name = name
        self.llm = Llama(model_path=str(gguf), n_ctx=1024, n_threads=threads, n_threads_batch=threads, n_batch=512,
                         verbose=False)

    def _argmax(self) -> int:
        return int(self.llm.scores[self.llm.n_tokens - 1].argmax())

    def prefill(self, prompt: list[int]) -> None:
        self.llm.reset()
        self.llm.eval(prompt)
        self.first = self._argmax()
        self.last = self.first

    def step(self) -> int:
        self.llm.eval([self.last])
        self.last = self._argmax()
        return self.last


def decode_traffic(model: Any, steps: int, decoder: TorchDecoder, prompt: list[int]) -> dict[str, float]:
    """Bytes one batch-1 decode step of the engine reads, by tier, over ``steps`` logged steps: the
    non-expert weights (one embedding row, the whole LM head), and for every expert each step ran, its
    stored bytes; host experts split into those the host computed and those copied over the link."""
    stores = model.stores
    for s in stores:
        s.log_passes = True
        s.take_pass_log()
    emb = model.embed
    non_expert = model.non_expert_bytes() - emb.numel() * emb.element_size() + emb.shape[1] * emb.element_size()
    used = {"fast": 0.0, "host": 0.0, "link": 0.0}
    counts = {s.layer: [0] * s.num_experts for s in stores}

    def pre(store: Any):
        def hook(_m: Any, args: tuple) -> None:
            for e in args[1].reshape(-1).tolist():
                counts[store.layer][e] += 1
        return hook

    handles = [s.register_forward_pre_hook(pre(s)) for s in stores]
    try:
        decoder.prefill(prompt)
        for s in stores:
            s.take_pass_log()
        counts = {k: [0] * len(v) for k, v in counts.items()}
        for _ in range(steps):
            decoder.step()
    finally:
        for h in handles:
            h.remove()
    for s in stores:
        modes = {}
        for e, mode in s.take_pass_log():
            modes.setdefault(e, []).append(mode)
        sizes = s.expert_nbytes()
        where = s.expert_placements()
        for e, n in enumerate(counts[s.layer]):
            if not n:
                continue
            if where[e] == "fast":
                used["fast"] += n * sizes[e]
            for mode in modes.get(e, []):
                used["host" if mode == "cpu" else "fast"] += sizes[e]
                if mode == "copy":
                    used["link"] += sizes[e]
        s.log_passes = False
    out = {k: v / steps for k, v in used.items()}
    out["fast"] += non_expert
    out["total_read"] = out["fast"] + out["host"]
    return out


# ------------------------------------------------------------------------------------- breakdown
class _Timed:
    """A stand-in for one of the engine's kernel objects that adds its call time to ``acc[key]``."""

    def __init__(self, inner: Any, acc: dict[str, float], key: str):
        self.inner, self.acc, self.key = inner, acc, key

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def __call__(self, x: Any) -> Any:
        t0 = time.perf_counter()
        y = self.inner(x)
        self.acc[self.key] = self.acc.get(self.key, 0.0) + time.perf_counter() - t0
        return y


def layer_breakdown(dec: TorchDecoder, prompt: list[int], steps: int, engine: bool) -> dict[str, float]:
    """Microseconds per decode step per layer: the whole layer, its attention, its MoE block, and (engine)
    the attention and expert matmuls inside them, from timers around each part (~1 us each)."""
    layers = dec.model.model.layers
    acc: dict[str, float] = {}
    swapped: list[tuple[Any, str, Any]] = []

    def swap(obj: Any, attr: str, new: Any) -> None:
        swapped.append((obj, attr, obj.__dict__.get(attr)))
        obj.__dict__[attr] = new

    def timed_forward(module: Any, key: str) -> None:
        inner = module.forward

        def forward(*a: Any, **k: Any) -> Any:
            t0 = time.perf_counter()
            out = inner(*a, **k)
            acc[key] = acc.get(key, 0.0) + time.perf_counter() - t0
            return out

        swap(module, "forward", forward)

    for layer in layers:
        timed_forward(layer, "layer")
        timed_forward(layer.self_attn, "attention")
        timed_forward(layer.mlp, "moe block")
        if engine:
            for attr in ("qkv", "o"):
                swap(layer.self_attn, attr, _Timed(getattr(layer.self_attn, attr), acc, "attention matmuls"))
            for ex in layer.mlp.experts.experts:
                for attr in ("gate_up", "down"):
                    swap(ex, attr, _Timed(getattr(ex, attr), acc, "expert matmuls"))
    try:
        dec.prefill(prompt)
        acc.clear()
        for _ in range(steps):
            dec.step()
    finally:
        for obj, attr, old in reversed(swapped):
            if old is None:
                obj.__dict__.pop(attr, None)
            else:
                obj.__dict__[attr] = old
    n = steps * len(layers)
    out = {k: v / n * 1e6 for k, v in acc.items()}
    out["rest of layer (norms, residuals, calls)"] = out["layer"] - out["attention"] - out["moe block"]
    return out


# ------------------------------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mixtral-114m", help="mixtral-114m (built here), a checkpoint directory, "
                    "or random:<config> (engine configurations only)")
    ap.add_argument("--layers", type=int, help="random:<config>: number of layers")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, help="torch and llama.cpp threads (default: torch's)")
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--configs", default="transformers,full,int8,int4,mixed,llama-f32,llama-q8_0,llama-q4_0",
                    help="comma-separated: transformers, full, int8, int4, mixed, int4-host, llama-f32, llama-q8_0, llama-q4_0")
    ap.add_argument("--mixed-budget", type=float, default=0.4, help="mixed: budget as a share of full-precision expert bytes")
    ap.add_argument("--fast-budget-gb", type=float, help="int4-host: fast memory for experts, GB")
    ap.add_argument("--breakdown", action="store_true", help="also time each layer's parts (transformers vs engine full)")
    ap.add_argument("--served", action="store_true", help="also moecap run the llamacpp and engine runners (HTTP)")
    ap.add_argument("--json", help="write the figures here too")
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moecap.engine.calibration import calibration_windows
    from moecap.engine.model import Arch, RandomSource, build, load_engine_model
    from moecap.engine.planner import full_expert_bytes, make_plan, mixed_plan, profile
    from moecap.engine.store import ExpertPlan
    from moecap.paths import cache_dir

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    dtype = getattr(torch, args.dtype)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    random_model = args.model.startswith("random:")
    if random_model:
        from moecap.models import hf_config_from_dict, random_config_dict

        over = {"num_hidden_layers": args.layers} if args.layers else {}
        config = hf_config_from_dict(random_config_dict(args.model.split(":", 1)[1], over))
        path, tok = None, None
        configs = [c for c in configs if not c.startswith("llama") and c != "transformers"]
    else:
        path = build_checkpoint(cache_dir() / "bench" / "mixtral-114m") if args.model == "mixtral-114m" else Path(args.model)
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(path)
        tok = AutoTokenizer.from_pretrained(path)
    arch = Arch.from_config(config)
    per = arch.experts_per_layer()
    prompt = torch.randint(5, arch.vocab, (args.prompt_tokens,), generator=torch.Generator().manual_seed(0)).tolist()

    cost = None
    if args.device.startswith("cuda"):  # host experts: the measured link and host kernels decide (cached)
        from moecap.engine.rates import measured_cost_model

        cost = measured_cost_model(torch.device(args.device), dtype)

    def engine(plan: Any) -> Any:
        if random_model:
            return build(config, RandomSource(config), plan, args.device, dtype, cost)
        return load_engine_model(path, plan, args.device, dtype, cost)

    decoders: list[Decoder] = []
    notes: dict[str, Any] = {}
    t_load = time.perf_counter()
    for c in configs:
        if c == "transformers":
            hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(args.device).eval()

            def hf_cache(n: int, hf: Any = hf) -> Any:
                from transformers import DynamicCache

                return DynamicCache(config=hf.config)

            decoders.append(TorchDecoder("transformers", hf, hf_cache, False, args.device))
        elif c in ("full", "int8", "int4"):
            m = engine(ExpertPlan.uniform(per, "fast", c, name=f"all-{c}"))
            decoders.append(TorchDecoder(f"engine {c}", m, lambda n, m=m: m.new_cache(1, n), True, args.device))
            notes[f"engine {c}"] = m.kernels()
        elif c == "int4-host":
            # every expert int4; those beyond the fast-memory budget in host memory (shapes decide, no profile)
            plan = make_plan(arch.layout(dtype), None, quantize_fraction=1.0, precision="int4",
                             fast_budget_bytes=(args.fast_budget_gb or 8.0) * 1e9, name="int4-host")
            m = engine(plan)
            decoders.append(TorchDecoder("engine int4 host", m, lambda n, m=m: m.new_cache(1, n), True, args.device))
            notes["engine int4 host"] = {"plan": m.plan.summary(), "kernels": m.kernels()}
        elif c == "mixed":
            prof_model = engine(ExpertPlan.uniform(per, "fast", "full", name="profiling"))
            windows, what = calibration_windows(tok, "embedded", 8, 128, arch.vocab)
            prof = profile(prof_model, windows, precisions=("int8", "int4"), source=what)
            plan = mixed_plan(prof_model, prof, args.mixed_budget * full_expert_bytes(prof_model), ["int8", "int4"])
            del prof_model
            m = engine(plan)
            decoders.append(TorchDecoder("engine mixed", m, lambda n, m=m: m.new_cache(1, n), True, args.device))
            notes["engine mixed"] = {"plan": plan.summary(), "predicted_error": plan.notes["predicted_error"],
                                     "budget_share": args.mixed_budget}
        elif c.startswith("llama-"):
            from moecap.gguf_export import ensure_gguf

            wt = c.split("-", 1)[1]
            decoders.append(LlamaDecoder(f"llama.cpp {wt}", ensure_gguf(path, wt), threads))
        else:
            print(f"unknown configuration {c!r}", file=sys.stderr)
            return 2
    print(f"loaded {len(decoders)} configurations in {time.perf_counter() - t_load:.1f} s", file=sys.stderr)

    for d in decoders:  # warm-up
        d.run(prompt, 8)
    tpot: dict[str, list[float]] = {d.name: [] for d in decoders}
    tokens: dict[str, list[int]] = {}
    for r in range(args.rounds):
        for d in decoders:
            t, toks = d.run(prompt, args.steps)
            tpot[d.name].append(t * 1e3)
            tokens[d.name] = toks
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in tpot.items()), file=sys.stderr)
    med = {k: statistics.median(v) for k, v in tpot.items()}

    def ratio(ref: str, name: str) -> float | None:
        return med[ref] / med[name] if ref in med and name in med else None

    result: dict[str, Any] = {
        "model": str(path or args.model), "device": args.device, "dtype": args.dtype, "threads": threads,
        "prompt_tokens": args.prompt_tokens, "decode_steps": args.steps, "rounds": args.rounds,
        "tpot_ms_median": med, "tpot_ms_rounds": tpot, "notes": notes,
        "ratios": {"engine full / llama.cpp f32": ratio("llama.cpp f32", "engine full"),
                   "engine int8 / llama.cpp q8_0": ratio("llama.cpp q8_0", "engine int8"),
                   "engine int4 / llama.cpp q4_0": ratio("llama.cpp q4_0", "engine int4"),
                   "engine mixed / llama.cpp f32": ratio("llama.cpp f32", "engine mixed"),
                   "engine full / transformers": ratio("transformers", "engine full")},
    }
    if "transformers" in tokens and "engine full" in tokens:
        result["greedy_full_equals_transformers"] = tokens["engine full"] == tokens["transformers"]
    if all(k in med for k in ("engine full", "engine int8", "engine int4")):
        result["int4 < int8 < full"] = med["engine int4"] < med["engine int8"] < med["engine full"]
    # bytes per decode step and the bandwidth they imply: S-MBU (all bytes over the fast device's peak) and,
    # with host experts copied to a GPU, the share of the link bound reached
    from moecap.hardware import detect_hardware, resolve_peaks

    try:
        peak = resolve_peaks(detect_hardware(args.device), args.dtype, calibrate_if_missing=True).mem_bandwidth_Bps
    except Exception as err:  # no peaks: bytes and GB/s still print
        print(f"no bandwidth peak for {args.device}: {err}", file=sys.stderr)
        peak = None
    traffic = {}
    for d in decoders:
        if isinstance(d, TorchDecoder) and d.name.startswith("engine"):
            tr = decode_traffic(d.model, min(args.steps, 64), d, prompt)
            t = med[d.name] / 1e3
            tr["achieved_gbs"] = tr["total_read"] / t / 1e9
            if peak:
                tr["s_mbu_est"] = tr["total_read"] / t / peak
            cost = d.model.stores[0].cost if d.model.stores else None
            if tr["link"] and cost is not None:
                tr["link_bound_ms"] = tr["link"] / cost.link_Bps * 1e3
                tr["share_of_link_bound"] = tr["link_bound_ms"] / med[d.name]
            traffic[d.name] = tr
    result["decode_traffic"] = traffic
    if args.breakdown:
        bd = {}
        for d in decoders:
            if isinstance(d, TorchDecoder) and d.name in ("transformers", "engine full", "engine int4"):
                bd[d.name] = layer_breakdown(d, prompt, min(args.steps, 64), d.name != "transformers")
        result["per_layer_us"] = bd
    if args.served and path is not None:
        result["served"] = served(path, threads, args)
    print(f"\nmodel {result['model']}: batch 1, {args.prompt_tokens}-token prompt, {args.steps} decoded, "
          f"{threads} threads, median of {args.rounds} interleaved rounds")
    print(f"{'configuration':22s} {'TPOT ms':>9s} {'tok/s':>8s}")
    for k, v in med.items():
        print(f"{k:22s} {v:9.2f} {1e3 / v:8.1f}")
    print()
    for k, v in result["ratios"].items():
        if v is not None:
            print(f"{k:34s} {v:6.2f}x")
    for k in ("greedy_full_equals_transformers", "int4 < int8 < full"):
        if k in result:
            print(f"{k}: {result[k]}")
    if traffic:
        print("\nbytes one decode step reads (MB) and what they imply:")
        for name, tr in traffic.items():
            extra = f"  S-MBU {tr['s_mbu_est']:.3f}" if "s_mbu_est" in tr else ""
            if "share_of_link_bound" in tr:
                extra += f"  link {tr['link'] / 1e6:.1f} MB: {tr['share_of_link_bound']:.2f} of the link bound"
            print(f"  {name:18s} fast {tr['fast'] / 1e6:7.1f}  host {tr['host'] / 1e6:6.1f}  "
                  f"-> {tr['achieved_gbs']:6.1f} GB/s{extra}")
    if "per_layer_us" in result:
        print("\nper decode step, per layer (us):")
        for name, row in result["per_layer_us"].items():
            print(f"  {name:14s} " + "  ".join(f"{k} {v:.0f}" for k, v in sorted(row.items())))
    if "served" in result:
        print("\nserved (moecap run, TPOT p50 ms): " + ", ".join(f"{k} {v}" for k, v in result["served"].items()))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def served(path: Path, threads: int, args: Any) -> dict[str, Any]:
    """TPOT p50 of the llamacpp runner (llama-cpp-python's server over HTTP) and of the engine runner,
    from one ``moecap run`` (what the issue's table measured)."""
    import tempfile

    from moecap.run import run_suite
    from moecap.records import ResultStore
    from moecap.suite import parse_suite

    out = tempfile.mkdtemp(prefix="moecap-bench-")
    workload = {"name": "decode", "source": "random", "input_tokens": args.prompt_tokens, "output_tokens": args.steps,
                "num_prompts": 4, "seed": 0, "ignore_eos": True}
    served_runners = [{"type": "llamacpp", "name": f"llamacpp-{w}",
                       "args": {"weight_type": w, "n_threads": threads, "warmup_requests": 2}} for w in ("f32", "q8_0", "q4_0")]
    engine_runners = [{"type": "engine", "name": f"engine-{p}", "args": {"dtype": "float32", "plan": p, "num_threads": threads}}
                      for p in ("resident", "int8-all", "int4-all")]
    res: dict[str, Any] = {}
    for name, runners, load in (("served", served_runners, {"concurrency": 1}), ("engine", engine_runners, {"batch_size": 1})):
        suite = parse_suite({"name": f"engine-vs-llamacpp-{name}", "models": [{"id": str(path)}], "runners": runners,
                             "workloads": [workload], "loads": [load], "hardware": {"device": "cpu", "calibrate": "auto"},
                             "output": {"dir": out}}, "benchmark")
        outcome = run_suite(suite)
        for o in outcome.outcomes:
            rec = o.record or ResultStore(out, suite.name).load(o.cell.cell_id)
            if rec is None or rec.status != "ok":
                res[o.cell.runner.display_name] = f"failed: {(rec.error or '')[-200:] if rec else 'no record'}"
                continue
            lat = (rec.report or {}).get("latency") or {}
            tpot = lat.get("tpot_ms") or {}
            res[o.cell.runner.display_name] = round(tpot.get("median") or tpot.get("p50") or float("nan"), 2)
    return res


if __name__ == "__main__":
    sys.exit(main())
