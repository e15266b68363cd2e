"""``moecap serve --backend partition``, the static-partition baseline: a router in front of one server
process per child, over real HTTP on the tiny-moe children (test profile). Each child is its own process
with its thread share; a long request to one child does not hold up another (unlike ``--backend
separate``, one scheduler for all); greedy tokens are those of ``--backend separate``; the children die
with the front however it ends; a child that cannot start stops the front with its error."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import PYTHON, REPO, free_port, running_server
from test_engine_serve import _http as _serve_http

CHILDREN = ("tiny-moe-code", "tiny-moe-prose", "tiny-moe-c")
KEY = "sk-partition-test-0123456789"
LONG_TOKENS = 240  # the test model's context is 256 tokens


@pytest.fixture(scope="module", autouse=True)
def _clean_env():
    """No key from the developer's shell, and the thread share computed from the CPUs alone."""
    with pytest.MonkeyPatch.context() as mp:
        for var in ("MOECAP_API_KEY", "OMP_NUM_THREADS", "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"):
            mp.delenv(var, raising=False)
        yield


# -- helpers ---------------------------------------------------------------------------------------

def _auth(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def _http(url: str, body: dict | bytes | None = None, key: str | None = None, timeout: float = 60):
    """(status, parsed JSON or text), with the key; 4xx/5xx are answers, not exceptions."""
    return _serve_http(url, body, timeout=timeout, headers=_auth(key))


def _prompt(n: int, seed: int) -> list[int]:
    import random

    rng = random.Random(seed)
    return [rng.randrange(2, 1024) for _ in range(n)]


def _body(model: str, prompt, max_tokens: int, **kw) -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
            "return_token_ids": True, **kw}


async def _timed_stream(session, url: str, body: dict, first: asyncio.Event | None = None) -> dict:
    """Stream one request; its status, events (parsed; "[DONE]" as a string) and when it started, got its
    first token and finished (perf_counter)."""
    out: dict = {"sent": time.perf_counter(), "first": None, "events": []}
    async with session.post(url, json={**body, "stream": True}) as resp:
        out["status"] = resp.status
        if resp.status != 200:
            out["events"].append(await resp.json())
        else:
            data: list[str] = []
            async for raw in resp.content:
                line = raw.decode().rstrip("\r\n")
                if line.startswith("data:"):
                    data.append(line[5:].strip())
                elif line == "" and data:
                    payload = "\n".join(data)
                    data = []
                    out["events"].append(payload if payload == "[DONE]" else json.loads(payload))
                    if out["first"] is None and payload != "[DONE]":
                        out["first"] = time.perf_counter()
                        if first is not None:
                            first.set()
    out["done"] = time.perf_counter()
    return out


def _stream(url: str, body: dict, key: str | None = None) -> tuple[int, list]:
    import aiohttp

    async def go():
        async with aiohttp.ClientSession(headers=_auth(key)) as s:
            r = await _timed_stream(s, url, body)
            return r["status"], r["events"]

    return asyncio.run(go())


def _token_ids(events: list) -> list[int]:
    return [t for e in events if isinstance(e, dict) and e.get("choices")
            for t in e["choices"][0].get("token_ids") or []]


def _stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper is dead)."""
    st = _stat(pid)
    return st is not None and st[0] != "Z"


def _tagged(front_pid: int) -> list[int]:
    """Live processes started as a partition child of ``front_pid`` (their command line names it)."""
    needle = b"moecap.engine.partition\0"
    mark = f"--parent-pid\0{front_pid}\0".encode()
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes()
        except OSError:
            continue
        if needle in cmd and mark in cmd and _alive(int(d.name)):
            out.append(int(d.name))
    return out


def _wait_gone(pids, timeout_s: float = 15.0) -> list[int]:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end and any(_alive(p) for p in pids):
        time.sleep(0.05)
    return [p for p in pids if _alive(p)]


def _listen_addresses(port: int) -> set[str]:
    """The local addresses on which something listens on TCP ``port`` (from /proc/net/tcp{,6})."""
    out = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            addr, p = local.split(":")
            if int(p, 16) != port or state != "0A":  # 0A: LISTEN
                continue
            if len(addr) == 8:
                out.add(".".join(str(int(addr[i:i + 2], 16)) for i in (6, 4, 2, 0)))
            else:
                out.add("ipv6:" + addr)
    return out


def _checkpoint_bytes(model_dir: Path) -> tuple[int, int]:
    """(non-expert, expert) parameter bytes of a safetensors checkpoint, from its header alone."""
    sizes = {"F32": 4, "BF16": 2, "F16": 2}
    expert = other = 0
    for f in model_dir.glob("*.safetensors"):
        raw = f.read_bytes()
        header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
        for name, t in header.items():
            if name == "__metadata__":
                continue
            n = sizes[t["dtype"]]
            for d in t["shape"]:
                n *= d
            if ".experts." in name:
                expert += n
            else:
                other += n
    return other, expert


# -- fixtures --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sizes(tiny_moe_dir):
    """Each child's (non-expert, expert) bytes; all children have the same architecture."""
    return _checkpoint_bytes(tiny_moe_dir.parent / "c")


