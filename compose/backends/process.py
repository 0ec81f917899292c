"""Where a study CVM runs: the backend interface and the embedded backend, a local process on SIMULATED TDX.

DESIGN.md §6 step 3. The interface is small so that docker/podman or a real dstack VMM can stand behind it::

    class Backend(Protocol):
        isolation: Isolation                                                    # what the run is shielded from
        simulated: bool                                                         # True: SIMULATED TDX platform
        def launch(self, run_dir, app_compose_path, sealed_files) -> RunHandle  # returns once the CVM has booted
    class RunHandle(Protocol):
        result_path: Path                      # attestation.json, once done
        def poll(self) -> RunStatus            # running | signing | done | failed(reason); epochs_done, if known
        def stop(self) -> None                 # ends the run and its CVM; safe to call twice

``LocalProcessBackend`` boots the SIMULATED guest agent for the exact app-compose.json (it measures the recipe
into RTMR3 and obtains the app key from the KMS by attestation), then runs ``python -m cvm.run`` against it.

With bubblewrap (``bwrap``, Debian package ``bubblewrap``) on PATH the study runs sandboxed:

- file system: the root read-only; private /tmp and /run; the folders named ``hidden`` (the stack's state:
  KMS state, keystores, the simulated TDX platform key, other runs) covered by empty tmpfs; the sealed inputs
  read-only; writable only the run's ``work/`` folder, its cwd;
- network: its own namespace, loopback only. The run reaches the KMS and the chain RPC on their usual loopback
  ports through a forwarder that starts first inside the sandbox and relays each port to a Unix socket the
  backend serves from outside; the guest agent is a Unix socket too. Nothing else is reachable, not even
  other loopback services of this machine;
- its own user (uid 65534, no capabilities) and PID, IPC, UTS namespaces; it dies with the backend process.

Without bwrap the run is NOT isolated — same user, file system and network as the API — and ``isolation``
says so in those words; there is no silent fallback. This code never installs anything.

A run folder holds ``work/`` (cwd; the receipt is written there), ``agent.log`` and ``run.log``. The Unix
sockets live in a short private folder under the system temp dir (an AF_UNIX path is at most 107 bytes, which a
deep run folder exceeds), removed when the run stops: ``run/`` (what the run may connect to) and ``host/`` (the
agent's own socket, hidden from the run). The run is seen to be
``signing`` when it calls the agent's ``Sign`` (the backend relays the agent socket and watches for it).

Run ``python -m compose.backends --workdir DIR [--forward 127.0.0.1:PORT=SOCKET …] -- COMMAND …`` is the
launcher the backend starts in the run's place: it opens the forwards, then runs COMMAND in DIR with a
minimal environment and exits with its code.

Errors::

    BackendError
    └── LaunchFailed(reason)   the CVM did not boot (e.g. the KMS refused the app key) or the run did not start

Caller mistakes (a KMS or chain URL that is not plain http on loopback) raise ``ValueError``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol
from urllib.parse import urlsplit

from compose.backends.launcher import ManagedProcess, ServiceStartError
from cvm.labels import EPOCH_PROGRESS

__all__ = [
    "RunState",
    "TERMINAL_STATES",
    "RunStatus",
    "Isolation",
    "RunHandle",
    "Backend",
    "BackendError",
    "LaunchFailed",
    "boot_simulated_agent",
    "bwrap_command",
    "epochs_done",
    "LocalProcessBackend",
    "LocalRun",
    "main",
]

RunState = Literal["queued", "booting", "running", "signing", "done", "failed"]
TERMINAL_STATES: frozenset[str] = frozenset({"done", "failed"})
RESULT_FILE = "attestation.json"
SANDBOX_UID = 65534                   # "nobody": the run owns nothing outside its work folder
# The only variables the study sees; the backend sets the last four for each run.
_PASSED_ENV = ("PATH", "LANG", "LC_ALL", "HOME", "DSTACK_SIMULATOR_ENDPOINT", "PYTHONPATH", "PYTHONDONTWRITEBYTECODE")
_PROJECT_ROOT = Path(__file__).resolve().parents[2]


class BackendError(Exception):
    """Base of this module's outcomes."""


