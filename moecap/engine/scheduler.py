"""The request queue and batch scheduler behind ``moecap serve``: one worker thread, static batches.

Requests are queued per model. The worker picks a model, activates it on the backend and runs up to
``max_batch_size`` of its queued requests as one static batch:

- prefill: the prompts left-padded to the longest, with an attention mask and position ids that start
  at 0 at each prompt's first real token (so a padded row computes what it would compute alone);
- decode in lockstep with the KV cache: greedy (temperature 0) or sampled (temperature > 0, with a
  ``torch.Generator`` per request, seeded by the request's ``seed``), optional top-k / top-p;
- each row finishes on its own: ``max_tokens``, EOS (unless ``ignore_eos``; ``min_tokens`` masks EOS and
  ``stop_token_ids`` until that many tokens exist), a stop token id, a stop string, a cancellation. A
  finished row stops streaming; the batch runs on for the others and ends when every row has finished.

Choosing the model (few switches, no starvation): the active model is kept while it has queued work,
unless another model is starving — its oldest request has waited ``max_wait_s`` or longer, or it has had
queued work while ``max_consecutive_batches`` batches of other models were started — and then the
starving model that has waited longest goes next. With nothing starving and the active model idle, the
model with the oldest queued request goes.

Every generated token is handed at once to its request's ``sink`` (a callable, called on the worker
thread; :func:`asyncio_sink` makes one that feeds an ``asyncio.Queue`` thread-safely) as an
:class:`Event` carrying the token id, the text it released and the running token count; the request's
last event has ``finish_reason`` set (``length``, ``stop``, ``abort``, ``error``).

Text: tokens are detokenized incrementally (a window of the previous tokens, the prompt's tail for the
first one; a trailing incomplete UTF-8 sequence is held back). With stop strings, text that could be the
start of a stop string is held back until it is known not to be; the output ends before the stop string.

An exception inside the backend fails the requests of that batch only (``finish_reason`` ``error``); the
worker goes on with the next batch. :meth:`Scheduler.stats` returns per-batch records (model, size,
switch, prefill and decode seconds) and per-request records (queue wait, TTFT, tokens).
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
import traceback
import uuid
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any, Callable

log = logging.getLogger(__name__)

LENGTH, STOP, ABORT, ERROR = "length", "stop", "abort", "error"
_PROMPT_CONTEXT_TOKENS = 6  # prompt tokens decoded with the first output token (leading-space rules)
MAX_LOGPROBS = 20  # the most alternatives a request may ask for per token (vLLM's default limit)

# One token's log-probability under the model (raw logits, before temperature or filters) and the
# ``logprobs`` most likely tokens at that position, token id -> log-probability.
TokenLogprob = tuple[float, dict[int, float]]


class SchedulerClosed(RuntimeError):
    """The scheduler is shutting down and takes no more requests."""


@dataclass(frozen=True)
class SamplingParams:
    """How one request is generated. ``top_k`` 0 (or -1) and ``top_p`` 1.0 disable those filters."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    logprobs: int | None = None  # None: none; N >= 0: each token's log-probability and the N most likely
    echo: bool = False  # also score the prompt (its tokens' log-probabilities when ``logprobs`` is set)

    def __post_init__(self) -> None:
        low = 0 if self.echo else 1  # scoring a prompt needs no new token
        if not isinstance(self.max_tokens, int) or self.max_tokens < low:
            raise ValueError(f"max_tokens must be an integer >= {low}, got {self.max_tokens!r}")
        if self.logprobs is not None and not (isinstance(self.logprobs, int) and 0 <= self.logprobs <= MAX_LOGPROBS):
            raise ValueError(f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not (0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be >= -1, got {self.top_k!r}")
        if self.min_tokens < 0 or self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop strings must be non-empty strings")
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Event:
    """One delivery to a request: a generated token (``token_id``) and the text it released, and/or the end."""

    request_id: str
    token_id: int | None  # None: an end without a token (abort, error)
    text: str  # the text this event releases (may be "" even with a token)
    completion_tokens: int  # tokens generated so far, this one included
    finish_reason: str | None = None  # set on the request's last event
    error: str | None = None  # why it failed or was aborted
    logprob: "TokenLogprob | None" = None  # with params.logprobs: this token's

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


Sink = Callable[[Event], None]


def asyncio_sink(loop: Any, queue: Any) -> Sink:
    """A sink that puts events on an ``asyncio.Queue`` owned by ``loop``, from any thread."""

    def sink(event: Event) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, event)

    return sink


class Request:
    """A generation request: the prompt's token ids for one model, how to sample, where events go."""

    def __init__(self, model: str, prompt_ids: list[int], params: SamplingParams | None = None,
                 sink: Sink | None = None, request_id: str | None = None):
        if not prompt_ids:
            raise ValueError("empty prompt")
        self.id = request_id or uuid.uuid4().hex
        self.model = model
        self.prompt_ids = [int(t) for t in prompt_ids]
        self.params = params or SamplingParams()
        self.sink = sink
        self.output_ids: list[int] = []
        self.text = ""  # all text released so far
        self.prompt_logprobs: list[TokenLogprob | None] | None = None  # echo + logprobs: [None, t1, t2, ...]
        self.output_logprobs: list[TokenLogprob] = []  # with logprobs: one per output token
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.submitted_s: float | None = None  # scheduler clock
        self.started_s: float | None = None
        self.first_token_s: float | None = None
        self.finished_s: float | None = None
        self.batch_index: int | None = None
        self._cancelled = threading.Event()
        self._done = threading.Event()

    def cancel(self) -> None:
        """Stop generating for this request (its row stops at the next step; queued: dropped)."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the request has finished (for callers without a sink)."""
        return self._done.wait(timeout)

    def __repr__(self) -> str:
        return f"Request({self.id[:8]}, model={self.model!r}, prompt={len(self.prompt_ids)}, out={len(self.output_ids)})"


class _Detokenizer:
    """Incremental detokenization: each new token's text is what decoding a short window grows by."""

    def __init__(self, tokenizer: Any, context: list[int]):
        self.tok = tokenizer
        self.ids = list(context)
        self.prefix = 0
        self.read = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        return self.tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""  # nothing new yet (a special token, or an incomplete UTF-8 sequence)

    def flush(self) -> str:
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return after[len(before):] if len(after) > len(before) else ""


def _stop_prefix_len(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


class _Row:
    """One request's state inside a running batch."""

    def __init__(self, req: Request, tokenizer: Any, eos_ids: set[int], device: Any):
        import torch

        self.req = req
        self.p = req.params
        self.eos_ids = set() if self.p.ignore_eos else set(eos_ids)
        self.stop_ids = set(self.p.stop_token_ids)
        self.detok = _Detokenizer(tokenizer, req.prompt_ids[-_PROMPT_CONTEXT_TOKENS:])
        self.pending = ""  # decoded text not released yet (held back for stop strings)
        self.finished = False
        self.generator = None
        if not self.p.greedy:
            seed = self.p.seed if self.p.seed is not None else random.getrandbits(63)
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(int(seed) & ((1 << 63) - 1))

    def masked_ids(self) -> list[int]:
        """Token ids that may not be generated next (EOS and stop ids before ``min_tokens``)."""
        if len(self.req.output_ids) >= self.p.min_tokens:
            return []
        return sorted(self.eos_ids | self.stop_ids)

    def on_token(self, token_id: int) -> Event:
        """Take the row's new token; return the event to deliver (finishing the row when due)."""
        req, p = self.req, self.p
        req.output_ids.append(token_id)
        n = len(req.output_ids)
        finish = None
        if token_id in self.eos_ids or token_id in self.stop_ids:
            finish = STOP
        self.pending += self.detok.add(token_id)
        if finish is None and n >= p.max_tokens:
            finish = LENGTH
        if finish is not None:
            self.pending += self.detok.flush()
        text = ""
        if p.stop and n >= p.min_tokens:
            hits = [i for i in (self.pending.find(s) for s in p.stop) if i >= 0]
            if hits:
                text, self.pending, finish = self.pending[:min(hits)], "", STOP
            elif finish is None:
                keep = _stop_prefix_len(self.pending, p.stop)
                cut = len(self.pending) - keep
                text, self.pending = self.pending[:cut], self.pending[cut:]
        if finish is not None or not p.stop or n < p.min_tokens:
            text, self.pending = text + self.pending, ""
        req.text += text
        if finish is not None:
            self.finished = True
        return Event(req.id, token_id, text, n, finish)


@dataclass
class BatchRecord:
    index: int
    model: str
    size: int
    request_ids: list[str]
    start_s: float  # scheduler clock, seconds since the scheduler was made
    switch_s: float = 0.0  # what backend.activate() reported
    prefill_s: float = 0.0  # the prefill pass and the first tokens' selection
    decode_s: float = 0.0  # every decode step
    decode_steps: int = 0
    prompt_tokens: int = 0  # real prompt tokens
    padded_prompt_tokens: int = 0  # size x longest prompt
    output_tokens: int = 0
    error: str | None = None


@dataclass
class RequestRecord:
    id: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None
    batch: int | None
    queue_wait_s: float | None  # submitted -> its batch started
    ttft_s: float | None  # submitted -> first token delivered
    e2e_s: float | None  # submitted -> finished
    error: str | None = None


class Scheduler:
    """Queue requests per model and run them in static batches on one worker thread (see module doc).

    ``start()`` runs the worker; without it, ``run_next_batch()`` runs one batch on the caller's thread
    (tests). ``clock`` is the time source (``time.perf_counter``; injectable for tests).
    """

    def __init__(self, backend: Any, max_batch_size: int = 8, max_wait_s: float | None = 2.0,
                 max_consecutive_batches: int | None = 4, history: int = 10_000,
                 clock: Callable[[], float] = time.perf_counter):
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        if max_wait_s is not None and max_wait_s < 0:
            raise ValueError("max_wait_s must be >= 0 (or None: no bound)")
        if max_consecutive_batches is not None and max_consecutive_batches < 1:
            raise ValueError("max_consecutive_batches must be >= 1 (or None: no bound)")
        self.backend = backend
        self.max_batch_size = int(max_batch_size)
        self.max_wait_s = max_wait_s
        self.max_consecutive_batches = max_consecutive_batches
        self.clock = clock
        self._t0 = clock()
        self._cond = threading.Condition()
        self._queues: dict[str, deque[Request]] = {m: deque() for m in backend.model_names()}
        self._waited_batches: dict[str, int] = {m: 0 for m in self._queues}
        self._running: list[Request] = []
        self._active: str | None = None
        self._closing = False
        self._thread: threading.Thread | None = None
        self._batch_index = 0
        self._batches: deque[BatchRecord] = deque(maxlen=history)
        self._requests: deque[RequestRecord] = deque(maxlen=history)
        self._totals = {"requests_submitted": 0, "requests_finished": 0, "requests_failed": 0,
                        "requests_aborted": 0, "batches": 0, "batches_failed": 0, "switches": 0,
                        "switch_s": 0.0, "prefill_s": 0.0, "decode_s": 0.0, "prompt_tokens": 0,
                        "output_tokens": 0}
        self._eos: dict[str, set[int]] = {}
        self._pad: dict[str, int] = {}
        for m in self._queues:
            tok = backend.tokenizer(m)
            eos_fn = getattr(backend, "eos_token_ids", None)
            eos = set(eos_fn(m)) if callable(eos_fn) else set()
            if getattr(tok, "eos_token_id", None) is not None:
                eos.add(int(tok.eos_token_id))
            self._eos[m] = eos
            pad = getattr(tok, "pad_token_id", None)
            self._pad[m] = int(pad if pad is not None else (min(eos) if eos else 0))

    # -- submitting ----------------------------------------------------------------------------
    def submit(self, req: Request) -> Request:
        """Queue ``req``; raise ``KeyError`` for an unknown model, :class:`SchedulerClosed` when closing."""
        with self._cond:
            if self._closing:
                raise SchedulerClosed("the server is shutting down")
            if req.model not in self._queues:
                raise KeyError(f"unknown model {req.model!r}; served: {', '.join(self._queues)}")
            req.submitted_s = self.clock()
            self._queues[req.model].append(req)
            self._totals["requests_submitted"] += 1
            self._cond.notify_all()
        return req

    def queued(self) -> dict[str, int]:
        with self._cond:
            return {m: len(q) for m, q in self._queues.items()}

    @property
    def active_model(self) -> str | None:
        return self._active

    # -- choosing the next batch --------------------------------------------------------------
    def _drop_cancelled_heads(self) -> None:
        for q in self._queues.values():
            while q and q[0].cancelled:
                self._finish(q.popleft(), ABORT, None, deliver=True)

    def pick_model(self, now: float | None = None) -> str | None:
        """The model whose requests run next (None: nothing queued). Call with the lock held or idle."""
        now = self.clock() if now is None else now
        queued = [m for m, q in self._queues.items() if q]
        if not queued:
            return None

        def waited_s(m: str) -> float:
            sub = self._queues[m][0].submitted_s
            return 0.0 if sub is None else now - sub

        starving = [
            m for m in queued if m != self._active and (
                (self.max_wait_s is not None and waited_s(m) >= self.max_wait_s)
                or (self.max_consecutive_batches is not None
                    and self._waited_batches[m] >= self.max_consecutive_batches))
        ]
        if starving:
            return max(starving, key=lambda m: (self._waited_batches[m], waited_s(m)))
        if self._active in queued:
            return self._active
        return max(queued, key=waited_s)

    def _take_batch(self) -> tuple[str, list[Request]] | None:
        with self._cond:
            self._drop_cancelled_heads()
            model = self.pick_model()
            if model is None:
                return None
            q = self._queues[model]
            batch: list[Request] = []
            while q and len(batch) < self.max_batch_size:
                req = q.popleft()
                if req.cancelled:
                    self._finish(req, ABORT, None, deliver=True)
                    continue
                batch.append(req)
            for m, other in self._queues.items():  # batches started while a model had queued work
                self._waited_batches[m] = self._waited_batches[m] + 1 if (m != model and other) else 0
            self._running = list(batch)
            return (model, batch) if batch else None

    # -- running ---------------------------------------------------------------------------------
    def run_next_batch(self) -> bool:
        """Run one batch on this thread; False when nothing was queued."""
        taken = self._take_batch()
        if taken is None:
            return False
        model, batch = taken
        try:
            self._run_batch(model, batch)
        finally:
            with self._cond:
                self._running = []
        return True

    def _run_batch(self, model: str, batch: list[Request]) -> None:
        import torch

        index = self._batch_index
        self._batch_index += 1
        start = self.clock()
        rec = BatchRecord(index=index, model=model, size=len(batch), request_ids=[r.id for r in batch],
                          start_s=start - self._t0)
        for r in batch:
            r.started_s, r.batch_index = start, index
        rows: list[_Row] = []
        try:
            switched = self._active != model
            rec.switch_s = float(self.backend.activate(model) or 0.0)
            self._active = model
            if switched:
                self._totals["switches"] += 1
            device = self.backend.device()
            tokenizer = self.backend.tokenizer(model)
            rows = [_Row(r, tokenizer, self._eos[model], device) for r in batch]
            with torch.inference_mode():
                self._generate(model, rows, rec, device)
        except Exception as err:  # the backend failed: this batch's requests fail, the worker goes on
            msg = f"{type(err).__name__}: {err}"
            rec.error = msg
            log.error("batch %d (%s, %d requests) failed: %s\n%s", index, model, len(batch), msg,
                      traceback.format_exc())
            for r in batch:
                if not r.done:
                    self._finish(r, ERROR, msg, deliver=True)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        finally:
            rec.output_tokens = sum(len(r.output_ids) for r in batch)
            with self._cond:
                self._batches.append(rec)
                t = self._totals
                t["batches"] += 1
                t["batches_failed"] += rec.error is not None
                t["switch_s"] += rec.switch_s
                t["prefill_s"] += rec.prefill_s
                t["decode_s"] += rec.decode_s
                t["prompt_tokens"] += rec.prompt_tokens
                t["output_tokens"] += rec.output_tokens

    def _generate(self, model: str, rows: list[_Row], rec: BatchRecord, device: Any) -> None:
        import torch

        ctx = int(self.backend.context_length(model))
        pad = self._pad[model]
        lengths = [len(r.req.prompt_ids) for r in rows]
        longest = max(lengths)
        ids = torch.full((len(rows), longest), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for i, (r, n) in enumerate(zip(rows, lengths)):
            ids[i, longest - n:] = torch.tensor(r.req.prompt_ids, dtype=torch.long)
            mask[i, longest - n:] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        ids, mask, positions = ids.to(device), mask.to(device), positions.to(device)
        rec.prompt_tokens = sum(lengths)
        rec.padded_prompt_tokens = len(rows) * longest

        t0 = self.clock()
        logits, cache = self.backend.forward(model, ids, mask, None, positions)
        self._score_prompts(rows, logits, lengths, longest)
        for r in rows:  # echo with max_tokens 0: the prompt's scores were all it asked for
            if r.p.max_tokens == 0:
                r.finished = True
                self._finish(r.req, LENGTH, None, deliver=True)
        tokens = self._select(rows, logits[:, -1])
        lps = self._token_logprobs(rows, logits[:, -1], tokens)
        rec.prefill_s = self.clock() - t0
        self._deliver_tokens(rows, tokens, lps)

        next_pos = torch.tensor(lengths, dtype=torch.long, device=device).unsqueeze(1)
        ones = torch.ones((len(rows), 1), dtype=torch.long, device=device)
        t_decode = self.clock()
        while True:
            self._abort_cancelled(rows)
            if all(r.finished for r in rows):
                break
            step_ids = torch.tensor([[t if not r.finished else pad] for r, t in zip(rows, tokens)],
                                    dtype=torch.long, device=device)
            mask = torch.cat([mask, ones], dim=1)
            logits, cache = self.backend.forward(model, step_ids, mask, cache, next_pos.clamp(max=ctx - 1))
            next_pos = next_pos + 1
            tokens = self._select(rows, logits[:, -1])
            lps = self._token_logprobs(rows, logits[:, -1], tokens)
            rec.decode_steps += 1
            self._deliver_tokens(rows, tokens, lps)
        rec.decode_s = self.clock() - t_decode

    @staticmethod
    def _select(rows: list[_Row], logits: Any) -> list[int]:
        """The next token of every row: argmax, or a seeded sample (temperature, top-k, top-p)."""
        import torch

        logits = logits.float()
        masked = [(i, r.masked_ids()) for i, r in enumerate(rows) if not r.finished]
        if any(m for _, m in masked):
            logits = logits.clone()
            for i, ids in masked:
                if ids:
                    logits[i, ids] = -math.inf
        out = logits.argmax(dim=-1).tolist()
        for i, r in enumerate(rows):
            if r.finished or r.p.greedy:
                continue
            row = logits[i] / r.p.temperature
            k = r.p.top_k
            if 0 < k < row.numel():
                kth = torch.topk(row, k).values[-1]
                row = row.masked_fill(row < kth, -math.inf)
            if r.p.top_p < 1.0:
                sorted_l, order = torch.sort(row, descending=True)
                probs = torch.softmax(sorted_l, dim=-1)
                drop = probs.cumsum(-1) - probs > r.p.top_p  # keep the smallest set reaching top_p
                row = row.clone()
                row[order[drop]] = -math.inf
            probs = torch.softmax(row, dim=-1)
            out[i] = int(torch.multinomial(probs, 1, generator=r.generator).item())
        return out

    @staticmethod
    def _top(logprobs: Any, k: int) -> dict[int, float]:
        if k <= 0:
            return {}
        values, ids = logprobs.topk(min(k, logprobs.shape[-1]))
        return {int(i): float(v) for i, v in zip(ids.tolist(), values.tolist())}

    def _score_prompts(self, rows: list[_Row], logits: Any, lengths: list[int], longest: int) -> None:
        """``echo`` with ``logprobs``: each prompt token's log-probability given the tokens before it
        (the first token has none), from the prefill's logits [B, T, V] (rows left-padded to ``longest``)."""
        import torch

        for i, (r, n) in enumerate(zip(rows, lengths)):
            if not r.p.echo or r.p.logprobs is None:
                continue
            lp = torch.log_softmax(logits[i, longest - n:longest - 1].float(), dim=-1)  # predicts tokens 1..n-1
            target = torch.tensor(r.req.prompt_ids[1:], dtype=torch.long, device=lp.device)
            chosen = lp.gather(-1, target[:, None])[:, 0].tolist()
            k = min(r.p.logprobs, lp.shape[-1])
            if k > 0 and chosen:  # every position's alternatives in one call
                values, ids = lp.topk(k, dim=-1)
                tops = [dict(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
            else:
                tops = [{} for _ in chosen]
            r.req.prompt_logprobs = [None, *((float(v), t) for v, t in zip(chosen, tops))]

    def _token_logprobs(self, rows: list[_Row], logits: Any, tokens: list[int]) -> list[TokenLogprob | None]:
        """For rows that asked for ``logprobs``: the chosen token's log-probability (raw logits) and the top N."""
        import torch

        out: list[TokenLogprob | None] = [None] * len(rows)
        for i, r in enumerate(rows):
            if r.finished or r.p.logprobs is None:
                continue
            lp = torch.log_softmax(logits[i].float(), dim=-1)
            out[i] = (float(lp[int(tokens[i])]), self._top(lp, r.p.logprobs))
        return out

    def _deliver_tokens(self, rows: list[_Row], tokens: list[int], logprobs: list[Any] | None = None) -> None:
        now = self.clock()
        for i, (r, t) in enumerate(zip(rows, tokens)):
            if r.finished:
                continue
            event = r.on_token(int(t))
            if logprobs is not None and logprobs[i] is not None:
                event.logprob = logprobs[i]
                r.req.output_logprobs.append(logprobs[i])
            if r.req.first_token_s is None:
                r.req.first_token_s = now
            if event.finished:
                self._finish(r.req, event.finish_reason, None, deliver=False)
            self._emit(r.req, event)
            if event.finished:
                r.req._done.set()

    def _abort_cancelled(self, rows: list[_Row]) -> None:
        for r in rows:
            if not r.finished and (r.req.cancelled or self._closing):
                r.finished = True
                self._finish(r.req, ABORT, "server shutting down" if self._closing else "cancelled", deliver=True)

    # -- finishing -------------------------------------------------------------------------------
    def _emit(self, req: Request, event: Event) -> None:
        if req.sink is None:
            return
        try:
            req.sink(event)
        except Exception as err:  # the receiver is gone (closed loop ...): stop generating for it
            log.debug("request %s: sink failed (%s); cancelling it", req.id, err)
            req.cancel()

    def _finish(self, req: Request, reason: str, error: str | None, deliver: bool) -> None:
        """Record the end of ``req``; with ``deliver``, send it a closing event (no token)."""
        if req.finish_reason is not None and deliver:
            return
        req.finish_reason, req.error = reason, error
        req.finished_s = self.clock()
        sub = req.submitted_s
        record = RequestRecord(
            id=req.id, model=req.model, prompt_tokens=len(req.prompt_ids), completion_tokens=len(req.output_ids),
            finish_reason=reason, batch=req.batch_index,
            queue_wait_s=None if req.started_s is None or sub is None else req.started_s - sub,
            ttft_s=None if req.first_token_s is None or sub is None else req.first_token_s - sub,
            e2e_s=None if sub is None else req.finished_s - sub, error=error)
        with self._cond:
            self._requests.append(record)
            self._totals["requests_finished"] += 1
            self._totals["requests_failed"] += reason == ERROR
            self._totals["requests_aborted"] += reason == ABORT
        if deliver:
            self._emit(req, Event(req.id, None, "", len(req.output_ids), reason, error))
            req._done.set()

    # -- the worker thread -----------------------------------------------------------------------
    def start(self) -> "Scheduler":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="moecap-scheduler", daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._closing and not any(self._queues.values()):
                    self._cond.wait()
                if self._closing:
                    return
            try:
                self.run_next_batch()
            except Exception:  # never let the worker die
                log.exception("scheduler: unexpected error")

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Take no more requests, abort the queued and running ones, stop the worker."""
        with self._cond:
            self._closing = True
            queued = [r for q in self._queues.values() for r in q]
            for q in self._queues.values():
                q.clear()
            self._cond.notify_all()
        for r in queued:
            self._finish(r, ABORT, "server shutting down", deliver=True)
        # running rows see _closing at their next step and are aborted there
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)

    @property
    def closing(self) -> bool:
        return self._closing

    # -- records ---------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Configuration, totals, the current queue, and the recent batch and request records."""
        with self._cond:
            batches = [asdict(b) for b in self._batches]
            requests = [asdict(r) for r in self._requests]
            totals = dict(self._totals)
            queued = {m: len(q) for m, q in self._queues.items()}
            running = len(self._running)
        return {
            "config": {"max_batch_size": self.max_batch_size, "max_wait_s": self.max_wait_s,
                       "max_consecutive_batches": self.max_consecutive_batches},
            "models": list(self._queues),
            "active_model": self._active,
            "queued": queued,
            "running": running,
            "totals": totals,
            "batches": batches,
            "requests": requests,
        }
