"""Link 5, ``signature-chain``: the signature over the envelope digest recovers, through the app key, to a KMS
root that is the pinned one, the one DstackKms registered at the recorded block, the one the receipt names and
the one the CVM measured as its key provider; DstackKms registered the app and allowed the OS image the CVM
booted.

Without a pinned root, the root DstackKms registers is trusted (a warning); a root rotated after the run is a
warning. The key provider the CVM measured must be a 33-byte k256 KMS root key equal to the recovered root: one
that cannot be compared (not measured, not hex, another size, such as a real dstack guest's KMS CA key) is a
refusal, never a silent pass.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from eth_keys import keys as eth_keys
from eth_keys.exceptions import ValidationError as EthKeysValidationError
from eth_utils import is_address, to_checksum_address

from auditor.links.base import (
    Broken,
    Held,
    Notes,
    Pins,
    Recipe,
    chain_errors,
    need_chain,
    need_recipe,
    recipe_note,
    thaw,
)
from auditor.links.event_log import EventLogProof
from auditor.links.on_chain import OnChainProof
from auditor.receipt import ChainSection, Receipt
from contracts.chain import Chain, DstackKms
from cvm.attest.eventlog import BootEvents
from cvm.receipt import RESULT_FORMAT, SIGN_ALGORITHM, SIGN_PURPOSE
from kms_client.signature_chain import SignatureChainMismatch, recover_signature_chain

__all__ = ["CHECK", "KMS_ROOT_KEY_SIZE", "NAME", "NUMBER", "SignatureProof", "check"]

NUMBER, NAME = 5, "signature-chain"
CHECK = "the envelope's signature chain recovers to the pinned KMS root registered in DstackKms"
KMS_ROOT_KEY_SIZE = 33  # a compressed secp256k1 (k256) public key


@dataclass(frozen=True)
class SignatureProof:
    """The KMS root (checksum address) the envelope's signature chain leads to."""

    kms_root: str


def check(receipt: Receipt, recipe: Recipe | None, pins: Pins, event_log: EventLogProof | None,
          on_chain: OnChainProof | None, chain: Chain | None) -> Held[SignatureProof]:
    """``recipe``: the app_id the app key was derived for; ``event_log``: the measured key provider and OS image
    (None when link 2 proved nothing); ``on_chain``: the recorded block DstackKms is read at (else the latest)."""
    notes = Notes()
    with notes.breaking():
        proof = _check(notes, receipt, recipe, pins, event_log, on_chain, chain)
    return notes.held(proof)


def _check(notes: Notes, receipt: Receipt, recipe: Recipe | None, pins: Pins, event_log: EventLogProof | None,
           on_chain: OnChainProof | None, chain: Chain | None) -> SignatureProof:
    app_id = need_recipe(recipe).app_id
    recipe_note(notes, recipe)
    signature = receipt.signature.get()
    algorithm = signature.algorithm.get()
    purpose = signature.purpose.get()
    if (algorithm, purpose) != (SIGN_ALGORITHM, SIGN_PURPOSE):
        raise Broken(f"the signature is {algorithm!r} with purpose {purpose!r}; {RESULT_FORMAT} envelopes "
                     f"are signed {SIGN_ALGORITHM!r} with purpose {SIGN_PURPOSE!r} (dstack's Sign)")
    digest = receipt.envelope_digest.get()
    signatures = thaw(signature.signature_chain.get())
    # dstack's Sign returns the message signature twice: alone and first in the chain. Both must agree.
    if not signatures or signature.signature.get() != signatures[0]:
        raise Broken("signature.signature is not the first signature of signature.signature_chain")
    try:
        roots = recover_signature_chain(digest, signatures, message_pubkey=signature.public_key.get(),
                                        app_id=app_id, purpose=purpose, algorithm=algorithm)
    except SignatureChainMismatch as exc:
        raise Broken(f"the signature chain breaks at its {exc.link} link: {exc.reason}") from None
    root = roots.kms_root_address
    notes.facts.update(message_pubkey=roots.message_pubkey.hex(), app_pubkey=roots.app_pubkey.hex(),
                       recovered_kms_root=root, pinned_kms_root=pins.kms_root)
    notes.summary = f"signed by an app key of 0x{app_id.hex()} that KMS root {root} issued"
    if pins.kms_root is None:
        notes.warnings.append(f"no KMS root pinned (--kms-root): the chain leads to {root}, which is only "
                              "compared with what DstackKms registers")
    elif pins.kms_root != root:
        notes.problems.append(f"the chain ends at {root}, not the pinned KMS root {pins.kms_root}")
    recorded = receipt.chain.get()
    named = recorded.kms_root_address.get()
    if named != root:
        notes.problems.append(f"the receipt names KMS root {named}, but the chain ends at {root}")
    boot = event_log.boot if event_log is not None else None
    _check_key_provider(notes, boot, roots.kms_root_pubkey)
    recorded_block = on_chain.recorded_block if on_chain is not None else None
    _check_registry(notes, recorded, app_id, root, boot, recorded_block, chain)
    return SignatureProof(root)


