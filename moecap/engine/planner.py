"""Profiling and planning for mixed-precision expert offloading (after arXiv 2407.14417).

- :func:`profile` runs calibration text through the model (a transformers model, or the engine's own
  model with its experts at full precision) and records, per MoE layer and expert, how many tokens the
  router sent to it (activation frequency) and a sample of those tokens' inputs; :func:`sensitivity`
  quantizes each expert at each precision exactly as the store would (:func:`~moecap.engine.store.
  quantize_weight`) and measures the relative squared error of its output on its own sampled inputs
  (quantization sensitivity).
- :func:`make_plan` turns a profile into an :class:`~moecap.engine.store.ExpertPlan` from fractions:
  the experts whose quantization costs least (frequency x sensitivity) are quantized first; the least used
  experts are placed in host memory first, as many as the fraction asks, or as the fast-memory budget
  requires.
- :func:`mixed_plan` is the mixture of precisions proper: every expert gets its own precision (and tier)
  under a fast-memory budget. Each expert climbs down a ladder of precisions (full, then e.g. int8,
  then int4); each step costs ``frequency x (sensitivity after - sensitivity before)`` of expected output
  error and saves bytes, and steps are taken cheapest error per byte first until the experts fit the
  fast memory (or an error budget is spent); what still does not fit goes to host memory, least used first.
"""

from __future__ import annotations

import heapq
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from moecap.engine.store import (
    BITS,
    ExpertLayout,
    ExpertPlan,
    ExpertStore,
    PlanError,
    Slot,
    expert_forward,
    experts_per_layer,
    moe_blocks,
    plan_nbytes,
    quantize_weight,
)

LADDER = ("full", "int8", "int4", "int3", "int2")


