"""DP aggregate statistics (cvm/analyses/stats.py): accuracy within the stated noise, OpenDP's accounting, refusals."""

from __future__ import annotations

import math

import numpy as np
import opendp.prelude as dp
import pyarrow as pa
import pytest

from cvm.analyses import (
    BudgetTooSmall,
    CountQuery,
    HistogramQuery,
    MeanQuery,
    MissingBounds,
    PrivacyLoss,
    QuantileQuery,
    StatsRequest,
    SumQuery,
    run_dp_stats,
)
from cvm.analyses.cohorts import SITE_SIZES, generate_cohorts

# A draw further than this many noise scales from the truth has probability < 1e-8 (Gaussian and Laplace alike
# are below that at 20 scales; Gaussian alone at 6). Tests use 20 for Laplace and 6 for Gaussian.
GAUSSIAN_TAIL = 6.0
LAPLACE_TAIL = 20.0
ROWS = 200_000
SITES = tuple(SITE_SIZES)

PARAMS = {
    "max_rows": 2_000_000,
    "queries": [
        {"kind": "count", "name": "patients"},
        {"kind": "sum", "name": "events", "column": "mace_5y", "bounds": [0, 1]},
        {"kind": "mean", "name": "mean_sbp", "column": "sbp", "bounds": [80, 230]},
        {"kind": "histogram", "name": "age_bands", "column": "age", "edges": [40, 50, 60, 70, 80]},
        {"kind": "histogram", "name": "sites", "column": "site", "categories": list(SITES)},
        {"kind": "quantile", "name": "median_egfr", "column": "egfr", "bounds": [5, 140], "alpha": 0.5},
    ],
}


