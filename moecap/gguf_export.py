"""Export a Hugging Face Mixtral-family checkpoint (and dense Llama/Mistral) to GGUF for llama.cpp.

Written with the ``gguf`` package (the one llama.cpp ships), reading the checkpoint's safetensors
directly, so it needs neither torch nor transformers and reads one tensor at a time:

- architecture ``llama`` (llama.cpp serves Mixtral as ``llama`` with ``expert_count``), with the
  hyper-parameters of ``config.json``;
- attention ``q``/``k`` rows permuted per head from the Hugging Face rotate-half layout to the
  interleaved pairs that llama.cpp's ``llama`` RoPE rotates;
- experts stacked per layer into ``ffn_{gate,up}_exps`` [E, I, H] and ``ffn_down_exps`` [E, H, I], from
  either the classic per-expert names (``block_sparse_moe.experts.M.w1/w2/w3``) or transformers 5's fused
  ``mlp.experts.gate_up_proj`` / ``down_proj``; the router to ``ffn_gate_inp``;
- the tokenizer from ``tokenizer.json``: byte-level BPE with GPT-2 pre-tokenization becomes a
  ``gpt2`` vocabulary with pre-tokenizer ``gpt-2`` (what llama.cpp's converter cannot recognise for a
  locally trained tokenizer, whose hash it does not know).

Weight types: ``f32``, ``f16``, ``bf16``, ``q8_0`` or ``q4_0``. As llama.cpp's converter and its
``llama-quantize`` do, some tensors stay f32 at every weight type: 1-D tensors such as norms, and the
router ``ffn_gate_inp`` (routing picks experts by comparing its logits: rounding them changes which experts
run). A matrix whose rows do not divide into 32-weight blocks also stays f32. Other tokenizers
(SentencePiece) and architectures: use llama.cpp's ``convert_hf_to_gguf.py``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

FAMILIES = ("mixtral", "llama", "mistral")
WEIGHT_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")


class GGUFExportError(ValueError):
    pass


# -- checkpoint reading ----------------------------------------------------------------------------
class _Checkpoint:
    """Lazy access to every tensor of a (possibly sharded) safetensors checkpoint, as float32 numpy."""

    def __init__(self, model_dir: Path):
        from safetensors import safe_open

        self._files = sorted(model_dir.glob("*.safetensors"))
        if not self._files:
            raise GGUFExportError(f"{model_dir}: no *.safetensors files (only safetensors checkpoints are exported)")
        self._np = [safe_open(str(f), framework="numpy") for f in self._files]
        self._pt: dict[int, Any] = {}
        self._where: dict[str, int] = {k: i for i, h in enumerate(self._np) for k in h.keys()}

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> np.ndarray:
        try:
            i = self._where[name]
        except KeyError:
            raise GGUFExportError(f"checkpoint has no tensor {name!r}") from None
        if self._np[i].get_slice(name).get_dtype() == "BF16":  # numpy has no bfloat16: read through torch
            from safetensors import safe_open

            if i not in self._pt:
                self._pt[i] = safe_open(str(self._files[i]), framework="pt")
            return self._pt[i].get_tensor(name).float().numpy()
        return np.ascontiguousarray(self._np[i].get_tensor(name), dtype=np.float32)


def _permute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """Rows of a q/k projection from rotate-half (HF) to interleaved-pair (llama.cpp ``llama``) order."""
    out_dim = w.shape[0]
    head_dim = out_dim // n_head
    return w.reshape(n_head, 2, head_dim // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# -- tokenizer -------------------------------------------------------------------------------------
def _is_gpt2_byte_level(pre: dict[str, Any] | None) -> bool:
    """True for a ByteLevel pre-tokenizer that uses GPT-2's split regex (``use_regex``, no prefix space)."""
    if not pre:
        return False
    if pre.get("type") == "ByteLevel":
        return bool(pre.get("use_regex", True)) and not pre.get("add_prefix_space", False)
    if pre.get("type") == "Sequence":
        items = pre.get("pretokenizers") or []
        return len(items) == 1 and _is_gpt2_byte_level(items[0])
    return False


