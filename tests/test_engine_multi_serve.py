"""``moecap serve`` with the backends for several children of one base (consolidated, partition) over real
HTTP on the tiny-moe children, and the ``moecap-serve`` runner benchmarking them through the executor on a
multi-tenant trace, with per-child quality scored through the server."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from conftest import PYTHON, REPO, free_port, running_server
from test_engine_serve import _body, _http, _prompt, _stream, _tokens_of

CHILDREN = ("tiny-moe-code", "tiny-moe-prose", "tiny-moe-c")


@pytest.fixture(scope="module")
def reference(tiny_moe_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    zoo = tiny_moe_dir.parent
    models = {c: AutoModelForCausalLM.from_pretrained(zoo / c.removeprefix("tiny-moe-"), dtype=torch.float32).eval()
              for c in CHILDREN}
    tok = AutoTokenizer.from_pretrained(tiny_moe_dir)

    def generate(model: str, ids: list[int], n: int) -> list[int]:
        x = torch.tensor([ids])
        with torch.inference_mode():
            out = models[model].generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                                         pad_token_id=tok.pad_token_id, eos_token_id=None)
        return out[0, len(ids):].tolist()

    generate.expert_bytes = sum(p.numel() * p.element_size() for n, p in models["tiny-moe-c"].named_parameters()
                                if ".experts." in n)
    return generate


def _serve(*args: str):
    port = free_port()
    cmd = [PYTHON, "-m", "moecap", "serve", *CHILDREN, "--port", str(port), "--device", "cpu", *args]
    return running_server(cmd, f"http://127.0.0.1:{port}/health", deadline_s=300), f"http://127.0.0.1:{port}"


def _interleaved(url: str, reference, rounds: int = 2) -> None:
    """Each child in turn (so every request switches models), greedy, equal to the child's own generate."""
    for r in range(rounds):
        for i, child in enumerate(CHILDREN):
            ids = _prompt(6 + 3 * i, 40 + 10 * r + i)
            status, events = _stream(url + "/v1/completions", _body(child, ids, 8, stream=True))
            assert status == 200 and events[-1] == "[DONE]"
            assert _tokens_of(events)[0] == reference(child, ids, 8), (child, r)


def test_consolidated_threshold_zero_serves_each_child_exactly(tiny_moe_dir, reference):
    """Threshold 0 shares only experts the children did not change: every answer is the child's own,
    while the experts are still stored fewer times than three separate models would; each switch swaps
    the child's non-expert layers and is timed."""
    ctx, url = _serve("--backend", "consolidated", "--threshold", "0", "--shared", "base")
    with ctx:
        _interleaved(url, reference)
        stats = _http(url + "/stats")[1]
    assert stats["backend"] == "consolidated"
    mem = stats["memory"]
    # every expert a child changed has its private copy, the unchanged ones are stored once
    assert reference.expert_bytes <= mem["expert_bytes"] <= 3 * reference.expert_bytes
    assert mem["expert_bytes_fast"] == mem["expert_bytes"] and mem["expert_bytes_host"] == 0
    switched = [b for i, b in enumerate(stats["batches"]) if i and b["model"] != stats["batches"][i - 1]["model"]]
    assert len(switched) == 5 and all(b["switch_s"] > 0 for b in switched)
    assert stats["totals"]["switches"] == 6  # the first batch switches from the child active at load


