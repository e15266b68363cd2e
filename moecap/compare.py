"""``moecap compare BASELINE CURRENT``: a regression gate between two sets of result records.

Cells are matched by suite name and ``cell_id`` (a content hash of the cell's configuration, so a match
is the same model, runner, workload and load). For every figure both records carry, the change is
judged against a per-metric noise threshold in the metric's bad direction (lower throughput, higher
latency, ...). Run-to-run noise is the enemy of such a gate, so where both records keep their
per-pass or per-request traces (``passes.jsonl``, ``requests.jsonl``) a change beyond the threshold is
a regression only when the samples behind the figure moved significantly beyond it too: a bootstrap
confidence interval of the ratio current/baseline of the samples' statistic (the one the figure
follows: the median for a median, p99 for p99, the mean pass time for a throughput) must lie wholly
past the threshold in the bad direction. Samples are paired (pass by pass, request by request) when
both runs ran the same passes or requests, which removes the spread between prefill and decode passes
or between prompt lengths from the test. One slow pass can drag a run's throughput past the
threshold; the bootstrap then sees that the shift rests on that one pass and calls it noise.
Accuracy is judged on an absolute threshold widened to the binomial standard error of the difference
where the record has it; perplexity and other figures without samples on the threshold alone. The
report says which basis each verdict used.

Exit status: 0 no gated finding; 1 a gated regression of a figure; 3 no regression, but the comparison
is incomplete, which the gate treats as a failure too (it fails closed): a cell missing from current or
only in current, a cell that failed or is not ok now, or a record file that cannot be read on either
side; 2 bad input (a missing path, no records, no cell in common); 4 an internal error of moecap compare
(a bug: the message says so, never a traceback).

Only numpy is needed (imported on first use): ``import moecap.compare`` stays light.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import Any, Callable, Sequence

from moecap.figures import dig
from moecap.figures import number as _number
from moecap.records import Record, scan_records

log = logging.getLogger(__name__)

# a bootstrap needs this many samples (pairs, or on each side) before it may call a shift significant:
# with 5 pairs all slower, even an exact sign test stops at 97 % one-sided confidence (2**-5 > 0.025),
# and a percentile bootstrap over so few samples is overconfident; below it, the threshold alone decides
MIN_SAMPLES = 6
# the bootstrap resamples at most this many samples (a deterministic subset of larger sets)
MAX_BOOTSTRAP_SAMPLES = 20_000

OK, IMPROVED, NEW, NOISE, REPORTED, REGRESSION, MISSING = (
    "ok", "improved", "new", "noise", "reported", "regression", "missing")
ICONS = {OK: "✅", IMPROVED: "✅", NEW: "✅", NOISE: "⚠️", REPORTED: "⚠️", MISSING: "⚠️",
         REGRESSION: "❌"}
VERDICT_TEXT = {
    OK: "within threshold",
    IMPROVED: "improved",
    NEW: "only in current",
    NOISE: "beyond threshold, not significant",
    REPORTED: "regression (not gated)",
    MISSING: "missing in current",
    REGRESSION: "regression",
}


EXIT_REGRESSION, EXIT_BAD_INPUT, EXIT_INCOMPLETE, EXIT_INTERNAL = 1, 2, 3, 4
# cell statuses that fail the gate on their own: the current side cannot vouch for the cell
INCOMPLETE = ("failed_now", "not_ok_now", "only_baseline", "only_current", "unreadable")


class CompareInputError(Exception):
    """Bad input (exit status 2): the message names the path and what was expected."""


# --------------------------------------------------------------------------------------------------
# metrics: where each figure lives, which way is better, how much noise to expect


@dataclass(frozen=True)
class MetricSpec:
    """One comparable figure of a record.

    ``threshold`` is relative (0.05 = 5 %) unless ``absolute`` (then in the figure's unit; accuracy is
    a fraction, so 0.02 = 2 points). ``samples`` lists, in order of preference, the trace samples that
    back a significance test and the statistic of them the figure follows; every sample is a time, so
    a larger statistic is always the bad direction, whichever way the figure itself is better.
    """

    name: str  # `moecap report`'s column name where it has one
    groups: tuple[str, ...]  # names --gate/--threshold accept for a family of metrics
    higher_is_better: bool
    threshold: float
    gated: bool = False
    absolute: bool = False
    path: tuple[str, ...] = ()  # into record.report
    getter: Callable[[Record, dict[str, Any]], Any] | None = None  # when a path is not enough
    samples: tuple[tuple[str, str], ...] = ()  # ((source, statistic), ...)
    description: str = ""


def _groups(f: Any) -> tuple[str, ...]:
    """Names --gate/--threshold accept for a figure's family: the family, and its sub-family (``ttft_ms``,
    ``decode_pass_ms``, ``s_mbu``, ``goodput``)."""
    sub: tuple[str, ...] = ()
    if f.family in ("latency", "pass_latency"):
        sub = (f.path[1],)
    elif f.family == "utilization":
        sub = (f.path[-1],)
    elif f.key.startswith("goodput"):
        sub = ("goodput",)
    return (f.family, *sub)


def static_metrics() -> list[MetricSpec]:
    """The comparable figures of the figure table (``moecap.figures``: read at call time), those with a
    threshold, in the table's order."""
    from moecap import figures

    return [MetricSpec(f.key, _groups(f), bool(f.higher_is_better), f.threshold, gated=f.gated,
                       absolute=f.absolute, path=f.path, getter=(lambda rec, report, f=f: f.value(report)),
                       samples=f.samples, description=f.description)
            for f in figures.table() if f.threshold is not None and f.higher_is_better is not None]


def static_by_name() -> dict[str, MetricSpec]:
    return {s.name: s for s in static_metrics()}


def __getattr__(name: str) -> Any:  # the old constant names follow the figure table
    if name == "STATIC_METRICS":
        return static_metrics()
    if name == "STATIC_BY_NAME":
        return static_by_name()
    if name == "GROUPS":
        return groups()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


PERPLEXITY_THRESHOLD = 0.01
ACCURACY_THRESHOLD = 0.02  # absolute: 2 points
LM_EVAL_OTHER_THRESHOLD = 0.01  # lm-eval figures that are not fractions (word perplexity, ...): relative
QUALITY_GROUPS = ("quality", "perplexity", "accuracy", "lm_eval")


