"""Deterministic image layers: a file tree assembled in memory, written as one sorted, normalised tar.

A layer is a :class:`Tree` (path → :class:`Node`) written by :func:`write_layer`. Everything that could differ
between two builds of the same inputs is fixed: entries sorted by path, every mtime the build's
SOURCE_DATE_EPOCH, uid/gid 0 with empty user and group names, modes normalised (0755 / 0644, 1777 for tmp
folders), PAX format without time records, no compression (the layer's digest is its diff id, and no
compressor's version can change it).

Readers fill a tree from pinned inputs without unpacking anything on disk:

- :func:`add_deb` reads a Debian package (``ar`` archive, ``data.tar.{xz,gz,bz2}``) the way ``dpkg-deb -x``
  would, minus documentation (copyright files stay), without running maintainer scripts;
- :func:`add_wheel` installs a wheel the way an installer would place it in ``site-packages`` (``.data/purelib``
  and ``platlib`` merged in, scripts and headers left out), without byte-compiling;
- :meth:`Tree.add_bytes` adds the project's own files (read once, so what is hashed is what is written).
"""

from __future__ import annotations

import hashlib
import io
import posixpath
import stat
import tarfile
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

__all__ = ["LayerError", "Node", "Tree", "add_deb", "add_wheel", "write_layer", "LayerDigest"]

_CHUNK = 1 << 20


class LayerError(Exception):
    """An input could not be read into a layer (corrupt package, unsafe path, unsupported member)."""


@dataclass(frozen=True)
class Node:
    kind: str                                   # "dir" | "file" | "symlink"
    mode: int
    size: int = 0
    target: str = ""                            # symlink target
    opener: Callable[[], BinaryIO] | None = None  # file content, opened when the layer is written


def _clean(path: str) -> str:
    """A member path as a relative, normalised POSIX path inside the image; refuses escapes."""
    path = path.replace("\\", "/")
    while path.startswith("./"):
        path = path[2:]
    path = path.lstrip("/")
    norm = posixpath.normpath(path) if path else ""
    if norm in ("", ".") or norm.startswith("../") or norm == ".." or "/../" in f"/{norm}/":
        raise LayerError(f"unsafe or empty path in an input: {path!r}")
    return norm


def _file_mode(mode: int) -> int:
    return 0o755 if mode & 0o111 else 0o644


class Tree:
    """A layer's content. Later additions replace earlier ones at the same path (as a later package would)."""

    def __init__(self) -> None:
        self.nodes: dict[str, Node] = {}
        self.archives: dict[Path, zipfile.ZipFile] = {}   # wheels read from, open while the layer is written

    def archive(self, wheel: Path) -> zipfile.ZipFile:
        if wheel not in self.archives:
            self.archives[wheel] = zipfile.ZipFile(wheel)
        return self.archives[wheel]

    def close(self) -> None:
        for archive in self.archives.values():
            archive.close()
        self.archives.clear()

    def _parents(self, path: str) -> None:
        parent = posixpath.dirname(path)
        while parent and parent not in self.nodes:
            self.nodes[parent] = Node("dir", 0o755)
            parent = posixpath.dirname(parent)

    def add_dir(self, path: str, mode: int = 0o755) -> None:
        path = _clean(path)
        self._parents(path)
        existing = self.nodes.get(path)
        if existing is not None and existing.kind != "dir":
            raise LayerError(f"{path} is both a folder and a {existing.kind}")
        self.nodes[path] = Node("dir", mode)

    def add_symlink(self, path: str, target: str) -> None:
        path = _clean(path)
        self._parents(path)
        self.nodes[path] = Node("symlink", 0o777, target=target)

    def add_bytes(self, path: str, data: bytes, mode: int = 0o644) -> None:
        path = _clean(path)
        self._parents(path)
        self.nodes[path] = Node("file", _file_mode(mode), len(data), opener=lambda: io.BytesIO(data))


# --- Debian packages ----------------------------------------------------------------------------------------------

_DEB_DROPPED = ("usr/share/man/", "usr/share/info/", "usr/share/lintian/", "usr/share/bug/", "usr/share/locale/")


def _ar_members(data: bytes) -> dict[str, bytes]:
    if not data.startswith(b"!<arch>\n"):
        raise LayerError("not a Debian package (no ar header)")
    members, offset = {}, 8
    while offset + 60 <= len(data):
        header = data[offset:offset + 60]
        name = header[:16].decode("ascii").strip().rstrip("/")
        size = int(header[48:58].decode("ascii").strip())
        offset += 60
        members[name] = data[offset:offset + size]
        offset += size + (size & 1)
    return members


def _deb_kept(path: str) -> bool:
    if path.startswith(_DEB_DROPPED):
        return False
    if path.startswith("usr/share/doc/"):
        return path.endswith("/copyright")
    return True