def test_consolidated_shares_experts_and_partition_offloads(tiny_moe_dir, reference):
    """Full sharing (a high threshold) stores each expert once per layer: a third of three children's
    experts; the outputs move away from the children but stay well-formed. A partition of a small fast
    budget keeps the children exact while most of their experts live in host memory."""
    ctx, url = _serve("--backend", "consolidated", "--threshold", "1000")
    with ctx:
        stats = _http(url + "/stats")[1]
        status, body = _http(url + "/v1/completions", _body("tiny-moe-c", _prompt(9, 3), 5))
        assert status == 200 and len(body["choices"][0]["token_ids"]) == 5
        per_child = stats["memory"]["child_non_expert_bytes_each"]
    shared_bytes = stats["memory"]["expert_bytes"]
    assert shared_bytes == reference.expert_bytes  # one copy of each expert for the three children

    ctx, url = _serve("--backend", "partition", "--fast-budget-gb", str(3 * (per_child + shared_bytes / 2) / 1e9))
    with ctx:
        _interleaved(url, reference, rounds=1)
        stats = _http(url + "/stats")[1]
    mem = stats["memory"]
    assert stats["backend"] == "partition"
    total = mem["expert_bytes_fast"] + mem["expert_bytes_host"]
    assert total == 3 * shared_bytes  # three children, each with every expert: the consolidated pool is a third
    assert 0 < mem["expert_bytes_host"] and mem["expert_bytes_fast"] <= 3 * shared_bytes / 2 + 1
    assert all(b["switch_s"] == 0 for b in stats["batches"])  # nothing to swap: separate weights


