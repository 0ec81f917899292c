"""The auditor's report: one result per link of the checklist, and the verdict over all of them (seven, and link 8
when the study image was rebuilt)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

__all__ = ["LinkResult", "LinkStatus", "VerificationReport"]


class LinkStatus(enum.StrEnum):
    OK = "ok"
    WARNING = "warning"  # the link holds, with a caveat the auditor must read
    FAILED = "failed"


@dataclass(frozen=True)
class LinkResult:
    """One link of the chain of trust: what it checks, whether it holds, why not, and what was found."""

    number: int
    name: str
    check: str
    status: LinkStatus
    summary: str  # what was found, in one line
    reason: str | None = None  # why it failed, or the warning
    facts: dict[str, Any] = field(default_factory=dict)
    unreachable: bool = False  # failed because the chain could not be reached

    @property
    def holds(self) -> bool:
        return self.status is not LinkStatus.FAILED

    def to_json(self) -> dict[str, Any]:
        return {"link": self.number, "name": self.name, "check": self.check, "status": str(self.status),
                "summary": self.summary, "reason": self.reason, "unreachable": self.unreachable, "facts": self.facts}


@dataclass(frozen=True)
class VerificationReport:
    """Every link's result. ``simulated`` is True for a SIMULATED quote, None when the quote's kind is unknown."""

    links: tuple[LinkResult, ...]
    simulated: bool | None
    verified_at: int

    @property
    def ok(self) -> bool:
        return all(link.holds for link in self.links)

    @property
    def first_failure(self) -> LinkResult | None:
        return next((link for link in self.links if not link.holds), None)

    @property
    def warnings(self) -> list[LinkResult]:
        return [link for link in self.links if link.status is LinkStatus.WARNING]

    @property
    def verdict(self) -> str:
        kind = " — SIMULATED TEE: proves nothing about hardware" if self.simulated else ""
        if not self.ok:
            first = self.first_failure
            return f"FAILED at link {first.number} ({first.name}){kind}"
        return f"VERIFIED{kind}"

    def link(self, name: str) -> LinkResult:
        return next(link for link in self.links if link.name == name)

    def to_json(self) -> dict[str, Any]:
        first = self.first_failure
        return {
            "format": "sealroom-verification/v1",
            "verdict": self.verdict,
            "ok": self.ok,
            "simulated": self.simulated,
            "verified_at": self.verified_at,
            "first_failure": None if first is None else {"link": first.number, "name": first.name,
                                                         "reason": first.reason},
            "warnings": [{"link": w.number, "name": w.name, "warning": w.reason} for w in self.warnings],
            "links": [link.to_json() for link in self.links],
        }
