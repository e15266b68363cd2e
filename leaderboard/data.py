"""The leaderboard's data layer: records -> one pandas DataFrame (pure: pandas + stdlib, no gradio).

One row per record (benchmark cell). Quality-only cells (perplexity / lm-eval) and performance
cells are separate rows; :func:`merge_quality` copies a quality row's figures onto the
performance rows of the same model + system + precision + hardware, so trade-off plots have
both axes.

Every column is described once: the figures in ``moecap.figures`` (the one table of figures), the
identity and bookkeeping here (:func:`columns`); quality columns that depend on the data
(``ppl:<dataset>``, ``<task>:<metric>``) are described by :func:`columns_for`.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from moecap.figures import dig
from moecap.records import SCHEMA_VERSION, iter_record_files, migrate


@dataclass(frozen=True)
class Column:
    key: str
    label: str
    dtype: str  # 'str' | 'float' | 'int'
    unit: str | None = None
    default_visible: bool = False
    higher_is_better: bool | None = None
    description: str = ""
    decimals: int = 2  # rounding in display_frame (float columns)
    scale: float = 1.0  # display_frame shows value x scale (100: a fraction shown in %)

    @property
    def header(self) -> str:
        """The label with its unit, e.g. ``TTFT p50 (ms)``."""
        return f"{self.label} ({self.unit})" if self.unit else self.label


C = Column
# the record's identity (what a row is), then every figure of moecap.figures, then bookkeeping
_IDENTITY: list[Column] = [
    C("model", "Model", "str", None, True, None, "Model display name (config.model.display_name)"),
    C("system", "System", "str", None, True, None, "Serving system: runner display name + salient engine settings"),
    C("precision", "Precision", "str", None, True, None,
      "What the weights are stored in: the runner's dtype; quantized experts first (an engine plan: "
      "int4 experts, or the share of each precision in a mixed plan); a GGUF export's weight type"),
    C("hardware", "Hardware", "str", None, True, None, "Accelerator (detected device name; N x when several)"),
    C("workload", "Workload", "str", None, True, None,
      "Requests of the cell (config.workload.display_name): prompt source and input/output lengths, e.g. "
      "random-in128-out32; quality for a quality-only cell"),
    C("load", "Load", "str", None, True, None, "Offered load: bs=<batch size>, conc=<concurrency> or rate=<req/s>"),
    C("batch_size", "Batch size", "int", None, False, None, "Static batch size of the load (config.load.batch_size)", 0),
]
_BOOKKEEPING: list[Column] = [
    C("ppl_set", "PPL set", "str", None, False, None,
      "What the Perplexity figure was measured on: data set, windows x tokens per window. Perplexities "
      "are ranked against each other only on the same set"),
    C("ppl_windows", "PPL windows", "int", None, False, None, "Windows scored for the Perplexity figure", 0),
    C("acc_set", "Accuracy set", "str", None, False, None,
      "What the Accuracy figure was measured on: lm-eval tasks, samples per task, few-shot count. "
      "Accuracies are ranked against each other only on the same set"),
    C("acc_samples", "Accuracy samples", "int", None, False, None,
      "lm-eval samples behind the Accuracy figure (effective samples, summed over its tasks)", 0),
    C("accuracy_stderr", "Accuracy stderr", "float", None, False, None,
      "Standard error of the Accuracy figure: lm-eval's per-task standard errors combined for the mean "
      "of the tasks, sqrt(sum se^2) / tasks (shown as Accuracy +/- stderr)", 3),
    C("quality_cell", "Quality cell", "str", None, False, None,
      "The quality record(s) whose figures were merged onto this performance row"),
    C("utilization_basis", "S-MBU basis", "str", None, False, None,
      "traced: per-pass timings and router traces; recorded: a server's own routing record; estimated: a "
      "server's decode passes reconstructed from streamed timestamps, expected expert unions"),
    C("peak_kind", "Peak kind", "str", None, False, None,
      "Where the peaks S-MBU and S-MFU divide by came from: calibrated (measured on the machine), "
      "datasheet (moecap's device table) or user (given in the suite)"),
    C("basis", "Basis", "str", None, True, None,
      "How the figures that are not plainly measured were got, e.g. util=traced (calibrated peak); "
      "cost=estimated (rated power, catalog prices): utilization traced / recorded / estimated and "
      "over a calibrated, datasheet or user peak; cost from measured or rated (TDP) power and from "
      "catalog or user prices; energy measured (meter named) or not"),
    C("status", "Status", "str", None, False, None, "Record status: ok, failed or skipped"),
    C("suite", "Suite", "str", None, False, None, "Suite name"),
    C("created_at", "Created", "str", None, False, None, "When the record was written (ISO 8601, UTC)"),
    C("cell_id", "Cell", "str", None, False, None, "Cell id (record file name)"),
    C("record_path", "Record", "str", None, False, None, "Path of the record JSON"),
]
del C


_PERCENT_PREFIXES = ("s_mbu", "s_mfu")  # utilizations, stored as fractions, shown as % on the board


def _figure_column(f: Any) -> Column:
    description = f.description[:1].upper() + f.description[1:]
    if f.key.startswith(_PERCENT_PREFIXES):
        return Column(f.key, f.label, "float", "%", "leaderboard" in f.show, f.higher_is_better,
                      description + " (shown in %; CSV exports and records keep the fraction)",
                      max(0, f.decimals - 2), scale=100.0)
    return Column(f.key, f.label, "float", f.unit, "leaderboard" in f.show, f.higher_is_better,
                  description, f.decimals)


def columns() -> list[Column]:
    """Every column, described once: the identity, the figure table's figures (``moecap.figures``, read
    at call time), then bookkeeping."""
    from moecap import figures

    return list(_IDENTITY) + [_figure_column(f) for f in figures.table()] + list(_BOOKKEEPING)


def column_by_key() -> dict[str, Column]:
    return {c.key: c for c in columns()}


def __getattr__(name: str) -> Any:  # the constant names follow the figure table
    if name == "COLUMNS":
        return columns()
    if name == "COLUMN_BY_KEY":
        return column_by_key()
    if name == "STRING_KEYS":
        return [c.key for c in columns() if c.dtype == "str"]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


QUALITY_KEYS = ("accuracy", "perplexity")
GROUP_KEYS = ("model", "system", "precision", "hardware")  # what merge_quality matches on
# the quality figures that travel together (from one record) when merged: headline first
PPL_GROUP = ("perplexity", "ppl_set", "ppl_windows")
ACC_GROUP = ("accuracy", "accuracy_stderr", "acc_set", "acc_samples")
SET_OF = {"perplexity": "ppl_set", "accuracy": "acc_set"}  # a quality figure -> what it was measured on
# private columns (not shown, not in columns()): why a figure is missing; a quality row merged elsewhere
WHY = "_why"
MERGED = "_merged"
INTERVALS = "_intervals"  # {figure key: (low, high, repetitions, coverage)} of a record with repetitions
PRIVATE = (WHY, MERGED, INTERVALS)

# runner settings worth showing in the system name: key -> short name
_SALIENT_ARGS = {
    "attn_implementation": "attn",
    "attention_backend": "attn",
    "tensor_parallel_size": "tp",
    "pipeline_parallel_size": "pp",
    "data_parallel_size": "dp",
    "expert_parallel_size": "ep",
    "enable_expert_parallel": "ep",
    "quantization": "quant",
    "kv_cache_dtype": "kv",
    "speculative_method": "spec",
    "enable_chunked_prefill": "chunked",
}


def is_dynamic_quality_key(key: str) -> bool:
    return ":" in key


def dynamic_column(key: str) -> Column:
    """The Column of a data-dependent quality column (``ppl:<dataset>`` or ``<task>:<metric>``)."""
    if key.startswith("ppl:"):
        ds = key[4:]
        return Column(key, f"PPL {ds}", "float", None, False, False, f"Token perplexity on {ds}", 2)
    task, _, metric = key.partition(":")
    return Column(key, f"{task} {metric}", "float", None, False, True, f"lm-eval {task}: {metric}", 3)


def columns_for(df: pd.DataFrame) -> list[Column]:
    """The columns plus the dynamic quality columns present in ``df`` (sorted)."""
    known = column_by_key()
    extra = sorted(k for k in df.columns if k not in known and is_dynamic_quality_key(str(k)))
    return columns() + [dynamic_column(k) for k in extra]


def column(key: str) -> Column:
    known = column_by_key()
    return known[key] if key in known else dynamic_column(key)


def default_keys() -> list[str]:
    return [c.key for c in columns() if c.default_visible]


# ---------------------------------------------------------------- records -> rows


def _get(d: Any, *path: str) -> Any:
    return dig(d, path)


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, (int, float)):
        return float(v)
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _fmt_setting(v: Any) -> str:
    if isinstance(v, bool):
        return "on" if v else "off"
    return str(v)


def system_name(runner: dict[str, Any]) -> str | None:
    """Runner display name + salient engine settings, e.g. ``hf (attn=sdpa)`` or ``vllm (tp=2, ep=on)``."""
    if not isinstance(runner, dict):
        return None
    name = runner.get("display_name") or runner.get("name") or runner.get("type")
    if not name:
        return None
    args: dict[str, Any] = {}
    for src in (runner.get("args"), runner, runner.get("resolved_args")):  # later wins
        if isinstance(src, dict):
            args.update({k: v for k, v in src.items() if k in _SALIENT_ARGS})
    if runner.get("type") == "engine":  # its own attention whatever attn_implementation says
        args.pop("attn_implementation", None)
    parts: list[str] = []
    seen: set[str] = set()
    for key, short in _SALIENT_ARGS.items():
        v = args.get(key)
        if v is None or isinstance(v, (dict, list)) or short in seen:
            continue
        if key in ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size", "expert_parallel_size") and v == 1:
            continue
        seen.add(short)
        parts.append(f"{short}={_fmt_setting(v)}")
    if runner.get("serving") == "serialised":  # one request at a time: not comparable with batching servers
        parts.append("serialised")
    return f"{name} ({', '.join(parts)})" if parts else str(name)


_EXPERT_PRECISIONS = ("int8", "int4", "int3", "int2")


def precision_label(runner: dict[str, Any]) -> str | None:
    """What the weights are stored in: the runner's dtype; for an engine plan with quantized experts,
    the experts' precisions first (``int4 experts, float32``; a mixed plan ``experts 75% int4 + 25%
    full, float32``); for a GGUF export, its weight type (``q4_0 GGUF``)."""
    if not isinstance(runner, dict):
        return None
    dtype = runner.get("dtype") or _get(runner, "resolved_args", "dtype") or _get(runner, "args", "dtype")
    dtype = str(dtype) if dtype is not None else None
    weight_type = runner.get("weight_type")
    if isinstance(weight_type, str) and weight_type:
        return f"{weight_type} GGUF"
    plan = runner.get("plan")
    n = plan.get("experts") if isinstance(plan, dict) else None
    if isinstance(n, int) and n > 0:
        counts = {p: int(plan.get(f"{p}_experts") or 0) for p in _EXPERT_PRECISIONS}
        counts = {p: c for p, c in counts.items() if c > 0}
        if counts:
            full = n - sum(counts.values())
            if full > 0:
                counts["full"] = full
            if len(counts) == 1:
                experts = f"{next(iter(counts))} experts"
            else:
                experts = "experts " + " + ".join(f"{100 * c / n:.0f}% {p}" for p, c in counts.items())
            return f"{experts}, {dtype}" if dtype else experts
    return dtype


def _hardware(cfg: dict[str, Any]) -> str | None:
    det = _get(cfg, "hardware", "detected") or {}
    name = det.get("device_name") or det.get("cpu_model") or det.get("accelerator")
    if name is None:
        name = _get(cfg, "hardware", "settings", "device")
    if name is None:
        return None
    count = det.get("device_count")
    if isinstance(count, int) and count > 1 and det.get("accelerator") not in (None, "cpu"):
        return f"{count}x {name}"
    return str(name)


def _workload(cfg: dict[str, Any]) -> str | None:
    """The workload's name, with its prompt and output lengths when the name does not already say
    them (a suite's ``--set`` can change the lengths and keep the name)."""
    wl = cfg.get("workload") if isinstance(cfg, dict) else None
    if not isinstance(wl, dict):
        return None
    name = wl.get("display_name") or wl.get("name")
    inp, out = wl.get("input_tokens"), wl.get("output_tokens")
    if isinstance(inp, int) and isinstance(out, int) and not isinstance(inp, bool):
        shape = f"in{inp}-out{out}"
        return str(name) if name and shape in str(name) else f"{name} ({shape})" if name else shape
    return str(name) if name else None


def _load(cfg: dict[str, Any]) -> str | None:
    load = cfg.get("load") if isinstance(cfg, dict) else None
    if not isinstance(load, dict):
        return None
    for key, prefix in (("batch_size", "bs="), ("concurrency", "conc="), ("rate", "rate=")):
        if load.get(key) is not None:
            return f"{prefix}{load[key]}"
    return None


def quality_columns(d: dict[str, Any]) -> dict[str, float]:
    """``ppl:<dataset>`` and ``<task>:<metric>`` figures of a record (dict)."""
    from moecap import figures

    rep = d.get("report") if isinstance(d.get("report"), dict) else {}
    return {k: v for k, (v, _, _) in figures.quality_values(rep).items()}


def quality_sets(report: dict[str, Any]) -> dict[str, Any]:
    """What the headline quality figures were measured on: ``ppl_set`` / ``ppl_windows`` for Perplexity
    (its data set, the first in name order as ``moecap.figures`` takes it) and ``acc_set`` /
    ``acc_samples`` / ``accuracy_stderr`` for Accuracy (the mean ``acc`` over the record's tasks)."""
    from moecap import figures

    out: dict[str, Any] = {k: None for k in (*PPL_GROUP[1:], *ACC_GROUP[1:])}
    quality = report.get("quality") if isinstance(report, dict) else None
    if not isinstance(quality, dict):
        return out
    values = figures.quality_values(report)
    ppl = [info["dataset"] for k, (_v, _se, info) in values.items() if k.startswith("ppl:")]
    if ppl:
        res = (quality.get("perplexity") or {}).get(ppl[0]) or {}
        windows, ctx = _num(res.get("windows")), _num(res.get("context_length"))
        shape = ""
        if windows is not None:
            shape = f"{windows:.0f} windows" + (f" x {ctx:.0f} tok" if ctx is not None else "")
        out["ppl_set"] = f"{ppl[0]} ({shape})" if shape else ppl[0]
        out["ppl_windows"] = int(windows) if windows is not None else None
    accs = [(info["task"], se, info.get("n")) for k, (_v, se, info) in values.items() if k.endswith(":acc")]
    if accs:
        tasks = (quality.get("lm_eval") or {}).get("tasks") or {}
        ns = sorted({n for _t, _se, n in accs if n})
        shots = sorted({str(dig(tasks, (t, "num_fewshot"))) for t, _se, _n in accs
                        if isinstance(dig(tasks, (t, "num_fewshot")), int)})
        detail = []
        if ns:
            detail.append(f"n={ns[0]}/task" if len(ns) == 1 else f"n={ns[0]}-{ns[-1]}/task")
        if shots:
            detail.append(f"{'/'.join(shots)}-shot")
        names = ", ".join(t for t, _se, _n in accs)
        out["acc_set"] = f"{names} ({', '.join(detail)})" if detail else names
        out["acc_samples"] = sum(n for _t, _se, n in accs if n) or None
        ses = [se for _t, se, _n in accs]
        if all(se is not None for se in ses):
            out["accuracy_stderr"] = math.sqrt(sum(se * se for se in ses)) / len(ses)
    return out


def _why_missing(row: dict[str, Any], rep: dict[str, Any], status: Any) -> dict[str, str]:
    """A short reason for each figure the row lacks, shown as ``n/a (reason)`` on the board."""
    from moecap import figures

    if status not in (None, "ok"):
        return {f.key: str(status) for f in figures.table() if row.get(f.key) is None}
    quality_only = not isinstance(rep.get("throughput"), dict) and isinstance(rep.get("quality"), dict)
    energy = rep.get("energy") if isinstance(rep.get("energy"), dict) else {}
    cost = rep.get("cost") if isinstance(rep.get("cost"), dict) else {}
    util = rep.get("utilization") if isinstance(rep.get("utilization"), dict) else {}
    why: dict[str, str] = {}
    for f in figures.table():
        if row.get(f.key) is not None:
            continue
        if f.family == "quality":
            why[f.key] = "no quality run"
        elif quality_only:
            why[f.key] = "quality run"
        elif f.family == "energy" or f.key == "avg_power_w":
            why[f.key] = "no power meter" if energy.get("available") is False else "not measured"
        elif f.family == "cost":
            why[f.key] = "no price" if cost.get("reasons") or not cost else "not priced"
        elif f.family == "utilization":
            why[f.key] = "not traced" if not util else "no such pass"
        elif f.family == "server":
            why[f.key] = "not a multi-model server"
        else:
            why[f.key] = "not in record"
    return why


def record_row(d: dict[str, Any], path: str | Path | None = None) -> dict[str, Any]:
    """One leaderboard row (the column keys plus dynamic quality keys) from a record dict."""
    from moecap import figures

    cfg = d.get("config") if isinstance(d.get("config"), dict) else {}
    rep = d.get("report") if isinstance(d.get("report"), dict) else {}
    runner = cfg.get("runner") if isinstance(cfg.get("runner"), dict) else {}
    precision = precision_label(runner)
    suite = _get(d, "suite", "name") if isinstance(d.get("suite"), dict) else d.get("suite")
    if not suite and path is not None:
        suite = Path(path).parent.name
    bs = _get(cfg, "load", "batch_size")
    row: dict[str, Any] = {
        "model": _get(cfg, "model", "display_name") or _get(cfg, "model", "name") or _get(cfg, "model", "id"),
        "system": system_name(runner),
        "precision": precision,
        "hardware": _hardware(cfg),
        "workload": _workload(cfg),
        "load": _load(cfg),
        "batch_size": int(bs) if isinstance(bs, (int, float)) and not isinstance(bs, bool) else None,
    }
    for f in figures.table():
        row[f.key] = _num(f.value(rep))
    row.update({
        "utilization_basis": figures.basis(rep, "s_mbu_decode") if rep else None,
        "peak_kind": figures.peak_kind(rep) if rep else None,
        "basis": figures.basis_summary(rep) if rep else None,
        "status": d.get("status"),
        "suite": suite,
        "created_at": d.get("created_at"),
        "cell_id": d.get("cell_id"),
        "record_path": str(path) if path is not None else None,
    })
    row.update(quality_sets(rep))
    for k in ("model", "system", "precision", "hardware", "workload", "peak_kind", "status", "suite", "created_at",
              "cell_id"):
        if row[k] is not None:
            row[k] = str(row[k])
    row.update(quality_columns(d))
    row[WHY] = _why_missing(row, rep, d.get("status"))
    reps = rep.get("repetitions") if isinstance(rep.get("repetitions"), dict) else {}
    row[INTERVALS] = {k: (v["interval"][0], v["interval"][1], int(reps.get("n") or len(v.get("values") or [])),
                          v.get("coverage"))
                      for k, v in (reps.get("figures") or {}).items()
                      if isinstance(v, dict) and isinstance(v.get("interval"), list) and len(v["interval"]) == 2}
    return row


def _looks_like_record(d: Any) -> bool:
    return isinstance(d, dict) and isinstance(d.get("cell_id"), str) and (
        isinstance(d.get("config"), dict) or isinstance(d.get("report"), dict)
    )


def _read_rows(folder: Path) -> list[dict[str, Any]]:
    rows = []
    for path in iter_record_files(folder):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            warnings.warn(f"skipping {path}: not readable JSON ({err})", stacklevel=3)
            continue
        if not _looks_like_record(data):
            warnings.warn(f"skipping {path}: not a moecap record (no cell_id/config/report)", stacklevel=3)
            continue
        try:
            rows.append(record_row(migrate(data), path))
        except Exception as err:  # a record too odd to read is skipped, not fatal
            warnings.warn(f"skipping {path}: unreadable record ({err})", stacklevel=3)
    return rows


_HF_RE = re.compile(r"^hf://datasets/(?P<repo>[^/@]+/[^/@]+)(?:@(?P<rev>[^/]+))?(?:/(?P<sub>.*))?$")


def parse_hf_source(source: str) -> tuple[str, str | None, str | None]:
    """``hf://datasets/<org>/<name>[@revision][/subfolder]`` -> (repo_id, revision, subfolder)."""
    m = _HF_RE.match(source.strip())
    if not m:
        raise ValueError(f"not a Hugging Face dataset address: {source!r} (want hf://datasets/<org>/<name>[@revision])")
    return m["repo"], m["rev"], (m["sub"] or "").strip("/") or None


def load_results(source: str | Path | Sequence[str | Path]) -> pd.DataFrame:
    """Every record under ``source`` as a DataFrame (one row per record).

    ``source``: a folder (searched recursively) or record file, or
    ``hf://datasets/<org>/<name>[@revision]`` (downloaded with ``snapshot_download``), or a list of these.
    Older records (missing sections) give NaN figures; corrupt or foreign JSON is skipped with a warning.
    """
    sources = [source] if isinstance(source, (str, Path)) else list(source)
    rows: list[dict[str, Any]] = []
    for src in sources:
        if isinstance(src, str) and src.startswith("hf://"):
            from huggingface_hub import snapshot_download

            repo_id, rev, sub = parse_hf_source(src)
            local = Path(snapshot_download(repo_id=repo_id, repo_type="dataset", revision=rev, allow_patterns=["*.json"]))
            rows.extend(_read_rows(local / sub if sub else local))
        else:
            p = Path(src).expanduser()
            if not p.exists():
                raise FileNotFoundError(f"no results at {p}")
            rows.extend(_read_rows(p))
    return _frame(rows)


def _frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    cols = columns()
    known = {c.key for c in cols}
    for c in cols:
        if c.key not in df.columns:
            df[c.key] = None
    private = [k for k in PRIVATE if k in df.columns]
    extra = sorted(k for k in df.columns if k not in known and k not in private)
    df = df[[c.key for c in cols] + extra + private]
    for c in cols:
        if c.dtype == "float":
            df[c.key] = pd.to_numeric(df[c.key], errors="coerce").astype("float64")
        elif c.dtype == "int":
            df[c.key] = pd.to_numeric(df[c.key], errors="coerce").astype("Int64")
        else:
            df[c.key] = df[c.key].astype(object).where(df[c.key].notna(), None)
    for k in extra:
        df[k] = pd.to_numeric(df[k], errors="coerce").astype("float64")
    for k in (WHY, INTERVALS):
        if k in df.columns:
            df[k] = df[k].map(lambda v: v if isinstance(v, dict) else {})
    if len(df):
        df = df.sort_values(["suite", "model", "system", "cell_id"], na_position="last", kind="stable")
    return df.reset_index(drop=True)


def empty_frame() -> pd.DataFrame:
    return _frame([])


# ---------------------------------------------------------------- merge, Pareto, filters


def _is_quality_row(df: pd.DataFrame) -> pd.Series:
    perf = df[["ttft_ms_p50", "tpot_ms_p50", "output_tokens_per_s", "requests_per_s"]].notna().any(axis=1)
    qual_keys = list(QUALITY_KEYS) + [k for k in df.columns if is_dynamic_quality_key(str(k))]
    return ~perf & df[qual_keys].notna().any(axis=1)


def merge_quality(df: pd.DataFrame) -> pd.DataFrame:
    """A copy of ``df`` where performance rows get the quality figures of the quality rows with the same
    model, system, precision and hardware, and quality rows so merged are marked (``MERGED``) so the
    board shows their figures once, on the performance rows.

    Perplexity and accuracy are merged separately, each with what it was measured on (``PPL_GROUP`` and
    the ``ppl:<dataset>`` columns; ``ACC_GROUP`` and the ``<task>:<metric>`` columns), always every
    column from one record: the newest quality row that has the headline figure. A performance row's own
    quality figures win. Quality rows themselves stay in the frame.
    """
    out = df.copy()
    out[MERGED] = False
    if out.empty:
        return out
    is_q = _is_quality_row(out)
    if "status" in out.columns:
        is_q &= out["status"].fillna("ok").eq("ok")
    if not is_q.any():
        return out
    keyf = lambda frame: pd.Series(list(zip(*(frame[k].fillna("\0").astype(str) for k in GROUP_KEYS))),  # noqa: E731
                                   index=frame.index)
    keys = keyf(out)
    created = out["created_at"] if "created_at" in out.columns else pd.Series(None, index=out.index)
    dyn = [k for k in out.columns if is_dynamic_quality_key(str(k))]
    groups = (
        (PPL_GROUP, [k for k in dyn if str(k).startswith("ppl:")]),
        (ACC_GROUP, [k for k in dyn if not str(k).startswith("ppl:")]),
    )
    sources: dict[Any, list[str]] = {}
    for group, extra in groups:
        cols = [k for k in (*group, *extra) if k in out.columns]
        head = group[0]
        q = out[is_q & out[head].notna()]
        if q.empty:
            continue
        order = created.loc[q.index].fillna("").astype(str).sort_values(kind="stable").index
        newest = {key: i for key, i in zip(keys.loc[order], order)}  # last wins: the newest
        for i in out.index[~is_q & out[head].isna()]:
            src = newest.get(keys.loc[i])
            if src is None:
                continue
            for k in cols:
                if pd.isna(out.at[i, k]) and pd.notna(out.at[src, k]):
                    out.at[i, k] = out.at[src, k]
            out.at[src, MERGED] = True
            cell = out.at[src, "cell_id"] if "cell_id" in out.columns else None
            if cell is not None and cell not in sources.setdefault(i, []):
                sources[i].append(str(cell))
    if "quality_cell" in out.columns:
        for i, cells in sources.items():
            out.at[i, "quality_cell"] = ", ".join(cells)
    return out


def pareto_front(df: pd.DataFrame, axes: list[tuple[str, bool]]) -> pd.Series:
    """Bool per row: on the Pareto front of ``axes`` [(column key, maximize), ...] (2 or 3 axes).

    Rows with NaN / inf / a missing column on any axis are never on the front and never dominate.
    A row is dominated when another is at least as good on every axis and better on one, so
    equal points are all on the front.
    """
    axes = list(axes)
    if not 1 <= len(axes) <= 3:
        raise ValueError(f"pareto_front wants 2 or 3 axes, got {len(axes)}")
    n = len(df)
    if n == 0:
        return pd.Series([], index=df.index, dtype=bool)
    cols = []
    for key, maximize in axes:
        if key not in df.columns:
            return pd.Series(False, index=df.index, dtype=bool)
        v = pd.to_numeric(df[key], errors="coerce").to_numpy(dtype="float64", na_value=np.nan)
        cols.append(-v if maximize else v)  # minimize every axis
    a = np.column_stack(cols)
    valid = np.isfinite(a).all(axis=1)
    on = np.zeros(n, dtype=bool)
    pts = a[valid]
    if len(pts):
        dominated = np.zeros(len(pts), dtype=bool)
        step = max(1, 2_000_000 // max(1, len(pts) * len(axes)))
        for s in range(0, len(pts), step):
            blk = pts[s : s + step][:, None, :]  # candidates i
            le = (pts[None, :, :] <= blk).all(axis=2)  # j at least as good as i everywhere
            lt = (pts[None, :, :] < blk).any(axis=2)  # j strictly better somewhere
            dominated[s : s + step] = (le & lt).any(axis=1)
        on[np.flatnonzero(valid)] = ~dominated
    return pd.Series(on, index=df.index, dtype=bool)


def _as_set(values: Any) -> set[str] | None:
    if values is None:
        return None
    if isinstance(values, str):
        values = [values]
    return {str(v) for v in values if v is not None}  # empty: nothing allowed


def filter_frame(
    df: pd.DataFrame,
    systems: Iterable[str] | None = None,
    models: Iterable[str] | None = None,
    hardware: Iterable[str] | None = None,
    precisions: Iterable[str] | None = None,
    loads: Iterable[str] | None = None,
    search: str | None = None,
    workloads: Iterable[str] | None = None,
    ppl_sets: Iterable[str] | None = None,
    acc_sets: Iterable[str] | None = None,
) -> pd.DataFrame:
    """Rows whose system / model / hardware / precision / load / workload / PPL set / accuracy set is
    among the given values (None: no filter on that column; an empty list: nothing is allowed, so no
    rows) and, when ``search`` is given, where any string column contains it (case-insensitive
    substring)."""
    mask = pd.Series(True, index=df.index)
    for key, values in (("system", systems), ("model", models), ("hardware", hardware), ("precision", precisions),
                        ("load", loads), ("workload", workloads), ("ppl_set", ppl_sets), ("acc_set", acc_sets)):
        allowed = _as_set(values)
        if allowed is not None and key in df.columns:
            mask &= df[key].map(lambda v: v is not None and not (isinstance(v, float) and math.isnan(v)) and str(v) in allowed)
    if search and search.strip():
        needle = search.strip().casefold()
        hit = pd.Series(False, index=df.index)
        for key in [c.key for c in columns() if c.dtype == "str" and c.key in df.columns]:
            hit |= df[key].map(lambda v: isinstance(v, str) and needle in v.casefold())
        mask &= hit
    return df[mask]


def choices(df: pd.DataFrame, key: str) -> list[str]:
    """Sorted distinct non-missing values of a string column (for filter widgets)."""
    if key not in df.columns:
        return []
    return sorted({str(v) for v in df[key] if isinstance(v, str) and v})


# ---------------------------------------------------------------- display and export


def display_frame(df: pd.DataFrame, keys: list[str] | None = None, na: bool = True,
                  compact: bool = False) -> pd.DataFrame:
    """``df`` restricted to ``keys`` (default: the default-visible columns; keys absent from ``df``
    are left out), figures scaled (utilizations in %) and rounded for display, Accuracy with its
    standard error (``0.850 ± 0.036``) where the row has one, a figure of a record measured with
    repetitions with the interval of its median (``1304.4 [1290.2–1311.0]``), a missing figure as
    ``n/a (why)`` (with ``na``; the reason from the record), columns renamed to their labels with units.
    ``compact`` (a phone's table): no standard error or interval, and a missing figure is a bare ``n/a``."""
    keys = default_keys() if keys is None else list(keys)
    keys = [k for k in keys if k in df.columns]
    out = df[keys].copy()
    why = df[WHY] if WHY in df.columns else pd.Series([{}] * len(df), index=df.index)
    for k in keys:
        col = column(k)
        if col.dtype == "str":
            continue
        if col.dtype == "float" or pd.api.types.is_float_dtype(out[k]):
            vals = (pd.to_numeric(out[k], errors="coerce").astype("float64") * col.scale).round(col.decimals)
        else:
            vals = out[k]
        ivs = df[INTERVALS] if INTERVALS in df.columns else None
        if not compact and ivs is not None and col.dtype == "float" and any(k in (v or {}) for v in ivs):
            fmt = lambda x: f"{x * col.scale:.{col.decimals}f}"  # noqa: E731
            vals = pd.Series([
                (f"{fmt(v / col.scale)} [{fmt(iv[k][0])}–{fmt(iv[k][1])}]" if k in (iv or {}) else v)
                if pd.notna(v) else None for v, iv in zip(vals, ivs)
            ], index=out.index, dtype=object)
        if k == "accuracy" and not compact and "accuracy_stderr" in df.columns and df["accuracy_stderr"].notna().any():
            se = pd.to_numeric(df["accuracy_stderr"], errors="coerce")
            vals = pd.Series([
                (f"{v:.{col.decimals}f} ± {e:.{col.decimals}f}" if pd.notna(e) else f"{v:.{col.decimals}f}")
                if pd.notna(v) else None for v, e in zip(vals, se)
            ], index=out.index, dtype=object)
        if na and vals.isna().any():
            vals = vals.astype(object).where(vals.notna(), [
                f"n/a ({w.get(k, 'no quality run' if is_dynamic_quality_key(str(k)) else 'not in record')})"
                if isinstance(w, dict) and not compact else "n/a" for w in why
            ])
        out[k] = vals
    return out.rename(columns={k: column(k).header for k in keys})


def to_csv(df: pd.DataFrame) -> str:
    """CSV text of ``df`` (full precision, no index); text cells neutralised against spreadsheet formula
    injection (:func:`moecap.report.csv_safe`)."""
    from moecap.report import csv_safe

    out = df.drop(columns=[k for k in PRIVATE if k in df.columns])
    for col in out.columns:
        if out[col].dtype == object or pd.api.types.is_string_dtype(out[col]):
            out[col] = out[col].map(lambda v: csv_safe(v) if isinstance(v, str) else v)
    return out.to_csv(index=False)


__all__ = [
    "Column",
    "columns",
    "COLUMNS",
    "COLUMN_BY_KEY",
    "SCHEMA_VERSION",
    "columns_for",
    "column",
    "default_keys",
    "load_results",
    "merge_quality",
    "pareto_front",
    "filter_frame",
    "choices",
    "display_frame",
    "to_csv",
    "record_row",
    "system_name",
    "precision_label",
    "parse_hf_source",
    "empty_frame",
]
