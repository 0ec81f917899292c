"""The API's runs: kept in memory, executed one at a time on a backend in a background thread, each followed to
done or failed."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from compose.api.schemas import Progress, RunInput, RunView, TrainingProgress
from compose.backends import TERMINAL_STATES, Backend, LaunchFailed, RunHandle, RunState

__all__ = ["Run", "RunQueue"]


@dataclass
class Run:
    run_id: str
    compose_hash: str
    analyst: str
    run_dir: Path
    sealed: list[Path]
    inputs: list[RunInput]
    state: RunState = "queued"
    reason: str | None = None
    progress: list[Progress] = field(default_factory=list)
    result_path: Path | None = None
    epochs: int | None = None           # a DP-SGD run: the manifest's epochs
    epochs_done: int = 0


class RunQueue:
    """Runs studies on a backend, one at a time, in a background thread; follows each to done or failed."""

    def __init__(self, backend: Backend, *, clock: Callable[[], float], timeout_s: float, poll_s: float = 0.2):
        self.backend = backend
        self._clock = clock
        self._timeout_s = timeout_s
        self._poll_s = poll_s
        self._runs: dict[str, Run] = {}
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="study-run")

    def get(self, run_id: str) -> Run | None:
        with self._lock:
            return self._runs.get(run_id)

    def of(self, analyst: str) -> list[Run]:
        """The runs ``analyst`` started, newest first."""
        with self._lock:
            return [run for run in reversed(self._runs.values()) if run.analyst == analyst]

    def view(self, run: Run) -> RunView:
        """A consistent snapshot of the run, as the API shows it."""
        isolation = self.backend.isolation
        with self._lock:
            return RunView(run_id=run.run_id, compose_hash=run.compose_hash, state=run.state, reason=run.reason,
                           progress=list(run.progress), inputs=run.inputs, simulated=self.backend.simulated,
                           isolated=isolation.isolated, isolation=isolation.description,
                           result_url=f"/runs/{run.run_id}/result" if run.state == "done" else None,
                           training=None if run.epochs is None else
                           TrainingProgress(epochs_done=run.epochs_done, epochs=run.epochs))

    def submit(self, run: Run, app_compose_path: Path) -> RunView:
        """Queue the run and return its view as queued (the worker may move it on at once)."""
        with self._lock:
            self._runs[run.run_id] = run
        self._advance(run, "queued")
        queued = self.view(run)
        self._executor.submit(self._execute, run, app_compose_path)
        return queued

    def _advance(self, run: Run, state: RunState, reason: str | None = None) -> None:
        with self._lock:
            if run.progress and run.state == state:
                return
            run.state, run.reason = state, reason
            run.progress.append(Progress(state=state, at=self._clock()))

    def _execute(self, run: Run, app_compose_path: Path) -> None:
        if self._closing.is_set():
            self._advance(run, "failed", "the API stopped before the run started")
            return
        self._advance(run, "booting")
        try:
            handle = self.backend.launch(run.run_dir, app_compose_path, run.sealed)
        except LaunchFailed as failure:
            self._advance(run, "failed", failure.reason)
            return
        try:
            self._follow(run, handle)
        finally:
            handle.stop()

    def _follow(self, run: Run, handle: RunHandle) -> None:
        deadline = time.monotonic() + self._timeout_s
        while True:
            status = handle.poll()
            if status.epochs_done is not None and run.epochs is not None:
                with self._lock:      # what the study reports, kept within the manifest's epochs
                    run.epochs_done = max(run.epochs_done, min(status.epochs_done, run.epochs))
            if status.state in TERMINAL_STATES:
                run.result_path = handle.result_path if status.state == "done" else None
                self._advance(run, status.state, status.reason)
                return
            self._advance(run, status.state)
            if time.monotonic() > deadline:
                self._advance(run, "failed", f"the run did not finish within {self._timeout_s:.0f} s and was stopped")
                return
            if self._closing.wait(self._poll_s):
                self._advance(run, "failed", "the API stopped during the run")
                return

    def close(self) -> None:
        self._closing.set()
        self._executor.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            never_started = [run for run in self._runs.values() if run.state == "queued"]
        for run in never_started:
            self._advance(run, "failed", "the API stopped before the run started")
