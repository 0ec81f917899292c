"""The parameter schemas of the analyses: what a manifest's ``analysis.params`` may hold, per analysis kind.

One closed, strict schema per kind (unknown settings, wrong types, non-finite and out-of-range values are
refused, each with the field named):

- ``dp_stats``: :class:`StatsParams`, the ``max_rows`` bound and the queries that ``cvm.analyses.stats`` runs;
- ``dp_sgd``: :class:`TrainingParams`, the features with their bounds, the label and the training settings of
  ``cvm.analyses.dpsgd``;
- ``fed_round``: the round contract, ``cvm.federated.round_contract.RoundContract`` (already a closed schema).

The schemas are at least as strict as the analyses' own parsers (``StatsRequest.from_params``,
``TrainingSpec.from_params``), and ``tests/test_spend_guards.py`` holds them to it: parameters accepted here are
accepted there, inside the CVM, after ε is spent. A parsed schema also says what the analysis needs from its
inputs (:meth:`StatsParams.column_needs`: each column, the type it must have, the manifest field that names
it; :attr:`StatsParams.max_rows`) and how large its released result is along its largest dimension
(``output_extent``, for the output gate's per-record rule). With the sealed envelopes' public schemas and row
counts, ``compose.manifest.check_inputs_against_manifest`` refuses a run that could not succeed before any
budget is spent.

Pure: no I/O, no randomness; pydantic and the standard library, plus the gate's constant.

Exceptions: :class:`ParamsInvalid` (a ``ValueError``), whose ``problems`` name every field refused.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from cvm.analyses.gate import PER_RECORD_FRACTION

__all__ = [
    "ColumnNeed",
    "ParamsInvalid",
    "StatsParams",
    "TrainingParams",
    "column_type_fits",
    "gate_max_dimension",
    "parse_params",
]

# How each kind of column requirement reads the recorded Arrow type (``str(pyarrow.DataType)``), exactly as
# the analyses test it: stats wants pa.types.is_integer / is_floating (and is_string for string categories);
# DP-SGD casts features and label to float64, which numbers and booleans survive.
_INTEGER_TYPES = frozenset({"int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"})
_FLOAT_TYPES = frozenset({"halffloat", "float", "double"})
_ACCEPTED_TYPES = {
    "numeric": _INTEGER_TYPES | _FLOAT_TYPES,
    "integer": _INTEGER_TYPES,
    "string": frozenset({"string"}),
    "numeric or boolean": _INTEGER_TYPES | _FLOAT_TYPES | {"bool"},
}
ColumnKind = Literal["numeric", "integer", "string", "numeric or boolean"]


class ParamsInvalid(ValueError):
    """The params break their kind's schema. ``problems``: (field path, reason) pairs; ``field``: the first."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        self.field = problems[0][0]
        super().__init__("; ".join(f"{field}: {reason}" for field, reason in problems))


@dataclass(frozen=True)
class ColumnNeed:
    """A column the analysis reads: its ``name``, the type it must have, and the manifest ``field`` naming it."""

    name: str
    kind: ColumnKind
    field: str


def column_type_fits(arrow_type: str, kind: ColumnKind) -> bool:
    """Whether a column of recorded type ``arrow_type`` (``str(pyarrow.DataType)``) is what ``kind`` asks for."""
    return arrow_type in _ACCEPTED_TYPES[kind]


def gate_max_dimension(input_rows: int) -> int:
    """The largest dimension the output gate lets out for ``input_rows`` records (``OutputGate.max_dimension``)."""
    return math.ceil(PER_RECORD_FRACTION * input_rows) - 1


# ----------------------------------------------------------------------------------------- the schemas

_Name = Annotated[str, Field(min_length=1)]
_Number = Annotated[float, Field(allow_inf_nan=False)]


def _ordered(value: list[float]) -> list[float]:
    if not value[0] < value[1]:
        raise ValueError("must be [lower, upper] with lower < upper")
    return value


# A public [lower, upper] range (clamp bounds, feature bounds): never inferred from the data.
_Pair = Annotated[list[_Number], Field(min_length=2, max_length=2), AfterValidator(_ordered)]


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class CountParams(_Closed):
    """``{"kind": "count", "name"}``: the number of rows."""

    kind: Literal["count"]
    name: _Name


class _ColumnParams(_Closed):
    name: _Name
    column: _Name


class _BoundedParams(_ColumnParams):
    bounds: _Pair = Field(description="the public clamp range [lower, upper]; never inferred from the data")


class SumParams(_BoundedParams):
    """``{"kind": "sum", "name", "column", "bounds"}``."""

    kind: Literal["sum"]


class MeanParams(_BoundedParams):
    """``{"kind": "mean", "name", "column", "bounds"}``."""

    kind: Literal["mean"]


