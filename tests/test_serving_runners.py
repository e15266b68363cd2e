"""The HTTP serving runners (``openai``, ``server``) against the real tiny OpenAI-compatible server, and the
guarantee that a launched server never outlives moecap (exceptions, SIGINT, SIGTERM, SIGKILL)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml

from conftest import PYTHON, REPO, free_port, running_server

SERVER = str(REPO / "tests" / "servers" / "tiny_openai_server.py")
PEAKS = {"mem_bandwidth_gbs": 10.0, "tflops": {"fp32": 1.0}}  # no calibration: HTTP runners need no peaks


def _suite(tmp_path, model_dir, runner: dict, loads: list[dict], num_prompts: int = 4, output_tokens: int = 6,
           slo_ms: dict | None = None):
    workload = {"name": "w", "input_tokens": 12, "output_tokens": output_tokens, "num_prompts": num_prompts}
    if slo_ms:
        workload["slo_ms"] = slo_ms
    return {
        "name": "serving",
        "models": [{"id": str(model_dir), "name": "tiny"}],
        "runners": [runner],
        "workloads": [workload],
        "loads": loads,
        "hardware": {"device": "cpu", "peaks": PEAKS, "calibrate": "never"},
        "output": {"dir": str(tmp_path / "results")},
    }


def _run(raw: dict):
    from moecap.run import run_suite
    from moecap.suite import parse_suite

    return run_suite(parse_suite(raw, "test"), log=lambda s: None)


def _server_cmd(port="{port}") -> list[str]:
    return [PYTHON, SERVER, "--model", "{model}", "--port", str(port), "--served-model-name", "tiny"]


def _group_gone(pgid: int, deadline_s: float = 20) -> bool:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def _procs_with(port: int) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        try:
            if str(port) in (p.info["cmdline"] or []) and p.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def test_server_runner_suite(tmp_path, tiny_moe_dir):
    runner = {"type": "server", "args": {"command": _server_cmd(), "model": "tiny", "startup_timeout_s": 120}}
    loads = [{"concurrency": 1}, {"concurrency": 3}, {"rate": 20.0, "arrival": "poisson"}]
    out = _run(_suite(tmp_path, tiny_moe_dir, runner, loads, slo_ms={"ttft_ms": 60_000, "tpot_ms": 60_000}))
    assert [o.status for o in out.outcomes] == ["ok"] * 3, [o.record.error for o in out.outcomes]
    pids = set()
    for o in out.outcomes:
        rep = o.record.report
        thr = rep["throughput"]
        assert thr["completed"] == 4 and thr["failed"] == 0 and thr["output_tokens"] == 4 * 6
        for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
            assert rep["latency"][key]["median"] > 0 and rep["latency"][key]["p99"] >= rep["latency"][key]["median"]
        assert thr["goodput_requests_per_s"] > 0 and thr["slo_ms"]["ttft_ms"] == 60_000
        assert rep["utilization"] == {"available": False, "reason": "an HTTP endpoint exposes no router traces"}
        assert rep.get("model")  # the local HF config is known: model accounting
        # the server's own processes are metered: their memory (energy: RAPL is not readable in this VM)
        assert rep["memory"]["host_rss_peak_bytes"] > 50e6 and rep["energy"]["tracked_processes_max"] >= 1
        assert rep["energy"]["available"] or rep["energy"]["reason"]
        assert rep["cost"]["usd_per_1m_output_tokens"] > 0
        cfg = o.record.config["runner"]
        assert os.path.isfile(cfg["server_log"])
        pids.add(cfg["server_pid"])
    assert len(pids) == 1  # one server for the three cells
    assert _group_gone(pids.pop())

    # the SLO is the workload's: a changed one re-scores the stored requests, it re-runs nothing
    before = {o.cell.cell_id: o.record for o in out.outcomes}
    again = _run(_suite(tmp_path, tiny_moe_dir, runner, loads, slo_ms={"ttft_ms": 0.001}))
    assert [o.status for o in again.outcomes] == ["rescored"] * 3
    for o in again.outcomes:
        old, new = before[o.cell.cell_id], o.record
        assert new.run_id == old.run_id and new.config == old.config  # the same measurement
        assert new.report["latency"] == old.report["latency"]
        thr = new.report["throughput"]
        assert thr["slo_ms"] == {"ttft_ms": 0.001} and thr["goodput_requests_per_s"] == 0.0
        assert thr["output_tokens_per_s"] == pytest.approx(old.report["throughput"]["output_tokens_per_s"])
        assert new.report["rescored"]["previous_slo_ms"] == {"ttft_ms": 60_000, "tpot_ms": 60_000}
    assert [o.status for o in _run(_suite(tmp_path, tiny_moe_dir, runner, loads,
                                          slo_ms={"ttft_ms": 0.001})).outcomes] == ["skipped"] * 3


def test_slo_in_runner_args_names_its_new_place(tmp_path, tiny_moe_dir):
    from moecap.suite import SuiteError, parse_suite

    runner = {"type": "server", "args": {"command": _server_cmd(), "slo_ms": {"ttft_ms": 5}}}
    with pytest.raises(SuiteError, match=r"runners\[0\].args.*slo_ms belongs to the workload now"):
        parse_suite(_suite(tmp_path, tiny_moe_dir, runner, [{"concurrency": 1}]), "test")


def test_openai_runner_against_running_server(tmp_path, tiny_moe_dir):
    port = free_port()
    cmd = [PYTHON, SERVER, "--model", str(tiny_moe_dir), "--port", str(port), "--served-model-name", "tiny"]
    with running_server(cmd, f"http://127.0.0.1:{port}/health"):
        runner = {"type": "openai", "args": {"base_url": f"http://127.0.0.1:{port}/v1", "model": "tiny",
                                             "warmup_requests": 0}}
        out = _run(_suite(tmp_path, tiny_moe_dir, runner, [{"batch_size": 2}], num_prompts=3, output_tokens=4))
    (o,) = out.outcomes
    assert o.status == "ok", o.record.error
    thr = o.record.report["throughput"]
    assert thr["completed"] == 3 and thr["output_tokens"] == 12
    assert o.record.report["latency"]["ttft_ms"]["median"] > 0
    # a remote endpoint is not this machine: not priced unless the suite names its hardware
    cost = o.record.report["cost"]
    assert cost["available"] is False and "another machine" in cost["reason"]


def test_openai_runner_priced_on_named_hardware(tmp_path, tiny_moe_dir):
    port = free_port()
    cmd = [PYTHON, SERVER, "--model", str(tiny_moe_dir), "--port", str(port), "--served-model-name", "tiny"]
    with running_server(cmd, f"http://127.0.0.1:{port}/health"):
        runner = {"type": "openai", "args": {"base_url": f"http://127.0.0.1:{port}", "model": "tiny",
                                             "warmup_requests": 0}}
        raw = _suite(tmp_path, tiny_moe_dir, runner, [{"concurrency": 1}], num_prompts=2, output_tokens=4)
        raw["cost"] = {"cloud_usd_per_hour": 3.0}
        (o,) = _run(raw).outcomes
    assert o.status == "ok", o.record.error
    cost = o.record.report["cost"]
    assert cost["model"] == "cloud" and cost["cloud"]["usd_per_hour"] == 3.0
    hours = cost["run_hours"]
    assert cost["usd_per_1m_output_tokens"] == pytest.approx(3.0 * hours / cost["output_tokens"] * 1e6)
    assert "capital_usd" not in cost  # nothing of this machine is priced


def test_openai_runner_connection_refused(tmp_path, tiny_moe_dir):
    port = free_port()  # nothing listens there
    runner = {"type": "openai", "args": {"base_url": f"http://127.0.0.1:{port}", "model": "tiny"}}
    out = _run(_suite(tmp_path, tiny_moe_dir, runner, [{"concurrency": 2}], num_prompts=3))
    (o,) = out.outcomes
    assert o.status == "failed" and "3 of 3 requests failed" in o.record.error  # never an ok record
    rep = o.record.report  # the failed requests are kept with their errors
    assert rep["throughput"]["completed"] == 0 and rep["throughput"]["failed"] == 3
    assert sum(rep["errors"].values()) == 3
    assert any("connect" in e.lower() for e in rep["errors"]), rep["errors"]


def test_openai_args_validate_url():
    from pydantic import ValidationError

    from moecap.runners.args import OpenAIRunnerArgs

    assert OpenAIRunnerArgs(base_url="http://h:1/v1/").base_url == "http://h:1"
    with pytest.raises(ValidationError):
        OpenAIRunnerArgs(base_url="h:1")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=["SIGINT", "SIGTERM", "SIGKILL"])
def test_no_orphan_server_after_interrupt(tmp_path, tiny_moe_dir, sig):
    """Kill ``moecap run`` mid-suite: its server's whole process group goes too. SIGINT/SIGTERM are
    handled by moecap; SIGKILL cannot be, and the server guard stops the group on its own."""
    port = free_port()
    runner = {"type": "server", "args": {"command": _server_cmd(port), "port": port, "model": "tiny",
                                         "startup_timeout_s": 120}}
    raw = _suite(tmp_path, tiny_moe_dir, runner, [{"concurrency": 1}], num_prompts=500, output_tokens=32)
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(raw))
    proc = subprocess.Popen([PYTHON, "-m", "moecap", "run", str(path)], cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read().decode(errors="replace")[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the server never answered"
            time.sleep(0.2)
        servers = _procs_with(port)
        assert servers, "the server process is not visible"
        pgids = {os.getpgid(p.pid) for p in servers}
        assert proc.pid not in pgids  # the server has its own process group
        time.sleep(1.0)  # let requests flow
        proc.send_signal(sig)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
        err = proc.stderr.read().decode(errors="replace")[-4000:]
        assert proc.returncode != 0, err
        if sig == signal.SIGKILL:
            assert proc.returncode == -signal.SIGKILL
        for pgid in pgids:
            assert _group_gone(pgid, 20), f"process group {pgid} survived"
        assert not _procs_with(port)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for p in _procs_with(port):  # never leave one behind, even when the test fails
            p.kill()


def test_multi_model_workload_reports_each_model(tmp_path, tiny_moe_dir):
    """Each request draws its served model (seeded); the record carries every model's own figures, and
    a model the server does not serve shows up as that model's failed requests (never dropped)."""
    port = free_port()
    runner = {"type": "server", "args": {"command": _server_cmd(port), "port": port, "warmup_requests": 0,
                                         "models": {"tiny": 3.0, "missing": 1.0}}}
    raw = _suite(tmp_path, tiny_moe_dir, runner, [{"concurrency": 2}], num_prompts=12, output_tokens=3)
    raw["workloads"][0]["max_failed_fraction"] = 0.5  # the unserved model's requests fail by design here
    (o,) = _run(raw).outcomes
    assert o.status == "ok", o.record.error
    per = o.record.report["per_model"]
    assert set(per) == {"tiny", "missing"}
    assert per["tiny"]["requests"] + per["missing"]["requests"] == 12
    assert per["tiny"]["requests"] > per["missing"]["requests"] > 0
    assert per["tiny"]["throughput"]["completed"] == per["tiny"]["requests"]
    assert per["missing"]["throughput"]["failed"] == per["missing"]["requests"]
    assert per["tiny"]["latency"]["e2el_ms"]["median"] > 0
    reqs = [json.loads(line) for line in (tmp_path / "results" / "serving" / o.record.artifacts["requests"])
            .read_text().splitlines()]
    assert {r["model"] for r in reqs} == {"tiny", "missing"}


