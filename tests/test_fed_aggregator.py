"""The aggregator's round state machine in-process, on the SIMULATED guest agent (served through dstack-sdk) with a
fake KMS and chain evidence:

- a slow close (the KMS recording the spend, or ``run_round`` itself) never blocks ``receive``, ``status`` or a
  second close, and an update that arrives while ``run_round`` runs is not lost;
- round-to-round chaining: the previous signed record (``--previous``), the lineage (the previous round's result is
  this round's parent) and the accountant carry-over (ε spent continues from the previous record), each from both
  sides: the good chain is accepted, each bad one refused with its reason, through the library and the CLI.
"""

from __future__ import annotations

import copy
import hashlib
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from dstack_sdk import DstackClient
from eth_keys import keys as eth_keys
from eth_utils import to_checksum_address

import cvm.aggregator.state as aggregator_state
from cvm.agent_sim import AgentServer, AppKeyGrant, GuestAgentSimulator
from cvm.aggregator import (
    RoundAggregator,
    RoundClosed,
    RoundRecordInvalid,
    build_round_compose,
    continue_from,
    update_box_context,
    update_to_bytes,
    verify_previous_round,
    verify_round_attestation,
)
from cvm.aggregator.server import main as aggregator_main
from cvm.attest.simulated import SimulatedTdx
from cvm.federated import (
    AccountantState,
    OpacusGaussian,
    Reason,
    RoundContract,
    epsilon_spent,
    vector_digest,
)
from cvm.receipt import ChainEvidence, sign_and_attest
from kms_client.box import seal_to_bytes
from kms_client.messages import app_key_issued_digest
from kms_client.wire import RoundSpendResponse
from tests.test_fed_support import make_contract, make_sites, signed, small_updates

SIZE = 24
SITES = make_sites(3, seed=4)
SITE_NAMES = {f"site-{i}": site.address for i, site in enumerate(SITES)}
APP_ID = bytes.fromhex("5fbdb2315678afecb367f032d93f642f64180aa3")
# The aggregator runs here as a host process, not from the image: any well-formed study image digest will do.
IMAGE_DIGEST = "sha256:" + "7a" * 32
OTHER_APP_ID = b"\x01" * 20
KMS_ROOT = eth_keys.PrivateKey(hashlib.sha256(b"aggregator test KMS root").digest())
DSTACK_KMS = to_checksum_address("0x" + "22" * 20)
PROMPT_S = 5.0      # what "returns promptly" means here: generous for a loaded machine, far below a blocked call


# ---------------------------------------------------------------------------------- an in-process round CVM


class AppKeys:
    """The KMS as a booting simulated CVM sees it: issues the app key under KMS_ROOT."""

    def __init__(self, app_id: bytes):
        self.app_id = app_id

    def kms_root_pubkey(self) -> bytes:
        return KMS_ROOT.public_key.to_compressed_bytes()

    def get_app_key(self, attest) -> AppKeyGrant:
        key = hashlib.sha256(b"test app key" + self.app_id).digest()
        public = eth_keys.PrivateKey(key).public_key.to_compressed_bytes()
        signature = KMS_ROOT.sign_msg_hash(app_key_issued_digest(self.app_id, public)).to_bytes()
        return AppKeyGrant(k256_key=key, k256_signature=signature, kms_root_pubkey=self.kms_root_pubkey())


class FakeKms:
    """Records round spends; with ``gate`` it blocks inside ``record_round_spend`` until the gate is set."""

    def __init__(self, gate: threading.Event | None = None):
        self.gate = gate
        self.entered = threading.Event()
        self.calls: list[float] = []
        self._lock = threading.Lock()

    def record_round_spend(self, attest, app_compose: bytes, epsilon: float) -> RoundSpendResponse:
        with self._lock:
            self.calls.append(epsilon)
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(60), "the test never released the KMS"
        attest(hashlib.sha256(b"kms nonce").digest())     # the aggregator attests to the KMS, as the real one asks
        return RoundSpendResponse(release_id="0x" + "ab" * 32, release_tx="0x" + "cd" * 32,
                                  epsilon_spent=sum(self.calls), epsilon_remaining=30.0 - sum(self.calls),
                                  simulated=True)


