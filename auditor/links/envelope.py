"""Link 6, ``envelope``: the envelope hashes to the signed digest, which the quote's report_data binds (so it is
this run's envelope, not another run's); the payload matches its digest; the envelope names the attested recipe,
the receipt's chain and contracts, and the quote's kind."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from auditor.links.base import Broken, Held, Notes, Recipe, need_recipe, same_json, thaw
from auditor.receipt import Envelope, Receipt
from compose.app_compose import normalized_json_bytes
from cvm.receipt import RESULT_FORMAT, envelope_digest

__all__ = ["CHECK", "NAME", "NUMBER", "EnvelopeProof", "check"]

NUMBER, NAME = 6, "envelope"
CHECK = "the quote's report_data binds this envelope's digest; the payload matches its digest"


@dataclass(frozen=True)
class EnvelopeProof:
    """The envelope's digest, recomputed, and its payload's sha256."""

    digest: bytes
    payload_sha256: str


def check(receipt: Receipt, recipe: Recipe | None, simulated: bool | None) -> Held[EnvelopeProof]:
    """``recipe``: the attested app_id and compose hash the envelope must name; ``simulated``: the quote's kind as
    link 1 found it (None when unknown: then the envelope's ``simulated`` is not compared)."""
    notes = Notes()
    with notes.breaking():
        proof = _check(notes, receipt, recipe, simulated)
    return notes.held(proof)


def _check(notes: Notes, receipt: Receipt, recipe: Recipe | None, simulated: bool | None) -> EnvelopeProof:
    envelope = receipt.envelope.get()
    stated = receipt.envelope_digest.get()
    if envelope.format.get() != RESULT_FORMAT:
        raise Broken(f"the envelope is not {RESULT_FORMAT}")
    recomputed = envelope_digest(thaw(envelope.json))
    notes.facts.update(envelope_digest=recomputed.hex())
    if not hmac.compare_digest(recomputed, stated):
        notes.problems.append(f"the envelope hashes to {recomputed.hex()}, not the signed digest "
                              f"{stated.hex()}: it was changed after signing")
    if not receipt.tdx_quote.usable:
        notes.problems.append("the quote does not parse, so its report_data cannot be compared (link 1)")
    elif not hmac.compare_digest(receipt.tdx_quote.value.body.report_data, stated.ljust(64, b"\0")):
        notes.problems.append("the quote's report_data binds another envelope, not this one: it is another "
                              "run's quote")
    payload = envelope.payload.get()
    payload_digest = hashlib.sha256(normalized_json_bytes(thaw(payload.json))).hexdigest()
    if envelope.payload_sha256.get() != payload_digest:
        notes.problems.append("the payload does not match envelope.payload_sha256")
    _check_envelope_names(notes, receipt, envelope, recipe, simulated)
    notes.summary = f"envelope digest {recomputed.hex()}, payload sha256 {payload_digest}"
    return EnvelopeProof(recomputed, payload_digest)


def _check_envelope_names(notes: Notes, receipt: Receipt, envelope: Envelope, recipe: Recipe | None,
                          simulated: bool | None) -> None:
    """The envelope's own statements agree with the attested recipe, the receipt's chain and the quote."""
    recipe = need_recipe(recipe)
    recorded = receipt.chain.get()
    expected = {
        "app_id": "0x" + recipe.app_id.hex(),
        "compose_hash": recipe.compose_hash.hex(),
        "chain_id": recorded.chain_id.get(),
        "dstack_app": recorded.dstack_app.get(),
        "dstack_kms": recorded.dstack_kms.get(),
    }
    if simulated is not None:
        expected["simulated"] = simulated
    wrong = sorted(key for key, value in expected.items() if not same_json(envelope.json.get(key), value))
    if wrong:
        notes.problems.append(f"the envelope's {', '.join(wrong)} differ from the attested recipe, the "
                              "receipt's chain section or the quote")
