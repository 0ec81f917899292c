"""The aggregator's exception tree (drawn in the package docstring): one home, so every module can raise it."""

from __future__ import annotations


class AggregatorError(Exception):
    """Base of everything the aggregator raises about a round."""


class RecipeNotARound(AggregatorError):
    """The measured compose is not a federated round recipe."""


class RoundRecordInvalid(AggregatorError):
    """A signed round record does not verify, or does not continue into this round (``.reason`` says which)."""

    def __init__(self, reason: str):
        super().__init__(f"round record rejected: {reason}")
        self.reason = reason


class UpdateUnreadable(AggregatorError):
    """An update could not be opened or parsed (HTTP 400); nothing recorded."""


class RoundClosed(AggregatorError):
    """The round takes no more updates (HTTP 409)."""
