"""The analyst's side of a result: ``load_model(receipt, …)`` verifies a receipt, then hands back what it released.

    model = load_model(receipt, now=int(time.time()), chain=chain, kms_root=ROOT)   # refused unless VERIFIED
    model.predict_proba({"income": [...], "debt_ratio": [...], "age_years": [...]})   # columns BY NAME

The receipt is checked first with :func:`auditor.verify.verify_receipt` and the caller's pins (the same keyword
arguments); a receipt whose report is not ok is refused (:class:`ReceiptNotVerified`), nothing is loaded from it.

- a ``model_weights`` payload becomes a :class:`ReleasedModel`: a torch module with the released weights whose
  ``predict_proba(rows)`` takes a ``pyarrow.Table`` or a mapping of column name -> values, picks the payload's
  features BY NAME in the payload's order, and applies the declared standardisation with the very function the
  CVM trained and scored with (:func:`cvm.analyses.dpsgd.standardise`), so column order cannot be confused;
- an ``aggregate_stats`` payload becomes a ``pyarrow.Table`` (name, kind, bin, value), one row per released
  value (one per bin for a histogram).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa

from auditor.verify import VerificationReport, verify_receipt

__all__ = ["ReceiptNotVerified", "load_model", "payload_model", "stats_table"]   # and ReleasedModel, made lazily


class ReceiptNotVerified(Exception):
    """The receipt did not verify with the caller's pins: nothing in it is used. ``report`` says which link broke."""

    def __init__(self, report: VerificationReport) -> None:
        first = report.first_failure
        super().__init__(f"the receipt is not verified: link {first.number} ({first.name}): {first.reason}"
                         if first is not None else "the receipt is not verified")
        self.report = report


def _as_table(rows: Any) -> pa.Table:
    if isinstance(rows, pa.Table):
        return rows
    if isinstance(rows, pa.RecordBatch):
        return pa.Table.from_batches([rows])
    if isinstance(rows, Mapping):
        return pa.table({str(name): list(values) if not isinstance(values, (pa.Array, pa.ChunkedArray, np.ndarray))
                         else values for name, values in rows.items()})
    raise TypeError("rows must be a pyarrow.Table or a mapping of column name -> values (columns are taken by name)")


def _released_model_class():
    from torch import nn

    from cvm.analyses.dpsgd import standardise

    class ReleasedModel(nn.Module):
        """The released model: ``forward(x)`` gives logits of standardised input; ``predict_proba(rows)`` scores
        rows given by column name. ``features`` (ordered), ``feature_bounds``, ``label``, ``architecture`` and
        ``payload`` describe it as the signed payload does."""

        def __init__(self, payload: Mapping[str, Any]) -> None:
            super().__init__()
            from cvm.analyses.dpsgd import model_from_payload

            released = model_from_payload(payload)
            self.net = released.module()
            self.net.eval()
            self.architecture = released.architecture
            self.feature_bounds = dict(released.feature_bounds)
            self.features = tuple(self.feature_bounds)
            self.label = released.label
            self.payload = dict(payload)

        def forward(self, x):
            return self.net(x)

        def logits(self, rows: Any) -> np.ndarray:
            import torch

            x = standardise(_as_table(rows), self.feature_bounds)
            with torch.no_grad():
                return self.net(x).squeeze(1).numpy().astype(np.float64)

        def predict_proba(self, rows: Any) -> np.ndarray:
            """P(label = 1) for each row (float64), from the features named in the payload."""
            return 1.0 / (1.0 + np.exp(-self.logits(rows)))

    return ReleasedModel


def __getattr__(name: str):
    if name == "ReleasedModel":   # torch loads only when a model is asked for
        return _released_model_class()
    raise AttributeError(f"module 'compose.model' has no attribute {name!r}")


_MODEL_CLASS = None


def payload_model(payload: Mapping[str, Any]):
    """A :class:`ReleasedModel` from a ``model_weights`` payload (no verification: use :func:`load_model`)."""
    global _MODEL_CLASS
    if _MODEL_CLASS is None:
        _MODEL_CLASS = _released_model_class()
    return _MODEL_CLASS(payload)


def stats_table(payload: Mapping[str, Any]) -> pa.Table:
    """The released statistics of an ``aggregate_stats`` payload, one row per value (one per histogram bin)."""
    names, kinds, bins, values = [], [], [], []
    for item in payload.get("results", []):
        value = item["value"]
        for bin_name, v in (value.items() if isinstance(value, Mapping) else [(None, value)]):
            names.append(item["name"])
            kinds.append(item["kind"])
            bins.append(bin_name)
            values.append(float(v))
    return pa.table({"name": pa.array(names, pa.string()), "kind": pa.array(kinds, pa.string()),
                     "bin": pa.array(bins, pa.string()), "value": pa.array(values, pa.float64())})


def load_model(receipt: Mapping[str, Any], **pins: Any):
    """Verify ``receipt`` with ``verify_receipt(receipt, **pins)`` (``now``, ``chain``, ``kms_root``,
    ``allow_simulated``, ``simulated_root_der``, …) and return its released result: a :class:`ReleasedModel` for a
    model, a ``pyarrow.Table`` for statistics. Raises :class:`ReceiptNotVerified` unless every link holds."""
    report = verify_receipt(receipt, **pins)
    if not report.ok:
        raise ReceiptNotVerified(report)
    payload = receipt["envelope"]["payload"]
    output_type = payload.get("output_type")
    if output_type == "model_weights":
        return payload_model(payload)
    if output_type == "aggregate_stats":
        return stats_table(payload)
    raise ValueError(f"the receipt releases {output_type!r}, neither a model nor statistics")
