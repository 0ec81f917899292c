"""The SIMULATED guest agent, exercised only through dstack-sdk 0.5.4 (DstackClient / AsyncDstackClient via
DSTACK_SIMULATOR_ENDPOINT): key derivations and signature chains, quotes that verify as simulated, Info,
EmitEvent, Sign/Verify, refusals, and the `python -m cvm.agent_sim` entry point."""

import asyncio
import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
import types
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from dstack_sdk import AsyncDstackClient, DstackClient
from eth_keys import keys
from eth_utils import keccak

import cvm.agent_sim
from cvm.agent_sim import (
    AgentServer,
    AppKeyGrant,
    AppKeyGrantRejected,
    GuestAgentSimulator,
)
from cvm.agent_sim.__main__ import main as agent_main
from cvm.attest.eventlog import extend_rtmr, runtime_event_digest
from cvm.attest.simulated import (
    SIMULATED_DEVICE_ID,
    SIMULATED_OS_IMAGE_HASH,
    SimulatedTdx,
)
from cvm.attest.verify import SimulatedQuoteNotAllowed, VerifiedBoot, verify_attestation

APP_ID = bytes.fromhex("5fbdb2315678afecb367f032d93f642f64180aa3")
APP_COMPOSE = json.dumps(
    {"manifest_version": 2, "name": "cohort-study", "runner": "docker-compose", "docker_compose_file": "services: {}"},
    separators=(",", ":"),
    sort_keys=True,
).encode()
KMS_ROOT = keys.PrivateKey(hashlib.sha256(b"test KMS root k256").digest())
INSTANCE_SEED = b"instance seed"
TESTS_DIR = Path(__file__).resolve().parent


def hkdf(ikm: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=b"RATLS", info=info).derive(ikm)


class DerivingKeyProvider:
    """A test KMS following the shared decisions: it verifies the CVM's attestation (dev mode: simulated root
    pinned), reads app_id from the replayed log, derives the app key from its root and signs it."""

    def __init__(self, root: keys.PrivateKey, simulated_root_der: bytes, *, issuer: keys.PrivateKey | None = None):
        self.root = root
        self.issuer = issuer or root  # a different issuer forges the grant
        self.simulated_root_der = simulated_root_der
        self.attested: VerifiedBoot | None = None

    def kms_root_pubkey(self) -> bytes:
        return self.root.public_key.to_compressed_bytes()

    def get_app_key(self, attest) -> AppKeyGrant:
        nonce = hashlib.sha256(b"kms nonce").digest()
        quote, event_log = attest(nonce)
        self.attested = verify_attestation(
            quote,
            event_log,
            expected_report_data=nonce,
            now=int(time.time()),
            allow_simulated=True,
            simulated_root_der=self.simulated_root_der,
        )
        app_id = self.attested.app_id
        app_key = hkdf(self.root.to_bytes(), app_id + b"app-key")
        app_public = keys.PrivateKey(app_key).public_key.to_compressed_bytes()
        signature = self.issuer.sign_msg_hash(keccak(b"dstack-kms-issued:" + app_id + app_public)).to_bytes()
        return AppKeyGrant(k256_key=app_key, k256_signature=signature, kms_root_pubkey=self.kms_root_pubkey())


def boot_agent(state_dir: Path, **provider_args) -> tuple[GuestAgentSimulator, DerivingKeyProvider]:
    provider = DerivingKeyProvider(KMS_ROOT, SimulatedTdx.load_or_create(state_dir).root_der, **provider_args)
    agent = GuestAgentSimulator.boot(APP_COMPOSE, APP_ID, provider, state_dir, instance_seed=INSTANCE_SEED)
    return agent, provider


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    state_dir = tmp_path_factory.mktemp("agent")
    agent, provider = boot_agent(state_dir)
    with AgentServer(agent, state_dir / "dstack.sock", http_port=0) as server:
        yield server, provider


@pytest.fixture
def client(served, monkeypatch):
    server, _ = served
    monkeypatch.setenv("DSTACK_SIMULATOR_ENDPOINT", str(server.socket_path))
    dstack = DstackClient()
    with dstack:  # (the SDK's __enter__ returns its async twin, so keep our own reference)
        yield dstack


