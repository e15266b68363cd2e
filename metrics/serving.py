"""Estimated decode S-MBU / S-MFU of a server seen only through its streamed responses.

A server gives no per-pass timings and (mostly) no router traces, so the DESIGN's per-pass sums are
estimated from what the client saw, and every such figure is labelled ``estimated``:

- **Passes.** Each gap between two consecutive streamed tokens of a request is one decode step of that
  request. A continuous-batching engine ran that step inside a pass together with every other request
  that was decoding at that moment; the batch ``B`` of the pass is the number of requests between their
  first and last token at the gap's midpoint, and their summed context ``C`` is the sum over them of
  the tokens in their KV cache before that pass (input + tokens streamed so far - 1). A pass is shared by its ``B`` requests, so each request-gap
  contributes ``1/B`` of the pass's bytes, FLOPs and time: summed over all gaps this is Σ_p bytes(p) and
  Σ_p time(p) over the estimated passes (DESIGN §2: a ratio of sums, never a mean of ratios).
- **Expert unions.** ``|U(p,l)|`` is not observed. Its expected value for ``B`` tokens whose router picks
  expert ``e`` of layer ``l`` with marginal probability ``q_{l,e}`` (Σ_e q = top-k), tokens independent:
  ``E|U| = Σ_e 1 - (1 - q_{l,e})^B``. ``q`` comes from the engine's routing statistics when it recorded
  them, else from uniform routing (``q = k/E``), and the record says which.
- **Prefill** is not estimated: a client's TTFT includes queueing and the decode work of other requests
  that shared the prefill's passes.

Context per request is taken as the pass's mean context ``C/B`` for sliding-window clamping.

:func:`server_window` is the other server-side figure: what a server that records its own batches
(``moecap serve``'s ``/stats``) did over the measured window, switches between models included.
"""

from __future__ import annotations

import math
from statistics import fmean, median
from typing import Any, Sequence

import numpy as np

from moecap.metrics.utilization import BYTE_COMPONENTS

METHOD = (
    "estimated from client-side token timestamps: one decode pass per inter-token gap, shared by the "
    "requests decoding at that moment; expert unions are expected values"
)


def expected_union(n_tokens: float | np.ndarray, probs: Sequence[float]) -> float | np.ndarray:
    """Expected number of distinct experts ``n_tokens`` independent tokens route to, where a token picks
    expert e with marginal probability ``probs[e]`` (the probabilities sum to the router's top-k)."""
    q = np.clip(np.asarray(probs, dtype=np.float64), 0.0, 1.0)
    n = np.asarray(n_tokens, dtype=np.float64)
    out = (1.0 - np.power.outer(1.0 - q, n)).sum(axis=0) if n.ndim else float((1.0 - (1.0 - q) ** float(n)).sum())
    return out


def routing_probabilities(acc: Any, routing_stats: dict[str, Any] | None = None) -> tuple[dict[int, list[float]], str]:
    """Per MoE layer, each expert's probability of being picked by a token, and where it came from.

    ``routing_stats``: ``{"source": str, "layers": [[count per expert] per MoE layer, in layer order]}``
    as a serving runner records it from the engine; absent or unusable: uniform routing."""
    moe = [layer for layer in acc.layers if layer.kind == "moe"]
    rows = (routing_stats or {}).get("layers")
    if rows and len(rows) == len(moe) and all(len(r) == layer.n_experts for r, layer in zip(rows, moe)):
        probs: dict[int, list[float]] = {}
        for r, layer in zip(rows, moe):
            total = float(sum(r))
            if total <= 0:
                probs[layer.index] = [layer.top_k / layer.n_experts] * layer.n_experts
            else:
                probs[layer.index] = [min(1.0, layer.top_k * c / total) for c in r]
        return probs, f"routing statistics recorded by the engine ({routing_stats.get('source', 'unknown')})"
    return {layer.index: [layer.top_k / layer.n_experts] * layer.n_experts for layer in moe}, "uniform routing (k/E)"