def tokenizer_vocab(model_dir: Path) -> dict[str, Any]:
    """Tokens, types, merges and special ids of a byte-level BPE ``tokenizer.json`` (GPT-2 style)."""
    import gguf

    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise GGUFExportError(f"{model_dir}: no tokenizer.json (a fast tokenizer is needed to export the vocabulary)")
    tj = json.loads(path.read_text(encoding="utf-8"))
    model = tj.get("model") or {}
    if model.get("type") != "BPE" or not _is_gpt2_byte_level(tj.get("pre_tokenizer")):
        raise GGUFExportError(
            f"{path}: model.type={model.get('type')!r}, pre_tokenizer={(tj.get('pre_tokenizer') or {}).get('type')!r}; "
            "only byte-level BPE with GPT-2 pre-tokenization is exported here (tokenizer model 'gpt2', "
            "pre-tokenizer 'gpt-2'); convert other tokenizers with llama.cpp's convert_hf_to_gguf.py"
        )
    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["content"]: t for t in tj.get("added_tokens") or []}
    for content, t in added.items():
        vocab[content] = int(t["id"])
    size = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [int(gguf.TokenType.UNUSED)] * size
    for tok, i in vocab.items():
        tokens[i] = tok
        if tok in added:
            types[i] = int(gguf.TokenType.CONTROL if added[tok].get("special") else gguf.TokenType.USER_DEFINED)
        else:
            types[i] = int(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]

    cfg_path = model_dir / "tokenizer_config.json"
    tcfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}

    def special_id(key: str) -> int | None:
        val = tcfg.get(key)
        if isinstance(val, dict):
            val = val.get("content")
        return vocab.get(val) if isinstance(val, str) else None

    from tokenizers import Tokenizer

    bos = special_id("bos_token")
    probe = Tokenizer.from_file(str(path)).encode("a", add_special_tokens=True).ids
    adds_bos = bos is not None and bool(probe) and probe[0] == bos  # what the post-processor really does
    return {
        "tokens": tokens,
        "types": types,
        "merges": merges,
        "bos": bos,
        "eos": special_id("eos_token"),
        "pad": special_id("pad_token"),
        "unk": special_id("unk_token"),
        "add_bos": bool(tcfg.get("add_bos_token", adds_bos)),
        "chat_template": tcfg.get("chat_template") if isinstance(tcfg.get("chat_template"), str) else None,
    }


# -- export ----------------------------------------------------------------------------------------
def _qtype(weight_type: str) -> Any:
    import gguf

    return {
        "f32": gguf.GGMLQuantizationType.F32,
        "f16": gguf.GGMLQuantizationType.F16,
        "bf16": gguf.GGMLQuantizationType.BF16,
        "q8_0": gguf.GGMLQuantizationType.Q8_0,
        "q4_0": gguf.GGMLQuantizationType.Q4_0,
    }[weight_type]


def _file_type(weight_type: str) -> Any:
    import gguf

    return {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    }[weight_type]


# tensors llama.cpp's converter (``ModelBase.prepare_tensors``) and quantizer keep f32 at every file type
_ALWAYS_F32 = re.compile(r"(^|\.)ffn_gate_inp(_shexp)?\.weight$|_norm\.weight$")

# bump when the exporter writes different bytes for the same checkpoint: cached exports are re-made
EXPORT_FORMAT = 2


def _encode(arr: np.ndarray, weight_type: str, name: str = "") -> tuple[np.ndarray, Any]:
    """``arr`` (float32) stored as ``weight_type``; 1-D tensors, routers and norms, and rows a block type
    cannot block, stay f32."""
    import gguf

    if arr.ndim == 1 or weight_type == "f32" or _ALWAYS_F32.search(name):
        return arr.astype(np.float32), gguf.GGMLQuantizationType.F32
    qtype = _qtype(weight_type)
    if weight_type == "f16":
        return arr.astype(np.float16), qtype
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if arr.shape[-1] % block:
        return arr.astype(np.float32), gguf.GGMLQuantizationType.F32
    return gguf.quants.quantize(arr, qtype), qtype


def _expert_tensors(ckpt: _Checkpoint, layer: int, n_experts: int) -> dict[str, np.ndarray] | None:
    """The layer's stacked experts and router, or None for a dense layer."""
    classic = f"model.layers.{layer}.block_sparse_moe"
    fused = f"model.layers.{layer}.mlp"
    if f"{classic}.gate.weight" in ckpt:
        def stack(w: str) -> np.ndarray:
            return np.stack([ckpt.get(f"{classic}.experts.{e}.{w}.weight") for e in range(n_experts)])

        return {"gate_inp": ckpt.get(f"{classic}.gate.weight"), "gate": stack("w1"), "up": stack("w3"),
                "down": stack("w2")}
    if f"{fused}.experts.gate_up_proj" in ckpt:
        gate_up = ckpt.get(f"{fused}.experts.gate_up_proj")  # [E, 2I, H]: gate rows, then up rows
        inter = gate_up.shape[1] // 2
        return {"gate_inp": ckpt.get(f"{fused}.gate.weight"), "gate": gate_up[:, :inter], "up": gate_up[:, inter:],
                "down": ckpt.get(f"{fused}.experts.down_proj")}
    return None


