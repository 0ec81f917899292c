"""What every link of the checklist shares: the pins, how a link holds or breaks, and the small readers it uses.

A link is a function of explicit, immutable inputs (the parsed receipt, the auditor's :class:`Pins`, and the
proofs of the earlier links it depends on). It returns :class:`Held` — what it proved, for the later links, and
what it found, for the report — or raises :class:`Broken` with the reason. A link that breaks may still have
proved something a later link needs (the recorded block of an on-chain link whose compose hash was not allowed,
the kind of a quote that is not accepted): :attr:`Broken.proven` carries it, and the later link says in its
facts when what it reads is unproven. While it runs, a link writes into its own :class:`Notes`, a scratchpad
that lives for one call and is never handed to another link.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Generic, TypeVar

import requests
from eth_abi.exceptions import DecodingError
from web3.exceptions import Web3Exception

from contracts.chain import Chain, ChainError, ChainUnreachable, to_micro_epsilon
from cvm.attest.os_image import OsMeasurement

__all__ = ["Broken", "Held", "Notes", "Pins", "Recipe", "chain_errors", "micro_epsilon", "need_chain", "need_recipe",
           "recipe_note", "same_json", "thaw"]

P = TypeVar("P")


class Broken(Exception):
    """A link does not hold: ``reason`` says why (every problem it found, in order).

    ``summary`` and ``facts`` are what the link had found before it broke; ``proven`` what it had proved anyway,
    for the later links (None when nothing). ``unreachable``: it broke because the chain could not be reached.
    """

    def __init__(self, reason: str, *, unreachable: bool = False, summary: str = "",
                 facts: Mapping[str, Any] | None = None, proven: Any = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.unreachable = unreachable
        self.summary = summary
        self.facts = MappingProxyType(dict(facts or {}))
        self.proven = proven


@dataclass(frozen=True)
class Held(Generic[P]):
    """A link that holds: what it proved (for the later links) and what it found (for the report). A link that
    holds with ``warnings`` holds with a caveat the auditor must read."""

    proven: P
    summary: str
    facts: Mapping[str, Any]
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class Pins:
    """What the auditor brings: the time certificates and collateral are judged at, the KMS root pinned (a
    checksum address, or None), DCAP collateral overriding the receipt's, whether (and against which root)
    SIMULATED quotes are accepted, and the measurement records of the OS images they trust (never the receipt's)."""

    now: int
    kms_root: str | None = None
    collateral: str | None = None
    allow_simulated: bool = False
    simulated_root_der: bytes | None = None
    os_measurements: tuple[OsMeasurement, ...] = ()

    def os_measurement(self, os_image_hash: bytes) -> OsMeasurement | None:
        """The pinned record for this OS image, or None."""
        return next((r for r in self.os_measurements if r.os_image_hash == os_image_hash), None)

    def quote_kwargs(self, collateral: str | None) -> dict[str, Any]:
        """The arguments :func:`cvm.attest.verify.verify_quote` and ``verify_attestation`` take from the pins."""
        return {"collateral": collateral, "now": self.now, "allow_simulated": self.allow_simulated,
                "simulated_root_der": self.simulated_root_der}


@dataclass(frozen=True)
class Recipe:
    """The app_id and compose hash the later links check against. ``attested``: read from the event log that
    replayed to the quote (link 2); otherwise only the envelope's claim."""

    app_id: bytes
    compose_hash: bytes
    attested: bool


@dataclass
class Notes:
    """One link's scratchpad while it runs (never shared between links): facts and summary for the report,
    warnings, problems (failures that do not stop the link's other checks) and what it has proved so far."""

    facts: dict[str, Any] = field(default_factory=dict)
    summary: str = ""
    warnings: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    proven: Any = None

    @contextmanager
    def breaking(self) -> Iterator[None]:
        """A :class:`Broken` raised inside leaves with this link's problems before its reason, its facts and
        summary, and what it has proved so far (unless it names what it proved itself)."""
        try:
            yield
        except Broken as broken:
            raise Broken("; ".join([*self.problems, broken.reason]), unreachable=broken.unreachable,
                         summary=self.summary, facts=self.facts,
                         proven=broken.proven if broken.proven is not None else self.proven) from None

    def held(self, proven: P) -> Held[P]:
        """The link's outcome: it holds (with its warnings), or it breaks with every problem it found."""
        if self.problems:
            raise Broken("; ".join(self.problems), summary=self.summary, facts=self.facts, proven=proven)
        return Held(proven, self.summary, MappingProxyType(dict(self.facts)), tuple(self.warnings))


def need_recipe(recipe: Recipe | None) -> Recipe:
    if recipe is None:
        raise Broken("cannot be checked: neither the event log nor the envelope names the recipe")
    return recipe


def recipe_note(notes: Notes, recipe: Recipe) -> None:
    if not recipe.attested:
        notes.facts["recipe_from"] = "the envelope's claim (not attested: link 2 failed)"


def need_chain(chain: Chain | None) -> Chain:
    if chain is None:
        raise Broken("cannot be checked: the chain could not be reached", unreachable=True)
    return chain


@contextmanager
def chain_errors(chain: Chain, contract: str, address: str) -> Iterator[None]:
    """The chain's and web3's errors, as a link that does not hold (dependency errors stop here)."""
    try:
        yield
    except ChainUnreachable as exc:
        raise Broken(str(exc), unreachable=True) from None
    except requests.RequestException as exc:
        raise Broken(f"chain unreachable at {chain.rpc_url}: {type(exc).__name__}", unreachable=True) from None
    except DecodingError:
        raise Broken(f"no {contract} contract answers at {address} (at the block asked)") from None
    except (ChainError, Web3Exception) as exc:
        raise Broken(f"the {contract} at {address} could not be read: {exc}") from None


def thaw(value: Any) -> Any:
    """A frozen JSON value (read-only mappings, tuples) as plain JSON (dicts, lists)."""
    if isinstance(value, Mapping):
        return {key: thaw(child) for key, child in value.items()}
    if isinstance(value, tuple):
        return [thaw(child) for child in value]
    return value


def same_json(a: Any, b: Any) -> bool:
    """Equal as JSON values, kinds included (in Python, True == 1 and 1 == 1.0; in a receipt they differ)."""
    return json.dumps(thaw(a), sort_keys=True) == json.dumps(thaw(b), sort_keys=True)


def micro_epsilon(value: float, where: str) -> int:
    """A JSON ε as micro-epsilon (the contract's fixed point)."""
    try:
        return to_micro_epsilon(value)
    except ValueError:
        raise Broken(f"{where} is not a non-negative number") from None
