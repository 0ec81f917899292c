"""Aggregation strategies against naive numpy, their stated DP sensitivities, and poisoning robustness.

The poisoning test runs whole rounds through ``run_round`` (signatures, validation, DP noise from a seeded
Opacus generator) on a small non-IID logistic-regression task: 5 sites, 1 of which poisons.
"""

from __future__ import annotations

import numpy as np
import pytest

from cvm.federated import (
    COORDINATE_MEDIAN,
    FEDAVG,
    AcceptedUpdate,
    AccountantState,
    OpacusGaussian,
    clip,
    coordinate_median,
    fedavg,
    run_round,
    strategies,
    strategy_for,
    trimmed_mean,
    trimmed_mean_strategy,
)
from tests.test_fed_support import make_contract, make_sites, signed

RNG = np.random.default_rng(7)


def accepted(vectors, counts=None) -> list[AcceptedUpdate]:
    counts = counts or [1] * len(vectors)
    return [
        AcceptedUpdate(site=f"site{i}", num_examples=c, vector=np.asarray(v, dtype=np.float32), digest=str(i))
        for i, (v, c) in enumerate(zip(vectors, counts))
    ]


@pytest.fixture(params=[None, 4 * 7 * 3], ids=["one block", "many uneven blocks"])
def block_bytes(request, monkeypatch):
    if request.param:
        monkeypatch.setattr(strategies, "BLOCK_BYTES", request.param)  # 3 columns per block for 7 updates
    return request.param


@pytest.mark.parametrize("n", [1, 2, 5, 7])
def test_aggregates_match_naive_numpy(n, block_bytes):
    stack = RNG.standard_normal((n, 23)).astype(np.float32)
    counts = list(RNG.integers(1, 50, size=n))
    updates = accepted(stack, counts)
    assert np.allclose(fedavg(updates), np.average(stack, axis=0, weights=counts), atol=1e-6)
    assert np.allclose(coordinate_median(updates), np.median(stack, axis=0), atol=1e-6)
    trim = int(np.floor(0.2 * n))
    expected = np.sort(stack, axis=0)[trim : n - trim].mean(axis=0)
    assert np.allclose(trimmed_mean(updates, 0.2), expected, atol=1e-6)


def test_aggregates_do_not_modify_the_updates():
    stack = RNG.standard_normal((5, 9)).astype(np.float32)
    updates = accepted(stack.copy())
    coordinate_median(updates)
    trimmed_mean(updates, 0.2)
    assert all(np.array_equal(u.vector, row) for u, row in zip(updates, stack))


def test_strategy_for_follows_the_contract():
    parent = np.zeros(4, dtype=np.float32)
    sites = make_sites(3)
    assert strategy_for(make_contract(parent, sites, aggregator="fedavg")) is FEDAVG
    assert strategy_for(make_contract(parent, sites, aggregator="coordinate_median")) is COORDINATE_MEDIAN
    trimmed = strategy_for(make_contract(parent, sites, aggregator="trimmed_mean", trim_fraction=0.25))
    assert trimmed.name == "trimmed_mean"


@pytest.mark.parametrize("bad", [-0.1, 0.5, 0.0])
def test_trimmed_mean_strategy_refuses_fractions_outside_the_open_interval(bad):
    with pytest.raises(ValueError, match="trim_fraction"):
        trimmed_mean_strategy(bad)


def test_aggregates_refuse_empty_and_ragged_input():
    with pytest.raises(ValueError, match="no updates"):
        coordinate_median([])
    with pytest.raises(ValueError, match="differ in length"):
        fedavg(accepted([np.zeros(3), np.zeros(4)]))


def _in_ball(n: int, size: int, bound: float, adversarial: bool) -> np.ndarray:
    """Updates with norm ≤ bound; ``adversarial`` puts half at +bound/√d and half at −bound/√d per coordinate."""
    if adversarial:
        signs = np.where(np.arange(n)[:, None] % 2 == 0, 1.0, -1.0) * np.ones((n, size))
        return (signs * bound / np.sqrt(size)).astype(np.float32)
    raw = RNG.standard_normal((n, size))
    raw *= (bound * RNG.uniform(0.2, 1.0, size=(n, 1))) / np.linalg.norm(raw, axis=1, keepdims=True)
    return raw.astype(np.float32)


