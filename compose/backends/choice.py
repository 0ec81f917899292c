"""Which backend runs a stack's study CVMs, made the same way by the stack that reports it and the API that uses it.

- ``container`` (the default): each run in a container of the pinned study image, on a container engine
  (:mod:`compose.backends.container`); the image the compose names is what runs;
- ``process``: the explicit fallback (``--backend process``), loudly labelled as such: this checkout's code on the
  host's Python (:mod:`compose.backends.process`), under bubblewrap when there is one — the image the compose
  names is NOT what runs.

There is no silent fallback from one to the other: without an engine, the container backend is not available
and the caller says so (:class:`~compose.backends.engine.EngineUnavailable`).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

from compose.backends.container import ContainerBackend
from compose.backends.engine import ContainerEngine
from compose.backends.process import Backend, LocalProcessBackend
from compose.stack_file import StackDescription

__all__ = ["BACKENDS", "DEFAULT_BACKEND", "backend_label", "make_backend"]

BACKENDS = ("container", "process")
DEFAULT_BACKEND = "container"


def make_backend(kind: str, *, stack: StackDescription, stack_dir: Path, hidden: Sequence[Path] = (),
                 engine: ContainerEngine | None = None, image_dir: Path | None = None,
                 allowed_digests: Iterable[str] | None = None) -> Backend:
    """The ``kind`` backend for the stack described by ``stack`` (its state folder ``stack_dir``): the container
    backend on ``engine`` with the study image built in ``image_dir`` (``allowed_digests``: which it may run,
    default the built one), or the process backend hiding ``stack_dir`` and ``hidden`` from its runs."""
    common = dict(app_id=stack.dstack_app, kms_url=stack.services["kms"]["url"], rpc_url=stack.rpc_url,
                  dstack_kms=stack.dstack_kms, simulated_tdx_dir=Path(stack_dir) / "simulated-tdx")
    if kind == "container":
        if engine is None or image_dir is None:
            raise ValueError("the container backend needs an engine and the study image's folder")
        return ContainerBackend(engine=engine, image_dir=image_dir, allowed_digests=allowed_digests, **common)
    if kind == "process":
        return LocalProcessBackend(bwrap=shutil.which("bwrap"), hidden=[Path(stack_dir), *hidden], **common)
    raise ValueError(f"unknown backend {kind!r}; choose from {', '.join(BACKENDS)}")


def backend_label(kind: str, backend: Backend) -> str:
    """One line saying which backend runs the studies and what they are isolated from."""
    if kind == "container":
        engine = getattr(backend, "engine", None)
        where = f"{engine.kind} at {engine.url}" if engine is not None else "an engine"
        return f"container backend ({where}): {backend.isolation.description}"
    return ("PROCESS BACKEND (the explicit fallback: this checkout's code on the host's Python, NOT the study image "
            f"the compose pins): {backend.isolation.description}")
