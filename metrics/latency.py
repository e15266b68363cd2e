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


def stats(values: Iterable[float], scale: float = 1.0, empty: float = math.nan) -> dict[str, float]:
    """mean, std (population, as numpy), median, p90, p99 and n of ``values`` times ``scale``.

    ``empty``: what every statistic of no values is (NaN by default; vLLM's benchmark reports 0, and the
    client latency figures follow it, with ``n`` 0 saying there was nothing to measure).
    """
    xs = [v * scale for v in values]
    if not xs:
        return {"n": 0, "mean": empty, "std": empty, "median": empty, "p90": empty, "p99": empty}
    mean = sum(xs) / len(xs)
    return {
        "n": len(xs),
        "mean": mean,
        "std": math.sqrt(sum((x - mean) ** 2 for x in xs) / len(xs)),
        "median": percentile(xs, 50),
        "p90": percentile(xs, 90),
        "p99": percentile(xs, 99),
    }


def request_latencies(send_s: float, chunk_times_s: Sequence[float],
                      chunk_tokens: Sequence[int] | None = None) -> dict[str, Any]:
    """TTFT, E2EL, TPOT and ITLs (seconds) of one request, exactly as ``vllm bench serve``.

    ``chunk_times_s``: arrival of each streamed chunk that carried output; ``chunk_tokens``: the tokens
    each carried (default one each). TTFT: first chunk - send. E2EL: last chunk - send. TPOT:
    (E2EL - TTFT) / (output tokens - 1), None with fewer than 2 tokens. ITL: the gaps between consecutive
    chunks (a chunk of k tokens is one gap). ``itl_per_token_s``: each gap spread evenly over the tokens
    of the chunk that ended it (k values of gap / k), the per-token view under its own name.
    """
    if chunk_tokens is None:
        chunk_tokens = [1] * len(chunk_times_s)
    if len(chunk_tokens) != len(chunk_times_s):
        raise ValueError(f"{len(chunk_times_s)} chunk times but {len(chunk_tokens)} chunk token counts")
    if not chunk_times_s:
        return {"ttft_s": None, "e2el_s": None, "tpot_s": None, "itl_s": [], "itl_per_token_s": [],
                "output_tokens": 0}
    ttft = chunk_times_s[0] - send_s
    e2el = chunk_times_s[-1] - send_s
    n = int(sum(chunk_tokens))
    tpot = (e2el - ttft) / (n - 1) if n > 1 else None
    itl = [b - a for a, b in zip(chunk_times_s, chunk_times_s[1:])]
    per_token = [g / k for g, k in zip(itl, chunk_tokens[1:]) if k > 0 for _ in range(k)]
    return {"ttft_s": ttft, "e2el_s": e2el, "tpot_s": tpot, "itl_s": itl, "itl_per_token_s": per_token,
            "output_tokens": n}


def _start_s(r: Any) -> float:
    d = getattr(r, "dispatch_s", None)
    return d if d is not None else r.send_s


def _end_s(r: Any) -> float:
    f = getattr(r, "finish_s", None)
    if f is not None:
        return f
    return r.token_times_s[-1] if r.token_times_s else r.send_s


def benchmark_duration_s(requests: Sequence[Any]) -> float:
    """The benchmark's wall time as ``vllm bench serve`` takes it: from the first dispatch to the end of
    the last request, failed requests included (0 for no requests)."""
    if not requests:
        return 0.0
    return max(_end_s(r) for r in requests) - min(_start_s(r) for r in requests)


def summarize_requests(requests: Sequence[Any], slo_ms: dict[str, float] | None = None) -> dict[str, Any]:
    """Pool per-request figures into the record's ``latency`` and ``throughput`` sections.

    ``requests``: traces with ``send_s``, ``token_times_s`` (or ``chunks()``), ``input_tokens``,
    ``error`` and optionally ``dispatch_s``/``finish_s``. Failed requests count in ``failed`` and add
    no latency samples, but their time counts in the duration. Latency statistics of an empty set are 0
    with ``n`` 0 (vLLM's convention). ``slo_ms``: optional ``{"ttft_ms": x, "tpot_ms": y, "e2el_ms": z}``
    for goodput (a request of one token has TPOT 0 there, as in vLLM).
    """
    ok = [r for r in requests if not r.error and r.token_times_s]
    failed = len(requests) - len(ok)
    per = []
    for r in ok:
        times, toks = r.chunks() if hasattr(r, "chunks") else (r.token_times_s, None)
        per.append(request_latencies(r.send_s, times, toks))
    ttft = [p["ttft_s"] for p in per]
    e2el = [p["e2el_s"] for p in per]
    tpot = [p["tpot_s"] for p in per if p["tpot_s"] is not None]
    itl = [x for p in per for x in p["itl_s"]]
    itl_tok = [x for p in per for x in p["itl_per_token_s"]]

    out_tokens = sum(p["output_tokens"] for p in per)
    in_tokens = sum(r.input_tokens for r in ok)
    duration = benchmark_duration_s(requests)

    latency = {
        "ttft_ms": stats(ttft, 1e3, empty=0.0),
        "tpot_ms": stats(tpot, 1e3, empty=0.0),
        "itl_ms": stats(itl, 1e3, empty=0.0),
        "itl_per_token_ms": stats(itl_tok, 1e3, empty=0.0),
        "e2el_ms": stats(e2el, 1e3, empty=0.0),
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
