"""Expert consolidation (engine part 2) on the trained tiny-moe and its three domain children."""

from __future__ import annotations

import json

import pytest
import torch

from moecap.engine.consolidate import ConsolidatedModel, ConsolidationPlan, _load, format_plan, make_plan, measure_similarity
from moecap.engine.store import moe_blocks

CHILDREN = ("code", "prose", "c")


@pytest.fixture(scope="module")
def family(tiny_moe_dir):
    from transformers import AutoTokenizer

    from moecap.corpus import domain_splits
    from moecap.metrics.perplexity import windows

    root = tiny_moe_dir.parent
    tok = AutoTokenizer.from_pretrained(tiny_moe_dir)
    kids = {c: root / c for c in CHILDREN}
    calib = {c: windows(tok(domain_splits(c)["validation"], add_special_tokens=False)["input_ids"], 128, 4) for c in CHILDREN}
    base = _load(tiny_moe_dir)
    models = {c: _load(p) for c, p in kids.items()}
    sim = measure_similarity(tiny_moe_dir, kids, calib)
    sizes = {i: b.experts.gate_up_proj[0].numel() * 4 + b.experts.down_proj[0].numel() * 4 for i, _, b in moe_blocks(base)}
    ids = torch.tensor([calib["code"][0][:64], calib["prose"][0][:64]])
    return {"base": tiny_moe_dir, "kids": kids, "sim": sim, "sizes": sizes, "models": models, "ids": ids}


def test_similarity_is_measured_not_assumed(family):
    sim = family["sim"]
    for c in CHILDREN:
        for layer, row in sim["output"][c].items():
            # None: no calibration token reached the expert (the plan then judges it by its weights)
            assert len(row) == 8 and all(d is None or d >= 0 for d in row)
            assert [d is None for d in row] == [n == 0 for n in sim["tokens"][c][layer]]
            # fine-tuning moved the experts: measurable output distances, and raw weights changed too
            assert max(d for d in row if d is not None) > 1e-3 and min(sim["weight"][c][layer]) > 0
        assert sum(sum(r) for r in sim["tokens"][c].values()) > 0
    assert sim["mode"] == "base"


def test_all_private_reproduces_every_child(family):
    plan = make_plan(family["sim"], family["sizes"], threshold=-1.0)  # every expert private
    assert plan.totals()["expert_saving"] == 0  # unused shared copies are not stored: as much as separate models
    cm = ConsolidatedModel(family["base"], {c: str(p) for c, p in family["kids"].items()}, plan)
    assert cm.memory()["expert_bytes"] == 3 * sum(family["sizes"].values()) * 8
    for c in ("prose", "code", "c", "prose"):  # swap back and forth
        cm.activate(c)
        with torch.no_grad():
            want = family["models"][c](family["ids"]).logits
            got = cm.model(family["ids"]).logits
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (c, float((got - want).abs().max()))
    assert cm.activate("prose") == 0.0  # already active: no swap
    assert cm.swaps >= 4 and all(s > 0 for s in cm.swap_seconds)
    with pytest.raises(KeyError, match="unknown model 'nope'"):
        cm.activate("nope")


def test_all_shared_stores_each_expert_once(family):
    plan = make_plan(family["sim"], family["sizes"], threshold=1e9)
    t = plan.totals()
    assert t["expert_saving"] == pytest.approx(2 / 3)
    assert all(v == 0 for v in t["private_experts"].values())
    cm = ConsolidatedModel(family["base"], {c: str(p) for c, p in family["kids"].items()}, plan, shared="base")
    assert cm.memory()["expert_bytes"] == sum(family["sizes"].values()) * 8
    # shared = base: a child is its own non-expert layers around the base's experts
    ref = _load(family["kids"]["c"])
    base = _load(family["base"])
    for (i, _, b_ref), (_, _, b_base) in zip(moe_blocks(ref), moe_blocks(base)):
        b_ref.experts.gate_up_proj.data.copy_(b_base.experts.gate_up_proj.data)
        b_ref.experts.down_proj.data.copy_(b_base.experts.down_proj.data)
    cm.activate("c")
    with torch.no_grad():
        assert torch.allclose(cm.model(family["ids"]).logits, ref(family["ids"]).logits, atol=1e-4, rtol=1e-4)


def test_threshold_and_budget_plans(family, tmp_path):
    sim, sizes = family["sim"], family["sizes"]
    # the distance the plan judges: the output distance, or the squared weight distance where no token went
    judged = {c: {layer: [sim["weight"][c][layer][e] ** 2 if d is None else d for e, d in enumerate(row)]
                  for layer, row in sim["output"][c].items()} for c in CHILDREN}
    dists = sorted(d for c in CHILDREN for row in judged[c].values() for d in row)
    mid = dists[len(dists) // 2]
    plan = make_plan(sim, sizes, threshold=mid)
    for c in CHILDREN:
        for layer, row in judged[c].items():
            for e, d in enumerate(row):
                assert plan.private(c, layer, e) == (d > mid)
    one = next(iter(sizes.values()))
    budget = make_plan(sim, sizes, budget_bytes=5 * one)
    assert sum(budget.totals()["private_experts"].values()) == 5
    # the five private copies are the five most distant experts
    chosen = sorted(judged[c][layer][e] for c in CHILDREN for layer in sizes for e in range(8)
                    if budget.private(c, layer, e))
    assert chosen == dists[-5:]
    plan.save(tmp_path / "p.json")
    again = ConsolidationPlan.load(tmp_path / "p.json")
    assert again.assign == plan.assign and again.totals() == plan.totals()
    text = format_plan(plan)
    assert "saving" in text and f"{plan.totals()['expert_saving']:.1%}" in text
    with pytest.raises(ValueError, match="threshold or a budget"):
        make_plan(sim, sizes)


def test_consolidate_cli_prints_per_layer_saving(tiny_moe_dir, tmp_path):
    from test_e2e_cli import moecap

    root = tiny_moe_dir.parent
    out = tmp_path / "plan.json"
    proc = moecap("engine", "consolidate", str(tiny_moe_dir), *(f"{c}={root / c}" for c in CHILDREN),
                  "--threshold", "0.2", "--plan-out", str(out), check=0)
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:3] == ["layer", "shared", "private"]
    assert sum(1 for line in lines if line.strip()[:1].isdigit()) == 2  # one row per MoE layer
    data = json.loads(out.read_text())
    assert data["threshold"] == 0.2 and set(data["children"]) == set(CHILDREN)
    bad = moecap("engine", "consolidate", str(tiny_moe_dir), f"code={root / 'code'}", "--threshold", "1", check=2)
    assert "at least two children" in bad.stderr


