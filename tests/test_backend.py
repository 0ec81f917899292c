"""The local-process backend: a SIMULATED CVM per run, sandboxed by bubblewrap where it exists, loudly not otherwise.

Where `bwrap` is on PATH (Debian package bubblewrap) the full run is sandboxed and the sandbox's claims are probed
from inside; elsewhere the run goes unsandboxed and the probe is skipped, saying so. The stop test always runs
the unsandboxed path.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from compose.app_compose import compose_hash
from compose.backends import LaunchFailed, LocalProcessBackend, RunStatus, bwrap_command
from compose.stack_file import read_keystore
from contracts.chain import DstackApp
from cvm.analyses.cohorts import generate_site, write_parquet
from cvm.receipt import envelope_digest
from sealing_cli.main import app as seal_cli
from sealing_cli.stack import LocalStack
from tests.study_world import SITES, make_recipe, start_study_stack

BWRAP = shutil.which("bwrap")
needs_bwrap = pytest.mark.skipif(BWRAP is None, reason="bwrap (Debian package bubblewrap) is not on PATH")
PROJECT_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Study:
    """An allowed recipe and its sealed inputs on a running local stack (no run made yet)."""

    stack: LocalStack
    owners: dict
    compose_path: Path
    compose_hash: bytes
    sealed: list[Path]


def seal_inputs(stack: LocalStack, compose_hash_: bytes, rows: int = 2_000) -> list[Path]:
    """Each of SITES' owners seals a synthetic cohort for this recipe with `seal dataset` (the owners' CLI)."""
    state, d = stack.state_dir, stack.description
    sealed = []
    for owner, site in SITES.items():
        stem = state / f"{site}-{compose_hash_.hex()[:8]}"
        source, out = stem.with_suffix(".parquet"), stem.with_suffix(".sealed")
        write_parquet(generate_site(site, rows, seed=7), source)
        result = CliRunner().invoke(seal_cli, ["dataset", str(source), "--app-id", d.dstack_app, "--compose-hash",
                                               compose_hash_.hex(), "--out", str(out), "--owner", owner,
                                               "--state-dir", str(state)])
        assert result.exit_code == 0, result.output
        sealed.append(out)
    return sealed


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    with start_study_stack(tmp_path_factory.mktemp("backend"), epsilon_budget=4.0) as stack:
        d = stack.description
        owners = {o.name: read_keystore(o.keystore, d.dev_keystore_password) for o in d.owners}
        body = make_recipe(owners, study="backend-test")
        compose_path = stack.state_dir / "app-compose.json"
        compose_path.write_bytes(body)
        h = compose_hash(body)
        study = DstackApp(stack.chain, d.dstack_app)
        study.propose(h, compose_path.as_uri(), owners["A"])
        for owner in SITES:
            study.approve(h, owners[owner])
        yield Study(stack, owners, compose_path, h, seal_inputs(stack, h))


def backend(world, bwrap: str | None) -> LocalProcessBackend:
    stack, d = world.stack, world.stack.description
    return LocalProcessBackend(app_id=d.dstack_app, kms_url=d.services["kms"]["url"], rpc_url=d.rpc_url,
                               dstack_kms=d.dstack_kms, simulated_tdx_dir=stack.state_dir / "simulated-tdx",
                               bwrap=bwrap, hidden=[stack.state_dir])


def follow(handle, timeout_s: float = 120) -> list[RunStatus]:
    seen, deadline = [], time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = handle.poll()
        if not seen or seen[-1] != status:
            seen.append(status)
        if status.state in ("done", "failed"):
            return seen
        time.sleep(0.05)
    raise AssertionError(f"the run did not finish in {timeout_s} s: {seen}")


def run_to_the_end(world, bwrap: str | None, name: str):
    handle = backend(world, bwrap).launch(world.stack.state_dir / "runs" / name, world.compose_path,
                                          world.sealed)
    try:
        seen = follow(handle)
    finally:
        handle.stop()
    return handle, seen


def assert_signed_receipt(world, handle) -> None:
    attestation = json.loads(handle.result_path.read_text())
    envelope = attestation["envelope"]
    assert attestation["simulated"] is True and envelope["simulated"] is True
    assert envelope["compose_hash"] == world.compose_hash.hex()
    assert attestation["envelope_digest"] == envelope_digest(envelope).hex()
    assert handle.signing_seen      # the run asked the agent to sign, through the relay the backend watches


def test_a_run_completes_with_a_signed_receipt(world):
    """In the sandbox where bwrap exists (the API tests then cover it too), unsandboxed elsewhere."""
    local = backend(world, BWRAP)
    assert local.isolation.isolated is (BWRAP is not None) and local.simulated is True
    handle, seen = run_to_the_end(world, BWRAP, "complete")
    assert seen[0].state in ("running", "signing") and seen[-1] == RunStatus("done"), seen
    assert_signed_receipt(world, handle)


def test_without_bwrap_the_run_is_labelled_not_isolated(world):
    isolation = backend(world, None).isolation
    assert isolation.isolated is False
    assert isolation.description.startswith("NOT ISOLATED: bwrap (Debian package bubblewrap) was not found")


def test_a_recipe_the_chain_does_not_allow_never_boots(world, tmp_path):
    unproposed = tmp_path / "app-compose.json"
    unproposed.write_bytes(make_recipe(world.owners, study="never-proposed"))
    run_dir = world.stack.state_dir / "runs" / "unproposed"
    with pytest.raises(LaunchFailed, match="the CVM did not boot") as refused:
        backend(world, None).launch(run_dir, unproposed, world.sealed)
    assert "not allowed" in refused.value.reason.lower()
    assert not (run_dir / "work" / "attestation.json").exists() and not (run_dir / "run.log").exists()


def test_stopping_a_run_ends_the_study_and_its_cvm(world):
    run_dir = world.stack.state_dir / "runs" / "stopped"
    handle = backend(world, None).launch(run_dir, world.compose_path, world.sealed)
    assert handle.poll().state == "running"
    endpoint = handle.agent_endpoint
    with socket.socket(socket.AF_UNIX) as probe:
        probe.connect(str(endpoint))          # the good case: the agent answers while the run lives
    handle.stop()
    handle.stop()     # twice is harmless
    status = handle.poll()
    assert status.state == "failed" and status.reason
    assert not handle.signing_seen and not handle.result_path.exists()
    with socket.socket(socket.AF_UNIX) as probe, pytest.raises(OSError):
        probe.connect(str(endpoint))
    assert not endpoint.parent.parent.exists()        # the short socket folder is gone too


@pytest.mark.parametrize("kms_url", ["https://127.0.0.1:8000", "http://kms.example:8000", "http://localhost:8000",
                                     "http://127.0.0.1"])
def test_the_local_backend_wants_its_services_on_plain_loopback_http(tmp_path, kms_url):
    with pytest.raises(ValueError, match="needs the KMS at http://127.0.0.1:PORT"):
        LocalProcessBackend(app_id="0x" + "11" * 20, kms_url=kms_url, rpc_url="http://127.0.0.1:8545",
                            dstack_kms="0x" + "22" * 20, simulated_tdx_dir=tmp_path, bwrap=None)
    LocalProcessBackend(app_id="0x" + "11" * 20, kms_url="http://127.0.0.1:8000", rpc_url="http://127.0.0.1:8545",
                        dstack_kms="0x" + "22" * 20, simulated_tdx_dir=tmp_path, bwrap=None)


def test_the_launcher_runs_the_study_in_its_folder_with_a_minimal_environment(tmp_path):
    show = "import json, os; print(json.dumps([os.getcwd(), sorted(os.environ)]))"
    out = subprocess.run([sys.executable, "-m", "compose.backends", "--workdir", str(tmp_path), "--",
                          sys.executable, "-c", show], capture_output=True, text=True, check=True,
                         env={**os.environ, "SEALROOM_PROBE_SECRET": "do-not-pass", "HOME": str(tmp_path)})
    cwd, names = json.loads(out.stdout)
    assert Path(cwd) == tmp_path
    assert "SEALROOM_PROBE_SECRET" not in names and "PATH" in names and "HOME" in names


def test_the_launcher_refuses_a_forward_that_is_not_loopback(tmp_path):
    out = subprocess.run([sys.executable, "-m", "compose.backends", "--workdir", str(tmp_path), "--forward",
                          "0.0.0.0:80=/x.sock", "--", "true"], capture_output=True, text=True)
    assert out.returncode == 2 and "127.0.0.1:PORT=SOCKET" in out.stderr


# --- what the sandbox claims, checked from inside it ------------------------------------------------------------

PROBE = r"""
import json, os, socket, sys
forwarded_port, host_port, hidden, secret, outside = sys.argv[1:6]
def talk(port):
    try:
        with socket.create_connection(("127.0.0.1", int(port)), timeout=2) as conn:
            conn.sendall(b"ping")
            return conn.recv(64).decode()
    except OSError as exc:
        return type(exc).__name__
