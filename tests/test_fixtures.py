"""The vendored real-TDX fixtures (tests/fixtures/tdx) are exactly the pinned bytes: a file that was edited,
re-encoded, truncated, added or lost fails here by name, before any quote test reports something stranger."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "tdx"
# The files the tests read; SHA256SUMS must pin each of them, and nothing else.
EXPECTED = {"tdx_quote", "tdx_quote_collateral.json", "tdx_quote_outdated", "tdx_quote_outdated_collateral.json",
            "quote-from-tappd.hex"}
_LINE = re.compile(r"(?P<digest>[0-9a-f]{64}) [ *](?P<name>\S+)")  # sha256sum's format (text or binary mode)


def pinned() -> dict[str, str]:
    sums: dict[str, str] = {}
    for number, line in enumerate((FIXTURES / "SHA256SUMS").read_text().splitlines(), 1):
        if not line.strip():
            continue
        match = _LINE.fullmatch(line)
        assert match, f"SHA256SUMS line {number} is not in sha256sum format: {line!r}"
        assert match["name"] not in sums, f"SHA256SUMS names {match['name']} twice"
        sums[match["name"]] = match["digest"]
    return sums


def test_sha256sums_pins_exactly_the_fixtures():
    assert set(pinned()) == EXPECTED


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_fixture_matches_its_pinned_sha256(name):
    path = FIXTURES / name
    assert path.is_file(), f"missing fixture {path}"
    actual = hashlib.sha256(path.read_bytes()).hexdigest()
    assert actual == pinned()[name], f"{name} is corrupted: sha256 {actual}, SHA256SUMS says {pinned()[name]}"


def test_readme_repeats_the_pinned_sums():
    readme = (FIXTURES / "README.md").read_text()
    for name, digest in pinned().items():
        assert f"{digest}  {name}" in readme, f"README.md does not give the checksum of {name}"
