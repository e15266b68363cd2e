"""``moecap serve``: an OpenAI-compatible streaming HTTP server over several models of one family.

    moecap serve MODEL [MODEL ...] [--host 127.0.0.1] [--port 8000] [--backend separate]
                 [--max-batch-size 8] [--max-wait-s 2.0] [--max-consecutive-batches 4]
                 [--device auto] [--dtype auto] [--api-key KEY] [--max-request-bytes 4194304]

``MODEL`` is an embedded model (``tiny-moe-code``), a local Hugging Face directory or a hub id, served
under its own name (a directory: its folder name), or ``NAME=MODEL`` to choose the served name.

Endpoints (aiohttp; the models run in the scheduler's worker thread, and request bodies are parsed and
prompts tokenized in a small pool of threads, never on the event loop, so that one large prompt does not
stall the other clients):

- ``GET /health``: 200 once the models are loaded (503 while shutting down);
- ``GET /v1/models``, ``GET /v1/models/{id}``: OpenAI's list / model objects (plus ``max_model_len``);
- ``POST /v1/completions``, ``POST /v1/chat/completions``: the request's ``model`` picks the model.
  ``prompt`` is a string or a list of token ids (a one-element list of either is unwrapped); chat
  ``messages`` go through the tokenizer's chat template when it has one, else their contents are joined
  with newlines. Fields: ``max_tokens`` (chat: ``max_completion_tokens`` first; default 16 for
  completions, the rest of the context for chat), ``temperature``, ``top_p``, ``top_k``, ``seed``,
  ``stop`` (strings), and vLLM's ``ignore_eos``, ``min_tokens``, ``stop_token_ids``, ``return_token_ids``.
  Log-probabilities (of the raw model distribution, before temperature and filters): completions'
  ``logprobs: N`` (0-20: each token's and the N most likely alternatives) and ``echo: true`` (the prompt
  returned with its tokens' log-probabilities, the first one null; ``max_tokens: 0`` scores the prompt
  only, as lm-eval's and perplexity clients do; not with streaming); chat's ``logprobs: true`` with
  ``top_logprobs: N``.
  ``stream: true`` answers Server-Sent Events in OpenAI's chunk format, one chunk per generated token,
  ending with ``data: [DONE]``; ``stream_options.include_usage`` adds a final usage chunk (and
  ``usage: null`` on the others), ``stream_options.continuous_usage_stats`` puts the cumulative usage on
  every chunk. ``stream: false`` answers one JSON object with ``usage``;
- ``GET /stats``: the scheduler's records (per batch: model, size, switch/prefill/decode seconds; per
  request: queue wait, TTFT, tokens) and the backend's memory.

Access: with an API key (``--api-key`` or, without the flag, ``$MOECAP_API_KEY``, as vLLM's ``--api-key`` /
``VLLM_API_KEY``), every endpoint but ``GET /health`` (a load balancer's probe) wants ``Authorization: Bearer
KEY`` and answers 401 otherwise. The key is compared in constant time and never printed. Without a key, a
server listening beyond the loopback interface warns on stderr at start-up.

Errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: 400 for malformed input
(JSON that is not UTF-8, not an object, nested too deep, or carries unpaired UTF-16 surrogates, which no
tokenizer can encode; missing or invalid fields, ``param`` naming the field), a prompt longer than
``PROMPT_CHARS_PER_TOKEN`` characters per token of context (refused before tokenizing) or beyond the context
in tokens, or ``max_tokens < 1``; 401 without the API key; 404 for an unknown model (the message lists the
served ones) or route; 413 for a body beyond ``--max-request-bytes`` (refused before it is read when it
declares its length); 500 when the backend failed the request's batch (other batches go on); 503 while
shutting down. When a stream has already started, a failure arrives as a ``data: {"error": ...}`` event
before ``data: [DONE]``.
A client that disconnects cancels its request (its row stops generating). SIGTERM and SIGINT stop the
server cleanly: no new connections, running requests aborted, the worker joined, exit status 0.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import math
import re
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aiohttp import web

from moecap.engine.scheduler import (
    ABORT,
    ERROR,
    MAX_LOGPROBS,
    Event,
    Request,
    SamplingParams,
    Scheduler,
    SchedulerClosed,
    asyncio_sink,
)
from moecap.models import parse_model_specs  # noqa: F401  (moecap serve's MODEL / NAME=MODEL arguments)

log = logging.getLogger(__name__)

# A whole 128k-token prompt fits as token ids (about 7 bytes each in JSON) or as text, even JSON-escaped;
# a bigger body is refused with 413 before it is parsed (or, when it declares its length, read).
DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024
# Characters of prompt per token of context a prompt may have before it is tokenized: real text averages
# 3-5 characters a token and no tokenizer's tokens average 32, so only a prompt that could never fit is
# refused, without paying its tokenization (seconds and hundreds of MB for a 10 MB prompt).
PROMPT_CHARS_PER_TOKEN = 32
# Bodies beyond this are parsed in the tokenizer threads rather than on the event loop.
PARSE_IN_THREAD_BYTES = 64 * 1024
# Threads that parse bodies and tokenize prompts: enough that one huge prompt leaves room for the others.
TOKENIZER_THREADS = 4
API_KEY_ENV = "MOECAP_API_KEY"
SHUTDOWN_TIMEOUT_S = 5.0
_SURROGATE = re.compile("[\ud800-\udfff]")
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class ApiError(Exception):
    """An error answered in OpenAI's JSON shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or _error_type(status)

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def _error_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 404:
        return "not_found_error"
    if status == 503:
        return "service_unavailable_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | int | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _json_response(status: int, obj: Any, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, text=json.dumps(obj, separators=(",", ":")),
                        content_type="application/json", headers=headers)


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def _sse(obj: Any) -> bytes:
    return ("data: " + (obj if isinstance(obj, str) else _dumps(obj)) + "\n\n").encode("utf-8")


