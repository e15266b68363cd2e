"""Token perplexity, the convention of the quantization literature (GPTQ, AWQ, mixture of precisions).

Tokenize the concatenated test split, cut it into non-overlapping windows of the context length
(2048 unless the model's is shorter), and take exp(mean NLL over every predicted token). The first
token of each window has no context inside the window and is not predicted; a final partial window is
dropped (as GPTQ does). lm-eval's word and byte perplexities are different numbers.
"""

from __future__ import annotations

import math
from typing import Sequence

DEFAULT_CONTEXT_LENGTH = 2048


def context_length_for(model_max: int | None, requested: int | None = None) -> int:
    """The window length: the requested one, else 2048, never longer than the model takes."""
    length = requested or DEFAULT_CONTEXT_LENGTH
    return min(length, model_max) if model_max else length


def windows(token_ids: Sequence[int], context_length: int, max_windows: int | None = None) -> list[list[int]]:
    """Non-overlapping windows of exactly ``context_length`` tokens (a partial tail is dropped)."""
    if context_length < 2:
        raise ValueError("context_length must be at least 2")
    n = len(token_ids) // context_length
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(
            f"the text has {len(token_ids)} tokens, fewer than one window of {context_length}"
        )
    return [list(token_ids[i * context_length : (i + 1) * context_length]) for i in range(n)]


def perplexity(nll: Sequence[tuple[float, int]]) -> dict[str, float]:
    """From per-window (summed NLL in nats, predicted tokens): perplexity, mean NLL, token count."""
    total = sum(x for x, _ in nll)
    count = sum(n for _, n in nll)
    if count == 0:
        raise ValueError("no predicted tokens")
    mean = total / count
    return {"perplexity": math.exp(mean), "nll_mean": mean, "predicted_tokens": count, "windows": len(nll)}
