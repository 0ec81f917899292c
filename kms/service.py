"""The KMS: releases keys only to CVMs whose attested recipe the chain allows.

Protocol logic lives in `KeyManagementService`, independent of HTTP; `kms.server` puts it behind FastAPI.

What the KMS trusts, and in what order (DESIGN §3):
1. a nonce it issued itself, unused and unexpired (single use: taken before anything else is checked);
2. a quote that verifies — real (dcap-qvl + collateral) or, only in dev mode, SIMULATED — whose report_data binds
   that nonce and the caller's ephemeral X25519 key;
3. app_id and compose_hash read from the replayed event log, never from the request body;
4. the boot (local, before the chain): the `key-provider` event names this KMS's root, and the OS image the CVM
   measured (`os-image-hash`) has a registered measurement record whose MRTD and RTMR0-2 are the quote's
   (`cvm.attest.os_image`; the records sit in `<state>/os-images/`);
5. the chain: DstackKms.isAppAllowed → DstackApp.isAppAllowed, and for owner keys each owner's own approval
   (`hasApproved`) and the study's privacy budget, which is spent on-chain before any key leaves. Approvals and
   `isAppAllowed` are read at a confirmed block, latest − ``confirmations`` (0 on the embedded dev chain), so that
   no key leaves on an approval that a reorganisation could still undo; the spend itself is a transaction,
   checked by the contract at the chain's head.

A refusal raises `Refused(code, message)`; `code` is one of `kms_client.wire.RefusalCode`. A chain the KMS cannot
reach (or that does not take its spend) raises `Unavailable` (HTTP 503, reason ``chain_unavailable``): nothing is
released, and the caller sends the same request again. Owner-key releases are idempotent per release id: a retried
`ReleaseOwnerKeys` (the same nonce, bound to the same CVM key: `kms.releases`) whose release is already recorded
on-chain is answered again without a second spend.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Callable

from eth_account.signers.local import LocalAccount
from eth_utils import to_checksum_address

from compose.app_compose import ComposeError, manifest_from_app_compose
from compose.app_compose import compose_hash as hash_app_compose
from compose.manifest import StudyManifest
from contracts.chain import (
    BudgetExceeded,
    Chain,
    ChainError,
    ChainUnreachable,
    ComposeHashIsRevoked,
    ComposeHashNotAllowed,
    DstackApp,
    DstackKms,
    OwnerDidNotApprove,
    ReleaseAlreadyRecorded,
    TransactionRejected,
)
from cvm.attest.os_image import (
    OsImageRegistry,
    OsMeasurementMismatch,
    OsRecordInvalid,
    UnknownOsImage,
)
from cvm.attest.verify import (
    AttestationError,
    SimulatedQuoteNotAllowed,
    VerifiedBoot,
    verify_attestation,
)
from kms.keys import (
    RootKeys,
    derive_app_key,
    derive_env_encrypt_key,
    derive_owner_seal_key,
    k256_public_key_compressed,
    sign_app_key,
    sign_env_encrypt_pubkey,
    sign_owner_seal_pubkey,
)
from kms.releases import PendingRelease, ReleaseJournal
from kms_client import wire
from kms_client.box import attestation_report_data, raw_public, seal_answer

NONCE_TTL_S = 60


class Refused(Exception):
    def __init__(self, code: wire.RefusalCode, message: str):
        super().__init__(message)
        self.code = code


class Unavailable(Exception):
    """The KMS cannot serve the request now: its chain is unreachable, or did not take the spend (HTTP 503). Nothing
    is released; the same request may be sent again (a release already spent is answered without a second spend)."""

    code: wire.RefusalCode = "chain_unavailable"


# Test fault injection, off by default: `python -m kms` with this variable set to "1" in its environment kills
# itself (SIGKILL) right after an owner-key release is recorded on-chain, before it answers — the crash a retry
# must survive. Only tests/test_fault_tolerance.py sets it, for the KMS processes it starts.
TEST_CRASH_AFTER_SPEND_ENV = "SEALROOM_KMS_TEST_CRASH_AFTER_SPEND"


# The chain's reasons (DstackKms / DstackApp `isAppAllowed`) and what they mean for a caller.
_CHAIN_REASON_CODES: dict[str, wire.RefusalCode] = {
    "Compose hash revoked": "revoked",
    "Compose hash not allowed": "not_approved",
    "App not registered": "unknown_app",
    "OS image is not allowed": "unknown_app",
}


@dataclass(frozen=True)
class AttestedCaller:
    app_id: bytes
    compose_hash: bytes
    simulated: bool
    cvm_pub: bytes
    nonce: bytes
    resumed: bool = False    # a retried release request: its nonce was taken before (kms.releases)


class NonceBook:
    """Nonces the KMS issued: each one answers once, and only before it expires."""

    def __init__(self, ttl_s: int = NONCE_TTL_S, rng: Callable[[int], bytes] = os.urandom):
        self.ttl_s = ttl_s
        self._rng = rng
        self._expiry: dict[bytes, float] = {}
        self._lock = threading.Lock()

    def issue(self, now: float) -> tuple[bytes, int]:
        nonce = self._rng(32)
        with self._lock:
            self._expiry = {n: t for n, t in self._expiry.items() if t > now}
            self._expiry[nonce] = now + self.ttl_s
        return nonce, int(now + self.ttl_s)

    def take(self, nonce: bytes, now: float) -> None:
        with self._lock:
            expiry = self._expiry.pop(nonce, None)
        if expiry is None:
            raise Refused("stale_nonce", "unknown or already used nonce: ask GetNonce for a fresh one")
        if expiry <= now:
            raise Refused("stale_nonce", "the nonce expired: ask GetNonce for a fresh one")


class KeyManagementService:
    def __init__(self, *, root: RootKeys, chain: Chain, registry: DstackKms, dev_mode: bool,
                 simulated_root_der: bytes | None, signer: LocalAccount | None,
                 os_images: OsImageRegistry | None = None, confirmations: int = 0,
                 releases: ReleaseJournal | None = None, test_crash_after_spend: bool = False,
                 clock: Callable[[], float] = time.time, rng: Callable[[int], bytes] = os.urandom):
        """``os_images``: the OS images this KMS serves, with their measurements; without it (None) every boot is
        refused, since no MRTD or RTMR0-2 could be checked. ``confirmations``: how many blocks deep the chain state
        the KMS acts on must be (it reads at latest − confirmations)."""
        if not (isinstance(confirmations, int) and confirmations >= 0):
            raise ValueError(f"confirmations must be a whole number >= 0, got {confirmations!r}")
        if dev_mode and simulated_root_der is None:
            raise ValueError("dev mode needs the simulated TDX root to pin")
        self.root = root
        self.chain = chain
        self.registry = registry
        self.dev_mode = dev_mode
        self.simulated_root_der = simulated_root_der
        self.signer = signer
        self.os_images = os_images if os_images is not None else OsImageRegistry()
        self.confirmations = confirmations
        self._key_provider_id = root.root_public_key_compressed.hex()
        self.clock = clock
        self.rng = rng
        self.nonces = NonceBook(rng=rng)
        self._release_lock = threading.Lock()
        self.releases = releases if releases is not None else ReleaseJournal()   # in memory without a folder
        self._test_crash_after_spend = test_crash_after_spend                    # see TEST_CRASH_AFTER_SPEND_ENV

    # --- public, unauthenticated ------------------------------------------------------------------------

    def meta(self) -> wire.Meta:
        return wire.Meta(
            k256_pubkey=self.root.root_public_key_compressed.hex(), root_address=self.root.root_address,
            chain_id=self.chain.chain_id, kms_contract_address=self.registry.address, is_dev=self.dev_mode,
            simulated_tdx_root_sha256=(hashlib.sha256(self.simulated_root_der).hexdigest()
                                       if self.dev_mode else None),
        )

    def issue_nonce(self) -> wire.Nonce:
        nonce, expires_at = self.nonces.issue(self.clock())
        return wire.Nonce(nonce=nonce.hex(), expires_at=expires_at)

    def owner_seal_key(self, request: wire.OwnerSealKeyRequest) -> wire.OwnerSealKey:
        app_id, h, owner = _address(request.app_id), _hex32(request.compose_hash), _address(request.owner)
        public = raw_public(derive_owner_seal_key(self.root, app_id, h, owner))
        timestamp = int(self.clock())
        signature = sign_owner_seal_pubkey(self.root, app_id, h, owner, public, timestamp)
        return wire.OwnerSealKey(app_id=request.app_id, compose_hash=request.compose_hash, owner=request.owner,
                                 public_key=public.hex(), timestamp=timestamp, signature=signature.hex())

    def env_encrypt_pubkey(self, request: wire.AppIdRequest) -> wire.EnvEncryptPubKey:
        """dstack's GetAppEnvEncryptPubKey: the app's env-encrypt X25519 public key, signed by the root (timestamped
        ``signature_v1``, and dstack's legacy signature). Public, like dstack's: deployers encrypt to it."""
        app_id = _address(request.app_id)
        public = raw_public(derive_env_encrypt_key(self.root, app_id))
        timestamp = int(self.clock())
        signature_v1, legacy = sign_env_encrypt_pubkey(self.root, app_id, public, timestamp)
        return wire.EnvEncryptPubKey(public_key=public.hex(), signature=legacy.hex(), timestamp=timestamp,
                                     signature_v1=signature_v1.hex())

    # --- attested -----------------------------------------------------------------------------------------

    def get_app_key(self, attestation: wire.Attestation) -> wire.AppKeyResponse:
        caller = self._attest(attestation)
        app_key = derive_app_key(self.root, caller.app_id)
        signature = sign_app_key(self.root, caller.app_id, k256_public_key_compressed(app_key))
        answer = json.dumps({"k256_key": app_key.hex(), "k256_signature": signature.hex()}).encode()
        box = seal_answer(answer, nonce=caller.nonce, cvm_pub=caller.cvm_pub, rng=self.rng)
        return wire.AppKeyResponse(box=wire.SealedBox(**box.to_wire()), simulated=caller.simulated)

    def release_owner_keys(self, request: wire.OwnerKeysRequest) -> wire.OwnerKeysResponse:
        """The consenting owners' unwrap keys, after the manifest's ε is spent on-chain (one release per nonce).

        Idempotent per release id: the same request sent again (after a lost answer, a KMS crash or a 503) is
        verified again and, if its release is already recorded on-chain, answered again without a second spend."""
        caller = self._attest(request.attestation, release=True)
        manifest = self._attested_manifest(caller, request.app_compose)
        if manifest.analysis.kind == "fed_round":
            raise Refused("bad_request", "a federated round reads no sealed data: it gets no owner keys")
        release_id = hashlib.sha256(b"sealroom-release/v1:" + caller.nonce + caller.compose_hash).digest()
        owners, receipt, budget = self._spend(caller, manifest, manifest.epsilon, release_id, idempotent=True)
        if self._test_crash_after_spend and not receipt.get("answered_again"):
            os.kill(os.getpid(), signal.SIGKILL)   # test fault injection only (TEST_CRASH_AFTER_SPEND_ENV)
        keys = {owner: derive_owner_seal_key(self.root, caller.app_id, caller.compose_hash, _address(owner))
                .private_bytes_raw().hex() for owner in owners}
        box = seal_answer(json.dumps(keys).encode(), nonce=caller.nonce, cvm_pub=caller.cvm_pub, rng=self.rng)
        return wire.OwnerKeysResponse(
            box=wire.SealedBox(**box.to_wire()), release_id=release_id.hex(),
            release_tx=receipt["transactionHash"].hex(), epsilon_spent=budget["epsilon_spent"],
            epsilon_remaining=budget["epsilon_remaining"], simulated=caller.simulated,
        )

    def record_round_spend(self, request: wire.RoundSpendRequest) -> wire.RoundSpendResponse:
        """A federated round's ε, spent on-chain once per round recipe, capped by the measured round contract."""
        caller = self._attest(request.attestation)
        manifest = self._attested_manifest(caller, request.app_compose)
        if manifest.analysis.kind != "fed_round":
            raise Refused("bad_request", "only a federated round recipe records round spends")
        cap = float(manifest.analysis.params.get("epsilon_per_round", 0))
        if not 0 < request.epsilon <= cap:
            raise Refused("bad_request", f"a round may spend at most its contract's ε per round ({cap:g})")
        # One charge per round recipe: a replayed or repeated request hits ReleaseAlreadyRecorded on-chain.
        release_id = hashlib.sha256(b"sealroom-round/v1:" + caller.app_id + caller.compose_hash).digest()
        _owners, receipt, budget = self._spend(caller, manifest, request.epsilon, release_id)
        return wire.RoundSpendResponse(release_id=release_id.hex(), release_tx=receipt["transactionHash"].hex(),
                                       epsilon_spent=budget["epsilon_spent"],
                                       epsilon_remaining=budget["epsilon_remaining"], simulated=caller.simulated)

    def _attested_manifest(self, caller: AttestedCaller, app_compose_text: str) -> StudyManifest:
        app_compose = app_compose_text.encode()
        if hash_app_compose(app_compose) != caller.compose_hash:
            raise Refused("bad_request", "app_compose does not hash to the attested compose hash")
        try:
            return manifest_from_app_compose(app_compose)
        except ComposeError as exc:
            raise Refused("bad_request", f"the attested app-compose.json holds no valid study manifest: {exc}") from None

    def _spend(self, caller: AttestedCaller, manifest: StudyManifest, epsilon: float,
               release_id: bytes, *, idempotent: bool = False) -> tuple[list[str], dict, dict]:
        """Check each input owner's own consent, then record the spend on-chain; nothing is spent on a refusal.

        ``idempotent`` (owner-key releases): a release id already recorded on-chain is not spent again; its record
        is returned instead (marked ``answered_again``). A chain that cannot be reached raises `Unavailable`."""
        if self.signer is None:
            raise Refused("bad_request", "this KMS has no signer for on-chain budget spends")
        owners = sorted({to_checksum_address(i.owner) for i in manifest.inputs})
        app = DstackApp(self.chain, to_checksum_address(caller.app_id))
        retry = ("send the same request again: a release already recorded is answered without a second spend"
                 if idempotent else "nothing was released")
        # One spend at a time: the consent and budget checks and the on-chain spend must not interleave.
        with self._release_lock:
            try:
                at = self.chain.confirmed_block(self.confirmations)
                for owner in owners:
                    if not app.has_approved(caller.compose_hash, owner, block=at):
                        raise Refused("owner_not_consenting", f"owner {owner} did not approve this compose hash")
                recorded = self._recorded(app, release_id, caller, owners) if caller.resumed and idempotent else None
            except ChainUnreachable as exc:
                raise Unavailable(f"{exc}: the KMS cannot check consent or the budget, and this request "
                                  "spent nothing; try again later") from None
            if recorded is not None:
                return owners, recorded, self._budget_after(app, retry)
            try:
                receipt = app.record_release(release_id, caller.compose_hash, owners, epsilon, self.signer)
            except ReleaseAlreadyRecorded as exc:
                # A retry that overtook its first request, which recorded the release meanwhile: answer it again.
                recorded = self._recorded(app, release_id, caller, owners) if idempotent else None
                if recorded is None:
                    raise Refused("bad_request", str(exc)) from None
                return owners, recorded, self._budget_after(app, retry)
            except (ChainUnreachable, TransactionRejected) as exc:
                raise Unavailable(f"the chain did not record the release ({exc}); {retry}") from None
            except BudgetExceeded as exc:
                raise Refused("budget_exhausted", str(exc)) from None
            except ComposeHashIsRevoked as exc:
                raise Refused("revoked", str(exc)) from None
            except ComposeHashNotAllowed as exc:
                raise Refused("not_approved", str(exc)) from None
            except OwnerDidNotApprove as exc:
                raise Refused("owner_not_consenting", str(exc)) from None
            return owners, receipt, self._budget_after(app, retry)

    def _recorded(self, app: DstackApp, release_id: bytes, caller: AttestedCaller, owners: list[str]) -> dict | None:
        """The on-chain record of ``release_id`` when it is there (and confirmed), to answer a retry again."""
        try:
            recorded = app.recorded_release(release_id)
            at = self.chain.confirmed_block(self.confirmations) if recorded is not None else "latest"
        except ChainUnreachable as exc:
            raise Unavailable(f"{exc}: the KMS cannot tell whether this release was recorded; send the same "
                              "request again") from None
        if recorded is None:
            return None
        if recorded["compose_hash"] != caller.compose_hash or sorted(recorded["owners"]) != owners:
            raise Refused("bad_request", f"release {release_id.hex()} is recorded for another recipe or owners")
        if at != "latest" and recorded["blockNumber"] > at:
            raise Unavailable(f"release {release_id.hex()} is recorded but not yet {self.confirmations} blocks "
                              "deep; send the same request again")
        return {**recorded, "answered_again": True}

    def _budget_after(self, app: DstackApp, retry: str) -> dict:
        try:
            return app.budget().to_json()
        except ChainUnreachable as exc:
            raise Unavailable(f"{exc} after the release was recorded; {retry}") from None

    def _attest(self, attestation: wire.Attestation, *, release: bool = False) -> AttestedCaller:
        """The verified caller. ``release``: an owner-key release, whose nonce is journaled (`kms.releases`) once the
        quote verifies, so that the same request can be sent again and resumed."""
        try:
            nonce = bytes.fromhex(attestation.nonce)
            cvm_pub = bytes.fromhex(attestation.ephemeral_pubkey)
            quote = bytes.fromhex(attestation.quote)
        except ValueError:
            raise Refused("bad_request", "nonce, ephemeral_pubkey and quote must be hex") from None
        if len(cvm_pub) != 32:
            raise Refused("bad_request", "ephemeral_pubkey must be a 32-byte X25519 key")
        now = self.clock()
        resumed = self._take_nonce(nonce, cvm_pub, now, release)
        try:
            verified = verify_attestation(
                quote, attestation.event_log, expected_report_data=attestation_report_data(nonce, cvm_pub),
                collateral=attestation.collateral, now=int(now), allow_simulated=self.dev_mode,
                simulated_root_der=self.simulated_root_der,
            )
        except SimulatedQuoteNotAllowed as exc:
            raise Refused("simulated_quote_refused", f"{exc} (this KMS is not in dev mode)") from None
        except AttestationError as exc:
            raise Refused("bad_quote", str(exc)) from None
        self._check_boot(verified)
        if resumed is not None and (resumed.app_id, resumed.compose_hash) != (verified.app_id, verified.compose_hash):
            raise Refused("stale_nonce", "this nonce was taken for another app or recipe")
        if release and resumed is None:
            self.releases.note(PendingRelease(nonce=nonce, cvm_pub=cvm_pub, app_id=verified.app_id,
                                              compose_hash=verified.compose_hash, taken_at=now))
        try:
            allowed, reason = self.registry.is_app_allowed(_boot_info(verified),
                                                           block=self.chain.confirmed_block(self.confirmations))
        except ChainUnreachable as exc:
            raise Unavailable(f"{exc}: the KMS cannot ask whether the chain allows this app, and this request "
                              "spent and released nothing; try again later") from None
        except ChainError as exc:
            raise Refused("bad_request", f"could not ask the chain: {exc}") from None
        if not allowed:
            raise Refused(_CHAIN_REASON_CODES.get(reason, "not_approved"), f"the chain refused: {reason}")
        return AttestedCaller(app_id=verified.app_id, compose_hash=verified.compose_hash,
                              simulated=verified.simulated, cvm_pub=cvm_pub, nonce=nonce, resumed=resumed is not None)

    def _take_nonce(self, nonce: bytes, cvm_pub: bytes, now: float, release: bool) -> PendingRelease | None:
        """Take a fresh nonce (None); or, for a release request sent again, accept once more a nonce the journal
        binds to this very CVM key (its entry). A nonce is never accepted with another key."""
        try:
            self.nonces.take(nonce, now)
            return None
        except Refused:
            entry = self.releases.find(nonce, now) if release else None
            if entry is None or not hmac.compare_digest(entry.cvm_pub, cvm_pub):
                raise
            return entry

    def _check_boot(self, verified: VerifiedBoot) -> None:
        """The CVM booted trusting this KMS, on a registered OS image whose MRTD and RTMR0-2 the quote carries.
        Local checks (a dict lookup and a few comparisons), run before the chain is asked and before anything is
        spent or released."""
        provider = verified.events.key_provider
        named = provider.get("id") if isinstance(provider, dict) and provider.get("name") == "kms" else None
        if not isinstance(named, str) or named.lower() != self._key_provider_id:
            measured = verified.key_provider_info.decode("utf-8", "replace")[:200] or "nothing"
            raise Refused("bad_quote", f"the CVM's key-provider event names {measured}, not this KMS (root public "
                                       f"key {self._key_provider_id}): it booted trusting another key provider")
        try:
            self.os_images.gate(verified.os_image_hash, verified.claims)
        except UnknownOsImage as exc:
            raise Refused("unknown_app", str(exc)) from None
        except OsMeasurementMismatch as exc:
            raise Refused("bad_quote", str(exc)) from None
        except OsRecordInvalid as exc:   # the operator's registry is broken: fail closed
            raise Refused("bad_request", f"this KMS's OS image registry cannot be read: {exc}") from None


def _boot_info(verified: VerifiedBoot) -> tuple:
    """dstack's AppBootInfo, in the contract's field order, from verified measurements only."""
    zero20, zero32 = b"\0" * 20, b"\0" * 32
    return (to_checksum_address(verified.app_id), verified.compose_hash,
            to_checksum_address(verified.instance_id or zero20), verified.device_id, verified.mr_aggregated,
            verified.mr_system, verified.os_image_hash or zero32, verified.tcb_status, list(verified.advisory_ids))


def _hex32(value: str) -> bytes:
    try:
        raw = bytes.fromhex(value.removeprefix("0x"))
    except ValueError:
        raise Refused("bad_request", f"not hex: {value!r}") from None
    if len(raw) != 32:
        raise Refused("bad_request", "a compose hash is 32 bytes")
    return raw


def _address(value: str) -> bytes:
    try:
        raw = bytes.fromhex(value.removeprefix("0x"))
    except ValueError:
        raise Refused("bad_request", f"not an address: {value!r}") from None
    if len(raw) != 20:
        raise Refused("bad_request", f"an address is 20 bytes: {value!r}")
    return raw

