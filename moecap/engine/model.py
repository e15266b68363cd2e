"""The engine's own decoder: the MoE families it serves, built straight into an expert placement plan.

:class:`EngineModel` computes exactly what the transformers model of the same checkpoint computes
(Mixtral, Qwen2-MoE with its shared expert and dense layers, Qwen3-MoE with per-head q/k norms, OLMoE
with whole-projection q/k norms and ``clip_qkv``) with as few operations per layer as the arithmetic
allows, because at batch 1 a decode step of a small MoE is a few dozen small kernels and every extra
framework call shows in the time per token:

- q, k and v are one matrix (one kernel call); the rows of q and k are stored with each rotary pair
  side by side (as llama.cpp's converter permutes them; q.k is unchanged when both are permuted alike),
  so rotating q and k together is one complex multiplication by a table computed once from the family's
  own transformers rotary class;
- the KV cache is preallocated per sequence batch (:class:`KVCache`), time-major, written in place;
- attention is ``torch.nn.functional.scaled_dot_product_attention`` (GQA without repeating keys);
- every weight matrix is a kernel object of :mod:`moecap.engine.kernels` (oneDNN's pre-packed fp32/bf16
  matmul on a CPU, torch's fused int8/int4 kernels for quantized experts);
- each MoE layer is an :class:`~moecap.engine.store.EngineMoeBlock` over an
  :class:`~moecap.engine.store.ExpertStore` (``model.layers[i].mlp.experts``), called with the
  fused-experts signature, so moecap's expert tracer sees the routing as for transformers.

Loading (:func:`load_engine_model`) streams a checkpoint's safetensors (memory-mapped, one tensor at a
time): non-expert weights go to the fast device in the model's dtype; each expert is read, quantized
and placed on its tier per the plan, so the full-precision model is never materialized and peak memory
is the plan's footprint plus about one layer. :meth:`EngineModel.from_hf` builds the same model from
a transformers model already in memory (random-weight models, tests).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from moecap.engine.kernels import DenseLinear, Linear, kernel_summary, make_linear
from moecap.engine.store import (
    FAMILIES,
    CostModel,
    EngineMoeBlock,
    ExpertLayout,
    ExpertPlan,
    ExpertStore,
    PlanError,
    Router,
    StoredExpert,
)


class CheckpointError(ValueError):
    """A checkpoint the engine cannot read (missing tensors, unknown family, shape mismatch)."""


# ------------------------------------------------------------------------------------------ the arch
@dataclass(frozen=True)
class Arch:
    """What the engine needs of a transformers config, family differences resolved."""

    family: str
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    eps: float
    qkv_bias: bool
    o_bias: bool
    qk_norm: str | None  # "head": per head over head_dim (Qwen3-MoE); "full": over the projection (OLMoE)
    clip_qkv: float | None
    windows: tuple[int | None, ...]  # per layer: attention window (keys a query sees), None = unbounded
    moe_layers: tuple[int, ...]
    experts: int
    top_k: int
    norm_topk: bool
    moe_inter: int
    shared_inter: int | None
    dense_inter: int
    tie: bool
    act: str
    max_positions: int

    @classmethod
    def from_config(cls, cfg: Any) -> "Arch":
        family = getattr(cfg, "model_type", None)
        if family not in FAMILIES:
            raise CheckpointError(f"model_type {family!r}: the engine serves {', '.join(FAMILIES)}")
        n_layers = int(cfg.num_hidden_layers)
        heads = int(cfg.num_attention_heads)
        head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
        if family == "mixtral":
            experts, inter = int(cfg.num_local_experts), int(cfg.intermediate_size)
            moe = tuple(range(n_layers))
            windows = (getattr(cfg, "sliding_window", None),) * n_layers
        else:
            experts = int(cfg.num_experts)
            inter = int(getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size)
            if family == "olmoe":
                moe, windows = tuple(range(n_layers)), (None,) * n_layers
            else:
                only = set(getattr(cfg, "mlp_only_layers", None) or [])
                step = int(getattr(cfg, "decoder_sparse_step", 1) or 1)
                moe = tuple(i for i in range(n_layers) if i not in only and experts > 0 and (i + 1) % step == 0)
                if family == "qwen2_moe":
                    types = getattr(cfg, "layer_types", None) or ["full_attention"] * n_layers
                    windows = tuple(cfg.sliding_window if t == "sliding_attention" else None for t in types)
                else:
                    windows = (getattr(cfg, "sliding_window", None),) * n_layers
        qkv_bias = bool(getattr(cfg, "qkv_bias", False)) if family == "qwen2_moe" else bool(getattr(cfg, "attention_bias", False) or False)
        return cls(
            family=family, vocab=int(cfg.vocab_size), hidden=int(cfg.hidden_size), layers=n_layers, heads=heads,
            kv_heads=int(getattr(cfg, "num_key_value_heads", None) or heads), head_dim=head_dim,
            eps=float(cfg.rms_norm_eps), qkv_bias=qkv_bias,
            o_bias=bool(getattr(cfg, "attention_bias", False) or False) and family != "qwen2_moe",
            qk_norm={"qwen3_moe": "head", "olmoe": "full"}.get(family),
            clip_qkv=getattr(cfg, "clip_qkv", None) if family == "olmoe" else None,
            windows=tuple(w if w else None for w in windows), moe_layers=moe, experts=experts,
            top_k=int(cfg.num_experts_per_tok),
            norm_topk=True if family == "mixtral" else bool(getattr(cfg, "norm_topk_prob", False)),
            moe_inter=inter,
            shared_inter=int(cfg.shared_expert_intermediate_size) if family == "qwen2_moe" else None,
            dense_inter=int(getattr(cfg, "intermediate_size", inter)),
            tie=bool(getattr(cfg, "tie_word_embeddings", False)), act=str(getattr(cfg, "hidden_act", "silu")),
            max_positions=int(getattr(cfg, "max_position_embeddings", 4096) or 4096),
        )

    def experts_per_layer(self) -> dict[int, int]:
        return {i: self.experts for i in self.moe_layers}

    def layout(self, dtype: torch.dtype) -> ExpertLayout:
        """The routed experts' layout (for plans and their byte counts) at full precision ``dtype``."""
        elem = torch.empty((), dtype=dtype).element_size()
        return ExpertLayout(self.experts_per_layer(),
                            {i: ((2 * self.moe_inter, self.hidden), (self.hidden, self.moe_inter), elem) for i in self.moe_layers})


