"""A run's receipt, attestation.json (``sealroom-attestation/v1``): loading it strictly, and its evidence parsed
once into immutable values the links read.

Parsing never refuses a receipt that has the right format: a piece of evidence that is missing or malformed
becomes a :class:`Field` that holds the reason, and only the link that reads it breaks (with that reason), so
the report still shows whether everything else holds. Nothing here is trusted because the receipt says it: the
links check each value against the others, the chain and the auditor's pins.

Errors::

    ReceiptError
    └── NotAReceipt(reason)   the document is not a sealroom-attestation/v1 receipt: nothing to verify
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Generic, TypeVar

from auditor.links.base import Broken, Recipe, micro_epsilon
from compose import safe_parse
from cvm.attest.tdx_quote import AttestationError, TdxQuote, parse_quote_unverified
from cvm.receipt import ATTESTATION_FORMAT

__all__ = [
    "ChainSection",
    "Envelope",
    "Field",
    "InputRef",
    "NotAReceipt",
    "Payload",
    "Receipt",
    "ReceiptError",
    "ReleaseRef",
    "SignatureSection",
    "Spent",
    "StateProof",
    "check_format",
    "load_receipt",
    "parse_receipt",
]

T = TypeVar("T")
U = TypeVar("U")


class ReceiptError(Exception):
    """Base of the auditor's outcomes that are not a report."""


