"""Differentially private aggregate statistics over the joined cohort, with OpenDP.

Spec: DESIGN.md §6 step 5 (the analysis named in the manifest runs; only a DP aggregate leaves) and the
OpenDP 0.16 framework API (transformations, measurements, combinators).

Privacy unit: one patient = one row of the joined table. Neighbouring tables differ by adding or removing
one row: OpenDP's ``SymmetricDistance`` with ``d_in = 1``.

How a request runs:

1. Each query becomes one OpenDP measurement on the table: a column selector (ours, see below), then
   OpenDP's clamp / sum / count / count-by-categories and OpenDP's noise (``make_noise``: Gaussian under
   zCDP when the budget has δ > 0, Laplace under pure DP when δ = 0; integer outputs get the discrete
   versions), or OpenDP's private quantile (exponential mechanism over candidates).
2. The queries are composed with ``make_composition`` (their losses add). With δ > 0 the composed zCDP
   measurement is converted to (ε, δ) by ``make_zCDP_to_approxDP`` and ``make_fix_delta`` at the budget's δ.
3. Every query gets noise of ``s × its sensitivity`` (as OpenDP's stability map states it; a quantile's
   exponential mechanism gets scale ``s`` on its rank scores), with one shared multiplier ``s``: the
   smallest one for which OpenDP's own ``check`` accepts the composed release against the budget.

The (ε, δ) reported as spent is the composed measurement's privacy map at ``d_in = 1``, from OpenDP.
Bounds (clamp ranges, bin edges, categories) are public parameters from the measured manifest; they are
never inferred from the data, and a query without them is refused (``MissingBounds``).

OpenDP features enabled here, process-wide, and why:

- ``contrib``: the transformations, measurements and combinators above live behind it.
- ``honest-but-curious``: the column selector is a user transformation, because OpenDP's own dataframe
  transformations are deprecated in favour of Polars, which the project does not ship. The selector is a
  row-wise map from the table to one column, hence 1-stable under SymmetricDistance, and it cannot fail on
  data (nulls and NaN become the lower bound or the "missing" bin; unknown categories the "other" bin).

``floating-point`` (renamed ``idealized-numerics``) is deliberately NOT enabled: OpenDP 0.16 samples float
noise exactly (discretised) and its float sums account for rounding error, so nothing idealised is assumed.
Noise comes from OpenDP's own cryptographically secure sampler; it cannot be seeded.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal, Union

import numpy as np
import opendp.prelude as dp
import pyarrow as pa
import pyarrow.compute as pc

from cvm.analyses.errors import BudgetTooSmall, MissingBounds
from cvm.analyses.loss import PrivacyLoss

dp.enable_features("contrib", "honest-but-curious")

# The noise multiplier search: a geometric bisection between these multipliers until they are within
# 0.1 % of each other. OpenDP's binary_search_param runs to full float precision instead, and each
# zCDP→(ε, δ) check costs tens of milliseconds.
_MULTIPLIER_RANGE = (2.0**-20, 2.0**40)
_MULTIPLIER_TOLERANCE = 1.001
_QUANTILE_CANDIDATES = 1001

_TABLE_DOMAIN = dp.user_domain("sealroom.cvm.analyses.ArrowTable", member=lambda x: isinstance(x, pa.Table))
_ROWS = dp.symmetric_distance()
_FLOATS = dp.vector_domain(dp.atom_domain(T=float, nan=False))
_INTS = dp.vector_domain(dp.atom_domain(T=dp.i64))


# ----------------------------------------------------------------------------------------- queries


def _bounds(name: str, bounds: object) -> tuple[float, float]:
    if bounds is None:
        raise MissingBounds(f"query {name!r} has no bounds; declare them in the manifest")
    if not isinstance(bounds, Sequence) or isinstance(bounds, str) or len(bounds) != 2:
        raise TypeError(f"query {name!r}: bounds must be a (lower, upper) pair")
    lower, upper = (_finite(name, "bound", value) for value in bounds)
    if not lower < upper:
        raise ValueError(f"query {name!r}: lower bound must be below the upper bound")
    return lower, upper


def _finite(name: str, what: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"query {name!r}: {what} must be a number")
    if not math.isfinite(value):
        raise ValueError(f"query {name!r}: {what} must be finite")
    return float(value)


@dataclass(frozen=True)
class _Query:
    name: str

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError("every query needs a non-empty name")


@dataclass(frozen=True)
class _ColumnQuery(_Query):
    column: str

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.column, str) or not self.column:
            raise ValueError(f"query {self.name!r} needs a column")


@dataclass(frozen=True)
class _BoundedQuery(_ColumnQuery):
    bounds: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "bounds", _bounds(self.name, self.bounds))


@dataclass(frozen=True)
class CountQuery(_Query):
    """Number of rows (patients) in the joined table."""

    kind: ClassVar[str] = "count"


@dataclass(frozen=True)
class SumQuery(_BoundedQuery):
    """Sum of ``column`` after clamping each value to ``bounds``."""

    kind: ClassVar[str] = "sum"


@dataclass(frozen=True)
class MeanQuery(_BoundedQuery):
    """Mean of ``column`` clamped to ``bounds``: a DP sum divided by a DP count (both composed)."""

    kind: ClassVar[str] = "mean"


@dataclass(frozen=True)
class QuantileQuery(_BoundedQuery):
    """The ``alpha``-quantile of ``column``, chosen among ``candidates`` evenly spaced points of ``bounds``."""

    kind: ClassVar[str] = "quantile"
    alpha: float = 0.5
    candidates: int = _QUANTILE_CANDIDATES

    def __post_init__(self) -> None:
        super().__post_init__()
        alpha = _finite(self.name, "alpha", self.alpha)
        if not 0 <= alpha <= 1:
            raise ValueError(f"query {self.name!r}: alpha must be in [0, 1]")
        object.__setattr__(self, "alpha", alpha)
        if isinstance(self.candidates, bool) or not isinstance(self.candidates, int) or self.candidates < 2:
            raise ValueError(f"query {self.name!r}: candidates must be an int of at least 2")


@dataclass(frozen=True)
class HistogramQuery(_ColumnQuery):
    """Counts per bin of ``column``: bins cut at numeric ``edges``, or one bin per value in ``categories``.

    Numeric bins: ``< e0``, ``[e0, e1)``, …, ``>= ek``, then ``(missing)`` for null/NaN.
    Categorical bins: one per category, then ``(other)`` for any other value or null.
    """

    kind: ClassVar[str] = "histogram"
    edges: tuple[float, ...] | None = None
    categories: tuple[str | int, ...] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.edges is None and self.categories is None:
            raise MissingBounds(f"histogram {self.name!r} needs edges or categories from the manifest")
        if self.edges is not None and self.categories is not None:
            raise ValueError(f"histogram {self.name!r}: give edges or categories, not both")
        if self.edges is not None:
            edges = tuple(_finite(self.name, "edge", edge) for edge in self.edges)
            if not edges or any(a >= b for a, b in zip(edges, edges[1:])):
                raise ValueError(f"histogram {self.name!r}: edges must be non-empty and strictly increasing")
            object.__setattr__(self, "edges", edges)
        else:
            categories = tuple(self.categories)
            kinds = {type(c) for c in categories}
            if not categories or len(set(categories)) != len(categories) or kinds not in ({str}, {int}):
                raise ValueError(f"histogram {self.name!r}: categories must be unique, non-empty, all str or all int")
            object.__setattr__(self, "categories", categories)

    @property
    def labels(self) -> tuple[str, ...]:
        """Names of the released bins, in order."""
        if self.edges is not None:
            inner = [f"[{a:g}, {b:g})" for a, b in zip(self.edges, self.edges[1:])]
            return (f"< {self.edges[0]:g}", *inner, f">= {self.edges[-1]:g}", "(missing)")
        return (*(str(c) for c in self.categories), "(other)")


Query = Union[CountQuery, SumQuery, MeanQuery, QuantileQuery, HistogramQuery]
_QUERY_TYPES: Mapping[str, type] = {q.kind: q for q in (CountQuery, SumQuery, MeanQuery, QuantileQuery, HistogramQuery)}


@dataclass(frozen=True)
class StatsRequest:
    """The DP statistics an analysis releases, as declared in the manifest's ``analysis.params``.

    ``max_rows`` is a public upper bound on the joined table's row count (the sealed envelopes publish
    their row counts); OpenDP's float sums account for rounding error up to that many rows.
    """

    queries: tuple[Query, ...]
    max_rows: int

    def __post_init__(self) -> None:
        queries = tuple(self.queries)
        if not queries:
            raise ValueError("a stats request needs at least one query")
        if not all(isinstance(q, tuple(_QUERY_TYPES.values())) for q in queries):
            raise TypeError("queries must be CountQuery, SumQuery, MeanQuery, QuantileQuery or HistogramQuery")
        names = [q.name for q in queries]
        if len(set(names)) != len(names):
            raise ValueError("query names must be unique")
        if isinstance(self.max_rows, bool) or not isinstance(self.max_rows, int) or self.max_rows < 1:
            raise ValueError("max_rows must be a positive int")
        object.__setattr__(self, "queries", queries)

    @classmethod
    def from_params(cls, params: Mapping[str, object]) -> StatsRequest:
        """Parse ``{"max_rows": N, "queries": [{"kind": ..., "name": ..., ...}, ...]}`` from a manifest."""
        if not isinstance(params, Mapping):
            raise TypeError("params must be a mapping")
        raw_queries = params.get("queries")
        if not isinstance(raw_queries, Sequence) or isinstance(raw_queries, str):
            raise ValueError("params need a list of queries")
        queries = []
        for raw in raw_queries:
            if not isinstance(raw, Mapping):
                raise TypeError("each query must be a mapping")
            fields = dict(raw)
            kind = fields.pop("kind", None)
            if kind not in _QUERY_TYPES:
                raise ValueError(f"unknown query kind {kind!r}; expected one of {sorted(_QUERY_TYPES)}")
            for key in ("bounds", "edges", "categories"):
                if fields.get(key) is not None:
                    fields[key] = tuple(fields[key])
            try:
                queries.append(_QUERY_TYPES[kind](**fields))
            except TypeError as error:  # unexpected or missing field names
                raise ValueError(f"query {fields.get('name')!r}: {error}") from None
        return cls(queries=tuple(queries), max_rows=params.get("max_rows"))


# ----------------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class QueryResult:
    """One released statistic.

    ``noise_scales``: the scale of each noise draw behind ``value`` (a mean has two: sum, then count).
    ``loss``: this query's share of the budget in the composition's measure (ρ under zCDP, ε under pure DP).
    """

    name: str
    kind: str
    value: float | int | Mapping[str, int]
    noise_scales: tuple[float, ...]
    loss: float


@dataclass(frozen=True)
class StatsResult:
    """The released statistics and what they cost.

    ``measure`` is ``"zCDP"`` (Gaussian noise; ``composed_loss`` is ρ) or ``"pure-DP"`` (Laplace noise;
    ``composed_loss`` is ε). ``spent`` is OpenDP's (ε, δ) for the whole composition.
    """

    output_type: ClassVar[str] = "aggregate_stats"
    results: tuple[QueryResult, ...]
    spent: PrivacyLoss
    measure: Literal["zCDP", "pure-DP"]
    composed_loss: float
    postprocessing: tuple[str, ...] = ()   # what made the noisy values consistent (no extra ε): POSTPROCESSING

    def __getitem__(self, name: str) -> QueryResult:
        for result in self.results:
            if result.name == name:
                return result
        raise KeyError(name)


# ----------------------------------------------------------------------------------------- OpenDP plan


def _numeric_column(column: str, fill: float) -> dp.Transformation:
    def select(table: pa.Table) -> np.ndarray:
        values = table.column(column).cast(pa.float64()).fill_null(fill).to_numpy()
        return np.where(np.isnan(values), fill, values)

    return dp.t.make_user_transformation(_TABLE_DOMAIN, _ROWS, _FLOATS, _ROWS, function=select, stability_map=lambda d_in: d_in)


def _bin_column(query: HistogramQuery) -> dp.Transformation:
    other = len(query.labels) - 1

    def select(table: pa.Table) -> np.ndarray:
        values = table.column(query.column)
        if query.edges is not None:
            numbers = values.cast(pa.float64()).fill_null(math.nan).to_numpy()
            bins = np.searchsorted(np.asarray(query.edges), numbers, side="right")
            return np.where(np.isnan(numbers), other, bins).astype(np.int64)
        indices = pc.index_in(values, value_set=pa.array(query.categories)).fill_null(other)
        return indices.to_numpy().astype(np.int64)

    return dp.t.make_user_transformation(_TABLE_DOMAIN, _ROWS, _INTS, _ROWS, function=select, stability_map=lambda d_in: d_in)


def _all_rows() -> dp.Transformation:
    def select(table: pa.Table) -> np.ndarray:
        return np.zeros(table.num_rows, dtype=np.int64)

    return dp.t.make_user_transformation(_TABLE_DOMAIN, _ROWS, _INTS, _ROWS, function=select, stability_map=lambda d_in: d_in)


@dataclass(frozen=True)
class _Plan:
    """How each query becomes an OpenDP measurement, for one measure and one noise multiplier."""

    pure_dp: bool
    max_rows: int
    multiplier: float

    @property
    def measure(self) -> dp.Measure:
        return dp.max_divergence() if self.pure_dp else dp.zero_concentrated_divergence()

    def noisy(self, transformation: dp.Transformation) -> tuple[dp.Measurement, float]:
        scale = self.multiplier * transformation.map(1)
        return transformation >> dp.m.then_noise(self.measure, scale=scale), scale

    def count(self, selector: dp.Transformation) -> tuple[dp.Measurement, float]:
        return self.noisy(selector >> dp.t.then_count(TO=dp.i64))

    def clamped_sum(self, query: SumQuery | MeanQuery) -> tuple[dp.Measurement, float]:
        summed = (
            _numeric_column(query.column, query.bounds[0])
            >> dp.t.then_clamp(query.bounds)
            >> dp.t.make_bounded_float_checked_sum(size_limit=self.max_rows, bounds=query.bounds, S="Pairwise<f64>")
        )
        return self.noisy(summed)

    def measurement(self, query: Query) -> tuple[dp.Measurement, tuple[float, ...]]:
        """The query's measurement and the scale of each noise draw inside it."""
        if isinstance(query, CountQuery):
            counted, scale = self.count(_all_rows())
            return counted, (scale,)
        if isinstance(query, SumQuery):
            summed, scale = self.clamped_sum(query)
            return summed, (scale,)
        if isinstance(query, MeanQuery):
            summed, sum_scale = self.clamped_sum(query)
            counted, count_scale = self.count(_numeric_column(query.column, query.bounds[0]))
            return dp.c.make_composition([summed, counted]), (sum_scale, count_scale)
        if isinstance(query, QuantileQuery):
            clamped = _numeric_column(query.column, query.bounds[0]) >> dp.t.then_clamp(query.bounds)
            candidates = np.linspace(*query.bounds, query.candidates).tolist()
            chosen = clamped >> dp.m.then_private_quantile(
                self.measure, candidates=candidates, alpha=query.alpha, scale=self.multiplier
            )
            return chosen, (self.multiplier,)
        # One row moves one bin count by one: L1 sensitivity for Laplace, L2 for Gaussian.
        bin_metric = dp.L1Distance[dp.i64] if self.pure_dp else dp.L2Distance[dp.i64]
        counts = _bin_column(query) >> dp.t.then_count_by_categories(
            categories=list(range(len(query.labels))), null_category=False, MO=bin_metric, TOA=dp.i64
        )
        binned, scale = self.noisy(counts)
        return binned, (scale,)


