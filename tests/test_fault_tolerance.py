"""Services survive faults (issue 11 part 4), proved by killing the processes of a real `seal up`.

- kill -9 the KMS: `seal up` starts it again on the same URL with the same root, and `seal status` shows the restart;
- the KMS dies right after the ε spend is recorded on-chain and before it answers (test fault injection,
  SEALROOM_KMS_TEST_CRASH_AFTER_SPEND=1 in the environment of this `seal up` only): the CVM's client sends the same
  request again and gets its keys for the same recorded release, spent once; a replay by anyone else gets nothing;
- stop anvil: the KMS answers 503 `chain_unavailable` with the reason, the API 503, nothing is spent; once the
  supervisor has started the chain again (same URL, same state) the same request goes through, spent once.

One `seal up` serves the three tests, in this order (each measures what it changes). Before them, without any
process: the supervisor's back-off and the KMS's release journal.
"""

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
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from typer.testing import CliRunner

from compose.app_compose import build_app_compose, compose_hash, normalized_json_bytes
from compose.auth import issue_token
from compose.backends.launcher import (
    RESTART_BACKOFF_MAX_S,
    ServiceStartError,
    Supervisor,
)
from compose.manifest import StudyManifest
from compose.stack_file import STACK_FILE, read_keystore
from contracts.chain import Chain, DstackApp
from kms.releases import PendingRelease, ReleaseJournal
from kms.service import TEST_CRASH_AFTER_SPEND_ENV
from kms_client import wire
from kms_client.box import (
    BoxOpenFailed,
    SealedAnswer,
    attestation_report_data,
    open_answer,
    raw_public,
)
from kms_client.client import KmsClient, KmsUnavailable
from sealing_cli.main import app as seal_cli
from sealing_cli.stack import KMS_PASSPHRASE_ENV
from tests.simulated_cvm import SimulatedCvm
from tests.study_world import STATS_PARAMS

pytestmark = pytest.mark.timeout(600)

SEAL = Path(sys.executable).parent / "seal"
IMAGE_DIGEST = "sha256:" + "5" * 64   # a stand-in the API allowlists (--image-digest): runs use the process backend
YAML = f"services:\n  study:\n    image: sealroom/study-runner@{IMAGE_DIGEST}\n"
EPSILON = 0.4


# --- the parts, without processes ----------------------------------------------------------------------------------

class FakeService:
    """Stands for a ManagedProcess: ``code`` is its exit code once it has died."""

    def __init__(self, pid: int):
        self.pid, self.code, self.process = pid, None, self

    def poll(self) -> int | None:
        return self.code

    def stop(self) -> None:
        self.code = -15 if self.code is None else self.code


