"""Which image a recipe may name: the built study image's digest, and the allowlist check the API runs.

A Sealroom recipe pins its code by digest: every service's ``image`` must be
``sealroom/study-runner@sha256:<digest>`` of a study image built from this repository (``seal image build``).
:func:`current_study_image` reads that digest from the build record in the state folder, after checking that the
record still describes this checkout (same locks, same app code), so a recipe builder never pins a stale image.
:func:`image_allowed` says why a compose must not be proposed, or None:

- an image named by tag (``…:latest``, or no tag at all) — a tag can be moved after the owners approved;
- the all-zero placeholder digest;
- another repository than ``sealroom/study-runner``;
- a digest that is not in the allowlist (by default: the one study image built here).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from compose import safe_parse
from compose.image.build import (
    BUILD_RECORD,
    IMAGE_NAME,
    RECORD_FORMAT,
    app_sources,
    app_tree_digest,
    default_image_dir,
)
from compose.image.locks import DEBIAN_LOCK, PYTHON_LOCK, sha256_file

__all__ = [
    "STUDY_IMAGE_REPOSITORY",
    "PLACEHOLDER_DIGEST",
    "ImageNotBuilt",
    "StaleImage",
    "read_build_record",
    "current_study_image",
    "current_study_image_digest",
    "study_image_reference",
    "compose_images",
    "image_allowed",
    "ImageAllowlist",
]

STUDY_IMAGE_REPOSITORY = IMAGE_NAME
PLACEHOLDER_DIGEST = "sha256:" + "0" * 64
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_REFERENCE = re.compile(r"(?P<repository>[^@\s]+?)(?::(?P<tag>[\w][\w.-]{0,127}))?(?:@(?P<digest>[^\s]+))?")


class ImageNotBuilt(Exception):
    """No study image build record in the state folder (run `seal image build`)."""


class StaleImage(ImageNotBuilt):
    """The build record describes other code or other locks than this checkout's (rebuild the image)."""


def read_build_record(image_dir: Path) -> dict:
    path = Path(image_dir) / BUILD_RECORD
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise ImageNotBuilt(f"no study image is built in {image_dir} (run `seal image build`)") from None
    except (OSError, ValueError) as error:
        raise ImageNotBuilt(f"cannot read {path}: {error}") from None
    if record.get("format") != RECORD_FORMAT or not _DIGEST.fullmatch(str(record.get("digest"))):
        raise ImageNotBuilt(f"{path} is not a {RECORD_FORMAT} record")
    return record


def _check_fresh(record: dict, root: Path | None) -> None:
    inputs = record["inputs"]
    now = {"debian_lock_sha256": sha256_file(DEBIAN_LOCK), "python_lock_sha256": sha256_file(PYTHON_LOCK),
           "app_tree_sha256": app_tree_digest(app_sources(root) if root else app_sources())}
    changed = sorted(key for key, value in now.items() if inputs.get(key) != value)
    if changed:
        raise StaleImage(f"the study image {record['digest']} was built from other inputs ({', '.join(changed)} "
                         "changed); rebuild it with `seal image build`")


def current_study_image(state_dir: Path, *, check_fresh: bool = True, root: Path | None = None) -> str:
    """``sealroom/study-runner@sha256:…`` of the study image built in ``state_dir`` for this checkout.

    Raises :class:`ImageNotBuilt` when there is none, :class:`StaleImage` when the code or the locks changed
    since (``check_fresh=False`` skips that check, for callers that only report the record).
    """
    record = read_build_record(default_image_dir(state_dir))
    if check_fresh:
        _check_fresh(record, root)
    return study_image_reference(record["digest"])


def current_study_image_digest(state_dir: Path, *, check_fresh: bool = True, root: Path | None = None) -> str:
    """``sha256:…`` of the current study image (see :func:`current_study_image`)."""
    return current_study_image(state_dir, check_fresh=check_fresh, root=root).split("@", 1)[1]


def study_image_reference(digest: str) -> str:
    if not _DIGEST.fullmatch(digest):
        raise ValueError(f"not a sha256 digest: {digest!r}")
    return f"{STUDY_IMAGE_REPOSITORY}@{digest}"


