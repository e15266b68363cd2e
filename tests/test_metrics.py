"""Latency and utilization arithmetic on hand-computed cases."""

import math

import pytest

from moecap.metrics.accounting import from_hf_config
from moecap.metrics.latency import percentile, request_latencies, stats, summarize_requests
from moecap.metrics.utilization import TraceError, _sum_min, pass_cost, utilization
from moecap.runners.base import PassTrace, RequestTrace


def test_percentile_matches_numpy_linear():
    np = pytest.importorskip("numpy")
    xs = [5.0, 1.0, 9.0, 3.0, 7.0, 2.0]
    for q in (0, 10, 50, 90, 99, 100):
        assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))
    assert math.isnan(percentile([], 50))


def test_request_latencies_vllm_definitions():
    lat = request_latencies(1.0, [1.5, 1.7, 2.0, 2.6])
    assert lat["ttft_s"] == pytest.approx(0.5)
    assert lat["e2el_s"] == pytest.approx(1.6)
    assert lat["tpot_s"] == pytest.approx((1.6 - 0.5) / 3)
    assert lat["itl_s"] == pytest.approx([0.2, 0.3, 0.6])
    assert request_latencies(0.0, [0.4])["tpot_s"] is None


def test_summarize_counts_failures_and_throughput():
    reqs = [
        RequestTrace(id=0, input_tokens=10, send_s=0.0, token_times_s=[1.0, 2.0, 3.0]),
        RequestTrace(id=1, input_tokens=10, send_s=0.5, token_times_s=[1.5, 4.0]),
        RequestTrace(id=2, input_tokens=10, send_s=0.5, token_times_s=[], error="boom"),
    ]
    s = summarize_requests(reqs, slo_ms={"ttft_ms": 1000, "tpot_ms": 1500})
    t = s["throughput"]
    assert t["completed"] == 2 and t["failed"] == 1
    assert t["duration_s"] == pytest.approx(4.0)
    assert t["output_tokens_per_s"] == pytest.approx(5 / 4)
    assert t["total_tokens_per_s"] == pytest.approx((20 + 5) / 4)
    assert t["requests_per_s"] == pytest.approx(0.5)
    # request 0: ttft 1000 ms, tpot 1000 ms -> good; request 1: ttft 1000, tpot 2500 -> not
    assert t["goodput_requests_per_s"] == pytest.approx(0.25)
    lat = s["latency"]
    assert lat["ttft_ms"]["n"] == 2 and lat["ttft_ms"]["mean"] == pytest.approx(1000)
    assert lat["itl_ms"]["n"] == 3 and lat["itl_ms"]["median"] == pytest.approx(1000)
    assert lat["tpot_ms"]["mean"] == pytest.approx((1000 + 2500) / 2)
    assert stats([])["n"] == 0


def test_multi_token_chunks_are_one_gap_each():
    # a stream of 3 chunks carrying 1, 3 and 2 tokens: vLLM's ITL has 2 gaps, not 5 with 3 zeros
    r = RequestTrace(id=0, input_tokens=4, send_s=0.0, token_times_s=[0.1, 0.4, 0.4, 0.4, 1.0, 1.0],
                     chunk_times_s=[0.1, 0.4, 1.0], chunk_tokens=[1, 3, 2])
    s = summarize_requests([r])
    lat, thr = s["latency"], s["throughput"]
    assert lat["itl_ms"]["n"] == 2
    assert lat["itl_ms"]["mean"] == pytest.approx((300 + 600) / 2)
    assert lat["itl_ms"]["median"] == pytest.approx(450)
    assert lat["tpot_ms"]["mean"] == pytest.approx(900 / 5)  # (E2EL - TTFT) / (6 - 1)
    assert thr["output_tokens"] == 6
    # the per-token view, under its own name: each gap spread over the tokens of the chunk that ended it
    assert lat["itl_per_token_ms"]["n"] == 5
    assert lat["itl_per_token_ms"]["mean"] == pytest.approx((3 * 100 + 2 * 300) / 5)
    # without chunks, tokens are chunks of one
    one = RequestTrace(id=1, input_tokens=4, send_s=0.0, token_times_s=[0.1, 0.4, 1.0])
    assert summarize_requests([one])["latency"]["itl_ms"]["n"] == 2


