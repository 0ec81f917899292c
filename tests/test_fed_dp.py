"""The DP wrapper, both noise sources, and the accountant against a direct Opacus computation."""

from __future__ import annotations

import numpy as np
import opendp.prelude as dp
import pytest
from opacus.accountants import RDPAccountant

from cvm.federated import (
    FEDAVG,
    AcceptedUpdate,
    AccountantState,
    DPNotSupported,
    DPStrategy,
    NoiseFailed,
    OpacusGaussian,
    OpenDPGaussian,
    PrivacyBudgetExhausted,
    Strategy,
    epsilon_spent,
    noise_source,
    trimmed_mean_strategy,
)
from cvm.federated.accountant import charged, plan_round
from tests.test_fed_support import make_contract, make_sites

SITES = make_sites(3)
PARENT = np.zeros(4, dtype=np.float32)


def accepted(count: int, size: int) -> list[AcceptedUpdate]:
    return [
        AcceptedUpdate(site=f"s{i}", num_examples=1, vector=np.zeros(size, dtype=np.float32), digest=str(i))
        for i in range(count)
    ]


# ----------------------------------------------------------------------------------------- noise sources


@pytest.mark.parametrize("source", [OpenDPGaussian(), OpacusGaussian()], ids=["opendp", "opacus"])
def test_noise_has_the_calibrated_std_and_stays_float32(source):
    size = 8_000
    noisy = source.add(np.zeros(size, dtype=np.float32), l2_sensitivity=0.25, noise_multiplier=2.0)
    assert noisy.dtype == np.float32 and noisy.shape == (size,)
    assert float(np.std(noisy)) == pytest.approx(0.5, rel=0.05)
    assert abs(float(np.mean(noisy))) < 0.05


def test_production_noise_is_not_repeatable():
    first = OpacusGaussian().add(np.zeros(64, dtype=np.float32), l2_sensitivity=1.0, noise_multiplier=1.0)
    second = OpacusGaussian().add(np.zeros(64, dtype=np.float32), l2_sensitivity=1.0, noise_multiplier=1.0)
    assert not np.array_equal(first, second)


def test_seeded_noise_repeats_and_says_it_is_not_private():
    a, b = OpacusGaussian(insecure_test_seed=3), OpacusGaussian(insecure_test_seed=3)
    zeros = np.zeros(16, dtype=np.float32)
    assert np.array_equal(a.add(zeros, l2_sensitivity=1.0, noise_multiplier=1.0), b.add(zeros, l2_sensitivity=1.0, noise_multiplier=1.0))
    assert "NOT private" in a.description
    assert "NOT private" not in OpacusGaussian().description
    with pytest.raises(TypeError):
        OpacusGaussian(insecure_test_seed=True)


def test_noise_source_by_name():
    assert isinstance(noise_source("opendp"), OpenDPGaussian)
    assert isinstance(noise_source("opacus"), OpacusGaussian)
    with pytest.raises(ValueError, match="unknown noise source"):
        noise_source("numpy")


def test_opendp_errors_are_wrapped():
    with pytest.raises(NoiseFailed, match="OpenDP refused"):
        OpenDPGaussian().add(np.zeros(4, dtype=np.float32), l2_sensitivity=1e300, noise_multiplier=1e300)


def test_opendp_noise_weaker_than_claimed_is_refused_before_sampling(monkeypatch):
    original = dp.m.make_gaussian
    monkeypatch.setattr(dp.m, "make_gaussian", lambda *args, scale, **kw: original(*args, scale=scale / 2, **kw))
    with pytest.raises(NoiseFailed, match="privacy map"):
        OpenDPGaussian().add(np.zeros(4, dtype=np.float32), l2_sensitivity=1.0, noise_multiplier=1.0)


# ----------------------------------------------------------------------------------------- the wrapper


def test_dp_strategy_uses_the_strategys_sensitivity_times_the_multiplier():
    private = DPStrategy(trimmed_mean_strategy(0.2), noise_multiplier=1.5, norm_bound=2.0, noise=OpacusGaussian(insecure_test_seed=1))
    result = private.aggregate(accepted(5, 3_000))  # 5 − 2·1 kept → Δ = 2/3
    assert result.l2_sensitivity == pytest.approx(2 / 3)
    assert result.noise_std == pytest.approx(1.0)
    assert float(np.std(result.vector)) == pytest.approx(1.0, rel=0.08)
    assert "NOT private" in result.noise


