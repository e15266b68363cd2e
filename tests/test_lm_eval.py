"""lm-eval through a live moecap runner: the ``moecap`` model against lm-eval's own ``hf`` model, and
moecap's offline tasks. Offline: no model or data set is downloaded.

The model is a miniature of the embedded one (the tiny-moe builder's test architecture, a 512-token
BPE tokenizer and 120 training steps, ~6 s to build) with a 128-token window, so that
documents span several rolling windows and few-shot contexts get truncated. Both models load the
same directory, in float32 on the CPU.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

pytest.importorskip("lm_eval")

from moecap.corpus import DOMAINS  # noqa: E402
from moecap.quality.tasks import TASKS_VERSION  # noqa: E402

ROLLING, MC = "moecap_rolling_prose", "moecap_mc_code"
LIMIT = 8


def build_mini_model(out: Path) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from moecap.corpus import domain_splits
    from moecap.zoo.tiny_moe import PROFILES, build_tokenizer, train

    splits = {d: domain_splits(d)["train"][:80_000] for d in DOMAINS}
    tok = build_tokenizer(512, list(splits.values()))
    cfg = dict(PROFILES["test"].config)
    model_type = cfg.pop("model_type")
    cfg.update(vocab_size=len(tok), eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
               pad_token_id=tok.pad_token_id, max_position_embeddings=128)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **cfg), dtype=torch.float32)
    profile = dataclasses.replace(PROFILES["test"], seq_len=128, batch_size=8)
    streams = [torch.tensor(tok(t, add_special_tokens=False)["input_ids"]) for t in splits.values()]
    train(model, streams, 120, 3e-3, profile, 0, "mini model")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_mini_model(tmp_path_factory.mktemp("mini-moe"))


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    from moecap.quality.tasks import write_offline_tasks

    out = tmp_path_factory.mktemp("lm-eval-tasks")
    write_offline_tasks(out, n_mc=50)
    return out


@pytest.fixture(scope="module")
def runner(model_dir):
    from moecap.runners.args import HFRunnerArgs
    from moecap.runners.hf import HFRunner
    from moecap.suite import HardwareConfig, ModelConfig

    r = HFRunner(HFRunnerArgs(dtype="float32", trace_experts=False), HardwareConfig(device="cpu"))
    r.load(ModelConfig(id=str(model_dir)))
    yield r
    r.close()


@pytest.fixture(scope="module")
def moecap_lm(runner):
    from moecap.quality.lm_eval_adapter import MoecapLM

    return MoecapLM(runner=runner, batch_size=8)


@pytest.fixture(scope="module")
def hf_lm(model_dir):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(model_dir), dtype="float32", device="cpu", batch_size=8)


def evaluate(lm, tasks_dir, tasks, **kw):
    from moecap.quality.lm_eval_runner import run_lm_eval

    return run_lm_eval(lm, tasks, limit=LIMIT, num_fewshot=kw.pop("num_fewshot", None), include_path=tasks_dir,
                       batch_size=8, log_samples=True, bootstrap_iters=0, **kw)


@pytest.fixture(scope="module")
def zero_shot(moecap_lm, hf_lm, tasks_dir):
    return {name: evaluate(lm, tasks_dir, [ROLLING, MC]) for name, lm in (("moecap", moecap_lm), ("hf", hf_lm))}


def _lls(result, task):
    """Per document: the rolling log-likelihood, or each choice's (loglikelihood, is_greedy)."""
    return [s["responses"] for s in result["tasks"][task]["samples"]]


# ------------------------------------------------------------------------------- adapter == hf
def test_rolling_perplexity_matches_hf(zero_shot, moecap_lm, tasks_dir):
    ours, ref = zero_shot["moecap"]["tasks"][ROLLING], zero_shot["hf"]["tasks"][ROLLING]
    print(f"\n{ROLLING}: word_perplexity moecap {ours['metrics']['word_perplexity']['value']:.6f}, "
          f"hf {ref['metrics']['word_perplexity']['value']:.6f}; "
          f"bits_per_byte {ours['metrics']['bits_per_byte']['value']:.4f}")
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert ours["metrics"][metric]["value"] == pytest.approx(ref["metrics"][metric]["value"], rel=1e-4)
    assert ours["n_samples"] == ref["n_samples"]
    for a, b in zip(_lls(zero_shot["moecap"], ROLLING), _lls(zero_shot["hf"], ROLLING), strict=True):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-4)
    # trained: clearly better than a uniform guess over the vocabulary
    docs = [json.loads(x)["text"] for x in (tasks_dir / f"data/{ROLLING}.test.jsonl").read_text().splitlines()]
    tokens = sum(len(moecap_lm.tok_encode(d)) for d in docs[:LIMIT])
    uniform = math.log2(len(moecap_lm.tokenizer)) * tokens / sum(len(d.encode()) for d in docs[:LIMIT])
    assert 0 < ours["metrics"]["bits_per_byte"]["value"] < 0.9 * uniform


