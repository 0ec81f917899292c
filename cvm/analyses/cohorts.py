"""Synthetic cardio-renal cohorts with a known ground-truth risk model.

Owner-side data generation for the demo study: five sites (hospital networks) each hold one cohort of
adult patients with the usual cardio-renal risk factors, and a binary outcome — a major adverse
cardio-renal event (MACE: MI, stroke, cardiovascular death, or kidney failure) within five years.

The outcome is drawn from a fixed logistic model (``GROUND_TRUTH``), identical at every site; the sites
differ only in their covariate mix (age, BMI, smoking, diabetes prevalence, …), i.e. mild covariate
shift, so the pooled data is non-IID across owners but one model fits all of it. Because the truth is
known, the bench can compare a learned model with the best achievable (Bayes) AUC.

This module draws from a seeded ``numpy.random.Generator``: that is fine HERE, because it produces the
owners' input data. It must never be used for DP noise (that comes from OpenDP and Opacus only).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from os import PathLike

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

# Clinically plausible ranges; the generator clips to them, and the demo manifest declares them as the
# public bounds that DP clamping and DP-SGD standardisation use (never inferred from the data).
FEATURE_BOUNDS: Mapping[str, tuple[float, float]] = {
    "age": (18.0, 95.0),  # years
    "sex_male": (0.0, 1.0),
    "sbp": (80.0, 230.0),  # systolic blood pressure, mmHg
    "egfr": (5.0, 140.0),  # estimated GFR, mL/min/1.73 m^2
    "hba1c": (4.0, 14.0),  # %
    "bmi": (14.0, 60.0),  # kg/m^2
    "smoker": (0.0, 1.0),
    "diabetes": (0.0, 1.0),
    "ldl": (0.5, 9.0),  # LDL cholesterol, mmol/L
    "prior_cvd": (0.0, 1.0),
}
FEATURES: tuple[str, ...] = tuple(FEATURE_BOUNDS)
OUTCOME = "mace_5y"
SITE_COLUMN = "site"


@dataclass(frozen=True)
class RiskModel:
    """A logistic model: logit P(outcome) = intercept + sum(coef * (feature - centre))."""

    intercept: float
    terms: Mapping[str, tuple[float, float]]  # feature -> (coefficient per unit, centre)

    def logit(self, columns: Mapping[str, np.ndarray]) -> np.ndarray:
        """Linear predictor for each row of ``columns`` (feature name -> 1-D array)."""
        total = np.full(len(columns[FEATURES[0]]), self.intercept, dtype=np.float64)
        for name, (coefficient, centre) in self.terms.items():
            total += coefficient * (np.asarray(columns[name], dtype=np.float64) - centre)
        return total

    def risk(self, columns: Mapping[str, np.ndarray]) -> np.ndarray:
        """Five-year event probability for each row."""
        return 1.0 / (1.0 + np.exp(-self.logit(columns)))


# Effect sizes in the range reported by pooled cohort / CKD-PC risk equations; intercept tuned so the
# pooled five-year event rate is about 12 %.
GROUND_TRUTH = RiskModel(
    intercept=-2.75,
    terms={
        "age": (0.055, 60.0),
        "sex_male": (0.30, 0.0),
        "sbp": (0.014, 130.0),
        "egfr": (-0.020, 90.0),
        "hba1c": (0.18, 5.7),
        "bmi": (0.02, 27.0),
        "smoker": (0.50, 0.0),
        "diabetes": (0.40, 0.0),
        "ldl": (0.15, 3.0),
        "prior_cvd": (0.85, 0.0),
    },
)


@dataclass(frozen=True)
class SiteProfile:
    """One site's covariate mix (the source of the non-IID shift between owners)."""

    age_mean: float
    male_share: float
    bmi_mean: float
    smoker_share: float
    sbp_shift: float
    ldl_mean: float
    diabetes_offset: float  # added to the diabetes logit


