"""An async streaming client for OpenAI-compatible servers (vLLM, SGLang, llama.cpp server, ours).

One call to :func:`stream_request` sends one ``/v1/completions`` or ``/v1/chat/completions`` request with
``stream: true`` and returns a :class:`StreamTrace`: when the request was sent and when every streamed
chunk that carried output arrived, in seconds from the caller's ``origin`` (a ``time.perf_counter()``
value shared by the whole run). Failures (HTTP status, connection error, timeout, malformed SSE, an
error object in the stream, a stream cut short) are kept on the trace as ``error``, never raised, so
``moecap.metrics.latency.summarize_requests`` counts them as failed.

Output tokens. The server's final ``usage`` (asked for with ``stream_options.include_usage``) is the
count of record (``output_tokens_source == "usage"``). We also ask for
``stream_options.continuous_usage_stats`` (vLLM, SGLang, our server): then every chunk carries the
cumulative ``completion_tokens`` and we know how many tokens each chunk carried. Without it (llama.cpp's
llama-server, which puts its final usage on the chunk that carries the ``finish_reason``), a chunk counts
as one token when it carries text, and a usage arriving after text chunks without one is the total, never
tokens arriving at that chunk's time. When the final usage reports more tokens than were counted, chunks
carried several tokens each (``multi_token_chunks``; the surplus, attributed to no chunk, is added to the
last chunk's count so the total stays the server's); a usage below the count, or running counts that
disagree with it, fail the request (``token_count_mismatch``). Without any usage the chunk count is used
(``output_tokens_source == "chunks"``).

Connections. A request that fails before any response because a pooled keep-alive connection was
already closed by the server (``ServerDisconnectedError``, ``ClientOSError`` other than a refused
connect) is sent again on another connection, at most ``MAX_CONNECTION_RETRIES`` times, timed from the
send that was answered (``extra.connection_retries``): a client's own connection reuse never fails a
request.

``chunk_times_s``/``chunk_tokens`` are what vLLM's ITL uses (one gap per chunk); ``token_times_s`` holds
one time per output token (a chunk carrying k tokens appears k times) for figures counted per token.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

from moecap.runners.base import RequestTrace

READ_BUFSIZE = 16 * 1024 * 1024  # one SSE line can be large (logprobs, long chunks): >= 10 MB
MAX_CONNECTION_RETRIES = 2  # a request sent again after a stale pooled connection failed it


@dataclass
class StreamTrace(RequestTrace):
    """A :class:`RequestTrace` plus what a streaming HTTP client saw."""

    scheduled_s: float | None = None  # when the load generator meant to send it (None: no schedule)
    chunk_tokens_known: bool = False  # True when the server reported per-chunk counts
    multi_token_chunks: bool = False  # some chunk carried more than one token
    output_tokens_source: str = "none"  # "usage" | "chunks" | "none"
    usage: dict[str, Any] | None = None  # the server's final usage object
    http_status: int | None = None
    finish_reason: str | None = None
    text: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def make_session(timeout_s: float | None = None, limit: int = 0):
    """An ``aiohttp.ClientSession`` fit for benchmarking: large read buffer, no connection cap."""
    import aiohttp

    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit, force_close=False),
        timeout=aiohttp.ClientTimeout(total=timeout_s),
        read_bufsize=READ_BUFSIZE,
    )


def build_payload(model: str, prompt: str | list[int], max_tokens: int, ignore_eos: bool = True,
                  chat: bool = False, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON body of a streaming (chat) completion request."""
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        "ignore_eos": ignore_eos,
    }
    if chat:
        if not isinstance(prompt, str):
            raise ValueError("chat requests take a text prompt, not token ids")
        body["messages"] = [{"role": "user", "content": prompt}]
        body["max_completion_tokens"] = max_tokens
    else:
        body["prompt"] = prompt
    if extra:
        body.update(extra)
    return body


def _chunk_text(choice: dict[str, Any], chat: bool) -> str:
    if not chat:
        return choice.get("text") or ""
    delta = choice.get("delta") or {}
    parts = [delta.get("content"), delta.get("reasoning_content"), delta.get("reasoning")]
    text = "".join(p for p in parts if isinstance(p, str))
    if delta.get("tool_calls"):
        text += json.dumps(delta["tool_calls"])
    return text


