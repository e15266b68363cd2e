"""Tests of moecap.hardware: the peaks table, names, dtype aliases, detection, calibration, cache."""

from __future__ import annotations

import json
import subprocess
import sys
import types

import pytest

from moecap import hardware as hwmod
from moecap.hardware import (
    DTYPES,
    HardwareInfo,
    Peaks,
    UnknownDeviceError,
    calibrate,
    calibration_path,
    canonical_dtype,
    catalog,
    detect_hardware,
    format_hardware,
    load_calibration,
    lookup_peaks,
    lookup_row,
    map_visible_devices,
    normalize_device_name,
    parse_visible_devices,
    resolve_peaks,
    save_calibration,
)


def _cuda_available() -> bool:
    try:
        import torch
    except Exception:
        return False
    return bool(torch.cuda.is_available())


gpu = pytest.mark.gpu
needs_gpu = pytest.mark.skipif(not _cuda_available(), reason="needs a CUDA/ROCm GPU")


@pytest.fixture(autouse=True)
def _cache_root(tmp_path, monkeypatch):
    """Every test gets its own, empty moecap cache root."""
    root = tmp_path / "moecap-cache"
    monkeypatch.setenv("MOECAP_CACHE_DIR", str(root))
    return root


def _gpu_hw(name: str, accelerator: str = "cuda") -> HardwareInfo:
    return HardwareInfo(
        accelerator=accelerator, device_name=name, device_count=1, device_index=0,
        memory_bytes=80 * 2**30, driver_version="550.0", cuda_version="12.4", cpu_model="Test CPU",
        cpu_cores_physical=8, cpu_cores_logical=16, host_memory_bytes=64 * 2**30,
    )


def _cpu_hw(name: str = "Test CPU 9000") -> HardwareInfo:
    return HardwareInfo(
        accelerator="cpu", device_name=name, device_count=1, device_index=0, memory_bytes=2**34,
        driver_version=None, cuda_version=None, cpu_model=name, cpu_cores_physical=2,
        cpu_cores_logical=2, host_memory_bytes=2**34,
    )


# ------------------------------------------------------------------------------ import hygiene


