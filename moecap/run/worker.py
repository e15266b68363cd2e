"""``python -m moecap.run.worker FD``: a worker subprocess of the local executor (moecap.run.local_executor).

It reads a unit spec (JSON, :func:`moecap.run.unit_spec`) from standard input, measures the unit's
cells with :func:`moecap.run.run_unit` and writes one JSON event per line to the pipe ``FD``
(``loading``, ``loaded``, ``start``, ``result``, then ``done``). Its own standard output is sent to
standard error, so that nothing a library prints can mix with the events; after each cell's output it
writes a marker line (``CELL_END``) there, so that the driver can file that output as the cell's log.

It runs in its own session (the driver kills its whole process group on a timeout or an interrupt);
SIGTERM raises ``SystemExit`` so that the runner is closed and the servers it launched are stopped; and
it kills its process group as soon as its driver is gone (even SIGKILLed), so no worker outlives the
``moecap run`` that started it (servers it launched follow through their guard).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from typing import Any

PARENT_POLL_S = 0.5
# written to the output stream after a cell's output, before its result event (the local executor splits
# the worker's output into each cell's cell.log there); \x1e (record separator) never starts a log line
CELL_END = "\x1emoecap-cell-end:"


def _watch_parent(parent: int) -> None:
    while True:
        time.sleep(PARENT_POLL_S)
        if os.getppid() != parent:
            try:
                from moecap.runners.server import stop_all

                stop_all(timeout_s=5)
            finally:
                os.killpg(0, signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not args[0].isdigit():
        print("usage: python -m moecap.run.worker FD  (the unit spec on standard input)", file=sys.stderr)
        return 2
    fd = int(args[0])
    os.set_inheritable(fd, False)
    events = os.fdopen(fd, "w", encoding="utf-8")
    sys.stdout.flush()
    os.dup2(2, 1)

    def on_term(signum: int, frame: Any) -> None:
        if sys.is_finalizing():  # already exiting: nothing left to close, and no traceback from atexit hooks
            os._exit(128 + signum)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True, name="moecap-parent-watch").start()
    spec = json.load(sys.stdin)

    def emit(event: dict[str, Any]) -> None:
        if event.get("event") == "result":  # the cell's output ends here: mark it for the driver's cell.log
            sys.stdout.flush()
            sys.stderr.flush()
            os.write(2, f"\n{CELL_END}{event.get('cell_id')}\n".encode())
        events.write(json.dumps(event, separators=(",", ":")) + "\n")
        events.flush()

    from moecap.run.measure import run_unit

    run_unit(spec, emit)  # closes the runner (and stops its servers) before it returns
    emit({"event": "done"})
    events.close()
    sys.stdout.flush()
    sys.stderr.flush()
    # everything is recorded and released: skip the interpreter's teardown (seconds with torch loaded)
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
