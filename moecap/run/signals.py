"""Signals during a run: Ctrl-C / SIGTERM deferred while a record is written, SIGTERM as an orderly exit."""

from __future__ import annotations

import signal
import threading
from typing import Any, Callable


class DeferredSignals:
    """While an executor's driver loop runs: SIGINT and SIGTERM only set a flag, which the loop turns into
    ``KeyboardInterrupt`` / ``SystemExit(128 + signum)`` at a point of its choosing (:meth:`check`).

    An exception raised by a signal handler can land anywhere, also inside ``queue.Queue.get`` between
    the acquisition of its lock and the ``try`` that releases it; the lock then stays held and the
    clean-up that drains the queue waits for ever. The driver loops only wait on queues and on Ray with
    short timeouts, so a deferred signal is seen within one poll. Outside the main thread: nothing."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "DeferredSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    self._previous[sig] = signal.signal(sig, self._on_signal)
                except (ValueError, OSError):
                    pass
        return self

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum = signum

    def check(self) -> None:
        """Raise for a signal that arrived: ``KeyboardInterrupt`` for SIGINT, ``SystemExit`` for SIGTERM."""
        if self.signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.signum is not None:
            raise SystemExit(128 + self.signum)

    def __exit__(self, *exc: Any) -> None:
        for sig, previous in self._previous.items():
            try:
                if signal.getsignal(sig) == self._on_signal:
                    signal.signal(sig, previous)
            except (ValueError, OSError):
                pass
        self._previous.clear()


def _terminate_as_exit() -> tuple[Callable[[], None], list[int]]:
    """While a run goes on, SIGTERM raises ``SystemExit(143)`` (so workers, claims and the manifest are
    cleaned up as for Ctrl-C) instead of killing the process outright. Returns the undo, and a list that
    gets the signal number once one arrived."""
    got: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        return (lambda: None), got

    def on_term(signum: int, frame: Any) -> None:
        got.append(signum)
        raise SystemExit(128 + signum)

    try:
        previous = signal.signal(signal.SIGTERM, on_term)
    except (ValueError, OSError):
        return (lambda: None), got

    def restore() -> None:
        try:
            if signal.getsignal(signal.SIGTERM) is on_term:
                signal.signal(signal.SIGTERM, previous)
        except (ValueError, OSError):
            pass

    return restore, got
