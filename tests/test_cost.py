"""Cost model (metrics/cost.py) and price catalog (moecap/catalog.py): hand-computed cases."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from moecap.catalog import (
    GENERIC_CPU_KEY,
    CatalogError,
    build_cost_inputs,
    builtin_catalog,
    cpu_row,
    gpu_row,
    load_catalog,
)
from moecap.hardware import catalog as peaks_catalog
from moecap.hardware import normalize_device_name
from moecap.metrics.cost import (
    HOURS_PER_YEAR,
    CostInputs,
    capital_usd_per_hour,
    cost_report,
    energy_usd_per_hour,
)

GiB = 2**30


def _inputs(**kw) -> CostInputs:
    """One $30,000 GPU + $10,000 CPU + 512 GB x $4 + 1 TB x $100, 3 years, utilisation 1,
    700 W measured, PUE 1.3, $0.10/kWh."""
    base = dict(
        gpus=[{"key": "h100-sxm5-80gb", "count": 1, "price_usd": 30_000}],
        cpu={"name": "test cpu", "count": 1, "price_usd": 10_000, "tdp_w": 300},
        dram_gb=512,
        dram_usd_per_gb=4.0,
        ssd_tb=1,
        ssd_usd_per_tb=100.0,
        amortization_hours=3 * 8760,
        utilization=1.0,
        pue=1.3,
        usd_per_kwh=0.10,
        power_source="measured",
        avg_power_w=700.0,
    )
    base.update(kw)
    return CostInputs(**base)


def _hw(**kw) -> dict:
    hw = {
        "accelerator": "cuda",
        "device_name": "NVIDIA H100 80GB HBM3",
        "device_count": 8,
        "device_index": 0,
        "cpu_model": "AMD EPYC",
        "host_memory_bytes": 512 * GiB,
    }
    hw.update(kw)
    hw.setdefault("device_key", normalize_device_name(hw["device_name"]))
    return hw


# ------------------------------------------------------------------------------ arithmetic


def test_hand_computed_owned_cost():
    # capital = 30,000 + 10,000 + 512 x 4 (= 2,048) + 1 x 100 = 42,148 $
    # amortisation = 3 years x 8,760 h = 26,280 h, utilisation 1
    # capital $/h = 42,148 / 26,280 = 1.6038051750...
    # energy $/h = 700 W / 1000 x 1.3 x 0.10 $/kWh = 0.091
    # total $/h = 1.6948051750...
    # 1-hour run, 1,000,000 output tokens: $/1M = 1.6948051750 x 1 h / 1e6 x 1e6 = 1.6948051750
    # 1,000 requests: $/request = 1.6948051750 / 1000
    r = cost_report(_inputs(), run_seconds=3600, output_tokens=1_000_000, requests=1000)
    assert r["model"] == "owned"
    assert r["capital_usd"] == pytest.approx(42_148)
    assert r["usd_per_hour"]["capital"] == pytest.approx(1.6038051750, rel=1e-9)
    assert r["usd_per_hour"]["energy"] == pytest.approx(0.091, rel=1e-12)
    assert r["usd_per_hour"]["total"] == pytest.approx(1.6948051750, rel=1e-9)
    assert r["run_usd"] == pytest.approx(1.6948051750, rel=1e-9)
    assert r["usd_per_1m_output_tokens"] == pytest.approx(1.6948051750, rel=1e-9)
    assert r["usd_per_request"] == pytest.approx(0.0016948051750, rel=1e-9)
    assert r["components_usd"] == {"gpus": 30_000, "cpu": 10_000, "dram": 2_048, "ssd": 100}
    assert r["reasons"] == {} and "cloud" not in r
    assert r["inputs"] == _inputs().to_dict()
    json.dumps(r)  # JSON-able


def test_half_hour_run_with_half_the_tokens_costs_the_same_per_token():
    # 0.5 h x 1.6948051750 $/h = 0.8474025875 $; / 500,000 tokens x 1e6 = 1.6948051750 $/1M
    r = cost_report(_inputs(), run_seconds=1800, output_tokens=500_000, requests=10)
    assert r["run_usd"] == pytest.approx(0.8474025875, rel=1e-9)
    assert r["usd_per_1m_output_tokens"] == pytest.approx(1.6948051750, rel=1e-9)


def test_energy_formula():
    assert energy_usd_per_hour(700, 1.3, 0.10) == pytest.approx(0.091)
    assert energy_usd_per_hour(0, 1.5, 0.2) == 0.0
    with pytest.raises(ValueError, match="pue"):
        energy_usd_per_hour(700, 0.9, 0.1)


def test_halving_utilisation_doubles_capital_only():
    full = _inputs()
    half = _inputs(utilization=0.5)
    assert capital_usd_per_hour(half) == pytest.approx(2 * capital_usd_per_hour(full))
    r_full = cost_report(full, 3600, 1e6, 1)
    r_half = cost_report(half, 3600, 1e6, 1)
    assert r_half["usd_per_hour"]["capital"] == pytest.approx(2 * 1.6038051750, rel=1e-9)
    assert r_half["usd_per_hour"]["energy"] == r_full["usd_per_hour"]["energy"]


def test_zero_tokens_and_zero_requests_give_none_with_a_reason():
    r = cost_report(_inputs(cloud_usd_per_hour=2.0), run_seconds=60, output_tokens=0, requests=0)
    assert r["usd_per_1m_output_tokens"] is None
    assert r["usd_per_request"] is None
    assert r["cloud_usd_per_1m_output_tokens"] is None
    assert set(r["reasons"]) >= {"usd_per_1m_output_tokens", "usd_per_request", "cloud_usd_per_1m_output_tokens"}
    assert "output tokens" in r["reasons"]["usd_per_1m_output_tokens"]
    assert r["run_usd"] > 0
    assert "inf" not in json.dumps(r) and "NaN" not in json.dumps(r)


def test_cloud_model():
    # 8 GPUs x $2.99/h = $23.92/h; 30-minute run: $11.96; 2,000,000 tokens: $5.98 per 1M; 100 requests: $0.1196
    r = cost_report(_inputs(cloud_usd_per_hour=8 * 2.99), run_seconds=1800, output_tokens=2_000_000, requests=100)
    assert r["cloud"]["model"] == "cloud"
    assert r["cloud"]["usd_per_hour"] == pytest.approx(23.92)
    assert r["cloud"]["run_usd"] == pytest.approx(11.96)
    assert r["cloud_usd_per_1m_output_tokens"] == pytest.approx(5.98)
    assert r["cloud"]["usd_per_1m_output_tokens"] == pytest.approx(5.98)
    assert r["cloud"]["usd_per_request"] == pytest.approx(0.1196)


def test_inputs_are_validated():
    for bad in (dict(utilization=0), dict(utilization=1.5), dict(pue=0.9), dict(amortization_hours=0),
                dict(power_source="guess"), dict(dram_usd_per_gb=-1), dict(avg_power_w=float("nan"))):
        with pytest.raises(ValueError):
            _inputs(**bad)
    with pytest.raises(ValueError, match="whole number"):
        _inputs(gpus=[{"key": "x", "count": 1.5, "price_usd": 1}])
    with pytest.raises(ValueError):
        cost_report(_inputs(), run_seconds=-1, output_tokens=1, requests=1)


def test_to_dict_from_dict_round_trip():
    ci = _inputs(cloud_usd_per_hour=3.5, sources={"pue": "override cost.pue"})
    d = json.loads(json.dumps(ci.to_dict()))
    back = CostInputs.from_dict(d)
    assert back == ci
    assert back.to_dict() == ci.to_dict()
    with pytest.raises(ValueError, match="unknown cost input"):
        CostInputs.from_dict({**d, "pue_typo": 1.2})
    with pytest.raises(ValueError, match="lack"):
        CostInputs.from_dict({k: v for k, v in d.items() if k != "pue"})


# ------------------------------------------------------------------------------ catalog


def test_every_peaks_gpu_has_a_catalog_row_with_price_tdp_and_source():
    cat = builtin_catalog()
    rows = {r["key"]: r for r in cat["gpus"]}
    peaks = {r["key"]: r for r in peaks_catalog()}
    assert set(peaks) <= set(rows), f"GPUs without a price row: {sorted(set(peaks) - set(rows))}"
    for key, row in rows.items():
        assert key in peaks or row.get("names"), f"catalog row {key!r} matches no device"
        assert normalize_device_name(key) == key
        assert row["list_price_usd"] > 0
        assert row["tdp_w"] == peaks[key]["tdp_w"], f"{key}: TDP differs from peaks.yaml"
        src = row["source"]
        assert src["title"] and src["url"].startswith("https://") and src["date"], key


def test_every_catalog_gpu_key_matches_what_detection_produces():
    """For every peaks.yaml name NVML/torch reports, the detected device (its name, or the
    normalised device_key detection records) finds the catalog row with that key, and the cost
    inputs get that row's price."""
    cat = builtin_catalog()
    price = {r["key"]: r["list_price_usd"] for r in cat["gpus"]}
    for prow in peaks_catalog():
        for name in prow["names"]:
            detected_key = normalize_device_name(name)  # what HardwareInfo.device_key holds
            assert gpu_row(name)["key"] == prow["key"], name
            assert gpu_row(detected_key)["key"] == prow["key"], detected_key
            assert gpu_row(prow["key"])["key"] == prow["key"]
            ci = build_cost_inputs(_hw(device_name=name), power_source="tdp")
            assert [(g.key, g.price_usd) for g in ci.gpus] == [(prow["key"], price[prow["key"]])]
    assert gpu_row("NVIDIA Imaginary X9000") is None


