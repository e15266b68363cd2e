"""Publish validated records to a results folder or a Hugging Face dataset.

Layout kept at the target (the same as ``moecap run`` writes)::

    <target>/<suite>/<cell_id>.json
    <target>/<suite>/<cell_id>/...        the record's artifacts (passes.jsonl, requests.jsonl)

Every record is validated first; if any is invalid nothing is written and the ValueError lists
every problem.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from pydantic import ValidationError

from moecap.records import Record, iter_record_files

_SAFE_NAME = re.compile(r"^[A-Za-z0-9._+=@-]+$")
STATUSES = ("ok", "failed", "skipped")


def _problems(path: Path) -> tuple[Record | None, list[str]]:
    """(record, problems) for one record file; each problem names the file and the field."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return None, [f"{path}: not readable JSON ({err})"]
    if not isinstance(data, dict):
        return None, [f"{path}: not a record (top level is {type(data).__name__}, not an object)"]
    problems: list[str] = []
    status = data.get("status")
    if status not in STATUSES:
        problems.append(f"{path}: field 'status' is {status!r}; must be one of {', '.join(STATUSES)}")
    try:
        rec = Record.model_validate(data)
    except ValidationError as err:
        for e in err.errors():
            loc = ".".join(str(x) for x in e["loc"]) or "<root>"
            if loc == "status" and problems:
                continue
            problems.append(f"{path}: field '{loc}': {e['msg']}")
        return None, problems
    if rec.status == "failed" and not (rec.error or "").strip():
        problems.append(f"{path}: field 'error' is required when status is 'failed'")
    suite = rec.suite.get("name") if isinstance(rec.suite, dict) else None
    if not isinstance(suite, str) or not _SAFE_NAME.match(suite):
        problems.append(f"{path}: field 'suite.name' is {suite!r}; must be a plain folder name")
    if not _SAFE_NAME.match(rec.cell_id):
        problems.append(f"{path}: field 'cell_id' is {rec.cell_id!r}; must be a plain file name")
    elif path.stem != rec.cell_id:
        problems.append(f"{path}: field 'cell_id' is {rec.cell_id!r} but the file is named {path.name!r}")
    for name, rel in rec.artifacts.items():
        p = Path(rel)
        if p.is_absolute() or ".." in p.parts:
            problems.append(f"{path}: field 'artifacts.{name}' ({rel!r}) must be relative to the suite folder")
        elif not (path.parent / p).is_file():
            problems.append(f"{path}: field 'artifacts.{name}': file {path.parent / p} is missing")
    return (rec if not problems else None), problems


def validate_record(path: str | Path) -> Record:
    """The record at ``path``, validated; ValueError naming the file and the field(s) otherwise."""
    rec, problems = _problems(Path(path))
    if problems:
        raise ValueError("invalid record:\n  " + "\n  ".join(problems))
    assert rec is not None
    return rec


@dataclass
class _Item:
    src: Path
    record: Record
    suite: str
    files: list[tuple[Path, str]] = field(default_factory=list)  # (source file, path relative to target)

    @property
    def rel(self) -> str:
        return f"{self.suite}/{self.record.cell_id}.json"


def _collect(paths: Iterable[str | Path]) -> list[_Item]:
    files: list[Path] = []
    problems: list[str] = []
    if isinstance(paths, (str, Path)):
        paths = [paths]
    for p in paths:
        p = Path(p).expanduser()
        if not p.exists():
            problems.append(f"{p}: no such file or folder")
            continue
        found = iter_record_files(p)
        if p.is_dir():  # artifact folders hold .jsonl only, but never treat a file inside one as a record
            found = [f for f in found if f.parent == p or not (f.parent.parent / f"{f.parent.name}.json").is_file()]
        files.extend(found)
    seen: dict[str, _Item] = {}
    items: list[_Item] = []
    for f in dict.fromkeys(files):
        if f.is_symlink():
            problems.append(f"{f}: a symbolic link; publish copies regular files only")
            continue
        f = f.resolve()
        rec, probs = _problems(f)
        problems.extend(probs)
        if rec is None:
            continue
        item = _Item(f, rec, rec.suite["name"])
        if item.rel in seen:
            problems.append(f"{f}: field 'cell_id' {rec.cell_id!r} of suite {item.suite!r} is also in {seen[item.rel].src}")
            continue
        seen[item.rel] = item
        art_dir = f.parent / rec.cell_id
        extra: dict[str, Path] = {}
        if art_dir.is_dir():
            for a in sorted(art_dir.rglob("*")):
                if (a.is_file() or a.is_symlink()) and not a.name.startswith("."):
                    extra[a.relative_to(f.parent).as_posix()] = a
        for rel in rec.artifacts.values():
            extra.setdefault(Path(rel).as_posix(), f.parent / rel)
        root = f.parent.resolve()
        for rel, src in extra.items():  # only regular files inside the results folder leave it
            if src.is_symlink():
                problems.append(f"{src}: a symbolic link; publish copies regular files only")
            elif root not in src.resolve().parents:
                problems.append(f"{src}: outside the results folder {root}")
        item.files = [(src, f"{item.suite}/{rel}") for rel, src in extra.items()]
        items.append(item)
    if not items and not problems:
        problems.append("no records found under " + ", ".join(str(p) for p in paths))
    if problems:
        raise ValueError(f"publish aborted, nothing written: {len(problems)} problem(s):\n  " + "\n  ".join(problems))
    return items


