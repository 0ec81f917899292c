"""Child processes of the local stack: started in their own process group, stopped with everything they spawned."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
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
