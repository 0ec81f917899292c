"""The container backend: each study run in a container of the pinned study image, on SIMULATED TDX.

Same interface as :class:`~compose.backends.process.LocalProcessBackend` (``Backend``: ``isolation``,
``simulated``, ``launch(run_dir, app_compose_path, sealed_files) -> RunHandle``), driven through the ``docker``
Python SDK against a Docker-compatible engine (podman's ``system service``; see :mod:`compose.backends.engine`).

What a run gets:

- the image the compose names, and only if :func:`compose.image.image_allowed` accepts it against the study
  image built in ``image_dir`` (``seal image build``): the OCI layout there is checked (its manifest hashes to the
  pinned digest), loaded into the engine when missing, and run by its image id (the config digest the manifest
  names, which commits to every layer);
- the SIMULATED guest agent, booted on the host for the exact app-compose.json as for the process backend, its
  socket relayed to ``/var/run/dstack.sock`` in the container (dstack-sdk's default endpoint, no
  ``DSTACK_SIMULATOR_ENDPOINT``); the relay watches for ``Sign`` to report ``signing``;
- no network (``network_mode=none``: loopback only). The KMS and the chain RPC are reached on their usual
  loopback ports through ``python -m compose.backends.inside``, which relays each to a Unix socket that this
  backend serves from outside (the forwarder of ``process.py``) — the same relays as the bubblewrap sandbox;
- a read-only root file system; writable only tmpfs scratch (``/tmp``, the run's cwd ``/tmp/work``, and the
  engine's own ``/var/tmp``, ``/run``, ``/dev/shm``), all in memory and counted against the memory limit;
  the sealed inputs (ciphertext) bound read-only, from copies in ``RUN/inputs`` that the container's user may
  read (removed by ``stop()``). No host folder is mounted writable: the receipt leaves through the
  ``outbox`` socket (the in-container launcher sends ``attestation.json`` once the run exited 0), and this
  backend writes it to ``RUN/work/attestation.json``;
- uid 10001, every capability dropped, ``no-new-privileges``, CPU, memory, PID and file-descriptor limits;
- its output (stdout and stderr) streamed to ``RUN/run.log``, the agent's to ``RUN/agent.log``; the container
  is removed by ``stop()``, its logs stay with the run.

Errors are the process backend's: :class:`~compose.backends.process.LaunchFailed` with the reason.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import resource
import shutil
import socket
import tempfile
import threading
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path

from compose.backends.engine import ContainerEngine
from compose.backends.launcher import ManagedProcess
from compose.backends.process import (
    RESULT_FILE,
    Isolation,
    LaunchFailed,
    RunStatus,
    _Forwarder,
    _last_error,
    _loopback_port,
    _tcp_connector,
    _unix_connector,
    _unix_listener,
    boot_watched_agent,
    epochs_done,
)
from compose.image.build import BUILD_RECORD, oci_archive
from compose.image.policy import compose_images, image_allowed, read_build_record

__all__ = ["ContainerBackend", "ContainerRun", "CONTAINER_UID", "AGENT_SOCKET", "RELAY_DIR", "SCRATCH"]

CONTAINER_UID = 10001                 # the study image's user
AGENT_SOCKET = "/var/run/dstack.sock"
RELAY_DIR = "/run/sealroom"           # kms.sock, rpc.sock, outbox.sock (read-only bind of the backend's folder)
SCRATCH = "/tmp"
WORKDIR = "/tmp/work"
SEALED_DIR = "/sealed"
DEFAULT_COMMAND = ["python", "-m", "cvm.run"]
MAX_RESULT_BYTES = 256 * 1024 * 1024


class _Outbox:
    """Receives the run's one delivery (its receipt) on a Unix socket and writes it to ``target``."""

    def __init__(self, listener: socket.socket, target: Path) -> None:
        self._listener = listener
        self._target = target
        self.error: str | None = None
        self.done = threading.Event()
        listener.settimeout(0.2)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(60)
                received, size = [], 0
                try:
                    while chunk := conn.recv(1 << 20):
                        size += len(chunk)
                        if size > MAX_RESULT_BYTES:
                            self.error = f"the run delivered more than {MAX_RESULT_BYTES} bytes"
                            break
                        received.append(chunk)
                except OSError as error:
                    self.error = f"the delivery broke off: {error}"
                if self.error is None:
                    partial = self._target.with_suffix(".part")
                    partial.write_bytes(b"".join(received))
                    partial.replace(self._target)
            self.done.set()
            return       # one delivery per run

    def wait(self, seconds: float) -> bool:
        return self.done.wait(seconds)

    def close(self) -> None:
        self._closed.set()
        self._thread.join()
        self._listener.close()


