"""A run through the REST API on a real local stack: an allowed compose -> run -> the signed result.

Refusals (before a run starts, and during one) are in test_api_refusals.py.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import httpx
import pytest

from cvm.receipt import envelope_digest
from tests.test_api_composes import api_stack, submission
from tests.test_backend import seal_inputs

STATES = ["queued", "booting", "running", "signing", "done"]


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    with api_stack(tmp_path_factory.mktemp("api-runs"), epsilon_budget=2.0) as running:
        yield running


@pytest.fixture(scope="module")
def allowed(api):
    return allowed_compose(api, "runs-test")


def allowed_compose(api, study: str) -> tuple[str, list[Path]]:
    """A compose submitted through the API, approved by both owners, and the owners' sealed inputs for it."""
    with api.client() as client:
        h = client.post("/composes", json=submission(api.owners, study=study)).json()["compose_hash"]
    for owner in api.owners.values():
        api.study.approve(bytes.fromhex(h), owner)
    return h, seal_inputs(api.stack, bytes.fromhex(h))


def uploads(sealed: list[Path]) -> list:
    return [("sealed", (path.name, path.read_bytes())) for path in sealed]


def follow(client: httpx.Client, run_id: str, timeout_s: float = 180) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        run = client.get(f"/runs/{run_id}").json()
        if run["state"] in ("done", "failed"):
            return run
        time.sleep(0.2)
    raise AssertionError(f"run {run_id} did not finish within {timeout_s} s")


@pytest.fixture(scope="module")
def first_run(api, allowed):
    h, sealed = allowed
    with api.client() as client:
        started = client.post(f"/composes/{h}/runs", files=uploads(sealed))
        assert started.status_code == 202, started.text
        run_id = started.json()["run_id"]
        early = client.get(f"/runs/{run_id}/result")
        final = follow(client, run_id)
        result = client.get(f"/runs/{run_id}/result")
    return started, early, final, result


def test_a_run_on_an_allowed_compose_ends_with_a_signed_result(api, allowed, first_run):
    h, sealed = allowed
    started, _early, final, result = first_run
    assert started.headers["location"] == f"/runs/{started.json()['run_id']}"
    assert started.json()["state"] == "queued" and started.json()["simulated"] is True
    assert final["state"] == "done" and final["reason"] is None, final
    seen = [step["state"] for step in final["progress"]]
    assert seen[:2] == ["queued", "booting"] and seen[-1] == "done"
    assert seen == [state for state in STATES if state in seen]       # in order, none repeated
    assert final["isolated"] is (shutil.which("bwrap") is not None)
    assert final["isolation"].startswith("bubblewrap sandbox" if final["isolated"] else "NOT ISOLATED")
    assert {i["owner"] for i in final["inputs"]} == {owner.address for owner in api.owners.values()}
    assert [i["bytes"] for i in final["inputs"]] == [path.stat().st_size for path in sealed]

    assert result.status_code == 200 and result.headers["x-sealroom-simulated"] == "true"
    attestation = result.json()
    envelope = attestation["envelope"]
    assert attestation["simulated"] is True and envelope["simulated"] is True
    assert envelope["compose_hash"] == h and envelope["app_id"].lower() == api.study.address.lower()
    assert attestation["envelope_digest"] == envelope_digest(envelope).hex()
    # The digests the API read from the uploads' envelopes are the ones the CVM measured and the receipt lists.
    assert {i["ciphertext_sha256"] for i in envelope["inputs"].values()} == \
        {i["ciphertext_sha256"] for i in final["inputs"]}
    assert envelope["epsilon_spent"] == pytest.approx(1.0) and envelope["epsilon_remaining"] == pytest.approx(1.0)
    assert json.loads(attestation["app_compose"])["name"] == "runs-test"


def test_the_result_exists_only_once_the_run_is_done(first_run):
    _started, early, _final, _result = first_run
    assert early.status_code == 409 and "a result exists only once it is done" in early.json()["detail"]


def test_another_analyst_cannot_see_the_run(api, first_run):
    run_id = first_run[0].json()["run_id"]
    with api.client(api.other_headers) as bob:
        assert bob.get(f"/runs/{run_id}").status_code == 404
        assert bob.get(f"/runs/{run_id}/result").status_code == 404