def _act(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name in ("silu", "swish"):
        return F.silu
    from transformers.activations import ACT2FN

    return ACT2FN[name]


# --------------------------------------------------------------------------------------- KV cache
class KVCache:
    """Keys and values of a batch of sequences, preallocated ``[B, capacity, kv_heads, head_dim]`` per
    layer (keys in the engine's rotary layout) and written in place; ``length`` positions are filled.
    Grows (a copy) when a call needs more."""

    def __init__(self, arch: Arch, batch: int, capacity: int, dtype: torch.dtype, device: torch.device):
        self.arch, self.batch, self.dtype, self.device = arch, batch, dtype, device
        self.capacity = capacity
        shape = (batch, capacity, arch.kv_heads, arch.head_dim)
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(arch.layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(arch.layers)]
        self.length = 0

    def reserve(self, total: int) -> None:
        if total <= self.capacity:
            return
        cap = max(total, 2 * self.capacity)
        for store in (self.k, self.v):
            for i, t in enumerate(store):
                grown = torch.empty((t.shape[0], cap, *t.shape[2:]), dtype=t.dtype, device=t.device)
                grown[:, : self.length] = t[:, : self.length]
                store[i] = grown
        self.capacity = cap



@dataclass
class EngineOutput:
    logits: torch.Tensor
    past_key_values: KVCache | None


# ------------------------------------------------------------------------------------------- layers
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' RMSNorm: in float32, the weight applied after casting back (torch's fused op for
    float32 input computes exactly that)."""
    if x.dtype == torch.float32:
        return torch.rms_norm(x, weight.shape, weight, eps)
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def interleave_rotary(w: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """Rows (or entries) of a q/k projection, its bias or norm, from transformers' rotate-half layout
    (pair i is dims i and i + d/2 of each head) to adjacent pairs (2i, 2i + 1)."""
    half = head_dim // 2
    perm = torch.stack([torch.arange(half), torch.arange(half) + half], dim=-1).reshape(-1)
    shape = w.shape
    return w.reshape(heads, head_dim, *shape[1:])[:, perm].reshape(shape)


def _rotate(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs of the last dim of ``x`` [b, t, heads, d] by ``rot`` [t, 1, d/2] (complex)."""
    shape = x.shape
    if x.dtype == torch.float32:
        return torch.view_as_real(torch.view_as_complex(x.reshape(*shape[:-1], -1, 2)) * rot).reshape(shape)
    xc = torch.view_as_complex(x.float().reshape(*shape[:-1], -1, 2))
    return torch.view_as_real(xc * rot).reshape(shape).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, arch: Arch, index: int, qkv: Linear, o: Linear, qkv_bias: torch.Tensor | None,
                 o_bias: torch.Tensor | None, q_norm: torch.Tensor | None, k_norm: torch.Tensor | None):
        super().__init__()
        self.arch, self.index = arch, index
        self.qkv, self.o = qkv, o
        self.qkv_bias, self.o_bias = qkv_bias, o_bias
        self.q_norm, self.k_norm = q_norm, k_norm
        self.window = arch.windows[index]
        d = arch.head_dim
        self.q_size, self.kv_size = arch.heads * d, arch.kv_heads * d
        self.gqa = arch.kv_heads != arch.heads

    def forward(self, x: torch.Tensor, rot: torch.Tensor, cache: KVCache | None, pos: int,
                mask: torch.Tensor | None) -> torch.Tensor:
        a = self.arch
        b, t, _ = x.shape
        qkv = self.qkv(x)
        if self.qkv_bias is not None:
            qkv = qkv + self.qkv_bias
        if a.qk_norm is None and a.clip_qkv is None:
            qk = _rotate(qkv[..., : self.q_size + self.kv_size].view(b, t, a.heads + a.kv_heads, a.head_dim), rot)
            q, k = qk[:, :, : a.heads], qk[:, :, a.heads:]
        else:
            q, k = qkv[..., : self.q_size], qkv[..., self.q_size: self.q_size + self.kv_size]
            if a.qk_norm == "full":
                q, k = rms_norm(q, self.q_norm, a.eps), rms_norm(k, self.k_norm, a.eps)
            if a.clip_qkv is not None:
                q, k = q.clamp(-a.clip_qkv, a.clip_qkv), k.clamp(-a.clip_qkv, a.clip_qkv)
            q, k = q.reshape(b, t, a.heads, a.head_dim), k.reshape(b, t, a.kv_heads, a.head_dim)
            if a.qk_norm == "head":
                q, k = rms_norm(q, self.q_norm, a.eps), rms_norm(k, self.k_norm, a.eps)
            q, k = _rotate(q, rot), _rotate(k, rot)
        v = qkv[..., self.q_size + self.kv_size:].view(b, t, a.kv_heads, a.head_dim)
        if a.clip_qkv is not None:
            v = v.clamp(-a.clip_qkv, a.clip_qkv)
        if cache is not None:
            kc, vc = cache.k[self.index], cache.v[self.index]
            kc[:, pos: pos + t] = k
            vc[:, pos: pos + t] = v
            k, v = kc[:, : pos + t], vc[:, : pos + t]
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        causal = False
        if mask is None and t > 1:
            if self.window is not None and pos + t > self.window:
                mask = _mask(t, pos, self.window, None, x.device)
            elif pos == 0:
                causal = True
            else:
                mask = _mask(t, pos, None, None, x.device)
        elif mask is None and self.window is not None and pos + t > self.window:  # one query: the last keys
            k, v = k[:, :, pos + t - self.window:], v[:, :, pos + t - self.window:]
        elif mask is not None and self.window is not None:
            mask = mask & _mask(t, pos, self.window, None, x.device)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=self.gqa)
        o = self.o(o.transpose(1, 2).reshape(b, t, self.q_size))
        return o if self.o_bias is None else o + self.o_bias


