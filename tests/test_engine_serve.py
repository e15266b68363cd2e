"""``moecap serve``: the OpenAI-compatible server over the tiny-moe children, checked over real HTTP against
transformers' own ``generate``; the batch scheduler's fairness with a fake backend; failures, disconnects
and signals; moecap's own client and the ``server`` runner benchmarking it end to end; the hardening (API
key, the warning beyond loopback, request size limits, tokenization off the event loop, malformed input)."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request

import pytest

from conftest import PYTHON, REPO, free_port, running_server

MODELS = ("code", "prose", "tiny-moe-c")  # the last one through its embedded name


# -- helpers ---------------------------------------------------------------------------------------

def _http(url: str, body: bytes | dict | None = None, method: str | None = None, timeout: float = 60,
          headers: dict[str, str] | None = None):
    """(status, parsed JSON or text) of one request; 4xx/5xx are answers, not exceptions."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    req = urllib.request.Request(url, data=data, method=method or ("POST" if data is not None else "GET"),
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


async def _sse(session, url: str, body: dict) -> tuple[int, list]:
    """POST a streaming request; return (status, [parsed data payloads; "[DONE]" kept as a string])."""
    async with session.post(url, json=body) as resp:
        if resp.status != 200:
            return resp.status, [await resp.json()]
        events, data = [], []
        async for raw in resp.content:
            line = raw.decode().rstrip("\r\n")
            if line.startswith("data:"):
                data.append(line[5:].strip())
            elif line == "" and data:
                payload = "\n".join(data)
                events.append(payload if payload == "[DONE]" else json.loads(payload))
                data = []
        return resp.status, events


def _stream(url: str, body: dict) -> tuple[int, list]:
    import aiohttp

    async def go():
        async with aiohttp.ClientSession() as s:
            return await _sse(s, url, body)

    return asyncio.run(go())


def _tokens_of(events: list, chat: bool = False) -> tuple[list[int], str, list]:
    """(token ids, text, chunks that carried a token) of a stream asked with return_token_ids."""
    ids, text, carrying = [], "", []
    for e in events:
        if e == "[DONE]" or not e.get("choices"):
            continue
        c = e["choices"][0]
        text += (c["delta"].get("content") or "") if chat else c["text"]
        if c.get("token_ids"):
            ids += c["token_ids"]
            carrying.append(e)
    return ids, text, carrying


def _body(model: str, prompt, max_tokens: int, **kw) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
            "return_token_ids": True}
    body.update(kw)
    return body


# -- fixtures --------------------------------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def _no_api_key_in_env():
    """A ``MOECAP_API_KEY`` in the developer's shell would lock every server these tests start."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MOECAP_API_KEY", raising=False)
        yield


@pytest.fixture(scope="module")
def zoo(tiny_moe_dir):
    return tiny_moe_dir.parent


@pytest.fixture(scope="module")
def server(zoo):
    """One `moecap serve` subprocess over the three children for the HTTP tests of this module."""
    port = free_port()
    cmd = [PYTHON, "-m", "moecap", "serve", f"code={zoo / 'code'}", str(zoo / "prose"), "tiny-moe-c",
           "--port", str(port), "--max-batch-size", "8", "--device", "cpu"]
    with running_server(cmd, f"http://127.0.0.1:{port}/health", deadline_s=180) as proc:
        yield f"http://127.0.0.1:{port}", proc


@pytest.fixture(scope="module")
def reference(zoo):
    """transformers' own models and greedy ``generate``, per served name."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dirs = {"code": zoo / "code", "prose": zoo / "prose", "tiny-moe-c": zoo / "c"}
    models = {k: AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval() for k, d in dirs.items()}
    tok = AutoTokenizer.from_pretrained(dirs["code"])

    def generate(model: str, ids: list[int], n: int, ignore_eos: bool = True) -> list[int]:
        x = torch.tensor([ids])
        kw = {"eos_token_id": None} if ignore_eos else {}
        with torch.inference_mode():
            out = models[model].generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                                         pad_token_id=tok.pad_token_id, **kw)
        return out[0, len(ids):].tolist()

    generate.tokenizer = tok
    generate.models = models
    return generate


def _prompt(n: int, seed: int) -> list[int]:
    import random

    rng = random.Random(seed)
    return [rng.randrange(2, 1024) for _ in range(n)]


# -- serving over HTTP -----------------------------------------------------------------------------

def test_models_and_health(server):
    url, _ = server
    status, body = _http(url + "/health")
    assert status == 200 and body["status"] == "ok"
    status, body = _http(url + "/v1/models")
    assert status == 200 and body["object"] == "list"
    assert [m["id"] for m in body["data"]] == list(MODELS)
    for m in body["data"]:
        assert m["object"] == "model" and m["owned_by"] and m["max_model_len"] == 256
    assert _http(url + "/v1/models/prose")[1]["id"] == "prose"
    status, body = _http(url + "/v1/models/nope")
    assert status == 404 and "code" in body["error"]["message"]


@pytest.mark.parametrize("model", ["code", "tiny-moe-c"])
def test_streaming_equals_generate(server, reference, model):
    url, _ = server
    ids = _prompt(11, 1)
    body = _body(model, ids, 14, stream=True,
                 stream_options={"include_usage": True, "continuous_usage_stats": True})
    status, events = _stream(url + "/v1/completions", body)
    assert status == 200
    assert events[-1] == "[DONE]"
    out, text, carrying = _tokens_of(events)
    ref = reference(model, ids, 14)
    assert out == ref  # exactly max_tokens tokens, the same as transformers' greedy generate
    assert len(carrying) == 14  # one chunk per token, each carrying the cumulative usage
    assert [e["usage"]["completion_tokens"] for e in carrying] == list(range(1, 15))
    assert all(e["object"] == "text_completion" and e["model"] == model for e in carrying)
    assert [e["choices"][0]["finish_reason"] for e in carrying] == [None] * 13 + ["length"]
    final = events[-2]
    assert final["choices"] == [] and final["usage"] == {"prompt_tokens": 11, "completion_tokens": 14,
                                                         "total_tokens": 25}
    tok = reference.tokenizer
    assert text == tok.decode(ids + ref, skip_special_tokens=True)[len(tok.decode(ids, skip_special_tokens=True)):]


def test_two_models_differ(server, reference):
    """The request's model picks the weights: the children answer differently, each as transformers does."""
    url, _ = server
    ids = _prompt(9, 2)
    outs = {}
    for model in ("code", "prose"):
        status, body = _http(url + "/v1/completions", _body(model, ids, 16))
        assert status == 200
        outs[model] = body["choices"][0]["token_ids"]
        assert outs[model] == reference(model, ids, 16)
    assert outs["code"] != outs["prose"]


def test_concurrent_batched_requests_equal_unbatched_generate(server, reference):
    """Prompts of different lengths sent at once to one model are batched (left padding, masks, positions)
    and every answer equals that prompt's own unbatched generate; a second model's requests interleave."""
    import aiohttp

    url, _ = server
    lengths = [3, 30, 7, 55, 16, 1, 24, 40]
    prompts = [_prompt(n, 100 + i) for i, n in enumerate(lengths)]
    max_tokens = [10, 6, 12, 9, 10, 8, 11, 7]

    async def go():
        async with aiohttp.ClientSession() as s:
            code = [_sse(s, url + "/v1/completions", _body("code", p, m, stream=True))
                    for p, m in zip(prompts, max_tokens)]
            prose = [_sse(s, url + "/v1/completions", _body("prose", p, 5, stream=True)) for p in prompts[:3]]
            return await asyncio.gather(*code, *prose)

    results = asyncio.run(go())
    for i, (status, events) in enumerate(results[:8]):
        assert status == 200
        out, _, _ = _tokens_of(events)
        assert out == reference("code", prompts[i], max_tokens[i]), f"prompt {i} (length {lengths[i]})"
    for i, (status, events) in enumerate(results[8:]):
        assert status == 200 and _tokens_of(events)[0] == reference("prose", prompts[i], 5)
    stats = _http(url + "/stats")[1]
    ids = {e["id"] for _, events in results[:8] for e in events[:1]}
    batches = [b for b in stats["batches"] if set(b["request_ids"]) & ids]
    assert max(b["size"] for b in batches) >= 2  # really batched
    assert sum(b["size"] for b in batches) == 8 and all(b["model"] == "code" for b in batches)
    padded = [b for b in batches if b["padded_prompt_tokens"] > b["prompt_tokens"]]
    assert padded, "no batch mixed prompt lengths"
    for b in batches:
        assert b["prefill_s"] > 0 and b["decode_s"] >= 0 and b["switch_s"] == 0.0
    reqs = {r["id"]: r for r in stats["requests"]}
    for rid in ids:
        r = reqs[rid]
        assert r["finish_reason"] == "length" and r["queue_wait_s"] >= 0 and r["ttft_s"] > 0
    assert stats["memory"]["weights"] > 0 and stats["backend"] == "separate"


