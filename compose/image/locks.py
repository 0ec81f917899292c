"""The study image's pinned inputs: what they are, how the lock files are made, how the inputs are fetched.

Two lock files, committed next to this module, pin every byte that goes into the image besides the project's
own code:

- ``debian.lock.json`` (``sealroom-debian-lock/v1``): the Debian 12 packages of the base (a Python 3.11
  runtime and the C/C++ runtime libraries the wheels link against), each by name, exact version, URL in
  Debian's archive, size and sha256. Made by :func:`lock_debian` with a private apt configuration (its own
  sources, lists and an empty package database, so the host's installed packages do not matter). Packages
  that only maintainer scripts need (``dpkg``, ``tar``, ``debconf``, ``perl-base``) are declared present and so
  left out: no maintainer script ever runs in the image.
- ``python.lock`` (pip requirements with ``--hash``): every wheel, by exact version and sha256, for CPython
  3.11 on manylinux x86-64, binary only (no sdist, so no compiler). Made by :func:`lock_python`: pip resolves
  the runtime dependencies of ``pyproject.toml`` (less the CLI's own) constrained to the versions installed in
  the running environment, so the image holds what the tests ran. torch is the CPU build.

Fetching (:func:`fetch_debs`, :func:`fetch_wheels`) goes only to those registries (Debian's archive by URL,
PyPI through pip with ``--require-hashes``), checks every sha256 against the lock, and keeps what it fetched
in a content-addressed cache, so a warm build fetches nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

__all__ = [
    "LockError",
    "DebPin",
    "WheelPin",
    "DEBIAN_LOCK",
    "PYTHON_LOCK",
    "read_debian_lock",
    "read_python_lock",
    "lock_debian",
    "lock_python",
    "fetch_debs",
    "fetch_wheels",
    "sha256_file",
]

HERE = Path(__file__).resolve().parent
DEBIAN_LOCK = HERE / "debian.lock.json"
PYTHON_LOCK = HERE / "python.lock"

DEBIAN_SOURCES = [
    {"uri": "http://deb.debian.org/debian", "suites": ["bookworm", "bookworm-updates"], "components": ["main"]},
    {"uri": "http://deb.debian.org/debian-security", "suites": ["bookworm-security"], "components": ["main"]},
]
DEBIAN_ARCH = "amd64"
# What the image needs from Debian: the interpreter and its standard library, and the C and C++ runtimes
# that the wheels' extension modules link against (libc, libm, libgcc_s, libstdc++, libz; checked by a test).
DEBIAN_ROOTS = ["libc6", "libgcc-s1", "libstdc++6", "zlib1g", "python3.11-minimal", "libpython3.11-stdlib"]
# Needed only by maintainer scripts, which never run in the image.
DEBIAN_ASSUMED_PRESENT = ["dpkg", "tar", "debconf", "perl-base"]

# The wheels' target: Debian 12's CPython 3.11 (glibc 2.36) on x86-64.
PYTHON_VERSION = "3.11"
WHEEL_PLATFORMS = [f"manylinux_2_{minor}_x86_64" for minor in range(36, 4, -1)] + [
    "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]
WHEEL_ABIS = ["cp311", "abi3", "none"]
# Runtime dependencies of pyproject.toml that no code in the image imports (the `seal` command's and the
# container backend's own, on the host).
PYTHON_LEFT_OUT = {"typer", "rich", "docker"}


class LockError(Exception):
    """A lock file is missing, malformed or stale, or an input does not match its pin."""


@dataclass(frozen=True)
class DebPin:
    name: str
    version: str
    architecture: str
    url: str
    size: int
    sha256: str

    @property
    def filename(self) -> str:
        return unquote(urlsplit(self.url).path.rsplit("/", 1)[-1])


@dataclass(frozen=True)
class WheelPin:
    name: str
    version: str
    sha256: str
    filename: str


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# --- reading the locks --------------------------------------------------------------------------------------------

def read_debian_lock(path: Path = DEBIAN_LOCK) -> list[DebPin]:
    try:
        document = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise LockError(f"cannot read {path}: {error}") from None
    if document.get("format") != "sealroom-debian-lock/v1":
        raise LockError(f"{path} is not a sealroom-debian-lock/v1 file")
    pins = [DebPin(**entry) for entry in document["packages"]]
    for pin in pins:
        if not re.fullmatch(r"[0-9a-f]{64}", pin.sha256) or not pin.url.startswith("http"):
            raise LockError(f"{path}: bad pin for {pin.name}")
    return pins


_LOCK_LINE = re.compile(r"^(?P<name>[A-Za-z0-9._-]+)==(?P<version>\S+) --hash=sha256:(?P<sha>[0-9a-f]{64})"
                        r"\s+# (?P<file>\S+\.whl)$")


def read_python_lock(path: Path = PYTHON_LOCK) -> list[WheelPin]:
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as error:
        raise LockError(f"cannot read {path}: {error}") from None
    pins = []
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.startswith("#"):
            continue
        match = _LOCK_LINE.match(line)
        if not match:
            raise LockError(f"{path}:{number}: not a pinned, hashed wheel line: {line!r}")
        pins.append(WheelPin(match["name"], match["version"], match["sha"], match["file"]))
    if not pins:
        raise LockError(f"{path} pins no wheel")
    return pins


# --- making the locks ---------------------------------------------------------------------------------------------

class _PrivateApt:
    """apt-get and apt-cache with their own sources, lists and an empty package database, in ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        for folder in ("etc/sources.list.d", "etc/apt.conf.d", "etc/preferences.d", "state/lists/partial",
                       "cache/archives/partial"):
            (root / folder).mkdir(parents=True, exist_ok=True)
        stanzas = []
        for source in DEBIAN_SOURCES:
            stanzas.append(f"Types: deb\nURIs: {source['uri']}\nSuites: {' '.join(source['suites'])}\n"
                           f"Components: {' '.join(source['components'])}\n"
                           "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n")
        (root / "etc/sources.list.d/debian.sources").write_text("\n".join(stanzas))
        (root / "state/status").write_text("")
        self.options = [
            f"-oDir::Etc={root / 'etc'}", "-oDir::Etc::SourceList=/dev/null",
            f"-oDir::Etc::SourceParts={root / 'etc/sources.list.d'}", f"-oDir::Etc::Parts={root / 'etc/apt.conf.d'}",
            f"-oDir::Etc::Preferences={root / 'etc/preferences'}",
            f"-oDir::Etc::PreferencesParts={root / 'etc/preferences.d'}",
            f"-oDir::State={root / 'state'}", f"-oDir::State::status={root / 'state/status'}",
            f"-oDir::Cache={root / 'cache'}", f"-oAPT::Architecture={DEBIAN_ARCH}",
            f"-oAPT::Architectures::={DEBIAN_ARCH}", "-oAcquire::Languages=none", "-oDebug::NoLocking=1",
            "-oAPT::Install-Recommends=0", "-oAPT::Get::Show-Versions=1",
        ]
        if os.geteuid() == 0:
            self.options.append("-oAPT::Sandbox::User=root")

    def run(self, tool: str, *args: str) -> str:
        if shutil.which(tool) is None:
            raise LockError(f"{tool} is needed to lock the Debian base (run on Debian or Ubuntu)")
        done = subprocess.run([tool, *self.options, *args], capture_output=True, text=True,
                              env={**os.environ, "LC_ALL": "C"})
        if done.returncode != 0:
            raise LockError(f"{tool} {' '.join(args[:2])} failed: {done.stderr.strip()[-2000:]}")
        return done.stdout

    def candidate(self, package: str) -> tuple[str, str]:
        shown = self.run("apt-cache", "show", "--no-all-versions", package)
        fields = dict(re.findall(r"^(Version|Architecture): (\S+)$", shown, re.M))
        return fields["Version"], fields["Architecture"]


