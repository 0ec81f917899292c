"""Link 8, ``image`` (with ``seal verify --rebuild SOURCE``): the study image the measured compose pins is the one
rebuilt bit for bit from SOURCE — this receipt came from this source code.

Links 1-3 prove which compose the CVM measured; its services name their image by digest, and a digest is a hash
of every byte of the image. Rebuilding the study image from a source tree (:mod:`auditor.rebuild`: the tree's
own reproducible builder, ``compose/image``) and finding that digest ties the run to that source: its CVM code,
its lock files, its builder. A tag, a placeholder, or any other digest breaks the link.

The rebuild happens before the checklist (it is slow, and it reads a source tree, not the receipt); this link
only compares, so it is testable alone: :func:`check` takes the receipt, link 3's proof and the rebuild.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from auditor.links.base import Broken, Held, Notes
from auditor.links.compose import ComposeProof
from auditor.receipt import Receipt
from compose.image.policy import compose_images

__all__ = ["CHECK", "NAME", "NUMBER", "RebuiltImage", "check"]

NUMBER, NAME = 8, "image"
CHECK = "the study image the measured compose pins is rebuilt bit for bit from the source: this source code ran"

_REFERENCE = re.compile(r"(?P<repository>[^@\s]+?)(?::(?P<tag>[\w][\w.-]{0,127}))?"
                        r"(?:@(?P<digest>sha256:[0-9a-f]{64}))?")


@dataclass(frozen=True)
class RebuiltImage:
    """What rebuilding the study image from ``source`` gave: its ``digest`` (``sha256:…`` of the OCI manifest),
    or ``error`` when the source could not be built (no builder in it, a missing input, …)."""

    source: str                     # what was rebuilt, in words: a folder, or a git commit of a repository
    digest: str | None = None
    error: str | None = None
    app_tree_sha256: str | None = None
    commit: str | None = None
    seconds: float | None = None


def check(receipt: Receipt, compose_proof: ComposeProof | None, rebuilt: RebuiltImage) -> Held[str]:
    """``compose_proof``: link 3's (None when it broke: the compose read is then not proven to be the measured
    one, and the facts say so). Proves the pinned digest."""
    notes = Notes()
    with notes.breaking():
        proven = _check(notes, receipt, compose_proof, rebuilt)
    return notes.held(proven)


def _check(notes: Notes, receipt: Receipt, compose_proof: ComposeProof | None, rebuilt: RebuiltImage) -> str:
    notes.facts["source"] = rebuilt.source
    if rebuilt.commit:
        notes.facts["commit"] = rebuilt.commit
    if compose_proof is None:
        notes.facts["compose_from"] = ("the receipt's app-compose.json (not proven to be the measured one: link 3 "
                                       "failed)")
    try:
        images = compose_images(receipt.app_compose.get())
    except (ValueError, UnicodeDecodeError) as exc:
        raise Broken(f"the compose's services cannot be read: {exc}") from None
    except Exception as exc:   # noqa: BLE001 - yaml.YAMLError and its kin: an unreadable compose, not a crash
        raise Broken(f"the compose's services cannot be read: {type(exc).__name__}") from None
    pinned = set()
    for service, image in images:
        match = _REFERENCE.fullmatch(image) if isinstance(image, str) else None
        if match is None or match["digest"] is None:
            raise Broken(f"service {service!r} does not name its image by a sha256 digest ({image!r}): the compose "
                         "does not pin the code that ran, so no source can be tied to it")
        pinned.add(match["digest"])
    notes.facts["pinned"] = sorted(pinned)
    if rebuilt.error is not None or rebuilt.digest is None:
        raise Broken(f"the study image could not be rebuilt from {rebuilt.source}: {rebuilt.error or 'no digest'}")
    notes.facts["rebuilt"] = rebuilt.digest
    if rebuilt.app_tree_sha256:
        notes.facts["app_tree_sha256"] = rebuilt.app_tree_sha256
    if rebuilt.seconds is not None:
        notes.facts["rebuild_seconds"] = round(rebuilt.seconds, 1)
    other = sorted(pinned - {rebuilt.digest})
    if other:
        raise Broken(f"the compose pins {', '.join(other)}, but {rebuilt.source} rebuilds to {rebuilt.digest}: this "
                     "receipt did not come from this source code")
    notes.summary = f"{rebuilt.digest} rebuilt bit for bit from {rebuilt.source}"
    return rebuilt.digest
