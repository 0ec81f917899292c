"""The round record: what one federated round did, as canonical JSON the lead signs.

Spec: DESIGN.md §7 ("publishes the new global model with a signed round record: who joined, who dropped,
what was rejected and why, bytes moved, ε spent and left, aggregate digest, lineage to the parent").
The record goes into the study's Sign-RPC envelope as the payload; :meth:`RoundRecord.canonical_json` gives
the exact bytes (keys sorted, no spaces, UTF-8), and the first field names the format and its version.

Privacy: only the aggregate is covered by ε. The lists (joined, dropped, rejected, flagged with their
scores) and the metrics (computed on private evaluation data) are published as they are.
``simulated`` says whether the CVM that ran the round is simulated; it is True unless the caller states
that the round ran on real TDX hardware.
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict

from cvm.federated.validation import Rejection

ROUND_RECORD_FORMAT = "sealroom-fed-round-record/v1"


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class JoinedSite(_Record):
    """A site whose update was accepted; ``update_digest`` lets the site check its update was the one used."""

    site: str
    num_examples: int
    update_digest: str


class Flag(_Record):
    """An accepted update that crossed an anomaly threshold (``robust``), with its scores."""

    site: str
    distance: float
    distance_z: float
    cosine: float


class Privacy(_Record):
    """The noise and the ε accounting (RDP, Opacus) of this round, at the contract's δ."""

    noise: str
    noise_multiplier: float
    l2_sensitivity: float
    noise_std: float
    delta: float
    epsilon_round: float
    epsilon_spent_total: float
    epsilon_left: float


class Lineage(_Record):
    """The model this round started from and the one it produced (sha256 hex of their canonical bytes)."""

    parent: str
    child: str


class SiteRegression(_Record):
    """The site whose local quality dropped most from the parent to the new model (quality: higher is better)."""

    site: str
    parent_quality: float
    new_quality: float
    regression: float


class Metrics(_Record):
    """Quality of the parent and the new model from the evaluation callback, and per-site spread if given."""

    global_quality: float
    parent_global_quality: float
    per_site_min: float | None = None
    per_site_median: float | None = None
    per_site_max: float | None = None
    worst_site_regression: SiteRegression | None = None


class RoundRecord(_Record):
    """One round, end to end. ``bytes_in`` counts the received updates' vectors and signatures; ``bytes_out``
    the published model. ``closed_at`` is the unix time the aggregator closed the round."""

    format: Literal["sealroom-fed-round-record/v1"] = ROUND_RECORD_FORMAT
    round: int
    contract_digest: str
    parent_digest: str
    aggregate_digest: str
    lineage: Lineage
    aggregator: str
    closed_at: float
    joined: tuple[JoinedSite, ...]
    dropped: tuple[str, ...]
    rejected: tuple[Rejection, ...]
    flagged: tuple[Flag, ...]
    bytes_in: int
    bytes_out: int
    privacy: Privacy
    metrics: Metrics | None = None
    simulated: bool

    def canonical_json(self) -> bytes:
        """The record as JSON, keys sorted, separators ``,`` and ``:``, UTF-8: the bytes to sign."""
        return json.dumps(
            self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        ).encode()