def add_deb(tree: Tree, deb: bytes) -> list[str]:
    """Unpack a .deb's data archive into ``tree``; returns the paths it placed (documentation left out)."""
    members = _ar_members(deb)
    names = [name for name in members if name.startswith("data.tar")]
    if len(names) != 1:
        raise LayerError(f"a Debian package needs one data.tar member, found {names}")
    if names[0].endswith(".zst"):
        raise LayerError("zstd-compressed Debian packages are not supported (Debian 12 packages use xz)")
    placed = []
    with tarfile.open(fileobj=io.BytesIO(members[names[0]]), mode="r:*") as archive:
        entries = archive.getmembers()
        by_name = {_clean(m.name): m for m in entries if m.name not in (".", "./")}
        for member in entries:
            if member.name in (".", "./"):
                continue
            path = _clean(member.name)
            if not _deb_kept(path):
                continue
            if member.isdir():
                tree.add_dir(path, stat.S_IMODE(member.mode) & 0o1777)
            elif member.issym():
                tree.add_symlink(path, member.linkname)
            elif member.islnk() or member.isfile():
                source = by_name.get(_clean(member.linkname)) if member.islnk() else member
                if source is None or not source.isfile():
                    raise LayerError(f"hard link {path} points at nothing usable")
                extracted = archive.extractfile(source)
                assert extracted is not None
                tree.add_bytes(path, extracted.read(), stat.S_IMODE(member.mode))
            else:
                raise LayerError(f"unsupported member type in a Debian package: {path}")
            placed.append(path)
    return placed


# --- wheels -------------------------------------------------------------------------------------------------------

def add_wheel(tree: Tree, wheel: Path, site_packages: str, *, skip_dir_names: Iterable[str] = ("__pycache__",)
              ) -> int:
    """Install ``wheel`` into ``site_packages`` of ``tree`` (no scripts, no headers, no bytecode); returns files."""
    skipped = set(skip_dir_names)
    wheel = Path(wheel)
    count = 0
    infos = tree.archive(wheel).infolist()
    data_dir = next((i.filename.split("/")[0] for i in infos if i.filename.split("/")[0].endswith(".data")), None)
    for info in infos:
        if info.is_dir():
            continue
        name = info.filename
        if data_dir and name.startswith(data_dir + "/"):
            scheme, _, rest = name[len(data_dir) + 1:].partition("/")
            if scheme not in ("purelib", "platlib"):
                continue      # scripts, headers, data: nothing a study imports
            name = rest
        parts = name.split("/")
        if skipped.intersection(parts[:-1]) or name.endswith((".pyc", ".pyo")):
            continue
        if (info.external_attr >> 16) and stat.S_ISLNK(info.external_attr >> 16):
            raise LayerError(f"{wheel.name}: symlink members are not supported ({name})")
        mode = (info.external_attr >> 16) & 0o777 or 0o644
        path = _clean(posixpath.join(site_packages, name))
        tree._parents(path)
        tree.nodes[path] = Node("file", _file_mode(mode), info.file_size,
                                opener=_zip_opener(tree, wheel, info.filename))
        count += 1
    return count


def _zip_opener(tree: Tree, wheel: Path, member: str) -> Callable[[], BinaryIO]:
    # One open archive per wheel for the whole layer: reopening a wheel per member would re-read its central
    # directory each time (torch has tens of thousands of members).
    return lambda: tree.archive(wheel).open(member)


# --- writing ------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LayerDigest:
    digest: str          # "sha256:…" of the uncompressed tar (= its diff id)
    size: int


class _HashingWriter(io.RawIOBase):
    def __init__(self, sink: BinaryIO) -> None:
        self._sink = sink
        self.hash = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.size

    def write(self, data) -> int:  # type: ignore[override]
        view = memoryview(data)
        self.hash.update(view)
        self._sink.write(view)
        self.size += len(view)
        return len(view)


def write_layer(tree: Tree, out_path: Path, *, epoch: int) -> LayerDigest:
    """Write ``tree`` as a reproducible uncompressed tar at ``out_path``; returns its digest and size."""
    with open(out_path, "wb") as sink:
        writer = _HashingWriter(sink)
        with tarfile.open(fileobj=writer, mode="w", format=tarfile.PAX_FORMAT, encoding="utf-8") as archive:
            for path in sorted(tree.nodes):
                node = tree.nodes[path]
                info = tarfile.TarInfo(path)
                info.mtime = int(epoch)
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                info.mode = node.mode
                if node.kind == "dir":
                    info.type = tarfile.DIRTYPE
                    archive.addfile(info)
                elif node.kind == "symlink":
                    info.type = tarfile.SYMTYPE
                    info.linkname = node.target
                    archive.addfile(info)
                else:
                    info.type = tarfile.REGTYPE
                    info.size = node.size
                    assert node.opener is not None
                    with node.opener() as stream:
                        archive.addfile(info, stream)
    tree.close()
    return LayerDigest("sha256:" + writer.hash.hexdigest(), writer.size)
