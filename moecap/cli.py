"""The ``moecap`` command line."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence


def _cmd_run(args: argparse.Namespace) -> int:
    from moecap.suite import SuiteError, expand, load_suite

    overrides = list(args.set or [])
    if args.output:
        overrides.append(f"output.dir={args.output}")
    if args.repeat is not None:
        overrides.append(f"repeat={args.repeat}")
    try:
        suite = load_suite(args.suite, overrides)
    except SuiteError as err:
        print(f"moecap: invalid suite\n{err}", file=sys.stderr)
        return 2
    # executor flags: each says where it applies
    given = {flag: value for flag, value in (
        ("--isolate", args.isolate), ("--cell-timeout-s", args.cell_timeout_s), ("--max-retries", args.max_retries),
        ("--address", args.address), ("--gpu-type", args.gpu_type), ("--cpus-per-cell", args.cpus_per_cell),
        ("--memory-gb", args.memory_gb)) if value is not None}
    ray_only = [f for f in ("--address", "--gpu-type", "--cpus-per-cell", "--memory-gb") if f in given]
    problems = []
    if args.force and args.resume:
        problems.append("--force and --resume exclude each other: --force re-runs every cell, --resume only the "
                        "cells an interrupted run did not finish")
    if ray_only and args.executor != "ray":
        problems.append(f"{', '.join(ray_only)} apply to --executor ray only (this run: --executor {args.executor})")
    if args.executor == "inline" and set(given) & {"--isolate", "--cell-timeout-s", "--max-retries"}:
        bad = ", ".join(f for f in ("--isolate", "--cell-timeout-s", "--max-retries") if f in given)
        problems.append(f"{bad} need worker processes: use --executor local or ray (--executor inline runs every "
                        "cell in this process)")
    for flag, value, ok, allowed in (
        ("--cell-timeout-s", args.cell_timeout_s, lambda v: v > 0, "a number of seconds > 0"),
        ("--max-retries", args.max_retries, lambda v: v >= 0, "an integer >= 0"),
        ("--cpus-per-cell", args.cpus_per_cell, lambda v: v >= 0, "a number >= 0"),
        ("--memory-gb", args.memory_gb, lambda v: v > 0, "a number of GB > 0"),
    ):
        if value is not None and not ok(value):
            problems.append(f"{flag} {value:g}: allowed {allowed}")
    if args.executor == "ray" and not args.dry_run:
        import importlib.util

        if importlib.util.find_spec("ray") is None:
            problems.append("--executor ray needs Ray, which is not installed: pip install 'moecap[ray]'")
    if not args.dry_run:
        why = _unwritable(Path(suite.output.dir) / suite.name)
        if why:
            problems.append(f"cannot write the results folder {Path(suite.output.dir) / suite.name}: {why}; "
                            "choose another with -o DIR")
    if problems:
        print("moecap run: " + "\nmoecap run: ".join(problems), file=sys.stderr)
        return 2
    cells = expand(suite)
    if args.dry_run:
        print(f"suite {suite.name} ({suite.source}): {len(cells)} cells -> {suite.output.dir}/{suite.name}/")
        for i, cell in enumerate(cells):
            print(f"  {i + 1:3d}. {cell.describe():60s} {cell.cell_id}")
        return 0

    from moecap.run import ExecutorOptions, ResumeError, run_suite
    from moecap.report import format_rows, record_row

    options = ExecutorOptions(
        isolate=args.isolate or "cell", cell_timeout_s=args.cell_timeout_s,
        max_retries=1 if args.max_retries is None else args.max_retries, address=args.address,
        gpu_type=args.gpu_type, cpus_per_cell=1.0 if args.cpus_per_cell is None else args.cpus_per_cell,
        memory_gb=args.memory_gb, verbose=args.verbose,
    )
    try:
        outcome = run_suite(suite, force=args.force, executor=args.executor, options=options, resume=args.resume)
    except ResumeError as err:
        print(f"moecap: {err}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, SystemExit) as err:
        code = 130 if isinstance(err, KeyboardInterrupt) else (err.code if isinstance(err.code, int) else 1)
        print(f"\nmoecap: interrupted; finished cells are recorded in {suite.output.dir}/{suite.name}/. Continue "
              f"the run with: moecap run {args.suite} --resume (and the same --set / -o options)", file=sys.stderr)
        return code
    rows = []
    for o in outcome.outcomes:
        if o.record is not None:
            rows.append(record_row(o.record))
        elif o.status == "skipped":
            from moecap.records import ResultStore

            rec = ResultStore(suite.output.dir, suite.name).load(o.cell.cell_id)
            if rec is not None:
                row = record_row(rec)
                row["status"] = "done before"
                rows.append(row)
    print(format_rows(rows))
    n_failed = len(outcome.failed)
    n_busy = sum(o.status == "busy" for o in outcome.outcomes)
    n_rescored = sum(o.status == "rescored" for o in outcome.outcomes)
    print(
        f"\nrun {outcome.run_id}{' (resumed)' if outcome.resumed else ''}: "
        f"{sum(o.status == 'ok' for o in outcome.outcomes)} ok, {n_failed} failed, "
        f"{sum(o.status == 'skipped' for o in outcome.outcomes)} done before"
        f"{f', {n_rescored} re-scored for changed SLOs' if n_rescored else ''}"
        f"{f', {n_busy} being run by another moecap process' if n_busy else ''}; records in "
        f"{suite.output.dir}/{suite.name}/"
    )
    return 1 if n_failed else 0


# Commands that need packages of an extra (import name -> the extra that installs it): checked in main()
# before the command starts, so that a board-only install (pip install 'moecap[leaderboard]') answers in
# one line instead of a traceback. Found with find_spec: nothing heavy is imported here.
_EXTRA_OF = {"torch": "run", "transformers": "run", "safetensors": "run", "aiohttp": "run", "matplotlib": "run",
             "gguf": "llamacpp"}
_MODELS = ("torch", "transformers")


def _missing_extra(args: argparse.Namespace) -> str | None:
    """Why ``args``' command cannot run here (a missing extra, as one line), or None."""
    import importlib.util

    needs = tuple(getattr(args, "needs", ()) or ())
    if getattr(args, "calibrate", False):  # moecap hardware --calibrate measures with torch
        needs += ("torch",)
    if getattr(args, "dry_run", False):  # moecap run --dry-run only expands the suite
        needs = ()
    missing = [m for m in dict.fromkeys(needs) if importlib.util.find_spec(m) is None]
    if not missing:
        return None
    extras = sorted({_EXTRA_OF.get(m, "run") for m in missing})
    if "llamacpp" in extras:  # the llamacpp extra includes run
        extras = ["llamacpp"]
    command = " ".join(w for w in (args.command, getattr(args, "zoo_command", None),
                                   getattr(args, "engine_command", None)) if w)
    return (f"moecap {command}: needs {', '.join(missing)}, not installed here (this install has no "
            f"moecap[{','.join(extras)}]): pip install 'moecap[{','.join(extras)}]'")