# -- request validation ------------------------------------------------------------------------

def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _opt_int(body: dict, name: str, default: int | None, minimum: int | None = None) -> int | None:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if not _is_int(v):
        raise ApiError(400, f"'{name}' must be an integer, got {json.dumps(v)}", param=name)
    if minimum is not None and v < minimum:
        raise ApiError(400, f"'{name}' must be >= {minimum}, got {v}", param=name)
    return v


def _opt_number(body: dict, name: str, default: float, lo: float | None = None, hi: float | None = None,
                lo_open: bool = False) -> float:
    v = body.get(name)
    if v is None:
        return default
    if not _is_number(v):
        raise ApiError(400, f"'{name}' must be a number, got {json.dumps(v)}", param=name)
    if lo is not None and (v <= lo if lo_open else v < lo):
        raise ApiError(400, f"'{name}' must be {'>' if lo_open else '>='} {lo}, got {v}", param=name)
    if hi is not None and v > hi:
        raise ApiError(400, f"'{name}' must be <= {hi}, got {v}", param=name)
    return float(v)


def _opt_bool(body: dict, name: str, default: bool = False) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise ApiError(400, f"'{name}' must be a boolean, got {json.dumps(v)}", param=name)
    return v


def _stop_strings(body: dict) -> tuple[str, ...]:
    v = body.get("stop")
    if v is None:
        return ()
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise ApiError(400, "'stop' must be a string or a list of strings", param="stop")
    if any(s == "" for s in v):
        raise ApiError(400, "'stop' strings must not be empty", param="stop")
    return tuple(dict.fromkeys(v))


def _surrogate_at(body: Any) -> tuple[bool, str | None]:
    """(found, where): the first string (value or key) of a parsed JSON body holding an unpaired UTF-16
    surrogate, which JSON's ``\\ud800`` escapes can produce and no tokenizer can encode, and the field path
    (``messages[0].content``; None for the top level). Iterative: the body may be deeply nested."""
    stack: list[tuple[Any, str]] = [(body, "")]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            if _SURROGATE.search(value):
                return True, path or None
        elif isinstance(value, dict):
            for k, v in value.items():
                if _SURROGATE.search(k):
                    return True, path or None
                stack.append((v, f"{path}.{k}" if path else k))
        elif isinstance(value, list):
            stack.extend((v, f"{path}[{i}]") for i, v in enumerate(value) if isinstance(v, (str, dict, list)))
    return False, None


def _decode_body(raw: bytes) -> dict[str, Any]:
    """A request body as a JSON object, or a 400 saying why not. Strict: UTF-8 only (RFC 8259; ``json.loads``
    of bytes would also take UTF-16 and smuggled surrogates), no unpaired surrogates in any string."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ApiError(400, f"the request body is not valid UTF-8: {err}") from None
    try:
        body = json.loads(text)
    except ValueError as err:
        raise ApiError(400, f"the request body is not valid JSON: {err}") from None
    except RecursionError:
        raise ApiError(400, "the request body is not valid JSON: nested too deeply") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    found, where = _surrogate_at(body)
    if found:
        raise ApiError(400, f"{'the request body' if where is None else repr(where)} holds an unpaired UTF-16 "
                            "surrogate (a \\ud800-\\udfff escape without its pair), which is no text",
                       param=where)
    return body


def check_api_key(key: str) -> str:
    """``key`` if a client can send it as ``Authorization: Bearer KEY``, else ValueError (which never quotes
    the key): an empty one (``--api-key "$UNSET"``) would otherwise lock nothing or everything."""
    if not key:
        raise ValueError("the API key is empty")
    if any(c.isspace() or not c.isprintable() for c in key):
        raise ValueError("the API key holds whitespace or control characters, which no Authorization header carries")
    return key


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address, as given or as bound) reaches this machine only: 127.0.0.0/8, ::1 (also
    IPv4-mapped) or ``localhost``. ``0.0.0.0``, ``::`` and other names are taken as reachable from outside."""
    host = host.strip()
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        addr = ipaddress.ip_address(host.removeprefix("[").removesuffix("]"))
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


