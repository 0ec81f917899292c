"""The analysts' REST API on a real local stack: authentication, compose submission and proposal, approval state."""

from __future__ import annotations

import copy
import hashlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from compose.app_compose import build_app_compose, compose_hash, manifest_from_app_compose, normalized_json_bytes
from compose.manifest import StudyManifest
from compose.auth import issue_token
from compose.stack_file import read_keystore
from contracts.chain import DstackApp
from sealing_cli.stack import LocalStack
from tests.study_world import IMAGE_DIGEST, SITES, STATS_PARAMS, YAML, start_study_stack


@dataclass
class Api:
    stack: LocalStack
    url: str
    owners: dict
    study: DstackApp
    headers: dict                # alice's
    other_headers: dict          # bob's: another analyst

    def client(self, headers: dict | None = None) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers if headers is None else headers, timeout=60)


@contextmanager
def api_stack(state: Path, *, epsilon_budget: float = 2.0):
    """A local stack with its REST API running and two analysts, alice and bob."""
    with start_study_stack(state, epsilon_budget=epsilon_budget) as stack:
        url = stack.start_api()
        api_state = Path(stack.description.services["api"]["state_dir"])
        d = stack.description
        yield Api(stack, url, {o.name: read_keystore(o.keystore, d.dev_keystore_password) for o in d.owners},
                  DstackApp(stack.chain, d.dstack_app),
                  {"Authorization": f"Bearer {issue_token(api_state, 'alice')}"},
                  {"Authorization": f"Bearer {issue_token(api_state, 'bob')}"})


def submission(owners: dict, *, study: str, epsilon: float = 1.0) -> dict:
    manifest = {"study": study, "inputs": [{"owner": owners[n].address, "name": site} for n, site in SITES.items()],
                "analysis": {"kind": "dp_stats", "params": STATS_PARAMS}, "epsilon": epsilon, "delta": 1e-6,
                "output_type": "aggregate_stats"}
    return {"name": study, "docker_compose": YAML, "manifest": manifest}


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    with api_stack(tmp_path_factory.mktemp("api")) as running:
        yield running


@pytest.fixture(scope="module")
def submitted(api):
    with api.client() as client:
        reply = client.post("/composes", json=submission(api.owners, study="composes-test"))
    assert reply.status_code == 201, reply.text
    return reply.json()


def test_openapi_is_served(api):
    spec = httpx.get(f"{api.url}/openapi.json").json()
    assert {"/composes", "/composes/{compose_hash_hex}", "/composes/{compose_hash_hex}/app-compose.json",
            "/composes/{compose_hash_hex}/runs", "/runs/{run_id}", "/runs/{run_id}/result"} <= set(spec["paths"])
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


PROTECTED = [("POST", "/composes"), ("GET", "/composes/" + "0" * 64), ("POST", "/composes/" + "0" * 64 + "/runs"),
             ("GET", "/runs/0123456789abcdef"), ("GET", "/runs/0123456789abcdef/result")]


@pytest.mark.parametrize(("method", "path"), PROTECTED)
@pytest.mark.parametrize(("headers", "reason"), [
    ({}, "no API token"),
    ({"Authorization": "Bearer sealroom-analyst-v1.not-issued"}, "not one an analyst holds"),
    ({"Authorization": "Basic YWxpY2U6cHc="}, "not a bearer token"),
])
def test_requests_without_an_analysts_token_are_refused(api, method, path, headers, reason):
    reply = httpx.request(method, f"{api.url}{path}", headers=headers, json={})
    assert reply.status_code == 401 and reason in reply.json()["detail"]
    assert reply.headers["www-authenticate"] == "Bearer"


def test_the_compose_hash_is_the_hash_of_the_returned_bytes_and_is_proposed_on_chain(api, submitted):
    body = submitted["app_compose"].encode("utf-8")
    h = submitted["compose_hash"]
    assert compose_hash(body).hex() == h == hashlib.sha256(body).hexdigest()
    assert manifest_from_app_compose(body).model_dump(mode="json")["study"] == "composes-test"
    status = api.study.status(bytes.fromhex(h))
    assert status.proposed and not status.allowed and status.approvals == 0
    assert status.uri == submitted["app_compose_url"] == submitted["proposal"]["uri"]
    assert submitted["app_id"] == api.study.address
    assert submitted["proposal"]["proposer"] == api.stack.description.services["api"]["proposer"]
    assert submitted["approval"]["state"] == "pending"
    # The on-chain URI serves exactly the measured bytes, to anyone (owners review it without a token).
    served = httpx.get(status.uri)
    assert served.status_code == 200 and served.content == body


def test_the_approval_state_follows_the_chain(api):
    with api.client() as client:
        h = client.post("/composes", json=submission(api.owners, study="approval-test")).json()["compose_hash"]
        api.study.approve(bytes.fromhex(h), api.owners["A"])
        half = client.get(f"/composes/{h}").json()["approval"]
        api.study.approve(bytes.fromhex(h), api.owners["B"])
        full = client.get(f"/composes/{h}").json()["approval"]
        api.study.revoke(bytes.fromhex(h), api.owners["A"])
        revoked = client.get(f"/composes/{h}").json()["approval"]
    assert (half["state"], half["approvals"], half["approvers"]) == ("pending", 1, [api.owners["A"].address])
    assert (full["state"], full["approvals"], full["threshold"]) == ("allowed", 2, 2)
    assert revoked["state"] == "revoked"
    assert full["epsilon_budget"] == pytest.approx(2.0)