class LaunchFailed(BackendError):
    """The CVM did not boot, or the study process did not start; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class RunStatus:
    state: RunState
    reason: str | None = None
    epochs_done: int | None = None     # DP-SGD: epochs the study reported finished (its log's last progress line)


@dataclass(frozen=True)
class Isolation:
    """What a backend's runs are shielded from, in words meant for the run record."""

    isolated: bool
    description: str


class RunHandle(Protocol):
    result_path: Path

    def poll(self) -> RunStatus: ...

    def stop(self) -> None: ...


class Backend(Protocol):
    isolation: Isolation
    simulated: bool          # True when the CVM's TDX platform is SIMULATED

    def launch(self, run_dir: Path, app_compose_path: Path, sealed_files: Sequence[Path]) -> RunHandle: ...


# --- the SIMULATED guest agent ----------------------------------------------------------------------------------

def boot_simulated_agent(app_compose: Path, *, app_id: str, kms_url: str, socket_path: Path,
                         simulated_tdx_dir: Path, log_path: Path, name: str = "simulated CVM") -> ManagedProcess:
    """Boot a SIMULATED CVM's guest agent for one app-compose.json and return once it serves on ``socket_path``.

    The agent (``python -m cvm.agent_sim``) measures app-id, compose-hash, instance-id and key-provider into the
    simulated RTMR3 and obtains the app key from the KMS by attestation (DESIGN.md §5); a KMS refusal makes it
    exit, raising :class:`~compose.backends.launcher.ServiceStartError` with the agent's ``error:`` line.
    """
    socket_path.unlink(missing_ok=True)

    def answers() -> bool:
        with socket.socket(socket.AF_UNIX) as probe:
            try:
                probe.connect(str(socket_path))
            except OSError:
                return False
        return True

    return ManagedProcess(
        name,
        [sys.executable, "-m", "cvm.agent_sim", "--app-compose", str(app_compose), "--app-id", app_id,
         "--socket", str(socket_path), "--state-dir", str(simulated_tdx_dir), "--kms-url", kms_url],
        ready=answers, log_path=log_path,
    )


# --- socket relays ----------------------------------------------------------------------------------------------

def _pipe(source: socket.socket, sink: socket.socket, observe: Callable[[bytes], None] | None) -> None:
    try:
        while chunk := source.recv(65536):
            if observe is not None:
                observe(chunk)
            sink.sendall(chunk)
    except OSError:
        pass       # a side went away; the other learns it from the shutdown below
    finally:
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)


def _relay(client: socket.socket, upstream: socket.socket, observe: Callable[[bytes], None] | None) -> None:
    with client, upstream:
        replies = threading.Thread(target=_pipe, args=(upstream, client, None), daemon=True)
        replies.start()
        _pipe(client, upstream, observe)
        replies.join()


class _Forwarder:
    """Accepts connections on ``listener`` and relays each, both ways, to a fresh ``connect()``.

    ``observe`` sees the bytes going upstream (requests), for progress only: it cannot change them.
    """

    def __init__(self, listener: socket.socket, connect: Callable[[], socket.socket], *,
                 observe: Callable[[bytes], None] | None = None) -> None:
        self._listener = listener
        self._connect = connect
        self._observe = observe
        self._closed = threading.Event()
        listener.settimeout(0.2)      # so that close() is noticed without relying on platform quirks
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            try:
                upstream = self._connect()
            except OSError:
                client.close()        # the caller sees a closed connection, as if the service were down
                continue
            threading.Thread(target=_relay, args=(client, upstream, self._observe), daemon=True).start()

    def close(self) -> None:
        self._closed.set()
        self._thread.join()
        self._listener.close()


def _unix_listener(path: Path) -> socket.socket:
    path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    os.chmod(path, 0o600)
    listener.listen()
    return listener


def _unix_connector(path: Path) -> Callable[[], socket.socket]:
    def connect() -> socket.socket:
        conn = socket.socket(socket.AF_UNIX)
        try:
            conn.connect(str(path))
        except OSError:
            conn.close()
            raise
        return conn
    return connect


