"""The expert store: every routed expert of every MoE layer with its own placement and precision.

Placements: ``fast`` (the accelerator; the CPU on a CPU-only machine) or ``host`` (CPU memory).
Precisions: ``full`` (the model's dtype) or group-wise weight-only ``int8``/``int4``/``int3``/``int2``
(:mod:`moecap.engine.quant`), each matrix run by the kernel :mod:`moecap.engine.kernels` picks for it
(torch's fused int8/int4 weight-only matmuls, oneDNN's packed fp32 matmul on a CPU, dequantize-on-the-fly
for int3/int2). Non-expert layers, routers and shared experts stay on the fast device, untouched.

:class:`EngineMoeBlock` routes from the router's weight itself (softmax, top-k, the family's
renormalisation) and calls its :class:`ExpertStore` as ``experts(hidden, top_k_index, top_k_weights)``,
the fused-experts signature of transformers, so moecap's expert tracer sees the routing exactly as for
the Hugging Face runner. It serves both the engine's own decoder (:mod:`moecap.engine.model`) and, through
:func:`install`, a transformers model whose MoE blocks it replaces (expert consolidation does that).

Execution per layer (:meth:`ExpertStore.forward`): at decode sizes the routing is copied to the host once
and each used expert runs its two kernels; at prefill sizes tokens are grouped by expert with one sort.
Host experts run either on the CPU with the activations shipped to them (``cpu``, Fiddler's choice:
activations are small, weights are not) or by copying the expert to the fast device (``copy``: pinned
host memory, a side stream, and a small cache that :meth:`ExpertStore.prefetch` fills ahead of the
layer), chosen per call by :class:`CostModel` from the token count. On a CPU-only machine both tiers are
the CPU: the same planner and code paths run, and a host expert is computed where it lies.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from moecap.engine.kernels import DenseLinear, Linear, compute_dtype, make_linear
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
    ``copy`` (ship the expert's bytes to the fast device, compute there).

    ``host_Bps``: bytes/s the CPU streams an expert's weights through at each precision (its kernels at a
    few tokens, where they are bound by memory); ``host_flops``: the CPU's rate once compute-bound;
    ``link_Bps``: host-to-device copy bandwidth (pinned memory). :func:`measured_cost_model` measures
    them on the machine (cached beside the hardware peaks); the defaults are assumptions (PCIe 4.0 x16,
    a 200 GFLOP/s CPU) and ``source`` says which."""

    host_flops: float = 2e11
    link_Bps: float = 25e9  # PCIe 4.0 x16, one direction, achievable
    fast_flops: float = 1e14
    mode: str = "auto"  # auto | cpu | copy
    host_Bps: dict[str, float] = field(default_factory=dict)
    source: str = "assumed"
    details: dict[str, Any] = field(default_factory=dict)  # the measurements behind the rates

    def choose(self, n_tokens: int, hidden: int, inter: int, expert_bytes: float, act_bytes: int,
               precision: str = "full") -> str:
        if self.mode != "auto":
            return self.mode
        flops = 2.0 * n_tokens * 3 * hidden * inter
        t_host = flops / self.host_flops
        bw = self.host_Bps.get(precision)
        if bw:
            t_host = max(t_host, expert_bytes / bw)
        t_cpu = t_host + 2.0 * n_tokens * hidden * act_bytes / self.link_Bps
        t_copy = expert_bytes / self.link_Bps + flops / self.fast_flops
        return "cpu" if t_cpu <= t_copy else "copy"

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "host_flops": self.host_flops, "link_Bps": self.link_Bps,
                "fast_flops": self.fast_flops, "host_Bps": dict(self.host_Bps), "source": self.source,
                "details": self.details}


# ------------------------------------------------------------------------------------------ experts
Weight = Union[torch.Tensor, QuantizedTensor, Linear]

# at most this many (token, expert) pairs per layer call are grouped in Python from one host copy of the
# routing (decode); more go through one sort on the device (prefill, large batches)
SMALL_ROUTING = 32


def group_size_for(precision: str, in_features: int, group_size: int) -> int:
    """The quantization group of a matrix with ``in_features`` inputs: int8 is per output channel (one scale
    a row, as torch's int8 weight-only kernel takes it); int4/int3/int2 use ``group_size`` (or the largest
    divisor of ``in_features`` below it)."""
    if precision == "int8":
        return in_features
    return fit_group_size(in_features, group_size)


