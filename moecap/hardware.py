"""Hardware detection and the peaks S-MBU / S-MFU are measured against.

Peaks come from, in this order (``resolve_peaks``):

1. peaks the user gives (``hardware.peaks`` in the suite): ``{mem_bandwidth_gbs, tflops: {dtype: ...}}``;
2. on a CPU: a cached calibration, else a fresh one if allowed. CPU peaks are always measured on the
   machine, never taken from a table;
3. on a GPU: the datasheet table ``moecap/data/peaks.yaml`` (dense peaks only), then a cached
   calibration, then a fresh calibration if allowed;
4. otherwise ``UnknownDeviceError``, which says how to proceed.

Calibration (``calibrate``) measures the ceilings on the machine itself: a large device-to-device
copy (bytes read + bytes written) and a large matmul in the compute dtype. Results are cached per
device in ``$MOECAP_CACHE_DIR/hardware/<normalised device name>.json``.

This module must stay importable without torch: torch (and pynvml, psutil, yaml) are imported
inside the functions that need them.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import glob
import json
import os
import platform
import re
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from moecap.paths import atomic_write_text, cache_dir

__all__ = [
    "DTYPES",
    "HardwareInfo",
    "Peaks",
    "UnknownDeviceError",
    "calibrate",
    "calibration_path",
    "canonical_dtype",
    "catalog",
    "detect_hardware",
    "format_hardware",
    "load_calibration",
    "lookup_peaks",
    "lookup_row",
    "map_visible_devices",
    "normalize_device_name",
    "parse_visible_devices",
    "peaks_from_user",
    "resolve_peaks",
    "save_calibration",
]

PEAKS_TABLE = Path(__file__).with_name("data") / "peaks.yaml"
PEAKS_TABLE_DISPLAY = "moecap/data/peaks.yaml"

# Canonical dtype names used as keys of Peaks.flops and of the table's `tflops`.
DTYPES: tuple[str, ...] = ("fp32", "tf32", "bf16", "fp16", "fp8", "int8")

_DTYPE_ALIASES: dict[str, str] = {
    "fp32": "fp32", "float32": "fp32", "float": "fp32", "f32": "fp32", "single": "fp32",
    "tf32": "tf32", "tensorfloat32": "tf32", "tensorfloat-32": "tf32",
    "bf16": "bf16", "bfloat16": "bf16",
    "fp16": "fp16", "float16": "fp16", "half": "fp16", "f16": "fp16",
    "fp8": "fp8", "float8": "fp8", "e4m3": "fp8", "e5m2": "fp8",
    "fp8_e4m3": "fp8", "fp8_e5m2": "fp8",
    "float8_e4m3fn": "fp8", "float8_e5m2": "fp8", "float8_e4m3fnuz": "fp8", "float8_e5m2fnuz": "fp8",
    "int8": "int8", "i8": "int8",
}

# Words dropped from the front of a device name: vendors and brands that carry no model information.
_LEADING_NOISE = {"nvidia", "amd", "ati", "intel", "tesla", "geforce", "instinct", "quadro"}

CALIBRATION_SCHEMA_VERSION = 1


class UnknownDeviceError(ValueError):
    """No peaks are known for a device (not in the table, no calibration, no user peaks)."""


# --------------------------------------------------------------------------------------------- names


def normalize_device_name(name: str) -> str:
    """Lower-case slug of a device name without vendor/brand prefixes or punctuation.

    "NVIDIA H100 80GB HBM3" -> "h100-80gb-hbm3"; "NVIDIA A100-SXM4-80GB" -> "a100-sxm4-80gb";
    "NVIDIA GeForce RTX 4090" -> "rtx-4090"; "AMD Instinct MI300X" -> "mi300x";
    "Intel(R) Xeon(R) Platinum 8380 CPU @ 2.30GHz" -> "xeon-platinum-8380-cpu-2-30ghz".
    """
    s = str(name).lower()
    for mark in ("(r)", "(tm)", "(c)", "®", "™"):
        s = s.replace(mark, " ")
    tokens = [t for t in re.split(r"[^a-z0-9]+", s) if t]
    stripped = list(tokens)
    while stripped and stripped[0] in _LEADING_NOISE:
        stripped.pop(0)
    out = stripped or tokens  # a name made only of vendor words keeps them
    return "-".join(out) or "unknown"


def canonical_dtype(dtype: Any) -> str:
    """Canonical dtype key ('fp32', 'tf32', 'bf16', 'fp16', 'fp8', 'int8') of a name or a torch.dtype."""
    s = str(dtype).strip().lower()
    if s.startswith("torch."):
        s = s[len("torch."):]
    try:
        return _DTYPE_ALIASES[s]
    except KeyError:
        raise ValueError(
            f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)} "
            "(aliases: bfloat16, float16/half, float32/float, float8_e4m3fn, ...)"
        ) from None


# --------------------------------------------------------------------------------------------- Peaks


@dataclass
class Peaks:
    """Ceilings of one device: memory bandwidth (bytes/s) and dense FLOP/s per dtype.

    ``source`` says where they come from: ``"datasheet: <title> <url>"``,
    ``"calibrated: <date, method>"`` or ``"user"``; ``kind`` is ``datasheet``/``calibrated``/``user``.
    ``details`` holds supporting facts (table key and notes, or measurement sizes, medians, threads).
    """

    device: str
    mem_bandwidth_Bps: float
    flops: dict[str, float]
    source: str
    kind: str
    tdp_w: float | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def mem_bandwidth_gbs(self) -> float:
        return self.mem_bandwidth_Bps / 1e9

    def dtypes(self) -> list[str]:
        return [d for d in DTYPES if d in self.flops] + sorted(d for d in self.flops if d not in DTYPES)

    def times(self, devices: int) -> "Peaks":
        """The ceilings of ``devices`` such devices together (a cell spread over them by tensor, pipeline
        or data parallelism): bandwidth and FLOP/s times ``devices``; 1 returns ``self``."""
        if devices == 1:
            return self
        if devices < 1:
            raise ValueError(f"devices={devices}: must be >= 1")
        return Peaks(device=f"{devices} x {self.device}", mem_bandwidth_Bps=self.mem_bandwidth_Bps * devices,
                     flops={k: v * devices for k, v in self.flops.items()}, source=self.source, kind=self.kind,
                     tdp_w=self.tdp_w * devices if self.tdp_w is not None else None,
                     details={**self.details, "devices": devices, "per_device": self.device})

    def flops_for(self, dtype: Any) -> float:
        """Dense peak FLOP/s for ``dtype`` (aliases accepted). fp32 is plain fp32, never tf32."""
        key = canonical_dtype(dtype)
        if key in self.flops:
            return float(self.flops[key])
        have = ", ".join(self.dtypes()) or "none"
        raise ValueError(
            f"no {key} peak for device {self.device!r} ({self.kind} peaks); it has: {have}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "mem_bandwidth_Bps": float(self.mem_bandwidth_Bps),
            "flops": {k: float(v) for k, v in self.flops.items()},
            "source": self.source,
            "kind": self.kind,
            "tdp_w": self.tdp_w,
            "details": dict(self.details),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Peaks":
        if "mem_bandwidth_Bps" in d:
            bw = float(d["mem_bandwidth_Bps"])
        elif "mem_bandwidth_gbs" in d:
            bw = float(d["mem_bandwidth_gbs"]) * 1e9
        else:
            raise ValueError("peaks need mem_bandwidth_Bps (or mem_bandwidth_gbs)")
        if "flops" in d:
            flops = {canonical_dtype(k): float(v) for k, v in d["flops"].items()}
        elif "tflops" in d:
            flops = {canonical_dtype(k): float(v) * 1e12 for k, v in d["tflops"].items()}
        else:
            raise ValueError("peaks need flops (or tflops)")
        tdp = d.get("tdp_w")
        return cls(
            device=str(d.get("device", "")),
            mem_bandwidth_Bps=bw,
            flops=flops,
            source=str(d.get("source", "")),
            kind=str(d.get("kind", "")),
            tdp_w=None if tdp is None else float(tdp),
            details=dict(d.get("details") or {}),
        )


# ------------------------------------------------------------------------------------------- catalog


@functools.lru_cache(maxsize=None)
def _load_table(path: str) -> tuple[dict[str, Any], ...]:
    import yaml

    with open(path, encoding="utf-8") as fh:
        data = yaml.safe_load(fh)
    rows = data.get("devices") if isinstance(data, dict) else None
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a top-level 'devices' list")
    required = ("key", "names", "memory_gb", "mem_bandwidth_gbs", "tflops", "tdp_w", "source")
    for row in rows:
        missing = [k for k in required if k not in row]
        if missing:
            raise ValueError(f"{path}: row {row.get('key', row)!r} lacks {missing}")
        bad = [k for k in row["tflops"] if k not in DTYPES]
        if bad:
            raise ValueError(f"{path}: row {row['key']!r} has unknown dtypes {bad}; use {DTYPES}")
    return tuple(rows)


def catalog() -> list[dict[str, Any]]:
    """The rows of moecap/data/peaks.yaml (copies)."""
    return [dict(r) for r in _load_table(str(PEAKS_TABLE))]


@functools.lru_cache(maxsize=None)
def _index(path: str) -> dict[str, dict[str, Any]]:
    index: dict[str, dict[str, Any]] = {}
    for row in _load_table(path):
        for alias in [row["key"], *row["names"]]:
            slug = normalize_device_name(alias)
            other = index.get(slug)
            if other is not None and other is not row:
                raise ValueError(
                    f"{path}: {alias!r} normalises to {slug!r}, which also names row {other['key']!r}"
                )
            index[slug] = row
    return index


def lookup_row(name: str) -> dict[str, Any] | None:
    """The table row whose key or one of whose names normalises like ``name``; exact match only."""
    row = _index(str(PEAKS_TABLE)).get(normalize_device_name(name))
    return dict(row) if row is not None else None


def _source_text(src: Any) -> str:
    if isinstance(src, dict):
        title, url = src.get("title", ""), src.get("url", "")
        return f"{title} <{url}>" if url else str(title)
    return str(src)


def lookup_peaks(name: str) -> Peaks | None:
    """Datasheet peaks for a device name as NVML/torch report it, or None if it is not in the table."""
    row = lookup_row(name)
    if row is None:
        return None
    details = {"key": row["key"], "memory_gb": row["memory_gb"], "table": PEAKS_TABLE_DISPLAY}
    if row.get("note"):
        details["note"] = " ".join(str(row["note"]).split())
    return Peaks(
        device=str(name),
        mem_bandwidth_Bps=float(row["mem_bandwidth_gbs"]) * 1e9,
        flops={k: float(v) * 1e12 for k, v in row["tflops"].items()},
        source=f"datasheet: {_source_text(row['source'])} [{row['key']}]",
        kind="datasheet",
        tdp_w=float(row["tdp_w"]) if row.get("tdp_w") is not None else None,
        details=details,
    )


# ------------------------------------------------------------------------------------ HardwareInfo


@dataclass
class HardwareInfo:
    """What moecap runs on. ``device_index`` is the index as torch sees it (after
    CUDA_VISIBLE_DEVICES); ``nvml_index`` is the physical NVML index when NVML was used."""

    accelerator: str  # 'cuda' | 'rocm' | 'cpu'
    device_name: str
    device_count: int
    device_index: int
    memory_bytes: int | None
    driver_version: str | None
    cuda_version: str | None  # CUDA driver version (NVML) or torch's CUDA/HIP version
    cpu_model: str
    cpu_cores_physical: int | None
    cpu_cores_logical: int | None
    host_memory_bytes: int | None
    nvml_index: int | None = None
    device_uuid: str | None = None
    visible_devices: str | None = None  # CUDA_VISIBLE_DEVICES as found
    detected_via: str = "cpu"  # 'nvml' | 'torch' | 'cpu'

    @property
    def device_key(self) -> str:
        return normalize_device_name(self.device_name)

    @property
    def torch_device(self) -> str:
        return "cpu" if self.accelerator == "cpu" else f"cuda:{self.device_index}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["device_key"] = self.device_key
        return d


# ------------------------------------------------------------------ CUDA_VISIBLE_DEVICES semantics


def _leading_int(text: str) -> int | None:
    """The integer a string starts with, strtoul-style ("1gpu" -> 1, "-1" -> -1); None if none."""
    m = re.match(r"[+-]?\d+", text)
    return int(m.group(0)) if m else None


def parse_visible_devices(value: str | None) -> list[int | str] | None:
    """Parse CUDA_VISIBLE_DEVICES the way the CUDA runtime reads it.

    None (unset) -> None, meaning every device. Otherwise a list of ordinals (ints) or of UUID
    strings ('GPU-...' / 'MIG-...', prefixes allowed). The list is of one kind, set by its first
    entry; it ends at the first entry that is invalid (a negative or non-numeric ordinal, or an
    entry of the other kind). A repeated entry makes the whole list empty (no device visible).
    """
    if value is None:
        return None
    entries = [e.strip() for e in value.split(",")]
    if not entries or not entries[0]:
        return []
    out: list[int | str] = []
    uuid_mode = entries[0].upper().startswith(("GPU-", "MIG-"))
    for entry in entries:
        if uuid_mode:
            if not entry.upper().startswith(("GPU-", "MIG-")):
                break
            item: int | str = entry
        else:
            n = _leading_int(entry)
            if n is None or n < 0:
                break
            item = n
        if item in out:
            return []
        out.append(item)
    return out


def map_visible_devices(
    visible: Sequence[int | str] | None,
    gpu_uuids: Sequence[str],
    resolve_uuid: Callable[[str], int | None] | None = None,
) -> list[int]:
    """Map parsed CUDA_VISIBLE_DEVICES entries to NVML indices.

    ``gpu_uuids[i]`` is the UUID NVML reports for index i. Ordinals must be < len(gpu_uuids); UUIDs
    match by (case-insensitive) unique prefix; entries no GPU UUID matches (e.g. 'MIG-...') go to
    ``resolve_uuid``, which returns an NVML index or None. As in CUDA, the first entry that does not
    resolve ends the list. Result position = torch device index.
    """
    count = len(gpu_uuids)
    if visible is None:
        return list(range(count))
    uuids = [u.lower() for u in gpu_uuids]
    out: list[int] = []
    for entry in visible:
        idx: int | None
        if isinstance(entry, int):
            idx = entry if 0 <= entry < count else None
        else:
            e = entry.lower()
            hits = [i for i, u in enumerate(uuids) if u.startswith(e)]
            if len(hits) == 1:
                idx = hits[0]
            elif not hits and resolve_uuid is not None:
                idx = resolve_uuid(entry)
            else:
                idx = None
        if idx is None:
            break
        if idx in out:
            return []
        out.append(idx)
    return out


# ------------------------------------------------------------------------------------ detection


def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.read()
    except OSError:
        return None


def _cpu_model() -> str:
    text = _read_text("/proc/cpuinfo")
    if text:
        for line in text.splitlines():
            key, sep, val = line.partition(":")
            if sep and key.strip().lower() == "model name" and val.strip():
                return val.strip()
        for line in text.splitlines():  # e.g. some ARM kernels
            key, sep, val = line.partition(":")
            if sep and key.strip().lower() in ("hardware", "cpu model", "processor") and val.strip():
                if not val.strip().isdigit():
                    return val.strip()
    if sys.platform == "darwin":
        with contextlib.suppress(Exception):
            import subprocess

            out = subprocess.run(
                ["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, timeout=5
            ).stdout.strip()
            if out:
                return out
    return platform.processor() or platform.machine() or "unknown CPU"


def _cpu_cores() -> tuple[int | None, int | None]:
    physical = logical = None
    try:
        import psutil

        physical = psutil.cpu_count(logical=False)
        logical = psutil.cpu_count(logical=True)
    except Exception:  # psutil missing or unsupported platform
        pass
    if logical is None:
        logical = os.cpu_count()
    if physical is None:
        text = _read_text("/proc/cpuinfo") or ""
        pairs, phys = set(), "0"
        for line in text.splitlines():
            key, _, val = line.partition(":")
            key = key.strip().lower()
            if key == "physical id":
                phys = val.strip()
            elif key == "core id":
                pairs.add((phys, val.strip()))
        physical = len(pairs) or logical
    return physical, logical


def _host_memory_bytes() -> int | None:
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except Exception:
        pass
    text = _read_text("/proc/meminfo")
    if text:
        m = re.search(r"^MemTotal:\s+(\d+)\s*kB", text, re.M)
        if m:
            return int(m.group(1)) * 1024
    with contextlib.suppress(Exception):
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    return None


def _l3_cache_bytes() -> int | None:
    """Total L3 over all L3 instances (sysfs), or None when unknown."""
    seen: dict[str, int] = {}
    for d in glob.glob("/sys/devices/system/cpu/cpu[0-9]*/cache/index[0-9]*"):
        if (_read_text(f"{d}/level") or "").strip() != "3":
            continue
        size = (_read_text(f"{d}/size") or "").strip().upper()
        shared = (_read_text(f"{d}/shared_cpu_list") or d).strip()
        m = re.match(r"(\d+)\s*([KMG]?)", size)
        if m:
            seen[shared] = int(m.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[m.group(2)]
    return sum(seen.values()) or None


def _decode(x: Any) -> str:
    return x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x)


def _cpu_info() -> HardwareInfo:
    model = _cpu_model()
    physical, logical = _cpu_cores()
    host = _host_memory_bytes()
    return HardwareInfo(
        accelerator="cpu",
        device_name=model,
        device_count=1,
        device_index=0,
        memory_bytes=host,
        driver_version=None,
        cuda_version=None,
        cpu_model=model,
        cpu_cores_physical=physical,
        cpu_cores_logical=logical,
        host_memory_bytes=host,
        visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
        detected_via="cpu",
    )


def _detect_nvml(index: int, cpu: HardwareInfo) -> HardwareInfo | None:
    """NVIDIA GPU number ``index`` of those CUDA_VISIBLE_DEVICES leaves visible, via NVML.

    None when pynvml is missing, NVML does not initialise (no driver) or no GPU is visible.
    Assumes CUDA enumerates in PCI bus order (CUDA_DEVICE_ORDER=PCI_BUS_ID, or identical GPUs).
    """
    try:
        import pynvml
    except Exception:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:
        return None
    try:
        count = int(pynvml.nvmlDeviceGetCount())
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        uuids = []
        for h in handles:
            try:
                uuids.append(_decode(pynvml.nvmlDeviceGetUUID(h)))
            except Exception:
                uuids.append("")

        def resolve(uuid: str) -> int | None:  # MIG-... -> index of its parent GPU
            h = None
            for arg in (uuid, uuid.encode()):  # nvidia-ml-py takes str; old pynvml took bytes
                with contextlib.suppress(Exception):
                    h = pynvml.nvmlDeviceGetHandleByUUID(arg)
                    break
            if h is None:
                return None
            with contextlib.suppress(Exception):
                h = pynvml.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(h)
            try:
                return int(pynvml.nvmlDeviceGetIndex(h))
            except Exception:
                return None

        raw = os.environ.get("CUDA_VISIBLE_DEVICES")
        visible = map_visible_devices(parse_visible_devices(raw), uuids, resolve)
        if not visible:
            return None
        if not 0 <= index < len(visible):
            raise ValueError(
                f"device index {index} is out of range: {len(visible)} GPU(s) visible"
                + (f" (CUDA_VISIBLE_DEVICES={raw!r})" if raw is not None else "")
            )
        nvml_index = visible[index]
        h = handles[nvml_index]
        name = _decode(pynvml.nvmlDeviceGetName(h))
        memory = None
        with contextlib.suppress(Exception):
            memory = int(pynvml.nvmlDeviceGetMemoryInfo(h).total)
        driver = cuda = None
        with contextlib.suppress(Exception):
            driver = _decode(pynvml.nvmlSystemGetDriverVersion())
        with contextlib.suppress(Exception):
            getter = getattr(pynvml, "nvmlSystemGetCudaDriverVersion_v2", None)
            getter = getter or pynvml.nvmlSystemGetCudaDriverVersion
            v = int(getter())
            cuda = f"{v // 1000}.{(v % 1000) // 10}"
        return HardwareInfo(
            accelerator="cuda",
            device_name=name,
            device_count=len(visible),
            device_index=index,
            memory_bytes=memory,
            driver_version=driver,
            cuda_version=cuda,
            cpu_model=cpu.cpu_model,
            cpu_cores_physical=cpu.cpu_cores_physical,
            cpu_cores_logical=cpu.cpu_cores_logical,
            host_memory_bytes=cpu.host_memory_bytes,
            nvml_index=nvml_index,
            device_uuid=uuids[nvml_index] or None,
            visible_devices=raw,
            detected_via="nvml",
        )
    except ValueError:
        raise
    except Exception as exc:  # an NVML call failed: let the torch fallback try
        warnings.warn(f"NVML query failed ({exc!r}); falling back to torch.cuda", stacklevel=3)
        return None
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()


def _gpu_device_nodes_present() -> bool:
    """Cheap hint (Linux) that a GPU driver is present, to avoid importing torch on plain CPU hosts."""
    if not sys.platform.startswith("linux"):
        return True
    return os.path.exists("/dev/kfd") or bool(glob.glob("/dev/nvidia[0-9]*")) or os.path.exists("/dev/dxg")


def _detect_torch(index: int, cpu: HardwareInfo) -> HardwareInfo | None:
    try:
        import torch
    except Exception:
        return None
    try:
        if not torch.cuda.is_available():
            return None
        count = int(torch.cuda.device_count())
        if count == 0:
            return None
        if not 0 <= index < count:
            raise ValueError(f"device index {index} is out of range: {count} GPU(s) visible")
        props = torch.cuda.get_device_properties(index)
    except ValueError:
        raise
    except Exception as exc:
        warnings.warn(f"torch.cuda query failed ({exc!r}); reporting the CPU", stacklevel=3)
        return None
    hip = getattr(torch.version, "hip", None)
    return HardwareInfo(
        accelerator="rocm" if hip else "cuda",
        device_name=str(props.name),
        device_count=count,
        device_index=index,
        memory_bytes=int(props.total_memory),
        driver_version=None,
        cuda_version=str(hip or torch.version.cuda or "") or None,
        cpu_model=cpu.cpu_model,
        cpu_cores_physical=cpu.cpu_cores_physical,
        cpu_cores_logical=cpu.cpu_cores_logical,
        host_memory_bytes=cpu.host_memory_bytes,
        device_uuid=str(getattr(props, "uuid", "") or "") or None,
        visible_devices=(os.environ.get("HIP_VISIBLE_DEVICES") if hip else None)
        or os.environ.get("CUDA_VISIBLE_DEVICES"),
        detected_via="torch",
    )


def _parse_device(device: str) -> tuple[str, int]:
    d = str(device).strip().lower() or "auto"
    kind, _, idx = d.partition(":")
    if kind == "gpu":
        kind = "cuda"
    if kind not in ("auto", "cpu", "cuda", "rocm"):
        raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N, rocm or rocm:N")
    if not idx:
        return kind, 0
    if not idx.isdigit():
        raise ValueError(f"bad device index in {device!r}")
    return kind, int(idx)


def detect_hardware(device: str = "auto") -> HardwareInfo:
    """Describe the machine and the device moecap will run on.

    ``auto``: the first visible NVIDIA GPU (NVML, honouring CUDA_VISIBLE_DEVICES), else a GPU
    torch sees (CUDA or ROCm), else the CPU. ``cpu`` forces the CPU. ``cuda[:N]`` / ``rocm[:N]``
    require a GPU and raise RuntimeError when none is visible. Never needs a GPU or NVML to run.
    """
    kind, index = _parse_device(device)
    cpu = _cpu_info()
    if kind == "cpu":
        return cpu
    info = None
    if kind in ("auto", "cuda"):
        info = _detect_nvml(index, cpu)
    if info is None and (kind != "auto" or "torch" in sys.modules or _gpu_device_nodes_present()):
        info = _detect_torch(index, cpu)
    if info is not None:
        return info
    if kind == "auto":
        return cpu
    raise RuntimeError(
        f"device {device!r} requested but no GPU is visible "
        f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); use device 'cpu' or 'auto'"
    )


# ------------------------------------------------------------------------------------ calibration


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _sync(torch: Any, dev: Any) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _time_op(torch: Any, dev: Any, op: Callable[[], Any], reps: int, warmup: int, inner: int = 1,
             budget_s: float | None = None) -> list[float]:
    """Seconds per call of ``op`` (each sample = mean over ``inner`` back-to-back calls)."""
    for _ in range(warmup):
        op()
    _sync(torch, dev)
    times: list[float] = []
    start_all = time.perf_counter()
    for _ in range(reps):
        if dev.type == "cuda":
            t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0.record()
            for _ in range(inner):
                op()
            t1.record()
            t1.synchronize()
            times.append(t0.elapsed_time(t1) / 1e3 / inner)
        else:
            t0 = time.perf_counter()
            for _ in range(inner):
                op()
            times.append((time.perf_counter() - t0) / inner)
        if budget_s is not None and time.perf_counter() - start_all > budget_s:
            break
    return times


def _copy_bytes_for(dev_type: str, quick: bool) -> int:
    mib = 1 << 20
    if dev_type != "cpu":
        return (256 if quick else 1024) * mib
    want = (256 if quick else 512) * mib
    l3 = _l3_cache_bytes()
    if l3:
        want = max(want, 8 * l3)
    cap = 4096 * mib
    host = _host_memory_bytes()
    if host:
        cap = min(cap, max(64 * mib, host // 8))
    return int(min(want, cap))


def _measure_bandwidth(torch: Any, dev: Any, nbytes: int, quick: bool) -> dict[str, Any]:
    n = nbytes // 4
    src = torch.empty(n, dtype=torch.float32, device=dev)
    src.fill_(1.0)
    dst = torch.empty_like(src)
    dst.fill_(0.0)  # touch every page before timing
    reps, warmup = (3, 1) if quick else ((5, 2) if dev.type == "cpu" else (20, 3))
    times = _time_op(torch, dev, lambda: dst.copy_(src), reps=reps, warmup=warmup)
    moved = 2 * n * 4  # bytes read + bytes written
    del src, dst
    return {
        "bytes": n * 4,
        "best_Bps": moved / min(times),
        "median_Bps": moved / statistics.median(times),
        "reps": len(times),
        "warmup": warmup,
    }


_TORCH_DTYPE = {"fp32": "float32", "tf32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@contextlib.contextmanager
def _tf32_mode(torch: Any, dev: Any, allow: bool) -> Iterator[None]:
    """fp32 matmuls on a GPU: plain IEEE fp32 (allow=False) or TF32 tensor cores (allow=True)."""
    if dev.type != "cuda":
        yield
        return
    mm = torch.backends.cuda.matmul
    if hasattr(mm, "fp32_precision"):  # torch >= 2.9; reading the legacy flag after it is set raises
        old = mm.fp32_precision
        mm.fp32_precision = "tf32" if allow else "ieee"
        try:
            yield
        finally:
            mm.fp32_precision = old
        return
    old_flag = mm.allow_tf32
    mm.allow_tf32 = allow
    try:
        yield
    finally:
        mm.allow_tf32 = old_flag


def _fp8_matmul_op(torch: Any, dev: Any, n: int) -> Callable[[], Any]:
    if dev.type != "cuda" or not hasattr(torch, "_scaled_mm"):
        raise ValueError("fp8 calibration needs a GPU with FP8 matmul (torch._scaled_mm)")
    errors = []
    for name in ("float8_e4m3fn", "float8_e4m3fnuz"):
        f8 = getattr(torch, name, None)
        if f8 is None:
            continue
        try:
            a = torch.randn(n, n, device=dev).to(f8)
            b = torch.randn(n, n, device=dev).to(f8).t()  # column-major second operand
            one = torch.ones((), device=dev, dtype=torch.float32)

            def op(a=a, b=b, one=one):
                return torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)

            op()
            torch.cuda.synchronize(dev)
            return op
        except Exception as exc:  # dtype unsupported on this GPU/build
            errors.append(f"{name}: {exc}")
    raise ValueError("fp8 matmul is not supported here: " + "; ".join(errors))


def _matmul_operands(torch: Any, dev: Any, dtype: str, n: int) -> Callable[[], Any]:
    if dtype == "fp8":
        return _fp8_matmul_op(torch, dev, n)
    if dtype == "int8":  # int8 x int8 -> int32, the integer dot products quantized kernels run on
        gen = torch.Generator(device=dev).manual_seed(0)
        a8 = torch.randint(-128, 128, (n, n), device=dev, generator=gen, dtype=torch.int8)
        b8 = torch.randint(-128, 128, (n, n), device=dev, generator=gen, dtype=torch.int8)

        def int_op(a: Any = a8, b: Any = b8) -> Any:
            return torch._int_mm(a, b)

        return int_op
    if dtype == "tf32" and dev.type != "cuda":
        raise ValueError("tf32 is a GPU tensor-core mode; calibrate fp32 on a CPU")
    gen = torch.Generator(device=dev).manual_seed(0)
    tdt = getattr(torch, _TORCH_DTYPE[dtype])
    a = torch.randn(n, n, device=dev, generator=gen, dtype=torch.float32).to(tdt)
    b = torch.randn(n, n, device=dev, generator=gen, dtype=torch.float32).to(tdt)
    out = torch.empty(n, n, device=dev, dtype=tdt)

    def op(a: Any = a, b: Any = b, out: Any = out) -> Any:
        return torch.matmul(a, b, out=out)

    return op


def _cpu_matmul_size(torch: Any, dev: Any, dtype: str, n: int, seconds: float) -> int:
    """``n``, or smaller where this CPU has no fast path for ``dtype`` (e.g. fp16 without
    AVX512-FP16 runs at ~1 GFLOP/s), so that one product takes about ``seconds``."""
    probe = min(n, 512)
    op = _matmul_operands(torch, dev, dtype, probe)
    op()
    t0 = time.perf_counter()
    op()
    rate = 2.0 * probe**3 / max(time.perf_counter() - t0, 1e-9)
    fit = int((rate * seconds / 2.0) ** (1.0 / 3.0)) // 64 * 64
    return max(min(n, fit), min(n, 256))


def _measure_matmul(torch: Any, dev: Any, dtype: str, n: int, quick: bool) -> dict[str, Any]:
    with _tf32_mode(torch, dev, dtype == "tf32"):
        if dev.type == "cuda":
            op = _matmul_operands(torch, dev, dtype, n)
            reps, inner = (5, 3) if quick else (10, 10)
            times = _time_op(torch, dev, op, reps=reps, warmup=3, inner=inner)
        else:
            budget = 1.5 if quick else 6.0
            n = _cpu_matmul_size(torch, dev, dtype, n, seconds=budget / 5)
            op = _matmul_operands(torch, dev, dtype, n)
            t0 = time.perf_counter()
            op()  # warm-up, and it sizes the run: up to 5 repetitions within the budget
            first = time.perf_counter() - t0
            reps = max(1, min(5, int(budget / max(first, 1e-6))))
            times = _time_op(torch, dev, op, reps=reps, warmup=0, budget_s=budget)
    flop = 2.0 * n**3
    return {
        "n": n,
        "best_flops": flop / min(times),
        "median_flops": flop / statistics.median(times),
        "reps": len(times),
    }


def calibrate(device: str = "cpu", dtype: str = "bf16", quick: bool = False) -> Peaks:
    """Measure this machine's ceilings for ``device`` ('cpu', 'cuda', 'cuda:N').

    Bandwidth: ``dst.copy_(src)`` of a buffer far larger than the last-level cache (CPU: 512 MiB and
    at least 8x L3; GPU: 1 GiB; quick: 256 MiB), counting bytes read + written, best of several
    repetitions after warm-up. FLOP/s: square matmul on random data in the compute dtype (GPU
    8192^3, CPU 2048^3; quick: 4096 / 1024; a CPU without a fast path for the dtype gets a smaller
    product that still runs ~1 s). On a CPU fp32 is always measured too. CPU runs use the
    threads torch is configured with (``torch.get_num_threads()``). Returns kind='calibrated' peaks;
    it does not write the cache (``save_calibration`` does).
    """
    import torch

    key = canonical_dtype(dtype)
    kind, index = _parse_device(device)
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "rocm":
        kind = "cuda"
    if kind == "cpu":
        dev = torch.device("cpu")
        name = _cpu_model()
        n = 1024 if quick else 2048
        dtypes = ["fp32"] + ([key] if key != "fp32" else [])
    else:
        if not torch.cuda.is_available():
            raise RuntimeError(f"cannot calibrate {device!r}: torch sees no GPU")
        dev = torch.device("cuda", index)
        name = torch.cuda.get_device_name(index)
        n = 4096 if quick else 8192
        dtypes = [key]
    if dev.type == "cpu" and key in ("tf32", "fp8"):
        raise ValueError(f"{key} is a GPU tensor-core format; on a CPU calibrate fp32, bf16 or fp16")
    nbytes = _copy_bytes_for(dev.type, quick)
    threads = torch.get_num_threads()
    when = _now()

    with torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext():
        bw = _measure_bandwidth(torch, dev, nbytes, quick)
        mm = {d: _measure_matmul(torch, dev, d, n, quick) for d in dtypes}
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    env = f"torch {torch.__version__}" + (f", {threads} CPU threads" if dev.type == "cpu" else "")
    bw_text = (
        f"copy {bw['bytes'] / 2**20:.0f} MiB device-to-device, read+write bytes, best of {bw['reps']} "
        f"after {bw['warmup']} warm-up (median {bw['median_Bps'] / 1e9:.1f} GB/s)"
    )
    mm_text = {
        d: f"{d} matmul {r['n']}^3 random, best of {r['reps']} (median {r['median_flops'] / 1e9:.1f} GFLOP/s)"
        for d, r in mm.items()
    }
    source = f"calibrated: {when}, {bw_text}; " + "; ".join(mm_text.values()) + f"; {env}"
    details = {
        "date": when,
        "quick": quick,
        "torch": torch.__version__,
        "threads": threads if dev.type == "cpu" else None,
        "copy_bytes": bw["bytes"],
        "bandwidth_median_Bps": bw["median_Bps"],
        "bandwidth_source": f"calibrated: {when}, {bw_text}; {env}",
        "matmul": {
            d: {"n": r["n"], "reps": r["reps"], "median_flops": r["median_flops"]} for d, r in mm.items()
        },
        "flops_source": {d: f"calibrated: {when}, {t}; {env}" for d, t in mm_text.items()},
    }
    return Peaks(
        device=name,
        mem_bandwidth_Bps=bw["best_Bps"],
        flops={d: r["best_flops"] for d, r in mm.items()},
        source=source,
        kind="calibrated",
        details=details,
    )


# ------------------------------------------------------------------------------------------ cache


def calibration_path(device_name: str) -> Path:
    """``$MOECAP_CACHE_DIR/hardware/<normalised device name>.json`` (default root ~/.cache/moecap)."""
    return cache_dir() / "hardware" / f"{normalize_device_name(device_name)}.json"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, the write itself is still atomic
        yield
        return
    with open(path.with_name(f".{path.name}.lock"), "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _read_calibration_file(path: Path) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        warnings.warn(f"ignoring unreadable calibration cache {path}: {exc}", stacklevel=3)
        return None
    if not (isinstance(data, dict) and "mem_bandwidth_Bps" in data and isinstance(data.get("flops"), dict)):
        warnings.warn(f"ignoring malformed calibration cache {path}", stacklevel=3)
        return None
    return data


def save_calibration(peaks: Peaks) -> Path:
    """Merge a calibration into the device's cache file (atomically) and return its path.

    One file per device; it holds one bandwidth (the latest measurement) and FLOP/s for every dtype
    calibrated so far, each with its own source.
    """
    if peaks.kind != "calibrated":
        raise ValueError(f"only calibrated peaks are cached, not {peaks.kind!r} ones")
    path = calibration_path(peaks.device)
    with _locked(path):
        old = _read_calibration_file(path) or {}
        flops = {canonical_dtype(k): float(v) for k, v in (old.get("flops") or {}).items()}
        flops_source = dict(old.get("flops_source") or {})
        matmul = dict((old.get("details") or {}).get("matmul") or {})
        new_sources = peaks.details.get("flops_source") or {}
        for d, v in peaks.flops.items():
            k = canonical_dtype(d)
            flops[k] = float(v)
            flops_source[k] = new_sources.get(d, peaks.source)
            if d in (peaks.details.get("matmul") or {}):
                matmul[k] = peaks.details["matmul"][d]
        details = {**(old.get("details") or {}), **peaks.details, "matmul": matmul}
        details.pop("flops_source", None)
        data = {
            "schema_version": CALIBRATION_SCHEMA_VERSION,
            "device": peaks.device,
            "device_key": normalize_device_name(peaks.device),
            "kind": "calibrated",
            "updated_at": _now(),
            "mem_bandwidth_Bps": float(peaks.mem_bandwidth_Bps),
            "bandwidth_source": peaks.details.get("bandwidth_source", peaks.source),
            "flops": flops,
            "flops_source": flops_source,
            "details": details,
        }
        atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
    return path


def load_calibration(device_name: str, dtype: Any = None) -> Peaks | None:
    """Cached calibrated peaks for a device; None if there are none, or none for ``dtype``."""
    data = _read_calibration_file(calibration_path(device_name))
    if data is None:
        return None
    try:
        flops = {canonical_dtype(k): float(v) for k, v in data["flops"].items()}
        bw = float(data["mem_bandwidth_Bps"])
    except (TypeError, ValueError):
        return None
    key = canonical_dtype(dtype) if dtype is not None else None
    if key is not None and key not in flops:
        return None
    sources = data.get("flops_source") or {}
    parts = [str(data.get("bandwidth_source") or "calibrated")]
    parts += [str(sources[d]) for d in ([key] if key else sorted(flops)) if d in sources]
    source = "; ".join(dict.fromkeys(parts))
    if not source.startswith("calibrated"):
        source = "calibrated: " + source
    details = dict(data.get("details") or {})
    details["cache_file"] = str(calibration_path(device_name))
    details["flops_source"] = dict(sources)
    return Peaks(
        device=str(data.get("device") or device_name),
        mem_bandwidth_Bps=bw,
        flops=flops,
        source=source,
        kind="calibrated",
        details=details,
    )


# ---------------------------------------------------------------------------------------- resolve


def peaks_from_user(user: dict[str, Any], device: str, dtype: Any | None = None) -> Peaks:
    """Peaks from a user dict ``{mem_bandwidth_gbs: GB/s, tflops: {dtype: TFLOPS}}``
    (``mem_bandwidth_Bps`` / ``flops`` in base units are accepted too)."""
    if not isinstance(user, dict):
        raise ValueError(f"hardware.peaks must be a mapping, got {type(user).__name__}")
    if "mem_bandwidth_gbs" in user:
        bw = float(user["mem_bandwidth_gbs"]) * 1e9
    elif "mem_bandwidth_Bps" in user:
        bw = float(user["mem_bandwidth_Bps"])
    else:
        raise ValueError(
            "hardware.peaks needs mem_bandwidth_gbs (GB/s), "
            "e.g. {mem_bandwidth_gbs: 3350, tflops: {bf16: 989.4}}"
        )
    if isinstance(user.get("tflops"), dict):
        flops = {canonical_dtype(k): float(v) * 1e12 for k, v in user["tflops"].items()}
    elif isinstance(user.get("flops"), dict):
        flops = {canonical_dtype(k): float(v) for k, v in user["flops"].items()}
    else:
        raise ValueError("hardware.peaks needs tflops: {dtype: TFLOPS}, e.g. {bf16: 989.4}")
    if bw <= 0 or any(v <= 0 for v in flops.values()):
        raise ValueError("hardware.peaks values must be positive")
    peaks = Peaks(device=str(device), mem_bandwidth_Bps=bw, flops=flops, source="user", kind="user",
                  tdp_w=float(user["tdp_w"]) if user.get("tdp_w") is not None else None)
    if dtype is not None:
        peaks.flops_for(dtype)  # raises ValueError naming what was given
    return peaks


def _how_to_proceed(dtype: str) -> str:
    return (
        "To proceed, measure the peaks on this machine with `moecap hardware --calibrate` "
        f"(cached under {cache_dir() / 'hardware'}), or give them in the suite as "
        f"hardware.peaks: {{mem_bandwidth_gbs: <GB/s>, tflops: {{{dtype}: <dense TFLOPS>}}}}."
    )


def resolve_peaks(hw: HardwareInfo, dtype: Any, user: dict[str, Any] | None = None,
                  calibrate_if_missing: bool = False) -> Peaks:
    """The peaks to measure utilisation against (see the module docstring for the order)."""
    key = canonical_dtype(dtype)
    if user:
        return peaks_from_user(user, device=hw.device_name, dtype=key)

    def _calibrate() -> Peaks:
        print(
            f"moecap: measuring the {key} ceilings of {hw.device_name} (memory copy, matmul); "
            f"once, then cached under {calibration_path(hw.device_name).parent}",
            file=sys.stderr,
        )
        fresh = calibrate(hw.torch_device, key)
        try:
            save_calibration(fresh)
        except OSError as exc:
            warnings.warn(f"could not cache the calibration: {exc}", stacklevel=3)
            return fresh
        return load_calibration(fresh.device, key) or fresh

    if hw.accelerator == "cpu":
        cached = load_calibration(hw.device_name, key)
        if cached is not None:
            return cached
        if calibrate_if_missing:
            return _calibrate()
        raise UnknownDeviceError(
            f"No calibrated {key} peaks for CPU {hw.device_name!r}. CPU peaks are always measured on "
            f"the machine (a CPU is never looked up in {PEAKS_TABLE_DISPLAY}). " + _how_to_proceed(key)
        )

    table = lookup_peaks(hw.device_name)
    if table is not None and key in table.flops:
        return table
    cached = load_calibration(hw.device_name, key)
    if cached is not None:
        return cached
    if calibrate_if_missing:
        return _calibrate()
    if table is not None:
        raise ValueError(
            f"{PEAKS_TABLE_DISPLAY} has device {hw.device_name!r} (row {table.details.get('key')!r}) but no "
            f"{key} peak: the chip has no {key} hardware path (it has: {', '.join(table.dtypes())}). "
            + _how_to_proceed(key)
        )
    raise UnknownDeviceError(
        f"Device {hw.device_name!r} (normalised {hw.device_key!r}) is not in {PEAKS_TABLE_DISPLAY}, "
        "so moecap has no datasheet peaks for it. " + _how_to_proceed(key)
    )


# ----------------------------------------------------------------------------------------- format


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "unknown"
    return f"{n / 2**30:.1f} GiB"


def _fmt_flops(v: float) -> str:
    return f"{v / 1e12:,.1f} TFLOPS" if v >= 1e12 else f"{v / 1e9:,.1f} GFLOPS"


def format_hardware(hw: HardwareInfo, peaks: Peaks | None = None) -> str:
    """Human-readable description for `moecap hardware`."""
    w = 14
    lines = []
    where = f"device {hw.device_index} of {hw.device_count}"
    if hw.nvml_index is not None and hw.nvml_index != hw.device_index:
        where += f", NVML index {hw.nvml_index}"
    if hw.visible_devices is not None and hw.accelerator != "cpu":
        where += f", CUDA_VISIBLE_DEVICES={hw.visible_devices}"
    lines.append(f"{'accelerator':<{w}}{hw.accelerator}" + ("" if hw.accelerator == "cpu" else f" ({where})"))
    lines.append(f"{'device':<{w}}{hw.device_name}  [{hw.device_key}]")
    if hw.accelerator != "cpu":
        lines.append(f"{'memory':<{w}}{_fmt_bytes(hw.memory_bytes)}")
        drv = hw.driver_version or "unknown"
        ver = hw.cuda_version or "unknown"
        lines.append(f"{'driver':<{w}}{drv} ({'HIP' if hw.accelerator == 'rocm' else 'CUDA'} {ver})")
    cores = f"{hw.cpu_cores_physical or '?'} physical / {hw.cpu_cores_logical or '?'} logical cores"
    lines.append(f"{'cpu':<{w}}{hw.cpu_model} ({cores})")
    lines.append(f"{'host memory':<{w}}{_fmt_bytes(hw.host_memory_bytes)}")
    if peaks is None:
        if hw.accelerator == "cpu":
            why = "CPU peaks are measured, not looked up"
        elif lookup_row(hw.device_name) is None:
            why = f"not in {PEAKS_TABLE_DISPLAY}"
        else:
            why = "not resolved"
        lines.append(f"{'peaks':<{w}}none ({why}); run `moecap hardware --calibrate` or set hardware.peaks")
        return "\n".join(lines)
    lines.append(f"{'peaks':<{w}}{peaks.kind}")
    lines.append(f"{'  source':<{w}}{peaks.source}")
    lines.append(f"{'  bandwidth':<{w}}{peaks.mem_bandwidth_gbs:,.1f} GB/s")
    for d in peaks.dtypes():
        lines.append(f"{'  ' + d:<{w}}{_fmt_flops(peaks.flops[d])}")
    if peaks.tdp_w:
        lines.append(f"{'  tdp':<{w}}{peaks.tdp_w:.0f} W")
    if peaks.details.get("threads"):
        lines.append(f"{'  threads':<{w}}{peaks.details['threads']} (torch.get_num_threads at calibration)")
    return "\n".join(lines)
