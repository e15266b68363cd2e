import contextlib
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _pin_llama_cpp() -> None:
    """llama.cpp's ``llama-server`` and source tree as found in the user's own cache (``moecap llamacpp
    build``) or on PATH, named by environment variables before the session swaps the cache for a fresh
    one: the tests that need them run, and those that find none skip."""
    from moecap.llamacpp_build import LlamaCppNotFound, find_llama_server, find_source_tree

    try:
        server = find_llama_server()
    except LlamaCppNotFound:
        server = None
    if server and not os.environ.get("MOECAP_LLAMA_SERVER"):
        os.environ["MOECAP_LLAMA_SERVER"] = str(server)
    tree = find_source_tree()
    if tree and not os.environ.get("MOECAP_LLAMA_CPP_DIR"):
        os.environ["MOECAP_LLAMA_CPP_DIR"] = str(tree)


_pin_llama_cpp()


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Every test session builds its own zoo models and calibrations: nothing from ~/.cache leaks in."""
    if "MOECAP_TEST_CACHE_DIR" in os.environ:  # reuse between local runs when asked to
        path = Path(os.environ["MOECAP_TEST_CACHE_DIR"])
    else:
        path = tmp_path_factory.mktemp("moecap-cache")
    # the test profile of the tiny-moe builder: the same code, a smaller and faster model
    saved = {k: os.environ.get(k) for k in ("MOECAP_CACHE_DIR", "MOECAP_TINY_MOE_PROFILE")}
    os.environ["MOECAP_CACHE_DIR"] = str(path)
    os.environ["MOECAP_TINY_MOE_PROFILE"] = "test"
    yield path
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def tiny_moe_dir(_isolated_cache):
    """The trained tiny-moe base (test profile) with its three domain children, built once per session."""
    from moecap.zoo.tiny_moe import build, zoo_root

    if not (zoo_root() / "c" / "moecap.json").is_file():
        build(log=lambda s: None)
    return zoo_root() / "base"


@pytest.fixture
def artifacts_dir():
    """Where tests leave files worth looking at after a CI run."""
    d = REPO / "test-artifacts"
    d.mkdir(exist_ok=True)
    return d


def has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    if has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


PYTHON = sys.executable


from moecap.runners.server import free_port  # noqa: E402,F401  (re-exported for the tests)


@contextlib.contextmanager
def running_server(cmd: list[str], ready_url: str, deadline_s: float = 120, env: dict | None = None,
                   separate_stderr: bool = False):
    """Start a server subprocess, wait until ``ready_url`` answers 200, yield it; always stop it.
    ``separate_stderr``: stderr on its own pipe (``proc.stderr``), not merged into stdout."""
    import subprocess
    import time
    import urllib.request

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE if separate_stderr else subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + deadline_s
        while True:
            if proc.poll() is not None:
                out = (proc.stderr if separate_stderr else proc.stdout).read().decode(errors="replace")[-2000:]
                raise RuntimeError(f"server exited with {proc.returncode} before it was ready:\n{out}")
            try:
                with urllib.request.urlopen(ready_url, timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{ready_url} did not answer within {deadline_s} s")
            time.sleep(0.2)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
