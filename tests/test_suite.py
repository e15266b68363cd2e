"""Suite parsing, validation messages, overrides and cell expansion."""

import pytest
import yaml

from moecap.suite import SuiteError, apply_overrides, builtin_suites, expand, load_suite

BASE = {
    "name": "t",
    "models": [{"id": "tiny-moe"}],
    "runners": [{"type": "hf"}],
    "workloads": [{"name": "w", "input_tokens": 8, "output_tokens": 4, "num_prompts": 2}],
    "loads": [{"batch_size": 1}, {"batch_size": 2}],
}


def write(tmp_path, data, name="suite.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return p


def err_of(tmp_path, data, overrides=None) -> str:
    p = write(tmp_path, data)
    with pytest.raises(SuiteError) as exc:
        load_suite(str(p), overrides)
    return str(exc.value)


def test_builtin_suites_load_and_expand():
    assert {"quickstart", "moe-1gpu"} <= set(builtin_suites())
    for name in builtin_suites():
        suite = load_suite(name)
        cells = expand(suite)
        per_model_runner = sum(len(suite.loads) if w.measures_performance else 1 for w in suite.workloads)
        assert len(cells) == len(suite.models) * len(suite.runners) * per_model_runner
        assert len({c.cell_id for c in cells}) == len(cells)


def test_expand_order_and_ids(tmp_path):
    s = load_suite(str(write(tmp_path, BASE)))
    cells = expand(s)
    assert [c.load.batch_size for c in cells] == [1, 2]
    assert cells[0].cell_id.startswith("tiny-moe__hf__w__bs1__")
    # ids are stable across loads and change when the cell's configuration changes
    assert expand(load_suite(str(write(tmp_path, BASE))))[0].cell_id == cells[0].cell_id
    changed = load_suite(str(write(tmp_path, BASE)), ["workloads.0.seed=3"])
    assert expand(changed)[0].cell_id != cells[0].cell_id


def test_unknown_key_names_file_field_and_allowed(tmp_path):
    data = {**BASE, "workloads": [{**BASE["workloads"][0], "input_len": 3}]}
    msg = err_of(tmp_path, data)
    assert "suite.yaml" in msg and "workloads[0].input_len" in msg
    assert "allowed keys" in msg and "input_tokens" in msg


def test_top_level_unknown_key(tmp_path):
    msg = err_of(tmp_path, {**BASE, "modles": []})
    assert "modles" in msg and "models" in msg


def test_wrong_type(tmp_path):
    data = {**BASE, "workloads": [{**BASE["workloads"][0], "num_prompts": "many"}]}
    msg = err_of(tmp_path, data)
    assert "workloads[0].num_prompts" in msg and "many" in msg


def test_unknown_runner_lists_registered(tmp_path):
    msg = err_of(tmp_path, {**BASE, "runners": [{"type": "vllmm"}]})
    assert "runners[0].type" in msg and "vllmm" in msg and "hf" in msg


def test_runner_args_validated(tmp_path):
    msg = err_of(tmp_path, {**BASE, "runners": [{"type": "hf", "args": {"dtype": "int3"}}]})
    assert "runners[0].args" in msg and "dtype" in msg and "bfloat16" in msg
    msg = err_of(tmp_path, {**BASE, "runners": [{"type": "hf", "args": {"devise": "cpu"}}]})
    assert "devise" in msg and "allowed keys" in msg and "device" in msg


@pytest.mark.parametrize(
    "model_id, fragment",
    [
        ("tiny-mo", "unknown model 'tiny-mo'"),
        ("random:mixtral-9x9b", "unknown architecture config 'mixtral-9x9b'"),
    ],
)
def test_unknown_model(tmp_path, model_id, fragment):
    msg = err_of(tmp_path, {**BASE, "models": [{"id": model_id}]})
    assert "models[0].id" in msg and fragment in msg
    assert "tiny-moe" in msg or "mixtral-8x7b" in msg  # says what is allowed


def test_hub_ids_and_random_configs_accepted(tmp_path):
    data = {**BASE, "models": [{"id": "mistralai/Mixtral-8x7B-v0.1"}, {"id": "random:mixtral-8x7b", "overrides": {"num_hidden_layers": 2}}]}
    s = load_suite(str(write(tmp_path, data)))
    assert [m.display_name for m in s.models] == ["Mixtral-8x7B-v0.1", "mixtral-8x7b-random-2L"]


def test_random_models_refused_before_any_cell_runs(tmp_path):
    """A runner that would refuse a random: model at load time is refused by the suite check (and so by
    --dry-run), naming the model, the runner and the fix (issue 16)."""
    rand = {"id": "random:mixtral-8x7b", "overrides": {"num_hidden_layers": 1}}
    data = {**BASE, "models": [rand, {"id": "tiny-moe"}], "loads": [{"concurrency": 1}],
            "runners": [{"type": "llamacpp"}, {"type": "vllm"}, {"type": "sglang"},
                        {"type": "openai", "args": {"base_url": "http://127.0.0.1:9"}}]}
    msg = err_of(tmp_path, data)
    assert "models[0] (random:mixtral-8x7b) x runners[0] (llamacpp)" in msg
    assert "set runners[0].args.gguf and args.tokenizer" in msg
    assert "runners[1] (vllm)" in msg and "vLLM loads a checkpoint" in msg
    assert "runners[2] (sglang)" in msg
    assert "runners[3] (openai)" in msg and "args.tokenizer" in msg
    assert "models[1]" not in msg  # tiny-moe runs everywhere
    # given what it lacks, the runner takes it
    ok = {**data, "runners": [{"type": "llamacpp", "args": {"gguf": "/m/x.gguf", "tokenizer": "/m/tok"}},
                              {"type": "openai", "args": {"base_url": "http://127.0.0.1:9", "tokenizer": "/m/tok"}}]}
    assert len(expand(load_suite(str(write(tmp_path, ok))))) == 4


def test_load_kind_checked_against_runner(tmp_path):
    msg = err_of(tmp_path, {**BASE, "loads": [{"concurrency": 4}]})
    assert "loads[0]" in msg and "concurrency" in msg and "batch" in msg


def test_load_needs_exactly_one(tmp_path):
    msg = err_of(tmp_path, {**BASE, "loads": [{"batch_size": 1, "rate": 2.0}]})
    assert "exactly one of" in msg
    msg = err_of(tmp_path, {**BASE, "loads": [{"batch_size": 0}]})
    assert "loads[0].batch_size" in msg


def test_duplicate_names(tmp_path):
    data = {**BASE, "models": [{"id": "tiny-moe"}, {"id": "tiny-moe"}]}
    assert "duplicate names" in err_of(tmp_path, data)


def test_not_yaml_and_not_mapping(tmp_path):
    assert "not valid YAML" in err_of(tmp_path, "name: [unclosed")
    assert "a suite is a YAML mapping" in err_of(tmp_path, "- just\n- a list\n")


def test_missing_suite_names_builtins():
    with pytest.raises(SuiteError) as exc:
        load_suite("no-such-suite")
    assert "quickstart" in str(exc.value)


def test_overrides():
    raw = {"a": {"b": 1}, "l": [{"x": 1}, {"x": 2}]}
    apply_overrides(raw, ["a.b=5", "l.1.x=hello", "new.key=[1, 2]", "loads=[{batch_size: 8}]"], "s")
    assert raw == {"a": {"b": 5}, "l": [{"x": 1}, {"x": "hello"}], "new": {"key": [1, 2]}, "loads": [{"batch_size": 8}]}
    with pytest.raises(SuiteError, match="list index below 2"):
        apply_overrides(raw, ["l.7.x=1"], "s")
    with pytest.raises(SuiteError, match="key=value"):
        apply_overrides(raw, ["nonsense"], "s")


def test_overrides_on_builtin_are_validated():
    s = load_suite("quickstart", ["loads=[{batch_size: 2}]", "workloads.0.num_prompts=2"])
    assert [c.load.batch_size if c.load else None for c in expand(s)] == [2, None]  # + the quality cell
    with pytest.raises(SuiteError, match="workloads\\[0\\].num_prompts"):
        load_suite("quickstart", ["workloads.0.num_prompts=-1"])


QUALITY = {"name": "q", "perplexity": {"datasets": ["tiny-code"]}, "lm_eval": {"tasks": ["moecap_mc_code"], "limit": 10}}


def test_quality_workloads_expand_once_without_load(tmp_path):
    s = load_suite(str(write(tmp_path, {**BASE, "workloads": [BASE["workloads"][0], QUALITY]})))
    cells = expand(s)
    assert [(c.workload.display_name, c.load_slug) for c in cells] == [("w", "bs1"), ("w", "bs2"), ("q", "noload")]
    # a suite of quality workloads alone needs no loads
    only = {k: v for k, v in BASE.items() if k != "loads"}
    assert len(expand(load_suite(str(write(tmp_path, {**only, "workloads": [QUALITY]}))))) == 1


def test_workload_must_measure_something_complete(tmp_path):
    msg = err_of(tmp_path, {**BASE, "workloads": [{"name": "empty"}]})
    assert "workloads[0]" in msg and "sets none of them" in msg
    msg = err_of(tmp_path, {**BASE, "workloads": [{"input_tokens": 8, "num_prompts": 2}]})
    assert "missing ['output_tokens']" in msg
    msg = err_of(tmp_path, {**BASE, "workloads": [{"perplexity": {"datasets": ["wikitext3"]}}]})
    assert "wikitext3" in msg and "tiny-code" in msg
    only = {k: v for k, v in BASE.items() if k != "loads"}
    assert "loads: required" in err_of(tmp_path, only)


def test_cost_settings_are_checked(tmp_path):
    s = load_suite(str(write(tmp_path, {**BASE, "cost": {"usd_per_kwh": 0.2, "pue": 1.5}})))
    assert s.cost == {"usd_per_kwh": 0.2, "pue": 1.5}
    msg = err_of(tmp_path, {**BASE, "cost": {"kwh_price": 0.2}})
    assert "cost" in msg and "kwh_price" in msg and "usd_per_kwh" in msg


def test_unknown_gpu_price_leaves_cost_unavailable_not_the_cell_failed():
    from moecap.run import price_run

    report = {"throughput": {"duration_s": 2.0, "output_tokens": 100, "completed": 2}}
    hw = {"accelerator": "cuda", "device_name": "NVIDIA Imaginary X1", "device_count": 1, "cpu_model": "AMD EPYC",
          "host_memory_bytes": 2**34}
    cost = price_run(report, hw, {})
    assert cost["available"] is False and "gpu_price_usd" in cost["reason"]
    priced = price_run(report, hw, {"gpu_price_usd": 10000, "gpu_tdp_w": 300})
    assert priced["usd_per_1m_output_tokens"] > 0


def test_hostile_and_careless_suites_are_refused_before_anything_runs(tmp_path):
    """Issue 17: each of these was accepted and then failed late, ran with wrong settings, or (the alias
    bomb) ran past 90 s and 2.9 GB; each is now a one-line error naming the field."""
    import time

    bomb = "".join(f"{chr(97 + i)}: &{chr(97 + i)} [" + ",".join([f"*{chr(96 + i)}"] * 9 if i else ['"x"'] * 9) + "]\n"
                   for i in range(9))
    cases = {
        "alias bomb": (bomb, "expands to more than"),
        "duplicate key": (yaml.safe_dump(BASE) + "name: again\n", "duplicate key 'name'"),
        "input_tokens 1e9": ({**BASE, "workloads": [{**BASE["workloads"][0], "input_tokens": 1_000_000_000}]},
                             "workloads[0].input_tokens"),
        "num_prompts 1e20": ({**BASE, "workloads": [{**BASE["workloads"][0], "num_prompts": 1e20}]},
                             "workloads[0].num_prompts"),
        "num_prompts true": ({**BASE, "workloads": [{**BASE["workloads"][0], "num_prompts": True}]},
                             "workloads[0].num_prompts"),
        "rate .inf": ({**BASE, "runners": [{"type": "server", "args": {"command": ["x"]}}],
                       "loads": [{"rate": float("inf")}]}, "loads[0].rate"),
        "negative cost": ({**BASE, "cost": {"usd_per_kwh": -0.1}}, "cost inputs are finite and >= 0"),
        "beyond the context": ({**BASE, "models": [{"id": "random:mixtral-8x7b",
                                                    "overrides": {"num_hidden_layers": 1, "max_position_embeddings": 64}}],
                                "workloads": [{**BASE["workloads"][0], "input_tokens": 60, "output_tokens": 8}]},
                               "exceeds the context of models[0]"),
        "too many prompt tokens": ({**BASE, "workloads": [{**BASE["workloads"][0], "num_prompts": 1_000_000,
                                                           "input_tokens": 1000}]}, "prompt tokens; at most"),
    }
    tried, handled, missed = 0, 0, []
    for name, (data, fragment) in cases.items():
        tried += 1
        t0 = time.perf_counter()
        try:
            msg = err_of(tmp_path, data)
        except BaseException as err:  # noqa: BLE001 - any other outcome is a miss
            missed.append((name, repr(err)[:200]))
            continue
        if fragment in msg and time.perf_counter() - t0 < 5:
            handled += 1
        else:
            missed.append((name, msg[:300]))
    assert (tried, handled) == (len(cases), len(cases)), missed


def test_unreadable_suites_and_bad_overrides_are_one_line_errors(tmp_path):
    from test_e2e_cli import moecap

    p = tmp_path / "latin1.yaml"
    p.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(SuiteError, match="not UTF-8 text"):
        load_suite(str(p))
    good = write(tmp_path, BASE)
    with pytest.raises(SuiteError, match="--set .* the value is not valid YAML"):
        load_suite(str(good), ["workloads.0.num_prompts=[1,"])
    for args in (["run", str(p), "--dry-run"], ["run", str(good), "--dry-run", "--set", "loads=[{batch_size: 1"]):
        proc = moecap(*args)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stderr.strip(), proc.stderr


def test_csv_cells_that_a_spreadsheet_would_run_are_neutralised():
    import pandas as pd

    from moecap.leaderboard.data import to_csv
    from moecap.report import csv_safe, format_rows

    for bad in ("=HYPERLINK(\"http://x\")", "+1+1", "-2+3", "@SUM(A1)", "\t=1"):
        assert csv_safe(bad) == "'" + bad
    assert csv_safe("tiny-moe") == "tiny-moe" and csv_safe(-1.5) == -1.5
    text = format_rows([{"cell_id": "c", "model": '=HYPERLINK("http://evil")', "runner": "hf"}], "csv")
    assert "'=HYPERLINK" in text
    assert "'=HYPERLINK" in to_csv(pd.DataFrame([{"model": '=HYPERLINK("http://evil")', "x": -1.0}]))


def test_an_unwritable_results_folder_and_a_taken_leaderboard_port_are_one_line_errors(tmp_path):
    """Issue 17: both were tracebacks."""
    import socket

    from test_e2e_cli import moecap

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    proc = moecap("run", str(write(tmp_path, BASE)), "-o", str(blocker))
    assert proc.returncode == 2 and "cannot write the results folder" in proc.stderr
    assert "Traceback" not in proc.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = moecap("leaderboard", str(tmp_path), "--port", str(port))
    assert proc.returncode == 2 and f"port {port} on 127.0.0.1 is already in use" in proc.stderr
    assert "Traceback" not in proc.stderr


def _quality_suite(tasks, include_path=None):
    lm = {"tasks": tasks, **({"include_path": include_path} if include_path else {})}
    return {**BASE, "workloads": [{"name": "q", "lm_eval": lm}]}


def test_unknown_lm_eval_task_is_refused_at_validation(tmp_path):
    """Issue 17: an unknown lm-eval task was accepted, and failed only once its cell ran."""
    pytest.importorskip("lm_eval")
    msg = err_of(tmp_path, _quality_suite(["moecap_mc_code", "arc_eazy"]))
    assert "workloads[0].lm_eval.tasks" in msg and "'arc_eazy'" in msg and "arc_easy" in msg
    assert "moecap_mc_code" not in msg.split("unknown", 1)[1].split("\n")[1]  # only the unknown one is listed
    load_suite(str(write(tmp_path, _quality_suite(["moecap_mc_code", "arc_easy"]))))  # both known


def test_offline_tasks_and_include_path_tasks_validate(tmp_path):
    pytest.importorskip("lm_eval")
    load_suite(str(write(tmp_path, _quality_suite(["moecap_rolling_prose", "moecap_mc_c"]))))
    msg = err_of(tmp_path, _quality_suite(["moecap_mc_klingon"]))
    assert "'moecap_mc_klingon'" in msg
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "mine.yaml").write_text(yaml.safe_dump({
        "task": "my_local_task", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": "x.jsonl"}},
        "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{q}}", "doc_to_target": 0,
        "doc_to_choice": ["a", "b"], "metric_list": [{"metric": "acc"}]}))
    load_suite(str(write(tmp_path, _quality_suite(["my_local_task"], str(tasks)))))
    msg = err_of(tmp_path, _quality_suite(["my_local_task"], str(tmp_path / "nowhere")))
    assert "include_path: no such folder" in msg


