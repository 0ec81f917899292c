"""run_round end to end: the record's contents and bytes, the refusals, metrics, and site-side rollback."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence

import numpy as np
import pytest
from opacus.accountants import RDPAccountant

from cvm.federated import (
    AccountantState,
    Evaluation,
    OpacusGaussian,
    PrivacyBudgetExhausted,
    Reason,
    RoundStillOpen,
    TooFewParticipants,
    accept_or_rollback,
    run_round,
    vector_digest,
)
from tests.test_fed_support import make_contract, make_sites, signed, small_updates

SIZE = 40
PARENT = np.linspace(-1, 1, SIZE, dtype=np.float32)
SITES = make_sites(5)
OUTSIDER = make_sites(1, seed=9)[0]
VECTORS = small_updates(5, SIZE)
NOW = 2_000  # after every contract's deadline (1_000) unless a test says otherwise


def contract(**overrides):
    return make_contract(PARENT, SITES, **overrides)


def updates_for(value, sites=SITES, vectors=VECTORS):
    return [signed(site, value, vector) for site, vector in zip(sites, vectors)]


def run(value, updates, **kwargs):
    kwargs.setdefault("now", NOW)
    kwargs.setdefault("accountant_state", AccountantState())
    kwargs.setdefault("noise", OpacusGaussian(insecure_test_seed=5))
    return run_round(value, PARENT, updates, **kwargs)


class Untouchable(Sequence):
    """Updates that fail the test if anything reads them."""

    def __len__(self):
        raise AssertionError("updates were read")

    def __getitem__(self, index):
        raise AssertionError("updates were read")


# ----------------------------------------------------------------------------------------- the record


def test_a_full_round_produces_a_consistent_record():
    value = contract(aggregator="trimmed_mean", trim_fraction=0.2, min_participants=3)
    updates = updates_for(value, SITES[:3]) + [
        signed(OUTSIDER, value, VECTORS[3]),  # not eligible
        dataclasses.replace(signed(SITES[3], value, VECTORS[3]), vector=VECTORS[4]),  # forged
    ]
    new_weights, record, state = run(value, updates)

    assert new_weights.dtype == np.float32 and new_weights.shape == PARENT.shape
    assert record.format == "sealroom-fed-round-record/v1"
    assert record.round == 1 and record.contract_digest == value.digest()
    assert record.parent_digest == value.parent_digest == record.lineage.parent
    assert record.aggregate_digest == vector_digest(new_weights) == record.lineage.child
    assert [(j.site, j.update_digest) for j in record.joined] == [
        (site.address, vector_digest(v)) for site, v in zip(SITES[:3], VECTORS)
    ]
    assert [(r.site, r.reason) for r in record.rejected] == [
        (OUTSIDER.address, Reason.NOT_ELIGIBLE),
        (SITES[3].address, Reason.FORGED_SIGNATURE),
    ]
    # SITES[3]'s only update was forged, so it counts as not having shown up.
    assert record.dropped == (SITES[3].address, SITES[4].address)
    assert record.bytes_in == 5 * (SIZE * 4 + 65) and record.bytes_out == SIZE * 4
    assert record.aggregator == "trimmed_mean" and record.closed_at == NOW
    assert record.simulated is True
    assert record.privacy.l2_sensitivity == pytest.approx(1.0 / 3, rel=1e-5)  # n = 3, t = ⌊0.6⌋ = 0: Δ = C/3
    assert state.last_round == 1


def test_the_trimmed_mean_sensitivity_in_the_record_follows_the_participants():
    value = contract(aggregator="trimmed_mean", trim_fraction=0.2)
    _, record, _ = run(value, updates_for(value))  # n = 5, t = 1, 3 kept
    assert record.privacy.l2_sensitivity == pytest.approx(1.0 / 3, rel=1e-5)
    assert record.privacy.noise_std == pytest.approx(record.privacy.l2_sensitivity * value.noise_multiplier)
    assert "NOT private" in record.privacy.noise


def test_canonical_json_is_sorted_compact_and_round_trips():
    value = contract()
    _, record, _ = run(value, updates_for(value))
    data = record.canonical_json()
    parsed = json.loads(data)
    assert data == json.dumps(parsed, sort_keys=True, separators=(",", ":")).encode()
    assert type(record).model_validate(parsed) == record
    assert parsed["format"] == "sealroom-fed-round-record/v1"


def test_new_weights_are_parent_plus_the_noisy_aggregate():
    value = contract(noise_multiplier=1e-6, epsilon_per_round=1e15, epsilon_total=1e16)
    new_weights, _, _ = run(value, updates_for(value))
    assert np.allclose(new_weights, PARENT + np.mean(VECTORS, axis=0), atol=1e-5)


def test_flagged_sites_are_in_the_record_but_still_joined():
    vectors = list(VECTORS)
    vectors[4] = -vectors[4] * 5
    value = contract(aggregator="coordinate_median")
    _, record, _ = run(value, updates_for(value, vectors=vectors))
    assert [f.site for f in record.flagged] == [SITES[4].address]
    assert record.flagged[0].cosine < 0
    assert SITES[4].address in [j.site for j in record.joined]


# ----------------------------------------------------------------------------------------- privacy


def test_record_epsilon_matches_a_direct_opacus_computation_over_rounds():
    state, weights, reference = AccountantState(), PARENT, RDPAccountant()
    for round_number in (1, 2, 3):
        value = make_contract(weights, SITES, round=round_number, noise_multiplier=1.3)
        weights, record, state = run_round(
            value, weights, updates_for(value), now=NOW, accountant_state=state, noise=OpacusGaussian(insecure_test_seed=1)
        )
        before = reference.get_epsilon(1e-5) if reference.history else 0.0
        reference.step(noise_multiplier=1.3, sample_rate=1.0)
        assert record.privacy.epsilon_spent_total == pytest.approx(reference.get_epsilon(1e-5), rel=1e-12)
        assert record.privacy.epsilon_round == pytest.approx(reference.get_epsilon(1e-5) - before, rel=1e-9)
        assert record.privacy.epsilon_left == pytest.approx(value.epsilon_total - reference.get_epsilon(1e-5))


def test_an_over_budget_round_is_refused_before_any_update_is_read():
    value = contract(noise_multiplier=0.5, epsilon_per_round=5.0, epsilon_total=5.0)
    with pytest.raises(PrivacyBudgetExhausted):
        run(value, Untouchable())


def test_the_budget_runs_out_after_some_rounds_and_the_state_is_unchanged():
    state, weights = AccountantState(), PARENT
    for round_number in (1, 2):
        value = make_contract(weights, SITES, round=round_number, epsilon_per_round=5.0, epsilon_total=8.0)
        weights, _, state = run_round(value, weights, updates_for(value), now=NOW, accountant_state=state, noise=OpacusGaussian())
    third = make_contract(weights, SITES, round=3, epsilon_per_round=5.0, epsilon_total=8.0)  # ε: 4.7, 7.1, 9.0
    with pytest.raises(PrivacyBudgetExhausted, match="epsilon_total"):
        run_round(third, weights, Untouchable(), now=NOW, accountant_state=state, noise=OpacusGaussian())
    assert state.last_round == 2


def test_the_default_noise_is_the_contracts_production_source():
    value = contract(noise="opendp")
    _, record, _ = run_round(value, PARENT, updates_for(value), now=NOW, accountant_state=AccountantState())
    assert record.privacy.noise.startswith("opendp")


def test_a_noise_source_other_than_the_contracts_is_refused():
    with pytest.raises(ValueError, match="requires 'opendp' noise"):
        run(contract(noise="opendp"), updates_for(contract(noise="opendp")), noise=OpacusGaussian())


# ----------------------------------------------------------------------------------------- refusals


def test_too_few_participants_aggregates_nothing_and_lists_the_rejections():
    value = contract(min_participants=3)
    updates = updates_for(value, SITES[:2]) + [signed(OUTSIDER, value, VECTORS[2])]
    with pytest.raises(TooFewParticipants) as caught:
        run(value, updates)
    assert (caught.value.accepted, caught.value.required) == (2, 3)
    assert [r.reason for r in caught.value.rejected] == [Reason.NOT_ELIGIBLE]


def test_before_the_deadline_the_round_waits_for_every_eligible_site():
    value = contract(deadline=NOW + 1)
    with pytest.raises(RoundStillOpen, match="1 eligible site"):
        run(value, updates_for(value, SITES[:4]))
    _, record, _ = run(value, updates_for(value))  # everyone in: it may close early
    assert len(record.joined) == 5 and record.dropped == ()


def test_parent_weights_must_match_the_contract():
    value = contract()
    with pytest.raises(ValueError, match="parent_digest"):
        run_round(value, PARENT + 1, updates_for(value), now=NOW, accountant_state=AccountantState())


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"now": "later"}, TypeError),
        ({"now": float("nan")}, TypeError),
        ({"simulated": "no"}, TypeError),
        ({"accountant_state": {}}, TypeError),
        ({"noise": "opacus"}, TypeError),
    ],
)
def test_caller_mistakes(kwargs, error):
    value = contract()
    with pytest.raises(error):
        run(value, updates_for(value), **kwargs)


def test_a_real_hardware_round_can_say_so():
    value = contract()
    _, record, _ = run(value, updates_for(value), simulated=False)
    assert record.simulated is False


# ----------------------------------------------------------------------------------------- metrics


def test_metrics_report_quality_spread_and_worst_site_regression():
    target = PARENT + np.mean(VECTORS, axis=0)

    def evaluate(weights):
        quality = -float(np.linalg.norm(weights - target))
        return Evaluation(quality, {SITES[0].address: quality, SITES[1].address: -float(np.abs(weights).sum())})

    value = contract(noise_multiplier=1e-6, epsilon_per_round=1e15, epsilon_total=1e16)
    _, record, _ = run(value, updates_for(value), evaluate=evaluate)
    metrics = record.metrics
    assert metrics.global_quality > metrics.parent_global_quality
    assert metrics.per_site_min <= metrics.per_site_median <= metrics.per_site_max
    worst = metrics.worst_site_regression
    assert worst.regression == pytest.approx(worst.parent_quality - worst.new_quality)
    assert worst.site in (SITES[0].address, SITES[1].address)


def test_evaluate_must_return_an_evaluation():
    value = contract()
    with pytest.raises(TypeError, match="Evaluation"):
        run(value, updates_for(value), evaluate=lambda weights: 0.9)
    with pytest.raises(ValueError, match="finite"):
        Evaluation(float("nan"))


# ----------------------------------------------------------------------------------------- rollback


def local_quality(weights):
    return -float(np.abs(weights - 1.0).sum())  # this site likes weights near 1


def test_rollback_keeps_the_champion_when_the_candidate_is_worse_beyond_tolerance():
    champion, candidate = np.ones(4, dtype=np.float32), np.zeros(4, dtype=np.float32)
    decision = accept_or_rollback(champion, candidate, local_quality, tolerance=0.5)
    assert decision.rolled_back and decision.keep == "champion"
    assert decision.kept_digest == vector_digest(champion)
    assert (decision.champion_quality, decision.candidate_quality) == (0.0, -4.0)


def test_rollback_accepts_a_candidate_within_tolerance_or_better():
    champion = np.ones(4, dtype=np.float32)
    slightly_worse = np.full(4, 0.9, dtype=np.float32)
    decision = accept_or_rollback(champion, slightly_worse, local_quality, tolerance=0.5)
    assert not decision.rolled_back and decision.kept_digest == vector_digest(slightly_worse)
    better = accept_or_rollback(slightly_worse, champion, local_quality, tolerance=0.0)
    assert better.keep == "candidate" and better.kept_digest == vector_digest(champion)


@pytest.mark.parametrize("tolerance", [-0.1, float("inf"), True])
def test_rollback_refuses_a_bad_tolerance(tolerance):
    with pytest.raises(ValueError, match="tolerance"):
        accept_or_rollback(np.ones(2, dtype=np.float32), np.ones(2, dtype=np.float32), local_quality, tolerance)


def test_rollback_refuses_a_non_finite_quality():
    with pytest.raises(ValueError, match="finite"):
        accept_or_rollback(np.ones(2, dtype=np.float32), np.ones(2, dtype=np.float32), lambda w: float("nan"), 0.1)
