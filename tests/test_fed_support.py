"""Shared helpers for the federated tests (sites with keys, contracts, signed updates), and their own checks.

Named test_fed_* to stay inside the federated helper's files; the other test_fed_* modules import from it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from eth_keys import keys

from cvm.federated import RoundContract, SignedUpdate, sign_update, vector_digest


@dataclass(frozen=True)
class Site:
    """A test site: its secp256k1 key and checksummed address."""

    key: bytes
    address: str


def make_sites(count: int, seed: int = 1) -> list[Site]:
    """``count`` sites with deterministic keys (test keys only)."""
    sites = []
    for index in range(count):
        key = (seed * 1000 + index + 1).to_bytes(32, "big")
        sites.append(Site(key, keys.PrivateKey(key).public_key.to_checksum_address()))
    return sites


def make_contract(parent: np.ndarray, sites: list[Site], **overrides) -> RoundContract:
    """A valid contract over ``parent`` and ``sites``; ``overrides`` replace any field."""
    fields = {
        "round": 1,
        "parent_digest": vector_digest(parent),
        "eligible_sites": [site.address for site in sites],
        "local_epochs": 1,
        "local_batch_size": 32,
        "clip_norm": 1.0,
        "noise_multiplier": 1.0,
        "noise": "opacus",
        "aggregator": "fedavg",
        "min_participants": 2,
        "deadline": 1_000,
        "epsilon_per_round": 10.0,
        "epsilon_total": 30.0,
        "delta": 1e-5,
    }
    fields.update(overrides)
    return RoundContract(**fields)


def signed(site: Site, contract: RoundContract, vector: np.ndarray, num_examples: int = 10) -> SignedUpdate:
    """``vector`` signed by ``site`` for the contract's round and parent."""
    return sign_update(
        site.key,
        round_number=contract.round,
        parent_digest=contract.parent_digest,
        num_examples=num_examples,
        vector=vector,
    )


def small_updates(count: int, size: int, seed: int = 0, scale: float = 0.1) -> list[np.ndarray]:
    """``count`` honest-looking float32 deltas: a shared direction plus per-site noise, norm well under 1."""
    rng = np.random.default_rng(seed)
    direction = rng.standard_normal(size)
    direction /= np.linalg.norm(direction)
    return [
        (scale * (direction + 0.3 * rng.standard_normal(size) / np.sqrt(size))).astype(np.float32) for _ in range(count)
    ]


def test_make_sites_gives_distinct_checksummed_addresses():
    sites = make_sites(4)
    assert len({site.address for site in sites}) == 4
    assert all(site.address.startswith("0x") and site.address != site.address.lower() for site in sites)


def test_small_updates_are_distinct_and_inside_the_unit_ball():
    updates = small_updates(5, 64)
    assert len({vector_digest(u) for u in updates}) == 5
    assert all(np.linalg.norm(u) < 0.2 for u in updates)
