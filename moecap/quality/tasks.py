"""moecap's offline lm-eval tasks, generated from held-out text already on the machine.

Per corpus domain (``moecap.corpus``: ``code``, ``prose``, ``c``) three tasks:

- ``moecap_rolling_<domain>``: ``loglikelihood_rolling`` over the documents of the test split (one
  document per row, each cut at a line boundary to at most ``max_doc_chars`` characters); metrics
  ``word_perplexity``, ``byte_perplexity``, ``bits_per_byte``, as lm-eval's ``wikitext`` (these are
  per word and per byte, *not* token perplexity);
- ``moecap_mc_<domain>``: ``multiple_choice`` with 4 choices: after a few lines of a held-out
  document, which line comes next: the true one, or one of 3 lines drawn (seeded) from other held-out
  documents of the same domain; metrics ``acc`` and ``acc_norm``. Test items come from the test
  split, few-shot examples (``fewshot_split: validation``) from the validation split. Hard: a model
  must know the document, which the embedded tiny-moe does not (it scores near chance, 0.25).
- ``moecap_real_<domain>``: which lines does a held-out line follow? ``multiple_choice`` in lm-eval's
  multiple-input form (as ``winogrande``): 4 contexts (its own ``CONTEXT_LINES`` preceding lines, the
  same span cut from 2 other documents of the domain, and from a document of another domain) score
  one and the same continuation, so a line's own predictability (short C lines are far likelier than
  prose lines to any model) cancels out and what is measured is the model's use of context. Metric
  ``acc`` (``acc_norm`` would equal it). tiny-moe scores well above chance (0.25), and its quantized or
  merged experts score lower. Same splits as ``moecap_mc``; up to 400 test items per domain.

Files: ``<out_dir>/<task>.yaml`` and ``<out_dir>/data/<task>.<split>.jsonl``; the YAMLs read the
JSONL through ``datasets``' packaged ``json`` builder (``dataset_path: json`` with absolute
``data_files``), which needs no network; its Arrow cache goes to ``<out_dir>/datasets-cache``.
Output depends only on the corpus, the arguments and ``TASKS_VERSION``: the same seed gives
byte-identical files.
"""

from __future__ import annotations

import difflib
import json
import random
from pathlib import Path
from typing import Any

from moecap.corpus import DOMAINS

TASKS_VERSION = 3
N_CHOICES = 4
CONTEXT_LINES = 6  # lines of the document before the line to predict
MIN_LINE_CHARS = 12  # a candidate line (true or distractor), stripped, is at least this long ...
MAX_LINE_CHARS = 200  # ... and at most this long
MAX_CONTEXT_CHARS = 1200
N_FEWSHOT_POOL = 20  # validation items, the pool few-shot examples are drawn from


def held_out_documents(domain: str, split: str) -> list[str]:
    """The documents of one held-out split (``validation`` or ``test``) of a corpus domain."""
    from moecap.corpus import domain_documents

    if split not in ("validation", "test"):
        raise ValueError(f"held-out splits are validation and test, not {split!r}")
    return domain_documents(domain, split)


def _cap(doc: str, max_chars: int) -> str:
    if len(doc) <= max_chars:
        return doc
    cut = doc.rfind("\n", 0, max_chars)
    return doc[: cut + 1] if cut > 0 else doc[:max_chars]


def _candidate(line: str) -> bool:
    s = line.strip()
    return MIN_LINE_CHARS <= len(s) and len(line) <= MAX_LINE_CHARS and any(c.isalnum() for c in s)


def _anchors(lines: list[list[str]]) -> list[tuple[int, int]]:
    """(document, line) of every line with a context before it (the positions contexts are cut at)."""
    return [(d, i) for d, doc_lines in enumerate(lines) for i in range(CONTEXT_LINES, len(doc_lines) + 1)
            if any(ln.strip() for ln in doc_lines[i - CONTEXT_LINES : i])]


def _positions(lines: list[list[str]], rng: random.Random) -> list[tuple[int, int]]:
    """(document, line) of every line that can be asked for (a candidate after some context), shuffled."""
    positions = [(d, i) for d, i in _anchors(lines) if i < len(lines[d]) and _candidate(lines[d][i])]
    rng.shuffle(positions)
    return positions


def _context(doc_lines: list[str], i: int) -> str:
    """The ``CONTEXT_LINES`` lines before line ``i``, at most ``MAX_CONTEXT_CHARS`` (their end)."""
    context = "\n".join(doc_lines[i - CONTEXT_LINES : i]) + "\n"
    return context[-MAX_CONTEXT_CHARS:] if len(context) > MAX_CONTEXT_CHARS else context