# Post-processing of the noisy releases, at no extra ε (DP is closed under post-processing): each released value is
# made consistent with what it measures. Named, so that the payload says which ran.
POSTPROCESSING = {
    "count": "clamp counts at 0 (integers)",
    "histogram": "clamp histogram bins at 0 (integers)",
    "sum": "clamp sums into [rows bound x lower, rows bound x upper] of the declared bounds",
    "mean": "clamp means into the declared bounds (count floored at 1)",
    "quantile": "clamp quantiles into the declared bounds",
}


def _clamp(value: float, lower: float, upper: float) -> float:
    return float(min(max(value, lower), upper))


def _finish(query: Query, raw: object, max_rows: int = 0) -> float | int | Mapping[str, int]:
    """The released value of ``query`` from its noisy output, post-processed (:data:`POSTPROCESSING`)."""
    if isinstance(query, MeanQuery):
        noisy_sum, noisy_count = raw
        return _clamp(noisy_sum / max(noisy_count, 1), *query.bounds)
    if isinstance(query, HistogramQuery):
        return dict(zip(query.labels, (max(int(c), 0) for c in raw)))
    if isinstance(query, CountQuery):
        return max(int(raw), 0)
    if isinstance(query, QuantileQuery):
        return _clamp(raw, *query.bounds)
    if isinstance(query, SumQuery) and max_rows:
        lower, upper = query.bounds
        return _clamp(raw, min(0.0, lower) * max_rows, max(0.0, upper) * max_rows)
    return raw


