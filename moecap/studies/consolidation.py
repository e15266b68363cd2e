"""``moecap engine consolidate``: plan, and the quality / memory curve of expert consolidation against
serving each child alone and against merging the children into one model.

Every configuration becomes one validated record (``results/<suite>/<cell>.json``) with the per-child
token perplexity on each child's own held-out domain, the bytes of experts and of non-expert weights it
keeps, and (consolidated) the plan's per-layer saving; ``curve.json`` and ``curve.png`` summarise them.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from moecap.engine.consolidate import (ConsolidatedModel, _load, child_texts, expert_sizes, make_plan,
                                      measure_similarity)



@torch.inference_mode()
def perplexity_of(model: torch.nn.Module, wins: Sequence[Sequence[int]]) -> dict[str, float]:
    """Token perplexity of ``model`` over ``wins`` (no autograd: a graph per window would be kept)."""
    from moecap.metrics.perplexity import perplexity

    nll = []
    device = next(model.parameters()).device
    for w in wins:
        ids = torch.tensor([list(w)], device=device)
        loss = model(ids, labels=ids).loss
        nll.append((float(loss) * (len(w) - 1), len(w) - 1))
    return perplexity(nll)


def _model_bytes(model: torch.nn.Module) -> dict[str, int]:
    experts = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".experts." in n)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"expert_bytes": experts, "non_expert_bytes": total - experts, "total_bytes": total}


def run_curve(base: str, children: dict[str, str], thresholds: Sequence[float], out_dir: str | Path,
              suite: str = "consolidation", windows: int = 16, context: int = 256, shared: str = "mean",
              merge_methods: Sequence[str] = ("average", "task_arithmetic", "ties", "dare"),
              datasets: dict[str, str] | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure alone / consolidated (per threshold) / merged configurations; write records and the curve."""
    from transformers import AutoTokenizer

    from moecap.environment import collect_environment
    from moecap.metrics.perplexity import windows as cut
    from moecap.models import local_path_for
    from moecap.records import Record, ResultStore, new_run_id, now_iso

    base_dir = Path(local_path_for(base))
    child_dirs = {c: Path(local_path_for(p)) for c, p in children.items()}
    tok = AutoTokenizer.from_pretrained(base_dir)
    calib, test, names = {}, {}, {}
    for c, d in child_dirs.items():
        ctext, ttext, names[c] = child_texts(d, (datasets or {}).get(c))
        calib[c] = cut(tok(ctext, add_special_tokens=False)["input_ids"], context, 8)
        test[c] = cut(tok(ttext, add_special_tokens=False)["input_ids"], context, windows)
    store = ResultStore(out_dir, suite)
    run_id = new_run_id()
    env = collect_environment()
    points: list[dict[str, Any]] = []

    def record(kind: str, name: str, config: dict[str, Any], ppl: dict[str, dict[str, float]], memory: dict[str, Any],
               extra: dict[str, Any] | None = None) -> None:
        key = json.dumps({"base": str(base_dir), "children": {c: str(d) for c, d in child_dirs.items()},
                          "kind": kind, "config": config}, sort_keys=True)
        cell = f"{kind}__{name}__{hashlib.sha256(key.encode()).hexdigest()[:8]}"
        for c, r in ppl.items():
            r.update({"dataset": names[c], "context_length": context})
        rel = {c: ppl[c]["perplexity"] / points_alone[c] - 1 for c in ppl} if points_alone else {}
        report = {"quality": {"perplexity_per_child": ppl}, "memory": memory,
                  "consolidation": {"relative_perplexity_vs_alone": rel, **_finite_json(extra or {})}}
        rec = Record(run_id=run_id, created_at=now_iso(),
                     suite={"name": suite, "source": "moecap engine consolidate", "description":
                            f"expert consolidation of {', '.join(child_dirs)} (children of {base_dir.name})"},
                     cell_id=cell, status="ok", environment=env,
                     config={"model": {"id": str(base_dir), "children": {c: str(d) for c, d in child_dirs.items()}},
                             "runner": {"type": "engine-consolidation", "kind": kind, **_finite_json(config)},
                             "workload": {"perplexity": {c: names[c] for c in child_dirs}, "windows": windows,
                                          "context_length": context}},
                     report=report)
        path = store.write(rec)
        points.append({"kind": kind, "name": name, "config": config, "perplexity": {c: ppl[c]["perplexity"] for c in ppl},
                       "relative": rel, "memory": memory, "record": str(path)})
        log(f"  {kind:13s} {name:18s} experts {memory['expert_bytes'] / 2**20:8.2f} MiB  " +
            "  ".join(f"{c} {ppl[c]['perplexity']:.2f}" for c in ppl))

    # each child alone: the quality reference
    points_alone: dict[str, float] = {}
    alone_ppl, alone_mem = {}, {"expert_bytes": 0, "non_expert_bytes": 0, "total_bytes": 0}
    models = {c: _load(d) for c, d in child_dirs.items()}
    for c, m in models.items():
        alone_ppl[c] = perplexity_of(m, test[c])
        for k, v in _model_bytes(m).items():
            alone_mem[k] += v
    points_alone.update({c: r["perplexity"] for c, r in alone_ppl.items()})
    record("alone", "each-child-alone", {}, alone_ppl, alone_mem)

    # similarity once, then a plan and a consolidated model per threshold
    t0 = time.perf_counter()
    sim = measure_similarity(base_dir, child_dirs, calib)
    sim_s = time.perf_counter() - t0
    base_model = _load(base_dir)
    expert_bytes = expert_sizes(base_model.config)
    base_ppl = {c: perplexity_of(base_model, test[c]) for c in child_dirs}
    record("base", "base-for-all", {}, base_ppl, _model_bytes(base_model))
    del models, base_model
    for th in thresholds:
        plan = make_plan(sim, expert_bytes, threshold=th)
        cm = ConsolidatedModel(base_dir, {c: str(d) for c, d in child_dirs.items()}, plan, shared=shared)
        ppl = {}
        for c in child_dirs:
            cm.activate(c)
            ppl[c] = perplexity_of(cm.model, test[c])
        mem = cm.memory()
        swaps = cm.swap_seconds[1:] or cm.swap_seconds
        record("consolidated", f"t{th:g}", {"threshold": th, "shared": shared},
               ppl, {"expert_bytes": mem["expert_bytes"], "non_expert_bytes": mem["child_non_expert_bytes_total"]
                     + mem["skeleton_non_expert_bytes"], "total_bytes": mem["total_bytes"], **mem},
               {"plan": plan.to_dict() | {"distances": None}, "similarity_seconds": sim_s,
                "swap_ms": {"n": len(swaps), "mean": 1e3 * sum(swaps) / len(swaps) if swaps else None,
                            "max": 1e3 * max(swaps) if swaps else None}})
        del cm

    # merging baselines: one model for every child
    if merge_methods:
        import tempfile

        from moecap.engine.merge import merge_models

        for method in merge_methods:
            with tempfile.TemporaryDirectory(prefix="moecap-merge-") as tmp:
                summary = merge_models(base_dir, list(child_dirs.values()), method, Path(tmp) / "merged")
                merged = _load(Path(tmp) / "merged")
                ppl = {c: perplexity_of(merged, test[c]) for c in child_dirs}
                record("merged", method, {"method": method, "merge": {k: v for k, v in summary.items()
                                                                       if k not in ("children",)}},
                       ppl, _model_bytes(merged))
                del merged
    curve = {"run_id": run_id, "base": str(base_dir), "children": list(child_dirs), "shared": shared,
             "points": points, "similarity": {"output": sim["output"], "weight": sim["weight"]}}
    out = Path(out_dir) / suite
    from moecap.paths import atomic_write_text

    atomic_write_text(out / "curve.json", json.dumps(_finite_json(curve), indent=1, allow_nan=False) + "\n")
    plot_curve(curve, out / "curve.png")
    return curve


