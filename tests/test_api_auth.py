"""Analysts' API tokens: stored only as hashes, checked against every analyst, refused with a reason."""

from __future__ import annotations

import hashlib
import json

import pytest

from compose import api, auth, backends
from compose.auth import (
    ANALYSTS_FILE,
    TOKEN_PREFIX,
    AnalystExists,
    AnalystTokens,
    Unauthenticated,
    UnknownAnalyst,
    analyst_names,
    issue_token,
    revoke_token,
)


@pytest.mark.parametrize("module", [auth, backends, api])
def test_all_is_exactly_the_modules_own_public_definitions(module):
    own = {name for name, value in vars(module).items()
           if not name.startswith("_") and getattr(value, "__module__", None) == module.__name__}
    exported_definitions = {name for name in module.__all__ if hasattr(getattr(module, name), "__module__")
                            and getattr(module, name).__module__ == module.__name__}
    assert own == exported_definitions
    assert all(hasattr(module, name) for name in module.__all__)


def test_a_token_is_stored_only_as_its_sha256(tmp_path):
    token = issue_token(tmp_path, "alice")
    assert token.startswith(TOKEN_PREFIX) and len(token) > len(TOKEN_PREFIX) + 40
    text = (tmp_path / ANALYSTS_FILE).read_text()
    assert token not in text and token[len(TOKEN_PREFIX):] not in text
    assert json.loads(text)["analysts"] == {"alice": hashlib.sha256(token.encode()).hexdigest()}
    assert (tmp_path / ANALYSTS_FILE).stat().st_mode & 0o777 == 0o600


def test_each_analyst_is_told_apart_by_their_token(tmp_path):
    alice, bob = issue_token(tmp_path, "alice"), issue_token(tmp_path, "bob")
    tokens = AnalystTokens(tmp_path)
    assert tokens.authenticate(f"Bearer {alice}") == "alice"
    assert tokens.authenticate(f"bearer {bob}") == "bob"


def test_rotating_a_token_replaces_the_old_one(tmp_path):
    old = issue_token(tmp_path, "alice")
    new = issue_token(tmp_path, "alice", rotate=True)
    tokens = AnalystTokens(tmp_path)
    assert tokens.authenticate(f"Bearer {new}") == "alice"
    with pytest.raises(Unauthenticated, match="not one an analyst holds"):
        tokens.authenticate(f"Bearer {old}")


def test_a_name_that_holds_a_token_is_not_replaced_without_rotate(tmp_path):
    token = issue_token(tmp_path, "alice")
    before = (tmp_path / ANALYSTS_FILE).read_bytes()
    with pytest.raises(AnalystExists, match="already holds a token"):
        issue_token(tmp_path, "alice")
    assert (tmp_path / ANALYSTS_FILE).read_bytes() == before
    assert AnalystTokens(tmp_path).authenticate(f"Bearer {token}") == "alice"


def test_a_revoked_token_is_refused_and_the_others_still_work(tmp_path):
    alice, bob = issue_token(tmp_path, "alice"), issue_token(tmp_path, "bob")
    assert analyst_names(tmp_path) == ["alice", "bob"]
    revoke_token(tmp_path, "alice")
    assert analyst_names(tmp_path) == ["bob"]
    with pytest.raises(Unauthenticated, match="not one an analyst holds"):
        AnalystTokens(tmp_path).authenticate(f"Bearer {alice}")
    assert AnalystTokens(tmp_path).authenticate(f"Bearer {bob}") == "bob"
    with pytest.raises(UnknownAnalyst, match="no analyst 'alice'"):
        revoke_token(tmp_path, "alice")
    fresh = issue_token(tmp_path, "alice")           # the name is free again
    assert AnalystTokens(tmp_path).authenticate(f"Bearer {fresh}") == "alice"


def test_no_analysts_file_lists_nobody_and_revokes_nothing(tmp_path):
    assert analyst_names(tmp_path) == []
    with pytest.raises(UnknownAnalyst):
        revoke_token(tmp_path, "alice")
    assert not (tmp_path / ANALYSTS_FILE).exists()


def test_tokens_issued_at_once_are_all_kept(tmp_path):
    """The read-modify-write of analysts.json is locked: no issue loses another's token."""
    from concurrent.futures import ThreadPoolExecutor

    names = [f"analyst-{i}" for i in range(24)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        tokens = dict(zip(names, pool.map(lambda name: issue_token(tmp_path, name), names)))
    assert analyst_names(tmp_path) == sorted(names)
    check = AnalystTokens(tmp_path)
    assert all(check.authenticate(f"Bearer {token}") == name for name, token in tokens.items())


@pytest.mark.parametrize(("header", "reason"), [
    (None, "no API token"),
    ("", "no API token"),
    ("Basic YWxpY2U6cHc=", "not a bearer token"),
    ("Bearer ", "not a bearer token"),
    ("Bearer sealroom-analyst-v1.wrong", "not one an analyst holds"),
])
def test_requests_without_a_valid_token_are_refused_with_a_reason(tmp_path, header, reason):
    token = issue_token(tmp_path, "alice")
    with pytest.raises(Unauthenticated, match=reason):
        AnalystTokens(tmp_path).authenticate(header)
    assert AnalystTokens(tmp_path).authenticate(f"Bearer {token}") == "alice"


def test_no_analysts_file_means_nobody_is_let_in(tmp_path):
    with pytest.raises(Unauthenticated, match="not one an analyst holds"):
        AnalystTokens(tmp_path).authenticate("Bearer sealroom-analyst-v1.anything")


@pytest.mark.parametrize("name", ["", "-alice", "a" * 65, "al ice", "al/ice", "ålice"])
def test_analyst_names_are_checked(tmp_path, name):
    with pytest.raises(ValueError, match="analyst name"):
        issue_token(tmp_path, name)
    assert not (tmp_path / ANALYSTS_FILE).exists()