def test_the_supervisor_restarts_with_a_doubling_back_off_reset_after_a_quiet_minute(tmp_path):
    now, pids, failing, reports = [0.0], iter(range(100, 200)), [0], []

    def respawn() -> FakeService:
        if failing[0]:
            failing[0] -= 1
            raise ServiceStartError("svc exited with code 1 while starting: address in use")
        return FakeService(next(pids))

    supervisor = Supervisor(report=lambda _name, fields: reports.append(fields), clock=lambda: now[0])
    log = tmp_path / "svc.log"
    supervisor.watch("svc", FakeService(1), respawn, log_path=log)
    supervisor.check()
    assert reports == [], "a running service is left alone"

    supervisor.process("svc").code = -9
    supervisor.check()                                    # noticed at t=0: started again after 0.5 s
    assert reports[-1] == {"pid": 1, "status": "restarting", "restarts": 0, "last_exit_code": -9,
                           "last_restart_at": None}
    now[0] = 0.4
    supervisor.check()
    assert supervisor.process("svc").pid == 1
    now[0] = 0.5
    supervisor.check()
    assert supervisor.process("svc").pid == 100 and reports[-1]["restarts"] == 1
    assert reports[-1]["status"] == "running" and reports[-1]["last_restart_at"]

    supervisor.process("svc").code = 1                    # dies again at once: 1 s, and a failed try doubles it
    now[0] = 1.0
    supervisor.check()
    failing[0] = 1
    now[0] = 2.0
    supervisor.check()                                    # the try fails: next one at 4.0
    now[0] = 3.9
    supervisor.check()
    assert supervisor.process("svc").pid == 100
    now[0] = 4.0
    supervisor.check()
    assert supervisor.process("svc").pid == 101 and supervisor.status("svc")["restarts"] == 2

    now[0] = 64.0                                         # a minute up: the back-off starts over
    supervisor.check()
    supervisor.process("svc").code = -15
    supervisor.check()
    lines = log.read_text().splitlines()
    assert lines[-1].endswith("svc (pid 101) exited with code -15; starting it again in 0.5 s")
    assert any("did not start again: svc exited with code 1 while starting" in line for line in lines)
    assert all(line.startswith("[supervisor ") for line in lines)

    failing[0] = 100                                      # a service that never comes back: capped back-off
    for _ in range(12):
        now[0] += RESTART_BACKOFF_MAX_S
        supervisor.check()
    assert lines != log.read_text().splitlines()
    assert log.read_text().splitlines()[-1].endswith(f"next try in {RESTART_BACKOFF_MAX_S:g} s")

    supervisor.stop("svc")
    supervisor.check()                                    # a service stopped on purpose is not restarted
    assert supervisor.process("svc") is None


def test_the_release_journal_survives_a_restart_within_its_window(tmp_path):
    entry = PendingRelease(nonce=b"\x01" * 32, cvm_pub=b"\x02" * 32, app_id=b"\x03" * 20, compose_hash=b"\x04" * 32,
                           taken_at=1000.0)
    ReleaseJournal(tmp_path / "releases", window_s=600).note(entry)
    files = list((tmp_path / "releases").iterdir())
    assert len(files) == 1 and files[0].stat().st_mode & 0o777 == 0o600
    assert entry.nonce.hex() not in files[0].name
    reopened = ReleaseJournal(tmp_path / "releases", window_s=600)      # a restarted KMS
    assert reopened.find(entry.nonce, 1500.0) == entry
    assert reopened.find(entry.nonce, 1601.0) is None, "past the window"
    assert reopened.find(b"\x09" * 32, 1500.0) is None
    reopened.note(PendingRelease(nonce=b"\x05" * 32, cvm_pub=b"\x02" * 32, app_id=b"\x03" * 20,
                                 compose_hash=b"\x04" * 32, taken_at=2000.0))
    assert len(list((tmp_path / "releases").iterdir())) == 1, "old entries are removed as new ones are written"


# --- a real `seal up` ----------------------------------------------------------------------------------------------

class SealUp:
    """`seal up` in its own process, with the KMS crash injection in its environment (and so in its KMS's)."""

    def __init__(self, state: Path):
        self.state = state
        self.out, self.err = state.parent / "up.out", state.parent / "up.err"
        env = {k: v for k, v in os.environ.items() if k != KMS_PASSPHRASE_ENV}
        env[TEST_CRASH_AFTER_SPEND_ENV] = "1"
        with self.out.open("wb") as out, self.err.open("wb") as err:
            self.process = subprocess.Popen([SEAL, "up", "--state-dir", str(state), "--owners", "2", "--backend",
                                             "process", "--image-digest", IMAGE_DIGEST], stdout=out, stderr=err,
                                            env=env)
        wait_for(lambda: "stack description:" in self.out.read_text(), 180, "seal up to come up",
                 alive=self.process)

    def service(self, name: str) -> dict:
        return json.loads((self.state / STACK_FILE).read_text())["services"][name]

    def description(self) -> dict:
        return json.loads((self.state / STACK_FILE).read_text())

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()