# -- access, errors, bodies: shared with moecap serve --backend partition's router ---------------------

def api_key_bytes(api_key: str | None) -> bytes | None:
    """``api_key`` checked (:func:`check_api_key`) and as bytes for :func:`bearer_authorized`; None: no key."""
    # bytes, compared with hmac.compare_digest: its str form wants ASCII only
    return check_api_key(api_key).encode("utf-8", "surrogateescape") if api_key is not None else None


def bearer_authorized(request: web.Request, api_key: bytes | None) -> bool:
    """Whether ``request`` may pass: no key (None), the health probe, or ``Authorization: Bearer KEY`` (the
    scheme in any case; ``api_key`` from :func:`api_key_bytes`), compared in constant time so that the
    answer's timing does not tell how much of a guess was right."""
    if api_key is None or (request.method in ("GET", "HEAD") and request.path == "/health"):
        return True
    scheme, _, token = request.headers.get("Authorization", "").strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(token.strip().encode("utf-8", "surrogateescape"), api_key)


def error_middleware(authorized: Callable[[web.Request], bool]) -> Any:
    """The aiohttp middleware that refuses a request ``authorized`` rejects (401, ``WWW-Authenticate:
    Bearer``) and answers every error in OpenAI's shape: an :class:`ApiError` as raised, aiohttp's
    HTTP errors with their status (404: ``no route METHOD PATH``), anything else 500 (logged)."""
    @web.middleware
    async def errors(request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            if not authorized(request):  # before routing or reading: nothing for an unknown client
                raise ApiError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                               code="invalid_api_key")
            return await handler(request)
        except ApiError as err:
            headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
            return _json_response(err.status, err.body(), headers)
        except web.HTTPException as err:  # unknown route, wrong method, body too large ...
            if err.status < 400:
                raise
            headers = {k: v for k, v in err.headers.items() if k.lower() == "allow"}
            message = err.text if err.text and not err.text.startswith(f"{err.status}:") else err.reason
            if err.status == 404:
                message = f"no route {request.method} {request.path}"
            return _json_response(err.status, error_body(message, _error_type(err.status), None, None), headers)
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception as err:
            log.exception("unhandled error on %s %s", request.method, request.path)
            return _json_response(500, error_body(f"internal error: {type(err).__name__}: {err}", "server_error"))

    return errors


def check_model_name(name: Any, models: list[str]) -> str:
    """``name`` if it is one of ``models``; else 400 (missing, not a string) or 404 naming the served models."""
    if name is None:
        raise ApiError(400, f"'model' is required; served models: {', '.join(models)}", param="model")
    if not isinstance(name, str):
        raise ApiError(400, "'model' must be a string", param="model")
    if name not in models:
        raise ApiError(404, f"The model `{name}` does not exist. Served models: {', '.join(models)}",
                       param="model", code="model_not_found")
    return name


async def read_body(request: web.Request, max_request_bytes: int,
                    pool: ThreadPoolExecutor | None = None) -> tuple[bytes, dict[str, Any]]:
    """The body, raw and as a JSON object (:func:`_decode_body`; beyond ``PARSE_IN_THREAD_BYTES`` parsed in
    ``pool``, None: the loop's default executor). 413 beyond ``max_request_bytes``: refused unread when it
    declares its length, else (chunked, compressed) cut off once it passes the limit; 400 for a broken one."""
    def too_large(size: str) -> ApiError:
        return ApiError(413, f"the request body is {size}; this server takes at most {max_request_bytes} "
                             "bytes (moecap serve --max-request-bytes)", code="request_too_large")

    declared = request.content_length
    if declared is not None and declared > max_request_bytes and "Content-Encoding" not in request.headers:
        raise too_large(f"{declared} bytes")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise too_large(f"over {max_request_bytes} bytes") from None
    except web.RequestPayloadError as err:  # a broken chunked or compressed body
        raise ApiError(400, f"the request body could not be read: {err}") from None
    if len(raw) <= PARSE_IN_THREAD_BYTES:
        return raw, _decode_body(raw)
    return raw, await asyncio.get_running_loop().run_in_executor(pool, _decode_body, raw)


