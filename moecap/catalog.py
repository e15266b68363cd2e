"""The hardware price catalog and the cost inputs of a run.

``moecap/data/catalog.yaml`` holds GPU and CPU prices and TDPs, DRAM $/GB, SSD $/TB and the
default amortisation, utilisation, PUE, tariff and cloud rates, each with its source. Users extend
or correct it without editing it:

* ``load_catalog(path)`` merges a user catalog file (same layout) over the shipped one;
* ``load_catalog(override=...)`` merges a dict, e.g. a suite's ``cost.catalog``;
* ``build_cost_inputs(..., overrides=...)`` takes every cost input by name (the suite's ``cost:``
  section: ``gpu_price_usd``, ``dram_usd_per_gb``, ``pue``, ...), which wins over the catalog.

Merging: ``gpus`` and ``cpus`` rows merge by ``key`` (the given fields replace the row's, a new key
adds a row); ``dram``, ``ssd`` and ``defaults`` merge field by field (nested mappings too).

GPU rows are keyed like ``moecap/data/peaks.yaml``: ``gpu_row`` matches a device name as NVML /
torch reports it (or an already normalised key) exactly as ``moecap.hardware.lookup_row`` does,
so a detected device always finds the price row of the peaks row it was matched to.

Pure Python: no torch here.
"""

from __future__ import annotations

import copy
import functools
import re
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

from moecap.hardware import lookup_row as lookup_peaks_row
from moecap.hardware import normalize_device_name
from moecap.metrics.cost import HOURS_PER_YEAR, POWER_SOURCES, CostInputs

__all__ = [
    "CATALOG_DISPLAY",
    "GENERIC_CPU_KEY",
    "OVERRIDE_KEYS",
    "CatalogError",
    "build_cost_inputs",
    "builtin_catalog",
    "cpu_row",
    "gpu_row",
    "load_catalog",
    "merge_catalog",
]

CATALOG_DISPLAY = "moecap/data/catalog.yaml"
GENERIC_CPU_KEY = "generic-server-cpu"
_SECTIONS = ("schema_version", "gpus", "cpus", "dram", "ssd", "defaults")

# Inputs a suite's `cost:` section may set, by name.
OVERRIDE_KEYS: dict[str, str] = {
    "gpu_key": "device name or catalog key of the GPU (default: the detected device)",
    "gpu_count": "number of GPUs the run used (default 1)",
    "gpu_price_usd": "price of one GPU",
    "gpu_tdp_w": "TDP of one GPU, W",
    "gpus": "list of {key, count, price_usd?, tdp_w?} for several GPU kinds (replaces gpu_*)",
    "cpu_name": "CPU model string to price (default: the detected CPU)",
    "cpu_count": "number of CPU sockets (default 1)",
    "cpu_price_usd": "price of one CPU",
    "cpu_tdp_w": "TDP of one CPU, W",
    "dram_gb": "host memory, GB (default: detected host memory)",
    "dram_usd_per_gb": "DRAM price, $/GB",
    "ssd_tb": "SSD capacity, TB",
    "ssd_usd_per_tb": "SSD price, $/TB",
    "amortization_years": "hardware lifetime, years (x 8760 h)",
    "amortization_hours": "hardware lifetime, hours",
    "utilization": "fraction of hours the hardware is busy, (0, 1]",
    "pue": "power usage effectiveness, >= 1",
    "usd_per_kwh": "electricity tariff, $/kWh",
    "avg_power_w": "average power of the run, W (replaces measured / TDP power)",
    "power_source": f"one of {', '.join(POWER_SOURCES)}",
    "cloud_usd_per_hour": "cloud rental price of the whole set-up, $/h",
    "cloud_usd_per_gpu_hour": "cloud rental price of one GPU, $/h (x GPU count)",
    "catalog": "catalog fragment merged over the catalog (same layout as catalog.yaml)",
    "catalog_file": "path of a catalog override file merged over the shipped catalog",
}


class CatalogError(ValueError):
    """A catalog that cannot be read, or cost inputs that cannot be filled; says what to set."""


# ------------------------------------------------------------------------------------- loading


@functools.lru_cache(maxsize=1)
def _builtin_text() -> str:
    return resources.files("moecap").joinpath("data", "catalog.yaml").read_text(encoding="utf-8")


