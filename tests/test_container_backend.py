"""The container backend: study runs in a container of the pinned study image, driven through the docker SDK
against podman's Docker-compatible service (compose/backends/container.py, compose/backends/engine.py).

These tests need a container engine. scripts/setup.sh installs podman and runc from Debian; the backend starts
`podman system service` itself. Only where no engine can be started at all are they skipped — with a reason that
starts with "NO CONTAINER ENGINE" in pytest's summary, and a banner on stderr.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from compose.app_compose import build_app_compose, compose_hash, normalized_json_bytes
from compose.backends import LaunchFailed, RunStatus
from compose.backends.container import ContainerBackend
from compose.backends.engine import EngineUnavailable, connect_engine
from compose.image import PLACEHOLDER_DIGEST, build_study_image, default_image_dir
from compose.manifest import StudyManifest
from compose.stack_file import read_keystore
from contracts.chain import DstackApp
from cvm.receipt import envelope_digest
from tests.study_world import SITES, STATS_PARAMS, start_study_stack
from tests.test_backend import follow, seal_inputs

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    state = tmp_path_factory.mktemp("engine")
    try:
        connected = connect_engine(state)
    except EngineUnavailable as error:
        banner = f"NO CONTAINER ENGINE: the container backend tests are SKIPPED: {error}"
        print("\n" + "!" * 100 + f"\n{banner}\n" + "!" * 100, file=sys.stderr)
        pytest.skip(banner)
    yield connected
    connected.close()


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    state = tmp_path_factory.mktemp("image-state")
    record = build_study_image(default_image_dir(state), log=lambda message: None)
    return default_image_dir(state), record


def recipe(owners: dict, image_ref: str, *, study: str, command: list[str] | None = None) -> bytes:
    service = {"image": image_ref, "command": command or ["python", "-m", "cvm.run"]}
    manifest = StudyManifest.model_validate({
        "study": study, "inputs": [{"owner": owners[n].address, "name": site} for n, site in SITES.items()],
        "analysis": {"kind": "dp_stats", "params": STATS_PARAMS},
        "epsilon": 0.5, "delta": 1e-6, "output_type": "aggregate_stats"})
    return normalized_json_bytes(build_app_compose(study, yaml.safe_dump({"services": {"study": service}}), manifest))


PROBE = r"""
import json, os, socket, sys
args = sys.argv[1:]
out = args[args.index("--out") + 1]
sealed = args[args.index("--sealed") + 1]
kms_port, rpc_port, host_port, host_ip = json.loads(PARAMS)
def talk(host, port):
    try:
        with socket.create_connection((host, port), timeout=3):
            return "connected"
    except OSError as exc:
        return type(exc).__name__
def write(path):
    try:
        with open(path, "a") as f:
            f.write("x")
        return "written"
    except OSError as exc:
        return exc.strerror
from dstack_sdk import DstackClient
info = DstackClient().info()
mounts = []
for line in open("/proc/self/mountinfo"):
    left, _, right = line.partition(" - ")
    fields, (fstype, source, options) = left.split(), right.split()[:3]
    mounts.append([fields[4], fields[5].split(","), fstype])
status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
seen = {
    "uid": os.getuid(), "gid": os.getgid(), "cap_eff": status["CapEff"].strip(),
    "no_new_privs": status["NoNewPrivs"].strip(), "env": sorted(os.environ), "cwd": os.getcwd(),
    "agent": {"app_id": info.app_id, "compose_hash": info.compose_hash},
    "kms": talk("127.0.0.1", kms_port), "rpc": talk("127.0.0.1", rpc_port),
    "host_loopback": talk("127.0.0.1", host_port),
    "host_address": talk(host_ip, host_port) if host_ip else "skipped",
    "writes": {p: write(p) for p in ["/tmp/scratch-probe", "/opt/sealroom/app/cvm/run.py", "/etc/passwd",
                                     "/probe", "/run/sealroom/probe", "/var/run/probe", sealed, "/usr/probe"]},
    "mounts": mounts,
}
with open(out, "w") as f:
    json.dump(seen, f)