def test_cpu_rows_match_on_substrings_and_fall_back_to_generic():
    assert cpu_row("AMD EPYC")["key"] == GENERIC_CPU_KEY  # this machine's model string
    assert cpu_row("AMD EPYC")["matched"] is None
    assert cpu_row("")["key"] == GENERIC_CPU_KEY
    assert cpu_row("AMD EPYC 9654 96-Core Processor")["key"] == "epyc-9654"
    assert cpu_row("AMD EPYC 9554 64-Core Processor")["key"] == "epyc-9554"
    assert cpu_row("AMD EPYC 7763 64-Core Processor")["key"] == "epyc-7763"
    assert cpu_row("Intel(R) Xeon(R) Platinum 8480+")["key"] == "xeon-platinum-8480plus"
    assert cpu_row("Intel(R) Xeon(R) Platinum 8380 CPU @ 2.30GHz")["key"] == "xeon-platinum-8380"
    assert cpu_row("AMD EPYC 96540")["key"] == GENERIC_CPU_KEY  # whole words only
    for row in builtin_catalog()["cpus"]:
        assert row["list_price_usd"] > 0 and row["tdp_w"] > 0 and row["source"]["title"], row["key"]


def test_build_cost_inputs_defaults_for_detected_hardware():
    ci = build_cost_inputs(_hw(), power_source="tdp")
    assert [(g.key, g.count) for g in ci.gpus] == [("h100-sxm5-80gb", 1)]  # device count is not GPUs used
    assert ci.cpu.name == "AMD EPYC" and ci.cpu.price_usd == 5000  # generic row
    assert ci.dram_gb == pytest.approx(512) and ci.dram_usd_per_gb == 4.0
    assert ci.ssd_tb == 1 and ci.ssd_usd_per_tb == 100
    assert ci.amortization_hours == 3 * HOURS_PER_YEAR and ci.utilization == 1.0
    assert ci.pue == 1.3 and ci.usd_per_kwh == 0.10
    assert ci.avg_power_w == 700 + 250  # H100 SXM TDP + generic CPU TDP
    assert ci.cloud_usd_per_hour == pytest.approx(2.99)
    assert "catalog" in ci.sources["gpus[h100-sxm5-80gb].price_usd"]
    half = build_cost_inputs(_hw(), {"utilization": 0.5}, power_source="tdp*utilization")
    assert half.avg_power_w == pytest.approx(950 * 0.5)
    measured = build_cost_inputs(_hw(), avg_power_w=612.5, power_source="measured")
    assert measured.avg_power_w == 612.5 and measured.sources["avg_power_w"] == "measured during the run"
    with pytest.raises(CatalogError, match="avg_power_w"):
        build_cost_inputs(_hw(), power_source="measured")


