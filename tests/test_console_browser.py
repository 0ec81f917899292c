"""The owners' console in a real browser: Playwright (PyPI) driving Debian's Chromium (/usr/bin/chromium, never a
downloaded browser). The wallet is an injected EIP-1193 provider whose keys stay in Python (eth_account): it
answers eth_requestAccounts, eth_signTypedData_v4 and eth_sendTransaction through exposed functions.

An owner opens the overview, reviews a recipe, sees a tampered app-compose.json flagged (approval disabled),
approves the genuine one (relayed by the console; the threshold is reached), then revokes it (final).
With SEALROOM_CONSOLE_SCREENSHOTS=1 the screenshots are written to docs/img/ (used by docs/console.md)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from eth_account import Account

from console.app import ConsoleConfig
from tests.console_world import NAMES, Server, recipe_bytes, store_and_propose

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = Path("/usr/bin/chromium")
DOCS_IMG = Path(__file__).resolve().parent.parent / "docs" / "img"
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed (scripts/setup.sh)")

PROVIDER = """
window.ethereum = {
  isSealroomTestWallet: true,
  async request({ method, params }) {
    if (method === "eth_requestAccounts" || method === "eth_accounts") return [await window.walletAccount()];
    if (method === "eth_signTypedData_v4") return await window.walletSignTypedData(params[0], params[1]);
    if (method === "eth_sendTransaction") return await window.walletSendTransaction(JSON.stringify(params[0]));
    throw Object.assign(new Error(`unsupported method ${method}`), { code: 4200 });
  },
};
"""


@pytest.fixture
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield browser
        browser.close()


def test_an_owner_reviews_catches_tampering_approves_and_revokes(tmp_path, browser, chain, funder, owners,
                                                                 consortium, kms_signer):
    composes = tmp_path / "composes"
    composes.mkdir()
    relayer = Account.create()
    chain.fund(funder, relayer.address, 10**19)
    config = ConsoleConfig(study=consortium, composes_dir=composes, relayer=relayer,
                           owner_names={o.address: n for o, n in zip(owners, NAMES)})
    # An earlier recipe that ran once (a spend on the chart), and the one under review: 2 of 3 approvals so far.
    earlier = store_and_propose(consortium, composes, recipe_bytes("cohort-baseline",
                                [owners[1].address, owners[2].address], 0.5), funder)
    for owner in owners[1:4]:
        consortium.approve(earlier, owner)
    consortium.record_release(b"\x07" * 32, earlier, [owners[1].address, owners[2].address], 0.5, kms_signer)
    genuine = recipe_bytes("cohort-egfr", [owners[0].address, owners[1].address], 0.8)
    h = store_and_propose(consortium, composes, genuine, funder)
    consortium.approve(h, owners[1])
    consortium.approve(h, owners[2])

    me = owners[0]
    signed, sent = [], []

    def sign_typed_data(address: str, payload: str) -> str:
        assert address.lower() == me.address.lower()
        typed = json.loads(payload)
        signed.append(typed)
        return "0x" + Account.sign_typed_data(me.key, full_message=typed).signature.hex().removeprefix("0x")

    def send_transaction(payload: str) -> str:
        tx = json.loads(payload)
        w3 = chain.w3
        built = {"to": tx["to"], "data": tx["data"], "value": 0, "chainId": chain.chain_id,
                 "nonce": w3.eth.get_transaction_count(me.address), "gasPrice": w3.eth.gas_price}
        built["gas"] = w3.eth.estimate_gas({**built, "from": me.address})
        tx_hash = w3.eth.send_raw_transaction(me.sign_transaction(built).raw_transaction)
        w3.eth.wait_for_transaction_receipt(tx_hash, timeout=30)
        sent.append(tx)
        return "0x" + bytes(tx_hash).hex()

    shots = tmp_path / "shots"
    shots.mkdir()
    csp_violations: list[str] = []
    with Server(config) as server:
        context = browser.new_context(viewport={"width": 1200, "height": 900})
        context.expose_function("walletAccount", lambda: me.address)
        context.expose_function("walletSignTypedData", sign_typed_data)
        context.expose_function("walletSendTransaction", send_transaction)
        context.add_init_script(PROVIDER)
        page = context.new_page()
        page.on("console", lambda msg: csp_violations.append(msg.text)
                if "Content Security Policy" in msg.text else None)

        # The overview: owners, threshold, spend-down chart, recipes with their state and criteria.
        page.goto(server.url + "/")
        row = page.locator(f'#recipes tr[data-hash="0x{h}"]')
        sync_api.expect(row).to_contain_text("approved 2 of 3 needed")
        sync_api.expect(row).to_contain_text("partial")
        sync_api.expect(page.locator("#threshold")).to_have_text("3 of 5 owners")
        sync_api.expect(page.locator("#owners tbody tr")).to_have_count(5)
        sync_api.expect(page.locator("#budget-svg circle")).to_have_count(2)
        sync_api.expect(page.locator("#spends tbody")).to_contain_text("0.5")
        page.screenshot(path=str(shots / "console-overview.png"), full_page=True)

        # A tampered app-compose.json: the browser's own SHA-256 disagrees with the chain; approval is disabled.
        stored = composes / f"{h}.json"
        stored.write_bytes(genuine.replace(b'epsilon\\":0.8', b'epsilon\\":8.0'))   # ε 0.8 -> 8.0
        assert stored.read_bytes() != genuine
        row.get_by_role("link").click()
        sync_api.expect(page.locator("#hash-check")).to_contain_text("MISMATCH")
        sync_api.expect(page.locator("#mismatch")).to_be_visible()
        sync_api.expect(page.locator("#approve")).to_be_disabled()
        page.screenshot(path=str(shots / "console-tampered.png"), full_page=True)

        # The genuine bytes: the hashes agree, the manifest is shown, the typed data is shown in full.
        stored.write_bytes(genuine)
        page.reload()
        sync_api.expect(page.locator("#hash-check")).to_contain_text("matches")
        sync_api.expect(page.locator("#mismatch")).to_be_hidden()
        sync_api.expect(page.locator("#local-hash")).to_have_text("0x" + h)
        sync_api.expect(page.locator("#m-kind")).to_have_text("dp_stats")
        sync_api.expect(page.locator("#m-epsilon")).to_have_text("0.8")
        sync_api.expect(page.locator("#m-images")).to_contain_text("@sha256:")
        sync_api.expect(page.locator("#typed-data")).to_contain_text('"primaryType": "ApproveComposeHash"')
        sync_api.expect(page.locator("#typed-data")).to_contain_text(consortium.address)
        page.screenshot(path=str(shots / "console-review.png"), full_page=True)

        # Approve with the keyboard: the wallet signs, the console relays, the threshold is reached.
        page.locator("#approve").focus()
        page.keyboard.press("Enter")
        sync_api.expect(page.locator("#approve-status")).to_contain_text("Threshold reached")
        sync_api.expect(page.locator("#approvals")).to_contain_text("3 of 3 needed — threshold reached")
        sync_api.expect(page.locator("#state")).to_have_text("allowed")
        assert signed and signed[0]["message"]["composeHash"] == "0x" + h
        assert consortium.status(h).allowed and consortium.has_approved(h, me.address)

        # Revoke: a separate action, behind an explicit "this is final" confirmation.
        sync_api.expect(page.locator("#revoke")).to_be_disabled()
        page.get_by_label("I understand revocation is final and cannot be undone").check()
        sync_api.expect(page.locator("#revoke")).to_be_enabled()
        page.locator("#revoke").click()
        sync_api.expect(page.locator("#revoke-status")).to_contain_text("final")
        sync_api.expect(page.locator("#state")).to_have_text("revoked — final")
        sync_api.expect(page.locator("#approve")).to_be_disabled()
        assert consortium.status(h).revoked and sent[0]["to"] == consortium.address
        page.screenshot(path=str(shots / "console-revoked.png"), full_page=True)

        page.goto(server.url + "/")
        sync_api.expect(page.locator(f'#recipes tr[data-hash="0x{h}"]')).to_contain_text("revoked — final")
        page.screenshot(path=str(shots / "console-overview-after.png"), full_page=True)
        context.close()

    assert csp_violations == []
    if os.environ.get("SEALROOM_CONSOLE_SCREENSHOTS") == "1":
        DOCS_IMG.mkdir(parents=True, exist_ok=True)
        for shot in shots.iterdir():
            shutil.copyfile(shot, DOCS_IMG / shot.name)
