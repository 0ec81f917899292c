"""`seal deploy --target dstack`: what a dstack VMM (or Phala Cloud) deployment of a study takes, written to a folder.

The one rule: the CVM must boot the very bytes the owners approved. The folder carries ``app-compose.json``
verbatim, and nothing is written unless ``sha256`` of those bytes is the approved compose hash and the study's
DstackApp allows that hash (k-of-n approved, not revoked). The rest is where the CVM's keys come from and which
chain decides: the KMS URL and its root (which DstackKms must publish), the DstackKms and DstackApp addresses (the
app id), the chain id and an RPC URL. Docs: docs/real-tdx.md.

Files written (an existing non-empty folder is refused; files are made in a temporary folder and moved in whole):

- ``app-compose.json``: the approved bytes, unchanged.
- ``vmm-create-vm.json``: the body of the dstack VMM's ``CreateVm`` pRPC call (``VmConfiguration``, dstack 0.5.x:
  ``name, image, compose_file, vcpu, memory, disk_size, ports, encrypted_env, app_id, user_config, hugepages,
  pin_numa, kms_urls, gateway_urls, stopped``); ``compose_file`` holds the approved bytes as a JSON string, which the
  VMM writes back unchanged, so the CVM measures the same compose hash. ``app_id`` is the DstackApp address (hex).
- ``encrypted-env.hex``: only when an environment is given: dstack-sdk's ``encrypt_env_vars`` layout (below).
- ``deployment.json`` (format ``sealroom-dstack-deployment/v1``): app id, compose hash, KMS (URL, root address and
  public key, dev mode), chain (id, RPC, DstackKms, DstackApp), the VM settings, the environment's names and the
  env-encrypt key it was sealed to (with the KMS's timestamped signature), and the sha256 of every other file.

Environment (dstack's ``encrypted_env``): ``{"env": [{"key": K, "value": V}, …]}`` as JSON, sealed to the app's
env-encrypt X25519 public key, which comes from the KMS (``GetAppEnvEncryptPubKey``) with its ``signature_v1``
checked against the KMS root DstackKms publishes: an ephemeral X25519 key meets it, the raw shared secret is the
AES-256-GCM key (no KDF, no AAD), and the result is ``ephemeral public key (32) ‖ IV (12) ‖ ciphertext ‖ tag
(16)``.
dstack's guest decrypts it at boot and keeps only the names the compose's ``allowed_envs`` lists (dropping the rest
silently), so a name the compose does not list is refused here. A Sealroom study recipe lists none: whatever dstack
passes to a CVM outside the measured compose is input nobody approved. The study's deployment therefore carries no
environment; the code serves any other dstack app the same way (``require_study_recipe=False``).

Errors::

    DeployError
     ├── ComposeHashMismatch   the bytes do not hash to the approved compose hash
     ├── NotAStudyRecipe       the bytes are no Sealroom study recipe (compose.app_compose refuses them)
     ├── NotApproved           the DstackApp does not allow the hash (pending, revoked, never proposed), or
     │                         the app is not registered in DstackKms
     ├── EnvNotAllowed         an environment name the compose does not allow, or one dstack refuses
     ├── SettingsMismatch      the KMS, the chain and the pins disagree (root, DstackKms, chain id), or a dev KMS
     └── OutputExists          the output folder exists and is not empty

A chain or KMS that cannot be reached raises ``contracts.chain.ChainUnreachable`` or ``kms_client.KmsUnreachable``;
a KMS answer that does not verify, ``kms_client.KmsAnswerInvalid``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import (
    X25519PrivateKey,
    X25519PublicKey,
)
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from eth_keys import keys as eth_keys
from eth_utils import to_checksum_address

from compose import safe_parse
from compose.app_compose import InvalidAppCompose, manifest_from_app_compose
from contracts.chain import Chain, DstackApp, DstackKms
from kms_client.client import KmsClient

__all__ = [
    "DEFAULT_IMAGE",
    "DEPLOYMENT_FORMAT",
    "ComposeHashMismatch",
    "DeployError",
    "DstackDeployment",
    "DstackSettings",
    "EnvKey",
    "EnvNotAllowed",
    "NotAStudyRecipe",
    "NotApproved",
    "OutputExists",
    "SettingsMismatch",
    "VmSpec",
    "build_dstack_deployment",
    "check_compose",
    "check_env",
    "encrypt_env",
    "prepare_dstack_deployment",
    "write_deployment",
]

DEPLOYMENT_FORMAT = "sealroom-dstack-deployment/v1"
DEFAULT_IMAGE = "dstack-0.5.4"   # the agent API generation this project speaks (EmitEvent: docs/design.md)
# dstack's own limits on a decrypted environment (dstack-util parse_env_file.rs)
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ENV_MAX_ITEMS, _ENV_MAX_NAME, _ENV_MAX_VALUE, _ENV_MAX_TOTAL = 1024, 255, 128 * 1024, 1024 * 1024


class DeployError(Exception):
    """Base of the refusals of this module."""


class ComposeHashMismatch(DeployError):
    pass


class NotAStudyRecipe(DeployError):
    pass


class NotApproved(DeployError):
    pass


class EnvNotAllowed(DeployError):
    pass


class SettingsMismatch(DeployError):
    pass


class OutputExists(DeployError):
    pass


@dataclass(frozen=True)
class DstackSettings:
    """Where the CVM gets its keys and which chain decides, as checked against each other."""

    kms_url: str
    kms_root_pubkey: bytes          # SEC1-compressed secp256k1, as DstackKms publishes it
    kms_is_dev: bool                # the KMS accepts SIMULATED quotes
    dstack_kms: str                 # checksum addresses
    dstack_app: str
    chain_id: int
    rpc_url: str

    @property
    def kms_root_address(self) -> str:
        return eth_keys.PublicKey.from_compressed_bytes(self.kms_root_pubkey).to_checksum_address()

    @property
    def app_id(self) -> bytes:
        return bytes.fromhex(self.dstack_app[2:])


@dataclass(frozen=True)
class VmSpec:
    """The VM the VMM creates. ``name`` defaults to the compose's name."""

    name: str | None = None
    image: str = DEFAULT_IMAGE
    vcpu: int = 2
    memory_mb: int = 4096
    disk_gb: int = 20

    def __post_init__(self) -> None:
        for what, value in (("vcpu", self.vcpu), ("memory_mb", self.memory_mb), ("disk_gb", self.disk_gb)):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 2**32:
                raise ValueError(f"{what} must be a positive whole number, got {value!r}")
        if not self.image:
            raise ValueError("image must name a dstack OS image")