def _tcp_connector(host: str, port: int) -> Callable[[], socket.socket]:
    def connect() -> socket.socket:
        conn = socket.create_connection((host, port), timeout=10)
        conn.settimeout(None)
        return conn
    return connect


def _loopback_port(url: str, what: str) -> tuple[str, int]:
    parts = urlsplit(url)
    # 127.0.0.1 exactly: inside the sandbox the forwarder listens there, and "localhost" may resolve to ::1.
    if parts.scheme != "http" or parts.hostname != "127.0.0.1" or parts.port is None:
        raise ValueError(f"the local backend needs the {what} at http://127.0.0.1:PORT, got {url!r}")
    return parts.hostname, parts.port


# --- the sandbox ------------------------------------------------------------------------------------------------

def _runtime_paths() -> list[Path]:
    """What the study needs to read to start at all: this project and the Python installation."""
    return sorted({path.resolve() for path in (_PROJECT_ROOT, Path(sys.prefix), Path(sys.base_prefix))})


def bwrap_command(bwrap: str, argv: Sequence[str], *, workdir: Path, read_only: Sequence[Path] = (),
                  hidden: Sequence[Path] = ()) -> list[str]:
    """The bubblewrap command line that runs ``argv`` in the study sandbox described in the module docstring.

    Mount order matters (later mounts cover earlier ones): read-only root, private /tmp and /run, the
    project and Python back on top (in case they live under /tmp), then the ``hidden`` folders as empty
    tmpfs, then ``read_only`` paths and the writable ``workdir`` bound back in at their own paths.
    """
    command = [bwrap, "--die-with-parent", "--new-session", "--unshare-all", "--unshare-user",
               "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID), "--cap-drop", "ALL",
               "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp", "--tmpfs", "/run"]
    for path in _runtime_paths():
        command += ["--ro-bind", str(path), str(path)]
    # Shallowest first, so that a hidden folder inside another hidden folder stays hidden.
    for path in sorted({Path(p).resolve() for p in hidden}, key=lambda p: len(p.parts)):
        command += ["--tmpfs", str(path)]
    for path in read_only:
        resolved = Path(path).resolve()
        command += ["--ro-bind", str(resolved), str(resolved)]
    workdir = Path(workdir).resolve()
    return [*command, "--bind", str(workdir), str(workdir), "--chdir", str(workdir), "--", *argv]


def _launcher(workdir: Path, forwards: Sequence[tuple[int, Path]], command: Sequence[str]) -> list[str]:
    argv = [sys.executable, "-m", "compose.backends", "--workdir", str(workdir)]
    for port, path in forwards:
        argv += ["--forward", f"127.0.0.1:{port}={path}"]
    return [*argv, "--", *command]


def _last_error(log_path: Path) -> str | None:
    """The run's last ``error:`` line (cvm.run prints its refusal that way), else its last line."""
    if not log_path.exists():
        return None
    lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines or [None])[-1]


def epochs_done(log_path: Path, tail_bytes: int = 8192) -> int | None:
    """The epochs the study reported finished: its log's last ``progress: epoch DONE/EPOCHS`` line (cvm.run prints
    one per epoch), else None. Only the log's tail is read."""
    try:
        with log_path.open("rb") as log:
            log.seek(max(0, log.seek(0, os.SEEK_END) - tail_bytes))
            tail = log.read().decode("utf-8", "replace")
    except OSError:
        return None
    for line in reversed(tail.splitlines()):
        if line.startswith(EPOCH_PROGRESS + " "):
            done, _, _ = line.removeprefix(EPOCH_PROGRESS + " ").partition("/")
            return int(done) if done.strip().isdigit() else None
    return None


