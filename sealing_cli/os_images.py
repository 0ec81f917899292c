"""Registering an OS image with the local stack: its measurement record with the KMS, its hash on-chain.

Both halves are needed for a CVM on that image to be served: DstackKms must allow the ``os-image-hash`` the CVM
measures (the chain's word, read by the KMS and the auditor), and the KMS must hold the image's measurement record
(``<state>/kms/os-images/<os_image_hash>.json``, :mod:`cvm.attest.os_image`) so that it can check the quote's MRTD
and RTMR0-2 against it. `seal up` registers the SIMULATED image it boots; `seal os register FILE` registers any
other, such as a real dstack OS release's published measurements.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from eth_account.signers.local import LocalAccount

from contracts.chain import DstackKms
from cvm.attest.os_image import OS_IMAGES_DIR, OsImageRegistry, OsMeasurement

__all__ = ["Registered", "kms_os_images_dir", "register_os_image"]


@dataclass(frozen=True)
class Registered:
    """What a registration did: ``recorded`` the KMS got a new record (False: it held this one already),
    ``allowed`` DstackKms newly allows the hash (False: it did already); ``path`` the record's file."""

    record: OsMeasurement
    path: Path
    recorded: bool
    allowed: bool


def kms_os_images_dir(state_dir: Path) -> Path:
    """The KMS's registry folder in a stack's state folder (the KMS runs with ``--state-dir <state>/kms``)."""
    return Path(state_dir) / "kms" / OS_IMAGES_DIR


def register_os_image(state_dir: Path, registry: DstackKms, record: OsMeasurement,
                      operator: LocalAccount) -> Registered:
    """Give the stack's KMS ``record`` (never replacing another record for the same hash: OsRecordConflict), then
    allow its os_image_hash on DstackKms from ``operator`` (its owner), unless it is allowed already. The record
    goes first, so that a hash the chain allows always has measurements the KMS can check."""
    folder = kms_os_images_dir(state_dir)
    recorded = OsImageRegistry(folder).register(record)
    allowed = False
    if not registry.chain.view(registry.ARTIFACT, registry.contract, "allowedOsImages", record.os_image_hash):
        registry.allow_os_image(record.os_image_hash, operator)
        allowed = True
    return Registered(record, folder / f"{record.os_image_hash.hex()}.json", recorded, allowed)
