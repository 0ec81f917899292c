"""`seal deploy --target dstack` against a real local stack (anvil, DstackKms, the study's DstackApp, the KMS): the
folder carries the approved bytes unchanged (so the same compose hash), the VMM's CreateVm body, the KMS and chain
settings; nothing is written for bytes the owners did not approve. The KMS's GetAppEnvEncryptPubKey is dstack's
(dstack-sdk's verifier accepts its signatures), and an environment sealed for a deployment decrypts with an
independent implementation of dstack's guest-side decryption, under a key derived here from the KMS root."""

from __future__ import annotations

import hashlib
import json
import os

import httpx
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import (
    X25519PrivateKey,
    X25519PublicKey,
)
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from dstack_sdk import (
    EnvVar,
    encrypt_env_vars_sync,
    get_compose_hash,
    verify_env_encrypt_public_key,
    verify_env_encrypt_public_key_legacy,
)
from typer.testing import CliRunner

from compose.app_compose import normalized_json_bytes
from compose.deploy import (
    ComposeHashMismatch,
    EnvNotAllowed,
    NotApproved,
    SettingsMismatch,
    VmSpec,
    encrypt_env,
    prepare_dstack_deployment,
    write_deployment,
)
from compose.stack_file import read_keystore
from contracts.chain import DstackApp
from kms.root_store import load_or_create_root
from kms_client.client import KmsAnswerInvalid, KmsClient
from sealing_cli.main import app as seal_cli
from sealing_cli.stack import LocalStack, kms_passphrase
from tests.study_world import make_recipe

# A plain dstack app (not a study recipe) that allows two environment names, for the environment round trip.
PLAIN_APP = normalized_json_bytes({
    "manifest_version": 2, "name": "plain-app", "runner": "docker-compose", "kms_enabled": True,
    "docker_compose_file": "services:\n  app:\n    image: busybox\n", "allowed_envs": ["API_TOKEN", "DB_URL"],
})


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    folder = tmp_path_factory.mktemp("deploy")
    with LocalStack(folder / "state", owner_names=("A", "B", "C"), threshold=2, backend="process") as stack:
        d = stack.description
        owners = {o.name: read_keystore(o.keystore, d.dev_keystore_password) for o in d.owners}
        study = DstackApp(stack.chain, d.dstack_app)
        recipes = {name: make_recipe(owners, study=name) for name in ("approved", "pending", "revoked")}
        recipes["plain"] = PLAIN_APP
        paths = {}
        for name, body in recipes.items():
            paths[name] = folder / f"{name}.json"
            paths[name].write_bytes(body)
            h = hashlib.sha256(body).digest()
            study.propose(h, "", owners["A"])
            study.approve(h, owners["A"])
            if name != "pending":
                study.approve(h, owners["B"])
        study.revoke(hashlib.sha256(recipes["revoked"]).digest(), owners["C"])
        yield stack, recipes, paths, folder


def seal(*args: str):
    return CliRunner().invoke(seal_cli, ["deploy", "--target", "dstack", *args])


def deploy_args(world, name: str, out, *extra: str) -> list[str]:
    stack, recipes, paths, _ = world
    return ["--compose", str(paths[name]), "--compose-hash", "0x" + hashlib.sha256(recipes[name]).hexdigest(),
            "--out", str(out), "--state-dir", str(stack.state_dir), *extra]


def kms_meta(stack):
    with KmsClient(stack.description.services["kms"]["url"]) as kms:
        return kms.meta()


def env_private_key(stack, app_id: bytes) -> X25519PrivateKey:
    """The app's env key, derived here from the KMS's root store: HKDF(derivation secret, "RATLS", app_id ‖
    "env-encrypt-key") as an X25519 private key."""
    root = load_or_create_root(stack.state_dir / "kms", kms_passphrase(stack.state_dir)[0].encode())
    secret = HKDF(algorithm=hashes.SHA256(), length=32, salt=b"RATLS",
                  info=app_id + b"env-encrypt-key").derive(root.derivation_secret)
    return X25519PrivateKey.from_private_bytes(secret)


