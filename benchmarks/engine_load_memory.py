"""Peak memory of loading a checkpoint into an all-int4 expert plan, against transformers' own load.

    python benchmarks/engine_load_memory.py [--params-b 1.1] [--json out.json]

Writes (once, under ``$MOECAP_CACHE_DIR/bench/``) a random-weight Mixtral-architecture checkpoint of at
least ``--params-b`` billion parameters in float32, one safetensors shard per layer (written layer by
layer, so writing it never holds the model either), then loads it in two fresh processes:

- the engine (``load_engine_model``, streamed, every expert int4 and resident),
- transformers (``AutoModelForCausalLM.from_pretrained``, float32),

each time sampling the process's anonymous resident memory (``RssAnon``, what the process itself holds)
and its whole resident set (``VmRSS``, which also counts the checkpoint's memory-mapped file pages while
they are mapped: page cache, reclaimable) every 2 ms. Reported: peak growth of both over the process after
imports, the loaded footprint, the engine's bound (plan footprint + one layer's experts at full precision
+ 48 MiB), and wall time. (transformers keeps float32 tensors of a float32 checkpoint memory-mapped: its
anonymous peak understates what it holds, its VmRSS peak does not.) Goal (issue 15): engine peak <= its bound; transformers is reported beside it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

CHILD = textwrap.dedent("""
    import json, sys, threading, time
    import torch
    path, mode = sys.argv[1], sys.argv[2]

    def status():
        out = {}
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(("RssAnon:", "VmRSS:")):
                    out[line.split(":")[0]] = int(line.split()[1]) * 1024
        return out

    def anon():
        return status().get("RssAnon", 0)

    from moecap.engine.model import load_engine_model
    from moecap.engine.store import ExpertPlan
    from transformers import AutoModelForCausalLM
    base, base_rss = anon(), status().get("VmRSS", 0)
    peak, peak_rss = [base], [base_rss]
    done = threading.Event()
    def watch():
        while not done.is_set():
            st = status()
            peak[0] = max(peak[0], st.get("RssAnon", 0))
            peak_rss[0] = max(peak_rss[0], st.get("VmRSS", 0))
            time.sleep(0.002)
    t = threading.Thread(target=watch, daemon=True); t.start()
    t0 = time.perf_counter()
    if mode == "engine":
        m = load_engine_model(path, lambda a: ExpertPlan.uniform(a.experts_per_layer(), "fast", "int4"), "cpu",
                              torch.float32)
        footprint = m.non_expert_bytes() + sum(s.tier_nbytes()["fast"] + s.tier_nbytes()["host"] for s in m.stores)
        kernels = m.kernels()["experts"]
    else:
        m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        footprint = sum(p.numel() * p.element_size() for p in m.parameters())
        kernels = None
    seconds = time.perf_counter() - t0
    done.set(); t.join()
    peak[0] = max(peak[0], anon())
    print(json.dumps({"peak_growth": peak[0] - base, "rss_peak_growth": peak_rss[0] - base_rss, "footprint": footprint,
                      "seconds": seconds, "kernels": kernels}))