def mc_items(docs: list[str], n: int, rng: random.Random) -> list[dict[str, Any]]:
    """Up to ``n`` next-line items from ``docs`` (fewer when the documents have fewer candidates).

    Distractors are drawn uniformly from the candidate lines of the *other* documents (by line, not
    by document, so that they follow the same distribution as the true lines)."""
    lines = [doc.split("\n") for doc in docs]
    pool = [(d, ln) for d, doc_lines in enumerate(lines) for ln in doc_lines if _candidate(ln)]
    if len({d for d, _ in pool}) < 2:
        raise ValueError("multiple-choice items need at least two held-out documents with candidate lines")
    positions = _positions(lines, rng)
    items: list[dict[str, Any]] = []
    for d, i in positions:
        if len(items) >= n:
            break
        true = lines[d][i]
        context = _context(lines[d], i)
        seen = {true.strip()}
        distractors: list[str] = []
        for _ in range(100 * N_CHOICES):
            if len(distractors) == N_CHOICES - 1:
                break
            src, cand = pool[rng.randrange(len(pool))]
            if src != d and cand.strip() not in seen:
                seen.add(cand.strip())
                distractors.append(cand)
        if len(distractors) < N_CHOICES - 1:
            continue
        choices = [true, *distractors]
        rng.shuffle(choices)
        items.append({"context": context, "choices": choices, "label": choices.index(true), "doc": d, "line": i})
    return items


def real_items(domain: str, docs: list[str], others: dict[str, list[str]], n: int,
               rng: random.Random) -> list[dict[str, Any]]:
    """Up to ``n`` items: a line of a document of ``docs`` (of ``domain``) and 4 contexts to choose from: the
    ``CONTEXT_LINES`` lines before it, the same span from 2 other documents of the domain, and from a
    document of another domain (``others``: each other domain's documents; the domains take turns)."""
    lines = [doc.split("\n") for doc in docs]
    same = _anchors(lines)
    if len({d for d, _ in same}) < 2:
        raise ValueError("context-choice items need at least two held-out documents with context")
    foreign = {name: ([doc.split("\n") for doc in odocs]) for name, odocs in sorted(others.items())}
    foreign_anchors = {name: _anchors(olines) for name, olines in foreign.items()}
    foreign_names = [name for name, anchors in foreign_anchors.items() if anchors]
    if not foreign_names:
        raise ValueError("context-choice items need documents of another domain")
    items: list[dict[str, Any]] = []
    for d, i in _positions(lines, rng):
        if len(items) >= n:
            break
        own = _context(lines[d], i)
        sources = [{"domain": domain, "doc": d, "line": i}]
        contexts = [own]
        for _ in range(100):
            if len(contexts) == N_CHOICES - 1:
                break
            od, oi = same[rng.randrange(len(same))]
            ctx = _context(lines[od], oi)
            if od != d and ctx.strip() not in {c.strip() for c in contexts}:
                contexts.append(ctx)
                sources.append({"domain": domain, "doc": od, "line": oi})
        name = foreign_names[len(items) % len(foreign_names)]
        fd, fi = foreign_anchors[name][rng.randrange(len(foreign_anchors[name]))]
        contexts.append(_context(foreign[name][fd], fi))
        sources.append({"domain": name, "doc": fd, "line": fi})
        if len({c.strip() for c in contexts}) < N_CHOICES:
            continue
        order = list(range(N_CHOICES))
        rng.shuffle(order)
        items.append({
            "contexts": [contexts[j] for j in order],
            "continuation": lines[d][i],
            "label": order.index(0),
            "doc": d,
            "line": i,
            # where each context was cut: domain, document (of that domain's split) and the line it precedes
            "sources": [sources[j] for j in order],
        })
    return items


def _write(path: Path, text: str) -> None:
    from moecap.paths import atomic_write_text

    atomic_write_text(path, text)


def _jsonl(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)


def _yaml(cfg: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True, width=1000)


