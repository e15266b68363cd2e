"""The streaming OpenAI client and the load generator, against a real HTTP server generating real tokens."""

from __future__ import annotations

import asyncio
import json
import math
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("aiohttp")

from moecap.metrics.latency import summarize_requests  # noqa: E402
from moecap.runners.loadgen import arrival_times, run_load  # noqa: E402
from moecap.runners.openai_client import StreamTrace, make_session, stream_request  # noqa: E402
from conftest import free_port, running_server  # noqa: E402

SERVER = Path(__file__).parent / "servers" / "tiny_openai_server.py"
MODEL = "tiny-moe"


@pytest.fixture(scope="module")
def server(tiny_moe_dir):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, str(SERVER), "--model", str(tiny_moe_dir), "--port", str(port), "--served-model-name", MODEL]
    with running_server(cmd, url + "/health", deadline_s=60):
        yield url


def _run(coro):
    return asyncio.run(coro)


async def _send_all(url, prompts, max_tokens, chat=False, model=MODEL):
    async with make_session() as session:
        origin = time.perf_counter()
        return [await stream_request(session, url, model, p, max_tokens, chat=chat, origin=origin, id=i)
                for i, p in enumerate(prompts)]


def test_models_and_health(server):
    with urllib.request.urlopen(server + "/v1/models", timeout=5) as r:
        assert [m["id"] for m in json.load(r)["data"]] == [MODEL]


@pytest.mark.parametrize("chat", [False, True])
def test_stream_timestamps_usage_and_summary(server, chat):
    prompts = ["def main(", "The quick brown", [5, 6, 7, 8, 9, 10]] if not chat else ["hello", "import os"]
    traces = _run(_send_all(server, prompts, 12, chat=chat))
    for t, p in zip(traces, prompts):
        assert isinstance(t, StreamTrace)
        assert t.error is None, t.error
        assert t.http_status == 200
        assert t.output_tokens == 12  # ignore_eos: exactly max_tokens
        assert t.output_tokens_source == "usage" and t.usage["completion_tokens"] == 12
        assert t.chunk_tokens_known and t.chunk_tokens == [1] * 12 and not t.multi_token_chunks
        times = [t.send_s] + t.token_times_s + [t.finish_s]
        assert all(a <= b for a, b in zip(times, times[1:])), times
        assert t.token_times_s[0] > t.send_s
        assert t.input_tokens == (len(p) if isinstance(p, list) else t.usage["prompt_tokens"]) > 0
    s = summarize_requests(traces)
    lat, thr = s["latency"], s["throughput"]
    assert thr["completed"] == len(prompts) and thr["failed"] == 0
    assert thr["output_tokens"] == 12 * len(prompts)
    assert lat["ttft_ms"]["n"] == len(prompts) and lat["tpot_ms"]["n"] == len(prompts)
    assert lat["itl_ms"]["n"] == 11 * len(prompts)
    for k in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
        st = lat[k]
        assert 0 <= st["median"] <= st["p90"] <= st["p99"] and st["mean"] > 0, (k, st)


def test_failures_are_kept(server):
    async def go():
        async with make_session() as session:
            origin = time.perf_counter()
            bad = await stream_request(session, server, "no-such-model", "hi", 4, origin=origin, id=0)
            good = await stream_request(session, server, MODEL, "hi", 4, origin=origin, id=1)
            too_long = await stream_request(session, server, MODEL, "hi", 100_000, origin=origin, id=2)
            port = free_port()  # nothing listens there
            refused = await stream_request(session, f"http://127.0.0.1:{port}", MODEL, "hi", 4, origin=origin, id=3)
            return [bad, good, too_long, refused]

    bad, good, too_long, refused = _run(go())
    assert bad.http_status == 404 and "does not exist" in bad.error and bad.token_times_s == []
    assert too_long.http_status == 400 and "context length" in too_long.error
    assert refused.http_status is None and refused.error and "connect" in refused.error.lower()
    assert good.error is None and good.output_tokens == 4
    s = summarize_requests([bad, good, too_long, refused])["throughput"]
    assert s["completed"] == 1 and s["failed"] == 3