def dstack_decrypt(private: X25519PrivateKey, sealed: bytes) -> dict:
    """dstack's guest side (dstack-util dh_decrypt), written independently: ephemeral public (32) ‖ IV (12) ‖
    AES-256-GCM ciphertext, the raw X25519 shared secret as the key."""
    shared = private.exchange(X25519PublicKey.from_public_bytes(sealed[:32]))
    return json.loads(AESGCM(shared).decrypt(sealed[32:44], sealed[44:], None))


# ---- seal deploy ---------------------------------------------------------------------------------------------------


def test_deploy_writes_the_approved_bytes_and_the_settings(world):
    stack, recipes, _, folder = world
    d, meta = stack.description, kms_meta(stack)
    out = folder / "out-approved"
    result = seal(*deploy_args(world, "approved", out, "--allow-dev-kms", "--kms-root", meta.root_address,
                               "--vcpu", "4", "--memory", "8192"))
    assert result.exit_code == 0, result.output
    assert "WARNING" in result.stderr and "dev mode" in result.stderr
    approved = hashlib.sha256(recipes["approved"]).hexdigest()
    written = (out / "app-compose.json").read_bytes()
    assert written == recipes["approved"]
    assert hashlib.sha256(written).hexdigest() == approved == get_compose_hash(json.loads(written))
    assert DstackApp(stack.chain, d.dstack_app).status(bytes.fromhex(approved)).allowed
    assert sorted(p.name for p in out.iterdir()) == ["app-compose.json", "deployment.json", "vmm-create-vm.json"]

    create_vm = json.loads((out / "vmm-create-vm.json").read_text())
    assert create_vm["compose_file"].encode("utf-8") == recipes["approved"]   # the VMM writes these bytes back
    assert create_vm["app_id"] == d.dstack_app[2:].lower()
    assert create_vm["kms_urls"] == [d.services["kms"]["url"]] and create_vm["gateway_urls"] == []
    assert (create_vm["name"], create_vm["image"], create_vm["vcpu"], create_vm["memory"], create_vm["disk_size"]) \
        == ("approved", "dstack-0.5.4", 4, 8192, 20)
    assert "encrypted_env" not in create_vm and create_vm["ports"] == []

    record = json.loads((out / "deployment.json").read_text())
    assert record["format"] == "sealroom-dstack-deployment/v1" and record["compose_hash"] == approved
    assert record["app_id"] == d.dstack_app
    assert record["kms"] == {"url": d.services["kms"]["url"], "root_address": meta.root_address,
                             "root_pubkey": meta.k256_pubkey, "dev_mode": True}
    assert record["chain"] == {"chain_id": d.chain_id, "rpc_url": d.rpc_url, "dstack_kms": d.dstack_kms,
                               "dstack_app": d.dstack_app}
    assert record["env"] is None
    assert record["files"] == {name: hashlib.sha256((out / name).read_bytes()).hexdigest()
                               for name in ("app-compose.json", "vmm-create-vm.json")}


@pytest.mark.parametrize("name, said", [("pending", "pending (1/2 approvals)"), ("revoked", "revoked")])
def test_a_hash_the_chain_does_not_allow_is_refused(world, name, said):
    out = world[3] / f"out-{name}"
    result = seal(*deploy_args(world, name, out, "--allow-dev-kms"))
    assert result.exit_code == 1 and said in result.stderr
    assert not out.exists()


def test_bytes_that_are_not_the_approved_ones_are_refused_before_anything_is_asked(world):
    stack, recipes, paths, folder = world
    out = folder / "out-mismatch"
    other = "0x" + hashlib.sha256(recipes["approved"] + b" ").hexdigest()
    result = seal("--compose", str(paths["approved"]), "--compose-hash", other, "--out", str(out),
                  "--kms-url", "http://127.0.0.1:9", "--rpc-url", "http://127.0.0.1:9",
                  "--dstack-app", stack.description.dstack_app)   # nothing listens there: no call is made
    assert result.exit_code == 1 and "not the approved" in result.stderr
    assert not out.exists()


