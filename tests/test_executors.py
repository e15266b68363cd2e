"""Executors through the real CLI: local worker subprocesses (crash, timeout, isolation), Ray tasks and actors
on a local Ray cluster, interrupted runs resumed with --resume, and two moecap processes sharing a folder.

Most cells use the fake runner of ``tests/moecap_test_runners.py`` (no model, no torch: named by import path,
which needs ``tests/`` on PYTHONPATH); one test per executor also runs the real hf runner on tiny-moe."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from moecap.records import Record, ResultStore

TESTS = Path(__file__).resolve().parent
FAKE = "moecap_test_runners:FakeRunner"


def _env() -> dict[str, str]:
    env = dict(os.environ)  # carries MOECAP_CACHE_DIR from conftest
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def moecap(*args, check=None, timeout=600):
    proc = subprocess.run([sys.executable, "-m", "moecap", *args], capture_output=True, text=True, env=_env(),
                          timeout=timeout)
    if check is not None:
        assert proc.returncode == check, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-6000:]}"
    return proc


def moecap_bg(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "moecap", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=_env())


def fake_suite(tmp_path: Path, name: str = "fk", loads=(1, 2, 3, 4, 5), runners=None, **args) -> Path:
    suite = {
        "name": name,
        "models": [{"id": "tiny-moe"}],
        "runners": runners or [{"type": FAKE, "args": {"marks": str(tmp_path / "marks"), **args}}],
        "workloads": [{"name": "w", "input_tokens": 16, "output_tokens": 4, "num_prompts": 2}],
        "loads": [{"batch_size": b} for b in loads],
        "hardware": {"device": "cpu"},
        "output": {"dir": str(tmp_path / "out")},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(suite))
    return path


def records(tmp_path: Path, name: str = "fk", runner: str = "FakeRunner") -> dict[int, dict]:
    """The suite's records of one runner, by batch size (each validated as a Record)."""
    out = {}
    for p in sorted((tmp_path / "out" / name).glob("*.json")):
        data = json.loads(p.read_text())
        Record.model_validate(data)
        if runner in data["config"]["runner"]["type"]:
            out[data["config"]["load"]["batch_size"]] = data
    return out


def marks(tmp_path: Path) -> dict[int, list[int]]:
    """Pids of every attempt at each fake cell, by batch size."""
    out = {}
    for p in (tmp_path / "marks").glob("w__bs*"):
        if p.suffix != ".child":
            out[int(p.name.split("bs")[1])] = [int(x) for x in p.read_text().split()]
    return out