def test_import_does_not_import_torch():
    code = "import sys, moecap, moecap.hardware; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_cpu_detection_does_not_import_torch_without_gpu_nodes():
    if hwmod._gpu_device_nodes_present():
        pytest.skip("this machine has GPU device nodes")
    code = (
        "import sys, moecap.hardware as h; info = h.detect_hardware(); "
        "sys.exit(1 if 'torch' in sys.modules or info.accelerator != 'cpu' else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# ------------------------------------------------------------------------------------- catalog

EXPECTED_KEYS = {
    "a100-sxm4-40gb", "a100-sxm4-80gb", "a100-pcie-40gb", "a100-pcie-80gb", "h100-sxm5-80gb",
    "h100-pcie-80gb", "h100-nvl-94gb", "h200-sxm-141gb", "h20", "l40s", "l4", "a10", "rtx-4090",
    "rtx-3090", "v100-sxm2-32gb", "b200", "gb200", "mi300x", "mi325x", "mi250x",
}


def test_catalog_covers_the_required_devices():
    keys = [r["key"] for r in catalog()]
    assert len(keys) == len(set(keys))
    assert EXPECTED_KEYS <= set(keys)


def test_every_row_is_complete_and_sourced():
    for row in catalog():
        assert normalize_device_name(row["key"]) == row["key"], row["key"]
        assert row["names"], row["key"]
        assert row["memory_gb"] > 0 and row["mem_bandwidth_gbs"] > 0 and row["tdp_w"] > 0
        assert set(row["tflops"]) <= set(DTYPES) and "fp32" in row["tflops"]
        assert all(v > 0 for v in row["tflops"].values())
        src = row["source"]
        assert src["title"] and src["url"].startswith("https://"), row["key"]


def test_every_name_and_key_looks_up_its_own_row_and_no_two_rows_collide():
    owner: dict[str, str] = {}
    for row in catalog():
        for alias in [row["key"], *row["names"]]:
            slug = normalize_device_name(alias)
            assert owner.setdefault(slug, row["key"]) == row["key"], f"{alias!r} collides"
            found = lookup_row(alias)
            assert found is not None and found["key"] == row["key"], alias
            peaks = lookup_peaks(alias)
            assert peaks is not None and peaks.kind == "datasheet"
            assert peaks.source.startswith("datasheet: ") and row["source"]["url"] in peaks.source
            assert peaks.device == alias


def test_lookup_is_exact_not_substring():
    assert lookup_row("NVIDIA A10G") is None  # a different card from the A10
    assert lookup_row("NVIDIA H200 NVL") is None  # different clocks from the H200 SXM
    assert lookup_row("NVIDIA H100") is None
    assert lookup_row("A100-SXM4-40GB")["key"] == "a100-sxm4-40gb"  # old drivers: no vendor prefix


@pytest.mark.parametrize(
    "name, slug",
    [
        ("NVIDIA H100 80GB HBM3", "h100-80gb-hbm3"),
        ("NVIDIA A100-SXM4-80GB", "a100-sxm4-80gb"),
        ("NVIDIA A100 80GB PCIe", "a100-80gb-pcie"),
        ("NVIDIA GeForce RTX 4090", "rtx-4090"),
        ("Tesla V100-SXM2-32GB", "v100-sxm2-32gb"),
        ("AMD Instinct MI300X", "mi300x"),
        ("  nvidia   h200 ", "h200"),
        ("Intel(R) Xeon(R) Platinum 8380 CPU @ 2.30GHz", "xeon-platinum-8380-cpu-2-30ghz"),
        ("AMD EPYC 7763 64-Core Processor", "epyc-7763-64-core-processor"),
        ("NVIDIA", "nvidia"),
        ("", "unknown"),
    ],
)
def test_normalize_device_name(name, slug):
    assert normalize_device_name(name) == slug


# ------------------------------------------------------------------------- dense-only sanity


def test_dense_figures_of_reference_devices():
    h100 = lookup_peaks("NVIDIA H100 80GB HBM3")
    assert h100.flops_for("bf16") < 1100e12  # sparse would be 1979
    assert h100.flops_for("bf16") == pytest.approx(989.4e12)
    assert h100.mem_bandwidth_Bps == pytest.approx(3350e9)
    assert lookup_peaks("NVIDIA A100-SXM4-80GB").flops_for("bf16") == pytest.approx(312e12)
    assert lookup_peaks("NVIDIA L40S").flops_for("bf16") == pytest.approx(362.05e12)
    mi300x = lookup_peaks("AMD Instinct MI300X")
    assert mi300x.flops_for("bf16") == pytest.approx(1307.4e12)
    assert mi300x.mem_bandwidth_gbs == pytest.approx(5300)
    assert lookup_peaks("NVIDIA H200").flops_for("bf16") == h100.flops_for("bf16")


def test_rows_do_not_mix_dense_and_sparse():
    """Within a row, tensor rates must scale like dense rates: bf16 ~ 2x tf32, fp8 ~ 2x bf16,
    fp16 == bf16. A sparse figure next to dense ones would break a ratio by 2x."""
    for row in catalog():
        t = row["tflops"]
        if "bf16" in t and "fp16" in t:
            assert t["bf16"] == t["fp16"], row["key"]
        if "bf16" in t and "tf32" in t:
            assert 1.9 <= t["bf16"] / t["tf32"] <= 2.1, row["key"]
        if "fp8" in t and "bf16" in t:
            assert 1.9 <= t["fp8"] / t["bf16"] <= 2.1, row["key"]
        if "bf16" in t:
            assert t["bf16"] < 2600, row["key"]  # no single GPU here reaches that dense


# --------------------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize(
    "alias, key",
    [
        ("bf16", "bf16"), ("bfloat16", "bf16"), ("torch.bfloat16", "bf16"), ("BF16", "bf16"),
        ("fp16", "fp16"), ("float16", "fp16"), ("half", "fp16"),
        ("fp32", "fp32"), ("float32", "fp32"), ("float", "fp32"),
        ("tf32", "tf32"), ("fp8", "fp8"), ("float8_e4m3fn", "fp8"),
    ],
)
def test_dtype_aliases(alias, key):
    assert canonical_dtype(alias) == key
    h100 = lookup_peaks("NVIDIA H100 80GB HBM3")
    assert h100.flops_for(alias) == h100.flops[key]


def test_torch_dtype_objects_are_accepted():
    torch = pytest.importorskip("torch")
    assert canonical_dtype(torch.bfloat16) == "bf16"
    assert canonical_dtype(torch.float16) == "fp16"
    assert canonical_dtype(torch.float32) == "fp32"


def test_fp32_is_not_tf32():
    h100 = lookup_peaks("NVIDIA H100 80GB HBM3")
    assert h100.flops_for("float32") == pytest.approx(66.9e12)
    assert h100.flops_for("tf32") == pytest.approx(494.7e12)


