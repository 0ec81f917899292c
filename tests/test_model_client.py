"""The released model's payload names its inputs (cvm/run.py), and the client's model (compose/model.py) scores rows
by column name exactly as the CVM's code path does; an unverified receipt is refused."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from auditor.report import LinkResult, LinkStatus, VerificationReport
from compose import model as client_model
from cvm.analyses.dpsgd import (
    STANDARDISATION,
    TrainingSpec,
    model_from_payload,
    prepare_features,
    run_dp_sgd,
    scores,
)
from cvm.analyses.loss import PrivacyLoss
from cvm.run import result_payload

BOUNDS = {"income": (10_000.0, 200_000.0), "debt_ratio": (0.0, 2.0), "age_years": (18.0, 90.0)}


def credit_table(rows: int, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    income = rng.lognormal(np.log(55_000), 0.5, rows)
    debt = rng.gamma(2.0, 0.2, rows)
    age = rng.uniform(18, 90, rows)
    logit = -1.0 - 1.5 * (income - 60_000) / 30_000 + 2.5 * (debt - 0.4) / 0.3 - 0.4 * (age - 45) / 15
    defaulted = (rng.uniform(size=rows) < 1 / (1 + np.exp(-logit))).astype(np.int64)
    return pa.table({"income": income, "debt_ratio": debt, "age_years": age, "defaulted": defaulted})


@pytest.fixture(scope="module", params=["logistic", "mlp"])
def trained(request):
    spec = TrainingSpec(features=BOUNDS, label="defaulted", model=request.param, hidden_units=4, epochs=1,
                        batch_size=256, learning_rate=0.05)
    run = run_dp_sgd(credit_table(2_000, 1), spec, PrivacyLoss(2.0, 1e-5), insecure_test_seed=5)
    return spec, run, result_payload(run.model)


def test_the_payload_names_features_in_order_with_bounds_and_standardisation(trained):
    spec, run, payload = trained
    assert [f["name"] for f in payload["features"]] == ["income", "debt_ratio", "age_years"]
    assert [f["bounds"] for f in payload["features"]] == [list(b) for b in BOUNDS.values()]
    assert all(f["standardisation"] == STANDARDISATION for f in payload["features"])
    assert payload["label"] == "defaulted" and payload["architecture"] == spec.model
    assert payload["released_metrics"] == []          # no held-out metric leaves the CVM
    if spec.model == "logistic":
        assert "hidden_units" not in payload
    else:
        assert payload["hidden_units"] == 4
    assert run.held_out_auc is None and run.held_out_rows == 0 and run.train_rows == 2_000   # nothing kept back


def test_the_clients_predictions_match_the_cvm_code_path(trained):
    spec, run, payload = trained
    rows = credit_table(50, 9)
    cvm_logits = scores(run.model.module(), prepare_features(rows, spec))      # what the CVM computes
    released = client_model.payload_model(payload)
    np.testing.assert_allclose(released.logits(rows), cvm_logits, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(released.predict_proba(rows), 1 / (1 + np.exp(-cvm_logits.astype(np.float64))),
                               rtol=1e-6, atol=1e-7)
    # columns are taken by name: another order, extra columns and a dict of columns score the same
    shuffled = rows.select(["defaulted", "age_years", "income", "debt_ratio"])
    np.testing.assert_array_equal(released.predict_proba(shuffled), released.predict_proba(rows))
    as_dict = {name: rows.column(name).to_pylist() for name in ("age_years", "debt_ratio", "income")}
    np.testing.assert_allclose(released.predict_proba(as_dict), released.predict_proba(rows), rtol=1e-12)
    with pytest.raises(ValueError, match="income"):
        released.predict_proba({"debt_ratio": [0.1], "age_years": [30]})
    with pytest.raises(TypeError):
        released.predict_proba(np.zeros((3, 3)))


def test_a_logistic_payload_scores_like_its_formula():
    """An independent reading of the payload: sigmoid(w · standardised x + b), by hand."""
    spec = TrainingSpec(features=BOUNDS, label="defaulted", epochs=1, batch_size=256)
    run = run_dp_sgd(credit_table(1_000, 2), spec, PrivacyLoss(2.0, 1e-5), insecure_test_seed=6)
    payload = result_payload(run.model)
    rows = credit_table(20, 3)
    x = np.stack([2 * (np.clip(rows.column(f["name"]).to_numpy(), *f["bounds"]) - f["bounds"][0])
                  / (f["bounds"][1] - f["bounds"][0]) - 1 for f in payload["features"]], axis=1)
    w, b = np.array(payload["weights"]["weight"]["values"]), payload["weights"]["bias"]["values"][0]
    np.testing.assert_allclose(client_model.payload_model(payload).predict_proba(rows), 1 / (1 + np.exp(-(x @ w + b))),
                               rtol=1e-5, atol=1e-6)
    assert model_from_payload(payload).feature_bounds == BOUNDS


def _report(ok: bool) -> VerificationReport:
    link = LinkResult(number=1, name="quote", check="the quote verifies",
                      status=LinkStatus.OK if ok else LinkStatus.FAILED, summary="",
                      reason=None if ok else "bad quote")
    return VerificationReport(links=(link,), simulated=True, verified_at=0)


def test_load_model_verifies_first_and_refuses_an_unverified_receipt(trained, monkeypatch):
    _, _, payload = trained
    receipt = {"envelope": {"payload": payload}}
    seen = {}

    def fake_verify(document, **pins):
        seen.update(pins)
        return _report(seen.get("kms_root") == "0xpinned")

    monkeypatch.setattr(client_model, "verify_receipt", fake_verify)
    with pytest.raises(client_model.ReceiptNotVerified, match="link 1 \\(quote\\): bad quote"):
        client_model.load_model(receipt, now=1, chain=None)
    loaded = client_model.load_model(receipt, now=1, chain=None, kms_root="0xpinned")
    assert loaded.features == ("income", "debt_ratio", "age_years") and seen["now"] == 1
    stats = client_model.load_model({"envelope": {"payload": {"output_type": "aggregate_stats", "results": [
        {"name": "n", "kind": "count", "value": 7}, {"name": "h", "kind": "histogram", "value": {"a": 1, "b": 0}}]}}},
        now=1, chain=None, kms_root="0xpinned")
    assert stats.to_pylist() == [{"name": "n", "kind": "count", "bin": None, "value": 7.0},
                                 {"name": "h", "kind": "histogram", "bin": "a", "value": 1.0},
                                 {"name": "h", "kind": "histogram", "bin": "b", "value": 0.0}]
