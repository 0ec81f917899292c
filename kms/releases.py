"""The KMS's journal of owner-key releases, so that a release survives a KMS crash without a second spend (DESIGN §3).

A `ReleaseOwnerKeys` request takes a single-use nonce, and its release id (`sha256("sealroom-release/v1:" ‖ nonce ‖
compose_hash)`) is what the chain records when the ε is spent. If the KMS dies after that spend and before its
answer, the CVM retries the very same request; the restarted KMS no longer knows the nonce (nonces live in memory).
So, once a request's quote has verified and before the chain is asked or anything is spent, the KMS notes here
which CVM key the nonce is bound to. A retry of that request — the same nonce with the same CVM ephemeral key, within
`RETRY_WINDOW_S` — is then let through the nonce check once more and verified again from scratch; if the release is
already recorded on-chain it is answered again without spending, else it is spent now (once: the contract refuses
a release id twice).

What the entry binds is what keeps the retry safe: the answer is sealed to the ephemeral key the quote binds
together with the nonce, and a nonce noted here is never accepted with any other key, so another CVM — even one
running the same approved recipe, handed this nonce by a hostile host — cannot get the owners' keys for a release it
did not pay for.

With a folder, each entry is also a 0600 file (written and fsynced before the chain is asked) named by the
sha256 of the nonce; entries older than the window are removed as new ones are written.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path

RELEASES_DIR = "releases"
# How long a release request may be retried (the client retries for far less: kms_client.client.RELEASE_RETRY_S).
RETRY_WINDOW_S = 600


@dataclass(frozen=True)
class PendingRelease:
    nonce: bytes
    cvm_pub: bytes
    app_id: bytes
    compose_hash: bytes
    taken_at: float

    def to_json(self) -> dict:
        return {"format": "sealroom-kms-release-journal/v1", "nonce": self.nonce.hex(), "cvm_pub": self.cvm_pub.hex(),
                "app_id": self.app_id.hex(), "compose_hash": self.compose_hash.hex(), "taken_at": self.taken_at}

    @classmethod
    def from_json(cls, raw: dict) -> PendingRelease:
        return cls(nonce=bytes.fromhex(raw["nonce"]), cvm_pub=bytes.fromhex(raw["cvm_pub"]),
                   app_id=bytes.fromhex(raw["app_id"]), compose_hash=bytes.fromhex(raw["compose_hash"]),
                   taken_at=float(raw["taken_at"]))


class ReleaseJournal:
    """Release requests taken in the last ``window_s`` seconds, by nonce: in memory, and in ``folder`` when given."""

    def __init__(self, folder: Path | None = None, *, window_s: float = RETRY_WINDOW_S):
        self.folder = Path(folder) if folder is not None else None
        self.window_s = window_s
        self._entries: dict[bytes, PendingRelease] = {}
        self._lock = threading.Lock()
        if self.folder is not None:
            self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)

    def _path(self, nonce: bytes) -> Path:
        return self.folder / f"{hashlib.sha256(nonce).hexdigest()}.json"

    def note(self, entry: PendingRelease) -> None:
        """Remember that ``entry.nonce`` was taken for ``entry.cvm_pub`` (durably, when there is a folder)."""
        with self._lock:
            self._prune(entry.taken_at)
            self._entries[entry.nonce] = entry
            if self.folder is None:
                return
            path = self._path(entry.nonce)
            tmp = path.with_suffix(".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(entry.to_json(), f)
                f.flush()
                os.fsync(f.fileno())
            tmp.replace(path)
            dir_fd = os.open(self.folder, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    def find(self, nonce: bytes, now: float) -> PendingRelease | None:
        """The entry for ``nonce`` if it was noted less than the window ago (in this process or, with a folder,
        before a restart), else None."""
        with self._lock:
            entry = self._entries.get(nonce)
            if entry is None and self.folder is not None:
                try:
                    entry = PendingRelease.from_json(json.loads(self._path(nonce).read_text()))
                except (OSError, ValueError, KeyError, TypeError):
                    entry = None
            if entry is None or entry.nonce != nonce or not 0 <= now - entry.taken_at <= self.window_s:
                return None
            return entry

    def _prune(self, now: float) -> None:
        self._entries = {n: e for n, e in self._entries.items() if now - e.taken_at <= self.window_s}
        if self.folder is None:
            return
        for path in self.folder.glob("*.json"):
            try:
                if now - PendingRelease.from_json(json.loads(path.read_text())).taken_at > self.window_s:
                    path.unlink(missing_ok=True)
            except (OSError, ValueError, KeyError, TypeError):
                continue
