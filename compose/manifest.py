"""The study manifest: what a study reads, what it computes, its privacy budget and what it may output.

DESIGN.md §1: the manifest is part of the measured app-compose.json (see ``compose.app_compose``), so the
owners' approval of a compose hash is an approval of exactly this manifest. The schema is closed
(unknown fields are refused) and strict (no silent coercion of strings to numbers), because a field the
code ignores is a field nobody reviewed.

Errors: invalid manifests raise ``pydantic.ValidationError`` (a ``ValueError``), a caller mistake.

Nothing is spent unless the run can succeed (issue 11). The model above checks the manifest's own shape; two
pure functions check what only the analysis knows, before any budget is at stake:

* ``validate_manifest(manifest)``: ``analysis.params`` against the analysis kind's parameter schema
  (``cvm.analyses.params``: unknown settings, wrong types, out-of-range values), the output type the kind
  releases, δ > 0 for DP-SGD, and no value still reading ``FILL IN`` (``UNFILLED``: the mark `seal study new`
  puts on the bounds only the analyst can choose). The API calls it before it proposes a compose hash on-chain.
* ``check_inputs_against_manifest(manifest, envelopes)``: the sealed inputs' public, owner-signed envelopes
  (schema, row counts) against the manifest: one file per input, the same columns in every input (they are
  joined row by row), each column the analysis reads present with the type it needs, the rows within the
  declared ``max_rows``, and enough rows for the output gate to let the result out. The API calls it when a run
  starts, before a CVM boots; the CVM (``cvm.unwrap``) calls it again before it attests to the KMS.

Both raise ``ManifestRefused`` (a ``ValueError``): ``ManifestInvalid`` for the manifest alone,
``InputsDoNotFitManifest`` for the inputs against it. ``.field`` names the manifest field at fault
(``analysis.params.queries[1].column``), ``.problems`` lists every (field, reason) found.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Sequence
from typing import Any, Literal, Protocol

from eth_utils import is_checksum_address, to_checksum_address
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    field_validator,
    model_validator,
)

# The pre-spend checks below (validate_manifest, check_inputs_against_manifest, ManifestRefused and its two
# subclasses, OUTPUT_TYPE_OF_KIND) are public too; they join __all__ once tests/test_app_compose.py's pinned
# surface lists them.
__all__ = ["MANIFEST_VERSION", "AnalysisKind", "OutputType", "StudyInput", "Analysis", "StudyManifest"]

MANIFEST_VERSION = "sealroom-study/v1"

AnalysisKind = Literal["dp_stats", "dp_sgd", "fed_round"]
OutputType = Literal["aggregate_stats", "model_weights", "round_record"]

_ADDRESS_RE = re.compile(r"0x[0-9a-fA-F]{40}")
_SHA256_HEX_RE = re.compile(r"[0-9a-fA-F]{64}")


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class StudyInput(_Closed):
    """One sealed dataset: whose it is and which exact ciphertext (sha256 of the sealed payload)."""

    owner: str = Field(description="owner's Ethereum address; stored as 0x + EIP-55 checksum")
    # Optional, and usually absent: a dataset sealed *to this recipe* cannot be listed by its ciphertext digest
    # inside the recipe (the compose hash would depend on itself). The CVM measures the digests of the inputs it
    # actually opened into RTMR3 (event "sealroom-inputs") and the receipt lists them. When a digest is given
    # here, the CVM refuses any other ciphertext for this input.
    ciphertext_sha256: str | None = Field(default=None, description="sha256 of the sealed dataset's ciphertext, "
                                                                      "64 lowercase hex")
    name: str = Field(min_length=1)

    @field_validator("owner")
    @classmethod
    def _checksum_owner(cls, value: str) -> str:
        if not _ADDRESS_RE.fullmatch(value):
            raise ValueError("owner must be 0x followed by 40 hex digits")
        body = value[2:]
        # All-lower/all-upper carry no checksum; mixed case must be a correct EIP-55 checksum (a typo guard).
        if body != body.lower() and body != body.upper() and not is_checksum_address(value):
            raise ValueError("owner address has a wrong EIP-55 checksum")
        return to_checksum_address(value)

    @field_validator("ciphertext_sha256")
    @classmethod
    def _lowercase_digest(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not _SHA256_HEX_RE.fullmatch(value):
            raise ValueError("ciphertext_sha256 must be 64 hex digits (no 0x)")
        return value.lower()

    @property
    def owner_bytes(self) -> bytes:
        """The owner address as 20 raw bytes (the KMS and contract encoding)."""
        return bytes.fromhex(self.owner[2:])


def _refuse_non_finite(value: JsonValue, where: str) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where} must be finite (no NaN or infinity)")
    if isinstance(value, dict):
        for key, item in value.items():
            _refuse_non_finite(item, f"{where}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _refuse_non_finite(item, f"{where}[{index}]")


class Analysis(_Closed):
    """Which analysis runs and with which parameters (interpreted by the analysis code in ``cvm/``)."""

    kind: AnalysisKind
    params: dict[str, JsonValue] = Field(default_factory=dict)

    @field_validator("params")
    @classmethod
    def _finite_params(cls, value: dict[str, JsonValue]) -> dict[str, JsonValue]:
        _refuse_non_finite(value, "params")
        return value


class StudyManifest(_Closed):
    """A study recipe, ``sealroom-study/v1``: inputs, analysis, (ε, δ) budget and the one allowed output type."""

    version: Literal["sealroom-study/v1"] = MANIFEST_VERSION
    study: str = Field(min_length=1, description="the study's name")
    inputs: list[StudyInput] = Field(min_length=1)
    analysis: Analysis
    epsilon: float = Field(gt=0, allow_inf_nan=False)
    delta: float = Field(ge=0, lt=1, allow_inf_nan=False)
    output_type: OutputType

    @model_validator(mode="after")
    def _distinct_inputs(self) -> StudyManifest:
        # One input per owner: the KMS releases one key per (recipe, owner) and the CVM matches files by owner.
        for field in ("owner", "name", "ciphertext_sha256"):
            values = [getattr(item, field) for item in self.inputs if getattr(item, field) is not None]
            if len(set(values)) != len(values):
                raise ValueError(f"two inputs have the same {field}")
        return self


# ----------------------------------------------------------------------------------------- before any spend

# The mark a starter recipe (`seal study new`) puts on every value only the analyst can choose (bounds, ε, δ, the
# label): a string starting with it is never accepted, even where a string would type-check (a label, a name).
UNFILLED = "FILL IN"


def unfilled_fields(value: Any, where: str) -> list[tuple[str, str]]:
    """(field, placeholder) for every string in ``value`` (JSON-like) that still starts with :data:`UNFILLED`."""
    if isinstance(value, str):
        return [(where, value)] if value.lstrip().startswith(UNFILLED) else []
    found: list[tuple[str, str]] = []
    if isinstance(value, dict):
        for key, item in value.items():
            found += unfilled_fields(key, f"{where}.{key}") + unfilled_fields(item, f"{where}.{key}")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            found += unfilled_fields(item, f"{where}[{index}]")
    return found


# What each analysis kind releases; the output gate refuses any other type, after the budget is spent.
OUTPUT_TYPE_OF_KIND: dict[str, str] = {"dp_stats": "aggregate_stats", "dp_sgd": "model_weights",
                                       "fed_round": "round_record"}


class ManifestRefused(ValueError):
    """The study cannot run to success as given. ``problems``: (manifest field, reason); ``field``: the first."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        self.field = problems[0][0]
        super().__init__("; ".join(f"{field}: {reason}" for field, reason in problems))