def test_duration_runs_from_first_dispatch_to_end_of_last_request_failed_included():
    # vLLM: dur_s is the benchmark's wall time; a failing last request does not shorten it
    ok = RequestTrace(id=0, input_tokens=8, send_s=0.0, token_times_s=[0.5, 1.0], dispatch_s=0.0, finish_s=1.0)
    bad = RequestTrace(id=1, input_tokens=8, send_s=0.2, error="HTTP 500", dispatch_s=0.2, finish_s=4.0)
    t = summarize_requests([ok, bad], slo_ms={"ttft_ms": 1e9})["throughput"]
    assert t["duration_s"] == pytest.approx(4.0)
    assert t["output_tokens_per_s"] == pytest.approx(2 / 4.0)
    assert t["requests_per_s"] == pytest.approx(1 / 4.0)
    assert t["goodput_requests_per_s"] == pytest.approx(1 / 4.0)
    # a failure before any other request started counts from its own dispatch
    early = RequestTrace(id=2, input_tokens=8, send_s=0.0, error="refused", dispatch_s=0.0, finish_s=0.01)
    late = RequestTrace(id=3, input_tokens=8, send_s=1.0, token_times_s=[1.5, 2.0], dispatch_s=1.0, finish_s=2.0)
    assert summarize_requests([early, late])["throughput"]["duration_s"] == pytest.approx(2.0)


def test_single_token_requests_and_empty_sets_follow_vllm():
    # no request with more than one token: vLLM's TPOT statistics are 0 (np.mean([] or 0)), n says why
    reqs = [RequestTrace(id=i, input_tokens=4, send_s=0.0, token_times_s=[0.25]) for i in range(3)]
    lat = summarize_requests(reqs, slo_ms={"tpot_ms": 0.0})["latency"]
    assert lat["tpot_ms"] == {"n": 0, "mean": 0.0, "std": 0.0, "median": 0.0, "p90": 0.0, "p99": 0.0}
    assert lat["itl_ms"]["n"] == 0 and lat["itl_ms"]["mean"] == 0.0
    assert lat["ttft_ms"]["n"] == 3 and lat["ttft_ms"]["mean"] == pytest.approx(250)
    # a one-token request meets any TPOT SLO (vLLM counts its TPOT as 0 for goodput)
    t = summarize_requests(reqs, slo_ms={"tpot_ms": 0.0})["throughput"]
    assert t["goodput_requests_per_s"] == pytest.approx(3 / 0.25)
    # every request failed: nothing measured, all statistics 0 with n 0, nothing divides by zero
    failed = [RequestTrace(id=0, input_tokens=4, send_s=0.0, error="x", finish_s=0.5)]
    s = summarize_requests(failed)
    assert s["latency"]["ttft_ms"]["n"] == 0 and s["latency"]["ttft_ms"]["median"] == 0.0
    assert s["throughput"]["duration_s"] == pytest.approx(0.5)
    assert s["throughput"]["output_tokens_per_s"] == 0.0
    assert summarize_requests([])["throughput"]["duration_s"] == 0.0


def test_std_is_population_std_as_numpy():
    np = pytest.importorskip("numpy")
    xs = [1.0, 4.0, 9.0, 2.5]
    assert stats(xs)["std"] == pytest.approx(float(np.std(xs)))


def test_sum_min():
    assert _sum_min(1, 3, None) == 6
    assert _sum_min(5, 9, 6) == 5 + 6 + 6 + 6 + 6
    assert _sum_min(7, 9, 6) == 18
    assert _sum_min(4, 3, None) == 0


# hidden 4, 2 layers, 2 heads of dim 2, 1 KV head, 4 experts of intermediate 6, top-2, vocab 10
TOY = {
    "model_type": "mixtral",
    "hidden_size": 4,
    "intermediate_size": 6,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 2,
    "num_local_experts": 4,
    "num_experts_per_tok": 2,
    "vocab_size": 10,
    "tie_word_embeddings": False,
}


