"""The Sign-RPC envelope a result leaves the CVM in, and `attestation.json`, the receipt auditors check (DESIGN §6).

The envelope (format `sealroom-result/v1`) is public JSON: the gated payload and its digest, the recipe (app_id,
compose_hash), the chain and contracts, ε spent and left, the inputs' ciphertext digests and the KMS release.

    envelope_digest = sha256(b"sealroom-result/v1:" ‖ normalised JSON of the envelope)

The digest is bound twice, by two independent roots:
- signed through the guest agent's `Sign` (secp256k1, key at path "vms", purpose "signing") — its signature
  chain leads to the KMS root registered in DstackKms;
- put into a fresh quote as report_data (the 32 bytes, zero-padded to 64), whose event log proves the recipe.

`attestation.json` (format `sealroom-attestation/v1`) carries the envelope verbatim plus everything needed to
re-derive each link from raw evidence: quote, event log, app-compose.json verbatim, signature and chain, the
on-chain approvals and the release transaction, and the chain's state at the recorded block as proofs
(`chain.state_proof`: block header, account and storage proofs, code; contracts/storage.py), so that link 4 can
be checked against one trusted block hash after the chain node is gone. Nothing in it is trusted because the
project says so.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from dstack_sdk import DstackClient
from eth_keys import keys as eth_keys
from eth_utils import to_checksum_address

from compose.app_compose import normalized_json_bytes
from contracts.chain import Chain, DstackApp, DstackKms
from contracts.storage import fetch_state_proof

RESULT_FORMAT = "sealroom-result/v1"
ATTESTATION_FORMAT = "sealroom-attestation/v1"
SIGN_ALGORITHM = "secp256k1"
SIGN_PURPOSE = "signing"      # dstack's Sign uses the key at path "vms" with this purpose


def envelope_digest(envelope: dict[str, Any]) -> bytes:
    return hashlib.sha256(RESULT_FORMAT.encode() + b":" + normalized_json_bytes(envelope)).digest()


@dataclass(frozen=True)
class ChainEvidence:
    """Where the study lives on-chain and what the chain said at run time; ``state_proof``: that state as proofs
    (:func:`contracts.storage.fetch_state_proof`), None when none was gathered."""

    chain_id: int
    dstack_app: str
    dstack_kms: str
    kms_root_address: str
    block: int
    approvals: list[dict]
    state_proof: dict[str, Any] | None = None


def chain_evidence(chain: Chain, *, app_id: bytes, dstack_kms: str, compose_hash: bytes,
                   release_id: bytes | str | None = None) -> ChainEvidence:
    """What the chain says at run time: the block, the KMS root registered in DstackKms, and who approved; with
    ``release_id`` (the run's key release), also the DstackApp's state at that block as proofs."""
    app = DstackApp(chain, to_checksum_address(app_id))
    root = DstackKms(chain, dstack_kms).kms_root_pubkey()
    block = chain.w3.eth.block_number
    proof = None if release_id is None else fetch_state_proof(chain, app.address, block=block,
                                                              compose_hash=compose_hash, release_id=release_id)
    return ChainEvidence(
        chain_id=chain.chain_id, dstack_app=app.address, dstack_kms=to_checksum_address(dstack_kms),
        kms_root_address=eth_keys.PublicKey.from_compressed_bytes(root).to_checksum_address(),
        block=block, approvals=app.approval_events(compose_hash, to_block=block), state_proof=proof,
    )


def build_envelope(*, payload: dict[str, Any], app_id: bytes, compose_hash: bytes, chain: ChainEvidence,
                   epsilon_spent: float, epsilon_remaining: float, inputs: dict[str, dict[str, str]],
                   release: dict[str, Any], simulated: bool) -> dict[str, Any]:
    return {
        "format": RESULT_FORMAT,
        "simulated": simulated,
        "output_type": payload["output_type"],
        "payload": payload,
        "payload_sha256": hashlib.sha256(normalized_json_bytes(payload)).hexdigest(),
        "app_id": "0x" + app_id.hex(),
        "compose_hash": compose_hash.hex(),
        "chain_id": chain.chain_id,
        "block": chain.block,          # the chain state the run saw: signed, so an auditor reads the chain there
        "dstack_app": chain.dstack_app,
        "dstack_kms": chain.dstack_kms,
        "epsilon_spent": epsilon_spent,
        "epsilon_remaining": epsilon_remaining,
        "inputs": inputs,
        "release": release,
    }


def sign_and_attest(envelope: dict[str, Any], *, dstack: DstackClient, app_compose: bytes,
                    chain: ChainEvidence) -> dict[str, Any]:
    """Sign the envelope through the guest agent, quote over its digest, and gather attestation.json."""
    digest = envelope_digest(envelope)
    signed = dstack.sign(SIGN_ALGORITHM, digest)
    quote = dstack.get_quote(digest)
    return {
        "format": ATTESTATION_FORMAT,
        "simulated": envelope["simulated"],
        "envelope": envelope,
        "envelope_digest": digest.hex(),
        "signature": {"algorithm": SIGN_ALGORITHM, "purpose": SIGN_PURPOSE, "signature": signed.signature,
                      "public_key": signed.public_key, "signature_chain": list(signed.signature_chain)},
        "quote": quote.quote,
        "event_log": quote.event_log,
        "app_compose": app_compose.decode(),
        "chain": {"chain_id": chain.chain_id, "dstack_app": chain.dstack_app, "dstack_kms": chain.dstack_kms,
                  "kms_root_address": chain.kms_root_address, "block": chain.block, "approvals": chain.approvals}
                 | ({} if chain.state_proof is None else {"state_proof": chain.state_proof}),
        "collateral": None,
    }


def write_attestation(attestation: dict[str, Any], path) -> None:
    path.write_text(json.dumps(attestation, indent=1, sort_keys=True) + "\n")
