"""The typed API client (compose.client), sync and async, against a real local stack with its REST API: every
endpoint, streamed uploads, progress, the signed result, and each refusal as its own exception with the server's
reason. Plus what needs no stack: answers the client must not trust, and the run view's training progress."""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from compose.api.queue import Run, RunQueue
from compose.backends import RunStatus
from compose.backends.process import epochs_done
from compose.client import (
    ApiUnreachable,
    AsyncSealroomClient,
    BadRequest,
    Conflict,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    ResponseInvalid,
    SealroomClient,
    Unauthorized,
)
from cvm.labels import EPOCH_PROGRESS
from tests.test_api_composes import api_stack, submission
from tests.test_backend import seal_inputs

STATES = ["queued", "booting", "running", "signing", "done"]


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    with api_stack(tmp_path_factory.mktemp("client"), epsilon_budget=2.0) as running:
        yield running


def token(headers: dict) -> str:
    return headers["Authorization"].removeprefix("Bearer ")


def client(api, headers: dict | None = None) -> SealroomClient:
    return SealroomClient(api.url, token(headers or api.headers))


def approve(api, h: str) -> None:
    for owner in api.owners.values():
        api.study.approve(bytes.fromhex(h), owner)


@pytest.fixture(scope="module")
def submitted(api):
    with client(api) as alice:
        return alice.submit(submission(api.owners, study="client-sync", epsilon=0.5))


@pytest.fixture(scope="module")
def sync_run(api, submitted):
    """An approved compose run to the end through the sync client, with its upload and progress reports."""
    h = submitted.compose_hash
    approve(api, h)
    sealed = seal_inputs(api.stack, bytes.fromhex(h))
    uploads, progress = [], []
    with client(api) as alice:
        started = alice.start_run(h, sealed, on_upload=lambda sent, total: uploads.append((sent, total)))
        final = alice.wait(started.run_id, poll_s=0.2, timeout_s=240, on_progress=progress.append)
        result = alice.result(started.run_id)
        runs = alice.runs()
    return SimpleNamespace(h=h, sealed=sealed, started=started, final=final, result=result, runs=runs,
                           uploads=uploads, progress=progress)


def test_submit_returns_the_measured_bytes_and_the_compose_reads_back(api, submitted):
    h = submitted.compose_hash
    assert hashlib.sha256(submitted.app_compose.encode()).hexdigest() == h
    assert submitted.name == "client-sync" and submitted.approval.state == "pending"
    assert submitted.proposal.uri == submitted.app_compose_url
    with client(api) as alice:
        assert alice.compose(h).approval.state in ("pending", "allowed")
        assert alice.compose("0x" + h.upper()).compose_hash == h             # 0x and case are the client's
        assert alice.app_compose(h) == submitted.app_compose.encode()
        listed = {view.compose_hash: view for view in alice.composes()}
        assert listed[h].name == "client-sync"
        assert alice.openapi()["info"]["title"] == "Sealroom analysts' API"
    with SealroomClient(api.url, None) as anyone:                            # the review URI needs no token
        assert anyone.app_compose(h) == submitted.app_compose.encode()


def test_a_run_streams_its_files_reports_progress_and_ends_with_the_signed_result(api, sync_run):
    total = sum(path.stat().st_size for path in sync_run.sealed)
    sent = [s for s, _ in sync_run.uploads]
    assert sent == sorted(sent) and sent[-1] == total and {t for _, t in sync_run.uploads} == {total}
    assert len(sync_run.uploads) >= len(sync_run.sealed)                     # read in chunks, not whole
    assert sync_run.started.state == "queued"
    assert sync_run.final.state == "done" and sync_run.final.reason is None, sync_run.final
    assert sync_run.final.training is None                                  # dp_stats: no epochs
    seen = [view.state for view in sync_run.progress]
    assert seen == [state for state in STATES if state in seen] and seen[-1] == "done"
    assert [r.run_id for r in sync_run.runs][0] == sync_run.started.run_id
    result = sync_run.result
    assert result.simulated is True
    assert result.json()["envelope"]["compose_hash"] == sync_run.h
    assert result.payload["output_type"] == "aggregate_stats"
    assert {r["name"] for r in result.payload["results"]} == {"patients", "mean_age"}


