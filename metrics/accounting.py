"""Model accounting: parameter, KV-cache and FLOP bookkeeping from a Hugging Face ``config.json``.

No weights are needed and nothing here imports torch or transformers: every figure is derived from
the config dict (or any object with ``to_dict()``, such as a transformers ``PretrainedConfig``),
following the module layout of the model classes in transformers 5.23 (the version moecap pins).
The test-suite builds tiny random-weight models of every supported family and checks the counts
against the real modules parameter by parameter.

Conventions
-----------
* **Parameters** are counted as elements, not bytes. Byte sizes are the caller's business
  (``elements * bytes_per_element`` of the precision the weights are really stored in).
* ``LayerSpec.attn_params`` holds every attention parameter of a layer: Q/K/V/O projections and
  their biases, MLA down/up projections and their RMSNorms, Q/K norms, attention sinks.
* ``LayerSpec.router_params`` is the router (gate) weight plus its bias (gpt-oss) or DeepSeek-V3's
  ``e_score_correction_bias``. The latter is a persistent *buffer* in transformers (it is a stored
  tensor of the checkpoint), so for DeepSeek-V3 ``total_params()`` exceeds
  ``sum(p.numel() for p in model.parameters())`` by exactly ``n_moe_layers * n_routed_experts``
  (58 * 256 = 14,848 for the full model). Every other family matches ``parameters()`` exactly.
* ``LayerSpec.expert_params`` is ONE routed expert (gate+up+down, plus biases for gpt-oss).
* ``LayerSpec.shared_params`` is all shared experts of the layer together, plus Qwen2-MoE's
  ``shared_expert_gate`` ([1, hidden]).
* ``norm_params`` are the per-layer input / post-attention norms. Norms that live *inside* the
  attention block (Q/K norms, MLA ``q_a_layernorm`` / ``kv_a_layernorm``) count as attention.
* ``total_params()`` counts every tensor once; a tied LM head is counted once (with the embedding).
  ``lm_head_params`` is always ``vocab * hidden`` because a tied head is still read during a pass.
* ``active_params()`` is the parameter count used per token: everything except the routed experts,
  plus ``top_k`` routed experts in every MoE layer, **including the input embedding** (the
  convention of the Mixtral, Qwen and OLMoE model cards). DeepSeek and OpenAI (gpt-oss) count the
  unembedding but not the embedding as active; ``active_params(include_embedding=False)`` gives
  that figure. MTP / next-n prediction modules (DeepSeek-V3 ``num_nextn_predict_layers``) are not
  part of the model and are not counted (the published 671 B excludes them too).
* **KV cache** elements per token and layer: ``2 * n_kv_heads * head_dim`` for standard attention
  (K and V); for MLA the compressed latent plus the shared rope key, ``kv_lora_rank +
  qk_rope_head_dim`` (what vLLM/SGLang and transformers 5.23 cache). ``*_expanded`` is what a cache
  holding full per-head K and V would store, ``n_heads * (qk_head_dim + v_head_dim)``.
  Per-token figures ignore sliding windows; ``kv_bytes_for_context`` applies them.
* ``flops_per_token_dense_part()`` is ``2 * (weights touched per token)`` using parameter counts as
  the multiply-accumulate count: attention + router + top_k experts + shared experts + dense FFN of
  every layer plus the LM head; embedding lookups and norms are excluded, attention scores
  (QK^T and AV) are not included (see ``LayerSpec.attention_score_flops``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from typing import Any, Callable, Mapping

__all__ = [
    "LayerSpec",
    "ModelAccounting",
    "from_hf_config",
    "load_builtin_config",
    "builtin_config_names",
    "SUPPORTED_MODEL_TYPES",
]


# --------------------------------------------------------------------------------------------------
# Data model
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerSpec:
    """Sizes of one decoder layer (parameter counts in elements)."""

    index: int
    kind: str  # "moe" or "dense"
    attn_params: int
    router_params: int
    expert_params: int
    n_experts: int
    top_k: int
    shared_params: int
    dense_ffn_params: int
    norm_params: int
    n_heads: int
    n_kv_heads: int
    qk_head_dim: int
    v_head_dim: int
    attn_window: int | None
    kv_cache_elems_per_token: int
    kv_cache_elems_per_token_expanded: int

    @property
    def is_moe(self) -> bool:
        return self.kind == "moe"

    def total_params(self) -> int:
        """Every parameter of the layer (all routed experts)."""
        return (
            self.attn_params
            + self.router_params
            + self.n_experts * self.expert_params
            + self.shared_params
            + self.dense_ffn_params
            + self.norm_params
        )

    def active_params(self) -> int:
        """Parameters one token uses in this layer (``top_k`` routed experts)."""
        return self.total_params() - (self.n_experts - self.top_k) * self.expert_params

    def attended_context(self, context_len: int) -> int:
        """Tokens a query attends to / the cache holds for this layer at ``context_len``."""
        if self.attn_window is None:
            return context_len
        return min(context_len, self.attn_window)

    def attention_score_flops(self, context_len: int) -> int:
        """FLOPs of QK^T and AV for ONE query token attending to ``context_len`` tokens.

        ``2 * n_heads * (qk_head_dim + v_head_dim) * attended`` which is DESIGN's
        ``4 * heads * head_dim * context`` when the K and V head dims agree (they differ for MLA).
        Sliding-window layers attend to at most ``attn_window`` tokens.
        """
        return 2 * self.n_heads * (self.qk_head_dim + self.v_head_dim) * self.attended_context(context_len)


@dataclass(frozen=True)
class ModelAccounting:
    """Per-layer sizes of a model plus embedding / head, derived from its HF config."""

    family: str
    hidden_size: int
    vocab_size: int
    layers: tuple[LayerSpec, ...]
    embed_params: int
    lm_head_params: int
    final_norm_params: int
    tie_word_embeddings: bool

    # ---- structure -------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def moe_layers(self) -> list[int]:
        return [layer.index for layer in self.layers if layer.is_moe]

    # ---- parameter counts ------------------------------------------------------------------
    def total_params(self) -> int:
        """Every parameter once (a tied LM head counted once, with the embedding)."""
        head = 0 if self.tie_word_embeddings else self.lm_head_params
        return (
            sum(layer.total_params() for layer in self.layers)
            + self.embed_params
            + head
            + self.final_norm_params
        )

    def active_params(self, include_embedding: bool = True) -> int:
        """Parameters used per token: all but the routed experts, plus ``top_k`` of them per MoE layer.

        ``include_embedding=True`` (default) counts the input embedding table, as the Mixtral, Qwen
        and OLMoE model cards do. ``False`` drops it (the DeepSeek and gpt-oss convention: the LM
        head is still counted; with tied embeddings nothing is dropped, the table is the head).
        """
        inactive = sum((layer.n_experts - layer.top_k) * layer.expert_params for layer in self.layers)
        active = self.total_params() - inactive
        if not include_embedding and not self.tie_word_embeddings:
            active -= self.embed_params
        return active

    def non_embedding_params(self) -> int:
        """Total parameters without the embedding table and the LM head (Qwen's "non-embedding")."""
        head = 0 if self.tie_word_embeddings else self.lm_head_params
        return self.total_params() - self.embed_params - head

    # ---- KV cache --------------------------------------------------------------------------
    def layer_kv_bytes_per_token(self, dtype_bytes: float, expanded_mla: bool = False) -> list[float]:
        """KV-cache bytes one token of context occupies in each layer (sliding windows ignored)."""
        return [
            (layer.kv_cache_elems_per_token_expanded if expanded_mla else layer.kv_cache_elems_per_token)
            * dtype_bytes
            for layer in self.layers
        ]

    def kv_bytes_per_token(self, dtype_bytes: float, expanded_mla: bool = False) -> float:
        """KV-cache bytes per token of context, summed over layers (sliding windows ignored)."""
        return sum(self.layer_kv_bytes_per_token(dtype_bytes, expanded_mla))

    def kv_bytes_for_context(self, context_len: int, dtype_bytes: float, expanded_mla: bool = False) -> float:
        """KV-cache bytes held for one sequence of ``context_len`` tokens, sliding windows applied."""
        per_layer = self.layer_kv_bytes_per_token(dtype_bytes, expanded_mla)
        return sum(b * layer.attended_context(context_len) for b, layer in zip(per_layer, self.layers))

    # ---- FLOPs -----------------------------------------------------------------------------
    def flops_per_token_dense_part(self) -> int:
        """``2 * (attn + router + top_k*expert + shared + dense_ffn over layers + lm_head)``.

        Matmul FLOPs per token from the weights it touches; no attention-score term, no norms,
        no embedding lookup.
        """
        weights = sum(
            layer.attn_params
            + layer.router_params
            + layer.top_k * layer.expert_params
            + layer.shared_params
            + layer.dense_ffn_params
            for layer in self.layers
        )
        return 2 * (weights + self.lm_head_params)

    # ---- report ----------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """JSON-able breakdown: per-component parameter counts, totals and active counts."""
        expert_sizes = sorted({layer.expert_params for layer in self.layers if layer.is_moe})
        windows = sorted({layer.attn_window for layer in self.layers if layer.attn_window is not None})
        return {
            "family": self.family,
            "num_layers": self.num_layers,
            "moe_layers": len(self.moe_layers),
            "dense_layers": self.num_layers - len(self.moe_layers),
            "hidden_size": self.hidden_size,
            "vocab_size": self.vocab_size,
            "tie_word_embeddings": self.tie_word_embeddings,
            "params": {
                "attention": sum(layer.attn_params for layer in self.layers),
                "router": sum(layer.router_params for layer in self.layers),
                "experts_total": sum(layer.n_experts * layer.expert_params for layer in self.layers),
                # one int when every MoE layer has the same expert size (all supported families)
                "expert_each": expert_sizes[0] if len(expert_sizes) == 1 else (expert_sizes or 0),
                "shared": sum(layer.shared_params for layer in self.layers),
                "dense_ffn": sum(layer.dense_ffn_params for layer in self.layers),
                "norms": sum(layer.norm_params for layer in self.layers) + self.final_norm_params,
                "embedding": self.embed_params,
                "lm_head": self.lm_head_params,
            },
            "n_experts": max((layer.n_experts for layer in self.layers), default=0),
            "top_k": max((layer.top_k for layer in self.layers), default=0),
            "total_params": self.total_params(),
            "active_params": self.active_params(),
            "active_params_excl_embedding": self.active_params(include_embedding=False),
            "kv_cache_elems_per_token": sum(layer.kv_cache_elems_per_token for layer in self.layers),
            "kv_cache_elems_per_token_expanded": sum(
                layer.kv_cache_elems_per_token_expanded for layer in self.layers
            ),
            "sliding_windows": windows,
            "flops_per_token_dense_part": self.flops_per_token_dense_part(),
        }


# --------------------------------------------------------------------------------------------------
# Config helpers
# --------------------------------------------------------------------------------------------------


def _as_dict(config: Any) -> dict[str, Any]:
    if isinstance(config, Mapping):
        return dict(config)
    to_dict = getattr(config, "to_dict", None)
    if callable(to_dict):
        return dict(to_dict())
    raise TypeError(f"expected a config dict or an object with to_dict(), got {type(config).__name__}")


def _get(cfg: Mapping[str, Any], key: str, default: Any = None) -> Any:
    """``cfg[key]``, or ``default`` when the key is absent or null."""
    value = cfg.get(key)
    return default if value is None else value


def _req(cfg: Mapping[str, Any], key: str) -> Any:
    value = cfg.get(key)
    if value is None:
        raise ValueError(f"config of model_type {cfg.get('model_type')!r} lacks required key {key!r}")
    return value


def _linear(n_in: int, n_out: int, bias: bool) -> int:
    return n_in * n_out + (n_out if bias else 0)


def _gated_mlp(hidden: int, intermediate: int, bias: bool = False) -> int:
    """gate_proj + up_proj + down_proj (SwiGLU MLP)."""
    return 2 * _linear(hidden, intermediate, bias) + _linear(intermediate, hidden, bias)


def _first(cfg: Mapping[str, Any], keys: tuple[str, ...], default: Any = None) -> Any:
    """The first non-null of ``keys``: a raw config.json and ``PretrainedConfig.to_dict()`` may
    spell a field differently (transformers' ``attribute_map`` aliases, e.g. Qwen3-MoE's
    ``num_experts`` is stored as ``num_local_experts``)."""
    for key in keys:
        value = cfg.get(key)
        if value is not None:
            return value
    return default


def _num_kv_heads(cfg: Mapping[str, Any], n_heads: int) -> int:
    return int(_get(cfg, "num_key_value_heads", n_heads))


def _head_dim(cfg: Mapping[str, Any], hidden: int, n_heads: int, default: int | None = None) -> int:
    return int(_get(cfg, "head_dim", default if default is not None else hidden // n_heads))


def _windows_from_layer_types(cfg: Mapping[str, Any], n_layers: int) -> list[int | None] | None:
    layer_types = cfg.get("layer_types")
    if not layer_types:
        return None
    if len(layer_types) != n_layers:
        raise ValueError(f"layer_types has {len(layer_types)} entries for {n_layers} layers")
    window = cfg.get("sliding_window")
    return [window if (t == "sliding_attention" and window) else None for t in layer_types]


def _uniform_window(cfg: Mapping[str, Any], n_layers: int, default: int | None) -> list[int | None]:
    window = cfg.get("sliding_window", default)
    return [window or None] * n_layers


def _qwen2_windows(cfg: Mapping[str, Any], n_layers: int, moe: bool) -> list[int | None]:
    """Mirror ``Qwen2Config`` / ``Qwen2MoeConfig.__post_init__`` of transformers 5.23."""
    explicit = _windows_from_layer_types(cfg, n_layers) if _get(cfg, "use_sliding_window", False) else None
    if explicit is not None:
        return explicit
    if not _get(cfg, "use_sliding_window", False):
        return [None] * n_layers
    window = cfg.get("sliding_window", 4096)
    max_window_layers = int(_get(cfg, "max_window_layers", 28))
    if moe:
        sliding = [bool((i + 1) % 2) and i < max_window_layers for i in range(n_layers)]
    else:
        sliding = [i >= max_window_layers for i in range(n_layers)]
    return [window if s and window else None for s in sliding]


# --------------------------------------------------------------------------------------------------
# Layer builders
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Attn:
    params: int
    n_heads: int
    n_kv_heads: int
    qk_head_dim: int
    v_head_dim: int
    kv_elems: int
    kv_elems_expanded: int


def _gqa_attention(
    hidden: int,
    n_heads: int,
    n_kv: int,
    head_dim: int,
    *,
    qkv_bias: bool = False,
    o_bias: bool = False,
    q_norm: int = 0,
    k_norm: int = 0,
    sinks: int = 0,
) -> _Attn:
    params = (
        _linear(hidden, n_heads * head_dim, qkv_bias)
        + 2 * _linear(hidden, n_kv * head_dim, qkv_bias)
        + _linear(n_heads * head_dim, hidden, o_bias)
        + q_norm
        + k_norm
        + sinks
    )
    kv = 2 * n_kv * head_dim
    return _Attn(params, n_heads, n_kv, head_dim, head_dim, kv, kv)


def _mla_attention(cfg: Mapping[str, Any], hidden: int) -> _Attn:
    """DeepSeek-V2/V3 multi-head latent attention."""
    n_heads = int(_req(cfg, "num_attention_heads"))
    q_lora_rank = cfg.get("q_lora_rank")
    kv_lora_rank = int(_req(cfg, "kv_lora_rank"))
    nope = int(_req(cfg, "qk_nope_head_dim"))
    rope = int(_req(cfg, "qk_rope_head_dim"))
    v_dim = int(_req(cfg, "v_head_dim"))
    bias = bool(_get(cfg, "attention_bias", False))
    qk_dim = nope + rope
    if q_lora_rank:  # q_a_proj -> q_a_layernorm -> q_b_proj
        q = _linear(hidden, q_lora_rank, bias) + q_lora_rank + _linear(q_lora_rank, n_heads * qk_dim, False)
    else:
        q = _linear(hidden, n_heads * qk_dim, False)
    kv = (
        _linear(hidden, kv_lora_rank + rope, bias)  # kv_a_proj_with_mqa
        + kv_lora_rank  # kv_a_layernorm
        + _linear(kv_lora_rank, n_heads * (nope + v_dim), False)  # kv_b_proj
    )
    o = _linear(n_heads * v_dim, hidden, bias)
    return _Attn(
        params=q + kv + o,
        n_heads=n_heads,
        n_kv_heads=n_heads,
        qk_head_dim=qk_dim,
        v_head_dim=v_dim,
        kv_elems=kv_lora_rank + rope,
        kv_elems_expanded=n_heads * (qk_dim + v_dim),
    )


def _layer(
    index: int,
    attn: _Attn,
    norm: int,
    window: int | None,
    *,
    moe: bool,
    router: int = 0,
    expert: int = 0,
    n_experts: int = 0,
    top_k: int = 0,
    shared: int = 0,
    dense_ffn: int = 0,
) -> LayerSpec:
    if moe and top_k > n_experts:
        raise ValueError(f"layer {index}: top_k={top_k} exceeds n_experts={n_experts}")
    return LayerSpec(
        index=index,
        kind="moe" if moe else "dense",
        attn_params=attn.params,
        router_params=router if moe else 0,
        expert_params=expert if moe else 0,
        n_experts=n_experts if moe else 0,
        top_k=top_k if moe else 0,
        shared_params=shared if moe else 0,
        dense_ffn_params=0 if moe else dense_ffn,
        norm_params=norm,
        n_heads=attn.n_heads,
        n_kv_heads=attn.n_kv_heads,
        qk_head_dim=attn.qk_head_dim,
        v_head_dim=attn.v_head_dim,
        attn_window=window,
        kv_cache_elems_per_token=attn.kv_elems,
        kv_cache_elems_per_token_expanded=attn.kv_elems_expanded,
    )


def _finish(cfg: Mapping[str, Any], layers: list[LayerSpec]) -> ModelAccounting:
    hidden = int(_req(cfg, "hidden_size"))
    vocab = int(_req(cfg, "vocab_size"))
    return ModelAccounting(
        family=str(cfg["model_type"]),
        hidden_size=hidden,
        vocab_size=vocab,
        layers=tuple(layers),
        embed_params=vocab * hidden,
        lm_head_params=vocab * hidden,
        final_norm_params=hidden,
        tie_word_embeddings=bool(_get(cfg, "tie_word_embeddings", False)),
    )


def _basics(cfg: Mapping[str, Any]) -> tuple[int, int, int, int]:
    hidden = int(_req(cfg, "hidden_size"))
    n_layers = int(_req(cfg, "num_hidden_layers"))
    n_heads = int(_req(cfg, "num_attention_heads"))
    return hidden, n_layers, n_heads, _num_kv_heads(cfg, n_heads)


# ---- families ------------------------------------------------------------------------------------


def _dense(cfg: Mapping[str, Any]) -> ModelAccounting:
    """llama, mistral, qwen2: every layer a dense SwiGLU MLP."""
    family = cfg["model_type"]
    hidden, n_layers, n_heads, n_kv = _basics(cfg)
    head_dim = _head_dim(cfg, hidden, n_heads)
    intermediate = int(_req(cfg, "intermediate_size"))
    if family == "llama":
        bias = bool(_get(cfg, "attention_bias", False))
        attn = _gqa_attention(hidden, n_heads, n_kv, head_dim, qkv_bias=bias, o_bias=bias)
        ffn = _gated_mlp(hidden, intermediate, bool(_get(cfg, "mlp_bias", False)))
        windows: list[int | None] = [None] * n_layers
    elif family == "mistral":
        attn = _gqa_attention(hidden, n_heads, n_kv, head_dim)
        ffn = _gated_mlp(hidden, intermediate)
        windows = _uniform_window(cfg, n_layers, default=4096)
    else:  # qwen2: q/k/v biases, no o bias
        attn = _gqa_attention(hidden, n_heads, n_kv, head_dim, qkv_bias=True)
        ffn = _gated_mlp(hidden, intermediate)
        windows = _qwen2_windows(cfg, n_layers, moe=False)
    layers = [_layer(i, attn, 2 * hidden, windows[i], moe=False, dense_ffn=ffn) for i in range(n_layers)]
    return _finish(cfg, layers)


def _mixtral(cfg: Mapping[str, Any]) -> ModelAccounting:
    hidden, n_layers, n_heads, n_kv = _basics(cfg)
    attn = _gqa_attention(hidden, n_heads, n_kv, _head_dim(cfg, hidden, n_heads))
    n_experts = int(_first(cfg, ("num_local_experts", "num_experts"), 8))
    windows = _windows_from_layer_types(cfg, n_layers) or _uniform_window(cfg, n_layers, default=None)
    layers = [
        _layer(
            i,
            attn,
            2 * hidden,
            windows[i],
            moe=True,
            router=n_experts * hidden,
            expert=_gated_mlp(hidden, int(_req(cfg, "intermediate_size"))),
            n_experts=n_experts,
            top_k=int(_get(cfg, "num_experts_per_tok", 2)),
        )
        for i in range(n_layers)
    ]
    return _finish(cfg, layers)


def _qwen_moe_layer_is_sparse(cfg: Mapping[str, Any], index: int, n_experts: int) -> bool:
    mlp_only = set(_get(cfg, "mlp_only_layers", []))
    step = int(_get(cfg, "decoder_sparse_step", 1))
    return index not in mlp_only and n_experts > 0 and (index + 1) % step == 0


def _qwen2_moe(cfg: Mapping[str, Any]) -> ModelAccounting:
    hidden, n_layers, n_heads, n_kv = _basics(cfg)
    attn = _gqa_attention(
        hidden, n_heads, n_kv, _head_dim(cfg, hidden, n_heads), qkv_bias=bool(_get(cfg, "qkv_bias", True))
    )
    n_experts = int(_first(cfg, ("num_experts", "num_local_experts"), 60))
    shared = _gated_mlp(hidden, int(_get(cfg, "shared_expert_intermediate_size", 5632))) + hidden  # + gate [1,H]
    windows = _qwen2_windows(cfg, n_layers, moe=True)
    layers = [
        _layer(
            i,
            attn,
            2 * hidden,
            windows[i],
            moe=_qwen_moe_layer_is_sparse(cfg, i, n_experts),
            router=n_experts * hidden,
            expert=_gated_mlp(hidden, int(_get(cfg, "moe_intermediate_size", 1408))),
            n_experts=n_experts,
            top_k=int(_get(cfg, "num_experts_per_tok", 4)),
            shared=shared,
            dense_ffn=_gated_mlp(hidden, int(_get(cfg, "intermediate_size", 5632))),
        )
        for i in range(n_layers)
    ]
    return _finish(cfg, layers)


def _qwen3_moe(cfg: Mapping[str, Any]) -> ModelAccounting:
    hidden, n_layers, n_heads, n_kv = _basics(cfg)
    head_dim = _head_dim(cfg, hidden, n_heads)
    bias = bool(_get(cfg, "attention_bias", False))
    # q_norm / k_norm are RMSNorms over one head's dim, shared by all heads
    attn = _gqa_attention(hidden, n_heads, n_kv, head_dim, qkv_bias=bias, o_bias=bias, q_norm=head_dim, k_norm=head_dim)
    n_experts = int(_first(cfg, ("num_experts", "num_local_experts"), 128))
    window = cfg.get("sliding_window", 4096) if _get(cfg, "use_sliding_window", False) else None
    layers = [
        _layer(
            i,
            attn,
            2 * hidden,
            window,
            moe=_qwen_moe_layer_is_sparse(cfg, i, n_experts),
            router=n_experts * hidden,
            expert=_gated_mlp(hidden, int(_get(cfg, "moe_intermediate_size", 768))),
            n_experts=n_experts,
            top_k=int(_get(cfg, "num_experts_per_tok", 8)),
            dense_ffn=_gated_mlp(hidden, int(_get(cfg, "intermediate_size", 6144))),
        )
        for i in range(n_layers)
    ]
    return _finish(cfg, layers)


def _olmoe(cfg: Mapping[str, Any]) -> ModelAccounting:
    hidden, n_layers, n_heads, n_kv = _basics(cfg)
    head_dim = hidden // n_heads  # OlmoeAttention ignores any head_dim key
    bias = bool(_get(cfg, "attention_bias", False))
    # q_norm / k_norm are RMSNorms over the full projection width (unlike Qwen3)
    attn = _gqa_attention(
        hidden, n_heads, n_kv, head_dim, qkv_bias=bias, o_bias=bias, q_norm=hidden, k_norm=head_dim * n_kv
    )
    n_experts = int(_first(cfg, ("num_experts", "num_local_experts"), 64))
    layers = [
        _layer(
            i,
            attn,
            2 * hidden,
            None,
            moe=True,
            router=n_experts * hidden,
            expert=_gated_mlp(hidden, int(_req(cfg, "intermediate_size"))),
            n_experts=n_experts,
            top_k=int(_get(cfg, "num_experts_per_tok", 8)),
        )
        for i in range(n_layers)
    ]
    return _finish(cfg, layers)


def _deepseek(cfg: Mapping[str, Any]) -> ModelAccounting:
    """deepseek_v2 and deepseek_v3 (MLA; first_k_dense_replace dense layers; shared experts)."""
    v3 = cfg["model_type"] == "deepseek_v3"
    hidden = int(_req(cfg, "hidden_size"))
    n_layers = int(_req(cfg, "num_hidden_layers"))
    attn = _mla_attention(cfg, hidden)
    n_experts = int(_first(cfg, ("n_routed_experts", "num_experts", "num_local_experts"), 256 if v3 else 64))
    moe_inter = int(_get(cfg, "moe_intermediate_size", 2048 if v3 else 1407))
    mlp_bias = False if v3 else bool(_get(cfg, "mlp_bias", False))  # V2's MLP class honours mlp_bias
    first_dense = int(_get(cfg, "first_k_dense_replace", 3 if v3 else 0))
    top_k = _get(cfg, "num_experts_per_tok", 8 if v3 else None)
    if top_k is None and n_layers > first_dense:
        raise ValueError("deepseek_v2 config lacks num_experts_per_tok")
    router = n_experts * hidden + (n_experts if v3 else 0)  # + e_score_correction_bias (a buffer)
    layers = [
        _layer(
            i,
            attn,
            2 * hidden,
            None,
            moe=i >= first_dense,
            router=router,
            expert=_gated_mlp(hidden, moe_inter),
            n_experts=n_experts,
            top_k=int(top_k or 0),
            shared=_gated_mlp(hidden, moe_inter * int(_get(cfg, "n_shared_experts", 1 if v3 else 2)), mlp_bias),
            dense_ffn=_gated_mlp(hidden, int(_req(cfg, "intermediate_size")), mlp_bias),
        )
        for i in range(n_layers)
    ]
    return _finish(cfg, layers)


def _gpt_oss(cfg: Mapping[str, Any]) -> ModelAccounting:
    hidden, n_layers, n_heads, n_kv = _basics(cfg)
    head_dim = _head_dim(cfg, hidden, n_heads, default=64)
    bias = bool(_get(cfg, "attention_bias", True))
    attn = _gqa_attention(hidden, n_heads, n_kv, head_dim, qkv_bias=bias, o_bias=bias, sinks=n_heads)
    n_experts = int(_first(cfg, ("num_local_experts", "num_experts"), 128))
    inter = int(_req(cfg, "intermediate_size"))
    # fused gate_up [H, 2I] + bias [2I], down [I, H] + bias [H]
    expert = hidden * 2 * inter + 2 * inter + inter * hidden + hidden
    windows = _windows_from_layer_types(cfg, n_layers)
    if windows is None:  # GptOssConfig default: even layers sliding (window 128), odd layers full
        window = cfg.get("sliding_window", 128)
        windows = [window if (i + 1) % 2 else None for i in range(n_layers)]
    layers = [
        _layer(
            i,
            attn,
            2 * hidden,
            windows[i],
            moe=True,
            router=n_experts * hidden + n_experts,
            expert=expert,
            n_experts=n_experts,
            top_k=int(_get(cfg, "num_experts_per_tok", 4)),
        )
        for i in range(n_layers)
    ]
    return _finish(cfg, layers)


_BUILDERS: dict[str, Callable[[Mapping[str, Any]], ModelAccounting]] = {
    "mixtral": _mixtral,
    "qwen2_moe": _qwen2_moe,
    "qwen3_moe": _qwen3_moe,
    "olmoe": _olmoe,
    "deepseek_v2": _deepseek,
    "deepseek_v3": _deepseek,
    "gpt_oss": _gpt_oss,
    "llama": _dense,
    "mistral": _dense,
    "qwen2": _dense,
}

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(sorted(_BUILDERS))


def from_hf_config(config: Any) -> ModelAccounting:
    """Build the accounting of a model from its HF config (a dict, or an object with ``to_dict()``).

    Raises ``ValueError`` for a ``model_type`` this module does not know, naming it and the
    supported ones.
    """
    cfg = _as_dict(config)
    model_type = cfg.get("model_type")
    builder = _BUILDERS.get(model_type) if isinstance(model_type, str) else None
    if builder is None:
        raise ValueError(
            f"unsupported model_type {model_type!r} for model accounting; "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return builder(cfg)


# --------------------------------------------------------------------------------------------------
# Built-in configs (moecap/data/configs/<name>.json)
# --------------------------------------------------------------------------------------------------


def _configs_dir() -> Any:
    return resources.files("moecap").joinpath("data", "configs")


def builtin_config_names() -> list[str]:
    """Names of the configs shipped in ``moecap/data/configs`` (file names without ``.json``)."""
    return sorted(
        entry.name[: -len(".json")] for entry in _configs_dir().iterdir() if entry.name.endswith(".json")
    )


def load_builtin_config(name: str) -> dict[str, Any]:
    """The shipped HF config ``<name>.json`` as a dict (keys starting with ``_`` are moecap metadata)."""
    entry = _configs_dir().joinpath(f"{name}.json")
    if not entry.is_file():
        raise KeyError(f"no built-in config {name!r}; available: {', '.join(builtin_config_names())}")
    return json.loads(entry.read_text(encoding="utf-8"))
