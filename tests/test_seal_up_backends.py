"""Which backend `seal up` runs study CVMs on (issue 12 part 2): the container backend by default, printing which
engine and what the runs are isolated from, with the study image built and pinned in stack.json; without an engine,
a loud refusal that names `--backend process` — never a silent fallback; and the process fallback only when asked
for, labelled as such."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from compose.backends.engine import EngineUnavailable, connect_engine
from compose.image import current_study_image

SEAL = Path(sys.executable).parent / "seal"
pytestmark = pytest.mark.timeout(600)


class SealUp:
    def __init__(self, state: Path, *args: str, env: dict | None = None):
        self.state, self.out, self.err = state, state.parent / "up.out", state.parent / "up.err"
        with self.out.open("wb") as out, self.err.open("wb") as err:
            self.process = subprocess.Popen([SEAL, "up", "--state-dir", str(state), "--owners", "1", *args],
                                            stdout=out, stderr=err, env={**os.environ, **(env or {})})

    def wait_up(self) -> str:
        deadline = time.monotonic() + 300
        while "stack description:" not in self.out.read_text():
            assert self.process.poll() is None, self.err.read_text()
            assert time.monotonic() < deadline, "seal up did not come up"
            time.sleep(0.2)
        return self.out.read_text()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            self.process.wait(timeout=120)


def test_seal_up_runs_studies_in_containers_of_the_built_study_image_by_default(tmp_path):
    try:
        connect_engine(tmp_path / "probe").close()
    except EngineUnavailable as error:
        pytest.skip(f"NO CONTAINER ENGINE: {error}")
    state = tmp_path / "state"
    up = SealUp(state)
    try:
        out = up.wait_up()
        api = json.loads((state / "stack.json").read_text())["services"]["api"]
        image = current_study_image(state)
    finally:
        up.stop()
    assert "study runs: container backend (podman at unix://" in out or "study runs: container backend (docker" in out
    assert "read-only root" in out and "no network" in out and f"study image {image}" in out
    assert api["backend"]["kind"] == "container" and api["backend"]["image"] == image
    assert api["backend"]["isolated"] is True
    assert up.process.returncode == 0 and "local stack stopped" in up.out.read_text()


def test_without_an_engine_seal_up_says_so_and_names_the_explicit_fallback(tmp_path):
    state = tmp_path / "state"
    up = SealUp(state, env={"SEALROOM_CONTAINER_HOST": f"unix://{tmp_path}/no-engine.sock"})
    try:
        up.process.wait(timeout=300)
    finally:
        up.stop()
    err = up.err.read_text()
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert up.process.returncode == 2 and len(errors) == 1, err
    assert "NO CONTAINER ENGINE" in errors[0] and "does not answer" in errors[0] and "--backend process" in errors[0]
    assert "study runs:" not in up.out.read_text()                            # nothing ran on another backend
    # The fallback, asked for explicitly, in the same folder: labelled loudly, and the API allows only what it is told.
    digest = "sha256:" + "42" * 32
    fallback = SealUp(state, "--backend", "process", "--image-digest", digest)
    try:
        out = fallback.wait_up()
        api = json.loads((state / "stack.json").read_text())["services"]["api"]
    finally:
        fallback.stop()
    assert "study runs: PROCESS BACKEND (the explicit fallback" in out and "NOT the study image" in out
    assert api["backend"]["kind"] == "process"
    refused = subprocess.run([SEAL, "up", "--state-dir", str(tmp_path / "other"), "--image-digest", "latest"],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "--image-digest must be a study image's digest" in refused.stderr