class ContainerRun:
    """One study run started by :class:`ContainerBackend`: the container, the agent, the relays and the log."""

    def __init__(self, *, container, agent: ManagedProcess, forwarders: list[_Forwarder], outbox: _Outbox,
                 signing: threading.Event, result_path: Path, log_path: Path, socket_dir: Path,
                 memory: str, staged: Path) -> None:
        self.container = container
        self._agent = agent
        self._forwarders = forwarders
        self._outbox = outbox
        self._signing = signing
        self._socket_dir = socket_dir
        self._memory = memory
        self._staged = staged
        self.result_path = result_path
        self.log_path = log_path
        self._stopped = False
        self._logger = threading.Thread(target=self._follow_logs, daemon=True)
        self._logger.start()

    def _follow_logs(self) -> None:
        with contextlib.suppress(Exception), open(self.log_path, "ab") as log:
            for chunk in self.container.logs(stream=True, follow=True, stdout=True, stderr=True):
                log.write(chunk)
                log.flush()

    @property
    def signing_seen(self) -> bool:
        return self._signing.is_set()

    def poll(self) -> RunStatus:
        try:
            self.container.reload()
        except Exception as error:   # noqa: BLE001 - the engine's errors are many; all mean "gone"
            return RunStatus("failed", f"the container is gone: {error}")
        state = self.container.attrs.get("State", {})
        status = state.get("Status")
        if status in ("created", "configured", "running", "paused", "restarting"):
            return RunStatus("signing" if self._signing.is_set() else "running", epochs_done=epochs_done(self.log_path))
        code = state.get("ExitCode")
        self._outbox.wait(5 if code == 0 else 0)
        self._logger.join(timeout=5)
        if code == 0 and self.result_path.exists():
            return RunStatus("done")
        if state.get("OOMKilled"):
            return RunStatus("failed", f"the study ran out of memory (limit {self._memory})")
        if self._outbox.error:
            return RunStatus("failed", self._outbox.error)
        return RunStatus("failed", _last_error(self.log_path) or f"the study exited with code {code}")

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        with contextlib.suppress(Exception):
            self.container.stop(timeout=5)
        self._logger.join(timeout=10)
        with contextlib.suppress(Exception):
            self.container.remove(force=True)
        self._agent.stop()
        for forwarder in self._forwarders:
            forwarder.close()
        self._forwarders = []
        self._outbox.close()
        shutil.rmtree(self._socket_dir, ignore_errors=True)
        shutil.rmtree(self._staged, ignore_errors=True)


def _socket_for_container(path: Path) -> None:
    # The container's user is not this one; the folder above (mkdtemp, 0700) keeps everyone else out.
    os.chmod(path, 0o666)