@pytest.mark.parametrize("flags,budget,status,fragment", [
    (["--fail-every", "1"], None, "failed", "4 of 4 requests failed"),
    (["--fail-every", "2"], None, "failed", "2 of 4 requests failed"),
    (["--fail-every", "2"], 0.5, "ok", None),
    (["--short", "0.25"], None, "failed", "4 of 4 requests stopped short of output_tokens=8"),
], ids=["all-500", "half-500", "half-500-within-budget", "quarter-of-the-tokens"])
def test_a_cell_is_only_as_ok_as_its_requests(tmp_path, tiny_moe_dir, flags, budget, status, fragment):
    """Issue 17: every request answered HTTP 500, half of them, or a quarter of the tokens under ignore_eos
    was an ok record; now the cell fails (figures and requests kept) unless the workload's budget allows."""
    runner = {"type": "server", "args": {"command": _server_cmd() + flags, "model": "tiny",
                                         "startup_timeout_s": 120, "warmup_requests": 0}}
    raw = _suite(tmp_path, tiny_moe_dir, runner, [{"concurrency": 2}], output_tokens=8)
    if budget is not None:
        raw["workloads"][0]["max_failed_fraction"] = budget
    (o,) = _run(raw).outcomes
    rec = o.record
    assert rec.status == status, rec.error
    req = rec.report["requests"]
    assert req["total"] == 4 and req["max_failed_fraction"] == (budget or 0.0)
    if status == "failed":
        assert fragment in rec.error and rec.model_extra["failure"] == {"kind": "requests"}
        assert rec.artifacts.get("requests")  # the failed requests are kept for the post-mortem
    if "--short" in flags:
        assert req["short"] == 4 and req["short_outputs"]["got_min"] == 2
    else:
        assert req["failed"] == (4 if flags[-1] == "1" else 2)


