"""Result records: one JSON file per cell (DESIGN.md section 3), written atomically.

Layout under the suite's output folder::

    <dir>/<suite>/<cell_id>.json              the record
    <dir>/<suite>/<cell_id>/passes.jsonl      per-pass trace (timings, expert counts, bytes, FLOPs)
    <dir>/<suite>/<cell_id>/requests.jsonl    per-request trace (send time, token timestamps)

    <dir>/<suite>/.moecap/claims/<cell_id>.lock     a cell being run (an flock(2) lock, see ``Claim``)
    <dir>/<suite>/.moecap/runs/<run_id>.json        a run's manifest (see ``RunManifest``)
    <dir>/<suite>/.moecap/runs/<run_id>.lock        held by the live process driving that run

Loaders tolerate unknown keys, so older moecap versions read newer records. Only the process that
drives a run (``moecap run``) writes into the store, never a worker: each record lands atomically
(temp file + rename) after its artifacts, so a record on disk always has its artifacts beside it.

Concurrent writers: several ``moecap run`` processes may share one results folder. Before a cell is
run, its driver takes the cell's *claim*, an exclusive ``flock`` on ``.moecap/claims/<cell_id>.lock``,
and keeps it until the cell's record is written. A second process that cannot take the claim leaves
the cell alone; one that can re-reads the cell's record first (it may have been finished meanwhile).
The kernel drops the lock when its holder dies, however it dies (SIGKILL, node lost), so a dead
process's claims are simply taken over: there is nothing stale to clean. Claim files are never removed
(removing a lock file while another process opens it would let two holders in). On NFS the folder
needs working locks (NFSv4).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator, with_config
from typing_extensions import TypedDict

from moecap.paths import atomic_write_text

# 2: ITL one gap per streamed chunk (itl_per_token_ms beside it), duration from the first dispatch to the
#    end of the last request (failed ones included), empty latency sets 0 with n 0, report.basis
SCHEMA_VERSION = 2
log = logging.getLogger(__name__)

_OPEN = ConfigDict(extra="allow")


# The report, typed: what every figure in moecap.figures reads has its type here; sections keep keys this
# version does not know (newer records load), and a value of the wrong type fails the record naming it.
@with_config(_OPEN)
class Stats(TypedDict, total=False):
    n: int
    mean: float | None
    std: float | None
    median: float | None
    p90: float | None
    p99: float | None


@with_config(_OPEN)
class Throughput(TypedDict, total=False):
    completed: int
    failed: int
    duration_s: float
    input_tokens: int
    output_tokens: int
    output_tokens_per_s: float | None
    total_tokens_per_s: float | None
    requests_per_s: float | None
    goodput_requests_per_s: float | None
    slo_ms: dict[str, float]


@with_config(_OPEN)
class Phase(TypedDict, total=False):
    s_mbu: float | None
    s_mfu: float | None
    achieved_bandwidth_gbs: float | None
    achieved_tflops: float | None
    mean_active_experts_per_layer: float | None
    time_s: float


@with_config(_OPEN)
class Utilization(TypedDict, total=False):
    basis: Literal["traced", "recorded", "estimated"]
    available: bool
    reason: str
    prefill: Phase
    decode: Phase
    peak: dict[str, Any]


@with_config(_OPEN)
class Energy(TypedDict, total=False):
    available: bool
    joules_per_output_token: float | None


@with_config(_OPEN)
class Cost(TypedDict, total=False):
    available: bool
    usd_per_1m_output_tokens: float | None


@with_config(_OPEN)
class Report(TypedDict, total=False):
    latency: dict[str, Stats]
    throughput: Throughput
    pass_latency: dict[str, Stats]
    utilization: Utilization
    energy: Energy
    cost: Cost
    memory: dict[str, Any]
    quality: dict[str, Any]
    tracing: dict[str, Any]
    model: dict[str, Any]
    server: dict[str, Any]
    per_model: dict[str, Any]
    client: dict[str, Any]
    errors: dict[str, int]
    requests: dict[str, Any]
    basis: dict[str, Literal["measured", "traced", "recorded", "estimated"]]
    notes: list[str]


SCHEMA_1_NOTE = ("schema 1: itl_ms counted a chunk of k tokens as one gap and k-1 zeros, and the duration "
                 "(so every throughput) ended at the last successful request")


def migrate(data: dict[str, Any]) -> dict[str, Any]:
    """A record dict of an older schema brought to :data:`SCHEMA_VERSION` (the one migration every
    loader goes through). Schema 1 -> 2: the report gains ``basis``; its figures stay as they were
    measured, with a note on the two definitions that changed."""
    version = data.get("schema_version")
    if not isinstance(version, int) or version >= SCHEMA_VERSION:
        return data
    out = dict(data)
    report = dict(out.get("report") or {})
    if version < 2 and report:
        from moecap import figures

        report.setdefault("basis", figures.bases(report))
        if "latency" in report or "throughput" in report:
            report["notes"] = [*report.get("notes", []), SCHEMA_1_NOTE]
    out["report"] = report
    out["migrated_from"] = version
    out["schema_version"] = SCHEMA_VERSION
    return out


class Record(BaseModel):
    model_config = ConfigDict(extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _migrate(cls, data: Any) -> Any:
        return migrate(data) if isinstance(data, dict) else data

    schema_version: int = SCHEMA_VERSION
    run_id: str
    created_at: str
    suite: dict[str, Any]
    cell_id: str
    status: Literal["ok", "failed", "skipped"]
    error: str | None = None
    config: dict[str, Any] = Field(default_factory=dict)
    environment: dict[str, Any] = Field(default_factory=dict)
    report: Report = Field(default_factory=dict)
    artifacts: dict[str, str] = Field(default_factory=dict)
    # A failed record may carry ``failure``: {"kind": exception | timeout | worker_died | node_died |
    # unschedulable, "attempts": N, ...} (moecap.run.driver says what each kind means); an extra key.


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class ResultStore:
    """The records of one suite: ``<root>/<suite>/``."""

    def __init__(self, root: str | Path, suite: str):
        self.dir = Path(root) / suite

    def record_path(self, cell_id: str) -> Path:
        return self.dir / f"{cell_id}.json"

    def artifact_dir(self, cell_id: str) -> Path:
        return self.dir / cell_id

    def load(self, cell_id: str) -> Record | None:
        path = self.record_path(cell_id)
        if not path.is_file():
            return None
        try:
            return Record.model_validate_json(path.read_text(encoding="utf-8"))
        except Exception as err:  # a corrupt file is not a finished cell
            log.warning("ignoring unreadable record %s: %s", path, err)
            return None

    def is_done(self, cell_id: str) -> bool:
        rec = self.load(cell_id)
        return rec is not None and rec.status == "ok"

    def write_artifact(self, cell_id: str, name: str, rows: Iterable[dict[str, Any]]) -> str:
        """Write a JSONL artifact atomically; return its path relative to the store."""
        path = self.artifact_dir(cell_id) / name
        atomic_write_text(path, "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in rows))
        return str(path.relative_to(self.dir))

    def write_text_artifact(self, cell_id: str, name: str, text: str) -> str:
        """Write a text artifact (e.g. a server's log) atomically; return its path relative to the store."""
        path = self.artifact_dir(cell_id) / name
        atomic_write_text(path, text)
        return str(path.relative_to(self.dir))

    def write(self, record: Record) -> Path:
        """Write a record atomically, every secret in it redacted (``moecap.redact``): its runner arguments,
        its command line, its error text."""
        from moecap.redact import redact

        path = self.record_path(record.cell_id)
        data = json.loads(record.model_dump_json())  # JSON as pydantic writes it (NaN and inf as null)
        data = {**data, **{k: redact(data[k]) for k in ("config", "environment", "error") if k in data}}
        atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
        return path

    def write_result(self, record: Record, files: dict[str, str]) -> Path:
        """Write a cell's artifact files (paths relative to the store, text contents), then its record:
        each atomically, the record last."""
        root = self.dir.resolve()
        for rel, text in files.items():
            path = (self.dir / rel).resolve()
            if root not in path.parents:
                raise ValueError(f"artifact path {rel!r} leaves the results folder {self.dir}")
            atomic_write_text(path, text)
        return self.write(record)

    # -- coordination between processes sharing the folder ---------------------------------------
    @property
    def state_dir(self) -> Path:
        return self.dir / ".moecap"

    def claim(self, cell_id: str, run_id: str) -> "Claim | None":
        """Take the cell's claim (non-blocking); None when a live process holds it."""
        return Claim.acquire(self.state_dir / "claims" / f"{cell_id}.lock", {"cell_id": cell_id, "run_id": run_id})

    def claim_holder(self, cell_id: str) -> dict[str, Any]:
        """Who last took the cell's claim (pid, host, run_id), for messages; {} if unknown."""
        return Claim.read(self.state_dir / "claims" / f"{cell_id}.lock")

    def runs_dir(self) -> Path:
        return self.state_dir / "runs"

    def manifests(self) -> list["RunManifest"]:
        """Every run manifest of this suite's folder, most recently started first."""
        out = []
        for path in self.runs_dir().glob("*.json"):
            try:
                out.append(RunManifest.model_validate_json(path.read_text(encoding="utf-8")))
            except Exception as err:
                log.warning("ignoring unreadable run manifest %s: %s", path, err)
        return sorted(out, key=lambda m: (m.started_at, m.run_id), reverse=True)

    def write_manifest(self, manifest: "RunManifest") -> Path:
        manifest.updated_at = now_iso()
        path = self.runs_dir() / f"{manifest.run_id}.json"
        atomic_write_text(path, manifest.model_dump_json(indent=2) + "\n")
        return path

    def lock_run(self, run_id: str) -> "Claim | None":
        """The lock its live driver holds on a run; None when a live process drives that run."""
        return Claim.acquire(self.runs_dir() / f"{run_id}.lock", {"run_id": run_id})


def _holder_info(extra: dict[str, Any]) -> dict[str, Any]:
    return {**extra, "pid": os.getpid(), "host": socket.gethostname(), "since": now_iso()}


class Claim:
    """An exclusive, non-blocking ``flock(2)`` on a small file, held until ``release()`` or the holder's
    death. The file's text says who took it last (for messages only: the lock is the truth)."""

    def __init__(self, path: Path, fd: int):
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, path: Path, info: dict[str, Any]) -> "Claim | None":
        import fcntl

        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        try:
            data = json.dumps(_holder_info(info)).encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
        except OSError:  # the note is informative only
            pass
        return cls(path, fd)

    @staticmethod
    def read(path: Path) -> dict[str, Any]:
        try:
            data = json.loads(path.read_text(encoding="utf-8") or "{}")
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is None:
            return
        import fcntl

        fd, self._fd = self._fd, None
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> "Claim":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