def quantize_weight(w: torch.Tensor, precision: str, group_size: int) -> QuantizedTensor:
    """moecap's stored form of one expert matrix at ``precision`` (scales on the bfloat16 grid, so that the
    fused kernels use them exactly); dequantizes back into ``w.dtype``."""
    q = quantize(w.detach().float(), BITS[precision], group_size_for(precision, w.shape[1], group_size),
                 scale_grid="bfloat16")
    q.dtype = w.dtype
    return q


def weight_nbytes(shape: tuple[int, int], precision: str, group_size: int, elem_bytes: int) -> int:
    """Bytes of one stored matrix, from its shape alone (what :func:`quantize_weight` gives)."""
    if precision == "full":
        return shape[0] * shape[1] * elem_bytes
    bits = BITS[precision]
    return expected_nbytes(shape, bits, group_size_for(precision, shape[1], group_size), bits == 8)


def _dense(w: Weight) -> torch.Tensor:
    if isinstance(w, DenseLinear):
        return w.dense()
    if isinstance(w, torch.Tensor):
        return w.detach()
    raise PlanError("only a full-precision expert can be re-placed at another precision")


def expert_forward(x: torch.Tensor, gate_up: Weight, down: Weight, act: Any) -> torch.Tensor:
    """``down(act(gate) * up)`` for raw weights (tensors, quantized tensors or kernels) in ``x``'s dtype."""
    def lin(t: torch.Tensor, w: Weight) -> torch.Tensor:
        if isinstance(w, Linear):
            return w(t.to(w.act_dtype)).to(t.dtype)
        return qlinear(t, w) if isinstance(w, QuantizedTensor) else F.linear(t, w)

    gate, up = lin(x, gate_up).chunk(2, dim=-1)
    return lin(act(gate) * up, down)


class StoredExpert:
    """One expert's ``gate_up`` [2I, H] and ``down`` [H, I] matrices in its slot, as kernels
    (:mod:`moecap.engine.kernels`): placed on the fast device or in host memory, at full precision or
    quantized. ``act_dtype``: the dtype its kernels compute in (the model's, or the fused low-bit
    kernels' 16-bit dtype)."""

    def __init__(self, gate_up: Weight, down: Weight, slot: Slot, group_size: int,
                 fast: torch.device, host: torch.device, act_fn: Any = None):
        self.slot = slot
        device = fast if slot.placement == "fast" else host
        movable = slot.placement == "host" and fast.type == "cuda"  # copied to the GPU when worth it
        act = compute_dtype(device)
        lins = []
        for w in (gate_up, down):
            if slot.precision == "full":
                lin = make_linear(_dense(w), device, movable=movable)
            else:
                q = w if isinstance(w, QuantizedTensor) else quantize_weight(_dense(w), slot.precision, group_size)
                lin = make_linear(q, device, act_dtype=act, movable=movable)
            lins.append(lin.pin_memory() if movable else lin)
        self.gate_up, self.down = lins
        self.inter = self.down.in_features
        self.hidden = self.down.out_features
        self.act_fn = act_fn or F.silu
        self.act_dtype = self.gate_up.act_dtype

    def nbytes(self) -> int:
        return self.gate_up.nbytes() + self.down.nbytes()

    def kernels(self) -> list[Linear]:
        return [self.gate_up, self.down]

    def run(self, x: torch.Tensor, gate_up: Linear | None = None, down: Linear | None = None) -> torch.Tensor:
        """The expert on ``x`` (already in ``act_dtype``), with its own kernels or copies of them."""
        gate, up = (gate_up or self.gate_up)(x).chunk(2, dim=-1)
        return (down or self.down)(self.act_fn(gate) * up)


