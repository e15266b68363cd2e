"""A cell's report assembled from its runner's traces: latency and throughput, utilization against the
right peaks (traced, recorded or estimated), cost (DESIGN.md section 2)."""

from __future__ import annotations

from typing import Any


def build_report(trace: Any, peaks: Any, slo_ms: dict[str, float] | None = None
                 ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Turn a RunTrace into the record's report section (and per-pass rows for the artifacts);
    ``slo_ms``: the workload's goodput SLOs."""
    from moecap.metrics.accounting import from_hf_config
    from moecap.metrics.latency import pass_latency, summarize_requests
    from moecap.metrics.utilization import utilization

    acc = from_hf_config(trace.model_config) if trace.model_config else None
    report: dict[str, Any] = summarize_requests(trace.requests, slo_ms=slo_ms or None)
    if trace.extra.get("errors"):
        report["errors"] = dict(trace.extra["errors"])
    client = {k: trace.extra[k] for k in ("prompt_cache", "connection_retries") if trace.extra.get(k)}
    if client:  # how the HTTP client kept caches and its own connections out of the figures
        report["client"] = client
    if trace.extra.get("server"):  # what the server itself recorded over the window (moecap serve's /stats)
        from moecap.metrics.serving import server_window

        report["server"] = server_window(trace.extra["server"])
    models = sorted({r.model for r in trace.requests if getattr(r, "model", None)})
    if len(models) > 1 or trace.extra.get("models"):  # a multi-model workload: each model's own figures
        slo = slo_ms or None
        report["per_model"] = {
            m: {**summarize_requests([r for r in trace.requests if r.model == m], slo_ms=slo),
                "requests": sum(1 for r in trace.requests if r.model == m)}
            for m in models
        }
        server_models = (report.get("server") or {}).get("per_model") or {}
        for m, sec in report["per_model"].items():
            srv = server_models.get(m)
            if not isinstance(srv, dict) or "switch_s_total" not in srv:
                continue
            ttft = (sec.get("latency") or {}).get("ttft_ms") or {}
            ttft_s = (ttft.get("mean") or 0.0) * (ttft.get("n") or 0) / 1e3  # the model's requests' TTFTs, summed
            sec["switch"] = {"switches": srv.get("switches_to"), "switch_s_total": srv["switch_s_total"],
                             "share_of_ttft": srv["switch_request_s"] / ttft_s if ttft_s > 0 else None}
    report["pass_latency"] = pass_latency(trace.passes)
    if acc is not None:
        report["model"] = acc.summary()
    report["memory"] = trace.memory
    report["tracing"] = trace.tracing
    if trace.energy:
        from moecap.energy import per_token

        report["energy"] = {**trace.energy, **per_token(trace.energy, report["throughput"]["output_tokens"])}
    rows: list[dict[str, Any]] = []
    devices = max(1, int(getattr(trace, "devices", 1) or 1))
    if peaks is not None and devices > 1:  # a cell on N devices is measured against N devices' peaks
        peaks = peaks.times(devices)
    if trace.tracing.get("traced") and trace.passes and acc is not None and peaks is not None:
        phases, rows = utilization(
            trace.passes,
            acc,
            trace.moe_layers,
            trace.weight_bytes_per_param,
            trace.kv_bytes_per_elem,
            peaks.mem_bandwidth_Bps,
            peaks.flops_for(trace.compute_dtype),
            expanded_mla=trace.kv_cache_expanded_mla,
            expert_bytes=trace.expert_bytes,
        )
        report["utilization"] = {
            **phases,
            "basis": "traced",
            "peak": _peak_info(peaks, trace.compute_dtype, peaks.flops_for(trace.compute_dtype)),
            "weight_bytes_per_param": trace.weight_bytes_per_param,
            "kv_bytes_per_elem": trace.kv_bytes_per_elem,
        }
        if trace.expert_bytes:
            report["utilization"]["expert_bytes"] = {str(k): v for k, v in trace.expert_bytes.items()}
        if trace.expert_bytes and trace.expert_placements:
            from moecap.metrics.utilization import tier_traffic

            tier_peaks = dict((trace.extra.get("engine") or {}).get("tier_peaks") or {})
            tier_peaks["fast_Bps"] = peaks.mem_bandwidth_Bps
            if not tier_peaks.get("split"):  # one memory: the host tier is the same DRAM as the fast one
                tier_peaks.setdefault("host_Bps", peaks.mem_bandwidth_Bps)
            tiers = tier_traffic(trace.passes, acc, trace.moe_layers, trace.weight_bytes_per_param,
                                 trace.kv_bytes_per_elem, trace.expert_bytes, trace.expert_placements, tier_peaks,
                                 expanded_mla=trace.kv_cache_expanded_mla)
            for phase, row in tiers.items():
                report["utilization"][phase]["tiers"] = row
            report["utilization"]["tiers_basis"] = (
                "bytes by where they were read: fast (non-expert weights, KV, resident experts, copied host "
                "experts), link (host experts copied in the pass), host (host experts computed by the host); "
                "each against its own peak; s_mbu stays the combined figure (all bytes over the fast peak)")
            report["utilization"]["expert_placements"] = {str(k): v for k, v in trace.expert_placements.items()}
    elif trace.requests and acc is not None and trace.weight_bytes_per_param > 0 and acc.moe_layers:
        report["utilization"] = _estimated_utilization(trace, acc, peaks)
    else:
        report["utilization"] = {"available": False, "reason": trace.tracing.get("reason", "experts not traced")}
    if devices > 1:
        _per_device(report["utilization"], devices)
    return report, rows


def _per_device(util: dict[str, Any], devices: int) -> None:
    """Each phase's achieved rates per device beside the totals (the work spread evenly over them:
    utilization against N peaks is each device's mean utilization)."""
    for phase in ("prefill", "decode"):
        ph = util.get(phase)
        if not isinstance(ph, dict) or "achieved_bandwidth_gbs" not in ph:
            continue
        ph["per_device"] = {
            "devices": devices,
            "achieved_bandwidth_gbs": ph["achieved_bandwidth_gbs"] / devices,
            "achieved_tflops": (ph.get("achieved_tflops") or 0.0) / devices,
            "s_mbu": ph.get("s_mbu"),
            "s_mfu": ph.get("s_mfu"),
        }


def _peak_info(peaks: Any, compute_dtype: str, flops: float | None) -> dict[str, Any]:
    """Which peak a record's utilization used (for N devices: their sum, and one device's)."""
    devices = int(peaks.details.get("devices", 1)) if isinstance(peaks.details, dict) else 1
    out = {"kind": peaks.kind, "source": peaks.source, "device": peaks.device, "devices": devices,
           "mem_bandwidth_gbs": peaks.mem_bandwidth_Bps / 1e9, "compute_dtype": compute_dtype,
           "tflops": flops / 1e12 if flops else None}
    if devices > 1:
        out["per_device"] = {"device": peaks.details.get("per_device"),
                             "mem_bandwidth_gbs": peaks.mem_bandwidth_Bps / 1e9 / devices,
                             "tflops": flops / 1e12 / devices if flops else None}
    return out


def _estimated_utilization(trace: Any, acc: Any, peaks: Any) -> dict[str, Any]:
    """A server's decode S-MBU/S-MFU estimated from client-side timestamps (metrics.serving)."""
    from moecap.metrics.serving import estimated_decode_utilization

    bw = flops = None
    peak: dict[str, Any] | None = None
    if peaks is not None:
        bw = peaks.mem_bandwidth_Bps
        try:
            flops = peaks.flops_for(trace.compute_dtype)
        except ValueError:
            flops = None
        peak = _peak_info(peaks, trace.compute_dtype, flops)
    per_component = getattr(trace, "component_bytes_per_param", None)
    decode = estimated_decode_utilization(
        trace.requests, acc, per_component or trace.weight_bytes_per_param, trace.kv_bytes_per_elem, bw, flops,
        routing_stats=trace.extra.get("routing_stats"), expanded_mla=trace.kv_cache_expanded_mla,
        recorded_passes={"tokens": trace.extra["pass_tokens"], "unions": trace.extra["pass_expert_unions"]}
        if trace.extra.get("pass_tokens") and trace.extra.get("pass_expert_unions") else None,
    )
    # "recorded": the server's own routing record priced the experts (timing still from the client);
    # "estimated": uniform routing
    basis = "recorded" if trace.extra.get("routing_stats") else "estimated"
    return {
        "basis": basis,
        "decode": decode,
        "prefill": {"available": False, "reason": "not estimated from a client: TTFT includes queueing and the "
                    "decode work of requests sharing the prefill's passes"},
        "peak": peak if peak is not None else {"kind": None, "reason": "no hardware peaks (the run log says why): "
                                               "bytes, FLOPs and achieved rates are still given"},
        "weight_bytes_per_param": trace.weight_bytes_per_param,
        **({"component_bytes_per_param": dict(per_component),
            "weight_bytes_source": trace.extra.get("weight_bytes_source")} if per_component else {}),
        "kv_bytes_per_elem": trace.kv_bytes_per_elem,
    }


def _remote_cost(cost: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    """An endpoint on another machine: this machine's hardware prices nothing. Priced by the hardware the
    suite's cost section names (``gpu_key``/``gpus``), else by its cloud rate alone, else not at all."""
    if {"gpu_key", "gpus"} & set(settings):
        return {**cost, "note": "remote endpoint: GPUs as named in the suite's cost section"}
    if cost.get("cloud"):
        return {"model": "cloud", "usd_per_1m_output_tokens": cost["cloud_usd_per_1m_output_tokens"],
                "cloud": cost["cloud"], "cloud_usd_per_1m_output_tokens": cost["cloud_usd_per_1m_output_tokens"],
                "run_hours": cost.get("run_hours"), "output_tokens": cost.get("output_tokens"),
                "note": "remote endpoint: priced by the suite's cloud rate only"}
    return {"available": False, "reason": "the endpoint runs on another machine: name its hardware (cost.gpu_key "
            "or cost.gpus) or its rental price (cost.cloud_usd_per_hour) in the suite to price it"}


def price_run(report: dict[str, Any], hw: dict[str, Any] | None, settings: dict[str, Any]) -> dict[str, Any]:
    """The record's cost section: measured power when the run had it, else TDP; never fails the cell."""
    from moecap.catalog import build_cost_inputs
    from moecap.metrics.cost import cost_report

    from moecap import figures

    measured = figures.value(report, "avg_power_w")
    try:
        inputs = build_cost_inputs(
            hw or {}, settings, avg_power_w=measured, power_source="measured" if measured else "tdp"
        )
        got = {k: figures.value(report, k) for k in ("duration_s", "output_tokens", "completed_requests")}
        missing = [k for k, v in got.items() if v is None]
        if missing:
            raise KeyError(f"the report has no {', '.join(missing)}")
        return cost_report(inputs, got["duration_s"], int(got["output_tokens"]), int(got["completed_requests"]))
    except (ValueError, KeyError) as err:
        return {"available": False, "reason": f"{type(err).__name__}: {err}"}
