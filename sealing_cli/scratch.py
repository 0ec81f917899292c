"""Throwaway folders that a command may clear, and only those: a command clears a folder only if it made it.

`seal demo` starts every run from an empty folder. It used to delete whatever folder it was given; now it marks
the folders it creates with a small marker file (``.sealroom-scratch``) and only ever clears a folder that carries
that marker. A non-empty folder without it (someone's files, a `seal up` stack) and a folder where a stack is
running are refused with :class:`ScratchRefused`, and nothing in them is touched.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from compose.stack_file import StackRefused, running_supervisor
from sealing_cli.stack import LOCK_FILE, clear_stale_description

MARKER = ".sealroom-scratch"
MARKER_FORMAT = "sealroom-scratch/v1"


class ScratchRefused(StackRefused):
    """The folder is not a throwaway folder this command may clear; it was left exactly as it was."""


def _stack_lock_held(folder: Path) -> bool:
    path = folder / LOCK_FILE
    if not path.is_file():
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)   # closing releases the probe's own lock
    return False


def _is_ours(folder: Path) -> bool:
    marker = folder / MARKER
    if marker.is_symlink() or not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("format") == MARKER_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def prepare_scratch_folder(folder: Path, *, made_by: str, notify: Callable[[str], None] = print) -> Path:
    """Give ``made_by`` (e.g. "seal demo") an empty folder at ``folder``, marked as its own, and return its path.

    A missing or empty folder is created/marked; a folder carrying the marker is emptied (except the marker). A
    folder where a stack runs, a non-empty folder without the marker, or a path that is not a folder raises
    :class:`ScratchRefused` before anything is touched. A crashed run's stale stack.json is reported through
    ``notify`` and its leftover services are stopped before the folder is emptied."""
    folder = Path(folder).absolute()
    if folder.exists() and not folder.is_dir():
        raise ScratchRefused(f"{folder} is not a folder {made_by} made; it is left as it is")
    if folder.is_dir():
        pid = running_supervisor(folder)
        if pid is not None or _stack_lock_held(folder):
            who = f" (process {pid})" if pid is not None else ""
            raise ScratchRefused(f"a stack is running in {folder}{who}; {made_by} needs a folder of its own: stop "
                                 "that stack first or give another --state-dir")
        entries = [entry for entry in folder.iterdir() if entry.name != MARKER]
        if entries and not _is_ours(folder):
            raise ScratchRefused(f"{folder} is not empty and was not made by {made_by}; it would be cleared, so it "
                                 "is refused and left as it is: give a new or empty folder with --state-dir")
        if entries:
            clear_stale_description(folder, notify)   # a crashed run's services must not outlive its files
        for entry in entries:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    if not _is_ours(folder):
        (folder / MARKER).write_text(json.dumps({
            "format": MARKER_FORMAT, "made_by": made_by,
            "note": f"{made_by} clears this folder at its next run: keep nothing of yours here"}, indent=1) + "\n")
    return folder
