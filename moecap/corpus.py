"""Text that is already on every machine that runs moecap: the Python installation itself.

Three domains, deterministic, no download:

- ``code``:  the standard library's top-level modules (``*.py``);
- ``prose``: English documentation shipped with Python: the language and library reference topics
  of ``pydoc_data.topics`` and IDLE's help texts;
- ``c``:     the C API headers (``include/python3.x/**/*.h``).

Each domain is split into train / validation / test by document (every 20th document to test, the one
after it to validation), so held-out text is never seen in training. ``stdlib_text`` remains the
plain concatenation of standard-library source used for default text workloads.
"""

from __future__ import annotations

import functools
import sysconfig
from pathlib import Path

DOMAINS = ("code", "prose", "c")
SPLITS = ("train", "validation", "test")


class CorpusError(LookupError):
    pass


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_source_files() -> list[Path]:
    """Top-level ``*.py`` modules of the standard library, sorted by name (tests and private ones left out)."""
    root = stdlib_dir()
    files = sorted(p for p in root.glob("*.py") if not p.name.startswith(("test", "_")))
    if not files:
        raise CorpusError(f"no standard-library sources under {root}")
    return files


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def stdlib_text(max_chars: int = 4_000_000) -> str:
    """Up to ``max_chars`` characters of standard-library source, file after file."""
    parts: list[str] = []
    total = 0
    for path in stdlib_source_files():
        text = _read(path)
        if text is None:
            continue
        parts.append(text)
        total += len(text)
        if total >= max_chars:
            break
    return "".join(parts)[:max_chars]


def _documents(domain: str) -> list[str]:
    if domain == "code":
        docs = [_read(p) for p in stdlib_source_files()]
    elif domain == "prose":
        try:
            from pydoc_data.topics import topics
        except ImportError as err:
            raise CorpusError("the prose corpus needs pydoc_data (part of the standard library)") from err
        docs = [topics[k] for k in sorted(topics)]
        docs += [_read(p) for p in sorted((stdlib_dir() / "idlelib").glob("*.txt"))]
    elif domain == "c":
        inc = Path(sysconfig.get_paths()["include"])
        docs = [_read(p) for p in sorted(inc.rglob("*.h"))]
        if not docs:
            raise CorpusError(
                f"no C headers under {inc}: the 'c' corpus needs Python's development headers "
                "(e.g. Debian's python3-dev)"
            )
    else:
        raise CorpusError(f"unknown corpus domain {domain!r}; allowed: {', '.join(DOMAINS)}")
    return [d.strip() + "\n" for d in docs if d and d.strip()]


@functools.lru_cache(maxsize=None)
def _split_documents(domain: str) -> dict[str, tuple[str, ...]]:
    docs = _documents(domain)
    split: dict[str, list[str]] = {s: [] for s in SPLITS}
    for i, doc in enumerate(docs):
        split["test" if i % 20 == 0 else "validation" if i % 20 == 1 else "train"].append(doc)
    return {k: tuple(v) for k, v in split.items()}


def domain_documents(domain: str, split: str) -> list[str]:
    """The documents of one split of a domain (every 20th document is test, the one after it validation)."""
    if split not in SPLITS:
        raise CorpusError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")
    return list(_split_documents(domain)[split])


@functools.lru_cache(maxsize=None)
def domain_splits(domain: str) -> dict[str, str]:
    """``{"train": ..., "validation": ..., "test": ...}`` texts of one domain (documents joined by a
    blank line)."""
    return {k: "\n".join(v) for k, v in _split_documents(domain).items()}


def corpus_sizes() -> dict[str, dict[str, int]]:
    """Characters per domain and split (for reports)."""
    return {d: {s: len(t) for s, t in domain_splits(d).items()} for d in DOMAINS}