class ExpertStore(nn.Module):
    """The routed experts of one MoE layer, each in its own slot; called like transformers' fused experts,
    ``store(hidden [n, H], top_k_index [n, k], top_k_weights [n, k])``.

    ``experts`` is a pool of stored experts; ``table`` maps the router's expert index to a pool entry
    (identity when None). Expert consolidation gives several models one pool and a table each.

    Grouping: with few (token, choice) pairs (decode) the routing is copied to the host once and grouped
    in Python, so each used expert costs its two kernel calls and a handful of elementwise ops; with many,
    the pairs are sorted by expert on the device and each expert runs on one contiguous slice."""

    def __init__(self, layer: int, experts: list[StoredExpert], act_fn: Any, fast: torch.device,
                 host: torch.device, cost: CostModel, cache_size: int = 2, table: list[int] | None = None,
                 num_experts: int | None = None):
        super().__init__()
        self.layer = layer
        self.experts = experts
        self.table = table
        self.num_experts = num_experts or (len(table) if table is not None else len(experts))
        self.act_fn = act_fn
        for ex in experts:
            ex.act_fn = act_fn
        self.fast, self.host, self.cost = fast, host, cost
        self.split = fast.type == "cuda"  # host memory is another device: host experts run on the CPU or move
        self.cache_size = cache_size
        self._cache: OrderedDict[int, tuple[Linear, Linear]] = OrderedDict()
        self._stream = torch.cuda.Stream(fast) if fast.type == "cuda" else None
        self.calls = {"fast": 0, "cpu": 0, "copy": 0, "copy_cached": 0}
        # (router index, mode) of each host-expert call since the last take_pass_log(), when log_passes is on
        self.log_passes = False
        self.pass_log: list[tuple[int, str]] = []

    @classmethod
    def from_fused(cls, layer: int, gate_up_proj: torch.Tensor, down_proj: torch.Tensor, act_fn: Any,
                   slots: Sequence[Slot], group_size: int, fast: torch.device, host: torch.device,
                   cost: CostModel, cache_size: int = 2) -> "ExpertStore":
        """A store of a layer's fused [E, 2I, H] / [E, H, I] expert tensors, expert e in ``slots[e]``."""
        if len(slots) != gate_up_proj.shape[0]:
            raise PlanError(f"layer {layer}: the plan has {len(slots)} slots for {gate_up_proj.shape[0]} experts")
        experts = [StoredExpert(gate_up_proj[e], down_proj[e], slots[e], group_size, fast, host, act_fn)
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

    def expert_placements(self) -> list[str]:
        """Where the expert each router index reads lives (through the table)."""
        return [self.experts[self._entry(e)].slot.placement for e in range(self.num_experts)]

    def tier_nbytes(self) -> dict[str, int]:
        out = dict.fromkeys(PLACEMENTS, 0)
        for e in self.experts:
            out[e.slot.placement] += e.nbytes()
        return out

    def kernels(self) -> list[Linear]:
        return [k for e in self.experts for k in e.kernels()]

    def take_pass_log(self) -> list[tuple[int, str]]:
        log, self.pass_log = self.pass_log, []
        return log

    # -- copies to the fast device ------------------------------------------------------------------
    def _device_copy(self, e: int) -> tuple[tuple[Linear, Linear], bool]:
        """A fast-device copy of pool entry ``e`` (cached)."""
        hit = self._cache.get(e)
        if hit is not None:
            self._cache.move_to_end(e)
            return hit, True
        ex = self.experts[e]
        if self._stream is not None:
            with torch.cuda.stream(self._stream):
                pair = (ex.gate_up.to(self.fast, True), ex.down.to(self.fast, True))
            torch.cuda.current_stream(self.fast).wait_stream(self._stream)
        else:
            pair = (ex.gate_up.to(self.fast), ex.down.to(self.fast))
        self._remember(e, pair)
        return pair, False

    def _remember(self, e: int, pair: tuple[Linear, Linear]) -> None:
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
                pair = (ex.gate_up.to(self.fast, True), ex.down.to(self.fast, True))
            self._remember(e, pair)

    # -- the layer ------------------------------------------------------------------------------------
    def _run(self, e: int, x: torch.Tensor, xs: dict[Any, torch.Tensor] | None) -> torch.Tensor:
        """Router expert ``e`` on rows ``x`` (model dtype, fast device): its output in its compute dtype, on
        the fast device. ``xs`` caches ``x`` converted per (dtype, device) when ``x`` is the whole batch."""
        k = self._entry(e)
        ex = self.experts[k]

        def cast(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
            if xs is None:
                return x.to(device=device, dtype=dtype)
            key = (dtype, device)
            t = xs.get(key)
            if t is None:
                t = xs[key] = x.to(device=device, dtype=dtype)
            return t

        if ex.slot.placement == "fast":
            self.calls["fast"] += 1
            return ex.run(cast(ex.act_dtype, self.fast))
        if not self.split:  # a CPU-only machine: host memory is where the expert is computed anyway
            self.calls["cpu"] += 1
            if self.log_passes:
                self.pass_log.append((e, "cpu"))
            return ex.run(cast(ex.act_dtype, self.host))
        n = x.shape[0]
        mode = self.cost.choose(n, ex.hidden, ex.inter, ex.nbytes(), x.element_size(), ex.slot.precision)
        if mode == "cpu" and k not in self._cache:
            self.calls["cpu"] += 1
            if self.log_passes:
                self.pass_log.append((e, "cpu"))
            return ex.run(cast(ex.act_dtype, self.host)).to(self.fast, non_blocking=True)
        (gu, dn), cached = self._device_copy(k)
        self.calls["copy_cached" if cached else "copy"] += 1
        if self.log_passes:
            self.pass_log.append((e, "copy_cached" if cached else "copy"))
        return ex.run(cast(gu.act_dtype, self.fast), gu, dn)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        """Each token's output is the weighted sum of its top-k experts' outputs (the weight product in
        the routing dtype, as transformers does, the sum in the model's dtype)."""
        n_tok, k = top_k_index.shape
        dtype = hidden_states.dtype
        if self._stream is not None and self._cache:
            torch.cuda.current_stream(self.fast).wait_stream(self._stream)  # prefetched copies are ready
        if n_tok * k <= SMALL_ROUTING and (n_tok == 1 or not self.split):
            rows = top_k_index.tolist()
            xs: dict[Any, torch.Tensor] = {}
            if n_tok == 1:
                # the routing weights as Python numbers: a product with a scalar rounds once, in the
                # output's dtype, as transformers' (y * w).to(dtype) does
                out = None
                for e, w in zip(rows[0], top_k_weights[0].tolist()):
                    y = self._run(e, hidden_states, xs)
                    if y.dtype != dtype:
                        y = y.to(dtype)
                    out = y.mul_(w) if out is None else out.add_(y, alpha=w)
                return out
            groups: dict[int, tuple[list[int], list[int]]] = {}
            for t, row in enumerate(rows):
                for j, e in enumerate(row):
                    g = groups.setdefault(e, ([], []))
                    g[0].append(t)
                    g[1].append(j)
            out = torch.zeros_like(hidden_states)
            for e, (toks, js) in groups.items():
                ti = torch.tensor(toks, device=hidden_states.device)
                w = top_k_weights[ti, torch.tensor(js, device=hidden_states.device)].unsqueeze(-1)
                out.index_add_(0, ti, (self._run(e, hidden_states[ti], None) * w).to(dtype))
            return out
        flat = top_k_index.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        x_sorted = hidden_states[order // k]
        w_sorted = top_k_weights.reshape(-1)[order]
        y_sorted = torch.empty_like(x_sorted)
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            sl = slice(start, start + n)
            start += n
            y_sorted[sl] = (self._run(e, x_sorted[sl], None) * w_sorted[sl, None]).to(dtype)
        y_pairs = torch.empty_like(y_sorted)
        y_pairs[order] = y_sorted
        return y_pairs.view(n_tok, k, -1).sum(dim=1)


# ----------------------------------------------------------------------------------------- the block
class Router(nn.Module):
    """A router's weight [E, H] as a module, so tracers find it (``block.gate``); the block routes from it."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight.detach(), requires_grad=False)


class EngineMoeBlock(nn.Module):
    """An MoE block of the engine: routes from the router's weight (softmax, top-k, the family's
    renormalisation; never the router module's return format, which moves between transformers
    releases), runs the store, adds the shared expert (Qwen2-MoE) when the block has one.

    ``block``: a transformers MoE block whose ``gate``/``shared_expert``/``shared_expert_gate`` are taken
    over, or None with those parts given directly (the engine's own model). ``shared_expert``: a callable
    ``x -> y``; ``shared_expert_gate``: a callable ``x -> logit`` (sigmoid-gated, as Qwen2-MoE does)."""

    def __init__(self, block: nn.Module | None, store: ExpertStore, family: str, top_k: int, norm_topk_prob: bool,
                 next_store: "ExpertStore | None" = None, prefetch: Sequence[int] = (), *,
                 gate: nn.Module | None = None, shared_expert: Any = None, shared_expert_gate: Any = None):
        super().__init__()
        self.gate = gate if block is None else block.gate  # kept (not called) so tracers find the router
        self.experts = store
        self.shared_expert = shared_expert if block is None else getattr(block, "shared_expert", None)
        self.shared_expert_gate = shared_expert_gate if block is None else getattr(block, "shared_expert_gate", None)
        self.family = family
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob
        self.next_store = next_store
        self.prefetch_experts = list(prefetch)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(x, self.gate.weight)
        if self.norm_topk_prob:
            # the top-k of the softmax, renormalised, is the softmax of the top-k logits (two kernels, not four)
            top, idx = torch.topk(logits, self.top_k, dim=-1)
            top = torch.softmax(top, dim=-1, dtype=torch.float32)
        else:
            top, idx = torch.topk(torch.softmax(logits, dim=-1, dtype=torch.float32), self.top_k, dim=-1)
        if self.family != "mixtral":  # Qwen/OLMoE hand the weights on in the model's dtype; Mixtral in fp32
            top = top.to(logits.dtype)
        return idx, top

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        idx, weights = self.route(x)
        if self.next_store is not None and self.prefetch_experts:
            self.next_store.prefetch(self.prefetch_experts)
        y = self.experts(x, idx, weights)
        if self.shared_expert is not None:
            shared = self.shared_expert(x)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            y = y + shared
        return y.reshape(shape)


# ------------------------------------------------------------------------------------------ install
def moe_blocks(model: nn.Module) -> list[tuple[int, nn.Module, nn.Module]]:
    """(layer index, decoder layer, MoE block) for every layer whose ``mlp`` has fused ``experts``
    (a transformers model) or an :class:`ExpertStore` (the engine's own model)."""
    out = []
    layers = getattr(getattr(model, "model", model), "layers", None)
    if layers is None:
        raise PlanError(f"{type(model).__name__}: no model.layers")
    for i, layer in enumerate(layers):
        block = getattr(layer, "mlp", None)
        experts = getattr(block, "experts", None)
        if experts is not None and (hasattr(experts, "gate_up_proj") or isinstance(experts, ExpertStore)) \
                and hasattr(block, "gate"):
            out.append((i, layer, block))
    return out


def model_family(model: nn.Module) -> str:
    family = getattr(model.config, "model_type", None)
    if family not in FAMILIES:
        raise PlanError(f"model_type {family!r}: the engine's expert store supports {', '.join(FAMILIES)}")
    return family


def experts_per_layer(model: nn.Module) -> dict[int, int]:
    out = {}
    for i, _, block in moe_blocks(model):
        ex = block.experts
        out[i] = ex.num_experts if isinstance(ex, ExpertStore) else int(ex.gate_up_proj.shape[0])
    return out


@dataclass(frozen=True)
class ExpertLayout:
    """The routed experts of a model, from shapes alone: per MoE layer the number of experts, the
    gate_up [2I, H] and down [H, I] shapes and the element size of their full-precision dtype."""

    experts: dict[int, int]
    shapes: dict[int, tuple[tuple[int, int], tuple[int, int], int]]

    @classmethod
    def of(cls, model: "nn.Module | ExpertLayout") -> "ExpertLayout":
        """The layout of a transformers model (fused experts) or of the engine's model."""
        if isinstance(model, ExpertLayout):
            return model
        experts, shapes = {}, {}
        for i, _, block in moe_blocks(model):
            ex = block.experts
            if isinstance(ex, ExpertStore):
                e0 = ex.experts[0]
                experts[i] = ex.num_experts
                shapes[i] = ((e0.gate_up.out_features, e0.gate_up.in_features),
                             (e0.down.out_features, e0.down.in_features), torch.empty((), dtype=model.dtype).element_size())
            else:
                experts[i] = int(ex.gate_up_proj.shape[0])
                shapes[i] = (tuple(ex.gate_up_proj.shape[1:]), tuple(ex.down_proj.shape[1:]), ex.gate_up_proj.element_size())
        return cls(experts, shapes)

    def expert_nbytes(self, layer: int, precision: str, group_size: int) -> int:
        gu, dn, elem = self.shapes[layer]
        return weight_nbytes(gu, precision, group_size, elem) + weight_nbytes(dn, precision, group_size, elem)


def plan_nbytes(model: "nn.Module | ExpertLayout", plan: ExpertPlan) -> dict[str, Any]:
    """Bytes per tier (and per layer/expert) a plan would take, from shapes alone (no quantization run)."""
    layout = ExpertLayout.of(model)
    per: dict[int, list[int]] = {}
    tiers = dict.fromkeys(PLACEMENTS, 0)
    for i in layout.shapes:
        row = []
        for s in plan.layers[i]:
            n = layout.expert_nbytes(i, s.precision, plan.group_size)
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
