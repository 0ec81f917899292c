"""The container engine the container backend talks to: a Docker-compatible API, usually podman's.

:func:`connect_engine` returns a :class:`ContainerEngine` (a ``docker.DockerClient`` and, when this code started
it, the ``podman system service`` process). In order it tries:

1. ``$SEALROOM_CONTAINER_HOST`` (``unix:///…``), when set: that engine or nothing;
2. a podman service already answering on ``STATE/podman/podman.sock`` (a previous ``connect_engine``);
3. ``podman`` on PATH: it starts ``podman system service --time=0`` on that socket, with the settings a machine
   without systemd or cgroup v2 delegation needs: ``--cgroup-manager=cgroupfs``, ``--events-backend=file``,
   the ``runc`` runtime where cgroups are hybrid (crun refuses them), and ``$SEALROOM_PODMAN_STORAGE_DRIVER``
   (e.g. ``vfs``) when set. Images and containers live in podman's usual storage, so a loaded study image
   stays loaded across runs and stacks;
4. a Docker engine on ``$DOCKER_HOST`` or ``/var/run/docker.sock``.

Nothing is installed here (``scripts/setup.sh`` installs podman and runc from Debian when no engine is present).
:class:`EngineUnavailable` says why none could be had.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from compose.backends.launcher import ManagedProcess, ServiceStartError

__all__ = ["EngineUnavailable", "ContainerEngine", "connect_engine", "engine_at", "podman_global_options"]

_SOCKET_LIMIT = 100          # an AF_UNIX path is at most 107 bytes


class EngineUnavailable(RuntimeError):
    """No container engine could be reached or started; the message says what was tried."""


@dataclass
class ContainerEngine:
    client: object                       # docker.DockerClient
    url: str
    kind: str                            # "podman" or "docker"
    service: ManagedProcess | None = None
    notes: list[str] = field(default_factory=list)

    def close(self) -> None:
        """Closes the client and stops the podman service this code started (containers are stopped by runs)."""
        try:
            self.client.close()          # type: ignore[attr-defined]
        finally:
            if self.service is not None:
                self.service.stop()
                self.service = None


def podman_global_options() -> list[str]:
    options = ["--cgroup-manager=cgroupfs", "--events-backend=file"]
    hybrid = Path("/sys/fs/cgroup/unified").is_dir() and not Path("/sys/fs/cgroup/cgroup.controllers").exists()
    if hybrid and shutil.which("runc"):
        options.append("--runtime=runc")
    driver = os.environ.get("SEALROOM_PODMAN_STORAGE_DRIVER")
    if driver:
        options.append(f"--storage-driver={driver}")
    return options


def _client(url: str, timeout: int):
    import docker   # imported here: the process backend and the API work without the docker SDK

    return docker.DockerClient(base_url=url, timeout=timeout)


def _unix_socket_answers(path: str) -> bool:
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(path)
        except OSError:
            return False
    return True


def _answers(url: str) -> bool:
    # A raw probe first: the SDK leaks its socket when the connection is refused (a ResourceWarning).
    if url.startswith("unix://") and not _unix_socket_answers(url[len("unix://"):]):
        return False
    try:
        client = _client(url, 5)
    except Exception:   # noqa: BLE001 - the SDK raises many kinds for "nothing there"
        return False
    try:
        return bool(client.ping())
    except Exception:   # noqa: BLE001
        return False
    finally:
        client.close()


def _kind(client) -> str:
    version = client.version()
    names = " ".join(str(c.get("Name", "")) for c in version.get("Components", []))
    return "podman" if "podman" in names.lower() else "docker"


def _socket_path(state_dir: Path) -> Path:
    path = Path(state_dir).resolve() / "podman" / "podman.sock"
    if len(str(path)) <= _SOCKET_LIMIT:
        return path
    tag = hashlib.sha256(str(path).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"sealroom-podman-{tag}" / "podman.sock"


def connect_engine(state_dir: Path, *, timeout: int = 900, start: bool = True) -> ContainerEngine:
    """The engine to run study containers on (see the module docstring for the order); ``start=False`` only
    connects to an engine that already runs."""
    tried = []
    explicit = os.environ.get("SEALROOM_CONTAINER_HOST")
    if explicit:
        if _answers(explicit):
            client = _client(explicit, timeout)
            return ContainerEngine(client, explicit, _kind(client))
        raise EngineUnavailable(f"SEALROOM_CONTAINER_HOST={explicit} does not answer")

    sock = _socket_path(state_dir)
    url = f"unix://{sock}"
    if sock.exists() and _answers(url):
        client = _client(url, timeout)
        return ContainerEngine(client, url, "podman")

    podman = shutil.which("podman")
    if podman and start:
        sock.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(sock.parent, 0o700)
        sock.unlink(missing_ok=True)
        log = Path(state_dir) / "podman-service.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        argv = [podman, *podman_global_options(), "system", "service", "--time=0", url]
        try:
            service = ManagedProcess("podman service", argv, ready=lambda: _answers(url), log_path=log,
                                     timeout_s=60)
        except ServiceStartError as error:
            tried.append(f"podman system service did not start ({error}; see {log})")
        else:
            client = _client(url, timeout)
            return ContainerEngine(client, url, "podman", service, notes=[" ".join(argv)])
    elif not podman:
        tried.append("podman is not on PATH (scripts/setup.sh installs it from Debian)")

    for docker_url in filter(None, [os.environ.get("DOCKER_HOST"), "unix:///var/run/docker.sock"]):
        if docker_url.startswith("unix://") and not Path(docker_url[len("unix://"):]).exists():
            tried.append(f"no socket at {docker_url}")
            continue
        if _answers(docker_url):
            client = _client(docker_url, timeout)
            return ContainerEngine(client, docker_url, _kind(client))
        tried.append(f"{docker_url} does not answer")
    raise EngineUnavailable("no container engine: " + "; ".join(tried))


def engine_at(url: str, *, timeout: int = 900) -> ContainerEngine:
    """The engine that answers at ``url`` now (the one a stack started and hands to its API), started by someone
    else: closing it stops nothing. :class:`EngineUnavailable` when nothing answers there."""
    if not _answers(url):
        raise EngineUnavailable(f"no container engine answers at {url}")
    client = _client(url, timeout)
    return ContainerEngine(client, url, _kind(client))


def podman_version() -> str | None:
    podman = shutil.which("podman")
    if not podman:
        return None
    done = subprocess.run([podman, "--version"], capture_output=True, text=True)
    return done.stdout.strip() or None