def test_missing_dtype_names_device_and_what_it_has():
    v100 = lookup_peaks("Tesla V100-SXM2-32GB")
    with pytest.raises(ValueError) as exc:
        v100.flops_for("bfloat16")
    msg = str(exc.value)
    assert "Tesla V100-SXM2-32GB" in msg and "bf16" in msg and "fp32" in msg and "fp16" in msg


def test_unknown_dtype_alias():
    with pytest.raises(ValueError, match="unknown dtype"):
        canonical_dtype("int3")


def test_peaks_round_trip():
    p = lookup_peaks("NVIDIA L4")
    d = p.to_dict()
    json.dumps(d)
    q = Peaks.from_dict(d)
    assert q == p
    r = Peaks.from_dict({"device": "x", "mem_bandwidth_gbs": 100, "tflops": {"bfloat16": 2}, "kind": "user"})
    assert r.mem_bandwidth_Bps == pytest.approx(100e9) and r.flops == {"bf16": 2e12}


# -------------------------------------------------------------------------------------- resolve


def test_known_gpu_resolves_to_datasheet():
    p = resolve_peaks(_gpu_hw("NVIDIA H100 80GB HBM3"), "bfloat16")
    assert p.kind == "datasheet" and p.flops_for("bf16") == pytest.approx(989.4e12)
    p = resolve_peaks(_gpu_hw("AMD Instinct MI300X", "rocm"), "fp16")
    assert p.kind == "datasheet" and p.mem_bandwidth_gbs == pytest.approx(5300)


def test_unknown_gpu_raises_helpful_error():
    hw = _gpu_hw("NVIDIA Imaginary X9000")
    with pytest.raises(UnknownDeviceError) as exc:
        resolve_peaks(hw, "bf16")
    assert isinstance(exc.value, ValueError)
    msg = str(exc.value)
    assert "NVIDIA Imaginary X9000" in msg
    assert "moecap/data/peaks.yaml" in msg
    assert "moecap hardware --calibrate" in msg
    assert "hardware.peaks" in msg


def test_known_gpu_without_the_dtype_says_so():
    with pytest.raises(ValueError) as exc:
        resolve_peaks(_gpu_hw("Tesla V100-SXM2-32GB"), "bf16")
    assert not isinstance(exc.value, UnknownDeviceError)
    assert "bf16" in str(exc.value) and "moecap hardware --calibrate" in str(exc.value)


def test_user_peaks_override_everything():
    user = {"mem_bandwidth_gbs": 3000, "tflops": {"bfloat16": 800}}
    for hw in (_gpu_hw("NVIDIA H100 80GB HBM3"), _gpu_hw("NVIDIA Imaginary X9000"), _cpu_hw()):
        p = resolve_peaks(hw, "bf16", user=user)
        assert p.kind == "user" and p.source == "user"
        assert p.mem_bandwidth_Bps == pytest.approx(3000e9)
        assert p.flops_for("bf16") == pytest.approx(800e12)
        assert p.device == hw.device_name


def test_user_peaks_must_cover_the_dtype():
    with pytest.raises(ValueError, match="bf16"):
        resolve_peaks(_cpu_hw(), "fp16", user={"mem_bandwidth_gbs": 10, "tflops": {"bf16": 1}})
    with pytest.raises(ValueError, match="mem_bandwidth_gbs"):
        resolve_peaks(_cpu_hw(), "bf16", user={"tflops": {"bf16": 1}})


def _fake_calibration(device: str, flops: dict[str, float], bw: float = 50e9) -> Peaks:
    return Peaks(device=device, mem_bandwidth_Bps=bw, flops=flops,
                 source="calibrated: test", kind="calibrated",
                 details={"flops_source": {k: f"calibrated: test {k}" for k in flops},
                          "bandwidth_source": "calibrated: test bandwidth"})


def test_unknown_gpu_uses_cached_calibration(monkeypatch):
    name = "NVIDIA Imaginary X9000"
    save_calibration(_fake_calibration(name, {"bf16": 5e14}, bw=2e12))
    monkeypatch.setattr(hwmod, "calibrate", lambda *a, **k: pytest.fail("must not re-measure"))
    p = resolve_peaks(_gpu_hw(name), "bf16")
    assert p.kind == "calibrated" and p.flops_for("bf16") == 5e14 and p.mem_bandwidth_Bps == 2e12