async def stream_request(session, base_url: str, model: str, prompt: str | list[int], max_tokens: int,
                         ignore_eos: bool = True, chat: bool = False, extra: dict[str, Any] | None = None,
                         *, origin: float, id: int = 0, input_tokens: int | None = None,
                         api_key: str | None = None, timeout_s: float | None = None) -> StreamTrace:
    """Send one streaming request and trace it; never raises for a failed request (see module doc).

    ``origin``: the run's ``time.perf_counter()`` zero. ``input_tokens``: the prompt length when the
    caller knows it (token-id prompts are counted here; otherwise the server's ``usage.prompt_tokens``).
    """
    import aiohttp

    path = "/v1/chat/completions" if chat else "/v1/completions"
    url = base_url.rstrip("/") + path
    if input_tokens is None and isinstance(prompt, list):
        input_tokens = len(prompt)
    trace = StreamTrace(id=id, input_tokens=input_tokens or 0, send_s=0.0)
    try:
        body = build_payload(model, prompt, max_tokens, ignore_eos, chat, extra)
    except ValueError as e:
        trace.send_s = trace.finish_s = time.perf_counter() - origin
        trace.error = f"bad request: {e}"
        return trace
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    kwargs: dict[str, Any] = {"json": body, "headers": headers}
    if timeout_s is not None:
        kwargs["timeout"] = aiohttp.ClientTimeout(total=timeout_s)

    state = _StreamState(trace, chat)
    retries = 0
    try:
        while True:
            trace.send_s = time.perf_counter() - origin
            try:
                async with session.post(url, **kwargs) as resp:
                    trace.http_status = resp.status
                    if resp.status != 200:
                        raw = await resp.text()
                        try:
                            msg = json.loads(raw).get("error", raw)
                            if isinstance(msg, dict):
                                msg = msg.get("message", msg)
                        except (ValueError, AttributeError):
                            msg = raw
                        trace.error = f"HTTP {resp.status}: {str(msg)[:500]}"
                        return trace
                    await _read_events(resp, state, origin)
                break
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as e:
                # a pooled keep-alive connection the server had already closed (llama-server closes
                # idle or well-used ones) fails before any response: that is the client's own fault, so
                # the request goes again on a fresh connection, timed from its new send
                stale = trace.http_status is None and not isinstance(e, aiohttp.ClientConnectorError)
                if not stale or retries >= MAX_CONNECTION_RETRIES:
                    raise
                retries += 1
                trace.extra["connection_retries"] = retries
                trace.extra.setdefault("connection_errors", []).append(f"{type(e).__name__}: {e}"[:200])
    except asyncio.CancelledError:
        raise
    except asyncio.TimeoutError:
        trace.error = "timeout"
    except aiohttp.ClientResponseError as e:
        trace.error = f"HTTP {e.status}: {e.message}"
    except aiohttp.ClientError as e:
        trace.error = f"{type(e).__name__}: {e}"
    except (OSError, ValueError) as e:  # a line over the read buffer, a reset socket
        trace.error = f"{type(e).__name__}: {e}"
    finally:
        trace.finish_s = time.perf_counter() - origin
    _finalize(trace, state.per_chunk_usage, state.text_chunks, input_tokens)
    trace.text = "".join(state.parts)
    return trace


async def _read_events(resp, state: "_StreamState", origin: float) -> None:
    """Read an SSE body into ``state``: an event is timed by the arrival of its first data line."""
    trace = state.trace
    data_lines: list[str] = []
    event_s = 0.0
    async for raw_line in resp.content:
        now = time.perf_counter() - origin
        line = raw_line.decode("utf-8", errors="replace").rstrip("\r\n")
        if line.startswith("data:"):
            if not data_lines:
                event_s = now
            data_lines.append(line[5:].removeprefix(" "))
        elif line == "" and data_lines:
            if not state.event("\n".join(data_lines), event_s):
                return
            data_lines = []
        # comments (":..."), "event:", "id:", "retry:" lines are ignored
    if data_lines:  # the last event without its blank line
        state.event("\n".join(data_lines), event_s)
    if not state.done and trace.finish_reason is None and trace.error is None:
        trace.error = "stream ended before [DONE] or a finish_reason"


