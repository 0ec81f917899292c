"""Python bindings for the consortium contracts: DstackApp (k-of-n app auth + privacy budget) and DstackKms.

Every transaction is signed locally (owners' keys never go to the node) and simulated first through gas
estimation, so a transaction the contract would refuse is never sent: a refusal changes nothing on-chain.

On a chain that is not the embedded dev chain, a transaction counts once ``confirmations`` blocks have been mined
on top of the block that holds it (`Chain(confirmations=…)`; 0: as soon as it is mined), and readers that must not
act on a state a reorganisation could undo read at `Chain.confirmed_block()` (latest − confirmations). Nonces are
kept per sender in this process (`NonceBook`): one sender's transactions are numbered under a lock from a locally
tracked nonce, so concurrent owners, relayers and the KMS never send two transactions with one nonce; on a nonce
error the count is resynced from the chain's pending transaction count and the transaction is sent again.

Exception tree::

    ChainError
    ├── ChainUnreachable            the RPC endpoint did not answer
    └── ContractReverted            the contract refused; `.error` is its custom error name, `.args_` its arguments
        ├── NotOwner
        ├── UnknownComposeHash
        ├── AlreadyProposed
        ├── AlreadyApproved
        ├── ComposeHashIsRevoked
        ├── InvalidSignature
        ├── SignatureExpired
        ├── NotKmsSigner
        ├── ComposeHashNotAllowed
        ├── OwnerDidNotApprove
        ├── BudgetExceeded
        └── ReleaseAlreadyRecorded

Epsilon is kept on-chain as micro-epsilon integers (`EPSILON_SCALE`); these bindings take and return floats.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Sequence

import eth_abi
import httpx
import requests
from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_account.signers.local import LocalAccount
from eth_utils import keccak, to_checksum_address
from eth_utils.abi import get_abi_output_types
from web3 import HTTPProvider, Web3
from web3.exceptions import (
    ContractCustomError,
    ContractLogicError,
    TimeExhausted,
    TransactionIndexingInProgress,
    TransactionNotFound,
    Web3RPCError,
)

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
EPSILON_SCALE = 10**6
EIP712_DOMAIN_NAME = "Sealroom DstackApp"
EIP712_DOMAIN_VERSION = "1"


class ChainError(Exception):
    """Base class for everything these bindings raise about the chain."""


class ChainUnreachable(ChainError):
    def __init__(self, rpc_url: str, detail: str):
        super().__init__(f"chain unreachable at {rpc_url}: {detail}")
        self.rpc_url = rpc_url


class TransactionRejected(ChainError):
    """The node refused to take the transaction (for example: the sender cannot pay for gas), or never mined it."""


class ContractReverted(ChainError):
    """The contract refused the call with a custom error (or a plain revert reason)."""

    def __init__(self, error: str, args: Sequence[Any] = (), message: str | None = None):
        self.error = error
        self.args_ = tuple(args)
        super().__init__(message or _describe(error, self.args_))


class NotOwner(ContractReverted): ...
class UnknownComposeHash(ContractReverted): ...
class AlreadyProposed(ContractReverted): ...
class AlreadyApproved(ContractReverted): ...
class ComposeHashIsRevoked(ContractReverted): ...
class InvalidSignature(ContractReverted): ...
class SignatureExpired(ContractReverted): ...
class NotKmsSigner(ContractReverted): ...
class ComposeHashNotAllowed(ContractReverted): ...
class OwnerDidNotApprove(ContractReverted): ...
class BudgetExceeded(ContractReverted): ...
class ReleaseAlreadyRecorded(ContractReverted): ...


_TYPED_ERRORS: dict[str, type[ContractReverted]] = {
    cls.__name__: cls
    for cls in (NotOwner, UnknownComposeHash, AlreadyProposed, AlreadyApproved, ComposeHashIsRevoked,
                InvalidSignature, SignatureExpired, NotKmsSigner, ComposeHashNotAllowed, OwnerDidNotApprove,
                BudgetExceeded, ReleaseAlreadyRecorded)
}


def _fmt(value: Any) -> str:
    if isinstance(value, bytes):
        return "0x" + value.hex()
    return str(value)


def _describe(error: str, args: tuple) -> str:
    """A sentence a user can act on, for the errors people meet; the raw error otherwise."""
    a = [_fmt(x) for x in args]
    sentences = {
        "NotOwner": lambda: f"{a[0]} is not an owner of this study's DstackApp",
        "UnknownComposeHash": lambda: f"compose hash {a[0]} was never proposed on this DstackApp",
        "AlreadyProposed": lambda: f"compose hash {a[0]} is already proposed",
        "AlreadyApproved": lambda: f"{a[1]} has already approved compose hash {a[0]}",
        "ComposeHashIsRevoked": lambda: f"compose hash {a[0]} has been revoked (revocation is final)",
        "InvalidSignature": lambda: "the approval signature was not made by the named owner for this contract and chain",
        "SignatureExpired": lambda: f"the approval signature expired (deadline {a[0]})",
        "NotKmsSigner": lambda: f"{a[0]} is not the KMS signer registered for this study",
        "ComposeHashNotAllowed": lambda: f"compose hash {a[0]} has not reached its approval threshold",
        "OwnerDidNotApprove": lambda: f"owner {a[1]} did not approve compose hash {a[0]}",
        "BudgetExceeded": lambda: (f"privacy budget exceeded: requested ε={int(args[0]) / EPSILON_SCALE:g}, "
                                   f"remaining ε={int(args[1]) / EPSILON_SCALE:g}"),
        "ReleaseAlreadyRecorded": lambda: f"release {a[0]} is already recorded",
    }
    if error in sentences:
        return sentences[error]()
    return f"contract reverted: {error}({', '.join(a)})"


def to_micro_epsilon(epsilon: float) -> int:
    if not epsilon >= 0:
        raise ValueError(f"epsilon must be a non-negative number, got {epsilon!r}")
    return round(epsilon * EPSILON_SCALE)


@cache
def load_artifact(name: str) -> dict:
    path = ARTIFACTS / f"{name}.json"
    return json.loads(path.read_text())


@cache
def _error_selectors(name: str) -> dict[bytes, tuple[str, list[str]]]:
    table = {}
    for item in load_artifact(name)["abi"]:
        if item["type"] == "error":
            types = [i["type"] for i in item["inputs"]]
            signature = f"{item['name']}({','.join(types)})"
            table[keccak(text=signature)[:4]] = (item["name"], types)
    return table


def _decode_revert(artifact: str, data: Any, message: str | None) -> ContractReverted:
    if isinstance(data, dict):
        data = data.get("data")
    if isinstance(data, str) and data.startswith("0x") and len(data) >= 10:
        raw = bytes.fromhex(data[2:])
        found = _error_selectors(artifact).get(raw[:4]) if artifact else None
        if found:
            name, types = found
            args = eth_abi.decode(types, raw[4:])
            return _TYPED_ERRORS.get(name, ContractReverted)(name, args)
    return ContractReverted("Revert", (), f"contract reverted: {message or data}")


@dataclass(frozen=True)
class ComposeStatus:
    compose_hash: bytes
    proposed: bool
    allowed: bool
    revoked: bool
    approvals: int
    threshold: int
    owners: tuple[str, ...]
    approvers: tuple[str, ...]
    uri: str

    def to_json(self) -> dict:
        return {
            "compose_hash": "0x" + self.compose_hash.hex(), "proposed": self.proposed, "allowed": self.allowed,
            "revoked": self.revoked, "approvals": self.approvals, "threshold": self.threshold,
            "owners": list(self.owners), "approvers": list(self.approvers), "uri": self.uri,
        }


@dataclass(frozen=True)
class BudgetStatus:
    budget_micro: int
    spent_micro: int

    @property
    def remaining_micro(self) -> int:
        return self.budget_micro - self.spent_micro

    def to_json(self) -> dict:
        return {"epsilon_budget": self.budget_micro / EPSILON_SCALE, "epsilon_spent": self.spent_micro / EPSILON_SCALE,
                "epsilon_remaining": self.remaining_micro / EPSILON_SCALE}


class _Sender:
    """One sender's slot in a `NonceBook`: its lock, and the next nonce to use (None: ask the chain)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.nonce: int | None = None


