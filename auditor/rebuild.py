"""Rebuild the study image from a source tree, for link 8 (``seal verify --rebuild SOURCE``).

SOURCE is a folder (a checkout, an unpacked release), or a git commit (anything ``git rev-parse`` names: a hash, a
tag, ``HEAD``) of the repository in the current folder — exported with ``git archive`` into a temporary folder, so
the working tree's uncommitted edits are not in it.

The image is rebuilt by the source tree's **own** builder (its ``compose/image``, its lock files, its app code),
in a separate Python process that imports from the tree only (``python -I``, the tree first on ``sys.path``):
what is compared is what that source builds, not what this checkout's builder would make of it. The downloads
and layer cache are the usual ones (``$SEALROOM_CACHE``), so a rebuild of a tree whose locks and builder are
cached takes seconds; the rebuilt layout goes to a temporary folder that is removed afterwards.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from auditor.links.image import RebuiltImage
from compose.image.build import default_cache_dir

__all__ = ["rebuild_study_image"]

# Runs in a fresh interpreter with the source tree first on sys.path: its own builder, its own locks.
_DRIVER = r"""
import json, sys
from pathlib import Path
root, out = sys.argv[1], sys.argv[2]
sys.path.insert(0, root)
from compose.image.build import build_study_image
record = build_study_image(Path(out), root=Path(root), log=lambda line: print(line, file=sys.stderr, flush=True))
built_from = str(Path(sys.modules["compose.image.build"].__file__).resolve())
print(json.dumps({"digest": record.digest, "app_tree_sha256": record.document["inputs"]["app_tree_sha256"],
                  "builder": built_from}))
"""


def _git(args: list[str], cwd: Path) -> str:
    done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise ValueError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"git {args[0]} failed")
    return done.stdout.strip()


def _export_commit(commit: str, repository: Path, into: Path) -> None:
    """``git archive COMMIT`` unpacked into ``into`` (regular files, folders and links inside the tree only)."""
    with subprocess.Popen(["git", "archive", "--format=tar", commit], cwd=repository, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE) as archive:
        assert archive.stdout is not None
        with tarfile.open(fileobj=archive.stdout, mode="r|") as stream:
            stream.extractall(into, filter="data")
        error = archive.stderr.read().decode(errors="replace") if archive.stderr else ""
    if archive.returncode != 0:
        raise ValueError(f"git archive {commit} failed: {error.strip()}")


def _scratch_parent() -> Path:
    # Next to the layer cache, so that the rebuilt layout hard-links its blobs instead of copying 1.7 GB.
    parent = default_cache_dir().parent / "rebuilds"
    parent.mkdir(parents=True, exist_ok=True)
    return parent


def rebuild_study_image(source: str | Path, *, repository: Path | None = None,
                        log: Callable[[str], None] = lambda line: None, timeout_s: float = 3600) -> RebuiltImage:
    """Rebuild the study image from ``source`` (a folder, or a git commit of ``repository``, default the current
    folder's); never raises for a source that cannot be built — the result's ``error`` says why."""
    started = time.monotonic()
    folder = Path(source)
    commit = None
    with tempfile.TemporaryDirectory(prefix="sealroom-rebuild-", dir=_scratch_parent()) as scratch:
        if folder.is_dir():
            root, label = folder.resolve(), f"the source folder {folder.resolve()}"
        else:
            repository = Path(repository or Path.cwd())
            try:
                commit = _git(["rev-parse", "--verify", "--quiet", f"{source}^{{commit}}"], repository)
            except ValueError:
                return RebuiltImage(f"{source!s}", error=f"{source!s} is neither a folder nor a git commit of the "
                                    f"repository in {repository}")
            label = f"git commit {commit} of {repository.resolve()}"
            root = Path(scratch) / "source"
            root.mkdir()
            try:
                _export_commit(commit, repository, root)
            except (ValueError, tarfile.TarError, OSError) as error:
                return RebuiltImage(label, error=str(error), commit=commit)
        if not (root / "compose" / "image" / "build.py").is_file():
            return RebuiltImage(label, error="it holds no study image builder (compose/image/build.py)", commit=commit)
        log(f"rebuilding the study image from {label} with its own builder …")
        out = Path(scratch) / "image"
        try:
            done = subprocess.run([sys.executable, "-I", "-c", _DRIVER, str(root), str(out)], cwd=scratch,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=timeout_s,
                                  check=False)
        except subprocess.TimeoutExpired:
            return RebuiltImage(label, error=f"the rebuild took longer than {timeout_s:g} s", commit=commit)
        for line in done.stderr.splitlines():
            log(f"  {line}")
        try:
            result = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else None
        except (ValueError, IndexError):
            result = None
        if result is None:
            last = [line for line in done.stderr.strip().splitlines() if line.strip()]
            return RebuiltImage(label, error=f"its builder failed: {last[-1] if last else f'exit {done.returncode}'}",
                                commit=commit)
        if not Path(result["builder"]).is_relative_to(root.resolve()):   # the tree's own builder, not this one
            return RebuiltImage(label, error=f"the rebuild used the builder at {result['builder']}, not the tree's",
                                commit=commit)
        shutil.rmtree(out, ignore_errors=True)
    return RebuiltImage(label, digest=result["digest"], app_tree_sha256=result["app_tree_sha256"], commit=commit,
                        seconds=time.monotonic() - started)
