"""The federated task, shared by the sites and the aggregator: a logistic MACE risk model and how it is scored.

The model vector is the logistic regression's weights on the cohort features of ``cvm.analyses.cohorts``
(standardised on their public bounds) followed by its bias, as float32. Quality is the ROC AUC (higher is
better) and the mean log-loss.

Central evaluation (DESIGN.md §7, "evaluates"): the round contract may name a public reference cohort by the
sha256 of its Parquet bytes (``RoundContract.evaluation_sha256``), so the file the aggregator scores every
candidate on is part of the measured recipe the sites approved. Its ``site`` column, when present, splits it
into strata: the per-site quality of the round record is the AUC on each stratum. The reference cohort is
public data (it never comes from a site), so publishing its scores spends no ε.

This module imports torch; ``cvm.federated`` does not import it, so the aggregator loads it only when its
round has a reference cohort.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

from cvm.analyses.cohorts import FEATURE_BOUNDS, OUTCOME, SITE_COLUMN
from cvm.analyses.dpsgd import Features, TrainingSpec, prepare_features, roc_auc
from cvm.federated.rounds import Evaluation

TASK = TrainingSpec(features=FEATURE_BOUNDS, label=OUTCOME)
NUM_PARAMETERS = len(TASK.features) + 1


def as_module(weights: np.ndarray) -> nn.Linear:
    """The model vector as a torch module (weights then bias)."""
    if weights.shape != (NUM_PARAMETERS,):
        raise ValueError(f"the model has {NUM_PARAMETERS} parameters, got {weights.shape}")
    module = nn.Linear(NUM_PARAMETERS - 1, 1)
    with torch.no_grad():
        module.weight.copy_(torch.from_numpy(weights[:-1].copy()).unsqueeze(0))
        module.bias.copy_(torch.from_numpy(weights[-1:].copy()))
    return module


def as_vector(module: nn.Linear) -> np.ndarray:
    """The module's parameters as the model vector (float32, little-endian)."""
    with torch.no_grad():
        return torch.cat([module.weight.reshape(-1), module.bias]).numpy().astype("<f4")


@dataclass(frozen=True)
class Quality:
    loss: float   # mean log-loss, lower is better
    auc: float    # higher is better


def quality(weights: np.ndarray, data: Features) -> Quality:
    """Log-loss and AUC of ``weights`` on ``data``."""
    with torch.no_grad():
        logits = as_module(weights)(data.x).squeeze(1)
        loss = float(nn.functional.binary_cross_entropy_with_logits(logits, data.y))
    return Quality(loss, roc_auc(logits.numpy(), data.y.numpy()))


class ReferenceCohortInvalid(ValueError):
    """The reference cohort cannot score a model (unreadable, wrong columns, a stratum without both labels)."""


@dataclass(frozen=True)
class ReferenceCohort:
    """A public reference cohort, its sha256 (of the file's bytes) and its strata (one per ``site`` value)."""

    sha256: str
    everyone: Features
    strata: dict[str, Features]

    @classmethod
    def load(cls, path: Path) -> ReferenceCohort:
        """Read ``path`` once: the digest and the table come from the same bytes."""
        data = Path(path).read_bytes()
        try:
            table = pq.read_table(pa.BufferReader(data))
            everyone = prepare_features(table, TASK)
        except (pa.ArrowException, ValueError) as exc:
            raise ReferenceCohortInvalid(f"{path} is not a reference cohort for this task: {exc}") from None
        strata = {}
        if SITE_COLUMN in table.column_names:
            sites = table.column(SITE_COLUMN).cast(pa.string()).to_numpy(zero_copy_only=False)
            for site in sorted({s for s in sites if s is not None}):
                rows = torch.from_numpy(np.flatnonzero(sites == site))
                strata[site] = Features(everyone.x[rows], everyone.y[rows])
        for name, part in {"the cohort": everyone, **{f"stratum {s!r}": f for s, f in strata.items()}}.items():
            positives = int(part.y.sum())
            if positives in (0, len(part)):
                raise ReferenceCohortInvalid(f"{path}: {name} needs both outcomes to give an AUC "
                                             f"({positives} of {len(part)} rows are positive)")
        return cls(hashlib.sha256(data).hexdigest(), everyone, strata)

    def evaluate(self, weights: np.ndarray) -> Evaluation:
        """The ``run_round`` evaluation callback: AUC on the whole cohort and on each stratum."""
        return Evaluation(quality=quality(weights, self.everyone).auc,
                          per_site={site: quality(weights, part).auc for site, part in self.strata.items()})
