"""Energy and peak-memory measurement around a runner's measured window.

Usage (every runner)::

    tracker = EnergyTracker(device="cuda:0", pids=[server_pid], interval_s=0.05)
    tracker.start()          # after the caller synchronised the device
    ...measured work...      # (synchronise again before stopping)
    result = tracker.stop()  # a JSON-able dict; see ``EnergyTracker.stop``

or ``with EnergyTracker("cpu") as t: ...`` and then ``t.result``.

Energy, by device:

* ``cuda:N`` (NVIDIA): NVML's total-energy counter (``nvmlDeviceGetTotalEnergyConsumption``, mJ since the
  driver loaded; Volta and newer) is read at start and stop and diffed (``method:
  "nvml-energy-counter"``). A background thread also samples board power (``nvmlDeviceGetPowerUsage``,
  mW) and integrates it (trapezoid) into ``joules_sampled``. The sampled figure is used
  (``method: "power-sampling"``) when the counter is not supported or went backwards (driver reload /
  reset). On Ampere (except GA100) and newer, NVML's power reading is itself a 1-second average, so
  the sampled integral lags the counter on short windows; the counter is preferred. ``cuda:N`` is the
  torch index: it is mapped through CUDA_VISIBLE_DEVICES to the NVML index with
  ``moecap.hardware.parse_visible_devices`` / ``map_visible_devices`` (CUDA enumerating in PCI bus
  order is assumed, as in ``moecap.hardware``). A MIG instance maps to its parent GPU, whose energy
  covers the whole board.
* ``cpu``: RAPL package domains from ``/sys/class/powercap/intel-rapl:N/energy_uj`` (µJ; AMD Zen
  CPUs appear there too on recent kernels) or the ``amd_energy`` hwmon driver's socket counters,
  read at start, by the sampling thread and at stop, so counter wraps (at ``max_energy_range_uj``)
  are accounted even over long windows (``method: "rapl"``). RAPL measures whole packages: every
  process on the socket, not just the benchmark. Where it is unreadable (no powercap driver in a
  VM/container, or a kernel that restricts ``energy_uj`` to root) energy is unavailable and
  ``reason`` says why.

Memory, sampled by the same thread: device memory used on the GPU (``nvmlDeviceGetMemoryInfo``, the
whole device) and the GPU memory of the tracked processes (``nvmlDeviceGetComputeRunningProcesses``;
PIDs as NVML reports them, i.e. the host PID namespace), and host RSS summed over the tracked
processes. The tracked processes are this process (unless ``include_self=False``), ``pids``, and
all their descendants (re-listed about every 0.5 s). Summed RSS counts pages shared between
processes more than once.

This module imports neither torch nor pynvml at import time: pynvml and psutil are imported by
``start()``.
"""

from __future__ import annotations

import glob
import math
import os
import re
import threading
import time
from typing import Any, Iterable, Sequence

__all__ = ["EnergyTracker", "per_token"]

# Roots, module-level so tests can point them at a fake sysfs.
POWERCAP_ROOT = "/sys/class/powercap"
HWMON_ROOT = "/sys/class/hwmon"

_CHILD_REFRESH_S = 0.5  # how often the process tree is re-listed (a /proc scan)
_MAX_ERRORS = 20  # distinct error messages kept in a result


# ---------------------------------------------------------------------------------- pure helpers


def _diff_counter(start: float | None, stop: float | None, max_range: float | None = None) -> float | None:
    """Increase of a monotonic energy counter from ``start`` to ``stop``.

    A stop value below the start value means the counter wrapped or was reset: with ``max_range``
    (the value at which it wraps, e.g. RAPL's ``max_energy_range_uj``) it is taken as one wrap,
    ``stop + max_range - start``; without one (NVML's 64-bit counter never wraps in practice, so a
    decrease is a reset) the difference is unknown and None is returned. None in, None out.
    """
    if start is None or stop is None:
        return None
    if stop >= start:
        return stop - start
    if max_range is not None and max_range > 0 and start <= max_range:
        return stop + max_range - start
    return None


