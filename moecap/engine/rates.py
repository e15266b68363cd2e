"""Measured rates for the engine's cost model, cached beside the hardware peaks.

Where a host-memory expert runs (on the CPU, or copied to the GPU) depends on two rates that vary
several-fold between machines, so they are measured on the machine on first use instead of assumed:

- **host expert kernels**: bytes/s the CPU streams through an expert's weights with the kernel each
  precision runs with (:mod:`moecap.engine.kernels`) at one token (memory-bound), and FLOP/s at many
  tokens (compute-bound); measured on synthetic expert matrices that together exceed the last-level cache;
- **the link**: host-to-device copy bandwidth from pinned memory (only where there is a CUDA device).

Cache: ``$MOECAP_CACHE_DIR/hardware/<cpu>.engine.json`` (host rates keyed by precision, dtype, threads and
torch version) with one entry per GPU for the link. ``measured_cost_model`` returns a
:class:`~moecap.engine.store.CostModel` built from them, whose ``source`` says what was measured when.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from moecap.engine.store import CostModel
from moecap.hardware import _now

SCHEMA = 1
_HOST_SHAPE = (2816, 1024)  # an expert-sized matrix (rows, cols)


def rates_path() -> Path:
    from moecap.hardware import _cpu_model, normalize_device_name
    from moecap.paths import cache_dir

    return cache_dir() / "hardware" / f"{normalize_device_name(_cpu_model())}.engine.json"


def _read() -> dict[str, Any]:
    try:
        data = json.loads(rates_path().read_text())
        return data if isinstance(data, dict) and data.get("schema_version") == SCHEMA else {}
    except (OSError, ValueError):
        return {}


def _store(section: str, key: str, entry: dict[str, Any]) -> None:
    """Add one measurement to the cache file, under the lock the hardware calibrations use (concurrent runs
    on one machine read, merge and write it one at a time)."""
    from moecap.hardware import _locked
    from moecap.paths import atomic_write_text

    path = rates_path()
    with _locked(path):
        data = _read()
        data[section] = {**(data.get(section) or {}), key: entry}
        atomic_write_text(path, json.dumps({**data, "schema_version": SCHEMA}, indent=2, sort_keys=True) + "\n")


def _host_key(precision: str, dtype: torch.dtype, movable: bool) -> str:
    d = str(dtype).removeprefix("torch.")
    layout = ":movable" if movable else ""
    return f"{precision}:{d}{layout}:threads={torch.get_num_threads()}:torch={torch.__version__}"


@torch.inference_mode()
def measure_host_kernel(precision: str, dtype: torch.dtype, budget_s: float = 1.5, movable: bool = False) -> dict[str, Any]:
    """Bytes/s (one token) and FLOP/s (64 tokens) of the CPU kernel ``precision`` runs with. ``movable``:
    in the layout host experts keep beside a GPU (copied on demand; see ``make_linear``), which the host
    computes with other kernels than resident CPU experts."""
    from moecap.engine.kernels import compute_dtype, make_linear
    from moecap.engine.store import quantize_weight

    from moecap.hardware import _l3_cache_bytes

    cpu = torch.device("cpu")
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(_HOST_SHAPE, generator=g) * 0.02).to(dtype)
    first = make_linear(w if precision == "full" else quantize_weight(w, precision, 64), cpu,
                        act_dtype=compute_dtype(cpu), movable=movable)
    per = first.nbytes()
    want = max(4 * (_l3_cache_bytes() or 32 << 20), 64 << 20)
    count = max(2, min(64, want // per)) if first.kernel != "dequant" else 4
    lins = [first] + [make_linear((torch.randn(_HOST_SHAPE, generator=g) * 0.02).to(dtype) if precision == "full"
                                  else quantize_weight((torch.randn(_HOST_SHAPE, generator=g) * 0.02).to(dtype),
                                                       precision, 64), cpu, act_dtype=compute_dtype(cpu),
                                  movable=movable)
                      for _ in range(count - 1)]
    x1 = torch.randn(1, _HOST_SHAPE[1], generator=g).to(first.act_dtype)
    x64 = torch.randn(64, _HOST_SHAPE[1], generator=g).to(first.act_dtype)
    for lin in lins[:2]:
        lin(x1)
    times = []
    start = time.perf_counter()
    while len(times) < 5 and (time.perf_counter() - start < budget_s or len(times) < 2):
        t0 = time.perf_counter()
        for lin in lins:
            lin(x1)
        times.append((time.perf_counter() - t0) / len(lins))
    lins[0](x64)
    t64 = []
    for _ in range(3):
        t0 = time.perf_counter()
        lins[0](x64)
        t64.append(time.perf_counter() - t0)
    flops = 2.0 * 64 * _HOST_SHAPE[0] * _HOST_SHAPE[1]
    return {"Bps": per / min(times), "median_Bps": per / statistics.median(times), "flops": flops / min(t64),
            "kernel": first.kernel, "act_dtype": str(first.act_dtype).removeprefix("torch."), "matrices": len(lins),
            "bytes_each": per, "date": _now()}


def measure_link(device: torch.device, nbytes: int = 256 << 20) -> dict[str, Any]:
    """Pinned host-to-device copy bandwidth, best of five after one warm-up."""
    src = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize(device)
    times = []
    for _ in range(5):
        t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0.record()
        dst.copy_(src, non_blocking=True)
        t1.record()
        t1.synchronize()
        times.append(t0.elapsed_time(t1) / 1e3)
    return {"Bps": nbytes / min(times), "median_Bps": nbytes / statistics.median(times), "bytes": nbytes,
            "device": torch.cuda.get_device_name(device), "date": _now()}


def host_rates(dtype: torch.dtype, precisions: tuple[str, ...] = ("full", "int8", "int4", "int3", "int2"),
               refresh: bool = False, movable: bool = False) -> dict[str, dict[str, Any]]:
    """Per precision, the measured host-kernel rates (cached; ``refresh`` measures again)."""
    host = _read().get("host") or {}
    out = {}
    for p in precisions:
        key = _host_key(p, dtype, movable)
        if refresh or key not in host:
            _store("host", key, measure_host_kernel(p, dtype, movable=movable))
            host = _read().get("host") or {}
        out[p] = host[key]
    return out


def link_rate(device: torch.device, refresh: bool = False) -> dict[str, Any] | None:
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    key = torch.cuda.get_device_name(device)
    links = _read().get("link") or {}
    if refresh or key not in links:
        _store("link", key, measure_link(device))
        links = _read().get("link") or {}
    return links[key]


def measured_cost_model(fast: torch.device, dtype: torch.dtype, mode: str = "auto", fast_flops: float | None = None,
                        refresh: bool = False) -> CostModel:
    """The cost model of this machine: host kernels at ``dtype`` (full precision) and every quantized
    width, and the link to ``fast`` when it is a GPU (else the experts never travel)."""
    fast = torch.device(fast)
    # beside a GPU, host experts keep the layouts they are copied in: measure the kernels those run
    rates = host_rates(dtype, refresh=refresh, movable=fast.type == "cuda")
    link = link_rate(fast, refresh=refresh)
    parts = [f"host kernels measured {rates['full']['date']} ({torch.get_num_threads()} threads)"]
    if link is not None:
        parts.append(f"link measured {link['date']} ({link['device']}, pinned copy)")
    else:
        parts.append("no link (one memory: host experts are computed where they lie)")
    cm = CostModel(host_flops=max(r["flops"] for r in rates.values()), mode=mode,
                   host_Bps={p: r["Bps"] for p, r in rates.items()},
                   source="; ".join(parts))
    if link is not None:
        cm.link_Bps = link["Bps"]
    if fast_flops:
        cm.fast_flops = fast_flops
    cm.details = {"host": rates, "link": link, "cache_file": str(rates_path())}
    return cm
