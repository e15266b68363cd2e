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
    value: float  # the median over the record's repetitions (its only value with one)
    stderr: float | None = None
    n: int | None = None
    reps: tuple[float, ...] = ()  # every repetition's value (empty with one repetition)


def record_figures(rec: Record) -> dict[str, Figure]:
    """Every comparable figure of ``rec`` by metric name (figures that are absent or not finite are left out)."""
    from moecap import figures

    report = rec.report or {}
    reps = dig(report, ("repetitions", "figures"))
    reps = reps if isinstance(reps, dict) else {}
    out: dict[str, Figure] = {}
    for spec in static_metrics():
        v = _number(spec.getter(rec, report) if spec.getter else dig(report, spec.path))
        if v is not None:
            vals = (reps.get(spec.name) or {}).get("values") if isinstance(reps.get(spec.name), dict) else None
            vals = tuple(_number(x) for x in vals) if isinstance(vals, list) else ()
            out[spec.name] = Figure(spec, v, reps=vals if len(vals) >= 2 and None not in vals else ())
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
            f"output_tokens_per_s, s_mbu_decode, ...; `moecap compare --list-metrics` lists them all), a group ({', '.join(groups())}), "
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

    def threshold(self, spec: MetricSpec, suite: Sequence[tuple[str, float]] = ()) -> float:
        """The metric's default, then the suite's gate (``suite``: from the baseline record), then the
        command line's --threshold: in each, the last match wins."""
        thr = spec.threshold
        for pattern, value in (*suite, *self.thresholds):
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
                "min_samples": MIN_SAMPLES}


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


def _side(lo: float, hi: float) -> str:
    """Where an interval of a worse factor lies against no change (1)."""
    if lo > 1.0:
        return "wholly worse"
    if hi < 1.0:
        return "wholly better"
    return "includes no change"


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

    @property
    def significant(self) -> bool:
        """The samples really got slower: the whole interval of the time ratio above 1."""
        return self.tested and self.lo is not None and self.lo > 1.0

    def describe(self) -> str:
        if not self.tested:
            return f"threshold only: {self.reason}"
        what = _count(self.n_base, self.unit) if self.paired else f"{self.n_base} vs {_count(self.n_cur, self.unit)}"
        return (f"{'paired ' if self.paired else ''}bootstrap over {what} within each run: {self.statistic} time "
                f"×{self.ratio:.3f} ({self.confidence:.0%} CI {self.lo:.3f}–{self.hi:.3f}, {_side(self.lo, self.hi)})")

    def to_dict(self, bound: float | None = None) -> dict[str, Any]:
        return {"kind": "traces", "source": self.source, "statistic": self.statistic, "unit": self.unit,
                "paired": self.paired, "n_baseline": self.n_base, "n_current": self.n_cur, "tested": self.tested,
                "time_ratio": self.ratio, "ci": [self.lo, self.hi] if self.tested else None,
                "confidence": self.confidence, "threshold_time_ratio": bound,
                "significant": self.significant if self.tested else None, "reason": self.reason}


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
    test: "ShiftTest | RunTest | None" = None
    bound: float | None = None  # the threshold as a worse factor (1 + threshold)

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


# a change that lands on the threshold to rounding (a stretch of exactly 10 % against 10 %) is within it.
# Every relative threshold is a slowdown: 0.10 is a worse factor of 1.10 for a latency and a throughput
# alike (a throughput 10 % slower is x1/1.10, a change of -9.1 %); see worse_factor
_AT_THRESHOLD = 1e-9