class NonceBook:
    """The next nonce of each sender, per chain, for this process. A chain is its chain id and its genesis block's
    hash: two connections to one chain (another URL, a node restarted with its state) share a sender's count, and a
    new dev chain with the same chain id (a fresh anvil) starts its own.

    A sender's transactions are numbered one at a time under that sender's lock, each from the chain's pending
    transaction count read under the lock: the pending count includes this process's own transactions that are
    sent but not yet mined, so two threads sending for one owner (or the KMS answering two runs at once) get
    consecutive nonces. The count is read afresh for every transaction rather than carried from the last one:
    a carried count goes stale when the chain moves back (a dev chain's snapshot revert, a node restarted from
    older state) and then strands every later transaction in the pool. A node that says the nonce is taken (another
    process sent from the same account in between) gets the transaction renumbered from a fresh count."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._senders: dict[tuple[int, str], _Sender] = {}

    def slot(self, chain: int | tuple, address: str) -> _Sender:
        """``chain``: `Chain.identity` (a chain id alone stands for any chain with that id)."""
        key = (chain if isinstance(chain, tuple) else (chain,), address.lower())
        with self._lock:
            return self._senders.setdefault(key, _Sender())

    def forget(self, chain: int | tuple, address: str) -> None:
        """Ask the chain again next time (after an error, or when another process used the account)."""
        self.slot(chain, address).nonce = None


NONCES = NonceBook()
# A node's error message that means "that nonce is taken or wrong": resync and send again.
_NONCE_TROUBLE = ("nonce too low", "nonce too high", "invalid nonce", "nonce has already been used",
                  "replacement transaction underpriced", "already exists in the pool", "nonce is too low")
_ALREADY_SENT = ("already known", "already imported", "known transaction")
_NONCE_RETRIES = 3


def _rpc_message(exc: Web3RPCError) -> str:
    detail = exc.rpc_response.get("error", {}).get("message") if isinstance(exc.rpc_response, dict) else None
    return str(detail or exc.message or exc)


class Chain:
    """A connection to an EVM node, sending locally signed transactions.

    ``confirmations``: how many blocks must be mined on top of a transaction's block before `transact` returns
    (0: return once it is mined), and how far behind the latest block `confirmed_block` reads. ``tx_timeout_s``:
    how long a transaction may take to be mined and confirmed."""

    def __init__(self, rpc_url: str, *, timeout_s: float = 10.0, confirmations: int = 0,
                 tx_timeout_s: float = 30.0, poll_s: float | None = None):
        if not (isinstance(confirmations, int) and confirmations >= 0):
            raise ValueError(f"confirmations must be a whole number >= 0, got {confirmations!r}")
        self.rpc_url = rpc_url
        self.confirmations = confirmations
        self.tx_timeout_s = tx_timeout_s
        self.poll_s = poll_s if poll_s is not None else (0.1 if confirmations == 0 else 0.5)
        self.w3 = Web3(HTTPProvider(rpc_url, request_kwargs={"timeout": timeout_s}))
        self._http = httpx.Client(timeout=timeout_s)
        self._identity: tuple | None = None
        try:
            self.chain_id = self.w3.eth.chain_id
        except (requests.RequestException, Web3RPCError, OSError) as exc:
            raise ChainUnreachable(rpc_url, type(exc).__name__) from None

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Chain:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def identity(self) -> tuple:
        """(chain id, genesis block hash): what `NonceBook` keeps a sender's count for. Asked once, when needed."""
        if self._identity is None:
            self._identity = (self.chain_id, bytes(self.w3.eth.get_block(0)["hash"]))
        return self._identity

    def confirmed_block(self, confirmations: int | None = None) -> int | str:
        """The block to read state that must not be undone at: latest − confirmations ("latest" when 0).
        ``confirmations`` defaults to this connection's."""
        depth = self.confirmations if confirmations is None else confirmations
        if depth == 0:
            return "latest"
        try:
            return max(0, self.w3.eth.block_number - depth)
        except (requests.RequestException, OSError) as exc:
            raise ChainUnreachable(self.rpc_url, type(exc).__name__) from None

    def deploy(self, artifact: str, args: Sequence[Any], sender: LocalAccount) -> str:
        meta = load_artifact(artifact)
        factory = self.w3.eth.contract(abi=meta["abi"], bytecode=meta["bytecode"])
        receipt = self.transact(artifact, factory.constructor(*args), sender)
        return receipt["contractAddress"]

    def transact(self, artifact: str, call: Any, sender: LocalAccount) -> Any:
        """Simulate, sign and send one transaction; wait until it is mined and confirmed. Reverts raise typed
        errors, sending nothing."""
        return self._send(artifact, lambda nonce: call.build_transaction({
            "from": sender.address, "nonce": nonce, "chainId": self.chain_id}), sender)

    def _send(self, artifact: str, build: Callable[[int], dict], sender: LocalAccount) -> Any:
        """Number, sign and send the transaction ``build(nonce)`` makes (under the sender's lock, see `NonceBook`),
        then wait for it outside the lock, so that one sender's transactions are mined in the same blocks."""
        slot = None
        try:
            slot = NONCES.slot(self.identity, sender.address)
            with slot.lock:
                tx_hash = self._number_and_send(slot, build, sender)
            receipt = self._await(tx_hash)
        except (ContractCustomError, ContractLogicError) as exc:
            raise _decode_revert(artifact, exc.data, exc.message) from None
        except (requests.RequestException, OSError) as exc:
            if slot is not None:
                slot.nonce = None   # whether it was sent is unknown: ask the chain next time
            raise ChainUnreachable(self.rpc_url, type(exc).__name__) from None
        except Web3RPCError as exc:
            if slot is not None:
                slot.nonce = None
            raise TransactionRejected(f"the chain refused the transaction from {sender.address}: "
                                      f"{_rpc_message(exc)}") from None
        except TimeExhausted:
            slot.nonce = None   # a transaction that was dropped leaves a gap: resync
            raise TransactionRejected(f"the transaction from {sender.address} was not mined and confirmed "
                                      f"within {self.tx_timeout_s:g} s") from None
        if receipt["status"] != 1:
            raise ContractReverted("Revert", (), f"transaction {receipt['transactionHash'].hex()} reverted")
        return receipt

    def _number_and_send(self, slot: _Sender, build: Callable[[int], dict], sender: LocalAccount) -> bytes:
        slot.nonce = None   # always start from the chain's own count (see NonceBook)
        for attempt in range(_NONCE_RETRIES):
            if slot.nonce is None:
                slot.nonce = self.w3.eth.get_transaction_count(sender.address, "pending")
            signed = None
            try:   # building it estimates gas, which some nodes check against the nonce too
                signed = sender.sign_transaction(build(slot.nonce))
                tx_hash = self.w3.eth.send_raw_transaction(signed.raw_transaction)
            except Web3RPCError as exc:
                message = _rpc_message(exc).lower()
                if signed is not None and any(text in message for text in _ALREADY_SENT):
                    tx_hash = signed.hash   # this very transaction reached the node already (a resend)
                elif any(text in message for text in _NONCE_TROUBLE) and attempt + 1 < _NONCE_RETRIES:
                    slot.nonce = None       # someone else used the nonce: resync from the pending count
                    continue
                else:
                    raise
            slot.nonce += 1
            return bytes(tx_hash)
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    def _await(self, tx_hash: bytes) -> Any:
        """The transaction's receipt once ``confirmations`` blocks are on top of its block; a receipt that moved
        (a reorganisation) is waited for again."""
        deadline = time.monotonic() + self.tx_timeout_s
        while True:
            try:
                receipt = self.w3.eth.get_transaction_receipt(tx_hash)
            except (TransactionNotFound, TransactionIndexingInProgress):
                receipt = None
            if receipt is not None and receipt["blockNumber"] is not None:
                if self.confirmations == 0:
                    return receipt
                if self.w3.eth.block_number >= receipt["blockNumber"] + self.confirmations:
                    try:
                        again = self.w3.eth.get_transaction_receipt(tx_hash)
                    except (TransactionNotFound, TransactionIndexingInProgress):
                        again = None
                    if again is not None and again["blockHash"] == receipt["blockHash"]:
                        return again
            if time.monotonic() > deadline:
                raise TimeExhausted(f"transaction 0x{tx_hash.hex()} not confirmed")
            time.sleep(self.poll_s)

    def view(self, artifact: str, contract: Any, name: str, *args: Any, block: int | str = "latest") -> Any:
        """A read-only call: ABI-encoded here, one `eth_call` over a kept-alive connection, decoded here.

        web3.py's own call path makes three JSON-RPC round trips per view; the KMS asks the chain on every
        release, so this path matters (bench/kms_bench.py). `block` reads the state as it was at that block
        number (auditors check a receipt against the chain at the run's block) instead of "latest".
        """
        data = contract.encode_abi(name, args=list(args))
        at = hex(block) if isinstance(block, int) else block
        body = {"jsonrpc": "2.0", "id": 1, "method": "eth_call", "params": [{"to": contract.address, "data": data},
                                                                             at]}
        try:
            reply = self._http.post(self.rpc_url, json=body).json()
        except (httpx.TransportError, ValueError) as exc:
            raise ChainUnreachable(self.rpc_url, type(exc).__name__) from None
        if "error" in reply:
            error = reply["error"]
            raise _decode_revert(artifact, error.get("data"), error.get("message"))
        types = get_abi_output_types(contract.get_function_by_name(name).abi)
        values = eth_abi.decode(types, bytes.fromhex(reply["result"][2:]))
        return values[0] if len(values) == 1 else values

    def fund(self, funder: LocalAccount, to: str, wei: int) -> None:
        self._send("", lambda nonce: {
            "to": to_checksum_address(to), "value": wei, "gas": 21000, "gasPrice": self.w3.eth.gas_price,
            "chainId": self.chain_id, "nonce": nonce}, funder)