def app_key() -> bytes:
    return hkdf(KMS_ROOT.to_bytes(), APP_ID + b"app-key")


def recover(signature: bytes, message_hash: bytes) -> bytes:
    return keys.Signature(signature).recover_public_key_from_msg_hash(message_hash).to_compressed_bytes()


def http_error(call) -> tuple[int, str]:
    with pytest.raises(httpx.HTTPStatusError) as failed:
        call()
    return failed.value.response.status_code, failed.value.response.json()["error"]


def verified(quote_response, pinned_root: bytes, report_data: bytes) -> VerifiedBoot:
    return verify_attestation(
        quote_response.decode_quote(),
        quote_response.event_log,
        expected_report_data=report_data,
        now=int(time.time()),
        allow_simulated=True,
        simulated_root_der=pinned_root,
    )


# ---- GetKey ----------------------------------------------------------------------------------------


def test_get_key_derives_like_dstack_and_chains_to_the_kms_root(client):
    response = client.get_key("wallet/eth", "ethereum")
    key = response.decode_key()
    assert key == hkdf(app_key(), b"wallet/eth")
    public_key = keys.PrivateKey(key).public_key.to_compressed_bytes()
    sig0, sig1 = response.decode_signature_chain()
    app_public = recover(sig0, keccak(f"ethereum:{public_key.hex()}".encode()))
    assert app_public == keys.PrivateKey(app_key()).public_key.to_compressed_bytes()
    assert recover(sig1, keccak(b"dstack-kms-issued:" + APP_ID + app_public)) == KMS_ROOT.public_key.to_compressed_bytes()


def test_get_key_algorithm_changes_the_public_key_not_the_key(client):
    secp = client.get_key("same-path", "p", "secp256k1")
    ed = client.get_key("same-path", "p", "ed25519")
    assert ed.decode_key() == secp.decode_key() == client.get_key("same-path", "p", "k256").decode_key()
    ed_public = Ed25519PrivateKey.from_private_bytes(ed.decode_key()).public_key().public_bytes_raw()
    app_public = recover(ed.decode_signature_chain()[0], keccak(f"p:{ed_public.hex()}".encode()))
    assert app_public == keys.PrivateKey(app_key()).public_key.to_compressed_bytes()
    assert client.get_key("other", "p").decode_key() != secp.decode_key()


def test_get_key_refuses_an_unknown_algorithm(client):
    status, error = http_error(lambda: client.get_key("k", "p", "rsa"))
    assert status == 400 and "unsupported algorithm 'rsa'" in error


# ---- GetQuote --------------------------------------------------------------------------------------


def test_get_quote_verifies_as_simulated_and_its_log_replays(client, served):
    server, provider = served
    pinned = provider.simulated_root_der
    response = client.get_quote(b"report data")
    assert response.report_data == b"report data".ljust(64, b"\0").hex()
    boot = verified(response, pinned, b"report data")
    assert boot.simulated and boot.claims.simulated
    assert (boot.app_id, boot.compose_hash) == (APP_ID, hashlib.sha256(APP_COMPOSE).digest())
    assert boot.instance_id == hashlib.sha256(INSTANCE_SEED + APP_ID).digest()[:20]
    assert boot.os_image_hash == SIMULATED_OS_IMAGE_HASH
    assert boot.events.key_provider == {"name": "kms", "id": KMS_ROOT.public_key.to_compressed_bytes().hex()}
    replayed = response.replay_rtmrs()  # dstack-sdk's own replay, all four RTMRs
    claims = boot.claims
    assert [replayed[i] for i in range(4)] == [m.hex() for m in (claims.rtmr0, claims.rtmr1, claims.rtmr2, claims.rtmr3)]
    with pytest.raises(SimulatedQuoteNotAllowed):
        verify_attestation(response.decode_quote(), response.event_log, now=int(time.time()))


