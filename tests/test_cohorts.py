"""Synthetic cardio-renal cohorts (cvm/analyses/cohorts.py): schema, determinism, covariate shift, ground truth."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cvm.analyses.cohorts import (
    FEATURE_BOUNDS,
    FEATURES,
    GROUND_TRUTH,
    OUTCOME,
    SITE_COLUMN,
    SITE_SIZES,
    SITES,
    generate_cohorts,
    generate_site,
    write_parquet,
)
from cvm.analyses.dpsgd import roc_auc

N = 40_000


@pytest.fixture(scope="module")
def cohorts() -> dict[str, pa.Table]:
    return generate_cohorts(seed=1, sizes={site: N for site in SITES})


def test_site_sizes_are_the_demos_five_owners_and_total_1_6_million():
    assert list(SITE_SIZES) == ["EU-West", "EU-North", "US-East", "APAC", "CH"]
    assert sum(SITE_SIZES.values()) == 1_600_000


def test_generate_site_schema_and_bounds(cohorts):
    table = cohorts["EU-West"]
    assert table.column_names == [SITE_COLUMN, *FEATURES, OUTCOME]
    assert table.num_rows == N
    assert table.column(SITE_COLUMN).to_pylist() == ["EU-West"] * N
    for name, (low, high) in FEATURE_BOUNDS.items():
        values = table.column(name).to_numpy()
        assert table.column(name).null_count == 0
        assert low <= values.min() and values.max() <= high, name
    for flag in ("sex_male", "smoker", "diabetes", "prior_cvd", OUTCOME):
        assert set(np.unique(table.column(flag).to_numpy())) <= {0, 1}


def test_generate_site_is_deterministic_per_seed_and_site():
    first = generate_site("CH", 500, seed=3)
    assert first.equals(generate_site("CH", 500, seed=3))
    assert not first.column("age").equals(generate_site("CH", 500, seed=4).column("age"))
    assert not first.column("age").equals(generate_site("APAC", 500, seed=3).column("age"))


def test_sites_differ_in_covariates_not_in_risk_model(cohorts):
    def mean(site: str, column: str) -> float:
        return float(cohorts[site].column(column).to_numpy().mean())

    assert mean("US-East", "bmi") - mean("APAC", "bmi") > 4.0
    assert mean("CH", "age") - mean("APAC", "age") > 6.0
    assert mean("APAC", "smoker") - mean("EU-North", "smoker") > 0.08
    # Same P(outcome | covariates) everywhere: the ground-truth risk is calibrated at every site.
    for table in cohorts.values():
        columns = {name: table.column(name).to_numpy() for name in FEATURES}
        expected_rate = GROUND_TRUTH.risk(columns).mean()
        observed_rate = table.column(OUTCOME).to_numpy().mean()
        assert abs(observed_rate - expected_rate) < 0.01


def test_outcome_follows_the_ground_truth_model(cohorts):
    table = pa.concat_tables(cohorts.values())
    columns = {name: table.column(name).to_numpy() for name in FEATURES}
    outcome = table.column(OUTCOME).to_numpy()
    assert 0.08 < outcome.mean() < 0.18
    assert roc_auc(GROUND_TRUTH.risk(columns), outcome) > 0.72
    # The outcome depends on what the model says it does: smokers have more events, all else drawn alike.
    smokers = columns["smoker"] == 1
    assert outcome[smokers].mean() > outcome[~smokers].mean()


def test_write_parquet_round_trips(tmp_path, cohorts):
    path = tmp_path / "eu-west.parquet"
    write_parquet(cohorts["EU-West"].slice(0, 1000), path)
    assert pq.read_table(path).equals(cohorts["EU-West"].slice(0, 1000))


def test_generate_site_bad_arguments_refused():
    with pytest.raises(ValueError, match="unknown site"):
        generate_site("Mars", 10, seed=0)
    with pytest.raises(ValueError, match="at least 1"):
        generate_site("CH", 0, seed=0)
    with pytest.raises(TypeError):
        generate_site("CH", True, seed=0)