def gone(pid: int, deadline_s: float = 60) -> bool:
    """Wait until ``pid`` is no more (or a zombie); False if it is still alive at the deadline."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.1)
    return False


def wait_for(predicate, proc: subprocess.Popen | None = None, deadline_s: float = 300) -> None:
    end = time.monotonic() + deadline_s
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"moecap exited with {proc.returncode} first:\n{proc.stderr.read()[-4000:]}")
        assert time.monotonic() < end, "the condition never held"
        time.sleep(0.05)


def assert_ok_record(tmp_path: Path, rec: dict, name: str = "fk") -> None:
    assert rec["status"] == "ok", rec.get("error")
    for rel in rec["artifacts"].values():
        assert (tmp_path / "out" / name / rel).is_file(), rel
    reqs = (tmp_path / "out" / name / rec["artifacts"]["requests"]).read_text().splitlines()
    assert len(reqs) == 2 and all(json.loads(r)["output_tokens"] == 4 for r in reqs)


def no_temp_files(tmp_path: Path) -> bool:
    return not [p for p in (tmp_path / "out").rglob("*") if p.name.endswith(".tmp")]


# --------------------------------------------------------------------------------------------------


def test_plugin_runner_by_import_path(tmp_path):
    from moecap.registry import RUNNERS, runner_entry
    from moecap.suite import SuiteError, load_suite

    entry = runner_entry(FAKE)
    assert entry.cls == FAKE and entry.args == "moecap_test_runners:FakeArgs" and entry.loads == ("batch",)
    assert FAKE not in sorted(RUNNERS)  # resolved on lookup, never listed
    load_suite(str(fake_suite(tmp_path)))
    with pytest.raises(SuiteError, match="unknown runner 'moecap_test_runners:Nope'"):
        load_suite(str(fake_suite(tmp_path, runners=[{"type": "moecap_test_runners:Nope"}])))
    with pytest.raises(SuiteError, match="crash_onn"):
        load_suite(str(fake_suite(tmp_path, crash_onn=[1])))


def test_executor_flags_are_checked(tmp_path):
    suite = str(fake_suite(tmp_path))
    err = moecap("run", suite, "--address", "auto", check=2).stderr
    assert "--address apply to --executor ray only" in err
    err = moecap("run", suite, "--executor", "inline", "--cell-timeout-s", "5", check=2).stderr
    assert "--cell-timeout-s need worker processes" in err and "--executor local or ray" in err
    assert "--max-retries -1: allowed an integer >= 0" in moecap("run", suite, "--max-retries", "-1", check=2).stderr
    assert "--force and --resume exclude each other" in moecap("run", suite, "--force", "--resume", check=2).stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("isolate", ["cell", "group"])
def test_local_executor_crash_timeout_and_the_rest_intact(tmp_path, isolate):
    suite = fake_suite(tmp_path, crash_on=[2], hang_on=[3], fail_on=[4])
    proc = moecap("run", str(suite), "--executor", "local", "--isolate", isolate, "--cell-timeout-s", "5", check=1)
    recs, m = records(tmp_path), marks(tmp_path)
    assert sorted(recs) == [1, 2, 3, 4, 5]
    for bs in (1, 5):
        assert_ok_record(tmp_path, recs[bs])
        assert recs[bs]["environment"]["executor"]["kind"] == "local"
    # the crash: retried once in a new worker, then recorded with the exit status
    crash = recs[2]
    assert crash["status"] == "failed" and crash["failure"] == {"kind": "worker_died", "attempts": 2, "exit_status": 1}
    assert "exited with status 1" in crash["error"] and len(m[2]) == 2 and m[2][0] != m[2][1]
    # the hang: killed at the timeout, its whole process group with it, not retried
    assert recs[3]["failure"]["kind"] == "timeout" and "--cell-timeout-s" in recs[3]["error"] and len(m[3]) == 1
    child = int((tmp_path / "marks" / "w__bs3.child").read_text())
    assert gone(m[3][0]) and gone(child)
    # an exception is the cell's own verdict: recorded once, never retried
    assert recs[4]["failure"] == {"kind": "exception"} and "fake failure at batch size 4" in recs[4]["error"]
    assert len(m[4]) == 1 and len(m[1]) == 1 and len(m[5]) == 1
    if isolate == "cell":  # a fresh process per cell
        assert len({m[b][0] for b in (1, 3, 4, 5)}) == 4
    else:  # one process per group: after the hang's worker, bs4 and bs5 share the next one
        assert m[4] == m[5] and m[1][0] == m[2][0]
    assert "3 failed" in proc.stdout and "FAILED" in proc.stderr
    assert no_temp_files(tmp_path)


def test_local_executor_runs_the_real_model(tmp_path, tiny_moe_dir):
    suite = fake_suite(tmp_path, name="real", loads=(1, 2), runners=[{"type": "hf", "args": {"dtype": "float32"}}])
    moecap("run", str(suite), "--isolate", "group", check=0)
    recs = records(tmp_path, "real", runner="hf")
    assert sorted(recs) == [1, 2]
    for bs, rec in recs.items():
        assert_ok_record(tmp_path, rec, "real")
        assert rec["report"]["utilization"]["decode"]["s_mbu"] > 0
        passes = (tmp_path / "out" / "real" / rec["artifacts"]["passes"]).read_text().splitlines()
        assert len(passes) == (2 // bs) * 4 and json.loads(passes[0])["expert_counts"]
        assert rec["environment"]["executor"] == {"kind": "local", "isolate": "group", "cell_timeout_s": None,
                                                  "max_retries": 1}


def _manifest(tmp_path: Path, run_id: str) -> dict:
    return json.loads((tmp_path / "out" / "fk" / ".moecap" / "runs" / f"{run_id}.json").read_text())


def test_interrupted_run_resumes_only_its_unfinished_cells(tmp_path):
    gate = tmp_path / "gate"
    suite = str(fake_suite(tmp_path, fail_on=[2], gate_on=[3], gate=str(gate)))
    proc = moecap_bg("run", suite)
    wait_for(lambda: 3 in marks(tmp_path), proc)  # bs1 and bs2 recorded, bs3 running
    worker = marks(tmp_path)[3][0]
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "--resume" in err and gone(worker)  # the worker was torn down with the run
    first = records(tmp_path)
    assert sorted(first) == [1, 2] and first[1]["status"] == "ok" and first[2]["status"] == "failed"
    run_id = first[1]["run_id"]
    man = _manifest(tmp_path, run_id)
    assert man["status"] == "interrupted" and man["reason"].startswith("KeyboardInterrupt")
    kept = {bs: (tmp_path / "out" / "fk").glob(f"*__bs{bs}__*.json") for bs in (1, 2)}
    kept = {bs: next(paths).read_bytes() for bs, paths in kept.items()}

    gate.touch()
    proc = moecap("run", suite, "--resume", check=0)
    assert f"resuming run {run_id}: 3 of its 5 cells are unfinished" in proc.stderr and "(resumed)" in proc.stdout
    recs = records(tmp_path)
    assert {bs: r["run_id"] for bs, r in recs.items()} == {bs: run_id for bs in (1, 2, 3, 4, 5)}
    assert all(recs[bs]["status"] == "ok" for bs in (3, 4, 5))
    for bs, data in kept.items():  # finished records, the failed one included, are untouched
        assert next((tmp_path / "out" / "fk").glob(f"*__bs{bs}__*.json")).read_bytes() == data
    assert {bs: len(p) for bs, p in marks(tmp_path).items()} == {1: 1, 2: 1, 3: 2, 4: 1, 5: 1}
    man = _manifest(tmp_path, run_id)
    assert man["status"] == "finished" and len(man["drivers"]) == 2

    # nothing left to resume: a plain run, which retries the failed cell only
    proc = moecap("run", suite, "--resume", check=1)
    assert "no interrupted run" in proc.stderr
    assert {bs: len(p) for bs, p in marks(tmp_path).items()} == {1: 1, 2: 2, 3: 2, 4: 1, 5: 1}


def test_killed_run_is_resumed_and_its_claims_taken_over(tmp_path):
    """SIGKILL of moecap itself: its worker follows it, its claims and run lock die with it, --resume
    continues the same run."""
    gate = tmp_path / "gate"
    suite = str(fake_suite(tmp_path, loads=(1, 2, 3), gate_on=[2], gate=str(gate)))
    proc = moecap_bg("run", suite)
    wait_for(lambda: 2 in marks(tmp_path), proc)
    worker = marks(tmp_path)[2][0]
    proc.kill()
    proc.communicate(timeout=60)
    assert gone(worker)  # the orphaned worker killed itself
    run_id = records(tmp_path)[1]["run_id"]
    assert _manifest(tmp_path, run_id)["status"] == "running"  # it never got to say otherwise
    claim = ResultStore(tmp_path / "out", "fk").claim(_manifest(tmp_path, run_id)["todo"][1], "test")
    assert claim is not None  # the dead process's claim on bs2 is free
    claim.release()

    gate.touch()
    moecap("run", suite, "--resume", check=0)
    recs = records(tmp_path)
    assert {bs: r["run_id"] for bs, r in recs.items()} == {1: run_id, 2: run_id, 3: run_id}
    assert {bs: len(p) for bs, p in marks(tmp_path).items()} == {1: 1, 2: 2, 3: 1}
    assert _manifest(tmp_path, run_id)["status"] == "finished"


def test_resume_refuses_a_different_suite(tmp_path):
    gate = tmp_path / "gate"
    suite = str(fake_suite(tmp_path, loads=(1, 2), gate_on=[2], gate=str(gate)))
    proc = moecap_bg("run", suite)
    wait_for(lambda: 2 in marks(tmp_path), proc)
    proc.send_signal(signal.SIGTERM)  # as Ctrl-C: workers torn down, the run marked interrupted
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "--resume" in err and gone(marks(tmp_path)[2][0])
    (man,) = (tmp_path / "out" / "fk" / ".moecap" / "runs").glob("*.json")
    assert json.loads(man.read_text())["status"] == "interrupted"
    err = moecap("run", suite, "--resume", "--set", "loads=[{batch_size: 7}]", check=2).stderr
    assert "--resume: the interrupted run" in err and "same suite and --set options" in err


def test_two_processes_share_a_results_folder(tmp_path):
    """Two moecap runs on one folder at once: every cell runs exactly once, every record is whole."""
    loads = tuple(range(1, 9))
    suite = str(fake_suite(tmp_path, loads=loads, sleep_s=0.3))
    procs = [moecap_bg("run", suite), moecap_bg("run", suite)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-3000:] for o in outs]
    assert {bs: len(p) for bs, p in marks(tmp_path).items()} == {bs: 1 for bs in loads}
    recs = records(tmp_path)
    assert sorted(recs) == list(loads)
    for rec in recs.values():
        assert_ok_record(tmp_path, rec)
    oks = [int(o[0].split(" ok, ")[0].rsplit(" ", 1)[-1]) for o in outs]
    assert sum(oks) == len(loads)
    assert no_temp_files(tmp_path)


# --------------------------------------------------------------------------------------------------
# Ray: one local cluster for the module (CPU only), joined by each moecap run through --address


@pytest.fixture(scope="module")
def ray_address(_isolated_cache):
    ray = pytest.importorskip("ray")
    saved = os.environ.get("PYTHONPATH")
    # the cluster's workers inherit this process's environment: the fake runners' module, the test cache
    os.environ["PYTHONPATH"] = _env()["PYTHONPATH"]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved


def test_ray_executor_crashed_worker_is_retried_then_recorded(tmp_path, ray_address, tiny_moe_dir):
    """Six cells on the Ray cluster (three on the real model, three fake); one kills its worker every time."""
    suite = fake_suite(tmp_path, name="ray", loads=(1, 2, 3), runners=[
        {"type": "hf", "args": {"dtype": "float32"}},
        {"type": FAKE, "args": {"marks": str(tmp_path / "marks"), "crash_on": [3]}},
    ])
    proc = moecap("run", str(suite), "--executor", "ray", "--address", ray_address, check=1)
    hf, fake = records(tmp_path, "ray", runner="hf"), records(tmp_path, "ray")
    assert sorted(hf) == [1, 2, 3] and sorted(fake) == [1, 2, 3]
    for rec in [*hf.values(), fake[1], fake[2]]:
        assert_ok_record(tmp_path, rec, "ray")
        assert rec["environment"]["executor"]["kind"] == "ray"
    for rec in hf.values():
        assert rec["report"]["utilization"]["decode"]["s_mbu"] > 0
    crash = fake[3]
    assert crash["status"] == "failed" and crash["failure"]["kind"] == "worker_died"
    assert crash["failure"]["attempts"] == 2 and crash["failure"]["ray_error"] == "WorkerCrashedError"
    assert len(marks(tmp_path)[3]) == 2  # the first attempt and its one retry, each in a fresh worker
    assert "5 ok, 1 failed" in proc.stdout
    assert no_temp_files(tmp_path)


def test_ray_actors_per_group_timeout_and_unschedulable(tmp_path, ray_address):
    suite = fake_suite(tmp_path, crash_on=[2], hang_on=[3])
    proc = moecap("run", str(suite), "--executor", "ray", "--address", ray_address, "--isolate", "group",
                  "--cell-timeout-s", "5", "--max-retries", "2", check=1)
    recs, m = records(tmp_path), marks(tmp_path)
    for bs in (1, 4, 5):
        assert_ok_record(tmp_path, recs[bs])
    assert m[4] == m[5] and m[1][0] == m[2][0]  # one actor per group: cells after a lost actor share a new one
    assert recs[2]["failure"]["kind"] == "worker_died" and recs[2]["failure"]["attempts"] == 3 and len(m[2]) == 3
    assert recs[3]["failure"]["kind"] == "timeout" and len(m[3]) == 1
    child = tmp_path / "marks" / "w__bs3.child"
    if child.exists() and not gone(int(child.read_text()), deadline_s=5):  # Ray kills the actor's process only
        os.kill(int(child.read_text()), signal.SIGKILL)
    assert "3 ok, 2 failed" in proc.stdout

    # a cell no node can hold is recorded at once instead of waiting for ever
    moecap("run", str(suite), "--executor", "ray", "--address", ray_address, "--gpu-type", "H100",
           "--set", "hardware.device=cuda", "--set", "loads=[{batch_size: 9}]", check=1)
    rec = records(tmp_path)[9]
    assert rec["failure"]["kind"] == "unschedulable"
    assert "GPU=1" in rec["error"] and "accelerator_type:H100" in rec["error"] and "CPU=2" in rec["error"]


def test_worker_output_is_filed_per_cell_even_when_a_marker_is_split_across_reads():
    """The local executor files a worker's output as each cell's cell.log, cut at the marker line the
    worker writes before each result; pipe reads may cut anywhere, a marker included."""
    import sys

    import subprocess

    from moecap.run.local_executor import _CellLogs
    from moecap.run.worker import CELL_END

    script = ("import os, sys\n"
              "sys.stderr.write('Loading weights: 10%\\rLoading weights: 100%\\nwarning x\\n'); sys.stderr.flush()\n"
              f"os.write(2, b'\\n{CELL_END}A\\n')\n"
              "sys.stderr.write('cell B output\\n'); sys.stderr.flush()\n"
              f"os.write(2, b'\\n{CELL_END}B\\n')\n")
    seen: list[str] = []
    logs = _CellLogs(on_line=seen.append)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60).stderr.decode()
    for i in range(0, len(out), 7):  # reads of 7 characters: every marker is cut
        logs.feed(out[i:i + 7])
    assert logs.take("A", 1) == "Loading weights: 10%\rLoading weights: 100%\nwarning x\n\n"
    assert logs.take("B", 1) == "cell B output\n\n"
    assert seen == ["Loading weights: 10%\rLoading weights: 100%", "warning x", "", "cell B output", ""]


def test_moecap_progress_from_a_worker_reaches_the_console(capsys):
    """Issue 18: with the workers' output filed in cell logs, the first run's tiny-moe training progress
    (printed inside the worker that loads the model) must still reach the console."""
    from moecap.run.local_executor import _echo_own_line

    for line in ("moecap zoo: tiny-moe base step 70/700, loss 6.569, 20 s elapsed, ~2.9 min left",
                 "Loading weights: 100%", "moecap: building tiny-moe (base) ...", "UserWarning: x"):
        _echo_own_line(line)
    assert capsys.readouterr().err.splitlines() == [
        "moecap zoo: tiny-moe base step 70/700, loss 6.569, 20 s elapsed, ~2.9 min left",
        "moecap: building tiny-moe (base) ..."]