def worse_factor(spec: MetricSpec, base: float, cur: float) -> float | None:
    """How much worse ``cur`` is than ``base`` as a factor in the figure's bad direction (1.10: 10 %
    worse; 0.9: better): cur/base for a figure where lower is better, base/cur where higher is. A
    throughput that drops to 1/1.10 and a latency that grows ×1.10 are both 1.10. None when either
    value is not positive (no ratio)."""
    if not (base > 0 and cur > 0):
        return None
    return base / cur if spec.higher_is_better else cur / base


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom: exact for 1 and 2, else the
    Cornish-Fisher expansion (Abramowitz & Stegun 26.7.5; within 0.5 % from 3 degrees of freedom)."""
    if df <= 0:
        return math.inf
    if df == 1:
        return math.tan(math.pi * (p - 0.5))
    if df == 2:
        return (2 * p - 1) / math.sqrt(2 * p * (1 - p))
    z = NormalDist().inv_cdf(p)
    g1 = (z ** 3 + z) / 4
    g2 = (5 * z ** 5 + 16 * z ** 3 + 3 * z) / 96
    g3 = (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / 384
    g4 = (79 * z ** 9 + 776 * z ** 7 + 1482 * z ** 5 - 1920 * z ** 3 - 945 * z) / 92160
    return z + g1 / df + g2 / df ** 2 + g3 / df ** 3 + g4 / df ** 4


# the power at which `detectable` is quoted: a true change of that size is flagged 4 times in 5
DETECT_POWER = 0.8
# below this many earlier runs (besides the baseline) a note says the run-to-run spread is rough
SHORT_HISTORY = 5


def _median_var_factor(n: int) -> float:
    """Var(median of n) / (sigma^2 / n) for normal samples: 1 up to two values (the median is the mean),
    then pi/2 (its large-sample efficiency; within 15 % of the exact value from n = 3)."""
    return 1.0 if n <= 2 else math.pi / 2


@dataclass
class RunTest:
    """Did the figure move between runs, given how far it moves between repetitions and between runs?

    On the log of the figure in its bad direction: the change is log(worse_factor) of the two medians;
    its standard error is the larger of two estimates: the spread between repetitions within runs
    (pooled over the baseline's, the current's and the history's repetitions) carried to the medians,
    and the spread of the run medians of earlier runs of the cell (history and baseline: what identical
    runs do on this machine, a whole run shifted by another tenant included). The interval is a t
    interval on that estimate's degrees of freedom."""

    n_base: int
    n_cur: int
    n_history: int
    factor: float  # worse factor of the medians
    se: float  # standard error of its log
    df: int
    crit: float  # the t quantile of the interval
    lo: float
    hi: float
    source: str  # "repetitions" or "run-to-run spread"
    within_sd: float | None
    run_sd: float | None
    confidence: float
    detectable: float  # the smallest true change (a fraction) flagged with DETECT_POWER on this noise
    flags_beyond: float  # the smallest observed change (a fraction) that is flagged

    @property
    def significant(self) -> bool:
        """The interval of the worse factor lies wholly above 1: the figure really got worse."""
        return self.lo > 1.0

    def describe(self) -> str:
        what = (f"{self.n_base} vs {self.n_cur} repetitions" if self.source == "repetitions"
                else f"run-to-run spread of {self.n_history} earlier runs and the baseline")
        spreads = []
        if self.within_sd is not None:
            spreads.append(f"±{self.within_sd * 100:.1f}% between repetitions")
        if self.run_sd is not None:
            spreads.append(f"±{self.run_sd * 100:.1f}% between runs")
        return (f"{what} ({', '.join(spreads)}): ×{self.factor:.3f} worse, {self.confidence:.0%} CI "
                f"{self.lo:.3f}–{self.hi:.3f} ({_side(self.lo, self.hi)}); "
                f"detects ≥{self.detectable * 100:.1f}% (flags beyond {self.flags_beyond * 100:.1f}%)")

    def to_dict(self, bound: float | None = None) -> dict[str, Any]:
        return {"kind": "runs", "source": self.source, "n_baseline": self.n_base, "n_current": self.n_cur,
                "n_history_runs": self.n_history, "worse_factor": self.factor, "se_log": self.se, "df": self.df,
                "ci": [self.lo, self.hi], "confidence": self.confidence, "significant": self.significant,
                "within_run_sd": self.within_sd, "run_to_run_sd": self.run_sd,
                "detectable_change": self.detectable, "flags_beyond": self.flags_beyond}


def _logs(spec: MetricSpec, values: Sequence[float]) -> list[float] | None:
    """The log of each value in the bad direction (up is worse); None if one is not positive."""
    if any(not (v > 0) for v in values):
        return None
    return [-math.log(v) if spec.higher_is_better else math.log(v) for v in values]


def _sd(groups: Sequence[Sequence[float]]) -> tuple[float | None, int]:
    """The pooled standard deviation of groups of values about each group's own mean, and its degrees of
    freedom (None with none)."""
    ss, df = 0.0, 0
    for g in groups:
        if len(g) >= 2:
            m = sum(g) / len(g)
            ss += sum((x - m) ** 2 for x in g)
            df += len(g) - 1
    return (math.sqrt(ss / df), df) if df else (None, 0)


def run_test(spec: MetricSpec, fb: Figure, fc: Figure, history: Sequence[Figure], threshold: float,
             confidence: float) -> RunTest | str:
    """The :class:`RunTest` of one figure, or why there is none (a record with one repetition and no
    history: then only the traces within each run can speak)."""
    factor = worse_factor(spec, fb.value, fc.value)
    if factor is None:
        return "a value that is not positive: no ratio"
    b = _logs(spec, fb.reps or (fb.value,))
    c = _logs(spec, fc.reps or (fc.value,))
    hist_reps = [_logs(spec, h.reps) for h in history if h.reps]
    runs = _logs(spec, [h.value for h in history] + [fb.value])
    if b is None or c is None or runs is None or any(h is None for h in hist_reps):
        return "a value that is not positive: no ratio"
    within_sd, df_w = _sd([b, c, *[h for h in hist_reps if h]])
    run_sd, df_r = _sd([runs]) if len(runs) >= 3 else (None, 0)
    est = []
    if within_sd is not None:
        var = within_sd ** 2 * (_median_var_factor(len(b)) / len(b) + _median_var_factor(len(c)) / len(c))
        est.append((math.sqrt(var), df_w, "repetitions"))
    if run_sd is not None:  # each compared run's median wanders as the earlier runs' did
        est.append((run_sd * math.sqrt(2), df_r, "run-to-run spread"))
    if not est:
        return "one repetition a side and no history (--history): no spread between runs to judge by"
    se, df, source = max(est, key=lambda e: e[0])
    crit = t_quantile(1 - (1 - confidence) / 2, df)
    d = math.log(factor)
    cut = max(math.log1p(threshold), crit * se)
    z = NormalDist().inv_cdf(DETECT_POWER)
    return RunTest(len(b), len(c), len(history), factor, se, df, crit, math.exp(d - crit * se),
                   math.exp(d + crit * se), source, within_sd, run_sd, confidence,
                   detectable=math.expm1(cut + z * se), flags_beyond=math.expm1(cut))


def suite_thresholds(rec: Record) -> list[tuple[str, float]]:
    """The thresholds a record's suite set for ``moecap compare`` (``gate.thresholds``, percent), as
    (pattern, fraction); none when it set none or they are malformed."""
    gate = (rec.suite or {}).get("gate") if isinstance(rec.suite, dict) else None
    th = gate.get("thresholds") if isinstance(gate, dict) else None
    if not isinstance(th, dict):
        return []
    return [(str(k), float(v) / 100.0) for k, v in th.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0]


def compare_metric(name: str, fb: Figure | None, fc: Figure | None, sampling: "_CellSampling",
                   settings: Settings, history: Sequence[Figure] = (),
                   suite: Sequence[tuple[str, float]] = ()) -> MetricResult:
    """The verdict on one figure, by one rule for every relative figure:

    * within threshold: the figure is at most ``threshold`` worse (worse_factor <= 1 + threshold, a
      change landing on the threshold to rounding included); improved when it is that much better;
    * otherwise a regression when the change is real: the interval of the worse factor lies wholly
      above 1. The interval comes from the repetitions and, with ``history``, the spread between
      earlier runs of the cell (:func:`run_test`); for records of one repetition and no history, from
      a bootstrap over the per-pass or per-request traces of the two runs (:func:`shift_test`); a change
      the data cannot call real is noise; without either, the threshold alone decides.
    """
    spec = (fb or fc).spec  # type: ignore[union-attr]
    gated = settings.gated(spec)
    thr = settings.threshold(spec, suite)
    base = fb.value if fb else None
    cur = fc.value if fc else None
    bound = None if spec.absolute else 1.0 + thr  # the threshold as a worse factor

    def result(verdict: str, change: float | None, basis: str, test: Any = None) -> MetricResult:
        return MetricResult(name, spec.description, spec.higher_is_better, gated, spec.absolute, base, cur,
                            change, thr, verdict, basis, test, bound)

    if fb is None:
        return result(NEW, None, "no baseline figure")
    if fc is None:  # same configuration, and the figure is gone: something stopped measuring it
        return result(REGRESSION if gated else MISSING, None, "the current record has no such figure")
    if spec.absolute:  # accuracy: the standard error is the noise bound
        change = cur - base
        z = NormalDist().inv_cdf(1 - (1 - settings.confidence) / 2)
        thr, basis = _accuracy_threshold(fb, fc, thr, z)
        worse_by = -change if spec.higher_is_better else change
        if worse_by <= thr * (1 + _AT_THRESHOLD):
            return result(IMPROVED if -worse_by > thr else OK, change, basis)
        return result(REGRESSION if gated else REPORTED, change, basis)
    change = (cur - base) / abs(base) if base != 0 else (0.0 if cur == 0 else math.copysign(math.inf, cur))
    test: Any = run_test(spec, fb, fc, history, thr, settings.confidence)
    if isinstance(test, RunTest):
        basis, real = test.describe(), test.significant
    else:
        why = test
        test = sampling.test(spec)
        if isinstance(test, ShiftTest) and test.tested:
            basis, real = test.describe(), test.lo > 1.0  # type: ignore[operator]
        else:
            basis = (test.describe() if isinstance(test, ShiftTest) else sampling.why_untested(spec)) + f"; {why}"
            real = True  # nothing to judge the noise by: the threshold alone decides
    factor = worse_factor(spec, base, cur)
    if factor is None:  # a zero (e.g. no request met the SLOs): the figure's own change decides
        worse_by = -change if spec.higher_is_better else change
        factor = 1.0 + worse_by if worse_by > -1 else 0.0
    if factor <= bound * (1 + _AT_THRESHOLD):  # type: ignore[operator]
        better = (1.0 / factor - 1.0) if factor > 0 else math.inf
        return result(IMPROVED if better > thr * (1 + _AT_THRESHOLD) else OK, change, basis, test)
    if not real:
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
    ``history``: ok records of the same cell from earlier runs (their run-to-run spread is noise)."""
    fbs, fcs = record_figures(rb), record_figures(rc)
    fhs = [record_figures(h) for h in history]
    sampling = _CellSampling(pb, rb, pc, rc, settings)
    static = static_metrics()
    names = [s.name for s in static if s.name in fbs or s.name in fcs]
    names += sorted((set(fbs) | set(fcs)) - {s.name for s in static})
    suite = suite_thresholds(rb)
    return [compare_metric(name, fbs.get(name), fcs.get(name), sampling, settings,
                           [f[name] for f in fhs if name in f], suite) for name in names]


def compare_paths(baseline: str | Path, current: str | Path, settings: Settings | None = None,
                  history: Sequence[str | Path] = ()) -> Comparison:
    """Match the cells of two result sets and judge every figure (raises CompareInputError on bad input).
    ``history``: result sets of earlier runs of the same suite, older than the baseline; how far each
    figure wandered between them and the baseline is noise a regression must stand out of. A record of
    the baseline's or the current run itself (same run id) is never counted as history, nor is one run
    twice."""
    settings = settings or Settings()
    base_index, n_base, notes, bad_base = _index(baseline, "baseline")
    cur_index, n_cur, notes_c, bad_cur = _index(current, "current")
    notes += notes_c
    past: dict[tuple[str, str], list[Record]] = {}
    for h in history:
        h_index, n_h, _, _ = _index(h, "history")
        used, own, twice = 0, 0, 0
        for key, (_, rec) in h_index.items():
            if rec.status != "ok" or key not in base_index:
                continue
            sides = {base_index[key][1].run_id, cur_index[key][1].run_id if key in cur_index else None}
            if rec.run_id in sides:
                own += 1
            elif any(r.run_id == rec.run_id for r in past.get(key, [])):
                twice += 1
            else:
                past.setdefault(key, []).append(rec)
                used += 1
        notes.append(f"history {str(h)!r}: {used} of {n_h} records match a baseline cell"
                     + (f"; {own} are records of the baseline's or the current run itself (same run id), not "
                        "counted: a run is no evidence of its own noise" if own else "")
                     + (f"; {twice} repeat a run already given, counted once" if twice else ""))
    gates: dict[str, str] = {}
    for (suite_name, _), (_, rec) in base_index.items():
        if suite_name not in gates and suite_thresholds(rec):
            gate = rec.suite.get("gate") or {}
            gates[suite_name] = (", ".join(f"{k}={v:g}%" for k, v in gate.get("thresholds", {}).items())
                                 + (f" ({gate['note']})" if gate.get("note") else ""))
    for suite_name, text in gates.items():
        notes.append(f"suite {suite_name!r} sets its gate's thresholds (the baseline records' suite.gate; "
                     f"--threshold overrides them): {text}")
    if history:
        runs = sorted({len(v) for k, v in past.items() if k in cur_index} or {0})
        if runs[0] < SHORT_HISTORY:
            notes.append(f"warning: the history gives {runs[0] if len(runs) == 1 else f'{runs[0]}–{runs[-1]}'} "
                         f"earlier run{'s' if runs[-1] != 1 else ''} per cell: the run-to-run spread needs 2 "
                         f"and rests on few until {SHORT_HISTORY} (a wider interval makes up for it, so small "
                         "changes go undetected: see each figure's 'detects')")
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
    if m.absolute:
        return f"{'−' if m.higher_is_better else '+'}{m.threshold * 100:.1f} pts"
    if m.higher_is_better:  # a slowdown of the threshold: ×1/(1 + t)
        return f"{m.threshold * 100:g}% worse (−{m.threshold / (1 + m.threshold) * 100:.1f}%)"
    return f"{m.threshold * 100:g}% worse (+{m.threshold * 100:g}%)"


def _fmt_detects(m: MetricResult) -> str:
    """The smallest true change (as a worse factor - 1) the data would flag 4 times in 5."""
    if isinstance(m.test, RunTest):
        return f"≥{m.test.detectable * 100:.1f}%"
    return "–"


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
        f"- a regression: the figure is worse than its threshold (a relative threshold is a slowdown: "
        f"throughput 5 % means ×1/1.05, a latency 10 % means ×1.10; a change that lands on the threshold is "
        f"within it) and the change is real: the {s.confidence:.0%} interval of how much worse it got lies "
        f"wholly above no change. The interval comes from the records' repetitions (`moecap run --repeat N`) "
        f"and, with `--history`, from how far the figure wandered between earlier runs of the cell; records "
        f"of one repetition and no history fall back to a bootstrap over their per-pass or per-request traces "
        f"({s.resamples} resamples, at least {MIN_SAMPLES} samples), which cannot see a whole run shifted; "
        f"accuracy: an absolute threshold widened to the standard error; figures without samples: the "
        f"threshold alone (the basis column says which). 'detects': the smallest true change flagged 4 times "
        f"in 5 on this data: a gate whose 'detects' is above the change you care about cannot catch it",
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
                  "| metric | gated | baseline | current | change | threshold | detects | verdict | basis |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for m in c.metrics:
            lines.append(f"| {_md_escape(m.name)} | {'yes' if m.gated else ''} | {_fmt_value(m.baseline)} | "
                         f"{_fmt_value(m.current)} | {_fmt_change(m)} | {_fmt_threshold(m)} | {_fmt_detects(m)} | "
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
                             "before): how far each figure wandered between those runs and the baseline is noise a "
                             "regression must stand out of. Without it, only the spread between repetitions within "
                             "each run is seen, not a shift of a whole run (another tenant on the machine); records "
                             "of the baseline's own run are not counted. 2 earlier runs are the least, 5 or more "
                             "make the spread trustworthy")
    parser.add_argument("--confidence", type=float, default=0.95,
                        help="confidence of the intervals (a regression's worse factor must have its whole "
                             "interval above 1) and of the accuracy bound (default 0.95)")
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
    settings = Settings(thresholds=list(args.threshold or []), gate=args.gate, no_gate=list(args.no_gate or []),
                        confidence=args.confidence, resamples=args.resamples)
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