def toy_pass(**kw):
    base = dict(
        index=0, phase="decode", batch=0, new_tokens=[1, 1], context_lens=[3, 5], logits_tokens=2,
        start_s=0.0, end_s=0.5, expert_counts=[[1, 1, 2, 0], [0, 0, 2, 2]],
    )
    base.update(kw)
    return PassTrace(**base)


def test_toy_accounting():
    acc = from_hf_config(TOY)
    layer = acc.layers[0]
    assert (layer.attn_params, layer.router_params, layer.expert_params) == (48, 16, 72)
    assert acc.lm_head_params == 40 and layer.kv_cache_elems_per_token == 4


def test_pass_cost_hand_computed():
    acc = from_hf_config(TOY)
    c = pass_cost(toy_pass(), acc, [0, 1], weight_bytes_per_param=2, kv_bytes_per_elem=2)
    b = c["bytes"]
    assert b["attention"] == 2 * 48 * 2
    assert b["router"] == 2 * 16 * 2
    assert b["experts"] == (3 + 2) * 72 * 2  # traced unions: 3 experts in layer 0, 2 in layer 1
    assert b["lm_head"] == 80
    assert b["kv_read"] == 2 * (3 + 5) * 4 * 2  # context lengths, not scheduled tokens
    assert b["kv_write"] == 2 * 2 * 4 * 2
    assert b["total"] == 1216
    f = c["flops"]
    assert f["linear"] == 2 * 2 * 2 * (48 + 16 + 2 * 72) + 2 * 2 * 40  # top-k experts per token
    assert f["attention_scores"] == 2 * (2 * 2 * 4 * (4 + 6))  # 4 * heads * head_dim * (ctx + 1)
    assert c["active_experts"] == [3, 2]


def test_prefill_is_causal():
    acc = from_hf_config(TOY)
    p = toy_pass(phase="prefill", new_tokens=[3], context_lens=[0], logits_tokens=3, expert_counts=[[3, 3, 0, 0], [6, 0, 0, 0]])
    c = pass_cost(p, acc, [0, 1], 2, 2)
    assert c["bytes"]["kv_read"] == 0
    assert c["flops"]["attention_scores"] == 2 * 2 * 2 * 4 * (1 + 2 + 3)


def test_utilization_is_sum_over_passes_not_mean_of_ratios():
    acc = from_hf_config(TOY)
    p1 = toy_pass(index=0, start_s=0.0, end_s=0.1)
    p2 = toy_pass(index=1, start_s=0.1, end_s=1.0, context_lens=[4, 6])
    phases, rows = utilization([p1, p2], acc, [0, 1], 2, 2, peak_bandwidth_Bps=1000.0, peak_flops=1e4)
    d = phases["decode"]
    total_bytes = rows[0]["bytes"] + rows[1]["bytes"]
    assert d["s_mbu"] == pytest.approx(total_bytes / 1.0 / 1000.0)
    mean_of_ratios = (rows[0]["bytes"] / 0.1 + rows[1]["bytes"] / 0.9) / 2 / 1000
    assert d["s_mbu"] != pytest.approx(mean_of_ratios)
    assert d["s_mfu"] == pytest.approx((rows[0]["flops"] + rows[1]["flops"]) / 1.0 / 1e4)
    assert d["passes"] == 2 and d["tokens"] == 4
    assert d["bytes"]["total"] == pytest.approx(total_bytes)
    assert d["mean_active_experts_per_layer"] == pytest.approx(2.5)


def test_untraced_pass_is_an_error_not_a_guess():
    acc = from_hf_config(TOY)
    with pytest.raises(TraceError, match="no traced expert counts"):
        pass_cost(toy_pass(expert_counts=None), acc, [0, 1], 2, 2)


def test_sliding_window_clamps_kv_and_scores():
    cfg = {**TOY, "sliding_window": 4}
    acc = from_hf_config(cfg)
    assert acc.layers[0].attn_window == 4
    c = pass_cost(toy_pass(context_lens=[10, 2]), acc, [0, 1], 2, 2)
    assert c["bytes"]["kv_read"] == 2 * (4 + 2) * 4 * 2
    assert c["flops"]["attention_scores"] == 2 * (2 * 2 * 4 * (4 + 3))