@dataclass(frozen=True)
class EnvKey:
    """The app's env-encrypt public key as the KMS gave it, verified against the KMS root."""

    public_key: bytes
    timestamp: int
    signature_v1: bytes


@dataclass(frozen=True)
class DstackDeployment:
    app_compose: bytes = field(repr=False)
    compose_hash: bytes
    settings: DstackSettings
    vm: VmSpec
    env_names: tuple[str, ...] = ()
    encrypted_env: bytes | None = field(default=None, repr=False)
    env_key: EnvKey | None = None

    def files(self) -> dict[str, bytes]:
        """File name → bytes, as :func:`write_deployment` writes them."""
        s, vm = self.settings, self.vm
        create_vm: dict[str, Any] = {
            "name": vm.name or _compose_name(self.app_compose),
            "image": vm.image,
            "compose_file": self.app_compose.decode("utf-8"),
            "vcpu": vm.vcpu,
            "memory": vm.memory_mb,
            "disk_size": vm.disk_gb,
            "ports": [],
            "app_id": s.app_id.hex(),
            "user_config": "",
            "hugepages": False,
            "pin_numa": False,
            "kms_urls": [s.kms_url],
            "gateway_urls": [],
            "stopped": False,
        }
        if self.encrypted_env is not None:
            create_vm["encrypted_env"] = self.encrypted_env.hex()
        files = {"app-compose.json": self.app_compose,
                 "vmm-create-vm.json": (json.dumps(create_vm, indent=2) + "\n").encode()}
        if self.encrypted_env is not None:
            files["encrypted-env.hex"] = (self.encrypted_env.hex() + "\n").encode()
        record = {
            "format": DEPLOYMENT_FORMAT,
            "target": "dstack",
            "app_id": s.dstack_app,
            "compose_hash": self.compose_hash.hex(),
            "kms": {"url": s.kms_url, "root_address": s.kms_root_address, "root_pubkey": s.kms_root_pubkey.hex(),
                    "dev_mode": s.kms_is_dev},
            "chain": {"chain_id": s.chain_id, "rpc_url": s.rpc_url, "dstack_kms": s.dstack_kms,
                      "dstack_app": s.dstack_app},
            "vm": {"name": create_vm["name"], "image": vm.image, "vcpu": vm.vcpu, "memory_mb": vm.memory_mb,
                   "disk_gb": vm.disk_gb},
            "env": None if self.env_key is None else {
                "names": list(self.env_names), "encrypt_pubkey": self.env_key.public_key.hex(),
                "pubkey_timestamp": self.env_key.timestamp, "pubkey_signature_v1": self.env_key.signature_v1.hex()},
            "files": {name: hashlib.sha256(content).hexdigest() for name, content in files.items()},
        }
        files["deployment.json"] = (json.dumps(record, indent=2) + "\n").encode()
        return files