def test_refusals_are_typed_and_carry_the_servers_reason(api, submitted, sync_run):
    with client(api) as alice:
        with pytest.raises(NotFound, match="no compose") as missing:
            alice.compose("0" * 64)
        assert missing.value.status == 404
        with pytest.raises(NotFound, match="no run"):
            alice.run("0123456789abcdef")
        with pytest.raises(Conflict) as again:                      # a hash is proposed once
            alice.submit(submission(api.owners, study="client-sync", epsilon=0.5))
        assert again.value.status == 409
        pending = alice.submit(submission(api.owners, study="client-pending", epsilon=0.5))
        with pytest.raises(Conflict, match="does not allow compose"):
            alice.start_run(pending.compose_hash, sync_run.sealed)
        bad = submission(api.owners, study="client-bad")
        bad["manifest"]["analysis"]["params"] = {"max_rowz": 10, "queries": [
            {"kind": "mean", "name": "m", "column": "age", "bounds": [95, 18]}]}
        with pytest.raises(InvalidRequest) as invalid:
            alice.submit(bad)
        fields = [field for field, _ in invalid.value.problems]
        assert invalid.value.status == 422
        assert "analysis.params.max_rowz" in fields and "analysis.params.queries[0].bounds" in fields
        assert "did you mean 'max_rows'" in invalid.value.reason
        unknown = submission(api.owners, study="client-unknown")
        unknown["manifest"]["epsilonn"] = 1.0
        with pytest.raises(InvalidRequest) as body:
            alice.submit(unknown)
        assert body.value.field == "manifest.epsilonn"
        huge = submission(api.owners, study="client-huge")
        huge["docker_compose"] += "#" * (1 << 20)
        with pytest.raises(PayloadTooLarge):
            alice.submit(huge)
        deep = submission(api.owners, study="client-deep")
        deep["docker_compose"] = "services: " + "[" * 80 + "]" * 80 + "\n"
        with pytest.raises(BadRequest, match="docker_compose"):
            alice.submit(deep)
    with client(api, api.other_headers) as bob, pytest.raises(NotFound):   # bob does not see alice's run
        bob.run(sync_run.started.run_id)
    with SealroomClient(api.url, "sealroom-analyst-v1.never-issued") as stranger:
        with pytest.raises(Unauthorized, match="not one an analyst holds") as refused:
            stranger.runs()
        assert refused.value.status == 401
    with SealroomClient("http://127.0.0.1:9", "t") as nobody:       # nothing listens on the discard port
        with pytest.raises(ApiUnreachable) as down:
            nobody.runs()
        assert down.value.status is None


def test_the_async_client_does_all_of_it_too(api, sync_run):
    async def scenario() -> dict:
        async with AsyncSealroomClient(api.url, token(api.headers)) as alice:
            submitted = await alice.submit(submission(api.owners, study="client-async", epsilon=0.5))
            h = submitted.compose_hash
            assert (await alice.compose(h)).approval.state == "pending"
            assert await alice.app_compose(h) == submitted.app_compose.encode()
            assert h in {view.compose_hash for view in await alice.composes()}
            approve(api, h)
            sealed = seal_inputs(api.stack, bytes.fromhex(h))
            uploads, progress = [], []
            started = await alice.start_run(h, sealed, on_upload=lambda sent, total: uploads.append(sent))
            final = await alice.wait(started.run_id, poll_s=0.2, timeout_s=240, on_progress=progress.append)
            result = await alice.result(started.run_id)
            runs = [run.run_id for run in await alice.runs()]
            with pytest.raises(NotFound):
                await alice.compose("1" * 64)
            with pytest.raises(Conflict):
                await alice.submit(submission(api.owners, study="client-async", epsilon=0.5))
        async with AsyncSealroomClient(api.url, "sealroom-analyst-v1.never-issued") as stranger:
            with pytest.raises(Unauthorized):
                await stranger.runs()
        async with AsyncSealroomClient("http://127.0.0.1:9", "t") as nobody:
            with pytest.raises(ApiUnreachable):
                await nobody.runs()
        return {"h": h, "sealed": sealed, "uploads": uploads, "progress": progress, "final": final,
                "result": result, "runs": runs, "started": started}

    outcome = asyncio.run(scenario())
    assert outcome["uploads"][-1] == sum(path.stat().st_size for path in outcome["sealed"])
    assert outcome["final"].state == "done", outcome["final"]
    assert [view.state for view in outcome["progress"]][-1] == "done"
    assert outcome["runs"][:2] == [outcome["started"].run_id, sync_run.started.run_id]
    assert outcome["result"].simulated and outcome["result"].json()["envelope"]["compose_hash"] == outcome["h"]


# ---- no stack: answers the client must not trust ----------------------------------------------------------------

def _answering(body: dict) -> httpx.MockTransport:
    return httpx.MockTransport(lambda request: httpx.Response(201, json=body))


