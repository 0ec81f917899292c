"""Build the study image (``sealroom/study-runner``) reproducibly, from this repository and its lock files alone.

The image is a standard OCI image (an OCI image layout folder; :func:`oci_archive` streams it as an
``oci-archive`` tar that podman and docker load). Four uncompressed layers:

1. ``base``: the Debian 12 packages of ``debian.lock.json`` unpacked as ``dpkg-deb -x`` would (no maintainer
   scripts, no documentation but copyright files), plus ``/etc/passwd`` and ``/etc/group`` with the study user
   (uid/gid 10001), ``/tmp`` (1777), ``/var/run`` for the guest agent's socket, ``python``/``python3`` links;
2. ``python``: the wheels of ``python.lock`` installed into ``/usr/lib/python3/dist-packages`` (no scripts, no
   bytecode);
3. ``bytecode``: the standard library's and the wheels' ``__pycache__/*.cpython-311.pyc``, unchecked-hash pycs
   compiled by the image's own Python 3.11 (:mod:`compose.image.bytecode`), so that a study does not compile
   torch in memory at every start;
4. ``app``: the project code that ``python -m cvm.run``, ``python -m cvm.aggregator`` and the in-container
   relays (``python -m compose.backends``, ``python -m compose.backends.inside``) import — found by reading
   their imports, so nothing else of the repository (no tests, no CLI, no KMS, no API) is in the image — under
   ``/opt/sealroom/app``, put on ``sys.path`` by a ``.pth`` file; and ``/opt/sealroom/image-inputs.json``
   naming every pinned input; and the app's own unchecked-hash bytecode.

The image runs as uid 10001, has no compiler, and writes no bytecode (``PYTHONDONTWRITEBYTECODE=1``): the pycs it
carries hold source hashes, not timestamps, and were made deterministically at build time. Every mtime is
SOURCE_DATE_EPOCH (default 0, so the digest depends on content only, not on which commit carried it); entries are
sorted; uid/gid are 0.

Two builds of the same inputs give the same manifest digest bit for bit, in any folder, at any time. Fetched
inputs are kept in a content-addressed cache (``$SEALROOM_CACHE`` or ``~/.cache/sealroom``), and so are
built layers, keyed by the sha256 of exactly what goes into them (and of the builder's own code); layers no build
has used for a week are dropped. ``layer_cache=False`` rebuilds every layer from the verified inputs (what the
reproducibility test does).

The build writes ``build-record.json`` (``sealroom-study-image-build/v1``) next to the layout: the digest, the
reference to pin, the layers and every input's sha256.
"""

from __future__ import annotations

import ast
import datetime
import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from compose.image import bytecode as bytecode_module
from compose.image import layers as layers_module
from compose.image.bytecode import BytecodeError, compile_bytecode
from compose.image.layers import LayerDigest, Tree, add_deb, add_wheel, write_layer
from compose.image.locks import (
    DEBIAN_LOCK,
    PYTHON_LOCK,
    fetch_debs,
    fetch_wheels,
    read_debian_lock,
    read_python_lock,
    sha256_file,
)

__all__ = [
    "IMAGE_NAME",
    "BUILD_RECORD",
    "BuildError",
    "BuildRecord",
    "app_sources",
    "build_study_image",
    "default_cache_dir",
    "default_image_dir",
    "oci_archive",
]

IMAGE_NAME = "sealroom/study-runner"
BUILD_RECORD = "build-record.json"
RECORD_FORMAT = "sealroom-study-image-build/v1"
BUILDER_VERSION = "2"                       # bump when the builder changes what it writes for the same inputs
STUDY_UID = 10001
SITE_PACKAGES = "usr/lib/python3/dist-packages"
APP_DIR = "opt/sealroom/app"
# The entry points the image runs; the app layer holds exactly what they import.
ENTRY_MODULES = ("cvm.run", "cvm.aggregator", "compose.backends", "compose.backends.inside")
APP_PACKAGES = ("cvm", "compose", "kms_client", "contracts", "kms")
APP_DATA = {"contracts.chain": ["contracts/artifacts/DstackApp.json", "contracts/artifacts/DstackKms.json"]}
IMAGE_ENV = ["PATH=/usr/local/bin:/usr/bin:/bin", "LANG=C.UTF-8", "HOME=/tmp", "PYTHONDONTWRITEBYTECODE=1",
             "PYTHONUNBUFFERED=1"]
