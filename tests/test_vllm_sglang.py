"""The ``vllm`` and ``sglang`` runners: argument validation, the exact server commands, SGLang's
expert-distribution dump parser, the registry and the suite, the whole launch / benchmark / record path
against a stand-in server on the CPU, and (GPU-marked, skipped without a GPU or the engine) the real
engines on a tiny MoE checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import yaml
from pydantic import ValidationError

from conftest import PYTHON, free_port

from moecap.runners.args import SGLangRunnerArgs, VLLMRunnerArgs
from moecap.suite import HardwareConfig, ModelConfig

CPU = HardwareConfig(device="cpu")
PEAKS = {"mem_bandwidth_gbs": 10.0, "tflops": {"fp32": 1.0, "fp16": 1.0, "bf16": 1.0}}


def _moecap(*args, check=None):
    proc = subprocess.run([sys.executable, "-m", "moecap", *args], capture_output=True, text=True,
                          env=dict(os.environ), timeout=300)
    if check is not None:
        assert proc.returncode == check, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


def _errors(exc: ValidationError) -> str:
    return str(exc)


# ---------------------------------------------------------------------------------------------------
# argument validation
# ---------------------------------------------------------------------------------------------------
def test_vllm_args_defaults_and_good_values():
    a = VLLMRunnerArgs()
    assert a.launcher == ["vllm", "serve"] and a.dtype == "auto" and a.enable_prefix_caching is False
    assert a.record_experts is False and a.extra_args == []
    b = VLLMRunnerArgs(dtype="bfloat16", tensor_parallel_size=2, pipeline_parallel_size=1, data_parallel_size=2,
                       enable_expert_parallel=True, max_model_len=4096, max_num_seqs=64,
                       max_num_batched_tokens=8192, gpu_memory_utilization=1.0, kv_cache_dtype="fp8_e4m3",
                       quantization="fp8", enforce_eager=True, enable_prefix_caching=True, seed=7,
                       trust_remote_code=True, extra_args=["--max-logprobs", "5"],
                       launcher=["/opt/vllm/bin/python", "-m", "vllm.entrypoints.openai.api_server", "--model"])
    assert b.gpu_memory_utilization == 1.0 and b.kv_cache_dtype == "fp8_e4m3"


@pytest.mark.parametrize("bad, field", [
    ({"dtype": "fp8"}, "dtype"),
    ({"tensor_parallel_size": 0}, "tensor_parallel_size"),
    ({"data_parallel_size": -1}, "data_parallel_size"),
    ({"gpu_memory_utilization": 0}, "gpu_memory_utilization"),
    ({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization"),
    ({"max_model_len": 0}, "max_model_len"),
    ({"kv_cache_dtype": "fp8 e4m3"}, "kv_cache_dtype"),
    ({"quantization": "--fp8"}, "quantization"),
    ({"launcher": []}, "launcher"),
    ({"launcher": ["vllm", " "]}, "launcher"),
    ({"extra_args": ["--port", "9000"]}, "extra_args"),
    ({"extra_args": ["--served-model-name=x"]}, "extra_args"),
    ({"record_experts": True}, "record_experts"),
    ({"max_num_seqs": 256, "max_num_batched_tokens": 128}, "max_num_batched_tokens"),
    ({"tensor_parallel": 2}, "tensor_parallel"),  # a misspelt field is an error, not ignored
])
def test_vllm_args_bad_values_name_the_field(bad, field):
    with pytest.raises(ValidationError) as err:
        VLLMRunnerArgs(**bad)
    assert field in _errors(err.value)


def test_vllm_record_experts_says_why():
    with pytest.raises(ValidationError) as err:
        VLLMRunnerArgs(record_experts=True)
    msg = _errors(err.value)
    assert "streams" in msg and "--enable-return-routed-experts" in msg and "EPLB" in msg


def test_sglang_args_defaults_and_good_values():
    a = SGLangRunnerArgs()
    assert a.launcher == ["python", "-m", "sglang.launch_server"] and a.disable_radix_cache is True
    assert a.disable_cuda_graph is False and a.record_experts is False
    b = SGLangRunnerArgs(dtype="float16", tp_size=4, dp_size=1, ep_size=2, mem_fraction_static=0.8,
                         max_running_requests=128, chunked_prefill_size=-1, context_length=8192,
                         kv_cache_dtype="fp8_e5m2", quantization="w8a8_fp8", disable_radix_cache=False,
                         disable_cuda_graph=True, attention_backend="flashinfer", moe_runner_backend="triton",
                         moe_a2a_backend="deepep", random_seed=3, trust_remote_code=True, record_experts=True,
                         extra_args=["--log-level", "warning"])
    assert b.chunked_prefill_size == -1 and b.ep_size == 2


@pytest.mark.parametrize("bad, field", [
    ({"dtype": "half"}, "dtype"),
    ({"tp_size": 0}, "tp_size"),
    ({"tp_size": 4, "ep_size": 3}, "ep_size"),
    ({"ep_size": 2}, "ep_size"),  # tp_size unset is 1
    ({"mem_fraction_static": 1.0}, "mem_fraction_static"),
    ({"mem_fraction_static": 0}, "mem_fraction_static"),
    ({"chunked_prefill_size": 0}, "chunked_prefill_size"),
    ({"chunked_prefill_size": -2}, "chunked_prefill_size"),
    ({"attention_backend": "flash infer"}, "attention_backend"),
    ({"moe_a2a_backend": ""}, "moe_a2a_backend"),
    ({"extra_args": ["--model-path", "/x"]}, "extra_args"),
    ({"extra_args": ["--host=0.0.0.0"]}, "extra_args"),
    ({"record_experts": True, "dp_size": 2}, "record_experts"),
    ({"launcher": []}, "launcher"),
])
def test_sglang_args_bad_values_name_the_field(bad, field):
    with pytest.raises(ValidationError) as err:
        SGLangRunnerArgs(**bad)
    assert field in _errors(err.value)


def test_bad_engine_args_stop_the_cli_before_anything_runs(tmp_path):
    suite = {
        "name": "bad-engines",
        "models": [{"id": "Qwen/Qwen1.5-MoE-A2.7B"}],
        "runners": [{"type": "vllm", "args": {"gpu_memory_utilization": 1.5}},
                    {"type": "sglang", "args": {"tp_size": 4, "ep_size": 3}}],
        "workloads": [{"input_tokens": 8, "output_tokens": 2, "num_prompts": 1}],
        "loads": [{"concurrency": 1}],
        "output": {"dir": str(tmp_path / "out")},
    }
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(suite))
    proc = _moecap("run", str(path), check=2)
    assert "runners[0].args" in proc.stderr and "gpu_memory_utilization" in proc.stderr
    assert "runners[1].args" in proc.stderr and "ep_size (3) must divide tp_size (4)" in proc.stderr
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------
# server commands
# ---------------------------------------------------------------------------------------------------
def _runner(cls_name: str, hardware=CPU, **args):
    from moecap.runners.sglang import SGLangRunner
    from moecap.runners.vllm import VLLMRunner

    cls, args_cls = {"vllm": (VLLMRunner, VLLMRunnerArgs), "sglang": (SGLangRunner, SGLangRunnerArgs)}[cls_name]
    r = cls(args_cls(**args), hardware)
    r.port, r.served_model = 8123, "tiny"
    return r


def test_vllm_command_defaults_leave_unset_options_out():
    r = _runner("vllm", launcher=["/opt/vllm/bin/vllm", "serve"])
    assert r.server_command("/models/m") == [
        "/opt/vllm/bin/vllm", "serve", "/models/m",
        "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", "8123", "--dtype", "auto",
        "--no-enable-prefix-caching",
    ]
    assert r.ready_path() == "/health"


def test_vllm_command_every_option_and_extra_args_last():
    r = _runner("vllm", launcher=["/opt/vllm/bin/python", "-m", "vllm.entrypoints.openai.api_server", "--model"],
                host="0.0.0.0", dtype="bfloat16", tensor_parallel_size=2, pipeline_parallel_size=1,
                data_parallel_size=4, enable_expert_parallel=True, max_model_len=4096, max_num_seqs=64,
                max_num_batched_tokens=8192, gpu_memory_utilization=0.85, kv_cache_dtype="fp8",
                quantization="fp8", enforce_eager=True, enable_prefix_caching=True, seed=0,
                trust_remote_code=True, extra_args=["--max-logprobs", "5", "--disable-log-stats"])
    assert r.server_command("/models/m") == [
        "/opt/vllm/bin/python", "-m", "vllm.entrypoints.openai.api_server", "--model", "/models/m",
        "--served-model-name", "tiny", "--host", "0.0.0.0", "--port", "8123", "--dtype", "bfloat16",
        "--tensor-parallel-size", "2", "--pipeline-parallel-size", "1", "--data-parallel-size", "4",
        "--max-model-len", "4096", "--max-num-seqs", "64", "--max-num-batched-tokens", "8192",
        "--gpu-memory-utilization", "0.85", "--kv-cache-dtype", "fp8", "--quantization", "fp8", "--seed", "0",
        "--enable-expert-parallel", "--enforce-eager", "--enable-prefix-caching", "--trust-remote-code",
        "--max-logprobs", "5", "--disable-log-stats",
    ]
    assert r.world_size() == 8


def test_sglang_command_defaults_leave_unset_options_out():
    r = _runner("sglang", launcher=["/opt/sgl/bin/python", "-m", "sglang.launch_server"])
    assert r.server_command("/models/m") == [
        "/opt/sgl/bin/python", "-m", "sglang.launch_server", "--model-path", "/models/m",
        "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", "8123", "--dtype", "auto",
        "--disable-radix-cache",
    ]


def test_sglang_command_every_option_recorder_and_extra_args_last():
    r = _runner("sglang", launcher=["/opt/sgl/bin/python", "-m", "sglang.launch_server"], dtype="bfloat16",
                tp_size=2, dp_size=1, ep_size=2, mem_fraction_static=0.8, max_running_requests=128,
                chunked_prefill_size=-1, context_length=8192, kv_cache_dtype="fp8_e4m3", quantization="fp8",
                disable_radix_cache=False, disable_cuda_graph=True, attention_backend="fa3",
                moe_runner_backend="triton", moe_a2a_backend="none", random_seed=1, trust_remote_code=True,
                record_experts=True, extra_args=["--log-level", "warning"])
    assert r.server_command("/models/m") == [
        "/opt/sgl/bin/python", "-m", "sglang.launch_server", "--model-path", "/models/m",
        "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", "8123", "--dtype", "bfloat16",
        "--tp-size", "2", "--dp-size", "1", "--ep-size", "2", "--mem-fraction-static", "0.8",
        "--max-running-requests", "128", "--chunked-prefill-size", "-1", "--context-length", "8192",
        "--kv-cache-dtype", "fp8_e4m3", "--quantization", "fp8", "--attention-backend", "fa3",
        "--moe-runner-backend", "triton", "--moe-a2a-backend", "none", "--random-seed", "1",
        "--disable-cuda-graph", "--trust-remote-code",
        "--expert-distribution-recorder-mode", "stat", "--expert-distribution-recorder-buffer-size", "-1",
        "--log-level", "warning",
    ]
    assert r.world_size() == 2 and r.summed_ranks() == 2


def test_model_entry_flags_and_random_models_refused():
    r = _runner("vllm", launcher=["/opt/vllm/bin/vllm", "serve"])
    r.local_dir = "/models/m"
    arg = r.model_argument(ModelConfig(id="org/name", revision="abc123", trust_remote_code=True))
    assert arg == "/models/m"
    cmd = r.server_command(arg)
    assert cmd[-3:] == ["--trust-remote-code", "--revision", "abc123"]
    s = _runner("sglang", launcher=["/opt/sgl/bin/python", "-m", "sglang.launch_server"])
    with pytest.raises(ValueError, match="random weights"):
        s.model_argument(ModelConfig(id="random:mixtral-8x7b"))


def test_launcher_program_resolution(tmp_path, monkeypatch):
    from moecap.runners.vllm import resolve_program

    beside = os.path.join(os.path.dirname(sys.executable), "python")
    if os.path.isfile(beside):  # a bare "python" is moecap's own environment's
        assert _runner("sglang").launcher_argv() == [beside, "-m", "sglang.launch_server"]
    tool = tmp_path / "bin" / "fake-vllm-tool"
    tool.parent.mkdir()
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", str(tool.parent))
    assert resolve_program("fake-vllm-tool") == str(tool)  # then PATH
    assert resolve_program("no-such-program-here") == "no-such-program-here"
    assert resolve_program("/abs/vllm") == "/abs/vllm"


def test_one_gpu_server_is_pinned_to_the_suite_device(monkeypatch):
    from moecap.runners.vllm import pinned_gpu

    assert pinned_gpu("cuda:1", 1, {}, {}) == "1"
    assert pinned_gpu("cuda:1", 1, {}, {"CUDA_VISIBLE_DEVICES": "4,6"}) == "6"
    assert pinned_gpu("cuda:1", 2, {}, {}) is None  # a multi-GPU server keeps what it sees
    assert pinned_gpu("cuda", 1, {}, {}) is None
    assert pinned_gpu("cuda:0", 1, {"CUDA_VISIBLE_DEVICES": "3"}, {}) is None  # the user chose
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    r = _runner("vllm", env={"FOO": "bar"})
    r.hardware = SimpleNamespace(device="cuda:2")
    env = r.server_env()
    assert env["CUDA_VISIBLE_DEVICES"] == "2" and env["FOO"] == "bar"
    r2 = _runner("vllm", tensor_parallel_size=2)
    r2.hardware = SimpleNamespace(device="cuda:2")
    assert "CUDA_VISIBLE_DEVICES" not in r2.server_env()


def test_hub_model_config_comes_from_the_local_cache_only(tmp_path, monkeypatch):
    import huggingface_hub

    from moecap.runners.vllm import cached_hub_config

    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"model_type": "qwen2_moe", "num_experts": 60}))
    asked = []

    def fake_lookup(repo_id, filename, revision=None):
        asked.append((repo_id, filename, revision))
        return str(cfg) if repo_id == "Qwen/Qwen1.5-MoE-A2.7B" else None

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", fake_lookup)
    assert cached_hub_config("Qwen/Qwen1.5-MoE-A2.7B", "main") == {"model_type": "qwen2_moe", "num_experts": 60}
    assert asked == [("Qwen/Qwen1.5-MoE-A2.7B", "config.json", "main")]
    assert cached_hub_config("org/not-cached") == {}


@pytest.mark.parametrize("args, config, expected, compute", [
    ({}, {"torch_dtype": "bfloat16"}, (2.0, 2.0), "bfloat16"),
    ({}, {"torch_dtype": "float32"}, (2.0, 2.0), "float16"),  # auto: fp16 for an fp32 checkpoint
    ({"dtype": "float32"}, {"torch_dtype": "bfloat16"}, (4.0, 4.0), "float32"),
    ({"dtype": "bfloat16", "kv_cache_dtype": "fp8_e4m3"}, {}, (2.0, 1.0), "bfloat16"),
    ({"dtype": "bfloat16", "quantization": "fp8"}, {}, (None, 2.0), "bfloat16"),
    ({}, {"torch_dtype": "bfloat16", "quantization_config": {"quant_method": "fp8"}}, (None, 2.0), "bfloat16"),
    ({"weight_bytes_per_param": 0.5, "kv_bytes_per_elem": 1.0}, {"torch_dtype": "bfloat16"}, (0.5, 1.0), "bfloat16"),
    ({"dtype": "float16", "kv_bytes_per_elem": 1.0}, {}, (2.0, 1.0), "float16"),
])
def test_storage_and_compute_precision(args, config, expected, compute):
    for kind in ("vllm", "sglang"):
        r = _runner(kind, **args)
        r._hf_config = dict(config)
        assert r.storage_bytes() == expected and r.compute_dtype() == compute


# ---------------------------------------------------------------------------------------------------
# SGLang's expert distribution dump
# ---------------------------------------------------------------------------------------------------
def _roundtrip(obj, tmp_path):
    """As SGLang writes it (torch.save) and as the runner reads it (torch.load, weights only)."""
    import torch

    path = tmp_path / "expert_distribution_recorder_1.pt"
    torch.save(obj, path)
    return torch.load(path, map_location="cpu", weights_only=True)


def test_stat_dump_per_pass_rows(tmp_path):
    import torch

    from moecap.runners.sglang import expert_distribution_stats

    # [passes, layers, logical experts]: layer 0 is a dense layer (DeepSeek's first_k_dense_replace), the
    # last row an unused buffer slot; top-2 routing of 3 tokens, then 1 token, then 2 tokens
    steps = [
        [[0, 0, 0, 0], [2, 2, 1, 1], [3, 0, 3, 0]],
        [[0, 0, 0, 0], [1, 0, 0, 1], [0, 1, 1, 0]],
        [[0, 0, 0, 0], [0, 2, 2, 0], [2, 0, 0, 2]],
        [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]],
    ]
    dump = _roundtrip({"rank": 0, "logical_count": torch.tensor(steps, dtype=torch.int32),
                       "average_utilization_rate_over_window": None}, tmp_path)
    out = expert_distribution_stats(dump, moe_layers=[1, 2], top_k=2)
    assert out["mode"] == "stat" and out["source"] == "sglang expert_distribution_recorder (stat)"
    assert out["layers"] == [[3, 4, 3, 2], [5, 1, 4, 2]]
    assert out["tokens"] == 6 and out["passes"] == 3
    assert out["pass_expert_unions"] == [[4, 2], [2, 2], [2, 2]]
    every = expert_distribution_stats(dump)  # no model knowledge: every row, no token count
    assert every["layers"][0] == [0, 0, 0, 0] and len(every["layers"]) == 3 and every["tokens"] is None
    assert every["pass_expert_unions"][0] == [0, 4, 2]


def test_stat_dump_summed_over_tensor_parallel_ranks(tmp_path):
    import torch

    from moecap.runners.sglang import expert_distribution_stats

    steps = [[[2, 2, 0, 0]], [[0, 2, 0, 2]]]  # two TP ranks each counted 1 token of top-2 per pass
    dump = _roundtrip({"rank": 0, "logical_count": torch.tensor(steps)}, tmp_path)
    out = expert_distribution_stats(dump, top_k=2, summed_ranks=2)
    assert out["layers"] == [[1, 2, 0, 1]] and out["tokens"] == 2 and out["pass_expert_unions"] == [[2], [2]]
    with pytest.raises(ValueError, match="summed_ranks=4"):
        expert_distribution_stats(dump, top_k=2, summed_ranks=4)


def test_stat_dump_older_summed_form_and_empty_window(tmp_path):
    import torch

    from moecap.runners.sglang import expert_distribution_stats

    old = _roundtrip({"rank": 0, "logical_count": torch.tensor([[4, 0, 2, 2], [1, 3, 3, 1]])}, tmp_path)
    out = expert_distribution_stats(old, top_k=2)
    assert out["layers"] == [[4, 0, 2, 2], [1, 3, 3, 1]] and out["tokens"] == 4
    assert out["passes"] is None and out["pass_expert_unions"] is None
    empty = _roundtrip({"rank": 0, "logical_count": torch.zeros((0, 2, 4), dtype=torch.int32)}, tmp_path)
    out = expert_distribution_stats(empty, top_k=2)
    assert out["layers"] == [[0] * 4, [0] * 4] and out["tokens"] == 0 and out["passes"] == 0
    assert out["pass_expert_unions"] == []


def test_per_pass_dump_maps_physical_slots_to_logical_experts(tmp_path):
    import torch

    from moecap.runners.sglang import expert_distribution_stats

    # 4 logical experts on 5 physical slots (slot 4 is a redundant copy of expert 0), 2 layers
    p2l = torch.tensor([[0, 1, 2, 3, 0], [0, 1, 2, 3, 0]])

    def rec(pass_id, rank, counts):
        return {"forward_pass_id": pass_id, "rank": rank, "gatherer_key": "primary",
                "global_physical_count": torch.tensor(counts, dtype=torch.int32)}

    records = [
        rec(8, 0, [[0, 1, 0, 0, 1], [1, 0, 1, 0, 0]]),
        rec(7, 0, [[1, 1, 1, 0, 1], [0, 2, 0, 2, 0]]),
        rec(7, 1, [[9, 9, 9, 9, 9], [9, 9, 9, 9, 9]]),  # another rank's file content: ignored
        rec(9, 0, [[0, 0, 0, 0, 0], [0, 0, 0, 0, 0]]),  # an idle pass
    ]
    dump = _roundtrip({"records": records, "last_physical_to_logical_map": p2l}, tmp_path)
    out = expert_distribution_stats(dump, top_k=2)
    assert out["mode"] == "per_pass" and out["source"] == "sglang expert_distribution_recorder (per_pass)"
    assert out["layers"] == [[3, 2, 1, 0], [1, 2, 1, 2]]
    assert out["tokens"] == 3 and out["passes"] == 2
    assert out["pass_expert_unions"] == [[3, 2], [2, 2]]  # pass 7 first
    per_token = dict(records[0], topk_ids_of_layer=torch.zeros((2, 1, 2), dtype=torch.int32))
    dump = _roundtrip({"records": [per_token], "last_physical_to_logical_map": p2l}, tmp_path)
    assert expert_distribution_stats(dump)["mode"] == "per_token"


@pytest.mark.parametrize("dump, kwargs, match", [
    ([[1, 2]], {}, "is a dict"),
    ({"something": 1}, {}, "neither logical_count"),
    ({"logical_count": [[1, 2], [3]]}, {}, "unequal"),
    ({"logical_count": [[1, 2], [3, 4]]}, {"moe_layers": [2]}, "outside"),
    ({"records": [], "last_physical_to_logical_map": [[0, 1]]}, {}, "no records"),
    ({"records": [{"global_physical_count": [[1, 1]]}]}, {}, "last_physical_to_logical_map"),
    ({"logical_count": [[1, 2]]}, {"summed_ranks": 0}, "summed_ranks"),
])
def test_dump_parser_rejects_what_it_cannot_read(dump, kwargs, match):
    from moecap.runners.sglang import expert_distribution_stats

    with pytest.raises(ValueError, match=match):
        expert_distribution_stats(dump, **kwargs)


# ---------------------------------------------------------------------------------------------------
# registry, imports, suite
# ---------------------------------------------------------------------------------------------------
def test_registry_entries_resolve():
    from moecap.registry import RUNNERS, load_object
    from moecap.runners.openai_runner import ServedRunner

    for name, args_cls in (("vllm", VLLMRunnerArgs), ("sglang", SGLangRunnerArgs)):
        entry = RUNNERS[name]
        cls = load_object(entry.cls)
        assert issubclass(cls, ServedRunner) and cls.name == name
        assert load_object(entry.args) is args_cls
        assert entry.loads == ("batch", "concurrency", "rate")
        assert entry.quality is False and entry.traces_passes is False and entry.estimates_passes is True


def test_runner_modules_import_no_engine_and_no_torch():
    code = ("import sys, moecap, moecap.registry, moecap.runners.vllm, moecap.runners.sglang;"
            "print(sorted(m for m in ('vllm', 'sglang', 'torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_serving_suite_dry_run_lists_both_engines():
    proc = _moecap("run", "serving-1gpu", "--dry-run", check=0)
    assert "6 cells" in proc.stdout
    lines = [ln for ln in proc.stdout.splitlines() if "|" in ln]
    assert sum("| vllm |" in ln for ln in lines) == 3 and sum("| sglang |" in ln for ln in lines) == 3
    assert "Qwen1.5-MoE-A2.7B" in proc.stdout


# ---------------------------------------------------------------------------------------------------
# the whole path against a stand-in engine server (CPU)
# ---------------------------------------------------------------------------------------------------
FAKE_ENGINE = textwrap.dedent('''
    """Stands in for ``vllm serve`` / ``sglang.launch_server``: records its argv and environment, streams
    one one-character token per requested token, and, like SGLang's recorder, counts the routing of
    every forward pass while recording (one prefill pass per request, then one pass per decoded token)
    and torch.saves it on dump in the stat-mode layout."""
    import json, os, sys, threading, time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    argv = sys.argv[1:]

    def opt(name, default=None):
        return argv[argv.index(name) + 1] if name in argv else default

    model = opt("--model-path") or argv[0]
    with open(os.environ["FAKE_ENGINE_LOG"], "w") as fh:
        json.dump({"argv": argv, "dump_dir": os.environ.get("SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR")}, fh)
    cfg = json.load(open(os.path.join(model, "config.json")))
    L, E, K = cfg["num_hidden_layers"], cfg["num_local_experts"], cfg["num_experts_per_tok"]
    state = {"recording": False, "passes": [], "step": 0}
    lock = threading.Lock()

    def one_pass(n_tokens):
        counts = [[0] * E for _ in range(L)]
        for t in range(n_tokens):
            for layer in range(L):
                for k in range(K):
                    counts[layer][(state["step"] + t + layer + k) % E] += 1
        state["step"] += 1
        if state["recording"]:
            state["passes"].append(counts)

    class H(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def reply(self, code, obj):
            data = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path == "/health":
                return self.reply(200, {})
            self.reply(404, {"error": {"message": "no such route"}})

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if self.path == "/v1/completions":
                return self.complete(json.loads(body))
            if self.path.endswith("_expert_distribution_record"):
                if "--expert-distribution-recorder-mode" not in argv:
                    return self.reply(400, {"error": "Please set ServerArgs.expert_distribution_recorder_mode"})
                with lock:
                    if self.path == "/start_expert_distribution_record":
                        state["recording"], state["passes"] = True, []
                    elif self.path == "/stop_expert_distribution_record":
                        state["recording"] = False
                    elif self.path == "/dump_expert_distribution_record":
                        if os.environ.get("FAKE_DUMP_FAILS"):
                            return self.reply(500, {"error": "dump failed"})
                        import torch
                        counts = torch.tensor(state["passes"], dtype=torch.int32).reshape(-1, L, E)
                        name = "expert_distribution_recorder_%f.pt" % time.time()
                        torch.save({"rank": 0, "logical_count": counts,
                                    "average_utilization_rate_over_window": None},
                                   os.path.join(os.environ.get("SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR", "/tmp"), name))
                return self.reply(200, {})
            self.reply(404, {"error": {"message": "no such route"}})

        def complete(self, req):
            prompt, n = req["prompt"], int(req["max_tokens"])
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            with lock:
                one_pass(len(prompt))
            for i in range(n):
                if i:
                    with lock:
                        one_pass(1)
                usage = {"prompt_tokens": len(prompt), "completion_tokens": i + 1, "total_tokens": len(prompt) + i + 1}
                chunk = {"id": "x", "object": "text_completion", "model": req["model"],
                         "choices": [{"index": 0, "text": "a", "finish_reason": "length" if i == n - 1 else None}],
                         "usage": usage}
                self.wfile.write(("data: " + json.dumps(chunk) + "\\n\\n").encode())
                self.wfile.flush()
            self.wfile.write(("data: " + json.dumps({"id": "x", "choices": [], "usage": usage}) + "\\n\\n").encode())
            self.wfile.write(b"data: [DONE]\\n\\n")
            self.wfile.flush()

    ThreadingHTTPServer((opt("--host", "127.0.0.1"), int(opt("--port"))), H).serve_forever()
''')


def _fake_suite(tmp_path, model_dir, runner: dict, num_prompts=3, input_tokens=10, output_tokens=5):
    return {
        "name": "engines",
        "models": [{"id": str(model_dir), "name": "tiny"}],
        "runners": [runner],
        "workloads": [{"name": "w", "input_tokens": input_tokens, "output_tokens": output_tokens,
                       "num_prompts": num_prompts}],
        "loads": [{"concurrency": 1}, {"concurrency": 2}],
        "hardware": {"device": "cpu", "peaks": PEAKS, "calibrate": "never"},
        "output": {"dir": str(tmp_path / "results")},
    }


def _run(raw: dict):
    from moecap.run import run_suite
    from moecap.suite import parse_suite

    return run_suite(parse_suite(raw, "test"), log=lambda s: None)


@pytest.fixture
def fake_engine(tmp_path):
    script = tmp_path / "fake_engine.py"
    script.write_text(FAKE_ENGINE)
    return str(script), str(tmp_path / "engine.json")


def test_sglang_records_expert_routing_of_the_measured_window(tmp_path, tiny_moe_dir, fake_engine):
    script, log = fake_engine
    runner = {"type": "sglang", "args": {"launcher": [PYTHON, script], "model": "tiny", "record_experts": True,
                                         "warmup_requests": 2, "env": {"FAKE_ENGINE_LOG": log},
                                         "startup_timeout_s": 120}}
    out = _run(_fake_suite(tmp_path, tiny_moe_dir, runner))
    assert [o.status for o in out.outcomes] == ["ok", "ok"], [o.record.error for o in out.outcomes]
    seen = json.load(open(log))
    assert seen["argv"][:2] == ["--model-path", str(tiny_moe_dir)]
    assert "--expert-distribution-recorder-mode" in seen["argv"] and "--disable-radix-cache" in seen["argv"]
    assert seen["dump_dir"] and "moecap-sglang-experts-" in seen["dump_dir"]
    cfg = json.load(open(os.path.join(tiny_moe_dir, "config.json")))
    n_layers, n_experts, k = cfg["num_hidden_layers"], cfg["num_local_experts"], cfg["num_experts_per_tok"]
    for o in out.outcomes:
        rep = o.record.report
        assert rep["throughput"]["completed"] == 3 and rep["throughput"]["output_tokens"] == 15
        tracing = rep["tracing"]
        assert tracing["traced"] is True and tracing["source"] == "sglang expert_distribution_recorder (stat)"
        # the estimated decode utilization used the recorded routing, not uniform routing
        util = rep["utilization"]
        assert util["basis"] == "recorded"  # the server's routing record, not uniform routing
        assert "routing statistics recorded by the engine (sglang" in util["decode"]["expert_unions"]
        assert o.record.config["runner"]["engine"] == "sglang"
    # the trace itself: only the measured window (3 requests x (10 prompt + 5 - 1 fed tokens)), not the
    # two warm-up requests
    from moecap.runners.sglang import SGLangRunner
    from moecap.suite import LoadConfig, WorkloadConfig

    r = SGLangRunner(SGLangRunnerArgs(**runner["args"]), CPU)
    try:
        r.load(ModelConfig(id=str(tiny_moe_dir)))
        trace = r.run(WorkloadConfig(input_tokens=10, output_tokens=5, num_prompts=3), LoadConfig(concurrency=1))
        dump_dir = r.dump_dir
    finally:
        r.close()
    stats = trace.extra["routing_stats"]
    assert stats["tokens"] == 3 * (10 + 5 - 1)
    assert len(stats["layers"]) == n_layers and all(len(row) == n_experts for row in stats["layers"])
    assert all(sum(row) == stats["tokens"] * k for row in stats["layers"])
    unions = trace.extra["pass_expert_unions"]
    assert len(unions) == 3 * 5  # one prefill and four decode passes per request
    assert all(len(u) == n_layers for u in unions)
    assert sorted({u[0] for u in unions}) == [min(k, n_experts), min(k + 9, n_experts)]  # decode, prefill
    assert not os.path.exists(dump_dir)  # the runner's own dump folder is gone with the server


def test_sglang_failed_dump_is_reported_not_hidden(tmp_path, tiny_moe_dir, fake_engine, monkeypatch):
    script, log = fake_engine
    runner = {"type": "sglang", "args": {"launcher": [PYTHON, script], "model": "tiny", "record_experts": True,
                                         "warmup_requests": 0, "startup_timeout_s": 120,
                                         "env": {"FAKE_ENGINE_LOG": log, "FAKE_DUMP_FAILS": "1"}}}
    raw = _fake_suite(tmp_path, tiny_moe_dir, runner, num_prompts=2)
    raw["loads"] = [{"concurrency": 2}]
    (o,) = _run(raw).outcomes
    assert o.status == "ok", o.record.error  # the measurement stands
    tracing = o.record.report["tracing"]
    assert tracing["traced"] is False and "HTTP 500" in tracing["reason"] and "dump_expert_distribution" in tracing["reason"]
    assert "uniform routing" in o.record.report["utilization"]["decode"]["expert_unions"]


def test_sglang_without_recording_says_so(tmp_path, tiny_moe_dir, fake_engine):
    script, log = fake_engine
    runner = {"type": "sglang", "args": {"launcher": [PYTHON, script], "model": "tiny", "warmup_requests": 0,
                                         "env": {"FAKE_ENGINE_LOG": log}, "startup_timeout_s": 120}}
    raw = _fake_suite(tmp_path, tiny_moe_dir, runner, num_prompts=2)
    raw["loads"] = [{"rate": 50.0}]
    (o,) = _run(raw).outcomes
    assert o.status == "ok", o.record.error
    assert o.record.report["tracing"]["traced"] is False
    assert "record_experts" in o.record.report["tracing"]["reason"]
    assert "--expert-distribution-recorder-mode" not in json.load(open(log))["argv"]


def test_vllm_runner_launches_benchmarks_and_stops(tmp_path, tiny_moe_dir, fake_engine):
    import psutil

    script, log = fake_engine
    port = free_port()
    runner = {"type": "vllm", "args": {"launcher": [PYTHON, script], "model": "tiny", "port": port,
                                       "max_num_seqs": 4, "env": {"FAKE_ENGINE_LOG": log},
                                       "extra_args": ["--fake-flag", "1"], "startup_timeout_s": 120}}
    out = _run(_fake_suite(tmp_path, tiny_moe_dir, runner))
    assert [o.status for o in out.outcomes] == ["ok", "ok"], [o.record.error for o in out.outcomes]
    argv = json.load(open(log))["argv"]
    assert argv == [str(tiny_moe_dir), "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", str(port),
                    "--dtype", "auto", "--max-num-seqs", "4", "--no-enable-prefix-caching", "--fake-flag", "1"]
    for o in out.outcomes:
        rep = o.record.report
        assert rep["throughput"]["completed"] == 3 and rep["throughput"]["failed"] == 0
        assert rep["tracing"]["traced"] is False and "vLLM exposes no expert-routing" in rep["tracing"]["reason"]
        assert rep["utilization"]["basis"] == "estimated"
        assert "uniform routing" in rep["utilization"]["decode"]["expert_unions"]
        cfg = o.record.config["runner"]
        assert cfg["engine"] == "vllm" and cfg["server_command"][1] == script
    # the server is gone with its runner
    left = [p for p in psutil.process_iter(["cmdline"]) if script in (p.info["cmdline"] or [])]
    assert not left


# ---------------------------------------------------------------------------------------------------
# the real engines (GPU; skipped without a GPU or the engine package)
# ---------------------------------------------------------------------------------------------------
def _gpu_suite(tmp_path, model_dir, runner: dict, num_prompts=4, input_tokens=12, output_tokens=8):
    raw = _fake_suite(tmp_path, model_dir, runner, num_prompts, input_tokens, output_tokens)
    raw["loads"] = [{"concurrency": 2}]
    raw["hardware"] = {"device": "cuda", "peaks": PEAKS, "calibrate": "never"}
    return raw


def _tiny_mixtral(path, tokenizer_dir):
    """A random Mixtral checkpoint with GPU-kernel-friendly sizes (head_dim 64) and tiny-moe's tokenizer."""
    import torch
    from transformers import AutoTokenizer, MixtralConfig, MixtralForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = MixtralConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_local_experts=8,
                        num_experts_per_tok=2, max_position_embeddings=512, tie_word_embeddings=False)
    torch.manual_seed(0)
    MixtralForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.gpu
