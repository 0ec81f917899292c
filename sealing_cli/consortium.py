"""The consortium file, ``consortium.toml``: the study's name, its owners, how many of them must approve a recipe,
its ε budget, and the chain its contracts live on (docs/deploy.md).

`seal init` writes a commented starter (`write_starter`); `seal up --consortium FILE` reads it (`load_consortium`).
Every field is checked; a bad one raises :class:`ConsortiumError`, one sentence that names the file and the field.
Paths in the file (keystores) are relative to the file's folder. Nothing here touches the chain or a password: the
deployer's keystore is opened by `seal up`, with its password from ``$SEAL_DEPLOYER_PASSWORD``.
"""

from __future__ import annotations

import json
import math
import os
import tomllib
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eth_utils import is_checksum_address, is_hex_address, to_checksum_address

CONSORTIUM_FILE = "consortium.toml"
EMBEDDED = "embedded"
DEPLOYER_PASSWORD_ENV = "SEAL_DEPLOYER_PASSWORD"
DEFAULT_CONFIRMATIONS = 2        # on an external chain; the embedded one mines each transaction at once
MAX_CONFIRMATIONS = 64
MAX_OWNERS = 64
MAX_NAME = 64
ZERO_ADDRESS = "0x" + "0" * 40

_SECTIONS = {"study", "owners", "chain"}
_STUDY_FIELDS = {"name", "threshold", "epsilon_budget"}
_OWNER_FIELDS = {"name", "address", "keystore"}
_CHAIN_FIELDS = {"rpc_url", "chain_id", "deployer_keystore", "confirmations"}


class ConsortiumError(ValueError):
    """The consortium file is missing, not TOML, or a field in it is wrong; the message names the field."""


@dataclass(frozen=True)
class ConsortiumOwner:
    name: str
    address: str                 # checksummed
    keystore: Path | None        # the owner's own keystore (absolute), or None: address only


@dataclass(frozen=True)
class ChainSettings:
    rpc_url: str | None          # None: the embedded anvil
    chain_id: int | None         # the chain id the node must report (embedded: the id anvil runs with)
    deployer_keystore: Path | None
    confirmations: int

    @property
    def embedded(self) -> bool:
        return self.rpc_url is None


@dataclass(frozen=True)
class Consortium:
    path: Path
    study: str
    threshold: int
    epsilon_budget: float
    owners: tuple[ConsortiumOwner, ...]
    chain: ChainSettings


STARTER = """\
# Sealroom consortium file: read by `seal up --consortium consortium.toml` (see docs/deploy.md).
#
# The first `seal up` with this file deploys the study's contracts (DstackKms and the study's DstackApp) and
# records them in its state folder (--state-dir, default ./.sealroom). Every later `seal` command, and every later
# `seal up` in that folder, finds them there. Owners, threshold and ε budget are then fixed on-chain: a new study
# needs a new state folder.

[study]
name = "my-study"            # a label for people, shown by `seal up` and `seal status`
threshold = 2                # approvals a recipe needs: k of the n owners below
epsilon_budget = 3.0         # the study's total differential-privacy budget ε, spent on-chain run by run

# One [[owners]] table per data owner. `name` is any text (shown by `seal status`, usable as `--owner NAME`);
# then either
#   address  = "0x…"           the owner's account: they sign with their own key, `seal approve --keystore FILE`
# or
#   keystore = "owner-a.json"  an encrypted keystore (path relative to this file); the address is read from it,
#                              and its password is asked for when the owner signs (or SEAL_KEYSTORE_PASSWORD)
# or both (they must agree). Replace the placeholder addresses below: `seal up` refuses the zero address.
[[owners]]
name = "Hospital A"
address = "0x0000000000000000000000000000000000000000"

[[owners]]
name = "Hospital B"
address = "0x0000000000000000000000000000000000000000"

[[owners]]
name = "Hospital C"
address = "0x0000000000000000000000000000000000000000"

[chain]
# "embedded" (the default): a local anvil that `seal up` runs and keeps in the state folder, to try things out.
# It funds every owner for gas.
rpc_url = "embedded"
# Any other EVM chain (a public testnet, a consortium chain) by its JSON-RPC URL. Owners pay their own gas there.
# rpc_url = "https://rpc.example.org"
# chain_id = 11155111                 # optional: `seal up` refuses a node that reports another chain
# deployer_keystore = "deployer.json" # the funded account that deploys the contracts and funds the KMS signer and
#                                     # the analysts' API (path relative to this file); password: $SEAL_DEPLOYER_PASSWORD
# confirmations = 2                   # blocks on top of a transaction before it counts (default 2); the KMS
#                                     # reads the chain that many blocks behind its head
"""


