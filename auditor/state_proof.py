"""Checking chain state without a chain node: a block header against a trusted block hash, and Merkle-Patricia
proofs (``eth_getProof``) against the roots it commits to (issue 10, part 5).

The auditor trusts one block hash. The header's RLP fields must hash (keccak) to it; the header then gives the
state root. An account proof leads from the state root, along ``keccak(address)``, to the account
``[nonce, balance, storageRoot, codeHash]``; a storage proof leads from the account's storage root, along
``keccak(slot)``, to the slot's value (RLP of the integer; a slot that is zero is absent, and its proof shows the
path ends). Each proof is the list of trie nodes on that path, as RLP; a node is found by its keccak hash, so a
node that was changed, or one from another path, is simply not found. The trie walk is ``trie``'s
(``HexaryTrie.get_from_proof``).

Errors: :class:`ProofError` (a ``ValueError``), whose message says which proof does not verify and why.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import rlp
from eth_utils import keccak
from rlp.exceptions import RLPException
from trie import HexaryTrie
from trie.exceptions import (
    BadTrieProof,
    InvalidNibbles,
    InvalidNode,
    MissingTraversalNode,
    MissingTrieNode,
    TraversedPartialPath,
    ValidationError,
)

__all__ = ["Account", "Header", "ProofError", "check_account", "check_header", "check_storage", "proven_value"]

_MALFORMED = (RLPException, BadTrieProof, InvalidNibbles, InvalidNode, MissingTraversalNode, MissingTrieNode,
              TraversedPartialPath, ValidationError, ValueError, TypeError, IndexError, KeyError)
_STATE_ROOT, _NUMBER, _TIMESTAMP = 3, 8, 11
_LEGACY_HEADER_FIELDS = 15


class ProofError(ValueError):
    """A header or a proof does not verify; the message says which and why."""


@dataclass(frozen=True)
class Header:
    """What a header that hashes to the trusted block hash commits to."""

    hash: bytes
    number: int
    state_root: bytes
    timestamp: int


@dataclass(frozen=True)
class Account:
    nonce: int
    balance: int
    storage_root: bytes
    code_hash: bytes


def check_header(fields: Sequence[bytes], trusted_hash: bytes) -> Header:
    """The header whose RLP fields are ``fields``, if they hash to ``trusted_hash``."""
    if len(fields) < _LEGACY_HEADER_FIELDS:
        raise ProofError(f"the block header has {len(fields)} fields, not at least {_LEGACY_HEADER_FIELDS}")
    computed = keccak(rlp.encode(list(fields)))
    if computed != trusted_hash:
        raise ProofError(f"the block header hashes to 0x{computed.hex()}, not the trusted block hash "
                         f"0x{trusted_hash.hex()}")
    if len(fields[_STATE_ROOT]) != 32:
        raise ProofError("the block header's state root is not 32 bytes")
    return Header(hash=computed, number=int.from_bytes(fields[_NUMBER], "big"), state_root=bytes(fields[_STATE_ROOT]),
                  timestamp=int.from_bytes(fields[_TIMESTAMP], "big"))


def proven_value(root: bytes, key: bytes, proof: Sequence[bytes], what: str) -> bytes:
    """The value stored under ``keccak(key)`` in the trie whose root hash is ``root``, as ``proof`` (its nodes, RLP)
    shows it; ``b""`` when the proof shows there is none. ``what`` names the proof in the error."""
    try:
        nodes = [rlp.decode(bytes(node)) for node in proof]
    except RLPException:
        raise ProofError(f"{what} does not verify against root 0x{bytes(root).hex()}: a node is not RLP") from None
    try:
        return HexaryTrie.get_from_proof(bytes(root), keccak(key), nodes)
    except BadTrieProof as exc:
        raise ProofError(f"{what} does not verify against root 0x{bytes(root).hex()}: {_missing(exc)}") from None
    except _MALFORMED as exc:
        raise ProofError(f"{what} does not verify against root 0x{bytes(root).hex()}: malformed node "
                         f"({type(exc).__name__})") from None


def _missing(exc: BadTrieProof) -> str:
    cause = exc.__cause__
    if isinstance(cause, MissingTrieNode):
        return f"it lacks the node 0x{bytes(cause.missing_node_hash).hex()} on the path (a node changed or is missing)"
    return str(exc)


def check_account(state_root: bytes, address: bytes, proof: Sequence[bytes]) -> Account:
    """The account at ``address`` in the state whose root is ``state_root``."""
    what = f"the account proof of 0x{bytes(address).hex()}"
    raw = proven_value(state_root, address, proof, what)
    if raw == b"":
        raise ProofError(f"{what} shows no account at that address in the state at root 0x{state_root.hex()}")
    try:
        nonce, balance, storage_root, code_hash = rlp.decode(raw)
    except (RLPException, ValueError):
        raise ProofError(f"{what} leads to a value that is not an account") from None
    if len(storage_root) != 32 or len(code_hash) != 32:
        raise ProofError(f"{what} leads to a value that is not an account")
    return Account(int.from_bytes(nonce, "big"), int.from_bytes(balance, "big"), bytes(storage_root),
                   bytes(code_hash))


def check_storage(storage_root: bytes, slot: int, proof: Sequence[bytes], what: str) -> int:
    """The value of storage ``slot`` under ``storage_root`` (0 when the proof shows it is absent)."""
    raw = proven_value(storage_root, slot.to_bytes(32, "big"), proof, what)
    if raw == b"":
        return 0
    try:
        value = rlp.decode(raw)
    except RLPException:
        raise ProofError(f"{what} leads to a value that is not RLP") from None
    if not isinstance(value, bytes) or len(value) > 32 or value[:1] == b"\0" or value == b"":
        raise ProofError(f"{what} leads to a value that is not a storage word")
    return int.from_bytes(value, "big")