def groups() -> list[str]:
    return sorted({g for s in static_metrics() for g in s.groups} | set(QUALITY_GROUPS))


GATE_KEYWORDS = ("default", "all", "none")


def _perplexity_spec(dataset: str) -> MetricSpec:
    return MetricSpec(f"ppl:{dataset}", ("quality", "perplexity"), False, PERPLEXITY_THRESHOLD, gated=True,
                      path=("quality", "perplexity", dataset, "perplexity"),
                      description=f"token perplexity on {dataset} (deterministic for a given model and data)")


def _lm_eval_spec(task: str, metric: str, higher: bool, fraction: bool) -> MetricSpec:
    if fraction and higher:
        return MetricSpec(f"{task}:{metric}", ("quality", "accuracy", "lm_eval"), True, ACCURACY_THRESHOLD,
                          gated=True, absolute=True, path=("quality", "lm_eval", "tasks", task, "metrics", metric),
                          description=f"lm-eval {task} {metric} (absolute, widened to the standard error)")
    return MetricSpec(f"{task}:{metric}", ("quality", "lm_eval"), higher, LM_EVAL_OTHER_THRESHOLD, gated=True,
                      path=("quality", "lm_eval", "tasks", task, "metrics", metric),
                      description=f"lm-eval {task} {metric}")


@dataclass
class Figure:
    """One figure of one record, with what the accuracy bound needs."""

    spec: MetricSpec
    value: float
    stderr: float | None = None
    n: int | None = None


def record_figures(rec: Record) -> dict[str, Figure]:
    """Every comparable figure of ``rec`` by metric name (figures that are absent or not finite are left out)."""
    from moecap import figures

    report = rec.report or {}
    out: dict[str, Figure] = {}
    for spec in static_metrics():
        v = _number(spec.getter(rec, report) if spec.getter else dig(report, spec.path))
        if v is not None:
            out[spec.name] = Figure(spec, v)
    for key, (v, stderr, info) in figures.quality_values(report).items():
        if key.startswith("ppl:"):
            out[key] = Figure(_perplexity_spec(info["dataset"]), v)
            continue
        task, _, metric = key.partition(":")
        spec = _lm_eval_spec(task, metric, info["higher_is_better"], 0.0 <= v <= 1.0)
        out[spec.name] = Figure(spec, v, stderr, info.get("n"))
    return out


# --------------------------------------------------------------------------------------------------
# settings: which metrics gate, and at what threshold


def _canon(pattern: str) -> str:
    """Patterns are case-insensitive and take ``median`` for ``p50`` (older figure names)."""
    return pattern.strip().lower().replace("median", "p50")


def _matches(pattern: str, spec: MetricSpec) -> bool:
    p = _canon(pattern)
    return fnmatch.fnmatchcase(spec.name.lower(), p) or any(fnmatch.fnmatchcase(g, p) for g in spec.groups)


def _selects(pattern: str, spec: MetricSpec) -> bool:
    """A --gate/--no-gate pattern, keywords included: all, none, default (each metric's own default)."""
    if pattern in GATE_KEYWORDS:
        return pattern == "all" or (pattern == "default" and spec.gated)
    return _matches(pattern, spec)


def _known_pattern(pattern: str) -> bool:
    """Whether a --gate/--threshold pattern can name a metric: a static one, a group, or a quality figure
    (``ppl:<dataset>``, ``<task>:<metric>``: their names come from the records)."""
    p = _canon(pattern)
    if ":" in p or any(fnmatch.fnmatchcase(g, p) for g in groups()):
        return True
    return any(fnmatch.fnmatchcase(s.name, p) for s in static_metrics())


def _unknown_metric_message(pattern: str) -> str:
    examples = ", ".join(s.name for s in static_metrics()[:4])
    return (f"unknown metric {pattern!r}; expected a metric name or pattern ({examples}, "
            f"ttft_ms_p99, ...; `moecap compare --list-metrics` lists them all), a group ({', '.join(groups())}), "
            f"or a quality figure (ppl:<dataset>, <task>:<metric>)")


