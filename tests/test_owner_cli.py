"""The owners' CLI, driven as a user would: `seal` invocations against a real local stack."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from compose.stack_file import StackDescription, write_keystore
from sealing_cli.main import app
from sealing_cli.stack import LocalStack

H = "0x" + hashlib.sha256(b"cli study").hexdigest()
runner = CliRunner()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    state = tmp_path_factory.mktemp("stack")
    with LocalStack(state, owner_names=("A", "B", "C"), threshold=2, epsilon_budget=1.0) as s:
        yield s


def seal(stack, *args, env=None):
    return runner.invoke(app, [*args, "--state-dir", str(stack.state_dir)], env=env)


def test_propose_approve_status_revoke(stack):
    h = "0x" + hashlib.sha256(b"lifecycle").hexdigest()
    assert seal(stack, "propose", "--compose-hash", h, "--uri", "file:///x.json", "--owner", "A").exit_code == 0
    result = seal(stack, "approve", "--compose-hash", h, "--owner", "A", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["by"] == stack.description.owner("A").address
    assert seal(stack, "approve", "--compose-hash", h, "--owner", "B").exit_code == 0

    status = json.loads(seal(stack, "status", "--compose-hash", h, "--json").stdout)
    assert status["compose"]["allowed"] and status["compose"]["approvals"] == 2
    assert status["budget"]["epsilon_remaining"] == 1.0

    result = seal(stack, "revoke", "--compose-hash", h, "--owner", "C")
    assert result.exit_code == 0, result.output
    human = seal(stack, "status", "--compose-hash", h)
    assert "REVOKED" in human.stdout and "2/3 approvals" in human.stdout


def test_refusals_exit_1_with_error_line(stack):
    h = "0x" + hashlib.sha256(b"refusals").hexdigest()
    unknown = seal(stack, "approve", "--compose-hash", h, "--owner", "A")
    assert unknown.exit_code == 1 and "error:" in unknown.stderr and "never proposed" in unknown.stderr
    seal(stack, "propose", "--compose-hash", h, "--owner", "A")
    seal(stack, "approve", "--compose-hash", h, "--owner", "A")
    again = seal(stack, "approve", "--compose-hash", h, "--owner", "A")
    assert again.exit_code == 1 and "already approved" in again.stderr
    seal(stack, "revoke", "--compose-hash", h, "--owner", "B")
    revoked = seal(stack, "revoke", "--compose-hash", h, "--owner", "C")
    assert revoked.exit_code == 1 and "revoked" in revoked.stderr


def test_non_owner_key_is_refused(stack, tmp_path):
    from eth_account import Account

    outsider = Account.create()
    path = tmp_path / "outsider.json"
    write_keystore(outsider, path, "pw")
    seal(stack, "propose", "--compose-hash", H, "--owner", "A")
    result = seal(stack, "approve", "--compose-hash", H, "--keystore", str(path),
                  env={"SEAL_KEYSTORE_PASSWORD": "pw"})
    # the outsider has no gas either; the contract's refusal comes first because calls are simulated before sending
    assert result.exit_code == 1 and "is not an owner" in result.stderr


def test_key_problems_exit_4_without_leaking(stack, tmp_path):
    from eth_account import Account

    account = Account.create()
    path = tmp_path / "k.json"
    write_keystore(account, path, "right")
    wrong = seal(stack, "approve", "--compose-hash", H, "--keystore", str(path), env={"SEAL_KEYSTORE_PASSWORD": "wrong"})
    assert wrong.exit_code == 4 and "could not load the owner key" in wrong.stderr
    assert account.key.hex() not in wrong.output
    none = seal(stack, "approve", "--compose-hash", H, env={"SEAL_OWNER_KEY": ""})
    assert none.exit_code == 4 and "hint:" in none.stderr
    unknown = seal(stack, "approve", "--compose-hash", H, "--owner", "Nobody")
    assert unknown.exit_code == 4 and "no dev owner named" in unknown.stderr


def test_owner_key_from_environment(stack):
    from eth_account import Account

    h = "0x" + hashlib.sha256(b"env key").hexdigest()
    seal(stack, "propose", "--compose-hash", h, "--owner", "A")
    owner_b = Account.from_key(Account.decrypt(json.loads(Path(stack.description.owner("B").keystore).read_text()),
                                               stack.description.dev_keystore_password))
    result = seal(stack, "approve", "--compose-hash", h, env={"SEAL_OWNER_KEY": owner_b.key.hex()})
    assert result.exit_code == 0, result.output
    assert owner_b.address in result.stdout


def test_malformed_compose_hash_is_a_usage_error(stack):
    result = seal(stack, "approve", "--compose-hash", "0x1234", "--owner", "A")
    assert result.exit_code == 2 and "64 hex digits" in result.stderr


def test_no_stack_and_unreachable_chain_exit_3(tmp_path, stack):
    result = runner.invoke(app, ["status", "--state-dir", str(tmp_path)])
    assert result.exit_code == 3 and "seal up" in result.stderr
    d = StackDescription.load(stack.state_dir)
    d.rpc_url = "http://127.0.0.1:9"  # nothing listens on the discard port
    d.save(tmp_path)
    result = runner.invoke(app, ["status", "--state-dir", str(tmp_path)])
    assert result.exit_code == 3 and "chain unreachable" in result.stderr


def _wait_for(condition, what, process, timeout_s=60):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert process.poll() is None, process.stdout.read()
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_seal_up_boots_the_cvm_once_approved_and_down_leaves_no_process(tmp_path):
    """`seal up --compose` as a real process: stack description, CVM boot on approval, and `seal down` stops all."""
    from eth_account import Account

    from compose.app_compose import (
        build_app_compose,
        compose_hash,
        normalized_json_bytes,
    )
    from compose.manifest import StudyManifest
    from tests.study_world import YAML

    manifest = StudyManifest.model_validate({
        "study": "up-test", "inputs": [{"owner": Account.create().address, "name": "x"}],
        "analysis": {"kind": "dp_stats", "params": {}}, "epsilon": 0.5, "delta": 0.0,
        "output_type": "aggregate_stats"})
    compose = tmp_path / "app-compose.json"
    compose.write_bytes(normalized_json_bytes(build_app_compose("up-test", YAML, manifest)))
    h = "0x" + compose_hash(compose.read_bytes()).hex()
    seal_bin = Path(sys.executable).parent / "seal"
    state = ["--state-dir", str(tmp_path)]

    def seal_cli(*args):
        return subprocess.run([seal_bin, *args, *state], capture_output=True, text=True, timeout=60)

    up = subprocess.Popen([seal_bin, "up", "--owners", "2", "--compose", str(compose), "--backend", "process", *state],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(lambda: (tmp_path / "stack.json").exists()
                  and "api" in StackDescription.load(tmp_path).services, "the stack with its API", up)
        pids = [StackDescription.load(tmp_path).services[s]["pid"] for s in ("anvil", "kms", "api")]
        assert seal_cli("propose", "--compose-hash", h, "--owner", "EU-West").returncode == 0
        for owner in ("EU-West", "EU-North"):
            assert seal_cli("approve", "--compose-hash", h, "--owner", owner).returncode == 0
        _wait_for(lambda: "cvm" in StackDescription.load(tmp_path).services, "the CVM to boot", up)
        pids.append(StackDescription.load(tmp_path).services["cvm"]["pid"])
        status = seal_cli("status")
        assert status.returncode == 0 and "service cvm" in status.stdout and "simulated=True" in status.stdout
        token = seal_cli("analyst-token", "alice")
        assert token.returncode == 0 and "shown once" in token.stderr
        api = StackDescription.load(tmp_path).services["api"]["url"]
        import httpx

        assert httpx.get(f"{api}/runs/0123456789abcdef").status_code == 401
        authorised = httpx.get(f"{api}/runs/0123456789abcdef",
                               headers={"Authorization": f"Bearer {token.stdout.strip()}"})
        assert authorised.status_code == 404           # let in, and told there is no such run
        assert seal_cli("down").returncode == 0
        assert up.wait(timeout=30) == 0
    finally:
        if up.poll() is None:
            up.send_signal(signal.SIGKILL)
            up.wait()
        up.stdout.close()
    assert not (tmp_path / "stack.json").exists()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