"""


class World:
    def __init__(self, stack, owners, image_dir, record, engine):
        self.stack, self.owners, self.image_dir, self.record, self.engine = stack, owners, image_dir, record, engine
        self.app = DstackApp(stack.chain, stack.description.dstack_app)

    def approved(self, body: bytes, name: str) -> Path:
        path = self.stack.state_dir / f"{name}.app-compose.json"
        path.write_bytes(body)
        h = compose_hash(body)
        self.app.propose(h, path.as_uri(), self.owners["A"])
        for owner in SITES:
            self.app.approve(h, self.owners[owner])
        return path

    def backend(self, **overrides) -> ContainerBackend:
        d = self.stack.description
        settings = dict(engine=self.engine, image_dir=self.image_dir, app_id=d.dstack_app,
                        kms_url=d.services["kms"]["url"], rpc_url=d.rpc_url, dstack_kms=d.dstack_kms,
                        simulated_tdx_dir=self.stack.state_dir / "simulated-tdx", cpus=1.5, memory="3g")
        return ContainerBackend(**{**settings, **overrides})


@pytest.fixture(scope="module")
def world(tmp_path_factory, engine, image):
    image_dir, record = image
    with start_study_stack(tmp_path_factory.mktemp("container"), epsilon_budget=4.0) as stack:
        d = stack.description
        owners = {o.name: read_keystore(o.keystore, d.dev_keystore_password) for o in d.owners}
        yield World(stack, owners, image_dir, record, engine)


def test_a_study_runs_in_the_pinned_image_and_returns_a_signed_receipt(world):
    body = recipe(world.owners, world.record.reference, study="container-run")
    compose_path = world.approved(body, "container-run")
    sealed = seal_inputs(world.stack, compose_hash(body), rows=1_000)
    backend = world.backend()
    assert backend.isolation.isolated and backend.simulated
    run_dir = world.stack.state_dir / "runs" / "container-run"
    handle = backend.launch(run_dir, compose_path, sealed)
    container_id = handle.container.id
    try:
        seen = follow(handle, timeout_s=600)
    finally:
        handle.stop()
    assert seen[-1] == RunStatus("done"), (seen, (run_dir / "run.log").read_text(errors="replace")[-3000:])
    attestation = json.loads(handle.result_path.read_text())
    envelope = attestation["envelope"]
    assert envelope["compose_hash"] == compose_hash(body).hex() and attestation["simulated"] is True
    assert attestation["envelope_digest"] == envelope_digest(envelope).hex()
    assert handle.signing_seen
    assert (run_dir / "run.log").stat().st_size > 0 and (run_dir / "agent.log").exists()   # logs stay with the run
    with pytest.raises(Exception, match="(?i)no such container|not found"):
        world.engine.client.containers.get(container_id)                                    # the container is gone
    handle.stop()                                                                            # twice is harmless


def _host_address() -> str | None:
    try:
        addresses = subprocess.run(["hostname", "-I"], capture_output=True, text=True, timeout=5).stdout.split()
    except OSError:
        return None
    return next((a for a in addresses if "." in a and not a.startswith("127.")), None)


def test_the_container_reaches_only_the_agent_and_its_relays_and_writes_only_scratch(world):
    # A host service on every address: neither its loopback port nor the host's own address is reachable inside.
    server = socket.create_server(("0.0.0.0", 0))
    accepted = []

    def accept_loop():
        while True:
            try:
                conn, peer = server.accept()
            except OSError:
                return
            accepted.append(peer)
            conn.close()
    threading.Thread(target=accept_loop, daemon=True).start()
    d = world.stack.description
    kms_port, rpc_port = int(d.services["kms"]["url"].rsplit(":", 1)[1]), int(d.rpc_url.rsplit(":", 1)[1])
    params = json.dumps([kms_port, rpc_port, server.getsockname()[1], _host_address()])
    probe = PROBE.replace("json.loads(PARAMS)", f"json.loads({params!r})")
    body = recipe(world.owners, world.record.reference, study="container-probe", command=["python", "-c", probe])
    compose_path = world.approved(body, "container-probe")
    sealed = seal_inputs(world.stack, compose_hash(body), rows=50)
    run_dir = world.stack.state_dir / "runs" / "container-probe"
    handle = world.backend().launch(run_dir, compose_path, sealed)
    try:
        seen = follow(handle, timeout_s=300)
    finally:
        handle.stop()
        server.close()
    assert seen[-1] == RunStatus("done"), (seen, (run_dir / "run.log").read_text(errors="replace")[-3000:])
    inside = json.loads(handle.result_path.read_text())
    assert inside["uid"] == 10001 and inside["gid"] == 10001
    assert int(inside["cap_eff"], 16) == 0 and inside["no_new_privs"] == "1"
    # dstack-sdk found the guest agent at /var/run/dstack.sock by itself, and it is this recipe's CVM.
    assert "DSTACK_SIMULATOR_ENDPOINT" not in inside["env"]
    assert inside["agent"]["compose_hash"].removeprefix("0x") == compose_hash(body).hex()
    assert inside["agent"]["app_id"].removeprefix("0x").lower() == d.dstack_app.removeprefix("0x").lower()
    assert inside["kms"] == "connected" and inside["rpc"] == "connected"                # the two relays
    assert inside["host_loopback"] == "ConnectionRefusedError"                          # nothing else on loopback
    assert inside["host_address"] in ("skipped", "OSError") or inside["host_address"].endswith("Error")
    assert inside["host_address"] != "connected" and not accepted
    writes = inside["writes"]
    assert writes.pop("/tmp/scratch-probe") == "written"
    assert set(writes.values()) <= {"Read-only file system", "Permission denied"}, writes
    # Every writable mount is an in-memory file system of the container's own, none a host folder.
    writable = [(point, fstype) for point, options, fstype in inside["mounts"] if "rw" in options]
    assert writable and {fstype for _, fstype in writable} <= {"tmpfs", "proc", "devpts", "mqueue", "sysfs",
                                                                 "cgroup", "cgroup2", "devtmpfs"}, writable
    assert not [point for point, fstype in writable if fstype not in ("tmpfs", "devpts", "mqueue", "proc")], writable


def test_a_compose_whose_image_is_not_the_built_one_never_boots(world, tmp_path):
    for image_ref, reason in ((f"sealroom/study-runner@{PLACEHOLDER_DIGEST}", "placeholder"),
                              ("sealroom/study-runner:latest", "named by tag"),
                              ("sealroom/study-runner@sha256:" + "ab" * 32, "not an allowed")):
        path = tmp_path / "app-compose.json"
        path.write_bytes(recipe(world.owners, image_ref, study="refused"))
        run_dir = tmp_path / "run"
        with pytest.raises(LaunchFailed, match=reason):
            world.backend().launch(run_dir, path, [])
        assert not (run_dir / "agent.log").exists()       # refused before any CVM was booted


def test_a_run_that_fails_in_the_container_says_why(world):
    body = recipe(world.owners, world.record.reference, study="container-fails",
                  command=["python", "-c", "import sys; print('error: refused on purpose', file=sys.stderr); "
                                           "sys.exit(3)"])
    compose_path = world.approved(body, "container-fails")
    run_dir = world.stack.state_dir / "runs" / "container-fails"
    handle = world.backend().launch(run_dir, compose_path, [])
    try:
        seen = follow(handle, timeout_s=120)
    finally:
        handle.stop()
    assert seen[-1] == RunStatus("failed", "error: refused on purpose")
    assert not handle.result_path.exists()
