"""The engine's own decoder (moecap.engine.model) and kernels (moecap.engine.kernels): it computes what
transformers computes for every family the engine serves, streams checkpoints into a plan, and its
quantized experts stay within the per-element bound of their stored form."""

from __future__ import annotations

import json

import pytest
import torch

from moecap.engine.kernels import (
    DenseLinear,
    DequantLinear,
    Int4Linear,
    Int8Linear,
    compute_dtype,
    cpu_has_fast_bf16,
    make_linear,
)
from moecap.engine.model import CheckpointError, EngineModel, KVCache, RandomSource, build, load_engine_model
from moecap.engine.quant import expected_nbytes, quantize
from moecap.engine.store import ExpertPlan, PlanError, Slot, quantize_weight, weight_nbytes

FAMILIES = {
    "mixtral": dict(num_local_experts=6, num_experts_per_tok=2),
    # Qwen2-MoE: shared expert + sigmoid gate, qkv bias, a dense layer, no renormalisation
    "qwen2_moe": dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=64, shared_expert_intermediate_size=96,
                      norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[1]),
    # Qwen3-MoE: per-head q/k norms, renormalised top-k, explicit head_dim
    "qwen3_moe": dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=64, norm_topk_prob=True,
                      decoder_sparse_step=1, mlp_only_layers=[], head_dim=16),
    # OLMoE: whole-projection q/k norms, clip_qkv
    "olmoe": dict(num_experts=6, num_experts_per_tok=2, norm_topk_prob=False, clip_qkv=2.0),
}


def hf_model(family: str, layers: int = 3, seed: int = 0, **over):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    kw = dict(FAMILIES[family], **over)
    cfg = AutoConfig.for_model(family, vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                               bos_token_id=1, eos_token_id=2, pad_token_id=0, **kw)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    for p in model.parameters():  # transformers leaves some MoE tensors at zero until weights load
        torch.nn.init.normal_(p, std=0.05)
    return model


def uniform(placement: str = "fast", precision: str = "full"):
    return lambda arch: ExpertPlan.uniform(arch.experts_per_layer(), placement, precision)


IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------------------ equal to transformers
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_full_precision_equals_transformers(family):
    ref = hf_model(family)
    em = EngineModel.from_hf(ref, uniform(), "cpu")
    with torch.no_grad():
        want = ref(IDS).logits
        got = em(IDS, use_cache=False).logits
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
        # prefill + one token at a time through the preallocated cache
        cache = em.new_cache(2, 8)  # grows when the sequence outgrows it
        steps = [em(IDS[:, :16], past_key_values=cache).logits]
        steps += [em(IDS[:, t:t + 1], past_key_values=cache).logits for t in range(16, 24)]
        torch.testing.assert_close(torch.cat(steps, 1), want, atol=2e-5, rtol=1e-4)
        assert cache.length == 24 and cache.capacity >= 24
        # a chunk after a cached prefix (explicit causal mask)
        cache = em.new_cache(2, 32)
        chunks = [em(IDS[:, :10], past_key_values=cache).logits, em(IDS[:, 10:], past_key_values=cache).logits]
        torch.testing.assert_close(torch.cat(chunks, 1), want, atol=2e-5, rtol=1e-4)
        # left padding through attention_mask, as transformers takes it
        mask = torch.ones(2, 24, dtype=torch.long)
        mask[1, :5] = 0
        torch.testing.assert_close(em(IDS, attention_mask=mask, use_cache=False).logits[1, 5:],
                                   ref(IDS, attention_mask=mask).logits[1, 5:], atol=2e-5, rtol=1e-4)
        # greedy tokens identical to transformers' generate
        gen = ref.generate(IDS[:1, :12], max_new_tokens=16, do_sample=False)
        cache = em.new_cache(1, 28)
        out, toks = em(IDS[:1, :12], past_key_values=cache, logits_to_keep=1), []
        for _ in range(16):
            nxt = out.logits[:, -1].argmax(-1)
            toks.append(int(nxt))
            out = em(nxt[:, None], past_key_values=cache, logits_to_keep=1)
        assert toks == gen[0, 12:].tolist()


