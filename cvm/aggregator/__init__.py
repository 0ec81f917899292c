"""The federated aggregator: one round, served from inside its (SIMULATED) CVM (DESIGN.md §7).

Each round is its own recipe: the round contract sits in the measured app-compose.json, so the sites approve
every round on-chain before this CVM can boot. Sites attest the aggregator, seal signed updates to its key, and
the round closes into a signed round record published with the candidate model; round R > 1 continues from
round R − 1's record (lineage and privacy accountant).

Modules:

- ``recipe``: the round recipe (``build_round_compose``, ``round_contract_of``, ``check_reference``);
- ``wire``: the HTTP models and the update framing, shared with the site side (``sealing_cli.site``);
- ``record``: the round record's payload, verifying a published one (``verify_round_attestation``) and
  continuing the next round from it (``continue_from``, ``verify_previous_round``);
- ``state``: the round's state machine (``RoundAggregator``), which never holds its lock across a KMS,
  chain, Sign or quote call;
- ``server``: the HTTP shell and ``python -m cvm.aggregator`` (``make_app``, ``main``);
- ``errors``: the exception tree below.

This package exports the recipe, wire, record and state names; the HTTP shell (FastAPI, uvicorn) is imported
only from ``cvm.aggregator.server``.

Exceptions::

    AggregatorError
    ├── RecipeNotARound        the measured compose is not a federated round recipe
    ├── RoundRecordInvalid     a signed round record does not verify or does not continue into this round
    │                          (``.reason`` says which check)
    ├── UpdateUnreadable       an update could not be opened or parsed (HTTP 400); nothing recorded
    └── RoundClosed            the round takes no more updates (HTTP 409)
"""

from cvm.aggregator.errors import (
    AggregatorError,
    RecipeNotARound,
    RoundClosed,
    RoundRecordInvalid,
    UpdateUnreadable,
)
from cvm.aggregator.recipe import (
    ROUND_PAYLOAD_TYPE,
    build_round_compose,
    check_reference,
    round_contract_of,
)
from cvm.aggregator.record import (
    PublishedRound,
    continue_from,
    round_payload,
    verify_previous_round,
    verify_round_attestation,
)
from cvm.aggregator.state import RoundAggregator
from cvm.aggregator.wire import (
    UPDATE_FORMAT,
    AggregatorAttestation,
    RoundStatus,
    UpdateReceived,
    aggregator_report_data,
    max_sealed_update_bytes,
    update_box_context,
    update_from_bytes,
    update_to_bytes,
    weights_from_hex,
)

__all__ = [
    "ROUND_PAYLOAD_TYPE",
    "UPDATE_FORMAT",
    "AggregatorAttestation",
    "AggregatorError",
    "PublishedRound",
    "RecipeNotARound",
    "RoundAggregator",
    "RoundClosed",
    "RoundRecordInvalid",
    "RoundStatus",
    "UpdateReceived",
    "UpdateUnreadable",
    "aggregator_report_data",
    "build_round_compose",
    "check_reference",
    "continue_from",
    "max_sealed_update_bytes",
    "round_contract_of",
    "round_payload",
    "update_box_context",
    "update_from_bytes",
    "update_to_bytes",
    "verify_previous_round",
    "verify_round_attestation",
    "weights_from_hex",
]