def test_multiple_choice_matches_hf(zero_shot):
    ours, ref = zero_shot["moecap"]["tasks"][MC], zero_shot["hf"]["tasks"][MC]
    for metric in ("acc", "acc_norm"):
        assert ours["metrics"][metric]["value"] == pytest.approx(ref["metrics"][metric]["value"], abs=1e-9)
        assert ours["metrics"][metric]["stderr"] is None  # bootstrap_iters=0: no standard errors
    samples_ours, samples_ref = _lls(zero_shot["moecap"], MC), _lls(zero_shot["hf"], MC)
    assert len(samples_ours) == LIMIT
    for per_doc_ours, per_doc_ref in zip(samples_ours, samples_ref, strict=True):
        assert len(per_doc_ours) == 4
        for (ll_a, greedy_a), (ll_b, greedy_b) in zip(per_doc_ours, per_doc_ref, strict=True):
            assert ll_a == pytest.approx(ll_b, rel=1e-4, abs=1e-4)
            assert greedy_a == greedy_b


def test_few_shot_with_truncation_matches_hf(moecap_lm, hf_lm, tasks_dir):
    """2-shot contexts exceed the 128-token window: both cut them from the left alike."""
    ours, ref = (evaluate(lm, tasks_dir, ["moecap_mc_c"], num_fewshot=2) for lm in (moecap_lm, hf_lm))
    assert ours["tasks"]["moecap_mc_c"]["num_fewshot"] == 2
    for a, b in zip(_lls(ours, "moecap_mc_c"), _lls(ref, "moecap_mc_c"), strict=True):
        assert [x[0] for x in a] == pytest.approx([x[0] for x in b], rel=1e-4, abs=1e-4)
    acc = [r["tasks"]["moecap_mc_c"]["metrics"]["acc"]["value"] for r in (ours, ref)]
    assert acc[0] == acc[1]


def test_multiple_input_task_matches_hf(moecap_lm, hf_lm, tasks_dir):
    """moecap_real_*: lm-eval's multiple-input form (4 contexts, one continuation), zero- and 1-shot."""
    task = "moecap_real_prose"
    for shots in (None, 1):
        ours, ref = (evaluate(lm, tasks_dir, [task], num_fewshot=shots) for lm in (moecap_lm, hf_lm))
        samples = _lls(ours, task)
        assert len(samples) == LIMIT and all(len(per_doc) == 4 for per_doc in samples)
        for a, b in zip(samples, _lls(ref, task), strict=True):
            assert [x[0] for x in a] == pytest.approx([x[0] for x in b], rel=1e-4, abs=1e-4)
            assert len({x[0] for x in a}) == 4  # four contexts, four different scores of the one line
        assert ours["tasks"][task]["metrics"]["acc"]["value"] == ref["tasks"][task]["metrics"]["acc"]["value"]
        assert set(ours["tasks"][task]["metrics"]) == {"acc"}


def test_record_is_json_and_labels_word_perplexity(zero_shot):
    import lm_eval

    res = zero_shot["moecap"]
    json.dumps(res, allow_nan=False)
    assert res["lm_eval_version"] == lm_eval.__version__
    rolling, mc = res["tasks"][ROLLING], res["tasks"][MC]
    for rec in (rolling, mc):
        assert rec["lm_eval_version"] == lm_eval.__version__
        assert rec["task_version"] == float(TASKS_VERSION) and rec["num_fewshot"] == 0
        assert rec["n_samples"]["effective"] == min(LIMIT, rec["n_samples"]["original"])
    assert mc["n_samples"] == {"original": 50, "effective": LIMIT}
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert rolling["metrics"][metric]["is_token_perplexity"] is False
        assert "NOT token perplexity" in rolling["metrics"][metric]["definition"]
    assert 0 <= mc["metrics"]["acc"]["value"] <= 1


