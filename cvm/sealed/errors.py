"""The exception tree of the sealed-dataset format (DESIGN.md §4), re-exported by ``cvm.sealed.dataset``.

::

    SealedFileError                  base class: catch this for "the sealed file could not be used"
    ├── MalformedSealedFile          not a well-formed sealroom.sealed/v1 file: bad magic line, lengths,
    │                                JSON, field values, wrong size (truncated or trailing data)
    ├── UnsupportedFormatVersion     a sealroom.sealed file of a version this code does not read
    ├── EnvelopeSignatureInvalid     the owner signature does not verify, or it was made by someone
    │                                other than the owner the envelope names
    ├── SealedForAnotherRecipe       sealed for another app_id / compose_hash than the caller expects
    ├── PayloadDigestMismatch        the payload does not hash to the owner-signed ciphertext_sha256 (found
    │                                by ``verify_payload``, with no key, before anything is decrypted)
    ├── DecryptionFailed             the data key cannot be unwrapped (wrong key) or the payload is not
    │                                exactly what the owner sealed; deliberately says no more than that
    └── InputChangedWhileSealing     the input file changed size while it was being sealed

Caller mistakes (wrong types, wrong byte lengths, bad parameters, an input that is neither CSV nor
Parquet) raise ``TypeError`` / ``ValueError``; operating-system failures (missing file, full disk)
propagate as ``OSError``. No message carries plaintext or key material.
"""

from __future__ import annotations

__all__ = [
    "DecryptionFailed",
    "EnvelopeSignatureInvalid",
    "InputChangedWhileSealing",
    "MalformedSealedFile",
    "PayloadDigestMismatch",
    "SealedFileError",
    "SealedForAnotherRecipe",
    "UnsupportedFormatVersion",
]


class SealedFileError(Exception):
    """Base class of every sealed-file outcome."""


class MalformedSealedFile(SealedFileError):
    """The bytes do not follow the sealroom.sealed/v1 layout (see ``cvm.sealed.envelope``)."""


class UnsupportedFormatVersion(SealedFileError):
    """The magic line names a sealroom.sealed version other than 1."""


class EnvelopeSignatureInvalid(SealedFileError):
    """The envelope signature is invalid or was not made by the envelope's owner."""


class SealedForAnotherRecipe(SealedFileError):
    """The file is bound to another app_id or compose hash than the one expected."""


class PayloadDigestMismatch(SealedFileError):
    """The payload's SHA-256 differs from the ``ciphertext_sha256`` the owner signed: damaged or altered.

    The digest is public (it is in the signed envelope), so saying which check failed gives nothing away.
    """


class DecryptionFailed(SealedFileError):
    """Wrong unwrap key, or the payload was altered, reordered, truncated or spliced.

    One opaque error on purpose (like age and Fernet): an attacker learns nothing about which check
    failed, and no partial plaintext is ever returned.
    """

    def __init__(self, message: str = "decryption failed: wrong key or the sealed payload was altered") -> None:
        super().__init__(message)


class InputChangedWhileSealing(SealedFileError):
    """The input file grew or shrank while it was being read; nothing was written."""