def wait_for(predicate, timeout_s: float, what: str, *, alive: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if alive is not None and alive.poll() is not None:
            raise AssertionError(f"the process exited while waiting for {what}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def kill_group(pid: int, sig: int) -> None:
    # Each service leads its own process group (ManagedProcess starts a new session).
    os.killpg(pid, sig)


@pytest.fixture(scope="module")
def up(tmp_path_factory):
    state = tmp_path_factory.mktemp("faults") / "sealroom"
    stack = SealUp(state)
    yield stack
    stack.stop()
    left = subprocess.run(["pgrep", "-f", str(state)], capture_output=True, text=True, check=False).stdout.split()
    for pid in map(int, left):   # whatever a failed test left running on this folder, and only that
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def world(up):
    d = up.description()
    owners = [read_keystore(o["keystore"], d["dev_keystore_password"]) for o in d["owners"]]
    with Chain(d["rpc_url"]) as chain:
        yield {"owners": owners, "study": DstackApp(chain, d["dstack_app"]), "kms_url": d["services"]["kms"]["url"],
               "rpc_url": d["rpc_url"]}


def approved_recipe(world, tag: str) -> bytes:
    owners, study = world["owners"], world["study"]
    manifest = StudyManifest.model_validate({
        "study": f"faults-{tag}", "inputs": [{"owner": o.address, "name": f"cohort-{i}"} for i, o in enumerate(owners)],
        "analysis": {"kind": "dp_stats", "params": {}}, "epsilon": EPSILON, "delta": 1e-6,
        "output_type": "aggregate_stats"})
    body = normalized_json_bytes(build_app_compose(f"faults-{tag}", YAML, manifest))
    h = compose_hash(body)
    study.propose(h, "", owners[0])
    for owner in owners:
        study.approve(h, owner)
    return body


def spent(world) -> tuple[int, int]:
    study = world["study"]
    return study.budget().spent_micro, study.chain.view(study.ARTIFACT, study.contract, "releaseCount")


def supervisor_lines(path: Path, text: str) -> int:
    return sum(1 for line in path.read_text(errors="replace").splitlines() if "[supervisor" in line and text in line)


def test_a_killed_kms_is_started_again_on_its_url_and_seal_status_shows_it(up):
    kms = up.service("kms")
    url, pid, restarts = kms["url"], kms["pid"], kms.get("restarts", 0)
    with KmsClient(url) as client:
        root = client.meta().root_address

    # other tests of this module may have killed it already: count this kill's lines only
    killed_before = supervisor_lines(up.state / "kms.log", "exited with code -9")
    started_before = supervisor_lines(up.state / "kms.log", "started again")
    kill_group(pid, signal.SIGKILL)
    wait_for(lambda: up.service("kms").get("restarts", 0) == restarts + 1 and up.service("kms")["status"] == "running",
             90, "the KMS to be started again")

    after = up.service("kms")
    assert after["url"] == url and after["pid"] != pid
    assert after["last_exit_code"] == -signal.SIGKILL and after["last_restart_at"]
    with KmsClient(url) as client:
        assert client.meta().root_address == root, "the same root store, reopened with the passphrase file"
    assert supervisor_lines(up.state / "kms.log", "exited with code -9") == killed_before + 1
    assert supervisor_lines(up.state / "kms.log", "started again") == started_before + 1

    runner = CliRunner()
    status = runner.invoke(seal_cli, ["status", "--state-dir", str(up.state), "--json"])
    assert status.exit_code == 0, status.output
    shown = json.loads(status.stdout)["services"]["kms"]
    assert (shown["restarts"], shown["last_exit_code"]) == (restarts + 1, -9)
    human = runner.invoke(seal_cli, ["status", "--state-dir", str(up.state)])
    assert human.exit_code == 0, human.output
    assert f"restarted {restarts + 1}x (last exit code -9" in " ".join(human.output.split())


class Recording(KmsClient):
    """The CVM's KMS client, keeping each attestation it makes (to replay it as someone else would)."""

    def __init__(self, url: str):
        super().__init__(url)
        self.made: list[tuple[wire.Attestation, X25519PrivateKey, bytes]] = []

    def _attestation(self, attest, collateral):
        made = super()._attestation(attest, collateral)
        self.made.append(made)
        return made


def test_a_kms_killed_between_the_spend_and_its_answer_loses_no_release(up, world):
    body = approved_recipe(world, "crash")
    app_id = world["study"].app_id
    before = spent(world)
    kms_before = up.service("kms")

    # This `seal up`'s KMS kills itself right after recording the spend: the client sees the connection drop,
    # sends the same request again while the supervisor restarts the KMS, and gets its keys.
    machine = SimulatedCvm(up.state, app_id, body)
    with Recording(world["kms_url"]) as client:
        release = client.release_owner_keys(machine.attest, body)
        attestation, ephemeral, nonce = client.made[-1]
    assert len(client.made) == 1, "one request, sent again: not a second release with a fresh nonce"

    kms_after = up.service("kms")
    assert kms_after["restarts"] == kms_before.get("restarts", 0) + 1 and kms_after["pid"] != kms_before["pid"], \
        "the KMS did crash after the spend"
    assert kms_after["last_exit_code"] == -signal.SIGKILL
    assert spent(world) == (before[0] + int(EPSILON * 1_000_000), before[1] + 1), "spent exactly once"
    recorded = world["study"].recorded_release(bytes.fromhex(release.release_id))
    assert recorded is not None
    assert recorded["transactionHash"].hex().removeprefix("0x") == release.release_tx.removeprefix("0x")
    assert release.epsilon_spent == pytest.approx(before[0] / 1e6 + EPSILON)
    owners = {o.address for o in world["owners"]}
    assert set(release.keys) == owners
    with KmsClient(world["kms_url"]) as client:
        root = client.meta().root_address
        for owner, private in release.keys.items():
            public = client.owner_seal_key(world["study"].address, compose_hash(body), owner,
                                           pinned_root_address=root)
            assert raw_public(private) == raw_public(public), "the released key is the one the owner sealed to"

    # A replay of the very same request, by anyone: answered again (no spend), sealed to the CVM's key only.
    request = wire.OwnerKeysRequest(attestation=attestation, app_compose=body.decode())
    replay = httpx.post(f"{world['kms_url']}/prpc/ReleaseOwnerKeys", json=request.model_dump(), timeout=30)
    assert replay.status_code == 200, replay.text
    box = SealedAnswer.from_wire(replay.json()["box"])
    with pytest.raises(BoxOpenFailed):
        open_answer(box, nonce=nonce, cvm_key=X25519PrivateKey.generate())
    assert set(json.loads(open_answer(box, nonce=nonce, cvm_key=ephemeral))) == owners
    # The same nonce with another key — even quoted by another CVM of the same approved recipe — gets nothing.
    other_key = X25519PrivateKey.generate()
    quote, log = SimulatedCvm(up.state, app_id, body).attest(attestation_report_data(nonce, raw_public(other_key)))
    stolen = wire.OwnerKeysRequest(attestation=wire.Attestation(
        quote=quote.hex(), event_log=log, nonce=nonce.hex(), ephemeral_pubkey=raw_public(other_key).hex()),
        app_compose=body.decode())
    refused = httpx.post(f"{world['kms_url']}/prpc/ReleaseOwnerKeys", json=stolen.model_dump(), timeout=30)
    assert refused.status_code == 403 and refused.json()["reason"] == "stale_nonce", refused.text
    assert spent(world) == (before[0] + int(EPSILON * 1_000_000), before[1] + 1), "still spent exactly once"


def test_with_the_chain_down_the_kms_and_the_api_answer_503_and_nothing_is_spent(up, world):
    body = approved_recipe(world, "chain-down")
    app_id = world["study"].app_id
    before = spent(world)
    anvil = up.service("anvil")
    api = up.service("api")
    token = issue_token(Path(api["state_dir"]), "fault-tester")
    machine = SimulatedCvm(up.state, app_id, body)
    ephemeral = X25519PrivateKey.generate()
    with KmsClient(world["kms_url"], release_retry_s=0) as client:
        nonce = bytes.fromhex(client._call("GetNonce", None, wire.Nonce).nonce)
    quote, log = machine.attest(attestation_report_data(nonce, raw_public(ephemeral)))
    request = wire.OwnerKeysRequest(attestation=wire.Attestation(
        quote=quote.hex(), event_log=log, nonce=nonce.hex(), ephemeral_pubkey=raw_public(ephemeral).hex()),
        app_compose=body.decode())

    up.process.send_signal(signal.SIGSTOP)   # hold the supervisor, so that the chain stays down for a while
    try:
        kill_group(anvil["pid"], signal.SIGTERM)   # anvil saves its state as it stops

        def chain_down() -> bool:
            try:
                httpx.post(world["rpc_url"], json={"jsonrpc": "2.0", "id": 1, "method": "eth_chainId"}, timeout=1)
            except httpx.TransportError:
                return True
            return False

        wait_for(chain_down, 30, "anvil to stop")
        answer = httpx.post(f"{world['kms_url']}/prpc/ReleaseOwnerKeys", json=request.model_dump(), timeout=30)
        assert answer.status_code == 503, answer.text
        refusal = answer.json()
        assert refusal["reason"] == "chain_unavailable"
        assert "chain unreachable at " + world["rpc_url"] in refusal["error"]
        assert "spent and released nothing" in refusal["error"]

        # The client reports it as such (no retry allowed here), with the KMS's reason.
        with KmsClient(world["kms_url"], release_retry_s=0) as client, \
                pytest.raises(KmsUnavailable, match="chain unreachable") as unavailable:
            client.release_owner_keys(SimulatedCvm(up.state, app_id, body).attest, body)
        assert unavailable.value.code == "chain_unavailable"

        # The analysts' API too: a submission cannot be proposed while the chain is down.
        submission = {"name": "faults-api", "docker_compose": YAML, "manifest": {
            "study": "faults-api", "inputs": [{"owner": o.address, "name": f"site-{i}"}
                                             for i, o in enumerate(world["owners"])],
            "analysis": {"kind": "dp_stats", "params": STATS_PARAMS}, "epsilon": 0.1, "delta": 1e-6,
            "output_type": "aggregate_stats"}}
        refused = httpx.post(f"{api['url']}/composes", json=submission, timeout=30,
                             headers={"Authorization": f"Bearer {token}"})
        assert refused.status_code == 503, refused.text
        assert "chain unreachable" in refused.json()["detail"]
    finally:
        up.process.send_signal(signal.SIGCONT)

    # The supervisor starts anvil again, on the same URL, from its state file: nothing was spent meanwhile.
    wait_for(lambda: up.service("anvil").get("restarts", 0) == anvil.get("restarts", 0) + 1
             and up.service("anvil")["status"] == "running", 90, "anvil to be started again")
    assert up.service("anvil")["rpc_url"] == world["rpc_url"]
    assert spent(world) == before, "an unreachable chain spends nothing"
    assert supervisor_lines(up.state / "anvil.log", "started again") == 1

    # And the very request the KMS answered 503 goes through now, spent once — though this KMS, too, dies right
    # after the spend (the injection is in its environment): the client sends it again until it is answered.
    kms_before = up.service("kms")
    with Replaying(world["kms_url"], (request.attestation, ephemeral, nonce)) as client:
        release = client.release_owner_keys(None, body)
    assert set(release.keys) == {o.address for o in world["owners"]}
    assert up.service("kms")["restarts"] == kms_before.get("restarts", 0) + 1
    assert spent(world) == (before[0] + int(EPSILON * 1_000_000), before[1] + 1)


class Replaying(KmsClient):
    """A CVM's KMS client whose release request is one prepared earlier (the one the KMS answered 503)."""

    def __init__(self, url: str, made: tuple[wire.Attestation, X25519PrivateKey, bytes]):
        super().__init__(url)
        self._made = made

    def _attestation(self, attest, collateral):
        return self._made