def test_bytes_that_do_not_hash_to_their_compose_hash_are_refused(tmp_path):
    h = "ab" * 32
    forged = {"compose_hash": h, "app_id": "0x" + "11" * 20, "app_compose_url": "http://api/x", "name": "x",
              "app_compose": "{}", "approval": {"state": "pending", "approvals": 0, "threshold": 1, "owners": [],
                                                 "approvers": [], "uri": "", "epsilon_budget": 1.0,
                                                 "epsilon_spent": 0.0, "epsilon_remaining": 1.0},
              "proposal": {"tx": "0x", "block": 1, "proposer": "0x", "uri": ""}}
    with SealroomClient("http://api", "t", transport=_answering(forged)) as client_:
        with pytest.raises(ResponseInvalid, match="do not hash"):
            client_.submit({"name": "x", "docker_compose": "services: {}", "manifest": {}})
    served = httpx.MockTransport(lambda request: httpx.Response(200, content=b'{"not": "it"}'))
    with SealroomClient("http://api", None, transport=served) as client_:
        with pytest.raises(ResponseInvalid, match="do not hash"):
            client_.app_compose(h)
    garbage = httpx.MockTransport(lambda request: httpx.Response(200, json={"run_id": 1}))
    with SealroomClient("http://api", "t", transport=garbage) as client_:
        with pytest.raises(ResponseInvalid, match="not what it promises"):
            client_.run("0123456789abcdef")


def test_another_manifest_than_the_one_sent_is_refused(api, submitted):
    """The API's bytes hash right but carry another manifest: the client says so (it was proposed anyway)."""
    sent = submission(api.owners, study="something-else", epsilon=0.5)
    answer = json.loads(submitted.model_dump_json())
    with SealroomClient("http://api", "t", transport=_answering(answer)) as client_:
        with pytest.raises(ResponseInvalid, match="another manifest"):
            client_.submit(sent)


def test_a_malformed_compose_hash_is_a_caller_mistake():
    with SealroomClient("http://api", "t", transport=_answering({})) as client_:
        with pytest.raises(ValueError, match="64 hex digits"):
            client_.compose("0x1234")


# ---- no stack: training progress in the run view ------------------------------------------------------------------

def test_the_backend_reads_the_last_epoch_line_of_the_runs_log(tmp_path):
    log = tmp_path / "run.log"
    assert epochs_done(log) is None                                        # no log yet
    log.write_text("unwrapping\n")
    assert epochs_done(log) is None
    log.write_text("x" * 20_000 + f"\n{EPOCH_PROGRESS} 1/3\nnoise\n{EPOCH_PROGRESS} 2/3\nlater line\n")
    assert epochs_done(log) == 2
    log.write_text(f"{EPOCH_PROGRESS} lots/3\n")
    assert epochs_done(log) is None


class _Handle:
    """A run that reports epochs 1, 2, then claims 7 of 3 and finishes."""

    def __init__(self, result: Path) -> None:
        self.result_path = result
        self._script = [RunStatus("running", epochs_done=1), RunStatus("running", epochs_done=2),
                        RunStatus("signing", epochs_done=7), RunStatus("done", epochs_done=7)]

    def poll(self) -> RunStatus:
        return self._script.pop(0) if len(self._script) > 1 else self._script[0]

    def stop(self) -> None:
        pass


def test_the_run_view_shows_epochs_within_the_manifests_count(tmp_path):
    seen: list = []
    launched = threading.Event()

    class Backend:
        simulated = True
        isolation = SimpleNamespace(isolated=False, description="NOT ISOLATED: test")

        def launch(self, run_dir, app_compose_path, sealed_files):
            launched.set()
            return _Handle(tmp_path / "attestation.json")

    queue = RunQueue(Backend(), clock=lambda: 0.0, timeout_s=30, poll_s=0.01)
    training = Run(run_id="0" * 16, compose_hash="a" * 64, analyst="alice", run_dir=tmp_path, sealed=[], inputs=[],
                   epochs=3)
    stats = Run(run_id="1" * 16, compose_hash="a" * 64, analyst="alice", run_dir=tmp_path, sealed=[], inputs=[])
    try:
        assert queue.submit(training, tmp_path / "c.json").training.model_dump() == {"epochs_done": 0, "epochs": 3}
        queue.submit(stats, tmp_path / "c.json")
        for _ in range(500):
            seen.append(queue.view(training))
            if seen[-1].state == "done" and queue.view(stats).state == "done":
                break
            threading.Event().wait(0.01)
    finally:
        queue.close()
    assert launched.is_set() and seen[-1].state == "done"
    assert seen[-1].training.epochs_done == 3                               # 7 claimed, capped at the manifest's 3
    assert queue.view(stats).training is None
    assert [run.run_id for run in queue.of("alice")] == ["1" * 16, "0" * 16] and queue.of("bob") == []