def test_fixed_concurrency_caps_in_flight(server):
    prompts = [f"x = {i}" for i in range(6)]

    async def go():
        async with make_session() as session:
            send = lambda p, origin: stream_request(session, server, MODEL, p, 8, origin=origin)  # noqa: E731
            return await run_load(prompts, send, concurrency=2)

    traces = _run(go())
    assert all(t.error is None and t.output_tokens == 8 for t in traces)
    events = sorted([(t.send_s, 1) for t in traces] + [(t.finish_s, -1) for t in traces],
                    key=lambda e: (e[0], e[1]))  # a finish at the same instant frees its slot first
    inflight = peak = 0
    for _, d in events:
        inflight += d
        peak = max(peak, inflight)
    assert peak == 2
    assert all(t.dispatch_s <= t.send_s <= t.finish_s for t in traces)
    assert all(t.scheduled_s == 0.0 for t in traces)


def test_concurrency_limit_exact_with_fake_backend():
    state = {"now": 0, "peak": 0}

    async def send(req, origin):
        state["now"] += 1
        state["peak"] = max(state["peak"], state["now"])
        await asyncio.sleep(0.01)
        state["now"] -= 1
        return StreamTrace(id=req, input_tokens=1, send_s=time.perf_counter() - origin)

    _run(run_load(range(12), send, concurrency=3))
    assert state["peak"] == 3
    state["peak"] = 0
    _run(run_load(range(12), send))
    assert state["peak"] == 12


def test_rate_schedule_is_followed_and_gc_restored():
    import gc

    assert gc.isenabled()
    seen = []

    async def send(req, origin):
        seen.append(gc.isenabled())
        return StreamTrace(id=req, input_tokens=1, send_s=time.perf_counter() - origin)

    traces = _run(run_load(range(20), send, rate=200.0, arrival="gamma", burstiness=0.5, seed=3))
    expected = arrival_times(20, 200.0, "gamma", 0.5, seed=3)
    assert [t.scheduled_s for t in traces] == expected
    for t in traces:
        assert t.dispatch_s >= t.scheduled_s - 1e-6
        assert t.dispatch_s - t.scheduled_s < 0.05  # sent on time, within loop jitter
    assert seen and not any(seen)  # GC off while timed
    assert gc.isenabled() and gc.get_freeze_count() == 0


@pytest.mark.parametrize("arrival,burstiness", [("poisson", 1.0), ("gamma", 1.0), ("gamma", 0.25), ("gamma", 4.0)])
def test_arrival_times_statistics(arrival, burstiness):
    n, rate = 2000, 8.0
    a = arrival_times(n, rate, arrival, burstiness, seed=7)
    assert a == arrival_times(n, rate, arrival, burstiness, seed=7)
    assert a != arrival_times(n, rate, arrival, burstiness, seed=8)
    assert a[0] == 0.0 and all(x <= y for x, y in zip(a, a[1:]))
    gaps = [y - x for x, y in zip(a, a[1:])]
    mean = sum(gaps) / len(gaps)
    # gamma(k, 1/(rate k)): mean 1/rate, sd 1/(rate sqrt(k)); allow 5 standard errors
    se = (1 / rate) / math.sqrt(burstiness) / math.sqrt(len(gaps))
    assert abs(mean - 1 / rate) < 5 * se
    var = sum((g - mean) ** 2 for g in gaps) / (len(gaps) - 1)
    cv2 = var / mean**2  # squared coefficient of variation = 1 / burstiness
    assert abs(cv2 - 1 / burstiness) < 0.35 / burstiness


