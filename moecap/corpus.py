"""Text that is already on every machine that runs moecap: the Python standard library's source.

Deterministic (files in sorted order), no download. Used to train the embedded tokenizer and as the
default text for ``source: text`` workloads.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_source_files() -> list[Path]:
    """Top-level ``*.py`` modules of the standard library, sorted by name (tests and packages left out)."""
    root = stdlib_dir()
    files = sorted(p for p in root.glob("*.py") if not p.name.startswith(("test", "_")))
    if not files:
        raise FileNotFoundError(f"no standard-library sources under {root}")
    return files


def stdlib_text(max_chars: int = 4_000_000) -> str:
    """Up to ``max_chars`` characters of standard-library source, file after file."""
    parts: list[str] = []
    total = 0
    for path in stdlib_source_files():
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        parts.append(text)
        total += len(text)
        if total >= max_chars:
            break
    return "".join(parts)[:max_chars]