@pytest.mark.parametrize("strategy", [FEDAVG, COORDINATE_MEDIAN, trimmed_mean_strategy(0.2)], ids=lambda s: s.name)
@pytest.mark.parametrize("adversarial", [False, True], ids=["random", "worst-case"])
def test_zero_out_neighbours_move_the_aggregate_at_most_the_stated_sensitivity(strategy, adversarial):
    bound = 1.0
    for n in (3, 4, 5, 8):
        stack = _in_ball(n, 16, bound, adversarial)
        counts = list(RNG.integers(1, 20, size=n))
        updates = accepted(stack, counts)
        sensitivity = strategy.l2_sensitivity(updates, bound)
        base = strategy.aggregate(updates)
        for j in range(n):
            neighbour = stack.copy()
            neighbour[j] = 0.0
            moved = np.linalg.norm((strategy.aggregate(accepted(neighbour, counts)) - base).astype(np.float64))
            assert moved <= sensitivity * (1 + 1e-5)


def test_stated_sensitivities():
    updates = accepted(np.zeros((10, 2)), counts=[1] * 9 + [11])
    assert FEDAVG.l2_sensitivity(updates, 2.0) == pytest.approx(2.0 * 11 / 20)
    assert COORDINATE_MEDIAN.l2_sensitivity(updates, 2.0) == 2.0
    assert trimmed_mean_strategy(0.2).l2_sensitivity(updates, 2.0) == pytest.approx(2.0 / 6)  # 10 − 2·2 kept


# ----------------------------------------------------------------------------------------- poisoning

FEATURES = 4
TRUE_WEIGHTS = np.array([2.0, -1.5, 1.0, 0.5])
SITE_MEANS = [np.array(m) for m in ([1.0, 0, 0, 0], [-1.0, 0.5, 0, 0], [0, -1.0, 1.0, 0], [0, 0, -1.0, 1.0], [0.5, 0.5, 0.5, -1.0])]


def site_data(mean: np.ndarray, rows: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Non-IID: each site's features are centred elsewhere, so label balance differs too."""
    x = rng.standard_normal((rows, FEATURES)) + mean
    y = (x @ TRUE_WEIGHTS + 0.3 * rng.standard_normal(rows) > 0).astype(np.float64)
    return np.hstack([x, np.ones((rows, 1))]), y


def local_update(weights: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Five epochs of full-batch gradient descent on the logistic loss; the delta from ``weights``."""
    w = weights.astype(np.float64)
    for _ in range(5):
        p = 1 / (1 + np.exp(-(x @ w)))
        w -= 0.5 * x.T @ (p - y) / len(y)
    return (w - weights).astype(np.float32)


def accuracy(weights: np.ndarray, data) -> float:
    x, y = data
    return float(np.mean((x @ weights.astype(np.float64) > 0) == (y == 1)))


CLIP_NORM = 5.0  # loose next to honest updates (norm ~0.2-0.5), as DP clip norms often are


def train(aggregator: str, *, poisoned: bool, rounds: int = 8) -> float:
    """Global accuracy after ``rounds`` rounds; site 4 poisons if asked (its honest delta sign-flipped and
    scaled up to the clip norm) and is left out entirely for the honest-only baseline."""
    rng = np.random.default_rng(3)
    data = [site_data(mean, 400, rng) for mean in SITE_MEANS]
    test = site_data(np.zeros(FEATURES), 4000, rng)
    sites = make_sites(5, seed=5)
    participating = sites if poisoned else sites[:4]
    weights = np.zeros(FEATURES + 1, dtype=np.float32)
    state = AccountantState()
    noise = OpacusGaussian(insecure_test_seed=11)
    extra = {"trim_fraction": 0.2} if aggregator == "trimmed_mean" else {}
    for round_number in range(1, rounds + 1):
        contract = make_contract(
            weights, participating, round=round_number, aggregator=aggregator, clip_norm=CLIP_NORM,
            noise_multiplier=0.01, epsilon_per_round=1e9, epsilon_total=1e10, min_participants=3, **extra,
        )
        updates = []
        for index, site in enumerate(participating):
            delta = clip(local_update(weights, *data[index]), CLIP_NORM)
            if index == 4:
                delta = clip(-delta * 1e3, CLIP_NORM)
            updates.append(signed(site, contract, delta, num_examples=400))
        weights, record, state = run_round(contract, weights, updates, now=2_000, accountant_state=state, noise=noise)
        assert record.rejected == ()
    return accuracy(weights, test)


def test_robust_aggregators_resist_one_poisoner_of_five_and_fedavg_does_not():
    honest = train("fedavg", poisoned=False)
    assert honest > 0.9  # the task is learnable
    margin = 0.05
    assert train("trimmed_mean", poisoned=True) >= honest - margin
    assert train("coordinate_median", poisoned=True) >= honest - margin
    assert train("fedavg", poisoned=True) < honest - 0.15
