"""The accuracy axis: the trained tiny-moe, token perplexity, offline data sets, quality cells."""

import json
import math

import pytest

from moecap.corpus import DOMAINS, domain_splits
from moecap.metrics.perplexity import context_length_for, perplexity, windows


def test_windows_are_non_overlapping_and_drop_the_tail():
    ids = list(range(10))
    assert windows(ids, 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert windows(ids, 3, max_windows=2) == [[0, 1, 2], [3, 4, 5]]
    with pytest.raises(ValueError, match="fewer than one window"):
        windows(ids, 11)
    assert context_length_for(4096) == 2048 and context_length_for(512) == 512
    assert context_length_for(4096, 1024) == 1024 and context_length_for(256, 1024) == 256


def test_perplexity_is_exp_of_mean_nll_over_all_predicted_tokens():
    res = perplexity([(6.0, 3), (2.0, 1)])
    assert res["nll_mean"] == pytest.approx(2.0)
    assert res["perplexity"] == pytest.approx(math.exp(2.0))
    assert res["predicted_tokens"] == 4 and res["windows"] == 2


def test_corpus_splits_are_disjoint_and_deterministic():
    for d in DOMAINS:
        s = domain_splits(d)
        assert all(len(s[k]) > 10_000 for k in ("train", "validation", "test"))
        probe = s["test"][:300]
        assert probe not in s["train"]
    assert domain_splits("code") is domain_splits("code")


def test_offline_dataset_errors_name_the_alternatives(monkeypatch):
    from moecap.quality.perplexity import DatasetUnavailable, load_text

    assert load_text("tiny-prose") == domain_splits("prose")["test"]
    with pytest.raises(DatasetUnavailable, match="allowed: .*tiny-code"):
        load_text("wikitext3")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DatasetUnavailable) as exc:
        load_text("wikitext2")
    assert "Offline, use the embedded held-out corpora: tiny-c, tiny-c-validation" in str(exc.value)


def test_trained_tiny_moe_beats_random_init_and_children_beat_base(tiny_moe_dir):
    """The builder's own figures (test profile): >= 5x below random init; each child best on its domain."""
    build = json.loads((tiny_moe_dir.parent / "build.json").read_text())
    for d in DOMAINS:
        assert build["random_init_test_perplexity"][d] / build["base_test_perplexity"][d] >= 5, d
        child = build["children"][d]["test_perplexity"]
        assert child[d] < build["base_test_perplexity"][d], d
    for name in ("base", *DOMAINS):
        meta = json.loads((tiny_moe_dir.parent / name / "moecap.json").read_text())
        assert meta["trained"] and meta["builder"] == "tiny-moe"
        assert (tiny_moe_dir.parent / name / "config.json").is_file()


def test_perplexity_through_the_runner_matches_the_builder(tiny_moe_dir):
    """The runner's token perplexity on the same windows equals the builder's own computation."""
    from moecap.quality.perplexity import evaluate_perplexity
    from moecap.runners.args import HFRunnerArgs
    from moecap.runners.hf import HFRunner
    from moecap.suite import HardwareConfig, ModelConfig
    from moecap.zoo.tiny_moe import active_profile

    runner = HFRunner(HFRunnerArgs(dtype="float32"), HardwareConfig(device="cpu"))
    runner.load(ModelConfig(id="tiny-moe-prose"))
    prof = active_profile()
    res = evaluate_perplexity(runner, "tiny-prose", max_windows=prof.eval_windows, batch_size=4)
    build = json.loads((tiny_moe_dir.parent / "build.json").read_text())
    assert res["context_length"] == prof.seq_len and res["windows"] == prof.eval_windows
    assert res["perplexity"] == pytest.approx(build["children"]["prose"]["test_perplexity"]["prose"], rel=1e-4)
    runner.close()


def test_zoo_build_reuses_cached_children_and_counts_only_training_time(tiny_moe_dir, tmp_path):
    """Issue 21: `moecap zoo build --variants` retrained children already cached (its help says cached)
    and added every run's wall time to build_seconds."""
    import json
    import shutil

    from moecap.zoo.tiny_moe import build

    root = tmp_path / "zoo"
    shutil.copytree(tiny_moe_dir.parent, root)
    before = json.loads((root / "build.json").read_text())
    stamp = {c: (root / c / "model.safetensors").stat().st_mtime_ns for c in ("base", "code", "prose", "c")}
    lines: list[str] = []
    summary = build(root=root, variants=("code", "prose", "c"), log=lines.append)
    assert not [ln for ln in lines if " step " in ln], lines  # nothing trained
    assert sum("reusing the" in ln for ln in lines) == 4  # the base and the three children
    assert {c: (root / c / "model.safetensors").stat().st_mtime_ns for c in stamp} == stamp  # nothing rewritten
    assert summary["build_seconds"] == before["build_seconds"] and summary["last_run_seconds"] > 0
    assert summary["children"] == before["children"]
    # a child that is missing is trained, and only its time is added
    shutil.rmtree(root / "prose")
    del summary["children"]["prose"]
    (root / "build.json").write_text(json.dumps(summary))
    lines.clear()
    again = build(root=root, variants=("code", "prose"), log=lines.append)
    assert any("tiny-moe-prose step" in ln for ln in lines) and not any("tiny-moe-code step" in ln for ln in lines)
    assert again["build_seconds"] == pytest.approx(before["build_seconds"] + again["last_run_seconds"])
    assert (root / "prose" / "moecap.json").is_file()


def test_num_threads_holds_from_load_to_close(tiny_moe_dir, monkeypatch):
    """The HF runner's ``num_threads`` (the quickstart sets 1) holds only while it serves: not when it is
    constructed (the hardware peaks are calibrated next, on every core), not while the model loads or
    an embedded model trains on first use, and close() gives the threads back."""
    import torch

    import moecap.models
    from moecap.runners.args import HFRunnerArgs
    from moecap.runners.hf import HFRunner
    from moecap.suite import HardwareConfig, ModelConfig

    before = torch.get_num_threads()
    want = 1 if before != 1 else 2
    seen = []
    real = moecap.models.load_causal_lm

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(moecap.models, "load_causal_lm", spy)
    runner = HFRunner(HFRunnerArgs(dtype="float32", num_threads=want), HardwareConfig(device="cpu"))
    try:
        assert torch.get_num_threads() == before
        runner.load(ModelConfig(id="tiny-moe"))
        assert seen == [before] and torch.get_num_threads() == want
        assert runner.info()["torch_threads"] == want
    finally:
        runner.close()
    assert torch.get_num_threads() == before
