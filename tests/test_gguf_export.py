"""GGUF export of the trained tiny-moe: file structure, and llama.cpp computing what transformers computes."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

TEXT = "def parse_args(argv):\n    parser = argparse.ArgumentParser(description=__doc__)\n    return parser"


@pytest.fixture(scope="module")
def exported(tiny_moe_dir, tmp_path_factory):
    from moecap.gguf_export import export_gguf

    out = tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf"
    info = export_gguf(tiny_moe_dir, out, "f32")
    return out, info


def test_gguf_structure(exported, tiny_moe_dir):
    path, info = exported
    cfg = json.loads((tiny_moe_dir / "config.json").read_text())
    reader = gguf.GGUFReader(str(path))

    def field(name):
        f = reader.fields[name]
        return f.contents()

    assert field("general.architecture") == "llama"
    assert field("llama.block_count") == cfg["num_hidden_layers"]
    assert field("llama.expert_count") == cfg["num_local_experts"]
    assert field("llama.expert_used_count") == cfg["num_experts_per_tok"]
    assert field("llama.attention.head_count_kv") == cfg["num_key_value_heads"]
    assert field("tokenizer.ggml.model") == "gpt2"
    assert field("tokenizer.ggml.pre") == "gpt-2"
    assert field("tokenizer.ggml.add_bos_token") is False  # the tiny tokenizer adds no BOS
    assert len(field("tokenizer.ggml.tokens")) == cfg["vocab_size"]
    tensors = {t.name: t for t in reader.tensors}
    E, inter, hidden = cfg["num_local_experts"], cfg["intermediate_size"], cfg["hidden_size"]
    for i in range(cfg["num_hidden_layers"]):
        # gguf lists dims innermost first: [H, I, E] is numpy [E, I, H]
        assert list(tensors[f"blk.{i}.ffn_gate_exps.weight"].shape) == [hidden, inter, E]
        assert list(tensors[f"blk.{i}.ffn_up_exps.weight"].shape) == [hidden, inter, E]
        assert list(tensors[f"blk.{i}.ffn_down_exps.weight"].shape) == [inter, hidden, E]
        assert list(tensors[f"blk.{i}.ffn_gate_inp.weight"].shape) == [hidden, E]
    assert info["parameters"] == sum(int(np.prod(t.shape)) for t in reader.tensors)
    assert info["tensor_bytes"] == 4 * info["parameters"]
    assert info["moe_layers"] == cfg["num_hidden_layers"]


def test_gguf_expert_weights_match_checkpoint(exported, tiny_moe_dir):
    """Expert e of layer 0 in the file is the checkpoint's w1/w3/w2 of expert e (stacking order)."""
    from safetensors.numpy import load_file

    path, _ = exported
    state = load_file(str(tiny_moe_dir / "model.safetensors"))
    tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    gate = np.asarray(tensors["blk.0.ffn_gate_exps.weight"].data)
    down = np.asarray(tensors["blk.0.ffn_down_exps.weight"].data)
    for e in (0, 5):
        np.testing.assert_array_equal(gate[e], state[f"model.layers.0.block_sparse_moe.experts.{e}.w1.weight"])
        np.testing.assert_array_equal(down[e], state[f"model.layers.0.block_sparse_moe.experts.{e}.w2.weight"])


def _llama(path):
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(str(path), n_ctx=256, logits_all=True, verbose=False, n_threads=1, seed=0)


def _hf(tiny_moe_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_moe_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_moe_dir, dtype=torch.float32).eval()
    return tok, model


def test_llama_cpp_matches_transformers(exported, tiny_moe_dir):
    """Same token ids, logits within float tolerance, identical greedy continuation."""
    import torch

    path, _ = exported
    tok, model = _hf(tiny_moe_dir)
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    llm = _llama(path)
    try:
        assert llm.tokenize(TEXT.encode(), add_bos=False, special=False) == ids
        llm.eval(ids)
        ours = np.array(llm.scores[: len(ids)])
        with torch.no_grad():
            ref = model(torch.tensor([ids])).logits[0].numpy()
        assert np.abs(ours - ref).max() < 1e-2 * max(1.0, np.abs(ref).max())
        assert (ours.argmax(-1) == ref.argmax(-1)).all()
        with torch.no_grad():
            want = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)[0, len(ids):].tolist()
        llm.reset()
        got = []
        for t in llm.generate(ids, temp=0.0, top_k=1):
            got.append(t)
            if len(got) == len(want):
                break
        assert got == want
    finally:
        llm.close()


def test_q8_0_export_is_smaller_and_close(tiny_moe_dir, tmp_path):
    import torch

    from moecap.gguf_export import export_gguf

    info = export_gguf(tiny_moe_dir, tmp_path / "q8.gguf", "q8_0")
    f32 = export_gguf(tiny_moe_dir, tmp_path / "f32.gguf", "f32")
    assert info["tensor_bytes"] < 0.35 * f32["tensor_bytes"]  # 34 bytes per 32 weights vs 128
    tok, model = _hf(tiny_moe_dir)
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    llm = _llama(tmp_path / "q8.gguf")
    try:
        llm.eval(ids)
        ours = np.array(llm.scores[: len(ids)])
    finally:
        llm.close()
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    agree = (ours.argmax(-1) == ref.argmax(-1)).mean()
    assert agree > 0.9, agree


