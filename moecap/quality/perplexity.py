"""Token perplexity through a live runner (any runner with ``token_nll``), on named data sets.

Offline, embedded: ``tiny-code``, ``tiny-prose``, ``tiny-c`` (held-out test splits of moecap.corpus;
``-validation`` suffix for the validation splits). With a network, through ``datasets`` with the
configs and splits the literature uses: ``wikitext2`` (wikitext-2-raw-v1, test, joined by blank lines),
``ptb`` (ptb_text_only, test, sentences joined by spaces), ``c4`` (allenai/c4, the first en
validation shard, its first 1100 documents joined by blank lines; GPTQ samples random windows
instead, so figures differ slightly from papers that do).
"""

from __future__ import annotations

import time
from typing import Any

from moecap.corpus import DOMAINS, domain_splits
from moecap.metrics.perplexity import context_length_for, perplexity, windows

EMBEDDED = {f"tiny-{d}": (d, "test") for d in DOMAINS} | {f"tiny-{d}-validation": (d, "validation") for d in DOMAINS}
HUB = ("wikitext2", "ptb", "c4")


class DatasetUnavailable(LookupError):
    pass


def dataset_names() -> list[str]:
    return sorted(EMBEDDED) + list(HUB)


def load_text(name: str) -> str:
    """The concatenated evaluation text of a named data set."""
    if name in EMBEDDED:
        domain, split = EMBEDDED[name]
        return domain_splits(domain)[split]
    if name not in HUB:
        raise DatasetUnavailable(f"unknown perplexity data set {name!r}; allowed: {', '.join(dataset_names())}")
    try:
        import datasets

        if name == "wikitext2":
            ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")
            return "\n\n".join(ds["text"])
        if name == "ptb":
            ds = datasets.load_dataset("ptb_text_only", "penn_treebank", split="test")
            return " ".join(ds["sentence"])
        ds = datasets.load_dataset(
            "allenai/c4", data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"}, split="validation"
        )
        return "\n\n".join(ds["text"][:1100])
    except Exception as err:  # offline, no datasets package, hub unreachable
        raise DatasetUnavailable(
            f"perplexity data set {name!r} could not be loaded through `datasets` ({type(err).__name__}: {err}). "
            f"Offline, use the embedded held-out corpora: {', '.join(sorted(EMBEDDED))}"
        ) from err


def evaluate_perplexity(
    runner: Any,
    dataset: str,
    context_length: int | None = None,
    batch_size: int = 8,
    max_windows: int | None = None,
) -> dict[str, Any]:
    """Token perplexity of the runner's model on ``dataset``, with the figures that define it."""
    from tqdm.auto import tqdm

    text = load_text(dataset)
    ids = runner.tokenizer(text, add_special_tokens=False)["input_ids"]
    length = context_length_for(runner.max_length, context_length)
    wins = windows(ids, length, max_windows)
    t0 = time.perf_counter()
    with tqdm(total=len(wins), desc=f"perplexity {dataset}", unit="window", leave=False, disable=None) as bar:
        nll = runner.token_nll(wins, batch_size=batch_size, progress=bar)
    result = perplexity(nll)
    result.update(
        {
            "dataset": dataset,
            "context_length": length,
            "text_tokens": len(ids),
            "metric": "token perplexity: exp(mean NLL) over non-overlapping windows",
            "seconds": time.perf_counter() - t0,
        }
    )
    return result