def write_offline_tasks(
    out_dir: Path,
    domains: tuple[str, ...] | list[str] = DOMAINS,
    n_mc: int = 200,
    n_real: int = 400,
    seed: int = 0,
    max_doc_chars: int = 4000,
) -> list[str]:
    """Write the rolling and multiple-choice tasks of ``domains`` into ``out_dir``; return their names."""
    out_dir = Path(out_dir).expanduser().resolve()
    data = out_dir / "data"
    cache = str(out_dir / "datasets-cache")  # datasets' Arrow copies stay with the tasks, not in ~/.cache
    names: list[str] = []
    for domain in domains:
        if domain not in DOMAINS:
            raise ValueError(f"unknown corpus domain {domain!r}; allowed: {', '.join(DOMAINS)}")
        test_docs = held_out_documents(domain, "test")
        meta = {"version": float(TASKS_VERSION), "moecap_domain": domain, "moecap_seed": seed}

        name = f"moecap_rolling_{domain}"
        rows = [{"text": _cap(doc, max_doc_chars), "doc": i} for i, doc in enumerate(test_docs)]
        test_file = data / f"{name}.test.jsonl"
        _write(test_file, _jsonl(rows))
        _write(out_dir / f"{name}.yaml", _yaml({
            "task": name,
            "tag": ["moecap_rolling"],
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(test_file)}, "cache_dir": cache},
            "test_split": "test",
            "output_type": "loglikelihood_rolling",
            "doc_to_text": "",
            "doc_to_target": "text",
            "metric_list": [
                {"metric": "word_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False},
                {"metric": "byte_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False},
                {"metric": "bits_per_byte", "aggregation": "bits_per_byte", "higher_is_better": False},
            ],
            "metadata": {**meta, "max_doc_chars": max_doc_chars,
                         "note": "word/byte perplexity over whole documents: not token perplexity"},
        }))
        names.append(name)

        for kind in ("mc", "real"):
            name = f"moecap_{kind}_{domain}"
            rng = random.Random(f"moecap-{kind}/{domain}/{seed}")
            if kind == "mc":
                def make(docs: list[str], split: str, k: int) -> list[dict[str, Any]]:
                    return mc_items(docs, k, rng)
                choice = {"doc_to_text": "context", "doc_to_choice": "choices", "doc_to_target": "label"}
                metrics = ["acc", "acc_norm"]
                count = n_mc
                note = "pick the true next line of a held-out document among 4 (3 from other documents)"
            else:
                def make(docs: list[str], split: str, k: int) -> list[dict[str, Any]]:
                    others = {o: held_out_documents(o, split) for o in DOMAINS if o != domain}
                    return real_items(domain, docs, others, k, rng)
                # lm-eval's multiple-input form (as winogrande): doc_to_text gives the gold index, the
                # choices are contexts, and every choice scores the same continuation
                choice = {"doc_to_text": "label", "doc_to_choice": "contexts", "doc_to_target": "continuation"}
                metrics = ["acc"]  # acc_norm would equal acc: the continuation is the same for every choice
                count = n_real
                note = ("pick the lines a held-out line follows: its own, those of 2 other documents of the "
                        "domain, or those of a document of another domain")
            files = {
                "test": (data / f"{name}.test.jsonl", make(test_docs, "test", count)),
                "validation": (data / f"{name}.validation.jsonl",
                               make(held_out_documents(domain, "validation"), "validation",
                                    min(count, N_FEWSHOT_POOL))),
            }
            for path, items in files.values():
                _write(path, _jsonl(items))
            _write(out_dir / f"{name}.yaml", _yaml({
                "task": name,
                "tag": [f"moecap_{kind}"],
                "dataset_path": "json",
                "dataset_kwargs": {
                    "data_files": {split: str(path) for split, (path, _) in files.items()},
                    "cache_dir": cache,
                },
                "test_split": "test",
                "validation_split": "validation",
                "fewshot_split": "validation",
                "output_type": "multiple_choice",
                **choice,
                "target_delimiter": "",
                "fewshot_delimiter": "\n\n",
                "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in metrics],
                "metadata": {**meta, "n_choices": N_CHOICES, "context_lines": CONTEXT_LINES, "note": note},
            }))
            names.append(name)
    return names


def offline_tasks_dir() -> Path:
    """moecap's offline lm-eval tasks (generated from the held-out corpora on first use)."""
    from moecap.paths import cache_dir

    out = cache_dir() / "lm_eval_tasks" / f"v{TASKS_VERSION}"
    if not (out / ".complete").is_file():
        write_offline_tasks(out)
        (out / ".complete").write_text("ok\n")
    return out


def offline_task_names() -> list[str]:
    """The names of moecap's offline tasks, without writing them."""
    return [f"moecap_{kind}_{d}" for d in DOMAINS for kind in ("rolling", "mc", "real")]


class UnknownTaskError(KeyError):
    """Task names lm-eval does not know (the message lists close matches)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def _paths(include_path: Any) -> list[str]:
    if include_path is None:
        return []
    if isinstance(include_path, (str, Path)):
        include_path = [include_path]
    return [str(Path(p).expanduser()) for p in include_path if p]


def task_manager_for(tasks: list[str], include_path: Any = None, include_defaults: bool = True):
    """A ``TaskManager`` that knows every name in ``tasks``, else ``UnknownTaskError``.

    Indexing lm-eval's ~15,000 built-in tasks takes seconds, so when the include paths alone define
    every requested task, only they are indexed. ``include_defaults=False``: never the built-in ones.
    """
    from lm_eval.tasks import TaskManager

    paths = _paths(include_path)

    def missing(tm) -> list[str]:
        known = set(tm.all_tasks)
        return [t for t in tasks if t not in known and not Path(t).is_file()]

    tm = None
    if paths or not include_defaults:
        tm = TaskManager(include_path=paths or None, include_defaults=False)
    if include_defaults and (tm is None or missing(tm)):
        tm = TaskManager(include_path=paths or None)
    unknown = missing(tm)
    if unknown:
        lines = []
        for t in unknown:
            close = difflib.get_close_matches(t, tm.all_tasks, n=5, cutoff=0.6)
            lines.append(f"  {t!r}: " + (f"did you mean {', '.join(close)}?" if close else "no close match"))
        where = ", ".join((["lm-eval's built-in tasks"] if include_defaults else []) + paths) or "nothing"
        raise UnknownTaskError(
            f"unknown lm-eval task(s) (searched {where}):\n" + "\n".join(lines)
            + "\nmoecap's offline tasks: moecap_rolling_<domain>, moecap_mc_<domain> for code, prose, c; "
            "`lm-eval ls tasks` lists the built-in ones"
        )
    return tm