def test_a_dev_kms_a_wrong_pin_an_environment_or_a_used_folder_is_refused(world):
    folder = world[3]
    for extra, said in ((["--kms-root", "0x" + "11" * 20], "not the pinned"),
                        ([], "dev mode"),
                        (["--chain-id", "1"], "not 1")):
        out = folder / "out-refused"
        result = seal(*deploy_args(world, "approved", out, *extra, *(["--allow-dev-kms"] if extra else [])))
        assert result.exit_code == 1 and said in result.stderr, result.stderr
        assert not out.exists()
    env_file = folder / "study.env"
    env_file.write_text("# a study recipe allows no environment\nAPI_TOKEN=secret\n")
    result = seal(*deploy_args(world, "approved", folder / "out-env", "--allow-dev-kms", "--env-file", str(env_file)))
    assert result.exit_code == 1 and "allowed_envs" in result.stderr and not (folder / "out-env").exists()
    used = folder / "out-used"
    used.mkdir()
    (used / "keep.txt").write_text("mine")
    result = seal(*deploy_args(world, "approved", used, "--allow-dev-kms"))
    assert result.exit_code == 1 and "not an empty folder" in result.stderr
    assert [p.name for p in used.iterdir()] == ["keep.txt"]


def test_json_output_is_the_deployment_record(world):
    out = world[3] / "out-json"
    result = seal(*deploy_args(world, "approved", out, "--allow-dev-kms", "--json"))
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == json.loads((out / "deployment.json").read_text())


# ---- the environment, sealed to the KMS's env key ------------------------------------------------------------------


def test_the_kms_env_key_is_dstacks_and_signed_by_the_root(world):
    stack = world[0]
    d, meta = stack.description, kms_meta(stack)
    app_id = bytes.fromhex(d.dstack_app[2:])
    url = d.services["kms"]["url"]
    # the request as dstack's vmm-cli sends it: bare hex app id, `?json`
    answer = httpx.post(f"{url}/prpc/GetAppEnvEncryptPubKey?json", json={"app_id": app_id.hex()}).json()
    public = bytes.fromhex(answer["public_key"])
    assert public == env_private_key(stack, app_id).public_key().public_bytes_raw()
    signer = verify_env_encrypt_public_key(public, bytes.fromhex(answer["signature_v1"]), d.dstack_app,
                                           answer["timestamp"])
    assert signer == "0x" + meta.k256_pubkey
    with pytest.warns(DeprecationWarning):
        assert verify_env_encrypt_public_key_legacy(public, bytes.fromhex(answer["signature"]),
                                                    d.dstack_app) == "0x" + meta.k256_pubkey
    with KmsClient(url) as kms:
        assert kms.env_encrypt_pubkey(d.dstack_app, pinned_root_address=meta.root_address).public_key == public
        with pytest.raises(KmsAnswerInvalid, match="not the pinned KMS root"):
            kms.env_encrypt_pubkey(d.dstack_app, pinned_root_address="0x" + "22" * 20)
    assert httpx.post(f"{url}/prpc/GetAppEnvEncryptPubKey", json={"app_id": "abc"}).status_code == 403


