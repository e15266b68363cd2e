"""moecap's engine (part 1): the expert store reproduces transformers, byte accounting is the real
storage, plans follow the profile, and the ``engine`` runner measures like ``hf``."""

from __future__ import annotations

import json

import pytest
import torch

from moecap.engine.planner import make_plan, profile
from moecap.engine.store import ExpertPlan, PlanError, Slot, experts_per_layer, install, plan_nbytes

TEXT_START = 1000


def _model(path, family_config=None):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def text_ids(tiny_moe_dir):
    from transformers import AutoTokenizer

    from moecap.corpus import stdlib_text

    tok = AutoTokenizer.from_pretrained(tiny_moe_dir)
    ids = tok(stdlib_text(max_chars=40_000), add_special_tokens=False)["input_ids"]
    return torch.tensor([ids[TEXT_START:TEXT_START + 96], ids[TEXT_START + 96:TEXT_START + 192]])


@pytest.mark.parametrize("placement", ["fast", "host"])
def test_full_precision_store_reproduces_transformers(tiny_moe_dir, text_ids, placement):
    ref = _model(tiny_moe_dir)
    with torch.no_grad():
        want = ref(text_ids).logits
        want_gen = ref.generate(text_ids[:1, :32], max_new_tokens=16, do_sample=False)
    m = _model(tiny_moe_dir)
    stores = install(m, ExpertPlan.uniform(experts_per_layer(m), placement, "full"), "cpu")
    with torch.no_grad():
        got = m(text_ids).logits
        gen = m.generate(text_ids[:1, :32], max_new_tokens=16, do_sample=False)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), float((got - want).abs().max())
    assert torch.equal(gen, want_gen)
    # the fused expert tensors are gone from the model: the store holds the experts
    assert not any("experts.gate_up_proj" in n for n, _ in m.named_parameters())
    calls = {k: sum(s.calls[k] for s in stores) for k in stores[0].calls}
    if placement == "fast":
        assert calls["fast"] > 0 and calls["cpu"] == calls["copy"] == 0
    else:
        assert calls["fast"] == 0 and calls["cpu"] + calls["copy"] + calls["copy_cached"] > 0


def test_quantized_error_shrinks_with_bits(tiny_moe_dir, text_ids):
    ref = _model(tiny_moe_dir)
    with torch.no_grad():
        want = ref(text_ids).logits
    errs = {}
    for prec in ("int2", "int4", "int8"):
        m = _model(tiny_moe_dir)
        install(m, ExpertPlan.uniform(experts_per_layer(m), "fast", prec), "cpu")
        with torch.no_grad():
            errs[prec] = float((m(text_ids).logits - want).abs().mean())
    assert errs["int8"] < errs["int4"] < errs["int2"], errs
    assert errs["int8"] < 0.01, errs


def test_byte_accounting_is_real_storage(tiny_moe_dir):
    m = _model(tiny_moe_dir)
    per = experts_per_layer(m)
    layers = sorted(per)
    slots = {i: [Slot("fast", "full"), Slot("host", "int8"), Slot("fast", "int4"), Slot("host", "int2")]
             + [Slot("fast", "full")] * (per[i] - 4) for i in layers}
    plan = ExpertPlan(slots, group_size=64)
    predicted = plan_nbytes(m, plan)
    stores = install(m, plan, "cpu")
    for store in stores:
        for e, ex in enumerate(store.experts):
            real = sum(w.storage_nbytes() for w in (ex.gate_up, ex.down))
            assert ex.nbytes() == real == predicted["per_expert"][store.layer][e], (store.layer, e)
    tiers = {"fast": sum(s.tier_nbytes()["fast"] for s in stores), "host": sum(s.tier_nbytes()["host"] for s in stores)}
    assert tiers == predicted["tiers"]
    full = stores[0].experts[0].nbytes()
    assert stores[0].experts[1].nbytes() < 0.3 * full and stores[0].experts[3].nbytes() < stores[0].experts[2].nbytes()