def test_datasheet_wins_over_cached_calibration_on_gpu():
    name = "NVIDIA H100 80GB HBM3"
    save_calibration(_fake_calibration(name, {"bf16": 1e12}))
    assert resolve_peaks(_gpu_hw(name), "bf16").kind == "datasheet"


def test_cpu_never_uses_the_table_and_needs_calibration():
    with pytest.raises(UnknownDeviceError) as exc:
        resolve_peaks(_cpu_hw("Test CPU 9000"), "fp32")
    msg = str(exc.value)
    assert "Test CPU 9000" in msg and "moecap hardware --calibrate" in msg and "hardware.peaks" in msg


def test_calibrate_if_missing_calibrates_caches_and_merges(monkeypatch):
    hw = _cpu_hw("Test CPU 9000")
    save_calibration(_fake_calibration(hw.device_name, {"fp32": 1e11, "bf16": 2e11}, bw=20e9))
    calls = []

    def fake_calibrate(device, dtype, quick=False):
        calls.append((device, dtype))
        return _fake_calibration(hw.device_name, {"fp32": 1.5e11, "fp16": 3e11}, bw=25e9)

    monkeypatch.setattr(hwmod, "calibrate", fake_calibrate)
    p = resolve_peaks(hw, "fp16", calibrate_if_missing=True)
    assert calls == [("cpu", "fp16")]
    assert p.kind == "calibrated"
    assert p.flops == {"fp32": 1.5e11, "bf16": 2e11, "fp16": 3e11}  # merged: one file, several dtypes
    assert p.mem_bandwidth_Bps == 25e9  # bandwidth is shared: the latest measurement
    # now cached: no second measurement
    assert resolve_peaks(hw, "fp16", calibrate_if_missing=True).flops_for("fp16") == 3e11
    assert len(calls) == 1


# ------------------------------------------------------------------------------------------ cache


def test_cache_location_and_atomic_write(_cache_root):
    name = "Test CPU 9000"
    path = save_calibration(_fake_calibration(name, {"fp32": 1e11}))
    assert path == _cache_root / "hardware" / "test-cpu-9000.json"
    assert path == calibration_path(name)
    data = json.loads(path.read_text())
    assert data["flops"] == {"fp32": 1e11} and data["device"] == name
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    assert load_calibration(name, "float32").flops_for("fp32") == 1e11
    assert load_calibration(name, "bf16") is None
    assert load_calibration("Other CPU") is None


def test_only_calibrated_peaks_are_cached():
    with pytest.raises(ValueError):
        save_calibration(lookup_peaks("NVIDIA L4"))


def test_corrupt_cache_is_ignored():
    path = calibration_path("Test CPU 9000")
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    with pytest.warns(UserWarning):
        assert load_calibration("Test CPU 9000", "fp32") is None


# ------------------------------------------------------------------------------------- detection


def _check_cpu_fields(info: HardwareInfo) -> None:
    assert info.cpu_model and info.cpu_model != "unknown CPU"
    assert info.cpu_cores_physical and info.cpu_cores_physical >= 1
    assert info.cpu_cores_logical and info.cpu_cores_logical >= info.cpu_cores_physical
    assert info.host_memory_bytes and info.host_memory_bytes > 2**28
    json.dumps(info.to_dict())


def test_detect_cpu_forced():
    info = detect_hardware("cpu")
    assert info.accelerator == "cpu"
    assert info.device_name == info.cpu_model
    assert info.device_count == 1 and info.device_index == 0
    _check_cpu_fields(info)
    assert info.torch_device == "cpu"


def test_detect_auto_does_not_crash():
    info = detect_hardware()
    assert info.accelerator in ("cpu", "cuda", "rocm")
    _check_cpu_fields(info)
    if not _cuda_available() and not hwmod._gpu_device_nodes_present():
        assert info.accelerator == "cpu"


def test_detect_cuda_without_gpu_is_a_clear_error(monkeypatch):
    if _cuda_available():
        pytest.skip("this machine has a GPU")
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml -> ImportError
    with pytest.raises(RuntimeError, match="no GPU is visible"):
        detect_hardware("cuda")
    assert detect_hardware("auto").accelerator == "cpu"


def test_bad_device_string():
    with pytest.raises(ValueError):
        detect_hardware("tpu")


# ------------------------------------------------------------------------ CUDA_VISIBLE_DEVICES


