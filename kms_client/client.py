"""The client side of the KMS protocol.

Owners fetch (and verify) their sealing public key; CVMs attest and receive their app key or the owners' unwrap
keys, encrypted to an ephemeral key bound into their quote.

Exception tree::

    KmsError
    ├── KmsUnreachable         the KMS did not answer
    │   └── KmsUnavailable     it answered 503: it cannot reach its chain now (`.code` "chain_unavailable")
    ├── KmsRefused             the KMS said no; `.code` is its RefusalCode, the message says why
    └── KmsAnswerInvalid       the answer did not verify (bad signature, wrong root, undecryptable box)

`release_owner_keys` rides out a KMS restart or a chain outage: on a connection error or a 503 it sends the very
same request again (same nonce, same quote, same ephemeral key) for up to ``release_retry_s`` seconds. The KMS
answers a release it already recorded on-chain again, without a second spend (DESIGN §3), and only to the key
that request bound. A retried request whose nonce the KMS no longer knows was never journaled, so it spent nothing:
the client then starts over with a fresh nonce.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Callable, TypeVar

import httpx
from cryptography.hazmat.primitives.asymmetric.x25519 import (
    X25519PrivateKey,
    X25519PublicKey,
)
from eth_keys import keys as eth_keys
from eth_keys.exceptions import BadSignature
from eth_keys.exceptions import ValidationError as EthKeysValidationError
from eth_utils import to_checksum_address
from pydantic import BaseModel, ValidationError

from kms_client import wire
from kms_client.box import (
    BoxOpenFailed,
    SealedAnswer,
    attestation_report_data,
    open_answer,
    raw_public,
)
from kms_client.messages import app_key_issued_digest, k256_public_key_compressed
from kms_client.signature_chain import KmsClientError, verify_env_encrypt_pubkey, verify_owner_seal_pubkey

T = TypeVar("T", bound=BaseModel)

# attest(report_data) -> (quote bytes, event log JSON string): dstack-sdk's get_quote, inside a CVM.
Attest = Callable[[bytes], tuple[bytes, str]]

# How long a CVM keeps sending one owner-key release again while the KMS restarts or its chain is down (the KMS
# accepts a retried release for far longer: kms.releases.RETRY_WINDOW_S), and the pause between tries.
RELEASE_RETRY_S = 60.0
_RETRY_PAUSE_S = (0.25, 2.0)   # first pause, doubling up to the second


class KmsError(Exception):
    """Base of everything the KMS client raises."""


class KmsUnreachable(KmsError):
    pass


class KmsUnavailable(KmsUnreachable):
    """The KMS answered 503: it cannot reach its chain (or the chain did not take the spend). Nothing was released;
    the same request may be sent again."""

    def __init__(self, code: str, message: str):
        super().__init__(f"KMS unavailable ({code}): {message}")
        self.code = code


class KmsRefused(KmsError):
    def __init__(self, code: str, message: str):
        super().__init__(f"KMS refused ({code}): {message}")
        self.code = code


class KmsAnswerInvalid(KmsError):
    pass


@dataclass(frozen=True)
class AppKey:
    k256_key: bytes
    k256_signature: bytes
    kms_root_pubkey: bytes
    simulated: bool


@dataclass(frozen=True)
class EnvEncryptKey:
    """An app's env-encrypt X25519 public key, verified: the KMS root signed it (``signature_v1``) at ``timestamp``."""

    public_key: bytes
    timestamp: int
    signature_v1: bytes


@dataclass(frozen=True)
class OwnerKeyRelease:
    keys: dict[str, X25519PrivateKey]
    release_id: str
    release_tx: str
    epsilon_spent: float
    epsilon_remaining: float
    simulated: bool