def test_fedavg_with_equal_weights_gets_std_z_c_over_n():
    private = DPStrategy(FEDAVG, noise_multiplier=1.0, norm_bound=1.0, noise=OpacusGaussian(insecure_test_seed=1))
    assert private.aggregate(accepted(4, 10)).noise_std == pytest.approx(0.25)


def test_a_strategy_without_sensitivity_is_refused():
    custom = Strategy("krum", lambda updates: updates[0].vector, None)
    with pytest.raises(DPNotSupported, match="declares no L2 sensitivity"):
        DPStrategy(custom, noise_multiplier=1.0, norm_bound=1.0, noise=OpacusGaussian())


@pytest.mark.parametrize("bad", [float("nan"), 0.0, float("inf"), -1.0, 1])
def test_an_unusable_sensitivity_is_refused_before_aggregating(bad):
    def must_not_run(updates):
        raise AssertionError("aggregated despite a bad sensitivity")

    custom = Strategy("odd", must_not_run, lambda updates, bound: bad)
    private = DPStrategy(custom, noise_multiplier=1.0, norm_bound=1.0, noise=OpacusGaussian())
    with pytest.raises(DPNotSupported, match="unusable sensitivity"):
        private.aggregate(accepted(3, 4))


@pytest.mark.parametrize("field", ["noise_multiplier", "norm_bound"])
@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), True])
def test_dp_strategy_refuses_bad_parameters(field, bad):
    arguments = {"noise_multiplier": 1.0, "norm_bound": 1.0} | {field: bad}
    with pytest.raises(ValueError, match=field):
        DPStrategy(FEDAVG, noise=OpacusGaussian(), **arguments)


# ----------------------------------------------------------------------------------------- accountant


@pytest.mark.parametrize("multipliers", [[1.0], [1.0, 1.0, 1.0], [0.8, 1.2, 1.2]])
def test_epsilon_matches_opacus_rdp_accountant(multipliers):
    state = AccountantState()
    reference = RDPAccountant()
    for round_number, multiplier in enumerate(multipliers, start=1):
        state = charged(state, round_number, multiplier)
        reference.step(noise_multiplier=multiplier, sample_rate=1.0)
    assert state.history == tuple(reference.history)
    assert epsilon_spent(state, 1e-5) == pytest.approx(reference.get_epsilon(1e-5), rel=1e-12)


def test_empty_history_has_spent_nothing():
    assert epsilon_spent(AccountantState(), 1e-5) == 0.0


def test_plan_round_reports_before_this_round_after_and_left():
    contract = make_contract(PARENT, SITES, noise_multiplier=1.0, epsilon_per_round=10.0, epsilon_total=30.0)
    spend = plan_round(AccountantState(), contract)
    one_round = RDPAccountant()
    one_round.step(noise_multiplier=1.0, sample_rate=1.0)
    assert spend.before == 0.0
    assert spend.after == pytest.approx(one_round.get_epsilon(1e-5))
    assert spend.this_round == spend.after and spend.left == pytest.approx(30.0 - spend.after)
    assert spend.state_after.last_round == 1


def test_plan_round_refuses_over_the_total():
    contract = make_contract(PARENT, SITES, noise_multiplier=1.0, epsilon_per_round=5.0, epsilon_total=5.0)
    state = charged(AccountantState(), 1, 1.0)  # ε ≈ 4.7 already
    with pytest.raises(PrivacyBudgetExhausted, match="epsilon_total") as caught:
        plan_round(state, contract.model_copy(update={"round": 2}))
    assert caught.value.reason == "epsilon_total"


def test_plan_round_refuses_over_the_per_round_limit():
    contract = make_contract(PARENT, SITES, noise_multiplier=1.0, epsilon_per_round=1.0, epsilon_total=30.0)
    with pytest.raises(PrivacyBudgetExhausted, match="epsilon_per_round") as caught:
        plan_round(AccountantState(), contract)
    assert caught.value.reason == "epsilon_per_round"


def test_plan_round_refuses_a_round_that_is_not_after_the_last():
    contract = make_contract(PARENT, SITES, round=2)
    with pytest.raises(ValueError, match="not after the last round"):
        plan_round(charged(AccountantState(), 2, 1.0), contract)
    with pytest.raises(TypeError):
        plan_round({"history": []}, contract)


def test_accountant_state_round_trips_through_json():
    state = charged(charged(AccountantState(), 1, 1.0), 2, 0.9)
    assert AccountantState.model_validate_json(state.model_dump_json()) == state
