"""The output gate: the last check before a result leaves the CVM (DESIGN.md §6 step 5).

A result may leave only if

1. its ``output_type`` is the manifest's (``aggregate_stats``, ``model_weights`` or ``round_record``;
   a row-level output can never be declared, so it is never released);
2. its accounted ``spent`` (ε, δ) is within the manifest's limits;
3. nothing inside it is record-shaped: no Arrow table or array at all, and no array, list, mapping or
   bytes with a dimension of a tenth of the input records or more. That bound catches the whole table,
   the train and held-out splits, and any large subset, while an aggregate (a histogram, a weight matrix)
   is orders of magnitude smaller.

The gate inspects the result itself (dataclass fields, mappings, sequences, numpy arrays, torch
tensors) and refuses any content it cannot inspect: it fails closed. It takes plain values; the caller
supplies them from the measured StudyManifest (``output_type``, ``epsilon``, ``delta``) and from the sealed
envelopes' public row counts.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Iterator, Mapping
from typing import Protocol, TypeVar

import numpy as np
import pyarrow as pa

from cvm.analyses.errors import OutputRefused
from cvm.analyses.loss import PrivacyLoss

OUTPUT_TYPES = ("aggregate_stats", "model_weights", "round_record")
# A piece of output with this fraction of the input records (or more) along any dimension is refused.
PER_RECORD_FRACTION = 0.1

_LEAVES = (str, int, float, bool, type(None), np.integer, np.floating, np.bool_)
_ROW_LEVEL_ARROW = (pa.Table, pa.RecordBatch, pa.Array, pa.ChunkedArray)


class _Accounted(Protocol):
    epsilon: float
    delta: float


class Releasable(Protocol):
    """What the gate needs from a result: its declared type and its accounted privacy loss."""

    output_type: str
    spent: _Accounted


Result = TypeVar("Result", bound=Releasable)


def _dimensions(value: object, path: str) -> Iterator[tuple[str, int]]:
    """Yield (where, size) for every sized piece of ``value``; refuse what cannot be inspected."""
    if isinstance(value, _ROW_LEVEL_ARROW):
        raise OutputRefused(f"{path} is an Arrow {type(value).__name__}: row-level data never leaves")
    if isinstance(value, _LEAVES):
        return
    # A torch tensor can only exist if torch was imported: the gate does not import it for its own sake.
    torch = sys.modules.get("torch")
    if isinstance(value, np.ndarray) or (torch is not None and isinstance(value, torch.Tensor)):
        for size in value.shape:
            yield path, int(size)
    elif isinstance(value, (bytes, bytearray)):
        yield path, len(value)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for field in dataclasses.fields(value):
            yield from _dimensions(getattr(value, field.name), f"{path}.{field.name}")
    elif isinstance(value, Mapping):
        yield path, len(value)
        # Entries are named by position: a key could be data, and refusals must not echo data.
        for index, (key, item) in enumerate(value.items()):
            yield from _dimensions(key, f"{path}[key #{index}]")
            yield from _dimensions(item, f"{path}[value #{index}]")
    elif isinstance(value, (list, tuple)):
        yield path, len(value)
        for index, item in enumerate(value):
            yield from _dimensions(item, f"{path}[{index}]")
    else:
        raise OutputRefused(f"{path} is a {type(value).__name__}, which the gate cannot inspect")


class OutputGate:
    """Refuses anything but the manifest's output type within the manifest's (ε, δ) and without records.

    ``input_rows`` is the number of input records (the sum of the sealed envelopes' row counts).
    """

    def __init__(self, manifest_output_type: str, epsilon_limit: float, delta_limit: float, *, input_rows: int) -> None:
        if manifest_output_type not in OUTPUT_TYPES:
            raise ValueError(f"manifest output type must be one of {OUTPUT_TYPES}, not {manifest_output_type!r}")
        if isinstance(input_rows, bool) or not isinstance(input_rows, int) or input_rows < 1:
            raise ValueError("input_rows must be a positive int")
        self.output_type = manifest_output_type
        self.limit = PrivacyLoss(epsilon_limit, delta_limit)
        self.max_dimension = math.ceil(PER_RECORD_FRACTION * input_rows) - 1

    def release(self, result: Result) -> Result:
        """Return ``result`` unchanged if it may leave the CVM; raise ``OutputRefused(reason)`` otherwise."""
        declared = getattr(result, "output_type", None)
        if declared != self.output_type:
            raise OutputRefused(f"output type {declared!r} differs from the manifest's {self.output_type!r}")
        spent = getattr(result, "spent", None)
        epsilon, delta = getattr(spent, "epsilon", None), getattr(spent, "delta", None)
        if not all(isinstance(v, float) and math.isfinite(v) for v in (epsilon, delta)):
            raise OutputRefused("the result carries no privacy accounting")
        if epsilon > self.limit.epsilon:
            raise OutputRefused(f"epsilon spent {epsilon} exceeds the manifest's limit {self.limit.epsilon}")
        if delta > self.limit.delta:
            raise OutputRefused(f"delta spent {delta} exceeds the manifest's limit {self.limit.delta}")
        for where, size in _dimensions(result, "result"):
            if size > self.max_dimension:
                raise OutputRefused(f"{where} has {size} entries along one dimension: per-record shaped output")
        return result
