"""Sparse utilization: S-MBU and S-MFU per phase (DESIGN.md section 2), pure functions over traces.

bytes(p) = sum over layers of [S_attn + S_router + S_shared + |U(p,l)| * S_expert] + dense FFN layers
           + LM head + KV read (sum over requests of context length x KV bytes/token) + KV written
FLOPs(p) = sum over tokens of 2 * (N_attn + N_router + k * N_expert + N_shared | N_dense_ffn) per layer
           + 2 * N_lm_head per position whose logits the pass computed
           + attention scores: 2 * heads * (d_qk + d_v) * context per token per layer
             (= 4 * heads * head_dim * context for ordinary attention; causal inside a prefill;
             context clamped to the layer's sliding window)
S-MBU(phase) = sum_p bytes(p) / sum_p time(p) / peak bandwidth;  S-MFU likewise with FLOPs.
U(p, l) is the set of experts that at least one token of pass p was routed to in layer l, as traced.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

BYTE_COMPONENTS = ("attention", "router", "shared_experts", "experts", "dense_ffn", "lm_head", "kv_read", "kv_write")


class TraceError(ValueError):
    """A trace that cannot support the requested figure (e.g. no expert traces for S-MBU)."""


def _sum_min(a: int, b: int, window: int | None) -> int:
    """sum_{m=a}^{b} min(m, window) for integers a <= b (window None = unbounded)."""
    if b < a:
        return 0
    if window is None or b <= window:
        return (a + b) * (b - a + 1) // 2
    if a >= window:
        return (b - a + 1) * window
    return (a + window) * (window - a + 1) // 2 + (b - window) * window


def _kv_elems(layer: Any, expanded_mla: bool) -> int:
    return layer.kv_cache_elems_per_token_expanded if expanded_mla else layer.kv_cache_elems_per_token


def pass_cost(
    p: Any,
    acc: Any,
    moe_layers: Sequence[int],
    weight_bytes_per_param: float,
    kv_bytes_per_elem: float,
    expanded_mla: bool = False,
    expert_bytes: dict[int, float | Sequence[float]] | None = None,
) -> dict[str, Any]:
    """Bytes moved and FLOPs done by one pass, by component.

    ``p``: a PassTrace (new_tokens, context_lens, logits_tokens, expert_counts).
    ``acc``: a ``ModelAccounting``. ``moe_layers``: layer index of each row of ``p.expert_counts``.
    ``expert_bytes``: optional bytes of the experts per layer when they are stored at another precision
    than the rest (quantized experts): one figure for every expert of the layer, or a list with each
    expert's own bytes (mixed precision: the pass reads the sum over the experts it used);
    default: params x ``weight_bytes_per_param``.
    """
    bpp = weight_bytes_per_param
    row_of = {layer: i for i, layer in enumerate(moe_layers)}
    counts = p.expert_counts
    tokens = sum(p.new_tokens)
    b = dict.fromkeys(BYTE_COMPONENTS, 0.0)
    linear_params_per_token = 0.0
    score_flops = 0.0
    active: list[int] = []
    for layer in acc.layers:
        b["attention"] += layer.attn_params * bpp
        if layer.kind == "moe":
            if counts is None:
                raise TraceError(
                    f"pass {p.index}: no traced expert counts; S-MBU needs the experts each pass really used"
                )
            if layer.index not in row_of:
                raise TraceError(f"pass {p.index}: MoE layer {layer.index} missing from the expert trace")
            row = counts[row_of[layer.index]]
            n_active = sum(1 for c in row if c > 0)
            active.append(n_active)
            per_expert = expert_bytes.get(layer.index) if expert_bytes else None
            if per_expert is None:
                b["experts"] += n_active * layer.expert_params * bpp
            elif isinstance(per_expert, (int, float)):
                b["experts"] += n_active * per_expert
            else:
                b["experts"] += sum(per_expert[e] for e, c in enumerate(row) if c > 0)
            b["router"] += layer.router_params * bpp
            b["shared_experts"] += layer.shared_params * bpp
            linear_params_per_token += (
                layer.attn_params + layer.router_params + layer.top_k * layer.expert_params + layer.shared_params
            )
        else:
            b["dense_ffn"] += layer.dense_ffn_params * bpp
            linear_params_per_token += layer.attn_params + layer.dense_ffn_params
        kv_per_token = _kv_elems(layer, expanded_mla) * kv_bytes_per_elem
        w = layer.attn_window
        for ctx, new in zip(p.context_lens, p.new_tokens):
            b["kv_read"] += min(ctx, w if w is not None else ctx) * kv_per_token
            b["kv_write"] += new * kv_per_token
            # token j of the pass (1-based) attends to ctx + j positions, clamped to the window
            score_flops += 2 * layer.n_heads * (layer.qk_head_dim + layer.v_head_dim) * _sum_min(ctx + 1, ctx + new, w)
    b["lm_head"] = acc.lm_head_params * bpp
    b["total"] = sum(b[k] for k in BYTE_COMPONENTS)
    linear = 2.0 * tokens * linear_params_per_token + 2.0 * p.logits_tokens * acc.lm_head_params
    return {
        "bytes": b,
        "flops": {"linear": linear, "attention_scores": score_flops, "total": linear + score_flops},
        "active_experts": active,
        "tokens": tokens,
    }


def utilization(
    passes: Sequence[Any],
    acc: Any,
    moe_layers: Sequence[int],
    weight_bytes_per_param: float,
    kv_bytes_per_elem: float,
    peak_bandwidth_Bps: float,
    peak_flops: float,
    expanded_mla: bool = False,
    expert_bytes: dict[int, float | Sequence[float]] | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Per-phase S-MBU / S-MFU with their components, and per-pass rows for the artifacts."""
    phases: dict[str, dict[str, Any]] = {}
    rows: list[dict[str, Any]] = []
    for p in passes:
        cost = pass_cost(p, acc, moe_layers, weight_bytes_per_param, kv_bytes_per_elem, expanded_mla, expert_bytes)
        rows.append(
            {
                "index": p.index,
                "phase": p.phase,
                "time_s": p.time_s,
                "tokens": cost["tokens"],
                "bytes": cost["bytes"]["total"],
                "flops": cost["flops"]["total"],
                "active_experts": cost["active_experts"],
            }
        )
        ph = phases.setdefault(
            p.phase,
            {
                "passes": 0,
                "tokens": 0,
                "time_s": 0.0,
                "bytes": dict.fromkeys((*BYTE_COMPONENTS, "total"), 0.0),
                "flops": {"linear": 0.0, "attention_scores": 0.0, "total": 0.0},
                "_active": [],
            },
        )
        ph["passes"] += 1
        ph["tokens"] += cost["tokens"]
        ph["time_s"] += p.time_s
        for k, v in cost["bytes"].items():
            ph["bytes"][k] += v
        for k, v in cost["flops"].items():
            ph["flops"][k] += v
        ph["_active"].extend(cost["active_experts"])
    for ph in phases.values():
        t = ph["time_s"]
        act = ph.pop("_active")
        ph["achieved_bandwidth_gbs"] = ph["bytes"]["total"] / t / 1e9 if t > 0 else math.nan
        ph["achieved_tflops"] = ph["flops"]["total"] / t / 1e12 if t > 0 else math.nan
        ph["s_mbu"] = ph["bytes"]["total"] / t / peak_bandwidth_Bps if t > 0 else math.nan
        ph["s_mfu"] = ph["flops"]["total"] / t / peak_flops if t > 0 else math.nan
        ph["mean_active_experts_per_layer"] = sum(act) / len(act) if act else None
    return phases, rows