def test_the_kms_saw_the_same_boot(served):
    _, provider = served
    assert provider.attested is not None and provider.attested.app_id == APP_ID
    assert provider.attested.compose_hash == hashlib.sha256(APP_COMPOSE).digest()


def test_report_data_over_64_bytes_is_refused(client):
    with pytest.raises(ValueError):
        client.get_quote(b"x" * 65)  # the SDK refuses first ...
    status, error = http_error(lambda: asyncio.run(_raw("GetQuote", {"report_data": "00" * 65})))
    assert status == 400 and "at most 64 bytes" in error  # ... and so does the agent
    status, error = http_error(lambda: asyncio.run(_raw("GetQuote", {"report_data": "zz"})))
    assert status == 400 and error.startswith("invalid request: report_data")


async def _raw(method: str, payload: dict) -> dict:
    async with AsyncDstackClient() as dstack:
        return await dstack._send_rpc_request(method, payload)


# ---- Info, EmitEvent -------------------------------------------------------------------------------


def test_info_describes_the_simulated_cvm(client, served):
    _, provider = served
    info = client.info()
    tcb = info.tcb_info
    assert (info.app_id, info.app_name, info.compose_hash) == (
        APP_ID.hex(), "cohort-study", hashlib.sha256(APP_COMPOSE).hexdigest(),
    )
    assert info.instance_id == hashlib.sha256(INSTANCE_SEED + APP_ID).digest()[:20].hex()
    assert info.device_id == SIMULATED_DEVICE_ID.hex() == tcb.device_id
    assert json.loads(info.key_provider_info)["id"] == KMS_ROOT.public_key.to_compressed_bytes().hex()
    assert tcb.app_compose.encode() == APP_COMPOSE and tcb.os_image_hash == SIMULATED_OS_IMAGE_HASH.hex()
    boot = verified(client.get_quote(b"n"), provider.simulated_root_der, b"n")
    assert (tcb.mr_aggregated, info.mr_aggregated) == (boot.mr_aggregated.hex(), boot.mr_aggregated.hex())
    assert [tcb.mrtd, tcb.rtmr3] == [boot.claims.mrtd.hex(), boot.claims.rtmr3.hex()]
    raw = asyncio.run(_raw("Info", {}))
    assert raw["simulated"] is True and json.loads(raw["tcb_info"])["simulated"] is True
    assert json.loads(raw["vm_config"])["simulated"] is True and "SIMULATED" in raw["cloud_vendor"]


def test_emit_event_extends_rtmr3(tmp_path, monkeypatch):
    agent, provider = boot_agent(tmp_path)
    with AgentServer(agent, tmp_path / "dstack.sock") as server:
        monkeypatch.setenv("DSTACK_SIMULATOR_ENDPOINT", str(server.socket_path))
        client = DstackClient()
        with client:
            before = bytes.fromhex(client.info().tcb_info.rtmr3)
            client.emit_event("result-digest", b"\x42" * 32)
            client.emit_event("compose-hash", b"\x00" * 32)  # an app cannot re-measure a boot value
            after = client.get_quote(b"after")
            boot = verified(after, provider.simulated_root_der, b"after")
            status, error = http_error(lambda: asyncio.run(_raw("EmitEvent", {"event": "", "payload": ""})))
    step = extend_rtmr(before, runtime_event_digest("result-digest", b"\x42" * 32))
    assert boot.claims.rtmr3 == extend_rtmr(step, runtime_event_digest("compose-hash", b"\x00" * 32)) != before
    assert [e.name for e in boot.events.app_events] == ["result-digest", "compose-hash"]
    assert boot.compose_hash == hashlib.sha256(APP_COMPOSE).digest()
    assert status == 400 and "event name" in error


