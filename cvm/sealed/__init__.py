"""The sealed-dataset format (docs/design.md, "Sealing"): one file per owner's dataset, encrypted at the source
under a data key wrapped to the owner's sealing key for one recipe, signed by the owner.

The safe recipes are re-exported here. `dataset` implements them over the raw tier: `envelope` (layout and
the signed bytes), `stream` (chunks and nonces), `keywrap` (the data-key wrap), `source` and `tabular`
(reading the owner's table). Owners seal with it (`seal dataset`); the CVM opens with it (`cvm.unwrap`).
"""

from cvm.sealed.dataset import (
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
