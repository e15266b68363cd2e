"""Cost: dollars per hour, per request and per million output tokens of a serving set-up.

Pure arithmetic on named inputs; nothing here reads files or imports torch. ``moecap.catalog``
fills a :class:`CostInputs` from the price catalog and the detected hardware.

Conventions
-----------
* **Owned hardware** (``model: 'owned'``)::

      capital $/h = sum of component prices / (amortization_hours x utilization)
      energy  $/h = avg_power_w / 1000 x PUE x $/kWh
      run $       = (capital $/h + energy $/h) x run hours
      $ / 1M output tokens = run $ / output tokens x 1e6
      $ / request          = run $ / requests

  Components are the GPUs (price x count), the host CPU (price x count), host DRAM
  (GB x $/GB) and SSD (TB x $/TB). Host CPU and DRAM are always part of the bill: a
  heterogeneous set-up that offloads experts to host memory pays for that memory and that CPU.
* **Utilisation** is the fraction of the amortisation hours in which the hardware does useful
  work. Capital is paid whether or not the machine is busy, so with utilisation u < 1 the same
  purchase price is spread over only ``amortization_hours x u`` productive hours: capital $/h
  scales as 1/u (u = 0.5 doubles it). Utilisation does not scale energy: energy is what the run
  itself draws while it runs (idle power of the unproductive hours is not modelled).
* **Power** (``power_source``): ``measured`` - the average power measured during the run
  (NVML energy counter; it covers the GPUs only unless the caller added host power);
  ``tdp`` - the sum of the components' TDPs (GPUs and CPU; DRAM and SSD power not included);
  ``tdp*utilization`` - that sum scaled by utilisation. The record says which was used.
* **Cloud** (``model: 'cloud'``), when ``cloud_usd_per_hour`` is set: the rental price of the
  whole set-up for an hour (instance CPU, DRAM, SSD and energy included), times run hours.
* A figure that cannot be computed (no output tokens, no requests) is ``None``, never ``inf``
  or ``nan``, and ``reasons`` says why.
* Units are in the field names: ``usd_per_hour``, ``dram_gb`` (GB = 2**30 bytes as DIMMs are
  sold), ``ssd_tb``, ``avg_power_w``, ``usd_per_kwh``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

__all__ = [
    "HOURS_PER_YEAR",
    "POWER_SOURCES",
    "CostInputs",
    "CpuComponent",
    "GpuComponent",
    "capital_usd",
    "capital_usd_per_hour",
    "cost_report",
    "energy_usd_per_hour",
]

HOURS_PER_YEAR = 8760.0  # 365 days; amortization_hours = years x HOURS_PER_YEAR
POWER_SOURCES: tuple[str, ...] = ("measured", "tdp", "tdp*utilization")


def _num(value: Any, name: str, *, minimum: float = 0.0, strict: bool = False) -> float:
    """``value`` as a finite float >= minimum (> minimum when strict); ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"cost input {name} must be a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"cost input {name} must be finite, got {value!r}")
    if v < minimum or (strict and v == minimum):
        op = ">" if strict else ">="
        raise ValueError(f"cost input {name} must be {op} {minimum:g}, got {value!r}")
    return v


def _count(value: Any, name: str) -> int:
    integral = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not integral:
        raise ValueError(f"cost input {name} must be a whole number, got {value!r}")
    if int(value) < 0:
        raise ValueError(f"cost input {name} must be >= 0, got {value!r}")
    return int(value)


@dataclass
class GpuComponent:
    """``count`` accelerators of one kind (``key`` = catalog / peaks.yaml key), each ``price_usd``."""

    key: str
    count: int
    price_usd: float

    def __post_init__(self) -> None:
        self.key = str(self.key)
        self.count = _count(self.count, f"gpus[{self.key}].count")
        self.price_usd = _num(self.price_usd, f"gpus[{self.key}].price_usd")

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "count": self.count, "price_usd": self.price_usd}


@dataclass
class CpuComponent:
    """``count`` host CPUs (sockets) named ``name``, each ``price_usd`` with ``tdp_w``."""

    name: str
    count: int
    price_usd: float
    tdp_w: float | None = None

    def __post_init__(self) -> None:
        self.name = str(self.name)
        self.count = _count(self.count, "cpu.count")
        self.price_usd = _num(self.price_usd, "cpu.price_usd")
        if self.tdp_w is not None:
            self.tdp_w = _num(self.tdp_w, "cpu.tdp_w")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "count": self.count, "price_usd": self.price_usd, "tdp_w": self.tdp_w}


