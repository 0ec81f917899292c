"""Where DstackApp keeps what an auditor checks, and the state proof a receipt carries of it (issue 10, part 5).

A receipt outlives the chain node that served the run. So it carries the facts link 4 relies on as proofs from
the chain's state at the recorded block: the block header (its RLP fields, which hash to the block hash and hold
the state root), ``eth_getProof``'s account proof of the DstackApp (its storage root and code hash) and storage
proofs of the slots below, and the DstackApp's code (its hash is the account's code hash; the immutables are read
from it). An auditor who trusts one block hash checks them without trusting any node (auditor/state_proof.py).

Slots follow solc's storage layout, read from the artifact's ``storageLayout`` (contracts/compile.py). A value at
slot ``p``; a mapping at ``p`` keeps ``m[k]`` at ``keccak(k ‖ p)`` (both 32 bytes, big-endian); a dynamic array
at ``p`` keeps its length at ``p`` and element ``i`` at ``keccak(p) + i·(slots per element)``; a struct's members
at its first slot plus the member's slot, several small members packed into one slot from the low byte up.

DstackApp (``forge inspect DstackApp storageLayout``)::

    slot 0  epsilonSpent                   uint256, micro-epsilon
    slot 1  _owners                        address[]
    slot 2  isOwner                        mapping(address => bool)
    slot 3  _composeHashes                 mapping(bytes32 => ComposeHashRecord), record R = keccak(h ‖ 3):
              R+0  proposed (byte 0), revoked (byte 1)
              R+1  uri
              R+2  approvers.length; approver i at keccak(R+2) + i
    slot 4  _approved                      mapping(bytes32 => mapping(address => bool))
    slot 5  _releases                      Release[], 5 slots each, release j at E = keccak(5) + 5·j:
              E+0 releaseId, E+1 composeHash, E+2 owners.length (owner i at keccak(E+2) + i), E+3 epsilon,
              E+4 blockNumber
    slot 6  _releaseRecorded               mapping(bytes32 => bool)

``threshold``, ``epsilonBudget``, ``kmsSigner`` and ``requireTcbUpToDate`` are immutables: they are in the code,
at the byte ranges the artifact's ``immutableReferences`` names, not in storage.

What a receipt proves (:meth:`DstackAppSlots.needed`): epsilonSpent; the compose hash's flags and approvers; the
release the run names (its id, compose hash, owners, ε and block) and the ε of every earlier release (so the budget
left after it is known).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import requests
from eth_utils import keccak, to_checksum_address

from contracts.chain import ChainError, ChainUnreachable, DstackApp, load_artifact

__all__ = ["HEADER_FIELDS", "CodeMismatch", "DstackAppSlots", "Slot", "StorageLayout", "address_in", "byte_at",
           "fetch_state_proof", "header_fields", "immutables", "word"]

# The block header's fields in RLP order (the yellow paper's, then each fork's additions at the end).
HEADER_FIELDS = ("parentHash", "sha3Uncles", "miner", "stateRoot", "transactionsRoot", "receiptsRoot", "logsBloom",
                 "difficulty", "number", "gasLimit", "gasUsed", "timestamp", "extraData", "mixHash", "nonce",
                 "baseFeePerGas", "withdrawalsRoot", "blobGasUsed", "excessBlobGas", "parentBeaconBlockRoot",
                 "requestsHash")
_INTEGER_FIELDS = {"difficulty", "number", "gasLimit", "gasUsed", "timestamp", "baseFeePerGas", "blobGasUsed",
                   "excessBlobGas"}
HEADER_STATE_ROOT, HEADER_NUMBER, HEADER_TIMESTAMP = 3, 8, 11

MAX_ITEMS = 1024   # approvers, release owners, releases: far above any study, a bound on what a receipt makes us hash


def word(value: int) -> bytes:
    """A slot number or a value as the EVM's 32-byte big-endian word."""
    return value.to_bytes(32, "big")


def _int(raw: bytes) -> int:
    return int.from_bytes(raw, "big")


