"""Client-side serving latency and throughput, with vLLM's definitions (DESIGN.md section 2, Latency).

All inputs are per-request timestamps in seconds; all outputs carry their unit in the field name.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), q in [0, 100]; NaN for no values."""
    xs = sorted(values)
    if not xs:
        return math.nan
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def stats(values: Iterable[float], scale: float = 1.0) -> dict[str, float]:
    """mean, median, p90, p99 (and n) of ``values`` times ``scale``."""
    xs = [v * scale for v in values]
    if not xs:
        return {"n": 0, "mean": math.nan, "median": math.nan, "p90": math.nan, "p99": math.nan}
    return {
        "n": len(xs),
        "mean": sum(xs) / len(xs),
        "median": percentile(xs, 50),
        "p90": percentile(xs, 90),
        "p99": percentile(xs, 99),
    }


def request_latencies(send_s: float, token_times_s: Sequence[float]) -> dict[str, Any]:
    """TTFT, E2EL, TPOT and ITLs (seconds) of one request; TPOT is None with fewer than 2 tokens."""
    if not token_times_s:
        return {"ttft_s": None, "e2el_s": None, "tpot_s": None, "itl_s": []}
    ttft = token_times_s[0] - send_s
    e2el = token_times_s[-1] - send_s
    n = len(token_times_s)
    tpot = (e2el - ttft) / (n - 1) if n > 1 else None
    itl = [b - a for a, b in zip(token_times_s, token_times_s[1:])]
    return {"ttft_s": ttft, "e2el_s": e2el, "tpot_s": tpot, "itl_s": itl}


def summarize_requests(requests: Sequence[Any], slo_ms: dict[str, float] | None = None) -> dict[str, Any]:
    """Pool per-request figures into the record's ``latency`` and ``throughput`` sections.

    ``requests``: objects with ``send_s``, ``token_times_s``, ``input_tokens`` and ``error``.
    Failed requests count in ``failed`` and never vanish; they add no latency samples.
    ``slo_ms``: optional ``{"ttft_ms": x, "tpot_ms": y, "e2el_ms": z}`` for goodput.
    """
    ok = [r for r in requests if not r.error and r.token_times_s]
    failed = len(requests) - len(ok)
    per = [request_latencies(r.send_s, r.token_times_s) for r in ok]
    ttft = [p["ttft_s"] for p in per]
    e2el = [p["e2el_s"] for p in per]
    tpot = [p["tpot_s"] for p in per if p["tpot_s"] is not None]
    itl = [x for p in per for x in p["itl_s"]]

    out_tokens = sum(len(r.token_times_s) for r in ok)
    in_tokens = sum(r.input_tokens for r in ok)
    if requests:
        start = min(r.send_s for r in requests)
        ends = [r.token_times_s[-1] for r in ok]
        duration = (max(ends) - start) if ends else 0.0
    else:
        duration = 0.0

    latency = {
        "ttft_ms": stats(ttft, 1e3),
        "tpot_ms": stats(tpot, 1e3),
        "itl_ms": stats(itl, 1e3),
        "e2el_ms": stats(e2el, 1e3),
    }
    throughput: dict[str, Any] = {
        "completed": len(ok),
        "failed": failed,
        "duration_s": duration,
        "input_tokens": in_tokens,
        "output_tokens": out_tokens,
        "output_tokens_per_s": out_tokens / duration if duration > 0 else math.nan,
        "total_tokens_per_s": (in_tokens + out_tokens) / duration if duration > 0 else math.nan,
        "requests_per_s": len(ok) / duration if duration > 0 else math.nan,
    }
    if slo_ms:
        good = 0
        for p in per:
            checks = {
                "ttft_ms": p["ttft_s"] * 1e3,
                "e2el_ms": p["e2el_s"] * 1e3,
                "tpot_ms": (p["tpot_s"] or 0.0) * 1e3,
            }
            if all(checks[k] <= v for k, v in slo_ms.items()):
                good += 1
        throughput["goodput_requests_per_s"] = good / duration if duration > 0 else math.nan
        throughput["slo_ms"] = dict(slo_ms)
    return {"latency": latency, "throughput": throughput}


def pass_latency(passes: Sequence[Any]) -> dict[str, Any]:
    """Server-side per-pass latency by phase: ``prefill_pass_ms`` and ``decode_pass_ms``."""
    return {
        f"{phase}_pass_ms": stats([p.time_s for p in passes if p.phase == phase], 1e3)
        for phase in ("prefill", "decode")
    }
