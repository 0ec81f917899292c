"""The round recipe: one round's contract measured in an app-compose.json, and reading it back (DESIGN.md §7).

Each round is its own recipe: the round contract (``cvm.federated.RoundContract``) sits in the measured
app-compose.json as a ``fed_round`` study manifest whose inputs are the sites (the DstackApp owners), so the
sites approve every round on-chain before the aggregator's CVM can boot (the KMS gives it no app key otherwise).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from eth_utils import to_checksum_address

from compose.app_compose import (
    ComposeError,
    build_app_compose,
    manifest_from_app_compose,
    normalized_json_bytes,
)
from compose.manifest import StudyManifest
from cvm.aggregator.errors import RecipeNotARound
from cvm.federated import RoundContract

ROUND_PAYLOAD_TYPE = "round_record"
STUDY_IMAGE_REPOSITORY = "sealroom/study-runner"      # compose.image.STUDY_IMAGE_REPOSITORY (not imported: the
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")          # image's code would then carry the image builder)
_PLACEHOLDER = "sha256:" + "0" * 64                  # no image has it
# Measured bytes: changing this changes every round's compose hash. The aggregator runs from the study image,
# named by the digest of a build (`seal image build`), never by a tag.
ROUND_YAML = ("services:\n  aggregator:\n    image: " + STUDY_IMAGE_REPOSITORY + "@{digest}\n"
              "    command: [python, -m, cvm.aggregator]\n")


def build_round_compose(study: str, contract: RoundContract, sites: Mapping[str, str], *, image_digest: str) -> bytes:
    """The app-compose.json bytes of one round: a ``fed_round`` manifest whose params are the contract, its
    aggregator service running ``python -m cvm.aggregator`` from the study image ``image_digest`` (``sha256:…``).

    ``sites`` maps each site's name to its address; they are the manifest's inputs (so each must approve the
    round on-chain before the KMS records its spend) and must be exactly the contract's eligible sites.
    """
    if not isinstance(image_digest, str) or not _DIGEST.fullmatch(image_digest) or image_digest == _PLACEHOLDER:
        raise ValueError(f"image_digest must be a study image's sha256 digest, got {image_digest!r}")
    if {to_checksum_address(a) for a in sites.values()} != set(contract.eligible_sites):
        raise ValueError("the round's sites must be exactly the contract's eligible sites")
    manifest = StudyManifest.model_validate({
        "study": study,
        "inputs": [{"owner": address, "name": name} for name, address in sites.items()],
        "analysis": {"kind": "fed_round", "params": contract.to_params()},
        "epsilon": contract.epsilon_per_round, "delta": contract.delta, "output_type": ROUND_PAYLOAD_TYPE,
    })
    return normalized_json_bytes(build_app_compose(f"{study}-round-{contract.round}",
                                                   ROUND_YAML.format(digest=image_digest), manifest))


def round_contract_of(app_compose: bytes) -> tuple[StudyManifest, RoundContract]:
    """The manifest and round contract measured in ``app_compose``, or :class:`RecipeNotARound`."""
    try:
        manifest = manifest_from_app_compose(app_compose)
    except ComposeError as exc:
        raise RecipeNotARound(f"not a valid Sealroom compose: {exc}") from None
    if manifest.analysis.kind != "fed_round" or manifest.output_type != ROUND_PAYLOAD_TYPE:
        raise RecipeNotARound(f"the recipe runs {manifest.analysis.kind!r}, not a federated round")
    try:
        return manifest, RoundContract.from_params(manifest.analysis.params)
    except ValueError as exc:
        raise RecipeNotARound(f"the recipe's round contract is invalid: {exc}") from None


def check_reference(contract: RoundContract, sha256: str | None) -> None:
    """The reference cohort given (by its file's sha256) is the one the measured contract names, or ValueError."""
    expected = contract.evaluation_sha256
    if expected is None and sha256 is not None:
        raise ValueError("the round contract names no reference cohort; an evaluation file would not be measured")
    if expected is not None and sha256 is None:
        raise ValueError(f"the round contract evaluates on the reference cohort with sha256 {expected}; "
                         "pass that file with --evaluation")
    if expected != sha256:
        raise ValueError(f"the evaluation file has sha256 {sha256}, not the {expected} the round contract names")