def check_env(env: Mapping[str, str], app_compose: bytes) -> list[tuple[str, str]]:
    """The environment as dstack will take it, in order; EnvNotAllowed for a name the compose's ``allowed_envs``
    does not list (dstack would drop it silently) or one dstack's guest refuses (name syntax, sizes)."""
    pairs = list(env.items())
    if len(pairs) > _ENV_MAX_ITEMS:
        raise EnvNotAllowed(f"{len(pairs)} environment variables: dstack takes at most {_ENV_MAX_ITEMS}")
    allowed = _compose(app_compose).get("allowed_envs") or []
    if not isinstance(allowed, list):
        raise EnvNotAllowed("the compose's allowed_envs is not a list")
    total = 0
    for name, value in pairs:
        if not isinstance(name, str) or not isinstance(value, str):
            raise EnvNotAllowed("environment names and values are strings")
        if not _ENV_NAME.fullmatch(name) or len(name) > _ENV_MAX_NAME:
            raise EnvNotAllowed(f"{name!r} is not an environment name dstack accepts ([A-Za-z_][A-Za-z0-9_]*, at most "
                                f"{_ENV_MAX_NAME} characters)")
        if len(value) > _ENV_MAX_VALUE:
            raise EnvNotAllowed(f"the value of {name} is over dstack's {_ENV_MAX_VALUE // 1024} KiB")
        total += len(name) + len(value)
        if name not in allowed:
            listed = ", ".join(map(str, allowed)) if allowed else "none"
            raise EnvNotAllowed(f"the compose does not allow the environment variable {name} (its allowed_envs: "
                                f"{listed}); dstack would drop it. A study recipe allows none: the environment is "
                                "not measured, so nothing in it was approved")
    if total > _ENV_MAX_TOTAL:
        raise EnvNotAllowed(f"the environment is over dstack's {_ENV_MAX_TOTAL // 1024} KiB")
    return pairs


def encrypt_env(env: list[tuple[str, str]] | Mapping[str, str], public_key: bytes, *,
                rng: Callable[[int], bytes] = os.urandom) -> bytes:
    """dstack-sdk's ``encrypt_env_vars``: ``ephemeral X25519 public ‖ IV (12) ‖ AES-256-GCM(shared secret, IV,
    {"env": [{"key", "value"}, …]} JSON)``, the raw X25519 shared secret as the key."""
    pairs = list(env.items()) if isinstance(env, Mapping) else list(env)
    payload = json.dumps({"env": [{"key": key, "value": value} for key, value in pairs]}).encode("utf-8")
    ephemeral = X25519PrivateKey.generate()
    shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(public_key))
    iv = rng(12)
    return ephemeral.public_key().public_bytes_raw() + iv + AESGCM(shared).encrypt(iv, payload, None)


