"""Server subprocesses that never outlive the harness.

:class:`ServerProcess` launches a command in its own process group (``start_new_session=True``), sends
its stdout and stderr to a log file, waits until an HTTP endpoint answers, and stops the whole group
(SIGTERM, then SIGKILL after a timeout), reaping the leader. A process the server detaches from the group
(``setsid``, a double fork) is still found and stopped: every launched command carries a tag of its own
in its environment (``MOECAP_SERVER_TAG``), which its descendants inherit wherever they move. Every started server sits in a module-level
registry until it is stopped; the registry is emptied by an ``atexit`` hook and by SIGTERM/SIGINT
handlers, installed while at least one server is alive, which stop every server and then re-raise
``KeyboardInterrupt`` (SIGINT) or exit (SIGTERM). So Ctrl-C, a ``kill`` or an exception leave no orphan
behind (a SIGKILL of the harness itself cannot be caught: then the servers survive).
"""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import uuid
import urllib.request
from pathlib import Path
from typing import Any, Sequence

_LIVE: list["ServerProcess"] = []
_LOCK = threading.RLock()
_SAVED_HANDLERS: dict[int, Any] = {}
_ATEXIT_DONE = False


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_in_use(host: str, port: int) -> bool:
    """Whether something already listens on ``host:port`` (a bind to it fails)."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT leftovers are not listeners
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def listeners(port: int) -> list[int]:
    """PIDs of the processes listening on TCP ``port`` (any address) that this user may see."""
    import psutil

    pids = set()
    for c in psutil.net_connections(kind="tcp"):
        if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid:
            pids.add(c.pid)
    return sorted(pids)


TAG_ENV = "MOECAP_SERVER_TAG"


def tagged_pids(tag: str) -> list[int]:
    """PIDs of this user's processes whose environment carries ``MOECAP_SERVER_TAG=tag``: a server's
    descendants, wherever ``setsid`` or a double fork moved them."""
    import psutil

    needle = f"{TAG_ENV}={tag}".encode()
    out = []
    me = os.getpid()
    for pid in psutil.pids():
        if pid == me:
            continue
        try:  # /proc/PID/environ directly: psutil's environ() parses every variable of every process
            with open(f"/proc/{pid}/environ", "rb") as fh:
                if needle in fh.read().split(b"\0"):
                    out.append(pid)
        except OSError:  # gone, or another user's
            continue
    return out


def kill_tagged(tag: str, grace_s: float = 5.0) -> list[int]:
    """SIGTERM every process tagged ``tag``, SIGKILL what is left after ``grace_s``; return the PIDs
    that were found."""
    found = tagged_pids(tag)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in found:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        end = time.monotonic() + (grace_s if sig == signal.SIGTERM else 5.0)
        while time.monotonic() < end and any(_exists(pid) for pid in found):
            time.sleep(0.05)
    return found


def _exists(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie counts as gone: only its parent can reap it)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return False


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except (ProcessLookupError, PermissionError):
        return None


def live_servers() -> list["ServerProcess"]:
    with _LOCK:
        return list(_LIVE)


def stop_all(timeout_s: float = 15) -> None:
    """Stop every live server (last started first)."""
    for server in reversed(live_servers()):
        try:
            server.stop(timeout_s)
        except Exception:  # never let one failure keep the others alive
            pass


_INTERRUPTED: int | None = None  # the signal that stopped the servers, until reset_interrupt()


def reset_interrupt() -> None:
    global _INTERRUPTED
    _INTERRUPTED = None


def check_interrupted() -> None:
    """Raise again for a SIGINT/SIGTERM that stopped the servers, in case the first raise was swallowed
    (library code that catches BaseException): call it where results would otherwise be kept."""
    if _INTERRUPTED == signal.SIGINT:
        raise KeyboardInterrupt
    if _INTERRUPTED is not None:
        raise SystemExit(128 + _INTERRUPTED)


def _on_signal(signum: int, frame: Any) -> None:
    global _INTERRUPTED
    _INTERRUPTED = signum
    previous = _SAVED_HANDLERS.get(signum)
    stop_all()
    _restore_handlers()
    if callable(previous) and previous is not signal.default_int_handler:
        previous(signum, frame)
        return
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise SystemExit(128 + signum)


def _install_handlers() -> None:
    global _ATEXIT_DONE
    if not _ATEXIT_DONE:
        atexit.register(stop_all)
        _ATEXIT_DONE = True
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers can only be set from the main thread; atexit still covers us
    for sig in (signal.SIGINT, signal.SIGTERM):
        if sig in _SAVED_HANDLERS:
            continue
        try:
            _SAVED_HANDLERS[sig] = signal.signal(sig, _on_signal)
        except (ValueError, OSError):
            pass


def _restore_handlers() -> None:
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in list(_SAVED_HANDLERS):
        previous = _SAVED_HANDLERS.pop(sig)
        try:
            if signal.getsignal(sig) is _on_signal:
                signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        except (ValueError, OSError):
            pass


def _register(server: "ServerProcess") -> None:
    with _LOCK:
        _LIVE.append(server)
        _install_handlers()


def _unregister(server: "ServerProcess") -> None:
    with _LOCK:
        if server in _LIVE:
            _LIVE.remove(server)
        if not _LIVE:
            _restore_handlers()


class ServerProcess:
    """A command run as a server: own process group, logged output, readiness probe, group teardown."""

    def __init__(self, cmd: Sequence[str], log_path: str | os.PathLike, env: dict[str, str] | None = None,
                 cwd: str | None = None, guard: bool = True, orphan_grace_s: float = 10.0):
        self.cmd = [str(c) for c in cmd]
        self.guard = guard
        self.orphan_grace_s = orphan_grace_s
        self.log_path = Path(log_path)
        self.env = env
        self.cwd = cwd
        self.proc: subprocess.Popen | None = None
        self.pgid: int | None = None
        self.tag = f"{os.getpid()}-{uuid.uuid4().hex}"
        self._log = None

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> "ServerProcess":
        if self.proc is not None:
            raise RuntimeError("server already started")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab", buffering=0)
        self._log.write(f"$ {' '.join(self.cmd)}\n".encode())
        argv = self.cmd
        if self.guard:
            argv = [sys.executable, "-m", "moecap.runners.server_guard", str(os.getpid()),
                    str(self.orphan_grace_s), "--", *self.cmd]
        env = {**(self.env if self.env is not None else os.environ), TAG_ENV: self.tag}
        try:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self._log,
                                         stderr=subprocess.STDOUT, env=env, cwd=self.cwd,
                                         start_new_session=True)
        except Exception:
            self._log.close()
            self._log = None
            raise
        self.pgid = self.proc.pid  # a new session: the leader's pid is the group id
        _register(self)
        return self

    @property
    def pid(self) -> int | None:
        """The group leader's pid (the guard's, when guarded)."""
        return self.proc.pid if self.proc is not None else None

    def server_pids(self) -> list[int]:
        """The server's own process(es): the guard's children, or the leader when unguarded."""
        if self.proc is None:
            return []
        if not self.guard:
            return [self.proc.pid]
        try:
            import psutil

            return [c.pid for c in psutil.Process(self.proc.pid).children()]
        except Exception:
            return []

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tree_pids(self) -> set[int]:
        """Every live process of the server: the group leader and all its descendants."""
        if self.proc is None:
            return set()
        try:
            import psutil

            lead = psutil.Process(self.proc.pid)
            return {lead.pid, *(c.pid for c in lead.children(recursive=True))}
        except Exception:
            return set()

    def check_owns(self, port: int) -> None:
        """Raise unless the process listening on ``port`` is this server (or one of its children): a
        server that died at start-up must not leave its port to whatever else answers there."""
        ours = self.tree_pids()
        theirs = listeners(port)
        if not theirs:
            raise RuntimeError(f"nothing of this server listens on port {port} although the port answered; "
                               f"log {self.log_path}:\n{self.log_tail()}")
        if not set(theirs) & ours:
            raise RuntimeError(f"port {port} is answered by pid(s) {theirs}, not by the server moecap started "
                               f"(pids {sorted(ours)}): refusing to measure a process it did not launch; "
                               f"log {self.log_path}:\n{self.log_tail()}")

    def log_tail(self, n_chars: int = 4000) -> str:
        try:
            data = self.log_path.read_bytes()
        except OSError:
            return ""
        return data[-n_chars:].decode("utf-8", errors="replace")

    def wait_ready(self, url: str, deadline_s: float = 600, interval_s: float = 0.25) -> float:
        """Poll ``url`` until it answers 2xx; return the seconds waited. Raise (with the log tail) if the
        process exits first or ``deadline_s`` passes."""
        if self.proc is None:
            raise RuntimeError("server not started")
        t0 = time.monotonic()
        while True:
            code = self.proc.poll()
            if code is not None:
                raise RuntimeError(f"server exited with status {code} before {url} answered; "
                                   f"log {self.log_path}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    if 200 <= resp.status < 300:
                        return time.monotonic() - t0
            except (OSError, urllib.error.URLError, ValueError):
                pass
            if time.monotonic() - t0 > deadline_s:
                raise TimeoutError(f"{url} did not answer within {deadline_s} s; "
                                   f"log {self.log_path}:\n{self.log_tail()}")
            time.sleep(interval_s)

    def _group_alive(self) -> bool:
        if self.pgid is None:
            return False
        try:
            os.killpg(self.pgid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def stop(self, timeout_s: float = 15) -> int | None:
        """SIGTERM the whole group, SIGKILL it after ``timeout_s``, reap the leader, then stop every process
        the server detached from its group (found by its tag). Idempotent. Returns the leader's exit status
        (None if it never started)."""
        if self.proc is None:
            return None
        try:
            detached = [p for p in tagged_pids(self.tag) if _pgid(p) != self.pgid]
            for pid in detached:  # out of the group: it would not see the group's SIGTERM
                try:
                    os.kill(pid, signal.SIGTERM)
                except (ProcessLookupError, PermissionError):
                    pass
            if self._group_alive():
                self._signal_group(signal.SIGTERM)
                deadline = time.monotonic() + timeout_s
                while time.monotonic() < deadline:
                    self.proc.poll()  # reap the leader, or the group never looks empty
                    if not self._group_alive():
                        break
                    time.sleep(0.05)
                else:
                    self._signal_group(signal.SIGKILL)
            try:
                self.proc.wait(timeout=max(timeout_s, 5))
            except subprocess.TimeoutExpired:  # unkillable leader (D state): give up waiting
                pass
            # members that outlived a leader which exited on its own
            if self._group_alive():
                self._signal_group(signal.SIGKILL)
                end = time.monotonic() + 5
                while self._group_alive() and time.monotonic() < end:
                    time.sleep(0.05)
            kill_tagged(self.tag, grace_s=min(timeout_s, 5.0))  # what is left outside the group
        finally:
            _unregister(self)
            if self._log is not None:
                self._log.close()
                self._log = None
        return self.proc.returncode

    def __enter__(self) -> "ServerProcess":
        if self.proc is None:
            self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"ServerProcess(pid={self.pid}, cmd={self.cmd[:3]}..., log={str(self.log_path)!r})"