class GatedNoise:
    """Opacus noise that blocks its first draw until ``gate`` is set: a ``run_round`` that takes its time."""

    name = "opacus"

    def __init__(self, gate: threading.Event):
        self._inner = OpacusGaussian(insecure_test_seed=5)
        self.description = self._inner.description
        self.gate, self.entered, self.draws = gate, threading.Event(), 0

    def add(self, vector, *, l2_sensitivity, noise_multiplier):
        self.draws += 1
        if self.draws == 1:
            self.entered.set()
            assert self.gate.wait(60), "the test never released the noise"
        return self._inner.add(vector, l2_sensitivity=l2_sensitivity, noise_multiplier=noise_multiplier)


def fake_chain_evidence(chain, *, app_id: bytes, dstack_kms: str, compose_hash: bytes,
                        release_id: object = None) -> ChainEvidence:
    return ChainEvidence(chain_id=31337, dstack_app=to_checksum_address(app_id), dstack_kms=dstack_kms,
                         kms_root_address=KMS_ROOT.public_key.to_checksum_address(), block=1, approvals=[])


class RoundCvm:
    """A SIMULATED CVM measured for one round compose on the simulated platform in ``platform``, its agent
    served on a Unix socket."""

    def __init__(self, folder: Path, platform: Path, contract: RoundContract, app_id: bytes = APP_ID):
        self.contract = contract
        self.compose = build_round_compose("fed-agg-test", contract, SITE_NAMES, image_digest=IMAGE_DIGEST)
        agent = GuestAgentSimulator.boot(self.compose, app_id, AppKeys(app_id), platform)
        self.root = SimulatedTdx.load_or_create(platform).root_der
        folder.mkdir(parents=True, exist_ok=True)
        self.socket = folder / "agent.sock"
        self.server = AgentServer(agent, self.socket)
        self.server.start()
        self.dstack = DstackClient(str(self.socket))
        self.dstack.__enter__()    # (the SDK closes its connection on __exit__ only)

    def aggregator(self, parent: np.ndarray, out_dir: Path, *, kms=None, noise=None,
                   state: AccountantState | None = None) -> RoundAggregator:
        return RoundAggregator(dstack=self.dstack, kms=kms or FakeKms(), chain=None, dstack_kms=DSTACK_KMS,
                               parent=parent, accountant_state=state or AccountantState(), out_dir=out_dir,
                               noise=noise or OpacusGaussian(insecure_test_seed=5))

    def stop(self) -> None:
        self.dstack.__exit__(None, None, None)
        self.server.stop()


def sealed(aggregator: RoundAggregator, update) -> bytes:
    attested = aggregator.attestation(b"\x07" * 16)
    return bytes(seal_to_bytes(update_to_bytes(update), nonce=update_box_context(aggregator.contract),
                               cvm_pub=bytes.fromhex(attested.public_key)))


def updates_for(contract: RoundContract, seed: int = 0) -> list:
    return [signed(site, contract, vector) for site, vector in zip(SITES, small_updates(len(SITES), SIZE, seed=seed))]


def promptly(call):
    """Run ``call`` in a thread; return its result (or the exception it raised) if it ends within PROMPT_S."""
    done: dict = {}

    def run():
        try:
            done["value"] = call()
        except Exception as exc:   # noqa: BLE001 - handed back to the test
            done["value"] = exc

    worker = threading.Thread(target=run, daemon=True)
    started = time.monotonic()
    worker.start()
    worker.join(PROMPT_S)
    assert not worker.is_alive(), f"blocked for more than {PROMPT_S} s behind the close"
    return done["value"], time.monotonic() - started


def round_contract(parent: np.ndarray, round_number: int = 1, **overrides) -> RoundContract:
    overrides.setdefault("deadline", int(time.time()) + 3600)   # closes early: every eligible site sends
    return make_contract(parent, SITES, round=round_number, **overrides)


