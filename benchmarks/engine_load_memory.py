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
import sys
import time
from pathlib import Path

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
    from moecap.engine.loadmem import measure_load

    for mode in ("engine", "transformers"):
        if mode == "transformers" and args.skip_transformers:
            continue
        result[mode] = measure_load(str(path), mode)
    eng = result["engine"]
    bound = eng["footprint_bytes"] + layer_full + 48 * 2**20
    result["engine_bound"] = bound
    result["engine_within_bound"] = eng["peak_anon_growth_bytes"] <= bound
    mib = 2**20
    print(f"engine (all int4, streamed): peak +{eng['peak_anon_growth_bytes'] / mib:.0f} MiB anonymous "
          f"(+{eng['peak_rss_growth_bytes'] / mib:.0f} MiB with mapped file pages), "
          f"footprint {eng['footprint_bytes'] / mib:.0f} MiB, "
          f"bound {bound / mib:.0f} MiB (footprint + one layer {layer_full / mib:.0f} MiB + 48 MiB), {eng['seconds']:.1f} s "
          f"-> {'within' if result['engine_within_bound'] else 'OVER'} the bound")
    if "transformers" in result:
        hf = result["transformers"]
        print(f"transformers (float32):      peak +{hf['peak_anon_growth_bytes'] / mib:.0f} MiB anonymous "
              f"(+{hf['peak_rss_growth_bytes'] / mib:.0f} MiB with mapped file pages), "
              f"footprint {hf['footprint_bytes'] / mib:.0f} MiB, {hf['seconds']:.1f} s; engine / transformers: "
              f"{eng['peak_anon_growth_bytes'] / hf['peak_anon_growth_bytes']:.2f} anonymous, "
              f"{eng['peak_rss_growth_bytes'] / hf['peak_rss_growth_bytes']:.2f} with file pages")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["engine_within_bound"] else 1


if __name__ == "__main__":
    sys.exit(main())
