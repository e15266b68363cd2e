"""Write the leaderboard as a ready-to-push Hugging Face Space (``moecap leaderboard RESULTS --write-space OUT``).

The Space holds:

- ``app.py``: the entry point, copied from ``leaderboard/space/app.py`` (the one template), with the
  default of ``MOECAP_RESULTS`` filled in with RESULTS;
- ``moecap/`` and ``moecap-<version>.dist-info/``: a wheel of moecap built from this source tree,
  unpacked. The Spaces builder runs ``pip install -r requirements.txt`` with only that file mounted,
  before the repository's files are copied in, so a requirement on a file of the Space (a wheel by
  relative path) cannot install there; ``app.py`` imports the unpacked copy from its own folder;
- ``requirements.txt``: the third-party packages the board needs (moecap's core dependencies and its
  ``leaderboard`` extra, read from the wheel's metadata): nothing that pulls torch or transformers;
- ``README.md``: the Space's configuration (YAML front matter) and what it shows.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from email.parser import Parser
from pathlib import Path

TEMPLATE = Path(__file__).resolve().parent / "space" / "app.py"
DEFAULT_LINE = "DEFAULT_RESULTS = None"  # the template's line that RESULTS replaces
# what the board must never pull in (the point of a torch-free Space)
FORBIDDEN = ("torch", "transformers")


class SpaceError(RuntimeError):
    """The Space could not be written (message for the user)."""


def source_root() -> Path:
    """The moecap source tree this moecap runs from (a checkout: pyproject.toml next to the packages)."""
    import moecap

    root = Path(moecap.__file__).resolve().parent.parent
    pyproject = root / "pyproject.toml"
    if not pyproject.is_file() or not re.search(r'(?m)^name\s*=\s*"moecap"', pyproject.read_text(encoding="utf-8")):
        raise SpaceError(f"moecap runs from {root}, not from a source checkout (no moecap pyproject.toml there): "
                         "run moecap leaderboard --write-space from a clone of the repository (pip install -e)")
    if not TEMPLATE.is_file():
        raise SpaceError(f"the Space template {TEMPLATE} is missing")
    return root


def _package_dirs(root: Path) -> list[str]:
    """The top-level folders of the source tree that hold moecap's packages (pyproject's package-dir)."""
    names = set()
    for pkg in ("moecap", "moecap.runners", "moecap.metrics", "moecap.leaderboard"):
        spec = importlib.util.find_spec(pkg)
        for loc in (spec.submodule_search_locations or []) if spec else []:
            rel = Path(loc).resolve().relative_to(root)
            names.add(rel.parts[0])
    text = (root / "pyproject.toml").read_text(encoding="utf-8")
    # any other package-dir root the toml names ("moecap.x" = "x")
    names.update(re.findall(r'"moecap(?:\.\w+)*"\s*=\s*"([\w-]+)', text))
    return sorted(names)


def build_wheel(root: Path, dest: Path) -> Path:
    """A wheel of moecap built from a copy of the source tree (the checkout is left untouched: no
    build/ or egg-info written into it). Without build isolation when this environment has setuptools
    (offline); else pip fetches the build backend from the index."""
    with tempfile.TemporaryDirectory(prefix="moecap-space-src-") as tmp:
        src = Path(tmp) / "moecap"
        src.mkdir()
        for name in ("pyproject.toml", "README.md"):
            shutil.copy2(root / name, src / name)
        for name in _package_dirs(root):
            shutil.copytree(root / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        offline = ["--no-build-isolation"] if _has_setuptools() else []
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", *offline, "--wheel-dir", str(dest), str(src)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SpaceError(f"building the moecap wheel failed ({' '.join(cmd)}):\n{(proc.stdout + proc.stderr)[-3000:]}")
    wheels = sorted(dest.glob("moecap-*.whl"))
    if len(wheels) != 1:
        raise SpaceError(f"expected one moecap wheel in {dest}, found {[w.name for w in wheels]}")
    return wheels[0]


def _has_setuptools() -> bool:
    try:
        from importlib.metadata import version

        return int(version("setuptools").split(".")[0]) >= 69
    except Exception:
        return False


def board_requirements(wheel: Path, extra: str = "leaderboard") -> list[str]:
    """The requirements of moecap[extra] as the wheel's metadata declares them: the core dependencies
    (no marker) and those of ``extra``, markers stripped."""
    with zipfile.ZipFile(wheel) as zf:
        meta_name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        meta = Parser().parsestr(zf.read(meta_name).decode("utf-8"))
    out = []
    for req in meta.get_all("Requires-Dist") or []:
        spec, _, marker = req.partition(";")
        spec, marker = spec.strip(), marker.strip()
        if marker:
            m = re.fullmatch(r"""extra\s*==\s*["']([\w.-]+)["']""", marker)
            if m is None:
                raise SpaceError(f"{wheel.name}: a requirement with a marker this writer does not read: {req!r}")
            if m.group(1) != extra:
                continue
        if re.match(r"moecap\b", spec):
            raise SpaceError(f"{wheel.name}: moecap[{extra}] names another extra ({spec}); list its packages instead")
        out.append(spec)
    bad = [r for r in out if re.match(rf"({'|'.join(FORBIDDEN)})\b", r)]
    if bad:
        raise SpaceError(f"moecap[{extra}] would pull {', '.join(bad)}: the Space must stay torch-free")
    return out


def _gradio_version() -> str:
    try:
        from importlib.metadata import version

        return version("gradio")
    except Exception as err:
        raise SpaceError("gradio is not installed: the Space's sdk_version is the gradio this board was tested "
                         "with; pip install 'moecap[leaderboard]'") from err


def render_app(results: str | None) -> str:
    text = TEMPLATE.read_text(encoding="utf-8")
    if text.count(DEFAULT_LINE) != 1:
        raise SpaceError(f"{TEMPLATE}: expected one line {DEFAULT_LINE!r} to fill in")
    if results:
        text = text.replace(DEFAULT_LINE, f"DEFAULT_RESULTS = {results!r}  # written by moecap leaderboard --write-space")
    return text


def render_readme(title: str, results: str | None, gradio_version: str, python_version: str, version: str) -> str:
    default = (f"This Space shows `{results}` unless the variable names other records."
               if results else "Set it in the Space's settings (Variables).")
    return f"""---
title: {json.dumps(title)}
sdk: gradio
sdk_version: {gradio_version}
app_file: app.py
python_version: "{python_version}"
pinned: false
---

# {title}

The moecap leaderboard: Cost / Accuracy / Performance of Mixture-of-Experts LLM
serving, one row per benchmark cell (model x runner x workload x load): throughput, TTFT, TPOT, S-MBU,
S-MFU, memory, energy, cost and accuracy, with filters, search, CSV export and plots.

The Space variable `MOECAP_RESULTS` names the records it shows: `hf://datasets/<org>/<name>` (the
results repo that `moecap publish --to` pushes to) or a folder in the Space. {default}

Generated by `moecap leaderboard --write-space` (moecap {version}): `moecap/` is moecap unpacked from a wheel
of the source tree, `requirements.txt` the board's packages (no torch, no transformers). Regenerate it
rather than editing it.
"""


def write_space(out_dir: str | Path, results: str | None = None, title: str = "moecap leaderboard") -> dict:
    """Write the Space into ``out_dir`` (created; moecap's own files in it are replaced, anything else,
    such as the Space repo's .git, is kept). Returns what was written."""
    from moecap import __version__

    root = source_root()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise SpaceError(f"{out} is a file, not a folder")
    gradio_version = _gradio_version()
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="moecap-space-wheel-") as tmp:
        wheel = build_wheel(root, Path(tmp))
        requirements = board_requirements(wheel)
        for old in [out / "moecap", *out.glob("moecap-*.dist-info")]:
            if old.is_dir():
                shutil.rmtree(old)
        with zipfile.ZipFile(wheel) as zf:
            members = [n for n in zf.namelist() if n.startswith("moecap/") or re.match(r"moecap-[^/]+\.dist-info/", n)]
            zf.extractall(out, members)
        wheel_name = wheel.name
    (out / "app.py").write_text(render_app(results), encoding="utf-8")
    python_version = f"{sys.version_info.major}.{sys.version_info.minor}"
    (out / "README.md").write_text(render_readme(title, results, gradio_version, python_version, __version__),
                                   encoding="utf-8")
    (out / "requirements.txt").write_text(
        f"# the moecap leaderboard's packages (moecap {__version__}: core + leaderboard extra), written by\n"
        "# moecap leaderboard --write-space; moecap itself is the unpacked moecap/ folder next to app.py\n"
        + "".join(f"{r}\n" for r in requirements), encoding="utf-8")
    return {"dir": str(out), "wheel": wheel_name, "requirements": requirements, "gradio": gradio_version,
            "python": python_version, "results": results}