class RunManifest(BaseModel):
    """One ``moecap run`` of a suite into a results folder: which cells it set out to run and whether it
    finished. Written atomically when the run starts, when it is resumed and when it ends. A run whose
    status is not ``finished`` and whose lock (``ResultStore.lock_run``) no live process holds was
    interrupted (Ctrl-C, SIGTERM, SIGKILL, a lost machine): ``moecap run --resume`` continues it."""

    model_config = ConfigDict(extra="allow")

    manifest_version: int = 1
    run_id: str
    suite: str
    source: str | None = None
    cells: list[str]
    """Every cell of the suite as run (ids)."""
    todo: list[str]
    """The cells this run set out to run (the others already had an ok record)."""
    status: Literal["running", "finished", "interrupted"] = "running"
    reason: str | None = None
    started_at: str
    updated_at: str | None = None
    ended_at: str | None = None
    executor: dict[str, Any] = Field(default_factory=dict)
    drivers: list[dict[str, Any]] = Field(default_factory=list)
    """Each process that drove the run (the first, then each ``--resume``): pid, host, argv, when."""

    @staticmethod
    def driver_info(argv: list[str]) -> dict[str, Any]:
        from moecap.redact import redact

        return _holder_info({"argv": redact(list(argv))})


def iter_record_files(root: str | Path) -> list[Path]:
    """Every record JSON under ``root`` (a file or a folder, searched recursively)."""
    root = Path(root)
    if root.is_file():
        return [root]
    # hidden files and folders (temp files, .moecap/ run state) are never records
    return sorted(p for p in root.rglob("*.json") if not any(x.startswith(".") for x in p.relative_to(root).parts))


