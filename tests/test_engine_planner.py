"""Mixture of precisions (moecap.engine.planner.mixed_plan), calibration data, the measured cost model and
the per-tier byte accounting of host-memory experts."""

from __future__ import annotations

import json
import math

import pytest
import torch

from moecap.engine.calibration import CalibrationError, calibration_text, calibration_windows
from moecap.engine.planner import Profile, full_expert_bytes, make_plan, mixed_plan
from moecap.engine.store import CostModel, ExpertLayout, ExpertPlan, PlanError, plan_nbytes

# two MoE layers of four experts: gate_up [128, 64], down [64, 64], float32
LAYOUT = ExpertLayout({0: 4, 1: 4}, {0: ((128, 64), (64, 64), 4), 1: ((128, 64), (64, 64), 4)})
FULL = full_expert_bytes(LAYOUT)


def prof(freq=None, sens=None) -> Profile:
    freq = freq or {0: [100, 10, 10, 1], 1: [50, 50, 1, 1]}
    sens = sens or {layer: [{"int8": 1e-4, "int4": 1e-2} for _ in range(4)] for layer in (0, 1)}
    return Profile(freq, tokens=200, sens=sens, source="test")


def fast_bytes(plan: ExpertPlan) -> int:
    return plan_nbytes(LAYOUT, plan)["tiers"]["fast"]


def test_mixed_plan_fits_the_budget_with_the_least_error():
    assert FULL == 8 * (128 * 64 + 64 * 64) * 4
    for share in (0.9, 0.6, 0.4, 0.25, 0.17):
        plan = mixed_plan(LAYOUT, prof(), share * FULL, ["int8", "int4"])
        assert fast_bytes(plan) <= share * FULL, share
        assert plan.count(placement="host") == 0, share  # quantization alone fits these budgets
    # a budget that int8 everywhere fits: nothing goes to int4 (int8's error per byte saved is far lower)
    plan = mixed_plan(LAYOUT, prof(), 0.3 * FULL, ["int8", "int4"])
    assert plan.count(precision="int4") == 0 and plan.count(precision="int8") == 8
    # tighter: the least used experts go down to int4 first, the busiest keep int8
    plan = mixed_plan(LAYOUT, prof(), 0.22 * FULL, ["int8", "int4"])
    counts = plan.notes["precision_counts"]
    assert counts.get("int4", 0) > 0 and counts.get("int8", 0) > 0, counts
    assert plan.slot(0, 0).precision == "int8" and plan.slot(0, 3).precision == "int4"
    # a looser budget never quantizes more
    order = [mixed_plan(LAYOUT, prof(), s * FULL, ["int8", "int4"]).notes["predicted_error"] for s in (0.9, 0.5, 0.3, 0.2)]
    assert order == sorted(order) and order[0] < order[-1]


def test_sensitive_experts_keep_their_precision():
    sens = {0: [{"int8": 1e-4, "int4": 1e-2}] * 4, 1: [{"int8": 1e-4, "int4": 0.5}] + [{"int8": 1e-4, "int4": 1e-3}] * 3}
    plan = mixed_plan(LAYOUT, prof({0: [10] * 4, 1: [10] * 4}, sens), 0.22 * FULL, ["int8", "int4"])
    assert plan.slot(1, 0).precision == "int8"  # 500x more sensitive at int4 than its neighbours
    assert plan.slot(1, 1).precision == "int4"


def test_error_budget_then_host_memory():
    plan = mixed_plan(LAYOUT, prof(), 0.15 * FULL, ["int8", "int4"], max_error=1e-4)
    assert plan.notes["predicted_error"] <= 1e-4
    assert plan.count(placement="host") > 0 and fast_bytes(plan) <= 0.15 * FULL
    # the least used experts leave the fast memory first
    host = {(layer, e) for layer, slots in plan.layers.items() for e, s in enumerate(slots) if s.placement == "host"}
    assert (0, 3) in host and (0, 0) not in host
    # a budget nothing can meet even fully offloaded... is any budget >= 0: everything on the host
    plan = mixed_plan(LAYOUT, prof(), 0.0, ["int4"])
    assert plan.count(placement="host") == 8


def test_mixed_plan_without_profile_and_errors():
    plan = mixed_plan(LAYOUT, None, 0.5 * FULL, ["int8"])
    assert fast_bytes(plan) <= 0.5 * FULL and plan.notes["profiled_tokens"] == 0
    with pytest.raises(PlanError, match="int5"):
        mixed_plan(LAYOUT, None, FULL, ["int5"])
    with pytest.raises(PlanError, match=">= 0"):
        mixed_plan(LAYOUT, None, -1.0, ["int8"])
    back = ExpertPlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert back.layers == plan.layers and back.notes["mixed"]