def _integrate(samples: Iterable[tuple[float, float]]) -> float:
    """Trapezoid integral of ``(time_s, value)`` samples (watts -> joules); 0.0 for fewer than two.

    Samples are taken in time order; a pair whose time does not increase adds nothing.
    """
    total = 0.0
    prev: tuple[float, float] | None = None
    for t, v in samples:
        if prev is not None and t > prev[0]:
            total += (t - prev[0]) * (v + prev[1]) / 2.0
        prev = (t, v)
    return total


def per_token(result: dict[str, Any] | None, output_tokens: int | float | None) -> dict[str, Any]:
    """``{"joules_per_output_token": J / output token}`` from a tracker result (None where unknown)."""
    joules = (result or {}).get("joules")
    if joules is None or not output_tokens or output_tokens <= 0:
        return {"joules_per_output_token": None}
    return {"joules_per_output_token": float(joules) / float(output_tokens)}


def _parse_device(device: Any) -> tuple[str, int | None]:
    """('cuda', torch index) or ('cpu', None) for 'cuda:N' / 'cuda' / 'cpu' / a torch.device / an int."""
    if isinstance(device, int) and not isinstance(device, bool):
        return "cuda", device
    text = str(device).strip().lower()
    if text == "cpu":
        return "cpu", None
    m = re.fullmatch(r"cuda(?::(\d+))?", text)
    if m:
        return "cuda", int(m.group(1) or 0)
    raise ValueError(f"unsupported device {device!r}: use 'cuda:N' or 'cpu'")


class _Stats:
    """Running count / mean / max / min and trapezoid integral of a time series."""

    def __init__(self) -> None:
        self.n = 0
        self.total = 0.0
        self.max: float | None = None
        self.min: float | None = None
        self.integral = 0.0
        self.first_t: float | None = None
        self.last: tuple[float, float] | None = None

    def add(self, t: float, v: float) -> None:
        if self.last is not None:
            self.integral += _integrate([self.last, (t, v)])
        else:
            self.first_t = t
        self.last = (t, v)
        self.n += 1
        self.total += v
        self.max = v if self.max is None else max(self.max, v)
        self.min = v if self.min is None else min(self.min, v)

    def summary(self) -> dict[str, float] | None:
        if not self.n:
            return None
        return {"mean": self.total / self.n, "max": float(self.max), "min": float(self.min)}


# ------------------------------------------------------------------------------------- NVML


def _is_not_supported(pynvml: Any, exc: BaseException) -> bool:
    cls = getattr(pynvml, "NVMLError_NotSupported", None)
    if isinstance(cls, type) and isinstance(exc, cls):
        return True
    return getattr(exc, "value", None) == getattr(pynvml, "NVML_ERROR_NOT_SUPPORTED", 3)


def _decode(x: Any) -> str:
    return x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x)


def _nvml_index(pynvml: Any, torch_index: int) -> tuple[int, str | None]:
    """NVML index of torch device ``torch_index`` under CUDA_VISIBLE_DEVICES, and a note (MIG)."""
    from moecap.hardware import map_visible_devices, parse_visible_devices

    count = int(pynvml.nvmlDeviceGetCount())
    uuids = []
    for i in range(count):
        try:
            uuids.append(_decode(pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByIndex(i))))
        except Exception:
            uuids.append("")
    via_mig: list[str] = []

    def resolve(uuid: str) -> int | None:  # 'MIG-...' -> its parent GPU
        h = None
        for arg in (uuid, uuid.encode()):
            try:
                h = pynvml.nvmlDeviceGetHandleByUUID(arg)
                break
            except Exception:
                continue
        if h is None:
            return None
        try:
            h = pynvml.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(h)
        except Exception:
            pass
        try:
            idx = int(pynvml.nvmlDeviceGetIndex(h))
        except Exception:
            return None
        via_mig.append(uuid)
        return idx

    raw = os.environ.get("CUDA_VISIBLE_DEVICES")
    visible = map_visible_devices(parse_visible_devices(raw), uuids, resolve)
    if not 0 <= torch_index < len(visible):
        where = f" (CUDA_VISIBLE_DEVICES={raw!r})" if raw is not None else ""
        raise LookupError(f"cuda:{torch_index} is not visible: {len(visible)} GPU(s) visible{where}")
    note = None
    if via_mig and raw is not None:
        entries = parse_visible_devices(raw) or []
        if torch_index < len(entries) and entries[torch_index] in via_mig:
            note = "MIG instance: energy and power are those of the whole parent GPU"
    return visible[torch_index], note