def _mask(t: int, pos: int, window: int | None, keep: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """[.., t, pos + t] bool: query i (position pos + i) sees key j when j <= pos + i (and, with a window,
    j > pos + i - window, transformers' convention), and ``keep[b, j]`` (padding) allows it; a query
    always sees itself, so no row is empty."""
    qpos = torch.arange(pos, pos + t, device=device)[:, None]
    kpos = torch.arange(pos + t, device=device)[None, :]
    allowed = kpos <= qpos
    if window is not None:
        allowed = allowed & (kpos > qpos - window)
    if keep is not None:
        allowed = (allowed[None] & keep[:, None, :].bool()) | (kpos == qpos)[None]
        return allowed[:, None]
    return allowed


class MLP(nn.Module):
    """A dense SwiGLU MLP (Qwen's dense layers and shared expert): ``down(act(gate) * up)``."""

    def __init__(self, gate_up: Linear, down: Linear, act: Callable):
        super().__init__()
        self.gate_up, self.down, self.act = gate_up, down, act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, u = self.gate_up(x).chunk(2, dim=-1)
        return self.down(self.act(g) * u)


class _GateLogit:
    """Qwen2-MoE's shared-expert gate ``x @ w.T`` ([1, H]), a plain callable."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class DecoderLayer(nn.Module):
    def __init__(self, arch: Arch, attn: Attention, mlp: nn.Module, in_norm: torch.Tensor, post_norm: torch.Tensor):
        super().__init__()
        self.arch = arch
        self.self_attn = attn
        self.mlp = mlp
        self.in_norm, self.post_norm = in_norm, post_norm

    def forward(self, h: torch.Tensor, rot: torch.Tensor, cache: KVCache | None, pos: int,
                mask: torch.Tensor | None) -> torch.Tensor:
        # .forward, not __call__: these modules carry no hooks, and a call costs microseconds a layer
        # (the expert store inside the MoE block is still called as a module: tracers hook it)
        eps = self.arch.eps
        h = h + self.self_attn.forward(rms_norm(h, self.in_norm, eps), rot, cache, pos, mask)
        return h + self.mlp.forward(rms_norm(h, self.post_norm, eps))


class _Body(nn.Module):
    """``model.model``: the layers, where tracers and planners look for ``layers.N.mlp``."""

    def __init__(self, layers: list[DecoderLayer]):
        super().__init__()
        self.layers = nn.ModuleList(layers)


# -------------------------------------------------------------------------------------------- model
class EngineModel(nn.Module):
    """moecap's decoder over an expert placement plan; called like a transformers causal LM
    (``model(input_ids=..., past_key_values=cache, logits_to_keep=1).logits``)."""

    def __init__(self, config: Any, arch: Arch, embed: torch.Tensor, layers: list[DecoderLayer], norm: torch.Tensor,
                 lm_head: Linear, plan: ExpertPlan, device: torch.device, dtype: torch.dtype, rope: "Rope",
                 load_info: dict[str, Any] | None = None):
        super().__init__()
        self.config, self.arch = config, arch
        self.embed, self.norm, self.lm_head = embed, norm, lm_head
        self.model = _Body(layers)
        self.plan = plan
        self.device, self.dtype = device, dtype
        self.rope = rope
        self.load_info = load_info or {}

    # -- what a runner asks ---------------------------------------------------------------------
    @property
    def stores(self) -> list[ExpertStore]:
        return [layer.mlp.experts for layer in self.model.layers if isinstance(layer.mlp, EngineMoeBlock)]

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        return KVCache(self.arch, batch, capacity, self.dtype, self.device)

    def non_expert_linears(self) -> list[Linear]:
        out: list[Linear] = [self.lm_head]
        for layer in self.model.layers:
            out += [layer.self_attn.qkv, layer.self_attn.o]
            mlp = layer.mlp
            if isinstance(mlp, MLP):
                out += [mlp.gate_up, mlp.down]
            elif isinstance(mlp.shared_expert, MLP):
                out += [mlp.shared_expert.gate_up, mlp.shared_expert.down]
        return out

    def non_expert_bytes(self) -> int:
        """Bytes of every weight but the routed experts (embedding, attention, norms, routers, shared
        experts, dense layers, LM head), as stored (counting a tied head once)."""
        tensors = [self.embed, self.norm]
        for layer in self.model.layers:
            at = layer.self_attn
            tensors += [layer.in_norm, layer.post_norm] + [t for t in (at.qkv_bias, at.o_bias, at.q_norm, at.k_norm)
                                                           if t is not None]
            if isinstance(layer.mlp, EngineMoeBlock):
                tensors.append(layer.mlp.gate.weight)
                if isinstance(layer.mlp.shared_expert_gate, _GateLogit):
                    tensors.append(layer.mlp.shared_expert_gate.weight)
        total = sum(t.numel() * t.element_size() for t in tensors)
        lins = self.non_expert_linears()
        if self.arch.tie:
            lins = lins[1:]  # the head is the embedding
        return total + sum(lin.nbytes() for lin in lins)

    def kernels(self) -> dict[str, Any]:
        """Which kernel ran each kind of matrix: non-expert weights, and routed experts per precision."""
        return {"non_expert": kernel_summary(self.non_expert_linears()),
                "experts": kernel_summary(k for s in self.stores for k in s.kernels())}

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, past_key_values: KVCache | None = None,
                attention_mask: torch.Tensor | None = None, use_cache: bool = True, logits_to_keep: int = 0,
                **_: Any) -> EngineOutput:
        b, t = input_ids.shape
        cache = past_key_values if use_cache else None
        if cache is not None and not isinstance(cache, KVCache):
            raise TypeError(f"the engine's model keeps its own KV cache (model.new_cache), not {type(cache).__name__}")
        pos = cache.length if cache is not None else 0
        if cache is not None:
            cache.reserve(pos + t)
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            mask = _mask(t, pos, None, attention_mask.to(input_ids.device), input_ids.device)
        rot = self.rope.at(pos, t)
        h = F.embedding(input_ids, self.embed)
        for layer in self.model.layers:
            h = layer.forward(h, rot, cache, pos, mask)
        if cache is not None:
            cache.length = pos + t
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        return EngineOutput(self.lm_head(rms_norm(h, self.norm, self.arch.eps)), cache)

    # -- building ----------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, model: nn.Module, plan: ExpertPlan | Callable[["EngineModel"], ExpertPlan], device: str | torch.device,
                cost: CostModel | None = None, cache_size: int = 2) -> "EngineModel":
        """The engine's model of a transformers model in memory (its weights are copied, not moved)."""
        return build(model.config, HFSource(model), plan, device, next(model.parameters()).dtype, cost, cache_size)


class Rope:
    """The rotation of every position up to a capacity, as complex numbers ``cos + i sin`` [n, 1, d/2],
    from the family's own transformers rotary class (so every rope type transformers implements, and its
    attention scaling, come out identical)."""

    def __init__(self, config: Any, dtype: torch.dtype, device: torch.device):
        self.config, self.dtype, self.device = config, dtype, device
        self.table: torch.Tensor | None = None
        self.capacity = 0

    def _grow(self, n: int) -> None:
        import importlib

        fam = self.config.model_type
        mod = importlib.import_module(f"transformers.models.{fam}.modeling_{fam}")
        rot_cls = next(getattr(mod, name) for name in dir(mod) if name.endswith("RotaryEmbedding"))
        n = max(n, 2 * self.capacity, 256)
        with torch.device(self.device):
            rot = rot_cls(config=self.config)
        pos = torch.arange(n, device=self.device)[None]
        cos, sin = rot(torch.zeros(1, dtype=self.dtype, device=self.device), pos)  # [1, n, d], halves repeated
        half = cos.shape[-1] // 2
        self.table = torch.complex(cos[0, :, None, :half].float(), sin[0, :, None, :half].float())
        self.capacity = n

    def at(self, pos: int, t: int) -> torch.Tensor:
        if pos + t > self.capacity:
            self._grow(pos + t)
        return self.table[pos: pos + t]


# --------------------------------------------------------------------------------------- sources
class TensorSource:
    """Where the weights come from, in transformers' module names (``model.layers.0.self_attn.q_proj.weight``)."""

    def get(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def has(self, name: str) -> bool:
        raise NotImplementedError

    def router(self, layer: int) -> torch.Tensor:
        raise NotImplementedError

    def expert(self, layer: int, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert ``e`` of ``layer``: gate_up [2I, H] (gate rows first) and down [H, I]."""
        raise NotImplementedError


class HFSource(TensorSource):
    def __init__(self, model: nn.Module):
        self.params = {n: p.detach() for n, p in model.named_parameters()}
        self.params.update({n: b for n, b in model.named_buffers()})

    def get(self, name: str) -> torch.Tensor:
        try:
            return self.params[name]
        except KeyError:
            raise CheckpointError(f"the model has no parameter {name!r}") from None

    def has(self, name: str) -> bool:
        return name in self.params

    def router(self, layer: int) -> torch.Tensor:
        return self.get(f"model.layers.{layer}.mlp.gate.weight")

    def expert(self, layer: int, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        p = f"model.layers.{layer}.mlp.experts."
        return self.get(p + "gate_up_proj")[e], self.get(p + "down_proj")[e]


class CheckpointSource(TensorSource):
    """A Hugging Face checkpoint directory's safetensors (one file or an index of shards), memory-mapped
    and read one tensor at a time. Expert names: Mixtral's classic ``block_sparse_moe.experts.M.w1/w3/w2``,
    the per-expert ``mlp.experts.M.gate_proj/up_proj/down_proj``, or transformers 5's fused
    ``mlp.experts.gate_up_proj`` / ``down_proj`` (sliced, never read whole)."""

    def __init__(self, path: str | Path):
        from safetensors import safe_open

        self.path = Path(path)
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (self.path / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            raise CheckpointError(f"{self.path}: no model.safetensors or model.safetensors.index.json "
                                  "(the engine streams safetensors checkpoints)")
        self._open = safe_open
        self._handles: dict[str, Any] = {}
        self._where: dict[str, str] = {}
        for f in files:
            fp = self.path / f
            if not fp.is_file():
                raise CheckpointError(f"{fp}: named by the checkpoint index but missing")
            for k in self._handle(f).keys():
                self._where[k] = f
        self.release()
        self.bytes_read = 0

    def _handle(self, f: str) -> Any:
        h = self._handles.get(f)
        if h is None:
            h = self._handles[f] = self._open(str(self.path / f), framework="pt")
        return h

    def release(self) -> None:
        """Unmap the files: pages read so far leave the process (they stay in the page cache). The loader
        calls it after each layer, so mapped pages never exceed about one layer."""
        self._handles.clear()

    def has(self, name: str) -> bool:
        return name in self._where

    def _alias(self, name: str) -> str:
        if name in self._where:
            return name
        alt = name.replace(".mlp.gate.", ".block_sparse_moe.gate.")
        if alt in self._where:
            return alt
        raise CheckpointError(f"{self.path}: the checkpoint has no tensor {name!r}")

    def get(self, name: str) -> torch.Tensor:
        key = self._alias(name)
        t = self._handle(self._where[key]).get_tensor(key)
        self.bytes_read += t.numel() * t.element_size()
        return t

    def _slice(self, name: str, e: int) -> torch.Tensor:
        t = self._handle(self._where[name]).get_slice(name)[e]
        self.bytes_read += t.numel() * t.element_size()
        return t

    def router(self, layer: int) -> torch.Tensor:
        return self.get(f"model.layers.{layer}.mlp.gate.weight")

    def expert(self, layer: int, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        for base, (g, u, d) in ((f"model.layers.{layer}.block_sparse_moe.experts.{e}.", ("w1", "w3", "w2")),
                                (f"model.layers.{layer}.mlp.experts.{e}.", ("gate_proj", "up_proj", "down_proj"))):
            if base + f"{g}.weight" in self._where:
                gate, up, down = (self.get(base + f"{n}.weight") for n in (g, u, d))
                return torch.cat([gate, up]), down
        fused = f"model.layers.{layer}.mlp.experts."
        if fused + "gate_up_proj" in self._where:
            return self._slice(fused + "gate_up_proj", e), self._slice(fused + "down_proj", e)
        raise CheckpointError(f"{self.path}: no weights for expert {e} of layer {layer} (looked for "
                              "block_sparse_moe.experts.E.w1, mlp.experts.E.gate_proj and mlp.experts.gate_up_proj)")


class RandomSource(TensorSource):
    """Random weights on a real architecture config, drawn one tensor at a time (the model is never
    materialized): matrices N(0, ``initializer_range``), norm weights 1, biases 0, each tensor from a
    generator seeded by ``seed`` and its name. The tensor names and shapes are those of the transformers
    model, built on the meta device. (Not transformers' own draw: routing statistics agree with a
    ``random:`` model of the ``hf`` runner in distribution, not token by token.)"""

    def __init__(self, config: Any, seed: int = 0):
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
        self.shapes = {n: tuple(p.shape) for n, p in skeleton.named_parameters()}
        self.std = float(getattr(config, "initializer_range", 0.02) or 0.02)
        self.seed = seed

    def has(self, name: str) -> bool:
        return name in self.shapes

    def _draw(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        import zlib

        if len(shape) == 1:
            return torch.zeros(shape) if name.endswith(".bias") else torch.ones(shape)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(name.encode()))
        return torch.randn(shape, generator=g) * self.std

    def get(self, name: str) -> torch.Tensor:
        if name not in self.shapes:
            raise CheckpointError(f"the architecture has no tensor {name!r}")
        return self._draw(name, self.shapes[name])

    def router(self, layer: int) -> torch.Tensor:
        return self.get(f"model.layers.{layer}.mlp.gate.weight")

    def expert(self, layer: int, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        p = f"model.layers.{layer}.mlp.experts."
        return (self._draw(f"{p}{e}.gate_up_proj", self.shapes[p + "gate_up_proj"][1:]),
                self._draw(f"{p}{e}.down_proj", self.shapes[p + "down_proj"][1:]))


# -------------------------------------------------------------------------------------------- build
def build(config: Any, src: TensorSource, plan: ExpertPlan | Callable[[Arch], ExpertPlan], device: str | torch.device,
          dtype: torch.dtype, cost: CostModel | None = None, cache_size: int = 2,
          progress: Callable[[str], None] | None = None) -> EngineModel:
    """Build the engine's model from ``src`` into ``plan`` (or ``plan(arch)``), layer by layer: non-expert
    weights to ``device`` in ``dtype``, then each expert read, quantized and placed per its slot."""
    arch = Arch.from_config(config)
    fast = torch.device(device)
    host = torch.device("cpu")
    cost = cost or CostModel()
    if callable(plan) and not isinstance(plan, ExpertPlan):
        plan = plan(arch)
    missing = [i for i in arch.moe_layers if i not in plan.layers]
    if missing:
        raise PlanError(f"the plan has no slots for MoE layers {missing}")
    for i in arch.moe_layers:
        if len(plan.layers[i]) != arch.experts:
            raise PlanError(f"layer {i}: the plan has {len(plan.layers[i])} slots for {arch.experts} experts")
    act = _act(arch.act)
    t0 = time.perf_counter()

    def own(t: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        # a checkpoint's tensors are views of its memory-mapped file: keep a copy, never the mapping
        return t.clone() if t.data_ptr() == source.data_ptr() else t

    def w(name: str) -> torch.Tensor:
        t = src.get(name)
        return own(t.to(device=fast, dtype=dtype), t)

    def lin(*names: str) -> Linear:
        ts = [src.get(n) for n in names]
        if len(ts) == 1:
            return make_linear(own(ts[0].to(dtype=dtype), ts[0]), fast)
        return make_linear(torch.cat(ts).to(dtype=dtype), fast)

    def rq(t: torch.Tensor) -> torch.Tensor:
        return interleave_rotary(t, arch.heads, arch.head_dim)

    def rk(t: torch.Tensor) -> torch.Tensor:
        return interleave_rotary(t, arch.kv_heads, arch.head_dim)

    embed = w("model.embed_tokens.weight").contiguous()
    layers: list[DecoderLayer] = []
    for i in range(arch.layers):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        qkv = make_linear(torch.cat([rq(src.get(a + "q_proj.weight")), rk(src.get(a + "k_proj.weight")),
                                     src.get(a + "v_proj.weight")]).to(dtype), fast)
        bias = None
        if arch.qkv_bias:
            bias = torch.cat([rq(w(a + "q_proj.bias")), rk(w(a + "k_proj.bias")), w(a + "v_proj.bias")])
        qn = kn = None
        if arch.qk_norm == "head":  # one head_dim vector shared by every head
            qn, kn = (interleave_rotary(w(a + f"{n}_norm.weight"), 1, arch.head_dim) for n in "qk")
        elif arch.qk_norm == "full":
            qn, kn = rq(w(a + "q_norm.weight")), rk(w(a + "k_norm.weight"))
        attn = Attention(arch, i, qkv, lin(a + "o_proj.weight"), bias, w(a + "o_proj.bias") if arch.o_bias else None,
                         qn, kn)
        if i in arch.moe_layers:
            experts = []
            for e, slot in enumerate(plan.layers[i]):
                gu, dn = src.expert(i, e)
                experts.append(StoredExpert(gu.to(dtype), dn.to(dtype), slot, plan.group_size, fast, host, act))
                del gu, dn
            store = ExpertStore(i, experts, act, fast, host, cost, cache_size)
            shared = gate = None
            if arch.shared_inter:
                s = p + "mlp.shared_expert."
                shared = MLP(lin(s + "gate_proj.weight", s + "up_proj.weight"), lin(s + "down_proj.weight"), act)
                gate = _GateLogit(w(p + "mlp.shared_expert_gate.weight"))
            r = src.router(i)
            router = Router(own(r.to(device=fast, dtype=dtype), r))
            mlp: nn.Module = EngineMoeBlock(None, store, arch.family, arch.top_k, arch.norm_topk, gate=router,
                                            shared_expert=shared, shared_expert_gate=gate)
        else:
            m = p + "mlp."
            mlp = MLP(lin(m + "gate_proj.weight", m + "up_proj.weight"), lin(m + "down_proj.weight"), act)
        layers.append(DecoderLayer(arch, attn, mlp, w(p + "input_layernorm.weight"), w(p + "post_attention_layernorm.weight")))
        if isinstance(src, CheckpointSource):
            src.release()
        if progress is not None:
            progress(f"layer {i + 1}/{arch.layers}")
    if arch.tie or not src.has("lm_head.weight"):
        head: Linear = DenseLinear(embed, pack=False)
    else:
        head = lin("lm_head.weight")
    info = {"seconds": time.perf_counter() - t0}
    if isinstance(src, CheckpointSource):
        info.update({"source": str(src.path), "streamed": True, "bytes_read": src.bytes_read})
    model = EngineModel(config, arch, embed, layers, w("model.norm.weight"), head, plan, fast, dtype,
                        Rope(config, dtype, fast), info)
    return model.eval()


def load_engine_model(path: str | Path, plan: ExpertPlan | Callable[[Arch], ExpertPlan], device: str | torch.device,
                      dtype: torch.dtype, cost: CostModel | None = None, cache_size: int = 2,
                      progress: Callable[[str], None] | None = None) -> EngineModel:
    """Stream the checkpoint at ``path`` (a local directory) into the engine's model per ``plan``."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    with torch.inference_mode():
        return build(config, CheckpointSource(path), plan, device, dtype, cost, cache_size, progress)


def replace_plan(model: EngineModel, plan: ExpertPlan) -> None:
    """Re-place the experts of ``model`` (all at full precision) into ``plan``, one expert at a time."""
    for s in model.stores:
        slots: Sequence = plan.layers[s.layer]
        for e, slot in enumerate(slots):
            old = s.experts[e]
            if old.slot == slot:
                continue
            if old.slot.precision != "full":
                raise PlanError("re-placing experts needs them at full precision")
            s.experts[e] = StoredExpert(old.gate_up, old.down, slot, plan.group_size, s.fast, s.host, s.act_fn)
    model.plan = plan