def test_plan_follows_profile(tiny_moe_dir, text_ids):
    m = _model(tiny_moe_dir)
    prof = profile(m, text_ids.tolist(), precisions=("int4",), group_size=64)
    total = sum(experts_per_layer(m).values())
    assert prof.tokens == text_ids.numel()
    for layer, counts in prof.freq.items():
        assert sum(counts) == prof.tokens * m.config.num_experts_per_tok
        assert all(v >= 0 for row in prof.sens[layer] for v in row.values())
    plan = make_plan(m, prof, quantize_fraction=0.25, precision="int4", offload_fraction=0.5)
    assert plan.count(precision="int4") == round(0.25 * total)
    assert plan.count(placement="host") == round(0.5 * total)
    # offloaded: the least used experts
    freq = {(layer, e): c for layer, row in prof.freq.items() for e, c in enumerate(row)}
    host = [freq[(layer, e)] for layer, slots in plan.layers.items() for e, s in enumerate(slots) if s.placement == "host"]
    fast = [freq[(layer, e)] for layer, slots in plan.layers.items() for e, s in enumerate(slots) if s.placement == "fast"]
    assert max(host) <= min(fast)
    # quantized: those whose quantization costs least (frequency x sensitivity)
    cost = {k: freq[k] * prof.sens[k[0]][k[1]]["int4"] for k in freq}
    q = [cost[(layer, e)] for layer, slots in plan.layers.items() for e, s in enumerate(slots) if s.precision == "int4"]
    nq = [cost[(layer, e)] for layer, slots in plan.layers.items() for e, s in enumerate(slots) if s.precision == "full"]
    assert max(q) <= min(nq)
    # a fast-memory budget pushes more experts to host memory until the fast tier fits
    sizes = plan_nbytes(m, ExpertPlan.uniform(experts_per_layer(m)))
    budget = sizes["tiers"]["fast"] * 0.3
    tight = make_plan(m, prof, 0.0, "int4", 0.0, fast_budget_bytes=budget)
    assert plan_nbytes(m, tight)["tiers"]["fast"] <= budget < plan_nbytes(m, tight)["tiers"]["fast"] + sizes["per_expert"][1][0]
    with pytest.raises(PlanError, match="quantize_fraction=1.5"):
        make_plan(m, prof, 1.5)
    with pytest.raises(PlanError, match="budget"):
        make_plan(m, prof, 0.0, fast_budget_bytes=-1.0)


def test_plan_round_trips_through_json(tmp_path, tiny_moe_dir):
    m = _model(tiny_moe_dir)
    plan = make_plan(m, None, 0.5, "int8", 0.25)
    plan.save(tmp_path / "plan.json")
    again = ExpertPlan.load(tmp_path / "plan.json")
    assert again.layers == plan.layers and again.group_size == plan.group_size
    bad = json.loads((tmp_path / "plan.json").read_text())
    bad["layers"]["0"][0] = ["gpu", "full"]
    with pytest.raises(PlanError, match="placement 'gpu'"):
        ExpertPlan.from_dict(bad)


