"""The consortium file: `seal init` writes a starter, `seal up --consortium FILE` reads it, and a four-owner study
whose owners the file names runs end to end on the embedded chain, driven as users would (a real `seal up`
process, `seal` commands, a SIMULATED CVM run and `seal verify`). The same study on an external chain is in
tests/test_external_chain.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from eth_account import Account
from typer.testing import CliRunner

from compose.app_compose import build_app_compose, compose_hash, normalized_json_bytes
from compose.manifest import StudyManifest
from compose.stack_file import StackDescription, write_keystore
from cvm.analyses.cohorts import generate_site, write_parquet
from sealing_cli.consortium import (
    CONSORTIUM_FILE,
    STARTER,
    ConsortiumError,
    load_consortium,
    write_starter,
)
from sealing_cli.main import app

runner = CliRunner()
NAMES = ("Charité", "Karolinska", "Mayo", "Riken")
PASSWORD = "owner-password"
COHORTS = ("EU-West", "EU-North", "US-East", "APAC")   # the synthetic cohorts their data is drawn from
YAML = "services:\n  study:\n    image: sealroom/study@sha256:" + "4" * 64 + "\n"
STATS = {"max_rows": 10_000, "queries": [{"kind": "count", "name": "patients"},
                                         {"kind": "mean", "name": "mean_age", "column": "age", "bounds": [18, 95]}]}


# ---- helpers shared with tests/test_external_chain.py -------------------------------------------------------------


def make_owners(folder: Path) -> dict[str, Account]:
    """Four owners with their own keys, each in a keystore under ``folder/keys`` (password PASSWORD)."""
    (folder / "keys").mkdir(parents=True, exist_ok=True)
    owners = {name: Account.create() for name in NAMES}
    for number, account in enumerate(owners.values()):
        write_keystore(account, folder / "keys" / f"owner-{number}.json", PASSWORD)
    return owners


def keystore_of(folder: Path, name: str) -> Path:
    return folder / "keys" / f"owner-{NAMES.index(name)}.json"


def consortium_text(owners: dict[str, Account], *, chain: str = "", study: str = "cardio-2025",
                    threshold: int = 3, budget: float = 2.0) -> str:
    """Charité and Karolinska are named by their keystores, Mayo and Riken by address only."""
    lines = [f'[study]\nname = "{study}"\nthreshold = {threshold}\nepsilon_budget = {budget}\n']
    for number, (name, account) in enumerate(owners.items()):
        where = (f'keystore = "keys/owner-{number}.json"' if number < 2 else f'address = "{account.address}"')
        lines.append(f'[[owners]]\nname = "{name}"\n{where}\n')
    lines.append(chain or '[chain]\nrpc_url = "embedded"\n')
    return "\n".join(lines)


def four_owner_recipe(owners: dict[str, Account], study: str, epsilon: float = 1.0) -> bytes:
    manifest = StudyManifest.model_validate({
        "study": study, "inputs": [{"owner": a.address, "name": name} for name, a in owners.items()],
        "analysis": {"kind": "dp_stats", "params": STATS}, "epsilon": epsilon, "delta": 1e-6,
        "output_type": "aggregate_stats"})
    return normalized_json_bytes(build_app_compose(study, YAML, manifest))


def seal_cli(state: Path, *args: str, env: dict | None = None):
    return runner.invoke(app, [*args, "--state-dir", str(state)],
                         env={"SEAL_KEYSTORE_PASSWORD": PASSWORD, **(env or {})})


def seal_four_datasets(state: Path, folder: Path, owners: dict, app_id: str, h: bytes) -> list[str]:
    """Each owner seals 1,500 synthetic rows with their own key: by name for the keystore owners of the file,
    by --keystore for the owners the file knows by address only."""
    sealed = []
    for number, name in enumerate(owners):
        source = folder / f"site-{number}.parquet"
        write_parquet(generate_site(COHORTS[number], 1_500, seed=number), source)
        out = folder / f"site-{number}.sealed"
        who = ["--owner", name] if number < 2 else ["--keystore", str(keystore_of(folder, name))]
        result = seal_cli(state, "dataset", str(source), "--app-id", app_id, "--compose-hash", h.hex(),
                          "--out", str(out), *who)
        assert result.exit_code == 0, result.output
        sealed.append(str(out))
    return sealed


def run_study(description: StackDescription, endpoint: str, sealed: list[str], receipt: Path):
    return subprocess.run(
        [sys.executable, "-m", "cvm.run", "--sealed", *sealed, "--kms-url", description.services["kms"]["url"],
         "--rpc-url", description.rpc_url, "--dstack-kms", description.dstack_kms, "--out", str(receipt)],
        env={**os.environ, "DSTACK_SIMULATOR_ENDPOINT": endpoint}, capture_output=True, text=True, timeout=300)


def one_error_line(result) -> str:
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    return errors[0]


# ---- seal init ------------------------------------------------------------------------------------------------------


def test_init_writes_a_commented_starter_into_a_new_or_empty_folder_and_replaces_nothing(tmp_path):
    made = runner.invoke(app, ["init", str(tmp_path / "study")])
    assert made.exit_code == 0, made.output
    written = tmp_path / "study" / CONSORTIUM_FILE
    assert written.read_text() == STARTER and STARTER.count("\n#") > 10
    empty = tmp_path / "empty"
    empty.mkdir()
    assert runner.invoke(app, ["init", str(empty)]).exit_code == 0

    written.write_text("# mine\n")
    again = runner.invoke(app, ["init", str(tmp_path / "study")])
    assert again.exit_code == 2 and "already exists" in one_error_line(again)
    assert written.read_text() == "# mine\n"
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("x")
    refused = runner.invoke(app, ["init", str(busy)])
    assert refused.exit_code == 2 and "not empty" in one_error_line(refused)
    assert sorted(p.name for p in busy.iterdir()) == ["notes.txt"]


def test_the_starter_names_its_placeholders_until_they_are_filled_in(tmp_path):
    path = write_starter(tmp_path / "s")
    with pytest.raises(ConsortiumError, match=r"owners #1 \('Hospital A'\) address: is the zero address"):
        load_consortium(path)
    text = path.read_text()
    for number in range(3):
        text = text.replace("0x" + "0" * 40, Account.create().address, 1)
    path.write_text(text)
    consortium = load_consortium(path)
    assert consortium.study == "my-study" and consortium.threshold == 2 and consortium.chain.embedded
    assert [o.name for o in consortium.owners] == ["Hospital A", "Hospital B", "Hospital C"]


# ---- reading and checking the file ----------------------------------------------------------------------------------


@pytest.fixture
def valid(tmp_path):
    owners = make_owners(tmp_path)
    path = tmp_path / CONSORTIUM_FILE
    path.write_text(consortium_text(owners))
    return path, owners


def test_a_valid_file_reads_names_addresses_and_keystores(valid):
    path, owners = valid
    consortium = load_consortium(path)
    assert consortium.study == "cardio-2025" and consortium.threshold == 3 and consortium.epsilon_budget == 2.0
    assert [o.name for o in consortium.owners] == list(NAMES)
    assert [o.address for o in consortium.owners] == [a.address for a in owners.values()]
    assert consortium.owners[0].keystore == (path.parent / "keys" / "owner-0.json").resolve()
    assert consortium.owners[2].keystore is None
    assert consortium.chain.embedded and consortium.chain.confirmations == 0


def _external(deployer: str = 'deployer_keystore = "keys/owner-0.json"', more: str = "") -> str:
    return f'[chain]\nrpc_url = "http://127.0.0.1:8545"\n{deployer}\n{more}'


BAD = [
    # (what is changed: old → new, the field the error must name, words it must say)
    (("threshold = 3", "threshold = 5"), "study.threshold", "from 1 to the number of owners (4)"),
    (("threshold = 3", "threshold = true"), "study.threshold", "whole number"),
    (("threshold = 3\n", ""), "study.threshold", "missing"),
    (("epsilon_budget = 2.0", "epsilon_budget = 0"), "study.epsilon_budget", "above 0"),
    (("epsilon_budget = 2.0", "epsilon_budget = nan"), "study.epsilon_budget", "finite"),
    (("epsilon_budget = 2.0", 'epsilon_budget = "2"'), "study.epsilon_budget", "number"),
    (('name = "cardio-2025"\n', ""), "study.name", "missing"),
    (('name = "cardio-2025"', 'name = "  "'), "study.name", "empty"),
    (("threshold = 3", "threshold = 3\nthresold = 3"), "study.thresold", "unknown field"),
    (("[study]", "[extra]\nx = 1\n[study]"), "extra", "unknown section"),
    (('name = "Mayo"', 'name = "Charité"'), "owners #3 ('Charité') name", "used twice"),
    (('name = "Mayo"', 'name = "0xMayo"'), "owners #3 ('0xMayo') name", "0x"),
    (("keys/owner-0.json", "keys/nobody.json"), "owners #1 ('Charité') keystore", "does not exist"),
    (("keys/owner-0.json", "consortium.toml"), "owners #1 ('Charité') keystore", "not a keystore"),
]


@pytest.mark.parametrize("change, field, words", BAD, ids=[f"{n}-{f}" for n, (_c, f, _w) in enumerate(BAD)])
def test_every_bad_field_is_named(valid, change, field, words):
    path, _owners = valid
    old, new = change
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))
    with pytest.raises(ConsortiumError) as refused:
        load_consortium(path)
    assert f": {field}: " in str(refused.value) or f": {field} " in str(refused.value), str(refused.value)
    assert words in str(refused.value), str(refused.value)


def test_bad_owner_addresses_and_chains_are_named(valid):
    path, owners = valid
    base = path.read_text()
    mayo = owners["Mayo"].address
    broken_checksum = mayo[:-1] + (mayo[-1].lower() if mayo[-1].isupper() else mayo[-1].upper())
    if broken_checksum[-1].isdigit():   # the last digit has no case: change another letter
        index = next(i for i in range(len(mayo) - 1, 1, -1) if mayo[i].isalpha())
        broken_checksum = mayo[:index] + mayo[index].swapcase() + mayo[index + 1:]
    cases = [
        (base.replace(mayo, "0x1234"), "owners #3 ('Mayo') address", "20-byte address"),
        (base.replace(mayo, "0x" + "0" * 40), "owners #3 ('Mayo') address", "zero address"),
        (base.replace(mayo, broken_checksum), "owners #3 ('Mayo') address", "checksum"),
        (base.replace(mayo, owners["Riken"].address), "owners #4 ('Riken') address", "listed twice"),
        (base.replace(f'address = "{owners["Riken"].address}"', ""), "owners #4 ('Riken')", "give the owner's"),
        (base.replace('keystore = "keys/owner-1.json"', f'keystore = "keys/owner-1.json"\naddress = "{mayo}"'),
         "owners #2 ('Karolinska') address", "the keystore holds"),
        (base.split("[[owners]]")[0] + '[chain]\nrpc_url = "embedded"\n', "[[owners]]", "missing"),
        (base.replace('rpc_url = "embedded"', 'rpc_url = "ftp://node"'), "chain.rpc_url", "http(s)://"),
        (base.replace('rpc_url = "embedded"', 'rpc_url = "embedded"\nconfirmations = 2'), "chain.confirmations",
         "external chain only"),
        (base.replace('rpc_url = "embedded"', 'rpc_url = "embedded"\ndeployer_keystore = "keys/owner-0.json"'),
         "chain.deployer_keystore", "external chain only"),
        (base.replace('[chain]\nrpc_url = "embedded"\n', _external(deployer="")), "chain.deployer_keystore",
         "missing"),
        (base.replace('[chain]\nrpc_url = "embedded"\n', _external(more="confirmations = -1")),
         "chain.confirmations", "from 0 to 64"),
        (base.replace('[chain]\nrpc_url = "embedded"\n', _external(more="chain_id = 0")), "chain.chain_id",
         "above 0"),
        (base.replace('[chain]\nrpc_url = "embedded"\n', _external(more="gas = 1")), "chain.gas", "unknown field"),
        (base.replace("[study]", "[study"), "", "not valid TOML"),
    ]
    for text, field, words in cases:
        path.write_text(text)
        with pytest.raises(ConsortiumError) as refused:
            load_consortium(path)
        assert field in str(refused.value) and words in str(refused.value), (field, str(refused.value))
    external = base.replace('[chain]\nrpc_url = "embedded"\n', _external(more="confirmations = 3\nchain_id = 5"))
    path.write_text(external)
    chain = load_consortium(path).chain
    assert (chain.rpc_url, chain.chain_id, chain.confirmations) == ("http://127.0.0.1:8545", 5, 3)
    assert chain.deployer_keystore == (path.parent / "keys" / "owner-0.json").resolve()
    path.write_text(base.replace('[chain]\nrpc_url = "embedded"\n', _external()))
    assert load_consortium(path).chain.confirmations == 2, "an external chain waits 2 blocks unless told"


def test_seal_up_refuses_a_bad_file_with_one_error_line_and_touches_nothing(valid, tmp_path):
    path, _owners = valid
    path.write_text(path.read_text().replace("threshold = 3", "threshold = 9"))
    state = tmp_path / "state"
    result = runner.invoke(app, ["up", "--consortium", str(path), "--state-dir", str(state)])
    assert result.exit_code == 2
    assert "study.threshold" in one_error_line(result)
    assert not state.exists()
    missing = runner.invoke(app, ["up", "--consortium", str(tmp_path / "nope.toml"), "--state-dir", str(state)])
    assert missing.exit_code == 2 and "no such file" in one_error_line(missing)
    mixed = runner.invoke(app, ["up", "--consortium", str(path), "--owners", "3", "--state-dir", str(state)])
    assert mixed.exit_code == 2 and "leave out --owners" in one_error_line(mixed)


def test_an_external_chain_needs_the_deployer_password(valid, tmp_path):
    path, _owners = valid
    text = path.read_text().replace('[chain]\nrpc_url = "embedded"\n', _external())
    path.write_text(text)
    result = runner.invoke(app, ["up", "--consortium", str(path), "--state-dir", str(tmp_path / "state")],
                           env={"SEAL_DEPLOYER_PASSWORD": None})
    assert result.exit_code == 4 and "SEAL_DEPLOYER_PASSWORD" in one_error_line(result)
    wrong = runner.invoke(app, ["up", "--consortium", str(path), "--state-dir", str(tmp_path / "state")],
                          env={"SEAL_DEPLOYER_PASSWORD": "not it"})
    assert wrong.exit_code == 4 and "deployer keystore" in one_error_line(wrong)
    assert not (tmp_path / "state").exists()


# ---- a four-owner study from a consortium file, on the embedded chain ------------------------------------------------


def _wait_for(condition, what, process, timeout_s=120):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert process.poll() is None, process.stdout.read()
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_four_owners_named_in_a_consortium_file_run_a_study_on_the_embedded_chain(tmp_path):
    owners = make_owners(tmp_path)
    path = tmp_path / CONSORTIUM_FILE
    path.write_text(consortium_text(owners, study="cardio-embedded"))
    body = four_owner_recipe(owners, "cardio-embedded")
    compose = tmp_path / "app-compose.json"
    compose.write_bytes(body)
    h = compose_hash(body)
    state = tmp_path / "state"
    seal_bin = Path(sys.executable).parent / "seal"
    up = subprocess.Popen([seal_bin, "up", "--consortium", str(path), "--compose", str(compose), "--state-dir",
                           str(state), "--backend", "process"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
    try:
        _wait_for(lambda: (state / "stack.json").exists() and "api" in StackDescription.load(state).services,
                  "the stack with its API", up)
        d = StackDescription.load(state)
        assert d.study == "cardio-embedded" and d.chain == "embedded" and d.threshold == 3
        assert [(o.name, o.address, o.kind) for o in d.owners] == [
            (name, a.address, "keystore" if i < 2 else "address") for i, (name, a) in enumerate(owners.items())]
        assert not (state / "keystores" / "owner-Charité.json").exists(), "no dev keys for a consortium's owners"

        propose = seal_cli(state, "propose", "--compose-hash", h.hex(), "--keystore",
                           str(keystore_of(tmp_path, "Mayo")))
        assert propose.exit_code == 0, propose.output
        no_key = seal_cli(state, "approve", "--compose-hash", h.hex(), "--owner", "Riken")
        assert no_key.exit_code == 4 and "signs with their own key" in one_error_line(no_key)
        for name in NAMES:   # the file's keystore owners by name, the address-only owners with their own keystore
            who = ["--owner", name] if name in ("Charité", "Karolinska") else [
                "--keystore", str(keystore_of(tmp_path, name))]
            result = seal_cli(state, "approve", "--compose-hash", h.hex(), *who, "--json")
            assert result.exit_code == 0, result.output
            assert json.loads(result.stdout)["by"] == owners[name].address
        status = seal_cli(state, "status", "--compose-hash", h.hex())
        assert status.exit_code == 0 and "4/4 approvals, threshold 3" in status.stdout
        assert "Charité" in status.stdout and "study cardio-embedded" in status.stdout

        sealed = seal_four_datasets(state, tmp_path, owners, d.dstack_app, h)
        _wait_for(lambda: "cvm" in StackDescription.load(state).services, "the CVM to boot", up)
        d = StackDescription.load(state)
        receipt = tmp_path / "attestation.json"
        process = run_study(d, d.services["cvm"]["endpoint"], sealed, receipt)
        assert process.returncode == 0, process.stderr
        record = json.loads(receipt.read_text())
        assert record["chain"]["chain_id"] == d.chain_id and record["chain"]["dstack_app"] == d.dstack_app
        verified = seal_cli(state, "verify", str(receipt), "--allow-simulated", "--json")
        assert verified.exit_code == 0, verified.output
        report = json.loads(verified.stdout)
        assert report["ok"] and report["simulated"]
        onchain = next(link for link in report["links"] if link["name"] == "on-chain")
        assert {a["owner"] for a in onchain["facts"]["approvals"]} == {a.address for a in owners.values()}
        assert seal_cli(state, "down").exit_code == 0
        assert up.wait(timeout=60) == 0
    finally:
        if up.poll() is None:   # a failed check: stop it as `seal down` does, so that it stops its services too
            up.send_signal(signal.SIGTERM)
            try:
                up.wait(timeout=60)
            except subprocess.TimeoutExpired:
                up.send_signal(signal.SIGKILL)
                up.wait()
        up.stdout.close()
    deployment = json.loads((state / "deployment.json").read_text())
    assert deployment["study"] == "cardio-embedded" and deployment["rpc_url"] == ""


def test_the_example_in_docs_deploy_md_is_a_valid_file(tmp_path):
    text = (Path(__file__).resolve().parent.parent / "docs" / "deploy.md").read_text()
    example = text.split("```toml\n", 1)[1].split("```", 1)[0]
    (tmp_path / "keys").mkdir()
    charite, deployer = Account.create(), Account.create()
    write_keystore(charite, tmp_path / "keys" / "charite.json", PASSWORD)
    write_keystore(deployer, tmp_path / "keys" / "deployer.json", PASSWORD)
    (tmp_path / CONSORTIUM_FILE).write_text(example)
    consortium = load_consortium(tmp_path / CONSORTIUM_FILE)
    assert [o.name for o in consortium.owners] == list(NAMES)
    assert consortium.owners[0].address == charite.address
    assert (consortium.chain.chain_id, consortium.chain.confirmations) == (11155111, 2)
