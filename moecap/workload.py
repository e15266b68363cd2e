"""Prompts with exact input token counts, reproducible from a seed."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


class WorkloadError(ValueError):
    pass


def make_prompts(
    workload: Any, vocab_size: int, tokenizer: Any | None = None, special_ids: Sequence[int] = ()
) -> list[list[int]]:
    """``workload.num_prompts`` lists of exactly ``workload.input_tokens`` token ids.

    ``random``: ids drawn uniformly from the vocabulary minus special tokens (seeded);
    ``text``: consecutive, non-overlapping windows of the tokenized text, starting at a seeded offset.
    """
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