@pytest.fixture(scope="module")
def partition(tiny_moe_dir, sizes):
    """The partition front over the three children, with an API key; each child's share holds its
    non-expert layers and half of its experts (the rest offloaded to host memory)."""
    non_expert, expert = sizes
    budget_gb = 3 * (non_expert + expert / 2) / 1e9
    port = free_port()
    cmd = [PYTHON, "-m", "moecap", "serve", *CHILDREN, "--backend", "partition", "--fast-budget-gb", str(budget_gb),
           "--port", str(port), "--device", "cpu", "--api-key", KEY]
    with running_server(cmd, f"http://127.0.0.1:{port}/health", deadline_s=300) as proc:
        yield f"http://127.0.0.1:{port}", proc


@pytest.fixture(scope="module")
def separate(tiny_moe_dir):
    """The same children behind one scheduler (``--backend separate``): the reference."""
    port = free_port()
    cmd = [PYTHON, "-m", "moecap", "serve", *CHILDREN, "--port", str(port), "--device", "cpu"]
    with running_server(cmd, f"http://127.0.0.1:{port}/health", deadline_s=300) as proc:
        yield f"http://127.0.0.1:{port}", proc


def _front(children: tuple[str, ...], extra: tuple[str, ...] = ()):
    port = free_port()
    cmd = [PYTHON, "-m", "moecap", "serve", *children, "--backend", "partition", "--fast-budget-gb", "1",
           "--port", str(port), "--device", "cpu", *extra]
    return running_server(cmd, f"http://127.0.0.1:{port}/health", deadline_s=300), f"http://127.0.0.1:{port}"


# -- (1) a process per child, with its share ---------------------------------------------------------

