"""A local development chain: anvil from the project's own npm toolchain, on a free loopback port.

Used by `seal up`, the demo and the test fixtures — always a real EVM node, never a mock. Given a state file, anvil
keeps its chain there: it loads the file when it starts, writes it every ``state_interval_s`` seconds (a crash loses
at most that much) and once more when it is stopped. The file keeps the historical states too, so that after a
restart an auditor can still read the chain as it was at an old receipt's block.
"""

from __future__ import annotations

from pathlib import Path

import httpx

from compose.backends.launcher import ManagedProcess, free_loopback_port

REPO_ROOT = Path(__file__).resolve().parent.parent
ANVIL_BIN = REPO_ROOT / "tools" / "node_modules" / ".bin" / "anvil"

# anvil's first dev account (its well-known default mnemonic). It only ever funds the local chain.
ANVIL_FUNDER_KEY = "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80"
# How often a persistent anvil writes its state file: what a crash of the node itself can lose, in seconds.
STATE_INTERVAL_S = 2


class DevChainError(RuntimeError):
    """anvil is not installed."""


class Anvil(ManagedProcess):
    """A running anvil node. Use as a context manager, or call `stop()`."""

    def __init__(self, *, chain_id: int = 31337, log_path: Path | None = None, state_path: Path | None = None,
                 state_interval_s: int = STATE_INTERVAL_S, port: int | None = None):
        if not ANVIL_BIN.exists():
            raise DevChainError(f"anvil not found at {ANVIL_BIN}; run `make setup` first")
        self.chain_id = chain_id
        self.state_path = state_path
        self.rpc_url = f"http://127.0.0.1:{port or free_loopback_port()}"
        argv = [str(ANVIL_BIN), "--host", "127.0.0.1", "--port", self.rpc_url.rsplit(":", 1)[1], "--chain-id",
                str(chain_id), "--silent"]
        if state_path is not None:
            state_path.parent.mkdir(parents=True, exist_ok=True)
            # --state loads the file if it exists and dumps on exit; the interval bounds what a crash loses.
            argv += ["--state", str(state_path), "--state-interval", str(state_interval_s),
                     "--preserve-historical-states"]
        super().__init__("anvil", argv, ready=self._answers, log_path=log_path)

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