def test_engine_runner_cells(tmp_path, tiny_moe_dir):
    """Through the executor: resident and a mixed plan; S-MBU counts each expert at its stored size."""
    from moecap.run import run_suite
    from moecap.suite import parse_suite

    from moecap.corpus import domain_splits

    calib = tmp_path / "calib.jsonl"  # the user's own calibration data
    calib.write_text("".join(json.dumps({"body": doc}) + "\n" for doc in domain_splits("prose")["train"].split("\n\n")[:200]))
    raw = {
        "name": "engine",
        "models": [{"id": str(tiny_moe_dir), "name": "tiny"}],
        "runners": [
            {"type": "hf", "args": {"dtype": "float32"}},
            {"type": "engine", "name": "resident", "args": {"dtype": "float32", "plan": "resident"}},
            {"type": "engine", "name": "mixed", "args": {"dtype": "float32", "profile_windows": 2,
                                                         "plan": {"quantize_fraction": 0.5, "precision": "int4",
                                                                  "offload_fraction": 0.5}}},
            {"type": "engine", "name": "mixture", "args": {"dtype": "float32", "profile_windows": 2,
                                                           "calibration": {"path": str(calib), "field": "body"},
                                                           "plan": {"precisions": ["int8", "int4"],
                                                                    "fast_budget_fraction": 0.2}}},
        ],
        "workloads": [{"name": "w", "input_tokens": 16, "output_tokens": 6, "num_prompts": 2}],
        "loads": [{"batch_size": 2}],
        "hardware": {"device": "cpu", "peaks": {"mem_bandwidth_gbs": 10.0, "tflops": {"fp32": 1.0}},
                     "calibrate": "never"},
        "output": {"dir": str(tmp_path / "results")},
    }
    out = run_suite(parse_suite(raw, "test"), log=lambda s: None)
    recs = {o.cell.runner.display_name: o.record for o in out.outcomes}
    for name, rec in recs.items():
        assert rec.status == "ok", (name, rec.error)
        assert rec.report["utilization"]["decode"]["s_mbu"] > 0
    hf, res, mixed = (recs[k].report for k in ("hf", "resident", "mixed"))
    # resident engine = hf model: same bytes per decode pass for the same traced experts
    assert res["utilization"]["decode"]["bytes"]["experts"] == pytest.approx(
        hf["utilization"]["decode"]["bytes"]["experts"], rel=0.05)
    assert mixed["utilization"]["decode"]["bytes"]["experts"] < 0.85 * res["utilization"]["decode"]["bytes"]["experts"]
    mem = mixed["memory"]
    assert mem["expert_bytes_host"] > 0 and mem["expert_bytes_fast"] > 0
    assert mem["fast_tier_weights_bytes"] < res["memory"]["fast_tier_weights_bytes"]
    plan = recs["mixed"].config["runner"]["plan"]
    assert plan["host_experts"] == plan["experts"] // 2 and plan["int4_experts"] == plan["experts"] // 2
    assert mixed["utilization"]["expert_bytes"]
    # bytes by tier: on a CPU the host experts are read by the host, nothing crosses a link
    tiers = mixed["utilization"]["decode"]["tiers"]
    assert tiers["host"]["bytes"] > 0 and tiers["link"]["bytes"] == 0
    assert tiers["fast"]["bytes"] + tiers["host"]["bytes"] == pytest.approx(mixed["utilization"]["decode"]["bytes"]["total"])
    assert "tiers" in res["utilization"]["decode"] and res["utilization"]["decode"]["tiers"]["host"]["bytes"] == 0
    passes = [json.loads(line) for line in (tmp_path / "results" / "engine" / recs["mixed"].artifacts["passes"]).read_text().splitlines()]
    assert any(p["host_calls"] for p in passes) and all(c[2] == "cpu" for p in passes for c in p["host_calls"] or [])
    # which kernel ran each precision, in which dtype; how the model was loaded; where the plan came from
    info = recs["mixed"].config["runner"]
    kernels = info["kernels"]["experts"]
    assert set(kernels) == {"full", "int4"} and kernels["full"]["act_dtype"] == "float32"
    assert info["load"]["streamed"] and info["load"]["bytes_read"] > 0
    assert info["plan_origin"]["kind"] == "fractions"
    mixture = recs["mixture"].config["runner"]
    assert mixture["plan_origin"]["kind"] == "mixed" and "calib.jsonl" in mixture["profile"]["source"]
    notes = mixture["plan_detail"]["notes"]
    assert notes["mixed"] and notes["expert_bytes_fast"] <= notes["fast_budget_bytes"] and notes["expert_bytes_host"] == 0
    assert set(notes["precision_counts"]) <= {"full", "int8", "int4"} and len(notes["precision_counts"]) >= 2


def test_uniform_low_bit_presets_cost_perplexity(tmp_path, tiny_moe_dir):
    """int3-all / int2-all put every expert at that precision; int2 costs perplexity (the quality-cpu suite)."""
    from moecap.run import run_suite
    from moecap.suite import parse_suite

    raw = {
        "name": "presets",
        "models": [{"id": str(tiny_moe_dir), "name": "tiny"}],
        "runners": [{"type": "engine", "name": p, "args": {"dtype": "float32", "plan": p}}
                    for p in ("resident", "int3-all", "int2-all")],
        "workloads": [{"name": "quality", "perplexity": {"datasets": ["tiny-c"], "max_windows": 4}}],
        "hardware": {"device": "cpu", "peaks": {"mem_bandwidth_gbs": 10.0, "tflops": {"fp32": 1.0}},
                     "calibrate": "never"},
        "output": {"dir": str(tmp_path / "results")},
    }
    out = run_suite(parse_suite(raw, "test"), log=lambda s: None)
    recs = {o.cell.runner.display_name: o.record for o in out.outcomes}
    ppl = {}
    for name, rec in recs.items():
        assert rec.status == "ok", (name, rec.error)
        ppl[name] = rec.report["quality"]["perplexity"]["tiny-c"]["perplexity"]
    for name, bits in (("int3-all", 3), ("int2-all", 2)):
        plan = recs[name].config["runner"]["plan"]
        assert plan[f"int{bits}_experts"] == plan["experts"] > 0
        assert recs[name].config["runner"]["plan_origin"] == {"kind": "preset", "name": name}
    assert ppl["resident"] < ppl["int2-all"]