class NotAReceipt(ReceiptError):
    """The document is not a ``sealroom-attestation/v1`` receipt (not JSON, not an object, another format)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def load_receipt(text: str | bytes) -> dict[str, Any]:
    """Parse attestation.json strictly (no NaN/Infinity, no repeated keys); raise :class:`NotAReceipt`."""

    def refuse_constant(name: str) -> None:
        raise NotAReceipt(f"the receipt holds {name}, which is not JSON")

    def refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [key for key, _ in pairs]
        if len(set(keys)) != len(keys):
            raise NotAReceipt("the receipt repeats a JSON key")
        return dict(pairs)

    try:
        receipt = safe_parse.loads(text, parse_constant=refuse_constant, object_pairs_hook=refuse_duplicates)
    except ValueError as exc:  # JSONDecodeError (nested too deep is one), UnicodeDecodeError, a 4300+ digit int
        raise NotAReceipt(f"the receipt is not JSON: {exc}") from None
    try:  # a \ud800 escape parses to a lone surrogate, which no link can encode (UTF-8) to hash it
        json.dumps(receipt, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise NotAReceipt("the receipt holds text that is not valid Unicode (a lone surrogate)") from None
    check_format(receipt)
    return receipt


def check_format(receipt: Any) -> None:
    """Raise :class:`NotAReceipt` unless ``receipt`` is a mapping in the ``sealroom-attestation/v1`` format."""
    if not isinstance(receipt, dict):
        raise NotAReceipt("the receipt is not a JSON object")
    if receipt.get("format") != ATTESTATION_FORMAT:
        raise NotAReceipt(f"the receipt's format is {receipt.get('format')!r}, not {ATTESTATION_FORMAT!r}")


# ---- the parsed evidence -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Field(Generic[T]):
    """One piece of evidence as the receipt gives it: its value, or why a link that reads it cannot use it."""

    value: T | None = None
    problem: str | None = None

    def get(self) -> T:
        """The value; a link that needs an unusable one breaks with the reason."""
        if self.problem is not None:
            raise Broken(self.problem)
        return self.value

    @property
    def usable(self) -> bool:
        return self.problem is None


@dataclass(frozen=True)
class StateProof:
    """``chain.state_proof``: the chain's state at the recorded block, as proofs (contracts/storage.py) — the block
    header's RLP fields, the DstackApp's account proof and code, which of its releases is the run's, and storage
    proofs by slot. Proofs, not facts: link 4 checks them against a block hash the auditor trusts."""

    block_header: tuple[bytes, ...]
    account_proof: tuple[bytes, ...]
    code: bytes
    release_index: int
    storage_proofs: Mapping[int, tuple[bytes, ...]]  # slot number -> the proof's nodes


@dataclass(frozen=True)
class ChainSection:
    """``chain``: where the study lives on-chain and what the chain said at run time (the receipt's word)."""

    chain_id: Field[int]
    dstack_app: Field[str]
    dstack_kms: Field[str]
    kms_root_address: Field[str]
    block: Field[int]
    approvals: Field[tuple]  # frozen JSON, compared with the chain's ComposeHashApproved events
    state_proof: Field[StateProof]


@dataclass(frozen=True)
class ReleaseRef:
    """``envelope.release``: the key release (BudgetSpent record) the run names."""

    release_id: Field[bytes]
    tx: Field[bytes]


@dataclass(frozen=True)
class Spent:
    """``envelope.payload.spent``: what the analysis reports spending."""

    epsilon_micro: Field[int]
    delta: Field[int | float]


@dataclass(frozen=True)
class Payload:
    """``envelope.payload``: the result itself (``json``: frozen, as shipped)."""

    json: Mapping[str, Any]
    output_type: Field[str]
    spent: Field[Spent]


@dataclass(frozen=True)
class InputRef:
    """One entry of ``envelope.inputs``."""

    ciphertext_sha256: Field[str]
    owner: Field[str]


@dataclass(frozen=True)
class Envelope:
    """``envelope``: the signed result envelope (``json``: frozen, as shipped, for its digest)."""

    json: Mapping[str, Any]
    format: Field[str]
    block: Field[int]
    release: Field[ReleaseRef]
    payload: Field[Payload]
    payload_sha256: Field[str]
    output_type: Field[str]
    inputs: Field[Mapping[str, Field[InputRef]]]
    epsilon_spent_micro: Field[int]
    epsilon_remaining_micro: Field[int]


@dataclass(frozen=True)
class SignatureSection:
    """``signature``: dstack's Sign result over the envelope digest."""

    algorithm: Field[str]
    purpose: Field[str]
    signature: Field[str]
    signature_chain: Field[tuple]
    public_key: Field[str]


@dataclass(frozen=True)
class Receipt:
    """The receipt's evidence, parsed once. ``tdx_quote`` is the quote parsed but not verified; ``simulated`` is
    the receipt's own flag (None when it is not true/false); ``claimed_recipe`` is the envelope's unattested
    claim of the app_id and compose hash (None when it names none)."""

    quote: Field[bytes]
    tdx_quote: Field[TdxQuote]
    collateral: Field[str | None]  # DCAP collateral as JSON text, or None
    simulated: bool | None
    event_log: Field[str | tuple]
    app_compose: Field[bytes]
    chain: Field[ChainSection]
    envelope: Field[Envelope]
    envelope_digest: Field[bytes]
    signature: Field[SignatureSection]
    claimed_recipe: Recipe | None


def parse_receipt(receipt: Mapping[str, Any]) -> Receipt:
    """The receipt's evidence (see :class:`Receipt`); raises :class:`NotAReceipt` only for another format."""
    check_format(receipt)
    quote = _hex(_read(receipt, "quote", str), "quote")
    return Receipt(
        quote=quote,
        tdx_quote=_then(quote, _parse_quote),
        collateral=_then(_read(receipt, "collateral", (dict, str, type(None))),
                         lambda carried: json.dumps(carried) if isinstance(carried, dict) else carried),
        simulated=receipt.get("simulated") if isinstance(receipt.get("simulated"), bool) else None,
        event_log=_frozen(_read(receipt, "event_log", (str, list))),
        app_compose=_then(_read(receipt, "app_compose", str), _utf8),
        chain=_then(_read(receipt, "chain", dict), _chain_section),
        envelope=_then(_read(receipt, "envelope", dict), _envelope),
        envelope_digest=_hex(_read(receipt, "envelope_digest", str), "envelope_digest", size=32),
        signature=_then(_read(receipt, "signature", dict), _signature_section),
        claimed_recipe=_claimed_recipe(receipt.get("envelope")),
    )


def _parse_quote(raw: bytes) -> TdxQuote:
    try:
        return parse_quote_unverified(raw)
    except AttestationError as exc:
        raise Broken(str(exc)) from None


def _utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise Broken("app_compose is not valid Unicode text") from None


def _chain_section(recorded: dict) -> ChainSection:
    return ChainSection(
        chain_id=_read(recorded, "chain_id", int, "chain.chain_id"),
        dstack_app=_read(recorded, "dstack_app", str, "chain.dstack_app"),
        dstack_kms=_read(recorded, "dstack_kms", str, "chain.dstack_kms"),
        kms_root_address=_read(recorded, "kms_root_address", str, "chain.kms_root_address"),
        block=_read(recorded, "block", int, "chain.block"),
        approvals=_frozen(_read(recorded, "approvals", list, "chain.approvals")),
        state_proof=_then(_read(recorded, "state_proof", dict, "chain.state_proof"), _state_proof),
    )


def _state_proof(proof: dict) -> StateProof:
    where = "chain.state_proof"

    def hex_list(items: Any, at: str) -> tuple[bytes, ...]:
        if not isinstance(items, list):
            raise Broken(f"{at} is not a list")
        return tuple(_hex(Field(item) if isinstance(item, str) else Field(problem=f"{at}[{i}] is not a string"),
                          f"{at}[{i}]").get() for i, item in enumerate(items))

    header = hex_list(_read(proof, "block_header", list, f"{where}.block_header").get(), f"{where}.block_header")
    account = hex_list(_read(proof, "account_proof", list, f"{where}.account_proof").get(), f"{where}.account_proof")
    code = _hex(_read(proof, "code", str, f"{where}.code"), f"{where}.code").get()
    index = _read(proof, "release_index", int, f"{where}.release_index").get()
    if index < 0:
        raise Broken(f"{where}.release_index is negative")
    storage: dict[int, tuple[bytes, ...]] = {}
    for i, item in enumerate(_read(proof, "storage_proofs", list, f"{where}.storage_proofs").get()):
        at = f"{where}.storage_proofs[{i}]"
        if not isinstance(item, dict):
            raise Broken(f"{at} is not an object")
        slot = int.from_bytes(_hex(_read(item, "slot", str, f"{at}.slot"), f"{at}.slot", size=32).get(), "big")
        if slot in storage:
            raise Broken(f"{at} proves slot 0x{slot:064x} again")
        storage[slot] = hex_list(_read(item, "proof", list, f"{at}.proof").get(), f"{at}.proof")
    return StateProof(header, account, code, index, MappingProxyType(storage))


def _envelope(envelope: dict) -> Envelope:
    return Envelope(
        json=_freeze(envelope),
        format=_read(envelope, "format", str, "envelope.format"),
        block=_read(envelope, "block", int, "envelope.block"),
        release=_then(_read(envelope, "release", dict, "envelope.release"), _release_ref),
        payload=_then(_read(envelope, "payload", dict, "envelope.payload"), _payload),
        payload_sha256=_read(envelope, "payload_sha256", str, "envelope.payload_sha256"),
        output_type=_read(envelope, "output_type", str, "envelope.output_type"),
        inputs=_then(_read(envelope, "inputs", dict, "envelope.inputs"), _inputs),
        epsilon_spent_micro=_micro(_read(envelope, "epsilon_spent", (int, float)), "envelope.epsilon_spent"),
        epsilon_remaining_micro=_micro(_read(envelope, "epsilon_remaining", (int, float)),
                                       "envelope.epsilon_remaining"),
    )


def _release_ref(named: dict) -> ReleaseRef:
    return ReleaseRef(
        release_id=_hex(_read(named, "release_id", str, "envelope.release.release_id"), "release_id", size=32),
        tx=_hex(_read(named, "tx", str, "envelope.release.tx"), "envelope.release.tx", size=32),
    )


def _payload(payload: dict) -> Payload:
    return Payload(
        json=_freeze(payload),
        output_type=_read(payload, "output_type", str, "envelope.payload.output_type"),
        spent=_then(_read(payload, "spent", dict, "envelope.payload.spent"), _spent),
    )


def _spent(spent: dict) -> Spent:
    return Spent(
        epsilon_micro=_micro(_read(spent, "epsilon", (int, float), "payload.spent.epsilon"), "payload.spent.epsilon"),
        delta=_read(spent, "delta", (int, float), "payload.spent.delta"),
    )


def _inputs(inputs: dict) -> Mapping[str, Field[InputRef]]:
    def entry(name: str) -> Field[InputRef]:
        return _then(_read(inputs, name, dict, f"envelope.inputs.{name}"), lambda item: InputRef(
            ciphertext_sha256=_read(item, "ciphertext_sha256", str, f"envelope.inputs.{name}.ciphertext_sha256"),
            owner=_read(item, "owner", str, f"envelope.inputs.{name}.owner")))

    return MappingProxyType({name: entry(name) for name in inputs})


def _signature_section(signature: dict) -> SignatureSection:
    return SignatureSection(
        algorithm=_read(signature, "algorithm", str, "signature.algorithm"),
        purpose=_read(signature, "purpose", str, "signature.purpose"),
        signature=_read(signature, "signature", str, "signature.signature"),
        signature_chain=_frozen(_read(signature, "signature_chain", list, "signature.signature_chain")),
        public_key=_read(signature, "public_key", str, "signature.public_key"),
    )


def _claimed_recipe(envelope: Any) -> Recipe | None:
    """The envelope's unproven claim of the recipe, for the later links should the event log not prove it."""
    if not isinstance(envelope, dict):
        return None
    app_id = _hex(_read(envelope, "app_id", str), "envelope.app_id", size=20)
    h = _hex(_read(envelope, "compose_hash", str), "envelope.compose_hash", size=32)
    if not (app_id.usable and h.usable):
        return None
    return Recipe(app_id.value, h.value, attested=False)


# ---- readers ---------------------------------------------------------------------------------------------------

_KIND_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false", dict: "an object",
               list: "a list", type(None): "null"}