_PROJECT_ROOT = Path(__file__).resolve().parents[2]

_MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
_MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
_MEDIA_LAYER = "application/vnd.oci.image.layer.v1.tar"


class BuildError(Exception):
    """The image could not be built; the message says which input or step failed."""


@dataclass(frozen=True)
class BuildRecord:
    digest: str                 # "sha256:…" of the OCI manifest: what a compose pins
    config_digest: str          # the image id an engine shows
    layout: Path                # the OCI image layout folder
    record_path: Path
    document: dict

    @property
    def reference(self) -> str:
        return f"{IMAGE_NAME}@{self.digest}"


def default_cache_dir() -> Path:
    base = os.environ.get("SEALROOM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "sealroom")
    return Path(base) / "study-image"


def default_image_dir(state_dir: Path) -> Path:
    return Path(state_dir) / "study-image"


def _canonical(document: dict) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


# --- the project code the image needs ----------------------------------------------------------------------------

def _module_files(root: Path) -> dict[str, Path]:
    modules: dict[str, Path] = {}
    for package in APP_PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if "__pycache__" in parts:
                continue
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _imports(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_bytes(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            parts = target.split(".")
            while parts and ".".join(parts) not in modules:
                parts.pop()
            if parts:
                found.add(".".join(parts))
    return found


def app_sources(root: Path = _PROJECT_ROOT) -> dict[str, Path]:
    """Image path → source file: every project module the entry points import (and their packages' __init__,
    and a package's __main__ when it is an entry point), plus the data files those modules read."""
    root = Path(root)
    modules = _module_files(root)
    wanted: set[str] = set()
    stack = []
    for entry in ENTRY_MODULES:
        stack += [entry] + ([f"{entry}.__main__"] if f"{entry}.__main__" in modules else [])
    while stack:
        module = stack.pop()
        if module in wanted or module not in modules:
            continue
        wanted.add(module)
        parts = module.split(".")
        stack += [".".join(parts[:i]) for i in range(1, len(parts))]
        stack += sorted(_imports(module, modules[module], modules))
    missing = [entry for entry in ENTRY_MODULES if entry not in wanted]
    if missing:
        raise BuildError(f"entry modules not found in {root}: {missing}")
    files = {f"{APP_DIR}/{modules[m].relative_to(root).as_posix()}": modules[m] for m in sorted(wanted)}
    for module, data in APP_DATA.items():
        if module in wanted:
            files.update({f"{APP_DIR}/{name}": root / name for name in data})
    return dict(sorted(files.items()))


def app_tree_digest(files: dict[str, Path] | dict[str, bytes]) -> str:
    """sha256 over the app layer's paths and contents (what ``current_study_image`` compares)."""
    digest = hashlib.sha256()
    for image_path, source in sorted(files.items()):
        content = source if isinstance(source, bytes) else Path(source).read_bytes()
        digest.update(f"{image_path}\0{hashlib.sha256(content).hexdigest()}\n".encode())
    return digest.hexdigest()


# --- layers -------------------------------------------------------------------------------------------------------

_PASSWD = ("root:x:0:0:root:/root:/usr/sbin/nologin\n"
           "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
           f"study:x:{STUDY_UID}:{STUDY_UID}:sealroom study:/tmp:/usr/sbin/nologin\n")
_GROUP = f"root:x:0:\nnogroup:x:65534:\nstudy:x:{STUDY_UID}:\n"


def _base_tree(debs: dict[str, Path]) -> Tree:
    tree = Tree()
    for name in sorted(debs):
        add_deb(tree, debs[name].read_bytes())
    tree.add_bytes("etc/passwd", _PASSWD.encode())
    tree.add_bytes("etc/group", _GROUP.encode())
    tree.add_dir("tmp", 0o1777)
    tree.add_dir("var/tmp", 0o1777)
    tree.add_dir("run", 0o755)
    tree.add_dir("var/run", 0o755)          # the guest agent's socket is mounted at /var/run/dstack.sock
    tree.add_dir("root", 0o700)
    tree.add_symlink("usr/bin/python3", "python3.11")
    tree.add_symlink("usr/bin/python", "python3.11")
    tree.add_dir(SITE_PACKAGES)
    return tree


def _python_tree(wheels: dict[str, Path]) -> Tree:
    tree = Tree()
    for name in sorted(wheels, key=str.lower):
        add_wheel(tree, wheels[name], SITE_PACKAGES)
    return tree


def _bytecode_tree(base_layer: Path, python_layer: Path, log: Callable[[str], None]) -> Tree:
    tree = Tree()
    for path, data in compile_bytecode(base_layer, source_layers=[base_layer, python_layer], log=log).items():
        tree.add_bytes(path, data)
    return tree


def _app_tree(files: dict[str, bytes], inputs: dict, base_layer: Path, log: Callable[[str], None]) -> Tree:
    tree = Tree()
    for image_path, content in files.items():
        tree.add_bytes(image_path, content, mode=0o644)
    for path, data in compile_bytecode(base_layer, sources=files, log=log).items():
        tree.add_bytes(path, data)
    tree.add_bytes(f"{SITE_PACKAGES}/sealroom-app.pth", f"/{APP_DIR}\n".encode())
    tree.add_bytes("opt/sealroom/image-inputs.json", json.dumps(inputs, indent=1, sort_keys=True).encode() + b"\n")
    return tree


def _cached_layer(cache: Path, key: str, build: Callable[[], Tree], epoch: int, use_cache: bool,
                  log: Callable[[str], None], label: str) -> tuple[Path, LayerDigest, bool]:
    """The layer for ``key`` from the layer cache, or built (and cached) now."""
    folder = cache / "layers"
    folder.mkdir(parents=True, exist_ok=True)
    blob, meta = folder / f"{key}.tar", folder / f"{key}.json"
    if use_cache and blob.is_file() and meta.is_file():
        known = json.loads(meta.read_text())
        if blob.stat().st_size == known["size"]:
            os.utime(meta)                    # last used now: see _prune_layer_cache
            return blob, LayerDigest(known["digest"], known["size"]), True
    started = time.monotonic()
    try:
        tree = build()
    except BytecodeError as error:
        raise BuildError(f"layer {label}: {error}") from None
    partial = folder / f"{key}.{os.getpid()}.part"
    try:
        layer = write_layer(tree, partial, epoch=epoch)
        partial.replace(blob)
    finally:
        partial.unlink(missing_ok=True)
    meta.write_text(json.dumps({"digest": layer.digest, "size": layer.size}))
    log(f"  layer {label}: {len(tree.nodes)} entries, {layer.size / 1e6:.1f} MB, {layer.digest} "
        f"({time.monotonic() - started:.1f} s)")
    return blob, layer, False


LAYER_CACHE_DAYS = 7


def _prune_layer_cache(cache: Path, keep: set[str]) -> None:
    """Forget cached layers that no build has used for LAYER_CACHE_DAYS (old code, old locks)."""
    horizon = time.time() - LAYER_CACHE_DAYS * 86400
    for meta in (cache / "layers").glob("*.json"):
        if meta.stem not in keep and meta.stat().st_mtime < horizon:
            meta.unlink(missing_ok=True)
            (cache / "layers" / f"{meta.stem}.tar").unlink(missing_ok=True)


def _place_blob(blobs: Path, digest: str, source: Path | None = None, data: bytes | None = None) -> None:
    target = blobs / digest.split(":", 1)[1]
    if target.is_file() and (source is None or target.stat().st_size == source.stat().st_size):
        return
    target.unlink(missing_ok=True)
    if data is not None:
        target.write_bytes(data)
        return
    assert source is not None
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _git_state(root: Path) -> dict:
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", *APP_PACKAGES],
                                    capture_output=True, text=True, check=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "app_code_uncommitted": None}
    return {"commit": commit, "app_code_uncommitted": dirty}


# --- the build ----------------------------------------------------------------------------------------------------

def build_study_image(out_dir: Path, *, root: Path = _PROJECT_ROOT, cache_dir: Path | None = None,
                      epoch: int | None = None, layer_cache: bool = True, debian_lock: Path = DEBIAN_LOCK,
                      python_lock: Path = PYTHON_LOCK, log: Callable[[str], None] = print) -> BuildRecord:
    """Build the study image into ``out_dir`` (``oci/`` layout and ``build-record.json``); see the module doc."""
    started = time.monotonic()
    root, out_dir = Path(root).resolve(), Path(out_dir).resolve()
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    if epoch is None:
        epoch = int(os.environ.get("SOURCE_DATE_EPOCH") or 0)
    seconds: dict[str, float] = {}

    debian_pins, python_pins = read_debian_lock(debian_lock), read_python_lock(python_lock)
    lock_digests = {"debian_lock_sha256": sha256_file(debian_lock), "python_lock_sha256": sha256_file(python_lock)}
    # Read once: the digest recorded and the layer written are of the same bytes, even if the tree is being edited.
    files = {image_path: source.read_bytes() for image_path, source in app_sources(root).items()}
    app_digest = app_tree_digest(files)
    log(f"study image: {len(debian_pins)} Debian packages, {len(python_pins)} wheels, {len(files)} app files "
        f"(app tree sha256 {app_digest[:16]}…), SOURCE_DATE_EPOCH={epoch}")

    step = time.monotonic()
    debs = fetch_debs(debian_pins, cache, log=log)
    wheels = fetch_wheels(python_pins, cache, log=log)
    seconds["fetch_and_verify"] = time.monotonic() - step

    # The builder's own source is part of every cache key: an edit to it never reuses a layer it built before.
    builder = hashlib.sha256(b"".join(Path(m).read_bytes() for m in (__file__, layers_module.__file__,
                                                                     bytecode_module.__file__))).hexdigest()

    def key(kind: str, *parts: str) -> str:
        return hashlib.sha256("\0".join((BUILDER_VERSION, builder, kind, str(epoch), *parts)).encode()).hexdigest()

    image_inputs = {"format": "sealroom-study-image-inputs/v1", **lock_digests,
                    "debian_packages": {p.name: f"{p.version} sha256:{p.sha256}" for p in debian_pins},
                    "wheels": {p.name: f"{p.version} sha256:{p.sha256}" for p in python_pins}}
    layers: list[tuple[str, Path, LayerDigest, bool]] = []
    keys: set[str] = set()
    blob_of: dict[str, tuple[Path, LayerDigest]] = {}
    # Each later layer's key names the layers it is made from (the bytecode: the interpreter and the sources).
    for label, key_of, make in (
        ("base", lambda: key("base", lock_digests["debian_lock_sha256"]), lambda: _base_tree(debs)),
        ("python", lambda: key("python", lock_digests["python_lock_sha256"]), lambda: _python_tree(wheels)),
        ("bytecode", lambda: key("bytecode", blob_of["base"][1].digest, blob_of["python"][1].digest),
         lambda: _bytecode_tree(blob_of["base"][0], blob_of["python"][0], log)),
        ("app", lambda: key("app", app_digest, hashlib.sha256(_canonical(image_inputs)).hexdigest(),
                            blob_of["base"][1].digest),
         lambda: _app_tree(files, image_inputs, blob_of["base"][0], log)),
    ):
        layer_key = key_of()
        step = time.monotonic()
        keys.add(layer_key)
        blob, layer, cached = _cached_layer(cache, layer_key, make, epoch, layer_cache, log, label)
        seconds[f"layer_{label}"] = time.monotonic() - step
        if cached:
            log(f"  layer {label}: {layer.digest} (cached)")
        layers.append((label, blob, layer, cached))
        blob_of[label] = (blob, layer)

    created = datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    config = {
        "architecture": "amd64", "os": "linux", "created": created,
        "config": {"User": f"{STUDY_UID}:{STUDY_UID}", "Env": IMAGE_ENV, "WorkingDir": "/tmp",
                   "Cmd": ["python", "-m", "cvm.run", "--help"],
                   "Labels": {"org.opencontainers.image.title": IMAGE_NAME,
                              "org.sealroom.app-tree-sha256": app_digest,
                              "org.sealroom.debian-lock-sha256": lock_digests["debian_lock_sha256"],
                              "org.sealroom.python-lock-sha256": lock_digests["python_lock_sha256"]}},
        "rootfs": {"type": "layers", "diff_ids": [layer.digest for _, _, layer, _ in layers]},
        "history": [{"created": created, "created_by": f"sealroom study image builder v{BUILDER_VERSION}: {label}"}
                    for label, _, _, _ in layers],
    }
    config_bytes = _canonical(config)
    config_digest = "sha256:" + hashlib.sha256(config_bytes).hexdigest()
    manifest = {
        "schemaVersion": 2, "mediaType": _MEDIA_MANIFEST,
        "config": {"mediaType": _MEDIA_CONFIG, "digest": config_digest, "size": len(config_bytes)},
        "layers": [{"mediaType": _MEDIA_LAYER, "digest": layer.digest, "size": layer.size}
                   for _, _, layer, _ in layers],
    }
    manifest_bytes = _canonical(manifest)
    digest = "sha256:" + hashlib.sha256(manifest_bytes).hexdigest()

    step = time.monotonic()
    layout = out_dir / "oci"
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    for _, blob, layer, _ in layers:
        _place_blob(blobs, layer.digest, source=blob)
    _place_blob(blobs, config_digest, data=config_bytes)
    _place_blob(blobs, digest, data=manifest_bytes)
    wanted = {d.split(":", 1)[1] for d in [digest, config_digest, *(layer.digest for _, _, layer, _ in layers)]}
    for stale in blobs.iterdir():
        if stale.name not in wanted:
            stale.unlink()
    (layout / "oci-layout").write_bytes(_canonical({"imageLayoutVersion": "1.0.0"}))
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
             "manifests": [{"mediaType": _MEDIA_MANIFEST, "digest": digest, "size": len(manifest_bytes),
                            "annotations": {"org.opencontainers.image.ref.name": f"{IMAGE_NAME}:latest"}}]}
    (layout / "index.json").write_bytes(_canonical(index))
    _prune_layer_cache(cache, keys)
    seconds["layout"] = time.monotonic() - step
    seconds["total"] = time.monotonic() - started

    document = {
        "format": RECORD_FORMAT,
        "image": IMAGE_NAME,
        "digest": digest,
        "reference": f"{IMAGE_NAME}@{digest}",
        "config_digest": config_digest,
        "layers": [{"name": label, "digest": layer.digest, "size": layer.size, "from_cache": cached}
                   for label, _, layer, cached in layers],
        "inputs": {**lock_digests, "app_tree_sha256": app_digest, "source_date_epoch": epoch,
                   "builder_version": BUILDER_VERSION, "debian_packages": len(debian_pins),
                   "wheels": len(python_pins), "app_files": sorted(files)},
        "source": {"root": str(root), **_git_state(root)},
        "layout": str(layout),
        "built_at": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
    }
    record_path = out_dir / BUILD_RECORD
    partial = record_path.with_suffix(".part")
    partial.write_text(json.dumps(document, indent=1) + "\n")
    partial.replace(record_path)
    log(f"study image {IMAGE_NAME}@{digest} (config {config_digest}) in {seconds['total']:.1f} s")
    return BuildRecord(digest, config_digest, layout, record_path, document)


# --- shipping -----------------------------------------------------------------------------------------------------

def oci_archive(layout: Path, chunk_size: int = 1 << 20) -> Iterator[bytes]:
    """The OCI layout as an ``oci-archive`` tar stream (what ``podman load`` / the engine's load API take),
    produced in ``chunk_size`` pieces without holding a layer in memory."""
    layout = Path(layout)
    for folder in ("blobs", "blobs/sha256"):
        info = tarfile.TarInfo(folder)
        info.type, info.mode = tarfile.DIRTYPE, 0o755
        yield info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    names = ["oci-layout", "index.json"] + [f"blobs/sha256/{p.name}"
                                            for p in sorted((layout / "blobs" / "sha256").iterdir())]
    for name in names:
        source = layout / name
        info = tarfile.TarInfo(name)
        info.size, info.mode = source.stat().st_size, 0o644
        yield info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
        with open(source, "rb") as stream:
            while chunk := stream.read(chunk_size):
                yield chunk
        if info.size % tarfile.BLOCKSIZE:
            yield tarfile.NUL * (tarfile.BLOCKSIZE - info.size % tarfile.BLOCKSIZE)
    yield tarfile.NUL * (2 * tarfile.BLOCKSIZE)