def _finite_json(value: Any) -> Any:
    """``value`` with every non-finite float as the string "inf" / "-inf" / "nan" (JSON has no such
    numbers: ``json.dumps`` would write ``Infinity``, which strict readers refuse)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if value != value else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_json(v) for v in value]
    return value


def curve_figure(curve: dict[str, Any]) -> Any:
    """The consolidation curve as a matplotlib figure: left, mean perplexity increase against expert
    memory (consolidated thresholds joined; each other configuration its own legend entry, so names never
    overlap); right, per-child increase and expert memory against the threshold, an infinite threshold
    (everything shared) drawn at the right edge and labelled ∞."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    children = curve["children"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2), dpi=120)
    ax = axes[0]

    def mean_rel(p: dict[str, Any]) -> float:
        return 100 * sum(p["relative"].get(c, 0.0) for c in children) / len(children)

    def threshold(p: dict[str, Any]) -> float:
        return float(p["config"]["threshold"])  # "inf" (from curve.json) reads back as inf

    cons = sorted((p for p in curve["points"] if p["kind"] == "consolidated"), key=lambda p: p["memory"]["expert_bytes"])
    ax.plot([p["memory"]["expert_bytes"] / 2**20 for p in cons], [mean_rel(p) for p in cons], "o-", color="C0",
            label="consolidated (one point per threshold)")
    markers = {"alone": "*", "base": "X", "merged": "s"}
    others = [p for p in curve["points"] if p["kind"] != "consolidated"]
    for i, p in enumerate(others):
        ax.scatter(p["memory"]["expert_bytes"] / 2**20, mean_rel(p), marker=markers.get(p["kind"], "d"),
                   color=f"C{(i + 1) % 10}", s=70, zorder=3, edgecolors="black", linewidths=0.5,
                   label=f"{p['kind']}: {p['name']}")
    ax.set_yscale("symlog", linthresh=1.0)
    ax.set_xlabel("expert memory for all children (MiB)")
    ax.set_ylabel("mean perplexity increase vs each child alone (%)")
    ax.set_title("quality vs memory: consolidation, merging, base", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    ax = axes[1]
    ths = [threshold(p) for p in cons]
    finite = [t for t in ths if math.isfinite(t)]
    edge = max([t for t in finite if t > 0], default=1.0) * 10  # where an infinite threshold is drawn
    xs = [t if math.isfinite(t) else edge for t in ths]
    order = sorted(range(len(cons)), key=lambda i: xs[i])
    for c in children:
        ax.plot([xs[i] for i in order], [100 * cons[i]["relative"].get(c, 0.0) for i in order], "o-", label=c)
    ax2 = ax.twinx()
    ax2.plot([xs[i] for i in order], [cons[i]["memory"]["expert_bytes"] / 2**20 for i in order], "k--",
             label="expert MiB")
    ax2.set_ylabel("expert memory (MiB)")
    ax.set_xscale("symlog", linthresh=0.01)
    if any(not math.isfinite(t) for t in ths):
        ticks = sorted({*[x for x in xs if x != edge], edge})
        ax.set_xticks(ticks)
        ax.set_xticklabels([("∞ (all shared)" if t == edge else f"{t:g}") for t in ticks], fontsize=7)
    ax.set_xlabel("threshold on output distance (private copy above it)")
    ax.set_ylabel("perplexity increase vs the child alone (%)")
    ax.set_title("the consolidation curve over thresholds", fontsize=9)
    ax.grid(alpha=0.3)
    lines = ax.get_legend_handles_labels()
    more = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=7, loc="upper left")
    fig.suptitle(f"expert consolidation of {', '.join(children)} (shared copy: {curve['shared']})", fontsize=10)
    fig.tight_layout()
    return fig


def plot_curve(curve: dict[str, Any], path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig = curve_figure(curve)
    fig.savefig(path)
    plt.close(fig)
    return path
