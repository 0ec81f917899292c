"""The container backend's entry point inside the study container (``python -m compose.backends.inside``).

    python -m compose.backends.inside --workdir /tmp/work --forward 127.0.0.1:PORT=SOCKET … \\
        --deliver /tmp/work/attestation.json=SOCKET -- python -m cvm.run …

Like ``python -m compose.backends`` (``process.main``), it opens a loopback listener for each ``--forward`` and
relays it to a Unix socket the backend serves from outside (the container has no network, only loopback), then
runs the command in WORKDIR (created in the container's tmpfs scratch). Then, when the command succeeded, it
sends the ``--deliver`` file — the receipt, the one thing a study run releases — over that Unix socket, and
waits for the backend to close it (the backend has written it by then). No host folder is mounted writable, so
this is the only way anything leaves the container besides the relayed KMS, chain and guest-agent calls.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from pathlib import Path

from compose.backends.process import _PASSED_ENV, _Forwarder, _parse_forward, _unix_connector

__all__ = ["main"]


def _parse_delivery(text: str) -> tuple[Path, Path]:
    source, _, target = text.partition("=")
    if not source or not target:
        raise argparse.ArgumentTypeError(f"--deliver wants FILE=SOCKET, got {text!r}")
    return Path(source), Path(target)


def deliver(source: Path, target: Path) -> None:
    """Send ``source``'s bytes over the Unix socket ``target`` and wait until the receiver closes it."""
    with socket.socket(socket.AF_UNIX) as conn, open(source, "rb") as stream:
        conn.connect(str(target))
        while chunk := stream.read(1 << 20):
            conn.sendall(chunk)
        conn.shutdown(socket.SHUT_WR)
        while conn.recv(4096):
            pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m compose.backends.inside")
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--forward", type=_parse_forward, action="append", default=[])
    parser.add_argument("--deliver", type=_parse_delivery)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command after --")
    args.workdir.mkdir(parents=True, exist_ok=True)
    forwarders = [_Forwarder(socket.create_server(("127.0.0.1", port)), _unix_connector(path))
                  for port, path in args.forward]
    env = {key: os.environ[key] for key in _PASSED_ENV if key in os.environ}
    try:
        code = subprocess.run(command, cwd=args.workdir, env=env, check=False).returncode
    finally:
        for forwarder in forwarders:
            forwarder.close()
    if code == 0 and args.deliver is not None:
        source, target = args.deliver
        if not source.is_file():
            print(f"error: the run exited 0 but wrote no {source}", file=sys.stderr, flush=True)
            return 1
        deliver(source, target)
    return code


if __name__ == "__main__":
    sys.exit(main())