def test_fraction_plans_on_a_layout():
    plan = make_plan(LAYOUT, prof(), quantize_fraction=0.5, precision="int4", offload_fraction=0.25)
    assert plan.count(precision="int4") == 4 and plan.count(placement="host") == 2
    assert plan.notes["calibration"] == "test"


def test_runner_args_for_mixed_plans():
    from pydantic import ValidationError

    from moecap.runners.args import EngineRunnerArgs

    ok = EngineRunnerArgs.model_validate({"plan": {"precisions": ["int8", "int4"], "fast_budget_fraction": 0.4}})
    assert ok.plan.precisions == ["int8", "int4"]
    for bad, words in (({"precisions": ["int8"]}, "exactly one of fast_budget_gb"),
                       ({"precisions": ["int8"], "fast_budget_gb": 1, "fast_budget_fraction": 0.5}, "exactly one"),
                       ({"precisions": ["int8"], "fast_budget_fraction": 0.5, "quantize_fraction": 0.5}, "quantize_fraction"),
                       ({"fast_budget_fraction": 0.5}, "set precisions"),
                       ({"precisions": ["int5"], "fast_budget_fraction": 0.5}, "int5"),
                       ({"precisions": ["int8"], "fast_budget_fraction": 1.5}, "less than or equal to 1")):
        with pytest.raises(ValidationError, match=words):
            EngineRunnerArgs.model_validate({"plan": bad})
    with pytest.raises(ValidationError, match="exactly one of path"):
        EngineRunnerArgs.model_validate({"calibration": {"split": "train"}})


# ------------------------------------------------------------------------------ calibration data
def test_calibration_sources(tmp_path):
    from moecap.corpus import domain_splits

    text, what = calibration_text("embedded")
    assert "train" in what and domain_splits("code")["train"][:200] in text
    assert domain_splits("code")["test"][:400] not in text  # never the held-out split perplexity uses
    (tmp_path / "a.txt").write_text("hello world " * 50)
    assert calibration_text(str(tmp_path / "a.txt"))[0].startswith("hello world")
    (tmp_path / "b.jsonl").write_text('{"text": "one"}\n\n{"text": "two"}\n')
    assert calibration_text({"path": str(tmp_path / "b.jsonl")})[0] == "one\n\ntwo"
    (tmp_path / "c.jsonl").write_text('{"body": "x"}\n')
    assert calibration_text({"path": str(tmp_path / "c.jsonl"), "field": "body"})[0] == "x"
    (tmp_path / "d.json").write_text(json.dumps(["p", {"text": "q"}]))
    assert calibration_text(str(tmp_path / "d.json"))[0] == "p\n\nq"
    with pytest.raises(CalibrationError, match="does not exist"):
        calibration_text(str(tmp_path / "missing.txt"))
    (tmp_path / "e.jsonl").write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(CalibrationError, match="e.jsonl:2"):
        calibration_text(str(tmp_path / "e.jsonl"))
    with pytest.raises(CalibrationError, match="c.jsonl:1: no string field 'text'"):
        calibration_text(str(tmp_path / "c.jsonl"))
    with pytest.raises(CalibrationError, match="could not be loaded"):
        calibration_text({"dataset": "no-such-org/no-such-dataset-moecap"})


def test_calibration_windows(tiny_moe_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_moe_dir)
    wins, what = calibration_windows(tok, "embedded", 4, 64, tok.vocab_size)
    assert len(wins) == 4 and all(len(w) == 64 for w in wins) and len({tuple(w) for w in wins}) == 4
    assert "4 windows of 64 tokens" in what
    rnd, what = calibration_windows(None, "embedded", 2, 16, 100)
    assert len(rnd) == 2 and max(map(max, rnd)) < 100 and "random" in what
    with pytest.raises(CalibrationError, match="fewer than one window"):
        import tempfile

        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as fh:
            fh.write("short")
        calibration_windows(tok, fh.name, 2, 512, tok.vocab_size)


# ------------------------------------------------------------------------------ cost model
def test_cost_model_with_measured_host_rates():
    cm = CostModel(host_flops=1e12, link_Bps=25e9, fast_flops=1e14, host_Bps={"full": 20e9, "int4": 5e9})
    expert = 352e6  # a Mixtral-8x7B expert in bf16
    # one token: the CPU streams the expert at 20 GB/s (17.6 ms) vs 14 ms over PCIe -> copy
    assert cm.choose(1, 4096, 14336, expert, 2, "full") == "copy"
    # at int4 the expert is 4x smaller and the CPU kernel slower per byte: 99 MB / 5 GB/s vs 99 MB / 25 GB/s
    assert cm.choose(1, 4096, 14336, expert / 3.55, 2, "int4") == "copy"
    fast_cpu = CostModel(host_flops=1e12, link_Bps=25e9, host_Bps={"full": 100e9})
    assert fast_cpu.choose(1, 4096, 14336, expert, 2, "full") == "cpu"
    assert fast_cpu.to_dict()["host_Bps"] == {"full": 100e9}