def _hash32(value: bytes | str) -> bytes:
    raw = bytes.fromhex(value.removeprefix("0x")) if isinstance(value, str) else bytes(value)
    if len(raw) != 32:
        raise ValueError(f"a compose hash is 32 bytes, got {len(raw)}")
    return raw


class DstackApp:
    """One study's multi-sig DstackApp contract; its address is the study's app_id."""

    ARTIFACT = "DstackApp"

    def __init__(self, chain: Chain, address: str):
        self.chain = chain
        self.address = to_checksum_address(address)
        self.contract = chain.w3.eth.contract(address=self.address, abi=load_artifact(self.ARTIFACT)["abi"])

    @classmethod
    def deploy(cls, chain: Chain, deployer: LocalAccount, *, owners: Sequence[str], threshold: int,
               epsilon_budget: float, kms_signer: str, require_tcb_up_to_date: bool = False) -> DstackApp:
        args = ([to_checksum_address(o) for o in owners], threshold, to_micro_epsilon(epsilon_budget),
                to_checksum_address(kms_signer), require_tcb_up_to_date)
        return cls(chain, chain.deploy(cls.ARTIFACT, args, deployer))

    @property
    def app_id(self) -> bytes:
        return bytes.fromhex(self.address[2:])

    def _send(self, fn: Any, sender: LocalAccount) -> Any:
        return self.chain.transact(self.ARTIFACT, fn, sender)

    def _view(self, name: str, *args: Any, block: int | str = "latest") -> Any:
        return self.chain.view(self.ARTIFACT, self.contract, name, *args, block=block)

    # --- the compose-hash lifecycle -------------------------------------------------------------------------

    def propose(self, compose_hash: bytes | str, uri: str, sender: LocalAccount) -> Any:
        return self._send(self.contract.functions.proposeComposeHash(_hash32(compose_hash), uri), sender)

    def approve(self, compose_hash: bytes | str, owner: LocalAccount) -> Any:
        return self._send(self.contract.functions.approveComposeHash(_hash32(compose_hash)), owner)

    def approval_typed_data(self, compose_hash: bytes | str, deadline: int) -> dict:
        """The EIP-712 typed data an owner signs to approve ``compose_hash`` (eth_signTypedData_v4's shape)."""
        return {
            "types": {
                "EIP712Domain": [{"name": "name", "type": "string"}, {"name": "version", "type": "string"},
                                 {"name": "chainId", "type": "uint256"},
                                 {"name": "verifyingContract", "type": "address"}],
                "ApproveComposeHash": [{"name": "composeHash", "type": "bytes32"},
                                       {"name": "deadline", "type": "uint256"}],
            },
            "primaryType": "ApproveComposeHash",
            "domain": {"name": EIP712_DOMAIN_NAME, "version": EIP712_DOMAIN_VERSION,
                       "chainId": self.chain.chain_id, "verifyingContract": self.address},
            "message": {"composeHash": _hash32(compose_hash), "deadline": deadline},
        }

    def sign_approval(self, compose_hash: bytes | str, owner: LocalAccount, deadline: int) -> bytes:
        """An EIP-712 approval that anyone may relay. The digest is computed here, not asked of the node."""
        typed = self.approval_typed_data(compose_hash, deadline)
        return bytes(owner.sign_message(encode_typed_data(full_message=typed)).signature)

    def approve_signed(self, compose_hash: bytes | str, owner: str, deadline: int, signature: bytes,
                       relayer: LocalAccount) -> Any:
        fn = self.contract.functions.approveComposeHashBySig(_hash32(compose_hash), to_checksum_address(owner),
                                                             deadline, signature)
        return self._send(fn, relayer)

    def revoke(self, compose_hash: bytes | str, owner: LocalAccount) -> Any:
        return self._send(self.contract.functions.revokeComposeHash(_hash32(compose_hash)), owner)

    # --- reading state ----------------------------------------------------------------------------------------

    def owners(self) -> tuple[str, ...]:
        return tuple(map(to_checksum_address, self._view("owners")))

    def threshold(self) -> int:
        return self._view("threshold")

    def kms_signer(self) -> str:
        return to_checksum_address(self._view("kmsSigner"))

    def has_approved(self, compose_hash: bytes | str, owner: str, *, block: int | str = "latest") -> bool:
        return self._view("hasApproved", _hash32(compose_hash), to_checksum_address(owner), block=block)

    def status(self, compose_hash: bytes | str) -> ComposeStatus:
        h = _hash32(compose_hash)
        proposed, allowed, revoked, approvals, uri = self._view("composeHashState", h)
        return ComposeStatus(
            compose_hash=h, proposed=proposed, allowed=allowed, revoked=revoked, approvals=approvals,
            threshold=self.threshold(), owners=self.owners(),
            approvers=tuple(map(to_checksum_address, self._view("approvers", h))), uri=uri,
        )

    def approval_events(self, compose_hash: bytes | str, *, to_block: int | str = "latest") -> list[dict]:
        """Who approved, in which transaction and block: the on-chain consent evidence for a receipt."""
        logs = self.contract.events.ComposeHashApproved().get_logs(
            argument_filters={"composeHash": _hash32(compose_hash)}, from_block=0, to_block=to_block)
        return [{"owner": log["args"]["owner"], "approvals": log["args"]["approvals"],
                 "tx": "0x" + log["transactionHash"].hex(), "block": log["blockNumber"]} for log in logs]

    def budget(self, *, block: int | str = "latest") -> BudgetStatus:
        return BudgetStatus(budget_micro=self._view("epsilonBudget", block=block),
                            spent_micro=self._view("epsilonSpent", block=block))

    def is_app_allowed(self, boot_info: tuple, *, block: int | str = "latest") -> tuple[bool, str]:
        allowed, reason = self._view("isAppAllowed", boot_info, block=block)
        return allowed, reason

    # --- the privacy budget -------------------------------------------------------------------------------------

    def record_release(self, release_id: bytes, compose_hash: bytes | str, owners: Sequence[str], epsilon: float,
                       kms_signer: LocalAccount) -> Any:
        fn = self.contract.functions.recordRelease(release_id, _hash32(compose_hash),
                                                   [to_checksum_address(o) for o in owners],
                                                   to_micro_epsilon(epsilon))
        return self._send(fn, kms_signer)

    def recorded_release(self, release_id: bytes) -> dict | None:
        """The release recorded under ``release_id`` (its `BudgetSpent` event), or None when there is none: the
        KMS asks before answering a retried release again, so that a release is spent once."""
        try:
            logs = self.contract.events.BudgetSpent().get_logs(argument_filters={"releaseId": bytes(release_id)},
                                                               from_block=0, to_block="latest")
        except (requests.RequestException, OSError) as exc:
            raise ChainUnreachable(self.chain.rpc_url, type(exc).__name__) from None
        if not logs:
            return None
        log = logs[0]
        return {"release_id": bytes(log["args"]["releaseId"]), "compose_hash": bytes(log["args"]["composeHash"]),
                "owners": [to_checksum_address(o) for o in log["args"]["owners"]],
                "epsilon": log["args"]["epsilon"] / EPSILON_SCALE, "transactionHash": log["transactionHash"],
                "blockNumber": log["blockNumber"]}


