"""Load generation for serving benchmarks: arrival schedules and a dispatcher (DESIGN.md section 2, Load).

A load is a max concurrency, an arrival rate (Poisson, or gamma with a burstiness factor as in vLLM's
``benchmark_serving``), or both. :func:`run_load` sends every request through a caller-supplied
``send(request, origin)`` coroutine (for instance a ``functools.partial`` of
``moecap.runners.openai_client.stream_request``) and records, per request, the scheduled time, the time it
was handed to ``send`` (``dispatch_s``) and the time ``send`` returned (``finish_s``), all in seconds from
the run's origin (a ``time.perf_counter()`` value).
"""

from __future__ import annotations

import asyncio
import gc
import math
import time
from typing import Any, Awaitable, Callable, Sequence

ARRIVALS = ("poisson", "gamma")


def arrival_times(n: int, rate: float | None, arrival: str = "poisson", burstiness: float = 1.0,
                  seed: int = 0) -> list[float]:
    """Send times (seconds from the start) of ``n`` requests arriving at ``rate`` requests per second.

    Inter-arrival gaps are gamma distributed with shape ``burstiness`` and scale
    ``1 / (rate * burstiness)`` (vLLM's convention): the mean gap is ``1 / rate`` whatever the
    burstiness; burstiness 1 is a Poisson process, below 1 burstier, above 1 more regular.
    ``arrival='poisson'`` forces burstiness 1. The first request goes at 0. ``rate`` None or inf: all at 0.
    """
    if n < 0:
        raise ValueError(f"n={n}: must be >= 0")
    if arrival not in ARRIVALS:
        raise ValueError(f"arrival={arrival!r}: allowed: {', '.join(ARRIVALS)}")
    if rate is None or math.isinf(rate):
        return [0.0] * n
    if not rate > 0:
        raise ValueError(f"rate={rate}: must be > 0 (or inf)")
    if arrival == "poisson":
        burstiness = 1.0
    if not burstiness > 0:
        raise ValueError(f"burstiness={burstiness}: must be > 0")
    if n == 0:
        return []
    import numpy as np

    rng = np.random.default_rng(seed)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n - 1)
    return [0.0] + [float(t) for t in np.cumsum(gaps)]


def _stamp(trace: Any, **values: Any) -> None:
    """Record load-generator times on a trace: as attributes, or in its ``extra`` dict if it has no slot."""
    for key, value in values.items():
        if hasattr(trace, key):
            setattr(trace, key, value)
        elif isinstance(getattr(trace, "extra", None), dict):
            trace.extra[key] = value
        else:
            try:
                setattr(trace, key, value)
            except AttributeError:
                pass


async def run_load(requests: Sequence[Any], send: Callable[[Any, float], Awaitable[Any]],
                   concurrency: int | None = None, rate: float | None = None, arrival: str = "poisson",
                   burstiness: float = 1.0, seed: int = 0, warmup: int | Sequence[Any] = 0,
                   on_measure: Callable[[], Any] | None = None) -> list[Any]:
    """Send ``requests`` through ``send(request, origin)`` under the load; return their traces in order.

    ``concurrency``: at most this many requests in flight (None: no limit). ``rate``: requests per second
    with ``arrival``/``burstiness``/``seed`` (None or inf: all at once). A request waits for its scheduled
    time, then for a concurrency slot, so under both limits a late request is sent as soon as a slot frees.
    ``warmup``: requests sent and awaited first, with the same concurrency and no schedule, their traces
    dropped: a list of them (prompts of their own, so that no server cache is primed for the measured
    ones), or a count (the first measured requests, cycled). The garbage collector is frozen and disabled
    for the timed window and restored afterwards, so collections of the harness's own objects do not
    land in the measured latencies. ``on_measure()`` is called once, after the warm-up and before the
    first timed request (e.g. to snapshot a server's own counters).
    """
    if concurrency is not None and concurrency < 1:
        raise ValueError(f"concurrency={concurrency}: must be >= 1")
    requests = list(requests)
    if isinstance(warmup, int):
        if warmup < 0:
            raise ValueError(f"warmup={warmup}: must be >= 0")
        warm = [requests[i % len(requests)] for i in range(warmup)] if requests else []
    else:
        warm = list(warmup)
    schedule = arrival_times(len(requests), rate, arrival, burstiness, seed)
    limit = asyncio.Semaphore(concurrency) if concurrency else None

    async def one(request: Any, origin: float, at: float | None) -> Any:
        if at is not None:
            delay = origin + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
        if limit is not None:
            await limit.acquire()
        try:
            dispatch = time.perf_counter() - origin
            trace = await send(request, origin)
            finish = time.perf_counter() - origin
        finally:
            if limit is not None:
                limit.release()
        _stamp(trace, scheduled_s=at, dispatch_s=dispatch, finish_s=finish)
        return trace

    if warm:
        origin = time.perf_counter()
        await asyncio.gather(*(one(w, origin, None) for w in warm))
    if on_measure is not None:
        await asyncio.get_running_loop().run_in_executor(None, on_measure)

    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        origin = time.perf_counter()
        timed = rate is not None and not math.isinf(rate)
        traces = await asyncio.gather(*(one(r, origin, t if timed else 0.0)
                                        for r, t in zip(requests, schedule)))
    finally:
        gc.unfreeze()
        if gc_was_enabled:
            gc.enable()
    return list(traces)