def _gpu(item: GpuComponent | Mapping[str, Any]) -> GpuComponent:
    if isinstance(item, GpuComponent):
        return item
    if not isinstance(item, Mapping):
        raise ValueError(f"cost input gpus entries must be {{key, count, price_usd}}, got {item!r}")
    extra = set(item) - {"key", "count", "price_usd"}
    missing = {"key", "count", "price_usd"} - set(item)
    if extra or missing:
        raise ValueError(
            f"cost input gpus entry {dict(item)!r}: needs key, count, price_usd"
            + (f"; unknown {sorted(extra)}" if extra else "")
        )
    return GpuComponent(item["key"], item["count"], item["price_usd"])


def _cpu(item: CpuComponent | Mapping[str, Any]) -> CpuComponent:
    if isinstance(item, CpuComponent):
        return item
    if not isinstance(item, Mapping):
        raise ValueError(f"cost input cpu must be {{name, count, price_usd, tdp_w}}, got {item!r}")
    extra = set(item) - {"name", "count", "price_usd", "tdp_w"}
    missing = {"name", "count", "price_usd"} - set(item)
    if extra or missing:
        raise ValueError(
            f"cost input cpu {dict(item)!r}: needs name, count, price_usd (tdp_w optional)"
            + (f"; unknown {sorted(extra)}" if extra else "")
        )
    return CpuComponent(item["name"], item["count"], item["price_usd"], item.get("tdp_w"))


@dataclass
class CostInputs:
    """Every price, lifetime, tariff and power figure a cost report uses, by name.

    ``sources`` maps an input's name to where its value came from (catalog row and its source,
    a suite override, a default); it is carried into the record unchanged.
    """

    gpus: list[GpuComponent]
    cpu: CpuComponent
    dram_gb: float
    dram_usd_per_gb: float
    ssd_tb: float
    ssd_usd_per_tb: float
    amortization_hours: float
    utilization: float
    pue: float
    usd_per_kwh: float
    power_source: str
    avg_power_w: float
    cloud_usd_per_hour: float | None = None
    sources: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.gpus, (list, tuple)):
            raise ValueError(f"cost input gpus must be a list of {{key, count, price_usd}}, got {self.gpus!r}")
        self.gpus = [_gpu(g) for g in self.gpus]
        self.cpu = _cpu(self.cpu)
        self.dram_gb = _num(self.dram_gb, "dram_gb")
        self.dram_usd_per_gb = _num(self.dram_usd_per_gb, "dram_usd_per_gb")
        self.ssd_tb = _num(self.ssd_tb, "ssd_tb")
        self.ssd_usd_per_tb = _num(self.ssd_usd_per_tb, "ssd_usd_per_tb")
        self.amortization_hours = _num(self.amortization_hours, "amortization_hours", strict=True)
        self.utilization = _num(self.utilization, "utilization", strict=True)
        if self.utilization > 1.0:
            raise ValueError(
                f"cost input utilization is the fraction of hours the hardware is busy, in (0, 1]; "
                f"got {self.utilization!r}"
            )
        self.pue = _num(self.pue, "pue", minimum=1.0)
        self.usd_per_kwh = _num(self.usd_per_kwh, "usd_per_kwh")
        if self.power_source not in POWER_SOURCES:
            raise ValueError(
                f"cost input power_source must be one of {', '.join(POWER_SOURCES)}; got {self.power_source!r}"
            )
        self.avg_power_w = _num(self.avg_power_w, "avg_power_w")
        if self.cloud_usd_per_hour is not None:
            self.cloud_usd_per_hour = _num(self.cloud_usd_per_hour, "cloud_usd_per_hour")
        self.sources = {str(k): str(v) for k, v in dict(self.sources or {}).items()}

    # ------------------------------------------------------------------------------ capital

    def components_usd(self) -> dict[str, float]:
        """Purchase price of each component group: gpus, cpu, dram, ssd."""
        return {
            "gpus": sum(g.price_usd * g.count for g in self.gpus),
            "cpu": self.cpu.price_usd * self.cpu.count,
            "dram": self.dram_gb * self.dram_usd_per_gb,
            "ssd": self.ssd_tb * self.ssd_usd_per_tb,
        }

    # ------------------------------------------------------------------------------ (de)serialise

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of every input (the record keeps the inputs used)."""
        return {
            "gpus": [g.to_dict() for g in self.gpus],
            "cpu": self.cpu.to_dict(),
            "dram_gb": self.dram_gb,
            "dram_usd_per_gb": self.dram_usd_per_gb,
            "ssd_tb": self.ssd_tb,
            "ssd_usd_per_tb": self.ssd_usd_per_tb,
            "amortization_hours": self.amortization_hours,
            "utilization": self.utilization,
            "pue": self.pue,
            "usd_per_kwh": self.usd_per_kwh,
            "power_source": self.power_source,
            "avg_power_w": self.avg_power_w,
            "cloud_usd_per_hour": self.cloud_usd_per_hour,
            "sources": dict(self.sources),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CostInputs":
        """Inverse of :meth:`to_dict`; unknown keys are an error (they are usually typos)."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown cost input(s) {unknown}; known: {', '.join(sorted(names))}")
        optional = {"cloud_usd_per_hour", "sources"}
        missing = sorted(names - optional - set(d))
        if missing:
            raise ValueError(f"cost inputs lack {missing}")
        return cls(**{k: d[k] for k in d})