def decode_gaps(requests: Sequence[Any]) -> dict[str, np.ndarray]:
    """Every inter-token gap of every successful request with the batch and summed context of the
    estimated pass it belongs to: arrays ``time_s``, ``batch``, ``context``."""
    ok = [r for r in requests if not getattr(r, "error", None) and len(r.token_times_s) >= 2]
    if not ok:
        return {"time_s": np.zeros(0), "batch": np.zeros(0), "context": np.zeros(0)}
    ev_t: list[np.ndarray] = []
    ev_active: list[np.ndarray] = []
    ev_ctx: list[np.ndarray] = []
    gap_mid: list[np.ndarray] = []
    gap_len: list[np.ndarray] = []
    for r in ok:
        t = np.asarray(r.token_times_s, dtype=np.float64)
        n = len(t)
        # decoding from the first token to the last. The pass that yields token i feeds token i-1 with
        # input + i - 1 tokens in the KV cache: the context between tokens i-1 and i
        ev_t.append(t)
        ev_active.append(np.concatenate([[1.0], np.zeros(n - 2), [-1.0]]))
        ev_ctx.append(np.concatenate([[float(r.input_tokens)], np.ones(n - 2), [-(r.input_tokens + n - 2.0)]]))
        gap_mid.append((t[1:] + t[:-1]) / 2)
        gap_len.append(np.diff(t))
    times = np.concatenate(ev_t)
    order = np.argsort(times, kind="stable")
    times = times[order]
    active = np.cumsum(np.concatenate(ev_active)[order])
    ctx = np.cumsum(np.concatenate(ev_ctx)[order])
    mids = np.concatenate(gap_mid)
    idx = np.searchsorted(times, mids, side="right") - 1
    batch = np.maximum(active[idx], 1.0)
    context = np.maximum(ctx[idx], 0.0)
    return {"time_s": np.concatenate(gap_len), "batch": batch, "context": context}