def _check_key_provider(notes: Notes, boot: BootEvents | None, root_pubkey: bytes) -> None:
    # dstack measures {"name":"kms","id":<hex>} at boot; Sealroom's id is the KMS root's k256 key. Whatever cannot
    # be compared with the recovered root (a real dstack guest measures its KMS's CA key) is refused.
    if boot is None:
        notes.facts["measured_key_provider"] = None
        notes.problems.append("the key provider cannot be checked: it is measured in the event log (link 2)")
        return
    provider = boot.key_provider
    measured = provider.get("id") if isinstance(provider, dict) else None
    notes.facts["measured_key_provider"] = measured if isinstance(measured, str) else None
    unusable = "so it cannot be compared with the KMS root the chain leads to"
    if provider is None:
        notes.problems.append(f"the CVM measured no key provider, {unusable}")
        return
    if not isinstance(measured, str):
        notes.problems.append(f"the CVM's measured key provider names no KMS id, {unusable}")
        return
    try:
        measured_key = bytes.fromhex(measured)
    except ValueError:
        notes.problems.append(f"the CVM's measured key provider id is not hex, {unusable}")
        return
    if len(measured_key) != KMS_ROOT_KEY_SIZE:
        notes.problems.append(f"the CVM's measured key provider id is {len(measured_key)} bytes, not a "
                              f"{KMS_ROOT_KEY_SIZE}-byte k256 KMS root key, {unusable}")
        return
    notes.facts["measured_key_provider"] = measured_key.hex()
    if not hmac.compare_digest(measured_key, root_pubkey):
        notes.problems.append("the CVM measured another KMS as its key provider than the one the chain leads to")


def _check_registry(notes: Notes, recorded: ChainSection, app_id: bytes, root: str, boot: BootEvents | None,
                    recorded_block: int | None, chain: Chain | None) -> None:
    """DstackKms at the recorded block: registered this root, this app and the OS image the CVM booted."""
    chain = need_chain(chain)
    named = recorded.dstack_kms.get()
    if not is_address(named):
        raise Broken(f"chain.dstack_kms {named!r} is not an address")
    registry = DstackKms(chain, named)
    at = recorded_block if recorded_block is not None else "latest"
    with chain_errors(chain, "DstackKms", registry.address):
        then = _root_address(chain.view(registry.ARTIFACT, registry.contract, "kmsInfo", block=at)[0])
        now = _root_address(registry.kms_root_pubkey())
        registered_app = chain.view(registry.ARTIFACT, registry.contract, "registeredApps",
                                    to_checksum_address(app_id), block=at)
        os_image = boot.os_image_hash if boot is not None else None
        os_image_allowed = os_image is not None and chain.view(registry.ARTIFACT, registry.contract,
                                                               "allowedOsImages", os_image, block=at)
    notes.facts.update(dstack_kms=registry.address, registered_kms_root=then, registered_kms_root_now=now,
                       registered_at=at, app_registered=registered_app, os_image_allowed=os_image_allowed)
    if then != root:
        registered = "no KMS root" if then is None else f"KMS root {then}"
        notes.problems.append(f"DstackKms {registry.address} registered {registered} at block {at}, not {root}")
    elif now != then:
        notes.warnings.append(f"DstackKms has registered another KMS root since the run: {now}")
    if not registered_app:
        notes.problems.append(f"the app 0x{app_id.hex()} is not registered in DstackKms {registry.address}")
    if boot is None:
        notes.problems.append("the OS image cannot be checked: it is measured in the event log (link 2)")
    elif not os_image_allowed:
        measured = "no OS image" if os_image is None else f"OS image {os_image.hex()}"
        notes.problems.append(f"the CVM booted {measured}, which DstackKms {registry.address} does not allow")


def _root_address(pubkey: bytes) -> str | None:
    try:
        return eth_keys.PublicKey.from_compressed_bytes(bytes(pubkey)).to_checksum_address()
    except (EthKeysValidationError, ValueError):
        return None  # no (valid) root registered
