"""Calibration data for profiling experts (activation frequency, quantization sensitivity).

A calibration source is one of:

- ``"embedded"`` (the default): the *train* splits of moecap's embedded corpora (Python code, English
  documentation, C headers; :mod:`moecap.corpus`), never the held-out test splits perplexity is
  measured on;
- a path to a local file: ``.txt`` (its text), ``.jsonl`` (the ``field`` of each line, default ``text``)
  or ``.json`` (a list of strings, or of objects with ``field``);
- ``{dataset: ID, config: NAME, split: train, field: text}``: a data set through ``datasets`` (needs the
  network or a populated cache), as GPTQ/AWQ calibrate on C4 or WikiText-2 *train*.

:func:`calibration_windows` tokenizes the text and takes ``n`` windows of ``length`` tokens spread evenly
over it; a model without a tokenizer (``random:``) gets seeded random token ids, and says so.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

EMBEDDED = "embedded"


class CalibrationError(ValueError):
    pass


def _field(spec: Any, name: str, default: Any = None) -> Any:
    if isinstance(spec, dict):
        return spec.get(name, default)
    return getattr(spec, name, default)


def calibration_text(spec: Any) -> tuple[str, str]:
    """(text, description) of a calibration source (see the module docstring)."""
    if spec is None or spec == EMBEDDED:
        from moecap.corpus import DOMAINS, domain_splits

        return "\n\n".join(domain_splits(d)["train"] for d in DOMAINS), f"embedded corpora ({', '.join(DOMAINS)}; train splits)"
    if isinstance(spec, (str, Path)):
        return _file_text(Path(spec).expanduser(), "text"), f"file {spec}"
    path, dataset = _field(spec, "path"), _field(spec, "dataset")
    field = _field(spec, "field", "text") or "text"
    if path:
        return _file_text(Path(path).expanduser(), field), f"file {path} (field {field})"
    if dataset:
        config, split = _field(spec, "config"), _field(spec, "split", "train") or "train"
        max_docs = int(_field(spec, "max_documents", 2000) or 2000)
        try:
            import datasets

            ds = datasets.load_dataset(dataset, config, split=split)
        except Exception as err:  # offline, unknown id, no datasets package
            raise CalibrationError(f"calibration data set {dataset!r} (config {config!r}, split {split!r}) could not "
                                   f"be loaded through `datasets` ({type(err).__name__}: {err}); offline, use "
                                   "'embedded' or a local .txt/.jsonl file") from err
        if field not in ds.column_names:
            raise CalibrationError(f"calibration data set {dataset!r} has no field {field!r}; it has {ds.column_names}")
        texts = [t for t in ds[field][:max_docs] if isinstance(t, str) and t.strip()]
        return "\n\n".join(texts), f"dataset {dataset}" + (f"/{config}" if config else "") + f" {split} (field {field})"
    raise CalibrationError("calibration: give 'embedded', a file path, {path, field} or {dataset, config, split, field}")


def _file_text(path: Path, field: str) -> str:
    if not path.is_file():
        raise CalibrationError(f"calibration file {str(path)!r} does not exist")
    raw = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix == ".jsonl":
        texts = []
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise CalibrationError(f"{path}:{n}: not a JSON line ({err.msg})") from None
            value = row.get(field) if isinstance(row, dict) else None
            if not isinstance(value, str):
                raise CalibrationError(f"{path}:{n}: no string field {field!r}")
            texts.append(value)
        return "\n\n".join(texts)
    if path.suffix == ".json":
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as err:
            raise CalibrationError(f"{path}: not JSON ({err.msg})") from None
        if not isinstance(data, list):
            raise CalibrationError(f"{path}: expected a list of strings or of objects with {field!r}")
        texts = [d if isinstance(d, str) else (d.get(field) if isinstance(d, dict) else None) for d in data]
        if any(not isinstance(t, str) for t in texts):
            raise CalibrationError(f"{path}: every item must be a string or have a string field {field!r}")
        return "\n\n".join(texts)
    return raw


def calibration_windows(tokenizer: Any, spec: Any, n: int, length: int, vocab_size: int,
                        seed: int = 0) -> tuple[list[list[int]], str]:
    """``n`` windows of ``length`` token ids and a description of where they came from."""
    if n <= 0:
        return [], "none"
    if tokenizer is None:
        import numpy as np

        rng = np.random.default_rng(seed)
        return rng.integers(0, vocab_size, size=(n, length)).tolist(), "random token ids (the model has no tokenizer)"
    text, what = calibration_text(spec)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    usable = len(ids) // length
    if usable == 0:
        raise CalibrationError(f"calibration text ({what}) has {len(ids)} tokens: fewer than one window of {length}")
    picks = [round(i * (usable - 1) / max(n - 1, 1)) for i in range(min(n, usable))]
    windows = [ids[p * length:(p + 1) * length] for p in dict.fromkeys(picks)]
    return windows, f"{what}: {len(windows)} windows of {length} tokens"
