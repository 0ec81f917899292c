"""Analysts' API tokens: issued once, kept only as sha256 hashes, checked in constant time (DESIGN.md §6 step 1).

The API's state folder holds ``analysts.json``::

    {"format": "sealroom-analysts/v1", "analysts": {"<name>": "<sha256 hex of the token>"}}

A token is ``sealroom-analyst-v1.`` followed by 256 random bits (base64url). It is shown once, when issued,
and never stored: whoever reads ``analysts.json`` learns the analysts' names, not their tokens. The API reads
the file on every request, so a token issued, rotated (``issue_token(…, rotate=True)`` replaces the old one) or
revoked (``revoke_token``) while the API runs takes effect at once. ``analyst_names`` lists who holds one.
Changes are made under an exclusive lock on ``.analysts.lock`` and written whole, so two operators issuing at
once lose neither token.

Errors::

    AuthError
    ├── Unauthenticated(reason)   no token, a malformed header, or a token no analyst holds
    ├── AnalystExists(name)       issuing for a name that holds a token, without rotate=True
    └── UnknownAnalyst(name)      revoking a name that holds no token

Caller mistakes (an invalid analyst name) raise ``ValueError``.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["ANALYSTS_FILE", "ANALYSTS_FORMAT", "TOKEN_PREFIX", "AuthError", "Unauthenticated", "AnalystExists",
           "UnknownAnalyst", "issue_token", "revoke_token", "analyst_names", "AnalystTokens"]

ANALYSTS_FILE = "analysts.json"
_LOCK_FILE = ".analysts.lock"
ANALYSTS_FORMAT = "sealroom-analysts/v1"
TOKEN_PREFIX = "sealroom-analyst-v1."
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class AuthError(Exception):
    """Base of this module's outcomes."""


class Unauthenticated(AuthError):
    """The request does not carry a token that an analyst holds; ``reason`` is safe to show the caller."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class AnalystExists(AuthError):
    """``name`` already holds a token; issuing another would silently cut them off (rotate on purpose)."""

    def __init__(self, name: str) -> None:
        super().__init__(f"analyst {name!r} already holds a token; rotating it cuts off the old one")
        self.name = name


class UnknownAnalyst(AuthError):
    """``name`` holds no token (never issued, or already revoked)."""

    def __init__(self, name: str) -> None:
        super().__init__(f"no analyst {name!r} holds a token")
        self.name = name


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _read_hashes(state_dir: Path) -> dict[str, str]:
    path = state_dir / ANALYSTS_FILE
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    if not isinstance(document, dict) or document.get("format") != ANALYSTS_FORMAT:
        raise ValueError(f"{path} is not a {ANALYSTS_FORMAT} file")
    return dict(document["analysts"])


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ValueError("an analyst name is 1-64 characters: letters, digits, '.', '_' or '-', starting with a "
                         "letter or digit")


@contextmanager
def _locked(state_dir: Path) -> Iterator[None]:
    """Hold the folder's lock for a read-modify-write of ``analysts.json`` (readers need none: writes are atomic)."""
    fd = os.open(state_dir / _LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)          # releases the lock


def _write_hashes(state_dir: Path, hashes: dict[str, str]) -> None:
    # Written whole to a private temporary file, then renamed: a reader never sees half a file.
    tmp = state_dir / f".{ANALYSTS_FILE}.{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"format": ANALYSTS_FORMAT, "analysts": hashes}, f, indent=2, sort_keys=True)
    tmp.replace(state_dir / ANALYSTS_FILE)


def issue_token(state_dir: Path, name: str, *, rotate: bool = False) -> str:
    """Issue a new API token for analyst ``name`` and return it; only its sha256 is stored.

    A name that already holds a token is refused (:class:`AnalystExists`) unless ``rotate``: then the new token
    replaces the old one, which stops working at once. The caller shows the token to the analyst once; it cannot
    be recovered afterwards.
    """
    _check_name(name)
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    with _locked(state_dir):
        hashes = _read_hashes(state_dir)
        if name in hashes and not rotate:
            raise AnalystExists(name)
        hashes[name] = _token_hash(token)
        _write_hashes(state_dir, hashes)
    return token


def revoke_token(state_dir: Path, name: str) -> None:
    """Revoke analyst ``name``'s token: the API refuses it from the next request on. :class:`UnknownAnalyst` when
    ``name`` holds none. Their runs and results stay on disk; a new token for the name (issued later) sees them."""
    _check_name(name)
    state_dir = Path(state_dir)
    if not (state_dir / ANALYSTS_FILE).exists():
        raise UnknownAnalyst(name)
    with _locked(state_dir):
        hashes = _read_hashes(state_dir)
        if hashes.pop(name, None) is None:
            raise UnknownAnalyst(name)
        _write_hashes(state_dir, hashes)


def analyst_names(state_dir: Path) -> list[str]:
    """The names of the analysts who hold a token, sorted (their tokens are not stored, so they cannot be listed)."""
    return sorted(_read_hashes(Path(state_dir)))


class AnalystTokens:
    """Checks bearer tokens against the hashes in ``<state_dir>/analysts.json``."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)

    def authenticate(self, authorization: str | None) -> str:
        """The analyst's name for an ``Authorization: Bearer <token>`` header value, or raise :class:`Unauthenticated`.

        Every stored hash is compared, in constant time, whether or not an earlier one matched, so the time
        taken says nothing about which analyst (if any) holds a token close to the one presented.
        """
        hint = "send `Authorization: Bearer <token>` with a token issued by `seal analyst-token NAME`"
        if not authorization:
            raise Unauthenticated(f"no API token: {hint}")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated(f"the Authorization header is not a bearer token: {hint}")
        presented = _token_hash(token.strip()).encode()
        matched = None
        for name, stored in _read_hashes(self.state_dir).items():
            if hmac.compare_digest(presented, stored.encode()) and matched is None:
                matched = name
        if matched is None:
            raise Unauthenticated("the API token is not one an analyst holds (revoked, mistyped, or for another API)")
        return matched