def postprocessing_applied(request: StatsRequest) -> tuple[str, ...]:
    """The post-processing steps that ran on ``request``'s releases, in the order of first use."""
    return tuple(dict.fromkeys(POSTPROCESSING[query.kind] for query in request.queries))


def _composed(plan: _Plan, request: StatsRequest) -> tuple[dp.Measurement, list[tuple[dp.Measurement, tuple[float, ...]]]]:
    parts = [plan.measurement(query) for query in request.queries]
    return dp.c.make_composition([measurement for measurement, _ in parts]), parts


def _in_budget_measure(composition: dp.Measurement, budget: PrivacyLoss) -> tuple[dp.Measurement, object]:
    """The measurement whose privacy map is (ε, δ) (or ε when δ = 0), and the matching ``d_out``."""
    if budget.delta == 0:
        return composition, budget.epsilon
    approx = dp.c.make_fix_delta(dp.c.make_zCDP_to_approxDP(composition), delta=budget.delta)
    return approx, (budget.epsilon, budget.delta)


def _smallest_multiplier(fits: Callable[[float], bool]) -> float:
    lower, upper = _MULTIPLIER_RANGE
    if not fits(upper):
        raise BudgetTooSmall("no noise level fits the privacy budget; raise ε or ask fewer queries")
    if fits(lower):
        return lower
    while upper / lower > _MULTIPLIER_TOLERANCE:
        middle = math.sqrt(lower * upper)
        lower, upper = (lower, middle) if fits(middle) else (middle, upper)
    return upper