def test_moecap_serve_runner_multi_tenant_suite(tmp_path, tiny_moe_dir):
    """The `moecap-serve` runner through the executor: a skewed Poisson trace over three children on the
    consolidated backend, per-child turnaround in the record, the server's switches and memory, and each
    child's perplexity on every domain scored through the server (its own domain is its best)."""
    from moecap.run import run_suite
    from moecap.suite import parse_suite

    shares = {"tiny-moe-code": 0.5, "tiny-moe-prose": 0.3, "tiny-moe-c": 0.2}
    raw = {
        "name": "multi",
        "models": [{"id": "tiny-moe"}],
        "runners": [{"type": "moecap-serve", "args": {"models": shares, "backend": "consolidated", "threshold": 0.1,
                                                      "startup_timeout_s": 300, "max_wait_s": 0.5}}],
        "workloads": [{"name": "w", "input_tokens": 16, "output_tokens": 8, "num_prompts": 24, "seed": 3},
                      {"name": "q", "perplexity": {"datasets": ["tiny-code", "tiny-prose", "tiny-c"],
                                                   "context_length": 128, "max_windows": 4, "batch_size": 4}}],
        "loads": [{"rate": 20.0, "arrival": "poisson"}],
        "hardware": {"device": "cpu", "peaks": {"mem_bandwidth_gbs": 10.0, "tflops": {"fp32": 1.0}},
                     "calibrate": "never"},
        "output": {"dir": str(tmp_path / "results")},
    }
    out = run_suite(parse_suite(raw, "test"), log=lambda s: None)
    assert [o.status for o in out.outcomes] == ["ok", "ok"], [o.record.error for o in out.outcomes]
    perf, quality = (o.record.report for o in out.outcomes)
    assert perf["throughput"]["completed"] == 24 and perf["throughput"]["failed"] == 0
    assert set(perf["per_model"]) == set(shares)
    assert sum(m["requests"] for m in perf["per_model"].values()) == 24
    for m in perf["per_model"].values():
        assert m["latency"]["e2el_ms"]["median"] > 0  # turnaround per child
    server = perf["server"]
    # per child: what its swaps cost, and their share of its TTFT (every request of a batch that switched
    # waited for the switch before its first token)
    for child, m in perf["per_model"].items():
        srv = server["per_model"][child]
        assert m["switch"]["switches"] == srv["switches_to"]
        assert m["switch"]["switch_s_total"] == pytest.approx(srv["switch_s_total"])
        ttft_s = m["latency"]["ttft_ms"]["mean"] * m["latency"]["ttft_ms"]["n"] / 1e3
        assert m["switch"]["share_of_ttft"] == pytest.approx(srv["switch_request_s"] / ttft_s)
        assert 0 <= m["switch"]["share_of_ttft"] < 1
    assert sum(m["switch"]["switch_s_total"] for m in perf["per_model"].values()) == pytest.approx(
        server["switch_s_total"])
    assert server["backend"] == "consolidated" and server["batches"] >= 1
    assert server["switches"] >= 1 and server["switch_ms"]["mean"] > 0
    assert sum(m["requests"] for m in server["per_model"].values()) == 24
    assert server["memory"]["expert_bytes"] > 0
    assert perf["utilization"]["basis"] == "estimated"
    per = quality["quality"]["per_model"]
    assert set(per) == set(shares)
    for child, own in (("tiny-moe-code", "tiny-code"), ("tiny-moe-prose", "tiny-prose"), ("tiny-moe-c", "tiny-c")):
        # on each domain, the child fine-tuned on it is the best of the three: the request's model is served
        ppl = {c: per[c]["perplexity"][own]["perplexity"] for c in shares}
        assert ppl[child] == min(ppl.values()), (own, ppl)
        assert per[child]["perplexity"][own]["predicted_tokens"] == 4 * 127
    assert quality["quality"]["perplexity"] == per["tiny-moe-code"]["perplexity"]

    # the side-by-side view of those records: one row per child, its own-domain perplexity, and a plot
    import subprocess

    png = tmp_path / "tenants.png"
    proc = subprocess.run([PYTHON, "-m", "moecap", "engine", "tenants", str(tmp_path / "results"), "-o", str(png)],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = [ln.split() for ln in proc.stdout.splitlines() if ln.startswith("moecap-serve")]
    assert sorted(ln[3] for ln in lines) == sorted(shares)
    assert "swap ms (child)" in proc.stdout and "swap % of TTFT" in proc.stdout
    for ln in lines:  # each child's own swap time, as its record says
        assert float(ln[10]) == pytest.approx(1e3 * perf["per_model"][ln[3]]["switch"]["switch_s_total"], abs=0.01)
    for ln in lines:
        own = {"tiny-moe-code": "tiny-code", "tiny-moe-prose": "tiny-prose", "tiny-moe-c": "tiny-c"}[ln[3]]
        assert float(ln[-1]) == pytest.approx(per[ln[3]]["perplexity"][own]["perplexity"], abs=0.01)
    assert png.stat().st_size > 10_000
    proc = subprocess.run([PYTHON, "-m", "moecap", "engine", "tenants", str(tmp_path / "nothing")],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 2 and "no such file" in proc.stderr


def test_runner_quality_equals_in_process(tmp_path, tiny_moe_dir):
    """Perplexity and lm-eval accuracy scored over HTTP (echo + logprobs, greedy generation) equal the
    in-process `hf` runner's on the same windows and questions: the quality of what is served is
    measured, not assumed."""
    from moecap.run import run_suite
    from moecap.suite import parse_suite

    child = str(tiny_moe_dir.parent / "prose")
    q = {"name": "q", "perplexity": {"datasets": ["tiny-prose"], "context_length": 64, "max_windows": 6},
         "lm_eval": {"tasks": ["moecap_mc_prose"], "limit": 20}}
    raw = {
        "name": "ppl", "models": [{"id": child, "name": "prose"}],
        "runners": [{"type": "hf", "args": {"dtype": "float32"}},
                    {"type": "moecap-serve", "args": {"startup_timeout_s": 300}}],
        "workloads": [q], "loads": [{"batch_size": 1}],
        "hardware": {"device": "cpu", "calibrate": "never", "peaks": {"mem_bandwidth_gbs": 10.0, "tflops": {"fp32": 1.0}}},
        "output": {"dir": str(tmp_path / "results")},
    }
    out = run_suite(parse_suite(raw, "test"), log=lambda s: None)
    assert [o.status for o in out.outcomes] == ["ok", "ok"], [o.record.error for o in out.outcomes]
    hf, served = (o.record.report["quality"]["perplexity"]["tiny-prose"] for o in out.outcomes)
    assert served["predicted_tokens"] == hf["predicted_tokens"] == 6 * 63
    assert served["perplexity"] == pytest.approx(hf["perplexity"], rel=1e-4)
    hf, served = (o.record.report["quality"]["lm_eval"]["tasks"]["moecap_mc_prose"]["metrics"] for o in out.outcomes)
    assert set(hf) == set(served) and "acc" in hf
    for metric in hf:
        assert served[metric]["value"] == pytest.approx(hf[metric]["value"], abs=1e-9), metric


def test_runner_args_name_what_is_wrong():
    from pydantic import ValidationError

    from moecap.runners.args import MoecapServeRunnerArgs as A

    A(backend="consolidated", threshold=0.2, fast_budget_gb=1)
    A(backend="partition", fast_budget_gb=0.5)
    for kw, msg in (({"threshold": 0.1}, "only for backend consolidated"),
                    ({"backend": "partition"}, "needs fast_budget_gb"),
                    ({"fast_budget_gb": 1.0}, "only for backends partition and consolidated"),
                    ({"backend": "consolidated", "threshold": 0.1, "consolidation_plan": "p.json"}, "not both"),
                    ({"backend": "mixed"}, "backend"),
                    ({"device": "gpu0"}, "device")):
        with pytest.raises(ValidationError, match=msg):
            A(**kw)


def test_backend_registry_and_options():
    from moecap.engine.backend import BACKENDS, BackendError, make_backend

    assert set(BACKENDS) == {"separate", "consolidated", "partition"}
    with pytest.raises(BackendError, match="does not take option.*fast_budget_gb"):
        make_backend("separate", {"a": "x"}, fast_budget_gb=1.0)
    with pytest.raises(BackendError, match="needs --fast-budget-gb"):
        make_backend("partition", {"a": "x", "b": "y"})
    with pytest.raises(BackendError, match="two or more fine-tunes of one architecture"):
        make_backend("consolidated", {"a": "x"})


@pytest.mark.parametrize("runner_key", [None, "sk-runner-0123456789"], ids=["no-key", "runner-key"])
def test_moecap_serve_runner_and_the_api_key(tmp_path, tiny_moe_dir, monkeypatch, runner_key):
    """A key in the user's shell (MOECAP_API_KEY) must not lock the server the runner launches, and a
    runner's own api_key is what the launched server requires, passed through its environment."""
    from moecap.run import run_suite
    from moecap.suite import parse_suite

    monkeypatch.setenv("MOECAP_API_KEY", "sk-shell-9876543210")
    args = {"startup_timeout_s": 300, "warmup_requests": 0, **({"api_key": runner_key} if runner_key else {})}
    raw = {
        "name": "key", "models": [{"id": str(tiny_moe_dir), "name": "tiny"}],
        "runners": [{"type": "moecap-serve", "args": args}],
        "workloads": [{"name": "w", "input_tokens": 8, "output_tokens": 4, "num_prompts": 2}],
        "loads": [{"concurrency": 1}],
        "hardware": {"device": "cpu", "calibrate": "never", "peaks": {"mem_bandwidth_gbs": 10.0, "tflops": {"fp32": 1.0}}},
        "output": {"dir": str(tmp_path / "results")},
    }
    (o,) = run_suite(parse_suite(raw, "test"), log=lambda s: None).outcomes
    assert o.status == "ok", o.record.error
    assert o.record.report["throughput"]["completed"] == 2
    text = "".join(p.read_text() for p in (tmp_path / "results").rglob("*") if p.is_file())
    assert "sk-shell-9876543210" not in text and (runner_key is None or runner_key not in text)
    runner = json.loads(next((tmp_path / "results" / "key").glob("*.json")).read_text())["config"]["runner"]
    server_log = Path(runner["server_log"]).read_text()
    assert ("(API key required)" in server_log) == bool(runner_key), server_log[-2000:]
