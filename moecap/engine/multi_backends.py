"""The consolidated backend of ``moecap serve`` for several fine-tuned MoE models of one architecture:

:class:`ConsolidatedBackend` (``--backend consolidated``): one skeleton, experts pooled with similar
  ones stored once (:mod:`moecap.engine.consolidate`), each child's non-expert layers swapped in by
``activate`` (timed per child; the scheduler groups requests by child to limit swaps). Children of one
base (``base`` mode), or two or more fine-tunes with no base (``pairwise``); each measured on its own
calibration data.

The static-partition baseline the consolidation paper compares with (``--backend partition``) lives in
:mod:`moecap.engine.partition`: one server process per child behind a router.

It follows :class:`moecap.engine.backend.Backend`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moecap.engine.backend import (
    BackendError,
    config_context_length,
    device_memory,
    eos_ids,
    resolve_device,
    resolve_dtype,
)


def _base_of(children: dict[str, str], base: str | None) -> Path:
    """The base model: given, or the ``parent`` an embedded child's ``moecap.json`` names."""
    from moecap.models import local_path_for

    if base:
        return Path(local_path_for(base))
    parents = set()
    for source in children.values():
        d = Path(local_path_for(str(source)))
        meta = d / "moecap.json"
        parent = json.loads(meta.read_text()).get("parent") if meta.is_file() else None
        if not parent:
            raise BackendError(f"{d}: cannot tell the base model of this child; pass --base")
        parents.add((d.parent / parent).resolve())
    if len(parents) != 1:
        raise BackendError(f"the children have different bases {sorted(map(str, parents))}; pass --base")
    return parents.pop()


def _generation_config(model_dir: str) -> Any:
    """A child's generation config (its extra end-of-sequence ids), None when it has none."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(model_dir)
    except OSError:
        return None


class ConsolidatedBackend:
    """Children of one base served from one consolidated model."""

    def __init__(self, models: dict[str, str | Path], device: str = "cpu", dtype: str = "auto",
                 max_model_len: int | None = None, base: str | None = None, threshold: float = 0.3,
                 plan: str | None = None, shared: str = "mean", non_expert_on_device: bool = False,
                 calibration_windows: int = 8, fast_budget_gb: float | None = None, pairwise: bool = False,
                 data: dict[str, str] | None = None):
        import torch
        from transformers import AutoTokenizer

        from moecap.engine.consolidate import (ConsolidatedModel, ConsolidationError, ConsolidationPlan, make_plan,
                                               measure_children, resolve_dir)

        if len(models) < 2:
            raise BackendError("the consolidated backend serves two or more fine-tunes of one architecture")
        unknown = sorted(set(data or {}) - set(models))
        if unknown:
            raise BackendError(f"calibration data for {unknown}, which are not served ({', '.join(models)})")
        self._device = resolve_device(device)
        self._dtype = resolve_dtype(dtype, self._device)
        try:
            dirs = {n: str(resolve_dir(s)) for n, s in models.items()}
            base_dir = None if pairwise else _base_of(dirs, base)
            if pairwise and shared == "base":
                raise BackendError("--shared base needs a base; pairwise consolidation shares the children's mean")
            if plan:
                self.plan = ConsolidationPlan.load(plan)
                if set(self.plan.children) != set(dirs):
                    raise BackendError(f"plan {plan} covers {self.plan.children}, the served models are {list(dirs)}")
                if (self.plan.mode == "pairwise") != pairwise:
                    raise BackendError(f"plan {plan} is a {self.plan.mode}-mode plan: "
                                       f"{'add' if self.plan.mode == 'pairwise' else 'drop'} --pairwise")
            else:
                sim, sizes = measure_children(base_dir, dirs, self._dtype, calibration_windows_n=calibration_windows,
                                              data=data)
                self.plan = make_plan(sim, sizes, threshold=threshold)
            self.cm = ConsolidatedModel(base_dir, dirs, self.plan, str(self._device), self._dtype,
                                        non_expert_on_device=non_expert_on_device, shared=shared,
                                        fast_budget_bytes=None if fast_budget_gb is None else fast_budget_gb * 1e9)
        except ConsolidationError as err:
            raise BackendError(str(err)) from None
        self._tok = {n: AutoTokenizer.from_pretrained(d) for n, d in dirs.items()}
        self._eos = {n: eos_ids(self._tok[n], _generation_config(d)) for n, d in dirs.items()}
        ctx = config_context_length(self.cm.model.config)
        self._ctx = min(ctx, int(max_model_len)) if max_model_len else ctx
        self._torch = torch

    def model_names(self) -> list[str]:
        return list(self.cm.names)

    def _check(self, model: str) -> str:
        if model not in self.cm.non_expert:
            raise BackendError(f"unknown model {model!r}; served: {', '.join(self.cm.names)}")
        return model

    def tokenizer(self, model: str) -> Any:
        return self._tok[self._check(model)]

    def context_length(self, model: str) -> int:
        self._check(model)
        return self._ctx

    def activate(self, model: str) -> float:
        return self.cm.activate(self._check(model))

    def forward(self, model: str, input_ids: Any, attention_mask: Any, past_key_values: Any,
                position_ids: Any = None) -> tuple[Any, Any]:
        if model != self.cm.active:
            raise BackendError(f"forward() for {model!r} while {self.cm.active!r} is the active model")
        with self._torch.inference_mode():
            out = self.cm.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                past_key_values=past_key_values, use_cache=True)
        return out.logits, out.past_key_values

    def device(self) -> Any:
        return self._device

    def eos_token_ids(self, model: str) -> list[int]:
        return list(self._eos[self._check(model)])

    def memory(self) -> dict[str, int]:
        mem = dict(self.cm.memory())
        swaps = self.cm.swap_seconds
        mem["swaps"] = self.cm.swaps
        mem["swap_us_total"] = int(1e6 * sum(swaps))
        for child, times in self.cm.swap_seconds_by_child.items():
            mem[f"swap_us_total:{child}"] = int(1e6 * sum(times))
            mem[f"swaps:{child}"] = len(times)
        mem.update(device_memory(self._device))
        return mem