def build_dstack_deployment(
    app_compose: bytes,
    *,
    approved_compose_hash: bytes,
    settings: DstackSettings,
    vm: VmSpec = VmSpec(),
    env: Mapping[str, str] | None = None,
    env_key: EnvKey | None = None,
    require_study_recipe: bool = True,
) -> DstackDeployment:
    """The deployment for these exact bytes (no network: ``settings`` and ``env_key`` must already be checked, as
    :func:`prepare_dstack_deployment` does)."""
    check_compose(app_compose, approved_compose_hash, require_study_recipe=require_study_recipe)
    if not env:
        return DstackDeployment(app_compose=app_compose, compose_hash=approved_compose_hash, settings=settings, vm=vm)
    pairs = check_env(env, app_compose)
    if env_key is None:
        raise ValueError("an environment needs the app's env-encrypt key (env_key)")
    return DstackDeployment(app_compose=app_compose, compose_hash=approved_compose_hash, settings=settings, vm=vm,
                            env_names=tuple(name for name, _ in pairs),
                            encrypted_env=encrypt_env(pairs, env_key.public_key), env_key=env_key)


def check_compose(app_compose: bytes, approved_compose_hash: bytes, *, require_study_recipe: bool = True) -> None:
    """The local checks: the bytes hash to the approved hash, and (by default) they are a Sealroom study recipe."""
    if not isinstance(app_compose, bytes):
        raise TypeError("app_compose must be the file's bytes")
    if not isinstance(approved_compose_hash, bytes) or len(approved_compose_hash) != 32:
        raise ValueError("the approved compose hash is 32 bytes")
    actual = hashlib.sha256(app_compose).digest()
    if actual != approved_compose_hash:
        raise ComposeHashMismatch(f"these app-compose.json bytes hash to {actual.hex()}, not the approved "
                                  f"{approved_compose_hash.hex()}: deploy the exact bytes the owners approved")
    if require_study_recipe:
        try:
            manifest_from_app_compose(app_compose)
        except InvalidAppCompose as exc:
            raise NotAStudyRecipe(f"not a Sealroom study recipe: {exc}") from None
    else:
        _compose(app_compose)