def write(path):
    try:
        with open(path, "w") as f:
            f.write("x")
        return "written"
    except OSError as exc:
        return type(exc).__name__
def read(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError as exc:
        return type(exc).__name__
print(json.dumps({"uid": os.getuid(), "env": sorted(os.environ), "forwarded": talk(forwarded_port),
                  "host_port": talk(host_port), "hidden": sorted(os.listdir(hidden)), "secret": read(secret),
                  "work": write("result.json"), "outside": write(outside), "tmp": sorted(os.listdir("/tmp"))}))
"""


def serve(listener: socket.socket, label: bytes) -> None:
    def loop() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                conn.sendall(label + b":" + conn.recv(64))
    threading.Thread(target=loop, daemon=True).start()


@needs_bwrap
def test_the_sandbox_sees_only_its_folder_and_its_forwarded_ports(tmp_path):
    state = tmp_path / "state"                 # stands for the stack's state folder: hidden
    work, sockets = state / "work", tmp_path / "sockets"
    for folder in (work, sockets):
        folder.mkdir(parents=True)
    (state / "secret.key").write_text("simulated platform key")
    outside = PROJECT_ROOT / f"sandbox-probe-{os.getpid()}.txt"
    host_tmp = tempfile.NamedTemporaryFile(dir="/tmp", prefix="sealroom-host-")
    # Two services on the host's loopback; inside, port A is forwarded to a Unix socket, port B is not.
    host_a, host_b = socket.create_server(("127.0.0.1", 0)), socket.create_server(("127.0.0.1", 0))
    relay = socket.socket(socket.AF_UNIX)
    relay.bind(str(sockets / "service.sock"))
    relay.listen()
    with host_tmp, host_a, host_b, relay:
        for listener, label in ((host_a, b"host-a"), (host_b, b"host-b"), (relay, b"forwarded")):
            serve(listener, label)
        port_a, port_b = host_a.getsockname()[1], host_b.getsockname()[1]
        launcher = [sys.executable, "-m", "compose.backends", "--workdir", str(work),
                    "--forward", f"127.0.0.1:{port_a}={sockets / 'service.sock'}", "--",
                    sys.executable, "-c", PROBE, str(port_a), str(port_b), str(state), str(state / "secret.key"),
                    str(outside)]
        out = subprocess.run(bwrap_command(BWRAP, launcher, workdir=work, read_only=[sockets], hidden=[state]),
                             capture_output=True, text=True, timeout=60,
                             env={**os.environ, "SEALROOM_PROBE_SECRET": "do-not-pass"})
        assert out.returncode == 0, out.stderr
        seen = json.loads(out.stdout)
        assert seen["forwarded"] == "forwarded:ping"           # the allowed service answers, through the relay
        assert seen["host_port"] == "ConnectionRefusedError"   # the host's other loopback services do not exist
        assert seen["hidden"] == ["work"] and seen["secret"] == "FileNotFoundError"
        assert seen["work"] == "written" and (work / "result.json").read_text() == "x"
        assert seen["outside"] == "OSError" and not outside.exists()      # read-only root
        assert Path(host_tmp.name).name not in seen["tmp"]                 # a private /tmp
        assert seen["uid"] == 65534 and "SEALROOM_PROBE_SECRET" not in seen["env"]
        # Control: the same probe unsandboxed reaches the host's port B, so the refusal above is the sandbox's doing.
        control = subprocess.run([sys.executable, "-c", PROBE, str(port_a), str(port_b), str(state),
                                  str(state / "secret.key"), str(tmp_path / "control.txt")],
                                 capture_output=True, text=True, timeout=60, check=True, cwd=work)
        assert json.loads(control.stdout)["host_port"] == "host-b:ping"
