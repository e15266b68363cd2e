"""Estimated decode utilization of servers (metrics.serving) checked against the per-pass definitions."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from moecap.metrics.accounting import from_hf_config, load_builtin_config
from moecap.metrics.serving import (
    decode_gaps,
    estimated_decode_utilization,
    expected_union,
    routing_probabilities,
)
from moecap.metrics.utilization import BYTE_COMPONENTS, pass_cost
from moecap.runners.base import PassTrace, RequestTrace


def test_expected_union_exact_small_cases():
    # 2 tokens, each picking 1 of 4 experts uniformly: enumerate the 16 outcomes
    brute = np.mean([len({a, b}) for a, b in itertools.product(range(4), repeat=2)])
    assert expected_union(2, [0.25] * 4) == pytest.approx(brute)
    # one token with top-k routing touches exactly k experts
    assert expected_union(1, [2 / 8] * 8) == pytest.approx(2.0)
    # many tokens touch every expert that can be picked
    assert expected_union(10_000, [2 / 8] * 8) == pytest.approx(8.0)
    assert expected_union(10_000, [0.5, 0.5, 0.0, 1.0]) == pytest.approx(3.0)
    # vectorised over batch sizes
    np.testing.assert_allclose(expected_union(np.array([1.0, 2.0]), [0.25] * 4), [1.0, 1.75])


def test_skewed_routing_touches_fewer_experts():
    acc = from_hf_config(load_builtin_config("mixtral-8x7b"))
    moe = [layer for layer in acc.layers if layer.kind == "moe"]
    skew = [[100, 100, 1, 1, 1, 1, 1, 1]] * len(moe)
    probs, source = routing_probabilities(acc, {"source": "test", "layers": skew})
    assert "test" in source
    uniform, usource = routing_probabilities(acc, None)
    assert "uniform" in usource
    first = moe[0].index
    assert sum(probs[first]) == pytest.approx(2.0)
    assert expected_union(8, probs[first]) < expected_union(8, uniform[first])
    # malformed statistics (wrong layer count) fall back to uniform, and say so
    _, fallback = routing_probabilities(acc, {"source": "x", "layers": skew[:1]})
    assert "uniform" in fallback


def _req(i, n_in, times, error=None):
    return RequestTrace(id=i, input_tokens=n_in, send_s=0.0, token_times_s=list(times), error=error)


def test_single_stream_equals_per_pass_definition():
    """One request at a time: every gap is a batch-1 decode pass; bytes and FLOPs equal pass_cost's for
    passes with k experts per layer and the same KV context."""
    acc = from_hf_config(load_builtin_config("mixtral-8x7b"))
    moe_layers = [layer.index for layer in acc.layers if layer.kind == "moe"]
    n_in, n_out, gap = 100, 6, 0.02
    reqs = [_req(0, n_in, [0.5 + gap * i for i in range(n_out)]),
            _req(1, n_in, [5.0 + gap * i for i in range(n_out)])]  # after the first: never overlapping
    est = estimated_decode_utilization(reqs, acc, 2.0, 2.0, 1e12, 1e15)
    want = dict.fromkeys((*BYTE_COMPONENTS, "total"), 0.0)
    flops = 0.0
    for r in reqs:
        for i in range(1, n_out):  # the pass yielding token i: token i-1 fed, n_in + i - 1 cached
            counts = [[1, 1, 0, 0, 0, 0, 0, 0]] * len(moe_layers)
            p = PassTrace(index=i, phase="decode", batch=0, new_tokens=[1], context_lens=[n_in + i - 1],
                          logits_tokens=1, start_s=0.0, end_s=gap, expert_counts=counts)
            c = pass_cost(p, acc, moe_layers, 2.0, 2.0)
            for k, v in c["bytes"].items():
                want[k] += v
            flops += c["flops"]["total"]
    for k in want:
        assert est["bytes"][k] == pytest.approx(want[k], rel=1e-9), k
    assert est["flops"]["total"] == pytest.approx(flops, rel=1e-9)
    assert est["time_s"] == pytest.approx(2 * (n_out - 1) * gap)
    assert est["passes"] == pytest.approx(2 * (n_out - 1))
    assert est["mean_batch"] == pytest.approx(1.0)
    assert est["mean_active_experts_per_layer"] == pytest.approx(2.0)
    assert est["s_mbu"] == pytest.approx(want["total"] / est["time_s"] / 1e12)
    assert est["estimated"] is True and "uniform" in est["expert_unions"]


def test_lockstep_batch_counts_each_pass_once():
    """Four requests decoding in lockstep (one pass per step): four request-gaps per pass are one pass,
    with batch 4, the four contexts, and the expected union of 4 tokens."""
    acc = from_hf_config(load_builtin_config("mixtral-8x7b"))
    n_moe = sum(1 for layer in acc.layers if layer.kind == "moe")
    steps, gap, n_in = 5, 0.03, 64
    times = [1.0 + gap * i for i in range(steps + 1)]
    reqs = [_req(i, n_in, times) for i in range(4)]
    g = decode_gaps(reqs)
    assert set(g["batch"].tolist()) == {4.0}
    assert sorted(set(g["context"].tolist())) == [4.0 * (n_in + i) for i in range(steps)]
    est = estimated_decode_utilization(reqs, acc, 2.0, 2.0, None, None)
    assert est["passes"] == pytest.approx(steps)
    assert est["time_s"] == pytest.approx(steps * gap)
    union4 = expected_union(4, [0.25] * 8)
    expert_bytes = acc.layers[0].expert_params * 2.0
    assert est["bytes"]["experts"] == pytest.approx(steps * n_moe * union4 * expert_bytes, rel=1e-9)
    assert est["mean_active_experts_per_layer"] == pytest.approx(union4)
    assert est["s_mbu"] is None and est["s_mfu"] is None  # no peaks given: no ratio, bytes still there
    assert est["achieved_bandwidth_gbs"] > 0


def test_failed_and_single_token_requests_are_left_out():
    acc = from_hf_config(load_builtin_config("mixtral-8x7b"))
    reqs = [_req(0, 10, [0.1, 0.2, 0.3]), _req(1, 10, [0.15], None), _req(2, 10, [0.12, 0.22], error="HTTP 500")]
    g = decode_gaps(reqs)
    assert len(g["time_s"]) == 2 and set(g["batch"].tolist()) == {1.0}
    empty = estimated_decode_utilization([], acc, 2.0, 2.0, 1e12, 1e15)
    assert empty["tokens"] == 0 and empty["s_mbu"] is None


def _stream(n=4, tokens=6, gap=0.01):
    return [RequestTrace(id=i, input_tokens=16, send_s=0.0, token_times_s=[0.05 + gap * k for k in range(tokens)])
            for i in range(n)]


def test_component_bytes_price_each_component_at_its_own_type():
    """A GGUF whose experts are q4_0 and the rest q8_0: each byte component at its own bytes/param."""
    acc = from_hf_config(load_builtin_config("mixtral-8x7b"))
    reqs = _stream(1)
    flat = estimated_decode_utilization(reqs, acc, 34 / 32, 2.0, None, None)
    mixed = estimated_decode_utilization(reqs, acc, {"attention": 34 / 32, "router": 34 / 32, "experts": 18 / 32,
                                                     "lm_head": 34 / 32}, 2.0, None, None)
    for comp in ("attention", "router", "lm_head", "kv_read"):
        assert mixed["bytes"][comp] == pytest.approx(flat["bytes"][comp])
    assert mixed["bytes"]["experts"] == pytest.approx(flat["bytes"]["experts"] * 18 / 34)
    assert mixed["flops"] == flat["flops"]


def test_a_cell_on_n_devices_is_measured_against_n_peaks():
    from moecap.run import build_report
    from moecap.hardware import Peaks
    from moecap.runners.base import RunTrace

    cfg = load_builtin_config("mixtral-8x7b")
    peaks = Peaks(device="GPU X", mem_bandwidth_Bps=1e12, flops={"bf16": 1e15}, source="user", kind="user")

    def report(devices):
        trace = RunTrace(passes=[], requests=_stream(), model_config=cfg, moe_layers=[], weight_bytes_per_param=2.0,
                         kv_bytes_per_elem=2.0, kv_cache_expanded_mla=False, compute_dtype="bf16", device="GPU X",
                         tracing={"traced": False, "reason": "http"}, devices=devices)
        return build_report(trace, peaks)[0]["utilization"]

    one, two = report(1), report(2)
    assert two["decode"]["s_mbu"] == pytest.approx(one["decode"]["s_mbu"] / 2)
    assert two["decode"]["s_mfu"] == pytest.approx(one["decode"]["s_mfu"] / 2)
    assert two["peak"]["devices"] == 2 and two["peak"]["mem_bandwidth_gbs"] == pytest.approx(2000)
    assert two["peak"]["per_device"] == {"device": "GPU X", "mem_bandwidth_gbs": pytest.approx(1000),
                                         "tflops": pytest.approx(1000)}
    per = two["decode"]["per_device"]
    assert per["achieved_bandwidth_gbs"] == pytest.approx(one["decode"]["achieved_bandwidth_gbs"] / 2)
    assert per["s_mbu"] == two["decode"]["s_mbu"]
    assert "per_device" not in one["decode"] and one["peak"]["devices"] == 1


def test_recorded_per_pass_unions_replace_the_expected_ones():
    """SGLang's recorder gives each pass's experts per layer: decode gaps at a recorded pass size take
    the recorded mean union (basis recorded), the others the expected union of the routing frequencies."""
    acc = from_hf_config(load_builtin_config("mixtral-8x7b"))
    n_moe = sum(1 for layer in acc.layers if layer.kind == "moe")
    reqs = _stream(1)  # batch 1: top-2 routing uses exactly 2 experts per layer
    base = estimated_decode_utilization(reqs, acc, 2.0, 2.0, None, None)
    # the server recorded batch-1 passes that (say, a shared hot expert) used 2 experts, and others at 3
    rec = {"tokens": [1, 1, 3], "unions": [[2] * n_moe, [2] * n_moe, [5] * n_moe]}
    same = estimated_decode_utilization(reqs, acc, 2.0, 2.0, None, None, recorded_passes=rec)
    assert same["bytes"]["experts"] == pytest.approx(base["bytes"]["experts"])
    assert "recorded per pass by the server (3 passes)" in same["expert_unions"]
    assert "5 of 5 decode gaps" in same["expert_unions"]
    # four concurrent streams (batch 4): no pass of 4 tokens was recorded, so the expectation stands
    four = _stream(4)
    assert estimated_decode_utilization(four, acc, 2.0, 2.0, None, None, recorded_passes=rec)["bytes"]["experts"] \
        == pytest.approx(estimated_decode_utilization(four, acc, 2.0, 2.0, None, None)["bytes"]["experts"])
    # a recorded size that matches: its unions price the experts
    rec4 = {"tokens": [4], "unions": [[3] * n_moe]}
    got = estimated_decode_utilization(four, acc, 2.0, 2.0, None, None, recorded_passes=rec4)
    expect = 3 * sum(layer.expert_params for layer in acc.layers if layer.kind == "moe") * 2.0
    assert got["bytes"]["experts"] == pytest.approx(expect * got["passes"])
