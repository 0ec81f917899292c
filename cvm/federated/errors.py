"""Exceptions raised by ``cvm.federated`` (the tree is drawn in the package docstring)."""

from __future__ import annotations


class FederatedError(Exception):
    """Base of every outcome a federated round reports (caller mistakes are TypeError/ValueError)."""


class PrivacyBudgetExhausted(FederatedError):
    """The round would spend more ε than the contract allows; nothing was validated or aggregated.

    ``reason`` names the limit: ``"epsilon_total"`` or ``"epsilon_per_round"``.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"privacy budget exhausted ({reason}): {detail}")
        self.reason = reason


class TooFewParticipants(FederatedError):
    """Fewer valid updates than the contract's ``min_participants``; nothing was aggregated, no ε spent.

    ``accepted`` counts the valid updates; ``rejected`` holds the :class:`~cvm.federated.validation.Rejection`
    entries, so the operator can see why the others were refused.
    """

    def __init__(self, accepted: int, required: int, rejected: tuple) -> None:
        super().__init__(f"{accepted} valid update(s), the contract requires {required}")
        self.accepted = accepted
        self.required = required
        self.rejected = rejected


class RoundStillOpen(FederatedError):
    """The deadline has not passed and some eligible sites have not sent a valid update yet."""


class DPNotSupported(FederatedError):
    """The DP wrapper refuses a strategy that declares no sound L2 sensitivity (fail closed)."""


class NoiseFailed(FederatedError):
    """The noise library refused or failed; nothing was released. Wraps OpenDP's and Opacus's errors."""