def test_export_errors_name_the_problem(tiny_moe_dir, tmp_path):
    from moecap.gguf_export import GGUFExportError, export_gguf

    bad = tmp_path / "qwen"
    shutil.copytree(tiny_moe_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model_type"] = "qwen3_moe"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(GGUFExportError, match=r"config.json: model_type 'qwen3_moe'.*allowed: mixtral"):
        export_gguf(bad, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()

    spm = tmp_path / "spm"
    shutil.copytree(tiny_moe_dir, spm)
    tj = json.loads((spm / "tokenizer.json").read_text())
    tj["pre_tokenizer"] = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first", "split": False}
    (spm / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(GGUFExportError, match=r"tokenizer.json.*Metaspace.*convert_hf_to_gguf"):
        export_gguf(spm, tmp_path / "y.gguf")

    with pytest.raises(GGUFExportError, match="weight_type 'q4'"):
        export_gguf(tiny_moe_dir, tmp_path / "z.gguf", "q4")


def test_ensure_gguf_caches_by_content(tiny_moe_dir, tmp_path):
    from moecap.gguf_export import ensure_gguf

    a = ensure_gguf(tiny_moe_dir, "f32", cache_root=tmp_path)
    mtime = a.stat().st_mtime_ns
    b = ensure_gguf(tiny_moe_dir, "f32", cache_root=tmp_path)
    assert a == b and b.stat().st_mtime_ns == mtime  # not rewritten
    assert json.loads(a.with_suffix(".json").read_text())["weight_type"] == "f32"
    assert ensure_gguf(tiny_moe_dir, "f16", cache_root=tmp_path) != a


def test_export_gguf_cli(tiny_moe_dir, tmp_path):
    from test_e2e_cli import moecap

    out = tmp_path / "cli.gguf"
    proc = moecap("export-gguf", str(tiny_moe_dir), "-o", str(out), "--weight-type", "f16", check=0)
    info = json.loads(proc.stdout)
    assert info["weight_type"] == "f16" and out.is_file() and info["file_bytes"] == out.stat().st_size
    bad = moecap("export-gguf", str(tmp_path / "missing"), check=2)
    assert "not a local model directory" in bad.stderr


def _llama_cpp_tree():
    from moecap.llamacpp_build import find_source_tree

    tree = find_source_tree()
    if tree is None:
        pytest.skip("llama.cpp's source tree is not here (set MOECAP_LLAMA_CPP_DIR, or `moecap llamacpp build`)")
    return tree


@pytest.mark.slow
@pytest.mark.parametrize("weight_type", ["f32", "f16", "q8_0"])
def test_export_matches_llama_cpp_converter(tiny_moe_dir, tmp_path, weight_type):
    """Tensor for tensor, moecap's export is what llama.cpp's own converter writes for the same checkpoint:
    the same names, shapes, storage types (the router and the norms F32 at every type) and bytes."""
    import subprocess
    import sys
    from pathlib import Path

    from moecap.gguf_export import export_gguf

    tree = _llama_cpp_tree()
    ours = tmp_path / "ours.gguf"
    theirs = tmp_path / "theirs.gguf"
    export_gguf(tiny_moe_dir, ours, weight_type)
    wrapper = Path(__file__).parent / "tools" / "convert_declared_gpt2.py"
    res = subprocess.run([sys.executable, str(wrapper), str(tree), str(tiny_moe_dir), "--outtype", weight_type,
                          "--outfile", str(theirs)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    a = {t.name: t for t in gguf.GGUFReader(str(ours)).tensors}
    b = {t.name: t for t in gguf.GGUFReader(str(theirs)).tensors}
    assert set(a) == set(b)
    router = [n for n in a if "ffn_gate_inp" in n]
    assert router and all(a[n].tensor_type == gguf.GGMLQuantizationType.F32 for n in router)
    for name in sorted(a):
        x, y = a[name], b[name]
        assert x.tensor_type == y.tensor_type, (name, x.tensor_type.name, y.tensor_type.name)
        assert list(x.shape) == list(y.shape), name
        assert np.array_equal(np.asarray(x.data), np.asarray(y.data)), name
    r = gguf.GGUFReader(str(theirs))
    for key in ("llama.expert_count", "llama.expert_used_count", "llama.rope.freq_base", "general.file_type",
                "llama.attention.head_count_kv", "tokenizer.ggml.pre"):
        assert gguf.GGUFReader(str(ours)).fields[key].contents() == r.fields[key].contents(), key


def test_router_stays_f32_at_every_weight_type(tiny_moe_dir, tmp_path):
    """The router decides which experts run; llama.cpp's converter and quantizer never round it."""
    from moecap.gguf_export import WEIGHT_TYPES, export_gguf

    for wt in WEIGHT_TYPES:
        out = tmp_path / f"m-{wt}.gguf"
        export_gguf(tiny_moe_dir, out, wt)
        types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(out)).tensors}
        routers = {n: t for n, t in types.items() if "ffn_gate_inp" in n}
        assert routers and set(routers.values()) == {gguf.GGMLQuantizationType.F32}, (wt, routers)
        norms = {t for n, t in types.items() if n.endswith("_norm.weight")}
        assert norms == {gguf.GGMLQuantizationType.F32}, wt
        if wt != "f32":
            assert types["blk.0.ffn_gate_exps.weight"] != gguf.GGMLQuantizationType.F32, wt