class KmsClient:
    def __init__(self, url: str, *, timeout_s: float = 10.0, release_retry_s: float = RELEASE_RETRY_S):
        self.url = url.rstrip("/")
        self.release_retry_s = release_retry_s
        self._http = httpx.Client(base_url=self.url, timeout=timeout_s)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> KmsClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, body: BaseModel | None, answer: type[T]) -> T:
        try:
            reply = self._http.post(f"/prpc/{method}", json=body.model_dump() if body else {})
        except httpx.TransportError as exc:
            raise KmsUnreachable(f"KMS unreachable at {self.url}: {type(exc).__name__}") from None
        try:
            if reply.status_code == 403:
                refusal = wire.Refusal.model_validate_json(reply.content)
                raise KmsRefused(refusal.reason, refusal.error)
            if reply.status_code == 503:   # the KMS's own (with its reason), or a proxy's in front of it
                try:
                    refusal = wire.Refusal.model_validate_json(reply.content)
                except ValidationError:
                    raise KmsUnavailable("unavailable", f"HTTP 503 to {method}") from None
                raise KmsUnavailable(refusal.reason, refusal.error)
            if reply.status_code != 200:
                raise KmsError(f"KMS answered HTTP {reply.status_code} to {method}: {reply.text[:200]}")
            return answer.model_validate_json(reply.content)
        except ValidationError:
            raise KmsAnswerInvalid(f"malformed {method} answer from the KMS") from None

    def meta(self) -> wire.Meta:
        return self._call("GetMeta", None, wire.Meta)

    def owner_seal_key(self, app_id: str, compose_hash: bytes, owner: str, *, pinned_root_address: str,
                       now: int | None = None) -> X25519PublicKey:
        """The owner's sealing public key for this recipe, verified against the KMS root the owner pins."""
        request = wire.OwnerSealKeyRequest(app_id=to_checksum_address(app_id), compose_hash=compose_hash.hex(),
                                           owner=to_checksum_address(owner))
        signed = self._call("GetOwnerSealKey", request, wire.OwnerSealKey)
        if (signed.app_id, signed.compose_hash, signed.owner) != (request.app_id, request.compose_hash, request.owner):
            raise KmsAnswerInvalid("the KMS answered for another app, recipe or owner")
        try:
            public, signature = bytes.fromhex(signed.public_key), bytes.fromhex(signed.signature)
        except ValueError:
            raise KmsAnswerInvalid("malformed GetOwnerSealKey answer from the KMS: not hex") from None
        try:
            verify_owner_seal_pubkey(
                bytes.fromhex(request.app_id[2:]), compose_hash, bytes.fromhex(request.owner[2:]), public,
                signed.timestamp, signature, pinned_root_address=pinned_root_address,
                now=int(time.time()) if now is None else now,
            )
        except KmsClientError as exc:
            raise KmsAnswerInvalid(str(exc)) from None
        return X25519PublicKey.from_public_bytes(public)

    def env_encrypt_pubkey(self, app_id: str, *, pinned_root_address: str, now: int | None = None) -> EnvEncryptKey:
        """The app's env-encrypt X25519 public key (dstack GetAppEnvEncryptPubKey), its timestamped ``signature_v1``
        verified against the KMS root the caller pins: what deployers encrypt a CVM's environment to."""
        request = wire.AppIdRequest(app_id=to_checksum_address(app_id))
        signed = self._call("GetAppEnvEncryptPubKey", request, wire.EnvEncryptPubKey)
        try:
            public, signature = bytes.fromhex(signed.public_key), bytes.fromhex(signed.signature_v1)
        except ValueError:
            raise KmsAnswerInvalid("malformed GetAppEnvEncryptPubKey answer from the KMS: not hex") from None
        try:
            verify_env_encrypt_pubkey(bytes.fromhex(request.app_id[2:]), public, signed.timestamp, signature,
                                      pinned_root_address=pinned_root_address,
                                      now=int(time.time()) if now is None else now)
        except KmsClientError as exc:
            raise KmsAnswerInvalid(str(exc)) from None
        return EnvEncryptKey(public_key=public, timestamp=signed.timestamp, signature_v1=signature)

    def _attestation(self, attest: Attest, collateral: str | None) -> tuple[wire.Attestation, X25519PrivateKey, bytes]:
        nonce = bytes.fromhex(self._call("GetNonce", None, wire.Nonce).nonce)
        ephemeral = X25519PrivateKey.generate()
        quote, event_log = attest(attestation_report_data(nonce, raw_public(ephemeral)))
        attestation = wire.Attestation(quote=quote.hex(), event_log=event_log, nonce=nonce.hex(),
                                       ephemeral_pubkey=raw_public(ephemeral).hex(), collateral=collateral)
        return attestation, ephemeral, nonce

    def _open(self, box: wire.SealedBox, nonce: bytes, ephemeral: X25519PrivateKey) -> dict:
        try:
            return json.loads(open_answer(SealedAnswer.from_wire(box.model_dump()), nonce=nonce, cvm_key=ephemeral))
        except (BoxOpenFailed, ValueError) as exc:
            raise KmsAnswerInvalid(str(exc)) from None

    def get_app_key(self, attest: Attest, *, app_id: bytes, pinned_root_pubkey: bytes | None = None,
                    collateral: str | None = None) -> AppKey:
        """Attest and receive the app key; its KMS signature must recover to the pinned root (or GetMeta's)."""
        root = pinned_root_pubkey or bytes.fromhex(self.meta().k256_pubkey)
        key = self.fetch_app_key_unverified(attest, root, collateral=collateral)
        _check_app_key_issued(app_id, key.k256_key, key.k256_signature, root)
        return key

    def fetch_app_key_unverified(self, attest: Attest, root: bytes, *, collateral: str | None = None) -> AppKey:
        """The app key as the KMS sent it, NOT checked against any root: for a caller (the guest agent) that
        checks the KMS signature itself against the root it measured at boot."""
        attestation, ephemeral, nonce = self._attestation(attest, collateral)
        answer = self._call("GetAppKey", attestation, wire.AppKeyResponse)
        opened = self._open(answer.box, nonce, ephemeral)
        try:
            k256_key, k256_signature = bytes.fromhex(opened["k256_key"]), bytes.fromhex(opened["k256_signature"])
        except (KeyError, TypeError, ValueError):
            raise KmsAnswerInvalid("the GetAppKey box does not hold an app key and its signature") from None
        return AppKey(k256_key=k256_key, k256_signature=k256_signature, kms_root_pubkey=root,
                      simulated=answer.simulated)

    def release_owner_keys(self, attest: Attest, app_compose: bytes, *,
                           collateral: str | None = None) -> OwnerKeyRelease:
        """Attest and receive the consenting owners' unwrap keys; the KMS spends the study's ε on-chain first.

        A connection error or a 503 is retried with the same request for ``release_retry_s`` seconds (see the
        module's docstring): a release the KMS recorded before it crashed is answered then, spent once."""
        deadline = time.monotonic() + self.release_retry_s
        pause = _RETRY_PAUSE_S[0]
        attempt: tuple[wire.OwnerKeysRequest, X25519PrivateKey, bytes] | None = None
        interrupted = False    # the current request met a connection error or a 503 at least once
        while True:
            try:
                if attempt is None:
                    attestation, ephemeral, nonce = self._attestation(attest, collateral)
                    request = wire.OwnerKeysRequest(attestation=attestation, app_compose=app_compose.decode())
                    attempt, interrupted = (request, ephemeral, nonce), False
                request, ephemeral, nonce = attempt
                answer = self._call("ReleaseOwnerKeys", request, wire.OwnerKeysResponse)
                break
            except KmsRefused as refused:
                # A retry whose nonce the KMS no longer knows was never journaled: it spent nothing. Start over.
                if refused.code == "stale_nonce" and interrupted and time.monotonic() < deadline:
                    attempt = None
                    continue
                raise
            except KmsUnreachable:
                if time.monotonic() + pause > deadline:
                    raise
                interrupted = attempt is not None
                time.sleep(pause)
                pause = min(pause * 2, _RETRY_PAUSE_S[1])
        opened = self._open(answer.box, nonce, ephemeral)
        try:
            keys = {owner: X25519PrivateKey.from_private_bytes(bytes.fromhex(k)) for owner, k in opened.items()}
        except (AttributeError, TypeError, ValueError):
            raise KmsAnswerInvalid("the ReleaseOwnerKeys box does not hold X25519 owner keys") from None
        return OwnerKeyRelease(keys=keys, release_id=answer.release_id, release_tx=answer.release_tx,
                               epsilon_spent=answer.epsilon_spent, epsilon_remaining=answer.epsilon_remaining,
                               simulated=answer.simulated)

    def record_round_spend(self, attest: Attest, app_compose: bytes, epsilon: float, *,
                           collateral: str | None = None) -> wire.RoundSpendResponse:
        """Attest as a federated aggregator and have the round's ε recorded on-chain (once per round recipe)."""
        attestation, _ephemeral, _nonce = self._attestation(attest, collateral)
        request = wire.RoundSpendRequest(attestation=attestation, app_compose=app_compose.decode(), epsilon=epsilon)
        return self._call("RecordRoundSpend", request, wire.RoundSpendResponse)