def _atomic_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _stage(items: list[_Item], root: Path) -> None:
    """Copy the items under ``root``: artifacts first, then the record (so a record never points at missing
    files), the record written again with every secret redacted (records of older versions may hold them)."""
    from moecap.paths import atomic_write_text
    from moecap.redact import redact

    for item in items:
        for src, rel in item.files:
            _atomic_copy(src, root / rel)
        data = json.loads(item.src.read_text(encoding="utf-8"))
        atomic_write_text(root / item.rel, json.dumps(redact(data), indent=2, ensure_ascii=False) + "\n")


def _publish_local(items: list[_Item], root: Path) -> None:
    """All or nothing: everything is copied into a staging folder beside the target first (where a
    missing file, a full disk or a permission fails it and the target is left as it was), then moved
    into place, artifacts before records."""
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".moecap-publish-", dir=root))
    try:
        _stage(items, staging)
        moved = sorted((p for p in staging.rglob("*") if p.is_file()),
                       key=lambda p: (p.suffix == ".json" and p.parent.parent == staging, str(p)))
        for p in moved:
            dst = root / p.relative_to(staging)
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(p, dst)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


class PublishError(RuntimeError):
    """The target could not take the records (unreachable, refused, out of space): nothing was published."""


def _one_line(err: BaseException) -> str:
    """An exception as one line: its type, the first line of its message and of its cause's (hub errors
    carry whole pages)."""
    text = " ".join(str(err).split("\n")[:1]).strip() or type(err).__name__
    root = err.__cause__ or err.__context__
    if root is not None and str(root).strip() and str(root).strip() not in text:
        text += f" ({str(root).strip().splitlines()[0]})"
    return f"{type(err).__name__}: {text}"


_HF_TARGET = re.compile(r"^hf://datasets/(?P<repo>[^/@]+/[^/@]+)(?:@(?P<rev>[^/]+))?(?:/(?P<sub>.*))?$")


def publish(paths: Iterable[str | Path], target: str | Path, message: str | None = None, token: str | None = None) -> list[str]:
    """Validate the records under ``paths`` (files or folders) and publish them to ``target``.

    ``target``: a local folder, or ``hf://datasets/<org>/<name>[@revision][/subfolder]`` (one commit
    with ``HfApi.upload_folder``, token from ``token`` or ``$HF_TOKEN``). Returns the published record
    locations (local paths, or ``hf://...`` addresses). Any invalid record aborts before anything is written.
    """
    items = _collect(paths)
    target_s = str(target)
    if target_s.startswith("hf://"):
        m = _HF_TARGET.match(target_s.strip())
        if not m:
            raise ValueError(f"not a Hugging Face dataset address: {target_s!r} (want hf://datasets/<org>/<name>)")
        repo_id, rev, sub = m["repo"], m["rev"], (m["sub"] or "").strip("/") or None
        from huggingface_hub import HfApi
        from huggingface_hub.utils import logging as hub_logging

        # the hub client retries a failed connection a few times, logging each retry: the outcome is ours to say
        hub_logging.set_verbosity_error()
        api = HfApi(token=token or os.environ.get("HF_TOKEN"))
        n = len(items)
        suites = sorted({i.suite for i in items})
        msg = message or f"moecap: publish {n} record{'s' if n != 1 else ''} ({', '.join(suites)})"
        with tempfile.TemporaryDirectory(prefix="moecap-publish-") as tmp:
            _stage(items, Path(tmp))
            try:  # one commit: the hub takes every file or none
                api.upload_folder(
                    folder_path=tmp,
                    repo_id=repo_id,
                    repo_type="dataset",
                    revision=rev,
                    path_in_repo=sub,
                    commit_message=msg,
                )
            except Exception as err:  # offline, unknown repo, no or bad token, refused push
                raise PublishError(f"cannot publish to hf://datasets/{repo_id}: {_one_line(err)}") from err
        prefix = f"hf://datasets/{repo_id}" + (f"@{rev}" if rev else "") + (f"/{sub}" if sub else "")
        return [f"{prefix}/{i.rel}" for i in items]
    root = Path(target_s).expanduser()
    try:
        _publish_local(items, root)
    except OSError as err:  # all or nothing: _publish_local leaves the target as it was
        raise PublishError(f"cannot publish to {root}: {err.strerror or err}") from err
    return [str(root / i.rel) for i in items]


__all__ = ["validate_record", "publish", "PublishError", "STATUSES"]