def prepare_dstack_deployment(
    app_compose: bytes,
    *,
    approved_compose_hash: bytes,
    kms_url: str,
    rpc_url: str,
    dstack_app: str,
    dstack_kms: str | None = None,
    chain_id: int | None = None,
    pinned_kms_root: str | None = None,
    vm: VmSpec = VmSpec(),
    env: Mapping[str, str] | None = None,
    allow_dev_kms: bool = False,
    require_study_recipe: bool = True,
) -> DstackDeployment:
    """Check everything a deployment depends on, then build it. In this order, nothing written and nothing sent
    before the local checks pass: the bytes and the approved hash (and the recipe, and the environment's names);
    the KMS's GetMeta; the chain: its id, DstackKms's published root (the KMS's own, and ``pinned_kms_root`` when
    given: an address or a compressed public key in hex), the app registered in DstackKms, the compose hash allowed
    by the DstackApp; then, with an environment, the env-encrypt key from the KMS, its signature checked against that
    root. A KMS in dev mode accepts SIMULATED quotes: refused unless ``allow_dev_kms``."""
    check_compose(app_compose, approved_compose_hash, require_study_recipe=require_study_recipe)
    if env:
        check_env(env, app_compose)
    app_address = _address(dstack_app, "the DstackApp address")
    asked_registry = _address(dstack_kms, "the DstackKms address") if dstack_kms is not None else None
    with KmsClient(kms_url) as kms:
        meta = kms.meta()
        if meta.is_dev and not allow_dev_kms:
            raise SettingsMismatch(f"the KMS at {kms_url} runs in dev mode: it accepts SIMULATED quotes, so a real TDX "
                                   "deployment behind it protects nothing")
        root = bytes.fromhex(meta.k256_pubkey)
        registry_address = asked_registry or to_checksum_address(meta.kms_contract_address)
        if registry_address != to_checksum_address(meta.kms_contract_address):
            raise SettingsMismatch(f"the KMS serves DstackKms {meta.kms_contract_address}, not {registry_address}")
        with Chain(rpc_url) as chain:
            if chain_id is not None and chain.chain_id != chain_id:
                raise SettingsMismatch(f"the node at {rpc_url} is chain {chain.chain_id}, not {chain_id}")
            if meta.chain_id != chain.chain_id:
                raise SettingsMismatch(f"the KMS decides on chain {meta.chain_id}, the node is chain {chain.chain_id}")
            registry = DstackKms(chain, registry_address)
            published = registry.kms_root_pubkey()
            if published != root:
                raise SettingsMismatch(f"DstackKms {registry_address} publishes the KMS root "
                                       f"{published.hex() or 'none'}, but the KMS at {kms_url} has {root.hex()}")
            settings = DstackSettings(kms_url=kms_url, kms_root_pubkey=root, kms_is_dev=meta.is_dev,
                                      dstack_kms=registry_address, dstack_app=app_address, chain_id=chain.chain_id,
                                      rpc_url=rpc_url)
            if pinned_kms_root is not None and pinned_kms_root.lower() not in (
                    settings.kms_root_address.lower(), root.hex(), "0x" + root.hex()):
                raise SettingsMismatch(f"the KMS root is {settings.kms_root_address} ({root.hex()}), not the pinned "
                                       f"{pinned_kms_root}")
            if not chain.view(DstackKms.ARTIFACT, registry.contract, "registeredApps", app_address):
                raise NotApproved(f"the app {app_address} is not registered in DstackKms {registry_address}")
            status = DstackApp(chain, app_address).status(approved_compose_hash)
            if status.revoked or not status.allowed:
                pending = f"pending ({status.approvals}/{status.threshold} approvals)"
                state = "revoked" if status.revoked else (pending if status.proposed else "never proposed")
                raise NotApproved(f"DstackApp {app_address} does not allow compose hash "
                                  f"{approved_compose_hash.hex()}: {state}")
        env_key = None
        if env:
            signed = kms.env_encrypt_pubkey(app_address, pinned_root_address=settings.kms_root_address)
            env_key = EnvKey(public_key=signed.public_key, timestamp=signed.timestamp, signature_v1=signed.signature_v1)
    return build_dstack_deployment(app_compose, approved_compose_hash=approved_compose_hash, settings=settings, vm=vm,
                                   env=env, env_key=env_key, require_study_recipe=require_study_recipe)


def write_deployment(deployment: DstackDeployment, out_dir: Path) -> list[Path]:
    """Write the deployment's files into ``out_dir`` (created; refused if it exists and is not empty). The files are
    made in a sibling temporary folder first and moved in whole, so a failure leaves nothing half-written."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise OutputExists(f"{out_dir} exists and is not an empty folder; choose a new one")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        for name, content in deployment.files().items():
            (staging / name).write_bytes(content)
        if out_dir.exists():
            out_dir.rmdir()   # empty, checked above
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return sorted(out_dir.iterdir())


def _compose(app_compose: bytes) -> dict[str, Any]:
    try:
        document = safe_parse.loads(app_compose)
    except ValueError as exc:
        raise NotAStudyRecipe(f"app-compose.json is not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise NotAStudyRecipe("app-compose.json is not a JSON object")
    return document


def _address(value: str, what: str) -> str:
    """A checksum address; ValueError naming ``what`` for anything that is not 0x + 40 hex digits."""
    if not isinstance(value, str) or not re.fullmatch(r"0x[0-9a-fA-F]{40}", value):
        raise ValueError(f"{what} must be an address (0x + 40 hex digits), got {value!r}")
    try:
        return to_checksum_address(value)
    except ValueError:
        raise ValueError(f"{what} {value!r} is not a valid address") from None


def _compose_name(app_compose: bytes) -> str:
    name = _compose(app_compose).get("name")
    return name if isinstance(name, str) and name else "sealroom-study"
