"""DP-SGD model training inside the CVM, with Opacus.

Spec: DESIGN.md §6 step 5 (DP-SGD model training with Opacus); DP-SGD as in Abadi et al. 2016
("Deep Learning with Differential Privacy"): Poisson-sampled batches, per-example gradients clipped to
``max_grad_norm``, Gaussian noise; the noise multiplier is chosen by Opacus's
``make_private_with_epsilon`` so that the whole run meets the target (ε, δ) under its PRV accountant
(Gopi et al. 2021), and the ε reported is that accountant's upper bound after the steps actually taken.

Privacy unit: one patient = one row. Features are standardised with the manifest's public bounds
(clip to [low, high], map to [-1, 1]) — never with statistics of the data, which would need their own budget.

Randomness (house rule: noise only from Opacus, no seeds in production):

- production, torchcsprng importable: Opacus ``secure_mode=True`` (CSPRNG for sampling and noise, and
  noise robust to floating-point attacks).
- production, torchcsprng missing — the case with torch 2.13: torchcsprng's last release (0.2.1, 2021)
  has no wheel for Python 3.11 or current torch. Opacus then runs with ``secure_mode=False`` and draws the
  Poisson sampling and the noise from a dedicated ``torch.Generator`` seeded with 64 bits from the OS
  CSPRNG. Never from torch's default generator, whose seed is a fixed constant in every new process, which
  would make the noise repeatable. LIMITATION: that generator is a Mersenne Twister, not a CSPRNG, and the
  noise lacks secure_mode's defence against floating-point attacks. ``DPModel.noise_source`` says which
  case ran, so the signed output carries it.
- tests: ``insecure_test_seed=`` seeds that generator; the model is then labelled as not private.

Hold-out: none by default (``held_out_fraction = 0``): every row trains the model, nothing is silently kept
back. A recipe may ask for ``held_out_fraction`` > 0; the held-out AUC in ``TrainingRun`` is then computed on
private rows and is NOT covered by ε, so it is never released: it is a diagnostic for the operator and the
bench, and only ``TrainingRun.model`` goes through the output gate. No metric leaves the CVM.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import secrets
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import pyarrow as pa
import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, Dataset

from cvm.analyses.errors import BudgetTooSmall, MissingBounds
from cvm.analyses.loss import PrivacyLoss

_ACCOUNTANT = "prv"
_ARCHITECTURES = ("logistic", "mlp")


# ----------------------------------------------------------------------------------------- the spec


@dataclass(frozen=True)
class TrainingSpec:
    """What to train, as declared in the manifest's ``analysis.params`` for ``dp_sgd``.

    ``features`` maps each feature column to its public (low, high) bounds; ``label`` is a 0/1 column
    (binarised at 0.5, null = 0). ``batch_size`` is the expected Poisson batch size.
    """

    features: Mapping[str, tuple[float, float]]
    label: str
    model: Literal["logistic", "mlp"] = "logistic"
    hidden_units: int = 32
    epochs: int = 3
    batch_size: int = 8192
    learning_rate: float = 0.05
    max_grad_norm: float = 1.0
    held_out_fraction: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.features, Mapping) or not self.features:
            raise ValueError("features must be a non-empty mapping of column -> (low, high)")
        bounds = {}
        for column, pair in self.features.items():
            if pair is None:
                raise MissingBounds(f"feature {column!r} has no bounds; declare them in the manifest")
            low, high = (float(v) for v in pair)
            if not (math.isfinite(low) and math.isfinite(high) and low < high):
                raise ValueError(f"feature {column!r}: bounds must be finite with low < high")
            bounds[column] = (low, high)
        object.__setattr__(self, "features", bounds)
        if not isinstance(self.label, str) or not self.label or self.label in bounds:
            raise ValueError("label must name a column that is not a feature")
        if self.model not in _ARCHITECTURES:
            raise ValueError(f"model must be one of {_ARCHITECTURES}")
        for name in ("hidden_units", "epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int")
        for name in ("learning_rate", "max_grad_norm"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ValueError(f"{name} must be a positive number")
        if isinstance(self.held_out_fraction, bool) or not 0 <= self.held_out_fraction < 1:
            raise ValueError("held_out_fraction must be in [0, 1)")

    @classmethod
    def from_params(cls, params: Mapping[str, object]) -> TrainingSpec:
        """Parse the manifest's params; unknown keys are refused."""
        if not isinstance(params, Mapping):
            raise TypeError("params must be a mapping")
        try:
            return cls(**params)
        except TypeError as error:  # unknown or missing field names
            raise ValueError(f"dp_sgd params: {error}") from None