def test_loglikelihood_empty_context_and_model_args(model_dir, moecap_lm, hf_lm):
    """Built from lm-eval model_args (the command-line path), the adapter scores as the live one and
    as hf, including an empty context (conditioned on the prefix token)."""
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model

    from moecap.quality.lm_eval_adapter import MoecapLM

    assert get_model("moecap") is MoecapLM
    built = MoecapLM.create_from_arg_string(
        f"model={model_dir},runner=hf,dtype=float32,device=cpu", {"batch_size": 4}
    )
    try:
        assert built.batch_size == 4 and built.device == "cpu" and built.max_length == 128
        pairs = [("", "import os\n"), ("def f(x):\n", "    return x\n"), ("The ", "value of")]
        reqs = [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)]
        a = built.loglikelihood(reqs, disable_tqdm=True)
        b = moecap_lm.loglikelihood(reqs, disable_tqdm=True)
        c = hf_lm.loglikelihood(reqs, disable_tqdm=True)
        for x, y, z in zip(a, b, c, strict=True):
            assert x[0] == pytest.approx(y[0], rel=1e-5) and x[0] == pytest.approx(z[0], rel=1e-4, abs=1e-4)
            assert x[1] == y[1] == z[1]
    finally:
        built.close()
    with pytest.raises(ValueError, match="model="):
        MoecapLM(runner="hf", dtype="float32")


# ------------------------------------------------------------------------------- generation
def _gen(lm, context, **gen_kwargs):
    from lm_eval.api.instance import Instance

    return lm.generate_until([Instance("generate_until", {}, (context, gen_kwargs), 0)], disable_tqdm=True)[0]


def test_generate_until_honours_until(moecap_lm, hf_lm):
    prompt = "import os\nimport sys\n\n\ndef main(argv):\n    "
    free = _gen(moecap_lm, prompt, until=[], max_gen_toks=24)
    assert isinstance(free, str) and free
    assert free == _gen(hf_lm, prompt, until=[], max_gen_toks=24, do_sample=False)  # greedy, as hf
    stop = free.strip()[2:5]
    assert len(stop) == 3
    cut = _gen(moecap_lm, prompt, until=[stop], max_gen_toks=24)
    assert cut == free[: free.find(stop)] and stop not in cut
    short = _gen(moecap_lm, prompt, until=[], max_gen_toks=3)
    assert len(moecap_lm.tok_encode(short)) <= 3 and free.startswith(short)
    with pytest.raises(ValueError, match="greedily"):
        _gen(moecap_lm, prompt, until=["\n"], do_sample=True, temperature=0.7)


# ------------------------------------------------------------------------------- task files
def _files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_offline_tasks_deterministic_and_complete(tmp_path):
    import yaml
    from lm_eval.tasks import TaskManager

    from moecap.quality.tasks import held_out_documents, write_offline_tasks

    a, b = tmp_path / "a", tmp_path / "b"
    names = write_offline_tasks(a, n_mc=30, n_real=30, seed=3)
    assert sorted(names) == sorted(f"moecap_{kind}_{d}" for kind in ("rolling", "mc", "real") for d in DOMAINS)
    first = _files(a)
    assert write_offline_tasks(a, n_mc=30, n_real=30, seed=3) == names and _files(a) == first  # same seed: same bytes
    write_offline_tasks(b, n_mc=30, n_real=30, seed=3)
    other = {k: v.replace(str(b.resolve()).encode(), str(a.resolve()).encode()) for k, v in _files(b).items()}
    assert other == first  # the same, up to the absolute data paths in the YAMLs
    write_offline_tasks(tmp_path / "c", n_mc=30, n_real=30, seed=4)
    assert _files(tmp_path / "c")["data/moecap_mc_code.test.jsonl"] != first["data/moecap_mc_code.test.jsonl"]

    tm = TaskManager(include_path=str(a), include_defaults=False)
    assert set(names) <= set(tm.all_tasks)
    for domain in DOMAINS:
        rolling = yaml.safe_load((a / f"moecap_rolling_{domain}.yaml").read_text())
        assert rolling["output_type"] == "loglikelihood_rolling" and rolling["dataset_path"] == "json"
        assert Path(rolling["dataset_kwargs"]["data_files"]["test"]).is_absolute()
        rows = [json.loads(x) for x in (a / f"data/moecap_rolling_{domain}.test.jsonl").read_text().splitlines()]
        docs = held_out_documents(domain, "test")
        assert len(rows) == len(docs) and all(0 < len(r["text"]) <= 4000 for r in rows)
        assert all(docs[r["doc"]].startswith(r["text"]) for r in rows)

        mc = yaml.safe_load((a / f"moecap_mc_{domain}.yaml").read_text())
        assert mc["output_type"] == "multiple_choice" and mc["fewshot_split"] == "validation"
        items = [json.loads(x) for x in (a / f"data/moecap_mc_{domain}.test.jsonl").read_text().splitlines()]
        assert len(items) == 30
        for it in items:
            assert len(it["choices"]) == 4 and len({c.strip() for c in it["choices"]}) == 4
            lines = docs[it["doc"]].split("\n")
            assert it["choices"][it["label"]] == lines[it["line"]]  # the true next line
            assert it["context"].endswith(lines[it["line"] - 1] + "\n")  # ... right after the context

        real = yaml.safe_load((a / f"moecap_real_{domain}.yaml").read_text())
        assert real["output_type"] == "multiple_choice" and real["fewshot_split"] == "validation"
        assert (real["doc_to_text"], real["doc_to_choice"], real["doc_to_target"]) == ("label", "contexts",
                                                                                      "continuation")
        items = [json.loads(x) for x in (a / f"data/moecap_real_{domain}.test.jsonl").read_text().splitlines()]
        assert len(items) == 30
        split_docs = {o: [d.split("\n") for d in held_out_documents(o, "test")] for o in DOMAINS}
        foreign_domains = []
        for it in items:
            assert len(it["contexts"]) == 4 and len({c.strip() for c in it["contexts"]}) == 4
            lines = docs[it["doc"]].split("\n")
            assert it["continuation"] == lines[it["line"]]  # a held-out line ...
            own = it["contexts"][it["label"]]
            assert own.endswith(lines[it["line"] - 1] + "\n")  # ... right after its gold context
            assert it["sources"][it["label"]] == {"domain": domain, "doc": it["doc"], "line": it["line"]}
            others = [src for j, src in enumerate(it["sources"]) if j != it["label"]]
            same = [src for src in others if src["domain"] == domain]
            assert len(same) == 2 and all(src["doc"] != it["doc"] for src in same)  # other documents
            foreign_domains += [src["domain"] for src in others if src["domain"] != domain]
            for ctx, src in zip(it["contexts"], it["sources"], strict=True):
                src_lines = split_docs[src["domain"]][src["doc"]]
                assert ctx.endswith(src_lines[src["line"] - 1] + "\n")  # cut where its source says
        # one context per item from another domain, the two other domains taking turns
        assert sorted(set(foreign_domains)) == sorted(o for o in DOMAINS if o != domain)
        assert len(foreign_domains) == len(items)


