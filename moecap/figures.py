"""The one table of figures: every number moecap reports, declared once.

A figure has a key (what tables, the leaderboard and ``moecap compare`` call it), where it lives in a
record's ``report``, its unit, label and description, which way is better, its default regression-gate
threshold, the trace samples that back a significance test of it, and its family, whose *basis* every
record states (``report.basis``):

- ``measured``: timed or read on this run (client timestamps, power meters, memory counters, quality);
- ``traced``: from per-pass traces with the router's expert counts (in-process runners);
- ``recorded``: from what a server recorded itself (SGLang's expert distribution recorder, ``moecap
  serve``'s /stats);
- ``estimated``: reconstructed by a model (a server's decode passes from streamed timestamps and
  expected expert unions; cost from prices and power).

Tables (``moecap report``), the leaderboard, ``moecap compare``, ``moecap cost`` and the studies read
figures through :func:`value` (and :func:`quality_values` for the data-dependent quality figures,
``ppl:<dataset>`` and ``<task>:<metric>``); nothing else indexes a report by string keys. The table is
read at call time, so renaming a figure here renames it everywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

BASES = ("measured", "traced", "recorded", "estimated")
FAMILIES = ("latency", "throughput", "pass_latency", "utilization", "energy", "cost", "memory", "quality",
            "server")


@dataclass(frozen=True)
class Figure:
    """One figure: see the module docstring. ``threshold`` is relative (0.05 = 5 %) unless ``absolute``
    (then in the figure's unit); None: ``moecap compare`` does not judge it. ``samples`` are the trace
    samples (source, statistic) behind it, in order of preference; ``show`` says where it appears by
    default (``report``: ``moecap report``'s table; ``leaderboard``: the board's default columns)."""

    key: str
    path: tuple[str, ...]
    family: str
    label: str
    unit: str | None = None
    description: str = ""
    higher_is_better: bool | None = None
    threshold: float | None = None
    gated: bool = False
    absolute: bool = False
    samples: tuple[tuple[str, str], ...] = ()
    decimals: int = 2
    getter: Callable[[dict[str, Any]], Any] | None = field(default=None, compare=False)
    show: tuple[str, ...] = ()

    @property
    def header(self) -> str:
        return f"{self.label} ({self.unit})" if self.unit else self.label

    def value(self, report: dict[str, Any] | None) -> Any:
        """The figure in ``report`` (a record's report, or a per-model section shaped like one), None
        where it is absent: with repetitions (``report.repetitions``), their median. Numbers come back
        as floats (NaN and inf included: callers judge them)."""
        if not isinstance(report, dict):
            return None
        over = dig(report, ("repetitions", "figures", self.key))
        if isinstance(over, dict) and isinstance(over.get("median"), (int, float)):
            return float(over["median"])
        v = self.getter(report) if self.getter is not None else dig(report, self.path)
        if isinstance(v, bool):
            return v
        if isinstance(v, (int, float)):
            return float(v)
        return v


def dig(d: Any, path: Sequence[str]) -> Any:
    """``d[path[0]][path[1]]...``, or None where a level is missing or not a dict."""
    for k in path:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def number(v: Any) -> float | None:
    """A finite float, or None (booleans, strings, NaN and inf are not figures)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


# ------------------------------------------------------------------------------------------ getters


def _peak_mem_gib(report: dict[str, Any]) -> float | None:
    mem = report.get("memory") or {}
    v = mem.get("device_peak_allocated_bytes") or mem.get("host_rss_peak_bytes") \
        or mem.get("host_peak_rss_process_bytes")
    return v / 2**30 if isinstance(v, (int, float)) and v else None


def _measured_power(report: dict[str, Any]) -> float | None:
    energy = report.get("energy")
    return energy.get("avg_power_w") if isinstance(energy, dict) and energy.get("available") else None


def _mean_accuracy(report: dict[str, Any]) -> float | None:
    accs = [v for k, (v, _, _) in quality_values(report).items() if k.endswith(":acc")]
    return sum(accs) / len(accs) if accs else None


def _first_perplexity(report: dict[str, Any]) -> float | None:
    ppl = [v for k, (v, _, _) in quality_values(report).items() if k.startswith("ppl:")]
    return ppl[0] if ppl else None


# ------------------------------------------------------------------------------------------ the table

_STATS = (("mean", "mean", "mean"), ("p50", "median", "median"), ("p90", "p90", "90th percentile"),
          ("p99", "p99", "99th percentile"))
_QUANTILE_THRESHOLD = {"mean": 0.10, "p50": 0.10, "p90": 0.15, "p99": 0.20}
_LATENCY = (("ttft", "TTFT", "time to first token: first streamed chunk - request sent"),
            ("tpot", "TPOT", "time per output token after the first: (E2EL - TTFT) / (output tokens - 1)"),
            ("itl", "ITL", "inter-token latency: the gap between consecutive streamed chunks (vLLM's)"),
            ("itl_per_token", "ITL per token", "each chunk gap spread evenly over the tokens of the chunk "
                                               "that ended it"),
            ("e2el", "E2E latency", "end-to-end request latency: last chunk - request sent"))
_LATENCY_DECIMALS = {"ttft": 2, "tpot": 3, "itl": 3, "itl_per_token": 3, "e2el": 1}
_LATENCY_GATED = {"ttft_ms_p50", "ttft_ms_p99", "tpot_ms_p50", "tpot_ms_p99"}
_LATENCY_SHOWN = {"ttft_ms_p50": ("report", "leaderboard"), "ttft_ms_p99": ("report",),
                  "tpot_ms_p50": ("report", "leaderboard"), "itl_ms_p99": ("report",)}
THROUGHPUT_SAMPLES = (("passes", "mean"), ("e2el", "mean"))  # static batches: the passes; servers: E2EL


def _build() -> list[Figure]:
    out: list[Figure] = []
    for m, label, what in _LATENCY:
        for stat, field_, stat_text in _STATS:
            key = f"{m}_ms_{stat}"
            out.append(Figure(
                key, ("latency", f"{m}_ms", field_), "latency", f"{label} {stat}", "ms",
                f"{what}; {stat_text} over requests", False, _QUANTILE_THRESHOLD[stat], key in _LATENCY_GATED,
                samples=((m, field_),) if m != "itl_per_token" else (), decimals=_LATENCY_DECIMALS[m],
                show=_LATENCY_SHOWN.get(key, ())))
    out += [
        Figure("output_tokens_per_s", ("throughput", "output_tokens_per_s"), "throughput", "Output throughput",
               "tok/s", "output tokens / duration (first dispatch to the end of the last request)", True, 0.05,
               True, samples=THROUGHPUT_SAMPLES, decimals=1, show=("report", "leaderboard")),
        Figure("total_tokens_per_s", ("throughput", "total_tokens_per_s"), "throughput", "Total throughput",
               "tok/s", "(input + output) tokens / duration", True, 0.05, samples=THROUGHPUT_SAMPLES, decimals=1),
        Figure("requests_per_s", ("throughput", "requests_per_s"), "throughput", "Request throughput", "req/s",
               "completed requests / duration", True, 0.05, samples=THROUGHPUT_SAMPLES, decimals=3,
               show=("report",)),
        Figure("goodput_requests_per_s", ("throughput", "goodput_requests_per_s"), "throughput", "Goodput",
               "req/s", "requests meeting every SLO / duration", True, 0.05, samples=THROUGHPUT_SAMPLES,
               decimals=3),
        Figure("completed_requests", ("throughput", "completed"), "throughput", "Completed requests", "requests",
               "requests that finished with every output token", True, decimals=0),
        Figure("output_tokens", ("throughput", "output_tokens"), "throughput", "Output tokens", "tokens",
               "output tokens of the completed requests (the server's usage where it reports one)", True,
               decimals=0),
        Figure("duration_s", ("throughput", "duration_s"), "throughput", "Duration", "s",
               "the benchmark's wall time: first dispatch to the end of the last request, failed ones included",
               None, decimals=3),
        Figure("short_requests", ("requests", "short"), "throughput", "Short outputs", "requests",
               "completed requests with fewer tokens than output_tokens under ignore_eos (cut short by the "
               "server)", False, decimals=0),
        Figure("failed_requests", ("throughput", "failed"), "throughput", "Failed requests", "requests",
               "requests that failed (HTTP error, broken stream, token counts that contradict the usage)",
               False, decimals=0),
    ]
    for phase in ("prefill", "decode"):
        for stat, field_, stat_text in _STATS[1:]:
            out.append(Figure(
                f"{phase}_pass_ms_{stat}", ("pass_latency", f"{phase}_pass_ms", field_), "pass_latency",
                f"{phase} pass {stat}", "ms", f"server-side {phase} forward pass, {stat_text}", False,
                _QUANTILE_THRESHOLD[stat], samples=((f"{phase}_passes", field_),)))
    for u, text in (("s_mbu", "sparsity-aware memory-bandwidth utilization (bytes of the experts each pass "
                               "activated, over the peak)"),
                    ("s_mfu", "sparsity-aware model-FLOPs utilization (FLOPs of the experts each pass "
                              "activated, over the peak)")):
        for phase in ("prefill", "decode"):
            samples = ((f"{phase}_passes", "mean"),) + ((("itl", "mean"),) if phase == "decode" else ())
            # decode is bound by bandwidth, prefill by compute: the board shows those two by default
            show = ("report", "leaderboard") if (u, phase) in (("s_mbu", "decode"), ("s_mfu", "prefill")) \
                else ("report",)
            out.append(Figure(f"{u}_{phase}", ("utilization", phase, u), "utilization",
                              f"{u.upper().replace('_', '-')} {phase}", None, f"{text}, {phase}", True, 0.05,
                              u == "s_mbu", samples=samples, decimals=4, show=show))
    out += [
        Figure("experts_per_layer_decode", ("utilization", "decode", "mean_active_experts_per_layer"),
               "utilization", "experts/layer decode", None, "distinct experts a decode pass used per MoE layer",
               None, decimals=2, show=("report",)),
    ]
    # what S-MBU and S-MFU divide (the roofline's coordinates and ceilings); totals over the cell's devices
    for phase in ("prefill", "decode"):
        out += [
            Figure(f"achieved_tflops_{phase}", ("utilization", phase, "achieved_tflops"), "utilization",
                   f"Attained FLOP/s {phase}", "TFLOP/s",
                   f"model FLOPs of the {phase} passes (attention, router, the k experts each token ran, head, "
                   "attention scores) / the passes' time",
                   True, decimals=4),
            Figure(f"achieved_bandwidth_gbs_{phase}", ("utilization", phase, "achieved_bandwidth_gbs"),
                   "utilization", f"Attained bandwidth {phase}", "GB/s",
                   f"bytes the {phase} passes moved (weights of the experts each pass activated, attention, head, KV "
                   "read and written) / the passes' time",
                   True, decimals=3),
        ]
    out += [
        Figure("peak_tflops", ("utilization", "peak", "tflops"), "utilization", "Peak FLOP/s", "TFLOP/s",
               "dense peak FLOP/s of the compute dtype that S-MFU divides by (the cell's devices together)", None,
               decimals=3),
        Figure("peak_mem_bandwidth_gbs", ("utilization", "peak", "mem_bandwidth_gbs"), "utilization",
               "Peak bandwidth", "GB/s",
               "peak memory bandwidth that S-MBU divides by (the cell's devices together)", None, decimals=1),
        Figure("j_per_token", ("energy", "joules_per_output_token"), "energy", "Energy", "J/tok",
               "energy per output token over the measured window", False, 0.10, decimals=4,
               show=("report", "leaderboard")),
        Figure("avg_power_w", ("energy", "avg_power_w"), "energy", "Power", "W",
               "mean power over the measured window, where a power meter was read", False, decimals=1,
               getter=_measured_power),
        Figure("usd_per_1m_output_tokens", ("cost", "usd_per_1m_output_tokens"), "cost", "Cost", "$/1M tok",
               "$ per million output tokens (hardware and energy prices x the run's duration and power)", False,
               0.05, samples=THROUGHPUT_SAMPLES, decimals=4, show=("report", "leaderboard")),
        Figure("usd_per_request", ("cost", "usd_per_request"), "cost", "Cost per request", "$",
               "$ per completed request", False, decimals=6),
        Figure("fast_tier_weights_bytes", ("memory", "fast_tier_weights_bytes"), "memory", "Fast-memory weights",
               "bytes", "weights held on the fast device (our engine's placement)", False, decimals=0),
        Figure("host_expert_bytes", ("memory", "expert_bytes_host"), "memory", "Host-memory experts", "bytes",
               "expert bytes held in host memory (our engine's placement)", False, decimals=0),
        Figure("server_switches", ("server", "switches"), "server", "Model switches", None,
               "batches of another model than the one before (moecap serve's own record)", False, decimals=0),
        Figure("server_switch_ms_mean", ("server", "switch_ms", "mean"), "server", "Switch time mean", "ms",
               "mean time a model switch took (moecap serve's own record)", False, decimals=2),
        Figure("server_expert_bytes", ("server", "memory", "expert_bytes"), "server", "Expert memory", "bytes",
               "bytes of experts the serving backend keeps (moecap serve's own record)", False, decimals=0),
        Figure("server_expert_bytes_fast", ("server", "memory", "expert_bytes_fast"), "server",
               "Expert memory, fast", "bytes", "of which on the fast device", False, decimals=0),
        Figure("peak_mem_gib", ("memory",), "memory", "Peak memory", "GiB",
               "peak memory: device allocated, else host RSS", False, 0.10, decimals=3, getter=_peak_mem_gib,
               show=("report",)),
        Figure("accuracy", ("quality", "lm_eval"), "quality", "Accuracy", None,
               "mean lm-eval `acc` over the record's tasks", True, decimals=3, getter=_mean_accuracy,
               show=("leaderboard",)),
        Figure("perplexity", ("quality", "perplexity"), "quality", "Perplexity", None,
               "token perplexity on the record's first perplexity data set", False, decimals=2,
               getter=_first_perplexity, show=("leaderboard",)),
    ]
    return out


FIGURES: list[Figure] = _build()
# names that older moecap versions (and users' --threshold flags) used for a figure
ALIASES: dict[str, str] = {
    **{f"{m}_ms_median": f"{m}_ms_p50" for m, _, _ in _LATENCY},
    **{f"{p}_pass_ms_median": f"{p}_pass_ms_p50" for p in ("prefill", "decode")},
    "output_tok_s": "output_tokens_per_s", "req_s": "requests_per_s",
    "usd_per_1m_tokens": "usd_per_1m_output_tokens",
}


def table() -> list[Figure]:
    """The figures, in display order (read at call time: see the module docstring)."""
    return list(FIGURES)


def get(key: str) -> Figure:
    """The figure named ``key`` (or one of its :data:`ALIASES`); KeyError naming the known ones."""
    key = ALIASES.get(key, key)
    for f in FIGURES:
        if f.key == key:
            return f
    raise KeyError(f"unknown figure {key!r}; known: {', '.join(f.key for f in FIGURES)}")


def median_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float, float]:
    """(median, low, high, coverage) of ``values``: the distribution-free interval of the median from
    order statistics, [x_(k), x_(n-k+1)] with the largest k whose coverage 1 - 2 P(Bin(n, 1/2) < k) is
    at least ``level``; with too few values for that level, the whole range and its (lower) coverage."""
    xs = sorted(float(v) for v in values)
    n = len(xs)
    if n == 0:
        raise ValueError("no values")
    mid = xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2
    cdf = [sum(math.comb(n, i) for i in range(j + 1)) / 2**n for j in range(n)]  # P(Bin(n, 1/2) <= j)
    k = 1
    for j in range(1, n // 2 + 1):
        if 1 - 2 * (cdf[j - 1] if j >= 1 else 0.0) >= level:
            k = j
    coverage = 1 - 2 * (cdf[k - 1] if k >= 1 else 0.0)
    return mid, xs[k - 1], xs[n - k], coverage


def repetition_summary(reports: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per figure of the table present in every repetition's report: its values, median, the median's
    interval (:func:`median_interval`) with its coverage, and the spread, (max - min) / |median|."""
    out: dict[str, Any] = {}
    for f in table():
        vals = [number(f.value(r)) for r in reports]
        if not vals or any(v is None for v in vals):
            continue
        med, lo, hi, cov = median_interval(vals)
        out[f.key] = {"values": vals, "median": med, "interval": [lo, hi], "coverage": cov,
                      "spread": (max(vals) - min(vals)) / abs(med) if med else None}
    return out


def value(report: dict[str, Any] | None, key: str) -> Any:
    """The figure ``key`` of ``report`` (fixed or quality, see :func:`quality_values`), None if absent."""
    if ":" in key:
        got = quality_values(report or {}).get(key)
        return got[0] if got else None
    return get(key).value(report)


def shown(where: str) -> list[Figure]:
    return [f for f in FIGURES if where in f.show]


def per_model(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The per-model sections of a multi-model report (each shaped like a report: read them with
    :func:`value`), performance (``per_model``) or quality (``quality.per_model``)."""
    out = report.get("per_model") if isinstance(report, dict) else None
    if not isinstance(out, dict):
        out = dig(report, ("quality", "per_model"))
        out = {m: {"quality": q} for m, q in out.items() if isinstance(q, dict)} if isinstance(out, dict) else {}
    return {m: r for m, r in out.items() if isinstance(r, dict)}


def byte_components(report: dict[str, Any], phase: str) -> dict[str, float]:
    """The bytes a phase moved, by component (attention, experts, kv_read, ...): the breakdown behind
    S-MBU (``utilization.<phase>.bytes``, the total left out)."""
    b = dig(report, ("utilization", phase, "bytes"))
    if not isinstance(b, dict):
        return {}
    return {k: float(v) for k, v in b.items() if k != "total" and number(v) is not None}


# ------------------------------------------------------------------------------------------ quality


def quality_values(report: dict[str, Any]) -> dict[str, tuple[float, float | None, dict[str, Any]]]:
    """The data-dependent quality figures of a report: ``ppl:<dataset>`` (token perplexity, lower is
    better) and ``<task>:<metric>`` (lm-eval), each as (value, stderr or None, info) where info has
    ``higher_is_better`` and ``n`` (effective samples) when the record says."""
    out: dict[str, tuple[float, float | None, dict[str, Any]]] = {}
    quality = report.get("quality") if isinstance(report, dict) else None
    if not isinstance(quality, dict):
        return out
    for ds, res in sorted((quality.get("perplexity") or {}).items()):
        v = number(res.get("perplexity") if isinstance(res, dict) else res)
        if v is not None:
            out[f"ppl:{ds}"] = (v, None, {"higher_is_better": False, "dataset": ds})
    for task, res in sorted(((quality.get("lm_eval") or {}).get("tasks") or {}).items()):
        res = res if isinstance(res, dict) else {}
        n = number(dig(res, ("n_samples", "effective")))
        for metric, m in sorted((res.get("metrics") or {}).items()):
            val, stderr = (m.get("value"), m.get("stderr")) if isinstance(m, dict) else (m, None)
            v = number(val)
            if v is None:
                continue
            higher = (res.get("higher_is_better") or {}).get(metric, True) is not False
            out[f"{task}:{metric}"] = (v, number(stderr), {"higher_is_better": higher,
                                                           "n": int(n) if n else None, "task": task})
    return out


# ------------------------------------------------------------------------------------------ bases


def bases(report: dict[str, Any]) -> dict[str, str]:
    """The basis of each figure family the report has (see the module docstring)."""
    out: dict[str, str] = {}
    if not isinstance(report, dict):
        return out
    if isinstance(report.get("latency"), dict):
        out["latency"] = "measured"
    if isinstance(report.get("throughput"), dict):
        out["throughput"] = "measured"
    if any(isinstance(v, dict) and v.get("n") for v in (report.get("pass_latency") or {}).values()):
        out["pass_latency"] = "measured"
    util = report.get("utilization")
    if isinstance(util, dict) and util.get("basis") in BASES:
        out["utilization"] = util["basis"]
    energy = report.get("energy")
    if isinstance(energy, dict) and energy.get("available") is not False and energy:
        out["energy"] = "measured"
    cost = report.get("cost")
    if isinstance(cost, dict) and cost.get("available") is not False and cost:
        out["cost"] = "estimated"
    if isinstance(report.get("memory"), dict) and report["memory"]:
        out["memory"] = "measured"
    if isinstance(report.get("quality"), dict) and report["quality"]:
        out["quality"] = "measured"
    if isinstance(report.get("server"), dict) and report["server"]:
        out["server"] = "recorded"
    return out


def basis(report: dict[str, Any], key: str) -> str | None:
    """The basis of figure ``key`` in ``report`` (what the record says, else what its sections show)."""
    family = "quality" if ":" in key else get(key).family
    said = report.get("basis") if isinstance(report, dict) else None
    if isinstance(said, dict) and family in said:
        return said[family]
    return bases(report).get(family)


def peak_kind(report: dict[str, Any]) -> str | None:
    """Which kind of peak the utilization was measured against (datasheet, calibrated or user)."""
    return dig(report, ("utilization", "peak", "kind"))


_POWER = {"measured": "measured power", "tdp": "rated power (TDP)", "tdp*utilization": "rated power x utilization"}


def basis_summary(report: dict[str, Any]) -> str:
    """How a record's figures that are not plainly measured were got, e.g. ``util=traced (calibrated
    peak); cost=estimated (rated power (TDP), catalog prices)``; ``measured`` when all are."""
    rep = report if isinstance(report, dict) else {}
    said = rep.get("basis") if isinstance(rep.get("basis"), dict) else bases(rep)
    parts = []
    util = rep.get("utilization") if isinstance(rep.get("utilization"), dict) else {}
    kind = dig(util, ("peak", "kind"))
    if said.get("utilization") and said["utilization"] != "measured":
        parts.append(f"util={said['utilization']}" + (f" ({kind} peak)" if kind else ""))
    cost = rep.get("cost") if isinstance(rep.get("cost"), dict) else {}
    if said.get("cost") and said["cost"] != "measured":
        how = []
        if cost.get("power_source"):
            how.append(_POWER.get(str(cost["power_source"]), str(cost["power_source"])))
        sources = dig(cost, ("inputs", "sources"))
        if isinstance(sources, dict) and sources:
            catalog = any(str(v).startswith("catalog") for v in sources.values())
            user = any(str(v).startswith(("override", "user")) for v in sources.values())
            how.append("catalog + user prices" if catalog and user else "catalog prices" if catalog
                       else "user prices")
        parts.append(f"cost={said['cost']}" + (f" ({', '.join(how)})" if how else ""))
    for fam in ("latency", "throughput", "pass_latency", "energy", "memory", "server"):
        if said.get(fam) and said[fam] != "measured":
            parts.append(f"{fam}={said[fam]}")
    energy = rep.get("energy") if isinstance(rep.get("energy"), dict) else {}
    if energy.get("available") and energy.get("method"):
        parts.append(f"energy=measured ({energy['method']})")
    return "; ".join(parts) or "measured"