def test_cpu_only_and_offloaded_setups_always_cost_host_cpu_and_dram():
    ci = build_cost_inputs(_hw(accelerator="cpu", device_name="AMD EPYC"), power_source="tdp")
    assert ci.gpus == [] and ci.cloud_usd_per_hour is None
    parts = ci.components_usd()
    assert parts["cpu"] == 5000 and parts["dram"] == pytest.approx(512 * 4) and parts["gpus"] == 0
    # GPU set-up offloading experts to 1.5 TB of host memory on two EPYC 9654 sockets
    ci = build_cost_inputs(
        _hw(cpu_model="AMD EPYC 9654 96-Core Processor", host_memory_bytes=1536 * GiB),
        {"cpu_count": 2},
        power_source="tdp",
    )
    parts = ci.components_usd()
    assert parts["cpu"] == 2 * 11805 and parts["dram"] == pytest.approx(1536 * 4.0)
    assert ci.avg_power_w == 700 + 2 * 360


def test_overrides_replace_catalog_values(tmp_path):
    ov = {
        "gpu_count": 2, "gpu_price_usd": 31_000, "cpu_price_usd": 9_000, "cpu_tdp_w": 200,
        "dram_gb": 256, "dram_usd_per_gb": 3.0, "ssd_tb": 4, "ssd_usd_per_tb": 80,
        "amortization_years": 5, "utilization": 0.6, "pue": 1.5, "usd_per_kwh": 0.2,
        "cloud_usd_per_gpu_hour": 2.5,
    }
    ci = build_cost_inputs(_hw(), ov, power_source="tdp")
    assert [(g.key, g.count, g.price_usd) for g in ci.gpus] == [("h100-sxm5-80gb", 2, 31_000)]
    assert (ci.cpu.price_usd, ci.cpu.tdp_w) == (9_000, 200)
    assert (ci.dram_gb, ci.dram_usd_per_gb, ci.ssd_tb, ci.ssd_usd_per_tb) == (256, 3.0, 4, 80)
    assert ci.amortization_hours == 5 * 8760 and ci.utilization == 0.6
    assert (ci.pue, ci.usd_per_kwh) == (1.5, 0.2)
    assert ci.avg_power_w == 2 * 700 + 200
    assert ci.cloud_usd_per_hour == pytest.approx(5.0)
    assert ci.sources["gpus[h100-sxm5-80gb].price_usd"] == "override cost.gpu_price_usd"
    assert ci.sources["pue"] == "override cost.pue"
    ci = build_cost_inputs(_hw(), {"avg_power_w": 123, "cloud_usd_per_hour": 7, "amortization_hours": 1000})
    assert (ci.avg_power_w, ci.cloud_usd_per_hour, ci.amortization_hours) == (123, 7, 1000)
    # a suite-level catalog fragment and a catalog override file merge over the shipped catalog
    frag = {"gpus": [{"key": "h100-sxm5-80gb", "list_price_usd": 20_000}], "defaults": {"pue": 1.1}}
    ci = build_cost_inputs(_hw(), {"catalog": frag})
    assert ci.gpus[0].price_usd == 20_000 and ci.pue == 1.1 and ci.usd_per_kwh == 0.10
    f = tmp_path / "prices.yaml"
    f.write_text("dram: {usd_per_gb: 6.5}\ncpus:\n  - {key: my-cpu, match: ['AMD EPYC'], list_price_usd: 1234, tdp_w: 99}\n")
    cat = load_catalog(f)
    assert cat["dram"]["usd_per_gb"] == 6.5 and cat["ssd"]["usd_per_tb"] == 100
    ci = build_cost_inputs(_hw(), {"catalog_file": str(f)}, power_source="tdp")
    assert ci.dram_usd_per_gb == 6.5 and ci.cpu.price_usd == 1234 and ci.avg_power_w == 700 + 99
    with pytest.raises(CatalogError, match="unknown cost setting"):
        build_cost_inputs(_hw(), {"gpu_prize_usd": 1})
    with pytest.raises(CatalogError, match="unknown catalog section"):
        load_catalog(override={"gpu": []})


