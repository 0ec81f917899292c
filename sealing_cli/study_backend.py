"""Where the local stack's study CVMs run (`seal up --backend`, `seal demo --backend`), prepared for its API.

- ``container`` (the default): the stack connects to a container engine (:func:`compose.backends.engine.
  connect_engine`: podman's service, started here and stopped with the stack, or one already running), makes sure
  the study image of this checkout is built (``STATE/study-image``; built now when missing or stale), and hands
  the engine's URL and the image to the API, whose :class:`~compose.backends.container.ContainerBackend` runs
  each study in a container of the image its compose pins. No engine: :class:`StackRefused`, loudly — never a
  silent fallback;
- ``process``: the explicit fallback, labelled as such wherever the backend is shown.

Which study image digests composes may name is the API's allowlist: ``image_digests`` when given, else the current
study image built in the state folder.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from compose.backends.choice import BACKENDS, backend_label, make_backend
from compose.backends.engine import EngineUnavailable, connect_engine
from compose.image import BuildError, ImageNotBuilt, LayerError, LockError, build_study_image, current_study_image
from compose.image.build import default_image_dir
from compose.stack_file import StackDescription, StackRefused

__all__ = ["StudyBackend", "ensure_study_image", "prepare_study_backend"]


@dataclass
class StudyBackend:
    kind: str
    api_args: list[str]                       # what `python -m compose.api` is told
    label: str                                # which backend, and its isolation, in one line
    record: dict = field(default_factory=dict)   # stack.json: services.api.backend


def ensure_study_image(state_dir: Path, log: Callable[[str], None]) -> str:
    """``sealroom/study-runner@sha256:…`` of this checkout's study image in ``state_dir``, built there first when
    missing or stale (seconds with a warm cache; minutes the first time on a machine)."""
    try:
        return current_study_image(state_dir)
    except ImageNotBuilt as missing:
        log(f"building the study image ({missing})")
    try:
        return build_study_image(default_image_dir(state_dir), log=log).reference
    except (BuildError, LayerError, LockError) as failed:
        raise StackRefused(f"the study image could not be built: {failed}") from None


def prepare_study_backend(kind: str, state_dir: Path, description: StackDescription, *, exit_stack: ExitStack,
                          image_digests: Sequence[str] | None = None, hidden: Sequence[Path] = (),
                          notify: Callable[[str], None]) -> StudyBackend:
    """Connect the engine and build the image for ``container``; the result's ``label`` says which backend runs
    the studies (callers print it: loudly for the process fallback)."""
    if kind not in BACKENDS:
        raise StackRefused(f"unknown backend {kind!r}; choose from {', '.join(BACKENDS)}")
    digests = list(image_digests or ())
    allow = [arg for digest in digests for arg in ("--image-digest", digest)]
    if kind == "process":
        backend = make_backend("process", stack=description, stack_dir=state_dir, hidden=hidden)
        label = backend_label("process", backend)
        return StudyBackend("process", ["--backend", "process", *allow], label,
                            {"kind": "process", "isolated": backend.isolation.isolated,
                             "isolation": backend.isolation.description})
    try:
        engine = connect_engine(state_dir)
    except EngineUnavailable as missing:
        raise StackRefused(
            f"NO CONTAINER ENGINE: study CVMs run in containers of the pinned study image, and {missing}. Install "
            "podman (scripts/setup.sh does), or choose the process fallback explicitly with --backend process "
            "(it runs this checkout's code on the host's Python, not the image the compose pins)") from None
    exit_stack.callback(engine.close)     # after the API that uses it has stopped (callbacks run last-in first)
    image = ensure_study_image(state_dir, notify)
    image_dir = default_image_dir(state_dir)
    backend = make_backend("container", stack=description, stack_dir=state_dir, engine=engine, image_dir=image_dir,
                           allowed_digests=digests or None)
    label = f"{backend_label('container', backend)}; study image {image}"
    record = {"kind": "container", "engine": engine.url, "engine_kind": engine.kind, "image": image,
              "isolated": backend.isolation.isolated, "isolation": backend.isolation.description}
    if engine.service is not None:
        record["engine_pid"] = engine.service.pid
    return StudyBackend("container", ["--backend", "container", "--engine-url", engine.url, "--image-dir",
                                      str(image_dir), *allow], label, record)