def _read(container: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str | None = None) -> Field:
    """``container[key]`` if it is of ``kind`` (bool is never an int here); else why not."""
    where = where or key
    if key not in container:
        return Field(problem=f"the receipt has no {where}")
    value = container[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = "a number" if float in kinds else " or ".join(_KIND_NAMES[k] for k in kinds)
        return Field(problem=f"{where} is not {names}")
    return Field(value)


def _then(field: Field[T], parse: Callable[[T], U]) -> Field[U]:
    """``parse`` applied to a usable field (a :class:`Broken` from it is the new field's problem)."""
    if not field.usable:
        return Field(problem=field.problem)
    try:
        return Field(parse(field.value))
    except Broken as broken:
        return Field(problem=broken.reason)


def _hex(field: Field[str], where: str, *, size: int | None = None) -> Field[bytes]:
    def decode(text: str) -> bytes:
        try:
            raw = bytes.fromhex(text.removeprefix("0x"))
        except ValueError:
            raise Broken(f"{where} is not hex") from None
        if size is not None and len(raw) != size:
            raise Broken(f"{where} is {len(raw)} bytes, not {size}")
        return raw

    return _then(field, decode)


def _micro(field: Field[float], where: str) -> Field[int]:
    return _then(field, lambda value: micro_epsilon(value, where))


def _frozen(field: Field[Any]) -> Field[Any]:
    return _then(field, _freeze)


def _freeze(value: Any) -> Any:
    """A JSON value that cannot be changed: read-only mappings and tuples (see :func:`auditor.links.base.thaw`)."""
    if isinstance(value, dict):
        return MappingProxyType({key: _freeze(child) for key, child in value.items()})
    if isinstance(value, list):
        return tuple(_freeze(child) for child in value)
    return value
