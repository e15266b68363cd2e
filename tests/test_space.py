"""``moecap leaderboard RESULTS --write-space OUT``: the generated Hugging Face Space installs without torch or transformers
and serves real records.

The Space is generated over real quickstart records, its requirements.txt is installed exactly as
written into a fresh virtual environment (no system site-packages) the way the Spaces builder does it
(only that file, from a folder without the Space's other files; CI's .ci/constraints.txt pins the
versions), and ``python app.py`` is started from the generated folder and queried with gradio_client.
Skips when no virtual environment can be made or pip cannot reach a package index.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, free_port, running_server

pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")

pytestmark = pytest.mark.slow

SMALL = [
    "--set", "workloads.0.num_prompts=2",
    "--set", "workloads.0.output_tokens=4",
    "--set", "loads=[{batch_size: 1}]",
    "--set", "workloads.1.perplexity.max_windows=2",
    "--set", "workloads.1.lm_eval.limit=4",
]
CONSTRAINTS = REPO / ".ci" / "constraints.txt"
NETWORK_ERRORS = ("NewConnectionError", "Network is unreachable", "Temporary failure in name resolution",
                  "Name or service not known", "ConnectionError", "ProxyError", "Max retries exceeded",
                  "No matching distribution found", "Could not find a version that satisfies")


@pytest.fixture(scope="module")
def records(tmp_path_factory, tiny_moe_dir):
    """Real records: the quickstart suite at batch 1 plus its quality cell, on this CPU."""
    out = tmp_path_factory.mktemp("space-results")
    env = dict(os.environ, MOECAP_TINY_MOE_PROFILE="test")  # MOECAP_CACHE_DIR (a tmp dir) from conftest
    proc = subprocess.run([sys.executable, "-m", "moecap", "run", "quickstart", "-o", str(out), *SMALL],
                          env=env, capture_output=True, text=True, timeout=600, cwd=str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    cells = sorted(p.stem for p in (out / "quickstart").glob("*.json"))
    assert len(cells) == 2, cells
    return out, cells


def _venv(path: Path) -> Path:
    try:
        subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, capture_output=True, timeout=300)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as err:
        pytest.skip(f"cannot create a virtual environment here: {err}")
    python = path / "bin" / "python"
    if not python.exists():
        python = path / "Scripts" / "python.exe"
    return python


def _pip_install(python: Path, requirements: Path) -> float:
    """pip install -r requirements.txt, exactly as written, from a folder holding only that file (the
    Spaces builder mounts it alone before it copies the Space in). Returns the seconds it took."""
    builder = requirements.parent.parent / "builder"
    builder.mkdir()
    shutil.copy2(requirements, builder / "requirements.txt")
    cmd = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-r", "requirements.txt"]
    if CONSTRAINTS.is_file():
        cmd += ["-c", str(CONSTRAINTS)]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=builder, capture_output=True, text=True, timeout=900)
    took = time.monotonic() - t0
    if proc.returncode != 0:
        out = proc.stdout[-3000:] + proc.stderr[-3000:]
        if any(e in out for e in NETWORK_ERRORS):
            pytest.skip(f"pip cannot install the Space's requirements from an index here:\n{out[-1500:]}")
        raise AssertionError(f"pip install -r requirements.txt failed:\n{out}")
    return took


def test_generated_space_installs_without_torch_and_serves_records(tmp_path, records):
    results, cells = records
    space = tmp_path / "space"
    gen = subprocess.run([sys.executable, "-m", "moecap", "leaderboard", str(results), "--write-space", str(space)],
                         capture_output=True, text=True, timeout=300)
    assert gen.returncode == 0, gen.stdout + gen.stderr

    # what a Space needs, and what the generator promised
    readme = (space / "README.md").read_text(encoding="utf-8")
    front = readme.split("---")[1]
    import gradio

    for line in ("sdk: gradio", f"sdk_version: {gradio.__version__}", "app_file: app.py", "pinned: false"):
        assert line in front.splitlines(), front
    assert "title:" in front and "python_version:" in front and "MOECAP_RESULTS" in readme
    app = (space / "app.py").read_text(encoding="utf-8")
    assert f"DEFAULT_RESULTS = {str(results)!r}" in app
    assert (space / "moecap" / "leaderboard" / "app.py").is_file()
    assert (space / "moecap" / "__init__.py").read_bytes() == (REPO / "moecap" / "__init__.py").read_bytes()
    requirements = (space / "requirements.txt").read_text(encoding="utf-8")
    names = [line.split(";")[0].strip() for line in requirements.splitlines() if line.strip() and not line.startswith("#")]
    assert names and not [n for n in names if n.lower().startswith(("torch", "transformers", "moecap"))], names

    python = _venv(tmp_path / "venv")
    took = _pip_install(python, space / "requirements.txt")
    print(f"\npip install -r requirements.txt (the Space's packages, into a fresh venv): {took:.1f} s")
    probe = subprocess.run([str(python), "-c", "import importlib.util as u; "
                            "print(','.join(m for m in ('torch', 'transformers') if u.find_spec(m)))"],
                           capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == "", f"the Space's environment has {probe.stdout.strip()}"

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHON"))}
    env.update(GRADIO_SERVER_NAME="127.0.0.1", GRADIO_SERVER_PORT=str(port), MOECAP_RESULTS=str(results),
               GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1")
    url = f"http://127.0.0.1:{port}/"
    # the script's folder leads sys.path: app.py imports the moecap unpacked next to it
    with running_server([str(python), str(space / "app.py")], url, env=env):
        client = gradio_client.Client(url, verbose=False)
        table = client.predict(api_name="/filter_table")
        rows = [dict(zip(table["headers"], row)) for row in table["data"]]
        assert len(cells) == 2 and len(rows) == 1, rows  # bs=1, with the quality cell's figures on it
        assert {r["Model"] for r in rows} == {"tiny-moe"}
        assert [r["Load"] for r in rows] == ["bs=1"]
        assert all(r["Perplexity"] and r["Perplexity"] > 1 for r in rows)  # quality merged onto the rows
        # the app imported moecap from the unpacked copy in the Space, not from anywhere else
        where = subprocess.run([str(python), "-c", "import moecap, sys; print(moecap.__file__); "
                                "print('torch' in sys.modules)"], cwd=space, capture_output=True, text=True,
                               timeout=60)
        assert where.stdout.splitlines()[0].startswith(str(space)), where.stdout + where.stderr
