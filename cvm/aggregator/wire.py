"""What crosses the wire between a site and the aggregator, shared with the site side (``sealing_cli.site``).

- GET /attestation answers :class:`AggregatorAttestation`: a fresh quote whose report_data is
  :func:`aggregator_report_data` = ``sha512(b"sealroom-fed-aggregator/v1:" ‖ nonce ‖ X25519 public key)``.
- POST /update takes a signed update framed by :func:`update_to_bytes` and sealed with ``kms_client.box`` under
  :func:`update_box_context` (``b"sealroom-fed-update-box/v1:" ‖ contract digest``); it answers
  :class:`UpdateReceived`. Bodies over :func:`max_sealed_update_bytes` are refused unread.
- GET /result (and POST /close) answer :class:`RoundStatus`; published weights travel as hex
  (:func:`weights_from_hex`).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

from compose import safe_parse
from cvm.aggregator.errors import UpdateUnreadable
from cvm.federated import RoundContract, SignedUpdate
from cvm.labels import AGGREGATOR_REPORT_LABEL, UPDATE_BOX_LABEL
from kms_client.box import BOX_OVERHEAD

UPDATE_FORMAT = "sealroom-fed-update/v2"
UPDATE_HEADER_MAX = 4096     # bytes of the JSON header in front of the vector


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AggregatorAttestation(_Wire):
    """GET /attestation: the quote binding the aggregator's update key to the site's nonce."""

    format: Literal["sealroom-fed-aggregator-attestation/v1"] = "sealroom-fed-aggregator-attestation/v1"
    quote: str
    event_log: str
    app_compose: str
    public_key: str
    simulated: bool


class UpdateReceived(_Wire):
    received: bool
    update_sha256: str


class RoundStatus(_Wire):
    """GET /result. ``state``: open, published or failed (``error`` says why; nothing was released)."""

    state: Literal["open", "published", "failed"]
    round: int
    received: int
    error: str | None = None
    attestation: dict[str, Any] | None = None
    weights: str | None = None


def aggregator_report_data(nonce: bytes, public_key: bytes) -> bytes:
    """The 64 report_data bytes of GET /attestation (label and layout in the module docstring)."""
    if not 16 <= len(nonce) <= 64 or len(public_key) != 32:
        raise ValueError("nonce must be 16-64 bytes and public_key a 32-byte X25519 key")
    return hashlib.sha512(AGGREGATOR_REPORT_LABEL + nonce + public_key).digest()


def update_box_context(contract: RoundContract) -> bytes:
    """The box ``nonce`` (HKDF info and AAD) for updates of this round: a box opens only for this contract."""
    return UPDATE_BOX_LABEL + bytes.fromhex(contract.digest())


def max_sealed_update_bytes(num_parameters: int) -> int:
    """The largest sealed update an honest site sends for a model of ``num_parameters`` float32 values."""
    return BOX_OVERHEAD + 4 + UPDATE_HEADER_MAX + 4 * num_parameters


def update_to_bytes(update: SignedUpdate) -> bytes:
    """A signed update as the bytes the site seals: ``u32_be(n) ‖ n bytes of JSON header ‖ the vector``.

    The header holds every field but the vector, plus its length in parameters; the vector follows as its
    canonical float32 little-endian bytes. Binary because the vector is nearly all of it: as hex inside JSON,
    1M parameters cost about 100 ms to encode and 30 ms to parse, more than everything else a round does.
    """
    vector = np.ascontiguousarray(update.vector, "<f4")
    header = json.dumps({
        "format": UPDATE_FORMAT, "round": update.round, "site": update.site, "parent_digest": update.parent_digest,
        "num_examples": update.num_examples, "claimed_norm": update.claimed_norm, "signature": update.signature.hex(),
        "parameters": vector.size,
    }, sort_keys=True, separators=(",", ":")).encode()
    return b"".join((len(header).to_bytes(4, "big"), header, vector.data))


def update_from_bytes(data: bytes) -> SignedUpdate:
    """Parse :func:`update_to_bytes`; UpdateUnreadable on any deviation. Nothing is checked but the shape:
    the signature, eligibility, round, parent and norm are ``validate_updates``'s (named in the record)."""
    try:
        if len(data) < 4:
            raise ValueError("too short for a header length")
        size = int.from_bytes(data[:4], "big")
        if size > UPDATE_HEADER_MAX or len(data) < 4 + size:
            raise ValueError("the header length is out of range")
        raw = safe_parse.loads(data[4:4 + size])   # nested too deep: a ValueError, like any malformed header
        if not isinstance(raw, dict) or raw.get("format") != UPDATE_FORMAT:
            raise ValueError("unknown update format")
        parameters, vector_bytes = raw["parameters"], memoryview(data)[4 + size:]
        if not isinstance(parameters, int) or isinstance(parameters, bool) or len(vector_bytes) != 4 * parameters:
            raise ValueError("the vector is not the declared number of float32 values")
        return SignedUpdate(
            round=raw["round"], site=raw["site"], parent_digest=raw["parent_digest"],
            num_examples=raw["num_examples"], vector=np.frombuffer(vector_bytes, "<f4"),   # read-only view
            claimed_norm=float(raw["claimed_norm"]), signature=bytes.fromhex(raw["signature"]),
        )
    except (ValueError, KeyError, TypeError, AttributeError, OverflowError) as exc:  # OverflowError: float(10**400)
        raise UpdateUnreadable(f"malformed update: {exc}") from None


def weights_from_hex(text: str) -> np.ndarray:
    return np.frombuffer(bytes.fromhex(text), "<f4").copy()
