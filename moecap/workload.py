"""Prompts with exact input token counts, reproducible from a seed."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


class WorkloadError(ValueError):
    pass


def salt_prompts(prompts: list[list[int]], pool: Sequence[int], seed: int, salt: int | None) -> list[list[int]]:
    """``prompts`` with the first token of each replaced by one drawn from ``pool`` for ``salt`` (None:
    unchanged). Two runs with different salts start their prompts with independently drawn tokens, so a
    server's prefix cache serves one run's prompt from another's only by chance (one in the pool's size),
    while lengths (and every other token) stay the workload's."""
    if salt is None or not prompts or not len(pool):
        return prompts
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(salt) & 0xFFFFFFFF])
    firsts = rng.choice(np.asarray(pool, dtype=np.int64), size=len(prompts)).tolist()
    return [[f, *p[1:]] if p else p for f, p in zip(firsts, prompts)]


def make_prompts(
    workload: Any, vocab_size: int, tokenizer: Any | None = None, special_ids: Sequence[int] = (),
    salt: int | None = None,
) -> list[list[int]]:
    """``workload.num_prompts`` lists of exactly ``workload.input_tokens`` token ids.

    ``random``: ids drawn uniformly from the vocabulary minus special tokens (seeded);
    ``text``: consecutive, non-overlapping windows of the tokenized text, starting at a seeded offset.
    ``salt``: see :func:`salt_prompts` (the first token of each prompt drawn for that salt).
    """
    if salt is not None:
        plain = make_prompts(workload, vocab_size, tokenizer, special_ids)
        pool = np.setdiff1d(np.arange(vocab_size), np.asarray(list(special_ids), dtype=np.int64))
        return salt_prompts(plain, pool, workload.seed, salt)
    n, length = workload.num_prompts, workload.input_tokens
    rng = np.random.default_rng(workload.seed)
    if workload.source == "random":
        allowed = np.setdiff1d(np.arange(vocab_size), np.asarray(list(special_ids), dtype=np.int64))
        return rng.choice(allowed, size=(n, length)).tolist()
    if tokenizer is None:
        raise WorkloadError(
            f"workload {workload.display_name!r}: source 'text' needs a tokenizer, and this model has none "
            "(random: models have none); use source: random"
        )
    if workload.text_file:
        with open(workload.text_file, encoding="utf-8") as fh:
            text = fh.read()
    else:
        from moecap.corpus import stdlib_text

        text = stdlib_text(max_chars=max(200_000, n * length * 8))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    need = n * length
    if len(ids) < need:
        raise WorkloadError(
            f"workload {workload.display_name!r}: the text has {len(ids)} tokens, {need} are needed "
            f"({n} prompts x {length} tokens)"
        )
    start = int(rng.integers(0, len(ids) - need + 1))
    return [ids[start + i * length : start + (i + 1) * length] for i in range(n)]


def exact_text(tokenizer: Any, ids: Sequence[int], refill: Any = None, max_rounds: int = 32) -> tuple[str, list[int]]:
    """A text that the tokenizer encodes (without special tokens) to exactly ``len(ids)`` tokens.

    Servers that take text prompts re-tokenize them, and a decoded id sequence does not always encode
    back to the same ids (merges across boundaries, partial UTF-8). Starting from ``ids``: decode,
    re-encode, keep the first ``len(ids)`` ids of the result (topping a short result up with
    ``refill(k)``: k more ids), until decode→encode is the identity. Returns the text and its ids.
    """
    n = len(ids)
    cur = list(ids)
    for _ in range(max_rounds):
        text = tokenizer.decode(cur, clean_up_tokenization_spaces=False)
        again = tokenizer(text, add_special_tokens=False)["input_ids"]
        if again == cur:
            return text, cur
        if len(again) >= n:
            cur = list(again[:n])
        elif refill is not None:
            cur = list(again) + list(refill(n - len(again)))
        else:
            cur = list(again) + list(again[: n - len(again)] or [again[-1]] * (n - len(again)))
    raise WorkloadError(f"no text of exactly {n} tokens found by decode/encode from the given ids in {max_rounds} rounds")


def word_token_ids(tokenizer: Any, special_ids: Sequence[int] = ()) -> list[int]:
    """Ids of the tokens that are a space followed by ASCII letters and encode back to themselves: any
    sequence of them decodes to a text that encodes to exactly the same ids (each is one pre-token of
    GPT-2-style and Metaspace pre-tokenizers)."""
    special = set(special_ids)
    out = []
    for i in range(len(tokenizer)):
        if i in special:
            continue
        text = tokenizer.decode([i], clean_up_tokenization_spaces=False)
        if len(text) > 1 and text[0] == " " and text[1:].isascii() and text[1:].isalpha():
            if tokenizer(text, add_special_tokens=False)["input_ids"] == [i]:
                out.append(i)
    return out


def make_text_prompts(
    workload: Any, tokenizer: Any, special_ids: Sequence[int] = (), salt: int | None = None
) -> list[tuple[str, int]]:
    """The workload's prompts as texts that tokenize to exactly ``workload.input_tokens`` tokens each
    (for servers that take text, not ids), with the token count the server sees (one more where the
    tokenizer adds a BOS token of its own).

    ``random``: words drawn (seeded) from :func:`word_token_ids`, exact by construction; ``text``: the
    corpus windows of :func:`make_prompts`, made exact with :func:`exact_text` (topped up with words).
    """
    rng = np.random.default_rng(workload.seed)
    words = np.asarray(word_token_ids(tokenizer, special_ids), dtype=np.int64)
    if workload.source == "random" and len(words) >= 16:
        ids = rng.choice(words, size=(workload.num_prompts, workload.input_tokens)).tolist()
    else:
        ids = make_prompts(workload, len(tokenizer), tokenizer, special_ids)
    pool = words if len(words) else np.setdiff1d(np.arange(len(tokenizer)), np.asarray(list(special_ids), dtype=np.int64))
    ids = salt_prompts(ids, pool, workload.seed, salt)

    def refill(k: int) -> list[int]:
        return rng.choice(pool, size=k).tolist()

    probe = tokenizer("a")["input_ids"]
    bos = getattr(tokenizer, "bos_token_id", None)
    extra = 1 if bos is not None and probe and probe[0] == bos else 0
    return [(exact_text(tokenizer, p, refill)[0], len(p) + extra) for p in ids]