@pytest.mark.parametrize(
    "value, parsed",
    [
        (None, None),
        ("", []),
        ("0", [0]),
        ("0,1", [0, 1]),
        (" 2 , 0 ", [2, 0]),
        ("0,-1,2", [0]),
        ("-1", []),
        ("2,foo,3", [2]),
        ("1gpu,3", [1, 3]),
        ("0,0", []),
        ("GPU-abc,GPU-def", ["GPU-abc", "GPU-def"]),
        ("GPU-abc,1", ["GPU-abc"]),
        ("MIG-1234", ["MIG-1234"]),
        ("0,GPU-abc", [0]),
    ],
)
def test_parse_visible_devices(value, parsed):
    assert parse_visible_devices(value) == parsed


def test_map_visible_devices():
    uuids = ["GPU-aaaa-0000", "GPU-bbbb-1111", "GPU-bbbc-2222"]
    assert map_visible_devices(None, uuids) == [0, 1, 2]
    assert map_visible_devices([], uuids) == []
    assert map_visible_devices([2, 0], uuids) == [2, 0]
    assert map_visible_devices([0, 5, 1], uuids) == [0]  # an invalid ordinal ends the list
    assert map_visible_devices(["GPU-bbbc"], uuids) == [2]  # unique prefix
    assert map_visible_devices(["gpu-AAAA-0000"], uuids) == [0]  # case-insensitive
    assert map_visible_devices(["GPU-bbb"], uuids) == []  # ambiguous prefix
    assert map_visible_devices(["MIG-x", "GPU-aaaa"], uuids, lambda u: 1) == [1, 0]
    assert map_visible_devices(["MIG-x"], uuids, lambda u: None) == []
    assert map_visible_devices([1, 1], uuids) == []


class _FakeMemory:
    def __init__(self, total):
        self.total = total


def _fake_pynvml(names, uuids, fail_init=False):
    m = types.ModuleType("pynvml")
    state = {"init": 0}

    def init():
        if fail_init:
            raise RuntimeError("NVML Shared Library Not Found")
        state["init"] += 1

    m.nvmlInit = init
    m.nvmlShutdown = lambda: state.__setitem__("init", state["init"] - 1)
    m.nvmlDeviceGetCount = lambda: len(names)
    m.nvmlDeviceGetHandleByIndex = lambda i: ("h", i)
    m.nvmlDeviceGetUUID = lambda h: uuids[h[1]]
    m.nvmlDeviceGetName = lambda h: names[h[1]].encode()  # old pynvml returned bytes
    m.nvmlDeviceGetMemoryInfo = lambda h: _FakeMemory((h[1] + 1) * 10**10)
    m.nvmlSystemGetDriverVersion = lambda: "550.54.15"
    m.nvmlSystemGetCudaDriverVersion_v2 = lambda: 12040
    m.nvmlDeviceGetHandleByUUID = lambda u: ("h", uuids.index(u))
    m.nvmlDeviceGetIndex = lambda h: h[1]
    m.state = state
    return m


def test_detect_via_fake_nvml_honours_cuda_visible_devices(monkeypatch):
    names = ["NVIDIA A100-SXM4-80GB", "NVIDIA L4", "NVIDIA H100 80GB HBM3"]
    uuids = ["GPU-0a0a", "GPU-1b1b", "GPU-2c2c"]
    fake = _fake_pynvml(names, uuids)
    monkeypatch.setitem(sys.modules, "pynvml", fake)

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,0")
    info = detect_hardware("cuda:0")
    assert info.accelerator == "cuda" and info.detected_via == "nvml"
    assert info.device_name == "NVIDIA H100 80GB HBM3" and info.nvml_index == 2
    assert info.device_count == 2 and info.device_index == 0
    assert info.memory_bytes == 3 * 10**10 and info.device_uuid == "GPU-2c2c"
    assert info.driver_version == "550.54.15" and info.cuda_version == "12.4"
    assert detect_hardware("cuda:1").device_name == "NVIDIA A100-SXM4-80GB"
    assert resolve_peaks(info, "bf16").flops_for("bf16") == pytest.approx(989.4e12)
    with pytest.raises(ValueError, match="out of range"):
        detect_hardware("cuda:2")

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-1b")
    info = detect_hardware()
    assert info.device_name == "NVIDIA L4" and info.nvml_index == 1 and info.device_count == 1

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    info = detect_hardware()
    assert info.nvml_index == 0 and info.device_count == 3
    assert "NVIDIA A100-SXM4-80GB" in format_hardware(info, lookup_peaks(info.device_name))
    assert fake.state["init"] == 0  # every nvmlInit was matched by nvmlShutdown