def _cmd_report(args: argparse.Namespace) -> int:
    from moecap.report import report

    print(report(args.paths or ["results"], args.format))
    return 0


def _cmd_cost(args: argparse.Namespace) -> int:
    import yaml

    from moecap import figures
    from moecap.catalog import OVERRIDE_KEYS
    from moecap.run import price_run
    from moecap.records import load_records
    from moecap.report import record_row, render_table

    if args.list_settings:
        for key, text in OVERRIDE_KEYS.items():
            print(f"  {key:24s} {text}")
        return 0
    overrides = {}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            print(f"moecap cost: --set {item!r}: expected key=value", file=sys.stderr)
            return 2
        overrides[key] = yaml.safe_load(value)
    if args.hardware:
        overrides["gpu_key"] = args.hardware
    unknown = sorted(set(overrides) - set(OVERRIDE_KEYS))
    if unknown:
        print(f"moecap cost: unknown cost setting(s) {unknown}; allowed: {', '.join(sorted(OVERRIDE_KEYS))}", file=sys.stderr)
        return 2
    new_device = any(k in overrides for k in ("gpu_key", "gpus", "gpu_count")) and "avg_power_w" not in overrides
    rows = []
    for path in args.paths or ["results"]:
        for _, rec in load_records(path):
            if rec.status != "ok" or figures.value(rec.report, "output_tokens_per_s") is None:
                continue
            report = dict(rec.report)
            if new_device:  # the measured power belongs to the device that ran: price the new one at TDP
                report["energy"] = {}
            settings = {**rec.config.get("cost_settings", {}), **overrides}
            new = price_run(report, (rec.config.get("hardware") or {}).get("detected"), settings)
            base = record_row(rec)
            rows.append(
                {
                    "cell_id": rec.cell_id,
                    "model": base["model"],
                    "load": base["load"],
                    "out tok/s": base["output_tokens_per_s"],
                    "$/1M out (record)": figures.value(rec.report, "usd_per_1m_output_tokens"),
                    "$/1M out (what-if)": figures.value({"cost": new}, "usd_per_1m_output_tokens"),
                    "$/request (what-if)": figures.value({"cost": new}, "usd_per_request"),
                    "capital $/h": (new.get("usd_per_hour") or {}).get("capital"),
                    "energy $/h": (new.get("usd_per_hour") or {}).get("energy"),
                    "power": new.get("power_source") or new.get("reason"),
                    "cloud $/1M out": new.get("cloud_usd_per_1m_output_tokens"),
                }
            )
    if not rows:
        print("no ok performance records found under " + ", ".join(args.paths or ["results"]))
        return 1
    if args.format == "json":
        import json

        print(json.dumps(rows, indent=2))
        return 0
    headers = [k for k in rows[0] if k != "cell_id"]
    cells = [["-" if r[h] is None else (f"{r[h]:.4g}" if isinstance(r[h], float) else str(r[h])) for h in headers] for r in rows]
    print(render_table(headers, cells))
    print("\nthroughput and tokens are the measured ones; only prices, power and amortization change")
    return 0


def _unwritable(folder: Path) -> str | None:
    """Why ``folder`` could not take records, or None; nothing is created (a refused run leaves no trace):
    the nearest part of the path that exists must be a folder this user may write into."""
    probe = folder.expanduser().absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is a file, not a folder"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"no permission to write into {probe}"
    return None


def _cmd_leaderboard(args: argparse.Namespace) -> int:
    import os

    if args.write_space:
        return _cmd_leaderboard_space(args)
    args.results = args.results or "results"
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    if args.port:
        from moecap.runners.server import port_in_use

        if port_in_use(args.host, args.port):
            print(f"moecap leaderboard: port {args.port} on {args.host} is already in use; choose another with "
                  "--port N (or leave it out for a free one)", file=sys.stderr)
            return 2
    from moecap.leaderboard.app import launch

    launch(args.results, host=args.host, port=args.port, share=args.share)
    return 0


def _cmd_leaderboard_space(args: argparse.Namespace) -> int:
    from moecap.leaderboard.deploy import SpaceError, write_space

    try:
        info = write_space(args.write_space, results=args.results, title=args.title)
    except SpaceError as err:
        print(f"moecap leaderboard --write-space: {err}", file=sys.stderr)
        return 1
    print(f"wrote the Space into {info['dir']}: app.py, README.md (gradio {info['gradio']}, python "
          f"{info['python']}), requirements.txt ({', '.join(info['requirements'])}), moecap/ (from "
          f"{info['wheel']})")
    print(f"MOECAP_RESULTS default: {info['results']}" if info["results"] else
          "set the Space variable MOECAP_RESULTS (hf://datasets/<org>/<name>), or regenerate naming RESULTS")
    print(f"push it: huggingface-cli upload <org>/<space> {info['dir']} . --repo-type space")
    return 0