SITES: Mapping[str, SiteProfile] = {
    "EU-West": SiteProfile(62.0, 0.49, 27.0, 0.20, 0.0, 3.3, 0.0),
    "EU-North": SiteProfile(64.0, 0.50, 26.5, 0.15, -2.0, 3.4, -0.2),
    "US-East": SiteProfile(59.0, 0.47, 29.5, 0.16, 3.0, 3.1, 0.35),
    "APAC": SiteProfile(57.0, 0.52, 24.0, 0.26, 4.0, 2.9, 0.25),
    "CH": SiteProfile(65.0, 0.49, 25.5, 0.19, -1.0, 3.2, -0.3),
}
# The demo's five owners; 1.6 million rows in all.
SITE_SIZES: Mapping[str, int] = {
    "EU-West": 400_000,
    "EU-North": 250_000,
    "US-East": 450_000,
    "APAC": 300_000,
    "CH": 200_000,
}


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def _bounded(name: str, values: np.ndarray, decimals: int) -> np.ndarray:
    low, high = FEATURE_BOUNDS[name]
    return np.round(np.clip(values, low, high), decimals).astype(np.float32)


def generate_site(site: str, n: int, seed: int) -> pa.Table:
    """Draw ``n`` patients of ``site`` with outcomes from ``GROUND_TRUTH``.

    Deterministic in (site, n, seed); different sites give independent streams for the same seed.
    Columns: ``site`` (string), the ``FEATURES`` (float32; binary ones are 0/1) and ``mace_5y`` (int8).
    """
    if site not in SITES:
        raise ValueError(f"unknown site {site!r}; expected one of {sorted(SITES)}")
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError("n must be an int")
    if n < 1:
        raise ValueError("n must be at least 1")
    profile = SITES[site]
    rng = np.random.default_rng([seed, list(SITES).index(site)])

    age = _bounded("age", rng.normal(profile.age_mean, 11.0, n), 0)
    sex_male = (rng.random(n) < profile.male_share).astype(np.float32)
    bmi = _bounded("bmi", profile.bmi_mean * np.exp(rng.normal(0.0, 0.16, n)), 1)
    smoker = (rng.random(n) < profile.smoker_share * np.where(age > 70, 0.6, 1.0)).astype(np.float32)
    diabetes_logit = -2.4 + 0.045 * (age - 60) + 0.11 * (bmi - 27) + profile.diabetes_offset
    diabetes = (rng.random(n) < _sigmoid(diabetes_logit)).astype(np.float32)
    hba1c = _bounded("hba1c", np.where(diabetes == 1, rng.normal(7.4, 1.2, n), rng.normal(5.5, 0.4, n)), 1)
    sbp = _bounded("sbp", 112.0 + 0.45 * (age - 40) + 0.6 * (bmi - 27) + profile.sbp_shift + rng.normal(0, 15, n), 0)
    egfr = _bounded("egfr", 108.0 - 0.85 * (age - 40) - 6.0 * diabetes + rng.normal(0, 14, n), 1)
    ldl = _bounded("ldl", rng.normal(profile.ldl_mean, 0.9, n), 2)
    prior_cvd_logit = -2.6 + 0.05 * (age - 60) + 0.4 * sex_male + 0.3 * smoker + 0.3 * diabetes
    prior_cvd = (rng.random(n) < _sigmoid(prior_cvd_logit)).astype(np.float32)

    columns = {
        "age": age,
        "sex_male": sex_male,
        "sbp": sbp,
        "egfr": egfr,
        "hba1c": hba1c,
        "bmi": bmi,
        "smoker": smoker,
        "diabetes": diabetes,
        "ldl": ldl,
        "prior_cvd": prior_cvd,
    }
    outcome = (rng.random(n) < GROUND_TRUTH.risk(columns)).astype(np.int8)
    return pa.table(
        {SITE_COLUMN: pa.array([site] * n, type=pa.string()), **columns, OUTCOME: outcome}
    )


def generate_cohorts(seed: int, sizes: Mapping[str, int] = SITE_SIZES) -> dict[str, pa.Table]:
    """One table per site, sized as ``sizes`` (default: the demo's 1.6 million rows)."""
    return {site: generate_site(site, n, seed) for site, n in sizes.items()}


def write_parquet(table: pa.Table, path: str | PathLike[str]) -> None:
    """Write one site's cohort as a Parquet file (the owner's plaintext input, before sealing)."""
    pq.write_table(table, path, compression="zstd")


__all__ = [
    "FEATURES",
    "FEATURE_BOUNDS",
    "GROUND_TRUTH",
    "OUTCOME",
    "SITES",
    "SITE_COLUMN",
    "SITE_SIZES",
    "RiskModel",
    "SiteProfile",
    "generate_cohorts",
    "generate_site",
    "write_parquet",
]
