"""Differentially private analyses that run inside the analysis CVM (DESIGN.md §6 step 5).

- ``run_dp_stats``: counts, sums, means, histograms and quantiles with OpenDP, composed and accounted
  by OpenDP (``stats``).
- ``run_dp_sgd``: logistic regression or a small MLP trained with Opacus DP-SGD (``dpsgd``).
- ``OutputGate``: refuses any output but the manifest's type, over the manifest's (ε, δ), or shaped like
  records (``gate``).
- ``generate_site`` / ``generate_cohorts``: the demo's synthetic cardio-renal cohorts, owner side (``cohorts``).

Exceptions::

    AnalysisError                 outcomes of an analysis
    ├── OutputRefused(reason)     the gate refused to let a result leave the CVM
    └── BudgetTooSmall            no noise level meets the privacy budget; nothing was computed
    ValueError                    caller mistakes (bad parameters, unknown columns)
    └── MissingBounds             a query or feature lacks the public bounds the manifest must declare
    TypeError                     caller mistakes (wrong argument types)
"""

from cvm.analyses.cohorts import (
    FEATURE_BOUNDS,
    FEATURES,
    GROUND_TRUTH,
    OUTCOME,
    SITE_SIZES,
    generate_cohorts,
    generate_site,
    write_parquet,
)
from cvm.analyses.errors import (
    AnalysisError,
    BudgetTooSmall,
    MissingBounds,
    OutputRefused,
)
from cvm.analyses.gate import OutputGate
from cvm.analyses.loss import PrivacyLoss
from cvm.analyses.stats import (
    CountQuery,
    HistogramQuery,
    MeanQuery,
    QuantileQuery,
    QueryResult,
    StatsRequest,
    StatsResult,
    SumQuery,
    run_dp_stats,
)

__all__ = [
    "FEATURES",
    "FEATURE_BOUNDS",
    "GROUND_TRUTH",
    "OUTCOME",
    "SITE_SIZES",
    "AnalysisError",
    "BudgetTooSmall",
    "CountQuery",
    "DPModel",
    "HistogramQuery",
    "MeanQuery",
    "MissingBounds",
    "OutputGate",
    "OutputRefused",
    "PrivacyLoss",
    "QuantileQuery",
    "QueryResult",
    "StatsRequest",
    "StatsResult",
    "SumQuery",
    "TrainingRun",
    "TrainingSpec",
    "generate_cohorts",
    "generate_site",
    "run_dp_sgd",
    "run_dp_stats",
    "write_parquet",
]

# DP-SGD needs torch and Opacus (seconds to import); load them only when a DP-SGD name is first used, so that
# statistics-only studies and the owners' tools start fast.
_DPSGD_NAMES = frozenset({"DPModel", "TrainingRun", "TrainingSpec", "run_dp_sgd"})


def __getattr__(name: str):
    if name in _DPSGD_NAMES:
        from cvm.analyses import dpsgd

        return getattr(dpsgd, name)
    raise AttributeError(f"module 'cvm.analyses' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _DPSGD_NAMES)