""")

# ~1.1 B parameters: 12 layers of 8 experts (hidden 1024, intermediate 3584), vocab 32000
CONFIG = dict(vocab_size=32000, hidden_size=1024, intermediate_size=3584, num_hidden_layers=12, num_attention_heads=16,
              num_key_value_heads=8, head_dim=64, num_local_experts=8, num_experts_per_tok=2,
              max_position_embeddings=4096, tie_word_embeddings=False)


def write_checkpoint(out: Path, cfg: dict, std: float = 0.02) -> int:
    """A random float32 checkpoint, one shard per layer (classic per-expert Mixtral names); its parameters."""
    import torch
    from safetensors.torch import save_file
    from transformers import MixtralConfig

    if (out / "model.safetensors.index.json").is_file():
        return json.loads((out / "params.json").read_text())["params"]
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    MixtralConfig(**cfg).save_pretrained(tmp)
    g = torch.Generator().manual_seed(0)
    h, inter, e = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_local_experts"]
    q, kv = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"]

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    weight_map: dict[str, str] = {}
    params = 0

    def write(name: str, tensors: dict) -> None:
        nonlocal params
        save_file(tensors, str(tmp / name))
        params += sum(v.numel() for v in tensors.values())
        weight_map.update(dict.fromkeys(tensors, name))

    write("model-embed.safetensors", {"model.embed_tokens.weight": rnd(cfg["vocab_size"], h)})
    for i in range(cfg["num_hidden_layers"]):  # one layer in memory at a time
        p = f"model.layers.{i}."
        t = {p + "input_layernorm.weight": torch.ones(h), p + "post_attention_layernorm.weight": torch.ones(h),
             p + "self_attn.q_proj.weight": rnd(q, h), p + "self_attn.k_proj.weight": rnd(kv, h),
             p + "self_attn.v_proj.weight": rnd(kv, h), p + "self_attn.o_proj.weight": rnd(h, q),
             p + "block_sparse_moe.gate.weight": rnd(e, h)}
        for x in range(e):
            b = f"{p}block_sparse_moe.experts.{x}."
            t.update({b + "w1.weight": rnd(inter, h), b + "w3.weight": rnd(inter, h), b + "w2.weight": rnd(h, inter)})
        write(f"model-layer{i:03d}.safetensors", t)
    write("model-head.safetensors", {"model.norm.weight": torch.ones(h), "lm_head.weight": rnd(cfg["vocab_size"], h)})
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (tmp / "params.json").write_text(json.dumps({"params": params}))
    tmp.rename(out)
    return params


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=CONFIG["num_hidden_layers"], help="layers (12: ~1.1 B parameters)")
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()

    from moecap.paths import cache_dir

    cfg = dict(CONFIG, num_hidden_layers=args.layers)
    path = cache_dir() / "bench" / f"mixtral-random-{args.layers}l"
    t0 = time.perf_counter()
    params = write_checkpoint(path, cfg)
    print(f"checkpoint {path}: {params / 1e9:.2f} B parameters (float32), ready in {time.perf_counter() - t0:.0f} s",
          file=sys.stderr)
    layer_full = cfg["num_local_experts"] * 3 * cfg["hidden_size"] * cfg["intermediate_size"] * 4
    result = {"checkpoint": str(path), "params": params, "one_layer_experts_full_bytes": layer_full}
    for mode in ("engine", "transformers"):
        if mode == "transformers" and args.skip_transformers:
            continue
        out = subprocess.run([sys.executable, "-c", CHILD, str(path), mode], capture_output=True, text=True)
        if out.returncode:
            print(out.stderr[-2000:], file=sys.stderr)
            return 1
        result[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    eng = result["engine"]
    bound = eng["footprint"] + layer_full + 48 * 2**20
    result["engine_bound"] = bound
    result["engine_within_bound"] = eng["peak_growth"] <= bound
    mib = 2**20
    print(f"engine (all int4, streamed): peak +{eng['peak_growth'] / mib:.0f} MiB anonymous "
          f"(+{eng['rss_peak_growth'] / mib:.0f} MiB with mapped file pages), footprint {eng['footprint'] / mib:.0f} MiB, "
          f"bound {bound / mib:.0f} MiB (footprint + one layer {layer_full / mib:.0f} MiB + 48 MiB), {eng['seconds']:.1f} s "
          f"-> {'within' if result['engine_within_bound'] else 'OVER'} the bound")
    if "transformers" in result:
        hf = result["transformers"]
        print(f"transformers (float32):      peak +{hf['peak_growth'] / mib:.0f} MiB anonymous "
              f"(+{hf['rss_peak_growth'] / mib:.0f} MiB with mapped file pages), footprint {hf['footprint'] / mib:.0f} MiB, "
              f"{hf['seconds']:.1f} s; engine / transformers: {eng['peak_growth'] / hf['peak_growth']:.2f} anonymous, "
              f"{eng['rss_peak_growth'] / hf['rss_peak_growth']:.2f} with file pages")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["engine_within_bound"] else 1


if __name__ == "__main__":
    sys.exit(main())
