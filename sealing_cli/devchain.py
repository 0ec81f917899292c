"""A local development chain: anvil on a free loopback port.

Where anvil (and forge) come from, first found wins (`find_tool`): the path in ``$SEALROOM_ANVIL``
(``$SEALROOM_FORGE``); the checkout's own npm toolchain, ``tools/node_modules/.bin`` (pinned by
``tools/package-lock.json``, installed by ``make setup``) when `seal` runs from a checkout; then ``PATH``. An
installed wheel has no ``tools/``: it uses the variable or ``PATH``.

Used by `seal up`, the demo and the test fixtures — always a real EVM node, never a mock. Given a state file, anvil
keeps its chain there: it loads the file when it starts, writes it every ``state_interval_s`` seconds (a crash loses
at most that much) and once more when it is stopped. The file keeps the historical states too, so that after a
restart an auditor can still read the chain as it was at an old receipt's block.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx

from compose.backends.launcher import ManagedProcess, free_loopback_port

REPO_ROOT = Path(__file__).resolve().parent.parent
CHECKOUT_TOOLS = REPO_ROOT / "tools" / "node_modules" / ".bin"
ANVIL_BIN = CHECKOUT_TOOLS / "anvil"
# The variables that name a tool's executable, and the npm packages that carry the versions the project pins.
TOOL_ENV = {"anvil": "SEALROOM_ANVIL", "forge": "SEALROOM_FORGE"}
NPM_PACKAGES = {"anvil": "@foundry-rs/anvil-linux-amd64@1.7.1", "forge": "@foundry-rs/forge-linux-amd64@1.7.1"}

# anvil's first dev account (its well-known default mnemonic). It only ever funds the local chain.
ANVIL_FUNDER_KEY = "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80"
# How often a persistent anvil writes its state file: what a crash of the node itself can lose, in seconds.
STATE_INTERVAL_S = 2


class DevChainError(RuntimeError):
    """anvil (or forge) is not installed, or ``$SEALROOM_ANVIL`` names no executable. ``hint`` says how to get it."""

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.hint = hint


def find_tool(name: str) -> Path:
    """The executable of ``name`` ("anvil" or "forge"): ``$SEALROOM_ANVIL`` / ``$SEALROOM_FORGE``, else the
    checkout's ``tools/node_modules/.bin``, else ``PATH``; :class:`DevChainError` (with an install hint) if none."""
    variable = TOOL_ENV[name]
    named = os.environ.get(variable)
    if named:
        path = Path(named).expanduser()
        if path.is_file() and os.access(path, os.X_OK):
            return path
        raise DevChainError(f"${variable} is {named!r}, which is not an executable file",
                            f"point ${variable} at the {name} executable, or unset it to search PATH")
    checkout = CHECKOUT_TOOLS / name
    if checkout.is_file() and os.access(checkout, os.X_OK):
        return checkout
    found = shutil.which(name)
    if found:
        return Path(found)
    raise DevChainError(
        f"{name} not found: ${variable} is not set, there is no {checkout} (a checkout after `make setup`), and "
        f"no {name} on PATH",
        f"install it with npm, `npm install --prefix ~/.sealroom-tools {NPM_PACKAGES[name]}`, then set "
        f"{variable}=~/.sealroom-tools/node_modules/.bin/{name} (or put that folder on PATH); or install Foundry "
        "(https://getfoundry.sh)")


class Anvil(ManagedProcess):
    """A running anvil node. Use as a context manager, or call `stop()`."""

    def __init__(self, *, chain_id: int = 31337, log_path: Path | None = None, state_path: Path | None = None,
                 state_interval_s: int = STATE_INTERVAL_S, port: int | None = None, block_time: float | None = None):
        """``block_time``: mine a block every so many seconds, like a public chain (default: one block per
        transaction, at once)."""
        binary = find_tool("anvil")
        self.chain_id = chain_id
        self.state_path = state_path
        self.rpc_url = f"http://127.0.0.1:{port or free_loopback_port()}"
        argv = [str(binary), "--host", "127.0.0.1", "--port", self.rpc_url.rsplit(":", 1)[1], "--chain-id",
                str(chain_id), "--silent"]
        if block_time is not None:
            argv += ["--block-time", f"{block_time:g}"]
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