def _check_app_key_issued(app_id: bytes, key: bytes, signature: bytes, root_pubkey: bytes) -> None:
    """The KMS's signature over the app key (dstack's k256_signature) must recover to the pinned root."""
    try:
        digest = app_key_issued_digest(app_id, k256_public_key_compressed(key))
        signer = eth_keys.Signature(signature_bytes=signature).recover_public_key_from_msg_hash(digest)
    except (BadSignature, EthKeysValidationError, ValueError):
        raise KmsAnswerInvalid("the app key's KMS signature is malformed") from None
    if signer.to_compressed_bytes() != root_pubkey:
        raise KmsAnswerInvalid("the app key was not issued by the pinned KMS root")


class KmsAppKeyProvider:
    """The KMS as a booting CVM's guest agent sees it (cvm.agent_sim's AppKeyProvider protocol).

    The root comes from GetMeta; the agent measures it into RTMR3 (`key-provider`) before asking for its key,
    and accepts the key only if the KMS signature recovers to that measured root.
    """

    def __init__(self, kms_url: str):
        self.client = KmsClient(kms_url)
        self._root = bytes.fromhex(self.client.meta().k256_pubkey)

    def kms_root_pubkey(self) -> bytes:
        return self._root

    def close(self) -> None:
        self.client.close()

    def get_app_key(self, attest: Attest) -> AppKey:
        return self.client.fetch_app_key_unverified(attest, self._root)


def make_key_provider(kms_url: str) -> KmsAppKeyProvider:
    return KmsAppKeyProvider(kms_url)