# ----------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Features:
    """Standardised features ``x`` (rows × features, float32 in [-1, 1]) and 0/1 labels ``y`` (float32)."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


def prepare_features(table: pa.Table, spec: TrainingSpec) -> Features:
    """Clip each feature to its manifest bounds and map it to [-1, 1]; nulls and NaN become 0 (the centre)."""
    if not isinstance(table, pa.Table):
        raise TypeError("table must be a pyarrow.Table")
    missing = [c for c in (*spec.features, spec.label) if c not in table.column_names]
    if missing:
        raise ValueError(f"columns not in the table: {missing}")
    labels = table.column(spec.label).cast(pa.float64()).fill_null(0.0).to_numpy() >= 0.5
    return Features(x=standardise(table, spec.features), y=torch.from_numpy(labels.astype(np.float32)))


STANDARDISATION = "clip to [low, high], then 2 * (x - low) / (high - low) - 1; null and NaN -> 0"


def standardise(table: pa.Table, feature_bounds: Mapping[str, tuple[float, float]]) -> torch.Tensor:
    """The model's input (rows x features, float32), columns taken BY NAME in ``feature_bounds``' order:
    :data:`STANDARDISATION`. The CVM and the client's ``load_model`` both score through this function."""
    missing = [c for c in feature_bounds if c not in table.column_names]
    if missing:
        raise ValueError(f"columns not in the table: {missing}")
    columns = []
    for column, (low, high) in feature_bounds.items():
        values = table.column(column).cast(pa.float64()).fill_null(math.nan).to_numpy()
        scaled = 2.0 * (np.clip(values, low, high) - low) / (high - low) - 1.0
        columns.append(np.nan_to_num(scaled, nan=0.0))
    if not columns:
        raise ValueError("no features")
    return torch.from_numpy(np.stack(columns, axis=1).astype(np.float32))


def split_held_out(data: Features, fraction: float, generator: torch.Generator) -> tuple[Features, Features]:
    """A random (train, held-out) split with ``fraction`` of the rows held out."""
    order = torch.randperm(len(data), generator=generator)
    cut = len(data) - int(round(fraction * len(data)))
    train, held_out = order[:cut], order[cut:]
    return Features(data.x[train], data.y[train]), Features(data.x[held_out], data.y[held_out])


class _Rows(Dataset):
    """Row access for DataLoader; ``__getitems__`` serves a whole sampled batch in one indexing op."""

    def __init__(self, data: Features) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data.x[index], self.data.y[index]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.as_tensor(indices, dtype=torch.long)
        return self.data.x[rows], self.data.y[rows]


