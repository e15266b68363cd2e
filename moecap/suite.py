"""Suites: YAML files of models x runners x workloads x loads, validated before anything runs.

A suite file looks like::

    name: quickstart
    models:   [{id: tiny-moe}]
    runners:  [{type: hf, args: {dtype: float32}}]
    workloads: [{name: short, input_tokens: 64, output_tokens: 32, num_prompts: 8}]
    loads:    [{batch_size: 1}, {batch_size: 4}]
    hardware: {device: cpu}
    output:   {dir: results}

Every error names the file, the field and what is allowed.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError, field_validator, model_validator

from moecap.registry import EMBEDDED_MODELS, RUNNERS, load_object


class SuiteError(ValueError):
    """A suite that cannot run; the message names the file, the field and what is allowed."""


class _Strict(BaseModel):
    # unknown keys are errors, floats are finite (no .inf / .nan rates or SLOs)
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


# an integer written as one: ``true`` and ``4.0`` are refused, not read as 1 and 4
Count = Annotated[int, Strict()]
MAX_TOKENS = 1 << 21  # prompt or output length: above any model's context today (2M tokens)
MAX_PROMPTS = 1_000_000
MAX_PROMPT_TOKENS_TOTAL = 200_000_000  # prompts x their length held as token ids at once (1.6 GB)


HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


class ModelConfig(_Strict):
    id: str
    """An embedded model (``tiny-moe``), a Hugging Face id (``org/name``), a local model directory, or
    ``random:<config>``: random weights on a real architecture config (a built-in name, a config.json
    path or a hub id)."""
    name: str | None = None
    """Display name; default: derived from ``id``."""
    overrides: dict[str, Any] = Field(default_factory=dict)
    """Config fields to change before building a ``random:`` model (e.g. ``num_hidden_layers: 4``)."""
    revision: str | None = None
    trust_remote_code: bool = False

    @property
    def display_name(self) -> str:
        if self.name:
            return self.name
        base = self.id.split(":", 1)[-1].rstrip("/").split("/")[-1]
        base = base.removesuffix(".json")
        if self.id.startswith("random:"):
            base = f"{base}-random"
        if self.overrides.get("num_hidden_layers") is not None:
            base = f"{base}-{self.overrides['num_hidden_layers']}L"
        return base


class RunnerConfig(_Strict):
    type: str
    """A registered runner (``moecap runners`` lists them)."""
    name: str | None = None
    args: dict[str, Any] = Field(default_factory=dict)

    @property
    def display_name(self) -> str:
        return self.name or self.type


class PerplexityConfig(_Strict):
    """Token perplexity (non-overlapping windows, exp of the mean NLL) on named data sets."""

    datasets: list[str] = Field(min_length=1)
    """Embedded held-out corpora (``tiny-code``, ``tiny-prose``, ``tiny-c``) or, with a network,
    ``wikitext2``, ``ptb``, ``c4``."""
    context_length: Count | None = Field(default=None, gt=1, le=MAX_TOKENS)
    """Window length; default 2048, or the model's maximum if shorter."""
    batch_size: Count = Field(default=8, gt=0, le=4096)
    max_windows: Count | None = Field(default=None, gt=0)
    """Evaluate only the first N windows (quick runs)."""

    @field_validator("datasets")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        from moecap.quality.perplexity import dataset_names

        bad = [d for d in v if d not in dataset_names()]
        if bad:
            raise ValueError(f"unknown data set(s) {bad}; allowed: {', '.join(dataset_names())}")
        return v


class LmEvalConfig(_Strict):
    """lm-eval tasks, measured through the runner under test (its precision, its offloading)."""

    tasks: list[str] = Field(min_length=1)
    """lm-eval task names (``arc_easy``, ``gsm8k``, ``mmlu``, ...) or moecap's offline tasks
    (``moecap_mc_code``, ``moecap_rolling_prose``, ...)."""
    limit: float | None = Field(default=None, gt=0)
    """At most this many samples per task (a fraction below 1 means a share of the task)."""
    num_fewshot: int | None = Field(default=None, ge=0)
    batch_size: int = Field(default=8, gt=0)
    include_path: str | None = None
    """A folder of extra task YAMLs."""