def test_fake_nvml_with_no_visible_device_or_broken_driver_falls_back_to_cpu(monkeypatch):
    if _cuda_available():
        pytest.skip("this machine has a GPU")
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(["NVIDIA L4"], ["GPU-1"]))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert detect_hardware().accelerator == "cpu"
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(["NVIDIA L4"], ["GPU-1"], fail_init=True))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert detect_hardware().accelerator == "cpu"


# ------------------------------------------------------------------------------------------ format


def test_format_hardware():
    cpu = detect_hardware("cpu")
    text = format_hardware(cpu)
    assert cpu.cpu_model in text and "moecap hardware --calibrate" in text
    text = format_hardware(_gpu_hw("NVIDIA L40S"), lookup_peaks("NVIDIA L40S"))
    assert "NVIDIA L40S" in text and "864.0 GB/s" in text and "362.1 TFLOPS" in text
    assert "datasheet" in text
    text = format_hardware(_gpu_hw("NVIDIA Imaginary X9000"))
    assert "not in moecap/data/peaks.yaml" in text


# ------------------------------------------------------------------------------------- calibration


@pytest.fixture(scope="module")
def quick_cpu_calibration():
    pytest.importorskip("torch")
    return calibrate("cpu", "bf16", quick=True)


def test_quick_cpu_calibration_is_plausible(quick_cpu_calibration):
    import torch

    p = quick_cpu_calibration
    assert p.kind == "calibrated" and p.source.startswith("calibrated: ")
    assert p.mem_bandwidth_Bps > 1e9
    assert p.flops_for("fp32") > 0 and p.flops_for("bfloat16") > 0
    assert p.details["threads"] == torch.get_num_threads()
    assert p.details["copy_bytes"] >= 256 * 2**20
    assert p.device == detect_hardware("cpu").device_name
    assert "256 MiB" in p.source and "1024^3" in p.source


def test_calibration_is_cached_and_reused(quick_cpu_calibration, monkeypatch, _cache_root):
    p = quick_cpu_calibration
    path = save_calibration(p)
    assert path.parent == _cache_root / "hardware" and path.exists()
    monkeypatch.setattr(hwmod, "calibrate", lambda *a, **k: pytest.fail("must not re-measure"))
    hw = detect_hardware("cpu")
    for dtype in ("bf16", "fp32"):
        got = resolve_peaks(hw, dtype, calibrate_if_missing=True)
        assert got.kind == "calibrated"
        assert got.flops_for(dtype) == pytest.approx(p.flops_for(dtype))
        assert got.mem_bandwidth_Bps == pytest.approx(p.mem_bandwidth_Bps)
    assert "GB/s" in format_hardware(hw, got)


def test_tf32_and_fp8_calibration_need_a_gpu():
    pytest.importorskip("torch")
    for dtype in ("tf32", "fp8"):
        with pytest.raises(ValueError, match="GPU"):
            calibrate("cpu", dtype, quick=True)


@pytest.mark.slow
def test_full_size_cpu_calibration():
    pytest.importorskip("torch")
    p = calibrate("cpu", "fp32")
    assert p.details["copy_bytes"] >= 512 * 2**20
    assert p.mem_bandwidth_Bps > 1e9 and p.flops_for("fp32") > 0
    assert set(p.flops) == {"fp32"}


# --------------------------------------------------------------------------------------------- GPU


@gpu
@needs_gpu
def test_gpu_detection_matches_torch():
    import torch

    info = detect_hardware("cuda:0")
    assert info.accelerator in ("cuda", "rocm")
    assert info.device_count == torch.cuda.device_count()
    assert normalize_device_name(info.device_name) == normalize_device_name(torch.cuda.get_device_name(0))
    assert info.memory_bytes and info.memory_bytes > 2**30
    print(format_hardware(info, lookup_peaks(info.device_name)))


@gpu
@needs_gpu
def test_gpu_quick_calibration(_cache_root):
    p = calibrate("cuda:0", "bf16", quick=True)
    assert p.kind == "calibrated" and p.mem_bandwidth_Bps > 1e9 and p.flops_for("bf16") > 0
    save_calibration(p)
    assert load_calibration(p.device, "bf16") is not None


@gpu
@needs_gpu
def test_gpu_resolves_peaks_with_calibration_fallback(_cache_root):
    info = detect_hardware("cuda:0")
    p = resolve_peaks(info, "bf16", calibrate_if_missing=True)
    assert p.flops_for("bf16") > 0 and p.mem_bandwidth_Bps > 0
