"""A local stack survives being stopped and started again in the same state folder: the same chain (approvals,
revocations, spent ε), the same contracts, the same KMS root and the same analysts' tokens, and an old receipt
still verifies. In-process through LocalStack mid-study, and as a user runs it: `seal up` twice with Ctrl-C (SIGINT)
in between, and `seal up` after its supervisor was killed (a stale stack.json, services left running)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from compose.app_compose import compose_hash
from compose.auth import issue_token
from compose.stack_file import STACK_FILE, StackDeployment, StackRefused
from contracts.chain import DstackApp, DstackKms
from kms_client.client import KmsClient
from sealing_cli.main import app as seal_cli
from sealing_cli.stack import KMS_PASSPHRASE_ENV, KMS_PASSPHRASE_FILE, LocalStack
from tests.study_world import (
    SITES,
    STATS_PARAMS,
    YAML,
    build_study_world,
    make_recipe,
    start_study_stack,
)

SEAL = Path(sys.executable).parent / "seal"


@pytest.fixture(autouse=True)
def no_operator_passphrase(monkeypatch):
    """These tests use the passphrase the stack keeps in its folder, unless a test sets one."""
    monkeypatch.delenv(KMS_PASSPHRASE_ENV, raising=False)


def facts(stack: LocalStack, hashes: list[bytes]) -> dict:
    """Everything a restart must keep: contracts, owners, consent and budget on-chain, the KMS root."""
    d = stack.description
    study = DstackApp(stack.chain, d.dstack_app)
    with KmsClient(d.services["kms"]["url"]) as kms:
        served_root = kms.meta().root_address
    return {
        "contracts": (d.chain_id, d.dstack_kms, d.dstack_app, d.kms_signer),
        "owners": [(o.name, o.address) for o in d.owners],
        "composes": [study.status(h).to_json() for h in hashes],
        "approval_events": [study.approval_events(h) for h in hashes],
        "budget": study.budget().to_json(),
        "kms_root": (served_root, d.services["kms"]["root_address"]),
        "published_root": DstackKms(stack.chain, d.dstack_kms).kms_root_pubkey().hex(),
    }


def submission(owners: dict, study: str) -> dict:
    manifest = {"study": study, "inputs": [{"owner": owners[n].address, "name": site} for n, site in SITES.items()],
                "analysis": {"kind": "dp_stats", "params": STATS_PARAMS}, "epsilon": 0.5, "delta": 1e-6,
                "output_type": "aggregate_stats"}
    return {"name": study, "docker_compose": YAML, "manifest": manifest}


def test_a_stack_stopped_mid_study_comes_back_with_the_same_chain_kms_root_and_tokens(tmp_path):
    state = tmp_path / "stack"
    with start_study_stack(state) as stack:
        api_url = stack.start_api()
        token = issue_token(Path(stack.description.services["api"]["state_dir"]), "alice")
        auth = {"Authorization": f"Bearer {token}"}
        world = build_study_world(stack)            # A and B approve; one run spends ε 1.0 and leaves a receipt
        owners = world.owners
        revoked = compose_hash(make_recipe(owners, epsilon=0.5, study="revoked-later"))
        world.study.propose(revoked, "", owners["A"])
        world.study.approve(revoked, owners["A"])
        world.study.revoke(revoked, owners["B"])
        with httpx.Client(base_url=api_url, headers=auth, timeout=60) as http:
            submitted = http.post("/composes", json=submission(owners, "submitted-over-rest"))
            assert submitted.status_code == 201, submitted.text
        via_api = bytes.fromhex(submitted.json()["compose_hash"])
        hashes = [world.compose_hash, revoked, via_api]
        before = facts(stack, hashes)
        assert before["budget"]["epsilon_spent"] == 1.0
        assert [c["revoked"] for c in before["composes"]] == [False, True, False]
        app_before = stack.description.dstack_app
    assert not (state / STACK_FILE).exists(), "a clean stop removes the stack description"

    with start_study_stack(state) as stack:
        assert stack.resumed
        assert facts(stack, hashes) == before
        assert stack.description.dstack_app == app_before
        api_url = stack.start_api()
        with httpx.Client(base_url=api_url, headers=auth, timeout=60) as http:
            kept = http.get(f"/composes/{via_api.hex()}")        # the old token, the stored compose
            assert kept.status_code == 200, kept.text
            assert kept.json()["approval"]["state"] == "pending"
            assert http.get(f"/composes/{via_api.hex()}", headers={"Authorization": "Bearer nope"}).status_code == 401
        # The old receipt still verifies against the restarted chain, read as it was at the run's block.
        verified = CliRunner().invoke(seal_cli, ["verify", str(world.receipt_path), "--allow-simulated",
                                                 "--state-dir", str(state), "--json"])
        assert verified.exit_code == 0, verified.output
        report = json.loads(verified.stdout)
        assert report["ok"] is True and report["simulated"] is True and report["first_failure"] is None
        # And the study goes on where it stopped: the budget left is 1.0, so a second ε-1.0 run still fits.
        assert DstackApp(stack.chain, stack.description.dstack_app).budget().to_json()["epsilon_remaining"] == 1.0


def test_the_kms_passphrase_is_kept_once_and_a_root_store_is_never_replaced(tmp_path, monkeypatch):
    state = tmp_path / "stack"
    with LocalStack(state, owner_names=("A",)) as stack:
        root = stack.description.services["kms"]["root_address"]
    passphrase_file = state / KMS_PASSPHRASE_FILE
    assert passphrase_file.stat().st_mode & 0o777 == 0o600
    store = state / "kms" / "root.sealed"
    sealed = store.read_bytes()

    hidden = passphrase_file.rename(tmp_path / "kept-aside")
    with pytest.raises(StackRefused, match="no passphrase"):
        LocalStack(state).__enter__()
    monkeypatch.setenv(KMS_PASSPHRASE_ENV, "not the passphrase")
    with pytest.raises(StackRefused, match="does not open with the passphrase"):
        LocalStack(state).__enter__()
    assert store.read_bytes() == sealed and not passphrase_file.exists()

    monkeypatch.setenv(KMS_PASSPHRASE_ENV, hidden.read_text().strip())   # the operator's passphrase wins
    with LocalStack(state) as stack:
        assert stack.resumed and stack.description.services["kms"]["root_address"] == root
    assert store.read_bytes() == sealed


def test_flags_that_contradict_the_deployment_are_refused(tmp_path):
    state = tmp_path / "stack"
    with LocalStack(state, owner_names=("A", "B"), threshold=2, epsilon_budget=1.0):
        pass
    with pytest.raises(StackRefused, match="threshold 2 .asked: 1."):
        LocalStack(state, threshold=1).__enter__()
    assert not (state / STACK_FILE).exists()
    assert StackDeployment.load(state).threshold == 2


# --- `seal up` as a user runs it ------------------------------------------------------------------------------------

class SealUp:
    """`seal up` in a real process, its output in files."""

    def __init__(self, state: Path, *args: str, tag: str):
        self.state, self.out, self.err = state, state.parent / f"{tag}.out", state.parent / f"{tag}.err"
        env = {k: v for k, v in os.environ.items() if k != KMS_PASSPHRASE_ENV}
        with self.out.open("wb") as out, self.err.open("wb") as err:
            self.process = subprocess.Popen([SEAL, "up", "--state-dir", str(state), "--backend", "process", *args],
                                            stdout=out, stderr=err, env=env)
        deadline = time.monotonic() + 120
        while "stack description:" not in self.out.read_text():
            assert self.process.poll() is None, self.err.read_text()
            assert time.monotonic() < deadline, "seal up did not come up"
            time.sleep(0.2)
        self.description = json.loads((state / STACK_FILE).read_text())

    def stop(self, sig: int = signal.SIGINT) -> int:
        self.process.send_signal(sig)
        return self.process.wait(timeout=60)

    def text(self) -> str:
        return self.out.read_text() + self.err.read_text()


def seal(state: Path, *args: str):
    """A `seal` command against the running stack, in this process (`seal up` itself always runs in its own)."""
    result = CliRunner().invoke(seal_cli, [*args, "--state-dir", str(state)])
    assert result.exit_code == 0, result.output
    return result


def left_running(state: Path) -> str:
    return subprocess.run(["pgrep", "-af", str(state)], capture_output=True, text=True, check=False).stdout.strip()


@pytest.fixture
def up_folder(tmp_path):
    state = tmp_path / "sealroom"
    yield state
    # Whatever a failed test left running on this folder, and only that, is stopped.
    for line in left_running(state).splitlines():
        pid = int(line.split()[0])
        try:
            os.killpg(pid, signal.SIGKILL) if os.getpgid(pid) == pid else os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_seal_up_twice_with_ctrl_c_in_between_keeps_the_stack(up_folder):
    state = up_folder
    first = SealUp(state, "--owners", "2", tag="first")
    h = "0x" + "ab" * 32
    seal(state, "propose", "--compose-hash", h, "--owner", "EU-West")
    seal(state, "approve", "--compose-hash", h, "--owner", "EU-West")
    seal(state, "revoke", "--compose-hash", h, "--owner", "EU-North")
    token = seal(state, "analyst-token", "alice").stdout.strip()
    assert first.stop() == 0, first.text()
    assert "local stack stopped" in first.text()
    assert not (state / STACK_FILE).exists() and left_running(state) == ""

    second = SealUp(state, tag="second")                  # no flags: the folder's deployment decides
    try:
        assert "resumed the stack saved in" in second.text()
        d1, d2 = first.description, second.description
        assert (d2["dstack_app"], d2["dstack_kms"], d2["owners"]) == (d1["dstack_app"], d1["dstack_kms"], d1["owners"])
        assert d2["services"]["kms"]["root_address"] == d1["services"]["kms"]["root_address"]
        status = json.loads(seal(state, "status", "--compose-hash", h, "--json").stdout)
        assert status["compose"]["revoked"] is True and status["compose"]["approvals"] == 1
        assert status["owners"] == 2
        api = d2["services"]["api"]["url"]
        assert httpx.get(f"{api}/composes/{'cd' * 32}", headers={"Authorization": f"Bearer {token}"},
                         timeout=30).status_code == 404    # 404: the old token is still alice's (a bad one is 401)
        refused = subprocess.run([SEAL, "up", "--state-dir", str(state)], capture_output=True, text=True,
                                 timeout=120, check=False)
        assert refused.returncode == 2 and "another stack is running" in refused.stderr
    finally:
        assert second.stop() == 0, second.text()
    assert left_running(state) == ""


def test_seal_up_after_a_crash_cleans_up_the_stale_description_and_resumes(up_folder):
    state = up_folder
    crashed = SealUp(state, "--owners", "1", tag="crashed")
    seal(state, "propose", "--compose-hash", "0x" + "ef" * 32, "--owner", "EU-West")
    crashed.stop(signal.SIGKILL)                           # the supervisor dies; its services keep running
    assert (state / STACK_FILE).exists() and left_running(state) != ""

    again = SealUp(state, tag="again")
    try:
        assert "removed a stale stack.json" in again.text()
        assert "stopped its leftover anvil, kms, api" in again.text()
        assert again.description["dstack_app"] == crashed.description["dstack_app"]
        status = json.loads(seal(state, "status", "--compose-hash", "0x" + "ef" * 32, "--json").stdout)
        assert status["compose"]["proposed"] is True       # saved by the leftover anvil as it was stopped
    finally:
        assert again.stop() == 0, again.text()
    assert left_running(state) == ""
