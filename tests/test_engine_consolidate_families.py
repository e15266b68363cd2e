"""Expert consolidation for real checkpoints: random-weight families of Qwen2-MoE (shared expert) and OLMoE
(q/k norms) saved as safetensors, with children whose changes are known (a few experts perturbed, one
router re-trained, one child that changed only its attention), each child measured on its own data file.
The plan must find exactly the changed experts; threshold 0 must reproduce every child's greedy tokens
through ``moecap serve``; full sharing stores one copy; pairwise mode (no base) finds where the children
differ; mismatched architectures and missing data are refused with errors that name them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import PYTHON, free_port, running_server
from moecap.engine.consolidate import (ConsolidatedModel, ConsolidationError, _load, check_architecture, make_plan,
                                       measure_children, read_data)
from moecap.engine.store import moe_blocks

LAYERS = 2
EXPERTS = 8
# what each child changed: the (layer, expert) pairs whose weights moved; b also re-trained layer 0's router
CHANGED = {"a": {(0, 1), (1, 3)}, "b": {(1, 0)}, "c": set()}


def _config(family: str, vocab: int):
    from transformers import OlmoeConfig, Qwen2MoeConfig

    common = dict(vocab_size=vocab, hidden_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
                  max_position_embeddings=512, num_experts=EXPERTS, num_experts_per_tok=2, tie_word_embeddings=False)
    if family == "qwen2_moe":
        return Qwen2MoeConfig(**common, num_key_value_heads=2, intermediate_size=128, moe_intermediate_size=64,
                              shared_expert_intermediate_size=96, decoder_sparse_step=1, mlp_only_layers=[],
                              norm_topk_prob=False)
    return OlmoeConfig(**common, num_key_value_heads=4, intermediate_size=64)


def _perturb(model: torch.nn.Module, layer: int, e: int, gen: torch.Generator) -> None:
    block = dict((i, b) for i, _, b in moe_blocks(model))[layer]
    for p in (block.experts.gate_up_proj, block.experts.down_proj):
        p.data[e] += 0.5 * p.data[e].std() * torch.randn(p.data[e].shape, generator=gen)


def build_family(root: Path, family: str, tokenizer_dir: Path) -> dict[str, Path]:
    """base + children a, b, c (see CHANGED) as safetensors checkpoints with the tiny-moe tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(_config(family, len(tok))).eval()
    dirs = {"base": root / "base"}
    base.save_pretrained(dirs["base"])
    tok.save_pretrained(dirs["base"])
    gen = torch.Generator().manual_seed(1)
    for child, changed in CHANGED.items():
        model = AutoModelForCausalLM.from_pretrained(dirs["base"], dtype=torch.float32).eval()
        with torch.no_grad():
            for layer, e in sorted(changed):
                _perturb(model, layer, e, gen)
            if child == "b":  # a re-trained router: other tokens reach other experts, which did not change
                gate = dict((i, b) for i, _, b in moe_blocks(model))[0].gate.weight
                gate.data += 2.0 * gate.data.std() * torch.randn(gate.shape, generator=gen)
            if child == "c":  # only the attention changed: every expert is the base's
                attn = model.model.layers[0].self_attn.q_proj.weight
                attn.data += 0.3 * attn.data.std() * torch.randn(attn.shape, generator=gen)
        dirs[child] = root / child
        model.save_pretrained(dirs[child])
        tok.save_pretrained(dirs[child])
    return dirs


@pytest.fixture(scope="module", params=["qwen2_moe", "olmoe"])
def fam(request, tmp_path_factory, tiny_moe_dir):
    from moecap.corpus import domain_splits

    root = tmp_path_factory.mktemp(request.param)
    dirs = build_family(root, request.param, tiny_moe_dir)
    data = {}
    for child, domain in zip(CHANGED, ("code", "prose", "c")):  # each child's own data, three formats
        text = domain_splits(domain)["validation"][:60_000]
        if child == "a":
            path = root / "a.txt"
            path.write_text(text, encoding="utf-8")
        elif child == "b":
            path = root / "b.jsonl"
            path.write_text("\n".join(json.dumps({"content": p}) for p in text.split("\n\n") if p.strip()),
                            encoding="utf-8")
            path = Path(f"{path}#content")
        else:
            path = Path("tiny-c")
        data[child] = str(path)
    kids = {c: dirs[c] for c in CHANGED}
    sim, sizes = measure_children(dirs["base"], kids, data=data, calibration_windows_n=4, context=128)
    return {"family": request.param, "dirs": dirs, "kids": kids, "data": data, "sim": sim, "sizes": sizes}


