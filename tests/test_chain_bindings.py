"""The Python bindings against a real anvil chain: every action, and every refusal as a typed error."""

from __future__ import annotations

import hashlib

import pytest

from compose.backends.launcher import free_loopback_port
from contracts.chain import (
    AlreadyApproved,
    BudgetExceeded,
    Chain,
    ChainUnreachable,
    ComposeHashIsRevoked,
    ComposeHashNotAllowed,
    InvalidSignature,
    NotKmsSigner,
    NotOwner,
    OwnerDidNotApprove,
    ReleaseAlreadyRecorded,
    SignatureExpired,
    UnknownComposeHash,
)

H = hashlib.sha256(b"app-compose.json of study A").digest()
H2 = hashlib.sha256(b"app-compose.json of study B").digest()
FAR_FUTURE = 2**40


def boot_info(app, compose_hash, tcb="UpToDate"):
    zero = b"\x00" * 32
    return (app.address, compose_hash, "0x" + "00" * 20, zero, zero, zero, zero, tcb, [])


def test_approve_reaches_threshold_exactly_at_k(consortium, owners, funder):
    consortium.propose(H, "file:///app-compose.json", funder)
    for i, owner in enumerate(owners[:3]):
        assert not consortium.status(H).allowed, f"allowed after only {i} approvals"
        consortium.approve(H, owner)
    status = consortium.status(H)
    assert status.allowed and status.approvals == 3 and status.threshold == 3
    assert status.approvers == tuple(o.address for o in owners[:3])
    assert consortium.is_app_allowed(boot_info(consortium, H)) == (True, "")
    assert consortium.has_approved(H, owners[0].address) and not consortium.has_approved(H, owners[4].address)


def test_refusals_are_typed_and_carry_the_reason(consortium, owners, funder):
    with pytest.raises(UnknownComposeHash, match="never proposed"):
        consortium.approve(H, owners[0])
    consortium.propose(H, "", funder)
    with pytest.raises(NotOwner, match="is not an owner"):
        consortium.approve(H, funder)
    consortium.approve(H, owners[0])
    with pytest.raises(AlreadyApproved, match="already approved"):
        consortium.approve(H, owners[0])
    assert consortium.status(H).approvals == 1  # the refused approval changed nothing


def test_signed_approval_relayed_by_anyone(consortium, owners, funder):
    consortium.propose(H, "", funder)
    signature = consortium.sign_approval(H, owners[1], FAR_FUTURE)
    consortium.approve_signed(H, owners[1].address, FAR_FUTURE, signature, relayer=funder)
    assert consortium.has_approved(H, owners[1].address)
    with pytest.raises(AlreadyApproved):  # a replay
        consortium.approve_signed(H, owners[1].address, FAR_FUTURE, signature, relayer=funder)


def test_signed_approval_by_wrong_signer_or_expired_is_refused(consortium, owners, funder):
    consortium.propose(H, "", funder)
    forged = consortium.sign_approval(H, owners[2], FAR_FUTURE)
    with pytest.raises(InvalidSignature):
        consortium.approve_signed(H, owners[1].address, FAR_FUTURE, forged, relayer=funder)
    for_other_hash = consortium.sign_approval(H2, owners[1], FAR_FUTURE)
    with pytest.raises(InvalidSignature):
        consortium.approve_signed(H, owners[1].address, FAR_FUTURE, for_other_hash, relayer=funder)
    expired = consortium.sign_approval(H, owners[1], 1)
    with pytest.raises(SignatureExpired):
        consortium.approve_signed(H, owners[1].address, 1, expired, relayer=funder)
    assert consortium.status(H).approvals == 0


def test_signed_approval_for_another_contract_is_refused(chain, funder, owners, kms_signer, consortium):
    from contracts.chain import DstackApp

    other = DstackApp.deploy(chain, funder, owners=[o.address for o in owners], threshold=3, epsilon_budget=1.0,
                             kms_signer=kms_signer.address)
    consortium.propose(H, "", funder)
    other.propose(H, "", funder)
    signature_for_other = other.sign_approval(H, owners[0], FAR_FUTURE)
    with pytest.raises(InvalidSignature):
        consortium.approve_signed(H, owners[0].address, FAR_FUTURE, signature_for_other, relayer=funder)


def test_revoke_by_one_owner_is_final(consortium, owners, funder):
    consortium.propose(H, "", funder)
    for owner in owners[:3]:
        consortium.approve(H, owner)
    consortium.revoke(H, owners[4])  # an owner who never approved can still veto
    status = consortium.status(H)
    assert status.revoked and not status.allowed
    assert consortium.is_app_allowed(boot_info(consortium, H)) == (False, "Compose hash revoked")
    with pytest.raises(ComposeHashIsRevoked):
        consortium.approve(H, owners[3])
    with pytest.raises(ComposeHashIsRevoked):
        consortium.revoke(H, owners[0])


def test_budget_spent_only_by_kms_signer_within_budget(consortium, owners, funder, kms_signer):
    consortium.propose(H, "", funder)
    for owner in owners[:3]:
        consortium.approve(H, owner)
    consenting = [o.address for o in owners[:3]]
    with pytest.raises(NotKmsSigner):
        consortium.record_release(b"\x01" * 32, H, consenting, 0.5, owners[0])
    with pytest.raises(OwnerDidNotApprove):
        consortium.record_release(b"\x01" * 32, H, [owners[4].address], 0.5, kms_signer)
    consortium.record_release(b"\x01" * 32, H, consenting, 1.5, kms_signer)
    with pytest.raises(ReleaseAlreadyRecorded):
        consortium.record_release(b"\x01" * 32, H, consenting, 0.1, kms_signer)
    with pytest.raises(BudgetExceeded, match=r"requested ε=0.6, remaining ε=0.5"):
        consortium.record_release(b"\x02" * 32, H, consenting, 0.6, kms_signer)
    budget = consortium.budget()
    assert (budget.spent_micro, budget.remaining_micro) == (1_500_000, 500_000)


def test_release_refused_for_hash_below_threshold(consortium, owners, funder, kms_signer):
    consortium.propose(H, "", funder)
    consortium.approve(H, owners[0])
    with pytest.raises(ComposeHashNotAllowed):
        consortium.record_release(b"\x03" * 32, H, [owners[0].address], 0.1, kms_signer)
    assert consortium.budget().spent_micro == 0


def test_registry_delegates_to_the_app(registry, consortium, owners, funder):
    os_image = hashlib.sha256(b"simulated os image").digest()
    consortium.propose(H, "", funder)
    for owner in owners[:3]:
        consortium.approve(H, owner)
    info = list(boot_info(consortium, H))
    info[6] = os_image
    assert registry.is_app_allowed(tuple(info)) == (False, "OS image is not allowed")
    registry.allow_os_image(os_image, funder)
    assert registry.is_app_allowed(tuple(info)) == (True, "")
    info[1] = H2
    assert registry.is_app_allowed(tuple(info)) == (False, "Compose hash not allowed")
    registry.set_kms_root(b"\x02" + b"\x11" * 32, funder)
    assert registry.kms_root_pubkey() == b"\x02" + b"\x11" * 32


def test_unreachable_chain_is_a_clear_error():
    url = f"http://127.0.0.1:{free_loopback_port()}"
    with pytest.raises(ChainUnreachable, match="chain unreachable at"):
        Chain(url)