def boot_watched_agent(undo: contextlib.ExitStack, app_compose: Path, *, run_dir: Path, host: Path, app_id: str,
                       kms_url: str, simulated_tdx_dir: Path | None,
                       ) -> tuple[ManagedProcess, threading.Event, Callable[[bytes], None]]:
    """Boot a run's SIMULATED guest agent on ``host/agent.sock`` (stopped when ``undo`` unwinds), with the watch
    that the relay in front of it calls on each request: the returned event is set once the run calls ``Sign``.
    Both backends launch a run this way. Raises LaunchFailed when the CVM does not boot."""
    signing = threading.Event()

    def watch_for_sign(request_bytes: bytes) -> None:
        # dstack-sdk calls the agent's Sign RPC as `POST /Sign`; the run signs its envelope only at the end.
        if b"POST /Sign " in request_bytes:
            signing.set()

    try:
        agent = boot_simulated_agent(app_compose, app_id=app_id, kms_url=kms_url, socket_path=host / "agent.sock",
                                     simulated_tdx_dir=simulated_tdx_dir, log_path=run_dir / "agent.log")
    except ServiceStartError as failure:
        raise LaunchFailed(f"the CVM did not boot: {failure}") from None
    undo.callback(agent.stop)
    return agent, signing, watch_for_sign


class LocalRun:
    """One study run started by :class:`LocalProcessBackend`: the agent, the study process and the relays."""

    def __init__(self, *, agent: ManagedProcess, study: ManagedProcess, forwarders: list[_Forwarder],
                 signing: threading.Event, result_path: Path, log_path: Path, socket_dir: Path) -> None:
        self._socket_dir = socket_dir
        self._agent = agent
        self._study = study
        self._forwarders = forwarders
        self._signing = signing
        self.result_path = result_path
        self.log_path = log_path

    @property
    def agent_endpoint(self) -> Path:
        """The guest-agent socket as the run sees it (DSTACK_SIMULATOR_ENDPOINT)."""
        return self._socket_dir / "run" / "agent.sock"

    @property
    def signing_seen(self) -> bool:
        """Whether the run has called the guest agent's Sign (it signs its result envelope last)."""
        return self._signing.is_set()

    def poll(self) -> RunStatus:
        code = self._study.process.poll()
        if code is None:
            return RunStatus("signing" if self._signing.is_set() else "running", epochs_done=epochs_done(self.log_path))
        if code == 0 and self.result_path.exists():
            return RunStatus("done", epochs_done=epochs_done(self.log_path))
        return RunStatus("failed", _last_error(self.log_path) or f"the study exited with code {code}")

    def stop(self) -> None:
        self._study.stop()
        self._agent.stop()
        for forwarder in self._forwarders:
            forwarder.close()
        self._forwarders = []
        shutil.rmtree(self._socket_dir, ignore_errors=True)


