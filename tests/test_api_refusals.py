"""Refusals through the REST API on a real local stack, each with its reason: before a run starts (the chain's
409, uploads that could never open) and during one (the KMS refuses a release the privacy budget cannot cover).

The study's budget (ε 0.5) is smaller than one run's ε (1.0), so every run that starts is refused by the KMS.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_api_composes import api_stack
from tests.test_api_runs import allowed_compose, follow, uploads


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    with api_stack(tmp_path_factory.mktemp("api-refusals"), epsilon_budget=0.5) as running:
        yield running


@pytest.fixture(scope="module")
def allowed(api):
    return allowed_compose(api, "refusals-test")


def run_folders(api) -> set[Path]:
    return set((Path(api.stack.description.services["api"]["state_dir"]) / "runs").iterdir())


def test_a_wrong_number_of_sealed_files_is_refused(api, allowed):
    h, sealed = allowed
    with api.client() as client:
        reply = client.post(f"/composes/{h}/runs", files=uploads(sealed[:1]))
    assert reply.status_code == 422 and "lists 2 inputs" in reply.json()["detail"]


@pytest.mark.parametrize(("pick", "fragment"), [
    (lambda sealed: [("sealed", ("a.sealed", b"not a sealed file")), *uploads(sealed[1:])], "is not usable"),
    (lambda sealed: uploads([sealed[0], sealed[0]]), "one per input owner"),
])
def test_uploads_that_could_never_open_are_refused_before_any_cvm_boots(api, allowed, pick, fragment):
    h, sealed = allowed
    before = run_folders(api)
    with api.client() as client:
        reply = client.post(f"/composes/{h}/runs", files=pick(sealed))
    assert reply.status_code == 422 and fragment in reply.json()["detail"]
    assert run_folders(api) == before


def test_a_run_the_budget_cannot_cover_fails_with_the_kms_refusal(api, allowed):
    h, sealed = allowed
    with api.client() as client:
        started = client.post(f"/composes/{h}/runs", files=uploads(sealed))
        assert started.status_code == 202, started.text
        run_id = started.json()["run_id"]
        final = follow(client, run_id)
        result = client.get(f"/runs/{run_id}/result")
    assert final["state"] == "failed" and "budget" in final["reason"], final
    seen = [step["state"] for step in final["progress"]]
    assert seen[:3] == ["queued", "booting", "running"] and "signing" not in seen
    assert final["result_url"] is None
    assert result.status_code == 409 and "failed" in result.json()["detail"]
    assert api.study.budget().spent_micro == 0            # the refusal spent nothing


def test_a_run_on_a_revoked_compose_is_refused(api):
    h, sealed = allowed_compose(api, "refusals-revoked-test")      # its own: the other tests' compose stays allowed
    before = run_folders(api)
    api.study.revoke(bytes.fromhex(h), api.owners["B"])
    with api.client() as client:
        reply = client.post(f"/composes/{h}/runs", files=uploads(sealed))
    assert reply.status_code == 409 and "Compose hash revoked" in reply.json()["detail"]
    assert run_folders(api) == before


def test_a_manifest_asking_for_row_level_output_is_refused_before_anything_is_proposed(api):
    """The output type is fixed by the manifest schema and enforced again by the CVM's gate
    (tests/test_output_gate.py): a row-level output never even becomes a recipe owners could approve."""
    from tests.test_api_composes import submission

    row_level = submission(api.owners, study="row-level-test")
    row_level["manifest"]["output_type"] = "row_level"
    block = api.stack.chain.w3.eth.block_number
    with api.client() as client:
        refused = client.post("/composes", json=row_level)
    assert refused.status_code == 422 and "output_type" in refused.text
    assert api.stack.chain.w3.eth.block_number == block          # nothing proposed on-chain