def export_gguf(model_dir: str | Path, out_path: str | Path, weight_type: str = "f32",
                progress: bool = False) -> dict[str, Any]:
    """Write ``model_dir`` (a Hugging Face checkpoint) as a GGUF file; return a summary
    (architecture, counts, bytes, weight type). The file appears atomically (temp file + rename)."""
    import gguf

    model_dir, out_path = Path(model_dir), Path(out_path)
    if weight_type not in WEIGHT_TYPES:
        raise GGUFExportError(f"weight_type {weight_type!r} is not one of {', '.join(WEIGHT_TYPES)}")
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise GGUFExportError(f"{model_dir}: no config.json (expected a Hugging Face model directory)")
    cfg = json.loads(cfg_path.read_text())
    family = cfg.get("model_type")
    if family not in FAMILIES:
        raise GGUFExportError(
            f"{cfg_path}: model_type {family!r} is not exported here (allowed: {', '.join(FAMILIES)}); "
            "use llama.cpp's convert_hf_to_gguf.py"
        )
    if cfg.get("rope_scaling"):
        raise GGUFExportError(f"{cfg_path}: rope_scaling {cfg['rope_scaling']!r} is not exported here")
    vocab = tokenizer_vocab(model_dir)
    ckpt = _Checkpoint(model_dir)

    n_layer = int(cfg["num_hidden_layers"])
    n_head = int(cfg["num_attention_heads"])
    n_kv = int(cfg.get("num_key_value_heads") or n_head)
    hidden = int(cfg["hidden_size"])
    head_dim = int(cfg.get("head_dim") or hidden // n_head)
    n_experts = int(cfg.get("num_local_experts") or 0)
    top_k = int(cfg.get("num_experts_per_tok") or 0)
    rope_theta = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta") or 10000.0

    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), "llama")
    writer.add_name(model_dir.name)
    writer.add_context_length(int(cfg.get("max_position_embeddings") or 2048))
    writer.add_embedding_length(hidden)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(int(cfg["intermediate_size"]))
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope_theta))
    writer.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-5)))
    writer.add_vocab_size(len(vocab["tokens"]))
    if n_experts:
        writer.add_expert_count(n_experts)
        writer.add_expert_used_count(top_k)
    writer.add_file_type(_file_type(weight_type))

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["types"])
    writer.add_token_merges(vocab["merges"])
    for key, fn in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                    ("pad", writer.add_pad_token_id), ("unk", writer.add_unk_token_id)):
        if vocab[key] is not None:
            fn(int(vocab[key]))
    writer.add_add_bos_token(vocab["add_bos"])
    if vocab["chat_template"]:
        writer.add_chat_template(vocab["chat_template"])

    n_bytes = 0
    n_params = 0

    def put(name: str, arr: np.ndarray) -> None:
        nonlocal n_bytes, n_params
        n_params += int(arr.size)
        data, qtype = _encode(arr, weight_type, name)
        n_bytes += int(data.nbytes)
        writer.add_tensor(name, data, raw_dtype=qtype)

    layers = range(n_layer)
    if progress:
        from tqdm import tqdm

        layers = tqdm(layers, desc=f"GGUF {model_dir.name}", unit="layer")
    put("token_embd.weight", ckpt.get("model.embed_tokens.weight"))
    moe_layers = 0
    for i in layers:
        p = f"model.layers.{i}"
        put(f"blk.{i}.attn_norm.weight", ckpt.get(f"{p}.input_layernorm.weight"))
        put(f"blk.{i}.attn_q.weight", _permute_rope(ckpt.get(f"{p}.self_attn.q_proj.weight"), n_head))
        put(f"blk.{i}.attn_k.weight", _permute_rope(ckpt.get(f"{p}.self_attn.k_proj.weight"), n_kv))
        put(f"blk.{i}.attn_v.weight", ckpt.get(f"{p}.self_attn.v_proj.weight"))
        put(f"blk.{i}.attn_output.weight", ckpt.get(f"{p}.self_attn.o_proj.weight"))
        put(f"blk.{i}.ffn_norm.weight", ckpt.get(f"{p}.post_attention_layernorm.weight"))
        experts = _expert_tensors(ckpt, i, n_experts) if n_experts else None
        if experts is not None:
            moe_layers += 1
            put(f"blk.{i}.ffn_gate_inp.weight", experts["gate_inp"])
            put(f"blk.{i}.ffn_gate_exps.weight", experts["gate"])
            put(f"blk.{i}.ffn_up_exps.weight", experts["up"])
            put(f"blk.{i}.ffn_down_exps.weight", experts["down"])
        elif f"{p}.mlp.gate_proj.weight" in ckpt:
            put(f"blk.{i}.ffn_gate.weight", ckpt.get(f"{p}.mlp.gate_proj.weight"))
            put(f"blk.{i}.ffn_up.weight", ckpt.get(f"{p}.mlp.up_proj.weight"))
            put(f"blk.{i}.ffn_down.weight", ckpt.get(f"{p}.mlp.down_proj.weight"))
        else:
            raise GGUFExportError(f"{model_dir}: layer {i} has neither experts nor a dense MLP in the checkpoint")
    put("output_norm.weight", ckpt.get("model.norm.weight"))
    if "lm_head.weight" in ckpt and not cfg.get("tie_word_embeddings", False):
        put("output.weight", ckpt.get("lm_head.weight"))

    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=False)
        writer.close()
        tmp.replace(out_path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return {
        "path": str(out_path),
        "source": str(model_dir),
        "architecture": "llama",
        "model_type": family,
        "weight_type": weight_type,
        "export_format": EXPORT_FORMAT,
        "layers": n_layer,
        "moe_layers": moe_layers,
        "experts": n_experts,
        "experts_per_token": top_k,
        "parameters": n_params,
        "tensor_bytes": n_bytes,
        "file_bytes": out_path.stat().st_size,
        "vocab_size": len(vocab["tokens"]),
    }


def _digest(model_dir: Path) -> str:
    """A content key of a model directory (names, sizes and mtimes of its files)."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted(model_dir.iterdir()):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def ensure_gguf(model_dir: str | Path, weight_type: str = "f32", cache_root: str | Path | None = None,
                progress: bool = False) -> Path:
    """The GGUF export of ``model_dir`` at ``weight_type``, cached under ``<cache>/gguf`` by content key."""
    from moecap.paths import cache_dir

    model_dir = Path(model_dir)
    root = Path(cache_root) if cache_root else cache_dir() / "gguf"
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", model_dir.name) or "model"
    out = root / f"{name}-{_digest(model_dir)}-v{EXPORT_FORMAT}-{weight_type}.gguf"
    if not out.is_file():
        info = export_gguf(model_dir, out, weight_type, progress=progress)
        (out.with_suffix(".json")).write_text(json.dumps(info, indent=2))
    return out


# ------------------------------------------------------------------------- reading a GGUF's real bytes

_GGUF_COMPONENTS = (
    (re.compile(r"^blk\.\d+\.attn_(q|k|v|qkv|output|q_a|q_b|kv_a_mqa|kv_b|k_b|v_b)\.weight$"), "attention"),
    (re.compile(r"^blk\.\d+\.ffn_gate_inp\.weight$"), "router"),
    (re.compile(r"^blk\.\d+\.ffn_(gate|up|down|gate_up)_exps\.weight$"), "experts"),
    (re.compile(r"^blk\.\d+\.ffn_(gate|up|down)_shexp\.weight$"), "shared_experts"),
    (re.compile(r"^blk\.\d+\.ffn_(gate|up|down)\.weight$"), "dense_ffn"),
    (re.compile(r"^output\.weight$"), "lm_head"),
)


def gguf_weight_bytes(path: str | Path) -> dict[str, Any]:
    """Bytes per parameter of a GGUF's weight matrices, per accounting component, at their real tensor
    types (a q8_0 block of 32 weights is 34 bytes, q4_0 18, K-quants and mixed files as stored).

    Returns ``{"bytes_per_param": {component: B/param}, "types": {component: {type: tensors}},
    "bytes": {component: bytes}, "params": {component: params}, "overall_bytes_per_param": float}``
    over attention, router, experts, shared_experts, dense_ffn and lm_head (the token embedding stands in
    for a tied LM head). Norms and biases (vectors) are left out, as the model accounting leaves them.
    """
    import gguf

    reader = gguf.GGUFReader(str(path))
    nbytes: dict[str, int] = {}
    params: dict[str, int] = {}
    types: dict[str, dict[str, int]] = {}
    embd = None
    for t in reader.tensors:
        if t.name == "token_embd.weight":
            embd = t
        comp = next((c for rx, c in _GGUF_COMPONENTS if rx.match(t.name)), None)
        if comp is None:
            continue
        nbytes[comp] = nbytes.get(comp, 0) + int(t.n_bytes)
        params[comp] = params.get(comp, 0) + int(t.n_elements)
        kinds = types.setdefault(comp, {})
        kinds[t.tensor_type.name] = kinds.get(t.tensor_type.name, 0) + 1
    if "lm_head" not in nbytes and embd is not None:  # tied: the LM head reads the embedding matrix
        nbytes["lm_head"], params["lm_head"] = int(embd.n_bytes), int(embd.n_elements)
        types["lm_head"] = {embd.tensor_type.name: 1}
    if not params:
        raise ValueError(f"{path}: no weight matrices with llama.cpp's tensor names (blk.N.attn_q.weight, ...)")
    total_b, total_p = sum(nbytes.values()), sum(params.values())
    return {
        "bytes_per_param": {c: nbytes[c] / params[c] for c in params if params[c]},
        "types": types,
        "bytes": nbytes,
        "params": params,
        "overall_bytes_per_param": total_b / total_p,
    }
