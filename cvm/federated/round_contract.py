"""The round contract: what one federated round may do, fixed before any site sends an update.

Spec: DESIGN.md §7. The contract is part of the measured compose: the lead embeds ``to_params()`` in the
study manifest's ``analysis.params``, so changing any field changes the compose hash, and the aggregator
CVM that sites attest to is bound to exactly this contract. ``digest()`` names it in the round record.

Fields, in the units the code uses:

- ``round`` (≥ 1) and ``parent_digest``: which round, on top of which global model (lowercase hex sha256
  of the parent weights' canonical bytes, see ``vectors``). Sites sign both into every update.
- ``eligible_sites``: the sites' Ethereum addresses (the DstackApp owners), 0x + EIP-55 checksum.
- ``local_epochs``, ``local_batch_size``: the local training budget each site agrees to run.
- ``clip_norm``: the L2 bound on every update; ``noise_multiplier``: Gaussian noise std divided by the
  aggregate's L2 sensitivity (see ``dp``). DP is always on: a multiplier of 0 is refused.
- ``noise``: which vetted sampler draws that noise, ``"opendp"`` (exact, OpenDP's CSPRNG, 20-36 s per
  1M parameters here) or ``"opacus"`` (Opacus's noise, 0.1-0.2 s per 1M parameters; its generator is not
  a CSPRNG, see ``dp``). The owners choose it here, in the measured bytes.
- ``aggregator`` and ``trim_fraction``: fedavg, coordinate_median or trimmed_mean; ``trim_fraction`` in
  (0, 0.5) is required for trimmed_mean and refused for the others.
- ``min_participants``: fewer valid updates and the round aggregates nothing.
- ``deadline``: unix seconds; updates the transport receives after it are not handed to the aggregator.
- ``epsilon_per_round``, ``epsilon_total``, ``delta``: the (ε, δ) budget; the accountant refuses a round
  whose spend exceeds either ε limit, before it looks at any update.
- ``evaluation_sha256`` (optional): sha256 of the public reference cohort (Parquet bytes) the aggregator
  scores the parent and the candidate on (``cvm.federated.task``); the record's metrics come from it.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any, Literal

from eth_utils import is_checksum_address, to_checksum_address
from pydantic import (
    BaseModel,
    ConfigDict,
    StrictFloat,
    StrictInt,
    StrictStr,
    field_validator,
    model_validator,
)

ROUND_CONTRACT_FORMAT = "sealroom-fed-round/v1"
AGGREGATORS = ("fedavg", "coordinate_median", "trimmed_mean")
NOISE_SOURCES = ("opendp", "opacus")

_HEX_DIGEST = re.compile(r"[0-9a-f]{64}")
_ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}")


def checksum_address(value: object) -> str:
    """``value`` as an EIP-55 checksummed address; all-lowercase input is accepted, a wrong checksum is not."""
    if not isinstance(value, str) or not _ADDRESS.fullmatch(value):
        raise ValueError(f"not an Ethereum address (0x + 40 hex digits): {value!r}")
    if value[2:] != value[2:].lower() and not is_checksum_address(value):
        raise ValueError(f"address has a wrong EIP-55 checksum: {value}")
    return to_checksum_address(value)


def check_hex_digest(value: object, what: str) -> str:
    """``value`` if it is a lowercase hex sha256 digest (64 characters), else ValueError."""
    if not isinstance(value, str) or not _HEX_DIGEST.fullmatch(value):
        raise ValueError(f"{what} must be 64 lowercase hex characters (a sha256 digest)")
    return value


class RoundContract(BaseModel):
    """One round's contract (see the module docstring for every field). Immutable; unknown fields refused."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    format: Literal["sealroom-fed-round/v1"] = ROUND_CONTRACT_FORMAT
    round: StrictInt
    parent_digest: StrictStr
    eligible_sites: tuple[StrictStr, ...]
    local_epochs: StrictInt
    local_batch_size: StrictInt
    clip_norm: StrictFloat
    noise_multiplier: StrictFloat
    noise: Literal["opendp", "opacus"] = "opendp"
    aggregator: Literal["fedavg", "coordinate_median", "trimmed_mean"]
    trim_fraction: StrictFloat | None = None
    min_participants: StrictInt
    deadline: StrictInt
    epsilon_per_round: StrictFloat
    epsilon_total: StrictFloat
    delta: StrictFloat
    evaluation_sha256: StrictStr | None = None

    @field_validator("parent_digest")
    @classmethod
    def _parent_digest(cls, value: str) -> str:
        return check_hex_digest(value, "parent_digest")

    @field_validator("evaluation_sha256")
    @classmethod
    def _evaluation_sha256(cls, value: str | None) -> str | None:
        return None if value is None else check_hex_digest(value, "evaluation_sha256")

    @field_validator("eligible_sites")
    @classmethod
    def _sites(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        sites = tuple(checksum_address(site) for site in value)
        if not sites:
            raise ValueError("eligible_sites must not be empty")
        if len(set(sites)) != len(sites):
            raise ValueError("eligible_sites lists a site twice")
        return sites

    @model_validator(mode="after")
    def _consistent(self) -> RoundContract:
        for name in ("round", "local_epochs", "local_batch_size", "min_participants"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.deadline < 0:
            raise ValueError("deadline must be unix seconds (>= 0)")
        for name in ("clip_norm", "noise_multiplier", "epsilon_per_round", "epsilon_total"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")
        if not 0 < self.delta < 1:
            raise ValueError("delta must be in (0, 1)")
        if self.epsilon_per_round > self.epsilon_total:
            raise ValueError("epsilon_per_round must not exceed epsilon_total")
        if self.min_participants > len(self.eligible_sites):
            raise ValueError("min_participants exceeds the number of eligible sites")
        if self.aggregator == "trimmed_mean":
            if self.trim_fraction is None or not 0 < self.trim_fraction < 0.5:
                raise ValueError("trimmed_mean needs trim_fraction in (0, 0.5)")
        elif self.trim_fraction is not None:
            raise ValueError(f"trim_fraction applies to trimmed_mean only, not {self.aggregator}")
        return self

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> RoundContract:
        """Parse the manifest's ``analysis.params`` (a JSON object); unknown or missing keys are refused."""
        if not isinstance(params, Mapping):
            raise TypeError("params must be a mapping")
        return cls.model_validate(dict(params))

    def to_params(self) -> dict[str, Any]:
        """The JSON-ready dict the manifest embeds; ``from_params(to_params())`` gives back an equal contract."""
        return self.model_dump(mode="json")

    def canonical_json(self) -> bytes:
        """``to_params()`` as JSON with sorted keys and no spaces, UTF-8 (dstack's normalised JSON)."""
        return json.dumps(self.to_params(), sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()

    def digest(self) -> str:
        """Lowercase hex sha256 of :meth:`canonical_json`: the contract's name in the round record."""
        return hashlib.sha256(self.canonical_json()).hexdigest()
