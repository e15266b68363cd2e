"""``python -m moecap.runners.server_guard PARENT_PID GRACE_S -- CMD ...``: run a server so that it cannot
outlive the process that launched it, even when that process is SIGKILLed (which no handler can catch).

The guard is the leader of the server's process group (:class:`~moecap.runners.server.ServerProcess`
starts it in a new session). It runs ``CMD`` as its child, in the same group, and watches its own
parent: once ``PARENT_PID`` is no longer its parent (the launcher died and the guard was re-parented),
it sends SIGTERM to the whole group and to every process that carries the server's tag
(``MOECAP_SERVER_TAG``: the ones the server detached with ``setsid``), waits up to ``GRACE_S`` for the
server to exit, then SIGKILLs them all (the group, itself included, last). Otherwise it mirrors the server: a SIGTERM/SIGINT sent to the group
reaches the server directly, one sent to the guard alone is forwarded, and the guard exits with the
server's exit status.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from moecap.runners.server import TAG_ENV, kill_tagged

POLL_S = 0.2


def _kill_group(grace_s: float, child: subprocess.Popen) -> None:
    tag = os.environ.get(TAG_ENV)
    try:
        os.killpg(0, signal.SIGTERM)
    except ProcessLookupError:
        pass
    end = time.monotonic() + grace_s
    while time.monotonic() < end and child.poll() is None:
        time.sleep(0.05)
    if tag:  # detached descendants: out of the group, but tagged
        kill_tagged(tag, grace_s=max(0.0, end - time.monotonic()))
    os.killpg(0, signal.SIGKILL)  # the guard goes with the group


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 4 or args[2] != "--":
        print("usage: python -m moecap.runners.server_guard PARENT_PID GRACE_S -- CMD ...", file=sys.stderr)
        return 2
    parent, grace_s, cmd = int(args[0]), float(args[1]), args[3:]
    if os.getppid() != parent:  # the launcher is already gone
        return 1
    child: subprocess.Popen | None = None

    def forward(signum: int, frame: object) -> None:
        if child is not None and child.poll() is None:
            try:
                child.send_signal(signum)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    try:
        child = subprocess.Popen(cmd)
    except OSError as err:
        print(f"moecap server guard: cannot start {cmd[0]!r}: {err}", file=sys.stderr, flush=True)
        return 127
    while True:
        try:
            rc = child.wait(timeout=POLL_S)
            break
        except subprocess.TimeoutExpired:
            pass
        if os.getppid() != parent:
            print(f"moecap server guard: launcher {parent} is gone; stopping the server group", file=sys.stderr,
                  flush=True)
            _kill_group(grace_s, child)
    return rc if rc >= 0 else 128 - rc


if __name__ == "__main__":
    sys.exit(main())