def _check_columns(table: pa.Table, request: StatsRequest) -> None:
    # Schema and row count are public (the sealed envelopes carry both), so refusing on them leaks nothing.
    if table.num_rows > request.max_rows:
        raise ValueError(f"the table has more rows than the manifest's max_rows ({request.max_rows})")
    for query in request.queries:
        if isinstance(query, CountQuery):
            continue
        if query.column not in table.column_names:
            raise ValueError(f"query {query.name!r}: no column {query.column!r} in the table")
        column_type = table.schema.field(query.column).type
        numeric = pa.types.is_integer(column_type) or pa.types.is_floating(column_type)
        if isinstance(query, HistogramQuery) and query.categories is not None:
            wants_str = isinstance(query.categories[0], str)
            matches = pa.types.is_string(column_type) if wants_str else pa.types.is_integer(column_type)
            if not matches:
                raise ValueError(f"query {query.name!r}: categories do not match column type {column_type}")
        elif not numeric:
            raise ValueError(f"query {query.name!r}: column {query.column!r} is not numeric ({column_type})")


def run_dp_stats(table: pa.Table, request: StatsRequest, budget: PrivacyLoss) -> StatsResult:
    """Release every query of ``request`` over ``table`` within ``budget`` (see the module docstring).

    Raises ``BudgetTooSmall`` when no noise level fits the budget (nothing is computed then).
    """
    if not isinstance(table, pa.Table):
        raise TypeError("table must be a pyarrow.Table")
    if not isinstance(request, StatsRequest) or not isinstance(budget, PrivacyLoss):
        raise TypeError("request must be a StatsRequest and budget a PrivacyLoss")
    _check_columns(table, request)
    pure_dp = budget.delta == 0

    def fits(multiplier: float) -> bool:
        composition, _ = _composed(_Plan(pure_dp, request.max_rows, multiplier), request)
        release, d_out = _in_budget_measure(composition, budget)
        try:
            return release.check(1, d_out)
        except dp.OpenDPException as error:
            if error.variant == "Overflow":  # a loss too large to represent is certainly over budget
                return False
            raise

    composition, parts = _composed(_Plan(pure_dp, request.max_rows, _smallest_multiplier(fits)), request)
    release, _ = _in_budget_measure(composition, budget)
    raw_outputs = release(table)
    spent = release.map(1)
    results = tuple(
        QueryResult(name=query.name, kind=query.kind, value=_finish(query, raw, request.max_rows), noise_scales=scales, loss=part.map(1))
        for query, (part, scales), raw in zip(request.queries, parts, raw_outputs)
    )
    return StatsResult(
        results=results,
        spent=PrivacyLoss(spent, 0.0) if pure_dp else PrivacyLoss(*spent),
        measure="pure-DP" if pure_dp else "zCDP",
        composed_loss=composition.map(1),
        postprocessing=postprocessing_applied(request),
    )
