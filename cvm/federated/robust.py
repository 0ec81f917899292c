"""Anomaly flags: how far each accepted update lies from a robust centre, and which ones look poisoned.

Spec: DESIGN.md §7 ("filters anomalies"). The centre is the coordinate median of the accepted updates.
For each update u we compute

- ``distance`` = ‖u − centre‖₂ and its robust z-score
  ``(distance − median(distances)) / (1.4826 · MAD(distances))`` — the modified z-score of Iglewicz and
  Hoaglin (1993), MAD scaled to match a standard deviation for normal data;
- ``cosine`` = cos(u, centre).

An update is flagged when its z-score exceeds ``Z_THRESHOLD`` = 3.5 (Iglewicz and Hoaglin's recommended
cut-off: a scaled-up update lies far from the centre) or its cosine is below ``COSINE_THRESHOLD`` = 0 (it
points away from where the majority moves: a sign flip). With fewer than ``MIN_UPDATES`` = 3 updates
there is no majority to compare with, and nothing is flagged.

Flags are reported in the round record; they do not remove updates from the aggregate. Dropping updates
on a data-dependent score would void the DP sensitivity bound of the aggregators (``strategies``), so
the protection against poisoning is the robust aggregator, and the flags are evidence for the owners
(who can, for instance, remove a site from the next round's contract). Scores are computed from the raw
updates and are not covered by ε.

Cost: for models above ``SAMPLE_COORDINATES`` = 16,384 parameters the scores use that many coordinates
drawn uniformly at random (with replacement, from the OS CSPRNG) after the updates arrived, so an attacker
cannot know which coordinates are looked at; distances are scaled to the full length (relative error about
1 % for spread-out updates). Below it, all coordinates. LIMITATION: a poison concentrated on a few
coordinates is likely missed by the sample; the coordinate-wise robust aggregators still bound it.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from cvm.federated.strategies import column_blocks
from cvm.federated.validation import AcceptedUpdate

Z_THRESHOLD = 3.5
COSINE_THRESHOLD = 0.0
MIN_UPDATES = 3
SAMPLE_COORDINATES = 2**14
_MAD_TO_SIGMA = 1.4826


@dataclass(frozen=True)
class AnomalyScore:
    """One accepted update's scores against the robust centre, and whether they cross a threshold."""

    site: str
    distance: float
    distance_z: float
    cosine: float
    flagged: bool


def _sample_columns(size: int, count: int, random_bytes: Callable[[int], bytes]) -> np.ndarray:
    draws = np.frombuffer(random_bytes(8 * count), dtype="<u8")
    return np.unique(draws % np.uint64(size)).astype(np.intp)  # modulo bias ≤ size / 2^64: negligible


def _distances_and_cosines(updates: Sequence[AcceptedUpdate]) -> tuple[np.ndarray, np.ndarray]:
    """One pass over column blocks: per block the median, then each update's distance and dot product."""
    n = len(updates)
    squared_distance = np.zeros(n)
    dot = np.zeros(n)
    squared_norm = np.zeros(n)
    centre_squared_norm = 0.0
    middle = sorted({(n - 1) // 2, n // 2})
    for _, block in column_blocks(updates):
        block64 = block.astype(np.float64)
        centre = np.partition(block64, middle, axis=0)[middle].mean(axis=0)
        squared_distance += np.square(block64 - centre).sum(axis=1)
        dot += block64 @ centre
        squared_norm += np.square(block64).sum(axis=1)
        centre_squared_norm += float(centre @ centre)
    scale = np.sqrt(squared_norm * centre_squared_norm)
    cosine = np.divide(dot, scale, out=np.ones(n), where=scale > 0)  # a zero vector points nowhere: not flagged
    return np.sqrt(squared_distance), cosine


def score_updates(
    updates: Sequence[AcceptedUpdate],
    *,
    sample_coordinates: int = SAMPLE_COORDINATES,
    random_bytes: Callable[[int], bytes] = secrets.token_bytes,
) -> tuple[AnomalyScore, ...]:
    """Score every update as described in the module docstring; empty when fewer than ``MIN_UPDATES``.

    ``random_bytes`` draws the coordinate sample (``secrets.token_bytes`` unless a test injects one).
    """
    if len(updates) < MIN_UPDATES:
        return ()
    size = updates[0].vector.size
    scored, stretch = updates, 1.0
    if size > sample_coordinates:
        columns = _sample_columns(size, sample_coordinates, random_bytes)
        scored = [
            AcceptedUpdate(site=u.site, num_examples=u.num_examples, vector=u.vector[columns], digest=u.digest)
            for u in updates
        ]
        stretch = float(np.sqrt(size / columns.size))
    distances, cosines = _distances_and_cosines(scored)
    distances = distances * stretch
    centre = float(np.median(distances))
    spread = _MAD_TO_SIGMA * float(np.median(np.abs(distances - centre)))
    # Identical honest updates have MAD 0; a floor keeps the score finite and still flags any outlier.
    spread = max(spread, 1e-6 * centre, 1e-12)
    z = (distances - centre) / spread
    return tuple(
        AnomalyScore(
            site=update.site,
            distance=float(distance),
            distance_z=float(score),
            cosine=float(cosine),
            flagged=bool(score > Z_THRESHOLD or cosine < COSINE_THRESHOLD),
        )
        for update, distance, score, cosine in zip(updates, distances, z, cosines)
    )