def openai_app(server: Any, completions: Any, chat_completions: Any) -> web.Application:
    """``moecap serve``'s endpoints as an aiohttp application over ``server`` (an :class:`OpenAIServer` or the
    partition router): its ``health``, ``list_models``, ``get_model`` and ``stats`` handlers, its
    ``_on_startup`` / ``_on_shutdown`` / ``_on_cleanup`` hooks, its ``_api_key`` (:func:`api_key_bytes`) and
    ``max_request_bytes`` behind :func:`error_middleware`; the two generation endpoints go to the handlers given."""
    errors = error_middleware(lambda request: bearer_authorized(request, server._api_key))
    app = web.Application(middlewares=[errors], client_max_size=server.max_request_bytes)
    app.router.add_get("/health", server.health)
    app.router.add_get("/v1/models", server.list_models)
    app.router.add_get("/v1/models/{model:.+}", server.get_model)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/stats", server.stats)
    app.on_startup.append(server._on_startup)
    app.on_shutdown.append(server._on_shutdown)
    app.on_cleanup.append(server._on_cleanup)
    return app


class OpenAIServer:
    """The aiohttp application over a :class:`Scheduler` and its backend. With ``api_key``, every endpoint but
    ``GET /health`` wants ``Authorization: Bearer api_key``; a body beyond ``max_request_bytes`` gets 413."""

    def __init__(self, backend: Any, scheduler: Scheduler, backend_kind: str = "separate",
                 sources: dict[str, str] | None = None, api_key: str | None = None,
                 max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, process_info: dict[str, Any] | None = None):
        if max_request_bytes < 1:
            raise ValueError(f"max_request_bytes must be >= 1, got {max_request_bytes}")
        self.backend = backend
        self.scheduler = scheduler
        self.backend_kind = backend_kind
        # what this process is (a partition child's pid, thread share ...): in /health and /stats when given
        self.process_info = dict(process_info) if process_info is not None else None
        self.sources = dict(sources or {})
        self.created = int(time.time())
        self.models = list(backend.model_names())
        self.max_request_bytes = int(max_request_bytes)
        self._api_key = api_key_bytes(api_key)
        self._vocab = {m: len(backend.tokenizer(m)) for m in self.models}
        self._max_chars = {m: int(backend.context_length(m)) * PROMPT_CHARS_PER_TOKEN for m in self.models}
        self._pool = ThreadPoolExecutor(TOKENIZER_THREADS, thread_name_prefix="moecap-tokenize")
        self._shutting_down = False

    @property
    def requires_api_key(self) -> bool:
        return self._api_key is not None

    # -- the app --------------------------------------------------------------------------------
    def app(self) -> web.Application:
        return openai_app(self, self.completions, self.chat_completions)

    async def _on_startup(self, app: web.Application) -> None:
        self.scheduler.start()

    async def _on_shutdown(self, app: web.Application) -> None:
        # sites are closed already; abort what runs so that open streams end now
        self._shutting_down = True
        await asyncio.get_running_loop().run_in_executor(None, self.scheduler.shutdown, SHUTDOWN_TIMEOUT_S)

    async def _on_cleanup(self, app: web.Application) -> None:
        self.scheduler.shutdown(0.1)
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- simple endpoints ---------------------------------------------------------------------------
    async def health(self, request: web.Request) -> web.Response:
        if self._shutting_down or self.scheduler.closing:
            return _json_response(503, {"status": "shutting down"})
        out: dict[str, Any] = {"status": "ok", "models": self.models}
        if self.process_info is not None:
            out["process"] = self.process_info
        return _json_response(200, out)

    def _model_card(self, name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": self.created, "owned_by": "moecap",
                "root": self.sources.get(name, name), "parent": None,
                "max_model_len": int(self.backend.context_length(name))}

    async def list_models(self, request: web.Request) -> web.Response:
        return _json_response(200, {"object": "list", "data": [self._model_card(m) for m in self.models]})

    async def get_model(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        check_model_name(name, self.models)
        return _json_response(200, self._model_card(name))

    async def stats(self, request: web.Request) -> web.Response:
        out = self.scheduler.stats()
        out["backend"] = self.backend_kind
        if self.process_info is not None:
            out["process"] = self.process_info
        try:
            out["memory"] = self.backend.memory()
        except Exception as err:  # records are best effort
            out["memory"] = {"error": f"{type(err).__name__}: {err}"}
        return _json_response(200, out)

    # -- completions ----------------------------------------------------------------------------------
    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, chat=True)

    def _check_chars(self, model: str, n: int, param: str) -> None:
        """Refuse a prompt of ``n`` characters that no context could hold, before paying its tokenization."""
        limit = self._max_chars[model]
        if n > limit:
            raise ApiError(400, f"the prompt has {n} characters; this server takes at most {limit} characters "
                                f"for model {model!r} ({PROMPT_CHARS_PER_TOKEN} per token of its "
                                f"{limit // PROMPT_CHARS_PER_TOKEN}-token context)", param=param, code="prompt_too_long")

    def _prompt_ids(self, model: str, body: dict[str, Any], chat: bool) -> list[int]:
        """The prompt's token ids. Runs in a tokenizer thread: chat templates and tokenizers take time in
        proportion to the prompt, which the character bound checked first keeps finite."""
        tok = self.backend.tokenizer(model)
        if chat:
            messages = body.get("messages")
            if messages is None:
                raise ApiError(400, "'messages' is required", param="messages")
            if not isinstance(messages, list) or not messages:
                raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects", param="messages")
            clean = []
            for i, m in enumerate(messages):
                if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                    raise ApiError(400, f"messages[{i}] must be an object with a string 'role'", param=f"messages[{i}]")
                content = m.get("content")
                if isinstance(content, list):  # content parts: text only
                    texts = []
                    for part in content:
                        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                            raise ApiError(400, f"messages[{i}].content: only text parts are supported",
                                           param=f"messages[{i}].content")
                        texts.append(part["text"])
                    content = "".join(texts)
                elif content is None:
                    content = ""
                elif not isinstance(content, str):
                    raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts",
                                   param=f"messages[{i}].content")
                clean.append({"role": m["role"], "content": content})
            self._check_chars(model, sum(len(m["role"]) + len(m["content"]) for m in clean), "messages")
            if getattr(tok, "chat_template", None):
                try:
                    text = tok.apply_chat_template(clean, tokenize=False, add_generation_prompt=True)
                except Exception as err:
                    raise ApiError(400, f"the chat template failed on these messages: {err}", param="messages") from None
                ids = tok(text, add_special_tokens=False)["input_ids"]
            else:
                ids = tok("\n".join(m["content"] for m in clean))["input_ids"]
            if not ids:
                raise ApiError(400, "the messages encode to no tokens", param="messages")
            return list(ids)

        if "prompt" not in body or body["prompt"] is None:
            raise ApiError(400, "'prompt' is required", param="prompt")
        prompt = body["prompt"]
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str):
            if not prompt:
                raise ApiError(400, "'prompt' is empty", param="prompt")
            self._check_chars(model, len(prompt), "prompt")
            ids = list(tok(prompt)["input_ids"])
        elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
            ids = list(prompt)
            vocab = self._vocab[model]
            bad = [t for t in ids if t < 0 or t >= vocab]
            if bad:
                raise ApiError(400, f"'prompt' has token ids outside [0, {vocab}): {bad[:5]}", param="prompt")
        elif isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
            raise ApiError(400, f"'prompt' holds {len(prompt)} prompts; this server takes one prompt per request",
                           param="prompt")
        else:
            raise ApiError(400, "'prompt' must be a non-empty string or a non-empty list of token ids", param="prompt")
        if not ids:
            raise ApiError(400, "'prompt' encodes to no tokens", param="prompt")
        return ids

    def _parse(self, body: dict[str, Any], chat: bool) -> tuple[str, list[int], SamplingParams, dict[str, Any]]:
        model = check_model_name(body.get("model"), self.models)
        unsupported = [("n", lambda v: v == 1), ("best_of", lambda v: v == 1), ("suffix", lambda v: v == "")]
        if chat:
            unsupported.append(("echo", lambda v: v is False))
        else:
            unsupported.append(("top_logprobs", lambda v: v == 0))
        for name, ok in unsupported:
            if body.get(name) is not None and not ok(body[name]):
                raise ApiError(400, f"'{name}' = {json.dumps(body[name])} is not supported by this server", param=name)
        stream = _opt_bool(body, "stream")
        echo = False if chat else _opt_bool(body, "echo")
        if chat:  # chat: logprobs is a switch, top_logprobs the number of alternatives
            logprobs = _opt_int(body, "top_logprobs", 0, minimum=0) if _opt_bool(body, "logprobs") else None
            if logprobs is None and body.get("top_logprobs"):
                raise ApiError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
            lp_param = "top_logprobs"
        else:  # completions: logprobs is the number of alternatives (0: the chosen tokens' only)
            raw = body.get("logprobs")
            logprobs = None if raw is None or raw is False else _opt_int(body, "logprobs", 0, minimum=0)
            lp_param = "logprobs"
        if logprobs is not None and logprobs > MAX_LOGPROBS:
            raise ApiError(400, f"'{lp_param}' must be <= {MAX_LOGPROBS}, got {logprobs}", param=lp_param)
        if echo and stream:
            raise ApiError(400, "'echo' is supported without streaming only (\"stream\": false)", param="echo")
        ids = self._prompt_ids(model, body, chat)
        ctx = int(self.backend.context_length(model))
        n = len(ids)
        where = "messages" if chat else "prompt"
        if n > ctx or (n == ctx and not echo):
            raise ApiError(400, f"This model's maximum context length is {ctx} tokens, but the prompt has {n} "
                                f"tokens" + ("" if n > ctx else f" ({n} >= {ctx}): no room for any output"), param=where,
                           code="context_length_exceeded")
        key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
        default = (ctx - n) if chat else 16
        max_tokens = _opt_int(body, key, default)
        if max_tokens < (0 if echo else 1):  # echo with 0 new tokens scores the prompt only
            raise ApiError(400, f"'{key}' must be >= {0 if echo else 1}, got {max_tokens}", param=key)
        if n + max_tokens > ctx:
            raise ApiError(400, f"This model's maximum context length is {ctx} tokens. However, you requested "
                                f"{n + max_tokens} tokens ({n} in the prompt, {max_tokens} for the completion).",
                           param=key, code="context_length_exceeded")
        min_tokens = _opt_int(body, "min_tokens", 0, minimum=0)
        if min_tokens > max_tokens:
            raise ApiError(400, f"'min_tokens' ({min_tokens}) must not exceed '{key}' ({max_tokens})", param="min_tokens")
        top_k = _opt_int(body, "top_k", 0, minimum=-1)
        stop_ids = body.get("stop_token_ids")
        if stop_ids is None:
            stop_ids = []
        if not isinstance(stop_ids, list) or not all(_is_int(t) for t in stop_ids):
            raise ApiError(400, "'stop_token_ids' must be a list of integers", param="stop_token_ids")
        stream_options = body.get("stream_options")
        if stream_options is not None and not isinstance(stream_options, dict):
            raise ApiError(400, "'stream_options' must be an object", param="stream_options")
        temperature = _opt_number(body, "temperature", 1.0, lo=0.0)  # OpenAI's default
        top_p = _opt_number(body, "top_p", 1.0, lo=0.0, hi=1.0, lo_open=True)
        seed = _opt_int(body, "seed", None)
        ignore_eos = _opt_bool(body, "ignore_eos")
        stop = _stop_strings(body)
        try:
            params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                    seed=seed, ignore_eos=ignore_eos, min_tokens=min_tokens, stop=stop,
                                    stop_token_ids=tuple(stop_ids), logprobs=logprobs, echo=echo)
        except ValueError as err:  # anything the checks above let through
            raise ApiError(400, str(err)) from None
        opts = {
            "stream": stream,
            "include_usage": _opt_bool(stream_options or {}, "include_usage"),
            "continuous_usage": _opt_bool(stream_options or {}, "continuous_usage_stats"),
            "return_token_ids": _opt_bool(body, "return_token_ids"),
        }
        return model, ids, params, opts

    async def _handle(self, request: web.Request, chat: bool) -> web.StreamResponse:
        if self._shutting_down or self.scheduler.closing:
            raise ApiError(503, "the server is shutting down")
        _, body = await read_body(request, self.max_request_bytes, self._pool)
        loop = asyncio.get_running_loop()
        # validation, chat template and tokenizer off the event loop: one large prompt stalls no one else
        model, ids, params, opts = await loop.run_in_executor(self._pool, self._parse, body, chat)
        queue: asyncio.Queue[Event] = asyncio.Queue()
        req = Request(model, ids, params, asyncio_sink(loop, queue),
                      request_id=("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex)
        try:
            self.scheduler.submit(req)
        except SchedulerClosed:
            raise ApiError(503, "the server is shutting down") from None
        try:
            if opts["stream"]:
                return await self._stream(request, req, queue, chat, opts)
            return await self._collect(req, queue, chat, opts)
        finally:
            if not req.done:  # the client went away (or we failed): stop its row
                req.cancel()

    def _usage(self, req: Request, completion: int) -> dict[str, int]:
        n = len(req.prompt_ids)
        return {"prompt_tokens": n, "completion_tokens": completion, "total_tokens": n + completion}

    @staticmethod
    def _failure(event: Event) -> ApiError:
        if event.finish_reason == ABORT:
            return ApiError(503, f"request aborted: {event.error or 'cancelled'}")
        return ApiError(500, f"the model failed on this request's batch: {event.error}", code="backend_error")

    async def _collect(self, req: Request, queue: asyncio.Queue, chat: bool, opts: dict) -> web.Response:
        text, tokens = [], []
        while True:
            ev = await queue.get()
            if ev.token_id is not None:
                tokens.append(ev.token_id)
            text.append(ev.text)
            if ev.finished:
                break
        if ev.finish_reason in (ERROR, ABORT):
            raise self._failure(ev)
        content = "".join(text)
        tok = self.backend.tokenizer(req.model)
        if chat:
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": content},
                                      "logprobs": None, "finish_reason": ev.finish_reason}
            if req.params.logprobs is not None:
                choice["logprobs"] = {"content": [_chat_logprob(tok, t, lp)
                                                  for t, lp in zip(tokens, req.output_logprobs)]}
        else:
            if req.params.echo:
                content = tok.decode(req.prompt_ids) + content
            choice = {"index": 0, "text": content, "logprobs": None, "finish_reason": ev.finish_reason}
            if req.params.logprobs is not None:
                ids = (req.prompt_ids if req.params.echo else []) + tokens
                scores = ((req.prompt_logprobs or [None] * len(req.prompt_ids)) if req.params.echo else []) \
                    + list(req.output_logprobs)
                choice["logprobs"] = _completion_logprobs(tok, ids, scores)
        if opts["return_token_ids"]:
            choice["token_ids"] = tokens
            choice["prompt_token_ids"] = req.prompt_ids
        return _json_response(200, {
            "id": req.id, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": req.model, "choices": [choice], "usage": self._usage(req, len(tokens)),
        })

    async def _stream(self, request: web.Request, req: Request, queue: asyncio.Queue, chat: bool,
                      opts: dict) -> web.StreamResponse:
        first = await queue.get()  # headers wait for the first token: a failed prefill is still a 500
        if first.finish_reason in (ERROR, ABORT) and first.token_id is None:
            raise self._failure(first)
        created = int(time.time())
        tok = self.backend.tokenizer(req.model)
        kind = "chat.completion.chunk" if chat else "text_completion"
        usage_each = opts["continuous_usage"]
        usage_null = opts["include_usage"] and not usage_each

        def chunk(choices: list[dict[str, Any]], completion: int) -> bytes:
            obj: dict[str, Any] = {"id": req.id, "object": kind, "created": created, "model": req.model,
                                   "choices": choices}
            if usage_each:
                obj["usage"] = self._usage(req, completion)
            elif usage_null:
                obj["usage"] = None
            return _sse(obj)

        def token_chunk(ev: Event, first_chunk: bool) -> bytes:
            if chat:
                c: dict[str, Any] = {"index": 0, "delta": {"content": ev.text}, "logprobs": None,
                                     "finish_reason": ev.finish_reason}
                if ev.logprob is not None and ev.token_id is not None:
                    c["logprobs"] = {"content": [_chat_logprob(tok, ev.token_id, ev.logprob)]}
            else:
                c = {"index": 0, "text": ev.text, "logprobs": None, "finish_reason": ev.finish_reason}
                if ev.logprob is not None and ev.token_id is not None:
                    c["logprobs"] = _completion_logprobs(tok, [ev.token_id], [ev.logprob])
            if opts["return_token_ids"]:
                c["token_ids"] = [ev.token_id] if ev.token_id is not None else []
                if first_chunk and not chat:
                    c["prompt_token_ids"] = req.prompt_ids
            return chunk([c], ev.completion_tokens)

        resp = web.StreamResponse(status=200, headers=_SSE_HEADERS)
        await resp.prepare(request)
        out: list[bytes] = []
        if chat:  # the assistant's role first, as OpenAI and vLLM do
            role: dict[str, Any] = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                    "finish_reason": None}
            if opts["return_token_ids"]:
                role["prompt_token_ids"] = req.prompt_ids
            out.append(chunk([role], 0))
        ev, first_chunk, completion = first, True, 0
        while True:
            if ev.token_id is None and ev.finish_reason in (ERROR, ABORT):  # failed mid-stream
                err = self._failure(ev)
                out.append(_sse(err.body()))
            else:
                out.append(token_chunk(ev, first_chunk))
                first_chunk = False
                completion = ev.completion_tokens
            if ev.finished:
                break
            if queue.empty():  # send what we have; then wait for the next token
                await resp.write(b"".join(out))
                out = []
                ev = await queue.get()
            else:
                ev = queue.get_nowait()
        if opts["include_usage"] and ev.finish_reason not in (ERROR, ABORT):
            obj = {"id": req.id, "object": kind, "created": created, "model": req.model, "choices": [],
                   "usage": self._usage(req, completion)}
            out.append(_sse(obj))
        out.append(_sse("[DONE]"))
        await resp.write(b"".join(out))
        await resp.write_eof()
        return resp