def _serve_suite(args):
    return {**BASE, "runners": [{"type": "moecap-serve", "args": args}], "loads": [{"concurrency": 1}]}


def test_unknown_served_child_is_refused_at_validation(tmp_path):
    """Issue 17: an unknown served child was accepted, and failed once the server was up."""
    msg = err_of(tmp_path, _serve_suite({"models": {"tiny-moe-code": 1, "tiny-moe-klingon": 1}}))
    assert "runners[0].args.models" in msg and "unknown model 'tiny-moe-klingon'" in msg
    msg = err_of(tmp_path, _serve_suite({"serve": ["tiny-moe-code", "tiny-moe-prose"],
                                        "models": {"tiny-moe-code": 1, "tiny-moe-c": 1}}))
    assert "'tiny-moe-c' not served" in msg and "served: tiny-moe-code, tiny-moe-prose" in msg
    msg = err_of(tmp_path, _serve_suite({"serve": ["tiny-moe-code", "tiny-moe-code"]}))
    assert "two models are served as 'tiny-moe-code'" in msg
    d = tmp_path / "child"
    d.mkdir()
    (d / "config.json").write_text("{}")
    msg = err_of(tmp_path, _serve_suite({"models": {str(d): 1}}))
    assert "not served; served: child" in msg
    ok = _serve_suite({"serve": ["code=tiny-moe-code", "org/some-model"], "models": {"code": 3, "org/some-model": 1}})
    load_suite(str(write(tmp_path, ok)))


