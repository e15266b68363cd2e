"""The expert store: every routed expert of every MoE layer with its own placement and precision.

Placements: ``fast`` (the accelerator; the CPU on a CPU-only machine) or ``host`` (CPU memory).
Precisions: ``full`` (the model's dtype) or group-wise weight-only ``int8``/``int4``/``int3``/``int2``
(:mod:`moecap.engine.quant`, dequantized on the fly). Non-expert layers, routers and shared experts stay
on the fast device, untouched.

:class:`EngineMoeBlock` replaces a transformers MoE block (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE): it
routes from the router's weight itself (softmax, top-k, the family's renormalisation; never the router
module's return format, which moves between transformers releases) and calls its :class:`ExpertStore`
as ``experts(hidden, top_k_index, top_k_weights)``, the fused-experts signature, so moecap's expert
tracer sees the routing exactly as for the Hugging Face runner.

Execution per layer (:meth:`ExpertStore.forward`): tokens are grouped by expert with one sort; resident
experts run on the fast device first (on a GPU the kernels are queued asynchronously), host experts
then run either on the CPU with the activations shipped to them (``cpu``, Fiddler's choice: activations
are small, weights are not) or by copying the expert to the fast device (``copy``: pinned host memory, a
side stream, and a small cache that :meth:`ExpertStore.prefetch` fills ahead of the layer), chosen per
call by :class:`CostModel` from the token count. CPU work overlaps the queued GPU work. On a CPU-only
machine both tiers are the CPU: the same planner and code paths run, and a host expert is computed where
it lies.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from moecap.engine.quant import QuantizedTensor, expected_nbytes, fit_group_size, qlinear, quantize

PLACEMENTS = ("fast", "host")
PRECISIONS = ("full", "int8", "int4", "int3", "int2")
BITS = {"int8": 8, "int4": 4, "int3": 3, "int2": 2}
FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")


class PlanError(ValueError):
    pass


# ------------------------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class Slot:
    """Where one expert lives and how it is stored."""

    placement: str = "fast"
    precision: str = "full"

    def __post_init__(self) -> None:
        if self.placement not in PLACEMENTS:
            raise PlanError(f"placement {self.placement!r}: allowed {', '.join(PLACEMENTS)}")
        if self.precision not in PRECISIONS:
            raise PlanError(f"precision {self.precision!r}: allowed {', '.join(PRECISIONS)}")


@dataclass
class ExpertPlan:
    """Per MoE layer (model layer index), the slot of each expert; plus the quantization group size."""

    layers: dict[int, list[Slot]]
    group_size: int = 64
    name: str = "custom"
    notes: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def uniform(cls, experts_per_layer: dict[int, int], placement: str = "fast", precision: str = "full",
                group_size: int = 64, name: str | None = None) -> "ExpertPlan":
        slot = Slot(placement, precision)
        return cls({layer: [slot] * n for layer, n in experts_per_layer.items()}, group_size,
                   name or f"all-{placement}-{precision}")

    def slot(self, layer: int, expert: int) -> Slot:
        return self.layers[layer][expert]

    def count(self, placement: str | None = None, precision: str | None = None) -> int:
        return sum(1 for slots in self.layers.values() for s in slots
                   if (placement is None or s.placement == placement) and (precision is None or s.precision == precision))

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "experts": self.count(), "group_size": self.group_size}
        for p in PLACEMENTS:
            out[f"{p}_experts"] = self.count(placement=p)
        for q in PRECISIONS:
            n = self.count(precision=q)
            if n:
                out[f"{q}_experts"] = n
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "group_size": self.group_size, "notes": self.notes,
                "layers": {str(k): [[s.placement, s.precision] for s in v] for k, v in sorted(self.layers.items())}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ExpertPlan":
        try:
            layers = {int(k): [Slot(*s) for s in v] for k, v in d["layers"].items()}
        except (KeyError, TypeError, ValueError) as err:
            raise PlanError(f"bad expert plan: {err}") from None
        return cls(layers, int(d.get("group_size", 64)), d.get("name", "custom"), dict(d.get("notes") or {}))

    def save(self, path: str | Path) -> None:
        from moecap.paths import atomic_write_text

        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ExpertPlan":
        return cls.from_dict(json.loads(Path(path).read_text()))


# --------------------------------------------------------------------------------------- cost model
@dataclass
class CostModel:
    """Per call, where a host expert runs: ``cpu`` (ship n tokens' activations, compute on the CPU) or
    ``copy`` (ship the expert's bytes to the fast device, compute there). Rates in bytes/s and FLOP/s."""

    host_flops: float = 2e11
    link_Bps: float = 25e9  # PCIe 4.0 x16, one direction, achievable
    fast_flops: float = 1e14
    mode: str = "auto"  # auto | cpu | copy

    def choose(self, n_tokens: int, hidden: int, inter: int, expert_bytes: float, act_bytes: int) -> str:
        if self.mode != "auto":
            return self.mode
        flops = 2.0 * n_tokens * 3 * hidden * inter
        t_cpu = flops / self.host_flops + 2.0 * n_tokens * hidden * act_bytes / self.link_Bps
        t_copy = expert_bytes / self.link_Bps + flops / self.fast_flops
        return "cpu" if t_cpu <= t_copy else "copy"


# ------------------------------------------------------------------------------------------ experts
Weight = torch.Tensor | QuantizedTensor


def _nbytes(w: Weight) -> int:
    return w.nbytes() if isinstance(w, QuantizedTensor) else w.numel() * w.element_size()


def _linear(x: torch.Tensor, w: Weight) -> torch.Tensor:
    return qlinear(x, w) if isinstance(w, QuantizedTensor) else F.linear(x, w)


def _to(w: Weight, device: torch.device, non_blocking: bool = False) -> Weight:
    return w.to(device, non_blocking=non_blocking)


def _pin(w: Weight) -> Weight:
    if not torch.cuda.is_available():
        return w
    return w.pin_memory()


class StoredExpert:
    """One expert's ``gate_up`` [2I, H] and ``down`` [H, I] weights, in its slot."""

    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor, slot: Slot, group_size: int,
                 fast: torch.device, host: torch.device):
        self.slot = slot
        device = fast if slot.placement == "fast" else host
        if slot.precision == "full":
            # own copies: a slice would keep the whole fused [E, 2I, H] tensor alive
            gu, dn = gate_up.detach().to(device).clone(), down.detach().to(device).clone()
        else:
            bits = BITS[slot.precision]
            gu = quantize(gate_up.detach().float(), bits, fit_group_size(gate_up.shape[1], group_size)).to(device)
            dn = quantize(down.detach().float(), bits, fit_group_size(down.shape[1], group_size)).to(device)
            gu.dtype = dn.dtype = gate_up.dtype  # dequantize back into the model's dtype
        if slot.placement == "host" and device.type == "cpu" and fast.type == "cuda":
            gu, dn = _pin(gu), _pin(dn)
        self.gate_up: Weight = gu
        self.down: Weight = dn
        self.inter = down.shape[1]
        self.hidden = down.shape[0]

    def nbytes(self) -> int:
        return _nbytes(self.gate_up) + _nbytes(self.down)

    @staticmethod
    def apply(x: torch.Tensor, gate_up: Weight, down: Weight, act: Any) -> torch.Tensor:
        gate, up = _linear(x, gate_up).chunk(2, dim=-1)
        return _linear(act(gate) * up, down)


class ExpertStore(nn.Module):
    """The routed experts of one MoE layer, each in its own slot; called like transformers' fused experts.

    ``experts`` is a pool of stored experts; ``table`` maps the router's expert index to a pool entry
    (identity when None). Expert consolidation gives several models one pool and a table each."""

    def __init__(self, layer: int, experts: list[StoredExpert], act_fn: Any, fast: torch.device,
                 host: torch.device, cost: CostModel, cache_size: int = 2, table: list[int] | None = None,
                 num_experts: int | None = None):
        super().__init__()
        self.layer = layer
        self.experts = experts
        self.table = table
        self.num_experts = num_experts or (len(table) if table is not None else len(experts))
        self.act_fn = act_fn
        self.fast, self.host, self.cost = fast, host, cost
        self.cache_size = cache_size
        self._cache: OrderedDict[int, tuple[Weight, Weight]] = OrderedDict()
        self._stream = torch.cuda.Stream(fast) if fast.type == "cuda" else None
        self.calls = {"fast": 0, "cpu": 0, "copy": 0, "copy_cached": 0}

    @classmethod
    def from_fused(cls, layer: int, gate_up_proj: torch.Tensor, down_proj: torch.Tensor, act_fn: Any,
                   slots: Sequence[Slot], group_size: int, fast: torch.device, host: torch.device,
                   cost: CostModel, cache_size: int = 2) -> "ExpertStore":
        """A store of a layer's fused [E, 2I, H] / [E, H, I] expert tensors, expert e in ``slots[e]``."""
        if len(slots) != gate_up_proj.shape[0]:
            raise PlanError(f"layer {layer}: the plan has {len(slots)} slots for {gate_up_proj.shape[0]} experts")
        experts = [StoredExpert(gate_up_proj[e], down_proj[e], slots[e], group_size, fast, host)
                   for e in range(gate_up_proj.shape[0])]
        return cls(layer, experts, act_fn, fast, host, cost, cache_size)

    def set_table(self, table: list[int] | None) -> None:
        """Route expert index e to pool entry ``table[e]`` (a model's view of a shared pool)."""
        if table is not None and (len(table) != self.num_experts or max(table) >= len(self.experts)):
            raise PlanError(f"layer {self.layer}: a table of {len(table)} entries into a pool of {len(self.experts)}")
        if table != self.table:
            self._cache.clear()  # cached copies are keyed by pool entry only through the table
        self.table = table

    def _entry(self, e: int) -> int:
        return self.table[e] if self.table is not None else e

    # -- bookkeeping ------------------------------------------------------------------------------
    def expert_nbytes(self) -> list[int]:
        """Bytes of the expert each router index reads (through the table)."""
        return [self.experts[self._entry(e)].nbytes() for e in range(self.num_experts)]

    def tier_nbytes(self) -> dict[str, int]:
        out = dict.fromkeys(PLACEMENTS, 0)
        for e in self.experts:
            out[e.slot.placement] += e.nbytes()
        return out

    # -- copies to the fast device ------------------------------------------------------------------
    def _device_copy(self, e: int) -> tuple[tuple[Weight, Weight], bool]:
        """A fast-device copy of pool entry ``e`` (cached)."""
        hit = self._cache.get(e)
        if hit is not None:
            self._cache.move_to_end(e)
            return hit, True
        ex = self.experts[e]
        if self._stream is not None:
            with torch.cuda.stream(self._stream):
                pair = (_to(ex.gate_up, self.fast, True), _to(ex.down, self.fast, True))
            torch.cuda.current_stream(self.fast).wait_stream(self._stream)
        else:
            pair = (_to(ex.gate_up, self.fast), _to(ex.down, self.fast))
        self._remember(e, pair)
        return pair, False

    def _remember(self, e: int, pair: tuple[Weight, Weight]) -> None:
        if self.cache_size <= 0:
            return
        self._cache[e] = pair
        self._cache.move_to_end(e)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def prefetch(self, experts: Iterable[int]) -> None:
        """Start copying host experts to the fast device on the side stream (GPU only; else nothing)."""
        if self._stream is None:
            return
        for e in (self._entry(i) for i in experts):
            if e in self._cache or self.experts[e].slot.placement != "host":
                continue
            ex = self.experts[e]
            with torch.cuda.stream(self._stream):
                pair = (_to(ex.gate_up, self.fast, True), _to(ex.down, self.fast, True))
            self._remember(e, pair)

    # -- the layer ------------------------------------------------------------------------------------
    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        """Each token's output is the weighted sum of its top-k experts' outputs. The (token, choice)
        pairs are sorted by expert once; each expert computes on one contiguous slice; the slices are put
        back in (token, choice) order with one scatter and summed over the k choices."""
        n_tok, k = top_k_index.shape
        flat = top_k_index.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        x_sorted = hidden_states[order // k]
        w_sorted = top_k_weights.reshape(-1)[order]
        y_sorted = torch.empty_like(x_sorted)
        if self._stream is not None and self._cache:
            torch.cuda.current_stream(self.fast).wait_stream(self._stream)  # prefetched copies are ready
        host_jobs = []
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            sl = slice(start, start + n)
            start += n
            e = self._entry(e)
            ex = self.experts[e]
            if ex.slot.placement == "fast":
                self.calls["fast"] += 1
                y = StoredExpert.apply(x_sorted[sl], ex.gate_up, ex.down, self.act_fn)
            else:
                mode = self.cost.choose(n, ex.hidden, ex.inter, ex.nbytes(), hidden_states.element_size())
                if mode == "cpu" and e not in self._cache:
                    host_jobs.append((e, sl))
                    continue
                (gu, dn), cached = self._device_copy(e)
                self.calls["copy_cached" if cached else "copy"] += 1
                y = StoredExpert.apply(x_sorted[sl], gu, dn, self.act_fn)
            # as transformers does: the weight product in the routing dtype, stored in the model's
            y_sorted[sl] = (y * w_sorted[sl, None]).to(y_sorted.dtype)
        # host experts on the CPU, while the fast device works through what was queued above
        for e, sl in host_jobs:
            ex = self.experts[e]
            y = StoredExpert.apply(x_sorted[sl].to(self.host), ex.gate_up, ex.down, self.act_fn)
            self.calls["cpu"] += 1
            y = y.to(self.fast, non_blocking=True)
            y_sorted[sl] = (y * w_sorted[sl, None].to(self.fast)).to(y_sorted.dtype)
        y_pairs = torch.empty_like(y_sorted)
        y_pairs[order] = y_sorted
        return y_pairs.view(n_tok, k, -1).sum(dim=1)


# ----------------------------------------------------------------------------------------- the block
class EngineMoeBlock(nn.Module):
    """Replaces a transformers MoE block: routes from the router's weight, runs the store, adds the
    shared expert (Qwen2-MoE) when the block has one."""

    def __init__(self, block: nn.Module, store: ExpertStore, family: str, top_k: int, norm_topk_prob: bool,
                 next_store: "ExpertStore | None" = None, prefetch: Sequence[int] = ()):
        super().__init__()
        self.gate = block.gate  # kept (not called) so tracers find the router; its weight routes
        self.experts = store
        self.shared_expert = getattr(block, "shared_expert", None)
        self.shared_expert_gate = getattr(block, "shared_expert_gate", None)
        self.family = family
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob
        self.next_store = next_store
        self.prefetch_experts = list(prefetch)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(x, self.gate.weight)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        top, idx = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            top = top / top.sum(dim=-1, keepdim=True)
        if self.family != "mixtral":  # Qwen/OLMoE hand the weights on in the model's dtype; Mixtral in fp32
            top = top.to(logits.dtype)
        return idx, top

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        b, s, h = hidden_states.shape
        x = hidden_states.reshape(-1, h)
        idx, weights = self.route(x)
        if self.next_store is not None and self.prefetch_experts:
            self.next_store.prefetch(self.prefetch_experts)
        y = self.experts(x, idx, weights)
        if self.shared_expert is not None:
            shared = self.shared_expert(x)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            y = y + shared
        return y.reshape(b, s, h)


# ------------------------------------------------------------------------------------------ install
def moe_blocks(model: nn.Module) -> list[tuple[int, nn.Module, nn.Module]]:
    """(layer index, decoder layer, MoE block) for every layer whose ``mlp`` has fused ``experts``."""
    out = []
    layers = getattr(getattr(model, "model", model), "layers", None)
    if layers is None:
        raise PlanError(f"{type(model).__name__}: no model.layers")
    for i, layer in enumerate(layers):
        block = getattr(layer, "mlp", None)
        experts = getattr(block, "experts", None)
        if experts is not None and hasattr(experts, "gate_up_proj") and hasattr(block, "gate"):
            out.append((i, layer, block))
    return out


def model_family(model: nn.Module) -> str:
    family = getattr(model.config, "model_type", None)
    if family not in FAMILIES:
        raise PlanError(f"model_type {family!r}: the engine's expert store supports {', '.join(FAMILIES)}")
    return family


def experts_per_layer(model: nn.Module) -> dict[int, int]:
    return {i: int(block.experts.gate_up_proj.shape[0]) for i, _, block in moe_blocks(model)}


def plan_nbytes(model: nn.Module, plan: ExpertPlan) -> dict[str, Any]:
    """Bytes per tier (and per layer/expert) a plan would take, from shapes alone (no quantization run)."""
    per: dict[int, list[int]] = {}
    tiers = dict.fromkeys(PLACEMENTS, 0)
    for i, _, block in moe_blocks(model):
        gu, dn = block.experts.gate_up_proj, block.experts.down_proj
        elem = gu.element_size()
        row = []
        for e, s in enumerate(plan.layers[i]):
            if s.precision == "full":
                n = (gu[e].numel() + dn[e].numel()) * elem
            else:
                bits = BITS[s.precision]
                n = sum(expected_nbytes(tuple(w.shape[1:]), bits, fit_group_size(w.shape[2], plan.group_size), bits == 8)
                        for w in (gu, dn))
            row.append(n)
            tiers[s.placement] += n
        per[i] = row
    return {"per_expert": per, "tiers": tiers}


def install(model: nn.Module, plan: ExpertPlan, fast: str | torch.device, cost: CostModel | None = None,
            prefetch: dict[int, Sequence[int]] | None = None, cache_size: int = 2) -> list[ExpertStore]:
    """Replace every MoE block of ``model`` (on ``fast``) by an :class:`EngineMoeBlock` storing its
    experts as ``plan`` says; the fused expert tensors are released. Returns the stores in layer order.
    ``prefetch``: per layer, host experts of that layer to start copying while the layer before routes."""
    family = model_family(model)
    fast = torch.device(fast)
    host = torch.device("cpu")
    cost = cost or CostModel()
    cfg = model.config
    norm = bool(getattr(cfg, "norm_topk_prob", family == "mixtral")) if family != "mixtral" else True
    blocks = moe_blocks(model)
    missing = [i for i, _, _ in blocks if i not in plan.layers]
    if missing:
        raise PlanError(f"the plan has no slots for MoE layers {missing}")
    stores: list[ExpertStore] = []
    for i, _, block in blocks:
        ex = block.experts
        stores.append(ExpertStore.from_fused(i, ex.gate_up_proj.data, ex.down_proj.data, ex.act_fn, plan.layers[i],
                                             plan.group_size, fast, host, cost, cache_size))
    for n, (i, layer, block) in enumerate(blocks):
        nxt = stores[n + 1] if n + 1 < len(stores) else None
        want = list((prefetch or {}).get(blocks[n + 1][0], ())) if nxt is not None else []
        layer.mlp = EngineMoeBlock(block, stores[n], family, int(cfg.num_experts_per_tok), norm, nxt, want)
        del block.experts  # the fused tensors: now in the store
    return stores
