"""The committed contract artifacts are fresh, and the freshness check can fail (contracts/compile.py)."""

from __future__ import annotations

import json

import pytest

from contracts import compile as compile_module
from contracts.compile import (
    ARTIFACT_DIR,
    CONTRACT_NAMES,
    CompileError,
    compile_sources,
    main,
    read_sources,
    render_artifact,
)

# The interface the Python bindings are written against (contracts brief); a rename or a changed
# parameter type changes a selector, so it must show up here first.
DSTACK_APP_ERRORS = {
    "NotOwner(address)",
    "UnknownComposeHash(bytes32)",
    "AlreadyProposed(bytes32)",
    "AlreadyApproved(bytes32,address)",
    "ComposeHashIsRevoked(bytes32)",
    "InvalidSignature()",
    "SignatureExpired(uint256)",
    "NotKmsSigner(address)",
    "ComposeHashNotAllowed(bytes32)",
    "OwnerDidNotApprove(bytes32,address)",
    "BudgetExceeded(uint256,uint256)",
    "ReleaseAlreadyRecorded(bytes32)",
    "EmptyRelease()",
    "InvalidThreshold()",
    "DuplicateOwner(address)",
    "ZeroAddress()",
}
BOOT_INFO = "(address,bytes32,address,bytes32,bytes32,bytes32,bytes32,string,string[])"
DSTACK_APP_FUNCTIONS = {
    "owners()",
    "threshold()",
    "isOwner(address)",
    "kmsSigner()",
    "requireTcbUpToDate()",
    "proposeComposeHash(bytes32,string)",
    "approveComposeHash(bytes32)",
    "approveComposeHashBySig(bytes32,address,uint256,bytes)",
    "revokeComposeHash(bytes32)",
    "hasApproved(bytes32,address)",
    "approvers(bytes32)",
    "composeHashState(bytes32)",
    "allowedComposeHashes(bytes32)",
    "approvalDigest(bytes32,uint256)",
    "DOMAIN_SEPARATOR()",
    f"isAppAllowed({BOOT_INFO})",
    "supportsInterface(bytes4)",
    "epsilonBudget()",
    "epsilonSpent()",
    "epsilonRemaining()",
    "recordRelease(bytes32,bytes32,address[],uint256)",
    "releaseCount()",
    "releaseAt(uint256)",
}
DSTACK_APP_EVENTS = {
    "ComposeHashProposed(bytes32,address,string)",
    "ComposeHashApproved(bytes32,address,uint256)",
    "ComposeHashAdded(bytes32)",
    "ComposeHashRevoked(bytes32,address)",
    "ComposeHashRemoved(bytes32)",
    "BudgetSpent(bytes32,bytes32,address[],uint256,uint256)",
}
DSTACK_KMS_FUNCTIONS = {
    "owner()",
    "kmsInfo()",
    "setKmsInfo((bytes,bytes,bytes,bytes))",
    "registerApp(address)",
    "registeredApps(address)",
    "addOsImageHash(bytes32)",
    "removeOsImageHash(bytes32)",
    "allowedOsImages(bytes32)",
    f"isAppAllowed({BOOT_INFO})",
    "supportsInterface(bytes4)",
}
DSTACK_KMS_ERRORS = {"NotKmsOwner(address)", "NoCodeAtApp(address)"}
DSTACK_KMS_EVENTS = {
    "KmsInfoSet(bytes)",
    "AppRegistered(address)",
    "OsImageHashAdded(bytes32)",
    "OsImageHashRemoved(bytes32)",
}


@pytest.fixture(scope="module")
def fresh() -> dict[str, dict]:
    return compile_sources()


def _abi_type(param: dict) -> str:
    if param["type"].startswith("tuple"):
        return "(" + ",".join(_abi_type(c) for c in param["components"]) + ")" + param["type"][len("tuple") :]
    return param["type"]


def _signatures(abi: list[dict], kind: str) -> set[str]:
    return {
        f"{entry['name']}({','.join(_abi_type(p) for p in entry['inputs'])})" for entry in abi if entry["type"] == kind
    }


def test_committed_artifacts_equal_fresh_compile(fresh):
    for name in CONTRACT_NAMES:
        committed = (ARTIFACT_DIR / f"{name}.json").read_text(encoding="utf-8")
        assert committed == render_artifact(fresh[name]), f"{name}.json is stale: run python -m contracts.compile"


def test_artifact_has_exactly_the_documented_fields(fresh):
    for name, artifact in fresh.items():
        assert set(artifact) == {"contractName", "abi", "bytecode", "deployedBytecode", "immutableReferences",
                                 "storageLayout", "solcVersion", "sourceSha256"}
        assert artifact["deployedBytecode"][2:] in artifact["bytecode"]
        assert artifact["contractName"] == name
        assert artifact["bytecode"].startswith("0x") and len(artifact["bytecode"]) > 2
        assert artifact["solcVersion"].startswith("0.8.37+commit.f401782d")
        assert len(bytes.fromhex(artifact["sourceSha256"])) == 32