# -- log-probabilities in OpenAI's two shapes --------------------------------------------------------

def _token_text(tokenizer: Any, token_id: int) -> str:
    return tokenizer.decode([int(token_id)])


def _completion_logprobs(tokenizer: Any, ids: list[int], scores: list[Any]) -> dict[str, Any]:
    """The completions API's ``logprobs``: parallel lists ``tokens``, ``token_logprobs``, ``top_logprobs``
    (token text -> log-probability; None where the position has no score, e.g. the first prompt token)
    and ``text_offset`` (each token's start in the concatenated token texts)."""
    tokens, values, tops, offsets = [], [], [], []
    offset = 0
    for token_id, score in zip(ids, scores):
        text = _token_text(tokenizer, token_id)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        if score is None:
            values.append(None)
            tops.append(None)
        else:
            values.append(score[0])
            tops.append({_token_text(tokenizer, t): v for t, v in score[1].items()} or None)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def _chat_logprob(tokenizer: Any, token_id: int, score: Any) -> dict[str, Any]:
    """One entry of the chat API's ``logprobs.content``."""
    def entry(t: int, v: float) -> dict[str, Any]:
        text = _token_text(tokenizer, t)
        return {"token": text, "logprob": v, "bytes": list(text.encode("utf-8"))}

    return {**entry(token_id, score[0]), "top_logprobs": [entry(t, v) for t, v in score[1].items()]}


