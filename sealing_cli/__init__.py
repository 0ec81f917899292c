"""The owners' side: the `seal` command and the sealed-dataset format (DESIGN §4).

The safe recipes are re-exported here; `_sealed_file` and the modules it uses (`_envelope`, `_stream`,
`_keywrap`, `_source`, `_tabular`) are the raw tier and are not part of the public surface.
"""

from sealing_cli._sealed_file import (
    DEFAULT_CHUNK_SIZE,
    DecryptionFailed,
    Envelope,
    EnvelopeHeader,
    EnvelopeSignatureInvalid,
    InputChangedWhileSealing,
    MalformedSealedFile,
    OpenedDataset,
    SealedFileError,
    SealedForAnotherRecipe,
    SealSummary,
    UnsupportedFormatVersion,
    open_sealed,
    read_envelope,
    seal_file,
)

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DecryptionFailed",
    "Envelope",
    "EnvelopeHeader",
    "EnvelopeSignatureInvalid",
    "InputChangedWhileSealing",
    "MalformedSealedFile",
    "OpenedDataset",
    "SealSummary",
    "SealedFileError",
    "SealedForAnotherRecipe",
    "UnsupportedFormatVersion",
    "open_sealed",
    "read_envelope",
    "seal_file",
]