class QuantileParams(_BoundedParams):
    """``{"kind": "quantile", "name", "column", "bounds", "alpha" = 0.5, "candidates" = 1001}``."""

    kind: Literal["quantile"]
    alpha: _Number = Field(default=0.5, ge=0, le=1)
    candidates: int = Field(default=1001, ge=2)


class HistogramParams(_ColumnParams):
    """``{"kind": "histogram", "name", "column"}`` and either numeric ``edges`` or ``categories`` (all str or all int)."""

    kind: Literal["histogram"]
    edges: list[_Number] | None = Field(default=None, min_length=1)
    # JsonValue, checked below: a str | int union would name its branches in error paths.
    categories: list[JsonValue] | None = Field(default=None, min_length=1)

    @field_validator("edges")
    @classmethod
    def _increasing(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and any(a >= b for a, b in zip(value, value[1:])):
            raise ValueError("edges must be strictly increasing")
        return value

    @field_validator("categories")
    @classmethod
    def _categories(cls, value: list[Any] | None) -> list[Any] | None:
        if value is None:
            return None
        kinds = {type(item) for item in value}
        if kinds not in ({str}, {int}):
            raise ValueError("categories must be all strings or all integers")
        if len(set(value)) != len(value):
            raise ValueError("categories must be unique")
        return value

    @model_validator(mode="after")
    def _edges_or_categories(self) -> HistogramParams:
        if (self.edges is None) == (self.categories is None):
            raise ValueError("give either edges or categories (the public bins), exactly one of them")
        return self

    @property
    def bins(self) -> int:
        """How many counts the histogram releases (``HistogramQuery.labels``)."""
        return len(self.edges) + 2 if self.edges is not None else len(self.categories) + 1


_QUERY_SCHEMAS: Mapping[str, type[_Closed]] = {
    "count": CountParams, "sum": SumParams, "mean": MeanParams, "quantile": QuantileParams,
    "histogram": HistogramParams,
}
Query = CountParams | SumParams | MeanParams | QuantileParams | HistogramParams


class StatsParams(_Closed):
    """``dp_stats`` params: ``{"max_rows": N, "queries": [...]}`` (``cvm.analyses.stats.StatsRequest``).

    ``max_rows`` is a public upper bound on the joined table's rows; the envelopes' row counts must fit in it.
    """

    kind: ClassVar[str] = "dp_stats"
    max_rows: int = Field(ge=1)
    queries: tuple[Query, ...]

    @classmethod
    def parse(cls, params: Mapping[str, Any], where: str) -> StatsParams:
        problems: list[tuple[str, str]] = []
        raw_queries = params.get("queries")
        top = {key: value for key, value in params.items() if key != "queries"}
        try:
            _TopLevel.model_validate(top)
        except ValidationError as error:
            problems += _problems(error, where, cls)
        queries: list[Query] = []
        if not isinstance(raw_queries, list) or not raw_queries:
            problems.append((f"{where}.queries", "required: a non-empty list of queries"
                             if raw_queries is None else "must be a non-empty list of queries"))
            raw_queries = []
        for index, raw in enumerate(raw_queries):
            here = f"{where}.queries[{index}]"
            if not isinstance(raw, dict):
                problems.append((here, "must be an object with a kind and a name"))
                continue
            kind = raw.get("kind")
            schema = _QUERY_SCHEMAS.get(kind) if isinstance(kind, str) else None  # a list or object is unhashable
            if schema is None:
                problems.append((f"{here}.kind", f"unknown query kind {raw.get('kind')!r}; expected one of "
                                                 f"{', '.join(sorted(_QUERY_SCHEMAS))}"))
                continue
            try:
                queries.append(schema.model_validate(raw))  # type: ignore[arg-type]
            except ValidationError as error:
                problems += _problems(error, here, schema)
        names = [query.name for query in queries]
        for index, query in enumerate(queries):
            if names.index(query.name) != index:
                problems.append((f"{where}.queries[{index}].name", f"query name {query.name!r} is used twice"))
        if problems:
            raise ParamsInvalid(problems)
        return cls(max_rows=params["max_rows"], queries=tuple(queries))

    def column_needs(self, where: str) -> tuple[ColumnNeed, ...]:
        needs = []
        for index, query in enumerate(self.queries):
            if isinstance(query, CountParams):
                continue
            kind: ColumnKind = "numeric"
            if isinstance(query, HistogramParams) and query.categories is not None:
                kind = "string" if isinstance(query.categories[0], str) else "integer"
            needs.append(ColumnNeed(query.column, kind, f"{where}.queries[{index}].column"))
        return tuple(needs)

    def output_extent(self) -> int:
        """The largest dimension of the released ``StatsResult``: queries, histogram bins, noise draws per query."""
        draws = 2 if any(isinstance(query, MeanParams) for query in self.queries) else 1
        bins = [query.bins for query in self.queries if isinstance(query, HistogramParams)]
        return max(len(self.queries), draws, *bins)


class _TopLevel(_Closed):
    """The non-query part of the dp_stats params, checked on its own so that each problem is named."""

    max_rows: int = Field(ge=1)


class TrainingParams(_Closed):
    """``dp_sgd`` params (``cvm.analyses.dpsgd.TrainingSpec``): features → [low, high], a 0/1 label, settings."""

    kind: ClassVar[str] = "dp_sgd"
    features: dict[_Name, _Pair] = Field(min_length=1)
    label: _Name
    model: Literal["logistic", "mlp"] = "logistic"
    hidden_units: int = Field(default=32, ge=1)
    epochs: int = Field(default=3, ge=1)
    batch_size: int = Field(default=8192, ge=1)
    learning_rate: _Number = Field(default=0.05, gt=0)
    max_grad_norm: _Number = Field(default=1.0, gt=0)
    # rows kept back from training to score the model inside the CVM; 0 = none. The score is not covered by ε
    # and is never released (no metric leaves the CVM).
    held_out_fraction: _Number = Field(default=0.0, ge=0, lt=1)

    @field_validator("label")
    @classmethod
    def _label_not_a_feature(cls, value: str, info: ValidationInfo) -> str:
        if value in (info.data.get("features") or {}):
            raise ValueError(f"label {value!r} must not also be a feature")
        return value

    @classmethod
    def parse(cls, params: Mapping[str, Any], where: str) -> TrainingParams:
        try:
            return cls.model_validate(dict(params))
        except ValidationError as error:
            raise ParamsInvalid(_problems(error, where, cls)) from None

    def column_needs(self, where: str) -> tuple[ColumnNeed, ...]:
        needs = [ColumnNeed(column, "numeric or boolean", f"{where}.features.{column}") for column in self.features]
        return (*needs, ColumnNeed(self.label, "numeric or boolean", f"{where}.label"))

    def output_extent(self) -> int:
        """The largest dimension of the released ``DPModel``: features, hidden units, weight tensors, bound pairs."""
        if self.model == "logistic":   # weight (1, F), bias (1,)
            return max(len(self.features), 2)
        return max(len(self.features), self.hidden_units, 4)   # (H, F), (H,), (1, H), (1,)

    @property
    def max_rows(self) -> None:
        """DP-SGD declares no row bound."""
        return None


def parse_params(kind: str, params: Mapping[str, Any], *, where: str = "analysis.params") -> Any:
    """Validate ``params`` against the schema of analysis ``kind``; return the parsed schema or raise ``ParamsInvalid``.

    ``where`` prefixes every field path in the messages (``analysis.params.queries[1].column``). ``fed_round``
    returns a ``RoundContract`` (torch-free to parse, but its package imports the federated stack).
    """
    if not isinstance(params, Mapping):
        raise ParamsInvalid([(where, "must be an object")])
    if kind == "dp_stats":
        return StatsParams.parse(params, where)
    if kind == "dp_sgd":
        return TrainingParams.parse(params, where)
    if kind == "fed_round":
        from cvm.federated.round_contract import RoundContract

        try:
            return RoundContract.from_params(params)
        except ValidationError as error:
            raise ParamsInvalid(_problems(error, where, RoundContract)) from None
    raise ParamsInvalid([(where.rpartition(".")[0] + ".kind", f"unknown analysis kind {kind!r}")])


def _problems(error: ValidationError, where: str, schema: type[BaseModel] | None = None) -> list[tuple[str, str]]:
    """pydantic's errors as (field path, reason), in words a manifest author can act on."""
    problems = []
    # Unknown settings first: a misspelt key also makes the right one "missing", and the typo is the news.
    for item in sorted(error.errors(), key=lambda item: item["type"] != "extra_forbidden"):
        path = where
        for part in item["loc"]:
            path += f"[{part}]" if isinstance(part, int) else f".{part}"
        if item["type"] == "extra_forbidden":
            known = sorted(schema.model_fields) if schema is not None else []
            guess = difflib.get_close_matches(str(item["loc"][-1]), known, n=1)
            reason = "unknown setting" + (f" (did you mean {guess[0]!r}?)" if guess else "")
            reason += f"; known settings: {', '.join(known)}" if known else ""
        elif item["type"] == "missing":
            reason = "required setting is missing"
        else:
            reason = item["msg"].removeprefix("Value error, ")
            if "input" in item and not isinstance(item["input"], (dict, list)):
                reason += f" (got {item['input']!r})"
        problems.append((path, reason))
    return problems