# -- the command -------------------------------------------------------------------------------------

def _bind(host: str, port: int) -> socket.socket:
    """Bind the listening socket before the (slow) model load, so a taken port fails at once."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, type_, proto, _, addr = infos[0]
    sock = socket.socket(family, type_, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
        sock.listen(1024)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def _listen(host: str, port: int, api_key: str | None, max_request_bytes: int,
            sock: socket.socket | None = None) -> socket.socket | None:
    """Check ``api_key`` and ``max_request_bytes``, bind ``host:port`` unless ``sock`` is given, and warn on
    stderr when an address beyond the loopback interface is served without a key: the listening socket, or
    None with the error printed (``moecap serve``'s exit status 2)."""
    if api_key is not None:
        try:
            check_api_key(api_key)
        except ValueError as err:
            print(f"moecap serve: --api-key: {err}", file=sys.stderr)
            return None
    if max_request_bytes < 1:
        print("moecap serve: --max-request-bytes must be >= 1", file=sys.stderr)
        return None
    if sock is None:
        try:
            sock = _bind(host, port)
        except OSError as err:
            print(f"moecap serve: cannot listen on {host}:{port}: {err}", file=sys.stderr)
            return None
    # the address actually bound decides (a host name may resolve to a loopback address), at once: an
    # operator sees it before the (slow) model load
    if api_key is None and not is_loopback(str(sock.getsockname()[0])):
        print(f"moecap serve: WARNING: listening on {_host_port(host, sock.getsockname()[1])} without an API key; "
              f"anyone who can reach it can use it (set --api-key or {API_KEY_ENV})", file=sys.stderr, flush=True)
    return sock


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def serve(models: dict[str, str], host: str = "127.0.0.1", port: int = 8000, backend: str = "separate",
          max_batch_size: int = 8, max_wait_s: float | None = 2.0, max_consecutive_batches: int | None = 4,
          device: str = "auto", dtype: str = "auto", api_key: str | None = None,
          max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, sock: socket.socket | None = None,
          process_info: dict[str, Any] | None = None, **backend_kw: Any) -> int:
    """Load ``models`` into a ``backend`` and serve them until SIGTERM/SIGINT; return the exit status.
    ``api_key`` (the command line's ``--api-key`` or ``$MOECAP_API_KEY``; this function reads no environment)
    locks every endpoint but ``/health``; it is never printed.

    ``sock``: a listening socket to serve on instead of binding ``host:port`` (a ``moecap serve --backend
    partition`` child gets its socket from the router, so the port is known before the child starts and
    no other process can take it); it is closed on return. ``process_info``: reported under ``process`` by
    ``/health`` and ``/stats``, with ``clock_origin_unix`` (the wall-clock time of the scheduler's clock 0,
    which its batches' ``start_s`` count from) added."""
    from moecap.engine.backend import BackendError, make_backend

    sock = _listen(host, port, api_key, max_request_bytes, sock)
    if sock is None:
        return 2
    actual = sock.getsockname()[1]
    try:
        t0 = time.perf_counter()
        print(f"moecap serve: loading {len(models)} model(s) with the {backend} backend: "
              + ", ".join(f"{k}={v}" for k, v in models.items()), flush=True)
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # a server's log is no terminal
        except Exception:
            pass
        # SIGTERM while loading: stop as Ctrl-C does (run_app installs its own handlers afterwards)
        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _raise_interrupt) if main else None
        try:
            be = make_backend(backend, models, device=device, dtype=dtype, **backend_kw)
        except (BackendError, ValueError, OSError) as err:
            print(f"moecap serve: {err}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("moecap serve: interrupted while loading", file=sys.stderr)
            return 130
        finally:
            if main:
                signal.signal(signal.SIGTERM, previous)
        scheduler = Scheduler(be, max_batch_size=max_batch_size, max_wait_s=max_wait_s,
                              max_consecutive_batches=max_consecutive_batches)
        if process_info is not None:  # taken right after the scheduler's own clock 0: microseconds apart
            process_info = {**process_info, "clock_origin_unix": time.time()}
        sources = {m: (be.source(m) if hasattr(be, "source") else str(models.get(m, m))) for m in be.model_names()}
        server = OpenAIServer(be, scheduler, backend_kind=backend, sources=sources, api_key=api_key,
                              max_request_bytes=max_request_bytes, process_info=process_info)
        print(f"moecap serve: {', '.join(be.model_names())} on {be.device()} loaded in "
              f"{time.perf_counter() - t0:.1f} s; listening on http://{_host_port(host, actual)}"
              + (" (API key required)" if server.requires_api_key else ""), flush=True)
        web.run_app(server.app(), sock=sock, print=None, access_log=None, handler_cancellation=True,
                    shutdown_timeout=SHUTDOWN_TIMEOUT_S)
    finally:
        sock.close()
    print("moecap serve: stopped", flush=True)
    return 0
