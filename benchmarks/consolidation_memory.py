"""Peak memory of expert consolidation on a real-size checkpoint, against loading the children separately.

Builds (once, under ``--root``) a random-weight OLMoE-architecture base of about 350M parameters in
bfloat16 and three fine-tuned children (a few experts per layer perturbed in each, one child with a
re-trained router, every child's attention and embeddings perturbed a little, as fine-tuning does), saved
as safetensors like any hub checkpoint. Then, each step in a fresh process so nothing earlier counts:

- ``separate``: the three children loaded with transformers (bfloat16), as three models would be served;
- ``plan``: ``moecap engine consolidate``'s measurement (each child routed on its own data, experts read
  from the checkpoints one at a time) and the plan at threshold 0;
- ``serve``: the consolidated model built from the plan (a skeleton filled tensor by tensor, pooled
  experts, every child's non-expert weights in host memory) and 8 greedy tokens per child, switching
  children.

Reported per step: the process's peak resident set (``ru_maxrss``), its growth over the process after
its imports, and the seconds taken; beside the bytes of the children's checkpoints on disk. The goal of
the issue: planning and serving peak below the sum of the children's checkpoints.

    python benchmarks/consolidation_memory.py [--root DIR] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILDREN = ("code", "prose", "c")
# OLMoE's architecture (q/k norms, no shared expert), scaled to ~350M parameters: 8 layers of 20 experts
CONFIG = dict(vocab_size=32000, hidden_size=1024, intermediate_size=512, num_hidden_layers=8, num_attention_heads=16,
              num_key_value_heads=16, num_experts=20, num_experts_per_tok=4, max_position_embeddings=2048,
              tie_word_embeddings=False)
CHANGED_PER_LAYER = 2  # experts each child changed in every layer


def _rss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def _current_rss() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def build(root: Path) -> dict[str, Path]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, OlmoeConfig

    from moecap.engine.store import moe_blocks
    from moecap.models import local_path_for

    dirs = {"base": root / "base", **{c: root / c for c in CHILDREN}}
    if all((d / "model.safetensors").is_file() or (d / "model.safetensors.index.json").is_file() for d in dirs.values()):
        return dirs
    tok = AutoTokenizer.from_pretrained(local_path_for("tiny-moe"))  # any tokenizer: ids beyond it are fine
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(OlmoeConfig(**CONFIG), dtype=torch.bfloat16).eval()
    n = sum(p.numel() for p in model.parameters())
    print(f"base: {n / 1e6:.0f}M parameters", file=sys.stderr)
    model.save_pretrained(dirs["base"])
    tok.save_pretrained(dirs["base"])
    del model
    gen = torch.Generator().manual_seed(1)
    for k, child in enumerate(CHILDREN):
        model = AutoModelForCausalLM.from_pretrained(dirs["base"], dtype=torch.bfloat16).eval()
        with torch.no_grad():
            for i, _, block in moe_blocks(model):
                start = k * CHANGED_PER_LAYER + i  # each child its own experts, moving with the layer
                for e in ((start + j) % CONFIG["num_experts"] for j in range(CHANGED_PER_LAYER)):
                    for p in (block.experts.gate_up_proj, block.experts.down_proj):
                        w = p.data[e].float()
                        p.data[e] = (w + 0.3 * w.std() * torch.randn(w.shape, generator=gen)).to(p.dtype)
                if k == 1:  # a re-trained router
                    g = block.gate.weight
                    g.data = (g.data.float() + g.data.float().std() * torch.randn(g.shape, generator=gen)).to(g.dtype)
            for name, p in model.named_parameters():  # fine-tuning moves the rest a little too
                if ".experts." not in name and p.dim() == 2:
                    w = p.data.float()
                    p.data = (w + 0.01 * w.std() * torch.randn(w.shape, generator=gen)).to(p.dtype)
        model.save_pretrained(dirs[child])
        tok.save_pretrained(dirs[child])
        del model
    return dirs


def _step(step: str, root: Path) -> dict:
    """One measurement, in this (fresh) process."""
    import torch
    importlib.import_module("transformers")  # its import is the process's, not the step's

    import moecap.engine.consolidate as cons

    dirs = {"base": root / "base", **{c: root / c for c in CHILDREN}}
    kids = {c: dirs[c] for c in CHILDREN}
    data = {c: f"tiny-{c}" for c in CHILDREN}
    torch.set_grad_enabled(False)
    after_imports = _current_rss()
    t0 = time.perf_counter()
    out: dict = {"step": step}
    if step == "separate":
        from transformers import AutoModelForCausalLM

        models = {c: AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16).eval() for c, d in kids.items()}
        out["weights_bytes"] = sum(p.numel() * p.element_size() for m in models.values() for p in m.parameters())
    elif step == "plan":
        sim, sizes = cons.measure_children(dirs["base"], kids, dtype=torch.bfloat16, data=data, context=128,
                                           calibration_windows_n=4, per_expert=64)
        plan = cons.make_plan(sim, sizes, threshold=0.0)
        plan.save(root / "plan.json")
        out["plan"] = {k: v for k, v in plan.totals().items()}
    elif step == "serve":
        plan = cons.ConsolidationPlan.load(root / "plan.json")
        cm = cons.ConsolidatedModel(dirs["base"], kids, plan, dtype=torch.bfloat16)
        tokens = {}
        for child in (*CHILDREN, CHILDREN[0]):
            cm.activate(child)
            ids = torch.tensor([list(range(100, 132))])
            past, new = None, []
            for _ in range(8):
                res = cm.model(input_ids=ids if past is None else ids[:, -1:], past_key_values=past, use_cache=True)
                past = res.past_key_values
                nxt = int(res.logits[0, -1].float().argmax())
                new.append(nxt)
                ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
            tokens[child] = new
        out["memory"] = cm.memory()
        out["swap_ms"] = [1e3 * s for s in cm.swap_seconds]
        out["tokens"] = tokens
    out["seconds"] = time.perf_counter() - t0
    out["peak_rss_bytes"] = _rss_kib() * 1024
    out["after_imports_rss_bytes"] = after_imports
    out["peak_growth_bytes"] = out["peak_rss_bytes"] - after_imports
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default=None, help="where the checkpoints are built (default: a temporary folder)")
    ap.add_argument("--json", default=None, help="write the figures here")
    ap.add_argument("--step", default=None, help=argparse.SUPPRESS)  # one step, in a child process
    args = ap.parse_args(argv)
    if args.step:
        print(json.dumps(_step(args.step, Path(args.root))))
        return 0
    root = Path(args.root) if args.root else Path(tempfile.mkdtemp(prefix="moecap-consolidation-memory-"))
    dirs = build(root)
    ckpt = {c: sum(f.stat().st_size for f in dirs[c].glob("*.safetensors")) for c in CHILDREN}
    results = {"config": CONFIG, "checkpoint_bytes": ckpt, "children_checkpoints_bytes": sum(ckpt.values())}
    for step in ("separate", "plan", "serve"):
        proc = subprocess.run([sys.executable, __file__, "--root", str(root), "--step", step], capture_output=True,
                              text=True, env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return 1
        results[step] = json.loads(proc.stdout.strip().splitlines()[-1])
    total = results["children_checkpoints_bytes"]
    gib = 2**30
    print(f"children's checkpoints: {total / gib:.2f} GiB ({', '.join(f'{c} {b / gib:.2f}' for c, b in ckpt.items())})")
    for step in ("separate", "plan", "serve"):
        r = results[step]
        print(f"{step:9s} peak RSS {r['peak_rss_bytes'] / gib:.2f} GiB, growth over imports "
              f"{r['peak_growth_bytes'] / gib:.2f} GiB ({r['peak_growth_bytes'] / total:.0%} of the checkpoints), "
              f"{r['seconds']:.1f} s")
    t = results["plan"]["plan"]
    print(f"plan at threshold 0: {t['expert_saving']:.1%} of expert bytes saved, private experts {t['private_experts']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