class DstackKms:
    """The KMS registry: the KMS root key auditors pin, allowed OS images, registered apps."""

    ARTIFACT = "DstackKms"

    def __init__(self, chain: Chain, address: str):
        self.chain = chain
        self.address = to_checksum_address(address)
        self.contract = chain.w3.eth.contract(address=self.address, abi=load_artifact(self.ARTIFACT)["abi"])

    @classmethod
    def deploy(cls, chain: Chain, deployer: LocalAccount) -> DstackKms:
        return cls(chain, chain.deploy(cls.ARTIFACT, [deployer.address], deployer))

    def set_kms_root(self, k256_pubkey: bytes, operator: LocalAccount) -> Any:
        info = (k256_pubkey, b"", b"", b"")
        return self.chain.transact(self.ARTIFACT, self.contract.functions.setKmsInfo(info), operator)

    def kms_root_pubkey(self) -> bytes:
        k256_pubkey, _ca, _quote, _eventlog = self.chain.view(self.ARTIFACT, self.contract, "kmsInfo")
        return bytes(k256_pubkey)

    def register_app(self, app_id: str, sender: LocalAccount) -> Any:
        return self.chain.transact(self.ARTIFACT, self.contract.functions.registerApp(app_id), sender)

    def allow_os_image(self, os_image_hash: bytes, operator: LocalAccount) -> Any:
        return self.chain.transact(self.ARTIFACT, self.contract.functions.addOsImageHash(os_image_hash), operator)

    def is_app_allowed(self, boot_info: tuple, *, block: int | str = "latest") -> tuple[bool, str]:
        allowed, reason = self.chain.view(self.ARTIFACT, self.contract, "isAppAllowed", boot_info, block=block)
        return allowed, reason


def new_account() -> LocalAccount:
    return Account.create()
