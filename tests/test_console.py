"""The owners' console server: headers, pages without inline code, JSON from the chain, relayed approvals."""

from __future__ import annotations

import re
import time
from pathlib import Path

import httpx
import pytest
from eth_account import Account

from console.app import CSP, STATIC, ConsoleConfig
from tests.console_world import NAMES, Server, recipe_bytes, store_and_propose


@pytest.fixture
def world(tmp_path, chain, funder, owners, consortium, kms_signer):
    composes = tmp_path / "composes"
    composes.mkdir()
    relayer = Account.create()
    chain.fund(funder, relayer.address, 10**19)
    config = ConsoleConfig(study=consortium, composes_dir=composes, relayer=relayer,
                           owner_names={o.address: n for o, n in zip(owners, NAMES)})
    with Server(config) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        yield config, client


def test_pages_carry_a_strict_csp_and_no_inline_code(world):
    _, client = world
    for path in ("/", "/recipe", "/static/recipe.js", "/api/consortium"):
        response = client.get(path)
        assert response.status_code == 200, path
        assert response.headers["content-security-policy"] == CSP
    assert "default-src 'self'" in CSP and "unsafe-inline" not in CSP
    for page in STATIC.glob("*.html"):
        html = page.read_text()
        assert not re.search(r"<script(?![^>]*\bsrc=)", html), page   # every script is a file
        assert "<style" not in html and "style=" not in html, page
        assert not re.search(r"\son[a-z]+=", html), page                 # no inline handlers
        assert not re.search(r"(src|href)=\"(https?:)?//", html), page   # no remote asset


def test_every_control_is_labelled():
    html = (STATIC / "recipe.html").read_text()
    for control in re.findall(r"<input[^>]*id=\"([^\"]+)\"", html):
        assert f'for="{control}"' in html, control


def test_overview_json_reads_the_chain(world, owners, funder, consortium, kms_signer):
    config, client = world
    allowed = store_and_propose(consortium, config.composes_dir,
                                recipe_bytes("allowed", [owners[0].address, owners[1].address], 0.5), funder)
    for owner in owners[:3]:
        consortium.approve(allowed, owner)
    consortium.record_release(b"\x01" * 32, allowed, [owners[0].address, owners[1].address], 0.5, kms_signer)
    partial = store_and_propose(consortium, config.composes_dir,
                                recipe_bytes("partial", [owners[0].address, owners[4].address], 1.0), funder)
    consortium.approve(partial, owners[0])

    info = client.get("/api/consortium").json()
    assert info["threshold"] == 3 and [o["name"] for o in info["owners"]] == list(NAMES)
    budget = client.get("/api/budget").json()
    assert budget["epsilon_budget"] == 2.0 and budget["epsilon_remaining"] == 1.5
    assert [s["epsilon"] for s in budget["spends"]] == [0.5] and budget["spends"][0]["tx"].startswith("0x")
    recipes = {r["name"]: r for r in client.get("/api/recipes").json()}
    assert recipes["allowed"]["state"] == "allowed" and recipes["allowed"]["verdict"] == "match"
    assert [a["name"] for a in recipes["allowed"]["approvers"]] == list(NAMES[:3])
    assert recipes["partial"]["state"] == "approved" and recipes["partial"]["verdict"] == "partial"
    assert recipes["partial"]["criteria"] == {"threshold_met": False, "inputs_consented": False,
                                              "budget_left": True, "not_revoked": True}
    detail = client.get(f"/api/recipes/0x{partial}").json()
    assert detail["manifest"]["analysis"]["kind"] == "dp_stats" and detail["manifest"]["epsilon"] == 1.0
    assert detail["images"][0].startswith("ghcr.io/sealroom/study@sha256:")
    assert client.get(f"/api/recipes/{partial}/app-compose.json").content == \
        (config.composes_dir / f"{partial}.json").read_bytes()
    assert client.get(f"/api/recipes/{'ab' * 32}").status_code == 404


def test_signed_approval_is_relayed_and_a_forged_one_refused(world, owners, funder, consortium):
    config, client = world
    h = store_and_propose(consortium, config.composes_dir, recipe_bytes("s", [owners[0].address], 0.1), funder)
    typed = client.get(f"/api/recipes/{h}/typed-data").json()
    assert typed["message"] == {"composeHash": "0x" + h, "deadline": typed["message"]["deadline"]}
    assert typed["message"]["deadline"] > time.time()
    signature = Account.sign_typed_data(owners[0].key, full_message=typed).signature.hex()
    forged = client.post(f"/api/recipes/{h}/approvals",
                         json={"owner": owners[1].address, "deadline": typed["message"]["deadline"],
                               "signature": signature})
    assert forged.status_code == 409 and "signature" in forged.json()["detail"].lower()
    relayed = client.post(f"/api/recipes/{h}/approvals",
                          json={"owner": owners[0].address, "deadline": typed["message"]["deadline"],
                                "signature": signature})
    assert relayed.status_code == 200, relayed.text
    assert relayed.json()["recipe"]["approvers"][0]["address"] == owners[0].address
    call = client.get(f"/api/recipes/{h}/revoke-call").json()
    assert call["to"] == consortium.address and call["data"].startswith("0x")


def test_the_console_does_not_import_the_cli():
    for path in Path(STATIC.parent).glob("*.py"):
        assert "sealing_cli" not in path.read_text(), path