# ---- Sign, Verify ----------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["ed25519", "secp256k1", "secp256k1_prehashed"])
def test_sign_uses_the_vms_signing_key_and_carries_its_chain(client, algorithm):
    data = hashlib.sha256(b"aggregate").digest() if algorithm == "secp256k1_prehashed" else b"aggregate result"
    signed = client.sign(algorithm, data)
    signature, public_key = signed.decode_signature(), signed.decode_public_key()
    key_algorithm = "ed25519" if algorithm == "ed25519" else "secp256k1"
    vms = client.get_key("vms", "signing", key_algorithm)
    assert signed.decode_signature_chain() == [signature, *vms.decode_signature_chain()]
    if algorithm == "ed25519":
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, data)
    else:
        digest = data if algorithm == "secp256k1_prehashed" else hashlib.sha256(data).digest()
        assert public_key == keys.PrivateKey(vms.decode_key()).public_key.to_compressed_bytes()
        assert keys.PublicKey.from_compressed_bytes(public_key).verify_msg_hash(
            digest, keys.NonRecoverableSignature(signature_bytes=signature)
        )
    assert client.verify(algorithm, data, signature, public_key).valid
    tampered = bytes([data[0] ^ 1]) + data[1:]
    assert not client.verify(algorithm, tampered, signature, public_key).valid


def test_sign_and_verify_refuse_malformed_input(client):
    with pytest.raises(ValueError):
        client.sign("secp256k1_prehashed", b"short")  # SDK check
    status, error = http_error(lambda: asyncio.run(_raw("Sign", {"algorithm": "secp256k1_prehashed", "data": "00"})))
    assert status == 400 and "32-byte digest" in error
    status, error = http_error(lambda: client.verify("ed25519", b"d", b"\x00" * 10, b"\x00" * 32))
    assert status == 400 and "64 bytes" in error
    status, error = http_error(lambda: client.sign("rsa", b"d"))
    assert status == 400 and "unsupported algorithm" in error


# ---- before the app key, transports, errors --------------------------------------------------------


def test_get_key_and_sign_wait_for_the_app_key(tmp_path, monkeypatch):
    provider = DerivingKeyProvider(KMS_ROOT, SimulatedTdx.load_or_create(tmp_path).root_der)
    agent = GuestAgentSimulator.measure_boot(APP_COMPOSE, APP_ID, provider.kms_root_pubkey(), tmp_path)
    with AgentServer(agent, tmp_path / "dstack.sock") as server:
        monkeypatch.setenv("DSTACK_SIMULATOR_ENDPOINT", str(server.socket_path))
        client = DstackClient()
        with client:
            for call in (lambda: client.get_key("a", "b"), lambda: client.sign("ed25519", b"x")):
                status, error = http_error(call)
                assert status == 503 and "app key has not been obtained" in error
            quote = client.get_quote(b"q")  # attestation works before the key, and verifies
            boot = verified(quote, provider.simulated_root_der, b"q")
            assert quote.report_data == b"q".ljust(64, b"\0").hex() and boot.claims.report_data == b"q".ljust(64, b"\0")
            assert boot.simulated and (boot.app_id, boot.compose_hash) == (APP_ID, hashlib.sha256(APP_COMPOSE).digest())
            agent.obtain_app_key(provider)
            assert client.get_key("a", "b").decode_key() == hkdf(app_key(), b"a")


def test_a_grant_not_issued_by_the_measured_root_is_refused(tmp_path):
    impostor = keys.PrivateKey(hashlib.sha256(b"impostor").digest())
    with pytest.raises(AppKeyGrantRejected, match="does not recover to the measured KMS root"):
        boot_agent(tmp_path, issuer=impostor)

    class OtherRoot(DerivingKeyProvider):
        def get_app_key(self, attest):
            grant = super().get_app_key(attest)
            return AppKeyGrant(grant.k256_key, grant.k256_signature, impostor.public_key.to_compressed_bytes())

    provider = OtherRoot(KMS_ROOT, SimulatedTdx.load_or_create(tmp_path).root_der)
    with pytest.raises(AppKeyGrantRejected, match="names a KMS root other than"):
        GuestAgentSimulator.boot(APP_COMPOSE, APP_ID, provider, tmp_path)


