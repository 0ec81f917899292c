"""Opening the study's sealed inputs inside the CVM — in memory only (DESIGN §6 step 4).

`unwrap_datasets()` is the one recipe the analysis calls. It talks to the guest agent only through dstack-sdk
(`DstackClient`), so the same code runs against the SIMULATED agent here and a real dstack agent in a real CVM.

In order, for the whole study (so a bad input costs no privacy budget):
1. the recipe this CVM is measured as: `info()` gives app-compose.json verbatim; its sha256 must be the measured
   compose hash, and the study manifest is read from it;
2. every sealed file: owner signature valid, sealed for this app and this compose hash
   (else `SealedForAnotherRecipe`), its owner an owner of the on-chain DstackApp and an input of the manifest
   (and its ciphertext the manifest's, where the manifest names one);
3. the manifest's analysis against its parameter schema, and the files' public schemas and row counts against
   what that analysis reads (`compose.manifest.check_inputs_against_manifest`);
4. every file's payload re-hashed against the ciphertext_sha256 its owner signed (streamed, no key), so a damaged
   file is refused here and not after the spend;
5. one attested release from the KMS of the consenting owners' unwrap keys (it spends the study's ε on-chain;
   a KMS restart or a chain outage meanwhile is ridden out by the client, which sends the same request again
   and gets the keys of the same recorded release, spent once);
6. each file decrypted chunk by chunk into memory, never to disk;
7. the ciphertext digests actually opened are measured into RTMR3 (`sealroom-inputs`), so every later quote —
   the one in the result's receipt included — says exactly which data went in.

Each file is opened once and read through the same descriptor from step 2 to step 6, so a file renamed over
after its checks is not the one decrypted (and the digest is checked again while decrypting).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Sequence

from dstack_sdk import DstackClient
from eth_utils import to_checksum_address

from compose.app_compose import manifest_from_app_compose
from compose.manifest import (
    InputsDoNotFitManifest,
    ManifestInvalid,
    StudyManifest,
    check_inputs_against_manifest,
)
from contracts.chain import Chain, DstackApp
from cvm.attest.measured import MeasuredRecipeMismatch, measured_recipe
from cvm.labels import INPUTS_EVENT
from cvm.sealed import (
    Envelope,
    OpenedDataset,
    SealedFileError,
    SealedForAnotherRecipe,
    open_sealed,
    read_envelope,
)
from cvm.sealed.dataset import verify_payload
from kms_client.client import KmsClient, OwnerKeyRelease


class UnwrapError(Exception):
    """An input cannot be used by this study (the message says which and why)."""


@dataclass
class StudyInputs:
    manifest: StudyManifest
    app_compose: bytes
    app_id: bytes
    compose_hash: bytes
    datasets: dict[str, OpenedDataset]          # by manifest input name
    ciphertext_sha256: dict[str, str]           # by manifest input name
    release: OwnerKeyRelease


def unwrap_datasets(sealed_files: Sequence[Path], *, dstack: DstackClient, kms: KmsClient,
                    chain: Chain) -> StudyInputs:
    try:
        app_id, compose_hash, app_compose = measured_recipe(dstack)
    except MeasuredRecipeMismatch as exc:
        raise UnwrapError(str(exc)) from None
    manifest = manifest_from_app_compose(app_compose)
    with contextlib.ExitStack() as files:
        chosen = _choose_inputs(sealed_files, files, manifest, app_id, compose_hash,
                                set(DstackApp(chain, to_checksum_address(app_id)).owners()))
        try:
            check_inputs_against_manifest(manifest, [envelope for _path, _stream, envelope in chosen.values()])
        except ManifestInvalid as exc:
            raise UnwrapError(f"the study manifest cannot run: {exc}") from None
        except InputsDoNotFitManifest as exc:
            raise UnwrapError(f"the sealed inputs do not fit the study manifest: {exc}") from None
        for path, stream, envelope in chosen.values():
            try:
                checked = verify_payload(stream)
            except SealedFileError as exc:
                raise UnwrapError(f"{path.name}: {exc}") from None
            if checked.digest != envelope.digest:
                raise UnwrapError(f"{path.name}: the file changed while it was being checked")

        def attest(report_data: bytes) -> tuple[bytes, str]:
            quote = dstack.get_quote(report_data)
            return bytes.fromhex(quote.quote), quote.event_log

        release = kms.release_owner_keys(attest, app_compose)
        missing = sorted({item.owner for item in manifest.inputs} - set(release.keys))
        if missing:   # the KMS releases every consenting input owner's key or none; an answer without one is wrong
            raise UnwrapError(f"the KMS released no unwrap key for input owner(s) {', '.join(missing)}")
        datasets, digests = {}, {}
        for item in manifest.inputs:
            _path, stream, _envelope = chosen[item.name]
            datasets[item.name] = open_sealed(stream, release.keys[item.owner], expected_app_id=app_id,
                                              expected_compose_hash=compose_hash)
            digests[item.name] = datasets[item.name].envelope.ciphertext_sha256.hex()
    inputs_record = json.dumps(digests, sort_keys=True, separators=(",", ":")).encode()
    dstack.emit_event(INPUTS_EVENT, inputs_record)
    return StudyInputs(manifest=manifest, app_compose=app_compose, app_id=app_id, compose_hash=compose_hash,
                       datasets=datasets, ciphertext_sha256=digests, release=release)


def _choose_inputs(sealed_files: Sequence[Path], files: contextlib.ExitStack, manifest: StudyManifest, app_id: bytes,
                   compose_hash: bytes, owners_on_chain: set[str]) -> dict[str, tuple[Path, BinaryIO, Envelope]]:
    """Open each file (kept open in ``files``), check who signed it and for which recipe, and match it to its
    manifest input: {input name: (path, open file, envelope)}."""
    by_owner = {item.owner: item for item in manifest.inputs}
    chosen: dict[str, tuple[Path, BinaryIO, Envelope]] = {}
    for path in map(Path, sealed_files):
        try:
            stream = files.enter_context(open(path, "rb", buffering=0))
            envelope = read_envelope(stream)
        except SealedFileError as exc:
            raise UnwrapError(f"{path.name}: {exc}") from None
        header = envelope.header
        owner = to_checksum_address(header.owner)
        if header.app_id != app_id or header.compose_hash != compose_hash:
            raise SealedForAnotherRecipe(
                f"{path.name} was sealed for another recipe (compose hash {header.compose_hash.hex()}); this CVM "
                f"is measured as {compose_hash.hex()}: the owner must seal it again for this recipe"
            )
        if owner not in owners_on_chain:
            raise UnwrapError(f"{path.name} is signed by {owner}, who is not an owner of the study's DstackApp")
        item = by_owner.get(owner)
        if item is None:
            raise UnwrapError(f"{path.name}: owner {owner} is not an input of the study manifest")
        if item.ciphertext_sha256 and item.ciphertext_sha256 != envelope.ciphertext_sha256.hex():
            raise UnwrapError(f"{path.name} is not the ciphertext the manifest names for input {item.name!r}")
        if item.name in chosen:
            raise UnwrapError(f"two sealed files given for input {item.name!r}")
        chosen[item.name] = (path, stream, envelope)
    missing = sorted({item.name for item in manifest.inputs} - set(chosen))
    if missing:
        raise UnwrapError(f"no sealed file given for input(s): {', '.join(missing)}")
    return chosen