def test_arrival_times_edge_cases():
    assert arrival_times(5, math.inf) == [0.0] * 5
    assert arrival_times(3, None) == [0.0] * 3
    assert arrival_times(0, 1.0) == []
    # poisson ignores burstiness: it is gamma with shape 1
    assert arrival_times(50, 2.0, "poisson", 3.0, seed=1) == arrival_times(50, 2.0, "gamma", 1.0, seed=1)
    for bad in (dict(rate=0.0), dict(rate=-1.0), dict(rate=1.0, arrival="uniform"),
                dict(rate=1.0, arrival="gamma", burstiness=0.0)):
        with pytest.raises(ValueError):
            arrival_times(10, **bad)


def test_warmup_requests_are_excluded(server):
    calls = []

    async def go():
        async with make_session() as session:
            async def send(p, origin):
                calls.append(p)
                return await stream_request(session, server, MODEL, p, 4, origin=origin)

            return await run_load(["a", "b", "c"], send, concurrency=2, warmup=2)

    traces = _run(go())
    assert len(traces) == 3 and calls[:2] == ["a", "b"] and len(calls) == 5
    assert sorted(calls[2:]) == ["a", "b", "c"]
    assert all(t.error is None for t in traces)
    # the timed window starts after the warm-up: every kept trace was sent at or after the origin
    assert min(t.send_s for t in traces) >= 0 and min(t.dispatch_s for t in traces) < 0.05


def test_malformed_sse_and_truncated_stream_are_errors():
    """A throwaway aiohttp server that speaks broken SSE."""
    from aiohttp import web

    async def broken(request):
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b'data: {"choices": [{"index": 0, "text": "a"}]}\n\n')
        await resp.write(b"data: {not json\n\n")
        await resp.write_eof()
        return resp

    async def cut(request):
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b'data: {"choices": [{"index": 0, "text": "a"}]}\n\n')
        await resp.write(b'data: {"choices": [{"index": 0, "text": "bc"}]}\n\n')
        await resp.write_eof()
        return resp

    async def multi(request):  # no per-chunk usage; the final usage says 5 tokens over 2 text chunks
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b': keep-alive\n\ndata: {"choices": [{"index": 0, "text": "a"}]}\n\n')
        await resp.write(b'data: {"choices": [{"index": 0, "text": "bcde", "finish_reason": "length"}]}\n\n')
        await resp.write(b'data: {"choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 5}}\n\ndata: [DONE]\n\n')
        await resp.write_eof()
        return resp

    async def go():
        app = web.Application()
        app.router.add_post("/broken/v1/completions", broken)
        app.router.add_post("/cut/v1/completions", cut)
        app.router.add_post("/multi/v1/completions", multi)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        try:
            async with make_session() as session:
                o = time.perf_counter()
                base = f"http://127.0.0.1:{port}"
                return [await stream_request(session, f"{base}/{k}", "m", "hi", 5, origin=o)
                        for k in ("broken", "cut", "multi")]
        finally:
            await runner.cleanup()

    broken_t, cut_t, multi_t = _run(go())
    assert "malformed SSE" in broken_t.error and broken_t.output_tokens == 1
    assert "ended before" in cut_t.error and cut_t.output_tokens_source == "chunks"
    assert multi_t.error is None and multi_t.output_tokens == 5 and multi_t.output_tokens_source == "usage"
    assert multi_t.multi_token_chunks and not multi_t.chunk_tokens_known and multi_t.chunk_tokens == [1, 4]
    assert multi_t.input_tokens == 2 and multi_t.text == "abcde"


def _styled(tiny_moe_dir, *flags):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, str(SERVER), "--model", str(tiny_moe_dir), "--port", str(port),
           "--served-model-name", MODEL, *flags]
    return url, running_server(cmd, url + "/health", deadline_s=60)


def _load(url, prompts, max_tokens, concurrency):
    async def go():
        async with make_session() as session:
            send = lambda p, origin: stream_request(session, url, MODEL, p, max_tokens, origin=origin)  # noqa: E731
            return await run_load(prompts, send, concurrency=concurrency)

    return _run(go())


