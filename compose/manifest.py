"""The study manifest: what a study reads, what it computes, its privacy budget and what it may output.

DESIGN.md §1: the manifest is part of the measured app-compose.json (see ``compose.app_compose``), so the
owners' approval of a compose hash is an approval of exactly this manifest. The schema is closed
(unknown fields are refused) and strict (no silent coercion of strings to numbers), because a field the
code ignores is a field nobody reviewed.

Errors: invalid manifests raise ``pydantic.ValidationError`` (a ``ValueError``), a caller mistake.
"""

from __future__ import annotations

import math
import re
from typing import Literal

from eth_utils import is_checksum_address, to_checksum_address
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    field_validator,
    model_validator,
)

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
