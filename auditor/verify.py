"""`seal verify`: walk a run's receipt (attestation.json) link by link, from raw evidence (DESIGN.md, "The chain
of trust" and §6 step 7; issue 6).

:func:`verify_receipt` re-derives seven links and reports every one of them — ``ok``, ``warning`` (holds, with a
caveat printed loudly) or ``failed`` (with the reason) — without stopping at the first failure. Each link is one
module of :mod:`auditor.links`, a function of explicit immutable inputs (see :mod:`auditor.links.base`):

1. ``quote`` (:mod:`auditor.links.quote`): the TDX quote verifies (real: Intel DCAP with collateral at time
   ``now``; SIMULATED: only when allowed, against the pinned simulated root); its TCB status; not a debug TD; the
   receipt's ``simulated`` flag says what the quote is.
2. ``event-log`` (:mod:`auditor.links.event_log`): the event log replays to the quote's RTMR3 (and RTMR0-2);
   app_id and compose_hash are read from that replay; the quote's MRTD and RTMR0-2 are the pinned measurements of
   the OS image the CVM measured (without a pinned record: a WARNING, the OS was compared with nothing).
3. ``compose`` (:mod:`auditor.links.compose`): ``sha256(app-compose.json as shipped)`` is that compose hash; the
   study manifest inside it.
4. ``on-chain`` (:mod:`auditor.links.on_chain`): on the DstackApp whose address is the app_id, at the recorded
   block, read from the receipt's storage proofs checked against a trusted block hash (given, or the chain's):
   the hash was allowed, who approved, the release that spent the budget, the budget then; with a chain node,
   when they approved (block timestamps) and now: revoked since? (a WARNING, not a failure: the run happened
   before), budget spent and left.
5. ``signature-chain`` (:mod:`auditor.links.signature_chain`): the signature over the envelope digest recovers,
   through the app key, to a KMS root that is the pinned one, the one DstackKms registered at the recorded block,
   the one the receipt names and the one the CVM measured as its key provider; DstackKms registered the app and
   allowed the OS image the CVM booted.
6. ``envelope`` (:mod:`auditor.links.envelope`): the envelope hashes to the signed digest, which the quote's
   report_data binds; the payload matches its digest; the envelope names the attested recipe, this chain and
   contracts, and the quote's kind.
7. ``output`` (:mod:`auditor.links.output`): output type, ε (spent by the release and by the analysis), δ and
   inputs match the manifest.
8. ``image`` (:mod:`auditor.links.image`), only when a rebuild is given (``seal verify --rebuild SOURCE``, see
   :mod:`auditor.rebuild`): the study image the measured compose pins is the one rebuilt bit for bit from the
   source — this receipt came from this source code.

Each link checks relations between pieces of raw evidence (parsed once, :mod:`auditor.receipt`), so a tampered
field breaks the link that reads it. Where a link needs a value that an earlier link failed to prove (the recipe
when the event log does not replay, RTMR3 when the quote does not verify), it uses the receipt's unproven claim
and says so in its facts: the report then shows whether everything else holds. The chain is read through the
caller's connection and nothing in the receipt is trusted because the receipt says so; what the auditor pins is
the simulated root (for SIMULATED quotes), Intel's root (in :mod:`cvm.attest.verify`) and the KMS root address,
and optionally the recorded block's hash (link 4 checks the receipt's storage proofs against it).
The block the run saw is signed in the envelope (``envelope.block``); ``chain.block`` must repeat it, the
proven block header is that block's, and the chain bounds it too (not before the release, not after the head).

Errors::

    ReceiptError
    └── NotAReceipt(reason)   the document is not a sealroom-attestation/v1 receipt: nothing to verify

Every other problem with a receipt is a failed link in the report, not an exception. Caller mistakes (a
non-integer ``now``, ``allow_simulated`` without a pinned root) raise TypeError/ValueError.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import ModuleType
from typing import Any

from eth_utils import is_address, to_checksum_address

from auditor.links import compose, envelope, event_log, image, on_chain, output, quote, signature_chain
from auditor.links.base import Broken as _Broken
from auditor.links.base import Held as _Held
from auditor.links.base import Pins as _Pins
from auditor.links.image import RebuiltImage
from auditor.receipt import NotAReceipt, ReceiptError, load_receipt
from auditor.receipt import parse_receipt as _parse_receipt
from auditor.render import render_checklist
from auditor.report import LinkResult, LinkStatus, VerificationReport
from contracts.chain import Chain
from cvm.attest.os_image import OsMeasurement

__all__ = [
    "LINKS",
    "LinkResult",
    "LinkStatus",
    "NotAReceipt",
    "RebuiltImage",
    "ReceiptError",
    "VerificationReport",
    "load_receipt",
    "render_checklist",
    "verify_receipt",
]

_CHECKLIST: tuple[ModuleType, ...] = (quote, event_log, compose, on_chain, signature_chain, envelope, output)
# (number, name, what the link checks) — the seven links, in order.
LINKS = tuple((link.NUMBER, link.NAME, link.CHECK) for link in _CHECKLIST)


def verify_receipt(
    receipt: Mapping[str, Any],
    *,
    now: int,
    chain: Chain | None,
    kms_root: str | None = None,
    collateral: str | None = None,
    allow_simulated: bool = False,
    simulated_root_der: bytes | None = None,
    os_measurements: Iterable[OsMeasurement] | None = None,
    block_hash: bytes | str | None = None,
    rebuilt_image: RebuiltImage | None = None,
) -> VerificationReport:
    """Check every link of a receipt (see the module docstring) and report each; never stops at a failure.

    ``now`` (unix seconds) is the time certificates and DCAP collateral are judged at. ``chain`` is a connection
    to the chain the study lives on (None when it cannot be reached: the links that read it then fail as
    unreachable). ``kms_root`` pins the KMS root address (0x, checksum or not); without it the root
    registered in DstackKms is used, with a warning. ``collateral`` (DCAP collateral JSON) overrides the one
    the receipt carries. SIMULATED quotes pass link 1 only with ``allow_simulated`` and the pinned
    ``simulated_root_der``. ``os_measurements`` pins the measurement records of the OS images the auditor trusts
    (link 2 compares the quote's MRTD and RTMR0-2 with the one for the image the CVM measured; without one it
    warns). ``block_hash`` (32 bytes, or their hex) is the hash of the recorded block the auditor trusts: link 4
    checks the receipt's storage proofs against it, with or without ``chain`` (without it: against the chain's
    hash of that block). ``rebuilt_image`` (:func:`auditor.rebuild.rebuild_study_image`) adds link 8, ``image``:
    the compose's pinned image digest is the rebuilt one. Raises :class:`NotAReceipt` if there is no v1 receipt
    to check.
    """
    if not isinstance(now, int) or isinstance(now, bool):
        raise TypeError("now must be an int (unix seconds)")
    if kms_root is not None and not (isinstance(kms_root, str) and kms_root.startswith("0x") and is_address(kms_root)):
        raise ValueError("kms_root must be a 0x-prefixed 20-byte address")
    if allow_simulated and not isinstance(simulated_root_der, bytes):
        raise ValueError("allow_simulated needs simulated_root_der (the pinned simulated root, DER)")
    trusted_block_hash = _block_hash(block_hash)
    evidence = _parse_receipt(receipt)
    pins = _Pins(now=now, kms_root=None if kms_root is None else to_checksum_address(kms_root),
                 collateral=collateral, allow_simulated=allow_simulated, simulated_root_der=simulated_root_der,
                 os_measurements=tuple(os_measurements or ()))
    results: list[LinkResult] = []

    def run(link: ModuleType, *inputs: Any) -> Any:
        """One link's result for the report; what it proved (even if it broke) for the later links."""
        try:
            held = link.check(*inputs)
        except _Broken as broken:
            results.append(_failed(link, broken))
            return broken.proven
        results.append(_holds(link, held))
        return held.proven

    quote_proof = run(quote, evidence, pins)
    simulated = quote_proof.simulated if quote_proof is not None else None
    event_log_proof = run(event_log, evidence, quote_proof, pins)
    recipe = event_log.recipe(event_log_proof, evidence)
    compose_proof = run(compose, evidence, recipe)
    on_chain_proof = run(on_chain, evidence, recipe, chain, trusted_block_hash)
    run(signature_chain, evidence, recipe, pins, event_log_proof, on_chain_proof, chain)
    run(envelope, evidence, recipe, simulated)
    run(output, evidence, compose_proof, event_log_proof, on_chain_proof)
    if rebuilt_image is not None:
        run(image, evidence, compose_proof, rebuilt_image)
    return VerificationReport(links=tuple(results), simulated=simulated, verified_at=now)


def _block_hash(given: bytes | str | None) -> bytes | None:
    if given is None:
        return None
    try:
        raw = bytes.fromhex(given.removeprefix("0x")) if isinstance(given, str) else bytes(given)
    except (ValueError, TypeError):
        raise ValueError("block_hash must be 32 bytes or their hex") from None
    if len(raw) != 32:
        raise ValueError("block_hash must be 32 bytes or their hex")
    return raw


def _holds(link: ModuleType, held: _Held) -> LinkResult:
    status = LinkStatus.WARNING if held.warnings else LinkStatus.OK
    return LinkResult(link.NUMBER, link.NAME, link.CHECK, status, held.summary, "; ".join(held.warnings) or None,
                      dict(held.facts))


def _failed(link: ModuleType, broken: _Broken) -> LinkResult:
    return LinkResult(link.NUMBER, link.NAME, link.CHECK, LinkStatus.FAILED, broken.summary or "not established",
                      broken.reason, dict(broken.facts), unreachable=broken.unreachable)
