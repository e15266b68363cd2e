"""The llama.cpp backend end to end on this CPU: the shipped ``llamacpp-cpu`` suite through the real CLI
(GGUF export, llama-cpp-python's server launched and stopped, streamed requests at two concurrencies and a
Poisson rate), the MoE placement knobs, and errors."""

from __future__ import annotations

import json
from pathlib import Path

import psutil
import pytest
from pydantic import ValidationError

pytest.importorskip("llama_cpp")
pytest.importorskip("gguf")

from test_e2e_cli import moecap, records  # noqa: E402
from test_serving_runners import PEAKS, _run  # noqa: E402

SMALL = ["--set", "workloads.0.num_prompts=6", "--set", "workloads.0.input_tokens=40",
         "--set", "workloads.0.output_tokens=12"]


@pytest.fixture(scope="module")
def llamacpp_run(tmp_path_factory, tiny_moe_dir):
    out = tmp_path_factory.mktemp("results")
    proc = moecap("run", "llamacpp-cpu", "-o", str(out), *SMALL, check=0)
    return out, proc


def test_llamacpp_suite_records(llamacpp_run):
    out, proc = llamacpp_run
    recs = records(out / "llamacpp-cpu")
    assert len(recs) == 3, proc.stdout
    loads = set()
    logs = []
    for cell, rec in recs.items():
        assert rec["status"] == "ok", rec.get("error")
        load = rec["config"]["load"]
        loads.add((load["kind"], load.get("concurrency"), load.get("rate"), load.get("arrival")))
        rep = rec["report"]
        tp = rep["throughput"]
        # every request finished with all its tokens: none interrupted by a later one
        assert tp["completed"] == 6 and tp["failed"] == 0
        assert tp["input_tokens"] == 6 * 40 and tp["output_tokens"] == 6 * 12
        assert tp["goodput_requests_per_s"] is not None and tp["slo_ms"] == {"ttft_ms": 500.0, "tpot_ms": 50.0}
        for name in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
            stats = rep["latency"][name]
            assert stats["n"] > 0
            assert 0 < stats["median"] <= stats["p90"] <= stats["p99"], (name, stats)
        assert rep["latency"]["itl_ms"]["n"] == 6 * 11
        assert rep["tracing"]["traced"] is False and rep["tracing"]["reason"]
        # decode S-MBU/S-MFU estimated from the streamed timestamps, labelled so, against calibrated peaks
        util = rep["utilization"]
        assert util["basis"] == "estimated" and util["decode"]["estimated"] is True
        assert "uniform" in util["decode"]["expert_unions"] and util["prefill"]["available"] is False
        assert 0 < util["decode"]["s_mbu"] < 1 and 0 < util["decode"]["s_mfu"] < 1
        assert util["peak"]["kind"] == "calibrated" and util["weight_bytes_per_param"] == 4.0
        # llama-cpp-python decodes one request at a time: batch 1, top-2 of 8 experts per layer
        assert util["decode"]["mean_batch"] == pytest.approx(1.0, abs=0.05)
        assert util["decode"]["mean_active_experts_per_layer"] == pytest.approx(2.0, abs=0.1)
        assert rep["model"]["n_experts"] == 8  # accounting from the exported model's HF config
        info = rec["config"]["runner"]
        assert str(info.get("gguf", "")).endswith("-f32.gguf")
        # the server was torn down: its process is gone
        pid = info.get("server_pid")
        assert pid is None or not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        # the server's log, the part written while this cell ran, is in the cell's artifacts
        log = (out / "llamacpp-cpu" / rec["artifacts"]["server_log"]).read_text()
        assert "POST /v1/completions" in log
        logs.append(log)
        reqs = [json.loads(line) for line in (out / "llamacpp-cpu" / cell / "requests.jsonl").read_text().splitlines()]
        assert len(reqs) == 6 and all(r["input_tokens"] == 40 and r["output_tokens"] == 12 for r in reqs)
        assert all(len(r["token_times_s"]) == 12 for r in reqs)
    # each cell ran in its own worker (the local executor's default), which launched its own server: every
    # cell's log part starts with the launch command (with --isolate group only the first one would)
    assert sum("$ " in log and "moecap.runners.llamacpp_server" in log for log in logs) == 3
    assert loads == {("concurrency", 1, None, None), ("concurrency", 4, None, None), ("rate", None, 4.0, "poisson")}
    table = moecap("report", str(out / "llamacpp-cpu"), check=0).stdout
    assert "llamacpp" in table and "conc=4" in table and "rate=4.0" in table


def test_llamacpp_queueing_shows_in_ttft(llamacpp_run):
    """llama-cpp-python serves one request at a time: at concurrency 4 a request waits for the ones
    ahead of it, so TTFT grows while TPOT stays."""
    out, _ = llamacpp_run
    by_conc = {}
    for rec in records(out / "llamacpp-cpu").values():
        c = rec["config"]["load"].get("concurrency")
        if c:
            by_conc[c] = rec["report"]["latency"]
    assert by_conc[4]["ttft_ms"]["median"] > 1.5 * by_conc[1]["ttft_ms"]["median"]


def _suite(tmp_path, model_dir, args: dict) -> dict:
    return {
        "name": "lcpp",
        "models": [{"id": str(model_dir), "name": "tiny"}],
        "runners": [{"type": "llamacpp", "args": {"n_threads": 1, "warmup_requests": 0, "startup_timeout_s": 120,
                                                  **args}}],
        "workloads": [{"name": "w", "input_tokens": 16, "output_tokens": 4, "num_prompts": 2}],
        "loads": [{"concurrency": 1}],
        "hardware": {"device": "cpu", "peaks": PEAKS, "calibrate": "never"},
        "output": {"dir": str(tmp_path / "results")},
    }