def test_consolidation_curve_records(tiny_moe_dir, tmp_path):
    """The curve: one record per configuration; all-private equals each child alone; memory falls with the
    threshold; the consolidated children beat every merged model on their own domains."""
    from moecap.studies.consolidation import run_curve
    from moecap.records import load_records

    root = tiny_moe_dir.parent
    curve = run_curve(str(tiny_moe_dir), {c: str(root / c) for c in CHILDREN}, [-1.0, 0.2, 1e9], tmp_path,
                      windows=4, merge_methods=("average", "ties"), log=lambda s: None)
    recs = [r for _, r in load_records(tmp_path / "consolidation")]
    assert len(recs) == 1 + 1 + 3 + 2 and all(r.status == "ok" for r in recs)
    pts = {(p["kind"], p["name"]): p for p in curve["points"]}
    alone = pts[("alone", "each-child-alone")]
    private = pts[("consolidated", "t-1")]
    for c in CHILDREN:
        assert private["perplexity"][c] == pytest.approx(alone["perplexity"][c], rel=1e-5)
    mem = [pts[("consolidated", n)]["memory"]["expert_bytes"] for n in ("t-1", "t0.2", "t1e+09")]
    assert mem[0] > mem[1] > mem[2] == pytest.approx(mem[0] / 3)
    shared = pts[("consolidated", "t1e+09")]
    for method in ("average", "ties"):
        merged = pts[("merged", method)]
        assert sum(shared["relative"].values()) < sum(merged["relative"].values()), method
    assert (tmp_path / "consolidation" / "curve.png").stat().st_size > 10_000
    rec = next(r for r in recs if r.config["runner"].get("threshold") == 0.2)
    assert set(rec.report["quality"]["perplexity_per_child"]) == set(CHILDREN)
    assert rec.report["consolidation"]["plan"]["totals"]["expert_saving"] > 0


def test_curve_perplexity_builds_no_graph(family):
    """Issue 21: the consolidation curve's perplexity ran with autograd on (a graph per window)."""
    from moecap.studies.consolidation import perplexity_of

    model = family["models"]["c"]
    seen = []
    hook = model.register_forward_hook(lambda _m, _a, out: seen.append((torch.is_grad_enabled(), out.logits.requires_grad)))
    try:
        result = perplexity_of(model, [family["ids"][0].tolist()])
    finally:
        hook.remove()
    assert seen == [(False, False)] and result["perplexity"] > 1


def test_curve_plot_keeps_the_infinite_threshold_and_names_without_overlap(tmp_path):
    """Issue 21: curve.png dropped the `inf` threshold (everything shared) and the merged methods' names,
    all at one memory, were written over each other."""
    import math

    from moecap.studies.consolidation import _finite_json, curve_figure, plot_curve

    kids = ["code", "prose"]
    pts = [{"kind": "consolidated", "name": f"t{t:g}", "config": {"threshold": t},
            "memory": {"expert_bytes": m * 2**20}, "relative": {"code": r, "prose": r}}
           for t, m, r in ((0.0, 3.0, 0.0), (0.1, 2.0, 0.02), (math.inf, 1.0, 0.1))]
    pts += [{"kind": k, "name": n, "config": {}, "memory": {"expert_bytes": m * 2**20}, "relative": {"code": r, "prose": r}}
            for k, n, m, r in (("alone", "each-child-alone", 3.0, 0.0), ("base", "base-for-all", 1.0, 0.5),
                               ("merged", "average", 1.0, 0.2), ("merged", "ties", 1.0, 0.21),
                               ("merged", "dare", 1.0, 0.22), ("merged", "task_arithmetic", 1.0, 0.2))]
    curve = {"children": kids, "shared": "mean", "points": pts}
    fig = curve_figure(curve)
    left, right = fig.axes[0], fig.axes[1]
    assert not left.texts  # names live in the legend, not written over the points
    labels = left.get_legend().get_texts()
    assert {t.get_text() for t in labels} >= {"merged: average", "merged: ties", "merged: dare",
                                              "merged: task_arithmetic", "base: base-for-all"}
    line = right.get_lines()[0]
    assert len(line.get_xdata()) == 3 and all(math.isfinite(x) for x in line.get_xdata())  # inf is drawn
    assert "∞ (all shared)" in [t.get_text() for t in right.get_xticklabels()]
    assert plot_curve(curve, tmp_path / "curve.png").stat().st_size > 10_000
    # curve.json stays strict JSON: inf as a string, read back as inf by the plot
    text = json.dumps(_finite_json(curve), allow_nan=False)
    assert '"threshold": "inf"' in text
    curve_figure(json.loads(text))