def _cmd_publish(args: argparse.Namespace) -> int:
    from moecap.leaderboard.publish import PublishError, publish

    try:
        written = publish(args.paths, args.to, message=args.message)
    except ValueError as err:
        print(f"moecap publish: nothing published\n{err}", file=sys.stderr)
        return 2
    except PublishError as err:
        print(f"moecap publish: nothing published: {err}", file=sys.stderr)
        return 1
    print(f"published {len(written)} record(s) to {args.to}")
    return 0


def _cmd_hardware(args: argparse.Namespace) -> int:
    from moecap.hardware import UnknownDeviceError, calibrate, detect_hardware, format_hardware, resolve_peaks, save_calibration

    hw = detect_hardware(args.device)
    dtype = args.dtype or ("bfloat16" if hw.accelerator != "cpu" else "float32")
    peaks = None
    if args.calibrate:
        dev = "cpu" if hw.accelerator == "cpu" else f"cuda:{hw.device_index}"
        print(f"calibrating {hw.device_name} ({dtype}) ...", file=sys.stderr)
        peaks = calibrate(dev, dtype)
        save_calibration(peaks)
    else:
        try:
            peaks = resolve_peaks(hw, dtype, calibrate_if_missing=False)
        except UnknownDeviceError as err:
            print(f"note: {err}", file=sys.stderr)
    print(format_hardware(hw, peaks))
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from moecap.metrics.accounting import builtin_config_names
    from moecap.registry import EMBEDDED_MODELS

    print("embedded models (built locally on first use):")
    for e in EMBEDDED_MODELS.values():
        print(f"  {e.name:24s} {e.description}")
    print("\nrandom-weight architectures (model id 'random:<name>'):")
    for name in builtin_config_names():
        print(f"  random:{name}")
    print("\nany Hugging Face id (org/name) or local model directory loads with from_pretrained.")
    return 0


def _cmd_runners(args: argparse.Namespace) -> int:
    from moecap.registry import RUNNERS

    for e in RUNNERS.values():
        print(f"  {e.name:12s} loads: {','.join(e.loads):20s} {e.description}")
    return 0


def _cmd_zoo_build(args: argparse.Namespace) -> int:
    import os
    import shutil

    if args.profile:
        os.environ["MOECAP_TINY_MOE_PROFILE"] = args.profile
    from moecap.zoo.tiny_moe import VARIANTS, build, format_summary, zoo_root

    if args.name != "tiny-moe":
        print(f"moecap: unknown zoo model {args.name!r}; the zoo builds: tiny-moe", file=sys.stderr)
        return 2
    root = zoo_root()
    if args.force:
        shutil.rmtree(root, ignore_errors=True)
    variants = tuple(v for v in (args.variants.split(",") if args.variants else VARIANTS) if v and v != "none")
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        print(f"moecap: unknown variant(s) {bad}; allowed: {', '.join(VARIANTS)} or none", file=sys.stderr)
        return 2
    summary = build(root=root, variants=variants)
    print(format_summary(summary))
    print(f"\nmodels in {root} (figures in {root / 'build.json'})")
    return 0


def _local_model_dir(name: str) -> Any:
    """An embedded model name or a local directory as a Path; None (with the reason on stderr) if neither."""
    from pathlib import Path

    from moecap.models import local_path_for

    try:
        path = Path(local_path_for(name))
    except Exception as err:
        print(f"moecap: {name}: {err}", file=sys.stderr)
        return None
    if not path.is_dir():
        print(f"moecap: {name!r} is not a local model directory (nor an embedded model)", file=sys.stderr)
        return None
    return path


