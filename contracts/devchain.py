"""A local development chain: anvil from the project's own npm toolchain, on a free loopback port.

Used by `seal up`, the demo and the test fixtures — always a real EVM node, never a mock.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parent.parent
ANVIL_BIN = REPO_ROOT / "tools" / "node_modules" / ".bin" / "anvil"

# anvil's first dev account (its well-known default mnemonic). It only ever funds the local chain.
ANVIL_FUNDER_KEY = "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80"


class DevChainError(RuntimeError):
    """anvil could not be started or did not answer."""


def free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Anvil:
    """A running anvil process. Use as a context manager, or call `stop()`."""

    rpc_url: str
    chain_id: int
    process: subprocess.Popen = field(repr=False)

    @classmethod
    def start(cls, *, chain_id: int = 31337, log_path: Path | None = None, timeout_s: float = 20.0) -> Anvil:
        if not ANVIL_BIN.exists():
            raise DevChainError(f"anvil not found at {ANVIL_BIN}; run `make setup` first")
        port = free_loopback_port()
        log = open(log_path, "ab") if log_path else subprocess.DEVNULL
        try:
            process = subprocess.Popen(
                [str(ANVIL_BIN), "--host", "127.0.0.1", "--port", str(port), "--chain-id", str(chain_id), "--silent"],
                stdout=log,
                stderr=log,
                start_new_session=True,  # our own process group: Ctrl-C on the terminal reaches us, not anvil
            )
        finally:
            if log_path:
                log.close()
        anvil = cls(rpc_url=f"http://127.0.0.1:{port}", chain_id=chain_id, process=process)
        try:
            anvil._wait_ready(timeout_s)
        except BaseException:
            anvil.stop()
            raise
        return anvil

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        body = {"jsonrpc": "2.0", "id": 1, "method": "eth_chainId", "params": []}
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise DevChainError(f"anvil exited with code {self.process.returncode} during start-up")
            try:
                reply = httpx.post(self.rpc_url, json=body, timeout=1.0)
                if reply.status_code == 200 and int(reply.json()["result"], 16) == self.chain_id:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise DevChainError(f"anvil did not answer on {self.rpc_url} within {timeout_s:.0f} s")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def __enter__(self) -> Anvil:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