# ------------------------------------------------------------------------------------- RAPL


class _RaplDomain:
    def __init__(self, name: str, path: str, max_range: float | None) -> None:
        self.name = name
        self.path = path
        self.max_range = max_range
        self.last: float | None = None
        self.joules = 0.0

    def read_uj(self) -> float:
        with open(self.path, encoding="ascii") as fh:
            return float(int(fh.read().strip()))


def _read_int(path: str) -> int | None:
    try:
        with open(path, encoding="ascii") as fh:
            return int(fh.read().strip())
    except (OSError, ValueError):
        return None


def _read_str(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.read().strip()
    except OSError:
        return None


def _find_rapl() -> tuple[list[_RaplDomain], str | None]:
    """Package-level energy counters that can be read now, or ([], the reason there are none)."""
    candidates: list[_RaplDomain] = []
    for d in sorted(glob.glob(os.path.join(POWERCAP_ROOT, "intel-rapl:*"))):
        if not re.fullmatch(r"intel-rapl:\d+", os.path.basename(d)):  # sub-domains (core, dram) are inside
            continue
        name = _read_str(os.path.join(d, "name")) or os.path.basename(d)
        if name.startswith("psys"):  # platform domain: overlaps the packages
            continue
        rng = _read_int(os.path.join(d, "max_energy_range_uj"))
        candidates.append(_RaplDomain(name, os.path.join(d, "energy_uj"), float(rng) if rng else None))
    if not candidates:  # the (older) amd_energy hwmon driver: µJ, accumulated in 64 bits by the driver
        for d in sorted(glob.glob(os.path.join(HWMON_ROOT, "hwmon*"))):
            if _read_str(os.path.join(d, "name")) != "amd_energy":
                continue
            for inp in sorted(glob.glob(os.path.join(d, "energy*_input"))):
                label = _read_str(inp[: -len("_input")] + "_label") or os.path.basename(inp)
                if label.lower().startswith("esocket"):
                    candidates.append(_RaplDomain(f"amd_energy:{label}", inp, None))
    if not candidates:
        where = POWERCAP_ROOT if os.path.isdir(POWERCAP_ROOT) else f"{POWERCAP_ROOT} (missing)"
        return [], (
            f"RAPL not readable: no package energy counters under {where} or an amd_energy hwmon device "
            "(no powercap driver, typical in a VM or container)"
        )
    problems = []
    readable = []
    for dom in candidates:
        try:
            dom.read_uj()
            readable.append(dom)
        except PermissionError as exc:
            problems.append(f"{dom.path}: permission denied ({exc.strerror}; kernels >= 5.10 restrict "
                            "energy_uj to root)")
        except (OSError, ValueError) as exc:
            problems.append(f"{dom.path}: {exc}")
    if problems:  # a partial sum would under-count: all package domains or nothing
        return [], "RAPL not readable: " + "; ".join(problems)
    return readable, None


# --------------------------------------------------------------------------------- processes


class _Processes:
    """The tracked processes: roots and their descendants (re-listed every ``_CHILD_REFRESH_S``)."""

    def __init__(self, psutil: Any, roots: Sequence[int]) -> None:
        self.psutil = psutil
        self.roots: list[Any] = []
        self.missing: list[int] = []
        for pid in dict.fromkeys(int(p) for p in roots):
            try:
                self.roots.append(psutil.Process(pid))
            except psutil.Error:
                self.missing.append(pid)
        self.procs: dict[int, Any] = {p.pid: p for p in self.roots}
        self.refreshed = -math.inf
        self.max_count = 0

    def refresh(self, now: float) -> None:
        if now - self.refreshed < _CHILD_REFRESH_S:
            return
        self.refreshed = now
        procs: dict[int, Any] = {}
        for root in self.roots:
            try:
                if not root.is_running():
                    continue
                procs.setdefault(root.pid, root)
                for child in root.children(recursive=True):
                    procs.setdefault(child.pid, self.procs.get(child.pid, child))
            except self.psutil.Error:
                continue
        self.procs = procs
        self.max_count = max(self.max_count, len(procs))

    def rss(self) -> int:
        total = 0
        for p in list(self.procs.values()):
            try:
                total += int(p.memory_info().rss)
            except self.psutil.Error:
                continue
        return total

    def pids(self) -> set[int]:
        return set(self.procs)


# ---------------------------------------------------------------------------------- tracker


class EnergyTracker:
    """Measure energy, power and peak memory between ``start()`` and ``stop()``.

    ``device``: ``"cuda:N"`` (torch index) or ``"cpu"``. ``pids``: further processes (e.g. a
    launched server) whose memory, with their descendants', counts too. ``interval_s``: sampling
    period of the background thread. ``include_self``: track this process (and its descendants).

    Nothing in the sampling thread raises: failures are recorded in the result's ``errors``.
    """

    def __init__(self, device: Any = "cpu", pids: Sequence[int] | None = None, interval_s: float = 0.05,
                 include_self: bool = True) -> None:
        self.device = str(device)
        self.kind, self.index = _parse_device(device)
        if not interval_s or interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s!r}")
        self.interval_s = float(interval_s)
        self.pids = [int(p) for p in (pids or [])]
        self.include_self = include_self
        self.result: dict[str, Any] | None = None

        self._started = False
        self._stop_event = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._errors: dict[str, int] = {}
        self._notes: list[str] = []
        self._t0 = 0.0

        self._nvml: Any = None
        self._handle: Any = None
        self._nvml_index: int | None = None
        self._nvml_reason: str | None = None
        self._counter_start: float | None = None
        self._counter_ok = False
        self._power_ok = False
        self._power = _Stats()
        self._device_mem_peak: int | None = None
        self._proc_device_mem_peak: int | None = None
        self._proc_device_mem_ok = True

        self._rapl: list[_RaplDomain] = []
        self._rapl_reason: str | None = None
        self._rapl_last_t: float | None = None
        self._rapl_joules_last: float = 0.0

        self._procs: _Processes | None = None
        self._rss_peak: int | None = None

    # -- context manager

    def __enter__(self) -> "EnergyTracker":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- public

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> "EnergyTracker":
        """Open the counters, take the first reading and start the sampling thread."""
        if self._started:
            raise RuntimeError("EnergyTracker.start() called twice; make a new tracker per window")
        self._started = True
        try:
            import psutil

            roots = ([os.getpid()] if self.include_self else []) + self.pids
            self._procs = _Processes(psutil, roots)
            if self._procs.missing:
                self._notes.append(f"pids not running at start: {self._procs.missing}")
        except Exception as exc:  # psutil missing: no host memory
            self._record_error("psutil", exc)
        if self.kind == "cuda":
            self._open_nvml()
        else:
            self._rapl, self._rapl_reason = _find_rapl()
        self._t0 = time.perf_counter()
        if self._handle is not None:
            self._counter_start = self._read_counter(first=True)
        self._sample()
        self._thread = threading.Thread(target=self._run, name="moecap-energy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> dict[str, Any]:
        """Stop sampling (the thread is always joined) and return the result; idempotent.

        Result keys: ``available``, ``method`` ('nvml-energy-counter' | 'power-sampling' | 'rapl' |
        None), ``reason`` (why not available, else None), ``joules``, ``seconds``, ``avg_power_w``,
        ``power_samples``, ``power_w`` ({mean, max, min} of the samples, or None), ``joules_counter``,
        ``joules_sampled`` (with ``sampled_seconds``, the span the samples cover),
        ``device_memory_peak_bytes`` (whole GPU), ``process_device_memory_peak_bytes`` (tracked
        processes on the GPU), ``host_rss_peak_bytes`` (tracked processes), ``nvml_index``,
        ``device``, ``interval_s``, ``tracked_processes_max``, ``rapl_domains``, ``notes``, ``errors``.
        """
        if self.result is not None:
            return self.result
        if not self._started:
            raise RuntimeError("EnergyTracker.stop() called before start()")
        t_end = time.perf_counter()
        counter_stop = self._read_counter() if self._counter_start is not None else None
        self._stop_event.set()
        try:
            self._sample()  # the closing sample, at the end of the window
        except Exception as exc:  # pragma: no cover - _sample guards itself
            self._record_error("final sample", exc)
        if self._thread is not None:
            self._thread.join()
        try:
            self.result = self._build(t_end - self._t0, counter_stop)
        finally:
            self._close_nvml()
        return self.result

    # -- NVML

    def _open_nvml(self) -> None:
        try:
            import pynvml
        except Exception as exc:
            self._nvml_reason = f"NVML unavailable: cannot import pynvml (nvidia-ml-py): {exc}"
            return
        try:
            pynvml.nvmlInit()
        except Exception as exc:
            self._nvml_reason = f"NVML unavailable: nvmlInit failed: {exc}"
            return
        self._nvml = pynvml
        try:
            self._nvml_index, note = _nvml_index(pynvml, int(self.index or 0))
            if note:
                self._notes.append(note)
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(self._nvml_index)
        except Exception as exc:
            self._nvml_reason = f"NVML unavailable: cannot find the NVML device for {self.device}: {exc}"
            self._handle = None
            return
        try:
            pynvml.nvmlDeviceGetPowerUsage(self._handle)
            self._power_ok = True
        except Exception as exc:
            self._notes.append(f"power readings unavailable: {exc}")

    def _close_nvml(self) -> None:
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:
                pass
            self._nvml = None

    def _read_counter(self, first: bool = False) -> float | None:
        """NVML energy counter in mJ, or None (noted) when it cannot be read."""
        pynvml = self._nvml
        try:
            value = float(pynvml.nvmlDeviceGetTotalEnergyConsumption(self._handle))
            if first:
                self._counter_ok = True
            return value
        except Exception as exc:
            if first:
                if _is_not_supported(pynvml, exc):
                    self._notes.append("NVML energy counter not supported on this device")
                else:
                    self._notes.append(f"NVML energy counter unreadable: {exc}")
            elif self._counter_ok:
                self._notes.append(f"NVML energy counter unreadable at stop: {exc}")
            return None

    # -- sampling

    def _record_error(self, where: str, exc: BaseException) -> None:
        msg = f"{where}: {type(exc).__name__}: {exc}"
        if msg in self._errors or len(self._errors) < _MAX_ERRORS:
            self._errors[msg] = self._errors.get(msg, 0) + 1

    def _run(self) -> None:
        while not self._stop_event.wait(self.interval_s):
            try:
                self._sample()
            except BaseException as exc:  # never let the thread die silently
                self._record_error("sampler", exc)

    def _sample(self) -> None:
        with self._lock:
            now = time.perf_counter()
            if self._procs is not None:
                try:
                    self._procs.refresh(now)
                    rss = self._procs.rss()
                    self._rss_peak = rss if self._rss_peak is None else max(self._rss_peak, rss)
                except Exception as exc:
                    self._record_error("host memory", exc)
            if self._handle is not None:
                self._sample_nvml(now)
            if self._rapl:
                self._sample_rapl(now)

    def _sample_nvml(self, now: float) -> None:
        pynvml = self._nvml
        if self._power_ok:
            try:
                self._power.add(now, float(pynvml.nvmlDeviceGetPowerUsage(self._handle)) / 1000.0)
            except Exception as exc:
                self._record_error("power", exc)
        try:
            used = int(pynvml.nvmlDeviceGetMemoryInfo(self._handle).used)
            peak = self._device_mem_peak
            self._device_mem_peak = used if peak is None else max(peak, used)
        except Exception as exc:
            self._record_error("device memory", exc)
        if self._procs is not None and self._proc_device_mem_ok:
            try:
                tracked = self._procs.pids()
                total = 0
                for info in pynvml.nvmlDeviceGetComputeRunningProcesses(self._handle):
                    mem = getattr(info, "usedGpuMemory", None)
                    if int(info.pid) in tracked and mem is not None:
                        total += int(mem)
                peak = self._proc_device_mem_peak
                self._proc_device_mem_peak = total if peak is None else max(peak, total)
            except Exception as exc:
                if _is_not_supported(pynvml, exc):
                    self._proc_device_mem_ok = False
                    self._notes.append("per-process GPU memory not supported")
                else:
                    self._record_error("process device memory", exc)

    def _sample_rapl(self, now: float) -> None:
        for dom in self._rapl:
            try:
                value = dom.read_uj()
            except Exception as exc:
                self._record_error(f"rapl {dom.name}", exc)
                continue
            if dom.last is not None:
                delta = _diff_counter(dom.last, value, dom.max_range)
                if delta is None:
                    self._record_error(f"rapl {dom.name}",
                                       RuntimeError("counter went backwards without a range"))
                else:
                    dom.joules += delta / 1e6
            dom.last = value
        total = sum(d.joules for d in self._rapl)
        if self._rapl_last_t is not None and now > self._rapl_last_t:
            self._power.add(now, (total - self._rapl_joules_last) / (now - self._rapl_last_t))
        self._rapl_last_t, self._rapl_joules_last = now, total

    # -- result

    def _build(self, seconds: float, counter_stop: float | None) -> dict[str, Any]:
        power = self._power
        sampled = None
        if self.kind == "cuda" and power.n >= 2:
            sampled = power.integral
        counter = None
        method = None
        joules = None
        reason = None
        if self.kind == "cuda":
            if self._handle is None:
                reason = self._nvml_reason or "NVML unavailable"
            else:
                if self._counter_start is not None and counter_stop is not None:
                    diff = _diff_counter(self._counter_start, counter_stop, None)
                    if diff is None:
                        self._notes.append(
                            f"NVML energy counter went backwards ({self._counter_start:.0f} -> "
                            f"{counter_stop:.0f} mJ: driver reload or counter reset); "
                            "using the integrated power samples"
                        )
                    else:
                        counter = diff / 1000.0
                if counter is not None:
                    method, joules = "nvml-energy-counter", counter
                elif sampled is not None:
                    method, joules = "power-sampling", sampled
                else:
                    reason = "neither the NVML energy counter nor enough power samples are available"
        else:
            if self._rapl:
                method = "rapl"
                joules = sum(d.joules for d in self._rapl)
            else:
                reason = self._rapl_reason or "RAPL not readable"
        available = joules is not None
        if available:
            reason = None
        return {
            "available": available,
            "method": method,
            "reason": reason,
            "joules": joules,
            "seconds": seconds,
            "avg_power_w": (joules / seconds) if (joules is not None and seconds > 0) else None,
            "power_samples": power.n,
            "power_w": power.summary(),
            "joules_counter": counter,
            "joules_sampled": sampled,
            "sampled_seconds": (power.last[0] - power.first_t) if power.n >= 2 else None,
            "device": self.device,
            "nvml_index": self._nvml_index,
            "device_memory_peak_bytes": self._device_mem_peak,
            "process_device_memory_peak_bytes": self._proc_device_mem_peak,
            "host_rss_peak_bytes": self._rss_peak,
            "tracked_processes_max": self._procs.max_count if self._procs is not None else 0,
            "rapl_domains": [d.name for d in self._rapl] or None,
            "interval_s": self.interval_s,
            "notes": list(dict.fromkeys(self._notes)),
            "errors": [f"{m} (x{n})" if n > 1 else m for m, n in self._errors.items()],
        }
