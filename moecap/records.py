"""Result records: one JSON file per cell (DESIGN.md section 3), written atomically.

Layout under the suite's output folder::

    <dir>/<suite>/<cell_id>.json              the record
    <dir>/<suite>/<cell_id>/passes.jsonl      per-pass trace (timings, expert counts, bytes, FLOPs)
    <dir>/<suite>/<cell_id>/requests.jsonl    per-request trace (send time, token timestamps)

Loaders tolerate unknown keys, so older moecap versions read newer records.
"""

from __future__ import annotations

import json
import logging
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Literal

from pydantic import BaseModel, ConfigDict, Field

from moecap.paths import atomic_write_text

SCHEMA_VERSION = 1
log = logging.getLogger(__name__)


class Record(BaseModel):
    model_config = ConfigDict(extra="allow")

    schema_version: int = SCHEMA_VERSION
    run_id: str
    created_at: str
    suite: dict[str, Any]
    cell_id: str
    status: Literal["ok", "failed", "skipped"]
    error: str | None = None
    config: dict[str, Any] = Field(default_factory=dict)
    environment: dict[str, Any] = Field(default_factory=dict)
    report: dict[str, Any] = Field(default_factory=dict)
    artifacts: dict[str, str] = Field(default_factory=dict)


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
        path = self.record_path(record.cell_id)
        atomic_write_text(path, record.model_dump_json(indent=2) + "\n")
        return path


def iter_record_files(root: str | Path) -> list[Path]:
    """Every record JSON under ``root`` (a file or a folder, searched recursively)."""
    root = Path(root)
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*.json") if not p.name.startswith("."))


def load_records(root: str | Path) -> list[tuple[Path, Record]]:
    """Load every record under ``root``; unreadable or foreign JSON files are skipped with a warning."""
    out: list[tuple[Path, Record]] = []
    for path in iter_record_files(root):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            log.warning("skipping %s: not readable JSON (%s)", path, err)
            continue
        if not isinstance(data, dict) or "schema_version" not in data or "cell_id" not in data:
            continue
        try:
            rec = Record.model_validate(data)
        except Exception as err:
            log.warning("skipping %s: not a moecap record (%s)", path, err)
            continue
        out.append((path, rec))
    return out
