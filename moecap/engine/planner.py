"""Profiling and planning for mixed-precision expert offloading (after arXiv 2407.14417).

- :func:`profile` runs calibration text through the unmodified model and records, per MoE layer and
  expert, how many tokens the router sent to it (activation frequency) and a sample of those tokens'
  inputs; :func:`sensitivity` quantizes each expert at each bit width and measures the relative error
  of its output on its own sampled inputs (quantization sensitivity).
- :func:`make_plan` turns a profile into an :class:`~moecap.engine.store.ExpertPlan`: the experts whose
  quantization costs least (frequency x sensitivity) are quantized first; the least used experts are
  placed in host memory first, as many as the fraction asks, or as the fast-memory budget requires.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from moecap.engine.quant import fit_group_size, quantize
from moecap.engine.store import BITS, ExpertPlan, PlanError, Slot, StoredExpert, experts_per_layer, moe_blocks, plan_nbytes


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


@torch.inference_mode()
def collect_routed(model: nn.Module, windows: Sequence[Sequence[int]], samples_per_expert: int
                   ) -> tuple[dict[int, list[int]], dict[int, list[list[torch.Tensor]]], int]:
    """Route ``windows`` (token-id lists) through ``model`` (experts still fused): per MoE layer and
    expert, the tokens routed to it, up to ``samples_per_expert`` of their inputs (float32, CPU), and
    the tokens seen."""
    blocks = moe_blocks(model)
    if not blocks:
        raise PlanError(f"{type(model).__name__}: no MoE blocks with fused experts to profile")
    freq = {i: [0] * int(b.experts.gate_up_proj.shape[0]) for i, _, b in blocks}
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
    device = next(model.parameters()).device
    tokens = 0
    try:
        for w in windows:
            ids = torch.tensor([list(w)], dtype=torch.long, device=device)
            model(ids)
            tokens += ids.numel()
    finally:
        for h in handles:
            h.remove()
    return freq, samples, tokens


def profile(model: nn.Module, windows: Sequence[Sequence[int]], precisions: Sequence[str] = ("int8", "int4"),
            group_size: int = 64, samples_per_expert: int = 256, source: str = "") -> Profile:
    """Route ``windows`` (token-id lists) through ``model`` (not yet installed) and measure each expert's
    activation frequency and, for each of ``precisions``, its quantization sensitivity: the relative
    squared error ||f_q(x) - f(x)||^2 / ||f(x)||^2 of its output on up to ``samples_per_expert`` of the
    tokens routed to it."""
    freq, samples, tokens = collect_routed(model, windows, samples_per_expert)
    prof = Profile(freq, tokens, source=source)
    prof.sens = sensitivity(model, samples, precisions, group_size)
    return prof


def sensitivity(model: nn.Module, samples: dict[int, list[list[torch.Tensor]]], precisions: Sequence[str],
                group_size: int) -> dict[int, list[dict[str, float]]]:
    out: dict[int, list[dict[str, float]]] = {}
    for i, _, block in moe_blocks(model):
        ex = block.experts
        rows = []
        for e in range(ex.gate_up_proj.shape[0]):
            gu, dn = ex.gate_up_proj[e].detach().float().cpu(), ex.down_proj[e].detach().float().cpu()
            chunks = samples.get(i, [[]] * (e + 1))[e]
            x = torch.cat(chunks) if chunks else None
            row: dict[str, float] = {}
            for prec in precisions:
                if x is None or x.numel() == 0:
                    row[prec] = 0.0  # never routed to in calibration: no measured cost
                    continue
                bits = BITS[prec]
                ref = StoredExpert.apply(x, gu, dn, ex.act_fn)
                q = StoredExpert.apply(x, quantize(gu, bits, fit_group_size(gu.shape[1], group_size)),
                                       quantize(dn, bits, fit_group_size(dn.shape[1], group_size)), ex.act_fn)
                denom = float(ref.pow(2).sum())
                row[prec] = float((q - ref).pow(2).sum()) / denom if denom > 0 else 0.0
            rows.append(row)
        out[i] = rows
    return out


def make_plan(model: nn.Module, prof: Profile | None, quantize_fraction: float = 0.0, precision: str = "int4",
              offload_fraction: float = 0.0, fast_budget_bytes: float | None = None, group_size: int = 64,
              name: str | None = None) -> ExpertPlan:
    """A plan for ``model``: quantize ``quantize_fraction`` of all routed experts to ``precision`` (the
    cheapest to quantize first: frequency x sensitivity), then place the least used ``offload_fraction``
    in host memory, and more if the fast tier would exceed ``fast_budget_bytes``. Without a profile every
    expert counts as equally used and equally sensitive (ties broken by layer, then expert index)."""
    for what, v in (("quantize_fraction", quantize_fraction), ("offload_fraction", offload_fraction)):
        if not 0.0 <= v <= 1.0:
            raise PlanError(f"{what}={v}: must be in [0, 1]")
    if precision not in BITS:
        raise PlanError(f"precision {precision!r}: allowed {', '.join(BITS)}")
    per_layer = experts_per_layer(model)
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
        sizes = plan_nbytes(model, plan)["per_expert"]
        fast = sum(sizes[k[0]][k[1]] for k in keys if plan.layers[k[0]][k[1]].placement == "fast")
        for k in by_use[n_off:]:
            if fast <= fast_budget_bytes:
                break
            plan.layers[k[0]][k[1]] = Slot("host", plan.layers[k[0]][k[1]].precision)
            fast -= sizes[k[0]][k[1]]
        if fast > fast_budget_bytes:
            raise PlanError(f"even with every expert in host memory the fast tier needs {fast:.0f} B "
                            f"> budget {fast_budget_bytes:.0f} B")
    plan.notes = {"quantize_fraction": quantize_fraction, "precision": precision,
                  "offload_fraction": offload_fraction, "fast_budget_bytes": fast_budget_bytes,
                  "profiled_tokens": prof.tokens if prof else 0}
    return plan