def test_vllm_serves_tiny_mixtral_on_gpu(tmp_path, tiny_moe_dir):
    pytest.importorskip("vllm")
    model_dir = _tiny_mixtral(tmp_path / "tiny-mixtral", tiny_moe_dir)
    runner = {"type": "vllm", "args": {"model": "tiny", "dtype": "bfloat16", "enforce_eager": True,
                                       "gpu_memory_utilization": 0.3, "max_model_len": 256,
                                       "startup_timeout_s": 900}}
    (o,) = _run(_gpu_suite(tmp_path, model_dir, runner)).outcomes
    assert o.status == "ok", o.record.error
    rep = o.record.report
    assert rep["throughput"]["completed"] == 4 and rep["throughput"]["failed"] == 0
    assert rep["throughput"]["output_tokens"] == 4 * 8  # ignore_eos: exactly the asked length
    assert rep["latency"]["ttft_ms"]["median"] > 0 and rep["latency"]["tpot_ms"]["median"] > 0
    assert rep["tracing"]["traced"] is False and rep["utilization"]["basis"] == "estimated"
    assert rep["memory"].get("device_memory_peak_bytes", 1) > 0


def _tiny_qwen2_moe(path, tokenizer_dir):
    """A random Qwen2-MoE checkpoint (SGLang's expert recorder supports Qwen2-MoE) with tiny-moe's tokenizer."""
    import torch
    from transformers import AutoTokenizer, Qwen2MoeConfig, Qwen2MoeForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = Qwen2MoeConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
                         shared_expert_intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, decoder_sparse_step=1,
                         max_position_embeddings=512, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = Qwen2MoeForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.gpu