def test_sliding_window_equals_transformers():
    ref = hf_model("mixtral", sliding_window=6)
    em = EngineModel.from_hf(ref, uniform(), "cpu")
    with torch.no_grad():
        want = ref(IDS).logits
        torch.testing.assert_close(em(IDS, use_cache=False).logits, want, atol=2e-5, rtol=1e-4)
        cache = em.new_cache(2, 24)
        steps = [em(IDS[:, :12], past_key_values=cache).logits]
        steps += [em(IDS[:, t:t + 1], past_key_values=cache).logits for t in range(12, 24)]
        torch.testing.assert_close(torch.cat(steps, 1), want, atol=2e-5, rtol=1e-4)


def test_foreign_cache_is_refused():
    from transformers import DynamicCache

    em = EngineModel.from_hf(hf_model("mixtral", layers=1), uniform(), "cpu")
    with pytest.raises(TypeError, match="new_cache"):
        em(IDS, past_key_values=DynamicCache())


# ------------------------------------------------------------------------------ streaming from disk
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_streamed_checkpoint_equals_model_in_memory(family, tmp_path):
    ref = hf_model(family)
    ref.save_pretrained(tmp_path)
    names = json.dumps(list(__import__("safetensors").safe_open(str(tmp_path / "model.safetensors"), "pt").keys()))
    assert "experts.0." in names  # transformers writes per-expert names: the loader reads them one by one
    streamed = load_engine_model(tmp_path, uniform(), "cpu", torch.float32)
    assert streamed.load_info["streamed"] and streamed.load_info["bytes_read"] > 0
    with torch.no_grad():
        torch.testing.assert_close(streamed(IDS, use_cache=False).logits, ref(IDS).logits, atol=2e-5, rtol=1e-4)


def test_fused_expert_checkpoint_and_shards(tmp_path):
    """A checkpoint that stores transformers 5's fused expert tensors, split over two shards."""
    from safetensors.torch import save_file

    ref = hf_model("qwen3_moe")
    ref.config.save_pretrained(tmp_path)
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    keys = sorted(state)
    half = len(keys) // 2
    shards = {"model-00001-of-00002.safetensors": keys[:half], "model-00002-of-00002.safetensors": keys[half:]}
    for f, ks in shards.items():
        save_file({k: state[k] for k in ks}, str(tmp_path / f))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}))
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in keys)
    em = load_engine_model(tmp_path, uniform(), "cpu", torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(em(IDS, use_cache=False).logits, ref(IDS).logits, atol=2e-5, rtol=1e-4)


def test_checkpoint_errors_name_what_is_missing(tmp_path):
    from safetensors.torch import save_file

    ref = hf_model("mixtral", layers=1)
    ref.config.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_engine_model(tmp_path, uniform(), "cpu", torch.float32)

    state = {k: v.contiguous() for k, v in ref.state_dict().items() if "q_proj" not in k}
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="q_proj"):
        load_engine_model(tmp_path, uniform(), "cpu", torch.float32)
    with pytest.raises(PlanError, match="slots"):
        build(ref.config, RandomSource(ref.config), ExpertPlan({0: [Slot()] * 3}), "cpu", torch.float32)
    with pytest.raises(CheckpointError, match="model_type"):
        from transformers import AutoConfig

        build(AutoConfig.for_model("llama"), RandomSource(ref.config), uniform(), "cpu", torch.float32)