@pytest.fixture(scope="module")
def cohort() -> pa.Table:
    sizes = {site: n * ROWS // sum(SITE_SIZES.values()) for site, n in SITE_SIZES.items()}
    return pa.concat_tables(generate_cohorts(seed=11, sizes=sizes).values())


@pytest.fixture(scope="module")
def request_() -> StatsRequest:
    return StatsRequest.from_params(PARAMS)


def _truth(table: pa.Table) -> dict[str, object]:
    age = table.column("age").to_numpy()
    sites = table.column("site").to_pylist()
    bands = np.searchsorted([40, 50, 60, 70, 80], age, side="right")
    return {
        "patients": table.num_rows,
        "events": float(table.column("mace_5y").to_numpy().sum()),
        "mean_sbp": float(table.column("sbp").to_numpy().astype(np.float64).mean()),
        "age_bands": [int((bands == b).sum()) for b in range(6)] + [0],
        "sites": [sites.count(s) for s in SITES] + [0],
        "median_egfr": float(np.median(table.column("egfr").to_numpy())),
    }


def _assert_within_noise(result, truth, tail: float) -> None:
    count_scale = result["patients"].noise_scales[0]
    assert abs(result["patients"].value - truth["patients"]) <= tail * count_scale
    assert abs(result["events"].value - truth["events"]) <= tail * result["events"].noise_scales[0]
    sum_scale, mean_count_scale = result["mean_sbp"].noise_scales
    n = truth["patients"]
    mean_error = (tail * sum_scale + truth["mean_sbp"] * tail * mean_count_scale) / (n - tail * mean_count_scale)
    assert abs(result["mean_sbp"].value - truth["mean_sbp"]) <= mean_error
    for name in ("age_bands", "sites"):
        released = list(result[name].value.values())
        assert len(released) == len(truth[name])
        for got, want in zip(released, truth[name]):
            assert abs(got - want) <= tail * result[name].noise_scales[0]
    # The exponential mechanism's rank error here is a few hundred rows out of 200k: well under 1 mL/min.
    assert abs(result["median_egfr"].value - truth["median_egfr"]) <= 1.0


def test_run_dp_stats_zcdp_results_within_noise_of_truth(cohort, request_):
    result = run_dp_stats(cohort, request_, PrivacyLoss(1.0, 1e-6))
    assert result.measure == "zCDP"
    assert [r.name for r in result.results] == [q["name"] for q in PARAMS["queries"]]
    assert list(result["sites"].value) == [*SITES, "(other)"]
    assert list(result["age_bands"].value)[0] == "< 40" and list(result["age_bands"].value)[-1] == "(missing)"
    _assert_within_noise(result, _truth(cohort), GAUSSIAN_TAIL)


def test_run_dp_stats_pure_dp_results_within_noise_of_truth(cohort, request_):
    result = run_dp_stats(cohort, request_, PrivacyLoss(1.0, 0.0))
    assert result.measure == "pure-DP"
    _assert_within_noise(result, _truth(cohort), LAPLACE_TAIL)


def test_run_dp_stats_zcdp_accounting_is_opendps_composition_and_conversion(cohort, request_):
    budget = PrivacyLoss(1.5, 1e-6)
    result = run_dp_stats(cohort, request_, budget)
    # Composition: the queries' ρ add up (basic composition of zCDP, as OpenDP's make_composition states).
    assert result.composed_loss == pytest.approx(sum(r.loss for r in result.results), rel=1e-9)
    # Conversion: OpenDP's zCDP -> (ε, δ) of that ρ, rebuilt here independently from a Gaussian with ρ = 1/(2σ²).
    sigma = math.sqrt(1.0 / (2.0 * result.composed_loss))
    probe = dp.m.make_gaussian(dp.atom_domain(T=float, nan=False), dp.absolute_distance(T=float), scale=sigma)
    assert probe.map(1.0) == pytest.approx(result.composed_loss, rel=1e-6)
    epsilon, delta = dp.c.make_fix_delta(dp.c.make_zCDP_to_approxDP(probe), delta=budget.delta).map(1.0)
    assert result.spent.epsilon == pytest.approx(epsilon, rel=1e-6)
    assert result.spent.delta == delta == budget.delta
    # Calibrated to the budget: within it, and not wastefully below it.
    assert 0.99 * budget.epsilon <= result.spent.epsilon <= budget.epsilon


def test_run_dp_stats_pure_dp_epsilons_add_up_to_spent(cohort, request_):
    budget = PrivacyLoss(0.8, 0.0)
    result = run_dp_stats(cohort, request_, budget)
    assert result.spent.delta == 0.0
    assert result.spent.epsilon == pytest.approx(sum(r.loss for r in result.results), rel=1e-9)
    assert result.spent.epsilon == pytest.approx(result.composed_loss, rel=1e-12)
    assert 0.99 * budget.epsilon <= result.spent.epsilon <= budget.epsilon


def test_run_dp_stats_smaller_budget_means_more_noise(cohort):
    request = StatsRequest(queries=(CountQuery("n"),), max_rows=ROWS)
    loose = run_dp_stats(cohort, request, PrivacyLoss(2.0, 0.0))["n"].noise_scales[0]
    tight = run_dp_stats(cohort, request, PrivacyLoss(0.5, 0.0))["n"].noise_scales[0]
    assert tight == pytest.approx(4 * loose, rel=0.01)  # Laplace scale = sensitivity / ε


def test_run_dp_stats_missing_and_unknown_values_land_in_their_own_bin():
    values = [10.0] * 3000 + [None] * 2000 + [float("nan")] * 1000
    colours = ["red"] * 3000 + ["blue"] * 2000 + [None] * 1000
    table = pa.table({"x": pa.array(values, pa.float64()), "colour": pa.array(colours, pa.string())})
    request = StatsRequest(
        queries=(HistogramQuery("x", "x", edges=(0.0, 20.0)), HistogramQuery("c", "colour", categories=("red",))),
        max_rows=10_000,
    )
    result = run_dp_stats(table, request, PrivacyLoss(1.0, 1e-6))
    tail = GAUSSIAN_TAIL * result["x"].noise_scales[0]
    assert abs(result["x"].value["[0, 20)"] - 3000) <= tail
    assert abs(result["x"].value["(missing)"] - 3000) <= tail
    assert abs(result["c"].value["red"] - 3000) <= tail
    assert abs(result["c"].value["(other)"] - 3000) <= tail


@pytest.mark.parametrize(
    "query",
    [
        {"kind": "sum", "name": "q", "column": "sbp"},
        {"kind": "mean", "name": "q", "column": "sbp"},
        {"kind": "quantile", "name": "q", "column": "sbp", "alpha": 0.5},
        {"kind": "histogram", "name": "q", "column": "sbp"},
        {"kind": "sum", "name": "q", "column": "sbp", "bounds": None},
    ],
)
def test_from_params_missing_bounds_refused(query):
    with pytest.raises(MissingBounds, match="'q'"):
        StatsRequest.from_params({"max_rows": 10, "queries": [query]})


def test_queries_missing_bounds_refused_when_built_directly():
    with pytest.raises(MissingBounds):
        SumQuery("s", "sbp")
    with pytest.raises(MissingBounds):
        MeanQuery("m", "sbp")
    with pytest.raises(MissingBounds):
        QuantileQuery("q", "sbp")
    with pytest.raises(MissingBounds):
        HistogramQuery("h", "sbp")
    assert SumQuery("s", "sbp", bounds=(80, 230)).bounds == (80.0, 230.0)


def test_run_dp_stats_budget_no_noise_can_meet_refused(cohort, request_):
    for budget in (PrivacyLoss(1e-15, 1e-300), PrivacyLoss(1e-15, 0.0), PrivacyLoss(0.0, 0.0)):
        with pytest.raises(BudgetTooSmall):
            run_dp_stats(cohort, request_, budget)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"max_rows": 10, "queries": []}, "at least one query"),
        ({"max_rows": 10, "queries": [{"kind": "median", "name": "q"}]}, "unknown query kind"),
        ({"max_rows": 10, "queries": [{"kind": "count", "name": "a"}, {"kind": "count", "name": "a"}]}, "unique"),
        ({"max_rows": 0, "queries": [{"kind": "count", "name": "a"}]}, "max_rows"),
        ({"max_rows": 10, "queries": [{"kind": "count", "name": "a", "colour": "x"}]}, "unexpected keyword"),
        ({"max_rows": 10, "queries": [{"kind": "sum", "name": "s", "column": "x", "bounds": [5, 1]}]}, "lower bound"),
        ({"max_rows": 10, "queries": [{"kind": "histogram", "name": "h", "column": "x", "edges": [2, 1]}]}, "increasing"),
        ({"max_rows": 10, "queries": [{"kind": "histogram", "name": "h", "column": "x", "edges": [1], "categories": [1]}]}, "not both"),
        ({"max_rows": 10, "queries": [{"kind": "histogram", "name": "h", "column": "x", "categories": [1, "a"]}]}, "all str or all int"),
        ({"max_rows": 10, "queries": [{"kind": "quantile", "name": "q", "column": "x", "bounds": [0, 1], "alpha": 2}]}, "alpha"),
        ({"max_rows": 10, "queries": [{"kind": "sum", "name": "s", "column": "x", "bounds": [0, math.inf]}]}, "finite"),
    ],
)
def test_from_params_bad_request_refused(params, message):
    with pytest.raises(ValueError, match=message):
        StatsRequest.from_params(params)