def test_each_child_is_its_own_process_with_its_share(partition, sizes):
    url, front = partition
    status, health = _http(url + "/health")  # the probe needs no key
    assert status == 200 and health["status"] == "ok" and health["backend"] == "partition"
    assert health["models"] == list(CHILDREN) and health["process"]["pid"] == front.pid
    cpus = sorted(os.sched_getaffinity(0))
    threads = max(1, len(cpus) // len(CHILDREN))
    status, stats = _http(url + "/stats", key=KEY)
    assert status == 200 and stats["backend"] == "partition"
    pids, pinned = set(), []
    for name in CHILDREN:
        child = health["children"][name]
        pid = child["pid"]
        assert child["status"] == "ok" and child["process"]["pid"] == pid and child["process"]["name"] == name
        assert pid != front.pid and int(_stat(pid)[1]) == front.pid  # a process of its own, the front's child
        assert child["torch_threads"] == child["process"]["torch_threads"] == threads  # torch.get_num_threads()
        environ = dict(kv.split(b"=", 1) for kv in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in kv)
        for var in (b"OMP_NUM_THREADS", b"MKL_NUM_THREADS", b"OPENBLAS_NUM_THREADS"):
            assert environ[var] == str(threads).encode()
        # the clients' key stays with the front; the child's own key came in its environment, not in argv
        assert b"MOECAP_API_KEY" not in environ and KEY.encode() not in b"\0".join(environ.values())
        internal = environ[b"MOECAP_PARTITION_CHILD_KEY"]
        assert len(internal) >= 32 and internal not in Path(f"/proc/{pid}/cmdline").read_bytes()
        # the children's own CPUs when there are enough for one each, else shared
        affinity = sorted(os.sched_getaffinity(pid))
        if len(cpus) >= len(CHILDREN):
            assert affinity == child["cpus"] and len(affinity) == threads
            pinned += affinity
        else:
            assert child["cpus"] is None and affinity == cpus
        # loopback only, with a key that is neither none nor the clients'
        assert _listen_addresses(child["port"]) == {"127.0.0.1"}
        child_url = f"http://127.0.0.1:{child['port']}"
        assert _http(child_url + "/v1/models")[0] == 401 and _http(child_url + "/v1/models", key=KEY)[0] == 401
        per = stats["partition"]["children"][name]
        assert per["pid"] == pid and per["process"]["torch_threads"] == threads
        pids.add(pid)
    assert len(pids) == len(CHILDREN)
    assert len(pinned) == len(set(pinned))  # disjoint CPU sets
    assert stats["partition"]["threads_per_child"] == threads

    # the memory split: each child's share holds its non-expert layers and half its experts
    non_expert, expert = sizes
    mem = stats["memory"]
    share = stats["partition"]["per_child_fast_budget_bytes"]
    assert mem["per_child_fast_budget_bytes"] == int(share) and mem["fast_budget_bytes"] == pytest.approx(3 * share, abs=3)
    for name in CHILDREN:
        fast, host = mem[f"expert_bytes_fast:{name}"], mem[f"expert_bytes_host:{name}"]
        assert mem[f"non_expert_bytes:{name}"] == non_expert and fast + host == expert
        assert 0 < host and 0 < fast <= share - non_expert + 1  # + rounding of the GB figures
    assert mem["expert_bytes"] == 3 * expert and mem["expert_bytes_host"] > 0

    # the front wants the clients' key on everything but /health
    assert _http(url + "/v1/models")[0] == 401 and _http(url + "/stats")[0] == 401
    assert _http(url + "/v1/completions", _body("tiny-moe-c", [5, 6], 2))[0] == 401
    assert _http(url + "/v1/completions", _body("tiny-moe-c", [5, 6], 2), key="sk-wrong")[0] == 401
    status, models = _http(url + "/v1/models", key=KEY)
    assert status == 200 and [m["id"] for m in models["data"]] == list(CHILDREN)
    assert _http(url + "/v1/models/tiny-moe-prose", key=KEY)[1]["id"] == "tiny-moe-prose"


# -- (2) the children run concurrently ----------------------------------------------------------------

def _long_then_short(url: str, key: str | None) -> dict:
    """A long stream to tiny-moe-code; once its first token is out, a short request to tiny-moe-prose.
    Times (s) from the long request's start."""
    import aiohttp

    async def go():
        async with aiohttp.ClientSession(headers=_auth(key)) as s:
            for child in ("tiny-moe-code", "tiny-moe-prose"):  # warm both
                assert (await _timed_stream(s, url + "/v1/completions", _body(child, _prompt(4, 1), 2)))["status"] == 200
            first = asyncio.Event()
            long = asyncio.create_task(_timed_stream(s, url + "/v1/completions",
                                                     _body("tiny-moe-code", _prompt(8, 2), LONG_TOKENS), first))
            await asyncio.wait_for(first.wait(), 60)
            short = await _timed_stream(s, url + "/v1/completions", _body("tiny-moe-prose", _prompt(8, 3), 4))
            long = await long
        for r, n in ((long, LONG_TOKENS), (short, 4)):
            assert r["status"] == 200 and r["events"][-1] == "[DONE]" and len(_token_ids(r["events"])) == n
        t0 = long["sent"]
        return {"long_done_s": long["done"] - t0, "short_sent_s": short["sent"] - t0, "short_done_s": short["done"] - t0,
                "short_latency_s": short["done"] - short["sent"], "long_s": long["done"] - long["sent"]}

    return asyncio.run(go())


def test_children_run_concurrently_unlike_one_scheduler(partition, separate, artifacts_dir):
    """With one scheduler (separate) the short request waits for the long one's batch to end; in a
    partition it runs beside it and finishes first."""
    part = _long_then_short(partition[0], KEY)
    sep = _long_then_short(separate[0], None)
    figures = {"partition": part, "separate": sep}
    (artifacts_dir / "partition-concurrency.json").write_text(json.dumps(figures, indent=2))
    print("\n" + json.dumps(figures, indent=2))
    assert sep["short_done_s"] > sep["long_done_s"]  # waited for the whole long batch
    assert part["short_done_s"] < part["long_done_s"]  # did not
    assert part["short_latency_s"] < sep["short_latency_s"]


# -- (3) the same tokens as --backend separate ---------------------------------------------------------

def test_same_greedy_tokens_and_errors_as_separate(partition, separate):
    from moecap.metrics.serving import server_window as window_figures
    from moecap.runners.moecap_serve import server_window

    (purl, _), (surl, _) = partition, separate
    before = _http(purl + "/stats", key=KEY)[1]
    sent = {}
    for i, child in enumerate(CHILDREN):
        for r in range(2):
            ids = _prompt(5 + 3 * i + r, 10 * i + r)
            got = _stream(purl + "/v1/completions", _body(child, ids, 12), KEY)
            want = _stream(surl + "/v1/completions", _body(child, ids, 12))
            assert got[0] == want[0] == 200 and got[1][-1] == "[DONE]"
            assert _token_ids(got[1]) == _token_ids(want[1]) and len(_token_ids(want[1])) == 12, (child, r)
        # non-streamed chat, and prompt scoring (echo + logprobs, what the quality runners send)
        chat = {"model": child, "messages": [{"role": "user", "content": "int main(void) {"}], "max_tokens": 6,
                "temperature": 0, "return_token_ids": True}
        got, want = _http(purl + "/v1/chat/completions", chat, key=KEY), _http(surl + "/v1/chat/completions", chat)
        assert got[0] == want[0] == 200
        assert got[1]["choices"][0]["token_ids"] == want[1]["choices"][0]["token_ids"]
        assert got[1]["choices"][0]["message"] == want[1]["choices"][0]["message"]
        score = {"model": child, "prompt": "the quick brown fox", "max_tokens": 0, "echo": True, "logprobs": 1}
        got, want = _http(purl + "/v1/completions", score, key=KEY), _http(surl + "/v1/completions", score)
        assert got[0] == want[0] == 200
        lp_got, lp_want = (r[1]["choices"][0]["logprobs"]["token_logprobs"] for r in (got, want))
        assert lp_got[0] is None and lp_got[1:] == pytest.approx(lp_want[1:], abs=1e-5)
        sent[child] = 4
    after = _http(purl + "/stats", key=KEY)[1]

    # the runner's window over the merged /stats: every request of the window, per child, and no switch cost
    fig = window_figures(server_window(before, after))
    assert fig["backend"] == "partition" and {m: v["requests"] for m, v in fig["per_model"].items()} == sent
    assert fig["switch_s_total"] == 0 and fig["memory"]["expert_bytes"] > 0
    # each child has its own worker: batches of different children one after the other are no switch
    assert fig["switches"] == 0 and all(v["switches_to"] == 0 for v in fig["per_model"].values())
    indices = [b["index"] for b in after["batches"]]
    assert indices == sorted(set(indices))

    # errors: what moecap serve itself answers
    for body in ({"model": "tiny-moe-nope", "prompt": "x"}, {"prompt": "x"}, {"model": 3, "prompt": "x"},
                 {"model": "tiny-moe-c", "prompt": "x", "max_tokens": 10_000},
                 {"model": "tiny-moe-c", "prompt": "x", "temperature": -1}):
        got, want = _http(purl + "/v1/completions", body, key=KEY), _http(surl + "/v1/completions", body)
        assert got == want and got[0] in (400, 404), (body, got)
    for raw in (b"{not json", b"\xff\xfe", b"[1, 2]"):
        got, want = _http(purl + "/v1/completions", raw, key=KEY), _http(surl + "/v1/completions", raw)
        assert got == want and got[0] == 400, (raw, got)
    big = json.dumps({"model": "tiny-moe-c", "prompt": "x" * (4 * 2**20)}).encode()  # beyond the 4 MiB default
    got, want = _http(purl + "/v1/completions", big, key=KEY), _http(surl + "/v1/completions", big)
    assert got == want and got[0] == 413
    got, want = _http(purl + "/v1/models/tiny-moe-nope", key=KEY), _http(surl + "/v1/models/tiny-moe-nope")
    assert got == want and got[0] == 404
    assert _stream(purl + "/v1/chat/completions", {"model": "tiny-moe-nope", "messages": []}, KEY)[0] == 404


# -- (4) teardown ---------------------------------------------------------------------------------------

def test_dead_child_gets_503_and_sigterm_stops_every_child(tiny_moe_dir):
    """A child killed mid-stream: its stream ends with an error naming it, later requests get 503 naming
    it, /health says so, the other child serves on. SIGTERM to the front: exit 0, no child left."""
    import aiohttp

    ctx, url = _front(("tiny-moe-code", "tiny-moe-prose"))
    with ctx as front:
        health = _http(url + "/health")[1]
        pids = {n: c["pid"] for n, c in health["children"].items()}
        assert sorted(_tagged(front.pid)) == sorted(pids.values())

        async def kill_mid_stream():
            async with aiohttp.ClientSession() as s:
                first = asyncio.Event()
                task = asyncio.create_task(_timed_stream(s, url + "/v1/completions",
                                                         _body("tiny-moe-prose", _prompt(6, 1), LONG_TOKENS), first))
                await asyncio.wait_for(first.wait(), 60)
                os.kill(pids["tiny-moe-prose"], signal.SIGKILL)
                return await asyncio.wait_for(task, 60)

        r = asyncio.run(kill_mid_stream())
        assert r["status"] == 200 and r["events"][-1] == "[DONE]" and len(_token_ids(r["events"])) < LONG_TOKENS
        err = r["events"][-2]["error"]
        assert "tiny-moe-prose" in err["message"] and err["code"] == "partition_child_unavailable"
        assert not _wait_gone([pids["tiny-moe-prose"]], 10)

        for status, body in (_http(url + "/v1/completions", _body("tiny-moe-prose", [5, 6], 2)),
                             _stream(url + "/v1/completions", _body("tiny-moe-prose", [5, 6], 2))):
            body = body if isinstance(body, dict) else body[0]
            assert status == 503 and "'tiny-moe-prose'" in body["error"]["message"]
            assert "killed by signal 9" in body["error"]["message"]
        status, health = _http(url + "/health")
        assert status == 503 and "tiny-moe-prose" in health["error"]["message"]
        assert health["children"]["tiny-moe-code"]["status"] == "ok"
        status, body = _http(url + "/v1/completions", _body("tiny-moe-code", [5, 6], 3))
        assert status == 200 and len(body["choices"][0]["token_ids"]) == 3
        status, stats = _http(url + "/stats")
        assert status == 200 and "error" in stats["partition"]["children"]["tiny-moe-prose"]
        assert stats["totals"]["requests_finished"] >= 1

        front.send_signal(signal.SIGTERM)
        assert front.wait(30) == 0
        assert not _wait_gone(list(pids.values()), 10) and not _tagged(front.pid)
        out = front.stdout.read().decode(errors="replace")
        assert "moecap serve: stopped" in out and "Traceback" not in out


def test_children_die_when_the_front_is_killed(tiny_moe_dir):
    """SIGKILL leaves the front no chance to stop its children: they go by themselves (parent-death
    signal, parent watch)."""
    ctx, url = _front(("tiny-moe-code", "tiny-moe-prose"))
    with ctx as front:
        pids = [c["pid"] for c in _http(url + "/health")[1]["children"].values()]
        assert len(pids) == 2 and all(_alive(p) for p in pids)
        front.kill()
        front.wait(10)
        assert not _wait_gone(pids, 10), "children outlived a SIGKILLed front"
        assert not _tagged(front.pid)


def test_interrupt_while_the_children_load(tiny_moe_dir):
    """SIGINT (Ctrl-C) before the children are ready: the front stops them and exits 130."""
    # as a foreground command gets Ctrl-C: SIGINT at its default, whatever this process inherited (a shell
    # starts a background job, pytest included, with SIGINT ignored, and exec keeps an ignored signal ignored)
    args = ["-m", "moecap", "serve", "tiny-moe-code", "tiny-moe-prose", "--backend", "partition", "--fast-budget-gb",
            "1", "--port", str(free_port()), "--device", "cpu"]
    foreground = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                  f"os.execv(sys.executable, [sys.executable, *{args!r}])")
    proc = subprocess.Popen([PYTHON, "-c", foreground], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    try:
        end = time.monotonic() + 60
        while len(_tagged(proc.pid)) < 2 and time.monotonic() < end:
            time.sleep(0.02)
        children = _tagged(proc.pid)
        assert len(children) == 2
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err.decode(errors="replace")[-2000:]
    assert b"interrupted while starting" in err
    assert not _wait_gone(children, 10) and not _tagged(proc.pid)


# -- (5) a child that cannot start ------------------------------------------------------------------------

def test_a_child_that_cannot_start_stops_the_front(tiny_moe_dir, tmp_path):
    port = free_port()
    proc = subprocess.Popen([PYTHON, "-m", "moecap", "serve", "tiny-moe-code", f"broken={tmp_path / 'no-model'}",
                             "--backend", "partition", "--fast-budget-gb", "1", "--port", str(port), "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    err = err.decode(errors="replace")
    assert proc.returncode == 2, err[-3000:]
    line = next(ln for ln in err.splitlines() if ln.startswith("moecap serve: partition child"))
    assert "'broken'" in line and "before it was ready" in line
    tail = err[err.index(line):]
    assert "could not load model 'broken'" in tail  # the child's own error, quoted
    assert not _tagged(proc.pid)  # the healthy child was stopped too

    # options of other backends, a missing budget: refused before any child starts
    for args, msg in ((["--threshold", "0.1", "--fast-budget-gb", "1"], "does not take option(s) threshold"),
                      ([], "needs --fast-budget-gb")):
        out = subprocess.run([PYTHON, "-m", "moecap", "serve", "tiny-moe-code", "tiny-moe-prose", "--backend",
                              "partition", "--port", str(free_port()), *args], capture_output=True, text=True,
                             cwd=REPO, timeout=60)
        assert out.returncode == 2 and msg in out.stderr, out.stderr[-2000:]
        assert "starting" not in out.stdout
