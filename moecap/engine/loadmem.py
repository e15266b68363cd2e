"""Peak memory while a model loads: the engine's streamed load against transformers' own.

:class:`PeakMemory` samples this process's resident memory every 2 ms on a thread: ``RssAnon`` (what
the process itself holds) and ``VmRSS`` (which also counts memory-mapped file pages while they are
mapped: page cache, reclaimable), and reports the peak growth of each over its start. Linux only
(``/proc/self/status``); elsewhere the figures are absent.

``python -m moecap.engine.loadmem CHECKPOINT engine|transformers [PRECISION]`` loads a checkpoint in a
fresh process (so nothing loaded before counts) and prints one JSON line: peak growths, the loaded
weights' footprint, seconds; :func:`measure_load` runs it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from typing import Any


def _status() -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(("RssAnon:", "VmRSS:")):
                    out[line.split(":")[0]] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


class PeakMemory:
    """``with PeakMemory() as pm: ...`` then ``pm.result()``: peak growth of anonymous and total resident
    memory over the block (bytes), sampled every ``interval_s``."""

    def __init__(self, interval_s: float = 0.002):
        self.interval_s = interval_s
        self.base = self.peak = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        st = _status()
        for k, v in st.items():
            self.peak[k] = max(self.peak.get(k, 0), v)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> "PeakMemory":
        self.base = _status()
        self.peak = dict(self.base)
        self._thread = threading.Thread(target=self._run, name="moecap-peak-memory", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()

    def result(self) -> dict[str, int]:
        if "RssAnon" not in self.base:
            return {}
        return {"peak_anon_growth_bytes": self.peak["RssAnon"] - self.base["RssAnon"],
                "peak_rss_growth_bytes": self.peak.get("VmRSS", 0) - self.base.get("VmRSS", 0)}


def _load(path: str, mode: str, precision: str) -> dict[str, Any]:
    if mode not in ("engine", "transformers"):
        raise SystemExit(f"mode {mode!r}: allowed engine, transformers")
    # every import before the measurement starts: their code and data are not the load's
    import safetensors.torch  # noqa: F401
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from moecap.engine.model import load_engine_model
    from moecap.engine.store import ExpertPlan

    AutoConfig.from_pretrained(path)  # and the model class's module
    t0 = time.perf_counter()
    with PeakMemory() as pm:
        if mode == "engine":
            m = load_engine_model(path, lambda a: ExpertPlan.uniform(a.experts_per_layer(), "fast", precision),
                                  "cpu", torch.float32)
            footprint = m.non_expert_bytes() + sum(sum(s.tier_nbytes().values()) for s in m.stores)
        else:
            m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
            footprint = sum(p.numel() * p.element_size() for p in m.parameters())
    return {**pm.result(), "footprint_bytes": footprint, "seconds": time.perf_counter() - t0, "mode": mode}


def measure_load(path: str, mode: str, precision: str = "int4") -> dict[str, Any]:
    """Load ``path`` in a fresh process (``engine``: every expert at ``precision``, resident; or
    ``transformers``, float32) and return its peak memory growth, footprint and seconds."""
    out = subprocess.run([sys.executable, "-m", "moecap.engine.loadmem", str(path), mode, precision],
                         capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"loading {path} ({mode}) failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) not in (2, 3):
        raise SystemExit("usage: python -m moecap.engine.loadmem CHECKPOINT engine|transformers [PRECISION]")
    print(json.dumps(_load(args[0], args[1], args[2] if len(args) == 3 else "int4")))


if __name__ == "__main__":
    main()
