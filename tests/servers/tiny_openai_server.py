"""A minimal, real OpenAI-compatible streaming server for tests: transformers on the CPU, greedy decoding.

    python tests/servers/tiny_openai_server.py --model DIR --port N [--host 127.0.0.1]

Endpoints: ``GET /health``, ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``.
Streaming answers are SSE: one ``data: {...}`` event per generated token (a token that decodes to no
text still gets its event), ``usage`` on every chunk when ``stream_options.continuous_usage_stats``, a
final usage-only chunk when ``stream_options.include_usage``, then ``data: [DONE]``. ``ignore_eos`` as in
vLLM. Bad requests get 4xx JSON errors ``{"error": {"message", "type", "code"}}``.

``--style`` sets how the stream is cut: ``vllm`` (above), ``llamacpp`` (like llama.cpp's llama-server: no
running usage, and the final usage rides on the chunk that carries the empty-text choice with its
``finish_reason``, no separate usage-only chunk) or ``multi`` (``--chunk-tokens`` tokens per chunk and no
running usage, as speculative decoding streams). ``--usage-offset N`` adds N to every reported
``completion_tokens`` (a server whose count contradicts its stream). ``--drop-after N`` closes a kept-alive
connection, without an answer, when it brings a request after N answered ones (what a client sees when it
reuses a connection the server has just closed). ``--fail-every N`` answers every Nth completion request
with HTTP 500; ``--short F`` ends every stream after F x max_tokens tokens whatever ``ignore_eos`` says.

Requests run on their own threads; the model steps one token at a time under a lock, so concurrent
requests interleave token by token. Not a benchmark target: it exists so the client is tested against
real HTTP and real generation.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Engine:
    def __init__(self, model_dir: str, served_name: str | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(1)
        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.name = served_name or os.path.basename(os.path.normpath(model_dir))
        self.max_len = int(getattr(self.model.config, "max_position_embeddings", 2048))
        self.eos = self.tokenizer.eos_token_id
        self.lock = threading.Lock()

    def generate(self, ids: list[int], max_tokens: int, ignore_eos: bool):
        """Yield (token_id, text_delta) greedily, one token at a time."""
        torch = self.torch
        past = None
        out: list[int] = []
        text = ""
        inp = torch.tensor([ids], dtype=torch.long)
        with torch.inference_mode():
            for _ in range(max_tokens):
                with self.lock:
                    res = self.model(input_ids=inp, past_key_values=past, use_cache=True)
                past = res.past_key_values
                tok = int(res.logits[0, -1].argmax())
                if tok == self.eos and not ignore_eos:
                    return
                out.append(tok)
                full = self.tokenizer.decode(out, skip_special_tokens=True)
                delta, text = full[len(text):], full
                yield tok, delta
                inp = torch.tensor([[tok]], dtype=torch.long)


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "BadRequestError"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


def make_handler(engine: Engine, style: str = "vllm", chunk_tokens: int = 3, usage_offset: int = 0,
                 drop_after: int | None = None, fail_every: int | None = None, short: float | None = None):
    counter = {"n": 0}
    count_lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        answered = 0  # requests answered on this connection

        def setup(self):
            super().setup()
            # stream every chunk at once: Nagle plus the client's delayed ACK would batch small writes
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def log_message(self, fmt, *args):  # quiet
            pass

        def _json(self, status: int, obj) -> None:
            body = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _error(self, e: ApiError) -> None:
            self._json(e.status, {"error": {"message": e.message, "type": e.kind, "code": e.status}})

        def do_GET(self):
            if self.path == "/health":
                self._json(200, {"status": "ok"})
            elif self.path == "/v1/models":
                self._json(200, {"object": "list", "data": [
                    {"id": engine.name, "object": "model", "owned_by": "moecap-tests", "max_model_len": engine.max_len}]})
            else:
                self._error(ApiError(404, f"no route {self.path}", "NotFoundError"))

        def do_POST(self):
            try:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                if drop_after is not None and self.answered >= drop_after:
                    self.close_connection = True  # no answer at all: the socket just closes
                    return
                self.answered += 1
                if self.path not in ("/v1/completions", "/v1/chat/completions"):
                    raise ApiError(404, f"no route {self.path}", "NotFoundError")
                try:
                    req = json.loads(raw)
                except ValueError:
                    raise ApiError(400, "body is not valid JSON") from None
                if not isinstance(req, dict):
                    raise ApiError(400, "body must be a JSON object")
                self._complete(req, chat=self.path.endswith("chat/completions"))
            except ApiError as e:
                self._error(e)
            except (BrokenPipeError, ConnectionResetError):
                pass

        def _prompt_ids(self, req, chat: bool) -> list[int]:
            if chat:
                msgs = req.get("messages")
                if not isinstance(msgs, list) or not msgs or not all(
                        isinstance(m, dict) and isinstance(m.get("content"), str) for m in msgs):
                    raise ApiError(400, "'messages' must be a non-empty list of {role, content}")
                text = "".join(f"{m.get('role', 'user')}: {m['content']}\n" for m in msgs) + "assistant:"
                return engine.tokenizer(text, add_special_tokens=False)["input_ids"]
            prompt = req.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
                prompt = prompt[0]
            if isinstance(prompt, str):
                return engine.tokenizer(prompt, add_special_tokens=False)["input_ids"]
            if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
                vocab = len(engine.tokenizer)
                if any(t < 0 or t >= vocab for t in prompt):
                    raise ApiError(400, f"token id out of range [0, {vocab})")
                return list(prompt)
            raise ApiError(400, "'prompt' must be a string or a non-empty list of token ids")

        def _complete(self, req, chat: bool) -> None:
            with count_lock:
                counter["n"] += 1
                nth = counter["n"]
            if fail_every and nth % fail_every == 0:
                raise ApiError(500, "injected failure", "InternalServerError")
            if req.get("model") != engine.name:
                raise ApiError(404, f"The model `{req.get('model')}` does not exist.", "NotFoundError")
            ids = self._prompt_ids(req, chat)
            if not ids:
                raise ApiError(400, "empty prompt")
            max_tokens = req.get("max_completion_tokens", req.get("max_tokens", 16))
            if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
                raise ApiError(400, "'max_tokens' must be a positive integer")
            if len(ids) + max_tokens > engine.max_len:
                raise ApiError(400, f"prompt ({len(ids)}) + max_tokens ({max_tokens}) exceeds the "
                                    f"context length {engine.max_len}")
            ignore_eos = bool(req.get("ignore_eos", False))
            opts = req.get("stream_options") or {}
            rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:16]
            created = int(time.time())
            kind = "chat.completion" if chat else "text_completion"

            def usage(n: int) -> dict:
                n += usage_offset
                return {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n}

            def choice(text: str, finish):
                if chat:
                    return {"index": 0, "delta": {"content": text}, "finish_reason": finish}
                return {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}

            gen = engine.generate(ids, max(1, int(max_tokens * short)) if short else max_tokens, ignore_eos)
            if not req.get("stream"):
                toks, text = [], ""
                for tok, delta in gen:
                    toks.append(tok)
                    text += delta
                finish = "length" if len(toks) == max_tokens else "stop"
                ch = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
                      if chat else {"index": 0, "text": text, "finish_reason": finish, "logprobs": None})
                self._json(200, {"id": rid, "object": kind, "created": created, "model": engine.name,
                                 "choices": [ch], "usage": usage(len(toks))})
                return

            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            obj_kind = kind + (".chunk" if chat else "")

            def emit(obj) -> None:
                data = (obj if isinstance(obj, str) else "data: " + json.dumps(obj) + "\n\n").encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()

            def chunk(choices, n=None, with_usage=False) -> dict:
                c = {"id": rid, "object": obj_kind, "created": created, "model": engine.name, "choices": choices}
                if with_usage:
                    c["usage"] = usage(n)
                return c

            cont = bool(opts.get("continuous_usage_stats")) and style == "vllm"
            if chat:  # vLLM-style opening chunk: the role, no content
                emit(chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}],
                           0, cont))
            n = 0
            group = chunk_tokens if style == "multi" else 1
            pending = ""
            for k, (_tok, delta) in enumerate(gen, 1):
                n += 1
                pending += delta
                if k % group == 0:
                    emit(chunk([choice(pending, None)], n, cont))
                    pending = ""
            if pending or n % group:
                emit(chunk([choice(pending, None)], n, cont))
            finish = "length" if n == max_tokens else "stop"
            if style == "llamacpp":  # the usage rides on the finish chunk; no usage-only chunk follows
                emit(chunk([choice("", finish)], n, bool(opts.get("include_usage"))))
            else:
                emit(chunk([choice("", finish)], n, cont))
                if opts.get("include_usage"):
                    emit(chunk([], n, True))
            emit("data: [DONE]\n\n")
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()

    return Handler


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a Hugging Face model directory")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--served-model-name", default=None, help="model id clients use (default: the dir name)")
    ap.add_argument("--style", choices=("vllm", "llamacpp", "multi"), default="vllm")
    ap.add_argument("--chunk-tokens", type=int, default=3, help="tokens per chunk with --style multi")
    ap.add_argument("--usage-offset", type=int, default=0)
    ap.add_argument("--drop-after", type=int, default=None)
    ap.add_argument("--fail-every", type=int, default=None)
    ap.add_argument("--short", type=float, default=None)
    args = ap.parse_args(argv)
    engine = Engine(args.model, args.served_model_name)
    server = ThreadingHTTPServer((args.host, args.port), make_handler(
        engine, args.style, args.chunk_tokens, args.usage_offset, args.drop_after, args.fail_every, args.short))
    server.daemon_threads = True
    print(f"serving {engine.name} on http://{args.host}:{args.port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
