"""llama.cpp's own tools for moecap: finding (or building) its C++ ``llama-server`` and its source tree.

moecap serves GGUF models through llama.cpp's ``llama-server`` (continuous batching over parallel
slots, native ``--n-cpu-moe`` and ``--override-tensor``). A user who already has llama.cpp (a release
binary, a distribution package, their own build) points moecap at it; otherwise
``moecap llamacpp build`` compiles it from source: the llama.cpp tree that the pinned llama-cpp-python
source distribution vendors (one tree, one version, for both the Python bindings and the server), built
with CMake, CPU only unless ``--cuda`` is given.

Where things are looked up, first hit wins:

- the server: an explicit path (the runner's ``args.server_binary``), ``$MOECAP_LLAMA_SERVER``,
  moecap's own build under ``<cache>/llama.cpp/<version>/build/bin/llama-server``, then ``llama-server``
  on ``PATH``;
- the source tree (llama.cpp's ``convert_hf_to_gguf.py`` and ``gguf-py``): ``$MOECAP_LLAMA_CPP_DIR``,
  then ``<cache>/llama.cpp/<version>/src``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from moecap.paths import cache_dir

# the llama-cpp-python release whose vendored llama.cpp moecap builds (the [llamacpp] extra pins the same)
LLAMA_CPP_PYTHON_VERSION = "0.3.36"


class LlamaCppNotFound(FileNotFoundError):
    pass


def build_root(version: str = LLAMA_CPP_PYTHON_VERSION) -> Path:
    return cache_dir() / "llama.cpp" / version


def find_llama_server(explicit: str | os.PathLike | None = None) -> Path | None:
    """The ``llama-server`` to launch, or None when there is none (see the module's lookup order)."""
    if explicit:
        p = Path(explicit).expanduser()
        if p.is_file() and os.access(p, os.X_OK):
            return p
        found = shutil.which(str(explicit))
        if found:
            return Path(found)
        raise LlamaCppNotFound(f"llama-server {str(explicit)!r} is not an executable file")
    env = os.environ.get("MOECAP_LLAMA_SERVER")
    if env:
        p = Path(env).expanduser()
        if not (p.is_file() and os.access(p, os.X_OK)):
            raise LlamaCppNotFound(f"$MOECAP_LLAMA_SERVER={env!r} is not an executable file")
        return p
    built = build_root() / "build" / "bin" / "llama-server"
    if built.is_file() and os.access(built, os.X_OK):
        return built
    found = shutil.which("llama-server")
    return Path(found) if found else None


def find_source_tree() -> Path | None:
    """llama.cpp's source tree (with ``convert_hf_to_gguf.py``), or None."""
    env = os.environ.get("MOECAP_LLAMA_CPP_DIR")
    candidates = [Path(env).expanduser()] if env else []
    candidates.append(build_root() / "src")
    for c in candidates:
        if (c / "convert_hf_to_gguf.py").is_file() and (c / "gguf-py").is_dir():
            return c
    return None


def server_version(binary: str | os.PathLike) -> str:
    """``llama-server --version``'s first line (e.g. ``version: 1 (abc123)``), or ``unknown``."""
    try:
        out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    for line in (out.stdout + "\n" + out.stderr).splitlines():
        if line.startswith("version"):
            return line.strip()
    return "unknown"


def _log(msg: str) -> None:
    print(f"moecap llamacpp: {msg}", file=sys.stderr, flush=True)


def fetch_source(dest: Path, version: str = LLAMA_CPP_PYTHON_VERSION) -> Path:
    """Download llama-cpp-python's source distribution with pip and unpack its ``vendor/llama.cpp`` into
    ``dest`` (atomically: a half-unpacked tree is never left at ``dest``)."""
    if (dest / "CMakeLists.txt").is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        _log(f"downloading the llama-cpp-python {version} source distribution (it vendors llama.cpp)")
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
               "--dest", tmp, f"llama-cpp-python=={version}"]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode:
            raise RuntimeError(f"pip download llama-cpp-python=={version} failed:\n{res.stderr.strip()[-2000:]}")
        sdists = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if not sdists:
            raise RuntimeError(f"pip download left no llama_cpp_python-*.tar.gz in {tmp}")
        prefix = f"{sdists[0].name[:-len('.tar.gz')]}/vendor/llama.cpp/"
        unpacked = Path(tmp) / "llama.cpp"
        with tarfile.open(sdists[0]) as tar:
            members = []
            for m in tar.getmembers():
                if not m.name.startswith(prefix) or m.name == prefix.rstrip("/"):
                    continue
                m.name = m.name[len(prefix):]
                members.append(m)
            tar.extractall(unpacked, members=members, filter="data")
        if not (unpacked / "CMakeLists.txt").is_file():
            raise RuntimeError(f"{sdists[0].name} has no vendor/llama.cpp/CMakeLists.txt")
        if dest.exists():
            shutil.rmtree(dest)
        unpacked.rename(dest)
    return dest


def build_llama_server(version: str = LLAMA_CPP_PYTHON_VERSION, jobs: int | None = None, cuda: bool = False,
                       dest: Path | None = None) -> Path:
    """Build ``llama-server`` from the vendored llama.cpp tree (cached: a second call returns at once)."""
    root = Path(dest) if dest else build_root(version)
    binary = root / "build" / "bin" / "llama-server"
    if binary.is_file():
        _log(f"already built: {binary}")
        return binary
    cmake = shutil.which("cmake")
    if not cmake:
        raise RuntimeError("cmake is not on PATH (pip install cmake, or your system's package)")
    src = fetch_source(root / "src", version)
    jobs = jobs or os.cpu_count() or 2
    flags = ["-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
             "-DLLAMA_BUILD_EXAMPLES=OFF", "-DCMAKE_BUILD_TYPE=Release", f"-DGGML_CUDA={'ON' if cuda else 'OFF'}"]
    build = root / "build"  # built in place: the binary's RUNPATH names this folder; it appears last
    t0 = time.monotonic()
    _log(f"configuring llama.cpp in {build} ({'CUDA' if cuda else 'CPU'})")
    log_path = root / "build.log"
    with open(log_path, "w") as log:
        for cmd in ([cmake, "-S", str(src), "-B", str(build), *flags],
                    [cmake, "--build", str(build), "--target", "llama-server", "-j", str(jobs)]):
            if "--build" in cmd:
                _log(f"compiling llama-server with {jobs} job(s): a few minutes on 2 cores (log: {log_path})")
            log.write(f"$ {' '.join(cmd)}\n")
            log.flush()
            res = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
            if res.returncode:
                tail = log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{' '.join(cmd[:3])} ... failed (exit {res.returncode}); log {log_path}:\n{tail}")
    if not binary.is_file():
        raise RuntimeError(f"the build finished but {binary} does not exist; log {log_path}")
    _log(f"built {binary} in {time.monotonic() - t0:.0f} s ({server_version(binary)})")
    return binary