def test_moecap_run_exits_nonzero_when_requests_fail(tmp_path, tiny_moe_dir):
    import yaml
    from test_e2e_cli import moecap

    runner = {"type": "server", "args": {"command": _server_cmd() + ["--fail-every", "1"], "model": "tiny",
                                         "startup_timeout_s": 120, "warmup_requests": 0}}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(_suite(tmp_path, tiny_moe_dir, runner, [{"concurrency": 2}])))
    proc = moecap("run", str(path), check=1)
    assert "0 ok, 1 failed" in proc.stdout


def test_a_taken_port_fails_the_cell_instead_of_measuring_another_server(tmp_path, tiny_moe_dir):
    """Issue 17: with a fixed port already served by another process, the launched server died with
    "Address already in use" and moecap measured the other one as ok."""
    port = free_port()
    other = [PYTHON, SERVER, "--model", str(tiny_moe_dir), "--port", str(port), "--served-model-name", "tiny"]
    with running_server(other, f"http://127.0.0.1:{port}/health"):
        runner = {"type": "server", "args": {"command": _server_cmd(), "model": "tiny", "port": port,
                                             "startup_timeout_s": 60}}
        (o,) = _run(_suite(tmp_path, tiny_moe_dir, runner, [{"concurrency": 1}])).outcomes
    assert o.status == "failed"
    assert f"port {port} on 127.0.0.1 is already in use" in o.record.error and "leave it unset" in o.record.error