def lock_debian(path: Path = DEBIAN_LOCK) -> list[DebPin]:
    """Resolve DEBIAN_ROOTS against Debian's archive today and write ``debian.lock.json``."""
    with tempfile.TemporaryDirectory(prefix="sealroom-apt-") as scratch:
        apt = _PrivateApt(Path(scratch))
        apt.run("apt-get", "update")
        present = []
        for package in DEBIAN_ASSUMED_PRESENT:
            version, arch = apt.candidate(package)
            present.append(f"Package: {package}\nStatus: install ok installed\nPriority: required\n"
                           f"Architecture: {arch}\nVersion: {version}\nMaintainer: none\nDescription: assumed\n")
        (apt.root / "state/status").write_text("\n".join(present))
        plan = apt.run("apt-get", "install", "--simulate", *DEBIAN_ROOTS)
        chosen = re.findall(r"^Inst (\S+) \((\S+) ", plan, re.M)
        if not chosen:
            raise LockError("apt planned no package at all")
        uris = apt.run("apt-get", "download", "--print-uris", *(f"{name}={version}" for name, version in chosen))
    pins = []
    versions = dict(chosen)
    for url, filename, size, checksum in re.findall(r"^'(\S+)' (\S+) (\d+) SHA256:([0-9a-f]{64})$", uris, re.M):
        name, _, rest = filename.partition("_")
        arch = rest.rsplit("_", 1)[-1].removesuffix(".deb")
        pins.append(DebPin(name, versions[name], arch, url, int(size), checksum))
    if len(pins) != len(chosen):
        raise LockError(f"apt gave {len(pins)} download URIs for {len(chosen)} packages")
    pins.sort(key=lambda pin: pin.name)
    document = {
        "format": "sealroom-debian-lock/v1",
        "comment": "Generated by `seal image lock`; do not edit. Base of the study image (compose/image).",
        "sources": DEBIAN_SOURCES, "architecture": DEBIAN_ARCH, "roots": DEBIAN_ROOTS,
        "assumed_present": DEBIAN_ASSUMED_PRESENT,
        "packages": [pin.__dict__ for pin in pins],
    }
    Path(path).write_text(json.dumps(document, indent=1, sort_keys=False) + "\n")
    return pins


