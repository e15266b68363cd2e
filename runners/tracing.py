"""Expert tracing for transformers MoE models: which experts each pass really used, per layer.

transformers 5 MoE blocks call ``self.experts(hidden_states, top_k_index, top_k_weights)`` with fused
expert tensors (``gate_up_proj`` [E, 2I, H]); the router's own return format changes between releases,
so the tracer reads the routing decision where it is consumed: a forward pre-hook on each ``experts``
module takes the integer index tensor it is called with. Layouts that call their experts without
indices are traced from the router's output (its index tensor, else top-k of its logits).

Cost: the experts' calls go through a thin wrapper of their ``forward`` (an instance attribute: the
module keeps PyTorch's hook-free fast path; a registered pre-hook costs the whole hook dispatch on every
call), which only keeps a reference. The router hooks, a fallback, are removed after the first traced
pass that did not need them. Counting is deferred: after a batch, one bincount over all its passes and
layers and one device-to-host copy turn the references into per-layer expert counts.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def _int_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    if len(args) > 1:  # transformers' experts(hidden_states, top_k_index, top_k_weights): look there first
        v = args[1]
        if isinstance(v, torch.Tensor) and not v.is_floating_point() and v.dim() >= 1:
            return v
    for v in (*args, *kwargs.values()):
        if isinstance(v, torch.Tensor) and not v.is_floating_point() and v.dim() >= 1:
            return v
    return None


def find_moe_blocks(model: nn.Module) -> list[tuple[int, nn.Module]]:
    """(layer index, MoE block) for every block that has ``experts`` and a ``gate``/``router``."""
    found = []
    for name, mod in model.named_modules():
        experts = getattr(mod, "experts", None)
        router = getattr(mod, "gate", None) or getattr(mod, "router", None)
        if isinstance(experts, nn.Module) and isinstance(router, nn.Module):
            m = _LAYER_RE.search(name + ".")
            if m:
                found.append((int(m.group(1)), mod))
    found.sort(key=lambda x: x[0])
    return found


def _num_experts(block: nn.Module) -> int:
    for obj in (block.experts, block):
        for attr in ("num_experts", "num_local_experts", "n_routed_experts"):
            v = getattr(obj, attr, None)
            if isinstance(v, int) and v > 0:
                return v
    router = getattr(block, "gate", None) or getattr(block, "router", None)
    w = getattr(router, "weight", None)
    if isinstance(w, torch.Tensor):
        return int(w.shape[0])
    raise ValueError(f"cannot tell the number of experts of {type(block).__name__}")


def _top_k(block: nn.Module, model: nn.Module) -> int:
    for obj in (block, getattr(block, "gate", None), getattr(block, "router", None)):
        v = getattr(obj, "top_k", None)
        if isinstance(v, int) and v > 0:
            return v
    cfg = getattr(model, "config", None)
    for attr in ("num_experts_per_tok", "moe_top_k", "top_k"):
        v = getattr(cfg, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    raise ValueError(f"cannot tell the top-k of {type(block).__name__}")


class ExpertTracer:
    """Install with ``attach()``; call ``begin_pass()`` before and ``end_pass()`` after each forward.

    Per MoE block, each only keeping a reference while a pass is traced: a wrapper of ``experts.forward``
    (the integer expert-index tensor it is called with) and a forward hook on the router (its output).
    The experts' input is preferred; the router's output (an index tensor in its return tuple, else
    top-k of its logits) is the fallback for layouts that call experts without indices, and its hooks
    are removed once a traced pass found every layer's indices at the experts.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.blocks = find_moe_blocks(model)
        self.layers = [i for i, _ in self.blocks]
        self.num_experts = [_num_experts(b) for _, b in self.blocks]
        self.top_k = [_top_k(b, model) for _, b in self.blocks]
        self._handles: list[Any] = []  # the router hooks
        self._wrapped: list[tuple[nn.Module, Any]] = []  # (experts module, its instance forward before us)
        self._router_needed = True  # False once a traced pass found every layer's indices at the experts
        self._idx: list[torch.Tensor | None] = [None] * len(self.blocks)
        self._seen = 0  # layers whose experts gave their indices in the traced pass
        self._router_out: list[Any] = [None] * len(self.blocks)
        self._pending: list[list[torch.Tensor] | None] = []
        self._active = False
        self.methods: set[str] = set()

    @property
    def method(self) -> str:
        return " + ".join(sorted(self.methods)) or "experts-input"

    def attach(self) -> "ExpertTracer":
        for slot, (_, block) in enumerate(self.blocks):
            experts = block.experts
            self._wrapped.append((experts, experts.__dict__.get("forward")))
            experts.forward = self._experts_forward(slot, experts.forward)
            if self._router_needed:
                router = getattr(block, "gate", None) or getattr(block, "router", None)
                self._handles.append(router.register_forward_hook(self._router_hook(slot)))
        return self

    def _experts_forward(self, slot: int, forward: Any):
        def traced_forward(*args, **kwargs):
            if self._active:
                idx = _int_tensor(args, kwargs)
                if idx is not None:
                    if self._idx[slot] is None:  # _seen: how many layers have their indices
                        self._seen += 1
                    self._idx[slot] = idx
            return forward(*args, **kwargs)

        return traced_forward

    def _router_hook(self, slot: int):
        def hook(_mod, _args, output):
            if self._active:
                self._router_out[slot] = output
            return None

        return hook

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for experts, before in self._wrapped:
            if before is None:
                experts.__dict__.pop("forward", None)
            else:
                experts.forward = before
        self._wrapped.clear()

    def begin_pass(self) -> None:
        if self._router_needed:
            self._router_out = [None] * len(self.blocks)
        self._seen = 0
        self._active = True

    def _indices(self, slot: int) -> torch.Tensor | None:
        idx = self._idx[slot]
        if idx is not None:
            self.methods.add("experts-input")
            return idx
        out = self._router_out[slot]
        items = list(out) if isinstance(out, (tuple, list)) else [out]
        ints = [t for t in items if isinstance(t, torch.Tensor) and not t.is_floating_point()]
        if ints:
            self.methods.add("router-output indices")
            return ints[-1]
        floats = [t for t in items if isinstance(t, torch.Tensor) and t.is_floating_point()]
        if floats:  # router returns logits only: route as the block does, top-k
            self.methods.add("router-logits top-k")
            logits = floats[0]
            return torch.topk(logits.reshape(-1, logits.shape[-1]), self.top_k[slot], dim=-1).indices
        return None

    def end_pass(self, defer: bool = False) -> list[list[int]] | None:
        """Per MoE layer, tokens routed to each expert in the pass; None if a layer was not seen.

        ``defer=True`` keeps the pass's index tensors and returns None: ``flush()`` later counts all
        deferred passes at once, off the timed path (one batched bincount, one device-to-host copy).
        """
        self._active = False
        n = len(self.blocks)
        if n and self._seen == n and not self._router_needed:
            # the common case, kept short (it runs on the timed path): every layer's experts gave its
            # indices, and the router fallback is gone
            idx, self._idx = self._idx, [None] * n  # a new list: the deferred pass keeps the old one
            if defer:
                self._pending.append(idx)
                return None
            return self._count([idx])[0]
        # `is not None`, never `None in`: that compares every tensor with None through torch (~10 us each)
        at_experts = bool(self.blocks) and all(i is not None for i in self._idx)
        if at_experts:  # the common case: every layer's indices were taken at its experts
            idx = self._idx
            self.methods.add("experts-input")
        else:
            idx = [self._indices(s) for s in range(len(self.blocks))] if self.blocks else []
        if at_experts and self._router_needed:  # the experts give the indices: the fallback costs for nothing
            self._router_needed = False
            for h in self._handles:
                h.remove()
            self._handles.clear()
        self._idx = [None] * len(self.blocks)  # a new list: the deferred pass keeps the old one
        if self._router_needed:
            self._router_out = [None] * len(self.blocks)
        complete = bool(idx) and all(i is not None for i in idx)
        if defer:
            self._pending.append(idx if complete else None)
            return None
        return self._count([idx])[0] if complete else None

    def flush(self) -> list[list[list[int]] | None]:
        """Expert counts of every deferred pass, in order (None where a pass was not fully traced)."""
        pending, self._pending = self._pending, []
        if pending and all(idx is not None for idx in pending):
            try:  # the common case, decode passes of one batch: every index tensor has one shape
                return self._count(pending, torch.stack([t for idx in pending for t in idx]))
            except RuntimeError:  # shapes differ (a pass of other token counts): group them by shape
                pass
        out: list[list[list[int]] | None] = [None] * len(pending)
        groups: dict[tuple, list[int]] = {}
        for i, idx in enumerate(pending):
            if idx is not None:
                groups.setdefault(tuple(tuple(t.shape) for t in idx), []).append(i)
        for members in groups.values():
            for i, counts in zip(members, self._count([pending[i] for i in members])):
                out[i] = counts
        return out

    def _count(self, passes: list[list[torch.Tensor]], stacked: torch.Tensor | None = None) -> list[list[list[int]]]:
        """Bincount of the expert ids of several passes: [pass][layer][expert]. ``stacked``: their index
        tensors already stacked (one shape)."""
        n_pass, n_layer = len(passes), len(self.blocks)
        e_max = max(self.num_experts)
        width = e_max + 1  # one spare bucket per row for out-of-range ids (padding sentinels)
        if stacked is not None:
            ids = stacked.reshape(n_pass * n_layer, -1)
        elif len({tuple(t.shape) for idx in passes for t in idx}) == 1:
            ids = torch.stack([t for idx in passes for t in idx]).reshape(n_pass * n_layer, -1)  # one stack
        else:  # layers saw different token counts: flatten each row separately
            ids = torch.nn.utils.rnn.pad_sequence(
                [t.reshape(-1) for idx in passes for t in idx], batch_first=True, padding_value=-1
            )
        # out-of-range ids (-1 padding, a sentinel past the last expert) land in the spare bucket, e_max:
        # clamp to [-1, e_max], then -1 % width == e_max
        ids = ids.to(torch.int64).clamp(-1, e_max).remainder(width)
        ids = ids + torch.arange(0, n_pass * n_layer * width, width, device=ids.device)[:, None]
        counts = torch.bincount(ids.reshape(-1), minlength=n_pass * n_layer * width).view(n_pass, n_layer, width)
        if min(self.num_experts) == e_max:  # every layer has as many experts: cut the spare bucket at once
            return counts[:, :, :e_max].cpu().tolist()
        rows = counts.cpu().tolist()
        return [[row[: self.num_experts[s]] for s, row in enumerate(layers)] for layers in rows]
