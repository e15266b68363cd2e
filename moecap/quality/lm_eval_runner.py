"""Running lm-eval tasks on an ``LM`` (usually ``MoecapLM``) and keeping what a record needs.

``run_lm_eval`` returns, per task: every metric with its standard error, the number of samples
(original and evaluated), the number of few-shot examples, the task's version, the lm-eval version,
and a label on ``word_perplexity`` / ``byte_perplexity`` / ``bits_per_byte``: lm-eval normalises them
per whitespace-separated word and per UTF-8 byte of whole documents; they are *not* token perplexity
(moecap's ``perplexity`` section reports that).

Command line, with the ``moecap`` model registered and moecap's offline tasks on the include path::

    python -m moecap.quality.lm_eval_runner --model moecap \\
        --model_args model=tiny-moe,runner=hf,dtype=float32,device=cpu --tasks moecap_mc_code --limit 50
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from pathlib import Path
from typing import Any

from moecap.quality.tasks import UnknownTaskError, task_manager_for  # noqa: F401  (re-exported)

PERPLEXITY_LABELS = {
    "word_perplexity": "lm-eval word perplexity: exp(-document log-likelihood / whitespace-separated words); "
    "NOT token perplexity",
    "byte_perplexity": "lm-eval byte perplexity: exp(-document log-likelihood / UTF-8 bytes); NOT token perplexity",
    "bits_per_byte": "-document log-likelihood / (UTF-8 bytes * ln 2); NOT token perplexity",
}


def _num(value: Any) -> float | None:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None  # lm-eval writes "N/A" where it has no stderr
    return x if math.isfinite(x) else None


def _metrics(entry: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{"acc,none": 0.3, "acc_stderr,none": 0.02, "alias": ...}`` -> ``{"acc": {"value", "stderr", "filter"}}``."""
    out: dict[str, dict[str, Any]] = {}
    for key, value in entry.items():
        if "," not in key:
            continue  # alias, name, sample_len ...
        metric, _, filt = key.partition(",")
        if metric.endswith("_stderr"):
            continue
        name = metric if filt == "none" else f"{metric},{filt}"
        m = {"value": _num(value), "stderr": _num(entry.get(f"{metric}_stderr,{filt}")), "filter": filt}
        base = metric.split(",")[0]
        if base in PERPLEXITY_LABELS:
            m["is_token_perplexity"] = False
            m["definition"] = PERPLEXITY_LABELS[base]
        out[name] = m
    return out


def _samples(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    def plain(x: Any) -> Any:
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        if isinstance(x, dict):
            return {str(k): plain(v) for k, v in x.items()}
        if isinstance(x, (str, int, float, bool)) or x is None:
            return x
        try:
            return float(x)
        except (TypeError, ValueError):
            return str(x)

    return [
        {"doc_id": r.get("doc_id"), "target": plain(r.get("target")), "responses": plain(r.get("filtered_resps"))}
        for r in rows
    ]


@contextlib.contextmanager
def _quiet_git_probe():
    """lm-eval records the git commit of the working directory by running ``git describe`` with git's
    stderr on the process's own: outside a repository every evaluation printed "fatal: not a git
    repository". While it evaluates, the probe is one that gives the same answer (the commit, or None)
    and keeps git's complaint to itself."""
    import subprocess

    import lm_eval.evaluator as evaluator

    def quiet() -> str | None:
        try:
            out = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return (out.stdout.strip() or None) if out.returncode == 0 else None

    original = getattr(evaluator, "get_git_commit_hash", None)
    if original is None:  # a release without the probe
        yield
        return
    evaluator.get_git_commit_hash = quiet
    try:
        yield
    finally:
        evaluator.get_git_commit_hash = original


def run_lm_eval(
    lm: Any,
    tasks: list[str],
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    include_path: Path | str | list[Path | str] | None = None,
    batch_size: int | None = None,
    *,
    include_defaults: bool = True,
    bootstrap_iters: int = 100_000,
    log_samples: bool = False,
) -> dict[str, Any]:
    """Evaluate ``lm`` on ``tasks`` with ``lm_eval.simple_evaluate``; a JSON-able summary.

    ``batch_size`` is recorded (the ``LM`` was built with its own). ``include_defaults=False``: only
    the tasks under ``include_path`` (no indexing of lm-eval's built-in ones). ``log_samples``: add each task's
    per-document responses (log-likelihoods, ``(loglikelihood, is_greedy)`` pairs, generations).
    """
    import lm_eval

    tasks = list(tasks)
    if not tasks:
        raise ValueError("no lm-eval tasks given")
    tm = task_manager_for(tasks, include_path, include_defaults)
    t0 = time.perf_counter()
    with _quiet_git_probe():
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=tasks,
            num_fewshot=num_fewshot,
            limit=limit,
            batch_size=batch_size,
            task_manager=tm,
            bootstrap_iters=bootstrap_iters,
            log_samples=log_samples,
        )  # lm-eval's default seeds, so that few-shot examples are the ones its own runs draw
    seconds = time.perf_counter() - t0
    if results is None:  # a non-zero rank of a distributed run
        return {}
    version = getattr(lm_eval, "__version__", None)
    per_task: dict[str, Any] = {}
    for name, entry in results.get("results", {}).items():
        cfg = results.get("configs", {}).get(name, {})
        record: dict[str, Any] = {
            "metrics": _metrics(entry),
            "n_samples": dict(results.get("n-samples", {}).get(name, {})) or None,
            "num_fewshot": results.get("n-shot", {}).get(name),
            "task_version": results.get("versions", {}).get(name),
            "lm_eval_version": version,
            "output_type": cfg.get("output_type"),
            "higher_is_better": dict(results.get("higher_is_better", {}).get(name, {})) or None,
        }
        if record["output_type"] == "loglikelihood_rolling":
            record["note"] = (
                "word_perplexity / byte_perplexity are lm-eval's per-word / per-byte figures, not token perplexity"
            )
        if log_samples and name in results.get("samples", {}):
            record["samples"] = _samples(results["samples"][name])
        per_task[name] = record
    groups = {
        name: {"metrics": _metrics(entry), "subtasks": results.get("group_subtasks", {}).get(name)}
        for name, entry in results.get("groups", {}).items()
    }
    out: dict[str, Any] = {
        "lm_eval_version": version,
        "tasks": per_task,
        "settings": {
            "limit": limit,
            "num_fewshot": num_fewshot,
            "batch_size": batch_size,
            "bootstrap_iters": bootstrap_iters,
            **{k: results.get("config", {}).get(k)
               for k in ("random_seed", "numpy_seed", "torch_seed", "fewshot_seed")},
        },
        "seconds": seconds,
    }
    if groups:
        out["groups"] = groups
    return out


def main(argv: list[str] | None = None) -> None:
    """lm-eval's command line with the ``moecap`` model registered and, unless ``--include_path`` is
    given, moecap's offline tasks included."""
    import lm_eval.__main__ as lm_eval_main

    import moecap.quality.lm_eval_adapter  # noqa: F401  (registers the "moecap" model)

    argv = list(sys.argv[1:] if argv is None else argv)
    if not any(a == "--include_path" or a.startswith("--include_path=") for a in argv) and not (
        argv and argv[0] in ("-h", "--help")
    ):
        from moecap.quality.tasks import offline_tasks_dir

        argv += ["--include_path", str(offline_tasks_dir())]
    sys.argv = ["lm-eval", *argv]
    lm_eval_main.cli_evaluate()


if __name__ == "__main__":
    main()