def compose_images(compose: str | bytes | Mapping[str, Any]) -> list[tuple[str, Any]]:
    """(service, image) for each service of a compose given as docker-compose YAML text, app-compose.json bytes,
    an app-compose mapping (with ``docker_compose_file``) or a parsed docker-compose mapping."""
    if isinstance(compose, bytes):
        compose = safe_parse.loads(compose.decode("utf-8"))
    if isinstance(compose, Mapping) and isinstance(compose.get("docker_compose_file"), str):
        compose = compose["docker_compose_file"]
    if isinstance(compose, str):
        compose = safe_parse.load_yaml(compose)
    services = compose.get("services") if isinstance(compose, Mapping) else None
    if not isinstance(services, Mapping) or not services:
        raise ValueError("the compose has no services")
    return [(str(name), service.get("image") if isinstance(service, Mapping) else None)
            for name, service in services.items()]


def image_allowed(compose: str | bytes | Mapping[str, Any], *, allowed: Iterable[str] | None = None,
                  state_dir: Path | None = None, echo: bool = True) -> str | None:
    """None when every service's image is ``sealroom/study-runner@<allowed digest>``; else the reason it is not.

    ``allowed`` is the set of digests (``sha256:…``) to accept; by default the current study image built in
    ``state_dir`` (stale or missing builds allow nothing, and the reason says so). ``echo=False`` words the reason
    without repeating the compose's own values (service names, image references), as the API answers.
    """
    try:
        images = compose_images(compose)
    except (ValueError, yaml.YAMLError) as error:
        return f"the compose cannot be read: {error}" if echo else "the compose's services cannot be read"
    if allowed is None:
        if state_dir is None:
            return "no allowlist of study image digests was given"
        try:
            allowed = [current_study_image_digest(state_dir)]
        except ImageNotBuilt as error:
            return f"no study image digest is allowed here: {error}"
    allowed_set = set(allowed)
    for index, (service, image) in enumerate(images, 1):
        who = f"service {service!r}" if echo else f"service {index} of {len(images)}"
        what = f"image {image!r}" if echo else "its image"
        if not isinstance(image, str) or not image:
            return f"{who} names no image"
        match = _REFERENCE.fullmatch(image)
        if match is None:
            return f"{who}: {what} is not an image reference"
        digest = match["digest"]
        if digest is None:
            return f"{who}: {what} is named by tag, not by digest; pin {STUDY_IMAGE_REPOSITORY}@sha256:<digest>"
        if match["tag"] is not None:
            return f"{who}: {what} carries a tag as well as a digest; name the digest only"
        if not _DIGEST.fullmatch(digest):
            return f"{who}: {digest!r} is not a sha256 digest" if echo else f"{who}: its digest is not a sha256 digest"
        if digest == PLACEHOLDER_DIGEST:
            return f"{who}: the all-zero digest is a placeholder, not an image"
        if match["repository"] != STUDY_IMAGE_REPOSITORY:
            return (f"{who}: only {STUDY_IMAGE_REPOSITORY} images may run, not "
                    + (match["repository"] if echo else "another repository"))
        if digest not in allowed_set:
            return (f"{who}: " + (digest if echo else "its digest") + " is not an allowed study image digest "
                    f"(allowed here: {', '.join(sorted(allowed_set)) or 'none'})")
    return None


class ImageAllowlist:
    """The study images a service may name: ``digests`` when given (``sha256:…``), else the current study image
    built in ``state_dir``, read again at every check (a ``seal image build`` while the API runs counts at once;
    a stale or missing build allows nothing, and the reason says so)."""

    def __init__(self, digests: Iterable[str] | None = None, *, state_dir: Path | None = None) -> None:
        if digests is not None:
            digests = tuple(digests)
            bad = [d for d in digests if not _DIGEST.fullmatch(d) or d == PLACEHOLDER_DIGEST]
            if bad:
                raise ValueError(f"not study image digests (sha256:<64 hex>, not the placeholder): {bad}")
        elif state_dir is None:
            raise ValueError("an image allowlist needs digests or the state folder of a study image build")
        self.digests = digests
        self.state_dir = None if state_dir is None else Path(state_dir)

    def refusal(self, compose: str | bytes | Mapping[str, Any], *, echo: bool = True) -> str | None:
        """None when every service names an allowed study image by digest, else why not (see ``image_allowed``)."""
        return image_allowed(compose, allowed=self.digests, state_dir=self.state_dir, echo=echo)

    def describe(self) -> str:
        if self.digests is not None:
            return f"{STUDY_IMAGE_REPOSITORY}@{{{', '.join(self.digests)}}}"
        return f"the current study image built in {default_image_dir(self.state_dir)}"