def test_random_source_draws_each_tensor_reproducibly():
    ref = hf_model("qwen2_moe", layers=2)
    a = build(ref.config, RandomSource(ref.config, seed=3), uniform(), "cpu", torch.float32)
    b = build(ref.config, RandomSource(ref.config, seed=3), uniform(), "cpu", torch.float32)
    c = build(ref.config, RandomSource(ref.config, seed=4), uniform(), "cpu", torch.float32)
    with torch.no_grad():
        la, lb, lc = (m(IDS, use_cache=False).logits for m in (a, b, c))
    assert torch.equal(la, lb) and not torch.equal(la, lc)
    src = RandomSource(ref.config)
    assert float(src.get("model.norm.weight").min()) == 1.0  # norms 1, matrices N(0, initializer_range)
    w = src.get("model.layers.0.self_attn.q_proj.weight")
    assert abs(float(w.std()) - ref.config.initializer_range) < 0.1 * ref.config.initializer_range


# ------------------------------------------------------------------------------ quantized experts
@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("precision", ["int8", "int4", "int2"])
def test_quantized_experts_stay_within_the_bound(family, precision):
    """Every stored expert matrix, read back through its own kernel (x = I gives W_stored^T), is within
    the per-element bound of its stored form of the original weight; the model's outputs move by little."""
    ref = hf_model(family)
    em = EngineModel.from_hf(ref, uniform("fast", precision), "cpu")
    fused = {i: (b.mlp.experts.gate_up_proj.detach(), b.mlp.experts.down_proj.detach())
             for i, b in enumerate(ref.model.layers) if hasattr(b.mlp, "experts")}
    for store in em.stores:
        gu_all, dn_all = fused[store.layer]
        for e, ex in enumerate(store.experts):
            for lin, w in ((ex.gate_up, gu_all[e]), (ex.down, dn_all[e])):
                eye = torch.eye(lin.in_features, dtype=lin.act_dtype)
                w_stored = lin(eye).float().T
                # the kernel's bf16 output rounds each read-back element once more (2**-8 relative)
                tol = lin.max_abs_error_bound() + float(w_stored.abs().max()) * 2 ** -8 + 1e-7
                assert float((w_stored - w).abs().max()) <= tol, (store.layer, e, lin.kernel)
    with torch.no_grad():
        want, got = ref(IDS).logits, em(IDS, use_cache=False).logits
    rel = float((got - want).norm() / want.norm())
    assert rel < {"int8": 0.01, "int4": 0.15, "int2": 0.8}[precision], rel


def test_kernels_per_precision_and_exact_bytes():
    w = torch.randn(256, 512, generator=torch.Generator().manual_seed(0)) * 0.02
    cpu = torch.device("cpu")
    act = compute_dtype(cpu)
    kernels = {}
    for precision in ("full", "int8", "int4", "int3", "int2"):
        q = w if precision == "full" else quantize_weight(w, precision, 64)
        lin = make_linear(q, cpu, act_dtype=act)
        kernels[precision] = lin.kernel
        predicted = weight_nbytes((256, 512), precision, 64, 4)
        assert lin.nbytes() == lin.storage_nbytes() == predicted, precision
        if precision != "full":
            assert predicted == expected_nbytes((256, 512), int(precision[3:]), 512 if precision == "int8" else 64,
                                                precision == "int8")
    assert kernels["int3"] == kernels["int2"] == "dequant"
    if cpu_has_fast_bf16():
        assert kernels["int8"] == "int8pack" and kernels["int4"] == "int4pack-cpu" and act == torch.bfloat16
    else:  # the fused kernels run ~50x slower without BF16: the engine dequantizes instead
        assert kernels["int8"] == kernels["int4"] == "dequant" and act is None
    # shapes or groups the fused kernels do not take fall back to dequantize, labelled
    odd = make_linear(quantize(torch.randn(24, 64), 4, 32, scale_grid="bfloat16"), cpu, act_dtype=torch.bfloat16)
    assert isinstance(odd, DequantLinear)  # 24 rows: the CPU int4 kernel needs multiples of 16
    grouped8 = make_linear(quantize(w, 8, 64, scale_grid="bfloat16"), cpu, act_dtype=torch.bfloat16)
    assert isinstance(grouped8, DequantLinear)  # int8 with groups: the kernel takes one scale a row
    assert make_linear(torch.randn(8, 8), cpu).kernel == "aten.linear"  # too small to gain from packing