# ---------------------------------------------------------------------------------- functions


def capital_usd(inputs: CostInputs) -> float:
    """Total purchase price of the set-up: GPUs + CPU + DRAM + SSD."""
    return sum(inputs.components_usd().values())


def capital_usd_per_hour(inputs: CostInputs) -> float:
    """Σ component prices / (amortization_hours × utilization).

    Utilisation < 1 spreads the capital over fewer productive hours, so $/h grows as 1/utilisation.
    """
    return capital_usd(inputs) / (inputs.amortization_hours * inputs.utilization)


def energy_usd_per_hour(avg_power_w: float, pue: float, usd_per_kwh: float) -> float:
    """W / 1000 × PUE × $/kWh: the facility energy bill for an hour at ``avg_power_w`` of IT load."""
    w = _num(avg_power_w, "avg_power_w")
    p = _num(pue, "pue", minimum=1.0)
    t = _num(usd_per_kwh, "usd_per_kwh")
    return w / 1000.0 * p * t


def _per(total: float, count: Any, name: str, unit: float, reasons: dict[str, str], what: str) -> float | None:
    n = _num(count, name)
    if n == 0:
        reasons[what] = f"no {name.replace('_', ' ')}: the run produced none, so there is nothing to divide by"
        return None
    return total / n * unit


def cost_report(
    inputs: CostInputs, run_seconds: float, output_tokens: float, requests: float
) -> dict[str, Any]:
    """Owned-hardware cost of a run, and the cloud variant when ``inputs.cloud_usd_per_hour`` is set.

    $ per 1M output tokens = (capital $/h + energy $/h) × run hours / output tokens × 1e6.
    Figures that cannot be computed are None, and ``reasons`` names each with the cause.
    """
    secs = _num(run_seconds, "run_seconds")
    hours = secs / 3600.0
    capital_h = capital_usd_per_hour(inputs)
    energy_h = energy_usd_per_hour(inputs.avg_power_w, inputs.pue, inputs.usd_per_kwh)
    total_h = capital_h + energy_h
    run_usd = total_h * hours
    reasons: dict[str, str] = {}
    report: dict[str, Any] = {
        "model": "owned",
        "usd_per_hour": {"capital": capital_h, "energy": energy_h, "total": total_h},
        "capital_usd": capital_usd(inputs),
        "components_usd": inputs.components_usd(),
        "run_seconds": secs,
        "run_hours": hours,
        "output_tokens": _num(output_tokens, "output_tokens"),
        "requests": _num(requests, "requests"),
        "run_usd": run_usd,
        "usd_per_1m_output_tokens": _per(
            run_usd, output_tokens, "output_tokens", 1e6, reasons, "usd_per_1m_output_tokens"
        ),
        "usd_per_request": _per(run_usd, requests, "requests", 1.0, reasons, "usd_per_request"),
        "power_source": inputs.power_source,
        "avg_power_w": inputs.avg_power_w,
    }
    if inputs.cloud_usd_per_hour is not None:
        cloud_run = inputs.cloud_usd_per_hour * hours
        report["cloud"] = {
            "model": "cloud",
            "usd_per_hour": inputs.cloud_usd_per_hour,
            "run_usd": cloud_run,
            "usd_per_1m_output_tokens": _per(
                cloud_run, output_tokens, "output_tokens", 1e6, reasons, "cloud_usd_per_1m_output_tokens"
            ),
            "usd_per_request": _per(cloud_run, requests, "requests", 1.0, reasons, "cloud_usd_per_request"),
        }
        report["cloud_usd_per_1m_output_tokens"] = report["cloud"]["usd_per_1m_output_tokens"]
    report["reasons"] = reasons
    report["inputs"] = inputs.to_dict()
    return report
