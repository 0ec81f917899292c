"""The report as the checklist `seal verify` prints (rich markup)."""

from __future__ import annotations

from rich.markup import escape

from auditor.report import LinkStatus, VerificationReport

__all__ = ["render_checklist"]

_MARKS = {LinkStatus.OK: "[green]✔ ok     [/]", LinkStatus.WARNING: "[bold yellow]! WARNING[/]",
          LinkStatus.FAILED: "[bold red]✘ FAILED [/]"}


def render_checklist(report: VerificationReport) -> str:
    """The report as a checklist (rich markup; text from the receipt is escaped): one line per link, its finding,
    and failures/warnings in full."""
    lines = []
    if report.simulated:
        lines.append("[bold reverse red] SIMULATED [/] [bold red]this receipt comes from a SIMULATED TDX platform: "
                     "it proves nothing about hardware[/]")
    for link in report.links:
        lines.append(f"{_MARKS[link.status]} {link.number} {link.name:<16} {escape(link.check)}")
        lines.append(f"            {escape(link.summary)}")
        if link.reason:
            style = "bold red" if link.status is LinkStatus.FAILED else "bold yellow"
            lines.append(f"            [{style}]{escape(link.reason)}[/]")
    style = "bold green" if report.ok and not report.simulated else ("bold red" if not report.ok else "bold yellow")
    lines.append(f"[{style}]verdict: {escape(report.verdict)}[/]")
    first = report.first_failure
    if first is not None:
        lines.append(f"[bold red]first broken link: {first.number} ({first.name}): {escape(first.reason or '')}[/]")
    return "\n".join(lines)
