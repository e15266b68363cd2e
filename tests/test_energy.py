"""moecap.energy: the tracker on this machine, its pure helpers, a fake NVML and a fake RAPL sysfs."""

import json
import os
import subprocess
import sys
import threading
import time
import types

import psutil
import pytest

from moecap import energy
from moecap.energy import EnergyTracker, _diff_counter, _integrate, per_token


def _wait(seconds):
    threading.Event().wait(seconds)


# ------------------------------------------------------------------------------------ helpers


def test_diff_counter():
    assert _diff_counter(100, 250) == 150
    assert _diff_counter(5, 5) == 0
    # RAPL wrap: 900 -> (wrap at 1000) -> 100 is 200 units
    assert _diff_counter(900, 100, 1000) == 200
    # a decrease with no known range is a reset: unknown
    assert _diff_counter(5_000_000, 10, None) is None
    assert _diff_counter(None, 10) is None and _diff_counter(10, None, 1000) is None
    # start above the stated range: not a wrap we can reason about
    assert _diff_counter(2000, 10, 1000) is None


def test_integrate_trapezoid():
    assert _integrate([]) == 0.0
    assert _integrate([(0.0, 100.0)]) == 0.0
    assert _integrate([(0.0, 100.0), (2.0, 100.0)]) == pytest.approx(200.0)
    # ramp 0 -> 100 W over 1 s, then flat 100 W for 0.5 s: 50 + 50 J
    assert _integrate([(0.0, 0.0), (1.0, 100.0), (1.5, 100.0)]) == pytest.approx(100.0)
    # uneven spacing
    assert _integrate([(10.0, 10.0), (10.1, 30.0), (10.4, 10.0)]) == pytest.approx(2.0 + 6.0)
    # a repeated timestamp adds nothing
    assert _integrate([(0.0, 1.0), (0.0, 5.0), (1.0, 5.0)]) == pytest.approx(5.0)


def test_stats_matches_integrate():
    samples = [(0.0, 3.0), (0.2, 5.0), (0.7, 4.0), (1.0, 8.0)]
    s = energy._Stats()
    for t, v in samples:
        s.add(t, v)
    assert s.integral == pytest.approx(_integrate(samples))
    assert s.summary() == {"mean": pytest.approx(5.0), "max": 8.0, "min": 3.0}


def test_per_token():
    assert per_token({"joules": 50.0}, 100) == {"joules_per_output_token": 0.5}
    assert per_token({"joules": None}, 100) == {"joules_per_output_token": None}
    assert per_token({"joules": 50.0}, 0) == {"joules_per_output_token": None}
    assert per_token(None, 10) == {"joules_per_output_token": None}


def test_parse_device():
    assert energy._parse_device("cuda:3") == ("cuda", 3)
    assert energy._parse_device("cuda") == ("cuda", 0)
    assert energy._parse_device("cpu") == ("cpu", None)
    with pytest.raises(ValueError):
        EnergyTracker(device="tpu:0")


def test_import_is_light():
    code = "import sys, moecap.energy; print('torch' in sys.modules, 'pynvml' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


# ------------------------------------------------------------------------ this machine, no GPU


def test_cpu_tracker_here():
    t = EnergyTracker(device="cpu", interval_s=0.02)
    t.start()
    _wait(0.12)
    r = t.stop()
    assert not t.running and t._thread is not None and not t._thread.is_alive()
    assert r["seconds"] > 0.1
    assert r["host_rss_peak_bytes"] > 0
    assert r["errors"] == []
    if r["available"]:
        assert r["method"] == "rapl" and r["joules"] >= 0 and r["reason"] is None
    else:
        assert r["method"] is None and r["joules"] is None
        assert r["reason"].startswith("RAPL not readable")
    assert t.stop() is r  # idempotent
    json.dumps(r)


def test_cuda_without_nvml_is_unavailable(monkeypatch):
    class Broken(types.ModuleType):
        def nvmlInit(self):
            raise RuntimeError("NVML Shared Library Not Found")

    monkeypatch.setitem(sys.modules, "pynvml", Broken("pynvml"))
    with EnergyTracker(device="cuda:0", interval_s=0.02) as t:
        _wait(0.03)
    r = t.result
    assert r["available"] is False and "NVML" in r["reason"]
    assert r["host_rss_peak_bytes"] > 0 and not t.running


def test_stop_before_start_and_double_start():
    t = EnergyTracker("cpu")
    with pytest.raises(RuntimeError):
        t.stop()
    t.start()
    with pytest.raises(RuntimeError):
        t.start()
    t.stop()


def test_context_manager_stops_on_error():
    t = EnergyTracker("cpu", interval_s=0.02)
    with pytest.raises(KeyError):
        with t:
            raise KeyError("boom")
    assert t.result is not None and not t.running


