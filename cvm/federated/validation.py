"""The aggregator's checks on received updates: each one is accepted or rejected with a named reason.

Spec: DESIGN.md §7 ("the aggregator validates"). Checks run in this order and the first failure names the
rejection (``Reason``):

1. ``malformed``: a field has the wrong type or range, the vector is not float32 of the parent's length,
   or the signature is not 65 bytes.
2. ``forged_signature``: the signature does not recover to the claimed site.
3. ``not_eligible``: the (authenticated) site is not in the contract's ``eligible_sites``.
4. ``stale_round``: the update is for another round, earlier or later.
5. ``wrong_parent``: the update was trained on another parent model.
6. ``replayed``: the site already sent an update this round (the first one counts), or another update
   with the same vector digest arrived earlier (a copy of someone else's update).
7. ``malformed``: the vector holds NaN or ±Inf, or ``claimed_norm`` disagrees with the recomputed norm.
8. ``over_norm``: the recomputed L2 norm exceeds ``clip_norm·(1 + NORM_TOLERANCE)``.

Updates from another round or parent cannot be replayed into this one: both are in the signed bytes, so
such a replay fails at step 4 or 5. Within a round, step 6 keeps one update per site.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
from pydantic import BaseModel, ConfigDict

from cvm.federated import vectors
from cvm.federated.round_contract import (
    RoundContract,
    check_hex_digest,
    checksum_address,
)
from cvm.federated.updates import (
    SIGNATURE_LENGTH,
    SignedUpdate,
    recover_signer,
    update_message_hash,
)

# Relative slack on the norm bound: covers a site's float32 clipping (≤ 6e-8 relative) and the aggregator's
# float64 norm (≤ 5e-7 relative). The DP sensitivity uses the bound with this slack, twice (``norm_bound``).
NORM_TOLERANCE = 1e-6
_UNKNOWN_SITE = "unknown"


class Reason(StrEnum):
    """Why an update was rejected; the values are the reason codes in the round record."""

    FORGED_SIGNATURE = "forged_signature"
    NOT_ELIGIBLE = "not_eligible"
    STALE_ROUND = "stale_round"
    WRONG_PARENT = "wrong_parent"
    REPLAYED = "replayed"
    OVER_NORM = "over_norm"
    MALFORMED = "malformed"


@dataclass(frozen=True, eq=False)
class AcceptedUpdate:
    """An update that passed every check: authenticated site, its example count, the vector and its digest."""

    site: str
    num_examples: int
    vector: np.ndarray
    digest: str


class Rejection(BaseModel):
    """A refused update, as the round record lists it: the site as claimed (``"unknown"`` when not even an
    address; for forged and malformed updates nothing proves that site sent it) and the reason code."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    site: str
    reason: Reason


@dataclass(frozen=True)
class Validation:
    """The outcome for every received update, in arrival order, and the payload bytes received."""

    accepted: tuple[AcceptedUpdate, ...]
    rejected: tuple[Rejection, ...]
    bytes_in: int


def norm_bound(clip_norm: float) -> float:
    """The largest true L2 norm an accepted update can have: what the DP sensitivity must use."""
    return clip_norm * (1 + 2 * NORM_TOLERANCE)


def _is_uint(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**64


def _claimed_site(update: SignedUpdate) -> str:
    try:
        return checksum_address(update.site)
    except ValueError:
        return _UNKNOWN_SITE


def _well_formed(update: SignedUpdate, num_parameters: int) -> bool:
    """Step 1: every field has the type and range the signed message and the aggregation need."""
    try:
        check_hex_digest(update.parent_digest, "parent_digest")
        vector = vectors.canonical(update.vector)
    except (TypeError, ValueError):
        return False
    return (
        _is_uint(update.round)
        and _is_uint(update.num_examples)
        and update.num_examples >= 1
        and vector.size == num_parameters
        and isinstance(update.claimed_norm, (int, float))
        and not isinstance(update.claimed_norm, bool)
        and isinstance(update.signature, bytes)
        and len(update.signature) == SIGNATURE_LENGTH
    )


class _Validator:
    """Classifies the updates of one round; keeps the per-round replay memory."""

    def __init__(self, contract: RoundContract, num_parameters: int) -> None:
        self.contract = contract
        self.num_parameters = num_parameters
        self.eligible = frozenset(contract.eligible_sites)
        self.limit = contract.clip_norm * (1 + NORM_TOLERANCE)
        self.sites_seen: set[str] = set()
        self.digests_seen: set[str] = set()

    def check(self, update: SignedUpdate) -> AcceptedUpdate | Rejection:
        site = _claimed_site(update)
        if site == _UNKNOWN_SITE or not _well_formed(update, self.num_parameters):
            return Rejection(site=site, reason=Reason.MALFORMED)
        vector = vectors.canonical(update.vector)
        digest = vectors.digest(vector)
        message = update_message_hash(update.round, update.parent_digest, digest, update.num_examples)
        if recover_signer(message, update.signature) != site:
            return Rejection(site=site, reason=Reason.FORGED_SIGNATURE)
        if site not in self.eligible:
            return Rejection(site=site, reason=Reason.NOT_ELIGIBLE)
        if update.round != self.contract.round:
            return Rejection(site=site, reason=Reason.STALE_ROUND)
        if update.parent_digest != self.contract.parent_digest:
            return Rejection(site=site, reason=Reason.WRONG_PARENT)
        replayed = site in self.sites_seen or digest in self.digests_seen
        self.sites_seen.add(site)
        self.digests_seen.add(digest)
        if replayed:
            return Rejection(site=site, reason=Reason.REPLAYED)
        norm = vectors.l2_norm(vector)
        claimed = float(update.claimed_norm)
        if not (math.isfinite(norm) and math.isfinite(claimed)):
            return Rejection(site=site, reason=Reason.MALFORMED)
        if abs(claimed - norm) > NORM_TOLERANCE * max(norm, self.contract.clip_norm):
            return Rejection(site=site, reason=Reason.MALFORMED)
        if norm > self.limit:
            return Rejection(site=site, reason=Reason.OVER_NORM)
        return AcceptedUpdate(site=site, num_examples=update.num_examples, vector=vector, digest=digest)


def validate_updates(contract: RoundContract, updates: Sequence[SignedUpdate], *, num_parameters: int) -> Validation:
    """Run the checks of the module docstring on every update, in arrival order.

    ``num_parameters`` is the parent model's length. Returns all outcomes; raises only for caller mistakes.
    """
    if not isinstance(contract, RoundContract):
        raise TypeError("contract must be a RoundContract")
    if isinstance(updates, (str, bytes)) or not isinstance(updates, Sequence):
        raise TypeError("updates must be a sequence of SignedUpdate")
    if not all(isinstance(update, SignedUpdate) for update in updates):
        raise TypeError("updates must be a sequence of SignedUpdate")
    validator = _Validator(contract, num_parameters)
    outcomes = [validator.check(update) for update in updates]
    bytes_in = sum(update.vector.nbytes + SIGNATURE_LENGTH for update in updates if isinstance(update.vector, np.ndarray))
    return Validation(
        accepted=tuple(o for o in outcomes if isinstance(o, AcceptedUpdate)),
        rejected=tuple(o for o in outcomes if isinstance(o, Rejection)),
        bytes_in=bytes_in,
    )
