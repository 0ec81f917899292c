"""The KMS root keys, encrypted at rest in the KMS state folder (DESIGN.md §3: losing the process loses nothing).

File ``<state_dir>/root.sealed``, JSON, format ``sealroom-kms-root/v1``::

    {"format": "sealroom-kms-root/v1",
     "kdf": {"name": "scrypt", "n": 32768, "r": 8, "p": 1, "salt": "<hex 16>"},
     "cipher": {"name": "aes-256-gcm", "nonce": "<hex 12>"},
     "ciphertext": "<hex: AES-256-GCM(k256 private key 32 ‖ derivation secret 32) ‖ tag 16>"}

The AES key is scrypt(passphrase, salt). The AAD is the sorted, compact JSON of everything but the
ciphertext (format, kdf and cipher objects), so a changed version string, parameter, salt or nonce fails
authentication just like a changed ciphertext. The file is created once, atomically (temporary file,
fsync, hard link into place, which fails instead of replacing an existing file), mode 0600, and is never
rewritten.

Errors::

    RootStoreError            the root store cannot be opened: wrong passphrase, corrupted or
                              unsupported file (the message says which); the file is left untouched

Caller mistakes (an empty passphrase, wrong types) raise ``ValueError``/``TypeError``.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from kms.keys import RootKeys, generate_root_keys

__all__ = ["ROOT_STORE_FORMAT", "ROOT_STORE_FILENAME", "RootStoreError", "load_or_create_root"]

ROOT_STORE_FORMAT = "sealroom-kms-root/v1"
ROOT_STORE_FILENAME = "root.sealed"

# scrypt at N=2^15, r=8 costs 32 MiB and ~0.1 s per open: fine for a service that opens it once per start.
_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**15, 8, 1
# Bounds accepted when reading, so a damaged file cannot ask for gigabytes of memory before the tag check.
_MAX_SCRYPT_MEMORY = 256 * 1024 * 1024
_SALT_LEN, _NONCE_LEN, _KEY_LEN, _SECRET_LEN = 16, 12, 32, 32
_CORRUPTED = "wrong passphrase or corrupted root store"


class RootStoreError(Exception):
    """The root store cannot be opened; nothing was written."""


def _aad(header: dict[str, Any]) -> bytes:
    return json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")


def _aes_key(passphrase: bytes, salt: bytes, n: int, r: int, p: int) -> bytes:
    return Scrypt(salt=salt, length=_KEY_LEN, n=n, r=r, p=p).derive(passphrase)


def _seal(root: RootKeys, passphrase: bytes, rng: Callable[[int], bytes]) -> bytes:
    salt, nonce = rng(_SALT_LEN), rng(_NONCE_LEN)
    header = {
        "format": ROOT_STORE_FORMAT,
        "kdf": {"name": "scrypt", "n": _SCRYPT_N, "r": _SCRYPT_R, "p": _SCRYPT_P, "salt": salt.hex()},
        "cipher": {"name": "aes-256-gcm", "nonce": nonce.hex()},
    }
    key = _aes_key(passphrase, salt, _SCRYPT_N, _SCRYPT_R, _SCRYPT_P)
    ciphertext = AESGCM(key).encrypt(nonce, root.k256_private_bytes + root.derivation_secret, _aad(header))
    return json.dumps({**header, "ciphertext": ciphertext.hex()}, indent=1).encode("utf-8")


def _parse_header(document: Any) -> tuple[dict[str, Any], bytes, bytes, bytes, tuple[int, int, int]]:
    """Split a parsed root store into (header, salt, nonce, ciphertext, scrypt params), checking shapes only."""
    if not isinstance(document, dict) or "format" not in document:
        raise RootStoreError(f"{_CORRUPTED}: not a root store document")
    if document["format"] != ROOT_STORE_FORMAT:
        raise RootStoreError(f"unsupported root store format {document['format']!r} (expected {ROOT_STORE_FORMAT!r})")
    try:
        kdf, cipher = document["kdf"], document["cipher"]
        header = {"format": document["format"], "kdf": kdf, "cipher": cipher}
        if set(document) != {*header, "ciphertext"} or kdf["name"] != "scrypt" or cipher["name"] != "aes-256-gcm":
            raise ValueError("unexpected fields")
        params = (kdf["n"], kdf["r"], kdf["p"])
        salt, nonce = bytes.fromhex(kdf["salt"]), bytes.fromhex(cipher["nonce"])
        ciphertext = bytes.fromhex(document["ciphertext"])
    except (KeyError, TypeError, ValueError) as exc:
        raise RootStoreError(f"{_CORRUPTED}: malformed fields") from exc
    n, r, p = params
    if not all(type(value) is int and value > 0 for value in params) or n & (n - 1) or 128 * n * r > _MAX_SCRYPT_MEMORY:
        raise RootStoreError(f"{_CORRUPTED}: scrypt parameters out of range")
    if len(salt) != _SALT_LEN or len(nonce) != _NONCE_LEN:
        raise RootStoreError(f"{_CORRUPTED}: malformed fields")
    return header, salt, nonce, ciphertext, params


def _open(data: bytes, passphrase: bytes) -> RootKeys:
    try:
        document = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RootStoreError(f"{_CORRUPTED}: not JSON") from exc
    header, salt, nonce, ciphertext, (n, r, p) = _parse_header(document)
    try:
        plaintext = AESGCM(_aes_key(passphrase, salt, n, r, p)).decrypt(nonce, ciphertext, _aad(header))
    except InvalidTag:
        raise RootStoreError(_CORRUPTED) from None
    if len(plaintext) != 2 * _SECRET_LEN:
        raise RootStoreError(f"{_CORRUPTED}: wrong key length")
    try:
        return RootKeys(k256_private_bytes=plaintext[:_SECRET_LEN], derivation_secret=plaintext[_SECRET_LEN:])
    except ValueError:
        raise RootStoreError(f"{_CORRUPTED}: invalid root key") from None


def _create_exclusively(path: Path, data: bytes) -> bool:
    """Write ``data`` to ``path`` atomically, only if ``path`` does not exist. False if it already did."""
    descriptor, temp_name = tempfile.mkstemp(dir=path.parent, prefix=".root.", suffix=".tmp")  # mode 0600
    try:
        with os.fdopen(descriptor, "wb") as temp:
            temp.write(data)
            temp.flush()
            os.fsync(temp.fileno())
        try:
            # link(), unlike rename(), fails if the target exists: a concurrent first start cannot clobber a root.
            os.link(temp_name, path)
        except FileExistsError:
            return False
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
        return True
    finally:
        os.unlink(temp_name)


def load_or_create_root(state_dir: Path, passphrase: bytes, *, rng: Callable[[int], bytes] = os.urandom) -> RootKeys:
    """Open the KMS root from ``state_dir/root.sealed``, creating it on first start.

    First start: generates root keys with ``rng`` and writes the sealed file (see the module docstring).
    Later starts: decrypts it with ``passphrase``. Raises :class:`RootStoreError` for a wrong passphrase, a
    corrupted or tampered file, or an unknown format version; the existing file is never overwritten.
    """
    if not isinstance(passphrase, bytes):
        raise TypeError("passphrase must be bytes")
    if not passphrase:
        raise ValueError("passphrase must not be empty")
    state_dir = Path(state_dir)
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = state_dir / ROOT_STORE_FILENAME
    if not path.exists():
        root = generate_root_keys(rng)
        if _create_exclusively(path, _seal(root, passphrase, rng)):
            return root
    return _open(path.read_bytes(), passphrase)