def test_gate_thresholds_are_validated_and_not_part_of_a_cells_id(tmp_path):
    """Issue 21: a suite may carry moecap compare's thresholds for its records (``gate.thresholds``,
    percent); a name compare does not know, or a threshold that is no finite percentage, is an error
    naming the file, the field and what is allowed."""
    ok = load_suite(str(write(tmp_path, {**BASE, "gate": {"thresholds": {"throughput": 7, "ttft_ms_p50": 12.5},
                                                         "note": "calibrated here"}})))
    assert ok.gate.thresholds == {"throughput": 7, "ttft_ms_p50": 12.5}
    plain = load_suite(str(write(tmp_path, BASE, "plain.yaml")))
    assert [c.cell_id for c in expand(ok)] == [c.cell_id for c in expand(plain)]
    msg = err_of(tmp_path, {**BASE, "gate": {"thresholds": {"thruput": 7}}})
    assert "suite.yaml" in msg and "gate.thresholds" in msg and "'thruput'" in msg and "output_tokens_per_s" in msg
    msg = err_of(tmp_path, {**BASE, "gate": {"thresholds": {"throughput": -1}}})
    assert "gate.thresholds" in msg and "finite percentage >= 0" in msg
    msg = err_of(tmp_path, {**BASE, "gate": {"threshold": {"throughput": 5}}})
    assert "gate.threshold" in msg
    assert load_suite("quickstart").gate.thresholds  # the quickstart carries its calibrated settings
