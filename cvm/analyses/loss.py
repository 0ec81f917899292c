"""The (ε, δ) pair used both as a budget (the most an analysis may spend) and as the amount spent."""

from __future__ import annotations

import math
from dataclasses import dataclass


def _finite_number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, not {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite")
    return float(value)


@dataclass(frozen=True)
class PrivacyLoss:
    """Approximate differential privacy (ε, δ) for the privacy unit "one patient = one input row".

    ``epsilon`` >= 0; ``delta`` in [0, 1). δ = 0 means pure ε-DP. A spend of ε = 0 is possible at δ > 0
    (a tiny zCDP loss converts to (0, δ)); a budget of (0, 0) admits nothing.
    """

    epsilon: float
    delta: float

    def __post_init__(self) -> None:
        epsilon = _finite_number("epsilon", self.epsilon)
        delta = _finite_number("delta", self.delta)
        if epsilon < 0:
            raise ValueError("epsilon must not be negative")
        if not 0 <= delta < 1:
            raise ValueError("delta must be in [0, 1)")
        object.__setattr__(self, "epsilon", epsilon)
        object.__setattr__(self, "delta", delta)

    def fits_within(self, limit: PrivacyLoss) -> bool:
        """True when this loss is no larger than ``limit`` in both ε and δ."""
        return self.epsilon <= limit.epsilon and self.delta <= limit.delta