@pytest.mark.skipif(not cpu_has_fast_bf16(), reason="the fused CPU kernels need BF16")
def test_fused_kernels_match_dequantized_reference():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(512, 1024, generator=g) * 0.02
    x = torch.randn(3, 1024, generator=g)
    for precision, cls in (("int8", Int8Linear), ("int4", Int4Linear)):
        q = quantize_weight(w, precision, 64)
        lin = make_linear(q, "cpu", act_dtype=torch.bfloat16)
        assert isinstance(lin, cls)
        xb = x.to(torch.bfloat16)
        ref = xb.float() @ q.dequantize(torch.float32).T
        y = lin(xb).float()
        # bf16 output rounding; the int4 offset rounded to bf16 moves each weight by at most max_m_err
        max_m_err = 0.0
        if precision == "int4":
            m = (8 - q.zero.float()) * q.scale.float()
            max_m_err = float((m.bfloat16().float() - m).abs().max())
        tol = float(ref.abs().max()) * 2 ** -7 + float(xb.float().abs().sum(-1).max()) * max_m_err + 1e-4
        assert float((y - ref).abs().max()) <= tol, precision


def test_dense_kernel_reads_back_its_weight_and_moves():
    w = torch.randn(1024, 512, generator=torch.Generator().manual_seed(3))
    lin = DenseLinear(w)
    assert torch.equal(lin.dense(), w)
    moved = lin.to("cpu")
    assert moved is lin


def test_scales_on_both_grids():
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(4)) * 1e-3  # small groups: tiny scales
    for bits in (8, 4):
        q = quantize(w, bits, 128 if bits == 8 else 64, scale_grid="bfloat16")
        s = q.scale.float()
        assert torch.equal(s.to(torch.bfloat16).float(), s)  # the kernels' bf16 scales are the stored ones
        err = (q.dequantize() - w).abs().max()
        assert err <= s.max() / 2 + 1e-9
    with pytest.raises(ValueError, match="scale_grid"):
        quantize(w, 4, 64, scale_grid="fp8")


def test_kv_cache_grows_and_keeps_what_it_held():
    ref = hf_model("mixtral", layers=1)
    em = EngineModel.from_hf(ref, uniform(), "cpu")
    cache = em.new_cache(1, 4)
    with torch.no_grad():
        em(IDS[:1, :4], past_key_values=cache)
        before = cache.k[0][:, :4].clone()
        em(IDS[:1, 4:10], past_key_values=cache)
    assert isinstance(cache, KVCache) and cache.capacity >= 10 and cache.length == 10
    assert torch.equal(cache.k[0][:, :4], before)


