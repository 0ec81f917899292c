"""The KMS releases an app key only to an attested CVM whose recipe the chain allows — each rule from both sides."""

from __future__ import annotations

import hashlib

import pytest

from compose.stack_file import read_keystore
from cvm.attest.eventlog import RuntimeEvent
from kms.keys import generate_root_keys
from kms.service import KeyManagementService, Refused
from kms_client import wire
from kms_client.client import KmsClient, KmsRefused
from sealing_cli.stack import LocalStack
from tests.simulated_cvm import SimulatedCvm

RECIPES = {name: f'{{"name":"{name}"}}'.encode() for name in ("approved", "pending", "revoked")}
APPROVED, PENDING, REVOKED = (hashlib.sha256(RECIPES[n]).digest() for n in ("approved", "pending", "revoked"))
COMPOSE_OF = {hashlib.sha256(body).digest(): body for body in RECIPES.values()}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with LocalStack(tmp_path_factory.mktemp("kms-stack"), owner_names=("A", "B", "C"), threshold=2) as s:
        d = s.description
        owners = {o.name: read_keystore(o.keystore, d.dev_keystore_password) for o in d.owners}
        from contracts.chain import DstackApp

        app = DstackApp(s.chain, d.dstack_app)
        for h in (APPROVED, PENDING, REVOKED):
            app.propose(h, "", owners["A"])
        for h in (APPROVED, REVOKED):
            app.approve(h, owners["A"])
            app.approve(h, owners["B"])
        app.approve(PENDING, owners["A"])
        app.revoke(REVOKED, owners["C"])
        yield s


@pytest.fixture
def kms(stack):
    with KmsClient(stack.description.services["kms"]["url"]) as client:
        yield client


def cvm(stack, compose_hash, app_id=None):
    app_id = app_id or bytes.fromhex(stack.description.dstack_app[2:])
    return SimulatedCvm(stack.state_dir, app_id, COMPOSE_OF[compose_hash])


def test_approved_recipe_gets_its_app_key(stack, kms):
    app_id = bytes.fromhex(stack.description.dstack_app[2:])
    key = kms.get_app_key(cvm(stack, APPROVED).attest, app_id=app_id)
    assert key.simulated
    assert len(key.k256_key) == 32
    # the same app gets the same key after a KMS restart: the root survives, encrypted at rest
    meta_before = kms.meta()
    meta_after = stack.restart_kms()
    assert meta_after.k256_pubkey == meta_before.k256_pubkey
    with KmsClient(stack.description.services["kms"]["url"]) as again:
        assert again.get_app_key(cvm(stack, APPROVED).attest, app_id=app_id).k256_key == key.k256_key


@pytest.mark.parametrize(("compose_hash", "code", "reason"), [
    (PENDING, "not_approved", "Compose hash not allowed"),
    (REVOKED, "revoked", "Compose hash revoked"),
])
def test_chain_refusals_carry_the_chain_reason(stack, kms, compose_hash, code, reason):
    app_id = bytes.fromhex(stack.description.dstack_app[2:])
    with pytest.raises(KmsRefused, match=reason) as refused:
        kms.get_app_key(cvm(stack, compose_hash).attest, app_id=app_id)
    assert refused.value.code == code


def test_unregistered_app_is_refused(stack, kms):
    stranger = b"\x42" * 20
    with pytest.raises(KmsRefused, match="App not registered") as refused:
        kms.get_app_key(cvm(stack, APPROVED, app_id=stranger).attest, app_id=stranger)
    assert refused.value.code == "unknown_app"


def _flip(position):
    return lambda quote: quote[:position] + bytes([quote[position] ^ 1]) + quote[position + 1:]


@pytest.mark.parametrize("position", [0, 30, 48 + 136, 48 + 520, 48 + 584 - 1, 700, -200])
def test_tampered_quote_is_refused(stack, kms, position):
    app_id = bytes.fromhex(stack.description.dstack_app[2:])
    machine = cvm(stack, APPROVED)
    machine.tamper_quote = _flip(position)
    with pytest.raises(KmsRefused) as refused:
        kms.get_app_key(machine.attest, app_id=app_id)
    assert refused.value.code == "bad_quote"


def test_tampered_event_log_is_refused(stack, kms):
    app_id = bytes.fromhex(stack.description.dstack_app[2:])
    machine = cvm(stack, PENDING)

    def claim_approved(events):  # swap the compose-hash payload for the approved one, digest recomputed
        return [RuntimeEvent.measure("compose-hash", APPROVED) if e.name == "compose-hash" else e for e in events]

    machine.tamper_log = claim_approved
    with pytest.raises(KmsRefused, match="event log") as refused:
        kms.get_app_key(machine.attest, app_id=app_id)
    assert refused.value.code == "bad_quote"


def test_quote_bound_to_another_ephemeral_key_is_refused(stack, kms):
    app_id = bytes.fromhex(stack.description.dstack_app[2:])
    machine = cvm(stack, APPROVED)
    machine.report_data_override = b"\x00" * 64
    with pytest.raises(KmsRefused, match="report_data") as refused:
        kms.get_app_key(machine.attest, app_id=app_id)
    assert refused.value.code == "bad_quote"


def test_replayed_nonce_is_refused(stack, kms):
    machine = cvm(stack, APPROVED)
    captured = {}

    def attest_and_capture(report_data):
        captured["evidence"] = machine.attest(report_data)
        return captured["evidence"]

    app_id = bytes.fromhex(stack.description.dstack_app[2:])
    attestation, key, nonce = kms._attestation(attest_and_capture, None)
    first = kms._call("GetAppKey", attestation, wire.AppKeyResponse)
    with pytest.raises(KmsRefused, match="already used") as refused:
        kms._call("GetAppKey", attestation, wire.AppKeyResponse)
    assert refused.value.code == "stale_nonce"
    # the replayed attestation carried the one nonce the KMS issued, and its first use got this app's key
    assert len(nonce) == 32 and attestation.nonce == nonce.hex()
    opened = kms._open(first.box, nonce, key)
    assert bytes.fromhex(opened["k256_key"]) == kms.get_app_key(cvm(stack, APPROVED).attest, app_id=app_id).k256_key


def test_expired_nonce_is_refused(stack):
    from kms.service import NonceBook

    book = NonceBook(ttl_s=60)
    nonce, _ = book.issue(now=1000.0)
    with pytest.raises(Refused, match="expired"):
        book.take(nonce, now=1061.0)
    fresh, _ = book.issue(now=1000.0)
    book.take(fresh, now=1059.0)  # the good case


def test_simulated_quote_on_a_production_kms_is_refused(stack):
    """A KMS not in dev mode refuses SIMULATED quotes, whatever the chain says."""
    d = stack.description
    from contracts.chain import DstackKms

    service = KeyManagementService(root=generate_root_keys(), chain=stack.chain,
                                   registry=DstackKms(stack.chain, d.dstack_kms), dev_mode=False,
                                   simulated_root_der=None, signer=None)
    nonce = bytes.fromhex(service.issue_nonce().nonce)
    from kms_client.box import attestation_report_data

    pub = b"\x09" * 32
    quote, log = cvm(stack, APPROVED).attest(attestation_report_data(nonce, pub))
    request = wire.Attestation(quote=quote.hex(), event_log=log, nonce=nonce.hex(), ephemeral_pubkey=pub.hex())
    with pytest.raises(Refused, match="SIMULATED") as refused:
        service.get_app_key(request)
    assert refused.value.code == "simulated_quote_refused"