def test_non_streaming_and_text_prompt(server, reference):
    url, _ = server
    tok = reference.tokenizer
    status, body = _http(url + "/v1/completions", _body("code", "def main(args):\n    ", 8, ignore_eos=False))
    assert status == 200 and body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    ids = tok("def main(args):\n    ")["input_ids"]
    assert body["choices"][0]["prompt_token_ids"] == ids
    ref = reference("code", ids, 8, ignore_eos=False)
    assert body["choices"][0]["token_ids"] == ref
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": len(ref),
                             "total_tokens": len(ids) + len(ref)}
    assert body["choices"][0]["finish_reason"] == ("stop" if len(ref) < 8 else "length")
    assert body["choices"][0]["text"] == tok.decode(ref, skip_special_tokens=True)


def test_chat(server, reference):
    url, _ = server
    tok = reference.tokenizer
    messages = [{"role": "system", "content": "You write Python."},
                {"role": "user", "content": [{"type": "text", "text": "import os"}]}]
    ids = tok("You write Python.\nimport os")["input_ids"]  # no chat template: contents joined by newlines
    ref = reference("prose", ids, 7)
    body = {"model": "prose", "messages": messages, "max_completion_tokens": 7, "temperature": 0, "ignore_eos": True}
    status, out = _http(url + "/v1/chat/completions", body)
    assert status == 200 and out["object"] == "chat.completion"
    msg = out["choices"][0]["message"]
    assert msg["role"] == "assistant" and msg["content"] == tok.decode(ref, skip_special_tokens=True)
    assert out["usage"]["prompt_tokens"] == len(ids) and out["usage"]["completion_tokens"] == 7

    status, events = _stream(url + "/v1/chat/completions",
                             {**body, "stream": True, "return_token_ids": True,
                              "stream_options": {"include_usage": True}})
    assert status == 200 and events[-1] == "[DONE]"
    assert events[0]["object"] == "chat.completion.chunk"
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    got, text, carrying = _tokens_of(events, chat=True)
    assert got == ref and text == msg["content"] and len(carrying) == 7
    assert all(e["usage"] is None for e in events[:-2])  # include_usage without continuous stats
    assert events[-2]["usage"]["completion_tokens"] == 7 and events[-2]["choices"] == []
    assert carrying[-1]["choices"][0]["finish_reason"] == "length"


def test_stop_strings_stop_token_ids_and_min_tokens(server, reference):
    url, _ = server
    tok = reference.tokenizer
    ids = _prompt(10, 3)
    ref = reference("code", ids, 20)
    full = tok.decode(ref, skip_special_tokens=True)
    # a stop string taken from the middle of the greedy text: the output ends right before it
    stop = full[len(tok.decode(ref[:4], skip_special_tokens=True)):][:3]
    assert stop
    cut = full.find(stop)
    for stream in (False, True):
        body = _body("code", ids, 20, stop=[stop, "never-generated-zzz"], stream=stream)
        if stream:
            status, events = _stream(url + "/v1/completions", body)
            assert status == 200
            got, text, carrying = _tokens_of(events)
            finish = carrying[-1]["choices"][0]["finish_reason"]
        else:
            status, out = _http(url + "/v1/completions", body)
            assert status == 200
            text, finish, got = out["choices"][0]["text"], out["choices"][0]["finish_reason"], out["choices"][0]["token_ids"]
        assert text == full[:cut] and finish == "stop"
        assert got == ref[:len(got)] and len(got) < 20

    # a stop token id ends the output with that token; min_tokens holds it back
    j = 5
    stop_id = ref[j]
    first = ref.index(stop_id)
    status, out = _http(url + "/v1/completions", _body("code", ids, 20, stop_token_ids=[stop_id]))
    assert out["choices"][0]["token_ids"] == ref[:first + 1] and out["choices"][0]["finish_reason"] == "stop"
    status, out = _http(url + "/v1/completions", _body("code", ids, 20, stop_token_ids=[stop_id],
                                                       min_tokens=first + 2))
    got = out["choices"][0]["token_ids"]
    assert status == 200 and len(got) >= first + 3 and stop_id not in got[:first + 2]


def test_sampling_is_seeded(server):
    url, _ = server
    ids = _prompt(6, 4)

    def sample(seed):
        status, out = _http(url + "/v1/completions", _body("code", ids, 12, temperature=1.0, seed=seed))
        assert status == 200
        return out["choices"][0]["token_ids"]

    a = sample(7)
    assert sample(7) == a  # the same seed, the same tokens
    assert any(sample(s) != a for s in (8, 9, 10))
    status, out = _http(url + "/v1/completions", _body("code", ids, 12, temperature=0.8, top_k=5, top_p=0.9, seed=1))
    assert status == 200 and len(out["choices"][0]["token_ids"]) == 12