def test_the_process_answering_must_be_the_one_started(tmp_path, tiny_moe_dir):
    from moecap.runners.server import ServerProcess

    port = free_port()
    other = [PYTHON, SERVER, "--model", str(tiny_moe_dir), "--port", str(port), "--served-model-name", "tiny"]
    with running_server(other, f"http://127.0.0.1:{port}/health"):
        # a "server" that never binds its port (as one that died at start-up, its guard alive)
        mine = ServerProcess([PYTHON, "-c", "import time; time.sleep(60)"], tmp_path / "log").start()
        try:
            mine.wait_ready(f"http://127.0.0.1:{port}/health", 30)  # the port answers: someone else's
            with pytest.raises(RuntimeError, match=f"port {port} is answered by pid"):
                mine.check_owns(port)
        finally:
            mine.stop()
    # and a real launch passes its own check
    port = free_port()
    ok = ServerProcess([PYTHON, SERVER, "--model", str(tiny_moe_dir), "--port", str(port)], tmp_path / "log2").start()
    try:
        ok.wait_ready(f"http://127.0.0.1:{port}/health", 60)
        ok.check_owns(port)
    finally:
        ok.stop()


def test_a_key_never_reaches_the_record_the_manifest_or_the_id(tmp_path, tiny_moe_dir):
    """Issue 17: --set runners.0.args.api_key=... was stored in plain text three times in every record."""
    import yaml
    from test_e2e_cli import moecap

    port = free_port()
    cmd = [PYTHON, SERVER, "--model", str(tiny_moe_dir), "--port", str(port), "--served-model-name", "tiny"]
    secret = "sk-test-5ecr3t-0123456789"
    with running_server(cmd, f"http://127.0.0.1:{port}/health"):
        runner = {"type": "openai", "args": {"base_url": f"http://127.0.0.1:{port}", "model": "tiny",
                                             "warmup_requests": 0}}
        path = tmp_path / "s.yaml"
        path.write_text(yaml.safe_dump(_suite(tmp_path, tiny_moe_dir, runner, [{"concurrency": 1}], num_prompts=2)))
        moecap("run", str(path), "--set", f"runners.0.args.api_key={secret}", check=0)
        ids = {p.name for p in (tmp_path / "results" / "serving").glob("*.json")}
        moecap("run", str(path), "--set", "runners.0.args.api_key=another-key-98765", check=0)
    files = [p for p in (tmp_path / "results").rglob("*") if p.is_file()]
    leaked = [str(p) for p in files if secret in p.read_text(errors="replace")]
    assert not leaked, leaked
    (rec_path,) = list((tmp_path / "results" / "serving").glob("*.json"))
    rec = json.loads(rec_path.read_text())
    assert rec["config"]["runner"]["args"]["api_key"] == "***redacted***"
    assert rec["config"]["runner"]["resolved_args"]["api_key"] in ("***redacted***", "**********")
    assert any("api_key=***redacted***" in a for a in rec["environment"]["argv"])
    # the key is no part of the cell: another key finds the same cell done
    assert {p.name for p in (tmp_path / "results" / "serving").glob("*.json")} == ids


