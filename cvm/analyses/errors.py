"""Exceptions raised by ``cvm.analyses`` (the tree is drawn in the package docstring)."""

from __future__ import annotations


class AnalysisError(Exception):
    """Base of every outcome the DP analyses report (caller mistakes are TypeError/ValueError)."""


class OutputRefused(AnalysisError):
    """The output gate refused to let a result leave the CVM; ``reason`` says which rule fired."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"output refused: {reason}")
        self.reason = reason


class BudgetTooSmall(AnalysisError):
    """No noise level within the mechanisms' range fits the privacy budget; nothing was computed."""


class MissingBounds(ValueError):
    """A query on a column lacks the public bounds (clamp range, bin edges or categories) it needs.

    Bounds come from the measured manifest and are never inferred from the data: inferring them would
    spend privacy that no accountant sees.
    """
