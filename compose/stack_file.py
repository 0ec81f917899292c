"""The stack description, ``stack.json`` in the state folder: where later commands and the analysts' API find the
chain, the contracts, the services and the dev owners' keystores. It holds addresses and paths, never keys.

`sealing_cli.stack.LocalStack` writes it; the API (`compose.api`) and the `seal` commands read it.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from eth_account import Account
from eth_account.signers.local import LocalAccount

STACK_FILE = "stack.json"
# The dev owners' keystores are encrypted, but with this published password: they hold throwaway keys for a
# throwaway local chain. Real owners use their own keystore and SEAL_KEYSTORE_PASSWORD (or SEAL_OWNER_KEY).
DEV_KEYSTORE_PASSWORD = "sealroom-dev-only"


class StackError(RuntimeError):
    """The local stack is not running, or its description is unreadable."""


def default_state_dir() -> Path:
    return Path(os.environ.get("SEALROOM_HOME", ".sealroom")).resolve()


@dataclass
class OwnerEntry:
    name: str
    address: str
    keystore: str


@dataclass
class StackDescription:
    """What later commands need to find the running stack. Holds addresses and paths, never keys."""

    rpc_url: str
    chain_id: int
    dstack_kms: str
    dstack_app: str
    threshold: int
    epsilon_budget: float
    owners: list[OwnerEntry]
    kms_signer: str
    kms_signer_keystore: str
    dev_keystore_password: str = DEV_KEYSTORE_PASSWORD
    supervisor_pid: int = 0
    services: dict = field(default_factory=dict)

    def save(self, state_dir: Path) -> Path:
        path = state_dir / STACK_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, state_dir: Path | None = None) -> StackDescription:
        path = (state_dir or default_state_dir()) / STACK_FILE
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise StackError(f"no local stack description at {path}; start one with `seal up`") from None
        except (OSError, json.JSONDecodeError) as exc:
            raise StackError(f"unreadable stack description {path}: {exc}") from None
        raw["owners"] = [OwnerEntry(**o) for o in raw["owners"]]
        return cls(**raw)

    def owner(self, name_or_address: str) -> OwnerEntry:
        for entry in self.owners:
            if name_or_address in (entry.name, entry.address) or name_or_address.lower() == entry.address.lower():
                return entry
        names = ", ".join(o.name for o in self.owners)
        raise StackError(f"no dev owner named {name_or_address!r} in the local stack (owners: {names})")


def write_keystore(account: LocalAccount, path: Path, password: str) -> None:
    """An eth-account (Web3 Secret Storage) keystore: the key is encrypted, the file is 0600."""
    keystore = Account.encrypt(account.key, password, kdf="pbkdf2", iterations=100_000)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(keystore, f)


def read_keystore(path: Path | str, password: str) -> LocalAccount:
    return Account.from_key(Account.decrypt(json.loads(Path(path).read_text()), password))