def _private(plan, child: str) -> set[tuple[int, int]]:
    return {(layer, e) for layer in plan.expert_bytes for e in range(EXPERTS) if plan.private(child, layer, e)}


def test_plan_finds_exactly_the_changed_experts(fam):
    plan = make_plan(fam["sim"], fam["sizes"], threshold=0.0)
    for child, changed in CHANGED.items():
        assert _private(plan, child) == changed, (fam["family"], child)
    # the re-trained router sent b's tokens elsewhere, yet its unchanged experts are still identical
    assert fam["sim"]["tokens"]["b"][0] != fam["sim"]["tokens"]["a"][0]
    # an expert no calibration token reached is judged by its weights (and listed), never taken for equal
    for child, pairs in plan.fallback.items():
        for layer, e in pairs:
            assert fam["sim"]["output"][child][layer][e] is None and fam["sim"]["tokens"][child][layer][e] == 0
    # the plan records the data each child was measured on
    assert plan.data["a"]["data"].endswith("a.txt") and plan.data["b"]["data"].endswith("b.jsonl#content")
    assert plan.data["c"]["data"] == "tiny-c" and all(plan.data[c]["tokens"] == 4 * 128 for c in CHANGED)
    assert plan.mode == "base" and plan.measure["peak_anon_growth_bytes"] is not None


def test_an_unrouted_changed_expert_is_kept_private(fam):
    """An expert no token of the calibration data reached has no output distance: a changed one must not
    be shared as if it were identical (it was, before: its output distance read 0)."""
    sim = json.loads(json.dumps(fam["sim"]))  # a copy, layers as strings like a saved plan
    sim["output"] = {c: {int(k): v for k, v in rows.items()} for c, rows in sim["output"].items()}
    sim["weight"] = {c: {int(k): v for k, v in rows.items()} for c, rows in sim["weight"].items()}
    sim["output"]["a"][1][3] = None  # as if no token of a's data had been routed to its changed expert 3
    sim["output"]["c"][0][5] = None  # and to c's unchanged expert 5
    plan = make_plan(sim, fam["sizes"], threshold=0.0)
    assert (1, 3) in _private(plan, "a") and (0, 5) not in _private(plan, "c")
    assert [1, 3] in plan.fallback["a"] and [0, 5] in plan.fallback["c"]


def test_full_sharing_stores_one_copy_and_all_private_reproduces(fam):
    per_layer = fam["sizes"]
    shared = make_plan(fam["sim"], per_layer, threshold=1e9)
    cm = ConsolidatedModel(fam["dirs"]["base"], fam["kids"], shared, shared="base")
    assert cm.memory()["expert_bytes"] == sum(per_layer.values()) * EXPERTS  # one copy of every expert
    private = make_plan(fam["sim"], per_layer, threshold=-1.0)
    cm = ConsolidatedModel(fam["dirs"]["base"], fam["kids"], private)
    assert cm.memory()["expert_bytes"] == 3 * sum(per_layer.values()) * EXPERTS
    ids = torch.tensor([list(range(20, 84))])
    for child in ("b", "a", "c", "b"):
        cm.activate(child)
        with torch.no_grad():
            want = _load(fam["kids"][child])(ids).logits
            got = cm.model(ids).logits
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (fam["family"], child, float((got - want).abs().max()))
    assert len(cm.swap_seconds_by_child["b"]) == 2 and cm.swaps == 4


def test_pairwise_mode_finds_where_the_children_differ(fam):
    """No base: each expert is compared with the children's mean; at threshold 0 every child keeps a
    private copy exactly where any child changed the expert, and shares the rest."""
    sim, sizes = measure_children(None, fam["kids"], data=fam["data"], calibration_windows_n=4, context=128)
    assert sim["mode"] == "pairwise"
    plan = make_plan(sim, sizes, threshold=0.0)
    differ = set().union(*CHANGED.values())
    for child in CHANGED:
        assert _private(plan, child) == differ, child
    cm = ConsolidatedModel(None, fam["kids"], plan)
    ids = torch.tensor([list(range(30, 70))])
    for child in CHANGED:
        cm.activate(child)
        with torch.no_grad():
            want = _load(fam["kids"][child])(ids).logits
            got = cm.model(ids).logits
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (child, float((got - want).abs().max()))
    with pytest.raises(ValueError, match="needs the base"):
        ConsolidatedModel(None, fam["kids"], plan, shared="base")


