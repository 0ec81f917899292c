"""One federated round inside the aggregator CVM: budget, validation, flags, private aggregate, record.

Spec: DESIGN.md §7. ``run_round`` is the safe recipe; the pieces it calls (``accountant``, ``validation``,
``robust``, ``strategies``, ``dp``) are usable on their own. Order, and why:

1. The parent weights must hash to the contract's ``parent_digest`` (else ValueError).
2. The accountant charges the round (``accountant.plan_round``) and raises ``PrivacyBudgetExhausted``
   before any update is read: the spend depends only on public parameters.
3. Every update is validated (``validation``): rejections are named and recorded.
4. Before the deadline the round closes only when every eligible site has a valid update
   (``RoundStillOpen`` otherwise). Fewer valid updates than ``min_participants``: ``TooFewParticipants``,
   nothing aggregated, no ε charged (the caller keeps the old accountant state).
5. Anomaly scores against the coordinate median (``robust``): reported, not used to exclude.
6. The contract's aggregator runs under the DP wrapper (``dp``); new weights = parent + noisy aggregate
   (updates are deltas, the server learning rate is 1).
7. The optional ``evaluate`` callback scores the parent and the new model; the record is built.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from cvm.federated import vectors
from cvm.federated.accountant import AccountantState, plan_round
from cvm.federated.dp import DPStrategy, GaussianNoise, noise_source
from cvm.federated.errors import RoundStillOpen, TooFewParticipants
from cvm.federated.record import (
    Flag,
    JoinedSite,
    Lineage,
    Metrics,
    Privacy,
    RoundRecord,
    SiteRegression,
)
from cvm.federated.robust import score_updates
from cvm.federated.round_contract import RoundContract
from cvm.federated.strategies import strategy_for
from cvm.federated.updates import SignedUpdate
from cvm.federated.validation import Reason, Validation, norm_bound, validate_updates

# Rejections that prove nothing about who sent the update: they do not count as the claimed site showing up.
_UNAUTHENTICATED = frozenset({Reason.MALFORMED, Reason.FORGED_SIGNATURE})


@dataclass(frozen=True)
class Evaluation:
    """What an evaluation callback returns for one model: a global quality and, optionally, each site's.

    Quality is "higher is better" (accuracy, AUC). Computed on private data: NOT covered by ε.
    """

    quality: float
    per_site: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        values = [self.quality, *self.per_site.values()]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
            raise ValueError("qualities must be finite numbers")


Evaluate = Callable[[np.ndarray], Evaluation]


def _metrics(evaluate: Evaluate, parent: np.ndarray, child: np.ndarray) -> Metrics:
    before, after = evaluate(parent), evaluate(child)
    if not (isinstance(before, Evaluation) and isinstance(after, Evaluation)):
        raise TypeError("evaluate must return an Evaluation")
    metrics = {"global_quality": after.quality, "parent_global_quality": before.quality}
    if after.per_site:
        qualities = list(after.per_site.values())
        metrics |= {
            "per_site_min": min(qualities),
            "per_site_median": statistics.median(qualities),
            "per_site_max": max(qualities),
        }
    common = [site for site in after.per_site if site in before.per_site]
    if common:
        worst = max(common, key=lambda site: before.per_site[site] - after.per_site[site])
        metrics["worst_site_regression"] = SiteRegression(
            site=worst,
            parent_quality=before.per_site[worst],
            new_quality=after.per_site[worst],
            regression=before.per_site[worst] - after.per_site[worst],
        )
    return Metrics(**metrics)


def _dropped(contract: RoundContract, validation: Validation) -> tuple[str, ...]:
    heard = {update.site for update in validation.accepted}
    heard |= {r.site for r in validation.rejected if r.reason not in _UNAUTHENTICATED}
    return tuple(site for site in contract.eligible_sites if site not in heard)


def run_round(
    contract: RoundContract,
    global_weights: np.ndarray,
    updates: Sequence[SignedUpdate],
    *,
    now: float,
    accountant_state: AccountantState,
    evaluate: Evaluate | None = None,
    noise: GaussianNoise | None = None,
    simulated: bool = True,
) -> tuple[np.ndarray, RoundRecord, AccountantState]:
    """Run one round (steps in the module docstring); return the new weights, the record, the new state.

    ``now`` is the unix time at which the aggregator closes the round. ``noise`` replaces the contract's
    production sampler (tests pass a seeded one; its ``name`` must still match the contract).
    ``simulated`` labels the record; pass False only when the round ran in a real TDX CVM.
    """
    if not isinstance(contract, RoundContract):
        raise TypeError("contract must be a RoundContract")
    parent = vectors.canonical(global_weights)
    if vectors.digest(parent) != contract.parent_digest:
        raise ValueError("global_weights do not hash to the contract's parent_digest")
    if isinstance(now, bool) or not isinstance(now, (int, float)) or not math.isfinite(now):
        raise TypeError("now must be a finite number of unix seconds")
    if not isinstance(simulated, bool):
        raise TypeError("simulated must be a bool")
    spend = plan_round(accountant_state, contract)
    noise = noise_source(contract.noise) if noise is None else noise
    if not isinstance(noise, GaussianNoise):
        raise TypeError("noise must be a GaussianNoise source")
    if noise.name != contract.noise:
        raise ValueError(f"the contract requires {contract.noise!r} noise, not {noise.name!r}")
    private = DPStrategy(
        strategy_for(contract),
        noise_multiplier=contract.noise_multiplier,
        norm_bound=norm_bound(contract.clip_norm),
        noise=noise,
    )

    validation = validate_updates(contract, updates, num_parameters=parent.size)
    joined = validation.accepted
    if now < contract.deadline and len(joined) < len(contract.eligible_sites):
        raise RoundStillOpen(f"{len(contract.eligible_sites) - len(joined)} eligible site(s) still missing")
    if len(joined) < contract.min_participants:
        raise TooFewParticipants(len(joined), contract.min_participants, validation.rejected)

    scores = score_updates(joined)
    aggregate = private.aggregate(joined)
    new_weights = parent + aggregate.vector
    child = vectors.digest(new_weights)
    record = RoundRecord(
        round=contract.round,
        contract_digest=contract.digest(),
        parent_digest=contract.parent_digest,
        aggregate_digest=child,
        lineage=Lineage(parent=contract.parent_digest, child=child),
        aggregator=contract.aggregator,
        closed_at=float(now),
        joined=tuple(JoinedSite(site=u.site, num_examples=u.num_examples, update_digest=u.digest) for u in joined),
        dropped=_dropped(contract, validation),
        rejected=validation.rejected,
        flagged=tuple(
            Flag(site=s.site, distance=s.distance, distance_z=s.distance_z, cosine=s.cosine) for s in scores if s.flagged
        ),
        bytes_in=validation.bytes_in,
        bytes_out=new_weights.nbytes,
        privacy=Privacy(
            noise=aggregate.noise,
            noise_multiplier=contract.noise_multiplier,
            l2_sensitivity=aggregate.l2_sensitivity,
            noise_std=aggregate.noise_std,
            delta=contract.delta,
            epsilon_round=spend.this_round,
            epsilon_spent_total=spend.after,
            epsilon_left=spend.left,
        ),
        metrics=None if evaluate is None else _metrics(evaluate, parent, new_weights),
        simulated=simulated,
    )
    return new_weights, record, spend.state_after