def test_sglang_serves_and_records_on_gpu(tmp_path, tiny_moe_dir):
    pytest.importorskip("sglang")
    model_dir = _tiny_qwen2_moe(tmp_path / "tiny-qwen2-moe", tiny_moe_dir)
    args = {"model": "tiny", "dtype": "bfloat16", "mem_fraction_static": 0.3, "context_length": 256,
            "disable_cuda_graph": True, "record_experts": True, "startup_timeout_s": 900}
    (o,) = _run(_gpu_suite(tmp_path, model_dir, {"type": "sglang", "args": args})).outcomes
    assert o.status == "ok", o.record.error
    rep = o.record.report
    assert rep["throughput"]["completed"] == 4 and rep["throughput"]["output_tokens"] == 4 * 8
    assert rep["tracing"]["traced"] is True, rep["tracing"]
    assert "routing statistics recorded by the engine (sglang" in rep["utilization"]["decode"]["expert_unions"]

    from moecap.runners.sglang import SGLangRunner
    from moecap.suite import LoadConfig, WorkloadConfig

    r = SGLangRunner(SGLangRunnerArgs(**args), HardwareConfig(device="cuda"))
    try:
        r.load(ModelConfig(id=str(model_dir)))
        trace = r.run(WorkloadConfig(input_tokens=12, output_tokens=8, num_prompts=4), LoadConfig(concurrency=2))
    finally:
        r.close()
    stats = trace.extra["routing_stats"]
    assert len(stats["layers"]) == 4 and all(len(row) == 8 for row in stats["layers"])
    fed = 4 * (12 + 8 - 1)  # every prompt token and every generated token but the last went through the model
    # the overlap scheduler may run one more decode step per request than needed
    assert fed <= stats["tokens"] <= fed + 4, stats["tokens"]
    assert len({sum(row) for row in stats["layers"]}) == 1  # every layer routed the same tokens
    assert trace.extra["pass_expert_unions"] and all(
        1 <= u <= 8 for per_pass in trace.extra["pass_expert_unions"] for u in per_pass)
