"""Released DP statistics are consistent after post-processing, at no extra ε (cvm/analyses/stats.py, cvm/run.py)."""

from __future__ import annotations

import pyarrow as pa

from cvm.analyses import PrivacyLoss, StatsRequest, run_dp_stats
from cvm.analyses.stats import POSTPROCESSING, _finish
from cvm.run import result_payload

EDGES = list(range(0, 200, 10))   # 21 bins + "(missing)", almost all of them empty in TABLE

PARAMS = {
    "max_rows": 1000,
    "queries": [
        {"kind": "count", "name": "rows"},
        {"kind": "sum", "name": "total", "column": "x", "bounds": [0, 10]},
        {"kind": "mean", "name": "mean_x", "column": "x", "bounds": [0, 10]},
        {"kind": "histogram", "name": "bins", "column": "x", "edges": EDGES},
        {"kind": "quantile", "name": "median_x", "column": "x", "bounds": [0, 10], "alpha": 0.5},
    ],
}
TABLE = pa.table({"x": pa.array([1.0, 2.0, 3.0], pa.float64())})


def test_each_clamp_on_raw_noisy_values():
    request = StatsRequest.from_params(PARAMS)
    count, total, mean, histogram, quantile = request.queries
    assert _finish(count, -7) == 0 and isinstance(_finish(count, -7), int)
    assert _finish(count, 12) == 12
    assert _finish(total, -55.0, request.max_rows) == 0.0
    assert _finish(total, 1e9, request.max_rows) == 10.0 * request.max_rows
    assert _finish(mean, (-40.0, 3)) == 0.0
    assert _finish(mean, (400.0, 3)) == 10.0
    assert _finish(mean, (12.0, -5)) == 10.0          # count floored at 1, then clamped
    bins = _finish(histogram, [-3, 4, *([-1] * (len(histogram.labels) - 2))])
    assert min(bins.values()) == 0 and bins[histogram.labels[1]] == 4
    assert all(isinstance(v, int) for v in bins.values())
    assert _finish(quantile, -2.5) == 0.0 and _finish(quantile, 11.0) == 10.0


def test_noisy_release_is_consistent_and_says_which_postprocessing_ran():
    # ε so small that the noise dwarfs every value: raw draws are negative and out of bounds all the time.
    result = run_dp_stats(TABLE, StatsRequest.from_params(PARAMS), PrivacyLoss(0.01, 0.0))
    assert isinstance(result["rows"].value, int) and result["rows"].value >= 0
    assert 0.0 <= result["total"].value <= 10.0 * PARAMS["max_rows"]
    assert 0.0 <= result["mean_x"].value <= 10.0
    assert 0.0 <= result["median_x"].value <= 10.0
    bins = result["bins"].value
    assert all(isinstance(v, int) and v >= 0 for v in bins.values())
    # about half of 20-odd empty bins drew a negative count, now released as 0 (chance all drew > 0: ~1e-6)
    assert 0 in bins.values()
    payload = result_payload(result)
    assert payload["postprocessing"] == [POSTPROCESSING[k] for k in ("count", "sum", "mean", "histogram",
                                                                     "quantile")]
    assert "clamp counts at 0 (integers)" in payload["postprocessing"]