# ------------------------------------------------------------------------ child-process memory

_ALLOC = "x = bytearray(200_000_000); import time; time.sleep(2)"


def _wait_rss(pid, nbytes, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            proc = psutil.Process(pid)
            total = sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)])
            if total > nbytes:
                return True
        except psutil.Error:
            pass
        _wait(0.03)
    return False


def _kill(p):
    try:
        for c in psutil.Process(p.pid).children(recursive=True):
            c.kill()
    except psutil.Error:
        pass
    p.kill()
    p.wait(timeout=10)


def test_child_process_memory_counts():
    p = subprocess.Popen([sys.executable, "-c", _ALLOC])
    try:
        t = EnergyTracker(device="cpu", pids=[p.pid], interval_s=0.02, include_self=False)
        t.start()
        assert _wait_rss(p.pid, 190_000_000), "the child never allocated its 200 MB"
        _wait(0.06)
        r = t.stop()
        assert r["host_rss_peak_bytes"] > 150_000_000
        assert r["tracked_processes_max"] >= 1
        # and with this process tracked as well, the peak is at least both together
        with EnergyTracker(device="cpu", pids=[p.pid], interval_s=0.02) as both:
            _wait(0.05)
        own = psutil.Process().memory_info().rss
        assert both.result["host_rss_peak_bytes"] > 150_000_000 + own * 0.5
    finally:
        _kill(p)


def test_grandchild_memory_counts():
    outer = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {_ALLOC!r}])"
    p = subprocess.Popen([sys.executable, "-c", outer])
    try:
        with EnergyTracker(device="cpu", pids=[p.pid], interval_s=0.02, include_self=False) as t:
            assert _wait_rss(p.pid, 190_000_000), "the grandchild never allocated its 200 MB"
            _wait(energy._CHILD_REFRESH_S + 0.1)  # the tree is re-listed every _CHILD_REFRESH_S
        r = t.result
        assert r["host_rss_peak_bytes"] > 150_000_000
        assert r["tracked_processes_max"] >= 2
    finally:
        _kill(p)


def test_missing_pid_is_noted():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    with EnergyTracker("cpu", pids=[p.pid], interval_s=0.02) as t:
        pass
    assert any("not running" in n for n in t.result["notes"])


# --------------------------------------------------------------------------------- fake NVML


class _NVMLError(Exception):
    def __init__(self, value):
        super().__init__(f"NVML error {value}")
        self.value = value


class _NVMLErrorNotSupported(_NVMLError):
    def __init__(self):
        super().__init__(3)


def _fake_nvml(devices, energy_mj=None, power_mw=None, procs=None):
    """A pynvml stand-in. ``devices``: list of UUIDs. ``energy_mj(i, n)`` / ``power_mw(i)``: readings of
    NVML device i (n = how many energy reads so far); either may raise."""
    m = types.ModuleType("pynvml")
    m.NVMLError = _NVMLError
    m.NVMLError_NotSupported = _NVMLErrorNotSupported
    m.NVML_ERROR_NOT_SUPPORTED = 3
    m.calls = {"init": 0, "shutdown": 0, "energy": 0, "power": 0}
    m.energy_read_at = []

    def init():
        m.calls["init"] += 1

    def shutdown():
        m.calls["shutdown"] += 1

    def get_energy(h):
        n = m.calls["energy"]
        m.calls["energy"] += 1
        m.energy_read_at.append(time.perf_counter())
        return energy_mj(h, n)

    def get_power(h):
        m.calls["power"] += 1
        return power_mw(h)

    def get_by_uuid(uuid):
        for i, u in enumerate(devices):
            if u == uuid:
                return i
        raise _NVMLError(13)

    m.nvmlInit = init
    m.nvmlShutdown = shutdown
    m.nvmlDeviceGetCount = lambda: len(devices)
    m.nvmlDeviceGetHandleByIndex = lambda i: i
    m.nvmlDeviceGetUUID = lambda h: devices[h]
    m.nvmlDeviceGetHandleByUUID = get_by_uuid
    m.nvmlDeviceGetIndex = lambda h: h
    m.nvmlDeviceGetDeviceHandleFromMigDeviceHandle = lambda h: h
    m.nvmlDeviceGetTotalEnergyConsumption = get_energy
    m.nvmlDeviceGetPowerUsage = get_power
    m.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(total=80 << 30, used=(h + 1) << 30, free=0)
    m.nvmlDeviceGetComputeRunningProcesses = lambda h: list((procs or {}).get(h, []))
    return m


def _proc(pid, mem):
    return types.SimpleNamespace(pid=pid, usedGpuMemory=mem)


