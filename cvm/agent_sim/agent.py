"""The SIMULATED guest agent's state: a CVM's boot measurements, its app key, and dstack's agent operations.

Transport-free: :mod:`cvm.agent_sim.server` puts these operations on dstack's HTTP API.

Boot (dstack ``system_setup.rs``; docs/design.md, "dstack formats"): measure ``system-preparing``, ``app-id``,
``compose-hash`` (sha256 of the exact app-compose bytes), ``instance-id``
(``sha256(seed ‖ app_id)[:20]``), ``boot-mr-done``, ``os-image-hash``, ``key-provider``
(``{"name":"kms","id":"<hex KMS root pubkey>"}``) and ``system-ready`` into the simulated RTMR3;
then ask the key provider for the app key, attesting with a fresh simulated quote over those RTMRs.
The OS the CVM boots is a described :class:`~cvm.attest.simulated.SimulatedOsImage` (default: the stack's
``SIMULATED_OS_IMAGE``): its MRTD and RTMR0-2 are the image's, and ``os-image-hash`` is its hash.
The grant is accepted only if the KMS signature on it recovers to the root the CVM measured.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric import ec

from cvm.agent_sim import keys, ratls
from cvm.attest.eventlog import (
    RTMR3_INDEX,
    RuntimeEvent,
    event_log_json,
    extend_rtmr,
    replay_event_log,
    replay_rtmr,
)
from cvm.attest.simulated import (
    SIMULATED_DEVICE_ID,
    SIMULATED_OS_IMAGE,
    SimulatedOsImage,
    SimulatedTdx,
    mr_config_id_v1,
)
from cvm.attest.tdx_quote import parse_quote_unverified
from cvm.attest.verify import compute_mr_aggregated
from kms_client.messages import app_key_issued_digest

__all__ = [
    "AgentSimError",
    "AppKeyGrant",
    "AppKeyGrantRejected",
    "AppKeyNotReady",
    "AppKeyProvider",
    "Attest",
    "DerivedKey",
    "GuestAgentSimulator",
    "Signed",
]

# attest(report_data ≤ 64 bytes) -> (simulated quote bytes, dstack event-log JSON string)
Attest = Callable[[bytes], tuple[bytes, str]]


class AgentSimError(Exception):
    """Root of the simulator's errors::

    AgentSimError
     ├── AppKeyNotReady       GetKey/Sign asked before the app key was obtained
     └── AppKeyGrantRejected  the key provider's grant does not chain to the measured KMS root
    """


class AppKeyNotReady(AgentSimError):
    """The app key has not been obtained from the key provider yet."""


class AppKeyGrantRejected(AgentSimError):
    """The app key the provider returned is not one the measured KMS root issued for this app."""


@dataclass(frozen=True)
class AppKeyGrant:
    """What the KMS hands a booting CVM (dstack ``AppKeyResponse``'s k256 part)."""

    k256_key: bytes = field(repr=False)
    k256_signature: bytes
    kms_root_pubkey: bytes


class AppKeyProvider(Protocol):
    """A KMS client as the booting CVM sees it."""

    def kms_root_pubkey(self) -> bytes:
        """The KMS root k256 public key (compressed, 33 bytes): measured as ``key-provider`` before the
        key is requested, so the CVM's quote already names the KMS it trusts."""
        ...

    def get_app_key(self, attest: Attest) -> AppKeyGrant:
        """Obtain the app key; ``attest(report_data)`` gives a fresh quote and event log."""
        ...


@dataclass(frozen=True)
class DerivedKey:
    """GetKey's answer: the derived key and ``[sig0 (app key over purpose:pubkey), sig1 (KMS)]``."""

    key: bytes = field(repr=False)
    signature_chain: tuple[bytes, bytes]


@dataclass(frozen=True)
class Signed:
    """Sign's answer; ``signature_chain`` is ``[signature, sig0, sig1]``."""

    signature: bytes
    public_key: bytes
    signature_chain: tuple[bytes, bytes, bytes]


class GuestAgentSimulator:
    """A SIMULATED dstack guest agent for one CVM. Build with :meth:`boot` (or :meth:`measure_boot`
    then :meth:`obtain_app_key`). Thread-safe: the server calls it from worker threads."""

    def __init__(
        self,
        *,
        platform: SimulatedTdx,
        app_compose: bytes,
        app_id: bytes,
        kms_root_pubkey: bytes,
        boot_events: list[RuntimeEvent],
        os_image: SimulatedOsImage = SIMULATED_OS_IMAGE,
    ) -> None:
        self._platform = platform
        self._app_compose = app_compose
        self._app_id = app_id
        self._kms_root_pubkey = kms_root_pubkey
        self._compose_hash = hashlib.sha256(app_compose).digest()
        self._lock = threading.Lock()
        # The booted image's registers: MRTD and RTMR0-2 are fixed once the OS has booted.
        self._os_registers = {"mrtd": os_image.mrtd, **{f"rtmr{i}": os_image.rtmr(i) for i in range(3)}}
        self._events: list[RuntimeEvent] = [*os_image.boot_events, *boot_events]
        self._rtmr3 = replay_rtmr(e.digest for e in self._events if e.imr == RTMR3_INDEX)
        self._grant: AppKeyGrant | None = None
        self._app_ca: ratls.AppCa | None = None

    @classmethod
    def boot(
        cls,
        app_compose_bytes: bytes,
        app_id: bytes,
        key_provider: AppKeyProvider,
        state_dir: str | os.PathLike[str],
        *,
        instance_seed: bytes | None = None,
        os_image: SimulatedOsImage = SIMULATED_OS_IMAGE,
    ) -> GuestAgentSimulator:
        """Measure the boot, then obtain the app key from ``key_provider`` through attestation."""
        agent = cls.measure_boot(
            app_compose_bytes,
            app_id,
            key_provider.kms_root_pubkey(),
            state_dir,
            instance_seed=instance_seed,
            os_image=os_image,
        )
        agent.obtain_app_key(key_provider)
        return agent

    @classmethod
    def measure_boot(
        cls,
        app_compose_bytes: bytes,
        app_id: bytes,
        kms_root_pubkey: bytes,
        state_dir: str | os.PathLike[str],
        *,
        instance_seed: bytes | None = None,
        os_image: SimulatedOsImage = SIMULATED_OS_IMAGE,
    ) -> GuestAgentSimulator:
        """Boot ``os_image`` (its MRTD and RTMR0-2) and measure dstack's boot events into a fresh simulated RTMR3
        (no app key yet).

        ``instance_seed`` defaults to 32 random bytes; ``state_dir`` holds the simulated platform.
        """
        if not isinstance(os_image, SimulatedOsImage):
            raise TypeError("os_image must be a SimulatedOsImage")
        for name, value, size in (
            ("app_id", app_id, 20),
            ("kms_root_pubkey", kms_root_pubkey, 33),
            ("app_compose_bytes", app_compose_bytes, None),
        ):
            if not isinstance(value, bytes):
                raise TypeError(f"{name} must be bytes")
            if size is not None and len(value) != size:
                raise ValueError(f"{name} must be {size} bytes, got {len(value)}")
        _app_name(app_compose_bytes)  # refuse a compose that is not a JSON object, before measuring it
        seed = secrets.token_bytes(32) if instance_seed is None else instance_seed
        key_provider = json.dumps({"name": "kms", "id": kms_root_pubkey.hex()}, separators=(",", ":")).encode()
        measured = [
            ("system-preparing", b""),
            ("app-id", app_id),
            ("compose-hash", hashlib.sha256(app_compose_bytes).digest()),
            ("instance-id", hashlib.sha256(seed + app_id).digest()[:20]),
            ("boot-mr-done", b""),
            ("os-image-hash", os_image.os_image_hash),
            ("key-provider", key_provider),
            ("system-ready", b""),
        ]
        return cls(
            platform=SimulatedTdx.load_or_create(state_dir),
            app_compose=app_compose_bytes,
            app_id=app_id,
            kms_root_pubkey=kms_root_pubkey,
            boot_events=[RuntimeEvent.measure(name, payload) for name, payload in measured],
            os_image=os_image,
        )

    # ---- measurements and quotes ---------------------------------------------------------------

    @property
    def compose_hash(self) -> bytes:
        return self._compose_hash

    @property
    def os_image_hash(self) -> bytes:
        with self._lock:
            return next(e.payload for e in self._events if e.name == "os-image-hash")

    def attest(self, report_data: bytes) -> tuple[bytes, str]:
        """A SIMULATED quote over the current RTMRs with ``report_data`` (≤ 64 bytes, zero-padded), and
        the event log that replays to them (dstack GetQuote)."""
        if len(report_data) > 64:
            raise ValueError(f"report_data is at most 64 bytes, got {len(report_data)}")
        with self._lock:
            rtmr3, events = self._rtmr3, list(self._events)
        quote = self._platform.make_quote(
            report_data.ljust(64, b"\0"), rtmr3=rtmr3, mr_config_id=mr_config_id_v1(self._compose_hash),
            **self._os_registers,
        )
        return quote, event_log_json(events)

    def emit_event(self, name: str, payload: bytes) -> None:
        """Extend RTMR3 with a runtime event and append it to the log (dstack EmitEvent)."""
        event = RuntimeEvent.measure(name, payload)
        with self._lock:
            self._events.append(event)
            self._rtmr3 = extend_rtmr(self._rtmr3, event.digest)

    # ---- the app key ---------------------------------------------------------------------------

    def obtain_app_key(self, provider: AppKeyProvider) -> None:
        """Ask ``provider`` for the app key; accept it only if the measured KMS root issued it for this app."""
        grant = provider.get_app_key(self.attest)
        if grant.kms_root_pubkey != self._kms_root_pubkey:
            raise AppKeyGrantRejected("the grant names a KMS root other than the one measured at boot")
        try:
            app_public_key = keys.public_key_of("secp256k1", grant.k256_key)
            signer = keys.recover_signer(grant.k256_signature, app_key_issued_digest(self._app_id, app_public_key))
        except ValueError:
            raise AppKeyGrantRejected("the grant's app key or KMS signature is malformed") from None
        if signer != grant.kms_root_pubkey:
            raise AppKeyGrantRejected("the KMS signature on the app key does not recover to the measured KMS root")
        with self._lock:
            self._grant = grant

    def get_key(self, path: str, purpose: str, algorithm: str) -> DerivedKey:
        """dstack GetKey (formulas in :mod:`cvm.agent_sim.keys`)."""
        algorithm = keys.normalize_algorithm(algorithm, keys.GET_KEY_ALGORITHMS)
        grant = self._require_grant()
        key = keys.derive_path_key(grant.k256_key, path)
        public_key = keys.public_key_of(algorithm, key)
        sig0 = keys.sign_recoverable(grant.k256_key, keys.purpose_hash(purpose, public_key))
        return DerivedKey(key=key, signature_chain=(sig0, grant.k256_signature))

    def sign(self, algorithm: str, data: bytes) -> Signed:
        """dstack Sign: the GetKey key at path ``vms``, purpose ``signing``."""
        algorithm = keys.normalize_algorithm(algorithm, keys.SIGN_ALGORITHMS)
        key_algorithm = "secp256k1" if algorithm == "secp256k1_prehashed" else algorithm
        derived = self.get_key("vms", "signing", key_algorithm)
        signature, public_key = keys.sign_data(algorithm, derived.key, data)
        return Signed(signature=signature, public_key=public_key, signature_chain=(signature, *derived.signature_chain))

    # ---- RA-TLS (formulas in :mod:`cvm.agent_sim.ratls`) ---------------------------------------------

    @property
    def app_id(self) -> bytes:
        return self._app_id

    def app_ca(self) -> ratls.AppCa:
        """The app's RA-TLS CA, derived from the app key: its key is the same on every boot of the app; its
        certificate is made once per agent."""
        grant = self._require_grant()
        with self._lock:
            if self._app_ca is None:
                self._app_ca = ratls.derive_app_ca(grant.k256_key, self._app_id)
            return self._app_ca

    def path_tls_key(self, path: str) -> ec.EllipticCurvePrivateKey:
        """Tappd DeriveKey's P-256 key: ``derive(app key, [path])`` (the bytes GetKey returns for ``path``)."""
        return ratls.derive_p256_key(self._require_grant().k256_key, [path.encode("utf-8")])

    def _require_grant(self) -> AppKeyGrant:
        with self._lock:
            grant = self._grant
        if grant is None:
            raise AppKeyNotReady("the app key has not been obtained from the KMS yet")
        return grant

    # ---- Info ----------------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """dstack Info's values, decoded as dstack's ``get_info`` does: from a fresh (SIMULATED) quote
        and the boot values of its replayed event log."""
        quote, event_log = self.attest(bytes(64))
        td_report = parse_quote_unverified(quote).body
        boot = replay_event_log(event_log, td_report.rtmr3)
        return {
            "app_id": boot.app_id.hex(),
            "instance_id": (boot.instance_id or b"").hex(),  # dstack: empty when not measured
            "app_name": _app_name(self._app_compose),
            "compose_hash": boot.compose_hash.hex(),
            "device_id": SIMULATED_DEVICE_ID.hex(),
            "mr_aggregated": compute_mr_aggregated(td_report).hex(),
            "os_image_hash": (boot.os_image_hash or b"").hex(),
            "key_provider_info": boot.key_provider_info.decode(),
            "mrtd": td_report.mrtd.hex(),
            "rtmr0": td_report.rtmr0.hex(),
            "rtmr1": td_report.rtmr1.hex(),
            "rtmr2": td_report.rtmr2.hex(),
            "rtmr3": td_report.rtmr3.hex(),
            "event_log": json.loads(event_log),
            "app_compose": self._app_compose.decode("utf-8"),
        }


def _app_name(app_compose: bytes) -> str:
    try:
        compose = json.loads(app_compose)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError("app-compose.json is not valid UTF-8 JSON") from None
    if not isinstance(compose, dict):
        raise ValueError("app-compose.json is not a JSON object")
    return str(compose.get("name", ""))