BAD = [
    ("/v1/completions", {"model": "nope", "prompt": "x"}, 404, "model"),
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", b"[1, 2]", 400, None),
    ("/v1/completions", b"\xff\xfe", 400, None),
    ("/v1/completions", {"prompt": "x"}, 400, "model"),
    ("/v1/completions", {"model": 3, "prompt": "x"}, 400, "model"),
    ("/v1/completions", {"model": "code"}, 400, "prompt"),
    ("/v1/completions", {"model": "code", "prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"model": "code", "prompt": []}, 400, "prompt"),
    ("/v1/completions", {"model": "code", "prompt": {"a": 1}}, 400, "prompt"),
    ("/v1/completions", {"model": "code", "prompt": [1, -2]}, 400, "prompt"),
    ("/v1/completions", {"model": "code", "prompt": [5, 4096]}, 400, "prompt"),
    ("/v1/completions", {"model": "code", "prompt": ["a", "b"]}, 400, "prompt"),
    ("/v1/completions", {"model": "code", "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"model": "code", "prompt": "x", "max_tokens": -3}, 400, "max_tokens"),
    ("/v1/completions", {"model": "code", "prompt": "x", "max_tokens": "5"}, 400, "max_tokens"),
    ("/v1/completions", {"model": "code", "prompt": "x", "max_tokens": True}, 400, "max_tokens"),
    ("/v1/completions", {"model": "code", "prompt": [5] * 300}, 400, "prompt"),
    ("/v1/completions", {"model": "code", "prompt": [5] * 200, "max_tokens": 100}, 400, "max_tokens"),
    ("/v1/completions", {"model": "code", "prompt": "x", "temperature": -0.5}, 400, "temperature"),
    ("/v1/completions", {"model": "code", "prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"model": "code", "prompt": "x", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"model": "code", "prompt": "x", "seed": 1.5}, 400, "seed"),
    ("/v1/completions", {"model": "code", "prompt": "x", "stop": [1]}, 400, "stop"),
    ("/v1/completions", {"model": "code", "prompt": "x", "stop": ""}, 400, "stop"),
    ("/v1/completions", {"model": "code", "prompt": "x", "ignore_eos": "yes"}, 400, "ignore_eos"),
    ("/v1/completions", {"model": "code", "prompt": "x", "stream": 1}, 400, "stream"),
    ("/v1/completions", {"model": "code", "prompt": "x", "stream_options": []}, 400, "stream_options"),
    ("/v1/completions", {"model": "code", "prompt": "x", "min_tokens": -1}, 400, "min_tokens"),
    ("/v1/completions", {"model": "code", "prompt": "x", "max_tokens": 4, "min_tokens": 5}, 400, "min_tokens"),
    ("/v1/completions", {"model": "code", "prompt": "x", "n": 3}, 400, "n"),
    ("/v1/completions", {"model": "code", "prompt": "x", "stop_token_ids": "1"}, 400, "stop_token_ids"),
    ("/v1/chat/completions", {"model": "code"}, 400, "messages"),
    ("/v1/chat/completions", {"model": "code", "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": "code", "messages": [{"content": "hi"}]}, 400, "messages[0]"),
    ("/v1/chat/completions", {"model": "code", "messages": [{"role": "user", "content": 5}]}, 400,
     "messages[0].content"),
    ("/v1/chat/completions", {"model": "code", "messages": [{"role": "user", "content": "hi"}],
                              "max_completion_tokens": 0}, 400, "max_completion_tokens"),
    ("/v1/chat/completions", {"model": "elsewhere", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
    ("/v1/nothing", {"model": "code"}, 404, None),
]


def test_echo_logprobs_score_the_prompt_as_transformers_does(server, reference):
    """``echo`` + ``logprobs`` (lm-eval's and moecap's perplexity-over-HTTP path): the prompt's token
    log-probabilities equal transformers' log-softmax, with the top alternatives; ``max_tokens`` 0 scores
    only; generated tokens carry their own log-probabilities; chat has its own shape."""
    import torch

    url, _ = server
    ids = _prompt(20, 7)
    with torch.inference_mode():
        logits = reference.models["prose"](torch.tensor([ids])).logits[0].float()
    ref = torch.log_softmax(logits, dim=-1)
    status, body = _http(url + "/v1/completions", {"model": "prose", "prompt": ids, "echo": True, "logprobs": 3,
                                                   "max_tokens": 0})
    assert status == 200, body
    choice = body["choices"][0]
    lp = choice["logprobs"]
    assert body["usage"] == {"prompt_tokens": 20, "completion_tokens": 0, "total_tokens": 20}
    assert choice["finish_reason"] == "length" and len(lp["tokens"]) == 20
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    want = ref[torch.arange(19), torch.tensor(ids[1:])].tolist()
    assert lp["token_logprobs"][1:] == pytest.approx(want, abs=1e-4)
    for t in range(1, 20):  # the 3 most likely tokens at each position, as transformers ranks them
        top = sorted(lp["top_logprobs"][t].values(), reverse=True)
        assert top == pytest.approx(ref[t - 1].topk(3).values.tolist(), abs=1e-4)
    tok = reference.tokenizer
    assert choice["text"] == tok.decode(ids) and "".join(lp["tokens"]) == "".join(tok.decode([i]) for i in ids)
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])

    # generated tokens: greedy, each with the log-probability transformers gives it
    status, body = _http(url + "/v1/completions", _body("prose", ids, 4, logprobs=0))
    gen = body["choices"][0]
    out = gen["token_ids"]
    assert out == reference("prose", ids, 4) and len(gen["logprobs"]["token_logprobs"]) == 4
    with torch.inference_mode():
        full = torch.log_softmax(reference.models["prose"](torch.tensor([ids + out])).logits[0].float(), dim=-1)
    want = [full[len(ids) - 1 + i, t].item() for i, t in enumerate(out)]
    assert gen["logprobs"]["token_logprobs"] == pytest.approx(want, abs=1e-4)
    assert gen["logprobs"]["top_logprobs"] == [None] * 4  # logprobs 0: no alternatives

    # chat: logprobs true + top_logprobs, streamed
    status, events = _stream(url + "/v1/chat/completions", {
        "model": "code", "messages": [{"role": "user", "content": "def"}], "max_tokens": 3, "temperature": 0,
        "logprobs": True, "top_logprobs": 2, "stream": True})
    entries = [e["choices"][0]["logprobs"]["content"][0] for e in events[1:-1] if e["choices"][0]["logprobs"]]
    assert status == 200 and len(entries) == 3
    for e in entries:  # greedy: the chosen token is the most likely one
        assert len(e["top_logprobs"]) == 2 and e["logprob"] == pytest.approx(e["top_logprobs"][0]["logprob"])
        assert bytes(e["bytes"]).decode() == e["token"]

    # what is refused, with the field named
    for body, param in (({"echo": True, "stream": True, "max_tokens": 1}, "echo"),
                        ({"logprobs": 21, "max_tokens": 1}, "logprobs"),
                        ({"max_tokens": 0}, "max_tokens")):
        status, out = _http(url + "/v1/completions", {"model": "code", "prompt": ids, **body})
        assert status == 400 and out["error"]["param"] == param, out
    status, out = _http(url + "/v1/chat/completions", {"model": "code", "messages": [{"role": "user", "content": "x"}],
                                                       "top_logprobs": 2})
    assert status == 400 and out["error"]["param"] == "top_logprobs"


def test_bad_requests_get_openai_errors_and_the_server_goes_on(server):
    url, proc = server
    for path, body, status, param in BAD:
        for stream in (False, True):
            if stream and isinstance(body, dict):
                body = {**body, "stream": body.get("stream", True)}
            got, out = _http(url + path, body)
            assert got == status, (path, body, got, out)
            err = out["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["message"], out
            assert err["param"] == param, (body, err)
            assert err["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    # the messages say what is wrong, with the numbers
    out = _http(url + "/v1/completions", {"model": "nope", "prompt": "x"})[1]["error"]["message"]
    assert all(m in out for m in MODELS)
    out = _http(url + "/v1/completions", {"model": "code", "prompt": [5] * 300})[1]["error"]["message"]
    assert "300" in out and "256" in out
    out = _http(url + "/v1/completions", {"model": "code", "prompt": [5] * 200, "max_tokens": 100})[1]
    assert all(n in out["error"]["message"] for n in ("256", "200", "100", "300"))
    assert _http(url + "/v1/completions", method="GET")[0] == 405
    assert proc.poll() is None
    status, out = _http(url + "/v1/completions", _body("prose", [5, 6, 7], 3))
    assert status == 200 and out["usage"]["completion_tokens"] == 3


def test_moecap_client_benchmarks_it(server, reference):
    """moecap's own streaming client: exact token counts and times from the continuous usage."""
    from moecap.runners.openai_client import make_session, stream_request

    url, _ = server
    prompts = [_prompt(n, 200 + n) for n in (5, 12, 20)]

    async def go():
        origin = time.perf_counter()
        async with make_session() as s:
            traces = await asyncio.gather(*[stream_request(s, url, "code", p, 9, origin=origin, id=i)
                                            for i, p in enumerate(prompts)])
            chat = await stream_request(s, url, "tiny-moe-c", "int main", 5, chat=True, origin=origin, id=9)
        return traces, chat

    traces, chat = asyncio.run(go())
    tok = reference.tokenizer
    for p, t in zip(prompts, traces):
        assert t.error is None and t.http_status == 200
        assert t.output_tokens_source == "usage" and t.chunk_tokens_known and not t.multi_token_chunks
        assert len(t.token_times_s) == 9 and t.finish_reason == "length" and t.input_tokens == len(p)
        assert t.text == tok.decode(reference("code", p, 9), skip_special_tokens=True)
        assert t.token_times_s == sorted(t.token_times_s) and t.token_times_s[0] >= t.send_s
    assert chat.error is None and len(chat.token_times_s) == 5 and chat.usage["completion_tokens"] == 5


def test_server_runner_suite(tmp_path, zoo):
    """A `server` runner suite launches `moecap serve` itself and benchmarks it: ok records."""
    from moecap.run import run_suite
    from moecap.suite import parse_suite

    runner = {"type": "server", "args": {"command": [PYTHON, "-m", "moecap", "serve", "tiny={model}", "--port", "{port}"],
                                         "model": "tiny", "startup_timeout_s": 180}}
    raw = {
        "name": "serve",
        "models": [{"id": str(zoo / "code"), "name": "tiny"}],
        "runners": [runner],
        "workloads": [{"name": "w", "input_tokens": 12, "output_tokens": 6, "num_prompts": 4,
                       "slo_ms": {"ttft_ms": 60_000, "tpot_ms": 60_000}}],
        "loads": [{"concurrency": 1}, {"concurrency": 4}, {"rate": 20.0, "arrival": "poisson"}],
        "hardware": {"device": "cpu", "peaks": {"mem_bandwidth_gbs": 10.0, "tflops": {"fp32": 1.0}},
                     "calibrate": "never"},
        "output": {"dir": str(tmp_path / "results")},
    }
    out = run_suite(parse_suite(raw, "test"), log=lambda s: None)
    assert [o.status for o in out.outcomes] == ["ok"] * 3, [o.record.error for o in out.outcomes]
    for o in out.outcomes:
        rep = o.record.report
        thr = rep["throughput"]
        assert thr["completed"] == 4 and thr["failed"] == 0 and thr["output_tokens"] == 4 * 6
        for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
            assert rep["latency"][key]["median"] > 0
    log = open(out.outcomes[0].record.config["runner"]["server_log"]).read()
    assert "listening on" in log


# -- in-process server with a wrapped backend (failures, disconnects) ------------------------------

class _Wrapped:
    """A real backend whose forward() runs a hook first (to fail or slow down on purpose)."""

    def __init__(self, inner, hook):
        self.inner, self.hook = inner, hook

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def forward(self, model, input_ids, attention_mask, past_key_values, position_ids=None):
        self.hook(model, input_ids, past_key_values)
        return self.inner.forward(model, input_ids, attention_mask, past_key_values, position_ids)


@pytest.fixture(scope="module")
def separate(zoo):
    from moecap.engine.backend import SeparateModelsBackend

    return SeparateModelsBackend({"code": zoo / "code", "prose": zoo / "prose"}, device="cpu")


@contextlib.contextmanager
def _app(backend, **sched):
    """The server's app on a free port, in a thread of this process."""
    from aiohttp import web

    from moecap.engine.scheduler import Scheduler
    from moecap.engine.server import OpenAIServer

    port = free_port()
    server = OpenAIServer(backend, Scheduler(backend, **sched))
    ready, state = threading.Event(), {}

    async def main():
        runner = web.AppRunner(server.app(), handler_cancellation=True)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        state["loop"], state["stop"] = asyncio.get_running_loop(), asyncio.Event()
        ready.set()
        await state["stop"].wait()
        await runner.cleanup()

    thread = threading.Thread(target=lambda: asyncio.run(main()), daemon=True)
    thread.start()
    assert ready.wait(30)
    try:
        yield f"http://127.0.0.1:{port}", server
    finally:
        state["loop"].call_soon_threadsafe(state["stop"].set)
        thread.join(30)


FAIL_PREFILL, FAIL_DECODE = 1001, 1002  # prompt markers the faulty backend reacts to


def test_backend_exception_fails_only_that_batch(separate):
    import aiohttp

    step = {"left": None}

    def hook(model, ids, past):
        if past is None:
            step["left"] = 3 if bool((ids == FAIL_DECODE).any()) else None
            if bool((ids == FAIL_PREFILL).any()):
                raise RuntimeError("injected prefill failure")
        elif step["left"] is not None:
            step["left"] -= 1
            if step["left"] == 0:
                raise RuntimeError("injected decode failure")

    with _app(_Wrapped(separate, hook), max_batch_size=1) as (url, server):
        bad = [5, 6, FAIL_PREFILL]  # valid token ids (vocabulary of 1024) the hook fails on
        status, out = _http(url + "/v1/completions", _body("code", bad, 4))
        assert status == 500 and "injected prefill failure" in out["error"]["message"]
        assert out["error"]["type"] == "server_error"
        status, events = _stream(url + "/v1/completions", _body("code", bad, 4, stream=True))
        assert status == 500 and "injected prefill failure" in events[0]["error"]["message"]
        # a failure after the stream started: an error event, then [DONE]
        status, events = _stream(url + "/v1/completions", _body("code", [5, FAIL_DECODE], 10, stream=True))
        assert status == 200 and events[-1] == "[DONE]"
        assert "injected decode failure" in events[-2]["error"]["message"]
        assert len(_tokens_of(events)[0]) == 3

        # requests of other batches (sent together) are untouched; the server goes on
        async def go():
            async with aiohttp.ClientSession() as s:
                return await asyncio.gather(
                    _sse(s, url + "/v1/completions", _body("code", bad, 4, stream=True)),
                    _sse(s, url + "/v1/completions", _body("prose", [7, 8, 9], 4, stream=True)),
                    _sse(s, url + "/v1/completions", _body("code", [7, 8, 9], 4, stream=True)))

        (s1, _), (s2, e2), (s3, e3) = asyncio.run(go())
        assert (s1, s2, s3) == (500, 200, 200)
        assert len(_tokens_of(e2)[0]) == 4 and len(_tokens_of(e3)[0]) == 4
        stats = server.scheduler.stats()
        assert stats["totals"]["batches_failed"] == 4 and stats["totals"]["requests_failed"] == 4
        assert any("injected" in (b["error"] or "") for b in stats["batches"])


def test_client_disconnect_cancels_its_row(separate):
    """A client that goes away mid-stream stops its row; its batch mate streams on to the end."""
    import aiohttp

    def slow(model, ids, past):
        time.sleep(0.01)

    with _app(_Wrapped(separate, slow), max_batch_size=4) as (url, server):
        async def go():
            async with aiohttp.ClientSession() as s:
                # a prose request holds the worker, so that the two code requests queue and batch together
                blocker = asyncio.create_task(_sse(s, url + "/v1/completions", _body("prose", [3, 4], 10, stream=True)))
                await asyncio.sleep(0.03)
                mate = asyncio.create_task(_sse(s, url + "/v1/completions", _body("code", [9, 10], 40, stream=True)))
                async with s.post(url + "/v1/completions", json=_body("code", [5, 6, 7], 240, stream=True)) as resp:
                    assert resp.status == 200
                    seen = 0
                    async for line in resp.content:
                        seen += line.startswith(b"data:")
                        if seen == 3:
                            break
                # leaving the block closes the connection mid-stream
                return await blocker, await mate

        (s1, _), (s2, events) = asyncio.run(go())
        assert s1 == s2 == 200 and len(_tokens_of(events)[0]) == 40
        deadline = time.monotonic() + 10
        recs = []
        while not recs and time.monotonic() < deadline:
            recs = [r for r in server.scheduler.stats()["requests"] if r["prompt_tokens"] == 3]
            time.sleep(0.05)
        (rec,) = recs
        assert rec["finish_reason"] == "abort" and 3 <= rec["completion_tokens"] < 100
        mate = next(r for r in server.scheduler.stats()["requests"] if r["prompt_tokens"] == 2 and r["model"] == "code")
        assert mate["batch"] == rec["batch"] and mate["finish_reason"] == "length"
        (batch,) = [b for b in server.scheduler.stats()["batches"] if b["index"] == rec["batch"]]
        assert batch["size"] == 2 and batch["decode_steps"] == 39  # the batch ended with its last live row


# -- signals and the command line --------------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_cleanly(zoo, sig):
    port = free_port()
    cmd = [PYTHON, "-m", "moecap", "serve", str(zoo / "code"), "--port", str(port)]
    url = f"http://127.0.0.1:{port}"
    with running_server(cmd, url + "/health", deadline_s=180) as proc:
        result = {}

        def long_stream():
            result["r"] = _stream(url + "/v1/completions", _body("code", [5, 6], 250, stream=True))

        t = threading.Thread(target=long_stream)
        t.start()
        time.sleep(0.3)
        proc.send_signal(sig)
        assert proc.wait(timeout=30) == 0
        t.join(30)
        out = proc.stdout.read().decode(errors="replace")
        assert "moecap serve: stopped" in out and "Traceback" not in out
    status, events = result["r"]
    assert status == 200 and events[-1] == "[DONE]"  # the open stream was ended, not cut


def test_cli_errors():
    out = subprocess.run([PYTHON, "-m", "moecap", "serve", "a=x", "a=y"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 2 and "NAME=MODEL" in out.stderr
    out = subprocess.run([PYTHON, "-m", "moecap", "serve", "/nonexistent/model-dir", "--port", str(free_port())],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 2 and "could not load model" in out.stderr
    out = subprocess.run([PYTHON, "-m", "moecap", "serve", "x", "--backend", "nope"], capture_output=True, text=True)
    assert out.returncode == 2 and "separate" in out.stderr and "consolidated" in out.stderr
    # an option the backend does not take, a missing one, a bad value: named, before any model loads
    for args, msg in ((["--threshold", "0.1"], "does not take option(s) threshold"),
                      (["--backend", "partition"], "--fast-budget-gb"),
                      (["--backend", "partition", "--fast-budget-gb", "-1"], "--fast-budget-gb must be > 0"),
                      (["--backend", "consolidated", "--consolidation-plan", "/nonexistent.json"], "no such file")):
        out = subprocess.run([PYTHON, "-m", "moecap", "serve", "tiny-moe-code", "tiny-moe-prose", "--port",
                              str(free_port()), *args], capture_output=True, text=True, cwd=REPO, timeout=300)
        assert out.returncode == 2 and msg in out.stderr, (args, out.stderr[-2000:])


def test_parse_model_specs(tmp_path):
    from moecap.engine.server import parse_model_specs

    d = tmp_path / "child-one"
    d.mkdir()
    assert parse_model_specs([str(d), "tiny-moe-code", "x=org/model", "org/other"]) == {
        "child-one": str(d), "tiny-moe-code": "tiny-moe-code", "x": "org/model", "org/other": "org/other"}
    with pytest.raises(ValueError, match="NAME=MODEL"):
        parse_model_specs(["tiny-moe-code", "tiny-moe-code"])


# -- the scheduler on its own, with a fake backend ----------------------------------------------------

class FakeTokenizer:
    eos_token_id = 0
    pad_token_id = 0

    def decode(self, ids, skip_special_tokens=False, clean_up_tokenization_spaces=False):
        return "".join(f"<{i}>" for i in ids if not (skip_special_tokens and i == 0))

    def __len__(self):
        return 16


class FakeBackend:
    """Records activations and batches; every forward emits ``next_token`` and moves a fake clock."""

    def __init__(self, models=("A", "B"), step_s=0.0, switch_s=0.25, next_token=5):
        self.models = list(models)
        self.now = 0.0
        self.step_s, self.switch_s, self.next_token = step_s, switch_s, next_token
        self.activations: list[str] = []
        self.active = None
        self.forwards: list[tuple[str, int, tuple]] = []

    def clock(self):
        return self.now

    def model_names(self):
        return list(self.models)

    def tokenizer(self, model):
        return FakeTokenizer()

    def context_length(self, model):
        return 64

    def activate(self, model):
        self.activations.append(model)
        if model == self.active:
            return 0.0
        self.active = model
        return self.switch_s

    def forward(self, model, input_ids, attention_mask, past_key_values, position_ids=None):
        import torch

        assert model == self.active
        self.forwards.append((model, input_ids.shape[0], tuple(position_ids[:, -1].tolist())))
        self.now += self.step_s
        logits = torch.zeros(input_ids.shape[0], input_ids.shape[1], 16)
        logits[..., self.next_token] = 1.0
        return logits, (past_key_values or 0) + 1

    def device(self):
        import torch

        return torch.device("cpu")

    def memory(self):
        return {}


def _drain(sched) -> list[str]:
    while sched.run_next_batch():
        pass
    return [b["model"] for b in sched.stats()["batches"]]


def _submit(sched, model, n=1, max_tokens=2, **kw):
    from moecap.engine.scheduler import Request, SamplingParams

    return [sched.submit(Request(model, [3, 4], SamplingParams(max_tokens=max_tokens, **kw))) for _ in range(n)]


def test_scheduler_max_consecutive_batches_bounds_starvation():
    from moecap.engine.scheduler import Scheduler

    be = FakeBackend()
    s = Scheduler(be, max_batch_size=2, max_wait_s=None, max_consecutive_batches=3, clock=be.clock)
    _submit(s, "A", 20)
    (b,) = _submit(s, "B")
    order = _drain(s)
    assert order[:4] == ["A", "A", "A", "B"] and order.count("A") == 10
    assert be.activations[:4] == ["A", "A", "A", "B"]
    assert b.finish_reason == "length" and b.batch_index == 3
    # without the bound, B waits for all of A (the skew the bound exists for)
    be = FakeBackend()
    s = Scheduler(be, max_batch_size=2, max_wait_s=None, max_consecutive_batches=None, clock=be.clock)
    _submit(s, "A", 20)
    _submit(s, "B")
    assert _drain(s) == ["A"] * 10 + ["B"]


def test_scheduler_max_wait_bounds_starvation():
    from moecap.engine.scheduler import Scheduler

    be = FakeBackend(step_s=0.1)  # a batch of max_tokens=4: 4 passes, 0.4 s on the fake clock
    s = Scheduler(be, max_batch_size=2, max_wait_s=1.0, max_consecutive_batches=None, clock=be.clock)
    _submit(s, "A", 20, max_tokens=4)
    (b,) = _submit(s, "B", max_tokens=4)
    order = _drain(s)
    assert order[:4] == ["A", "A", "A", "B"]  # after 1.2 s > 1.0 s of waiting, B goes next
    rec = next(r for r in s.stats()["requests"] if r["id"] == b.id)
    assert 1.0 <= rec["queue_wait_s"] <= 1.0 + 0.4 + 1e-9


def test_scheduler_keeps_the_active_model_and_records_switches():
    from moecap.engine.scheduler import Scheduler

    be = FakeBackend(models=("A", "B", "C"), switch_s=0.25)
    s = Scheduler(be, max_batch_size=4, max_wait_s=100.0, max_consecutive_batches=100, clock=be.clock)
    for _ in range(6):  # interleaved arrivals
        _submit(s, "A")
        _submit(s, "B")
    order = _drain(s)
    assert order == ["A", "A", "B", "B"]  # grouped by model: one switch, not eleven
    stats = s.stats()
    assert [b["size"] for b in stats["batches"]] == [4, 2, 4, 2]
    assert [b["switch_s"] for b in stats["batches"]] == [0.25, 0.0, 0.25, 0.0]
    assert stats["totals"]["switches"] == 2 and stats["totals"]["switch_s"] == 0.5
    assert all(r["queue_wait_s"] is not None and r["ttft_s"] is not None for r in stats["requests"])
    assert stats["config"] == {"max_batch_size": 4, "max_wait_s": 100.0, "max_consecutive_batches": 100}
    # three models, one heavy: the light ones are each served within the bound
    be = FakeBackend(models=("A", "B", "C"))
    s = Scheduler(be, max_batch_size=1, max_wait_s=None, max_consecutive_batches=2, clock=be.clock)
    _submit(s, "A", 10)
    _submit(s, "B")
    _submit(s, "C")
    order = _drain(s)
    assert order.index("B") <= 2 and order.index("C") <= 3


def test_scheduler_batch_positions_and_per_row_finish():
    """Left padding: positions start at 0 at each prompt's first real token; rows finish on their own."""
    from moecap.engine.scheduler import Request, SamplingParams, Scheduler

    be = FakeBackend(models=("A",))
    s = Scheduler(be, max_batch_size=8, clock=be.clock)
    r1 = s.submit(Request("A", [3, 4, 6, 7], SamplingParams(max_tokens=2)))
    r2 = s.submit(Request("A", [3], SamplingParams(max_tokens=4)))
    s.run_next_batch()
    assert be.forwards[0] == ("A", 2, (3, 0))  # the prefill's last positions
    assert [f[2] for f in be.forwards[1:]] == [(4, 1), (5, 2), (6, 3)]
    assert len(r1.output_ids) == 2 and len(r2.output_ids) == 4
    assert r1.text == "<5><5>" and r1.finish_reason == r2.finish_reason == "length"


def test_scheduler_eos_min_tokens_stop_strings_and_events():
    from moecap.engine.scheduler import Request, SamplingParams, Scheduler

    be = FakeBackend(models=("A",), next_token=0)  # always EOS
    s = Scheduler(be, clock=be.clock)
    events = []
    r = s.submit(Request("A", [3], SamplingParams(max_tokens=5), sink=events.append))
    s.run_next_batch()
    assert r.output_ids == [0] and r.finish_reason == "stop" and r.text == ""
    assert [(e.token_id, e.completion_tokens, e.finish_reason) for e in events] == [(0, 1, "stop")]
    r = s.submit(Request("A", [3], SamplingParams(max_tokens=5, ignore_eos=True)))
    s.run_next_batch()
    assert r.output_ids == [0] * 5 and r.finish_reason == "length"
    r = s.submit(Request("A", [3], SamplingParams(max_tokens=5, min_tokens=3)))  # EOS masked for 3 tokens
    s.run_next_batch()
    assert len(r.output_ids) == 4 and r.output_ids[-1] == 0 and 0 not in r.output_ids[:3]

    be = FakeBackend(models=("A",), next_token=5)  # text "<5>" per token
    s = Scheduler(be, clock=be.clock)
    events = []
    r = s.submit(Request("A", [3], SamplingParams(max_tokens=6, stop=("<5><5><5>",)), sink=events.append))
    s.run_next_batch()
    # the first two tokens' text could start the stop string: held back, then dropped with it
    assert [e.text for e in events] == ["", "", ""] and r.finish_reason == "stop" and r.text == ""
    assert [e.completion_tokens for e in events] == [1, 2, 3]
    r = s.submit(Request("A", [3], SamplingParams(max_tokens=6, stop=("5><",))))
    s.run_next_batch()
    assert r.text == "<" and r.finish_reason == "stop" and len(r.output_ids) == 2
    r = s.submit(Request("A", [3], SamplingParams(max_tokens=3, stop=("<5>x",))))
    s.run_next_batch()
    assert r.text == "<5><5><5>" and r.finish_reason == "length"


def test_scheduler_thread_cancel_and_shutdown():
    from moecap.engine.scheduler import Request, SamplingParams, Scheduler, SchedulerClosed

    be = FakeBackend()
    s = Scheduler(be, max_batch_size=2)
    queued = _submit(s, "A", 3)
    queued[2].cancel()  # cancelled while queued: dropped, with a closing event
    got = []
    r = s.submit(Request("B", [3], SamplingParams(max_tokens=3), sink=got.append))
    s.start()
    assert r.wait(10) and all(q.wait(10) for q in queued)
    assert queued[2].finish_reason == "abort" and queued[2].output_ids == []
    assert [e.completion_tokens for e in got] == [1, 2, 3] and got[-1].finished
    assert s.stats()["totals"]["requests_aborted"] == 1
    s.shutdown()
    with pytest.raises(SchedulerClosed):
        _submit(s, "A")


def test_scheduler_backend_failure_fails_the_batch_only():
    from moecap.engine.scheduler import Scheduler

    class Broken(FakeBackend):
        def forward(self, model, *a, **k):
            if model == "A":
                raise RuntimeError("boom")
            return super().forward(model, *a, **k)

    be = Broken()
    s = Scheduler(be, clock=be.clock)
    a = _submit(s, "A", 2)
    b = _submit(s, "B", 1)
    _drain(s)
    assert all(r.finish_reason == "error" and "boom" in r.error for r in a)
    assert b[0].finish_reason == "length"
    assert s.stats()["totals"]["batches_failed"] == 1


def test_backend_protocol_and_factory(separate):
    import torch

    from moecap.engine.backend import Backend, BackendError, make_backend

    assert isinstance(separate, Backend)
    assert separate.model_names() == ["code", "prose"] and separate.context_length("code") == 256
    assert separate.activate("code") == 0.0 and separate.device() == torch.device("cpu")
    mem = separate.memory()
    assert mem["weights"] == mem["weights:code"] + mem["weights:prose"] > 0
    ids = torch.tensor([[1, 5, 6], [7, 8, 9]])
    logits, cache = separate.forward("code", ids, torch.tensor([[0, 1, 1], [1, 1, 1]]), None,
                                     torch.tensor([[0, 0, 1], [0, 1, 2]]))
    assert logits.shape == (2, 3, 1024) and cache is not None
    with pytest.raises(BackendError, match="active"):
        separate.forward("prose", ids, torch.ones_like(ids), None)
    with pytest.raises(BackendError, match="separate"):
        make_backend("nope", {"a": "b"})
    with pytest.raises(BackendError, match="fast_budget_gb"):  # another kind's option, set
        make_backend("separate", {"a": "b"}, fast_budget_gb=4.0)
    with pytest.raises(BackendError, match="could not load model 'a'"):  # unset options are left out
        make_backend("separate", {"a": "/nonexistent/dir"}, fast_budget_gb=None, device="cpu")


# -- hardening: the API key, the warning beyond loopback, request limits, tokenization off the event loop,
# -- malformed input -------------------------------------------------------------------------------

KEY = "sk-moecap-test-3f9c2a7e51d0"
REQUEST_LIMIT = 4 * 1024 * 1024  # the documented default of --max-request-bytes
WARNING = ("moecap serve: WARNING: listening on {hostport} without an API key; anyone who can reach it can use it "
           "(set --api-key or MOECAP_API_KEY)")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MOECAP_API_KEY"}
    env.update(extra)
    return env


def _is_openai_error(out, type_: str = "invalid_request_error") -> bool:
    return (isinstance(out, dict) and set(out) == {"error"} and set(out["error"]) == {"message", "type", "param", "code"}
            and isinstance(out["error"]["message"], str) and bool(out["error"]["message"])
            and out["error"]["type"] == type_)


def test_api_key_required_on_every_endpoint_but_health(zoo):
    """With ``--api-key``, every endpoint but ``GET /health`` answers 401 (OpenAI's shape, code
    ``invalid_api_key``) without ``Authorization: Bearer KEY``; the key is never printed nor echoed."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [PYTHON, "-m", "moecap", "serve", f"code={zoo / 'code'}", "--port", str(port), "--device", "cpu",
           "--api-key", KEY]
    completion = _body("code", [5, 6, 7], 3)
    chat = {"model": "code", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    endpoints = [("/v1/models", None), ("/v1/models/code", None), ("/stats", None), ("/v1/completions", completion),
                 ("/v1/chat/completions", chat), ("/v1/nothing", None)]
    refused = [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"},
               {"Authorization": f"Bearer {KEY}x"}, {"Authorization": f"Bearer {KEY[:-1]}"},
               {"Authorization": "Bearer "}, {"X-Api-Key": KEY}]
    with running_server(cmd, url + "/health", deadline_s=180, env=_env()) as proc:
        for path, body in endpoints:
            for headers in refused:
                status, out = _http(url + path, body, headers=headers)
                assert status == 401, (path, headers, status, out)
                assert _is_openai_error(out, "authentication_error"), out
                assert out["error"]["code"] == "invalid_api_key" and out["error"]["param"] is None
                assert KEY not in json.dumps(out)
        bearer = {"Authorization": f"Bearer {KEY}"}
        for path in ("/v1/models", "/v1/models/code", "/stats"):
            assert _http(url + path, headers=bearer)[0] == 200, path
        status, out = _http(url + "/v1/completions", completion, headers=bearer)
        assert status == 200 and out["usage"]["completion_tokens"] == 3
        status, out = _http(url + "/v1/chat/completions", chat, headers={"Authorization": f"bearer {KEY}"})
        assert status == 200 and out["usage"]["completion_tokens"] == 2  # the scheme is case-insensitive
        assert _http(url + "/v1/nothing", headers=bearer)[0] == 404  # authorized, then routed
        for headers in ({}, {"Authorization": "Bearer wrong"}):  # the health check stays open
            status, out = _http(url + "/health", headers=headers)
            assert status == 200 and out["status"] == "ok"
    output = proc.stdout.read().decode(errors="replace")
    assert "API key required" in output and KEY not in output and "WARNING" not in output


def test_api_key_from_the_environment_and_the_flag_first(zoo):
    """``MOECAP_API_KEY`` sets the key when ``--api-key`` is absent (vLLM's ``VLLM_API_KEY`` convention); the
    flag wins over it. With a key, listening on 0.0.0.0 prints no warning. ``--max-request-bytes`` is honored
    (after the key: an unauthorized client's body is never read)."""
    port = free_port()
    cmd = [PYTHON, "-m", "moecap", "serve", f"code={zoo / 'code'}", "--host", "0.0.0.0", "--port", str(port),
           "--device", "cpu", "--max-request-bytes", "65536"]
    url = f"http://127.0.0.1:{port}"
    bearer = {"Authorization": f"Bearer {KEY}"}
    with running_server(cmd, url + "/health", deadline_s=180, env=_env(MOECAP_API_KEY=KEY)) as proc:
        assert _http(url + "/v1/models")[0] == 401
        assert _http(url + "/v1/models", headers=bearer)[0] == 200
        status, out = _http(url + "/v1/completions", _body("code", [5, 6], 2), headers=bearer)
        assert status == 200 and out["usage"]["completion_tokens"] == 2
        big = json.dumps({"model": "code", "prompt": "a" * 70_000}).encode()
        status, out = _http(url + "/v1/completions", big)
        assert status == 401 and _is_openai_error(out, "authentication_error")
        status, out = _http(url + "/v1/completions", big, headers=bearer)
        assert status == 413 and _is_openai_error(out) and "65536" in out["error"]["message"], out
    output = proc.stdout.read().decode(errors="replace")
    assert KEY not in output and "WARNING" not in output and "API key required" in output

    port = free_port()
    cmd = [PYTHON, "-m", "moecap", "serve", f"code={zoo / 'code'}", "--port", str(port), "--device", "cpu",
           "--api-key", KEY]
    url = f"http://127.0.0.1:{port}"
    with running_server(cmd, url + "/health", deadline_s=180, env=_env(MOECAP_API_KEY="from-the-env")) as proc:
        assert _http(url + "/v1/models", headers={"Authorization": "Bearer from-the-env"})[0] == 401
        assert _http(url + "/v1/models", headers=bearer)[0] == 200
    output = proc.stdout.read().decode(errors="replace")
    assert KEY not in output and "from-the-env" not in output


def test_api_key_must_be_sendable():
    """An empty key (``--api-key ""``, e.g. from an unset shell variable) or one no header can carry is refused
    at once, before any model loads, without printing it (an empty ``MOECAP_API_KEY`` means no key: see the
    warning test)."""
    for key in ("", "two words", "tab\there"):
        out = subprocess.run([PYTHON, "-m", "moecap", "serve", "tiny-moe-code", "--port", str(free_port()),
                              "--api-key", key], capture_output=True, text=True, cwd=REPO, timeout=120, env=_env())
        assert out.returncode == 2 and "--api-key" in out.stderr, (key, out.stderr[-2000:])
        assert not key or key not in out.stderr + out.stdout
    out = subprocess.run([PYTHON, "-m", "moecap", "serve", "tiny-moe-code", "--port", str(free_port())],
                         capture_output=True, text=True, cwd=REPO, timeout=120, env=_env(MOECAP_API_KEY="sk two"))
    assert out.returncode == 2 and "MOECAP_API_KEY" in out.stderr and "sk two" not in out.stderr + out.stdout
    from moecap.engine.server import check_api_key

    assert check_api_key(KEY) == KEY
    for bad in ("", " ", "a b", "a\nb", "\x00"):
        with pytest.raises(ValueError):
            check_api_key(bad)


@pytest.mark.parametrize("address,loopback", [
    ("127.0.0.1", True), ("127.3.2.1", True), ("::1", True), ("localhost", True), ("LOCALHOST", True),
    ("::ffff:127.0.0.1", True), ("[::1]", True),
    ("0.0.0.0", False), ("::", False), ("10.1.2.3", False), ("192.168.0.7", False), ("fe80::1%lo", False),
    ("2001:db8::1", False), ("example.org", False), ("", False)])
def test_loopback_addresses(address, loopback):
    from moecap.engine.server import is_loopback

    assert is_loopback(address) is loopback


@pytest.mark.parametrize("host,warned", [("0.0.0.0", True), ("localhost", False)])
def test_warns_when_listening_beyond_loopback_without_a_key(zoo, host, warned):
    """Without a key, a server reachable beyond this machine says so, once, on stderr; a loopback one does not.
    An empty ``MOECAP_API_KEY`` is no key."""
    port = free_port()
    cmd = [PYTHON, "-m", "moecap", "serve", f"code={zoo / 'code'}", "--host", host, "--port", str(port),
           "--device", "cpu"]
    with running_server(cmd, f"http://127.0.0.1:{port}/health", 180, _env(MOECAP_API_KEY=""),
                        separate_stderr=True) as proc:
        assert _http(f"http://127.0.0.1:{port}/v1/models")[0] == 200  # open: no key
    stdout, stderr = proc.stdout.read().decode(errors="replace"), proc.stderr.read().decode(errors="replace")
    lines = [line for line in stderr.splitlines() if "WARNING" in line]
    assert lines == ([WARNING.format(hostport=f"{host}:{port}")] if warned else []), stderr[-2000:]
    assert "WARNING" not in stdout and "moecap serve: stopped" in stdout


def _post_chunked(url: str, chunks, headers: dict[str, str] | None = None) -> tuple[int, object]:
    """POST a body sent with chunked transfer encoding (no Content-Length: the limit holds while reading)."""
    import aiohttp

    async def body():
        for c in chunks:
            yield c

    async def go():
        headers_ = {"Content-Type": "application/json", **(headers or {})}
        async with aiohttp.ClientSession() as s, s.post(url, data=body(), headers=headers_) as r:
            return r.status, await r.json(content_type=None)

    return asyncio.run(go())


def test_request_body_limit_answers_413_in_json(server):
    """Beyond ``--max-request-bytes`` (4 MiB by default) a body is refused with 413 and OpenAI's JSON error,
    not aiohttp's text page, whether it declares its length, streams it chunked, or inflates from gzip; a
    body of exactly the limit is read (and then refused for its prompt's length, 400)."""
    url, proc = server
    head = b'{"model":"code","max_tokens":1,"prompt":"'
    for size in (REQUEST_LIMIT + 1, 10 * 1024 * 1024):  # a 10 MB prompt: refused before it is read
        raw = head + b"a" * (size - len(head) - 2) + b'"}'
        status, out = _http(url + "/v1/completions", raw)
        assert status == 413 and _is_openai_error(out), (size, status, str(out)[:300])
        assert str(REQUEST_LIMIT) in out["error"]["message"] and out["error"]["code"] == "request_too_large"
    status, out = _post_chunked(url + "/v1/completions", [head] + [b"a" * 65536] * 65 + [b'"}'])
    assert status == 413 and _is_openai_error(out) and out["error"]["code"] == "request_too_large", out
    bomb = gzip.compress(head + b"a" * (64 * 1024 * 1024) + b'"}')  # 64 MiB inflated, ~64 KiB on the wire
    status, out = _http(url + "/v1/completions", bomb, headers={"Content-Encoding": "gzip"})
    assert status == 413 and _is_openai_error(out), out
    exact = head + b"a" * (REQUEST_LIMIT - len(head) - 2) + b'"}'
    status, out = _http(url + "/v1/completions", exact)
    assert status == 400 and out["error"]["param"] == "prompt" and "characters" in out["error"]["message"], out
    assert proc.poll() is None
    status, out = _http(url + "/v1/completions", _body("code", [5, 6, 7], 2))
    assert status == 200 and out["usage"]["completion_tokens"] == 2


class _HookedTokenizer:
    """A real tokenizer whose encoding calls run a hook first (to count them, or to hold them on purpose)."""

    def __init__(self, inner, hook):
        self.inner, self.hook = inner, hook

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __len__(self):
        return len(self.inner)

    def __call__(self, text, *args, **kwargs):
        self.hook(text)
        return self.inner(text, *args, **kwargs)


class _TokenizerHooked:
    """A real backend whose tokenizers are :class:`_HookedTokenizer`."""

    def __init__(self, inner, hook):
        self.inner = inner
        self.tokenizers = {m: _HookedTokenizer(inner.tokenizer(m), hook) for m in inner.model_names()}

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def tokenizer(self, model):
        return self.tokenizers[model]


def test_prompt_length_limit_before_tokenizing(separate):
    """A prompt longer than the context times ``PROMPT_CHARS_PER_TOKEN`` characters is refused with 400 naming
    the limit, without being tokenized; a shorter one beyond the context in tokens gets the context error."""
    calls: list[int] = []
    with _app(_TokenizerHooked(separate, lambda text: calls.append(len(text)))) as (url, server):
        ctx = int(server.backend.context_length("code"))
        limit = ctx * 32
        status, out = _http(url + "/v1/completions", {"model": "code", "prompt": "a" * (limit + 1), "max_tokens": 1})
        assert status == 400 and _is_openai_error(out) and out["error"]["param"] == "prompt", out
        assert f"{limit} characters" in out["error"]["message"] and out["error"]["code"] == "prompt_too_long"
        status, out = _http(url + "/v1/completions", {"model": "code", "prompt": ["é" * (limit + 1)]})
        assert status == 400 and out["error"]["code"] == "prompt_too_long", out
        messages = [{"role": "system", "content": "a" * (limit // 2)},
                    {"role": "user", "content": [{"type": "text", "text": "b" * (limit // 2 + 1)}]}]
        status, out = _http(url + "/v1/chat/completions", {"model": "code", "messages": messages})
        assert status == 400 and out["error"]["param"] == "messages" and out["error"]["code"] == "prompt_too_long"
        assert calls == []  # none of them was tokenized
        # at the limit: tokenized, then refused for its tokens (the context check still holds)
        status, out = _http(url + "/v1/completions", {"model": "code", "prompt": "ab " * (limit // 3)})
        assert status == 400 and out["error"]["code"] == "context_length_exceeded" and calls == [limit // 3 * 3]
        text = " ".join(str(i) for i in range(ctx + 50))  # more tokens than the context, well under the limit
        status, out = _http(url + "/v1/completions", {"model": "code", "prompt": text})
        assert status == 400 and out["error"]["code"] == "context_length_exceeded" and str(ctx) in out["error"]["message"]
        status, out = _http(url + "/v1/chat/completions", {"model": "code", "messages": [{"role": "user", "content": text}]})
        assert status == 400 and out["error"]["code"] == "context_length_exceeded" and out["error"]["param"] == "messages"


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_tokenization_runs_off_the_event_loop(separate, chat):
    """While one request's tokenization is held (a large prompt's, in slow motion), other clients are answered:
    ``GET /health`` and a small completion (tokenized alongside) both finish before the held one does."""
    import aiohttp

    mark = "HOLD-THIS-PROMPT"
    started, release, finished = threading.Event(), threading.Event(), threading.Event()

    def hold(text):
        if mark in str(text):
            started.set()
            release.wait(60)  # a deadlock breaker only: the test releases it
            finished.set()

    with _app(_TokenizerHooked(separate, hold)) as (url, _):
        async def go():
            order = []

            async def post(name, path, body):
                async with s.post(url + path, json=body) as r:
                    await r.read()
                    order.append((name, r.status, finished.is_set()))

            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
                if chat:
                    held = post("held", "/v1/chat/completions", {
                        "model": "code", "messages": [{"role": "user", "content": mark + " x" * 40}],
                        "max_tokens": 2, "temperature": 0})
                else:
                    held = post("held", "/v1/completions", _body("code", mark + " x" * 40, 2))
                held_task = asyncio.create_task(held)
                assert await asyncio.to_thread(started.wait, 30), "the held tokenization never started"
                async with s.get(url + "/health") as r:
                    order.append(("health", r.status, finished.is_set()))
                await post("small", "/v1/completions", _body("code", "small", 2))
                release.set()
                await held_task
            return order

        try:
            order = asyncio.run(go())
        finally:
            release.set()
    # the two others were answered while the held tokenization was still running
    assert order == [("health", 200, False), ("small", 200, False), ("held", 200, True)], order


MALFORMED = [  # (id, path, body: dict -> JSON text, bytes -> as is, headers, param)
    ("lone-high-surrogate", "/v1/completions", {"model": "code", "prompt": "\ud800"}, None, "prompt"),
    ("lone-low-surrogate-in-text", "/v1/completions", {"model": "code", "prompt": "ab\udfffcd"}, None, "prompt"),
    ("surrogate-in-prompt-list", "/v1/completions", {"model": "code", "prompt": ["\ud800"]}, None, "prompt[0]"),
    ("surrogate-chat-content", "/v1/chat/completions",
     {"model": "code", "messages": [{"role": "user", "content": "\ud800"}]}, None, "messages[0].content"),
    ("surrogate-chat-text-part", "/v1/chat/completions",
     {"model": "code", "messages": [{"role": "user", "content": [{"type": "text", "text": "x\udc00"}]}]}, None,
     "messages[0].content[0].text"),
    ("surrogate-chat-role", "/v1/chat/completions",
     {"model": "code", "messages": [{"role": "\ud800", "content": "x"}]}, None, "messages[0].role"),
    ("surrogate-stop", "/v1/completions", {"model": "code", "prompt": "x", "stop": ["\ud800"]}, None, "stop[0]"),
    ("surrogate-model", "/v1/completions", {"model": "\ud800", "prompt": "x"}, None, "model"),
    ("surrogate-in-a-key", "/v1/completions", {"model": "code", "prompt": "x", "\ud800": 1}, None, None),
    ("utf8-encoded-surrogate", "/v1/completions", b'{"model":"code","prompt":"\xed\xa0\x80"}', None, None),
    ("invalid-utf8-continuation", "/v1/completions", b'{"model":"code","prompt":"\xc3\x28"}', None, None),
    ("invalid-utf8-start", "/v1/completions", b"\xff\xfe", None, None),
    ("overlong-utf8", "/v1/completions", b'{"model":"code","prompt":"\xc0\xaf"}', None, None),
    ("utf16-body", "/v1/completions", json.dumps({"model": "code", "prompt": "x"}).encode("utf-16"), None, None),
    ("mixed-ints-and-strings", "/v1/completions", {"model": "code", "prompt": [1, "a"]}, None, "prompt"),
    ("mixed-strings-and-ints", "/v1/completions", {"model": "code", "prompt": ["a", 1]}, None, "prompt"),
    ("id-beyond-vocabulary", "/v1/completions", {"model": "code", "prompt": [5, 10 ** 6]}, None, "prompt"),
    ("id-beyond-int64", "/v1/completions", {"model": "code", "prompt": [2 ** 70]}, None, "prompt"),
    ("negative-id", "/v1/completions", {"model": "code", "prompt": [-1]}, None, "prompt"),
    ("negative-id-later", "/v1/completions", {"model": "code", "prompt": [3, 4, -7]}, None, "prompt"),
    ("float-id", "/v1/completions", {"model": "code", "prompt": [1.5]}, None, "prompt"),
    ("bool-id", "/v1/completions", {"model": "code", "prompt": [True]}, None, "prompt"),
    ("null-id", "/v1/completions", {"model": "code", "prompt": [None]}, None, "prompt"),
    ("nested-list-in-ids", "/v1/completions", {"model": "code", "prompt": [[1, [2]]]}, None, "prompt"),
    ("triple-nested-ids", "/v1/completions", {"model": "code", "prompt": [[[1, 2]]]}, None, "prompt"),
    ("empty-nested-list", "/v1/completions", {"model": "code", "prompt": [[]]}, None, "prompt"),
    ("two-prompts", "/v1/completions", {"model": "code", "prompt": [[1], [2]]}, None, "prompt"),
    ("prompt-number", "/v1/completions", {"model": "code", "prompt": 5}, None, "prompt"),
    ("prompt-bool", "/v1/completions", {"model": "code", "prompt": True}, None, "prompt"),
    ("content-number", "/v1/chat/completions", {"model": "code", "messages": [{"role": "user", "content": 5}]},
     None, "messages[0].content"),
    ("content-object", "/v1/chat/completions",
     {"model": "code", "messages": [{"role": "user", "content": {"text": "x"}}]}, None, "messages[0].content"),
    ("content-bool", "/v1/chat/completions", {"model": "code", "messages": [{"role": "user", "content": True}]},
     None, "messages[0].content"),
    ("content-list-of-ints", "/v1/chat/completions",
     {"model": "code", "messages": [{"role": "user", "content": [1]}]}, None, "messages[0].content"),
    ("content-image-part", "/v1/chat/completions",
     {"model": "code", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     None, "messages[0].content"),
    ("content-part-text-number", "/v1/chat/completions",
     {"model": "code", "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, None,
     "messages[0].content"),
    ("role-number", "/v1/chat/completions", {"model": "code", "messages": [{"role": 1, "content": "x"}]}, None,
     "messages[0]"),
    ("message-string", "/v1/chat/completions", {"model": "code", "messages": ["hi"]}, None, "messages[0]"),
    ("messages-string", "/v1/chat/completions", {"model": "code", "messages": "hi"}, None, "messages"),
    ("messages-object", "/v1/chat/completions", {"model": "code", "messages": {"role": "user"}}, None, "messages"),
    ("body-array", "/v1/completions", b'[{"model":"code","prompt":"x"}]', None, None),
    ("body-string", "/v1/completions", b'"hello"', None, None),
    ("body-number", "/v1/completions", b"42", None, None),
    ("body-null", "/v1/completions", b"null", None, None),
    ("body-true", "/v1/chat/completions", b"true", None, None),
    ("body-empty", "/v1/completions", b"", None, None),
    ("body-not-json", "/v1/completions", b"{not json", None, None),
    ("body-trailing-garbage", "/v1/completions", b'{"model":"code","prompt":"x"} x', None, None),
    ("body-deeply-nested", "/v1/completions", b'{"model":"code","prompt":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
     None, None),
    ("number-of-5000-digits", "/v1/completions", b'{"model":"code","prompt":"x","max_tokens":1' + b"0" * 5000 + b"}",
     None, None),
    ("nan-temperature", "/v1/completions", b'{"model":"code","prompt":"x","temperature":NaN}', None, "temperature"),
    ("infinite-max-tokens", "/v1/completions", b'{"model":"code","prompt":"x","max_tokens":Infinity}', None,
     "max_tokens"),
    ("gzip-that-is-not", "/v1/completions", b"this is no gzip stream", {"Content-Encoding": "gzip"}, None),
]


@pytest.mark.parametrize("path,body,headers,param", [pytest.param(*case[1:], id=case[0]) for case in MALFORMED])
def test_malformed_input_gets_a_4xx_openai_error(server, path, body, headers, param):
    """Each malformed request is a 4xx with OpenAI's JSON error (the field named where there is one), never
    a 500, and the server goes on."""
    url, proc = server
    bodies = [body]
    if isinstance(body, dict):  # the same, streamed: refused before any event
        bodies.append({**body, "stream": True})
    for b in bodies:
        status, out = _http(url + path, b, headers=headers)
        assert 400 <= status < 500, (status, out)
        assert _is_openai_error(out), out
        assert out["error"]["param"] == param, out
    assert proc.poll() is None and _http(url + "/health")[0] == 200
