"""The output gate (cvm/analyses/gate.py): each rule refuses its bad case and lets the good case through."""

from __future__ import annotations

import types

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pytest
import torch

import cvm.analyses
from cvm.analyses import (
    CountQuery,
    HistogramQuery,
    OutputGate,
    OutputRefused,
    PrivacyLoss,
    StatsRequest,
    run_dp_stats,
)
from cvm.analyses.dpsgd import DPModel

ROWS = 2_000  # the gate refuses any dimension of 200 (a tenth of the records) or more


@dataclass(frozen=True)
class FakeResult:
    output_type: str = "aggregate_stats"
    spent: PrivacyLoss = PrivacyLoss(1.0, 1e-6)
    payload: object = field(default_factory=dict)


def _gate(output_type: str = "aggregate_stats", epsilon: float = 1.5, delta: float = 1e-6) -> OutputGate:
    return OutputGate(output_type, epsilon, delta, input_rows=ROWS)


def _model(spent: PrivacyLoss) -> DPModel:
    return DPModel(
        architecture="logistic",
        hidden_units=32,
        feature_bounds={"age": (18.0, 95.0)},
        weights={"weight": np.zeros((1, 1), np.float32), "bias": np.zeros(1, np.float32)},
        spent=spent,
        accountant="prv",
        noise_multiplier=1.0,
        sample_rate=0.1,
        steps=10,
        max_grad_norm=1.0,
        noise_source="seeded for tests: NOT private",
    )


@pytest.fixture(scope="module")
def stats_result():
    table = pa.table({"colour": ["red"] * 1500 + ["blue"] * 500})
    request = StatsRequest((CountQuery("n"), HistogramQuery("c", "colour", categories=("red", "blue"))), max_rows=ROWS)
    return run_dp_stats(table, request, PrivacyLoss(1.0, 1e-6))


def test_release_stats_result_within_manifest_released(stats_result):
    assert _gate().release(stats_result) is stats_result


def test_release_model_within_manifest_released():
    model = _model(PrivacyLoss(1.49, 1e-6))
    assert _gate("model_weights").release(model) is model


def test_release_stats_result_over_manifest_epsilon_refused(stats_result):
    with pytest.raises(OutputRefused, match="epsilon spent .* exceeds the manifest's limit 0.5") as refused:
        _gate(epsilon=0.5).release(stats_result)
    assert refused.value.reason.startswith("epsilon spent")


def test_release_over_manifest_delta_refused(stats_result):
    with pytest.raises(OutputRefused, match="delta spent .* exceeds"):
        _gate(delta=1e-7).release(stats_result)


def test_release_wrong_output_type_refused(stats_result):
    with pytest.raises(OutputRefused, match="'aggregate_stats' differs from the manifest's 'model_weights'"):
        _gate("model_weights").release(stats_result)
    with pytest.raises(OutputRefused, match="'model_weights' differs"):
        _gate().release(_model(PrivacyLoss(1.0, 1e-6)))
    with pytest.raises(OutputRefused, match="'row_level' differs"):
        _gate().release(FakeResult(output_type="row_level"))
    with pytest.raises(OutputRefused, match="None differs"):
        _gate().release(object())


def test_release_without_accounting_refused():
    with pytest.raises(OutputRefused, match="no privacy accounting"):
        _gate().release(FakeResult(spent=None))


@pytest.mark.parametrize(
    ("payload", "where"),
    [
        (np.zeros((ROWS, 3)), "result.payload"),
        (np.zeros((3, int(0.8 * ROWS))), "result.payload"),  # the train split, transposed
        (torch.zeros(ROWS // 10), "result.payload"),
        (list(range(ROWS)), "result.payload"),
        ({"weights": np.zeros(ROWS // 5)}, "result.payload[value #0]"),
        ({f"patient-{i}": 1 for i in range(ROWS)}, "result.payload"),
        (bytes(ROWS), "result.payload"),
        ([[0.0] * ROWS], "result.payload[0]"),
    ],
)
def test_release_per_record_shaped_payload_refused(payload, where):
    with pytest.raises(OutputRefused, match="per-record shaped output") as refused:
        _gate().release(FakeResult(payload=payload))
    assert refused.value.reason.startswith(where + " has")
    assert "patient-" not in refused.value.reason  # refusals never echo data


@pytest.mark.parametrize("table", [pa.table({"a": [1]}), pa.table({"a": [1]}).to_batches()[0], pa.array([1])])
def test_release_arrow_data_refused_whatever_its_size(table):
    with pytest.raises(OutputRefused, match="row-level data never leaves"):
        _gate().release(FakeResult(payload={"rows": table}))


def test_release_uninspectable_content_refused():
    with pytest.raises(OutputRefused, match="cannot inspect"):
        _gate().release(FakeResult(payload=torch.nn.Linear(2, 1)))
    with pytest.raises(OutputRefused, match="cannot inspect"):
        _gate().release(FakeResult(payload={1, 2}))


def test_release_small_aggregates_released():
    payload = {"hist": np.zeros(199), "weights": torch.zeros(32, 10), "digest": bytes(32), "n": np.int64(5), "label": "x" * 500}
    result = FakeResult(payload=payload)
    assert _gate().release(result) is result


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        (("row_level", 1.0, 1e-6), {"input_rows": ROWS}),
        (("aggregate_stats", -1.0, 1e-6), {"input_rows": ROWS}),
        (("aggregate_stats", 1.0, 1.0), {"input_rows": ROWS}),
        (("aggregate_stats", 1.0, 1e-6), {"input_rows": 0}),
    ],
)
def test_output_gate_bad_manifest_values_refused(args, kwargs):
    with pytest.raises(ValueError):
        OutputGate(*args, **kwargs)


def test_package_all_is_the_public_surface():
    # submodules become attributes of the package once anything imports them: they are not its surface
    submodules = {name for name, value in vars(cvm.analyses).items() if isinstance(value, types.ModuleType)}
    public = {name for name in dir(cvm.analyses) if not name.startswith("_")} - submodules
    assert set(cvm.analyses.__all__) == public
    assert all(hasattr(cvm.analyses, name) for name in cvm.analyses.__all__)