def estimated_decode_utilization(
    requests: Sequence[Any],
    acc: Any,
    weight_bytes_per_param: float | dict[str, float],
    kv_bytes_per_elem: float,
    peak_bandwidth_Bps: float | None,
    peak_flops: float | None,
    routing_stats: dict[str, Any] | None = None,
    expanded_mla: bool = False,
    recorded_passes: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The decode phase's estimated bytes, FLOPs, S-MBU and S-MFU (see the module docstring).

    ``recorded_passes``: ``{"tokens": [tokens per pass], "unions": [[experts used, per MoE layer] per
    pass]}`` as a server recorded them (SGLang's expert distribution recorder): a decode gap whose batch
    matches a recorded pass size takes the mean union the server recorded for passes of that size,
    instead of the expected union of its routing frequencies.
    """
    gaps = decode_gaps(requests)
    time_s, B, C = gaps["time_s"], gaps["batch"], gaps["context"]
    probs, union_source = routing_probabilities(acc, routing_stats)
    table = _recorded_union_table(recorded_passes)
    matched = np.isin(np.rint(B), list(table)) if table else np.zeros(len(B), dtype=bool)
    if table:
        union_source = (f"recorded per pass by the server ({len(recorded_passes['tokens'])} passes): "
                        f"{int(matched.sum())} of {len(B)} decode gaps at a recorded pass size; the rest: "
                        f"{union_source}")
    if isinstance(weight_bytes_per_param, dict):  # per component, as stored (a GGUF's tensor types)
        per = dict(weight_bytes_per_param)
        fallback = per.get("experts") or max(per.values())

        def bpp_of(component: str) -> float:
            return float(per.get(component, fallback))
    else:
        def bpp_of(component: str) -> float:
            return float(weight_bytes_per_param)
    share = 1.0 / B  # each request-gap carries 1/B of its pass
    ctx_each = C / B
    comp = {k: np.zeros_like(B) for k in BYTE_COMPONENTS}
    linear_params = 0.0
    score = np.zeros_like(B)
    union_sum = np.zeros_like(B)
    n_moe = 0
    for layer in acc.layers:
        comp["attention"] += layer.attn_params * bpp_of("attention")
        if layer.kind == "moe":
            u = expected_union(B, probs[layer.index])
            if table and matched.any():
                u = np.where(matched, [table.get(int(b), [0.0] * (n_moe + 1))[n_moe] if m else 0.0
                                       for b, m in zip(np.rint(B), matched)], u)
            n_moe += 1
            union_sum += u
            comp["router"] += layer.router_params * bpp_of("router")
            comp["shared_experts"] += layer.shared_params * bpp_of("shared_experts")
            comp["experts"] += u * layer.expert_params * bpp_of("experts")
            linear_params += layer.attn_params + layer.router_params + layer.top_k * layer.expert_params + layer.shared_params
        else:
            comp["dense_ffn"] += layer.dense_ffn_params * bpp_of("dense_ffn")
            linear_params += layer.attn_params + layer.dense_ffn_params
        kv_tok = (layer.kv_cache_elems_per_token_expanded if expanded_mla else layer.kv_cache_elems_per_token) \
            * kv_bytes_per_elem
        w = layer.attn_window
        seen = np.minimum(ctx_each, w) if w is not None else ctx_each
        comp["kv_read"] += B * seen * kv_tok
        comp["kv_write"] += B * kv_tok
        attended = np.minimum(ctx_each + 1, w) if w is not None else ctx_each + 1
        score += 2.0 * layer.n_heads * (layer.qk_head_dim + layer.v_head_dim) * B * attended
    comp["lm_head"] += acc.lm_head_params * bpp_of("lm_head")
    linear = 2.0 * B * (linear_params + acc.lm_head_params)
    bytes_out = {k: float((v * share).sum()) for k, v in comp.items()}
    bytes_out["total"] = sum(bytes_out[k] for k in BYTE_COMPONENTS)
    flops = {"linear": float((linear * share).sum()), "attention_scores": float((score * share).sum())}
    flops["total"] = flops["linear"] + flops["attention_scores"]
    t = float((time_s * share).sum())
    out: dict[str, Any] = {
        "estimated": True,
        "method": METHOD,
        "expert_unions": union_source,
        "passes": float(share.sum()),
        "tokens": int(len(time_s)),
        "time_s": t,
        "mean_batch": float((B * time_s * share).sum() / t) if t > 0 else None,
        "bytes": bytes_out,
        "flops": flops,
        "mean_active_experts_per_layer": float((union_sum * share).sum() / share.sum() / n_moe)
        if n_moe and len(B) else None,
    }
    ok = t > 0 and len(B) > 0
    out["achieved_bandwidth_gbs"] = bytes_out["total"] / t / 1e9 if ok else math.nan
    out["achieved_tflops"] = flops["total"] / t / 1e12 if ok else math.nan
    out["s_mbu"] = bytes_out["total"] / t / peak_bandwidth_Bps if ok and peak_bandwidth_Bps else None
    out["s_mfu"] = flops["total"] / t / peak_flops if ok and peak_flops else None
    return out


def _recorded_union_table(recorded: dict[str, Any] | None) -> dict[int, list[float]]:
    """pass size (tokens) -> mean experts used per MoE layer, over the passes a server recorded."""
    if not recorded or not recorded.get("tokens") or not recorded.get("unions"):
        return {}
    sums: dict[int, list[float]] = {}
    counts: dict[int, int] = {}
    for tokens, unions in zip(recorded["tokens"], recorded["unions"]):
        if tokens is None or abs(tokens - round(tokens)) > 1e-6 or round(tokens) < 1:
            continue
        key = int(round(tokens))
        acc = sums.setdefault(key, [0.0] * len(unions))
        for i, u in enumerate(unions):
            acc[i] += float(u)
        counts[key] = counts.get(key, 0) + 1
    return {k: [v / counts[k] for v in row] for k, row in sums.items()}


def server_window(raw: dict[str, Any]) -> dict[str, Any]:
    """A server's own figures over a measured window, from the raw batches its scheduler recorded
    (``moecap serve``'s ``/stats``; see ``runners/moecap_serve.py``): batches and their sizes, the
    switches between models (a batch of another model than the one before) and what each cost, prefill
    and decode time, per model, and the backend's memory. A raw record that says it is not available
    passes through."""
    if "batches" not in raw:
        return dict(raw)
    batches = raw["batches"]
    prev = raw.get("previous_model")
    # a partition runs each model on its own worker: consecutive batches of two models are no switch
    own_workers = raw.get("backend") == "partition"
    switch_s: list[float] = []
    per_model: dict[str, dict[str, Any]] = {}
    for b in batches:
        m = per_model.setdefault(b["model"], {"batches": 0, "requests": 0, "switches_to": 0, "switch_s_total": 0.0,
                                              "switch_request_s": 0.0})
        m["batches"] += 1
        m["requests"] += b["size"]
        if b["model"] != prev and not own_workers:
            m["switches_to"] += 1
            switch_s.append(float(b["switch_s"]))
            m["switch_s_total"] += float(b["switch_s"])
            # every request of the batch waited for the switch before its first token
            m["switch_request_s"] += float(b["switch_s"]) * b["size"]
        prev = b["model"]
    sizes = [b["size"] for b in batches]
    out: dict[str, Any] = {
        "backend": raw.get("backend"),
        "batches": len(batches),
        "batches_failed": sum(1 for b in batches if b.get("error")),
        "batch_size_mean": fmean(sizes) if sizes else None,
        "prefill_s": sum(b["prefill_s"] for b in batches),
        "decode_s": sum(b["decode_s"] for b in batches),
        "switches": len(switch_s),
        "switch_s_total": sum(switch_s),
        "per_model": per_model,
        "config": raw.get("config"),
        "memory": raw.get("memory"),
    }
    if switch_s:
        out["switch_ms"] = {"mean": 1e3 * fmean(switch_s), "median": 1e3 * median(switch_s),
                            "max": 1e3 * max(switch_s), "min": 1e3 * min(switch_s)}
    return out
