"""The DP wrapper: any strategy's aggregate plus Gaussian noise calibrated to its L2 sensitivity.

Spec: DESIGN.md §7 ("adds calibrated noise"); the Gaussian mechanism of DP-FedAvg (McMahan et al. 2018,
"Learning Differentially Private Recurrent Language Models"). Privacy unit: one site's update in one
round, zero-out neighbours (``strategies`` gives each aggregator's sensitivity Δ). The noise std is
``noise_multiplier × Δ``, which is ``z·C/n`` for FedAvg with equal weights; ``accountant`` turns the
multiplier into ε. What ε does not cover: the round record's lists (who joined, who was rejected and why,
the anomaly scores) and the evaluation metrics, which are computed from raw data and published as they are.

:class:`DPStrategy` fails closed: it refuses a strategy that declares no sensitivity, and a sensitivity
that is not a positive finite number.

Noise sources (the contract's ``noise`` field chooses):

- ``opendp``: OpenDP's ``make_gaussian`` over a float32 vector domain with L2 sensitivity: exact
  discretised sampling from OpenDP's CSPRNG, robust to floating-point attacks; before sampling, OpenDP's
  own privacy map must confirm ρ = Δ²/(2σ²) = 1/(2z²) (zCDP), so the std we computed is the one the
  accountant charges. It cannot be seeded. Measured cost (OpenDP 0.16, this project's 2-core machine):
  17-36 µs per parameter, i.e. 20-36 s for a 1M-parameter model (35.5 s in bench.fed_bench): fine for
  small models, too slow for large ones. Enabled process-wide: OpenDP's ``contrib`` feature (where
  make_gaussian lives); ``floating-point`` is not needed.
- ``opacus``: Opacus's Gaussian noise generator, the one its DP-SGD optimizer uses, with its
  ``secure_mode`` sum of four draws (the floating-point attack defence of Holohan and Braghin 2021),
  0.1-0.2 s per 1M parameters. Opacus's true secure_mode also needs torchcsprng, which has no build for
  Python 3.11 / torch 2.13: the draws come from a dedicated torch generator seeded with 64 bits from the OS
  CSPRNG (``secrets``). LIMITATION: that generator is a Mersenne Twister, not a CSPRNG. The helper is
  Opacus's private ``_generate_noise``; the tests pin its behaviour (std, dtype) so a change fails loudly.
  ``insecure_test_seed`` seeds it for tests, and the source then says it is not private.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import opendp.prelude as dp
import torch
from opacus.optimizers.optimizer import _generate_noise

from cvm.federated.errors import DPNotSupported, NoiseFailed
from cvm.federated.strategies import Strategy
from cvm.federated.validation import AcceptedUpdate

dp.enable_features("contrib")

# OpenDP's map works in float32 for a float32 domain; it rounds ρ up by ~1e-8 relative.
_PRIVACY_MAP_SLACK = 1e-6


@runtime_checkable
class GaussianNoise(Protocol):
    """A vetted Gaussian sampler: ``name`` is the contract's ``noise`` value, ``description`` goes in the record."""

    name: str
    description: str

    def add(self, vector: np.ndarray, *, l2_sensitivity: float, noise_multiplier: float) -> np.ndarray:
        """``vector`` + N(0, (noise_multiplier · l2_sensitivity)²) per coordinate, as float32."""
        ...


class OpenDPGaussian:
    """OpenDP's Gaussian mechanism (see the module docstring)."""

    name = "opendp"
    description = "opendp make_gaussian (exact discretised sampling, OpenDP CSPRNG)"

    def add(self, vector: np.ndarray, *, l2_sensitivity: float, noise_multiplier: float) -> np.ndarray:
        try:
            measurement = dp.m.make_gaussian(
                dp.vector_domain(dp.atom_domain(T="f32", nan=False), size=vector.size),
                dp.l2_distance(T="f32"),
                scale=noise_multiplier * l2_sensitivity,
            )
            rho = measurement.map(l2_sensitivity)
            if rho > (1 + _PRIVACY_MAP_SLACK) / (2 * noise_multiplier**2):
                raise NoiseFailed(f"OpenDP's privacy map gives ρ = {rho}, more than 1/(2z²) for z = {noise_multiplier}")
            return np.asarray(measurement(vector), dtype=np.float32)
        except dp.OpenDPException as error:
            raise NoiseFailed(f"OpenDP refused the Gaussian mechanism: {error}") from error