def _minimal(value: int) -> bytes:
    return value.to_bytes((value.bit_length() + 7) // 8, "big")


class CodeMismatch(ValueError):
    """The code is not the artifact's runtime code (with its immutables filled in)."""


@dataclass(frozen=True)
class StorageLayout:
    """One contract's storage layout from its artifact: ``{name: (slot, offset)}`` and the same per struct."""

    storage: Mapping[str, tuple[int, int]]
    structs: Mapping[str, Mapping[str, tuple[int, int]]]

    @classmethod
    def of(cls, artifact: str) -> StorageLayout:
        layout = load_artifact(artifact)["storageLayout"]
        return cls({name: (item["slot"], item["offset"]) for name, item in layout["storage"].items()},
                   {struct: {name: (item["slot"], item["offset"]) for name, item in members.items()}
                    for struct, members in layout["structs"].items()})


@dataclass(frozen=True)
class Slot:
    """A storage slot and what it holds, for messages (``_composeHashes[0x…].approvers.length``)."""

    number: int
    label: str

    @property
    def key(self) -> bytes:
        return word(self.number)


class DstackAppSlots:
    """The DstackApp slots a receipt proves, computed from the artifact's storage layout."""

    def __init__(self, layout: StorageLayout | None = None) -> None:
        layout = layout or StorageLayout.of(DstackApp.ARTIFACT)
        self._storage = layout.storage
        self._record = layout.structs["ComposeHashRecord"]
        self._release = layout.structs["Release"]
        self.release_size = max(slot for slot, _ in self._release.values()) + 1

    def epsilon_spent(self) -> Slot:
        return Slot(self._storage["epsilonSpent"][0], "epsilonSpent")

    def _record_base(self, h: bytes) -> int:
        return _int(keccak(bytes(h) + word(self._storage["_composeHashes"][0])))

    def compose_flags(self, h: bytes) -> tuple[Slot, int, int]:
        """The slot of the record's ``proposed`` and ``revoked`` flags, and their byte offsets in it."""
        (proposed, proposed_at), (revoked, revoked_at) = self._record["proposed"], self._record["revoked"]
        if proposed != revoked:
            raise ValueError("the layout no longer packs proposed and revoked into one slot")
        return (Slot(self._record_base(h) + proposed, f"_composeHashes[0x{h.hex()}].proposed/revoked"),
                proposed_at, revoked_at)

    def approvers_length(self, h: bytes) -> Slot:
        return Slot(self._record_base(h) + self._record["approvers"][0],
                    f"_composeHashes[0x{h.hex()}].approvers.length")

    def approver(self, h: bytes, index: int) -> Slot:
        return Slot(_int(keccak(self.approvers_length(h).key)) + index,
                    f"_composeHashes[0x{h.hex()}].approvers[{index}]")

    def _release_base(self, index: int) -> int:
        return _int(keccak(word(self._storage["_releases"][0]))) + self.release_size * index

    def release_field(self, index: int, member: str) -> Slot:
        return Slot(self._release_base(index) + self._release[member][0], f"_releases[{index}].{member}")

    def release_owner(self, index: int, owner: int) -> Slot:
        return Slot(_int(keccak(self.release_field(index, "owners").key)) + owner,
                    f"_releases[{index}].owners[{owner}]")

    def needed(self, h: bytes, *, approvers: int, release_index: int, release_owners: int) -> list[Slot]:
        """Every slot a receipt proves, given the counts read from the proven slots themselves."""
        flags, _, _ = self.compose_flags(h)
        slots = [self.epsilon_spent(), flags, self.approvers_length(h)]
        slots += [self.approver(h, i) for i in range(approvers)]
        slots += [self.release_field(i, "epsilon") for i in range(release_index + 1)]
        slots += [self.release_field(release_index, member) for member in ("releaseId", "composeHash", "owners",
                                                                            "blockNumber")]
        slots += [self.release_owner(release_index, i) for i in range(release_owners)]
        return slots


def immutables(code: bytes, artifact: str = DstackApp.ARTIFACT) -> dict[str, int]:
    """The immutables' values in ``code``; :class:`CodeMismatch` unless ``code`` is the artifact's runtime code
    with (each immutable's one value) filled in where the artifact's ``immutableReferences`` say."""
    compiled = load_artifact(artifact)
    template = bytes.fromhex(compiled["deployedBytecode"].removeprefix("0x"))
    if len(code) != len(template):
        raise CodeMismatch(f"it is {len(code)} bytes long, the {artifact} runtime code {len(template)}")
    filled = bytearray(code)
    values = {}
    for name, ranges in compiled["immutableReferences"].items():
        seen = {bytes(code[start:start + length]) for start, length in ranges}
        if len(seen) != 1:
            raise CodeMismatch(f"it holds several values for the immutable {name}")
        values[name] = _int(seen.pop())
        for start, length in ranges:
            filled[start:start + length] = template[start:start + length]
    if bytes(filled) != template:
        first = next(i for i, (a, b) in enumerate(zip(filled, template)) if a != b)
        raise CodeMismatch(f"it differs from the {artifact} runtime code at byte {first}")
    return values


def header_fields(block: Mapping[str, Any]) -> list[bytes]:
    """A block's header as its RLP items, from ``eth_getBlockByNumber``'s JSON (hex strings): the fields of
    :data:`HEADER_FIELDS` up to the first one the block does not have (each fork appends its own)."""
    fields = []
    for name in HEADER_FIELDS:
        if block.get(name) is None:
            break
        raw = str(block[name])
        fields.append(_minimal(int(raw, 16)) if name in _INTEGER_FIELDS else bytes.fromhex(raw.removeprefix("0x")))
    return fields


def _rpc(chain: Any, method: str, params: list) -> Any:
    try:
        reply = chain.w3.provider.make_request(method, params)
    except (requests.RequestException, OSError) as exc:
        raise ChainUnreachable(chain.rpc_url, type(exc).__name__) from None
    if "error" in reply or reply.get("result") is None:
        raise ChainError(f"{method} failed at {chain.rpc_url}: {reply.get('error', 'no result')}")
    return reply["result"]


def _hex(raw: bytes) -> str:
    return "0x" + bytes(raw).hex()


def fetch_state_proof(chain: Any, address: str, *, block: int, compose_hash: bytes,
                      release_id: bytes | str) -> dict[str, Any]:
    """The receipt's ``chain.state_proof`` for the DstackApp at ``address`` at ``block``: the header's RLP fields,
    the account proof, the code and the storage proofs of :meth:`DstackAppSlots.needed` (for ``compose_hash`` and
    the release recorded under ``release_id``). Raises :class:`ChainError` when the release is not recorded."""
    release_id = bytes.fromhex(release_id.removeprefix("0x")) if isinstance(release_id, str) else bytes(release_id)
    app = DstackApp(chain, address)

    def view(name: str, *args: Any) -> Any:
        return chain.view(app.ARTIFACT, app.contract, name, *args, block=block)

    approvers = view("approvers", bytes(compose_hash))
    index, owners = None, ()
    for i in reversed(range(view("releaseCount"))):
        recorded_id, _h, owners, _epsilon, _block = view("releaseAt", i)
        if bytes(recorded_id) == release_id:
            index = i
            break
    if index is None:
        raise ChainError(f"release {release_id.hex()} is not recorded on the DstackApp {app.address} at block {block}")
    slots = DstackAppSlots().needed(bytes(compose_hash), approvers=len(approvers), release_index=index,
                                    release_owners=len(owners))
    at = hex(block)
    proof = _rpc(chain, "eth_getProof", [app.address, [_hex(slot.key) for slot in slots], at])
    header = _rpc(chain, "eth_getBlockByNumber", [at, False])
    code = _rpc(chain, "eth_getCode", [app.address, at])
    by_key = {int(item["key"], 16): item["proof"] for item in proof["storageProof"]}
    return {
        "block_header": [_hex(field) for field in header_fields(header)],
        "account_proof": list(proof["accountProof"]),
        "code": code,
        "release_index": index,
        "storage_proofs": [{"slot": _hex(slot.key), "proof": list(by_key[slot.number])} for slot in slots],
    }


def address_in(value: int) -> str:
    """The address a slot holds (its low 20 bytes), checksummed."""
    return to_checksum_address(word(value)[12:])


def byte_at(value: int, offset: int) -> int:
    """The byte at ``offset`` (from the low end) of a slot's value: a packed bool or uint8."""
    return (value >> (8 * offset)) & 0xFF