def test_an_environment_is_sealed_so_that_dstacks_guest_decrypts_it(world):
    stack, _, _, folder = world
    d = stack.description
    env = {"API_TOKEN": "s3cr3t token", "DB_URL": "postgres://db/ünïcode"}
    deployment = prepare_dstack_deployment(
        PLAIN_APP, approved_compose_hash=hashlib.sha256(PLAIN_APP).digest(), kms_url=d.services["kms"]["url"],
        rpc_url=d.rpc_url, dstack_app=d.dstack_app, env=env, allow_dev_kms=True, require_study_recipe=False,
        vm=VmSpec(vcpu=1, memory_mb=1024))
    out = folder / "out-plain"
    write_deployment(deployment, out)
    sealed = bytes.fromhex((out / "encrypted-env.hex").read_text().strip())
    assert json.loads((out / "vmm-create-vm.json").read_text())["encrypted_env"] == sealed.hex()
    key = env_private_key(stack, bytes.fromhex(d.dstack_app[2:]))
    assert dstack_decrypt(key, sealed) == {"env": [{"key": k, "value": v} for k, v in env.items()]}
    record = json.loads((out / "deployment.json").read_text())
    assert record["env"]["names"] == ["API_TOKEN", "DB_URL"]
    assert record["env"]["encrypt_pubkey"] == key.public_key().public_bytes_raw().hex()
    assert (out / "app-compose.json").read_bytes() == PLAIN_APP
    # the same decryption opens dstack-sdk's own encrypt_env_vars output: the layouts are the same
    public_hex = key.public_key().public_bytes_raw().hex()
    assert dstack_decrypt(key, bytes.fromhex(encrypt_env_vars_sync([EnvVar("DB_URL", "x")], public_hex))) == \
        {"env": [{"key": "DB_URL", "value": "x"}]}
    fresh = encrypt_env({"A": "1"}, key.public_key().public_bytes_raw())
    assert fresh != encrypt_env({"A": "1"}, key.public_key().public_bytes_raw())   # a new ephemeral key each time
    assert dstack_decrypt(key, fresh) == {"env": [{"key": "A", "value": "1"}]}


def test_environment_names_the_compose_does_not_allow_are_refused(world):
    stack, _, _, _ = world
    d = stack.description
    common = {"approved_compose_hash": hashlib.sha256(PLAIN_APP).digest(), "kms_url": d.services["kms"]["url"],
              "rpc_url": d.rpc_url, "dstack_app": d.dstack_app, "allow_dev_kms": True, "require_study_recipe": False}
    for env, said in (({"OTHER": "x"}, "does not allow the environment variable OTHER"),
                      ({"1BAD": "x"}, "not an environment name")):
        with pytest.raises(EnvNotAllowed, match=said):
            prepare_dstack_deployment(PLAIN_APP, env=env, **common)
    with pytest.raises(ComposeHashMismatch):
        prepare_dstack_deployment(PLAIN_APP + b" ", **common)
    with pytest.raises(SettingsMismatch, match="dev mode"):
        prepare_dstack_deployment(PLAIN_APP, **{**common, "allow_dev_kms": False})
    with pytest.raises(NotApproved, match="not registered"):
        prepare_dstack_deployment(PLAIN_APP, **{**common, "dstack_app": "0x" + os.urandom(20).hex()})


def test_bad_input_gets_one_error_line_and_its_exit_code(world):
    stack, recipes, paths, folder = world
    approved = "0x" + hashlib.sha256(recipes["approved"]).hexdigest()
    base = ["--compose", str(paths["approved"]), "--out", str(folder / "out-bad")]
    for argv, code, said in (
            (["--compose-hash", approved, *base, "--kms-url", "http://127.0.0.1:9", "--rpc-url", "http://127.0.0.1:9",
              "--dstack-app", stack.description.dstack_app], 3, "unreachable"),
            (["--compose-hash", approved, *base, "--kms-url", "http://127.0.0.1:9", "--rpc-url", "http://127.0.0.1:9",
              "--dstack-app", "0x12"], 2, "address"),
            (["--compose-hash", "0x1234", *base, "--state-dir", str(stack.state_dir)], 2, "64 hex digits"),
            (["--compose-hash", approved, *base, "--state-dir", str(folder / "no-stack")], 3, "seal up")):
        result = seal(*argv)
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert result.exit_code == code and len(errors) == 1 and said in result.stderr.lower(), result.output
        assert "Traceback" not in result.output and not (folder / "out-bad").exists()
    result = CliRunner().invoke(seal_cli, ["deploy", "--target", "k8s", "--compose-hash", approved, *base])
    assert result.exit_code == 2 and "unknown --target" in result.stderr