def _parse(text: str, origin: str) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise CatalogError(f"{origin}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CatalogError(f"{origin}: a catalog is a mapping with keys {', '.join(_SECTIONS)}")
    return data


@functools.lru_cache(maxsize=1)
def _builtin() -> dict[str, Any]:
    data = _parse(_builtin_text(), CATALOG_DISPLAY)
    _validate(data, CATALOG_DISPLAY)
    return data


def builtin_catalog() -> dict[str, Any]:
    """The shipped catalog (a deep copy)."""
    return copy.deepcopy(_builtin())


def _deep_merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _merge_rows(base: list[dict[str, Any]], over: Any, section: str, origin: str) -> list[dict[str, Any]]:
    if not isinstance(over, list):
        raise CatalogError(f"{origin}: `{section}` must be a list of rows with a `key`")
    rows = [dict(r) for r in base]
    where = {r.get("key"): i for i, r in enumerate(rows)}
    for j, row in enumerate(over):
        if not isinstance(row, Mapping) or "key" not in row:
            raise CatalogError(f"{origin}: {section}[{j}] must be a mapping with a `key`")
        key = row["key"]
        if key in where:
            rows[where[key]] = {**rows[where[key]], **copy.deepcopy(dict(row))}
        else:
            where[key] = len(rows)
            rows.append(copy.deepcopy(dict(row)))
    return rows


def merge_catalog(base: Mapping[str, Any], override: Mapping[str, Any], origin: str = "override") -> dict[str, Any]:
    """``override`` merged over ``base`` (rows by key, mappings field by field); validated."""
    if not isinstance(override, Mapping):
        raise CatalogError(f"{origin}: a catalog override is a mapping with keys {', '.join(_SECTIONS)}")
    unknown = sorted(set(override) - set(_SECTIONS))
    if unknown:
        raise CatalogError(f"{origin}: unknown catalog section(s) {unknown}; allowed: {', '.join(_SECTIONS)}")
    out = copy.deepcopy(dict(base))
    for section, value in override.items():
        if section in ("gpus", "cpus"):
            out[section] = _merge_rows(out.get(section, []), value, section, origin)
        elif section in ("dram", "ssd", "defaults"):
            if not isinstance(value, Mapping):
                raise CatalogError(f"{origin}: `{section}` must be a mapping")
            out[section] = _deep_merge(out.get(section, {}), value)
        else:
            out[section] = copy.deepcopy(value)
    _validate(out, origin)
    return out


def _read_file(path: str | Path) -> dict[str, Any]:
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise CatalogError(f"catalog override file {str(p)!r} cannot be read: {e.strerror or e}") from None
    return _parse(text, str(p))


def load_catalog(path: str | Path | None = None, override: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The shipped catalog, with the catalog file at ``path`` and then ``override`` merged over it."""
    cat = builtin_catalog()
    if path is not None:
        cat = merge_catalog(cat, _read_file(path), str(path))
    if override:
        cat = merge_catalog(cat, override, "cost.catalog")
    return cat


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _validate(cat: Mapping[str, Any], origin: str) -> None:
    unknown = sorted(set(cat) - set(_SECTIONS))
    if unknown:
        raise CatalogError(f"{origin}: unknown catalog section(s) {unknown}; allowed: {', '.join(_SECTIONS)}")
    for section in ("gpus", "cpus"):
        rows = cat.get(section, [])
        if not isinstance(rows, list):
            raise CatalogError(f"{origin}: `{section}` must be a list")
        seen: set[str] = set()
        for i, row in enumerate(rows):
            if not isinstance(row, Mapping) or not isinstance(row.get("key"), str):
                raise CatalogError(f"{origin}: {section}[{i}] needs a string `key`")
            key = row["key"]
            if key in seen:
                raise CatalogError(f"{origin}: {section} key {key!r} appears twice")
            seen.add(key)
            for num in ("list_price_usd", "tdp_w", "cores"):
                if row.get(num) is not None and not _is_num(row[num]):
                    raise CatalogError(f"{origin}: {section}[{key}].{num} must be a number or null")
            if section == "gpus":
                if normalize_device_name(key) != key:
                    raise CatalogError(
                        f"{origin}: gpus key {key!r} is not a normalised device name; "
                        f"use {normalize_device_name(key)!r} (moecap.hardware.normalize_device_name)"
                    )
                names = row.get("names", [])
                if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                    raise CatalogError(f"{origin}: gpus[{key}].names must be a list of device names")
            else:
                match = row.get("match", [])
                if not isinstance(match, list) or not all(isinstance(m, str) and m.strip() for m in match):
                    raise CatalogError(f"{origin}: cpus[{key}].match must be a list of non-empty strings")
    for section, field_ in (("dram", "usd_per_gb"), ("ssd", "usd_per_tb")):
        sec = cat.get(section, {})
        if not isinstance(sec, Mapping):
            raise CatalogError(f"{origin}: `{section}` must be a mapping")
        if sec.get(field_) is not None and not _is_num(sec[field_]):
            raise CatalogError(f"{origin}: {section}.{field_} must be a number")
    defaults = cat.get("defaults", {})
    if not isinstance(defaults, Mapping):
        raise CatalogError(f"{origin}: `defaults` must be a mapping")
    for name in ("amortization_years", "utilization", "pue", "usd_per_kwh", "ssd_tb"):
        if defaults.get(name) is not None and not _is_num(defaults[name]):
            raise CatalogError(f"{origin}: defaults.{name} must be a number")
    cloud = defaults.get("cloud_usd_per_gpu_hour", {})
    if not isinstance(cloud, Mapping):
        raise CatalogError(f"{origin}: defaults.cloud_usd_per_gpu_hour must map GPU keys to rates")
    for key, v in cloud.items():
        rate = v.get("usd_per_hour") if isinstance(v, Mapping) else v
        if not _is_num(rate):
            raise CatalogError(
                f"{origin}: defaults.cloud_usd_per_gpu_hour[{key}] must be a number or {{usd_per_hour, source}}"
            )


# ------------------------------------------------------------------------------------- lookups


def _catalog(catalog: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return _builtin() if catalog is None else catalog


def gpu_row(device_name_or_key: str, catalog: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """The catalog GPU row for a device name (as NVML / torch report it) or a catalog key.

    Matching is exact on normalised names, as in ``moecap.hardware.lookup_row``: the row's key or
    one of its own ``names``, else the key of the peaks.yaml row the name matches. None if none.
    """
    cat = _catalog(catalog)
    rows = cat.get("gpus", [])
    slug = normalize_device_name(device_name_or_key)
    for row in rows:
        aliases = [row["key"], *row.get("names", [])]
        if slug in {normalize_device_name(a) for a in aliases}:
            return copy.deepcopy(dict(row))
    peaks = lookup_peaks_row(device_name_or_key)
    if peaks is not None:
        for row in rows:
            if row["key"] == peaks["key"]:
                return copy.deepcopy(dict(row))
    return None


def _cpu_text(s: str) -> str:
    s = str(s).lower()
    for mark in ("(r)", "(tm)", "(c)", "®", "™"):
        s = s.replace(mark, " ")
    return " ".join(s.split())


def cpu_row(cpu_model: str, catalog: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The catalog CPU row whose ``match`` occurs in ``cpu_model``; else the generic row.

    A match is a case-insensitive substring that starts and ends on a word boundary (so
    "EPYC 9654" matches "AMD EPYC 9654 96-Core Processor" but not "AMD EPYC 96540"), with (R)/(TM)
    marks ignored. The longest match wins. The returned row has ``matched`` (the substring that
    matched, or None for the generic row).
    """
    cat = _catalog(catalog)
    text = _cpu_text(cpu_model)
    best: tuple[int, Mapping[str, Any], str] | None = None
    generic: Mapping[str, Any] | None = None
    for row in cat.get("cpus", []):
        if row["key"] == GENERIC_CPU_KEY:
            generic = row
        for m in row.get("match", []):
            pat = _cpu_text(m)
            if re.search(r"(?<![a-z0-9])" + re.escape(pat) + r"(?![a-z0-9])", text):
                if best is None or len(pat) > best[0]:
                    best = (len(pat), row, m)
    if best is not None:
        return {**copy.deepcopy(dict(best[1])), "matched": best[2]}
    if generic is None:
        raise CatalogError(
            f"no catalog CPU row matches {cpu_model!r} and the catalog has no {GENERIC_CPU_KEY!r} row; "
            "set cost.cpu_price_usd and cost.cpu_tdp_w"
        )
    return {**copy.deepcopy(dict(generic)), "matched": None}


def _source_text(src: Any) -> str:
    if isinstance(src, Mapping):
        parts = [str(src.get("title", "")).strip()]
        if src.get("url"):
            parts.append(f"<{src['url']}>")
        if src.get("date") not in (None, ""):
            parts.append(f"({src['date']})")
        return " ".join(p for p in parts if p)
    return "" if src is None else str(src)


# ----------------------------------------------------------------------------- cost inputs


def _origin(path: Any, fragment: Any) -> str:
    out = CATALOG_DISPLAY
    if path is not None:
        out += f" + {path}"
    if fragment:
        out += " + suite cost.catalog"
    return out


def build_cost_inputs(
    hw: Mapping[str, Any],
    overrides: Mapping[str, Any] | None = None,
    avg_power_w: float | None = None,
    power_source: str = "tdp",
    catalog: Mapping[str, Any] | None = None,
) -> CostInputs:
    """Cost inputs for the detected hardware ``hw`` (``HardwareInfo.to_dict()``), prices from the catalog.

    Defaults: one GPU of the detected kind (none on a CPU-only machine), one CPU socket priced by
    its model string, DRAM = detected host memory (GB = 2**30 bytes), SSD = ``defaults.ssd_tb``.
    ``overrides`` (a suite's ``cost:`` section) sets any input by name, see ``OVERRIDE_KEYS``;
    ``catalog`` / ``catalog_file`` in it are merged over the catalog first.
    ``power_source``: ``measured`` uses ``avg_power_w``; ``tdp`` sums the GPU and CPU TDPs;
    ``tdp*utilization`` scales that sum by utilisation. ``overrides['avg_power_w']`` wins over all.
    """
    ov = dict(overrides or {})
    unknown = sorted(set(ov) - set(OVERRIDE_KEYS))
    if unknown:
        raise CatalogError(
            f"unknown cost setting(s) {unknown}; allowed: {', '.join(sorted(OVERRIDE_KEYS))}"
        )
    path, fragment = ov.pop("catalog_file", None), ov.pop("catalog", None)
    if catalog is None:
        cat: Mapping[str, Any] = load_catalog(path, fragment)
        origin = _origin(path, fragment)
    else:
        cat = catalog
        origin = "catalog (given)"
        if path is not None:
            cat = merge_catalog(cat, _read_file(path), str(path))
            origin += f" + {path}"
        if fragment:
            cat = merge_catalog(cat, fragment, "cost.catalog")
            origin += " + suite cost.catalog"
    defaults: Mapping[str, Any] = cat.get("defaults", {})
    default_src: Mapping[str, Any] = defaults.get("sources", {}) or {}
    sources: dict[str, str] = {}

    def from_default(name: str, what: str) -> Any:
        if name in ov:
            sources[name] = f"override cost.{name}"
            return ov[name]
        value = defaults.get(name)
        if value is None:
            raise CatalogError(f"no {what}: {origin} has no defaults.{name}; set cost.{name}")
        src = _source_text(default_src.get(name))
        sources[name] = f"catalog {origin} defaults.{name}" + (f": {src}" if src else "")
        return value

    # ------------------------------------------------------------------ GPUs
    accel = str(hw.get("accelerator") or "")
    device = str(hw.get("device_name") or hw.get("device_key") or "")
    if "gpus" in ov:
        if any(k in ov for k in ("gpu_key", "gpu_count", "gpu_price_usd", "gpu_tdp_w")):
            raise CatalogError("set either cost.gpus or cost.gpu_key/gpu_count/gpu_price_usd/gpu_tdp_w, not both")
        entries = ov["gpus"]
        if not isinstance(entries, list) or not all(isinstance(e, Mapping) and "key" in e for e in entries):
            raise CatalogError("cost.gpus must be a list of {key, count, price_usd?, tdp_w?}")
        wanted = [
            {"device": str(e["key"]), "count": e.get("count", 1), "price": e.get("price_usd"),
             "tdp": e.get("tdp_w"), "via": "cost.gpus"}
            for e in entries
        ]
    elif accel == "cpu" and "gpu_key" not in ov:
        wanted = []
    else:
        name = str(ov.get("gpu_key") or device)
        if not name:
            raise CatalogError("the hardware record names no device; set cost.gpu_key")
        wanted = [{"device": name, "count": ov.get("gpu_count", 1), "price": ov.get("gpu_price_usd"),
                   "tdp": ov.get("gpu_tdp_w"), "via": "cost.gpu"}]
    gpus: list[dict[str, Any]] = []
    gpu_tdps: list[tuple[float | None, Any]] = []
    for w in wanted:
        row = gpu_row(w["device"], cat)
        key = row["key"] if row is not None else normalize_device_name(w["device"])
        label = f"gpus[{key}]"
        price = w["price"]
        if price is not None:
            sources[f"{label}.price_usd"] = f"override {w['via']}" + ("_price_usd" if w["via"] == "cost.gpu" else "")
        else:
            price = row.get("list_price_usd") if row is not None else None
            if price is None:
                raise CatalogError(
                    f"no price for GPU {key!r} (device {w['device']!r}): {origin} has no `gpus` row "
                    f"with list_price_usd for it. Set cost.gpu_price_usd in the suite, or add "
                    f"{{key: {key}, list_price_usd: ..., tdp_w: ..., source: {{title, url, date}}}} under "
                    f"`gpus:` in a catalog override file (cost.catalog_file) or in cost.catalog."
                )
            src = _source_text(row.get("source"))
            sources[f"{label}.price_usd"] = f"catalog {origin} {label}" + (f": {src}" if src else "")
        tdp = w["tdp"]
        if tdp is None and row is not None:
            tdp = row.get("tdp_w")
        if tdp is None:
            peaks = lookup_peaks_row(w["device"])
            tdp = peaks.get("tdp_w") if peaks else None
        gpus.append({"key": key, "count": w["count"], "price_usd": price})
        gpu_tdps.append((tdp, w["count"]))

    # ------------------------------------------------------------------ CPU
    cpu_model = str(ov.get("cpu_name") or hw.get("cpu_model") or "")
    crow = cpu_row(cpu_model, cat)
    how = f"matched {crow['matched']!r}" if crow["matched"] else f"no row matches {cpu_model!r}"
    if "cpu_price_usd" in ov:
        cpu_price = ov["cpu_price_usd"]
        sources["cpu.price_usd"] = "override cost.cpu_price_usd"
    else:
        cpu_price = crow.get("list_price_usd")
        if cpu_price is None:
            raise CatalogError(f"catalog CPU row {crow['key']!r} has no list_price_usd; set cost.cpu_price_usd")
        src = _source_text(crow.get("source"))
        sources["cpu.price_usd"] = f"catalog {origin} cpus[{crow['key']}] ({how})" + (f": {src}" if src else "")
    cpu_tdp = ov.get("cpu_tdp_w", crow.get("tdp_w"))
    cpu = {"name": cpu_model or str(crow.get("name", crow["key"])), "count": ov.get("cpu_count", 1),
           "price_usd": cpu_price, "tdp_w": cpu_tdp}

    # ------------------------------------------------------------------ memory, storage
    if "dram_gb" in ov:
        dram_gb = ov["dram_gb"]
        sources["dram_gb"] = "override cost.dram_gb"
    else:
        mem = hw.get("host_memory_bytes")
        if not mem:
            raise CatalogError("host memory size is unknown (hardware.host_memory_bytes); set cost.dram_gb")
        dram_gb = float(mem) / 2**30
        sources["dram_gb"] = "detected host memory (GB = 2**30 bytes)"
    if "dram_usd_per_gb" in ov:
        dram_price = ov["dram_usd_per_gb"]
        sources["dram_usd_per_gb"] = "override cost.dram_usd_per_gb"
    else:
        dram_price = (cat.get("dram") or {}).get("usd_per_gb")
        if dram_price is None:
            raise CatalogError(f"{origin} has no dram.usd_per_gb; set cost.dram_usd_per_gb")
        sources["dram_usd_per_gb"] = f"catalog {origin} dram: {_source_text((cat.get('dram') or {}).get('source'))}"
    ssd_tb = from_default("ssd_tb", "SSD size")
    if "ssd_usd_per_tb" in ov:
        ssd_price = ov["ssd_usd_per_tb"]
        sources["ssd_usd_per_tb"] = "override cost.ssd_usd_per_tb"
    else:
        ssd_price = (cat.get("ssd") or {}).get("usd_per_tb")
        if ssd_price is None:
            raise CatalogError(f"{origin} has no ssd.usd_per_tb; set cost.ssd_usd_per_tb")
        sources["ssd_usd_per_tb"] = f"catalog {origin} ssd: {_source_text((cat.get('ssd') or {}).get('source'))}"

    # ------------------------------------------------------------------ lifetime, facility
    if "amortization_hours" in ov and "amortization_years" in ov:
        raise CatalogError("set either cost.amortization_hours or cost.amortization_years, not both")
    if "amortization_hours" in ov:
        amort_h = ov["amortization_hours"]
        sources["amortization_hours"] = "override cost.amortization_hours"
    else:
        years = from_default("amortization_years", "amortisation period")
        if not _is_num(years):
            raise CatalogError(f"cost.amortization_years must be a number, got {years!r}")
        amort_h = float(years) * HOURS_PER_YEAR
        sources["amortization_hours"] = sources.pop("amortization_years") + f" (x {HOURS_PER_YEAR:g} h/year)"
    utilization = from_default("utilization", "utilisation")
    pue = from_default("pue", "PUE")
    usd_per_kwh = from_default("usd_per_kwh", "electricity tariff")

    # ------------------------------------------------------------------ power
    psource = str(ov.get("power_source", power_source))
    if psource not in POWER_SOURCES:
        raise CatalogError(f"cost power_source must be one of {', '.join(POWER_SOURCES)}; got {psource!r}")
    if "power_source" in ov:
        sources["power_source"] = "override cost.power_source"
    if "avg_power_w" in ov:
        power = ov["avg_power_w"]
        sources["avg_power_w"] = "override cost.avg_power_w"
    elif psource == "measured":
        if avg_power_w is None:
            raise CatalogError(
                "power_source 'measured' needs the run's measured average power, and none was measured; "
                "set cost.avg_power_w, or cost.power_source: tdp"
            )
        power = avg_power_w
        sources["avg_power_w"] = "measured during the run"
    else:
        total = 0.0
        for (tdp, count), g in zip(gpu_tdps, gpus):
            if tdp is None:
                raise CatalogError(
                    f"power_source {psource!r} needs the TDP of GPU {g['key']!r}, which neither {origin} "
                    "nor moecap/data/peaks.yaml gives; set cost.gpu_tdp_w (or cost.avg_power_w)"
                )
            total += float(tdp) * float(count)
        if cpu_tdp is None:
            raise CatalogError(
                f"power_source {psource!r} needs the CPU's TDP; set cost.cpu_tdp_w (or cost.avg_power_w)"
            )
        total += float(cpu_tdp) * float(cpu["count"])
        how_p = "sum of GPU and CPU TDPs"
        if psource == "tdp*utilization":
            total *= float(utilization)
            how_p += " x utilization"
        power = total
        sources["avg_power_w"] = how_p

    # ------------------------------------------------------------------ cloud
    cloud: Any = None
    if "cloud_usd_per_hour" in ov:
        cloud = ov["cloud_usd_per_hour"]
        sources["cloud_usd_per_hour"] = "override cost.cloud_usd_per_hour"
    elif gpus:
        rates = (defaults.get("cloud_usd_per_gpu_hour") or {})
        total_rate, parts = 0.0, []
        for g in gpus:
            if "cloud_usd_per_gpu_hour" in ov:
                rate, src = ov["cloud_usd_per_gpu_hour"], "override cost.cloud_usd_per_gpu_hour"
            elif g["key"] in rates:
                entry = rates[g["key"]]
                rate = entry.get("usd_per_hour") if isinstance(entry, Mapping) else entry
                src_t = _source_text(entry.get("source")) if isinstance(entry, Mapping) else ""
                src = f"catalog {origin} defaults.cloud_usd_per_gpu_hour[{g['key']}]" + (f": {src_t}" if src_t else "")
            else:
                total_rate = None  # type: ignore[assignment]
                break
            if not _is_num(rate):
                raise CatalogError(f"cloud rate for GPU {g['key']!r} must be a number, got {rate!r}")
            total_rate += float(rate) * float(g["count"])
            parts.append(f"{g['count']} x {src}")
        if total_rate is not None:
            cloud = total_rate
            sources["cloud_usd_per_hour"] = "; ".join(parts)

    try:
        return CostInputs(
            gpus=gpus,
            cpu=cpu,
            dram_gb=dram_gb,
            dram_usd_per_gb=dram_price,
            ssd_tb=ssd_tb,
            ssd_usd_per_tb=ssd_price,
            amortization_hours=amort_h,
            utilization=utilization,
            pue=pue,
            usd_per_kwh=usd_per_kwh,
            power_source=psource,
            avg_power_w=power,
            cloud_usd_per_hour=cloud,
            sources=sources,
        )
    except ValueError as e:
        raise CatalogError(f"{e} (set it in the suite's cost: section)") from None
