"""A study on the session's anvil with stored composes, for the console tests (not collected: no test_ prefix)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Self

import uvicorn

from compose.app_compose import build_app_compose, compose_hash, normalized_json_bytes
from compose.backends.launcher import free_loopback_port
from compose.manifest import StudyManifest
from console.app import ConsoleConfig, create_app

DOCKER_COMPOSE = """\
services:
  study:
    image: ghcr.io/sealroom/study@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef
    command: ["python", "-m", "cvm.run"]
"""
NAMES = ("hospital-a", "hospital-b", "registry-c", "lab-d", "insurer-e")


def recipe_bytes(name: str, owners: list[str], epsilon: float) -> bytes:
    manifest = StudyManifest.model_validate({
        "study": name, "inputs": [{"owner": o, "name": f"cohort-{i}"} for i, o in enumerate(owners)],
        "analysis": {"kind": "dp_stats", "params": {"max_rows": 1000, "queries": [
            {"kind": "count", "name": "patients"},
            {"kind": "mean", "name": "mean_age", "column": "age", "bounds": [18, 95]}]}},
        "epsilon": epsilon, "delta": 1e-6, "output_type": "aggregate_stats"})
    return normalized_json_bytes(build_app_compose(name, DOCKER_COMPOSE, manifest))


def store_and_propose(consortium, composes_dir: Path, body: bytes, proposer) -> str:
    h = compose_hash(body).hex()
    (composes_dir / f"{h}.json").write_bytes(body)
    consortium.propose(bytes.fromhex(h), f"http://127.0.0.1/composes/{h}/app-compose.json", proposer)
    return h


class Server:
    """The console app under uvicorn in a thread, on a free loopback port."""

    def __init__(self, config: ConsoleConfig):
        self.url = f"http://127.0.0.1:{free_loopback_port()}"
        self.server = uvicorn.Server(uvicorn.Config(create_app(config), host="127.0.0.1",
                                                    port=int(self.url.rsplit(":", 1)[1]), log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Self:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("console did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)
