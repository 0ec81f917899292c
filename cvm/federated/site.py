"""Site side: keep the new global model only if it does not make things worse here (rollback).

Spec: DESIGN.md §7 ("Sites may reject a global candidate and stay on their champion"). The champion is
the model the site currently serves; the candidate is the round's new global model. The site scores both
on its own validation data and keeps the candidate unless it is worse by more than ``tolerance``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np

from cvm.federated import vectors


@dataclass(frozen=True)
class SiteDecision:
    """Which model the site keeps (``"candidate"`` or ``"champion"``), its digest, and both local qualities."""

    keep: Literal["candidate", "champion"]
    kept_digest: str
    champion_quality: float
    candidate_quality: float

    @property
    def rolled_back(self) -> bool:
        """True when the site stays on its champion."""
        return self.keep == "champion"


def _quality(evaluate_local: Callable[[np.ndarray], float], weights: np.ndarray) -> float:
    value = evaluate_local(weights)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError("evaluate_local must return a finite number (higher is better)")
    return float(value)


def accept_or_rollback(
    champion: np.ndarray,
    candidate: np.ndarray,
    evaluate_local: Callable[[np.ndarray], float],
    tolerance: float,
) -> SiteDecision:
    """Keep ``candidate`` unless ``quality(candidate) < quality(champion) − tolerance``; then keep the champion.

    ``evaluate_local`` scores weights on the site's own data, higher is better; ``tolerance`` ≥ 0 is the
    regression the site accepts (DP noise makes a new model slightly worse at times).
    """
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 <= tolerance < math.inf:
        raise ValueError("tolerance must be a finite number >= 0")
    champion, candidate = vectors.canonical(champion), vectors.canonical(candidate)
    champion_quality = _quality(evaluate_local, champion)
    candidate_quality = _quality(evaluate_local, candidate)
    if candidate_quality < champion_quality - tolerance:
        return SiteDecision("champion", vectors.digest(champion), champion_quality, candidate_quality)
    return SiteDecision("candidate", vectors.digest(candidate), champion_quality, candidate_quality)