def test_async_client_http_and_prpc_routes(served, monkeypatch):
    server, _ = served
    monkeypatch.setenv("DSTACK_SIMULATOR_ENDPOINT", server.http_url)

    async def run() -> tuple:
        async with AsyncDstackClient() as dstack:
            key = await dstack.get_key("async", "p")
            version = await dstack.version()
            dstack.PATH_PREFIX = "/prpc/DstackGuest."
            info = await dstack.info()
            via_get = dstack._get_client()
            got = await via_get.get("/GetKey", params={"path": "async", "purpose": "p"})
            return key, version, info, got.json()

    key, version, info, got = asyncio.run(run())
    assert key.decode_key() == hkdf(app_key(), b"async") == bytes.fromhex(got["key"])
    assert version.version == "0.5.4-sealroom-simulated"
    assert info.app_id == APP_ID.hex()
    status, error = http_error(lambda: asyncio.run(_raw("NoSuchMethod", {})))
    assert status == 404 and "unknown method" in error


def test_socket_is_private_and_not_stolen(served, tmp_path):
    server, _ = served
    assert stat.S_IMODE(os.stat(server.socket_path).st_mode) == 0o600
    agent, _ = boot_agent(tmp_path)
    with pytest.raises(FileExistsError, match="in use"):
        AgentServer(agent, server.socket_path)
    (tmp_path / "file").write_text("not a socket")
    with pytest.raises(FileExistsError, match="not a socket"):
        AgentServer(agent, tmp_path / "file")


def test_public_surface():
    public = {name for name, value in vars(cvm.agent_sim).items() if not name.startswith("_")}
    submodules = {name for name in public if isinstance(getattr(cvm.agent_sim, name), types.ModuleType)}
    assert public - submodules == set(cvm.agent_sim.__all__)


# ---- python -m cvm.agent_sim -----------------------------------------------------------------------


def test_cli_refuses_a_bad_app_id_and_an_unreachable_kms(tmp_path, capsys):
    compose = tmp_path / "app-compose.json"
    compose.write_bytes(APP_COMPOSE)
    args = ["--app-compose", str(compose), "--socket", str(tmp_path / "s"), "--state-dir", str(tmp_path),
            "--kms-url", "http://127.0.0.1:9"]
    assert agent_main([*args, "--app-id", "0x1234"]) == 2
    assert "error: --app-id must be 20 bytes" in capsys.readouterr().err
    assert agent_main([*args, "--app-id", "0x" + APP_ID.hex()]) == 3
    assert "boot failed: KMS unreachable" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_cli_boots_serves_and_stops(tmp_path):
    """The real entry point against a real KMS and chain: boots only for an approved recipe, serves, stops."""
    from compose.stack_file import read_keystore
    from contracts.chain import DstackApp
    from kms_client.signature_chain import verify_get_key_response
    from sealing_cli.stack import LocalStack

    with LocalStack(tmp_path / "stack", owner_names=("A",), threshold=1) as stack:
        d = stack.description
        owner = read_keystore(d.owners[0].keystore, d.dev_keystore_password)
        study = DstackApp(stack.chain, d.dstack_app)
        h = hashlib.sha256(APP_COMPOSE).digest()
        study.propose(h, "", owner)
        study.approve(h, owner)
        (tmp_path / "app-compose.json").write_bytes(APP_COMPOSE)
        socket_path = tmp_path / "dstack.sock"
        command = [sys.executable, "-m", "cvm.agent_sim", "--app-compose", "app-compose.json",
                   "--app-id", d.dstack_app, "--socket", str(socket_path),
                   "--state-dir", str(stack.state_dir / "simulated-tdx"), "--kms-url", d.services["kms"]["url"]]
        process = subprocess.Popen(command, cwd=tmp_path, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 30
            while not socket_path.exists():
                assert process.poll() is None and time.monotonic() < deadline, "the agent did not start"
                time.sleep(0.05)
            client = DstackClient(str(socket_path))
            with client:
                answer = client.get_key("cli", "p")
            verify_get_key_response(answer.key, answer.signature_chain, "p", study.app_id,
                                    d.services["kms"]["root_address"])
        finally:
            process.send_signal(signal.SIGTERM)
            _, stderr = process.communicate(timeout=15)
    assert process.returncode == 0
    assert "SIMULATED dstack guest agent on unix:" in stderr
    assert not socket_path.exists()