class LocalProcessBackend:
    """Runs studies as local processes on the SIMULATED TDX platform, under bubblewrap when ``bwrap`` is given.

    ``bwrap`` is the path of the bwrap binary, or None to run NOT isolated (callers usually pass
    ``shutil.which("bwrap")``). ``hidden`` are folders the sandboxed run must not see (the stack's state).
    The KMS and the chain RPC must be plain http on loopback (the local stack's).
    """

    simulated = True

    def __init__(self, *, app_id: str, kms_url: str, rpc_url: str, dstack_kms: str, simulated_tdx_dir: Path,
                 bwrap: str | None, hidden: Sequence[Path] = ()) -> None:
        self.app_id = app_id
        self.kms_url = kms_url
        self.rpc_url = rpc_url
        self.dstack_kms = dstack_kms
        self.simulated_tdx_dir = Path(simulated_tdx_dir)
        self.bwrap = bwrap
        self.hidden = [Path(p) for p in hidden]
        self._upstreams = {"kms": _loopback_port(kms_url, "KMS"), "rpc": _loopback_port(rpc_url, "chain RPC")}
        if bwrap:
            self.isolation = Isolation(True, (
                "bubblewrap sandbox: read-only root, private /tmp and /run, the stack's state hidden, writable "
                "work folder only; own network namespace reaching only the guest agent, the KMS and the chain "
                f"RPC; uid {SANDBOX_UID} without capabilities; own PID, IPC and UTS namespaces"))
        else:
            self.isolation = Isolation(False, (
                "NOT ISOLATED: bwrap (Debian package bubblewrap) was not found, so the study runs as this user "
                "with the API's full file system and network access"))

    def launch(self, run_dir: Path, app_compose_path: Path, sealed_files: Sequence[Path]) -> LocalRun:
        """Boot the SIMULATED CVM for ``app_compose_path`` and start the study on ``sealed_files``.

        Returns once the agent serves (it holds the app key, so the KMS accepted the recipe at boot);
        raises :class:`LaunchFailed` with the agent's or the launcher's reason otherwise.
        """
        run_dir = Path(run_dir).resolve()
        socket_dir = Path(tempfile.mkdtemp(prefix="sealroom-"))
        work, sockets, host = run_dir / "work", socket_dir / "run", socket_dir / "host"
        for folder in (work, sockets, host):
            folder.mkdir(parents=True, exist_ok=True)
        sealed = [Path(p).resolve() for p in sealed_files]
        with contextlib.ExitStack() as undo:          # unwinds only if the launch fails half way
            undo.callback(shutil.rmtree, socket_dir, ignore_errors=True)
            agent, signing, watch_for_sign = boot_watched_agent(
                undo, Path(app_compose_path), run_dir=run_dir, host=host, app_id=self.app_id, kms_url=self.kms_url,
                simulated_tdx_dir=self.simulated_tdx_dir)
            relays = [(sockets / "agent.sock", _unix_connector(host / "agent.sock"), watch_for_sign)]
            if self.bwrap:
                relays += [(sockets / f"{name}.sock", _tcp_connector(*address), None)
                           for name, address in self._upstreams.items()]
            forwarders = []
            for path, connect, observe in relays:
                forwarders.append(_Forwarder(_unix_listener(path), connect, observe=observe))
                undo.callback(forwarders[-1].close)

            result_path = work / RESULT_FILE
            study = [sys.executable, "-m", "cvm.run", "--sealed", *map(str, sealed), "--kms-url", self.kms_url,
                     "--rpc-url", self.rpc_url, "--dstack-kms", self.dstack_kms, "--out", str(result_path)]
            inner_forwards = [(port, sockets / f"{name}.sock") for name, (_, port) in self._upstreams.items()]
            argv = _launcher(work, inner_forwards if self.bwrap else [], study)
            if self.bwrap:
                argv = bwrap_command(self.bwrap, argv, workdir=work, read_only=[*sealed, sockets],
                                     hidden=[*self.hidden, run_dir])
            env = {"HOME": str(work), "DSTACK_SIMULATOR_ENDPOINT": str(sockets / "agent.sock"),
                   "PYTHONPATH": str(_PROJECT_ROOT), "PYTHONDONTWRITEBYTECODE": "1"}
            try:
                process = ManagedProcess("study run", argv, ready=lambda: True, log_path=run_dir / "run.log",
                                         env=env)
            except ServiceStartError as failure:
                raise LaunchFailed(f"the study did not start: {failure}") from None
            undo.pop_all()
        return LocalRun(agent=agent, study=process, forwarders=forwarders, signing=signing,
                        result_path=result_path, log_path=run_dir / "run.log", socket_dir=socket_dir)


# --- the launcher (runs in the study's place, inside the sandbox when there is one) -----------------------------

def _parse_forward(text: str) -> tuple[int, Path]:
    address, _, path = text.partition("=")
    host, _, port = address.rpartition(":")
    if host != "127.0.0.1" or not port.isdigit() or not path:
        raise argparse.ArgumentTypeError(f"--forward wants 127.0.0.1:PORT=SOCKET, got {text!r}")
    return int(port), Path(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m compose.backends", description="Run a study command with "
                                     "loopback ports forwarded to Unix sockets, in DIR, with a minimal environment.")
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--forward", type=_parse_forward, action="append", default=[])
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command after --")
    forwarders = [_Forwarder(socket.create_server(("127.0.0.1", port)), _unix_connector(path))
                  for port, path in args.forward]
    env = {key: os.environ[key] for key in _PASSED_ENV if key in os.environ}
    try:
        return subprocess.run(command, cwd=args.workdir, env=env, check=False).returncode
    finally:
        for forwarder in forwarders:
            forwarder.close()


if __name__ == "__main__":
    sys.exit(main())