def test_tasks_load_offline_through_datasets(tasks_dir):
    from lm_eval.tasks import TaskManager

    loaded = TaskManager(include_path=str(tasks_dir), include_defaults=False).load(
        ["moecap_mc", "moecap_rolling", "moecap_real"])
    assert sorted(loaded["tasks"]) == sorted(f"moecap_{k}_{d}" for k in ("mc", "rolling", "real") for d in DOMAINS)
    mc = loaded["tasks"]["moecap_mc_prose"]
    assert len(mc.test_docs()) == 50 and len(mc.fewshot_docs()) > 0
    assert (tasks_dir / "datasets-cache").is_dir()  # datasets' cache stays with the tasks


# ------------------------------------------------------------------------------- errors, imports
def test_unknown_task_is_a_clear_error(moecap_lm, tasks_dir):
    from moecap.quality.lm_eval_runner import UnknownTaskError, run_lm_eval

    with pytest.raises(UnknownTaskError) as err:
        run_lm_eval(moecap_lm, ["moecap_mc_cod", MC], limit=1, num_fewshot=None, include_path=tasks_dir,
                    batch_size=8, include_defaults=False)
    msg = str(err.value)
    assert "'moecap_mc_cod'" in msg and "did you mean moecap_mc_code" in msg and str(tasks_dir) in msg
    with pytest.raises(UnknownTaskError, match="no close match"):
        run_lm_eval(moecap_lm, ["zzzz_not_a_task"], limit=1, num_fewshot=None, include_path=tasks_dir,
                    batch_size=8, include_defaults=False)


@pytest.mark.slow
def test_unknown_task_suggests_builtin_names(moecap_lm, tasks_dir):
    """With lm-eval's built-in tasks indexed (several seconds), typos of their names are caught too."""
    from moecap.quality.lm_eval_runner import UnknownTaskError, run_lm_eval

    with pytest.raises(UnknownTaskError, match="did you mean .*hellaswag"):
        run_lm_eval(moecap_lm, ["hellaswg"], limit=1, num_fewshot=None, include_path=tasks_dir, batch_size=8)


@pytest.mark.slow
def test_command_line(model_dir, tasks_dir):
    """lm-eval's own command line, with the moecap model registered: model_args build the runner."""
    proc = subprocess.run(
        [sys.executable, "-m", "moecap.quality.lm_eval_runner", "--model", "moecap",
         "--model_args", f"model={model_dir},runner=hf,dtype=float32,device=cpu",
         "--tasks", "moecap_mc_c", "--include_path", str(tasks_dir), "--limit", "2", "--batch_size", "2"],
        capture_output=True, text=True, timeout=300, env=dict(os.environ),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "moecap_mc_c" in proc.stdout and "acc" in proc.stdout


def test_import_moecap_does_not_import_lm_eval():
    code = (
        "import sys, moecap, moecap.quality, moecap.quality.tasks, moecap.quality.evaluate, moecap.cli\n"
        "print('lm_eval' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"