def test_mismatched_architectures_and_missing_data_are_named(fam, tmp_path, tiny_moe_dir):
    other = "olmoe" if fam["family"] == "qwen2_moe" else "qwen2_moe"
    odd = build_family(tmp_path / "odd", other, tiny_moe_dir)["a"]
    with pytest.raises(ConsolidationError, match=r"odd \(.*\) and base \(.*\) do not share an architecture: model_type"):
        check_architecture({"base": fam["dirs"]["base"], "odd": odd})
    with pytest.raises(ConsolidationError, match=r"child 'a' .* is not an embedded tiny-moe child: name the data"):
        measure_children(fam["dirs"]["base"], fam["kids"], data={"b": fam["data"]["b"]})
    with pytest.raises(ConsolidationError, match=r"no string field 'text'"):
        read_data(fam["data"]["b"].split("#")[0])
    with pytest.raises(ConsolidationError, match=r"not a file, not hf:"):
        read_data(str(tmp_path / "missing.txt"))


def test_threshold_zero_serves_every_child_exactly_through_moecap_serve(fam):
    """The consolidated backend, planned at start-up on each child's own data (--data), answers every
    child with that child's own greedy tokens, switching children on every request."""
    from test_engine_serve import _body, _http, _stream, _tokens_of
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(fam["dirs"]["base"])
    models = {c: _load(d) for c, d in fam["kids"].items()}

    def greedy(child: str, ids: list[int], n: int) -> list[int]:
        x = torch.tensor([ids])
        with torch.inference_mode():
            out = models[child].generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                                         pad_token_id=tok.pad_token_id, eos_token_id=None)
        return out[0, len(ids):].tolist()

    port = free_port()
    cmd = [PYTHON, "-m", "moecap", "serve", *(f"{c}={d}" for c, d in fam["kids"].items()), "--port", str(port),
           "--device", "cpu", "--backend", "consolidated", "--base", str(fam["dirs"]["base"]), "--threshold", "0",
           *(arg for c, spec in fam["data"].items() for arg in ("--data", f"{c}={spec}"))]
    url = f"http://127.0.0.1:{port}"
    with running_server(cmd, url + "/health", deadline_s=300):
        for r in range(2):
            for i, child in enumerate(CHANGED):
                ids = list(range(40 + 7 * i + r, 60 + 7 * i + r))
                status, events = _stream(url + "/v1/completions", _body(child, ids, 8, stream=True))
                assert status == 200 and events[-1] == "[DONE]"
                assert _tokens_of(events)[0] == greedy(child, ids, 8), (fam["family"], child, r)
        stats = _http(url + "/stats")[1]
    mem = stats["memory"]
    one = sum(fam["sizes"].values()) * EXPERTS
    assert mem["expert_bytes"] == one + 3 * next(iter(fam["sizes"].values()))  # the 3 changed experts twice
    assert sum(mem[f"swaps:{c}"] for c in CHANGED) == mem["swaps"] >= 5


def test_consolidate_cli_pairwise_with_each_childs_data(fam, tmp_path):
    from test_e2e_cli import moecap

    if fam["family"] != "olmoe":
        pytest.skip("one family is enough for the command line")
    out = tmp_path / "plan.json"
    kids = [f"{c}={d}" for c, d in fam["kids"].items()]
    data = [arg for c, spec in fam["data"].items() for arg in ("--data", f"{c}={spec}")]
    proc = moecap("engine", "consolidate", "--pairwise", *kids, *data, "--threshold", "0",
                  "--calibration-windows", "2", "--plan-out", str(out), check=0)
    assert "mode: pairwise" in proc.stdout and "a: measured on " in proc.stdout
    plan = json.loads(out.read_text())
    differ = sorted([layer, e] for layer, e in set().union(*CHANGED.values()))
    for child in CHANGED:
        private = sorted([int(layer), e] for layer, row in plan["assign"][child].items() for e, v in enumerate(row)
                         if v != -1)
        assert private == differ, child
    assert plan["mode"] == "pairwise" and plan["data"]["b"]["data"].endswith("#content")
    # bad input: a data spec for a model that is not a child, a child with no data, a missing base
    bad = moecap("engine", "consolidate", str(fam["dirs"]["base"]), *kids, "--data", "z=x.txt", "--threshold", "0",
                 check=2)
    assert "'z' is not one of the children (a, b, c)" in bad.stderr
    bad = moecap("engine", "consolidate", str(fam["dirs"]["base"]), *kids, "--threshold", "0", check=2)
    assert "child 'a'" in bad.stderr and "name the data it was tuned on" in bad.stderr
    assert "Traceback" not in bad.stderr