def parse_threshold(text: str) -> tuple[str, float]:
    """``METRIC=PCT`` (argparse type): a metric, pattern or group, and a percentage (points for accuracy)."""
    metric, sep, value = text.partition("=")
    metric, value = metric.strip(), value.strip()
    if not sep or not metric or not value:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected METRIC=PCT, e.g. output_tokens_per_s=5 (percent) or accuracy=3 (points)")
    if not _known_pattern(metric):
        raise argparse.ArgumentTypeError(f"{text!r}: {_unknown_metric_message(metric)}")
    try:
        pct = float(value[:-1] if value.endswith("%") else value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: {value!r} is not a number; expected METRIC=PCT, e.g. {metric}=5") from None
    if not math.isfinite(pct) or pct < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: the threshold must be a finite percentage >= 0, got {value}")
    return metric, pct / 100.0


def parse_gate(text: str) -> str:
    """A --gate/--no-gate pattern (argparse type): a metric, pattern, group, or default/all/none."""
    if _canon(text) in GATE_KEYWORDS:
        return _canon(text)
    if not text.strip() or not _known_pattern(text):
        raise argparse.ArgumentTypeError(f"{text!r}: {_unknown_metric_message(text)}, or one of default, all, none")
    return text.strip()


@dataclass
class Settings:
    """What the command line chose; defaults are each metric's own."""

    thresholds: list[tuple[str, float]] = field(default_factory=list)  # applied in order, the last match wins
    gate: list[str] | None = None  # None: each metric's default
    no_gate: list[str] = field(default_factory=list)
    confidence: float = 0.95
    resamples: int = 2000
    seed: int = 0
    noise_factor: float = 2.0  # with --history: the threshold is at least this times the run-to-run spread

    def threshold(self, spec: MetricSpec) -> float:
        thr = spec.threshold
        for pattern, value in self.thresholds:
            if _matches(pattern, spec):
                thr = value
        return thr

    def gated(self, spec: MetricSpec) -> bool:
        on = spec.gated if self.gate is None else any(_selects(p, spec) for p in self.gate)
        return on and not any(_selects(p, spec) for p in self.no_gate)

    def describe(self) -> dict[str, Any]:
        return {"thresholds": [f"{p}={v * 100:g}" for p, v in self.thresholds],
                "gate": self.gate if self.gate is not None else ["default"], "no_gate": self.no_gate,
                "confidence": self.confidence, "resamples": self.resamples, "seed": self.seed,
                "min_samples": MIN_SAMPLES, "noise_factor": self.noise_factor}


# --------------------------------------------------------------------------------------------------
# samples from the traces, and the significance test


@dataclass
class Samples:
    """Times (seconds) of one kind, one per independent unit, keyed for pairing across runs."""

    values: list[float]
    keys: list[tuple[Any, ...]]
    unit: str  # "passes", "decode passes", "request timelines", "ITLs", ...


def _read_jsonl(path: Path) -> list[dict[str, Any]] | None:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return None
    rows = []
    for line in text.splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError:
                return None
    return rows


def _pass_samples(rows: list[dict[str, Any]]) -> dict[str, Samples]:
    """Pass times: all passes (a static batch's duration is the sum of its passes), and per phase."""
    out: dict[str, Samples] = {}
    for source, phase in (("passes", None), ("prefill_passes", "prefill"), ("decode_passes", "decode")):
        vals, keys = [], []
        for r in rows:
            t = _number(r.get("time_s"))
            if t is None and _number(r.get("end_s")) is not None and _number(r.get("start_s")) is not None:
                t = r["end_s"] - r["start_s"]
            if t is None or (phase is not None and r.get("phase") != phase):
                continue
            vals.append(t)
            keys.append((r.get("index"), r.get("phase"), tuple(r.get("new_tokens") or ())))
        out[source] = Samples(vals, keys, "passes" if phase is None else f"{phase} passes")
    return out


def _request_samples(rows: list[dict[str, Any]]) -> dict[str, Samples]:
    """TTFT, TPOT, E2EL per request and the ITLs, as the record's latency figures define them.

    Requests of one static batch share one timeline (sent together, tokens from the same passes): they
    are one observation, not many, so identical timelines count once (exact for moecap's workloads,
    whose requests all produce their fixed output length).
    """
    seen: set[tuple[Any, ...]] = set()
    out = {k: Samples([], [], u) for k, u in (("ttft", "request timelines"), ("tpot", "request timelines"),
                                              ("e2el", "request timelines"), ("itl", "ITLs"))}
    for r in sorted(rows, key=lambda r: r.get("id") if isinstance(r.get("id"), int) else -1):
        times = r.get("token_times_s") or []
        send = _number(r.get("send_s"))
        if r.get("error") or not times or send is None:
            continue
        timeline = (send, tuple(times))
        if timeline in seen:
            continue
        seen.add(timeline)
        key = (r.get("id"), r.get("input_tokens"), len(times))
        # the chunks the client received (ITL is one gap per chunk, vLLM's definition); rows written
        # before chunks were recorded, and in-process runners, have one token per chunk
        chunks = r.get("chunk_times_s") or times
        ttft, e2el = chunks[0] - send, chunks[-1] - send
        out["ttft"].values.append(ttft)
        out["ttft"].keys.append(key)
        out["e2el"].values.append(e2el)
        out["e2el"].keys.append(key)
        if len(times) > 1:
            out["tpot"].values.append((e2el - ttft) / (len(times) - 1))
            out["tpot"].keys.append(key)
        for j, (a, b) in enumerate(zip(chunks, chunks[1:])):
            out["itl"].values.append(b - a)
            out["itl"].keys.append((*key, j))
    return out


def record_samples(path: Path, rec: Record) -> tuple[dict[str, Samples], str | None]:
    """The samples of a record's artifacts (paths relative to the record's folder), or why there are none."""
    out: dict[str, Samples] = {}
    missing = []
    for name, parse in (("passes", _pass_samples), ("requests", _request_samples)):
        rel = (rec.artifacts or {}).get(name)
        if not rel:
            continue
        rows = _read_jsonl(path.parent / rel)
        if rows is None:
            missing.append(str(path.parent / rel))
            continue
        out.update(parse(rows))
    if missing:
        return out, f"artifact not readable: {', '.join(missing)}"
    return out, (None if out else "no per-pass or per-request artifacts")


def _count(n: int, unit: str) -> str:
    if n == 1:
        unit = unit.replace("passes", "pass").replace("timelines", "timeline").replace("ITLs", "ITL")
    return f"{n} {unit}"


@dataclass
class ShiftTest:
    """Did the samples behind a figure move? ``ratio`` is current/baseline of the statistic of the times
    (> 1: slower, the bad direction for every metric), with its bootstrap confidence interval."""

    source: str
    statistic: str
    unit: str
    paired: bool
    n_base: int
    n_cur: int
    tested: bool
    ratio: float | None = None
    lo: float | None = None
    hi: float | None = None
    confidence: float = 0.95
    reason: str | None = None

    def beyond(self, bound: float) -> bool:
        """Significantly beyond ``bound`` (a time ratio): the whole interval above it."""
        return self.tested and self.lo is not None and self.lo > bound

    def describe(self, bound: float | None = None) -> str:
        if not self.tested:
            return f"threshold only: {self.reason}"
        what = _count(self.n_base, self.unit) if self.paired else f"{self.n_base} vs {_count(self.n_cur, self.unit)}"
        text = (f"{'paired ' if self.paired else ''}bootstrap over {what}: {self.statistic} time ×{self.ratio:.3f} "
                f"({self.confidence:.0%} CI {self.lo:.3f}–{self.hi:.3f})")
        if bound is not None:
            text += (f", significantly beyond the threshold (×{bound:.3f})" if self.beyond(bound)
                     else f", not significantly beyond the threshold (×{bound:.3f})")
        return text

    def to_dict(self, bound: float | None = None) -> dict[str, Any]:
        return {"source": self.source, "statistic": self.statistic, "unit": self.unit, "paired": self.paired,
                "n_baseline": self.n_base, "n_current": self.n_cur, "tested": self.tested,
                "time_ratio": self.ratio, "ci": [self.lo, self.hi] if self.tested else None,
                "confidence": self.confidence, "threshold_time_ratio": bound,
                "significant": self.beyond(bound) if bound is not None else None, "reason": self.reason}


def _statistic(x: Any, statistic: str) -> Any:
    import numpy as np

    if statistic == "mean":
        return x.mean(axis=-1)
    if statistic == "median":
        return np.median(x, axis=-1)
    if statistic.startswith("p") and statistic[1:].isdigit():
        return np.percentile(x, float(statistic[1:]), axis=-1)  # linear, as metrics.latency.percentile
    raise ValueError(f"unknown statistic {statistic!r}")


def shift_test(base: Samples, cur: Samples, statistic: str, source: str = "", confidence: float = 0.95,
               resamples: int = 2000, seed: int = 0) -> ShiftTest:
    """Bootstrap the ratio current/baseline of ``statistic`` over the samples.

    Paired (resampling units with their counterparts) when both sides have the same keys, i.e. ran the
    same passes or requests; else each side is resampled on its own. Deterministic for a seed. Fewer
    than MIN_SAMPLES units on a side are not tested: the verdict then rests on the threshold alone.
    Whether the shift is significant depends on the metric's threshold: see ``ShiftTest.beyond``.
    """
    import numpy as np

    paired = bool(base.keys) and base.keys == cur.keys
    t = ShiftTest(source, statistic, base.unit, paired, len(base.values), len(cur.values), False, confidence=confidence)
    if min(t.n_base, t.n_cur) < MIN_SAMPLES:
        t.reason = (f"{t.n_base} vs {_count(t.n_cur, base.unit)}, too few to test (need {MIN_SAMPLES} a side)"
                    if not paired else f"{_count(t.n_base, base.unit)}, too few to test (need {MIN_SAMPLES})")
        return t
    b, c = np.asarray(base.values, dtype=float), np.asarray(cur.values, dtype=float)
    sb, sc = float(_statistic(b, statistic)), float(_statistic(c, statistic))
    if not sb > 0:
        t.reason = f"the baseline's {statistic} {base.unit} time is {sb:g}: no ratio"
        return t
    rng = np.random.default_rng(seed)
    if paired and len(b) > MAX_BOOTSTRAP_SAMPLES:
        keep = np.sort(rng.choice(len(b), MAX_BOOTSTRAP_SAMPLES, replace=False))
        b, c = b[keep], c[keep]
    elif not paired:
        if len(b) > MAX_BOOTSTRAP_SAMPLES:
            b = b[np.sort(rng.choice(len(b), MAX_BOOTSTRAP_SAMPLES, replace=False))]
        if len(c) > MAX_BOOTSTRAP_SAMPLES:
            c = c[np.sort(rng.choice(len(c), MAX_BOOTSTRAP_SAMPLES, replace=False))]
    chunk = max(1, 2_000_000 // max(len(b), len(c)))
    ratios = []
    with np.errstate(divide="ignore", invalid="ignore"):
        for start in range(0, resamples, chunk):
            k = min(chunk, resamples - start)
            if paired:
                idx = rng.integers(0, len(b), (k, len(b)))
                rb, rc = _statistic(b[idx], statistic), _statistic(c[idx], statistic)
            else:
                rb = _statistic(b[rng.integers(0, len(b), (k, len(b)))], statistic)
                rc = _statistic(c[rng.integers(0, len(c), (k, len(c)))], statistic)
            ratios.append(np.where(rb > 0, rc / rb, np.inf))
    r = np.concatenate(ratios)
    alpha = 1.0 - confidence
    lo, hi = np.quantile(r, [alpha / 2, 1 - alpha / 2])
    t.tested, t.ratio, t.lo, t.hi = True, sc / sb, float(lo), float(hi)
    return t


# --------------------------------------------------------------------------------------------------
# comparing


@dataclass
class MetricResult:
    name: str
    description: str
    higher_is_better: bool
    gated: bool
    absolute: bool
    baseline: float | None
    current: float | None
    change: float | None  # relative (fraction) or absolute (the figure's unit)
    threshold: float  # as applied (accuracy: widened to the standard error)
    verdict: str
    basis: str
    test: ShiftTest | None = None
    bound: float | None = None  # the threshold as a ratio of the samples' times

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.name, "description": self.description,
                "direction": "higher_is_better" if self.higher_is_better else "lower_is_better",
                "gated": self.gated, "baseline": self.baseline, "current": self.current,
                "change": self.change, "change_kind": "absolute" if self.absolute else "relative",
                "threshold": self.threshold, "verdict": self.verdict, "icon": ICONS[self.verdict],
                "basis": self.basis, "significance": self.test.to_dict(self.bound) if self.test else None}


@dataclass
class CellResult:
    suite: str
    cell_id: str
    description: str
    # compared | failed_now | not_ok_now | baseline_not_ok | only_baseline | only_current | unreadable
    status: str
    baseline_path: str | None = None
    current_path: str | None = None
    note: str | None = None
    metrics: list[MetricResult] = field(default_factory=list)

    @property
    def regressions(self) -> list[MetricResult]:
        return [m for m in self.metrics if m.verdict == REGRESSION]

    @property
    def failing(self) -> bool:
        return self.incomplete or bool(self.regressions)

    @property
    def incomplete(self) -> bool:
        """A gated finding about the cell itself rather than its figures (exit status 3)."""
        return self.status in INCOMPLETE

    def to_dict(self) -> dict[str, Any]:
        return {"suite": self.suite, "cell_id": self.cell_id, "description": self.description,
                "status": self.status, "failing": self.failing, "baseline": self.baseline_path,
                "current": self.current_path, "note": self.note, "metrics": [m.to_dict() for m in self.metrics]}


@dataclass
class Comparison:
    baseline: str
    current: str
    n_baseline: int
    n_current: int
    settings: Settings
    cells: list[CellResult]
    notes: list[str] = field(default_factory=list)

    @property
    def exit_status(self) -> int:
        if any(c.regressions for c in self.cells):
            return EXIT_REGRESSION
        return EXIT_INCOMPLETE if any(c.incomplete for c in self.cells) else 0

    def to_dict(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for c in self.cells:
            counts[c.status] = counts.get(c.status, 0) + 1
        return {"baseline": self.baseline, "current": self.current, "records": {"baseline": self.n_baseline,
                "current": self.n_current}, "exit_status": self.exit_status,
                "gated_regressions": sum(len(c.regressions) for c in self.cells),
                "cells_failed_now": sum(c.status == "failed_now" for c in self.cells), "cell_counts": counts,
                "settings": self.settings.describe(), "notes": self.notes, "cells": [c.to_dict() for c in self.cells]}


def _describe_cell(rec: Record) -> str:
    from moecap.report import record_row

    row = record_row(rec)
    return " · ".join(str(row[k]) for k in ("model", "runner", "workload", "load") if row.get(k))


def _index(root: str | Path, side: str) -> tuple[dict[tuple[str, str], tuple[Path, Record]], int, list[str],
                                                 list[tuple[Path, str]]]:
    """The records under ``root`` by (suite, cell_id), the newest where a cell appears twice; and the
    record files that cannot be read (path, why)."""
    path = Path(root)
    if not path.exists():
        raise CompareInputError(f"{side} {str(root)!r} does not exist: expected a record JSON file or a folder of "
                                f"records (e.g. results/quickstart, as `moecap run` writes them)")
    found, bad = scan_records(path)
    if not found and not bad:
        raise CompareInputError(f"{side} {str(root)!r} holds no moecap records: expected a record JSON file or a "
                                f"folder searched recursively for <cell_id>.json files with schema_version and cell_id "
                                f"(the output folder of `moecap run`)")
    index: dict[tuple[str, str], tuple[Path, Record]] = {}
    notes = []
    for p, rec in found:
        key = (str((rec.suite or {}).get("name") or "?"), rec.cell_id)
        if key in index:
            older, newer = sorted([index[key], (p, rec)], key=lambda pr: pr[1].created_at)
            notes.append(f"{side}: {key[0]}/{key[1]} appears twice; using {newer[0]} (newer than {older[0]})")
            index[key] = newer
        else:
            index[key] = (p, rec)
    return index, len(found), notes, bad


def _accuracy_threshold(fb: Figure, fc: Figure, floor: float, z: float) -> tuple[float, str]:
    """max(floor, z · SE of the difference): the record's standard errors, else binomial from n."""
    ses = []
    for f in (fb, fc):
        if f.stderr is not None:
            ses.append(f.stderr)
        elif f.n:
            ses.append(math.sqrt(max(f.value * (1 - f.value), 0.0) / f.n))
        else:
            return floor, f"threshold only: {floor * 100:g} pts (no standard error or sample count in the record)"
    bound = z * math.sqrt(ses[0] ** 2 + ses[1] ** 2)
    ns = "/".join(str(f.n) if f.n else "?" for f in (fb, fc))
    basis = (f"binomial standard error (n={ns}): threshold max({floor * 100:g} pts, {z:.2f}·SE = "
             f"{bound * 100:.1f} pts)")
    return max(floor, bound), basis


def time_ratio_bound(spec: MetricSpec, threshold: float) -> float:
    """A relative threshold on the figure as a bound on the ratio of the samples' times (> 1 is slower).

    A latency is a time: +10 % is a ratio of 1.10. A throughput or an S-MBU is work over time: -5 % is a
    time ratio of 1/0.95.
    """
    if not spec.higher_is_better:
        return 1.0 + threshold
    return 1.0 / (1.0 - threshold) if threshold < 1 else math.inf


def run_to_run_spread(values: Sequence[float]) -> float | None:
    """The largest relative deviation from their median among a figure's values in earlier runs of the
    same cell (the history and the baseline): how far identical runs of this cell wander on this machine.
    None with fewer than two values."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if len(vals) < 2:
        return None
    ordered = sorted(vals)
    mid = len(ordered) // 2
    med = ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
    if med == 0:
        return None
    return max(abs(v - med) for v in vals) / abs(med)


def compare_metric(name: str, fb: Figure | None, fc: Figure | None, sampling: "_CellSampling",
                   settings: Settings, history: Sequence[float] = ()) -> MetricResult:
    """The verdict on one figure: a regression when it moved beyond its threshold in the bad direction
    AND, when the traces allow a test, the samples behind it moved significantly beyond the threshold
    too (the bootstrap interval of their ratio lies wholly past it). Requiring the interval to clear the
    threshold, not merely 1, keeps a small but consistent drift (a busier machine) from turning an
    outlier-driven figure change into a failure."""
    spec = (fb or fc).spec  # type: ignore[union-attr]
    gated = settings.gated(spec)
    thr = settings.threshold(spec)
    base = fb.value if fb else None
    cur = fc.value if fc else None
    noise_note = ""
    if not spec.absolute and history and fb is not None:
        # run-to-run noise, seen in earlier runs of this cell: within-run samples cannot show a shift that
        # moves a whole run (another tenant on the machine, clocks, memory placement)
        spread = run_to_run_spread([*history, base])
        if spread is not None:
            allowance = settings.noise_factor * spread
            noise_note = (f"; run-to-run spread over {len(history) + 1} earlier runs ±{spread * 100:.1f}%"
                          + (f" widens the threshold to {settings.noise_factor:g}× that" if allowance > thr else ""))
            thr = max(thr, allowance)
    bound = None if spec.absolute else time_ratio_bound(spec, thr)

    def result(verdict: str, change: float | None, basis: str, test: ShiftTest | None = None) -> MetricResult:
        return MetricResult(name, spec.description, spec.higher_is_better, gated, spec.absolute, base, cur,
                            change, thr, verdict, basis + noise_note, test, bound)

    if fb is None:
        return result(NEW, None, "no baseline figure")
    if fc is None:  # same configuration, and the figure is gone: something stopped measuring it
        return result(REGRESSION if gated else MISSING, None, "the current record has no such figure")
    test: ShiftTest | None = None
    if spec.absolute:  # accuracy: the standard error is the noise bound
        change = cur - base
        z = NormalDist().inv_cdf(1 - (1 - settings.confidence) / 2)
        thr, basis = _accuracy_threshold(fb, fc, thr, z)
    else:
        change = (cur - base) / abs(base) if base != 0 else (0.0 if cur == 0 else math.copysign(math.inf, cur))
        test = sampling.test(spec)
        basis = test.describe(bound) if isinstance(test, ShiftTest) else sampling.why_untested(spec)
    worse_by = -change if spec.higher_is_better else change
    if worse_by <= thr:
        return result(IMPROVED if -worse_by > thr else OK, change, basis, test)
    if test is not None and test.tested and not test.beyond(bound):  # type: ignore[arg-type]
        return result(NOISE, change, basis, test)
    return result(REGRESSION if gated else REPORTED, change, basis, test)


class _CellSampling:
    """The samples of one matched pair of records, and their tests (one per source and statistic)."""

    def __init__(self, pb: Path, rb: Record, pc: Path, rc: Record, settings: Settings):
        self.settings = settings
        self.base, why_b = record_samples(pb, rb)
        self.cur, why_c = record_samples(pc, rc)
        self.why = why_b or why_c
        if why_b and why_c and why_b != why_c:
            self.why = f"baseline: {why_b}; current: {why_c}"
        elif why_b or why_c:
            self.why = f"{'baseline' if why_b else 'current'}: {why_b or why_c}"
        self._tests: dict[tuple[str, str], ShiftTest] = {}

    def test(self, spec: MetricSpec) -> ShiftTest | None:
        """The test of the first sample source both records have for ``spec`` (None: no samples)."""
        for source, statistic in spec.samples:
            sb, sc = self.base.get(source), self.cur.get(source)
            if sb is None or sc is None or not sb.values or not sc.values:
                continue
            key = (source, statistic)
            if key not in self._tests:
                s = self.settings
                self._tests[key] = shift_test(sb, sc, statistic, source, s.confidence, s.resamples, s.seed)
            return self._tests[key]
        return None

    def why_untested(self, spec: MetricSpec) -> str:
        if not spec.samples:
            return "threshold only: no per-sample trace behind this figure"
        sources = " or ".join(src.replace("_", " ") for src, _ in spec.samples)
        return f"threshold only: {self.why or 'no ' + sources + ' samples on both sides'}"


def compare_records(pb: Path, rb: Record, pc: Path, rc: Record, settings: Settings,
                    history: Sequence[Record] = ()) -> list[MetricResult]:
    """Every metric either record has, in the catalogue's order (then quality figures by name).
    ``history``: ok records of the same cell from earlier runs (their run-to-run spread widens thresholds)."""
    fbs, fcs = record_figures(rb), record_figures(rc)
    fhs = [record_figures(h) for h in history]
    sampling = _CellSampling(pb, rb, pc, rc, settings)
    static = static_metrics()
    names = [s.name for s in static if s.name in fbs or s.name in fcs]
    names += sorted((set(fbs) | set(fcs)) - {s.name for s in static})
    return [compare_metric(name, fbs.get(name), fcs.get(name), sampling, settings,
                           [f[name].value for f in fhs if name in f]) for name in names]


def compare_paths(baseline: str | Path, current: str | Path, settings: Settings | None = None,
                  history: Sequence[str | Path] = ()) -> Comparison:
    """Match the cells of two result sets and judge every figure (raises CompareInputError on bad input).
    ``history``: result sets of earlier runs of the same suite, older than the baseline; each figure's
    threshold is at least ``settings.noise_factor`` times its run-to-run spread over them and the baseline."""
    settings = settings or Settings()
    base_index, n_base, notes, bad_base = _index(baseline, "baseline")
    cur_index, n_cur, notes_c, bad_cur = _index(current, "current")
    notes += notes_c
    past: dict[tuple[str, str], list[Record]] = {}
    for h in history:
        h_index, n_h, _, _ = _index(h, "history")
        used = 0
        for key, (_, rec) in h_index.items():
            if rec.status == "ok" and key in base_index:
                past.setdefault(key, []).append(rec)
                used += 1
        notes.append(f"history {str(h)!r}: {used} of {n_h} records match a baseline cell")
    if not set(base_index) & set(cur_index) and not (bad_cur and base_index):
        def suites(ix: dict[tuple[str, str], Any]) -> str:
            return ", ".join(sorted({k[0] for k in ix}))

        raise CompareInputError(
            f"no cell of current {str(current)!r} ({n_cur} records, suites: {suites(cur_index)}) matches a cell of "
            f"baseline {str(baseline)!r} ({n_base} records, suites: {suites(base_index)}): cells are matched by suite "
            f"name and cell_id, a hash of the cell's configuration, so both must come from the same suite with the "
            f"same models, runners, workloads and loads")
    cells: list[CellResult] = []
    unreadable_cur = {path.stem: (path, why) for path, why in bad_cur}
    for key in sorted(set(base_index) | set(cur_index)):
        suite, cell_id = key
        b = base_index.get(key)
        c = cur_index.get(key)
        rec = (c or b)[1]  # type: ignore[index]
        try:
            description = _describe_cell(rec)
        except Exception as err:  # an odd record: a finding about it, never a traceback
            description = f"(undescribable record: {type(err).__name__}: {err})"
        cell = CellResult(suite, cell_id, description, "compared",
                          str(b[0]) if b else None, str(c[0]) if c else None)
        if c is None and cell_id in unreadable_cur:
            path, why = unreadable_cur.pop(cell_id)
            cell.status, cell.current_path, cell.note = "unreadable", str(path), f"current record unreadable: {why}"
        elif b is None:
            cell.status, cell.note = "only_current", "no baseline record: nothing to compare against"
        elif c is None:
            cell.status, cell.note = "only_baseline", "not in current: the cell was not run"
        elif b[1].status != "ok":
            cell.status, cell.note = "baseline_not_ok", f"baseline status {b[1].status}: not compared"
        elif c[1].status == "failed":
            last = (c[1].error or "").strip().splitlines()[-1:] or ["no error recorded"]
            failure = (c[1].model_extra or {}).get("failure")  # {"kind": timeout | worker_died | ...}, newer records
            kind = f" ({failure['kind']})" if isinstance(failure, dict) and failure.get("kind") else ""
            cell.status, cell.note = "failed_now", f"ok in baseline, failed now{kind}: {last[0]}"
        elif c[1].status != "ok":
            cell.status, cell.note = "not_ok_now", f"ok in baseline, {c[1].status} now: not compared"
        else:
            try:
                cell.metrics = compare_records(b[0], b[1], c[0], c[1], settings, past.get(key, []))
            except Exception as err:  # a record the comparison cannot read: a finding, not a crash
                cell.status = "unreadable"
                cell.note = f"cannot compare these records: {type(err).__name__}: {' '.join(str(err).split())[:300]}"
        cells.append(cell)
    for side, items in (("current", unreadable_cur.values()), ("baseline", bad_base)):
        for path, why in items:
            cells.append(CellResult(path.parent.name, path.stem, "(unreadable record file)", "unreadable",
                                    str(path) if side == "baseline" else None,
                                    str(path) if side == "current" else None, f"{side} record unreadable: {why}"))
    # a pattern that names nothing in these records is most likely a typo: say so
    met = {spec.name: spec for c in cells if c.status == "compared" and c.metrics
           for rec in (base_index[(c.suite, c.cell_id)][1], cur_index[(c.suite, c.cell_id)][1])
           for spec in (f.spec for f in record_figures(rec).values())}
    for kind, patterns in (("--gate", settings.gate or []), ("--no-gate", settings.no_gate),
                           ("--threshold", [p for p, _ in settings.thresholds])):
        for p in patterns:
            if p not in GATE_KEYWORDS and not any(_matches(p, spec) for spec in met.values()):
                notes.append(f"{kind} {p!r} matched no metric of the compared records")
    return Comparison(str(baseline), str(current), n_base, n_cur, settings, cells, notes)


# --------------------------------------------------------------------------------------------------
# output


def _fmt_value(v: float | None) -> str:
    if v is None:
        return "–"
    if abs(v) >= 1e4:
        return f"{v:,.0f}"
    return f"{v:.4g}"


def _fmt_change(m: MetricResult) -> str:
    if m.change is None:
        return "–"
    if m.absolute:
        return f"{m.change * 100:+.1f} pts"
    if math.isinf(m.change):
        return "+∞" if m.change > 0 else "−∞"
    return f"{m.change * 100:+.1f}%"


def _fmt_threshold(m: MetricResult) -> str:
    sign = "−" if m.higher_is_better else "+"
    return f"{sign}{m.threshold * 100:.1f} pts" if m.absolute else f"{sign}{m.threshold * 100:g}%"


def _md_escape(s: str) -> str:
    return s.replace("|", "\\|")


def format_markdown(cmp: Comparison) -> str:
    lines = ["# moecap compare", ""]
    regs = [(c, m) for c in cmp.cells for m in c.regressions]
    failed = [c for c in cmp.cells if c.incomplete]
    if cmp.exit_status:
        parts = []
        if regs:
            parts.append(f"{len(regs)} gated regression{'s' if len(regs) != 1 else ''}")
        if failed:
            parts.append(f"{len(failed)} cell{'s' if len(failed) != 1 else ''} failed, missing, extra or unreadable")
        lines.append(f"**❌ {', '.join(parts)}** (exit status {cmp.exit_status})")
    else:
        lines.append("**✅ no gated finding** (exit status 0)")
    counts: dict[str, int] = {}
    for c in cmp.cells:
        counts[c.status] = counts.get(c.status, 0) + 1
    s = cmp.settings
    lines += [
        "",
        f"- baseline: `{cmp.baseline}` ({cmp.n_baseline} records); current: `{cmp.current}` ({cmp.n_current} records)",
        f"- cells: {counts.get('compared', 0)} compared, {counts.get('failed_now', 0)} failed now, "
        f"{counts.get('only_baseline', 0)} only in baseline, {counts.get('only_current', 0)} only in current, "
        f"{counts.get('baseline_not_ok', 0)} with a baseline that is not ok"
        + (f", {counts['not_ok_now']} not ok now" if counts.get("not_ok_now") else "")
        + (f", {counts['unreadable']} unreadable" if counts.get("unreadable") else ""),
        f"- a regression: the figure moved beyond its threshold in the bad direction and, where both records "
        f"have per-pass or per-request traces, the samples behind it moved significantly beyond the threshold "
        f"too: the bootstrap {s.confidence:.0%} CI of the ratio current/baseline of their statistic ({s.resamples} "
        f"resamples; paired pass by pass or request by request when both runs ran the same ones; at least "
        f"{MIN_SAMPLES} samples) lies wholly past the threshold; accuracy: an absolute threshold widened to the "
        f"standard error; figures without samples: the threshold alone (the basis column says which)",
        f"- gated metrics: {'each metric’s default' if s.gate is None else ', '.join(s.gate)}"
        + (f", except {', '.join(s.no_gate)}" if s.no_gate else "")
        + (f"; thresholds: {', '.join(f'{p}={v * 100:g}%' for p, v in s.thresholds)}" if s.thresholds else ""),
    ]
    for note in cmp.notes:
        lines.append(f"- note: {note}")
    if regs or failed:
        lines += ["", "## Gated findings", ""]
        for c in failed:
            lines.append(f"- ❌ {c.suite} · {c.description} (`{c.cell_id}`): {c.note}")
        for c, m in regs:
            lines.append(f"- ❌ {c.suite} · {c.description} (`{c.cell_id}`): {m.name} {_fmt_value(m.baseline)} → "
                         f"{_fmt_value(m.current)} ({_fmt_change(m)}, threshold {_fmt_threshold(m)})")
    for c in cmp.cells:
        if c.status != "compared":
            continue
        icon = "❌" if c.failing else ("⚠️" if any(ICONS[m.verdict] == "⚠️" for m in c.metrics) else "✅")
        lines += ["", f"## {icon} {c.suite} · {c.description}", "", f"`{c.cell_id}`", "",
                  "| metric | gated | baseline | current | change | threshold | verdict | basis |",
                  "|---|---|---|---|---|---|---|---|"]
        for m in c.metrics:
            lines.append(f"| {_md_escape(m.name)} | {'yes' if m.gated else ''} | {_fmt_value(m.baseline)} | "
                         f"{_fmt_value(m.current)} | {_fmt_change(m)} | {_fmt_threshold(m)} | "
                         f"{ICONS[m.verdict]} {VERDICT_TEXT[m.verdict]} | {_md_escape(m.basis)} |")
    others = [c for c in cmp.cells if c.status != "compared"]
    if others:
        lines += ["", "## Not compared", ""]
        icons = {"failed_now": "❌", "not_ok_now": "❌", "only_baseline": "❌", "only_current": "❌",
                 "unreadable": "❌", "baseline_not_ok": "ℹ️"}
        for c in others:
            lines.append(f"- {icons.get(c.status, '')} {c.suite} · {c.description} (`{c.cell_id}`): {c.note}")
    return "\n".join(lines) + "\n"


def format_json(cmp: Comparison) -> str:
    def clean(v: Any) -> Any:  # JSON has no inf/nan
        if isinstance(v, float) and not math.isfinite(v):
            return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean(cmp.to_dict()), indent=2, ensure_ascii=False) + "\n"


def list_metrics() -> str:
    from moecap.report import render_table

    rows = []
    for s in static_metrics():
        rows.append([s.name, ", ".join(s.groups), "higher" if s.higher_is_better else "lower",
                     f"{s.threshold * 100:g}%", "yes" if s.gated else "",
                     " or ".join(f"{st} of {src}" for src, st in s.samples) or "-", s.description])
    rows += [
        ["ppl:<dataset>", "quality, perplexity", "lower", f"{PERPLEXITY_THRESHOLD * 100:g}%", "yes", "-",
         "token perplexity per data set"],
        ["<task>:<metric>", "quality, accuracy, lm_eval", "record's higher_is_better",
         f"{ACCURACY_THRESHOLD * 100:g} pts / {LM_EVAL_OTHER_THRESHOLD * 100:g}%", "yes", "-",
         "lm-eval: fractions absolute (widened to the standard error), others relative"],
    ]
    return render_table(["metric", "groups", "better", "threshold", "gated", "samples", "what"], rows)


# --------------------------------------------------------------------------------------------------
# command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``compare`` sub-command's arguments."""
    parser.add_argument("baseline", nargs="?", metavar="BASELINE",
                        help="the reference: a record file or a folder of records")
    parser.add_argument("current", nargs="?", metavar="CURRENT",
                        help="the run under test: a record file or a folder of records")
    parser.add_argument("--gate", action="append", type=parse_gate, metavar="METRIC",
                        help="gate on these metrics only (repeatable; a name, a pattern like 'ttft_ms_*', a group like "
                             "throughput or accuracy, 'default' for the default set, 'all' or 'none'); default: "
                             "throughput, TTFT/TPOT p50 and p99, S-MBU, perplexity and accuracy")
    parser.add_argument("--no-gate", action="append", type=parse_gate, default=[], metavar="METRIC",
                        help="do not gate on these metrics (repeatable; applied after --gate): they are still reported")
    parser.add_argument("--threshold", action="append", type=parse_threshold, default=[], metavar="METRIC=PCT",
                        help="noise threshold in percent (accuracy: points) for a metric, pattern or group, e.g. "
                             "output_tokens_per_s=3 or latency=25 (repeatable; the last match wins)")
    parser.add_argument("--history", action="append", default=[], metavar="PATH",
                        help="an earlier run of the same suite, older than BASELINE (repeatable; e.g. the nights "
                             "before): each figure's threshold becomes at least --noise-factor times how far it "
                             "wandered between those runs and the baseline. Without it, only the noise within "
                             "each run is seen, not a shift of a whole run (another tenant on the machine)")
    parser.add_argument("--noise-factor", type=float, default=2.0,
                        help="with --history: the threshold is at least this times the run-to-run spread (default 2)")
    parser.add_argument("--confidence", type=float, default=0.95,
                        help="confidence of the bootstrap interval and of the accuracy bound (default 0.95)")
    parser.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples (default 2000; seeded)")
    parser.add_argument("--format", choices=["markdown", "json"], default="markdown")
    parser.add_argument("--report", metavar="FILE", help="also write the report (in --format) to FILE")
    parser.add_argument("--list-metrics", action="store_true",
                        help="list the metrics, their directions, thresholds and gates")


def cmd_compare(args: argparse.Namespace) -> int:
    """Run the comparison; the exit status: see the module docstring (0, 1 regression, 2 bad input,
    3 incomplete, 4 internal error)."""
    if getattr(args, "list_metrics", False):
        print(list_metrics())
        return 0
    if not args.baseline or not args.current:
        print("moecap compare: expected two paths, BASELINE and CURRENT (record files or folders of records)",
              file=sys.stderr)
        return 2
    if not 0 < args.confidence < 1:
        print(f"moecap compare: --confidence {args.confidence}: expected a number between 0 and 1, e.g. 0.95",
              file=sys.stderr)
        return 2
    if args.resamples < 100:
        print(f"moecap compare: --resamples {args.resamples}: expected at least 100", file=sys.stderr)
        return 2
    if not args.noise_factor > 0:
        print(f"moecap compare: --noise-factor {args.noise_factor}: expected a number > 0, e.g. 2", file=sys.stderr)
        return 2
    settings = Settings(thresholds=list(args.threshold or []), gate=args.gate, no_gate=list(args.no_gate or []),
                        confidence=args.confidence, resamples=args.resamples, noise_factor=args.noise_factor)
    try:
        cmp = compare_paths(args.baseline, args.current, settings, history=list(args.history or []))
        text = format_json(cmp) if args.format == "json" else format_markdown(cmp)
    except CompareInputError as err:
        print(f"moecap compare: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as err:  # a bug of ours, said as one; never an exit status that reads as a verdict
        print(f"moecap compare: internal error (a bug in moecap, please report it): {type(err).__name__}: "
              f"{' '.join(str(err).split())[:500]}", file=sys.stderr)
        return EXIT_INTERNAL
    print(text, end="")
    if args.report:
        from moecap.paths import atomic_write_text

        try:
            atomic_write_text(Path(args.report), text)
        except OSError as err:
            print(f"moecap compare: cannot write the report to {args.report!r}: {err}", file=sys.stderr)
            return 2
    return cmp.exit_status


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="moecap compare", description="Compare two result sets cell by cell; exit 1 on a gated regression, "
        "3 when a cell failed, is missing, extra or unreadable, 2 on bad input, 4 on an internal error.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return cmd_compare(args)


if __name__ == "__main__":
    sys.exit(main())