def test_render_artifact_is_sorted_indented_and_newline_terminated():
    text = render_artifact({"b": 1, "a": [2]})
    assert text == '{\n "a": [\n  2\n ],\n "b": 1\n}\n'


@pytest.mark.parametrize(
    ("name", "kind", "expected"),
    [
        ("DstackApp", "function", DSTACK_APP_FUNCTIONS),
        ("DstackApp", "error", DSTACK_APP_ERRORS),
        ("DstackApp", "event", DSTACK_APP_EVENTS),
        ("DstackKms", "function", DSTACK_KMS_FUNCTIONS),
        ("DstackKms", "error", DSTACK_KMS_ERRORS),
        ("DstackKms", "event", DSTACK_KMS_EVENTS),
    ],
)
def test_abi_matches_the_agreed_interface(fresh, name, kind, expected):
    assert _signatures(fresh[name]["abi"], kind) == expected


def test_modified_source_changes_its_artifact_only(fresh):
    sources = read_sources()
    original = sources["src/DstackApp.sol"]
    modified = original.replace('"Compose hash revoked"', '"Compose hash withdrawn"')
    assert modified != original
    recompiled = compile_sources({**sources, "src/DstackApp.sol": modified})

    assert recompiled["DstackApp"]["bytecode"] != fresh["DstackApp"]["bytecode"]
    assert recompiled["DstackApp"]["sourceSha256"] != fresh["DstackApp"]["sourceSha256"]
    # DstackKms does not import DstackApp.sol, so its artifact stays fresh.
    assert recompiled["DstackKms"] == fresh["DstackKms"]


def test_main_check_passes_on_fresh_artifacts(fresh, monkeypatch, capsys):
    monkeypatch.setattr(compile_module, "compile_sources", lambda: fresh)
    assert main(["--check"]) == 0
    assert capsys.readouterr().err == ""


def test_main_check_names_the_stale_artifact(fresh, monkeypatch, tmp_path, capsys):
    for name in CONTRACT_NAMES:
        (tmp_path / f"{name}.json").write_text(render_artifact(fresh[name]), encoding="utf-8")
    stale = json.loads((tmp_path / "DstackKms.json").read_text(encoding="utf-8"))
    stale["bytecode"] = stale["bytecode"][:-2] + ("00" if stale["bytecode"][-2:] != "00" else "01")
    (tmp_path / "DstackKms.json").write_text(render_artifact(stale), encoding="utf-8")
    monkeypatch.setattr(compile_module, "compile_sources", lambda: fresh)
    monkeypatch.setattr(compile_module, "ARTIFACT_DIR", tmp_path)

    assert main(["--check"]) == 1
    err = capsys.readouterr().err
    assert "DstackKms.json" in err and "stale" in err
    assert "DstackApp.json" not in err


def test_main_check_reports_a_missing_artifact(fresh, monkeypatch, tmp_path, capsys):
    (tmp_path / "DstackApp.json").write_text(render_artifact(fresh["DstackApp"]), encoding="utf-8")
    monkeypatch.setattr(compile_module, "compile_sources", lambda: fresh)
    monkeypatch.setattr(compile_module, "ARTIFACT_DIR", tmp_path)

    assert main(["--check"]) == 1
    assert "DstackKms.json" in capsys.readouterr().err


def test_main_writes_artifacts(fresh, monkeypatch, tmp_path):
    monkeypatch.setattr(compile_module, "compile_sources", lambda: fresh)
    monkeypatch.setattr(compile_module, "ARTIFACT_DIR", tmp_path / "artifacts")

    assert main([]) == 0
    for name in CONTRACT_NAMES:
        assert (tmp_path / "artifacts" / f"{name}.json").read_text(encoding="utf-8") == render_artifact(fresh[name])


def test_compile_error_carries_solc_diagnostics():
    sources = read_sources()
    broken = {**sources, "src/DstackKms.sol": sources["src/DstackKms.sol"].replace("contract DstackKms", "contract DstackKms {{")}
    with pytest.raises(CompileError, match="ParserError"):
        compile_sources(broken)


def test_compile_error_when_an_expected_contract_is_missing():
    sources = read_sources()
    renamed = {**sources, "src/DstackKms.sol": sources["src/DstackKms.sol"].replace("contract DstackKms", "contract Renamed")}
    with pytest.raises(CompileError, match="no contract named DstackKms"):
        compile_sources(renamed)
