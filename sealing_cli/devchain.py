"""A local development chain: anvil from the project's own npm toolchain, on a free loopback port.

Used by `seal up`, the demo and the test fixtures — always a real EVM node, never a mock.
"""

from __future__ import annotations

from pathlib import Path

import httpx

from compose.backends.launcher import ManagedProcess, free_loopback_port

REPO_ROOT = Path(__file__).resolve().parent.parent
ANVIL_BIN = REPO_ROOT / "tools" / "node_modules" / ".bin" / "anvil"

# anvil's first dev account (its well-known default mnemonic). It only ever funds the local chain.
ANVIL_FUNDER_KEY = "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80"


class DevChainError(RuntimeError):
    """anvil is not installed."""


class Anvil(ManagedProcess):
    """A running anvil node. Use as a context manager, or call `stop()`."""

    def __init__(self, *, chain_id: int = 31337, log_path: Path | None = None):
        if not ANVIL_BIN.exists():
            raise DevChainError(f"anvil not found at {ANVIL_BIN}; run `make setup` first")
        self.chain_id = chain_id
        self.rpc_url = f"http://127.0.0.1:{free_loopback_port()}"
        port = self.rpc_url.rsplit(":", 1)[1]
        super().__init__("anvil", [str(ANVIL_BIN), "--host", "127.0.0.1", "--port", port, "--chain-id",
                                   str(chain_id), "--silent"], ready=self._answers, log_path=log_path)

    def _answers(self) -> bool:
        body = {"jsonrpc": "2.0", "id": 1, "method": "eth_chainId", "params": []}
        try:
            reply = httpx.post(self.rpc_url, json=body, timeout=1.0)
        except httpx.TransportError:
            return False
        return reply.status_code == 200 and int(reply.json()["result"], 16) == self.chain_id

    def __enter__(self) -> Anvil:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