def test_measured_host_rates_are_cached(monkeypatch, tmp_path):
    from moecap.engine import rates

    monkeypatch.setenv("MOECAP_CACHE_DIR", str(tmp_path))  # fake figures stay out of the session's cache
    calls = []

    def fake(precision, dtype, budget_s=1.5, movable=False):
        calls.append(precision)
        return {"Bps": 1e10, "median_Bps": 1e10, "flops": 1e11, "kernel": "k", "act_dtype": "float32",
                "matrices": 2, "bytes_each": 1, "date": "now"}

    monkeypatch.setattr(rates, "measure_host_kernel", fake)
    cm = rates.measured_cost_model(torch.device("cpu"), torch.float32)
    assert sorted(calls) == sorted(["full", "int8", "int4", "int3", "int2"])
    assert cm.host_Bps["int4"] == 1e10 and "no link" in cm.source
    calls.clear()
    rates.measured_cost_model(torch.device("cpu"), torch.float32)
    assert calls == []  # cached beside the hardware peaks
    assert rates.rates_path().parent.name == "hardware" and rates.rates_path().is_file()


def test_host_kernel_measurement_runs():
    from moecap.engine.rates import measure_host_kernel

    r = measure_host_kernel("int4", torch.float32, budget_s=0.2)
    assert r["Bps"] > 1e8 and r["flops"] > 1e8 and r["matrices"] >= 2
    # beside a GPU a host int4 expert keeps the nibbles it is copied in: the host dequantizes it
    m = measure_host_kernel("int4", torch.float32, budget_s=0.2, movable=True)
    assert m["kernel"] == "int4pack-cuda|dequant" or m["kernel"] == "dequant"


# ------------------------------------------------------------------------------ tier accounting
def test_tier_traffic_splits_bytes_by_where_they_were_read():
    from moecap.metrics.accounting import from_hf_config
    from moecap.metrics.utilization import tier_traffic, utilization
    from moecap.runners.base import PassTrace

    cfg = {"model_type": "mixtral", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 64,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 4,
           "num_experts_per_tok": 2, "max_position_embeddings": 128, "tie_word_embeddings": False}
    acc = from_hf_config(cfg)
    sizes = {0: [100.0, 200.0, 300.0, 400.0], 1: [100.0, 200.0, 300.0, 400.0]}
    where = {0: ["fast", "host", "host", "fast"], 1: ["host", "fast", "fast", "host"]}
    p = PassTrace(index=0, phase="decode", batch=0, new_tokens=[1], context_lens=[10], logits_tokens=1,
                  start_s=0.0, end_s=0.5, expert_counts=[[1, 1, 0, 0], [1, 0, 0, 1]],
                  host_calls=[[0, 1, "cpu"], [1, 0, "copy"], [1, 3, "copy_cached"]])
    peaks = {"fast_Bps": 1e3, "host_Bps": 1e2, "link_Bps": 10.0}
    tiers = tier_traffic([p], acc, [0, 1], 4.0, 4.0, sizes, where, peaks)["decode"]
    total = utilization([p], acc, [0, 1], 4.0, 4.0, 1e3, 1e9, expert_bytes=sizes)[0]["decode"]["bytes"]["total"]
    assert tiers["host"]["bytes"] == 200.0  # layer 0 expert 1, computed by the host
    assert tiers["link"]["bytes"] == 100.0  # layer 1 expert 0, copied in the pass (expert 3 was still cached)
    assert tiers["fast"]["bytes"] == total - 200.0  # everything else, the copied experts included
    assert tiers["host"]["utilization"] == pytest.approx(200.0 / 0.5 / 1e2)
    assert tiers["link"]["achieved_gbs"] == pytest.approx(100.0 / 0.5 / 1e9)
    assert "utilization" not in tier_traffic([p], acc, [0, 1], 4.0, 4.0, sizes, where, {"fast_Bps": 1.0})["decode"]["link"]
    assert not math.isnan(tiers["fast"]["utilization"])
    assert tiers["host_calls"] == {"cpu": 1, "copy": 1, "copy_cached": 1}  # the engine's host calls reach the record


def test_engine_rates_cli():
    from test_e2e_cli import moecap

    proc = moecap("engine", "rates", "--device", "cpu", check=0)
    assert "int4" in proc.stdout and "GB/s" in proc.stdout and "link: none" in proc.stdout
    again = moecap("engine", "rates", "--device", "cpu", check=0)
    assert "measured" in again.stdout  # the second call reads the cache (same figures)
    assert again.stdout.splitlines()[1] == proc.stdout.splitlines()[1]
