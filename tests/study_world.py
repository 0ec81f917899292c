"""Test helper: a complete small study on a real local stack — owners seal synthetic cohorts for a recipe, approve
it, a SIMULATED CVM runs it — ending with the receipt (attestation.json). Used by the study-run and auditor tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from typer.testing import CliRunner

from compose.app_compose import build_app_compose, compose_hash, normalized_json_bytes
from compose.manifest import StudyManifest
from compose.stack_file import read_keystore
from contracts.chain import DstackApp
from cvm.analyses.cohorts import generate_site, write_parquet
from sealing_cli.main import app as seal_cli
from sealing_cli.stack import LocalStack

# The studies here run on the process backend (this checkout's code), so the image they name is a stand-in: a
# well-formed study image digest that the tests' API allowlists explicitly (start_study_stack).
IMAGE_DIGEST = "sha256:" + "3" * 64
YAML = f"services:\n  study:\n    image: sealroom/study-runner@{IMAGE_DIGEST}\n"
SITES = {"A": "EU-West", "B": "APAC"}
STATS_PARAMS = {"max_rows": 10_000, "queries": [
    {"kind": "count", "name": "patients"},
    {"kind": "mean", "name": "mean_age", "column": "age", "bounds": [18, 95]}]}


@dataclass
class StudyWorld:
    stack: LocalStack
    owners: dict
    study: DstackApp
    compose_path: Path
    compose_hash: bytes
    sealed: list[str]
    receipt_path: Path

    @property
    def receipt(self) -> dict:
        return json.loads(self.receipt_path.read_text())

    @property
    def simulated_root_der(self) -> bytes:
        return (self.stack.state_dir / "simulated-tdx" / "root.der").read_bytes()


def make_recipe(owners: dict, *, epsilon: float = 1.0, study: str = "run-test", yaml: str = YAML) -> bytes:
    manifest = StudyManifest.model_validate({
        "study": study, "inputs": [{"owner": owners[n].address, "name": site} for n, site in SITES.items()],
        "analysis": {"kind": "dp_stats", "params": STATS_PARAMS},
        "epsilon": epsilon, "delta": 1e-6, "output_type": "aggregate_stats",
    })
    return normalized_json_bytes(build_app_compose(study, yaml, manifest))


def run_cvm(stack: LocalStack, compose_path: Path, sealed: list[str], receipt: Path, *, name: str = "cvm"):
    d = stack.description
    endpoint = stack.start_cvm(compose_path, name=name)
    return subprocess.run(
        [sys.executable, "-m", "cvm.run", "--sealed", *sealed, "--kms-url", d.services["kms"]["url"],
         "--rpc-url", d.rpc_url, "--dstack-kms", d.dstack_kms, "--out", str(receipt)],
        env={**os.environ, "DSTACK_SIMULATOR_ENDPOINT": endpoint}, capture_output=True, text=True, timeout=300)


def build_study_world(stack: LocalStack, *, epsilon_per_run: float = 1.0, image: str | None = None) -> StudyWorld:
    """Owners A and B approve a dp_stats recipe, seal 2,000 synthetic rows each, and one run produces a receipt.
    ``image``: the study image reference its compose names (default: the stand-in of YAML)."""
    state, d = stack.state_dir, stack.description
    owners = {o.name: read_keystore(o.keystore, d.dev_keystore_password) for o in d.owners}
    body = make_recipe(owners, epsilon=epsilon_per_run,
                       yaml=YAML if image is None else f"services:\n  study:\n    image: {image}\n")
    compose_path = state / "app-compose.json"
    compose_path.write_bytes(body)
    h = compose_hash(body)
    study = DstackApp(stack.chain, d.dstack_app)
    study.propose(h, compose_path.as_uri(), owners["A"])
    for name in SITES:
        study.approve(h, owners[name])
    sealed = []
    for name, site in SITES.items():
        source = state / f"{site}.parquet"
        write_parquet(generate_site(site, 2_000, seed=7), source)
        out = state / f"{site}.sealed"
        result = CliRunner().invoke(seal_cli, ["dataset", str(source), "--app-id", d.dstack_app, "--compose-hash",
                                               h.hex(), "--out", str(out), "--owner", name, "--state-dir", str(state)])
        assert result.exit_code == 0, result.output
        sealed.append(str(out))
    receipt = state / "attestation.json"
    process = run_cvm(stack, compose_path, sealed, receipt)
    assert process.returncode == 0, process.stderr
    return StudyWorld(stack, owners, study, compose_path, h, sealed, receipt)


def start_study_stack(state: Path, *, epsilon_budget: float = 2.0) -> LocalStack:
    """A stack for two owners whose API (when started) runs studies on the process backend and accepts composes
    naming the stand-in IMAGE_DIGEST: these tests are not about the container backend (test_container_backend.py
    is)."""
    return LocalStack(state, owner_names=tuple(SITES), threshold=len(SITES), epsilon_budget=epsilon_budget,
                      backend="process", image_digests=(IMAGE_DIGEST,))