def _one_line(err: Exception) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= 400 else text[:400] + " ..."


def scan_records(root: str | Path) -> tuple[list[tuple[Path, Record]], list[tuple[Path, str]]]:
    """(every record under ``root``, every file that should have been one and is not: (path, why)).
    A file is a record candidate when it is JSON with a ``cell_id``, or when it is not readable JSON at
    all (a truncated record); JSON without ``cell_id`` is someone else's file and is left out."""
    out: list[tuple[Path, Record]] = []
    bad: list[tuple[Path, str]] = []
    for path in iter_record_files(root):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as err:
            bad.append((path, f"not readable JSON ({_one_line(err)})"))
            continue
        if not isinstance(data, dict) or "cell_id" not in data:
            continue
        if "schema_version" not in data:
            bad.append((path, "a record without schema_version"))
            continue
        try:
            rec = Record.model_validate(data)
        except Exception as err:
            bad.append((path, f"not a valid moecap record ({_one_line(err)})"))
            continue
        out.append((path, rec))
    return out, bad


def load_records(root: str | Path) -> list[tuple[Path, Record]]:
    """Load every record under ``root``; unreadable or invalid record files are skipped with a warning
    (:func:`scan_records` returns them too)."""
    out, bad = scan_records(root)
    for path, why in bad:
        log.warning("skipping %s: %s", path, why)
    return out