def test_submitting_the_same_compose_again_is_refused_by_the_chain(api, submitted):
    with api.client() as client:
        again = client.post("/composes", json=submission(api.owners, study="composes-test"))
    assert again.status_code == 409 and "already proposed" in again.json()["detail"]


@pytest.mark.parametrize(("change", "status", "fragment"), [
    (lambda s: s.update(docker_compose="services: [unclosed"), 422, "not valid YAML"),
    (lambda s: s.update(docker_compose="services: {}\n"), 422, "at least one service"),
    (lambda s: s["manifest"].update(epsilon=-1.0), 422, "greater than 0"),
    (lambda s: s["manifest"].update(output_type="raw_rows"), 422, "output_type"),
    (lambda s: s.update(extra="field"), 422, "extra"),
])
def test_an_invalid_submission_is_refused_and_nothing_is_proposed(api, change, status, fragment):
    body = submission(api.owners, study="invalid-test")
    change(body)
    proposer = api.stack.description.services["api"]["proposer"]
    sent = api.stack.chain.w3.eth.get_transaction_count(proposer)
    with api.client() as client:
        reply = client.post("/composes", json=body)
    assert reply.status_code == status and fragment in reply.text
    assert api.stack.chain.w3.eth.get_transaction_count(proposer) == sent      # no proposal was sent


@pytest.mark.parametrize(("image", "fragment"), [
    ("sealroom/study-runner:latest", "named by tag, not by digest"),
    ("sealroom/study-runner", "named by tag, not by digest"),
    ("sealroom/study-runner@sha256:" + "0" * 64, "placeholder"),
    ("sealroom/study-runner@sha256:" + "ab" * 32, f"its digest is not an allowed study image digest (allowed here: "
                                                  f"{IMAGE_DIGEST})"),
    (f"sealroom/study-runner:v1@{IMAGE_DIGEST}", "carries a tag as well as a digest"),
    (f"docker.io/library/python@{IMAGE_DIGEST}", "only sealroom/study-runner images may run"),
], ids=["tag", "no-tag", "placeholder", "unknown-digest", "tag-and-digest", "other-repository"])
def test_a_compose_that_does_not_pin_an_allowed_study_image_is_refused_before_anything_is_proposed(api, image,
                                                                                                   fragment):
    """Issue 12: the services must name sealroom/study-runner by the digest of a known build (here the API's
    explicit allowlist, IMAGE_DIGEST); anything else is refused with 422 and the reason, before a proposal."""
    body = submission(api.owners, study="image-test")
    body["docker_compose"] = f"services:\n  study:\n    image: {image}\n    command: [python, -m, cvm.run]\n"
    proposer = api.stack.description.services["api"]["proposer"]
    sent = api.stack.chain.w3.eth.get_transaction_count(proposer)
    stored = set((Path(api.stack.description.services["api"]["state_dir"]) / "composes").iterdir())
    with api.client() as client:
        reply = client.post("/composes", json=body)
    assert reply.status_code == 422, reply.text
    detail = reply.json()["detail"]
    assert detail.startswith("docker_compose: the study image is refused: service 1 of 1") and fragment in detail
    assert image not in detail.replace("pin sealroom/study-runner@sha256:<digest>", "")   # no echo of the request
    assert api.stack.chain.w3.eth.get_transaction_count(proposer) == sent      # no proposal was sent
    assert set((Path(api.stack.description.services["api"]["state_dir"]) / "composes").iterdir()) == stored


def test_a_run_on_a_pending_compose_never_starts(api, submitted):
    h = submitted["compose_hash"]
    files = [("sealed", (f"{site}.sealed", b"ciphertext")) for site in SITES.values()]
    with api.client() as client:
        reply = client.post(f"/composes/{h}/runs", files=files)
    assert reply.status_code == 409
    assert "Compose hash not allowed" in reply.json()["detail"] and "not started" in reply.json()["detail"]
    runs = Path(api.stack.description.services["api"]["state_dir"]) / "runs"
    assert list(runs.iterdir()) == []


def test_unknown_composes_and_runs_are_not_found(api):
    with api.client() as client:
        assert client.get("/composes/" + "ab" * 32).status_code == 404
        assert client.get("/runs/0123456789abcdef").status_code == 404
        assert client.get("/composes/not-a-hash").status_code == 422
    assert httpx.get(f"{api.url}/composes/{'ab' * 32}/app-compose.json").status_code == 404


@pytest.mark.parametrize(("edit", "field"), [
    (lambda params: params.update(bogus_setting=1), "bogus_setting"),
    (lambda params: params["queries"][1].update(bounds="18 to 95"), "bounds"),
    (lambda params: params.update(max_rows=-5), "max_rows"),
])
def test_a_recipe_its_analysis_cannot_run_is_refused_before_anything_is_proposed(api, edit, field):
    """Issue 11: an unknown setting, a wrong type or an out-of-range bound used to be proposed, approved and paid
    for before the CVM refused it. Now the API refuses it with 422 naming the field, and nothing is proposed.
    (A misspelt column is caught when the run starts, against the sealed files' schemas: test_spend_guards.)"""
    body = submission(api.owners, study=f"refused-{field}")
    body["manifest"]["analysis"]["params"] = params = copy.deepcopy(STATS_PARAMS)
    edit(params)
    with api.client() as client:
        reply = client.post("/composes", json=body)
    assert reply.status_code == 422, reply.text
    assert field in reply.text
    would_be = compose_hash(normalized_json_bytes(build_app_compose(
        body["name"], body["docker_compose"], StudyManifest.model_validate(body["manifest"]))))
    assert not api.study.status(would_be).proposed
