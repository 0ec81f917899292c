"""Run the SIMULATED dstack guest agent for one app::

    python -m cvm.agent_sim --app-compose app-compose.json --app-id 0x… --socket ./dstack.sock \\
        --state-dir .sealroom/agent-sim --kms-url http://127.0.0.1:8000 [--http-port 8090] \
        [--tappd-socket ./tappd.sock]

It measures the boot into the simulated RTMR3, obtains the app key from the KMS through a simulated
attestation, then serves dstack's agent API until SIGINT/SIGTERM. Point dstack-sdk at it with
``DSTACK_SIMULATOR_ENDPOINT=<socket>`` (and its legacy ``TappdClient`` with
``TAPPD_SIMULATOR_ENDPOINT=<tappd socket>``).

The KMS client is ``kms_client.make_key_provider(kms_url)`` (an :class:`AppKeyProvider`); a KMS refusal ends
the boot with exit code 3 and the KMS's reason.

Exit codes: 0 stopped by a signal; 2 bad arguments; 3 the boot failed (the KMS refused, or its grant did
not chain to the measured KMS root).
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
from pathlib import Path

from compose.safe_parse import restore_recursion_limit
from cvm.agent_sim.agent import AgentSimError, GuestAgentSimulator
from cvm.agent_sim.server import AgentServer
from kms_client import KmsError, make_key_provider

EXIT_USAGE = 2
EXIT_BOOT_FAILED = 3


def main(argv: list[str] | None = None) -> int:
    restore_recursion_limit()  # in case an import raised it (py_ecc does): deep input must fail, not crash
    args = _parser().parse_args(argv)
    try:
        app_compose = Path(args.app_compose).read_bytes()
        app_id = _app_id(args.app_id)
    except (OSError, ValueError) as bad:
        return _fail(str(bad), code=EXIT_USAGE)
    try:
        key_provider = make_key_provider(args.kms_url)
        agent = GuestAgentSimulator.boot(app_compose, app_id, key_provider, args.state_dir)
    except ValueError as bad:
        return _fail(str(bad), code=EXIT_USAGE)
    except (AgentSimError, KmsError) as failure:
        return _fail(f"boot failed: {failure}", code=EXIT_BOOT_FAILED)
    try:
        server = AgentServer(agent, args.socket, http_port=args.http_port)
        tappd = AgentServer(agent, args.tappd_socket, service="tappd") if args.tappd_socket else None
    except OSError as unavailable:
        return _fail(f"cannot listen: {unavailable}", code=EXIT_USAGE)
    stop = threading.Event()
    for signal_number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signal_number, lambda *_: stop.set())
    with server, (tappd if tappd is not None else contextlib.nullcontext()):
        where = f"unix:{args.socket}" + (f" and {server.http_url}" if server.http_url else "")
        where += f" (Tappd on unix:{args.tappd_socket})" if tappd is not None else ""
        print(
            f"SIMULATED dstack guest agent on {where}: app_id 0x{app_id.hex()}, "
            f"compose_hash {agent.compose_hash.hex()}",
            file=sys.stderr,
            flush=True,
        )
        stop.wait()
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cvm.agent_sim", description="SIMULATED dstack guest agent")
    parser.add_argument("--app-compose", required=True, help="app-compose.json, measured byte for byte")
    parser.add_argument("--app-id", required=True, help="the DstackApp contract address (0x + 40 hex)")
    parser.add_argument("--socket", required=True, help="Unix socket path to serve on (created 0600)")
    parser.add_argument("--state-dir", required=True, help="folder for the simulated TDX platform's keys")
    parser.add_argument("--kms-url", required=True, help="KMS base URL, handed to kms_client.make_key_provider")
    parser.add_argument("--http-port", type=int, default=None, help="also serve on 127.0.0.1:PORT")
    parser.add_argument("--tappd-socket", default=None, help="also serve the legacy Tappd API on this Unix socket")
    return parser


def _app_id(text: str) -> bytes:
    hex_digits = text[2:] if text.lower().startswith("0x") else text
    try:
        app_id = bytes.fromhex(hex_digits)
    except ValueError:
        raise ValueError(f"--app-id {text!r} is not hex") from None
    if len(app_id) != 20:
        raise ValueError(f"--app-id must be 20 bytes (an address), got {len(app_id)}")
    return app_id


def _fail(message: str, *, code: int, hint: str | None = None) -> int:
    print(f"error: {message}", file=sys.stderr)
    if hint:
        print(f"hint: {hint}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