def _records(tmp_path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((tmp_path / "results" / "lcpp").glob("*.json"))]


def _server_log(rec: dict) -> str:
    return Path(rec["config"]["runner"]["server_log"]).read_text()


def test_llamacpp_expert_placement_knobs(tmp_path, tiny_moe_dir):
    """n_cpu_moe and override_tensor reach llama.cpp's tensor_buft_overrides (logged by the server)."""
    _run(_suite(tmp_path, tiny_moe_dir, {"n_cpu_moe": 1, "override_tensor": [r"blk\.1\.ffn_up_exps=CPU"]}))
    (rec,) = _records(tmp_path)
    assert rec["status"] == "ok", rec.get("error")
    log = _server_log(rec)
    assert r"moecap-llamacpp: tensor override blk\.0\.ffn_(up|down|gate)_exps -> CPU" in log
    assert r"moecap-llamacpp: tensor override blk\.1\.ffn_up_exps -> CPU" in log


def test_llamacpp_unknown_buffer_type_fails_the_cell(tmp_path, tiny_moe_dir):
    _run(_suite(tmp_path, tiny_moe_dir, {"override_tensor": ["ffn_.*_exps=NOPE0"], "startup_timeout_s": 60}))
    (rec,) = _records(tmp_path)
    assert rec["status"] == "failed"
    assert "unknown buffer type 'NOPE0'" in rec["error"] and "available: CPU" in rec["error"]
    log = (tmp_path / "results" / "lcpp" / rec["artifacts"]["server_log"]).read_text()
    assert "unknown buffer type 'NOPE0'" in log


def test_llamacpp_args_validation():
    from moecap.runners.args import LlamaCppRunnerArgs

    with pytest.raises(ValidationError, match="REGEX=BUFFER_TYPE"):
        LlamaCppRunnerArgs(override_tensor=["ffn_exps"])
    with pytest.raises(ValidationError, match="bad regular expression"):
        LlamaCppRunnerArgs(override_tensor=["blk.(=CPU"])
    with pytest.raises(ValidationError, match="weight_type"):
        LlamaCppRunnerArgs(weight_type="q4_k")
    with pytest.raises(ValidationError, match=".gguf"):
        LlamaCppRunnerArgs(gguf="/models/x.bin")
    assert LlamaCppRunnerArgs().prompt_format == "text"


def test_n_cpu_moe_patterns():
    import re

    from moecap.runners.llamacpp_server import n_cpu_moe_patterns

    pats = n_cpu_moe_patterns(2)
    names = [f"blk.{i}.ffn_{w}_exps.weight" for i in range(3) for w in ("gate", "up", "down")] + ["blk.0.attn_q.weight"]
    hit = {n for n in names if any(re.search(p, n) for p in pats)}
    assert hit == {f"blk.{i}.ffn_{w}_exps.weight" for i in range(2) for w in ("gate", "up", "down")}


@pytest.mark.parametrize("peaks", [{"mem_bandwidth_gbs": 10.0, "tflops": {"fp32": 1.0, "int8": 2.0}},
                                   {"mem_bandwidth_gbs": 10.0, "tflops": {"fp32": 1.0}}])
def test_llamacpp_q8_0_priced_at_its_tensor_types(tmp_path, tiny_moe_dir, peaks):
    """A q8_0 GGUF (issue 16: it failed with "unknown dtype 'int8'" and had no utilization): its bytes are
    read from the file's tensor types (34 bytes per 32 weights), its S-MFU is against the int8 peak the
    quantized dot products run on, and without an int8 peak S-MBU still stands."""
    suite = _suite(tmp_path, tiny_moe_dir, {"weight_type": "q8_0"})
    suite["hardware"]["peaks"] = peaks
    _run(suite)
    (rec,) = _records(tmp_path)
    assert rec["status"] == "ok", rec.get("error")
    util = rec["report"]["utilization"]
    assert util["basis"] == "estimated"
    assert util["component_bytes_per_param"] == {k: pytest.approx(34 / 32) for k in
                                                 ("attention", "router", "experts", "lm_head")}
    assert set(util["weight_bytes_source"]["types"]["experts"]) == {"Q8_0"}
    assert util["peak"]["compute_dtype"] == "int8"
    assert 0 < util["decode"]["s_mbu"] < 1
    if "int8" in peaks["tflops"]:
        assert 0 < util["decode"]["s_mfu"] < 1 and util["peak"]["tflops"] == 2.0
    else:
        assert util["decode"]["s_mfu"] is None and util["peak"]["tflops"] is None
    assert rec["report"]["client"]["prompt_cache"]["unique_prompts"] is True


def test_gguf_weight_bytes_reads_real_tensor_types(tmp_path, tiny_moe_dir):
    from moecap.gguf_export import ensure_gguf, gguf_weight_bytes

    for wt, bpp in (("f32", 4.0), ("q8_0", 34 / 32), ("q4_0", 18 / 32)):
        info = gguf_weight_bytes(ensure_gguf(tiny_moe_dir, wt, cache_root=tmp_path))
        assert set(info["bytes_per_param"]) >= {"attention", "router", "experts", "lm_head"}
        assert all(v == pytest.approx(bpp) for v in info["bytes_per_param"].values()), (wt, info)
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 4)
    with pytest.raises(Exception):
        gguf_weight_bytes(bad)
