"""DP-SGD with Opacus (cvm/analyses/dpsgd.py): utility on 20k rows, ε within target, randomness policy, refusals."""

from __future__ import annotations

import sys
import types

import numpy as np
import pyarrow as pa
import pytest
import torch

from cvm.analyses import (
    BudgetTooSmall,
    MissingBounds,
    PrivacyLoss,
    TrainingSpec,
    run_dp_sgd,
)
from cvm.analyses.cohorts import FEATURE_BOUNDS, OUTCOME, SITE_SIZES, generate_cohorts
from cvm.analyses.dpsgd import (
    _generator,
    _randomness,
    prepare_features,
    roc_auc,
    scores,
    split_held_out,
    train_dp,
)

TARGET = PrivacyLoss(1.5, 1e-6)
ROWS = 20_000


@pytest.fixture(scope="module")
def cohort() -> pa.Table:
    sizes = {site: n * ROWS // sum(SITE_SIZES.values()) for site, n in SITE_SIZES.items()}
    return pa.concat_tables(generate_cohorts(seed=5, sizes=sizes).values())


def _spec(**overrides) -> TrainingSpec:
    settings = dict(features=dict(FEATURE_BOUNDS), label=OUTCOME, batch_size=2048, epochs=2, learning_rate=0.1,
                    held_out_fraction=0.2)
    return TrainingSpec(**{**settings, **overrides})


@pytest.fixture(scope="module")
def logistic_run(cohort):
    return run_dp_sgd(cohort, _spec(), TARGET, insecure_test_seed=3)


def test_run_dp_sgd_logistic_learns_within_target_epsilon(logistic_run):
    assert logistic_run.held_out_auc > 0.65
    spent = logistic_run.model.spent
    assert 0 < spent.epsilon <= TARGET.epsilon and spent.delta == TARGET.delta
    assert logistic_run.model.accountant == "prv"
    assert logistic_run.model.noise_multiplier > 0.5  # real noise, not a degenerate run
    assert logistic_run.train_rows + logistic_run.held_out_rows == ROWS
    assert logistic_run.model.steps == round(2 / logistic_run.model.sample_rate)
    assert logistic_run.model.noise_source == "seeded for tests: NOT private"
    assert {name: w.shape for name, w in logistic_run.model.weights.items()} == {"weight": (1, 10), "bias": (1,)}


def test_run_dp_sgd_mlp_learns_within_target_epsilon(cohort):
    run = run_dp_sgd(cohort, _spec(model="mlp", learning_rate=0.05), TARGET, insecure_test_seed=4)
    assert run.held_out_auc > 0.65
    assert run.model.spent.epsilon <= TARGET.epsilon
    assert run.model.weights["0.weight"].shape == (32, 10)


def test_dp_model_module_reproduces_the_trained_scores(cohort, logistic_run):
    data = prepare_features(cohort, _spec())
    rebuilt = logistic_run.model.module()
    weight = logistic_run.model.weights["weight"][0]
    expected = data.x.numpy() @ weight + logistic_run.model.weights["bias"][0]
    assert np.allclose(scores(rebuilt, data), expected, atol=1e-5)


def test_run_dp_sgd_same_test_seed_same_model(cohort, logistic_run):
    again = run_dp_sgd(cohort, _spec(), TARGET, insecure_test_seed=3)
    assert all(np.array_equal(again.model.weights[k], logistic_run.model.weights[k]) for k in again.model.weights)
    assert again.held_out_auc == logistic_run.held_out_auc


def test_production_generator_is_fresh_each_time_and_not_torchs_default():
    seeds = {_generator(None).initial_seed() for _ in range(4)}
    assert len(seeds) == 4
    assert torch.default_generator.initial_seed() not in seeds
    assert _generator(7).initial_seed() == 7
    with pytest.raises(TypeError):
        _generator(True)


def test_randomness_uses_secure_mode_when_torchcsprng_is_importable(monkeypatch):
    assert _randomness(None).secure_mode is False  # torchcsprng has no build for this torch
    assert "secure_mode unavailable" in _randomness(None).description
    monkeypatch.setitem(sys.modules, "torchcsprng", types.ModuleType("torchcsprng"))
    secure = _randomness(None)
    assert secure.secure_mode is True and secure.description == "Opacus secure_mode (torchcsprng)"
    assert _randomness(1).secure_mode is False  # an explicit test seed never claims secure mode


def test_prepare_features_scales_by_manifest_bounds_not_data():
    spec = TrainingSpec(features={"age": (20.0, 100.0), "sbp": (80.0, 230.0)}, label="y")
    table = pa.table({"age": [20.0, 60.0, 100.0, 140.0, None], "sbp": [80.0, 155.0, 230.0, 10.0, float("nan")], "y": [0, 1, 1, 0, None]})
    data = prepare_features(table, spec)
    expected = [[-1.0, -1.0], [0.0, 0.0], [1.0, 1.0], [1.0, -1.0], [0.0, 0.0]]
    assert np.allclose(data.x.numpy(), expected)
    assert data.y.tolist() == [0.0, 1.0, 1.0, 0.0, 0.0]
    # The same row scales the same whatever else is in the table.
    alone = prepare_features(table.slice(1, 1), spec)
    assert np.allclose(alone.x.numpy(), [[0.0, 0.0]])


def test_split_held_out_partitions_rows():
    data = prepare_features(pa.table({"a": list(range(100)), "y": [0, 1] * 50}), TrainingSpec({"a": (0, 99)}, "y"))
    train, held_out = split_held_out(data, 0.25, torch.Generator().manual_seed(0))
    assert (len(train), len(held_out)) == (75, 25)
    combined = sorted(torch.cat([train.x, held_out.x]).squeeze(1).tolist())
    assert combined == sorted(data.x.squeeze(1).tolist())


def test_roc_auc_matches_pair_counting_with_ties():
    rng = np.random.default_rng(0)
    scores_ = rng.integers(0, 5, 300).astype(float)  # many ties
    labels = rng.random(300) < 0.3
    positives, negatives = scores_[labels], scores_[~labels]
    wins = (positives[:, None] > negatives[None, :]).sum() + 0.5 * (positives[:, None] == negatives[None, :]).sum()
    assert roc_auc(scores_, labels) == pytest.approx(wins / (len(positives) * len(negatives)))
    assert roc_auc(np.array([0.1, 0.9]), np.array([0, 1])) == 1.0
    assert roc_auc(np.array([0.9, 0.1]), np.array([0, 1])) == 0.0
    with pytest.raises(ValueError, match="both positive and negative"):
        roc_auc(np.array([0.1, 0.2]), np.array([1, 1]))


def test_train_dp_budget_too_small_refused(cohort):
    spec = _spec(epochs=1, batch_size=4096)
    data = prepare_features(cohort, spec)
    with pytest.raises(BudgetTooSmall):
        train_dp(data, spec, PrivacyLoss(1e-6, 1e-6), insecure_test_seed=1)
    with pytest.raises(ValueError, match="delta > 0"):
        train_dp(data, spec, PrivacyLoss(1.5, 0.0), insecure_test_seed=1)


def test_training_spec_missing_bounds_refused():
    with pytest.raises(MissingBounds, match="'sbp'"):
        TrainingSpec.from_params({"features": {"age": [18, 95], "sbp": None}, "label": OUTCOME})
    assert TrainingSpec.from_params({"features": {"age": [18, 95]}, "label": OUTCOME}).features == {"age": (18.0, 95.0)}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"features": {}}, "non-empty"),
        ({"features": {"age": (95, 18)}}, "low < high"),
        ({"label": "age"}, "not a feature"),
        ({"model": "forest"}, "model must be"),
        ({"epochs": 0}, "epochs"),
        ({"batch_size": True}, "batch_size"),
        ({"learning_rate": -1.0}, "learning_rate"),
        ({"held_out_fraction": 1.0}, "held_out_fraction"),
    ],
)
def test_training_spec_bad_values_refused(overrides, message):
    params = {"features": {"age": (18, 95)}, "label": OUTCOME, **overrides}
    with pytest.raises(ValueError, match=message):
        TrainingSpec.from_params(params)


def test_training_spec_unknown_param_refused():
    with pytest.raises(ValueError, match="unexpected keyword"):
        TrainingSpec.from_params({"features": {"age": (18, 95)}, "label": OUTCOME, "noise": 0.0})
