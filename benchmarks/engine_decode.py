"""Decode speed of moecap's engine against transformers, and against the physical bound of its placement.

    python benchmarks/engine_decode.py [--model tiny-moe] [--device cpu] [--steps 64] [--repeats 5]

All configurations are measured in one run, interleaved round by round (so that drift on a shared
machine hits them alike): batch-1 greedy decode with a KV cache, after a 64-token prompt, the median
of per-round tokens/s reported. Printed:

- engine resident (every expert on the fast device, full precision) / transformers: goal >= 1.0 (the
  store's indirection costs nothing); greedy tokens are checked identical;
- each offloaded or quantized placement: tokens/s and the ratio to its bound, bytes a decode pass must
  move / the bandwidth that limits it: host memory (calibrated copy bandwidth) for experts computed on
  the CPU, the host-to-device link (``--link-gbs``) for experts copied to a GPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-moe")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--link-gbs", type=float, default=25.0, help="host-to-device bandwidth for the copy bound")
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from moecap.engine.store import CostModel, ExpertPlan, experts_per_layer, install
    from moecap.hardware import calibrate, detect_hardware, load_calibration, resolve_peaks
    from moecap.models import local_path_for

    path = local_path_for(args.model)
    dtype = getattr(torch, args.dtype)
    dev = torch.device(args.device)
    hw = detect_hardware(args.device)
    peaks = load_calibration(hw.device_name, args.dtype) if dev.type == "cpu" else None
    if peaks is None:
        peaks = calibrate("cpu", "float32") if dev.type == "cpu" else resolve_peaks(hw, args.dtype)
    host = load_calibration(detect_hardware("cpu").device_name, "float32") or calibrate("cpu", "float32")
    host_bw = host.mem_bandwidth_Bps

    def fresh():
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(dev).eval()

    configs: dict[str, tuple] = {"transformers": (None, None)}
    per = experts_per_layer(fresh())
    configs["engine resident"] = (ExpertPlan.uniform(per, "fast", "full"), "auto")
    configs["engine host, cpu"] = (ExpertPlan.uniform(per, "host", "full"), "cpu")
    configs["engine host, copy"] = (ExpertPlan.uniform(per, "host", "full"), "copy")
    configs["engine int8"] = (ExpertPlan.uniform(per, "fast", "int8"), "auto")
    configs["engine int4"] = (ExpertPlan.uniform(per, "fast", "int4"), "auto")
    models, stores = {}, {}
    for name, (plan, mode) in configs.items():
        m = fresh()
        if plan is not None:
            stores[name] = install(m, plan, dev, CostModel(mode=mode, link_Bps=args.link_gbs * 1e9), cache_size=0)
        models[name] = m

    prompt = torch.randint(5, int(models["transformers"].config.vocab_size), (1, 64), generator=torch.Generator().manual_seed(0)).to(dev)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    @torch.inference_mode()
    def decode(m) -> tuple[float, list[int]]:
        out = m(prompt, use_cache=True)
        cache, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        toks = []
        sync()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            out = m(tok, past_key_values=cache, use_cache=True)
            cache, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
            toks.append(int(tok))
        sync()
        return args.steps / (time.perf_counter() - t0), toks

    for m in models.values():  # warm-up
        decode(m)
    rates: dict[str, list[float]] = {k: [] for k in models}
    tokens: dict[str, list[int]] = {}
    for _ in range(args.repeats):
        for name, m in models.items():
            r, toks = decode(m)
            rates[name].append(r)
            tokens[name] = toks
    med = {k: statistics.median(v) for k, v in rates.items()}

    m0 = models["transformers"]
    cfg = m0.config
    non_expert = sum(p.numel() * p.element_size() for n, p in m0.named_parameters() if ".experts." not in n)
    k = cfg.num_experts_per_tok
    print(f"model {args.model} ({path}), device {args.device} ({hw.device_name}), dtype {args.dtype}, "
          f"batch 1, {args.steps} decode steps after 64 prompt tokens, median of {args.repeats} interleaved rounds")
    print(f"host memory bandwidth (calibrated copy): {host_bw / 1e9:.1f} GB/s; link for copies: {args.link_gbs} GB/s")
    print(f"{'configuration':22s} {'tok/s':>9s} {'vs hf':>7s} {'bound tok/s':>12s} {'of bound':>9s}  greedy = hf")
    for name in models:
        bound = None
        if name in stores:
            per_pass_expert = 0.0
            for s in stores[name]:
                sizes = s.expert_nbytes()
                per_pass_expert += k * sum(sizes) / len(sizes)  # k experts per layer at batch 1
            if name.endswith("copy") and dev.type == "cuda":
                bound = args.link_gbs * 1e9 / per_pass_expert
            else:
                bw = host_bw if "host" in name else peaks.mem_bandwidth_Bps
                bound = bw / (non_expert + per_pass_expert)
        same = tokens[name] == tokens["transformers"]
        print(f"{name:22s} {med[name]:9.1f} {med[name] / med['transformers']:7.3f} "
              f"{(f'{bound:12.1f}' if bound else '           -')} {(f'{med[name] / bound:9.3f}' if bound else '        -')}"
              f"  {'yes' if same else 'NO'}")
    ok = tokens["engine resident"] == tokens["transformers"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