def _whole_batch(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return batch  # __getitems__ already built the batch


# ----------------------------------------------------------------------------------------- randomness


@dataclass(frozen=True)
class _Randomness:
    generator: torch.Generator  # split, initialisation, and (unless secure_mode) sampling and noise
    secure_mode: bool
    description: str


def _generator(insecure_test_seed: int | None) -> torch.Generator:
    """A dedicated generator: seeded from the OS CSPRNG, or from the explicit test flag."""
    if insecure_test_seed is None:
        return torch.Generator().manual_seed(secrets.randbits(64))
    if isinstance(insecure_test_seed, bool) or not isinstance(insecure_test_seed, int):
        raise TypeError("insecure_test_seed must be an int")
    return torch.Generator().manual_seed(insecure_test_seed)


def _randomness(insecure_test_seed: int | None) -> _Randomness:
    generator = _generator(insecure_test_seed)
    if insecure_test_seed is not None:
        return _Randomness(generator, False, "seeded for tests: NOT private")
    try:
        importlib.import_module("torchcsprng")
    except ImportError:
        return _Randomness(
            generator,
            False,
            "torch Mersenne Twister seeded from the OS CSPRNG; Opacus secure_mode unavailable (no torchcsprng)",
        )
    return _Randomness(generator, True, "Opacus secure_mode (torchcsprng)")


# ----------------------------------------------------------------------------------------- models


def _build_module(architecture: str, inputs: int, hidden_units: int, generator: torch.Generator) -> nn.Module:
    if architecture == "logistic":
        module = nn.Linear(inputs, 1)
        nn.init.zeros_(module.weight)
        nn.init.zeros_(module.bias)
        return module
    module = nn.Sequential(nn.Linear(inputs, hidden_units), nn.ReLU(), nn.Linear(hidden_units, 1))
    for layer in (module[0], module[2]):
        nn.init.normal_(layer.weight, std=1.0 / math.sqrt(layer.in_features), generator=generator)
        nn.init.zeros_(layer.bias)
    return module


@dataclass(frozen=True)
class DPModel:
    """The releasable product of DP-SGD: weights plus everything needed to read and audit them."""

    output_type: ClassVar[str] = "model_weights"
    architecture: str
    hidden_units: int
    feature_bounds: Mapping[str, tuple[float, float]]
    weights: Mapping[str, np.ndarray]
    spent: PrivacyLoss
    accountant: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float
    noise_source: str
    label: str = ""

    def module(self) -> nn.Module:
        """A torch module with these weights (for scoring)."""
        module = _build_module(self.architecture, len(self.feature_bounds), self.hidden_units, torch.Generator())
        module.load_state_dict({name: torch.from_numpy(array) for name, array in self.weights.items()})
        return module


def model_from_payload(payload: Mapping[str, object]) -> DPModel:
    """The ``DPModel`` a signed ``model_weights`` payload describes (features in the payload's order)."""
    if payload.get("output_type") != DPModel.output_type:
        raise ValueError(f"not a model payload (output_type {payload.get('output_type')!r})")
    if "features" in payload:
        bounds = {f["name"]: (float(f["bounds"][0]), float(f["bounds"][1])) for f in payload["features"]}
    else:  # receipts from before the features list
        bounds = {k: (float(v[0]), float(v[1])) for k, v in payload["feature_bounds"].items()}
    spent = payload["spent"]
    return DPModel(
        architecture=payload["architecture"], hidden_units=int(payload.get("hidden_units", 1)),
        feature_bounds=bounds,
        weights={n: np.array(w["values"], dtype=np.float32).reshape(w["shape"]) for n, w in payload["weights"].items()},
        spent=PrivacyLoss(spent["epsilon"], spent["delta"]), accountant=payload["accountant"],
        noise_multiplier=payload["noise_multiplier"], sample_rate=payload["sample_rate"], steps=payload["steps"],
        max_grad_norm=payload["max_grad_norm"], noise_source=payload["noise_source"],
        label=str(payload.get("label", "")),
    )


def _weights(module: nn.Module) -> dict[str, np.ndarray]:
    return {name: tensor.detach().numpy().copy() for name, tensor in module.state_dict().items()}


def scores(module: nn.Module, data: Features) -> np.ndarray:
    """Model logits for every row of ``data``."""
    with torch.no_grad():
        return module(data.x).squeeze(1).numpy()


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve by the rank-sum (Mann–Whitney U) formula; tied scores share their mean rank."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    if scores.shape != labels.shape or scores.ndim != 1:
        raise ValueError("scores and labels must be 1-D and of the same length")
    positives = int(labels.sum())
    negatives = len(labels) - positives
    if positives == 0 or negatives == 0:
        raise ValueError("AUC needs both positive and negative labels")
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    rank_of_value = np.cumsum(counts) - (counts - 1) / 2.0  # mean 1-based rank of each distinct score
    rank_sum = rank_of_value[inverse][labels].sum()
    return float((rank_sum - positives * (positives + 1) / 2.0) / (positives * negatives))


# ----------------------------------------------------------------------------------------- training


@contextlib.contextmanager
def _known_library_warnings_silenced() -> Iterator[None]:
    """Silence three warnings that are expected here, and only those (pytest turns warnings into errors)."""
    with warnings.catch_warnings():
        # Opacus, when secure_mode is off: _randomness chose that knowingly and labels the model with it.
        warnings.filterwarnings("ignore", message="Secure RNG turned off", category=UserWarning)
        # Opacus's PRV accountant sizes its numeric domain with an RDP bound; the bound stays valid when its
        # best order is the largest one tried, it is only looser (a wider domain), never a smaller epsilon.
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha", category=UserWarning)
        # torch, because the first layer's input needs no gradient; Opacus only uses the hooks' outputs.
        warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
        yield


def _fit(module: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader, epochs: int,
         on_epoch: Callable[[int, int], None] | None = None) -> int:
    loss_function = nn.BCEWithLogitsLoss()
    steps = 0
    for epoch in range(epochs):
        for x, y in loader:
            optimizer.zero_grad()
            loss_function(module(x).squeeze(1), y).backward()
            optimizer.step()
            steps += 1
        if on_epoch is not None:
            on_epoch(epoch + 1, epochs)   # progress only: the count of epochs is public (the manifest's)
    return steps


def _loader(train: Features, spec: TrainingSpec, generator: torch.Generator, shuffle: bool) -> DataLoader:
    return DataLoader(
        _Rows(train), batch_size=spec.batch_size, shuffle=shuffle, collate_fn=_whole_batch, generator=generator
    )


def train_dp(train: Features, spec: TrainingSpec, budget: PrivacyLoss, *, insecure_test_seed: int | None = None,
             on_epoch: Callable[[int, int], None] | None = None) -> DPModel:
    """Train ``spec.model`` on ``train`` with DP-SGD so the run spends at most ``budget`` (δ must be > 0).

    ``on_epoch(done, epochs)`` is called after each epoch (progress for the run view; it sees no data).

    Raises ``BudgetTooSmall`` when Opacus finds no noise multiplier that meets the budget.
    """
    if budget.delta == 0:
        raise ValueError("DP-SGD's Gaussian mechanism needs delta > 0")
    randomness = _randomness(insecure_test_seed)
    module = _build_module(spec.model, len(spec.features), spec.hidden_units, randomness.generator)
    optimizer = torch.optim.Adam(module.parameters(), lr=spec.learning_rate)
    loader = _loader(train, spec, randomness.generator, shuffle=False)
    with _known_library_warnings_silenced():
        engine = PrivacyEngine(accountant=_ACCOUNTANT, secure_mode=randomness.secure_mode)
        try:
            private_module, private_optimizer, private_loader = engine.make_private_with_epsilon(
                module=module,
                optimizer=optimizer,
                data_loader=loader,
                target_epsilon=budget.epsilon,
                target_delta=budget.delta,
                epochs=spec.epochs,
                max_grad_norm=spec.max_grad_norm,
                poisson_sampling=True,
                noise_generator=None if randomness.secure_mode else randomness.generator,
            )
        except ValueError as error:
            if "privacy budget is too low" not in str(error):
                raise
            raise BudgetTooSmall("Opacus found no noise multiplier that meets the budget") from None
        steps = _fit(private_module, private_optimizer, private_loader, spec.epochs, on_epoch)
        spent_epsilon = engine.get_epsilon(budget.delta)
    return DPModel(
        architecture=spec.model,
        hidden_units=spec.hidden_units,
        feature_bounds=dict(spec.features),
        weights=_weights(module),
        spent=PrivacyLoss(spent_epsilon, budget.delta),
        accountant=_ACCOUNTANT,
        noise_multiplier=private_optimizer.noise_multiplier,
        sample_rate=private_loader.sample_rate,
        steps=steps,
        max_grad_norm=spec.max_grad_norm,
        noise_source=randomness.description,
        label=spec.label,
    )


def train_non_private(train: Features, spec: TrainingSpec, generator: torch.Generator) -> nn.Module:
    """The same model, optimiser, batch size and epochs without clipping or noise: the bench's baseline.

    Its output is not private and must never leave the CVM.
    """
    module = _build_module(spec.model, len(spec.features), spec.hidden_units, generator)
    optimizer = torch.optim.Adam(module.parameters(), lr=spec.learning_rate)
    _fit(module, optimizer, _loader(train, spec, generator, shuffle=True), spec.epochs)
    return module


@dataclass(frozen=True)
class TrainingRun:
    """A DP-SGD run: the releasable ``model`` and diagnostics that are NOT covered by ε (not released)."""

    model: DPModel
    held_out_auc: float | None   # None when the recipe holds no rows out (held_out_fraction = 0)
    train_rows: int
    held_out_rows: int
    train_seconds: float


def run_dp_sgd(
    table: pa.Table, spec: TrainingSpec, budget: PrivacyLoss, *, insecure_test_seed: int | None = None,
    on_epoch: Callable[[int, int], None] | None = None,
) -> TrainingRun:
    """The CVM recipe: standardise with the manifest bounds, split, train with DP-SGD, score the held-out rows.
    ``on_epoch(done, epochs)`` reports training progress (see :func:`train_dp`)."""
    data = prepare_features(table, spec)
    if spec.held_out_fraction > 0:
        train, held_out = split_held_out(data, spec.held_out_fraction, _generator(insecure_test_seed))
    else:
        train, held_out = data, Features(data.x[:0], data.y[:0])
    started = time.perf_counter()
    model = train_dp(train, spec, budget, insecure_test_seed=insecure_test_seed, on_epoch=on_epoch)
    elapsed = time.perf_counter() - started
    auc = roc_auc(scores(model.module(), held_out), held_out.y.numpy()) if len(held_out) else None
    return TrainingRun(model, auc, len(train), len(held_out), elapsed)