def _detaching_server_cmd(pidfile: Path, port="{port}", double_fork: bool = False) -> list[str]:
    """The test server, started by a shell that first detaches a helper process into a session of its
    own (``setsid``; with ``double_fork``, also orphaned to init), writing the helper's pid to ``pidfile``."""
    inner = f"echo $$ > {pidfile}; exec sleep 600"
    detach = f"setsid sh -c '{inner}' &" if not double_fork else f"(setsid sh -c '{inner}' &) &"
    server = " ".join([PYTHON, SERVER, "--model", "{model}", "--port", str(port), "--served-model-name", "tiny"])
    return ["sh", "-c", f"{detach} exec {server}"]


def _wait_pid(pidfile: Path, deadline_s: float = 30) -> int:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            return int(pidfile.read_text().strip())
        except (OSError, ValueError):
            time.sleep(0.05)
    raise AssertionError(f"{pidfile} never written")


def _gone(pid: int, deadline_s: float = 20) -> bool:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("double_fork", [False, True], ids=["setsid", "setsid-orphaned"])
def test_a_process_the_server_detaches_dies_with_it(tmp_path, tiny_moe_dir, double_fork):
    """Issue 17: a process that a server command detaches with ``setsid`` (out of the process group
    moecap stops) outlived the run."""
    pidfile = tmp_path / "detached.pid"
    runner = {"type": "server", "args": {"command": _detaching_server_cmd(pidfile, double_fork=double_fork),
                                         "model": "tiny", "startup_timeout_s": 60}}
    (o,) = _run(_suite(tmp_path, tiny_moe_dir, runner, [{"concurrency": 1}])).outcomes
    assert o.status == "ok", o.record.error
    pid = _wait_pid(pidfile)
    try:
        assert _gone(pid), f"detached process {pid} outlived the run"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_a_detached_process_dies_when_the_launcher_is_killed(tmp_path, tiny_moe_dir):
    """SIGKILL of the launcher: the guard stops the group and the tagged process outside it."""
    pidfile = tmp_path / "detached.pid"
    port = free_port()
    code = (
        "import sys, time\n"
        "from moecap.runners.server import ServerProcess\n"
        f"s = ServerProcess({_detaching_server_cmd(pidfile, port)!r}, {str(tmp_path / 'log')!r}, orphan_grace_s=2)\n"
        "s.start()\n"
        f"s.wait_ready('http://127.0.0.1:{port}/health', 60)\n"
        "print('ready', flush=True)\n"
        "time.sleep(600)\n"
    ).replace("{model}", str(tiny_moe_dir))
    launcher = subprocess.Popen([PYTHON, "-c", code], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    pid = None
    try:
        assert launcher.stdout.readline().decode().strip() == "ready", launcher.stderr.read().decode()[-3000:]
        pid = _wait_pid(pidfile)
        assert os.getpgid(pid) != os.getpgid(launcher.pid)
        launcher.kill()
        launcher.wait(timeout=30)
        assert _gone(pid, 30), f"detached process {pid} outlived its SIGKILLed launcher"
        assert not _procs_with(port)
    finally:
        if launcher.poll() is None:
            launcher.kill()
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for p in _procs_with(port):
            p.kill()