def _project_requirements(pyproject: Path) -> list[str]:
    dependencies = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    kept = []
    for requirement in dependencies:
        name = re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].strip().lower()
        if name not in PYTHON_LEFT_OUT:
            kept.append(requirement)
    return kept


def _target_flags() -> list[str]:
    flags = ["--only-binary=:all:", "--python-version", PYTHON_VERSION, "--implementation", "cp"]
    for platform in WHEEL_PLATFORMS:
        flags += ["--platform", platform]
    for abi in WHEEL_ABIS:
        flags += ["--abi", abi]
    return flags


def lock_python(pyproject: Path, path: Path = PYTHON_LOCK, *, python: str = sys.executable) -> list[WheelPin]:
    """Resolve the image's wheels (versions as installed in ``python``'s environment) and write ``python.lock``."""
    with tempfile.TemporaryDirectory(prefix="sealroom-pip-") as scratch:
        scratch_path = Path(scratch)
        frozen = subprocess.run([python, "-m", "pip", "freeze", "--exclude-editable"], capture_output=True,
                                text=True, check=True).stdout
        (scratch_path / "constraints.txt").write_text(
            "\n".join(line for line in frozen.splitlines() if "==" in line and not line.startswith("-")) + "\n")
        (scratch_path / "requirements.in").write_text("\n".join(_project_requirements(pyproject)) + "\n")
        report = scratch_path / "report.json"
        done = subprocess.run(
            [python, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report),
             "--target", str(scratch_path / "target"), *_target_flags(),
             "-r", str(scratch_path / "requirements.in"), "-c", str(scratch_path / "constraints.txt")],
            capture_output=True, text=True)
        if done.returncode != 0:
            raise LockError(f"pip could not resolve the image's wheels: {done.stderr.strip()[-2000:]}")
        installs = json.loads(report.read_text())["install"]
    pins = []
    for item in installs:
        info = item["download_info"]
        sha = (info.get("archive_info") or {}).get("hashes", {}).get("sha256")
        filename = unquote(urlsplit(info["url"]).path.rsplit("/", 1)[-1])
        if not sha or not filename.endswith(".whl"):
            raise LockError(f"{item['metadata']['name']}: no hashed wheel ({info['url']})")
        pins.append(WheelPin(item["metadata"]["name"], item["metadata"]["version"], sha, filename))
    if any(pin.name.lower().startswith("nvidia-") for pin in pins):
        raise LockError("the resolution pulled a CUDA package; the image takes the CPU build of torch only")
    pins.sort(key=lambda pin: pin.name.lower())
    lines = ["# The study image's Python wheels (CPython 3.11, manylinux x86-64, binary only; torch CPU build).",
             "# Generated by `seal image lock` from pyproject.toml and the versions the tests ran; do not edit.",
             "# Install with: pip install --require-hashes --no-deps -r python.lock"]
    lines += [f"{pin.name}=={pin.version} --hash=sha256:{pin.sha256}  # {pin.filename}" for pin in pins]
    Path(path).write_text("\n".join(lines) + "\n")
    return pins


