"""A cell's quality section: token perplexity and lm-eval tasks, measured through its runner."""

from __future__ import annotations

from typing import Any


def evaluate_quality(runner: Any, workload: Any) -> dict[str, Any]:
    """The quality section. A runner serving several models (``quality_models()`` names more than one,
    e.g. a multi-tenant server) has each of them measured: ``per_model`` holds every model's figures and
    the top level repeats the first model's, so single-model readers keep working."""
    models = list(runner.quality_models()) if hasattr(runner, "quality_models") else []
    if len(models) <= 1:
        return _evaluate_one(runner, workload)
    per: dict[str, Any] = {}
    try:
        for m in models:
            runner.quality_model = m
            per[m] = _evaluate_one(runner, workload)
    finally:
        runner.quality_model = None
    return {**per[models[0]], "model": models[0], "per_model": per}


def _evaluate_one(runner: Any, workload: Any) -> dict[str, Any]:
    quality: dict[str, Any] = {}
    if workload.perplexity is not None:
        from moecap.quality.perplexity import evaluate_perplexity

        cfg = workload.perplexity
        quality["perplexity"] = {
            ds: evaluate_perplexity(runner, ds, cfg.context_length, cfg.batch_size, cfg.max_windows)
            for ds in cfg.datasets
        }
    if workload.lm_eval is not None:
        from moecap.quality.lm_eval_adapter import MoecapLM
        from moecap.quality.lm_eval_runner import run_lm_eval
        from moecap.quality.tasks import offline_tasks_dir

        cfg = workload.lm_eval
        include = [str(offline_tasks_dir())] + ([cfg.include_path] if cfg.include_path else [])
        lm = MoecapLM(runner=runner, batch_size=cfg.batch_size)
        quality["lm_eval"] = run_lm_eval(
            lm, list(cfg.tasks), limit=cfg.limit, num_fewshot=cfg.num_fewshot, include_path=include,
            batch_size=cfg.batch_size,
        )
    return quality