class OpacusGaussian:
    """Opacus's Gaussian noise with its floating-point defence (see the module docstring)."""

    name = "opacus"

    def __init__(self, *, insecure_test_seed: int | None = None) -> None:
        if insecure_test_seed is None:
            self._generator = torch.Generator().manual_seed(secrets.randbits(64))
            self.description = "opacus _generate_noise secure_mode; torch MT19937 seeded from the OS CSPRNG"
        else:
            if isinstance(insecure_test_seed, bool) or not isinstance(insecure_test_seed, int):
                raise TypeError("insecure_test_seed must be an int")
            self._generator = torch.Generator().manual_seed(insecure_test_seed)
            self.description = "opacus _generate_noise, seeded for tests: NOT private"

    def add(self, vector: np.ndarray, *, l2_sensitivity: float, noise_multiplier: float) -> np.ndarray:
        reference = torch.from_numpy(vector)
        try:
            noise = _generate_noise(noise_multiplier * l2_sensitivity, reference, self._generator, secure_mode=True)
        except RuntimeError as error:
            raise NoiseFailed(f"Opacus could not draw the noise: {error}") from error
        return (reference + noise).numpy()


def noise_source(name: str) -> GaussianNoise:
    """The production sampler the contract's ``noise`` field names."""
    if name == "opendp":
        return OpenDPGaussian()
    if name == "opacus":
        return OpacusGaussian()
    raise ValueError(f"unknown noise source {name!r}")


@dataclass(frozen=True, eq=False)
class NoisyAggregate:
    """A private aggregate: the noisy vector, the sensitivity and std used, and which sampler drew the noise."""

    vector: np.ndarray
    l2_sensitivity: float
    noise_std: float
    noise: str


class DPStrategy:
    """Wraps a :class:`~cvm.federated.strategies.Strategy`: aggregate, then add calibrated Gaussian noise.

    ``norm_bound`` is the largest L2 norm an accepted update can have (``validation.norm_bound``).
    """

    def __init__(self, strategy: Strategy, *, noise_multiplier: float, norm_bound: float, noise: GaussianNoise) -> None:
        if not isinstance(strategy, Strategy):
            raise TypeError("strategy must be a Strategy")
        if strategy.l2_sensitivity is None:
            raise DPNotSupported(f"strategy {strategy.name!r} declares no L2 sensitivity; refusing to privatise it")
        for name, value in (("noise_multiplier", noise_multiplier), ("norm_bound", norm_bound)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ValueError(f"{name} must be a positive finite number")
        self.strategy = strategy
        self.noise_multiplier = float(noise_multiplier)
        self.norm_bound = float(norm_bound)
        self.noise = noise

    def aggregate(self, updates: Sequence[AcceptedUpdate]) -> NoisyAggregate:
        """The noisy aggregate of ``updates`` (at least one)."""
        if not updates:
            raise ValueError("no updates to aggregate")
        sensitivity = self.strategy.l2_sensitivity(updates, self.norm_bound)
        if not (isinstance(sensitivity, float) and 0 < sensitivity < math.inf):
            raise DPNotSupported(f"strategy {self.strategy.name!r} gave an unusable sensitivity {sensitivity!r}")
        aggregate = self.strategy.aggregate(updates)
        noisy = self.noise.add(aggregate, l2_sensitivity=sensitivity, noise_multiplier=self.noise_multiplier)
        return NoisyAggregate(
            vector=noisy,
            l2_sensitivity=sensitivity,
            noise_std=self.noise_multiplier * sensitivity,
            noise=self.noise.description,
        )