@pytest.mark.parametrize("concurrency", [1, 4])
def test_llama_server_stream_counts_each_token_once(tiny_moe_dir, concurrency):
    """llama-server streams one token per chunk and puts the final usage on the chunk that carries the
    finish_reason: that usage is the total, not 64 more tokens at the last chunk's time (issue 16)."""
    url, ctx = _styled(tiny_moe_dir, "--style", "llamacpp")
    with ctx:
        traces = _load(url, [[7 + i, 8, 9, 10, 11, 12] for i in range(6)], 16, concurrency)
    for t in traces:
        assert t.error is None, t.error
        assert t.output_tokens == 16 and t.usage["completion_tokens"] == 16
        assert t.chunk_tokens == [1] * 16 and not t.multi_token_chunks
        assert t.output_tokens_source == "usage" and t.finish_reason == "length"
    s = summarize_requests(traces)
    lat, thr = s["latency"], s["throughput"]
    assert thr["output_tokens"] == 16 * len(traces) and thr["failed"] == 0
    assert lat["itl_ms"]["n"] == 15 * len(traces)
    # TPOT is the mean gap, not half of it: (E2EL - TTFT) / 15 per request
    for t in traces:
        expect = (t.token_times_s[-1] - t.token_times_s[0]) / 15
        tp = summarize_requests([t])["latency"]["tpot_ms"]["mean"] / 1e3
        assert tp == pytest.approx(expect)
        assert summarize_requests([t])["latency"]["itl_ms"]["mean"] / 1e3 == pytest.approx(expect)


def test_multi_token_chunks_keep_usage_count_and_one_gap_per_chunk(tiny_moe_dir):
    url, ctx = _styled(tiny_moe_dir, "--style", "multi", "--chunk-tokens", "3")
    with ctx:
        traces = _load(url, [[5, 6, 7, 8]] * 3, 10, 1)
    for t in traces:
        assert t.error is None, t.error
        assert t.output_tokens == 10 and t.output_tokens_source == "usage"
        assert len(t.chunk_times_s) == 4  # 3 + 3 + 3 + 1 tokens
        assert t.multi_token_chunks and not t.chunk_tokens_known and t.extra["unattributed_tokens"] == 6
    lat = summarize_requests(traces)["latency"]
    assert lat["itl_ms"]["n"] == 3 * 3  # one gap per chunk, not 9 gaps per request with zeros
    assert lat["tpot_ms"]["n"] == 3


def test_usage_below_the_streamed_count_fails_the_request(tiny_moe_dir):
    url, ctx = _styled(tiny_moe_dir, "--style", "llamacpp", "--usage-offset", "-2")
    with ctx:
        (t,) = _load(url, [[5, 6, 7, 8]], 6, 1)
    assert t.error and "usage reports 4 output tokens" in t.error
    assert t.extra["token_count_mismatch"] == {"usage": 4, "chunks": 6}
    assert summarize_requests([t])["throughput"]["failed"] == 1


def test_a_connection_the_server_closed_is_not_a_failed_request(tiny_moe_dir):
    """A server that closes kept-alive connections (llama-server's cpp-httplib does after a few
    requests or when idle) must not fail requests for the client's own reuse of them (issue 16)."""
    url, ctx = _styled(tiny_moe_dir, "--drop-after", "2")
    with ctx:
        traces = _load(url, [[5 + i, 6, 7, 8] for i in range(10)], 4, 2)
    assert [t.error for t in traces] == [None] * 10
    assert all(t.output_tokens == 4 for t in traces)
    retried = [t for t in traces if t.extra.get("connection_retries")]
    assert retried, "the server dropped reused connections; some request must have been sent again"
    for t in retried:
        assert t.token_times_s[0] > t.send_s  # timed from the send that was answered