def _cmd_export_gguf(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from moecap.gguf_export import GGUFExportError, export_gguf

    src = _local_model_dir(args.model)
    if src is None:
        return 2
    out = Path(args.output or f"{src.name}-{args.weight_type}.gguf")
    try:
        info = export_gguf(src, out, args.weight_type, progress=True)
    except GGUFExportError as err:
        print(f"moecap: {err}", file=sys.stderr)
        return 2
    print(json.dumps(info, indent=2))
    return 0


def _cmd_llamacpp_build(args: argparse.Namespace) -> int:
    from moecap.llamacpp_build import build_llama_server

    if args.jobs is not None and args.jobs < 1:
        print("moecap llamacpp build: --jobs must be >= 1", file=sys.stderr)
        return 2
    try:
        binary = build_llama_server(jobs=args.jobs, cuda=args.cuda)
    except (RuntimeError, OSError) as err:
        print(f"moecap llamacpp build: {err}", file=sys.stderr)
        return 1
    print(binary)
    return 0


def _cmd_llamacpp_where(args: argparse.Namespace) -> int:
    from moecap.llamacpp_build import LlamaCppNotFound, find_llama_server, find_source_tree, server_version

    try:
        binary = find_llama_server()
    except LlamaCppNotFound as err:
        print(f"moecap llamacpp: {err}", file=sys.stderr)
        return 2
    tree = find_source_tree()
    print(f"llama-server: {binary or 'not found (moecap llamacpp build)'}"
          + (f" ({server_version(binary)})" if binary else ""))
    print(f"source tree:  {tree or 'not found'}")
    return 0 if binary else 1


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _cmd_engine_pareto(args: argparse.Namespace) -> int:
    from pathlib import Path

    from moecap.studies.pareto import format_points, grid, pareto_suite, points_from_outcome, select, write_frontier
    from moecap.run import run_suite
    from moecap.suite import SuiteError, parse_suite

    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    bad = [p for p in precisions if p not in ("int8", "int4", "int3", "int2")]
    if bad:
        print(f"moecap: --precisions {bad}: allowed int8, int4, int3, int2", file=sys.stderr)
        return 2
    configs = grid(precisions, args.quantize, args.offload, args.mixed)
    raw = pareto_suite(args.model, configs, dataset=args.dataset, windows=args.windows,
                       input_tokens=args.input_tokens, output_tokens=args.output_tokens,
                       num_prompts=args.num_prompts, batch_size=args.batch_size, device=args.device,
                       dtype=args.dtype, output_dir=args.output, fast_budget_gb=args.fast_budget_gb,
                       group_size=args.group_size, profile_windows=args.profile_windows,
                       calibration=args.calibration)
    try:
        suite = parse_suite(raw, "moecap engine pareto")
    except SuiteError as err:
        print(f"moecap: {err}", file=sys.stderr)
        return 2
    print(f"moecap engine pareto: {len(configs)} configurations of {args.model} -> {args.output}/{suite.name}/",
          file=sys.stderr)
    outcome = run_suite(suite, force=args.force)
    points = points_from_outcome(outcome, args.dataset)
    out_dir = Path(args.output) / suite.name
    meta = {"model": args.model, "dataset": args.dataset, "device": args.device, "dtype": args.dtype,
            "batch_size": args.batch_size, "fast_budget_gb": args.fast_budget_gb, "run_id": outcome.run_id}
    files = write_frontier(points, out_dir, meta)
    print(format_points(points))
    print(f"\nfrontier: {files['json']}  plot: {files['png']}  {files['html']}")
    if args.max_perplexity is not None or args.min_tokens_per_s is not None:
        best = select(points, args.max_perplexity, args.min_tokens_per_s)
        if best is None:
            print("no configuration meets the constraint", file=sys.stderr)
            return 1
        print(f"selected: {best.name} ({best.tokens_per_s:.1f} tok/s, perplexity {best.perplexity:.3f})")
    return 1 if any(p.status == "failed" for p in points) else 0


def _cmd_engine_rates(args: argparse.Namespace) -> int:
    import torch

    from moecap.engine.rates import measured_cost_model, rates_path

    dev = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("moecap: --device cuda asked for, but torch sees no CUDA GPU", file=sys.stderr)
        return 2
    print(f"measuring (once; cached in {rates_path()}) ...", file=sys.stderr)
    cm = measured_cost_model(dev, getattr(torch, args.dtype), refresh=args.refresh)
    print(f"host expert kernels ({torch.get_num_threads()} threads, full precision in {args.dtype}):")
    for prec, r in cm.details["host"].items():
        print(f"  {prec:5s} {r['kernel']:14s} {r['act_dtype']:9s} one token {r['Bps'] / 1e9:7.1f} GB/s   "
              f"64 tokens {r['flops'] / 1e9:8.1f} GFLOP/s")
    link = cm.details["link"]
    print(f"link: {link['Bps'] / 1e9:.1f} GB/s pinned host-to-device ({link['device']})" if link
          else "link: none (no GPU: host experts are computed where they lie)")
    print(f"source: {cm.source}")
    return 0


def _children_arg(items: list[str]) -> dict[str, str]:
    """CHILD arguments: NAME=PATH, or an embedded name / directory (named after itself)."""
    from pathlib import Path

    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            path, name = item, Path(item.rstrip("/")).name
        out[name] = path
    return out


def _data_arg(items: list[str] | None, children: dict[str, str], flag: str = "--data") -> dict[str, str] | None:
    """--data NAME=DATA items (the data child NAME was tuned on); None: an error was printed."""
    out: dict[str, str] = {}
    for item in items or []:
        name, sep, spec = item.partition("=")
        if not sep or not spec:
            print(f"moecap: {flag} {item!r}: want NAME=DATA (a .txt or .jsonl[#FIELD] file, "
                  "hf:DATASET[/CONFIG]@SPLIT[#FIELD], or tiny-code / tiny-prose / tiny-c)", file=sys.stderr)
            return None
        if name not in children:
            print(f"moecap: {flag} {item!r}: {name!r} is not one of the children ({', '.join(children)})",
                  file=sys.stderr)
            return None
        out[name] = spec
    return out


def _cmd_engine_consolidate(args: argparse.Namespace) -> int:
    from pathlib import Path

    models = list(args.models)
    if args.pairwise:
        base, children = None, _children_arg(models)
    else:
        base, children = models[0], _children_arg(models[1:])
    if len(children) < 2:
        print("moecap: consolidation needs at least two children" + ("" if args.pairwise else
              " after the base (or --pairwise: two or more fine-tunes, no base)"), file=sys.stderr)
        return 2
    data = _data_arg(args.data, children)
    if data is None:
        return 2
    if args.curve is not None:
        if base is None:
            print("moecap: --curve compares against the base: not with --pairwise", file=sys.stderr)
            return 2
        from moecap.studies.consolidation import run_curve

        run_curve(base, children, args.curve, args.output, windows=args.windows, shared=args.shared,
                  merge_methods=() if args.no_merge else ("average", "task_arithmetic", "ties", "dare"),
                  log=lambda s: print(s, file=sys.stderr))
        print(f"records and curve.json / curve.png in {Path(args.output) / 'consolidation'}")
        return 0
    from moecap.engine.consolidate import ConsolidationError, format_plan, make_plan, measure_children

    if args.threshold is None and args.budget_mb is None:
        print("moecap: give --threshold, --budget-mb or --curve", file=sys.stderr)
        return 2
    try:
        sim, sizes = measure_children(base, children, data=data, calibration_windows_n=args.calibration_windows,
                                      log=lambda s: print(s, file=sys.stderr))
    except ConsolidationError as err:
        print(f"moecap engine consolidate: {err}", file=sys.stderr)
        return 2
    plan = make_plan(sim, sizes, args.threshold, args.budget_mb * 2**20 if args.budget_mb else None)
    print(format_plan(plan))
    out = Path(args.plan_out)
    plan.save(out)
    print(f"plan: {out}")
    return 0


def _cmd_engine_tenants(args: argparse.Namespace) -> int:
    from pathlib import Path

    from moecap.studies.tenants import collect, format_table, plot

    if not Path(args.results).exists():
        print(f"moecap engine tenants: {args.results}: no such file or folder", file=sys.stderr)
        return 2
    rows, quality = collect(args.results)
    if not rows:
        print(f"moecap engine tenants: {args.results}: no ok moecap-serve records with per-model figures "
              "(a multi-model workload: runner args models: {name: share})", file=sys.stderr)
        return 2
    print(format_table(rows, quality))
    out = Path(args.out) if args.out else Path(args.results) / "tenants.png"
    print(f"plot: {plot(rows, quality, out)}")
    return 0


def _cmd_engine_merge(args: argparse.Namespace) -> int:
    import json

    from moecap.engine.merge import merge_models

    names = [c.strip() for c in args.children.split(",") if c.strip()]
    if not names:
        print("moecap: --children: at least one model directory (or embedded name) is needed", file=sys.stderr)
        return 2
    dirs = []
    for name in [args.base, *names]:
        path = _local_model_dir(name)
        if path is None:
            return 2
        dirs.append(path)
    options = {k: getattr(args, k) for k in ("density", "drop", "scale", "seed", "combine")
               if getattr(args, k) is not None}
    try:
        summary = merge_models(dirs[0], dirs[1:], args.method, args.output, **options)
    except ValueError as err:
        print(f"moecap: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from moecap.engine.server import API_KEY_ENV, DEFAULT_MAX_REQUEST_BYTES, check_api_key, parse_model_specs, serve

    try:
        models = parse_model_specs(args.models)
    except ValueError as err:
        print(f"moecap serve: {err}", file=sys.stderr)
        return 2
    for flag, value, low in (("--max-batch-size", args.max_batch_size, 1), ("--port", args.port, 0),
                             ("--max-consecutive-batches", args.max_consecutive_batches, 1)):
        if value < low:
            print(f"moecap serve: {flag} must be >= {low}", file=sys.stderr)
            return 2
    if args.max_wait_s < 0:
        print("moecap serve: --max-wait-s must be >= 0", file=sys.stderr)
        return 2
    for flag, value in (("--fast-budget-gb", args.fast_budget_gb), ("--max-model-len", args.max_model_len)):
        if value is not None and value <= 0:
            print(f"moecap serve: {flag} must be > 0", file=sys.stderr)
            return 2
    if args.threshold is not None and args.threshold < 0:
        print("moecap serve: --threshold must be >= 0", file=sys.stderr)
        return 2
    if args.consolidation_plan and not os.path.isfile(args.consolidation_plan):
        print(f"moecap serve: --consolidation-plan {args.consolidation_plan}: no such file", file=sys.stderr)
        return 2
    max_request_bytes = DEFAULT_MAX_REQUEST_BYTES if args.max_request_bytes is None else args.max_request_bytes
    if max_request_bytes < 1:
        print("moecap serve: --max-request-bytes must be >= 1", file=sys.stderr)
        return 2
    # the flag, else the environment (vLLM's --api-key / VLLM_API_KEY); an empty variable is no key, an
    # empty flag a mistake (--api-key "$UNSET") that must not start an open server
    api_key = args.api_key if args.api_key is not None else (os.environ.get(API_KEY_ENV) or None)
    if api_key is not None:
        try:
            check_api_key(api_key)
        except ValueError as err:  # never quotes the key
            source = "--api-key" if args.api_key is not None else API_KEY_ENV
            print(f"moecap serve: {source}: {err}", file=sys.stderr)
            return 2
    # every backend option; make_backend drops the unset ones and names any the backend does not take
    backend_kw = {"base": args.base, "threshold": args.threshold, "plan": args.consolidation_plan,
                  "shared": args.shared, "fast_budget_gb": args.fast_budget_gb, "max_model_len": args.max_model_len,
                  "pairwise": args.pairwise or None}
    if args.data:
        data = _data_arg(args.data, {name: "" for name in models})
        if data is None:
            return 2
        backend_kw["data"] = data
    if args.backend == "partition":  # a router in front of one server process per child, not one scheduler
        from moecap.engine.partition import serve_partition

        return serve_partition(models, host=args.host, port=args.port, max_batch_size=args.max_batch_size,
                               max_wait_s=args.max_wait_s, max_consecutive_batches=args.max_consecutive_batches,
                               device=args.device, dtype=args.dtype, api_key=api_key,
                               max_request_bytes=max_request_bytes, **backend_kw)
    return serve(models, host=args.host, port=args.port, backend=args.backend, max_batch_size=args.max_batch_size,
                 max_wait_s=args.max_wait_s, max_consecutive_batches=args.max_consecutive_batches,
                 device=args.device, dtype=args.dtype, api_key=api_key, max_request_bytes=max_request_bytes,
                 **backend_kw)


def build_parser() -> argparse.ArgumentParser:
    from moecap import __version__

    p = argparse.ArgumentParser(prog="moecap", description="Cost / Accuracy / Performance benchmarks for MoE serving")
    p.add_argument("--version", action="version", version=f"moecap {__version__}")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="more logging; moecap run: the cells' own output (libraries' progress bars and warnings) "
                   "on the console too, not only in each cell's cell.log")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser(
        "run", help="run a suite (a YAML file or a built-in suite name)",
        description="Run a suite's cells and write one record per cell into <output>/<suite>/ as each finishes. "
        "Which cells run: those without an ok record (failed ones are retried); --force: all; --resume: those "
        "the last interrupted run did not finish. Several moecap run processes may share one results folder: "
        "each cell is claimed (a lock) by the process running it, so no cell runs twice and no record is left "
        "half-written. A failed cell is recorded with its error and the suite goes on; the exit status is 1 "
        "if any cell failed, 130 after Ctrl-C.")
    r.add_argument("suite", help="path to a suite YAML, or a built-in suite (e.g. quickstart)")
    r.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a suite field, e.g. loads=[{batch_size: 2}]")
    r.add_argument("--dry-run", action="store_true", help="list the cells and exit")
    r.add_argument("--force", action="store_true", help="re-run cells that already have an ok record")
    r.add_argument("--repeat", type=int, metavar="N", default=None,
                   help="run each performance cell's measured window N times: the record keeps every "
                   "repetition and each figure's median, interval and spread; moecap compare judges them. With "
                   "--executor inline or --isolate group the repetitions of a group's cells interleave (round i "
                   "runs repetition i of every cell), so a drift of the machine hits all alike (default: the "
                   "suite's repeat, 1)")
    r.add_argument("--resume", action="store_true",
                   help="continue the most recent interrupted run of this suite in this results folder (Ctrl-C, "
                   "SIGTERM, a killed process or a lost machine): its run id is kept, and only its unfinished cells "
                   "run: those with no record yet, or whose worker or node was lost. Every finished record is "
                   "kept, failed ones included (a plain re-run retries those). The suite and --set options must "
                   "give the same cells. If the last run finished, this is a plain run")
    r.add_argument("-o", "--output", help="results folder (default: the suite's output.dir)")
    ex = r.add_argument_group("where cells run")
    ex.add_argument("--executor", choices=["inline", "local", "ray"], default="local",
                    help="local (default): worker subprocesses on this machine, one at a time; ray: tasks on a Ray "
                    "cluster (pip install 'moecap[ray]'); inline: in this process (debugging; no timeout, a crash "
                    "ends the run)")
    ex.add_argument("--isolate", choices=["cell", "group"], default=None,
                    help="local, ray: a fresh worker per cell (default; the model loads for every cell), or one "
                    "worker per model x runner group that loads the model once for its cells")
    ex.add_argument("--cell-timeout-s", type=float, metavar="S", default=None,
                    help="local, ray: loading the model and each cell may take this long, then the worker (its "
                    "whole process group) is killed and the cell recorded failed (timeout); default: no limit")
    ex.add_argument("--max-retries", type=int, metavar="N", default=None,
                    help="local, ray: run a cell again in a new worker when its worker died (crash, OOM kill, lost "
                    "node) up to N times (default 1), then record it failed; cells that raise or time out are not "
                    "retried")
    rg = r.add_argument_group("Ray executor")
    rg.add_argument("--address", help="the Ray cluster to join (host:port, auto, ray://...); default: a local "
                    "cluster started for the run (or RAY_ADDRESS)")
    rg.add_argument("--gpu-type", metavar="TYPE", help="cells that need GPUs run on this accelerator type (Ray's "
                    "accelerator_type: H100, A100, L4, ...)")
    rg.add_argument("--cpus-per-cell", type=float, metavar="N", default=None, help="CPUs each cell reserves (default 1)")
    rg.add_argument("--memory-gb", type=float, metavar="GB", default=None,
                    help="host memory each cell reserves (default: none reserved)")
    r.set_defaults(func=_cmd_run, needs=_MODELS)

    rep = sub.add_parser("report", help="tabulate records")
    rep.add_argument("paths", nargs="*", help="record files or folders (default: results)")
    rep.add_argument("--format", choices=["table", "csv", "json", "markdown"], default="table")
    rep.set_defaults(func=_cmd_report)

    from moecap.compare import add_arguments as compare_arguments, cmd_compare  # light: no torch, no numpy

    cmp = sub.add_parser(
        "compare", help="regression gate: match cells of two result sets, flag regressions beyond noise",
        description="Match the cells of BASELINE and CURRENT (record files or folders) and compare their figures. "
        "A metric regressed when it moved past its threshold in the bad direction and, where both records have "
        "per-pass or per-request traces, a bootstrap confidence interval of the change lies wholly past it. "
        "Exit 0: no gated regression; 1: a gated regression or a cell that was ok and now failed; 2: bad input.")
    compare_arguments(cmp)
    cmp.set_defaults(func=cmd_compare)

    lb = sub.add_parser(
        "leaderboard", help="the Gradio leaderboard over a results folder, on localhost (or written as a Space)",
        description="Serve the leaderboard on localhost; with --write-space OUT_DIR, write it instead as a "
        "ready-to-push Hugging Face Space: app.py, README.md (the Space's configuration), requirements.txt (the "
        "board's packages: no torch, no transformers) and moecap/ (a wheel of this source tree, unpacked), "
        "showing RESULTS unless the Space variable MOECAP_RESULTS names other records. Then push it: "
        "huggingface-cli upload <org>/<space> OUT_DIR . --repo-type space")
    lb.add_argument("results", nargs="?", default=None,
                    help="results folder or hf://datasets/<org>/<name> (default: results)")
    lb.add_argument("--host", default="127.0.0.1")
    lb.add_argument("--port", type=int, default=None)
    lb.add_argument("--share", action="store_true", help="also open a public Gradio share link")
    lb.add_argument("--write-space", metavar="OUT_DIR", default=None,
                    help="write a Hugging Face Space of the board into OUT_DIR instead of serving it")
    lb.add_argument("--title", default="moecap leaderboard", help="with --write-space: the Space's title")
    lb.set_defaults(func=_cmd_leaderboard)

    pub = sub.add_parser("publish", help="validate records and push them to the leaderboard's results repo")
    pub.add_argument("paths", nargs="+", help="record files or folders")
    pub.add_argument("--to", required=True, help="hf://datasets/<org>/<name> (token: HF_TOKEN) or a local folder")
    pub.add_argument("--message", help="commit message")
    pub.set_defaults(func=_cmd_publish)

    c = sub.add_parser("cost", help="re-price records on other hardware prices or tariffs, without re-running")
    c.add_argument("paths", nargs="*", help="record files or folders (default: results)")
    c.add_argument("--hardware", help="price this GPU instead (a catalog key or device name, e.g. h100-sxm5-80gb)")
    c.add_argument("--set", action="append", metavar="KEY=VALUE", help="a cost input, e.g. usd_per_kwh=0.2 or pue=1.5")
    c.add_argument("--list-settings", action="store_true", help="list the cost inputs --set takes")
    c.add_argument("--format", choices=["table", "json"], default="table")
    c.set_defaults(func=_cmd_cost)

    hw = sub.add_parser("hardware", help="show the detected device and its peaks")
    hw.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    hw.add_argument("--dtype", help="compute dtype for the FLOPS peak (default: bfloat16 on GPU, float32 on CPU)")
    hw.add_argument("--calibrate", action="store_true", help="measure the bandwidth and matmul ceilings and cache them")
    hw.set_defaults(func=_cmd_hardware)

    zoo = sub.add_parser("zoo", help="models moecap builds itself").add_subparsers(dest="zoo_command", required=True)
    zb = zoo.add_parser("build", help="train tiny-moe and its domain children (cached; no download)")
    zb.add_argument("name", nargs="?", default="tiny-moe")
    zb.add_argument("--profile", choices=["default", "test"], help="default: ~1M parameters, trained longest; test: a faster, weaker one")
    zb.add_argument("--variants", help="comma-separated children to build: code,prose,c (default all) or none")
    zb.add_argument("--force", action="store_true", help="rebuild from scratch")
    zb.set_defaults(func=_cmd_zoo_build, needs=_MODELS)

    eng = sub.add_parser("engine", help="moecap's own engine").add_subparsers(dest="engine_command", required=True)
    ep = eng.add_parser("pareto", help="measure expert placement x precision configurations; write the "
                        "throughput/perplexity frontier (records, frontier.json, PNG, HTML)")
    ep.add_argument("model", help="an embedded model (tiny-moe, ...), a local directory or a hub id")
    ep.add_argument("--precisions", default="int8,int4", help="precisions of quantized experts (int8,int4,int3,int2)")
    ep.add_argument("--quantize", type=_floats, default=[0, 0.25, 0.5, 0.75, 1.0],
                    help="shares of experts quantized (comma-separated, 0..1)")
    ep.add_argument("--offload", type=_floats, default=[0, 0.5, 1.0], help="shares of experts in host memory")
    ep.add_argument("--mixed", type=_floats, default=[0.6, 0.4, 0.25, 0.1],
                    help="mixtures of precisions: fast-memory budgets as shares of all experts' full-precision "
                         "bytes (comma-separated, 0..1; empty string: none)")
    ep.add_argument("--calibration", help="calibration text for profiles: 'embedded' (default), a .txt/.jsonl file")
    ep.add_argument("--fast-budget-gb", type=float, help="fast-device memory for experts, GB")
    ep.add_argument("--dataset", default="tiny-code", help="perplexity data set (tiny-code, tiny-prose, tiny-c, wikitext2, ...)")
    ep.add_argument("--windows", type=int, default=16, help="perplexity windows per configuration")
    ep.add_argument("--input-tokens", type=int, default=64)
    ep.add_argument("--output-tokens", type=int, default=64)
    ep.add_argument("--num-prompts", type=int, default=8)
    ep.add_argument("--batch-size", type=int, default=1)
    ep.add_argument("--device", default="auto")
    ep.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    ep.add_argument("--group-size", type=int, default=64)
    ep.add_argument("--profile-windows", type=int, default=8, help="calibration windows for frequency and sensitivity")
    ep.add_argument("--max-perplexity", type=float, help="print the fastest configuration with perplexity <= this")
    ep.add_argument("--min-tokens-per-s", type=float, help="print the most accurate configuration with tok/s >= this")
    ep.add_argument("-o", "--output", default="results")
    ep.add_argument("--force", action="store_true", help="re-run configurations that already have records")
    ep.set_defaults(func=_cmd_engine_pareto, needs=_MODELS)

    er = eng.add_parser("rates", help="measure (once, then cached) the rates the engine's cost model uses: host "
                        "expert kernels per precision, the host-to-device link")
    er.add_argument("--device", default="auto", help="the fast device whose link is measured (cuda; cpu: host only)")
    er.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="the model's dtype (full-precision host experts)")
    er.add_argument("--refresh", action="store_true", help="measure again")
    er.set_defaults(func=_cmd_engine_rates, needs=("torch",))

    em = eng.add_parser("merge", help="merge fine-tuned children of one base into one model (average, "
                        "task_arithmetic, ties, dare): a baseline for consolidation")
    em.add_argument("--base", required=True, help="the base: an embedded model (tiny-moe) or a local directory")
    em.add_argument("--children", required=True,
                    help="comma-separated children of the base (embedded names such as tiny-moe-code, or directories)")
    em.add_argument("--method", required=True, help="average, task_arithmetic, ties or dare")
    em.add_argument("--density", type=float, help="ties: fraction of each task vector kept per tensor (default 0.2)")
    em.add_argument("--drop", type=float, help="dare: probability of dropping a task-vector element (default 0.9)")
    em.add_argument("--scale", type=float, help="task_arithmetic, ties, dare: multiplier of the merged task vector "
                    "(default 1.0)")
    em.add_argument("--seed", type=int, help="dare: random seed (default 0)")
    em.add_argument("--combine", help="dare: arithmetic (default) or ties")
    em.add_argument("-o", "--output", required=True, help="the merged model directory to write")
    em.set_defaults(func=_cmd_engine_merge, needs=_MODELS)

    et = eng.add_parser("tenants", help="compare moecap serve backends on a multi-tenant trace from their records "
                        "(per-child turnaround, switches, expert memory, own-domain perplexity); table + PNG")
    et.add_argument("results", help="the records of a multi-model suite (e.g. results/consolidation-cpu)")
    et.add_argument("-o", "--out", default=None, help="the plot (default: RESULTS/tenants.png)")
    et.set_defaults(func=_cmd_engine_tenants, needs=("matplotlib",))
    ec = eng.add_parser("consolidate", help="plan expert consolidation of fine-tuned MoE models (children of one "
                        "base, or --pairwise fine-tunes with no base): per-layer memory saving; or measure its curve "
                        "over thresholds against merging")
    ec.add_argument("models", nargs="+", metavar="MODEL",
                    help="the base model, then the children (with --pairwise: the children only); each an "
                    "embedded name (tiny-moe-code), a local directory or a hub id, NAME=MODEL to name it")
    ec.add_argument("--pairwise", action="store_true",
                    help="no base: the shared copy of an expert is the children's mean (the paper's authors pair "
                    "two fine-tunes, e.g. Mixtral-8x7B and its Instruct variant)")
    ec.add_argument("--data", action="append", metavar="NAME=DATA",
                    help="the data child NAME was tuned on, to measure its experts on (repeat per child): a .txt "
                    "or .jsonl[#FIELD] file, hf:DATASET[/CONFIG]@SPLIT[#FIELD], or tiny-code / tiny-prose / "
                    "tiny-c; default for the embedded children: their own domain")
    ec.add_argument("--calibration-windows", type=int, default=8,
                    help="windows of 256 tokens of each child's data to measure on (default 8)")
    ec.add_argument("--threshold", type=float, help="private copy where the output distance exceeds this")
    ec.add_argument("--budget-mb", type=float, help="MiB for private expert copies (most distant first)")
    ec.add_argument("--plan-out", default="consolidation-plan.json")
    ec.add_argument("--curve", type=_floats, help="thresholds to measure (records, curve.json, curve.png)")
    ec.add_argument("--shared", default="mean", choices=["mean", "base"],
                    help="the shared copy: the mean of the children sharing it, or the base's expert")
    ec.add_argument("--windows", type=int, default=16, help="perplexity windows per child")
    ec.add_argument("--no-merge", action="store_true", help="skip the model-merging baselines")
    ec.add_argument("-o", "--output", default="results")
    ec.set_defaults(func=_cmd_engine_consolidate, needs=_MODELS)

    eg = sub.add_parser("export-gguf", help="write a Mixtral-family (or Llama) model as GGUF for llama.cpp")
    eg.add_argument("model", help="an embedded model name (tiny-moe, ...) or a local Hugging Face model directory")
    eg.add_argument("-o", "--output", help="the .gguf file (default: <model dir name>-<weight type>.gguf here)")
    eg.add_argument("--weight-type", default="f32", choices=["f32", "f16", "bf16", "q8_0", "q4_0"])
    eg.set_defaults(func=_cmd_export_gguf, needs=("safetensors", "gguf"))

    lc = sub.add_parser("llamacpp", help="llama.cpp's own llama-server for the llamacpp runner").add_subparsers(
        dest="llamacpp_command", required=True)
    lcb = lc.add_parser("build", help="build llama-server from the llama.cpp tree that llama-cpp-python's source "
                        "distribution vendors (cached in moecap's cache; needs cmake and a C++ compiler)")
    lcb.add_argument("-j", "--jobs", type=int, default=None, help="parallel compile jobs (default: all cores)")
    lcb.add_argument("--cuda", action="store_true", help="build with CUDA (needs the CUDA toolkit)")
    lcb.set_defaults(func=_cmd_llamacpp_build)
    lc.add_parser("where", help="the llama-server and source tree moecap would use").set_defaults(
        func=_cmd_llamacpp_where)

    sub.add_parser("models", help="list embedded models and built-in architectures").set_defaults(func=_cmd_models)
    sub.add_parser("runners", help="list registered runners").set_defaults(func=_cmd_runners)

    from moecap.engine.backend import BACKENDS  # light: names only

    sv = sub.add_parser("serve", help="an OpenAI-compatible streaming server over several models of one family")
    sv.add_argument("models", nargs="+", metavar="MODEL",
                    help="an embedded model (tiny-moe-code), a local model directory or a hub id; NAME=MODEL "
                    "serves it as NAME (default: the directory's name, else the id)")
    sv.add_argument("--host", default="127.0.0.1",
                    help="address to listen on (default: loopback only; beyond it without an API key, a warning)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--api-key", metavar="KEY", default=None,
                    help="require 'Authorization: Bearer KEY' on every endpoint but /health (default: "
                    "$MOECAP_API_KEY; the variable keeps the key out of the process list)")
    sv.add_argument("--max-request-bytes", type=int, metavar="N", default=None,
                    help="largest request body, else 413 (default 4 MiB: a whole 128k-token prompt fits as "
                    "token ids or as JSON-escaped text, while a runaway body is refused before it is parsed)")
    sv.add_argument("--backend", choices=sorted(BACKENDS), default="separate",
                    help="separate: every model fully loaded; consolidated: children of one base MoE sharing "
                    "similar experts, non-expert layers swapped per batch; partition: the static-partition "
                    "baseline, each child its own server process (own scheduler worker, 1/N of the CPU threads "
                    "and of --fast-budget-gb, experts that do not fit offloaded to host memory) behind this "
                    "process as a router")
    sv.add_argument("--max-model-len", type=int, default=None, help="cap every model's context length")
    cg = sv.add_argument_group("consolidated backend")
    cg.add_argument("--base", help="the children's base model (default: the parent their moecap.json names)")
    cg.add_argument("--threshold", type=float, default=None,
                    help="share an expert when the child's output distance to the base's is at most this "
                    "(default 0.3; see moecap engine consolidate)")
    cg.add_argument("--consolidation-plan", metavar="PLAN.json", help="a plan from moecap engine consolidate "
                    "--plan-out (instead of measuring similarity at start-up)")
    cg.add_argument("--pairwise", action="store_true",
                    help="no base: fine-tunes of one architecture, the shared copy of an expert their mean")
    cg.add_argument("--data", action="append", metavar="NAME=DATA",
                    help="the data model NAME was tuned on, to measure its experts on (repeat per model; see "
                    "moecap engine consolidate --data)")
    cg.add_argument("--shared", choices=["mean", "base"], default=None,
                    help="the one shared copy: the sharers' mean (default) or the base's expert")
    pg = sv.add_argument_group("consolidated and partition backends")
    pg.add_argument("--fast-budget-gb", type=float, default=None,
                    help="fast-device memory for weights (partition: split evenly between the children; "
                    "consolidated: experts beyond it stay in host memory)")
    sv.add_argument("--max-batch-size", type=int, default=8, help="requests of one model per static batch")
    sv.add_argument("--max-wait-s", type=float, default=2.0,
                    help="a model whose oldest request waited this long goes next (fairness bound)")
    sv.add_argument("--max-consecutive-batches", type=int, default=4,
                    help="a model with queued work goes next after this many batches of other models")
    sv.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    sv.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    sv.set_defaults(func=_cmd_serve, needs=(*_MODELS, "aiohttp"))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    missing = _missing_extra(args)
    if missing:
        print(missing, file=sys.stderr)
        return 1
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
