"""The federated task's central evaluation: the reference cohort's digest, its strata, its refusals."""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from cvm.aggregator import check_reference
from cvm.analyses.cohorts import generate_site, write_parquet
from cvm.analyses.dpsgd import prepare_features, roc_auc
from cvm.federated import AccountantState, run_round
from cvm.federated.task import (
    NUM_PARAMETERS,
    TASK,
    ReferenceCohort,
    ReferenceCohortInvalid,
)
from tests.test_fed_support import make_contract, make_sites, signed

SITES = ("EU-West", "APAC")
# A plausible risk direction: older, higher blood pressure, prior CVD (weights on [-1, 1]-scaled features).
RISKY = np.array([1.0, 0.2, 0.6, -0.3, 0.3, 0.1, 0.4, 0.4, 0.2, 0.8, -1.0], dtype="<f4")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    path = tmp_path_factory.mktemp("reference") / "reference.parquet"
    write_parquet(pa.concat_tables([generate_site(site, 3_000, seed=11) for site in SITES]), path)
    return path


def test_the_cohort_is_named_by_the_sha256_of_its_bytes_and_split_by_site(reference):
    cohort = ReferenceCohort.load(reference)
    assert cohort.sha256 == hashlib.sha256(reference.read_bytes()).hexdigest()
    assert sorted(cohort.strata) == sorted(SITES) and len(cohort.everyone) == 6_000


def test_the_scores_are_the_auc_on_the_cohort_and_on_each_site(reference):
    evaluation = ReferenceCohort.load(reference).evaluate(RISKY)
    table = pq.read_table(reference)
    logits = lambda data: data.x.numpy() @ RISKY[:-1] + RISKY[-1]  # noqa: E731
    everyone = prepare_features(table, TASK)
    assert evaluation.quality == pytest.approx(roc_auc(logits(everyone), everyone.y.numpy()), abs=1e-6)
    for site in SITES:
        part = prepare_features(table.filter(pc.equal(table["site"], site)), TASK)
        assert evaluation.per_site[site] == pytest.approx(roc_auc(logits(part), part.y.numpy()), abs=1e-6)
    assert evaluation.quality > 0.65 > ReferenceCohort.load(reference).evaluate(-RISKY).quality


def test_a_round_with_a_reference_cohort_records_its_metrics(reference):
    cohort = ReferenceCohort.load(reference)
    sites = make_sites(3)
    parent = np.zeros(NUM_PARAMETERS, dtype="<f4")
    contract = make_contract(parent, sites, min_participants=3, evaluation_sha256=cohort.sha256)
    updates = [signed(site, contract, ((0.2 + 0.01 * i) * RISKY).astype("<f4")) for i, site in enumerate(sites)]
    weights, record, _ = run_round(contract, parent, updates, now=0.0, accountant_state=AccountantState(),
                                   evaluate=cohort.evaluate)
    after, before = cohort.evaluate(weights), cohort.evaluate(parent)
    m = record.metrics
    assert (m.global_quality, m.parent_global_quality) == (after.quality, before.quality)
    assert (m.per_site_min, m.per_site_max) == (min(after.per_site.values()), max(after.per_site.values()))
    drops = {site: before.per_site[site] - after.per_site[site] for site in SITES}
    assert m.worst_site_regression.site == max(drops, key=drops.get)
    assert m.worst_site_regression.regression == pytest.approx(max(drops.values()))


def test_the_aggregator_takes_only_the_cohort_the_contract_names(reference):
    sha256 = ReferenceCohort.load(reference).sha256
    parent = np.zeros(NUM_PARAMETERS, dtype="<f4")
    named = make_contract(parent, make_sites(2), evaluation_sha256=sha256)
    check_reference(named, sha256)
    check_reference(make_contract(parent, make_sites(2)), None)
    with pytest.raises(ValueError, match=f"not the {sha256} the round contract names"):
        check_reference(named, "0" * 64)
    with pytest.raises(ValueError, match="pass that file with --evaluation"):
        check_reference(named, None)
    with pytest.raises(ValueError, match="names no reference cohort"):
        check_reference(make_contract(parent, make_sites(2)), sha256)


def test_a_cohort_that_cannot_score_a_model_is_refused(tmp_path):
    not_parquet = tmp_path / "reference.parquet"
    not_parquet.write_bytes(b"PAR1 but not really")
    with pytest.raises(ReferenceCohortInvalid, match="not a reference cohort for this task"):
        ReferenceCohort.load(not_parquet)
    table = generate_site("CH", 500, seed=1)
    without_label = tmp_path / "no-label.parquet"
    write_parquet(table.drop_columns(["mace_5y"]), without_label)
    with pytest.raises(ReferenceCohortInvalid, match="columns not in the table"):
        ReferenceCohort.load(without_label)
    one_outcome = tmp_path / "one-outcome.parquet"
    healthy = table.filter(pc.equal(table["mace_5y"], 0))
    write_parquet(pa.concat_tables([healthy, generate_site("APAC", 500, seed=1)]), one_outcome)
    with pytest.raises(ReferenceCohortInvalid, match="stratum 'CH' needs both outcomes"):
        ReferenceCohort.load(one_outcome)
