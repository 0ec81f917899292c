"""Bytecode for the study image, bit for bit reproducible: unchecked-hash .pyc files made by the image's own Python.

Without bytecode, every study process compiles in memory each module it imports (torch, numpy, pyarrow and the
standard library: seconds at every run). The image therefore carries ``__pycache__/*.cpython-311.pyc`` next to
its sources, made so that two builds still agree bit for bit:

- compiled by the image's own interpreter — ``usr/bin/python3.11`` of the base layer, Debian's CPython 3.11 —
  run straight from a temporary unpacking of that layer through the layer's own dynamic loader and libraries
  (no container engine, and never the builder's Python, whose version and compiler could differ);
- ``unchecked-hash`` pycs (PEP 552), what ``python -m compileall --invalidation-mode unchecked-hash`` writes
  (``py_compile.compile`` with the same arguments, per file): the header holds the source's hash, not an mtime,
  and Python does not re-check it at import — the layers are immutable, so source and bytecode cannot drift;
- ``PYTHONHASHSEED=0`` (frozenset constants are laid out by hash), no ``site``, a clean environment; each
  code object's file name is the path in the image, not the temporary folder's;
- a file that does not compile (some wheels ship deliberately broken test data) gets no bytecode, as at run time.

A file's bytecode depends on its bytes and its path only (the same in any order and in any process), so the
files are split into a fixed number of shards — by position in the sorted list, not by this machine's core
count — compiled side by side.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

__all__ = ["BytecodeError", "PYTHON_TAG", "SOURCE_DIRS", "compile_bytecode"]

INTERPRETER = "usr/bin/python3.11"
LOADER = "lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
LIBRARY_PATH = ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu")
PYTHON_TAG = "cpython-311"
# Where the image's Python finds modules: the standard library and the wheels (the app brings its own list).
SOURCE_DIRS = ("usr/lib/python3.11/", "usr/lib/python3/dist-packages/")
SHARDS = 8

# Runs in the image's Python: compile each listed file as compileall would, report what did not compile.
_DRIVER = r"""
import importlib.util, json, os, py_compile, sys
job = json.load(sys.stdin)
failed = []
for path in job["files"]:
    cfile = os.path.join(job["out"], importlib.util.cache_from_source("/" + path).lstrip("/"))
    try:
        py_compile.compile(os.path.join(job["src"], path), cfile=cfile, dfile="/" + path, doraise=True,
                           optimize=0, invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
    except py_compile.PyCompileError:
        failed.append(path)
json.dump({"failed": failed}, sys.stdout)
"""


class BytecodeError(Exception):
    """The image's Python could not be run to compile the bytecode; the message says why."""


def _check_host() -> None:
    machine = platform.machine().lower()
    if not sys.platform.startswith("linux") or machine not in ("x86_64", "amd64"):
        raise BytecodeError(f"the study image's bytecode is compiled by the image's own Python (x86-64 Linux); this "
                            f"machine is {sys.platform}/{machine}: build the image on an x86-64 Linux machine")


def _unpack(layer: Path, into: Path, wanted: Callable[[str], bool] = lambda name: True) -> list[str]:
    """Unpack ``layer``'s folders, regular files and relative links that stay inside; returns the files placed."""
    placed = []
    with tarfile.open(layer) as archive:
        for member in archive:
            if not wanted(member.name) and not member.isdir():
                continue
            target = into / member.name
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
            elif member.isfile():
                target.parent.mkdir(parents=True, exist_ok=True)
                source = archive.extractfile(member)
                assert source is not None
                with source, open(target, "wb") as sink:
                    shutil.copyfileobj(source, sink, 1 << 20)
                os.chmod(target, 0o755 if member.mode & 0o111 else 0o644)
                placed.append(member.name)
            elif member.issym() and not member.linkname.startswith("/"):
                resolved = os.path.normpath(os.path.join(os.path.dirname(member.name), member.linkname))
                if not resolved.startswith(".."):
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.unlink(missing_ok=True)
                    os.symlink(member.linkname, target)
    return placed


def _python_sources(name: str) -> bool:
    return name.endswith(".py") and name.startswith(SOURCE_DIRS)


def compile_bytecode(interpreter_layer: Path, *, source_layers: Sequence[Path] = (),
                     sources: Mapping[str, bytes] | None = None,
                     log: Callable[[str], None] = lambda line: None) -> dict[str, bytes]:
    """Compile, with the Python of ``interpreter_layer`` (the base layer's tar), every module under
    :data:`SOURCE_DIRS` in ``source_layers`` and every ``.py`` in ``sources`` (image path → bytes); returns the
    image path of each pyc → its bytes."""
    _check_host()
    with tempfile.TemporaryDirectory(prefix="sealroom-bytecode-") as scratch:
        root, src, out = Path(scratch) / "root", Path(scratch) / "src", Path(scratch) / "out"
        for folder in (root, src, out):
            folder.mkdir()
        _unpack(Path(interpreter_layer), root, lambda name: not name.startswith("usr/share/"))
        files: set[str] = set()
        for layer in source_layers:
            files.update(_unpack(Path(layer), src, _python_sources))
        for path, data in (sources or {}).items():
            if path.endswith(".py"):
                (src / path).parent.mkdir(parents=True, exist_ok=True)
                (src / path).write_bytes(data)
                files.add(path)
        ordered = sorted(files)
        if not ordered:
            return {}
        argv = [str(root / LOADER), "--library-path", ":".join(str(root / p) for p in LIBRARY_PATH),
                str(root / INTERPRETER), "-S", "-s", "-B", "-c", _DRIVER]
        env = {"PYTHONHOME": str(root / "usr"), "PYTHONHASHSEED": "0", "LANG": "C.UTF-8", "PATH": "/usr/bin:/bin"}

        def run(shard: list[str]) -> list[str]:
            job = json.dumps({"src": str(src), "out": str(out), "files": shard})
            try:
                done = subprocess.run(argv, input=job, capture_output=True, text=True, env=env, cwd=scratch,
                                      check=False)
            except OSError as error:
                raise BytecodeError(f"the image's Python could not be started: {error}") from None
            if done.returncode != 0:
                raise BytecodeError(f"the image's Python failed to compile bytecode (exit {done.returncode}): "
                                    f"{done.stderr.strip()[-2000:]}")
            return json.loads(done.stdout)["failed"]

        shards = [ordered[i::SHARDS] for i in range(SHARDS)]
        with ThreadPoolExecutor(max_workers=max(1, min(SHARDS, os.cpu_count() or 1))) as pool:
            failed = sorted(path for result in pool.map(run, [s for s in shards if s]) for path in result)
        compiled = {path.relative_to(out).as_posix(): path.read_bytes()
                    for path in sorted(out.rglob("*.pyc")) if path.is_file()}
        log(f"  bytecode: {len(compiled)} modules compiled by the image's Python 3.11 (unchecked-hash)"
            + (f", {len(failed)} left as source (they do not compile: {', '.join(failed[:3])}"
               f"{', …' if len(failed) > 3 else ''})" if failed else ""))
        return compiled
