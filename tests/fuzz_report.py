"""Counts for the parser fuzz suite (tests/test_fuzz_parsers.py), printed at the end of the run, ``-q`` included.

The fuzz module registers this plugin with ``pytest_plugins = ["tests.fuzz_report"]``, so it is active only when
that module is collected, and needs nothing in the shared ``tests/conftest.py``. Each fuzz case goes through
:func:`case`, which counts it under its parser as parsed (the parser returned), refused (it raised one of its
documented errors) or crashed (it raised anything else: the exception propagates and the test fails). The
wall time of every test that ran a case is added to its parser. The summary prints one line per parser::

    fuzz: sealed-file 1400 cases (212 parsed, 1188 refused), 0 crashes, 6.1 s
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest


@dataclass
class ParserCounts:
    parsed: int = 0
    refused: int = 0
    crashes: int = 0
    seconds: float = 0.0
    crash_types: set[str] = field(default_factory=set)

    @property
    def cases(self) -> int:
        return self.parsed + self.refused + self.crashes


COUNTS: dict[str, ParserCounts] = {}
_PARSER_OF_TEST: dict[str, str] = {}   # test node id -> the parser it fuzzes, for the timing


@contextmanager
def case(parser: str, *documented: type[BaseException]) -> Iterator[None]:
    """Run one fuzz case of ``parser``: returning counts as parsed, a ``documented`` error as refused; anything
    else is a crash, counted and re-raised so that the test fails (and hypothesis shrinks it)."""
    counts = COUNTS.setdefault(parser, ParserCounts())
    current = os.environ.get("PYTEST_CURRENT_TEST", "")
    if current:
        _PARSER_OF_TEST[current.rsplit(" (", 1)[0]] = parser
    try:
        yield
    except documented:
        counts.refused += 1
    except BaseException as crash:
        counts.crashes += 1
        counts.crash_types.add(type(crash).__name__)
        raise
    else:
        counts.parsed += 1


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    parser = _PARSER_OF_TEST.get(report.nodeid)
    if parser is not None and report.when == "call":
        COUNTS[parser].seconds += report.duration


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not COUNTS:
        return
    for parser in sorted(COUNTS):
        counts = COUNTS[parser]
        crashed = f" ({', '.join(sorted(counts.crash_types))})" if counts.crash_types else ""
        terminalreporter.write_line(
            f"fuzz: {parser} {counts.cases} cases ({counts.parsed} parsed, {counts.refused} refused), "
            f"{counts.crashes} crashes{crashed}, {counts.seconds:.1f} s"
        )