class ContainerBackend:
    """Runs studies in containers of the pinned study image on the SIMULATED TDX platform (module docstring).

    ``engine`` comes from :func:`compose.backends.engine.connect_engine`; ``image_dir`` is the folder
    ``seal image build`` wrote (``STATE/study-image``). The KMS and the chain RPC must be plain http on loopback.
    ``allowed_digests`` overrides the allowlist (default: the digest of the image built in ``image_dir``).
    """

    simulated = True

    def __init__(self, *, engine: ContainerEngine, image_dir: Path, app_id: str, kms_url: str, rpc_url: str,
                 dstack_kms: str, simulated_tdx_dir: Path, cpus: float = 2.0, memory: str = "4g",
                 scratch: str = "2g", pids: int = 512, allowed_digests: Iterable[str] | None = None) -> None:
        self.engine = engine
        self.image_dir = Path(image_dir)
        self.app_id = app_id
        self.kms_url = kms_url
        self.rpc_url = rpc_url
        self.dstack_kms = dstack_kms
        self.simulated_tdx_dir = Path(simulated_tdx_dir)
        self.cpus, self.memory, self.scratch, self.pids = cpus, memory, scratch, pids
        self.allowed_digests = None if allowed_digests is None else list(allowed_digests)
        self._upstreams = {"kms": _loopback_port(kms_url, "KMS"), "rpc": _loopback_port(rpc_url, "chain RPC")}
        self.isolation = Isolation(True, (
            f"container ({engine.kind}) of the pinned study image: read-only root, tmpfs scratch only, no host "
            "folder writable; no network (loopback only), reaching only the guest agent at /var/run/dstack.sock, "
            f"the KMS and the chain RPC through relays; uid {CONTAINER_UID}, no capabilities, no-new-privileges; "
            f"{cpus:g} CPUs, {memory} memory, {pids} PIDs"))

    # --- the image --------------------------------------------------------------------------------------------

    def _allowed(self) -> list[str]:
        if self.allowed_digests is not None:
            return self.allowed_digests
        try:
            return [read_build_record(self.image_dir)["digest"]]
        except Exception:   # noqa: BLE001 - no record: nothing is allowed, and image_allowed says so
            return []

    def ensure_image(self, digest: str) -> str:
        """The engine's image id for the study image ``digest``, loading it from ``image_dir`` when missing."""
        layout = self.image_dir / "oci"
        manifest_path = layout / "blobs" / "sha256" / digest.split(":", 1)[1]
        try:
            manifest_bytes = manifest_path.read_bytes()
        except OSError:
            raise LaunchFailed(f"the study image {digest} is not built in {self.image_dir} (see its "
                               f"{BUILD_RECORD}; run `seal image build`)") from None
        if "sha256:" + hashlib.sha256(manifest_bytes).hexdigest() != digest:
            raise LaunchFailed(f"the image layout in {layout} is corrupt: its manifest does not hash to {digest}")
        image_id = json.loads(manifest_bytes)["config"]["digest"]
        images = self.engine.client.images      # type: ignore[attr-defined]
        try:
            return images.get(image_id).id
        except Exception:   # noqa: BLE001 - docker.errors.ImageNotFound, or the engine's variant of it
            pass
        try:
            images.load(oci_archive(layout))
            loaded = images.get(image_id)
        except Exception as error:   # noqa: BLE001
            raise LaunchFailed(f"the engine could not load the study image {digest}: {error}") from None
        if loaded.id != image_id:
            raise LaunchFailed(f"the engine loaded image {loaded.id}, expected {image_id}")
        return loaded.id

    # --- a run ------------------------------------------------------------------------------------------------

    def _study_command(self, app_compose: bytes) -> tuple[str, list[str]]:
        images = compose_images(app_compose)
        if len(images) != 1:
            raise LaunchFailed("the container backend runs composes with exactly one service")
        reason = image_allowed(app_compose, allowed=self._allowed())
        if reason is not None:
            raise LaunchFailed(f"the compose's image is refused: {reason}")
        document = json.loads(app_compose)
        import yaml

        (service,) = (yaml.safe_load(document["docker_compose_file"])["services"]).values()
        command = service.get("command", DEFAULT_COMMAND)
        if not isinstance(command, list) or not all(isinstance(part, str) for part in command) or not command:
            raise LaunchFailed("the study service's command must be a list of strings")
        return images[0][1].split("@", 1)[1], command

    def launch(self, run_dir: Path, app_compose_path: Path, sealed_files: Sequence[Path]) -> ContainerRun:
        """Boot the SIMULATED CVM for ``app_compose_path`` and start the study container on ``sealed_files``."""
        from docker.types import Mount, Ulimit

        run_dir = Path(run_dir).resolve()
        app_compose = Path(app_compose_path).read_bytes()
        digest, study_command = self._study_command(app_compose)
        image_id = self.ensure_image(digest)
        work = run_dir / "work"
        work.mkdir(parents=True, exist_ok=True)
        sealed = [Path(p).resolve() for p in sealed_files]
        socket_dir = Path(tempfile.mkdtemp(prefix="sealroom-"))
        relays, host = socket_dir / "run", socket_dir / "host"
        relays.mkdir()
        host.mkdir()
        os.chmod(relays, 0o711)
        with contextlib.ExitStack() as undo:          # unwinds only if the launch fails half way
            undo.callback(shutil.rmtree, socket_dir, ignore_errors=True)
            agent, signing, watch_for_sign = boot_watched_agent(
                undo, Path(app_compose_path), run_dir=run_dir, host=host, app_id=self.app_id, kms_url=self.kms_url,
                simulated_tdx_dir=self.simulated_tdx_dir)
            forwarders = []
            for name, connect, observe in [("agent", _unix_connector(host / "agent.sock"), watch_for_sign),
                                           *((n, _tcp_connector(*a), None) for n, a in self._upstreams.items())]:
                listener = _unix_listener(relays / f"{name}.sock")
                _socket_for_container(relays / f"{name}.sock")
                forwarders.append(_Forwarder(listener, connect, observe=observe))
                undo.callback(forwarders[-1].close)
            result_path = work / RESULT_FILE
            outbox = _Outbox(_unix_listener(relays / "outbox.sock"), result_path)
            _socket_for_container(relays / "outbox.sock")
            undo.callback(outbox.close)

            inside_sealed = [f"{SEALED_DIR}/{index}-{path.name}" for index, path in enumerate(sealed)]
            inside_result = f"{WORKDIR}/{RESULT_FILE}"
            command = ["python", "-m", "compose.backends.inside", "--workdir", WORKDIR]
            for name, (_, port) in self._upstreams.items():
                command += ["--forward", f"127.0.0.1:{port}={RELAY_DIR}/{name}.sock"]
            command += ["--deliver", f"{inside_result}={RELAY_DIR}/outbox.sock", "--",
                        *study_command, "--sealed", *inside_sealed, "--kms-url", self.kms_url,
                        "--rpc-url", self.rpc_url, "--dstack-kms", self.dstack_kms, "--out", inside_result]
            mounts = [Mount(AGENT_SOCKET, str(relays / "agent.sock"), type="bind", read_only=True),
                      Mount(RELAY_DIR, str(relays), type="bind", read_only=True)]
            # The container's user is not the owner of the caller's files: it reads read-only copies (ciphertext).
            staged = run_dir / "inputs"
            staged.mkdir(exist_ok=True)
            undo.callback(shutil.rmtree, staged, ignore_errors=True)
            for inside, path in zip(inside_sealed, sealed):
                copy = staged / inside.rsplit("/", 1)[1]
                shutil.copyfile(path, copy)
                os.chmod(copy, 0o444)
                mounts.append(Mount(inside, str(copy), type="bind", read_only=True))
            nofile = min(4096, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
            try:
                container = self.engine.client.containers.run(   # type: ignore[attr-defined]
                    image_id, command, detach=True, name=f"sealroom-run-{uuid.uuid4().hex[:12]}",
                    user=f"{CONTAINER_UID}:{CONTAINER_UID}", working_dir=SCRATCH, network_mode="none",
                    read_only=True, tmpfs={SCRATCH: f"rw,nosuid,nodev,size={self.scratch},mode=1777"},
                    mounts=mounts, cap_drop=["ALL"], security_opt=["no-new-privileges"],
                    nano_cpus=int(self.cpus * 1e9), mem_limit=self.memory, memswap_limit=self.memory,
                    pids_limit=self.pids, shm_size="64m",
                    ulimits=[Ulimit(name="nofile", soft=nofile, hard=nofile),
                             Ulimit(name="nproc", soft=self.pids, hard=self.pids)],
                    labels={"org.sealroom.run": run_dir.name, "org.sealroom.image": digest})
            except Exception as error:   # noqa: BLE001 - docker.errors.APIError and friends
                raise LaunchFailed(f"the study container did not start: {error}") from None
            undo.pop_all()
        return ContainerRun(container=container, agent=agent, forwarders=forwarders, outbox=outbox,
                            signing=signing, result_path=result_path, log_path=run_dir / "run.log",
                            socket_dir=socket_dir, memory=self.memory, staged=staged)
