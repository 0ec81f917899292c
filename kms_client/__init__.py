"""The client side of the KMS protocol: owners fetch sealing keys, CVMs attest for app keys and owners' unwrap keys."""

from kms_client.client import (
    AppKey,
    KmsAnswerInvalid,
    KmsAppKeyProvider,
    KmsClient,
    KmsError,
    KmsRefused,
    KmsUnavailable,
    KmsUnreachable,
    OwnerKeyRelease,
    make_key_provider,
)

__all__ = [
    "AppKey",
    "KmsAnswerInvalid",
    "KmsAppKeyProvider",
    "KmsClient",
    "KmsError",
    "KmsRefused",
    "KmsUnavailable",
    "KmsUnreachable",
    "OwnerKeyRelease",
    "make_key_provider",
]
