"""Each package's public surface is exactly its `__all__`, and every name in it exists."""

from __future__ import annotations

import importlib

import pytest

PUBLIC = {
    "cvm.sealed": {"DEFAULT_CHUNK_SIZE", "DecryptionFailed", "Envelope", "EnvelopeHeader", "EnvelopeSignatureInvalid",
                   "InputChangedWhileSealing", "MalformedSealedFile", "OpenedDataset", "SealSummary", "SealedFileError",
                   "SealedForAnotherRecipe", "UnsupportedFormatVersion", "open_sealed", "read_envelope", "seal_file"},
    "kms_client": {"AppKey", "KmsAnswerInvalid", "KmsAppKeyProvider", "KmsClient", "KmsError", "KmsRefused",
                   "KmsUnavailable", "KmsUnreachable", "OwnerKeyRelease", "make_key_provider"},
}


@pytest.mark.parametrize("package", sorted(PUBLIC))
def test_all_is_exactly_the_public_surface(package):
    module = importlib.import_module(package)
    assert set(module.__all__) == PUBLIC[package]
    for name in module.__all__:
        assert hasattr(module, name), f"{package}.{name} is in __all__ but missing"
    exported = {n for n in vars(module) if not n.startswith("_") and not isinstance(vars(module)[n], type(module))}
    assert exported == PUBLIC[package], f"{package} exposes names outside __all__: {exported - PUBLIC[package]}"