# ------------------------------------------------------------------------------------ Pareto search
def _pt(name, tps, ppl, fast, **kw):
    from moecap.studies.pareto import Point

    return Point(name, {}, "ok", tokens_per_s=tps, perplexity=ppl, fast_bytes=fast, **kw)


def test_frontier_and_selection():
    from moecap.studies.pareto import frontier, mark_frontier, select

    pts = [_pt("a", 100, 10.0, 8), _pt("b", 80, 9.0, 8), _pt("c", 60, 9.5, 4), _pt("d", 50, 8.5, 8),
           _pt("e", 90, 11.0, 2)]
    mark_frontier(pts)
    front = frontier(pts)
    assert [p.name for p in front] == ["d", "b", "a"]  # c is beaten by b on both; e by a
    ppl = [p.perplexity for p in front]
    assert ppl == sorted(ppl)  # monotone: faster configurations lose accuracy
    # with fast-tier memory as a third objective, c (least memory after e) and e (least memory) join
    assert {p.name for p in pts if p.frontier3} == {"a", "b", "c", "d", "e"}
    pts.append(_pt("f", 55, 9.6, 5))  # beaten by c on all three
    mark_frontier(pts)
    assert not pts[-1].frontier3 and not pts[-1].frontier
    assert select(pts, max_perplexity=9.2).name == "b"
    assert select(pts, min_tokens_per_s=85).name == "a"
    assert select(pts, max_perplexity=1.0) is None


def test_grid_has_each_configuration_once():
    from moecap.studies.pareto import grid

    g = dict(grid(["int8", "int4"], [0, 0.5, 1], [0, 1]))
    assert len(g) == 2 * (1 + 2 * 2)
    assert g["full-off1"] == {"quantize_fraction": 0.0, "precision": "int8", "offload_fraction": 1.0}
    assert g["q0.5-int4-off0"]["precision"] == "int4"


def test_engine_pareto_cli(tmp_path, tiny_moe_dir):
    """End to end: records per configuration, frontier.json, PNG and HTML; a suite then serves the
    configuration the frontier picks under a perplexity bound."""
    from test_e2e_cli import moecap

    from moecap.studies.pareto import load_frontier

    out = tmp_path / "res"
    proc = moecap("engine", "pareto", str(tiny_moe_dir), "--device", "cpu", "--precisions", "int2",
                  "--quantize", "0,1", "--offload", "0,1", "--mixed", "0.5", "--windows", "2", "--num-prompts", "1",
                  "--output-tokens", "4", "--input-tokens", "16", "--profile-windows", "1", "-o", str(out), check=0)
    folder = next(out.iterdir())
    assert len(list(folder.glob("*.json"))) == 5 + 1  # 5 records + frontier.json
    points = load_frontier(folder)
    assert {p.name for p in points} == {"full-off0", "full-off1", "q1-int2-off0", "q1-int2-off1", "mixed-b0.5"}
    by = {p.name: p for p in points}
    assert all(p.ok() for p in points)
    # quantizing every expert to 2 bits costs perplexity; offloading costs none; both shrink the fast tier
    assert by["q1-int2-off0"].perplexity > by["full-off0"].perplexity
    assert by["full-off1"].perplexity == pytest.approx(by["full-off0"].perplexity, rel=1e-6)
    assert by["full-off1"].fast_bytes < by["q1-int2-off0"].fast_bytes < by["full-off0"].fast_bytes
    # the mixture: half the experts' bytes, so some experts at 2 bits and the rest at full precision, all resident
    mixed = by["mixed-b0.5"]
    assert mixed.plan_detail["notes"]["mixed"] and mixed.host_bytes == 0
    counts = mixed.plan_detail["notes"]["precision_counts"]
    assert counts["int2"] > 0 and counts["full"] > 0, counts
    assert by["q1-int2-off0"].fast_bytes < mixed.fast_bytes < by["full-off0"].fast_bytes
    assert by["full-off0"].perplexity < mixed.perplexity < by["q1-int2-off0"].perplexity
    assert any(p.frontier for p in points)
    assert (folder / "frontier.png").stat().st_size > 10_000 and "plotly" in (folder / "frontier.html").read_text()
    assert "frontier:" in proc.stdout

    # a suite asks for the best throughput within a perplexity bound
    from moecap.run import run_suite
    from moecap.suite import parse_suite

    bound = by["full-off0"].perplexity * 1.0001
    raw = {"name": "sel", "models": [{"id": str(tiny_moe_dir)}],
           "runners": [{"type": "engine", "args": {"dtype": "float32", "select": {"frontier": str(folder),
                                                                                   "max_perplexity": bound}}}],
           "workloads": [{"name": "w", "input_tokens": 8, "output_tokens": 3, "num_prompts": 1}],
           "loads": [{"batch_size": 1}],
           "hardware": {"device": "cpu", "peaks": {"mem_bandwidth_gbs": 10.0, "tflops": {"fp32": 1.0}},
                        "calibrate": "never"},
           "output": {"dir": str(tmp_path / "sel")}}
    (o,) = run_suite(parse_suite(raw, "test"), log=lambda s: None).outcomes
    assert o.status == "ok", o.record.error
    chosen = o.record.config["runner"]["plan_detail"]["notes"]
    assert chosen["measured_perplexity"] <= bound
    assert o.record.config["runner"]["plan"].get("int2_experts", 0) == 0  # the 2-bit plans exceed the bound