def write_starter(folder: Path) -> Path:
    """Write the starter ``consortium.toml`` into ``folder``, which is created, or must be empty. Nothing is ever
    replaced: a folder that holds anything (a consortium file above all) raises :class:`ConsortiumError`."""
    folder = Path(folder)
    target = folder / CONSORTIUM_FILE
    if target.exists() or target.is_symlink():
        raise ConsortiumError(f"{target} already exists; it is left as it is")
    if folder.exists() and not folder.is_dir():
        raise ConsortiumError(f"{folder} is not a folder")
    if folder.is_dir() and any(folder.iterdir()):
        raise ConsortiumError(f"{folder} is not empty; `seal init` writes only into a new or an empty folder, "
                              "and replaces nothing")
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(STARTER)
    return target


def load_consortium(path: Path) -> Consortium:
    """Read and check a consortium file; :class:`ConsortiumError` names the first field that is wrong."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConsortiumError(f"{path}: no such file (`seal init FOLDER` writes a starter)") from None
    except IsADirectoryError:
        raise ConsortiumError(f"{path} is a folder, not a consortium file") from None
    except UnicodeDecodeError:
        raise ConsortiumError(f"{path} is not UTF-8 text") from None
    except OSError as exc:
        raise ConsortiumError(f"{path}: cannot be read: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConsortiumError(f"{path} is not valid TOML: {exc}") from None
    return _Reader(path).read(raw)


class _Reader:
    def __init__(self, path: Path):
        self.path = path
        self.folder = path.resolve().parent

    def fail(self, field: str, problem: str) -> ConsortiumError:
        return ConsortiumError(f"{self.path}: {field}: {problem}")

    def read(self, raw: dict[str, Any]) -> Consortium:
        unknown = sorted(set(raw) - _SECTIONS)
        if unknown:
            raise self.fail(unknown[0], "unknown section or field (expected [study], [[owners]] and [chain])")
        study = self.table(raw, "study", required=True)
        self.known(study, _STUDY_FIELDS, "study")
        name = self.text(study, "name", "study.name")
        owners = self.owners(raw.get("owners"))
        threshold = study.get("threshold")
        if threshold is None:
            raise self.fail("study.threshold", "missing (how many owners must approve a recipe)")
        if not _is_int(threshold) or not 1 <= threshold <= len(owners):
            raise self.fail("study.threshold", f"must be a whole number from 1 to the number of owners "
                                               f"({len(owners)}), got {threshold!r}")
        budget = study.get("epsilon_budget")
        if budget is None:
            raise self.fail("study.epsilon_budget", "missing (the study's total ε)")
        if not (_is_number(budget) and math.isfinite(budget) and budget > 0):
            raise self.fail("study.epsilon_budget", f"must be a finite number above 0, got {budget!r}")
        chain = self.chain(self.table(raw, "chain", required=False))
        return Consortium(path=self.path.resolve(), study=name, threshold=threshold, epsilon_budget=float(budget),
                          owners=owners, chain=chain)

    def table(self, raw: dict[str, Any], key: str, *, required: bool) -> dict[str, Any]:
        value = raw.get(key)
        if value is None:
            if required:
                raise self.fail(f"[{key}]", "missing")
            return {}
        if not isinstance(value, dict):
            raise self.fail(key, f"must be a table, [{key}]")
        return value

    def known(self, table: dict[str, Any], fields: set[str], where: str) -> None:
        unknown = sorted(set(table) - fields)
        if unknown:
            raise self.fail(f"{where}.{unknown[0]}", f"unknown field (expected {', '.join(sorted(fields))})")

    def text(self, table: dict[str, Any], key: str, field: str) -> str:
        value = table.get(key)
        if value is None:
            raise self.fail(field, "missing")
        if not isinstance(value, str):
            raise self.fail(field, f"must be text, got {value!r}")
        value = value.strip()
        if not value:
            raise self.fail(field, "must not be empty")
        if len(value) > MAX_NAME:
            raise self.fail(field, f"must be at most {MAX_NAME} characters")
        if any(unicodedata.category(c)[0] == "C" for c in value):
            raise self.fail(field, "must not hold control characters")
        return value

    def owners(self, raw: Any) -> tuple[ConsortiumOwner, ...]:
        if raw is None:
            raise self.fail("[[owners]]", "missing: list each data owner in an [[owners]] table")
        if not isinstance(raw, list) or not all(isinstance(o, dict) for o in raw):
            raise self.fail("owners", "must be [[owners]] tables")
        if not 1 <= len(raw) <= MAX_OWNERS:
            raise self.fail("[[owners]]", f"there must be 1 to {MAX_OWNERS} owners, got {len(raw)}")
        owners: list[ConsortiumOwner] = []
        for number, entry in enumerate(raw, start=1):
            where = f"owners #{number}"
            self.known(entry, _OWNER_FIELDS, where)
            name = self.text(entry, "name", f"{where} name")
            where = f"owners #{number} ({name!r})"
            if name.lower().startswith("0x"):
                raise self.fail(f"{where} name", "must not start with 0x (it would read as an address)")
            if any(o.name.casefold() == name.casefold() for o in owners):
                raise self.fail(f"{where} name", "is used twice; owners need distinct names")
            keystore, from_keystore = self.keystore(entry.get("keystore"), f"{where} keystore")
            address = self.address(entry.get("address"), f"{where} address") if "address" in entry else None
            if address is None and from_keystore is None:
                raise self.fail(where, "give the owner's address, or a keystore to read it from")
            if address and from_keystore and address != from_keystore:
                raise self.fail(f"{where} address", f"is {address}, but the keystore holds {from_keystore}")
            address = address or from_keystore
            if any(o.address == address for o in owners):
                raise self.fail(f"{where} address", f"{address} is listed twice; each owner needs their own")
            owners.append(ConsortiumOwner(name=name, address=address, keystore=keystore))
        return tuple(owners)

    def address(self, value: Any, field: str) -> str:
        if not isinstance(value, str) or not value.startswith("0x") or not is_hex_address(value):
            raise self.fail(field, f"must be a 0x-prefixed 20-byte address, got {value!r}")
        if value.lower() == ZERO_ADDRESS:
            raise self.fail(field, "is the zero address, a placeholder: put the owner's own address there")
        body = value[2:]
        if body not in (body.lower(), body.upper()) and not is_checksum_address(value):
            raise self.fail(field, f"{value} fails its EIP-55 checksum (a typo?); check it, or write it all "
                                   "in lower case")
        return to_checksum_address(value)

    def keystore(self, value: Any, field: str) -> tuple[Path | None, str | None]:
        """The keystore's absolute path and the address it holds (read without its password)."""
        if value is None:
            return None, None
        if not isinstance(value, str) or not value.strip():
            raise self.fail(field, f"must be a path to a keystore file, got {value!r}")
        path = (self.folder / Path(value).expanduser()).resolve()
        try:
            content = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise self.fail(field, f"{path} does not exist") from None
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise self.fail(field, f"{path} is not a keystore ({type(exc).__name__})") from None
        if not isinstance(content, dict) or not ({"crypto", "Crypto"} & set(content)):
            raise self.fail(field, f"{path} is not an eth-account keystore (no crypto section)")
        held = content.get("address")
        if not isinstance(held, str) or not is_hex_address(held if held.startswith("0x") else "0x" + held):
            raise self.fail(field, f"{path} does not say which address it holds; give the owner's address too")
        return path, to_checksum_address(held if held.startswith("0x") else "0x" + held)

    def chain(self, table: dict[str, Any]) -> ChainSettings:
        self.known(table, _CHAIN_FIELDS, "chain")
        url = table.get("rpc_url", EMBEDDED)
        if not isinstance(url, str) or not url.strip():
            raise self.fail("chain.rpc_url", f"must be \"{EMBEDDED}\" or an http(s):// JSON-RPC URL, got {url!r}")
        url = url.strip()
        embedded = url == EMBEDDED
        if not embedded and not (url.startswith(("http://", "https://")) and len(url) > len("https://")):
            raise self.fail("chain.rpc_url", f"must be \"{EMBEDDED}\" or an http(s):// JSON-RPC URL, got {url!r}")
        chain_id = table.get("chain_id")
        if chain_id is not None and not (_is_int(chain_id) and 1 <= chain_id < 2**63):
            raise self.fail("chain.chain_id", f"must be a whole number above 0, got {chain_id!r}")
        confirmations = table.get("confirmations", 0 if embedded else DEFAULT_CONFIRMATIONS)
        if not _is_int(confirmations) or not 0 <= confirmations <= MAX_CONFIRMATIONS:
            raise self.fail("chain.confirmations", f"must be a whole number from 0 to {MAX_CONFIRMATIONS}, "
                                                   f"got {confirmations!r}")
        deployer = table.get("deployer_keystore")
        if embedded:
            if confirmations:
                raise self.fail("chain.confirmations", "applies to an external chain only: the embedded chain "
                                                       "mines each transaction at once")
            if deployer is not None:
                raise self.fail("chain.deployer_keystore", "applies to an external chain only: the embedded "
                                                           "chain deploys from its own funded dev account")
            return ChainSettings(rpc_url=None, chain_id=chain_id, deployer_keystore=None, confirmations=0)
        if deployer is None:
            raise self.fail("chain.deployer_keystore", "missing: an external chain needs the keystore of a funded "
                                                       f"account to deploy from (password: ${DEPLOYER_PASSWORD_ENV})")
        path, _address = self.keystore(deployer, "chain.deployer_keystore")
        return ChainSettings(rpc_url=url, chain_id=chain_id, deployer_keystore=path, confirmations=confirmations)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