@dataclass
class Profile:
    """Activation counts ``freq[layer][expert]``, tokens seen, and ``sens[layer][expert][precision]``."""

    freq: dict[int, list[int]]
    tokens: int
    sens: dict[int, list[dict[str, float]]] = field(default_factory=dict)
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "source": self.source,
                "freq": {str(k): v for k, v in self.freq.items()},
                "sens": {str(k): v for k, v in self.sens.items()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Profile":
        return cls({int(k): list(v) for k, v in d["freq"].items()}, int(d["tokens"]),
                   {int(k): list(v) for k, v in (d.get("sens") or {}).items()}, d.get("source", ""))

    def save(self, path: str | Path) -> None:
        from moecap.paths import atomic_write_text

        atomic_write_text(Path(path), json.dumps(self.to_dict()) + "\n")


def expert_weights(block: nn.Module, e: int) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """Full-precision gate_up [2I, H], down [H, I] and activation of expert ``e`` of an MoE block
    (fused transformers experts, or an expert store holding full-precision experts)."""
    ex = block.experts
    if isinstance(ex, ExpertStore):
        stored = ex.experts[ex._entry(e)]
        if stored.slot.precision != "full":
            raise PlanError(f"layer {ex.layer} expert {e} is stored at {stored.slot.precision}: profiling "
                            "needs the experts at full precision")
        return stored.gate_up.dense(), stored.down.dense(), ex.act_fn
    return ex.gate_up_proj[e].detach(), ex.down_proj[e].detach(), ex.act_fn


@torch.inference_mode()
def collect_routed(model: nn.Module, windows: Sequence[Sequence[int]], samples_per_expert: int
                   ) -> tuple[dict[int, list[int]], dict[int, list[list[torch.Tensor]]], int]:
    """Route ``windows`` (token-id lists) through ``model`` (experts at full precision): per MoE layer and
    expert, the tokens routed to it, up to ``samples_per_expert`` of their inputs (float32, CPU), and
    the tokens seen."""
    blocks = moe_blocks(model)
    if not blocks:
        raise PlanError(f"{type(model).__name__}: no MoE blocks with fused experts to profile")
    per = experts_per_layer(model)
    freq = {i: [0] * per[i] for i, _, _ in blocks}
    samples: dict[int, list[list[torch.Tensor]]] = {i: [[] for _ in freq[i]] for i in freq}
    kept: dict[int, list[int]] = {i: [0] * len(freq[i]) for i in freq}
    handles = []

    def hook_for(layer: int):
        def hook(_mod, args, kwargs):
            items = list(args) + list(kwargs.values())
            x = items[0]
            idx = next(t for t in items if isinstance(t, torch.Tensor) and not t.is_floating_point())
            counts = torch.bincount(idx.reshape(-1), minlength=len(freq[layer])).tolist()
            for e, c in enumerate(counts):
                freq[layer][e] += int(c)
                room = samples_per_expert - kept[layer][e]
                if c and room > 0:
                    rows = (idx == e).any(dim=-1).nonzero().reshape(-1)[:room]
                    samples[layer][e].append(x[rows].detach().float().cpu())
                    kept[layer][e] += len(rows)
            return None
        return hook

    for i, _, block in blocks:
        handles.append(block.experts.register_forward_pre_hook(hook_for(i), with_kwargs=True))
    device = getattr(model, "device", None) or next(model.parameters()).device
    tokens = 0
    try:
        for w in windows:
            ids = torch.tensor([list(w)], dtype=torch.long, device=device)
            model(input_ids=ids, use_cache=False)
            tokens += ids.numel()
    finally:
        for h in handles:
            h.remove()
    return freq, samples, tokens


def profile(model: nn.Module, windows: Sequence[Sequence[int]], precisions: Sequence[str] = ("int8", "int4"),
            group_size: int = 64, samples_per_expert: int = 256, source: str = "") -> Profile:
    """Route ``windows`` (token-id lists) through ``model`` and measure each expert's activation
    frequency and, for each of ``precisions``, its quantization sensitivity: the relative squared error
    ||f_q(x) - f(x)||^2 / ||f(x)||^2 of its output on up to ``samples_per_expert`` of the tokens routed
    to it, with the expert quantized exactly as the store would store it."""
    freq, samples, tokens = collect_routed(model, windows, samples_per_expert)
    prof = Profile(freq, tokens, source=source)
    prof.sens = sensitivity(model, samples, precisions, group_size)
    return prof


@torch.inference_mode()
def sensitivity(model: nn.Module, samples: dict[int, list[list[torch.Tensor]]], precisions: Sequence[str],
                group_size: int) -> dict[int, list[dict[str, float]]]:
    out: dict[int, list[dict[str, float]]] = {}
    per = experts_per_layer(model)
    for i, _, block in moe_blocks(model):
        rows = []
        for e in range(per[i]):
            gu, dn, act = expert_weights(block, e)
            gu, dn = gu.float().cpu(), dn.float().cpu()
            chunks = samples.get(i, [[]] * (e + 1))[e]
            x = torch.cat(chunks) if chunks else None
            row: dict[str, float] = {}
            ref = expert_forward(x, gu, dn, act) if x is not None and x.numel() else None
            for prec in precisions:
                if ref is None:
                    row[prec] = 0.0  # never routed to in calibration: no measured cost
                    continue
                q = expert_forward(x, quantize_weight(gu, prec, group_size), quantize_weight(dn, prec, group_size), act)
                denom = float(ref.pow(2).sum())
                row[prec] = float((q - ref).pow(2).sum()) / denom if denom > 0 else 0.0
            rows.append(row)
        out[i] = rows
    return out


def make_plan(model: Any, prof: Profile | None, quantize_fraction: float = 0.0, precision: str = "int4",
              offload_fraction: float = 0.0, fast_budget_bytes: float | None = None, group_size: int = 64,
              name: str | None = None) -> ExpertPlan:
    """A plan for ``model`` (a model, or its :class:`~moecap.engine.store.ExpertLayout`): quantize
    ``quantize_fraction`` of all routed experts to ``precision`` (the cheapest to quantize first: frequency
    x sensitivity), then place the least used ``offload_fraction`` in host memory, and more if the fast
    tier would exceed ``fast_budget_bytes``. Without a profile every expert counts as equally used and
    equally sensitive (ties broken by layer, then expert index)."""
    for what, v in (("quantize_fraction", quantize_fraction), ("offload_fraction", offload_fraction)):
        if not 0.0 <= v <= 1.0:
            raise PlanError(f"{what}={v}: must be in [0, 1]")
    if precision not in BITS:
        raise PlanError(f"precision {precision!r}: allowed {', '.join(BITS)}")
    layout = ExpertLayout.of(model)
    per_layer = layout.experts
    keys = [(layer, e) for layer, n in sorted(per_layer.items()) for e in range(n)]
    total = len(keys)

    def freq(k: tuple[int, int]) -> float:
        return float(prof.freq[k[0]][k[1]]) if prof else 0.0

    def cost(k: tuple[int, int]) -> float:
        if not prof or not prof.sens:
            return 0.0
        return freq(k) * prof.sens[k[0]][k[1]].get(precision, math.inf)

    n_q = int(round(quantize_fraction * total))
    quantized = set(sorted(keys, key=lambda k: (cost(k), k))[:n_q])
    by_use = sorted(keys, key=lambda k: (freq(k), k))
    n_off = int(round(offload_fraction * total))
    slots = {layer: [Slot("fast", "full") for _ in range(n)] for layer, n in per_layer.items()}
    for k in keys:
        slots[k[0]][k[1]] = Slot("fast", precision if k in quantized else "full")
    for k in by_use[:n_off]:
        slots[k[0]][k[1]] = Slot("host", slots[k[0]][k[1]].precision)
    plan = ExpertPlan(slots, group_size, name or f"q{quantize_fraction:g}-{precision}-off{offload_fraction:g}")
    if fast_budget_bytes is not None:
        _fit_budget(plan, layout, by_use[n_off:], fast_budget_bytes)
    plan.notes = {"quantize_fraction": quantize_fraction, "precision": precision,
                  "offload_fraction": offload_fraction, "fast_budget_bytes": fast_budget_bytes,
                  "profiled_tokens": prof.tokens if prof else 0,
                  "calibration": prof.source if prof else None}
    return plan


def _fit_budget(plan: ExpertPlan, layout: ExpertLayout, order: Sequence[tuple[int, int]], budget: float) -> None:
    """Move experts to host memory in ``order`` until the fast tier fits ``budget`` bytes."""
    sizes = plan_nbytes(layout, plan)["per_expert"]
    fast = sum(sizes[layer][e] for layer, slots in plan.layers.items() for e, s in enumerate(slots) if s.placement == "fast")
    for layer, e in order:
        if fast <= budget:
            break
        s = plan.layers[layer][e]
        if s.placement == "fast":
            plan.layers[layer][e] = Slot("host", s.precision)
            fast -= sizes[layer][e]
    if fast > budget:
        raise PlanError(f"even with every expert in host memory the fast tier needs {fast:.0f} B > budget {budget:.0f} B")


def full_expert_bytes(model: Any) -> int:
    """Bytes of every routed expert at full precision (what a budget fraction is a fraction of)."""
    layout = ExpertLayout.of(model)
    return sum(n * layout.expert_nbytes(i, "full", 64) for i, n in layout.experts.items())


def mixed_plan(model: Any, prof: Profile | None, fast_budget_bytes: float,
               precisions: Sequence[str] = ("int8", "int4"), max_error: float | None = None, group_size: int = 64,
               name: str | None = None) -> ExpertPlan:
    """Every expert its own precision and tier under ``fast_budget_bytes`` of fast memory for experts.

    ``precisions``: the ladder below full precision (any of int8, int4, int3, int2, taken in that order).
    ``max_error``: the most expected output error the quantization may add, as the activation-weighted
    mean relative squared error of the experts' outputs (sum of frequency x sensitivity over the
    total frequency); None: quantize until the experts fit. Without a profile (or sensitivities for a
    precision) every expert counts as equally used and equally sensitive, and the ladder is taken layer
    by layer. The plan's notes record the predicted error and bytes."""
    ladder = ["full"] + [p for p in LADDER[1:] if p in precisions]
    unknown = [p for p in precisions if p not in BITS]
    if unknown:
        raise PlanError(f"precisions {unknown}: allowed {', '.join(BITS)}")
    if fast_budget_bytes < 0:
        raise PlanError(f"fast_budget_bytes={fast_budget_bytes}: must be >= 0")
    layout = ExpertLayout.of(model)
    experts = layout.experts
    keys = [(layer, e) for layer in sorted(experts) for e in range(experts[layer])]
    size = {(layer, p): layout.expert_nbytes(layer, p, group_size) for layer in experts for p in ladder}
    total_freq = sum(sum(v) for v in prof.freq.values()) if prof else 0

    def freq(k: tuple[int, int]) -> float:
        return float(prof.freq[k[0]][k[1]]) if prof and total_freq else 1.0

    def sens(k: tuple[int, int], p: str) -> float:
        if p == "full":
            return 0.0
        if prof and prof.sens:
            return float(prof.sens[k[0]][k[1]].get(p, math.inf))
        return float(LADDER.index(p))  # no profile: every expert alike, a lower precision costs more

    level = dict.fromkeys(keys, 0)
    fast = sum(size[(k[0], "full")] for k in keys)
    norm = total_freq if prof and total_freq else len(keys)
    spent = 0.0
    heap: list[tuple[float, tuple[int, int], int, float]] = []

    def push(k: tuple[int, int]) -> None:
        lv = level[k]
        if lv + 1 >= len(ladder):
            return
        cur, nxt = ladder[lv], ladder[lv + 1]
        saved = size[(k[0], cur)] - size[(k[0], nxt)]
        d_err = freq(k) * max(0.0, sens(k, nxt) - sens(k, cur)) / norm
        heapq.heappush(heap, (d_err / max(saved, 1), k, lv, d_err))

    for k in keys:
        push(k)
    while fast > fast_budget_bytes and heap:
        _, k, lv, d_err = heapq.heappop(heap)
        if level[k] != lv:
            continue
        if max_error is not None and spent + d_err > max_error:
            break
        fast -= size[(k[0], ladder[lv])] - size[(k[0], ladder[lv + 1])]
        spent += d_err
        level[k] = lv + 1
        push(k)
    slots = {layer: [Slot("fast", ladder[level[(layer, e)]]) for e in range(experts[layer])] for layer in experts}
    plan = ExpertPlan(slots, group_size, name or f"mixed-{'-'.join(precisions)}-{fast_budget_bytes / 1e6:g}MB")
    by_use = sorted(keys, key=lambda k: (freq(k), k))
    if fast > fast_budget_bytes:
        _fit_budget(plan, layout, by_use, fast_budget_bytes)
    tiers = plan_nbytes(layout, plan)["tiers"]
    plan.notes = {"mixed": True, "precisions": list(precisions), "fast_budget_bytes": fast_budget_bytes,
                  "max_error": max_error, "predicted_error": spent, "expert_bytes_fast": tiers["fast"],
                  "expert_bytes_host": tiers["host"], "profiled_tokens": prof.tokens if prof else 0,
                  "calibration": prof.source if prof else None,
                  "precision_counts": {p: plan.count(precision=p) for p in ladder if plan.count(precision=p)}}
    return plan