def test_unknown_gpu_without_price_is_a_clear_error():
    hw = _hw(device_name="NVIDIA Imaginary X9000")
    with pytest.raises(CatalogError) as e:
        build_cost_inputs(hw, power_source="tdp")
    msg = str(e.value)
    assert "imaginary-x9000" in msg and "cost.gpu_price_usd" in msg and "gpus:" in msg
    with pytest.raises(CatalogError, match="cost.gpu_tdp_w"):
        build_cost_inputs(hw, {"gpu_price_usd": 5000}, power_source="tdp")
    ci = build_cost_inputs(hw, {"gpu_price_usd": 5000, "gpu_tdp_w": 300}, power_source="tdp")
    assert ci.gpus[0].key == "imaginary-x9000" and ci.avg_power_w == 300 + 250
    assert ci.cloud_usd_per_hour is None
    # a user row with its own names makes it known
    frag = {"gpus": [{"key": "x9000", "names": ["NVIDIA Imaginary X9000"], "list_price_usd": 777, "tdp_w": 50}]}
    ci = build_cost_inputs(hw, {"catalog": frag}, power_source="tdp")
    assert (ci.gpus[0].key, ci.gpus[0].price_usd, ci.avg_power_w) == ("x9000", 777, 50 + 250)


def test_cost_modules_import_without_torch():
    code = (
        "import sys, moecap.catalog, moecap.metrics.cost\n"
        "moecap.catalog.builtin_catalog()\n"
        "print(','.join(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""