@pytest.fixture(scope="module", autouse=True)
def no_chain():
    """The receipt's chain evidence is read from a fixed answer: these tests run without a chain."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(aggregator_state, "chain_evidence", fake_chain_evidence)
        yield


PARENT_1 = np.zeros(SIZE, dtype="<f4")


@pytest.fixture(scope="module")
def platform(tmp_path_factory) -> Path:
    """One simulated TDX platform (and root) for every CVM here, as on the local stack."""
    return tmp_path_factory.mktemp("tdx")


@pytest.fixture(scope="module")
def cvm_1(tmp_path_factory, platform):
    cvm = RoundCvm(tmp_path_factory.mktemp("r1"), platform, round_contract(PARENT_1))
    yield cvm
    cvm.stop()


# ---------------------------------------------------------------------------------- a slow close blocks nothing


def test_receive_status_and_a_second_close_answer_while_the_kms_records_the_spend(cvm_1, tmp_path):
    gate = threading.Event()
    kms = FakeKms(gate)
    aggregator = cvm_1.aggregator(PARENT_1, tmp_path, kms=kms)
    first, *others = updates_for(cvm_1.contract)
    for update in (first, *others):
        aggregator.receive(sealed(aggregator, update))
    late = sealed(aggregator, first)
    closer = threading.Thread(target=aggregator.try_close, daemon=True)
    closer.start()
    try:
        assert kms.entered.wait(60), "the close never reached the KMS"
        refused, _ = promptly(lambda: aggregator.receive(late))
        assert isinstance(refused, RoundClosed) and "takes no more updates" in str(refused)
        status, _ = promptly(aggregator.status)
        assert (status.state, status.received, status.attestation) == ("open", 3, None)
        second, _ = promptly(aggregator.try_close)
        assert second.state == "open"
        assert len(kms.calls) == 1, "a second close ran while the first held the round"
    finally:
        gate.set()
        closer.join(60)
    status = aggregator.status()
    assert status.state == "published", status.error
    assert len(kms.calls) == 1
    record = status.attestation["envelope"]["payload"]["record"]
    assert [j["site"] for j in record["joined"]] == [s.address for s in SITES] and record["rejected"] == []
    assert aggregator.try_close().state == "published" and len(kms.calls) == 1


def test_an_update_received_while_run_round_runs_is_not_lost(cvm_1, tmp_path):
    gate = threading.Event()
    noise = GatedNoise(gate)
    aggregator = cvm_1.aggregator(PARENT_1, tmp_path, noise=noise)
    updates = updates_for(cvm_1.contract)
    for update in updates:
        aggregator.receive(sealed(aggregator, update))
    replay = sealed(aggregator, updates[0])
    closer = threading.Thread(target=aggregator.try_close, daemon=True)
    closer.start()
    try:
        assert noise.entered.wait(60), "run_round never drew its noise"
        received, _ = promptly(lambda: aggregator.receive(replay))
        assert not isinstance(received, Exception) and received.received
    finally:
        gate.set()
        closer.join(60)
    status = aggregator.status()
    assert status.state == "published", status.error
    record = status.attestation["envelope"]["payload"]["record"]
    assert status.received == 4 and noise.draws == 2          # the close started over with the late update
    assert [(r["site"], r["reason"]) for r in record["rejected"]] == [(SITES[0].address, Reason.REPLAYED.value)]


# ---------------------------------------------------------------------------------- chaining rounds


def publish(aggregator: RoundAggregator, contract: RoundContract, seed: int) -> dict:
    for update in updates_for(contract, seed=seed):
        aggregator.receive(sealed(aggregator, update))
    status = aggregator.try_close()
    assert status.state == "published", status.error
    return aggregator.status().attestation


class TwoRounds:
    """Round 1 published; round 2 (from round 1's result) continued from it and published."""

    def __init__(self, cvm_1: RoundCvm, folder: Path, platform: Path):
        self.cvm_1 = cvm_1
        self.round_1 = publish(cvm_1.aggregator(PARENT_1, folder / "out"), cvm_1.contract, seed=1)
        self.weights_1 = np.frombuffer((folder / "out" / "round-1.model.f32").read_bytes(), "<f4").copy()
        self.contract_2 = round_contract(self.weights_1, 2)
        self.cvm_2 = RoundCvm(folder / "r2", platform, self.contract_2)
        self.state_1 = verify_previous_round(self.round_1, contract=self.contract_2, app_id=APP_ID,
                                             now=int(time.time()), allow_simulated=True,
                                             simulated_root_der=self.cvm_1.root)
        self.round_2 = publish(self.cvm_2.aggregator(self.weights_1, folder / "out", state=self.state_1),
                               self.contract_2, seed=2)

    def previous_for(self, contract: RoundContract, attestation: dict | None, **kwargs):
        kwargs.setdefault("allow_simulated", True)
        kwargs.setdefault("simulated_root_der", self.cvm_1.root)
        kwargs.setdefault("app_id", APP_ID)
        return verify_previous_round(attestation, contract=contract, now=int(time.time()), **kwargs)


@pytest.fixture(scope="module")
def rounds(cvm_1, tmp_path_factory, platform):
    built = TwoRounds(cvm_1, tmp_path_factory.mktemp("rounds"), platform)
    yield built
    built.cvm_2.stop()


def test_the_good_chain_carries_the_lineage_and_the_accountant(rounds):
    payload_1 = rounds.round_1["envelope"]["payload"]
    assert rounds.state_1 == AccountantState.model_validate(payload_1["accountant_state"])
    assert rounds.state_1.last_round == 1 and rounds.state_1.history == ((1.0, 1.0, 1),)
    round_2 = verify_round_attestation(rounds.round_2, app_id=APP_ID, now=int(time.time()), allow_simulated=True,
                                       simulated_root_der=rounds.cvm_1.root)
    record_1, record_2 = payload_1["record"], round_2.record
    assert record_2.lineage.parent == record_1["lineage"]["child"] == vector_digest(rounds.weights_1)
    # ε spent carries over: round 2's total is the accountant's over both rounds, not round 2's alone
    assert round_2.accountant_state == AccountantState(history=((1.0, 1.0, 2),), last_round=2)
    total_2 = epsilon_spent(round_2.accountant_state, rounds.contract_2.delta)
    assert record_2.privacy.epsilon_spent_total == pytest.approx(total_2, rel=1e-12)
    assert total_2 > record_1["privacy"]["epsilon_spent_total"] + 0.1
    assert record_2.privacy.epsilon_round == pytest.approx(total_2 - record_1["privacy"]["epsilon_spent_total"])
    # and round 2's record continues into a round 3 from its result
    contract_3 = round_contract(rounds.weights_1, 3, parent_digest=record_2.lineage.child)
    assert rounds.previous_for(contract_3, rounds.round_2) == round_2.accountant_state


def test_round_one_starts_empty_and_round_two_without_its_previous_record_does_not_start(rounds):
    assert rounds.previous_for(rounds.cvm_1.contract, None) == AccountantState()
    with pytest.raises(ValueError, match="round 2 needs the accountant state after round 1"):
        rounds.previous_for(rounds.contract_2, None)
    with pytest.raises(ValueError, match="round 2 needs the accountant state after round 1"):
        rounds.cvm_2.aggregator(rounds.weights_1, Path("/nonexistent"), state=AccountantState())


def _resigned(rounds, mutate) -> dict:
    """Round 1's attestation with its payload changed by ``mutate`` and signed and quoted again by round 1's CVM:
    what an aggregator of the same recipe that got its accounting wrong would publish."""
    attestation = copy.deepcopy(rounds.round_1)
    envelope = attestation["envelope"]
    mutate(envelope["payload"])
    return sign_and_attest(envelope, dstack=rounds.cvm_1.dstack, app_compose=rounds.cvm_1.compose,
                           chain=fake_chain_evidence(None, app_id=APP_ID, dstack_kms=DSTACK_KMS, compose_hash=b""))


def _forge_accountant(payload):
    payload["accountant_state"]["history"] = [[5.0, 1.0, 1]]     # a smaller ε than the record's


def _forge_last_round(payload):
    payload["accountant_state"]["last_round"] = 0


def _tamper(path: tuple[str, ...], value):
    def tamper(rounds, attestation):
        target = attestation
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        return attestation
    return tamper


@pytest.mark.parametrize("forge, reason", [
    # a forged previous record: the quote covers the envelope digest, so any edit breaks it
    (_tamper(("envelope", "payload", "accountant_state", "history"), []), "its quote does not verify"),
    (_tamper(("envelope", "payload", "record", "privacy", "epsilon_spent_total"), 0.0), "its quote does not verify"),
    (_tamper(("envelope", "payload", "record", "lineage", "child"), "0" * 64), "its quote does not verify"),
    (_tamper(("app_compose",), "{}"), "not the measured one"),
    (_tamper(("quote",), "00"), "its quote does not verify"),
    (lambda rounds, attestation: {k: v for k, v in attestation.items() if k != "envelope"}, "not a round attestation"),
    # signed by the recipe, but its accountant state does not give its ε, or is not for its round
    (lambda rounds, _: _resigned(rounds, _forge_accountant), "the accountant state does not give the record's ε"),
    (lambda rounds, _: _resigned(rounds, _forge_last_round), "the record is not for the measured round contract"),
], ids=["accountant-history", "epsilon-total", "lineage-child", "app-compose", "quote", "no-envelope",
        "resigned-accountant", "resigned-last-round"])
def test_a_forged_or_mismatched_previous_record_is_refused(rounds, forge, reason):
    attestation = forge(rounds, copy.deepcopy(rounds.round_1))
    with pytest.raises(RoundRecordInvalid, match=reason):
        rounds.previous_for(rounds.contract_2, attestation)


def test_a_resigned_but_consistent_record_is_still_accepted(rounds):
    """The re-signing helper above is sound: re-signing an unchanged payload gives a record that chains."""
    assert rounds.previous_for(rounds.contract_2, _resigned(rounds, lambda payload: None)) == rounds.state_1


def test_a_previous_record_from_another_app_or_unpinned_simulation_is_refused(rounds):
    with pytest.raises(RoundRecordInvalid, match="another app"):
        rounds.previous_for(rounds.contract_2, rounds.round_1, app_id=OTHER_APP_ID)
    with pytest.raises(RoundRecordInvalid, match="its quote does not verify"):
        rounds.previous_for(rounds.contract_2, rounds.round_1, allow_simulated=False, simulated_root_der=None)
    other_root = SimulatedTdx.load_or_create(rounds.cvm_2.socket.parent / "other-tdx").root_der
    with pytest.raises(RoundRecordInvalid, match="its quote does not verify"):
        rounds.previous_for(rounds.contract_2, rounds.round_1, simulated_root_der=other_root)


def test_the_lineage_must_lead_to_this_rounds_parent(rounds):
    elsewhere = round_contract(rounds.weights_1 + np.float32(0.5), 2)
    with pytest.raises(RoundRecordInvalid, match="lineage: the previous round produced .* not this round's parent"):
        rounds.previous_for(elsewhere, rounds.round_1)
    from_the_start = round_contract(PARENT_1, 2)     # round 2 restarted from round 1's parent, not its result
    with pytest.raises(RoundRecordInvalid, match="lineage"):
        rounds.previous_for(from_the_start, rounds.round_1)


def test_the_previous_record_must_be_the_round_just_before(rounds):
    record_1 = verify_round_attestation(rounds.round_1, app_id=APP_ID, now=int(time.time()), allow_simulated=True,
                                        simulated_root_der=rounds.cvm_1.root)
    skipping = round_contract(rounds.weights_1, 3)                     # round 3 from round 1's result
    with pytest.raises(RoundRecordInvalid, match="it is round 1's record; round 3 continues from round 2's"):
        rounds.previous_for(skipping, rounds.round_1)
    with pytest.raises(RoundRecordInvalid, match="it is round 2's record; round 2 continues from round 1's"):
        rounds.previous_for(rounds.contract_2, rounds.round_2)          # round 2 replaying its own record
    with pytest.raises(RoundRecordInvalid, match="round 1 starts the accounting"):
        continue_from(record_1, rounds.cvm_1.contract)


# ---------------------------------------------------------------------------------- the same through the CLI


def run_cli(rounds, monkeypatch, capsys, tmp_path, *extra: str) -> tuple[int, str]:
    """``python -m cvm.aggregator`` in round 2's CVM; the KMS and the chain are unreachable, so a run that gets
    past the previous-record checks stops at opening them."""
    monkeypatch.setenv("DSTACK_SIMULATOR_ENDPOINT", str(rounds.cvm_2.socket))
    parent = tmp_path / "parent.f32"
    parent.write_bytes(rounds.weights_1.tobytes())
    code = aggregator_main(["--port", "9", "--kms-url", "http://127.0.0.1:9", "--rpc-url", "http://127.0.0.1:9",
                            "--dstack-kms", DSTACK_KMS, "--parent", str(parent), "--out-dir", str(tmp_path / "out"),
                            *extra])
    return code, capsys.readouterr().err


def _write(tmp_path: Path, attestation: dict) -> str:
    path = tmp_path / "previous.attestation.json"
    path.write_text(json.dumps(attestation))
    return str(path)


def test_the_cli_takes_the_good_previous_record(rounds, monkeypatch, capsys, tmp_path):
    root = tmp_path / "root.der"
    root.write_bytes(rounds.cvm_1.root)
    code, err = run_cli(rounds, monkeypatch, capsys, tmp_path, "--previous", _write(tmp_path, rounds.round_1),
                        "--allow-simulated", "--simulated-root", str(root))
    assert code == 1 and "unreachable" in err and "rejected" not in err, err


@pytest.mark.parametrize("previous, simulated, reason", [
    (None, True, "round 2 needs the accountant state after round 1"),
    ("round_1", False, "round record rejected: its quote does not verify"),
    ("forged", True, "round record rejected: its quote does not verify"),
    ("round_2", True, "round record rejected: it is round 2's record; round 2 continues from round 1's"),
])
def test_the_cli_refuses_a_bad_previous_record_before_opening_the_kms(rounds, monkeypatch, capsys, tmp_path,
                                                                         previous, simulated, reason):
    root = tmp_path / "root.der"
    root.write_bytes(rounds.cvm_1.root)
    extra = ["--allow-simulated", "--simulated-root", str(root)] if simulated else []
    if previous is not None:
        attestation = copy.deepcopy(rounds.round_1 if previous == "forged" else getattr(rounds, previous))
        if previous == "forged":
            attestation["envelope"]["payload"]["accountant_state"]["history"] = []
        extra += ["--previous", _write(tmp_path, attestation)]
    code, err = run_cli(rounds, monkeypatch, capsys, tmp_path, *extra)
    assert code == 1 and reason in err and "unreachable" not in err, err


def test_a_round_recipe_runs_the_aggregator_from_the_study_image_named_by_its_digest():
    import yaml

    from compose.app_compose import manifest_from_app_compose
    from compose.image import image_allowed

    compose = build_round_compose("fed-image", round_contract(PARENT_1), SITE_NAMES, image_digest=IMAGE_DIGEST)
    (service,) = yaml.safe_load(json.loads(compose)["docker_compose_file"])["services"].values()
    assert service["image"] == f"sealroom/study-runner@{IMAGE_DIGEST}"
    assert service["command"] == ["python", "-m", "cvm.aggregator"]
    assert manifest_from_app_compose(compose).analysis.kind == "fed_round"
    assert image_allowed(compose, allowed=[IMAGE_DIGEST]) is None               # what the API and backend accept
    other = "sha256:" + "7b" * 32
    assert build_round_compose("fed-image", round_contract(PARENT_1), SITE_NAMES, image_digest=other) != compose
    for bad in ("sha256:" + "0" * 64, "latest", "sha256:" + "7A" * 32, "sealroom/study-runner@" + IMAGE_DIGEST):
        with pytest.raises(ValueError, match="image_digest"):
            build_round_compose("fed-image", round_contract(PARENT_1), SITE_NAMES, image_digest=bad)