class _StreamState:
    """Applies one SSE event after another to a trace.

    A chunk's ``usage`` is read as a per-chunk running count (``continuous_usage_stats``) only while
    every output chunk so far carried one; once a chunk with text came without usage, the chunks are
    counted one token each and a later usage (llama-server puts the final usage on the chunk that
    carries the ``finish_reason``) is the request's total, never tokens arriving at that chunk's time.
    """

    def __init__(self, trace: StreamTrace, chat: bool):
        self.trace, self.chat = trace, chat
        self.text_chunks = 0  # chunks that carried text (the fallback count)
        self.cum_tokens = 0  # cumulative completion tokens reported by continuous usage
        self.per_chunk_usage = True  # every output chunk so far carried a cumulative count
        self.done = False
        self.parts: list[str] = []

    def event(self, payload: str, t: float) -> bool:
        """Handle one event's data; False when the stream must stop (an error was recorded)."""
        trace = self.trace
        if payload.strip() == "[DONE]":
            self.done = True
            return True
        try:
            obj = json.loads(payload)
        except ValueError:
            obj = None
        if not isinstance(obj, dict):
            trace.error = f"malformed SSE data: {payload[:200]!r}"
            return False
        if obj.get("error"):
            err = obj["error"]
            msg = err.get("message", err) if isinstance(err, dict) else err
            trace.error = f"server error in stream: {str(msg)[:500]}"
            return False
        usage = obj.get("usage")
        choices = obj.get("choices") or []
        text = ""
        for ch in choices:
            if not isinstance(ch, dict):
                trace.error = f"malformed SSE data: {payload[:200]!r}"
                return False
            text += _chunk_text(ch, self.chat)
            if ch.get("finish_reason"):
                trace.finish_reason = ch["finish_reason"]
        count = usage.get("completion_tokens") if isinstance(usage, dict) else None
        n_new = 0
        if choices and self.per_chunk_usage and isinstance(count, int) and not isinstance(count, bool):
            n_new = count - self.cum_tokens
            if n_new < 0:
                trace.error = (f"the server's running completion_tokens went down from {self.cum_tokens} "
                               f"to {count}")
                return False
            self.cum_tokens = count
        elif text:
            self.per_chunk_usage = False
            n_new = 1
        if text:
            self.text_chunks += 1
            self.parts.append(text)
        if n_new > 0:
            trace.chunk_times_s.append(t)
            trace.chunk_tokens.append(n_new)
        if isinstance(usage, dict):
            trace.usage = usage
        return True


def _finalize(trace: StreamTrace, per_chunk_usage: bool, text_chunks: int, input_tokens: int | None) -> None:
    """Fix the output token count and expand chunk times into per-token times.

    The server's final usage is the count of record. With per-chunk running counts it must equal their
    sum; counted one token per text chunk it may exceed the count (chunks that carried several tokens,
    e.g. speculative decoding or text held back by the detokenizer: ``multi_token_chunks``, the surplus
    attributed to no chunk, ``extra.unattributed_tokens``) but never fall below it. A count that
    contradicts the usage is an error of the request, so the request is failed, not silently fixed.
    """
    trace.chunk_tokens_known = bool(trace.chunk_times_s) and per_chunk_usage
    usage_out = None
    if trace.usage and trace.usage.get("completion_tokens") is not None:
        try:
            usage_out = int(trace.usage["completion_tokens"])
        except (TypeError, ValueError):
            usage_out = None
            if trace.error is None:
                trace.error = f"malformed usage.completion_tokens: {trace.usage['completion_tokens']!r}"
        if input_tokens is None and trace.usage.get("prompt_tokens") is not None:
            trace.input_tokens = int(trace.usage["prompt_tokens"])
    counted = sum(trace.chunk_tokens)
    trace.extra["text_chunks"] = text_chunks
    if usage_out is not None and trace.chunk_times_s:
        trace.output_tokens_source = "usage"
        if per_chunk_usage and usage_out != counted:
            mismatch = f"the server's usage reports {usage_out} output tokens, its running counts {counted}"
        elif usage_out < counted:
            mismatch = f"the server's usage reports {usage_out} output tokens, but {counted} chunks carried text"
        else:
            mismatch = None
        if mismatch:
            trace.extra["token_count_mismatch"] = {"usage": usage_out, "chunks": counted}
            if trace.error is None:
                trace.error = mismatch
        elif usage_out > counted:  # tokens the chunks did not account for: they rode on some chunk
            trace.extra["unattributed_tokens"] = usage_out - counted
            trace.chunk_tokens[-1] += usage_out - counted
            trace.chunk_tokens_known = False
    elif trace.chunk_times_s:
        trace.output_tokens_source = "chunks"
    trace.multi_token_chunks = any(k > 1 for k in trace.chunk_tokens)
    trace.token_times_s = [t for t, k in zip(trace.chunk_times_s, trace.chunk_tokens) for _ in range(k)]
    if trace.error is None and not trace.token_times_s and (usage_out or 0) > 0:
        trace.error = "usage reports output tokens but no chunk carried any"
