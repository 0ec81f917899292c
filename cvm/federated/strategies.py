"""Aggregation strategies: pure functions from accepted updates to one aggregate vector.

Spec: DESIGN.md §7 ("aggregates robustly"). Like Flower's strategies, these take typed records
(:class:`~cvm.federated.validation.AcceptedUpdate`) and return a float32 vector; they know nothing of
transport, torch or DP. Each :class:`Strategy` also states its L2 sensitivity so that the DP wrapper
(``dp``) can calibrate noise; a strategy without one cannot be made private (the wrapper refuses it).

- FedAvg (McMahan et al. 2017): the example-weighted mean ``Σ wᵢuᵢ / Σ wᵢ``, ``wᵢ`` = num_examples.
- Coordinate median (Yin et al. 2018, "Byzantine-Robust Distributed Learning"): per coordinate, the
  median of the n values (the mean of the two middle values when n is even).
- Trimmed mean (Yin et al. 2018): per coordinate, drop the ``t = ⌊βn⌋`` lowest and highest values and
  average the remaining ``n − 2t``.

Sensitivities, for "zero-out" neighbours (one site's update replaced by the zero vector; the set of
participants is public in the round record) and accepted updates of L2 norm ≤ B:

- FedAvg: ``B · max wᵢ / Σ wᵢ`` (``B / n`` with equal weights); the weights are public metadata.
- Coordinate median: ``B``. Per coordinate, changing one of the n values moves every order statistic by
  at most that value's change (sorting is 1-Lipschitz in ℓ∞), so coordinate k moves by ≤ |uⱼₖ| and the
  vector by ≤ ‖uⱼ‖₂ ≤ B. No 1/n: the median is robust to poisoning, not cheap to privatise.
- Trimmed mean: ``B / (n − 2t)``. Per coordinate, the sum of the kept order statistics moves by at most
  ‖sort(x) − sort(x')‖₁ ≤ ‖x − x'‖₁ = |uⱼₖ| (sorting is non-expansive in ℓ1), so coordinate k moves by
  ≤ |uⱼₖ| / (n − 2t) and the vector by ≤ B / (n − 2t).

Memory: the updates are read in column blocks of about ``BLOCK_BYTES``, never stacked whole, so n
updates of d parameters need the updates themselves plus one block: 1,000 × 1M float32 fits in 4 GB + 32 MB.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from cvm.federated.round_contract import RoundContract
from cvm.federated.validation import AcceptedUpdate

BLOCK_BYTES = 32 * 2**20

Aggregate = Callable[[Sequence[AcceptedUpdate]], np.ndarray]
Sensitivity = Callable[[Sequence[AcceptedUpdate], float], float]


@dataclass(frozen=True)
class Strategy:
    """A named aggregation and, when one is sound, its L2 sensitivity given the updates and the norm bound."""

    name: str
    aggregate: Aggregate
    l2_sensitivity: Sensitivity | None


def _length(updates: Sequence[AcceptedUpdate]) -> int:
    """The common length of the update vectors; refuses an empty or ragged list."""
    if not updates:
        raise ValueError("no updates to aggregate")
    size = updates[0].vector.size
    if any(update.vector.size != size for update in updates):
        raise ValueError("updates differ in length")
    return size


def column_blocks(updates: Sequence[AcceptedUpdate]) -> Iterator[tuple[slice, np.ndarray]]:
    """Yield ``(columns, block)`` with ``block[i] = updates[i].vector[columns]``, an (n × width) float32 array.

    The block is a scratch buffer reused between iterations: consumers may reorder it in place and must not
    keep it. Python loops run over updates and blocks, never over parameters.
    """
    vectors = [update.vector for update in updates]
    size = _length(updates)
    width = max(1, BLOCK_BYTES // (4 * len(vectors)))
    buffer = np.empty((len(vectors), min(width, size)), dtype=np.float32)
    for start in range(0, size, width):
        stop = min(size, start + width)
        block = buffer[:, : stop - start]
        for row, vector in zip(block, vectors):
            row[...] = vector[start:stop]
        yield slice(start, stop), block


def _example_weights(updates: Sequence[AcceptedUpdate]) -> np.ndarray:
    counts = np.array([update.num_examples for update in updates], dtype=np.float64)
    return counts / counts.sum()


def fedavg(updates: Sequence[AcceptedUpdate]) -> np.ndarray:
    """The example-weighted mean of the updates (FedAvg)."""
    weights = _example_weights(updates).astype(np.float32)
    out = np.empty(_length(updates), dtype=np.float32)
    for columns, block in column_blocks(updates):
        out[columns] = weights @ block
    return out


def coordinate_median(updates: Sequence[AcceptedUpdate]) -> np.ndarray:
    """The coordinate-wise median of the updates (np.partition per column block, no full sort)."""
    n = len(updates)
    middle = sorted({(n - 1) // 2, n // 2})
    out = np.empty(_length(updates), dtype=np.float32)
    for columns, block in column_blocks(updates):
        block.partition(middle, axis=0)
        out[columns] = block[middle].mean(axis=0)
    return out


def trimmed_count(participants: int, trim_fraction: float) -> int:
    """How many values the trimmed mean drops at each end: ``⌊trim_fraction · n⌋``."""
    return math.floor(trim_fraction * participants)


def trimmed_mean(updates: Sequence[AcceptedUpdate], trim_fraction: float) -> np.ndarray:
    """The coordinate-wise β-trimmed mean, β = ``trim_fraction`` in [0, 0.5)."""
    if not 0 <= trim_fraction < 0.5:
        raise ValueError("trim_fraction must be in [0, 0.5)")
    n = len(updates)
    trim = trimmed_count(n, trim_fraction)
    out = np.empty(_length(updates), dtype=np.float32)
    for columns, block in column_blocks(updates):
        if trim:
            block.partition([trim, n - trim - 1], axis=0)
        out[columns] = block[trim : n - trim].mean(axis=0)
    return out


def _fedavg_sensitivity(updates: Sequence[AcceptedUpdate], bound: float) -> float:
    return bound * float(_example_weights(updates).max())


def _median_sensitivity(updates: Sequence[AcceptedUpdate], bound: float) -> float:
    return bound


def _trimmed_sensitivity(trim_fraction: float) -> Sensitivity:
    def sensitivity(updates: Sequence[AcceptedUpdate], bound: float) -> float:
        return bound / (len(updates) - 2 * trimmed_count(len(updates), trim_fraction))

    return sensitivity


FEDAVG = Strategy("fedavg", fedavg, _fedavg_sensitivity)
COORDINATE_MEDIAN = Strategy("coordinate_median", coordinate_median, _median_sensitivity)


def trimmed_mean_strategy(trim_fraction: float) -> Strategy:
    """The trimmed mean with a fixed β as a :class:`Strategy`."""
    if not 0 < trim_fraction < 0.5:
        raise ValueError("trim_fraction must be in (0, 0.5)")
    return Strategy(
        "trimmed_mean",
        lambda updates: trimmed_mean(updates, trim_fraction),
        _trimmed_sensitivity(trim_fraction),
    )


def strategy_for(contract: RoundContract) -> Strategy:
    """The strategy the contract names."""
    if contract.aggregator == "fedavg":
        return FEDAVG
    if contract.aggregator == "coordinate_median":
        return COORDINATE_MEDIAN
    return trimmed_mean_strategy(contract.trim_fraction)
