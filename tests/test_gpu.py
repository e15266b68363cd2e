"""GPU paths, run for real where a CUDA GPU is present (marked ``gpu``; skipped without one)."""

import pytest

from moecap.run import run_suite
from moecap.suite import parse_suite

pytestmark = pytest.mark.gpu


def _suite(tmp_path, **hardware):
    return parse_suite(
        {
            "name": "gpu-smoke",
            "models": [{"id": "random:mixtral-8x7b", "overrides": {"num_hidden_layers": 2}}],
            "runners": [{"type": "hf", "args": {"dtype": "bfloat16"}}],
            "workloads": [{"name": "w", "input_tokens": 256, "output_tokens": 16, "num_prompts": 8}],
            "loads": [{"batch_size": 1}, {"batch_size": 8}],
            "hardware": {"device": "cuda", **hardware},
            "output": {"dir": str(tmp_path)},
        },
        "gpu-smoke",
    )


def test_random_mixtral_layers_on_gpu(tmp_path):
    outcome = run_suite(_suite(tmp_path))
    assert not outcome.failed, outcome.failed[0].record.error
    for o in outcome.outcomes:
        rep = o.record.report
        assert rep["memory"]["device_peak_allocated_bytes"] > rep["memory"]["weights_bytes"] > 5e9
        for phase in ("prefill", "decode"):
            util = rep["utilization"][phase]
            assert 0 < util["s_mbu"] <= 1 and 0 < util["s_mfu"] <= 1, util
        assert rep["utilization"]["peak"]["compute_dtype"] == "bfloat16"
        energy = rep["energy"]
        assert energy["available"] and energy["method"] in ("nvml-energy-counter", "power-sampling"), energy
        assert energy["joules"] > 0 and energy["joules_per_output_token"] > 0
        assert rep["cost"]["usd_per_1m_output_tokens"] > 0 and rep["cost"]["inputs"]["gpus"]
        assert o.record.config["runner"]["device"].startswith("cuda")


def test_calibrated_gpu_peaks_are_below_datasheet(tmp_path):
    from moecap.hardware import calibrate, detect_hardware, lookup_peaks

    hw = detect_hardware("cuda")
    sheet = lookup_peaks(hw.device_name)
    measured = calibrate(hw.torch_device, "bf16", quick=True)
    assert measured.mem_bandwidth_Bps > 0 and measured.flops_for("bf16") > 0
    if sheet is not None:
        assert measured.mem_bandwidth_Bps <= sheet.mem_bandwidth_Bps * 1.05
        assert measured.flops_for("bf16") <= sheet.flops_for("bf16") * 1.05