# ------------------------------------------------------------------------------ bounded memory
def test_streaming_load_peak_memory_is_the_plan_plus_one_layer(tmp_path):
    """An all-int4 plan is loaded from disk with a peak (anonymous memory, sampled every 2 ms in a fresh
    process) within the plan's footprint + one layer's experts at full precision + 48 MiB; transformers'
    own load of the same checkpoint holds the whole full-precision model."""
    from transformers import AutoModelForCausalLM, MixtralConfig

    from moecap.engine.loadmem import measure_load

    cfg = MixtralConfig(vocab_size=512, hidden_size=512, intermediate_size=1024, num_hidden_layers=8,
                        num_attention_heads=8, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    layer_full = 8 * 3 * 512 * 1024 * 4  # one layer's experts at float32
    eng, hf = measure_load(tmp_path, "engine"), measure_load(tmp_path, "transformers")
    allowance = 48 * 2**20
    assert eng["peak_anon_growth_bytes"] <= eng["footprint_bytes"] + layer_full + allowance, (eng, layer_full)
    # the int4 plan is a fraction of the full model, and so is the engine's peak against transformers'
    assert eng["footprint_bytes"] < 0.3 * hf["footprint_bytes"]
    assert eng["peak_anon_growth_bytes"] < 0.6 * hf["peak_anon_growth_bytes"], (eng, hf)
    # counting mapped file pages too, the engine's resident set stays a fraction of transformers'
    assert eng["peak_rss_growth_bytes"] < 0.5 * hf["peak_rss_growth_bytes"], (eng, hf)


def test_host_int4_layout_for_copies():
    """A host expert on a GPU machine keeps int4 as plain nibbles (the GPU kernel's input, repacked after
    the copy); computed by the host it dequantizes. Same bytes, same weights as the CPU kernel's form."""
    w = torch.randn(256, 512, generator=torch.Generator().manual_seed(5)) * 0.02
    q = quantize_weight(w, "int4", 64)
    nib = Int4Linear.from_quantized(q, torch.bfloat16, torch.device("cpu"), layout="nibbles")
    assert nib.nbytes() == nib.storage_nbytes() == q.nbytes()
    deq = nib.dequantize(torch.float32)
    m = (8 - q.zero.float()) * q.scale.float()  # the kernel's offset, rounded to bf16: its only change
    assert float((deq - q.dequantize(torch.float32)).abs().max()) <= float((m.bfloat16().float() - m).abs().max()) + 1e-7
    x = torch.randn(2, 512, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    torch.testing.assert_close(nib(x).float(), x.float() @ deq.T, atol=2e-2, rtol=2e-2)
    with pytest.raises(ValueError, match="cannot move"):
        nib.to("meta")


# ------------------------------------------------------------------------------ GPU paths
@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_cuda_fused_kernels(precision):
    w = torch.randn(1024, 2048, generator=torch.Generator().manual_seed(7)) * 0.02
    q = quantize_weight(w, precision, 64)
    lin = make_linear(q, "cuda", act_dtype=compute_dtype("cuda"))
    assert lin.kernel == {"int8": "int8pack", "int4": "int4pack-cuda"}[precision]
    assert lin.nbytes() == lin.storage_nbytes() == q.nbytes()
    eye = torch.eye(2048, dtype=lin.act_dtype, device="cuda")
    w_stored = lin(eye).float().T.cpu()
    tol = lin.max_abs_error_bound() + float(w_stored.abs().max()) * 2 ** -8 + 1e-6
    assert float((w_stored - w).abs().max()) <= tol
    host = make_linear(q, "cpu", act_dtype=torch.bfloat16, movable=True)  # a host expert, copied on demand
    moved = host.to("cuda")
    torch.testing.assert_close(moved(eye[:8]).float(), lin(eye[:8]).float(), atol=1e-2, rtol=1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_cuda_engine_matches_transformers_and_offloads(family):
    ref = hf_model(family).to("cuda", torch.bfloat16)
    em = EngineModel.from_hf(ref, uniform(), "cuda")
    ids = IDS.cuda()
    with torch.no_grad():
        want, got = ref(ids).logits.float(), em(ids, use_cache=False).logits.float()
    assert float((got - want).norm() / want.norm()) < 2e-2
    # half the experts in host memory at int4: copied per call or computed on the CPU, outputs close
    def plan(arch):
        p = ExpertPlan.uniform(arch.experts_per_layer(), "fast", "full")
        for slots in p.layers.values():
            for e in range(0, len(slots), 2):
                slots[e] = Slot("host", "int4")
        return p
    off = EngineModel.from_hf(ref, plan, "cuda")
    with torch.no_grad():
        got = off(ids, use_cache=False).logits.float()
    assert float((got - want).norm() / want.norm()) < 0.2
    calls = {k: sum(s.calls[k] for s in off.stores) for k in off.stores[0].calls}
    assert calls["cpu"] + calls["copy"] + calls["copy_cached"] > 0 and calls["fast"] > 0


SHRINK = {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
          "head_dim": 16, "vocab_size": 512, "intermediate_size": 96}
RANDOM_CONFIGS = {
    "mixtral-8x7b": {},
    "olmoe-1b-7b": {},
    "qwen1.5-moe-a2.7b": {"moe_intermediate_size": 32, "shared_expert_intermediate_size": 64},
    "qwen3-30b-a3b": {"moe_intermediate_size": 32},
}


def test_engine_runner_on_every_family_from_real_configs(tmp_path):
    """The engine streams random weights (RandomSource) onto each built-in architecture config the engine
    serves, under a mixed plan with host experts; an unsupported family fails its cell with a clear error."""
    from moecap.run import run_suite
    from moecap.suite import parse_suite

    models = [{"id": f"random:{name}", "overrides": {**SHRINK, **extra}} for name, extra in RANDOM_CONFIGS.items()]
    models.append({"id": "random:deepseek-v2-lite", "overrides": {"num_hidden_layers": 2}})
    raw = {"name": "families", "models": models,
           "runners": [{"type": "engine", "args": {"dtype": "float32", "profile_windows": 1, "profile_tokens": 16,
                                                   "plan": {"quantize_fraction": 0.5, "precision": "int8",
                                                            "offload_fraction": 0.25}}}],
           "workloads": [{"name": "w", "input_tokens": 8, "output_tokens": 4, "num_prompts": 1}],
           "loads": [{"batch_size": 1}],
           "hardware": {"device": "cpu", "peaks": {"mem_bandwidth_gbs": 10.0, "tflops": {"fp32": 1.0}},
                        "calibrate": "never"},
           "output": {"dir": str(tmp_path)}}
    out = run_suite(parse_suite(raw, "test"), log=lambda s: None)
    by = {o.cell.model.id: o.record for o in out.outcomes}
    for name in RANDOM_CONFIGS:
        rec = by[f"random:{name}"]
        assert rec.status == "ok", (name, rec.error)
        runner = rec.config["runner"]
        assert runner["plan"]["int8_experts"] > 0 and runner["plan"]["host_experts"] > 0
        assert "random token ids" in runner["profile"]["source"]
        assert rec.report["utilization"]["decode"]["tiers"]["host"]["bytes"] >= 0
    bad = by["random:deepseek-v2-lite"]
    assert bad.status == "failed" and "deepseek_v2" in bad.error and "mixtral" in bad.error


@pytest.mark.parametrize("rope", [{"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
                                  {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                                   "rope_theta": 10000.0}])
def test_rope_scaling_comes_from_transformers(rope):
    """The rotary table is computed by the family's own transformers class: scaled ropes agree too."""
    ref = hf_model("qwen3_moe", rope_parameters=rope)
    em = EngineModel.from_hf(ref, uniform(), "cpu")
    ids = torch.randint(0, 256, (1, 96), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        torch.testing.assert_close(em(ids, use_cache=False).logits, ref(ids).logits, atol=2e-5, rtol=1e-4)


def test_training_reports_progress_when_output_is_not_a_terminal():
    """Issue 18: training showed nothing between two perplexity lines when stderr was not a terminal
    (a log file, CI). It logs step, loss and time left at every tenth of the steps."""
    import re

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from moecap.zoo.tiny_moe import PROFILES, train

    profile = PROFILES["test"]
    cfg = {**profile.config, "vocab_size": 64}
    model_type = cfg.pop("model_type")
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **cfg), dtype=torch.float32)
    stream = torch.randint(0, 64, (4 * profile.seq_len,), generator=torch.Generator().manual_seed(0))
    lines: list[str] = []
    losses = train(model, [stream], 20, 1e-3, profile, 0, "tiny-moe base", log=lines.append)
    assert len(losses) == 20 and len(lines) == 10
    pattern = re.compile(r"^moecap zoo: tiny-moe base step (\d+)/20, loss \d+\.\d{3}, [\d.]+ (s|min) elapsed, "
                         r"~[\d.]+ (s|min) left$")
    assert all(pattern.match(line) for line in lines), lines
    assert [int(pattern.match(line)[1]) for line in lines] == list(range(2, 21, 2))
    assert lines[-1].endswith("~0 s left")
