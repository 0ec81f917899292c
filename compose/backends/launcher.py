"""Child processes of the local stack: started in their own process group, stopped with everything they spawned,
and (`Supervisor`) started again when they die."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Callable, Mapping, Sequence


class ServiceStartError(RuntimeError):
    """A child service exited or did not become ready in time."""


def free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ManagedProcess:
    """One service process. `ready()` is polled until it returns True; `stop()` ends its whole process group."""

    def __init__(self, name: str, argv: Sequence[str], *, ready: Callable[[], bool], log_path: Path | None = None,
                 env: Mapping[str, str] | None = None, timeout_s: float = 30.0):
        self.name = name
        log = open(log_path, "ab") if log_path else subprocess.DEVNULL
        try:
            # A new session: Ctrl-C on the terminal reaches the supervisor, which then stops us in order.
            self.process = subprocess.Popen(list(argv), stdout=log, stderr=log, start_new_session=True,
                                            env={**os.environ, **(env or {})})
        finally:
            if log_path:
                log.close()
        try:
            self._wait_ready(ready, timeout_s, log_path)
        except BaseException:
            self.stop()
            raise

    @property
    def pid(self) -> int:
        return self.process.pid

    def _wait_ready(self, ready: Callable[[], bool], timeout_s: float, log_path: Path | None) -> None:
        deadline = time.monotonic() + timeout_s
        where = f" (see {log_path})" if log_path else ""
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                last = _last_line(log_path)
                raise ServiceStartError(f"{self.name} exited with code {self.process.returncode} while starting"
                                        f"{': ' + last if last else ''}{where}")
            if ready():
                return
            time.sleep(0.05)
        raise ServiceStartError(f"{self.name} was not ready within {timeout_s:.0f} s{where}")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def _last_line(log_path: Path | None) -> str:
    """The last non-empty line a failed service wrote: usually its `error:` line."""
    if log_path is None or not log_path.exists():
        return ""
    lines = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


# A service that dies is started again after a back-off: RESTART_BACKOFF_S the first time, doubled after each restart
# (and after each failed try) up to RESTART_BACKOFF_MAX_S, and back to RESTART_BACKOFF_S once it has stayed up for
# RESTART_BACKOFF_RESET_S.
RESTART_BACKOFF_S = 0.5
RESTART_BACKOFF_MAX_S = 30.0
RESTART_BACKOFF_RESET_S = 60.0


@dataclass
class _Watched:
    name: str
    process: ManagedProcess
    respawn: Callable[[], ManagedProcess]
    log_path: Path | None
    up_since: float
    backoff_s: float = RESTART_BACKOFF_S
    retry_at: float | None = None          # set while the service is down, waiting for its back-off
    restarts: int = 0
    last_exit_code: int | None = None
    last_restart_at: str | None = None     # UTC, ISO 8601


class Supervisor:
    """Starts a watched service again when it exits, with back-off, and says so.

    Each service comes with ``respawn()``, which starts it again exactly as before (same port, same state folder);
    it returns once the new process is ready, or raises (`ServiceStartError`), and then the next try waits longer.
    Every exit and restart is written to the service's own log and to ``notify``, and ``report(name, fields)``
    receives the service's new ``pid``, ``status`` ("running" or "restarting"), ``restarts``, ``last_exit_code``
    and ``last_restart_at``. `check()` is one pass over the services, in the order they were watched (start a
    dependency, such as the chain, first); call it from one thread, in a loop."""

    def __init__(self, *, report: Callable[[str, dict], None] | None = None,
                 notify: Callable[[str], None] | None = None, clock: Callable[[], float] = time.monotonic):
        self._report = report or (lambda _name, _fields: None)
        self._notify = notify or (lambda _line: None)
        self._clock = clock
        self._services: dict[str, _Watched] = {}

    def watch(self, name: str, process: ManagedProcess, respawn: Callable[[], ManagedProcess], *,
              log_path: Path | None = None) -> None:
        """Watch ``process`` as service ``name`` (a service already watched under that name keeps its counts and
        is now this process: a deliberate restart)."""
        known = self._services.get(name)
        if known is not None:
            known.process, known.respawn, known.log_path = process, respawn, log_path
            known.up_since, known.retry_at = self._clock(), None
            return
        self._services[name] = _Watched(name=name, process=process, respawn=respawn, log_path=log_path,
                                        up_since=self._clock())

    def process(self, name: str) -> ManagedProcess | None:
        watched = self._services.get(name)
        return watched.process if watched else None

    def stop(self, name: str) -> None:
        """Stop service ``name`` and stop watching it."""
        watched = self._services.pop(name, None)
        if watched is not None:
            watched.process.stop()

    def status(self, name: str) -> dict:
        w = self._services[name]
        return {"pid": w.process.pid, "status": "restarting" if w.retry_at is not None else "running",
                "restarts": w.restarts, "last_exit_code": w.last_exit_code, "last_restart_at": w.last_restart_at}

    def check(self) -> None:
        for w in list(self._services.values()):
            now = self._clock()
            if w.retry_at is None:
                code = w.process.process.poll()
                if code is None:
                    if now - w.up_since >= RESTART_BACKOFF_RESET_S:
                        w.backoff_s = RESTART_BACKOFF_S
                    continue
                w.last_exit_code = code
                w.retry_at = now + w.backoff_s
                self._say(w, f"{w.name} (pid {w.process.pid}) exited with code {code}; starting it again in "
                             f"{w.backoff_s:g} s")
                self._report(w.name, self.status(w.name))
            if now < w.retry_at:
                continue
            try:
                process = w.respawn()
            except Exception as exc:   # noqa: BLE001 - whatever stops a restart, the next try comes after a back-off
                w.backoff_s = min(w.backoff_s * 2, RESTART_BACKOFF_MAX_S)
                w.retry_at = self._clock() + w.backoff_s
                self._say(w, f"{w.name} did not start again: {exc}; next try in {w.backoff_s:g} s")
                continue
            w.process, w.retry_at, w.up_since = process, None, self._clock()
            w.restarts += 1
            w.last_restart_at = datetime.now(UTC).isoformat(timespec="seconds")
            w.backoff_s = min(w.backoff_s * 2, RESTART_BACKOFF_MAX_S)
            self._say(w, f"{w.name} started again (restart {w.restarts}, pid {process.pid})")
            self._report(w.name, self.status(w.name))

    def _say(self, w: _Watched, line: str) -> None:
        self._notify(line)
        if w.log_path is not None:
            stamp = datetime.now(UTC).isoformat(timespec="seconds")
            try:
                with open(w.log_path, "a") as log:
                    log.write(f"[supervisor {stamp}] {line}\n")
            except OSError:
                pass