# --- fetching -----------------------------------------------------------------------------------------------------

def _verified(path: Path, sha256: str) -> bool:
    return path.is_file() and sha256_file(path) == sha256


def fetch_debs(pins: list[DebPin], cache: Path, *, log=print) -> dict[str, Path]:
    """Each pinned .deb from the cache, or downloaded from its URL into it; every one checked by sha256."""
    folder = cache / "debs"
    folder.mkdir(parents=True, exist_ok=True)
    found: dict[str, Path] = {}
    for pin in pins:
        target = folder / f"{pin.sha256}.deb"
        if not _verified(target, pin.sha256):
            log(f"  fetching {pin.filename}")
            partial = target.with_suffix(".part")
            try:
                with urllib.request.urlopen(pin.url, timeout=120) as answer, open(partial, "wb") as sink:
                    shutil.copyfileobj(answer, sink, 1 << 20)
            except OSError as error:
                partial.unlink(missing_ok=True)
                raise LockError(f"cannot download {pin.url}: {error} (if Debian has replaced this version, "
                                "re-lock with `seal image lock` and commit the new lock)") from None
            if not _verified(partial, pin.sha256):
                partial.unlink(missing_ok=True)
                raise LockError(f"{pin.filename} does not match its pinned sha256 {pin.sha256}")
            partial.replace(target)
        found[pin.name] = target
    return found


def fetch_wheels(pins: list[WheelPin], cache: Path, *, python: str = sys.executable, log=print) -> dict[str, Path]:
    """Each pinned wheel from the cache, or fetched by pip (``--require-hashes``) into it; all checked by sha256."""
    folder = cache / "wheels"
    folder.mkdir(parents=True, exist_ok=True)

    def place(pin: WheelPin) -> Path:
        return folder / pin.sha256 / pin.filename

    missing = [pin for pin in pins if not _verified(place(pin), pin.sha256)]
    if missing:
        log(f"  fetching {len(missing)} wheel(s) with pip --require-hashes")
        with tempfile.TemporaryDirectory(prefix="sealroom-wheels-", dir=cache) as scratch:
            scratch_path = Path(scratch)
            requirements = scratch_path / "missing.lock"
            requirements.write_text("".join(f"{p.name}=={p.version} --hash=sha256:{p.sha256}\n" for p in missing))
            done = subprocess.run(
                [python, "-m", "pip", "download", "--quiet", "--no-deps", "--require-hashes", *_target_flags(),
                 "-d", str(scratch_path / "out"), "-r", str(requirements)], capture_output=True, text=True)
            if done.returncode != 0:
                raise LockError(f"pip could not fetch the pinned wheels: {done.stderr.strip()[-2000:]}")
            for pin in missing:
                downloaded = scratch_path / "out" / pin.filename
                if not _verified(downloaded, pin.sha256):
                    raise LockError(f"{pin.filename} missing or not matching its pinned sha256 after download")
                place(pin).parent.mkdir(parents=True, exist_ok=True)
                shutil.move(downloaded, place(pin))
    return {pin.name: place(pin) for pin in pins}
