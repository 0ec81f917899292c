"""Canonical bytes, digests and norms of model vectors (low level; not re-exported).

A model (the global weights) and a site's update are flat float32 vectors. Their canonical bytes are the
values as IEEE-754 binary32, little-endian, in index order; a digest is the lowercase hex sha256 of those
bytes. The shape is not part of the bytes: the round contract's parent digest fixes the model, and the
aggregator refuses any update whose length differs from the parent's.
"""

from __future__ import annotations

import hashlib

import numpy as np

CANONICAL_DTYPE = np.dtype("<f4")


def canonical(vector: np.ndarray) -> np.ndarray:
    """``vector`` as a 1-D, C-contiguous little-endian float32 array (a view when it already is one).

    Refuses (TypeError) anything that is not a 1-D float32 ndarray: converting silently from float64
    would change the bytes that were signed or hashed.
    """
    if not isinstance(vector, np.ndarray):
        raise TypeError(f"a model vector must be a numpy ndarray, not {type(vector).__name__}")
    if vector.dtype.kind != "f" or vector.dtype.itemsize != 4:
        raise TypeError(f"a model vector must be float32, not {vector.dtype}")
    if vector.ndim != 1:
        raise TypeError(f"a model vector must be 1-D, not shape {vector.shape}")
    return np.ascontiguousarray(vector, dtype=CANONICAL_DTYPE)


def digest(vector: np.ndarray) -> str:
    """Lowercase hex sha256 of the vector's canonical bytes (hashed in place, no copy)."""
    return hashlib.sha256(memoryview(canonical(vector))).hexdigest()


def l2_norm(vector: np.ndarray) -> float:
    """The L2 norm, products and sum in float64.

    Why float64: the norm check is what bounds a site's influence for DP. In float64 the relative error
    of a sum of up to 2^32 squares is below 5e-7, inside the 1e-6 tolerance the aggregator allows
    (validation.NORM_TOLERANCE). A non-finite result means the vector holds NaN or ±Inf.
    """
    return float(np.sqrt(np.einsum("i,i->", vector, vector, dtype=np.float64)))
