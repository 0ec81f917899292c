"""The stack description, ``stack.json`` in the state folder: where later commands and the analysts' API find the
chain, the contracts, the services and the dev owners' keystores. It holds addresses and paths, never keys.

`sealing_cli.stack.LocalStack` writes it; the API (`compose.api`) and the `seal` commands read it. It exists while a
stack runs: a `stack.json` whose ``supervisor_pid`` is gone was left by a crash (`running_supervisor` tells them apart).

``deployment.json`` (`StackDeployment`) is the other file here: what the folder's stack deployed once — the chain
id, the contracts, the dev accounts — and reuses on every later start. It outlives the stack; it too never holds keys.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from eth_account import Account
from eth_account.signers.local import LocalAccount

from contracts.chain import Chain

STACK_FILE = "stack.json"
DEPLOYMENT_FILE = "deployment.json"
DEPLOYMENT_FORMAT = "sealroom-local-deployment/v1"
# The dev owners' keystores are encrypted, but with this published password: they hold throwaway keys for a
# throwaway local chain. Real owners use their own keystore and SEAL_KEYSTORE_PASSWORD (or SEAL_OWNER_KEY).
DEV_KEYSTORE_PASSWORD = "sealroom-dev-only"


class StackError(RuntimeError):
    """The local stack is not running, or its description is unreadable."""


class StackRefused(StackError):
    """The state folder cannot be used as asked (another stack runs there, the KMS root store has no passphrase,
    the flags contradict what the folder's stack deployed, the folder holds someone else's files). Nothing in the
    folder was changed."""


def default_state_dir() -> Path:
    return Path(os.environ.get("SEALROOM_HOME", ".sealroom")).resolve()


OWNER_KINDS = ("dev", "keystore", "address")


@dataclass
class OwnerEntry:
    """One owner of the study. ``kind``: "dev", a key the stack generated, in a keystore under the published dev
    password; "keystore", the owner's own keystore (its password is theirs: SEAL_KEYSTORE_PASSWORD); "address", an
    owner known here by address only, who signs with their own key elsewhere (``keystore`` is empty)."""

    name: str
    address: str
    keystore: str
    kind: str = "dev"


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
    study: str = ""
    chain: str = "embedded"      # "embedded": the stack's own anvil; "external": a node it does not run
    confirmations: int = 0       # blocks on top before a transaction counts; state is read at latest − this

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

    def connect(self) -> Chain:
        """A connection to the stack's chain. On an external chain, transactions wait for the stack's
        confirmations, with a timeout long enough for a public network's blocks. Raises ChainUnreachable."""
        return Chain(self.rpc_url, confirmations=self.confirmations,
                     tx_timeout_s=300.0 if self.chain == "external" else 30.0)

    def owner(self, name_or_address: str) -> OwnerEntry:
        for entry in self.owners:
            if name_or_address in (entry.name, entry.address) or name_or_address.lower() == entry.address.lower():
                return entry
        names = ", ".join(o.name for o in self.owners)
        raise StackError(f"no dev owner named {name_or_address!r} in the local stack (owners: {names})")


@dataclass
class StackDeployment:
    """What a state folder's stack deployed on its first start and reuses on every later one (``deployment.json``).

    Keystore paths are relative to the state folder, so the folder may move. ``last_urls`` are the services' URLs at
    the last start; a restart takes the same ports when they are free, so URLs proposed on-chain keep working."""

    chain_id: int
    dstack_kms: str
    dstack_app: str
    threshold: int
    epsilon_budget: float
    owners: list[OwnerEntry]
    kms_signer: str
    kms_signer_keystore: str
    api_proposer: str = ""
    api_proposer_keystore: str = ""
    last_urls: dict = field(default_factory=dict)
    format: str = DEPLOYMENT_FORMAT
    # From a consortium file (`seal up --consortium`); the defaults are the embedded dev stack's.
    study: str = ""
    rpc_url: str = ""             # an external chain's JSON-RPC URL; empty: the embedded anvil
    confirmations: int = 0
    deployer: str = ""            # the account that deployed the contracts and funds the stack's service accounts
    deployer_keystore: str = ""   # absolute; its password from $SEAL_DEPLOYER_PASSWORD, never stored
    # What encrypts the KMS signer's and API proposer's keystores: "dev" (the published dev password, the embedded
    # chain) or "kms-passphrase" (the KMS root passphrase, on an external chain, where these accounts hold funds).
    service_keystores: str = "dev"

    def save(self, state_dir: Path) -> Path:
        path = state_dir / DEPLOYMENT_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, state_dir: Path) -> StackDeployment | None:
        """The folder's deployment record, or None when its stack was never deployed."""
        path = state_dir / DEPLOYMENT_FILE
        try:
            raw = json.loads(path.read_text())
            if raw.get("format") != DEPLOYMENT_FORMAT:
                raise ValueError(f"not a {DEPLOYMENT_FORMAT} file")
            raw["owners"] = [OwnerEntry(**o) for o in raw["owners"]]
            return cls(**raw)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise StackRefused(f"unreadable deployment record {path}: {exc}; it is left as it is") from None


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def running_supervisor(state_dir: Path) -> int | None:
    """The pid of the `seal up` (or other LocalStack owner) running a stack in ``state_dir``, or None when no
    ``stack.json`` is there or the process it names is gone (a stale description left by a crash)."""
    try:
        pid = int(json.loads((state_dir / STACK_FILE).read_text()).get("supervisor_pid", 0))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise StackRefused(f"unreadable stack description {state_dir / STACK_FILE}: {exc}") from None
    return pid if process_alive(pid) else None


def write_keystore(account: LocalAccount, path: Path, password: str) -> None:
    """An eth-account (Web3 Secret Storage) keystore: the key is encrypted, the file is 0600."""
    keystore = Account.encrypt(account.key, password, kdf="pbkdf2", iterations=100_000)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(keystore, f)


def read_keystore(path: Path | str, password: str) -> LocalAccount:
    return Account.from_key(Account.decrypt(json.loads(Path(path).read_text()), password))