class ManifestInvalid(ManifestRefused):
    """The manifest itself: its analysis params break the kind's schema, or kind and output type disagree."""


class InputsDoNotFitManifest(ManifestRefused):
    """The sealed inputs' public schemas or row counts do not fit what the manifest's analysis reads."""


class _SchemaField(Protocol):
    name: str
    type: str


class _Header(Protocol):
    owner: bytes
    schema: tuple[_SchemaField, ...]


class _Envelope(Protocol):
    """What the checks read of a sealed file's envelope (``cvm.sealed.Envelope``): public and owner-signed."""

    header: _Header
    rows: int


def validate_manifest(manifest: StudyManifest) -> Any:
    """Check ``manifest`` against its analysis kind's parameter schema; return the parsed params.

    Pure (no I/O, no chain). Refused with ``ManifestInvalid`` naming each field: a setting the kind does not
    have, a wrong type, an out-of-range or non-finite value, a missing required setting
    (``analysis.params.…``); an ``output_type`` other than the one the kind releases; δ = 0 for ``dp_sgd``
    (its Gaussian mechanism needs δ > 0); a value still reading ``FILL IN…`` (:data:`UNFILLED`).
    """
    from cvm.analyses.params import ParamsInvalid, parse_params

    problems: list[tuple[str, str]] = [
        (field, f"not filled in: {text}") for field, text in unfilled_fields(manifest.model_dump(mode="json"), "")]
    problems = [(field.removeprefix("."), reason) for field, reason in problems]
    unfilled = {field for field, _ in problems}
    kind = manifest.analysis.kind
    expected_output = OUTPUT_TYPE_OF_KIND[kind]
    if manifest.output_type != expected_output:
        problems.append(("output_type", f"a {kind} analysis releases {expected_output!r}, not "
                                        f"{manifest.output_type!r}"))
    if kind == "dp_sgd" and manifest.delta == 0:
        problems.append(("delta", "DP-SGD's Gaussian mechanism needs delta > 0"))
    parsed = None
    try:
        parsed = parse_params(kind, manifest.analysis.params, where="analysis.params")
    except ParamsInvalid as invalid:
        problems += [(field, reason) for field, reason in invalid.problems if field not in unfilled]
    if problems:
        raise ManifestInvalid(problems)
    return parsed


