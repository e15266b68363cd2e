"""How often does ``moecap compare`` cry wolf, and how often does it catch a real slowdown, on this machine?

Runs the quickstart's performance cells (tiny-moe through transformers, batch 1 and 4; the quality
cell is left out: it is deterministic and not what the gate's noise is about) K times, one ``moecap
run`` after another, each with ``--repeat N``. Then, at the gate's default settings:

* false alarms: ``moecap compare run_k run_k+1`` for the K-1 consecutive pairs of identical runs;
  any exit status but 0 is a false alarm;
* detection: the same pairs with the current side slowed down by 5, 10 and 20 % (every timestamp of
  its traces stretched, ``moecap.retime``, as the gate's tests do); exit status 1 is a catch;
* both again with ``--history``: the up to H runs before the baseline as earlier runs of the cell.

    python benchmarks/gate_calibration.py --runs 21 --repeat 5 --out /tmp/gate-cal
    python benchmarks/gate_calibration.py --out /tmp/gate-cal --evaluate-only   # re-judge kept runs

Prints a table and writes ``calibration.json`` into ``--out``; with ``--runs`` the runs are kept in
``--out/runs/kNN`` (an existing run is reused, so an interrupted calibration goes on).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SLOWDOWNS = (0.05, 0.10, 0.20)


def perf_suite(path: Path) -> Path:
    """The built-in quickstart without its quality workload (same name, same cells otherwise)."""
    import yaml

    from moecap import safe_yaml
    from moecap.suite import resolve_suite_path

    data = safe_yaml.load(resolve_suite_path("quickstart").read_text(encoding="utf-8"))
    data["workloads"] = [w for w in data["workloads"] if "perplexity" not in w and "lm_eval" not in w]
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def run_once(suite: Path, out: Path, repeat: int, extra: list[str]) -> float:
    t0 = time.perf_counter()
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    proc = subprocess.run([sys.executable, "-m", "moecap", "run", str(suite), "-o", str(tmp), "--repeat",
                           str(repeat), *extra], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"moecap run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    tmp.rename(out)
    return time.perf_counter() - t0


def judge(base: Path, cur: Path, history: list[Path]) -> tuple[int, list[str]]:
    """(exit status, the gated findings) of ``moecap compare`` at its defaults."""
    from moecap.compare import REGRESSION, compare_paths

    cmp = compare_paths(base, cur, history=history)
    found = [f"{c.description}: {m.name} {m.change * 100:+.1f}%" for c in cmp.cells for m in c.metrics
             if m.verdict == REGRESSION]
    return cmp.exit_status, found


def evaluate(runs: list[Path], scratch: Path, history_len: int) -> dict:
    from moecap.retime import retime_results, slower

    out: dict = {}
    for mode in ("no history", f"history (up to {history_len} earlier runs)"):
        use_history = mode != "no history"
        pairs = [(k, k + 1) for k in range(len(runs) - 1) if not use_history or k >= 2]
        res = {"pairs": len(pairs), "identical_passed": 0, "false_alarms": [], "caught": {}}
        for b, c in pairs:
            hist = runs[max(0, b - history_len):b] if use_history else []
            rc, found = judge(runs[b], runs[c], hist)
            if rc == 0:
                res["identical_passed"] += 1
            else:
                res["false_alarms"].append({"pair": [runs[b].name, runs[c].name], "exit": rc, "findings": found})
            for s in SLOWDOWNS:
                slow = scratch / f"{runs[c].name}-slow{int(s * 100)}"
                if not slow.exists():
                    retime_results(runs[c], slow, slower(1 + s))
                rc, _ = judge(runs[b], slow, hist)
                res["caught"].setdefault(f"{s:.0%}", 0)
                res["caught"][f"{s:.0%}"] += rc == 1
        out[mode] = res
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for the runs and calibration.json")
    ap.add_argument("--runs", type=int, default=0, help="quickstart runs to make (K; existing ones are kept)")
    ap.add_argument("--repeat", type=int, default=5, help="moecap run --repeat N for each run (default 5)")
    ap.add_argument("--history", type=int, default=5, help="earlier runs given as --history (default 5)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="passed to moecap run")
    ap.add_argument("--evaluate-only", action="store_true", help="judge the runs already in --out")
    args = ap.parse_args()
    runs_dir = args.out / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MOECAP_CACHE_DIR", str(Path.home() / ".cache" / "moecap"))
    seconds = []
    if not args.evaluate_only:
        suite = perf_suite(args.out / "quickstart-perf.yaml")
        extra = [a for kv in args.set for a in ("--set", kv)]
        for k in range(1, args.runs + 1):
            dst = runs_dir / f"k{k:02d}"
            if dst.exists():
                continue
            seconds.append(run_once(suite, dst, args.repeat, extra))
            print(f"run {k}/{args.runs}: {seconds[-1]:.1f} s", file=sys.stderr, flush=True)
    runs = sorted(p for p in runs_dir.iterdir() if p.is_dir() and not p.name.endswith(".partial"))
    if len(runs) < 2:
        raise SystemExit(f"{runs_dir}: {len(runs)} runs; at least 2 are needed (--runs K)")
    with tempfile.TemporaryDirectory(prefix="gate-cal-") as scratch:
        result = evaluate(runs, Path(scratch), args.history)
    reps = {json.loads(p.read_text()).get("report", {}).get("repetitions", {}).get("n", 1)
            for r in runs for p in (r / "quickstart").glob("*.json")}
    summary = {"runs": len(runs), "repeat": sorted(reps), "run_seconds": seconds, "results": result}
    (args.out / "calibration.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    print(f"{len(runs)} quickstart runs (performance cells), repeat {sorted(reps)}")
    print(f"{'mode':<38} {'identical pairs passed':>24} " + " ".join(f"{'caught ' + k:>12}" for k in
                                                                      next(iter(result.values()))["caught"]))
    for mode, r in result.items():
        n = r["pairs"]
        print(f"{mode:<38} {r['identical_passed']:>12}/{n:<11} "
              + " ".join(f"{v:>8}/{n:<3}" for v in r["caught"].values()))
        for fa in r["false_alarms"][:6]:
            print(f"    false alarm {fa['pair']}: exit {fa['exit']}: {'; '.join(fa['findings'][:3])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
