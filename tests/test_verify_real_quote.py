"""The verifier's quote link on real Intel evidence (fixtures/tdx): it holds with the quote's collateral at the
pinned time and fails now, with the expired-collateral reason; and the verifier's own argument checks."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

import auditor.verify as verify_module
from auditor.verify import LinkStatus, NotAReceipt, load_receipt, verify_receipt
from compose.backends.launcher import free_loopback_port
from sealing_cli.main import app

_REPO = Path(__file__).resolve().parents[1]
FIXTURES = _REPO / "tests" / "fixtures" / "tdx"  # real Intel TDX samples, vendored (see its README.md)
PINNED_NOW = 1750331763  # the collateral's TCB issueDate + 1 h (fixtures/tdx/README.md)
COLLATERAL = FIXTURES / "tdx_quote_collateral.json"


def real_receipt(*, collateral: object | None) -> dict:
    """A receipt holding only the real quote: enough for link 1; the other links have nothing to check."""
    return {"format": "sealroom-attestation/v1", "simulated": False, "collateral": collateral,
            "quote": (FIXTURES / "tdx_quote").read_bytes().hex()}


def test_the_real_quote_holds_at_the_pinned_time():
    report = verify_receipt(real_receipt(collateral=json.loads(COLLATERAL.read_text())), now=PINNED_NOW, chain=None)
    quote = report.link("quote")
    assert quote.status is LinkStatus.OK and report.simulated is False
    assert quote.facts | {"mrtd": None, "rtmr3": None, "report_data": None} == {
        "collateral": "carried by the receipt", "kind": "Intel TDX", "tcb_status": "UpToDate", "advisory_ids": [],
        "debug": False, "fmspc": "B0C06F000000", "mrtd": None, "rtmr3": None, "report_data": None}
    assert quote.summary == "Intel TDX quote verified to Intel's SGX root (DCAP); TCB UpToDate; not a debug TD"
    assert "SIMULATED" not in report.verdict


def test_the_real_quote_fails_now_because_its_collateral_expired():
    report = verify_receipt(real_receipt(collateral=COLLATERAL.read_text()), now=int(time.time()), chain=None)
    assert report.first_failure.number == 1
    assert "a CRL in the collateral has expired at the verification time (stale collateral)" in \
        report.first_failure.reason


def test_the_auditors_collateral_overrides_the_receipts():
    receipt = real_receipt(collateral=None)
    assert "no DCAP collateral" in verify_receipt(receipt, now=PINNED_NOW, chain=None).first_failure.reason
    report = verify_receipt(receipt, now=PINNED_NOW, chain=None, collateral=COLLATERAL.read_text())
    assert report.link("quote").status is LinkStatus.OK
    assert report.link("quote").facts["collateral"] == "given by the auditor"


def test_a_real_quote_claimed_simulated_breaks_link_1():
    receipt = real_receipt(collateral=COLLATERAL.read_text()) | {"simulated": True}
    reason = verify_receipt(receipt, now=PINNED_NOW, chain=None).link("quote").reason
    assert reason == "the receipt says its quote is SIMULATED, but it is real"


def test_cli_checks_a_real_quote_at_a_given_time(tmp_path):
    path = tmp_path / "attestation.json"
    path.write_text(json.dumps(real_receipt(collateral=None)))
    dead = f"http://127.0.0.1:{free_loopback_port()}"
    args = ["verify", str(path), "--collateral", str(COLLATERAL), "--rpc", dead, "--state-dir", str(tmp_path), "--json"]
    then = CliRunner().invoke(app, [*args, "--now", str(PINNED_NOW)])
    report = json.loads(then.stdout)
    assert report["links"][0]["status"] == "ok" and report["links"][0]["facts"]["tcb_status"] == "UpToDate"
    assert then.exit_code == 1 and report["first_failure"]["name"] == "event-log"  # the rest is not there
    now = CliRunner().invoke(app, args)
    assert now.exit_code == 1 and "stale collateral" in json.loads(now.stdout)["first_failure"]["reason"]


def test_load_receipt_refuses_non_receipts():
    assert load_receipt('{"format": "sealroom-attestation/v1"}') == {"format": "sealroom-attestation/v1"}
    for text, reason in [("{", "not JSON"), ('{"format": Infinity}', "Infinity"), ('"x"', "not a JSON object"),
                         ('{"format": "sealroom-attestation/v2"}', "not 'sealroom-attestation/v1'")]:
        with pytest.raises(NotAReceipt, match=reason):
            load_receipt(text)


def test_verify_receipt_argument_mistakes():
    receipt = real_receipt(collateral=None)
    with pytest.raises(TypeError, match="now must be an int"):
        verify_receipt(receipt, now=1.5, chain=None)
    with pytest.raises(ValueError, match="needs simulated_root_der"):
        verify_receipt(receipt, now=PINNED_NOW, chain=None, allow_simulated=True)
    with pytest.raises(ValueError, match="kms_root must be"):
        verify_receipt(receipt, now=PINNED_NOW, chain=None, kms_root="58c0675a61Ee15990A64Cdb2B9F618432D23C594")
    with pytest.raises(NotAReceipt, match="format"):
        verify_receipt({"format": "other"}, now=PINNED_NOW, chain=None)


def test_the_public_surface_is_all():
    # auditor.verify is the auditor's front door: every public name it holds from the auditor package is in __all__
    public = {name for name, value in vars(verify_module).items()
              if not name.startswith("_") and (getattr(value, "__module__", None) or "").startswith("auditor.")}
    assert set(verify_module.__all__) == public | {"LINKS"}