def tier_traffic(
    passes: Sequence[Any],
    acc: Any,
    moe_layers: Sequence[int],
    weight_bytes_per_param: float,
    kv_bytes_per_elem: float,
    expert_bytes: dict[int, Sequence[float]],
    placements: dict[int, Sequence[str]],
    peaks: dict[str, Any],
    expanded_mla: bool = False,
) -> dict[str, dict[str, Any]]:
    """Per phase, a pass's bytes split by where they were read (an engine with host-memory experts):

    - ``fast``: everything the fast device read (non-expert weights, KV, resident experts, and host
      experts computed there after a copy);
    - ``link``: host experts copied to the fast device in the pass (``PassTrace.host_calls`` mode
      ``copy``; a copy still cached is not moved again);
    - ``host``: host experts computed by the host (mode ``cpu``).

    Each tier's achieved bandwidth is Σ bytes / Σ pass time, and its utilization is against its own
    ceiling in ``peaks`` (``fast_Bps``, ``host_Bps``, ``link_Bps``; a missing ceiling leaves the figure
    out). The phase's ``s_mbu`` (:func:`utilization`) stays the combined figure: every tier's bytes over
    the fast device's peak."""
    out: dict[str, dict[str, Any]] = {}
    row_of = {layer: i for i, layer in enumerate(moe_layers)}
    for p in passes:
        cost = pass_cost(p, acc, moe_layers, weight_bytes_per_param, kv_bytes_per_elem, expanded_mla, expert_bytes)
        modes = {(int(c[0]), int(c[1])): str(c[2]) for c in (p.host_calls or [])}
        host = link = 0.0
        for layer, row_i in row_of.items():
            where = placements.get(layer)
            sizes = expert_bytes.get(layer)
            if where is None or sizes is None or p.expert_counts is None:
                continue
            for e, c in enumerate(p.expert_counts[row_i]):
                if c <= 0 or where[e] != "host":
                    continue
                mode = modes.get((layer, e), "cpu")
                if mode == "cpu":
                    host += sizes[e]
                elif mode == "copy":  # over the link, then read again where it is computed (fast)
                    link += sizes[e]
        fast = cost["bytes"]["total"] - host
        ph = out.setdefault(p.phase, {"time_s": 0.0, "fast": 0.0, "host": 0.0, "link": 0.0,
                                      "calls": {"cpu": 0, "copy": 0, "copy_cached": 0}})
        for mode in modes.values():  # the host-expert calls the engine made, by how each was served
            ph["calls"][mode] = ph["calls"].get(mode, 0) + 1
        ph["time_s"] += p.time_s
        ph["fast"] += fast
        ph["host"] += host
        ph["link"] += link
    result: dict[str, dict[str, Any]] = {}
    for phase, ph in out.items():
        t = ph["time_s"]
        row: dict[str, Any] = {}
        for tier in ("fast", "link", "host"):
            b = ph[tier]
            entry: dict[str, Any] = {"bytes": b, "achieved_gbs": b / t / 1e9 if t > 0 else math.nan}
            peak = peaks.get(f"{tier}_Bps")
            if peak:
                entry["peak_gbs"] = peak / 1e9
                entry["utilization"] = b / t / peak if t > 0 else math.nan
            row[tier] = entry
        row["host_calls"] = dict(ph["calls"])
        result[phase] = row
    return result