class WorkloadConfig(_Strict):
    """What a cell measures: serving performance (prompts with exact lengths, under the cell's load),
    quality (perplexity and/or lm-eval tasks, once per model and runner), or both."""

    name: str | None = None
    source: Literal["random", "text"] = "random"
    """``random``: uniformly drawn token ids; ``text``: consecutive pieces of a text file, tokenized."""
    text_file: str | None = None
    """For ``source: text``; default: text of the Python standard library on this machine."""
    input_tokens: Count | None = Field(default=None, gt=0, le=MAX_TOKENS)
    output_tokens: Count | None = Field(default=None, gt=0, le=MAX_TOKENS)
    num_prompts: Count | None = Field(default=None, gt=0, le=MAX_PROMPTS)
    seed: Count = 0
    ignore_eos: bool = True
    """Generate exactly ``output_tokens`` tokens per request (as vLLM's benchmarks do)."""
    perplexity: PerplexityConfig | None = None
    lm_eval: LmEvalConfig | None = None
    max_failed_fraction: float = Field(default=0.0, ge=0.0, le=1.0)
    """The share of a performance cell's requests that may fail (an HTTP error, a broken stream, a count
    the server's usage contradicts, or fewer tokens than ``output_tokens`` under ``ignore_eos``) with the
    cell still ok; above it the cell is recorded failed, its figures and requests kept. Default 0: any
    failed request fails the cell."""
    slo_ms: dict[str, float] | None = None
    """Goodput SLOs, e.g. ``{ttft_ms: 500, tpot_ms: 50}`` (keys: ttft_ms, tpot_ms, e2el_ms). Not part of
    the cell's identity: a changed SLO re-scores the stored requests of finished cells, it re-runs
    nothing."""

    @field_validator("slo_ms")
    @classmethod
    def _slo(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v:
            bad = sorted(set(v) - {"ttft_ms", "tpot_ms", "e2el_ms"})
            if bad:
                raise ValueError(f"unknown SLO keys {bad}; allowed: ttft_ms, tpot_ms, e2el_ms")
            if any(not x > 0 for x in v.values()):
                raise ValueError("SLO values must be > 0")
        return v or None

    @model_validator(mode="after")
    def _what_to_measure(self) -> "WorkloadConfig":
        perf = [k for k in ("input_tokens", "output_tokens", "num_prompts") if getattr(self, k) is not None]
        if perf and len(perf) != 3:
            missing = sorted({"input_tokens", "output_tokens", "num_prompts"} - set(perf))
            raise ValueError(f"a performance workload sets input_tokens, output_tokens and num_prompts; missing {missing}")
        if perf and self.num_prompts * self.input_tokens > MAX_PROMPT_TOKENS_TOTAL:
            raise ValueError(f"num_prompts x input_tokens = {self.num_prompts * self.input_tokens:,} prompt tokens; "
                             f"at most {MAX_PROMPT_TOKENS_TOTAL:,} (they are built in memory before the run)")
        if not perf and self.perplexity is None and self.lm_eval is None:
            raise ValueError(
                "a workload measures performance (input_tokens, output_tokens, num_prompts), "
                "quality (perplexity, lm_eval), or both; it sets none of them"
            )
        return self

    @property
    def measures_performance(self) -> bool:
        return self.input_tokens is not None

    @property
    def measures_quality(self) -> bool:
        return self.perplexity is not None or self.lm_eval is not None

    @property
    def display_name(self) -> str:
        if self.name:
            return self.name
        if self.measures_performance:
            return f"{self.source}-in{self.input_tokens}-out{self.output_tokens}"
        return "quality"


class LoadConfig(_Strict):
    """Exactly one of: a static batch size, a max concurrency, or an arrival rate (requests/s)."""

    batch_size: Count | None = Field(default=None, gt=0, le=MAX_PROMPTS)
    concurrency: Count | None = Field(default=None, gt=0, le=MAX_PROMPTS)
    rate: float | None = Field(default=None, gt=0)
    arrival: Literal["poisson", "gamma"] = "poisson"
    burstiness: float = Field(default=1.0, gt=0)

    @model_validator(mode="after")
    def _exactly_one(self) -> "LoadConfig":
        set_ = [k for k in ("batch_size", "concurrency", "rate") if getattr(self, k) is not None]
        if len(set_) != 1:
            raise ValueError(
                "a load sets exactly one of batch_size, concurrency, rate; "
                f"got {', '.join(set_) if set_ else 'none'}"
            )
        return self

    @property
    def kind(self) -> str:
        if self.batch_size is not None:
            return "batch"
        if self.concurrency is not None:
            return "concurrency"
        return "rate"

    @property
    def slug(self) -> str:
        if self.batch_size is not None:
            return f"bs{self.batch_size}"
        if self.concurrency is not None:
            return f"c{self.concurrency}"
        return f"r{self.rate:g}-{self.arrival}"


class PeaksConfig(_Strict):
    mem_bandwidth_gbs: float = Field(gt=0)
    tflops: dict[str, float]
    """Dense peak TFLOP/s per dtype (``bf16``, ``fp16``, ``fp32``, ...)."""


class HardwareConfig(_Strict):
    device: str = "auto"
    """``auto`` (the first GPU if there is one, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    peaks: PeaksConfig | None = None
    """Your own peaks; they take precedence over the datasheet table and calibration."""
    calibrate: Literal["auto", "never"] = "auto"
    """``auto``: measure the ceilings when there is no datasheet row and no cached calibration (always
    so on a CPU); ``never``: fail instead."""

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.match(r"^(auto|cpu|cuda|cuda:\d+)$", v):
            raise ValueError(f"device must be one of auto, cpu, cuda, cuda:N; got {v!r}")
        return v


def _check_cost_keys(v: dict[str, Any]) -> dict[str, Any]:
    from moecap.catalog import OVERRIDE_KEYS

    unknown = sorted(set(v) - set(OVERRIDE_KEYS))
    if unknown:
        raise ValueError(f"unknown cost setting(s) {unknown}; allowed: {', '.join(sorted(OVERRIDE_KEYS))}")
    return v


class OutputConfig(_Strict):
    dir: str = "results"
    """Records go to ``<dir>/<suite name>/``."""


class GateConfig(_Strict):
    """How ``moecap compare`` gates this suite's records unless its command line says otherwise: the
    noise thresholds a suite's author calibrated on its machine (``benchmarks/gate_calibration.py``)."""

    thresholds: dict[str, float] = Field(default_factory=dict)
    """Metric, pattern or group -> threshold in percent (accuracy: points), as ``moecap compare
    --threshold METRIC=PCT``; applied in order (the last match wins), before the command line's."""
    note: str = ""
    """Why these thresholds (what was measured, where): shown in the comparison's notes."""

    @field_validator("thresholds")
    @classmethod
    def _thresholds(cls, v: dict[str, float]) -> dict[str, float]:
        import math

        from moecap.compare import _known_pattern, _unknown_metric_message

        for metric, pct in v.items():
            if not _known_pattern(metric):
                raise ValueError(f"{metric!r}: {_unknown_metric_message(metric)}")
            if isinstance(pct, bool) or not isinstance(pct, (int, float)) or not (math.isfinite(pct) and pct >= 0):
                raise ValueError(f"{metric}: {pct!r}: a threshold is a finite percentage >= 0, e.g. {metric}: 7")
        return v


class Suite(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][\w.\-]*$")
    description: str = ""
    models: list[ModelConfig] = Field(min_length=1)
    runners: list[RunnerConfig] = Field(min_length=1)
    workloads: list[WorkloadConfig] = Field(min_length=1)
    loads: list[LoadConfig] = Field(default_factory=list)
    """Required when a workload measures performance."""
    hardware: HardwareConfig = Field(default_factory=HardwareConfig)
    cost: dict[str, Any] = Field(default_factory=dict)
    """Cost inputs by name (prices, amortization, PUE, tariff, cloud rates; ``moecap cost --help``
    lists them); anything unset comes from moecap/data/catalog.yaml for the detected hardware."""
    output: OutputConfig = Field(default_factory=OutputConfig)
    repeat: int = Field(default=1, ge=1, le=100)
    """How many times each performance cell's measured window runs (``moecap run --repeat N``). With
    N >= 2 the record keeps every repetition's traces and each figure's median, interval and spread over
    them (``report.repetitions``); the figure's value is that median. Not part of a cell's id."""
    gate: GateConfig | None = None
    """``moecap compare``'s thresholds for this suite's records (recorded in each record's ``suite``);
    the command line's ``--threshold`` still wins. Not part of a cell's id."""

    @field_validator("cost")
    @classmethod
    def _cost(cls, v: dict[str, Any]) -> dict[str, Any]:
        import math

        bad = {k: x for k, x in v.items() if isinstance(x, bool) or (isinstance(x, (int, float)) and not (
            math.isfinite(x) and x >= 0))}
        if bad:
            raise ValueError(f"cost inputs are finite and >= 0 (a price, a rate, a count); got {bad}")
        return v

    @field_validator("cost")
    @classmethod
    def _cost_keys(cls, v: dict[str, Any]) -> dict[str, Any]:
        return _check_cost_keys(v)

    # set by load_suite, not part of the file
    source: str | None = Field(default=None, exclude=True)


# --------------------------------------------------------------------------------------------
# cells


@dataclass(frozen=True)
class Cell:
    suite: Suite
    model: ModelConfig
    runner: RunnerConfig
    workload: WorkloadConfig
    load: LoadConfig | None  # None for a quality-only workload: no load applies

    def config_dict(self) -> dict[str, Any]:
        """What defines the cell; hashed into its id."""
        return {
            "model": self.model.model_dump(mode="json"),
            "runner": self.runner.model_dump(mode="json"),
            "workload": self.workload.model_dump(mode="json", exclude_none=True,
                                                 exclude={"slo_ms", "max_failed_fraction"}),
            "load": self.load.model_dump(mode="json", exclude_defaults=True) if self.load else None,
            "hardware": {"device": self.suite.hardware.device},
        }

    @property
    def load_slug(self) -> str:
        return self.load.slug if self.load else "noload"

    @property
    def cell_id(self) -> str:
        from moecap.redact import redact  # a key is no part of what a cell measures: it never moves the id

        digest = hashlib.sha256(json.dumps(redact(self.config_dict()), sort_keys=True).encode()).hexdigest()[:8]
        parts = [self.model.display_name, self.runner.display_name, self.workload.display_name, self.load_slug]
        slug = "__".join(re.sub(r"[^\w.\-]+", "-", p) for p in parts)
        return f"{slug}__{digest}"

    def describe(self) -> str:
        return (
            f"{self.model.display_name} | {self.runner.display_name} | "
            f"{self.workload.display_name} | {self.load_slug}"
        )


def expand(suite: Suite) -> list[Cell]:
    """The cells of a suite, models outermost (one model load serves its consecutive cells).

    A performance workload gives one cell per load; a quality-only workload one cell (no load)."""
    return [
        Cell(suite, m, r, w, l)
        for m in suite.models
        for r in suite.runners
        for w in suite.workloads
        for l in (suite.loads if w.measures_performance else [None])
    ]


# --------------------------------------------------------------------------------------------
# loading


def builtin_suites() -> list[str]:
    root = resources.files("moecap") / "suites"
    return sorted(p.name.removesuffix(".yaml") for p in root.iterdir() if p.name.endswith(".yaml"))


def resolve_suite_path(spec: str) -> Path:
    """A path to a YAML file, or the name of a suite shipped under ``moecap/suites``."""
    p = Path(spec)
    if p.is_file():
        return p
    root = resources.files("moecap") / "suites"
    for cand in (root / spec, root / f"{spec}.yaml"):
        if cand.is_file():
            return Path(str(cand))
    raise SuiteError(
        f"{spec}: no such suite file, and not a built-in suite (built-in: {', '.join(builtin_suites())})"
    )


def apply_overrides(raw: dict[str, Any], overrides: list[str], source: str) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides (value parsed as YAML; list items by index)."""
    for item in overrides:
        key, sep, value_s = item.partition("=")
        if not sep or not key:
            raise SuiteError(f"--set {item!r}: expected key=value, e.g. workloads.0.num_prompts=4")
        from moecap import safe_yaml

        try:
            value = safe_yaml.load(value_s) if value_s != "" else ""
        except yaml.YAMLError as err:
            raise SuiteError(f"--set {item!r}: the value is not valid YAML: {' '.join(str(err).split())}") from None
        parts = key.split(".")
        node: Any = raw
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            where = ".".join(parts[: i + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise SuiteError(
                        f"{source}: --set {key}: {where!r}: expected a list index below {len(node)}"
                    )
                if last:
                    node[int(part)] = value
                else:
                    node = node[int(part)]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    node = node.setdefault(part, {})
            else:
                raise SuiteError(f"{source}: --set {key}: {where!r} is inside a {type(node).__name__}, not a mapping")
    return raw


def _loc_str(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _model_at(cls: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model class that sits at ``loc`` (list indices skipped)."""
    cur: Any = cls
    for part in loc:
        if isinstance(part, int):
            continue
        field = cur.model_fields.get(part) if isinstance(cur, type) and issubclass(cur, BaseModel) else None
        if field is None:
            return None
        ann = field.annotation
        # unwrap list[X] / X | None
        for _ in range(3):
            args = getattr(ann, "__args__", None)
            if args and not (isinstance(ann, type) and issubclass(ann, BaseModel)):
                ann = next((a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), args[0])
        cur = ann
    return cur if isinstance(cur, type) and issubclass(cur, BaseModel) else None


def format_validation_error(err: ValidationError, cls: type[BaseModel], source: str) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            parent = _model_at(cls, loc[:-1])
            allowed = ", ".join(parent.model_fields) if parent else "?"
            msg = f"unknown key {loc[-1]!r}; allowed keys: {allowed}"
        elif e["type"] == "missing":
            msg = "required field is missing"
        elif "input" in e and e["type"] not in ("model_type", "dict_type", "list_type"):
            msg = f"{msg} (got {e['input']!r})"
        lines.append(f"{source}: {_loc_str(loc)}: {msg}")
    return "\n".join(lines)


def _check_model_id(m: ModelConfig) -> str | None:
    """None if ``m.id`` can be resolved, else what is wrong with it."""
    from moecap.metrics.accounting import builtin_config_names  # pure python

    mid = m.id
    if mid in EMBEDDED_MODELS:
        return None
    if mid.startswith("random:"):
        ref = mid.split(":", 1)[1]
        if ref in builtin_config_names():
            return None
        p = Path(ref).expanduser()
        if p.is_file() or (p.is_dir() and (p / "config.json").is_file()):
            return None
        if HUB_ID_RE.match(ref) and not p.exists():
            return None  # config fetched from the hub when the cell runs
        return (
            f"unknown architecture config {ref!r} in {mid!r}; allowed: one of "
            f"{', '.join(builtin_config_names())}, a config.json path, or a Hugging Face id (org/name)"
        )
    p = Path(mid).expanduser()
    if p.is_dir():
        if (p / "config.json").is_file():
            return None
        return f"local model directory {mid!r} has no config.json"
    if HUB_ID_RE.match(mid):
        return None
    return (
        f"unknown model {mid!r}: not an embedded model ({', '.join(EMBEDDED_MODELS)}), not a local model "
        f"directory, not a Hugging Face id (org/name), not random:<config> "
        f"(configs: {', '.join(builtin_config_names())})"
    )


def _model_errors(i: int, m: ModelConfig, source: str) -> list[str]:
    problem = _check_model_id(m)
    return [f"{source}: models[{i}].id: {problem}"] if problem else []


def _runner_errors(i: int, r: RunnerConfig, source: str) -> list[str]:
    entry = RUNNERS.get(r.type)
    if entry is None:
        return [f"{source}: runners[{i}].type: unknown runner {r.type!r}; allowed: {', '.join(sorted(RUNNERS))}"]
    args_cls = load_object(entry.args)
    try:
        args = args_cls.model_validate(r.args)
    except ValidationError as err:
        return [format_validation_error(err, args_cls, f"{source}: runners[{i}].args")]
    if r.type == "moecap-serve":
        return _served_model_errors(f"{source}: runners[{i}].args", args)
    return []


def _served_model_errors(where: str, args: Any) -> list[str]:
    """``moecap-serve``: every served model resolves, and a multi-model workload names served ones only
    (refused here rather than when the server is up and the first request names an unknown child)."""
    from moecap.models import parse_model_specs

    specs = list(args.serve) or list(args.models or [])
    if not specs:
        return []  # the suite's model, checked with the models
    field = "serve" if args.serve else "models"
    try:
        served = parse_model_specs(specs)
    except ValueError as err:
        return [f"{where}.{field}: {err}"]
    errors = [f"{where}.{field}: {problem}" for name, src in served.items()
              if (problem := _check_model_id(ModelConfig(id=src)))]
    if args.models:  # requests name served models: a directory is served under its folder's name
        extra = sorted(set(args.models) - set(served))
        if extra:
            errors.append(f"{where}.models: {', '.join(map(repr, extra))} not served; served: "
                          f"{', '.join(served)} (args.serve lists them; NAME=MODEL names one)")
    return errors


def _model_context(m: ModelConfig) -> int | None:
    """The model's context length where its config is at hand without loading it (``random:`` configs
    and local directories); None otherwise (a hub id, an embedded model not built yet)."""
    try:
        if m.id.startswith("random:"):
            from moecap.metrics.accounting import builtin_config_names
            from moecap.models import random_config_dict

            ref = m.id.removeprefix("random:")
            if ref not in builtin_config_names() and not Path(ref).expanduser().exists():
                return None  # a hub config: validation never goes to the network
            cfg = random_config_dict(ref, getattr(m, "overrides", None))
        else:
            path = Path(m.id).expanduser() / "config.json"
            if not path.is_file():
                return None
            cfg = json.loads(path.read_text(encoding="utf-8"))
    except Exception:
        return None
    v = cfg.get("max_position_embeddings") or cfg.get("n_positions") or cfg.get("seq_length")
    return int(v) if isinstance(v, int) and v > 0 else None


def validate_semantics(suite: Suite, source: str) -> None:
    """Checks beyond types: registered runners and their args, load kinds, model ids, unique names, and
    prompts that fit every model's context."""
    errors: list[str] = []
    for i, m in enumerate(suite.models):
        errors += _model_errors(i, m, source)
        ctx = _model_context(m)
        for j, w in enumerate(suite.workloads):
            if ctx and w.measures_performance and w.input_tokens + w.output_tokens > ctx:
                errors.append(f"{source}: workloads[{j}]: input_tokens + output_tokens = "
                              f"{w.input_tokens + w.output_tokens} exceeds the context of models[{i}] ({m.id}): "
                              f"{ctx} tokens")
    if any(w.measures_performance for w in suite.workloads) and not suite.loads:
        errors.append(f"{source}: loads: required (at least one) when a workload measures performance")
    for i, r in enumerate(suite.runners):
        errors += _runner_errors(i, r, source)
        entry = RUNNERS.get(r.type)
        if entry is not None and not entry.quality:
            for j, w in enumerate(suite.workloads):
                if w.measures_quality:
                    errors.append(
                        f"{source}: workloads[{j}]: runner {r.type!r} cannot score tokens, so it cannot "
                        "measure perplexity or lm-eval accuracy"
                    )
        if entry is not None and entry.random_model_refusal:
            given = r.args or {}
            missing = [k for k in entry.random_model_unless if not given.get(k)]
            for j, m in enumerate(suite.models):
                if m.id.startswith("random:") and (missing or not entry.random_model_unless):
                    fix = (f"; set runners[{i}].args.{' and args.'.join(missing)}" if missing
                           else "; give a local model directory, an embedded model or a hub id")
                    errors.append(f"{source}: models[{j}] ({m.id}) x runners[{i}] ({r.type}): "
                                  f"{entry.random_model_refusal}{fix}")
        for j, load in enumerate(suite.loads):
            if entry is not None and load.kind not in entry.loads:
                errors.append(
                    f"{source}: loads[{j}]: runner {r.type!r} cannot drive a {load.kind} load "
                    f"(it supports: {', '.join(entry.loads)})"
                )
    for what, items in (("models", suite.models), ("runners", suite.runners), ("workloads", suite.workloads)):
        names = [it.display_name for it in items]
        dups = sorted({n for n in names if names.count(n) > 1})
        if dups:
            errors.append(f"{source}: {what}: duplicate names {dups}; give each a distinct 'name'")
    for i, w in enumerate(suite.workloads):
        errors += _task_errors(i, w, source)
        if w.source == "text" and w.text_file and not Path(w.text_file).expanduser().is_file():
            errors.append(f"{source}: workloads[{i}].text_file: no such file {w.text_file!r}")
        if w.source == "random" and w.text_file:
            errors.append(f"{source}: workloads[{i}].text_file: only used with source: text")
    if errors:
        raise SuiteError("\n".join(errors))


def _task_errors(i: int, w: WorkloadConfig, source: str) -> list[str]:
    """lm-eval task names that no registry knows: refused here, not after the performance cells ran."""
    if w.lm_eval is None:
        return []
    where = f"{source}: workloads[{i}].lm_eval"
    inc = w.lm_eval.include_path
    if inc and not Path(inc).expanduser().is_dir():
        return [f"{where}.include_path: no such folder {inc!r}"]
    from moecap.quality.tasks import UnknownTaskError, offline_task_names, task_manager_for

    rest = [t for t in w.lm_eval.tasks if t not in offline_task_names()]
    if not rest:
        return []
    try:
        task_manager_for(rest, str(Path(inc).expanduser()) if inc else None)
    except ImportError:
        return [f"{where}.tasks: lm-eval is not installed (pip install 'moecap[quality]'), so tasks "
                f"{rest} cannot be checked or run"]
    except UnknownTaskError as err:
        return [f"{where}.tasks: {err}"]
    return []


def _entry_errors(raw: dict[str, Any], source: str) -> list[str]:
    """Model and runner checks on the well-formed entries of a suite that failed validation elsewhere,
    so that one run of the validator reports every problem."""
    errors: list[str] = []
    for key, cls, check in (("models", ModelConfig, _model_errors), ("runners", RunnerConfig, _runner_errors)):
        items = raw.get(key)
        for i, item in enumerate(items if isinstance(items, list) else []):
            try:
                entry = cls.model_validate(item)
            except ValidationError:
                continue  # already reported
            errors += check(i, entry, source)
    return errors


def parse_suite(raw: Any, source: str) -> Suite:
    if not isinstance(raw, dict):
        raise SuiteError(f"{source}: a suite is a YAML mapping (name, models, runners, workloads, loads, ...)")
    try:
        suite = Suite.model_validate(raw)
    except ValidationError as err:
        lines = [format_validation_error(err, Suite, source)] + _entry_errors(raw, source)
        raise SuiteError("\n".join(lines)) from None
    validate_semantics(suite, source)
    suite.source = source
    return suite


def load_suite(spec: str, overrides: list[str] | None = None) -> Suite:
    path = resolve_suite_path(spec)
    source = str(path)
    from moecap import safe_yaml

    try:
        raw = safe_yaml.load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise SuiteError(f"{source}: not UTF-8 text (byte {err.start}: {err.reason}); save the suite as UTF-8") from None
    except OSError as err:
        raise SuiteError(f"{source}: cannot read it: {err.strerror or err}") from None
    except yaml.YAMLError as err:
        raise SuiteError(f"{source}: not valid YAML: {err}") from None
    if overrides:
        raw = apply_overrides(raw if isinstance(raw, dict) else {}, list(overrides), source)
    return parse_suite(raw, source)
