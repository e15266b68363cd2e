"""Model-merging baselines (moecap.engine.merge): the arithmetic on hand-made state dicts, the
validation, and real merges of tiny-moe's three children into one model, through the API and the CLI."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from moecap.engine.merge import (
    MERGE_METHODS,
    merge_average,
    merge_dare,
    merge_models,
    merge_task_arithmetic,
    merge_ties,
    task_vectors,
)

DOMAINS = ("code", "prose", "c")
T = torch.tensor


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------ synthetic state dicts
def test_task_vectors_are_child_minus_base():
    base = {"w": T([1.0, 2.0]), "n": T([3, 4])}
    tvs = task_vectors(base, [{"w": T([1.5, 0.0]), "n": T([9, 9])}, {"w": T([-1.0, 2.0]), "n": T([3, 4])}])
    assert len(tvs) == 2
    assert torch.equal(tvs[0]["w"].float(), T([0.5, -2.0])) and torch.equal(tvs[1]["w"].float(), T([-2.0, 0.0]))
    assert torch.equal(tvs[0]["n"], T([0, 0]))  # non-float tensors are not merged: no task vector


def test_average_exact():
    kids = [{"w": T([[1.0, 2.0]]), "b": T([0.5])}, {"w": T([[3.0, 4.0]]), "b": T([1.5])},
            {"w": T([[5.0, 9.0]]), "b": T([-2.0])}]
    out = merge_average(kids)
    assert torch.equal(out["w"], T([[3.0, 5.0]])) and torch.equal(out["b"], T([0.0]))
    assert out["w"].dtype == torch.float32


def test_task_arithmetic_exact():
    base = {"w": T([1.0, 1.0]), "steps": T([7])}
    kids = [{"w": T([2.0, 0.0]), "steps": T([1])}, {"w": T([3.0, 5.0]), "steps": T([2])}]
    # task vectors [1, -1] and [2, 4]: sum [3, 3]
    assert torch.equal(merge_task_arithmetic(base, kids)["w"], T([4.0, 4.0]))
    assert torch.equal(merge_task_arithmetic(base, kids, scale=0.5)["w"], T([2.5, 2.5]))
    assert torch.equal(merge_task_arithmetic(base, kids)["steps"], T([7]))  # integers: the base's
    # scale 1/N is the plain average
    assert torch.equal(merge_task_arithmetic(base, kids, scale=0.5)["w"], merge_average(kids)["w"])


def test_merges_keep_each_tensors_dtype():
    base = {"h": T([1.0, 2.0], dtype=torch.bfloat16), "f": T([1.0], dtype=torch.float16)}
    kids = [{"h": T([1.5, 2.5], dtype=torch.bfloat16), "f": T([3.0], dtype=torch.float16)}]
    for out in (merge_average(kids), merge_task_arithmetic(base, kids), merge_ties(base, kids, density=1.0),
                merge_dare(base, kids, drop=0.0)):
        assert out["h"].dtype == torch.bfloat16 and out["f"].dtype == torch.float16
        assert torch.equal(out["h"], kids[0]["h"]) and torch.equal(out["f"], kids[0]["f"])


# TIES by hand. Base 1 everywhere; three task vectors over 6 elements; density 0.5 keeps k = 3 per vector.
TIES_TV = [
    [4.0, -1.0, 2.0, 0.5, -3.0, 1.0],    # top 3 |.|: 4, -3, 2     -> [ 4, 0, 2,   0, -3,  0]
    [-2.0, 3.0, 2.5, -0.5, -1.0, -6.0],  # top 3 |.|: -6, 3, 2.5   -> [ 0, 3, 2.5, 0,  0, -6]
    [-5.0, -1.0, -0.5, 0.25, 1.5, 2.0],  # top 3 |.|: -5, 2, 1.5   -> [-5, 0, 0,   0, 1.5, 2]
]
# sums of the trimmed values: [-1, 3, 4.5, 0, -1.5, -4] -> elected signs [-, +, +, 0, -, -]
# disjoint means (only values of the elected sign): [-5, 3, 2.25, 0, -3, -6]
TIES_MEAN_D05 = [-5.0, 3.0, 2.25, 0.0, -3.0, -6.0]
# without trimming (density 1): sums [-3, 1, 4, 0.25, -2.5, -3] -> signs [-, +, +, +, -, -];
# means [(-2-5)/2, 3, (2+2.5)/2, (0.5+0.25)/2, (-3-1)/2, -6]
TIES_MEAN_D1 = [-3.5, 3.0, 2.25, 0.375, -2.0, -6.0]
# a second tensor with much smaller task vectors: trimming is per tensor, so they survive
SMALL_TV = [[0.25, -0.125, 0.0625, 0.5], [0.125, 0.25, -0.5, 0.0625], [0.0, 0.0, 0.0, 0.0]]
SMALL_MEAN_D05 = [0.25, 0.25, -0.5, 0.5]  # top 2 of each: [.25, 0, 0, .5], [0, .25, -.5, 0], zeros


def _ties_inputs():
    base = {"w": torch.ones(6), "small": torch.zeros(4), "count": T([5, 6])}
    kids = [{"w": 1 + T(tw), "small": T(ts), "count": T([0, 0])} for tw, ts in zip(TIES_TV, SMALL_TV)]
    return base, kids


def test_ties_trims_elects_signs_and_takes_the_disjoint_mean():
    base, kids = _ties_inputs()
    out = merge_ties(base, kids, density=0.5)
    assert torch.equal(out["w"], 1 + T(TIES_MEAN_D05))
    assert torch.equal(out["small"], T(SMALL_MEAN_D05))
    assert torch.equal(out["count"], T([5, 6]))
    half = merge_ties(base, kids, density=0.5, scale=0.5)
    assert torch.equal(half["w"], 1 + 0.5 * T(TIES_MEAN_D05))
    # trimming matters: density 1 keeps everything and gives other values on elements 0, 3, 4
    full = merge_ties(base, kids, density=1.0)
    assert torch.equal(full["w"], 1 + T(TIES_MEAN_D1))
    # sign election matters: neither the plain mean nor the sum of the trimmed task vectors
    trimmed = T([[4, 0, 2, 0, -3, 0], [0, 3, 2.5, 0, 0, -6], [-5, 0, 0, 0, 1.5, 2]])
    assert not torch.equal(out["w"], 1 + trimmed.mean(0)) and not torch.equal(out["w"], 1 + trimmed.sum(0))


def test_ties_default_density_keeps_a_fifth():
    base = {"w": torch.zeros(10)}
    kid = {"w": torch.arange(1.0, 11.0)}  # one child: no sign conflict, the merge is the trimmed vector
    out = merge_ties(base, [kid])["w"]
    assert torch.equal(out, T([0.0] * 8 + [9.0, 10.0]))
    # k = ceil(density * numel): 2.5 -> 3 elements, and never fewer than one
    assert torch.equal(merge_ties(base, [kid], density=0.25)["w"], T([0.0] * 7 + [8.0, 9.0, 10.0]))
    assert torch.equal(merge_ties(base, [kid], density=0.01)["w"], T([0.0] * 9 + [10.0]))
    # magnitudes tied at the threshold are all kept (independent of sort order)
    tied = {"w": T([1.0, -3.0, 3.0, 2.0, 3.0, 0.5, 0.0, 0.0, 0.0, 0.0])}
    assert torch.equal(merge_ties(base, [tied], density=0.2)["w"], T([0.0, -3.0, 3.0, 0.0, 3.0] + [0.0] * 5))


def test_dare_is_seeded():
    g = torch.Generator().manual_seed(1)
    base = {"w": torch.randn(64, 32, generator=g), "v": torch.randn(100, generator=g)}
    kids = [{k: v + torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(3)]
    a = merge_dare(base, kids, drop=0.7, seed=3)
    assert _equal(a, merge_dare(base, kids, drop=0.7, seed=3))
    b = merge_dare(base, kids, drop=0.7, seed=4)
    assert not torch.equal(a["w"], b["w"]) and not torch.equal(a["v"], b["v"])
    # a tensor's draw depends on its name and the seed only, not on the other tensors
    alone = merge_dare({"w": base["w"]}, [{"w": k["w"]} for k in kids], drop=0.7, seed=3)
    assert torch.equal(alone["w"], a["w"])
    # the same tensor under another name gets another mask
    renamed = merge_dare({"u": base["w"]}, [{"u": k["w"]} for k in kids], drop=0.7, seed=3)
    assert not torch.equal(renamed["u"], a["w"])


def test_dare_drops_and_rescales():
    g = torch.Generator().manual_seed(2)
    base = {"w": torch.randn(20000, generator=g)}
    tv = torch.randn(20000, generator=g)
    kid = {"w": base["w"] + tv}
    delta = merge_dare(base, [kid], drop=0.9, seed=0)["w"].double() - base["w"].double()
    kept = delta != 0
    assert kept.float().mean().item() == pytest.approx(0.1, abs=0.01)
    torch.testing.assert_close(delta[kept], (tv.double() * 10)[kept], rtol=1e-5, atol=1e-5)


def test_dare_without_dropping_is_task_arithmetic_or_ties():
    base, kids = _ties_inputs()
    assert _equal(merge_dare(base, kids, drop=0.0), merge_task_arithmetic(base, kids))
    assert _equal(merge_dare(base, kids, drop=0.0, scale=0.3), merge_task_arithmetic(base, kids, scale=0.3))
    assert _equal(merge_dare(base, kids, drop=0.0, combine="ties"), merge_ties(base, kids, density=1.0))


def test_dare_is_task_arithmetic_in_expectation():
    g = torch.Generator().manual_seed(5)
    base = {"w": torch.randn(200, generator=g)}
    kids = [{"w": base["w"] + torch.randn(200, generator=g)} for _ in range(3)]
    ta = merge_task_arithmetic(base, kids)["w"]
    seeds = 400
    mean = sum(merge_dare(base, kids, drop=0.5, seed=s)["w"] for s in range(seeds)) / seeds
    one = merge_dare(base, kids, drop=0.5, seed=0)["w"]
    # one draw is far from task arithmetic (per-element std sqrt(3) here), the mean of 400 close (std ~0.09)
    assert (one - ta).abs().mean() > 0.8
    assert (mean - ta).abs().mean() < 0.15 and (mean - ta).abs().max() < 0.6


# --------------------------------------------------------------------------------------- validation
def test_mismatched_shapes_and_names_are_named():
    base = {"a": torch.zeros(2, 2), "layer.w": torch.zeros(2, 2)}
    good = {"a": torch.ones(2, 2), "layer.w": torch.ones(2, 2)}
    bad = {"a": torch.ones(2, 2), "layer.w": torch.ones(2, 3)}
    with pytest.raises(ValueError, match=r"'layer\.w'.*children\[1\]"):
        merge_task_arithmetic(base, [good, bad])
    with pytest.raises(ValueError, match=r"'layer\.w'.*children\[1\]"):
        merge_average([good, bad])
    with pytest.raises(ValueError, match=r"'extra'"):
        merge_ties(base, [good | {"extra": torch.zeros(1)}])
    with pytest.raises(ValueError, match=r"'a'.*missing from children\[0\]"):
        merge_dare(base, [{"layer.w": torch.ones(2, 2)}])
    with pytest.raises(ValueError, match="at least one child"):
        merge_task_arithmetic(base, [])


@pytest.mark.parametrize("density", [0, -0.1, 1.5, float("nan")])
def test_bad_density(density):
    base = {"w": torch.zeros(3)}
    with pytest.raises(ValueError, match="density"):
        merge_ties(base, [{"w": torch.ones(3)}], density=density)


@pytest.mark.parametrize("drop", [1.0, -0.1, 2, float("nan")])
def test_bad_drop(drop):
    base = {"w": torch.zeros(3)}
    with pytest.raises(ValueError, match="drop"):
        merge_dare(base, [{"w": torch.ones(3)}], drop=drop)


def test_bad_combine_and_scale():
    base = {"w": torch.zeros(3)}
    with pytest.raises(ValueError, match="combine.*arithmetic.*ties"):
        merge_dare(base, [{"w": torch.ones(3)}], combine="mean")
    with pytest.raises(ValueError, match="scale"):
        merge_task_arithmetic(base, [{"w": torch.ones(3)}], scale=float("inf"))


def _fake_model(path, tensors: dict):
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    save_file(tensors, str(path / "model.safetensors"))
    return path


def test_merge_models_validation(tmp_path):
    base = _fake_model(tmp_path / "base", {"a": torch.zeros(2), "b.w": torch.zeros(2, 2)})
    good = _fake_model(tmp_path / "good", {"a": torch.ones(2), "b.w": torch.ones(2, 2)})
    bad = _fake_model(tmp_path / "bad", {"a": torch.ones(2), "b.w": torch.ones(3, 2)})
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"'b\.w'.*bad/model\.safetensors"):
        merge_models(base, [good, bad], "ties", out)
    with pytest.raises(ValueError) as err:
        merge_models(base, [good], "slerp", out)
    assert "'slerp'" in str(err.value) and all(m in str(err.value) for m in MERGE_METHODS)
    with pytest.raises(ValueError, match="density"):
        merge_models(base, [good], "ties", out, density=0)
    with pytest.raises(ValueError, match="drop"):
        merge_models(base, [good], "dare", out, drop=1)
    with pytest.raises(ValueError, match="takes no density"):
        merge_models(base, [good], "task_arithmetic", out, density=0.5)
    with pytest.raises(ValueError, match="is one of the inputs"):
        merge_models(base, [good], "average", good)
    assert not out.exists()  # every check runs before anything is written


def test_merge_models_reads_shards(tmp_path):
    """A sharded base (two files and their index) and single-file children merge into one file."""
    from safetensors.torch import load_file, save_file

    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    save_file({"a": torch.zeros(3)}, str(base / "model-00001-of-00002.safetensors"))
    save_file({"b": torch.ones(2, 2, dtype=torch.bfloat16), "n": T([1, 2])},
              str(base / "model-00002-of-00002.safetensors"))
    (base / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors",
        "n": "model-00002-of-00002.safetensors"}}))
    kid = _fake_model(tmp_path / "kid", {"a": T([1.0, 2.0, 3.0]), "b": 3 * torch.ones(2, 2, dtype=torch.bfloat16),
                                          "n": T([7, 7])})
    summary = merge_models(base, [kid], "task_arithmetic", tmp_path / "out", scale=0.5)
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert torch.equal(got["a"], T([0.5, 1.0, 1.5]))
    assert got["b"].dtype == torch.bfloat16 and torch.equal(got["b"], 2 * torch.ones(2, 2, dtype=torch.bfloat16))
    assert torch.equal(got["n"], T([1, 2]))
    assert summary["tensors_merged"] == 2 and summary["tensors_copied"] == 1
    assert summary["bytes"] == (tmp_path / "out" / "model.safetensors").stat().st_size
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "merge.json", "model.safetensors"]


# ------------------------------------------------------------------------------ tiny-moe and children
METHOD_KWARGS = {"average": {}, "task_arithmetic": {}, "ties": {}, "dare": {}}  # the defaults


@pytest.fixture(scope="module")
def merged(tiny_moe_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("merged")
    kids = [tiny_moe_dir.parent / d for d in DOMAINS]
    return {m: (root / m, merge_models(tiny_moe_dir, kids, m, root / m, **kw)) for m, kw in METHOD_KWARGS.items()}


def _state(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_each_method_writes_a_loadable_model(merged, tiny_moe_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_sd = _state(tiny_moe_dir)
    kids_sd = [_state(tiny_moe_dir.parent / d) for d in DOMAINS]
    base_model = AutoModelForCausalLM.from_pretrained(tiny_moe_dir)
    base_params = dict(base_model.named_parameters())
    for method, (out, summary) in merged.items():
        assert summary["method"] == method and summary["tensors_merged"] == len(base_sd)
        assert summary["children"] == [str((tiny_moe_dir.parent / d).resolve()) for d in DOMAINS]
        assert summary["bytes"] == (out / "model.safetensors").stat().st_size
        assert json.loads((out / "merge.json").read_text()) == summary
        for f in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
            assert (out / f).read_bytes() == (tiny_moe_dir / f).read_bytes(), f
        sd = _state(out)
        assert {k: (v.dtype, v.shape) for k, v in sd.items()} == {k: (v.dtype, v.shape) for k, v in base_sd.items()}
        # the streamed file holds exactly what the in-memory functions compute
        fn = MERGE_METHODS[method]
        expect = fn(kids_sd) if method == "average" else fn(base_sd, kids_sd, **METHOD_KWARGS[method])
        assert _equal(sd, expect), method
        assert not _equal(sd, base_sd) and all(not _equal(sd, k) for k in kids_sd)
        model = AutoModelForCausalLM.from_pretrained(out)
        params = dict(model.named_parameters())
        assert params.keys() == base_params.keys()
        assert all(p.dtype == base_params[n].dtype for n, p in params.items())
        assert AutoTokenizer.from_pretrained(out)("def f():")["input_ids"]


def test_one_child_at_scale_one_is_that_child(tiny_moe_dir, tmp_path):
    for d in DOMAINS:
        child = tiny_moe_dir.parent / d
        merge_models(tiny_moe_dir, [child], "task_arithmetic", tmp_path / d, scale=1.0)
        assert _equal(_state(tmp_path / d), _state(child)), d


def _perplexities(path, windows):
    from moecap.quality.perplexity import evaluate_perplexity
    from moecap.runners.args import HFRunnerArgs
    from moecap.runners.hf import HFRunner
    from moecap.suite import HardwareConfig, ModelConfig

    runner = HFRunner(HFRunnerArgs(dtype="float32", trace_experts=False), HardwareConfig(device="cpu"))
    runner.load(ModelConfig(id=str(path)))
    try:
        return {d: evaluate_perplexity(runner, f"tiny-{d}", max_windows=windows, batch_size=4)["perplexity"]
                for d in DOMAINS}
    finally:
        runner.close()


def test_merged_perplexity_against_the_specialists(merged, tiny_moe_dir, artifacts_dir):
    """No merge beats every specialist on its own domain; the dense merges still beat the base."""
    import transformers

    from moecap.zoo.tiny_moe import active_profile

    windows = active_profile().eval_windows  # the test profile's held-out split: 8 windows of 256 tokens
    ppl = {"base": _perplexities(tiny_moe_dir, windows)}
    for d in DOMAINS:
        ppl[f"child:{d}"] = _perplexities(tiny_moe_dir.parent / d, windows)
    for method, (out, _) in merged.items():
        ppl[method] = _perplexities(out, windows)
    (artifacts_dir / "merge_perplexity.json").write_text(json.dumps(ppl, indent=2))
    print("\n" + "\n".join(f"{k:>16}: " + "  ".join(f"{d} {v[d]:8.2f}" for d in DOMAINS) for k, v in ppl.items()))

    vocab = transformers.AutoConfig.from_pretrained(tiny_moe_dir).vocab_size
    for name, row in ppl.items():
        assert all(math.isfinite(v) and 1 < v < vocab for v in row.values()), (name, row)
    for d in DOMAINS:  # the fine-tuning worked: each specialist is the best of the base and children at home
        assert ppl[f"child:{d}"][d] < min(ppl[k][d] for k in ("base", *(f"child:{e}" for e in DOMAINS if e != d)))
    for method in merged:
        row = ppl[method]
        worse = [d for d in DOMAINS if row[d] > ppl[f"child:{d}"][d]]
        assert worse, f"{method} beats every specialist on its own domain: {row}"
        # and on average over the domains (geometric mean of the ratios) it is worse than the specialists
        assert sum(math.log(row[d] / ppl[f"child:{d}"][d]) for d in DOMAINS) > 0, (method, row)
    for method in ("average", "task_arithmetic"):  # dense merges keep what the children learned
        assert all(ppl[method][d] < ppl["base"][d] for d in DOMAINS), (method, ppl[method], ppl["base"])


# ---------------------------------------------------------------------------------------------- CLI
def moecap(*args, check=None):
    proc = subprocess.run([sys.executable, "-m", "moecap", *args], capture_output=True, text=True,
                          env=dict(os.environ), timeout=600)
    if check is not None:
        assert proc.returncode == check, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


def test_cli_engine_merge(tiny_moe_dir, tmp_path):
    out = tmp_path / "merged"
    # a directory for the base, embedded names for the children
    proc = moecap("engine", "merge", "--base", str(tiny_moe_dir),
                  "--children", "tiny-moe-code,tiny-moe-prose,tiny-moe-c", "--method", "ties", "--density", "0.3", "-o", str(out), check=0)
    summary = json.loads(proc.stdout)
    assert summary["method"] == "ties" and summary["kwargs"] == {"density": 0.3, "scale": 1.0}
    assert summary["children"] == [str((tiny_moe_dir.parent / d).resolve()) for d in DOMAINS]
    assert summary["bytes"] == (out / "model.safetensors").stat().st_size > 0
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    expect = merge_ties(_state(tiny_moe_dir), [_state(tiny_moe_dir.parent / d) for d in DOMAINS], density=0.3)
    assert _equal(_state(out), expect)

    bad = moecap("engine", "merge", "--base", "tiny-moe", "--children", "tiny-moe-code", "--method", "slerp",
                 "-o", str(tmp_path / "x"), check=2)
    assert "slerp" in bad.stderr and all(m in bad.stderr for m in MERGE_METHODS)
    bad = moecap("engine", "merge", "--base", "tiny-moe", "--children", "tiny-moe-code", "--method", "dare",
                 "--drop", "1", "-o", str(tmp_path / "x"), check=2)
    assert "drop" in bad.stderr and not (tmp_path / "x").exists()