def _run(monkeypatch, fake, device="cuda:0", seconds=0.15, **kw):
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    t = EnergyTracker(device=device, interval_s=0.02, **kw)
    t.start()
    _wait(seconds)
    r = t.stop()
    assert not t.running
    json.dumps(r)
    return r


def test_nvml_counter_preferred(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    t0 = time.perf_counter()
    # counter: 150 W since t0; power readings: 100 W -> the two estimates differ and can be told apart
    fake = _fake_nvml(
        ["GPU-aaa"],
        energy_mj=lambda h, n: 7_000_000 + (time.perf_counter() - t0) * 150_000,
        power_mw=lambda h: 100_000,
        procs={0: [_proc(os.getpid(), 3 << 30), _proc(999_999_999, 5 << 30), _proc(os.getpid() + 0, None)]},
    )
    r = _run(monkeypatch, fake)
    assert r["available"] and r["method"] == "nvml-energy-counter" and r["reason"] is None
    assert r["nvml_index"] == 0
    assert r["joules"] == r["joules_counter"]
    start, stop = fake.energy_read_at
    assert r["joules_counter"] == pytest.approx(150 * (stop - start), rel=1e-3)
    assert r["joules_sampled"] == pytest.approx(100 * r["sampled_seconds"])
    assert 0 < r["sampled_seconds"] and r["seconds"] >= 0.15
    assert r["avg_power_w"] == pytest.approx(r["joules"] / r["seconds"])
    assert r["power_samples"] >= 2
    assert r["power_w"]["mean"] == pytest.approx(100) and r["power_w"]["max"] == 100
    assert r["device_memory_peak_bytes"] == 1 << 30
    assert r["process_device_memory_peak_bytes"] == 3 << 30  # only this process counts; None memory skipped
    assert r["errors"] == []
    assert fake.calls["init"] == fake.calls["shutdown"] == 1


def test_nvml_counter_reset_falls_back(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    fake = _fake_nvml(["GPU-aaa"], energy_mj=lambda h, n: 5_000_000 if n == 0 else 10,
                      power_mw=lambda h: 200_000)
    r = _run(monkeypatch, fake)
    assert r["available"] and r["method"] == "power-sampling"
    assert r["joules_counter"] is None
    assert r["joules"] == r["joules_sampled"] == pytest.approx(200 * r["sampled_seconds"])
    assert any("went backwards" in n for n in r["notes"])


def test_nvml_counter_not_supported_falls_back(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)

    def no_counter(h, n):
        raise _NVMLErrorNotSupported()

    fake = _fake_nvml(["GPU-aaa"], energy_mj=no_counter, power_mw=lambda h: 50_000)
    r = _run(monkeypatch, fake)
    assert r["available"] and r["method"] == "power-sampling"
    assert r["joules"] == pytest.approx(50 * r["sampled_seconds"])
    assert any("not supported" in n for n in r["notes"])
    assert fake.calls["energy"] == 1  # not retried at stop


def test_nvml_nothing_supported(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)

    def nope(*a):
        raise _NVMLErrorNotSupported()

    r = _run(monkeypatch, _fake_nvml(["GPU-aaa"], energy_mj=nope, power_mw=nope), seconds=0.05)
    assert r["available"] is False and r["joules"] is None and r["reason"]
    assert r["power_samples"] == 0 and r["device_memory_peak_bytes"] == 1 << 30


def test_nvml_visible_devices_mapping(monkeypatch):
    uuids = ["GPU-aaa", "GPU-bbb", "GPU-ccc"]
    fake = _fake_nvml(uuids, energy_mj=lambda h, n: 1000.0 * (h + 1) * n, power_mw=lambda h: 10_000 * (h + 1))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,0")
    r = _run(monkeypatch, fake, device="cuda:0", seconds=0.05)
    assert r["nvml_index"] == 2 and r["power_w"]["max"] == 30
    r = _run(monkeypatch, _fake_nvml(uuids, energy_mj=lambda h, n: 0.0, power_mw=lambda h: 1000),
             device="cuda:1", seconds=0.03)
    assert r["nvml_index"] == 0
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-bb")
    r = _run(monkeypatch, _fake_nvml(uuids, energy_mj=lambda h, n: 0.0, power_mw=lambda h: 1000),
             device="cuda:0", seconds=0.03)
    assert r["nvml_index"] == 1
    r = _run(monkeypatch, _fake_nvml(uuids, energy_mj=lambda h, n: 0.0, power_mw=lambda h: 1000),
             device="cuda:1", seconds=0.03)
    assert r["available"] is False and "not visible" in r["reason"]


def test_sampler_errors_are_recorded_not_raised(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    calls = {"n": 0}

    def flaky(h):
        calls["n"] += 1
        if calls["n"] > 2:  # the support probe and the first sample succeed
            raise RuntimeError("GPU is lost")
        return 70_000

    fake = _fake_nvml(["GPU-aaa"], energy_mj=lambda h, n: 1000.0 * n, power_mw=flaky)
    r = _run(monkeypatch, fake, seconds=0.08)
    assert r["method"] == "nvml-energy-counter" and r["joules"] == pytest.approx(1.0)
    assert len(r["errors"]) == 1 and "GPU is lost" in r["errors"][0]


# --------------------------------------------------------------------------------- fake RAPL


def _write(path, text):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def test_rapl_with_wrap(monkeypatch, tmp_path):
    root = tmp_path / "powercap"
    for name, sub in [("intel-rapl:0", "package-0"), ("intel-rapl:1", "package-1"),
                      ("intel-rapl:0:0", "core"), ("intel-rapl:2", "psys")]:
        d = root / name
        d.mkdir(parents=True)
        _write(d / "name", sub + "\n")
        _write(d / "max_energy_range_uj", "1000000\n")
        _write(d / "energy_uj", "900000\n")
    monkeypatch.setattr(energy, "POWERCAP_ROOT", str(root))
    monkeypatch.setattr(energy, "HWMON_ROOT", str(tmp_path / "no-hwmon"))
    t = EnergyTracker("cpu", interval_s=0.02)
    t.start()
    _wait(0.05)
    _write(root / "intel-rapl:0" / "energy_uj", "100000\n")  # wrapped: +0.2 J
    _write(root / "intel-rapl:1" / "energy_uj", "950000\n")  # +0.05 J
    _write(root / "intel-rapl:0:0" / "energy_uj", "0\n")  # sub-domain and psys: ignored
    _write(root / "intel-rapl:2" / "energy_uj", "0\n")
    _wait(0.05)
    r = t.stop()
    assert r["available"] and r["method"] == "rapl"
    assert r["rapl_domains"] == ["package-0", "package-1"]
    assert r["joules"] == pytest.approx(0.25)
    assert r["avg_power_w"] == pytest.approx(0.25 / r["seconds"])
    assert r["power_samples"] >= 1 and r["errors"] == []


def test_rapl_unreadable_reason(monkeypatch, tmp_path):
    monkeypatch.setattr(energy, "POWERCAP_ROOT", str(tmp_path / "missing"))
    monkeypatch.setattr(energy, "HWMON_ROOT", str(tmp_path / "missing-hwmon"))
    with EnergyTracker("cpu", interval_s=0.02) as t:
        pass
    r = t.result
    assert r["available"] is False and r["joules"] is None
    assert r["reason"].startswith("RAPL not readable")


def test_amd_energy_hwmon(monkeypatch, tmp_path):
    hw = tmp_path / "hwmon" / "hwmon3"
    hw.mkdir(parents=True)
    _write(hw / "name", "amd_energy\n")
    _write(hw / "energy1_label", "Ecore000\n")
    _write(hw / "energy1_input", "5\n")
    _write(hw / "energy17_label", "Esocket0\n")
    _write(hw / "energy17_input", "1000000\n")
    monkeypatch.setattr(energy, "POWERCAP_ROOT", str(tmp_path / "missing"))
    monkeypatch.setattr(energy, "HWMON_ROOT", str(tmp_path / "hwmon"))
    t = EnergyTracker("cpu", interval_s=0.02).start()
    _write(hw / "energy17_input", "3000000\n")
    _write(hw / "energy1_input", "900000000\n")
    r = t.stop()
    assert r["method"] == "rapl" and r["rapl_domains"] == ["amd_energy:Esocket0"]
    assert r["joules"] == pytest.approx(2.0)


# ---------------------------------------------------------------------------------- real GPU


@pytest.mark.gpu
def test_real_gpu_energy():
    import torch

    dev = "cuda:0"
    a = torch.randn(4096, 4096, device=dev, dtype=torch.bfloat16)
    torch.cuda.synchronize()
    with EnergyTracker(device=dev, interval_s=0.05) as t:
        end = time.perf_counter() + 1.5
        while time.perf_counter() < end:
            for _ in range(20):
                a = (a @ a).clamp_(-1, 1)
            torch.cuda.synchronize()
    r = t.result
    print(json.dumps(r, indent=1))
    assert r["available"], r["reason"]
    assert r["method"] in ("nvml-energy-counter", "power-sampling")
    assert r["joules"] > 0 and r["avg_power_w"] > 20
    assert r["device_memory_peak_bytes"] > 0 and r["power_samples"] >= 10
    if r["joules_counter"] is not None and r["joules_sampled"] is not None:
        assert 0.5 < r["joules_sampled"] / r["joules_counter"] < 2.0
