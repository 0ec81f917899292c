"""Anomaly flags: a sign-flipped or ×10-scaled update is flagged, honest ones are not; the sampled path agrees."""

from __future__ import annotations

import random

import numpy as np
import pytest

from cvm.federated import AcceptedUpdate, score_updates
from cvm.federated.robust import COSINE_THRESHOLD, Z_THRESHOLD
from tests.test_fed_support import small_updates


def accepted(vectors) -> list[AcceptedUpdate]:
    return [
        AcceptedUpdate(site=f"site{i}", num_examples=1, vector=np.asarray(v, dtype=np.float32), digest=str(i))
        for i, v in enumerate(vectors)
    ]


def flagged(scores) -> list[str]:
    return [s.site for s in scores if s.flagged]


@pytest.mark.parametrize("honest_count", [4, 9])
def test_honest_updates_are_not_flagged(honest_count):
    scores = score_updates(accepted(small_updates(honest_count, 200, seed=honest_count)))
    assert flagged(scores) == []
    assert all(s.cosine > 0.5 and s.distance_z < Z_THRESHOLD for s in scores)


@pytest.mark.parametrize("honest_count", [4, 9])
def test_a_sign_flipped_update_is_flagged_by_its_cosine(honest_count):
    vectors = small_updates(honest_count + 1, 200, seed=1)
    vectors[-1] = -vectors[-1]
    scores = score_updates(accepted(vectors))
    assert flagged(scores) == [f"site{honest_count}"]
    assert scores[-1].cosine < COSINE_THRESHOLD


@pytest.mark.parametrize("honest_count", [4, 9])
def test_a_ten_times_scaled_update_is_flagged_by_its_distance(honest_count):
    vectors = small_updates(honest_count + 1, 200, seed=2)
    vectors[-1] = vectors[-1] * 10
    scores = score_updates(accepted(vectors))
    assert flagged(scores) == [f"site{honest_count}"]
    assert scores[-1].distance_z > Z_THRESHOLD and scores[-1].cosine > 0


def test_fewer_than_three_updates_are_not_scored():
    assert score_updates(accepted(small_updates(2, 10))) == ()


def test_identical_honest_updates_still_flag_an_outlier():
    base = small_updates(1, 50)[0]
    scores = score_updates(accepted([base, base, base, base * 3]))
    assert flagged(scores) == ["site3"]


def test_zero_centre_flags_nothing_by_cosine():
    scores = score_updates(accepted([np.zeros(8)] * 3))
    assert flagged(scores) == [] and all(s.cosine == 1.0 for s in scores)


def test_the_sampled_path_flags_the_same_sites_and_estimates_distances():
    vectors = small_updates(8, 20_000, seed=4)
    vectors[2] = -vectors[2]
    vectors[5] = vectors[5] * 10
    exact = score_updates(accepted(vectors))
    draw = random.Random(0)
    sampled = score_updates(accepted(vectors), sample_coordinates=2_000, random_bytes=draw.randbytes)
    assert flagged(exact) == flagged(sampled) == ["site2", "site5"]
    for e, s in zip(exact, sampled):
        assert s.distance == pytest.approx(e.distance, rel=0.15)