def test_run_dp_stats_table_mismatch_refused(cohort):
    budget = PrivacyLoss(1.0, 1e-6)
    with pytest.raises(ValueError, match="no column 'weight'"):
        run_dp_stats(cohort, StatsRequest((SumQuery("s", "weight", bounds=(0, 1)),), max_rows=ROWS), budget)
    with pytest.raises(ValueError, match="not numeric"):
        run_dp_stats(cohort, StatsRequest((SumQuery("s", "site", bounds=(0, 1)),), max_rows=ROWS), budget)
    with pytest.raises(ValueError, match="categories do not match"):
        run_dp_stats(cohort, StatsRequest((HistogramQuery("h", "site", categories=(1, 2)),), max_rows=ROWS), budget)
    with pytest.raises(ValueError, match="max_rows"):
        run_dp_stats(cohort, StatsRequest((CountQuery("n"),), max_rows=ROWS // 2), budget)
    with pytest.raises(TypeError):
        run_dp_stats(cohort.to_pydict(), StatsRequest((CountQuery("n"),), max_rows=ROWS), budget)


@pytest.mark.parametrize(("epsilon", "delta"), [(-1e-9, 0.0), (-1.0, 0.0), (math.inf, 0.0), (1.0, 1.0), (1.0, -0.1)])
def test_privacy_loss_bad_values_refused(epsilon, delta):
    with pytest.raises(ValueError):
        PrivacyLoss(epsilon, delta)


def test_privacy_loss_non_numbers_refused():
    with pytest.raises(TypeError):
        PrivacyLoss(True, 0.0)
    with pytest.raises(TypeError):
        PrivacyLoss("1.0", 0.0)