def test_cost_model_ships_activations_for_few_tokens_and_weights_for_many():
    from moecap.engine.store import CostModel

    cm = CostModel(host_flops=2e11, link_Bps=25e9, fast_flops=1e14)
    hidden, inter = 4096, 14336  # a Mixtral-8x7B expert: 352 MB in bf16
    expert_bytes = 3 * hidden * inter * 2
    assert cm.choose(1, hidden, inter, expert_bytes, 2) == "cpu"      # decode: 0.7 ms of CPU vs 14 ms of PCIe
    assert cm.choose(4096, hidden, inter, expert_bytes, 2) == "copy"  # prefill: 3 s of CPU vs 14 ms
    # the crossover: the token count where CPU time equals the copy time
    n = next(n for n in range(1, 4096) if cm.choose(n, hidden, inter, expert_bytes, 2) == "copy")
    t_copy = expert_bytes / 25e9 + 2 * n * 3 * hidden * inter / 1e14
    t_cpu = 2 * n * 3 * hidden * inter / 2e11 + 2 * n * hidden * 2 / 25e9
    assert t_cpu > t_copy and 5 < n < 100
    assert CostModel(mode="cpu").choose(10_000, hidden, inter, expert_bytes, 2) == "cpu"



TINY_FAMILIES = {
    "qwen2_moe": dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=64, shared_expert_intermediate_size=96,
                      norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[]),
    "qwen3_moe": dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=64, norm_topk_prob=True,
                      decoder_sparse_step=1, mlp_only_layers=[], head_dim=16),
    "olmoe": dict(num_experts=6, num_experts_per_tok=2, norm_topk_prob=False),
}


@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
def test_store_reproduces_other_families(family):
    """Qwen2-MoE (shared expert + its sigmoid gate, no renormalisation), Qwen3-MoE (renormalised top-k)
    and OLMoE, random weights: the resident store matches transformers; int8 stays close."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(family, vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                               **TINY_FAMILIES[family])
    ref = AutoModelForCausalLM.from_config(cfg).eval()
    for p in ref.parameters():  # transformers leaves some MoE tensors at zero until weights load
        torch.nn.init.normal_(p, std=0.05)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(ids).logits
    m = AutoModelForCausalLM.from_config(cfg).eval()
    m.load_state_dict(ref.state_dict())
    install(m, ExpertPlan.uniform(experts_per_layer(m)), "cpu")
    with torch.no_grad():
        got = m(ids).logits
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), float((got - want).abs().max())
    if family == "qwen2_moe":
        assert m.model.layers[0].mlp.shared_expert is not None
    q = AutoModelForCausalLM.from_config(cfg).eval()
    q.load_state_dict(ref.state_dict())
    install(q, ExpertPlan.uniform(experts_per_layer(q), "host", "int8"), "cpu")
    with torch.no_grad():
        err = float((q(ids).logits - want).abs().mean())
    assert 0 < err < 0.01 * float(want.abs().mean()) + 1e-3, err