def check_inputs_against_manifest(manifest: StudyManifest, envelopes: Sequence[_Envelope]) -> None:
    """Check the sealed inputs' public schemas and row counts against what ``manifest``'s analysis reads.

    ``envelopes`` are the inputs' envelopes as ``cvm.sealed.read_envelope`` returns them (owner signature
    checked); only their public header (owner, schema) and row count are read, so this needs no key and spends
    nothing. Runs ``validate_manifest`` first (``ManifestInvalid``); then refused with
    ``InputsDoNotFitManifest``, naming the manifest field, when:

    * there is not exactly one envelope per manifest input (matched by owner);
    * the inputs do not all have the same columns, in the same order, with the same types (they are joined
      row by row);
    * a column the analysis reads (a query's ``column``, a DP-SGD feature or ``label``) is missing, or does not
      have the type it needs: numeric (integer or floating point) for sums, means, quantiles and histogram
      edges; string or integer for histogram categories of that type; numeric or boolean for DP-SGD;
    * the inputs hold more rows than ``analysis.params.max_rows`` (dp_stats);
    * the inputs hold so few rows that the output gate would refuse the result as record-shaped (it lets out
      nothing with a tenth of the input rows or more along one dimension).

    A CSV input's recorded schema is pyarrow's inference on its first MiB: a column that changes type further
    down is seen only when the CVM reads it.
    """
    parsed = validate_manifest(manifest)
    if manifest.analysis.kind == "fed_round":
        raise InputsDoNotFitManifest([("analysis.kind", "a fed_round recipe runs in the aggregator and reads "
                                                        "no sealed files")])
    problems: list[tuple[str, str]] = []
    by_owner = {item.owner_bytes: index for index, item in enumerate(manifest.inputs)}
    given: dict[int, _Envelope] = {}
    for envelope in envelopes:
        index = by_owner.get(envelope.header.owner)
        if index is None:
            owner = to_checksum_address(envelope.header.owner)
            problems.append(("inputs", f"a sealed file is signed by {owner}, who is not an input of the manifest"))
        elif index in given:
            problems.append((f"inputs[{index}]", f"two sealed files given for input {manifest.inputs[index].name!r}"))
        else:
            given[index] = envelope
    for index, item in enumerate(manifest.inputs):
        if index not in given:
            problems.append((f"inputs[{index}]", f"no sealed file given for input {item.name!r}"))
    if problems:
        raise InputsDoNotFitManifest(problems)

    ordered = [(item.name, given[index]) for index, item in enumerate(manifest.inputs)]
    first_name, first = ordered[0]
    reference = [(field.name, field.type) for field in first.header.schema]
    for index, (name, envelope) in enumerate(ordered[1:], start=1):
        columns = [(field.name, field.type) for field in envelope.header.schema]
        if columns != reference:
            problems.append((f"inputs[{index}]", f"input {name!r} has columns {_columns_text(columns)}, input "
                                                 f"{first_name!r} has {_columns_text(reference)}: the inputs are "
                                                 "joined row by row and need the same columns, in the same order, "
                                                 "with the same types"))
    from cvm.analyses.params import column_type_fits, gate_max_dimension

    for need in parsed.column_needs("analysis.params"):
        for name, envelope in ordered:
            types = {field.name: field.type for field in envelope.header.schema}
            if need.name not in types:
                guess = difflib.get_close_matches(need.name, list(types), n=1)
                hint = f" (did you mean {guess[0]!r}?)" if guess else ""
                problems.append((need.field, f"input {name!r} has no column {need.name!r}{hint}; its columns: "
                                             f"{', '.join(types) or 'none'}"))
            elif not column_type_fits(types[need.name], need.kind):
                problems.append((need.field, f"column {need.name!r} of input {name!r} is {types[need.name]}; the "
                                             f"analysis needs {need.kind} values"))
    rows = sum(envelope.rows for _name, envelope in ordered)
    per_input = ", ".join(f"{name} {envelope.rows}" for name, envelope in ordered)
    if parsed.max_rows is not None and rows > parsed.max_rows:
        problems.append(("analysis.params.max_rows", f"the inputs hold {rows} rows ({per_input}), more than "
                                                     f"max_rows {parsed.max_rows}"))
    extent, allowed = parsed.output_extent(), gate_max_dimension(rows)
    if extent > allowed:
        problems.append(("analysis.params", f"the result would have {extent} entries along one dimension, and the "
                                            f"output gate lets out at most {max(allowed, 0)} for {rows} input rows "
                                            f"({per_input}): it refuses anything with a tenth of the records or "
                                            "more; add rows or release less"))
    if problems:
        raise InputsDoNotFitManifest(problems)


def _columns_text(columns: list[tuple[str, str]]) -> str:
    return "[" + ", ".join(f"{name}:{kind}" for name, kind in columns) + "]"
