"""Federated rounds inside the aggregator CVM (DESIGN.md §7): pure protocol on numpy, no transport.

A round: the :class:`RoundContract` (in the measured compose) fixes the parent model, the eligible sites,
the clip norm, the aggregator, the noise and the ε budget. Sites clip and sign their updates
(:func:`clip`, :func:`sign_update`). The aggregator runs :func:`run_round`: it charges the budget first,
validates every update (rejections named: forged_signature, not_eligible, stale_round, wrong_parent,
replayed, over_norm, malformed), scores anomalies against the coordinate median, aggregates with
FedAvg / coordinate median / trimmed mean under the DP wrapper (Gaussian noise, RDP accounting with
Opacus), and returns the new weights with a :class:`RoundRecord` to sign. Sites then keep the new model
or roll back to their champion (:func:`accept_or_rollback`).

Secure aggregation here is the TEE; robustness against poisoning is the aggregator's checks and robust
aggregators. One does not imply the other.

Modules: ``round_contract``, ``updates`` (site side, signed bytes), ``validation``, ``strategies``,
``robust`` (anomaly scores), ``dp`` (noise and the DP wrapper), ``accountant``, ``record``, ``rounds``
(``run_round``), ``site`` (rollback); ``vectors`` is the low-level canonical-bytes module.

Exceptions::

    FederatedError                  outcomes of a round
    ├── PrivacyBudgetExhausted      the round would exceed epsilon_total or epsilon_per_round; nothing read
    ├── TooFewParticipants          fewer valid updates than min_participants; nothing aggregated, no ε spent
    ├── RoundStillOpen              before the deadline with eligible sites still missing
    ├── DPNotSupported              a strategy without a sound L2 sensitivity cannot be privatised
    └── NoiseFailed                 OpenDP or Opacus refused or failed; nothing released
    ValueError                      caller mistakes (bad contract fields, weights that do not match the
                                    parent digest, a round number not after the last one charged)
    TypeError                       caller mistakes (wrong argument types)

A refused update is not an exception: it is a ``Rejection`` in the record.
"""

from cvm.federated.accountant import AccountantState, epsilon_spent
from cvm.federated.dp import (
    DPStrategy,
    GaussianNoise,
    NoisyAggregate,
    OpacusGaussian,
    OpenDPGaussian,
    noise_source,
)
from cvm.federated.errors import (
    DPNotSupported,
    FederatedError,
    NoiseFailed,
    PrivacyBudgetExhausted,
    RoundStillOpen,
    TooFewParticipants,
)
from cvm.federated.record import (
    Flag,
    JoinedSite,
    Lineage,
    Metrics,
    Privacy,
    RoundRecord,
    SiteRegression,
)
from cvm.federated.robust import AnomalyScore, score_updates
from cvm.federated.round_contract import RoundContract
from cvm.federated.rounds import Evaluation, run_round
from cvm.federated.site import SiteDecision, accept_or_rollback
from cvm.federated.strategies import (
    COORDINATE_MEDIAN,
    FEDAVG,
    Strategy,
    coordinate_median,
    fedavg,
    strategy_for,
    trimmed_mean,
    trimmed_mean_strategy,
)
from cvm.federated.updates import SignedUpdate, clip, sign_update
from cvm.federated.validation import (
    AcceptedUpdate,
    Reason,
    Rejection,
    Validation,
    validate_updates,
)
from cvm.federated.vectors import digest as vector_digest

__all__ = [
    "COORDINATE_MEDIAN",
    "FEDAVG",
    "AcceptedUpdate",
    "AccountantState",
    "AnomalyScore",
    "DPNotSupported",
    "DPStrategy",
    "Evaluation",
    "FederatedError",
    "Flag",
    "GaussianNoise",
    "JoinedSite",
    "Lineage",
    "Metrics",
    "NoiseFailed",
    "NoisyAggregate",
    "OpacusGaussian",
    "OpenDPGaussian",
    "Privacy",
    "PrivacyBudgetExhausted",
    "Reason",
    "Rejection",
    "RoundContract",
    "RoundRecord",
    "RoundStillOpen",
    "SignedUpdate",
    "SiteDecision",
    "SiteRegression",
    "Strategy",
    "TooFewParticipants",
    "Validation",
    "accept_or_rollback",
    "clip",
    "coordinate_median",
    "epsilon_spent",
    "fedavg",
    "noise_source",
    "run_round",
    "score_updates",
    "sign_update",
    "strategy_for",
    "trimmed_mean",
    "trimmed_mean_strategy",
    "validate_updates",
    "vector_digest",
]
