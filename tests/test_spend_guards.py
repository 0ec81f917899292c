"""Issue 11, part 3: nothing is spent unless the run can succeed.

The findings, each reproduced against a real local stack (chain, KMS, SIMULATED CVM) and then shown refused
before the KMS is asked, with the on-chain spent budget unchanged:

1. a sealed file with one flipped payload byte: its signed digest was checked only while decrypting, after the
   KMS had recorded the spend (ε = 0.5 for nothing); `seal inspect` still said "signature valid";
2. a misspelt column and an unknown analysis setting: accepted at submission, proposed and approved on-chain,
   and refused only inside the CVM, after the spend.

Then the pure checks the API runs before proposing (``validate_manifest``) and before booting a CVM
(``check_inputs_against_manifest``), field by field, and that their schemas are no looser than the analyses'
own parsers (what passes here must not fail in the CVM after the spend).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import tracemalloc
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pcsv
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from dstack_sdk import DstackClient
from eth_keys import keys as eth_keys
from typer.testing import CliRunner

from compose.app_compose import build_app_compose, compose_hash, normalized_json_bytes
from compose.manifest import (
    InputsDoNotFitManifest,
    ManifestInvalid,
    ManifestRefused,
    StudyManifest,
    check_inputs_against_manifest,
    validate_manifest,
)
from compose.stack_file import read_keystore
from contracts.chain import DstackApp
from cvm.analyses.params import ParamsInvalid, parse_params
from cvm.labels import INPUTS_EVENT
from cvm.sealed.dataset import PayloadDigestMismatch, read_envelope, seal_file, verify_payload
from cvm.sealed.source import SchemaField
from cvm.sealed.stream import hash_stream
from cvm.unwrap import UnwrapError, unwrap_datasets
from kms_client.client import KmsClient
from sealing_cli.main import app as seal_cli
from sealing_cli.stack import LocalStack

YAML = "services:\n  study:\n    image: sealroom/study@sha256:" + "5" * 64 + "\n"
ROWS = 30                      # per owner: 60 in all, so the output gate lets out up to 5 entries per dimension
EPSILON = 0.5
STATS = {"max_rows": 1000, "queries": [{"kind": "count", "name": "patients"},
                                       {"kind": "mean", "name": "mean_age", "column": "age", "bounds": [18, 95]}]}
MISSPELT_COLUMN = {"max_rows": 1000, "queries": [{"kind": "count", "name": "patients"},
                                                 {"kind": "mean", "name": "mean_age", "column": "agee",
                                                  "bounds": [18, 95]}]}
UNKNOWN_SETTING = {"max_rows": 1000, "queries": [{"kind": "count", "name": "patients", "colour": "blue"}]}
runner = CliRunner()


def manifest_for(owners: dict[str, str], params: dict, *, kind: str = "dp_stats", output: str = "aggregate_stats",
                 epsilon: float = EPSILON, delta: float = 1e-6) -> StudyManifest:
    return StudyManifest.model_validate({
        "study": "spend-guards", "inputs": [{"owner": address, "name": f"cohort-{n}"} for n, address in owners.items()],
        "analysis": {"kind": kind, "params": params}, "epsilon": epsilon, "delta": delta, "output_type": output})


def cohort(rows: int = ROWS) -> pa.Table:
    return pa.table({"age": [40 + i % 40 for i in range(rows)], "egfr": [60.5 + i for i in range(rows)]})


def flip_payload_byte(path: Path, out: Path, offset: int = 5) -> Path:
    data = bytearray(path.read_bytes())
    data[read_envelope(path).payload_offset + offset] ^= 0x01
    out.write_bytes(bytes(data))
    return out


# ----------------------------------------------------------------------------------------- the stack


class Recipe:
    def __init__(self, state: Path, name: str, manifest: StudyManifest):
        self.body = normalized_json_bytes(build_app_compose(name, YAML, manifest))
        self.path = state / f"{name}.app-compose.json"
        self.path.write_bytes(self.body)
        self.hash = compose_hash(self.body)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    state = tmp_path_factory.mktemp("spend-guards")
    with LocalStack(state, owner_names=("A", "B"), threshold=2, epsilon_budget=2.0) as stack:
        d = stack.description
        owners = {o.name: read_keystore(o.keystore, d.dev_keystore_password) for o in d.owners}
        addresses = {name: account.address for name, account in owners.items()}
        study = DstackApp(stack.chain, d.dstack_app)
        # Each recipe is proposed and approved by both owners, as the findings describe: the chain has no way to
        # know that a manifest names a column no input has.
        recipes = {name: Recipe(state, name, manifest_for(addresses, params)) for name, params in
                   (("good", STATS), ("misspelt", MISSPELT_COLUMN), ("unknown", UNKNOWN_SETTING))}
        for recipe in recipes.values():
            study.propose(recipe.hash, "", owners["A"])
            study.approve(recipe.hash, owners["A"])
            study.approve(recipe.hash, owners["B"])
        source = state / "cohort.csv"
        pcsv.write_csv(cohort(), source)
        root = d.services["kms"]["root_address"]
        files = {}
        with KmsClient(d.services["kms"]["url"]) as kms:
            for name, recipe in recipes.items():
                for who in ("A", "B"):
                    pub = kms.owner_seal_key(d.dstack_app, recipe.hash, owners[who].address, pinned_root_address=root)
                    files[name, who] = seal_file(
                        source, state / f"{name}-{who}.sealed", app_id=bytes.fromhex(d.dstack_app[2:]),
                        compose_hash=recipe.hash, owner_key=eth_keys.PrivateKey(bytes(owners[who].key)),
                        owner_seal_pubkey=pub, kms_root_address=root).out_path
        files["damaged", "A"] = flip_payload_byte(files["good", "A"], state / "damaged-A.sealed")
        yield stack, study, addresses, recipes, files


def unwrap_in_a_fresh_cvm(world, recipe: str, names: list[tuple[str, str]], cvm: str):
    """unwrap_datasets in a CVM booted for `recipe`: (the outcome or the exception, KMS methods called, RTMR3 log,
    ε spent on-chain by the call in micro-ε)."""
    stack, study, _addresses, recipes, files = world
    before = study.budget().spent_micro
    client = DstackClient(stack.start_cvm(recipes[recipe].path, name=cvm))
    calls: list[str] = []
    with client, KmsClient(stack.description.services["kms"]["url"]) as kms:
        real_call = kms._call
        kms._call = lambda method, *args: calls.append(method) or real_call(method, *args)
        try:
            outcome = unwrap_datasets([files[n] for n in names], dstack=client, kms=kms, chain=stack.chain)
        except Exception as exc:  # noqa: BLE001 - handed to the test to judge
            outcome = exc
        log = json.loads(client.get_quote(b"after").event_log)
    return outcome, calls, log, study.budget().spent_micro - before


def assert_refused_before_any_spend(result, match: str) -> str:
    outcome, calls, log, spent = result
    assert spent == 0, f"ε was spent on-chain ({spent} micro-ε) for a run that could not succeed"
    assert isinstance(outcome, UnwrapError), f"not refused: {outcome!r}"
    assert calls == []                                          # the KMS was never asked for anything
    assert not [e for e in log if e["event"] == INPUTS_EVENT]   # and no input was measured
    assert match in str(outcome), str(outcome)
    return str(outcome)


def test_a_flipped_payload_byte_is_refused_before_any_spend(world):
    """Finding 1. Before the fix: the KMS recorded ε = 0.5 on-chain, then decryption failed and nothing came out."""
    message = assert_refused_before_any_spend(
        unwrap_in_a_fresh_cvm(world, "good", [("damaged", "A"), ("good", "B")], "cvm-damaged"),
        "does not hash to the ciphertext_sha256 its owner signed")
    assert message.startswith("damaged-A.sealed: ")             # the file is named


def test_a_misspelt_column_is_refused_before_any_spend(world):
    """Finding 2a. Before the fix: approved on-chain, ε spent, then `no column 'agee'` inside the analysis."""
    message = assert_refused_before_any_spend(
        unwrap_in_a_fresh_cvm(world, "misspelt", [("misspelt", "A"), ("misspelt", "B")], "cvm-misspelt"),
        "analysis.params.queries[1].column")
    assert "no column 'agee'" in message and "did you mean 'age'?" in message


def test_an_unknown_analysis_setting_is_refused_before_any_spend(world):
    """Finding 2b. Before the fix: approved on-chain, ε spent, then `unexpected keyword argument 'colour'`."""
    message = assert_refused_before_any_spend(
        unwrap_in_a_fresh_cvm(world, "unknown", [("unknown", "A"), ("unknown", "B")], "cvm-unknown"),
        "analysis.params.queries[0].colour: unknown setting")
    assert message.startswith("the study manifest cannot run: ")


def test_the_control_opens_and_spends_once(world):
    """The same stack with the undamaged files and the correct recipe: the checks pass, ε is spent once."""
    outcome, calls, log, spent = unwrap_in_a_fresh_cvm(world, "good", [("good", "A"), ("good", "B")], "cvm-good")
    assert not isinstance(outcome, Exception), outcome
    assert sorted(outcome.datasets) == ["cohort-A", "cohort-B"]
    assert outcome.datasets["cohort-A"].to_arrow().equals(cohort())
    assert spent == EPSILON * 1_000_000
    assert "ReleaseOwnerKeys" in calls and [e for e in log if e["event"] == INPUTS_EVENT]


def test_the_api_checks_refuse_the_findings_before_anything_is_proposed_or_booted(world):
    """What the API runs: validate_manifest on submission (the unknown setting), check_inputs_against_manifest on
    the uploaded files' envelopes at run start (the misspelt column). The good recipe passes both."""
    _stack, _study, addresses, _recipes, files = world
    envelopes = [read_envelope(files["good", who]) for who in ("A", "B")]
    with pytest.raises(ManifestInvalid) as unknown:
        validate_manifest(manifest_for(addresses, UNKNOWN_SETTING))
    assert unknown.value.field == "analysis.params.queries[0].colour"
    misspelt = manifest_for(addresses, MISSPELT_COLUMN)
    validate_manifest(misspelt)                                 # the manifest alone cannot know the columns
    with pytest.raises(InputsDoNotFitManifest) as refused:
        check_inputs_against_manifest(misspelt, envelopes)
    assert refused.value.field == "analysis.params.queries[1].column"
    assert "input 'cohort-A' has no column 'agee' (did you mean 'age'?)" in str(refused.value)
    good = manifest_for(addresses, STATS)
    validate_manifest(good)
    check_inputs_against_manifest(good, envelopes)


# ----------------------------------------------------------------------------------------- seal inspect


@pytest.fixture(scope="module")
def sealed_pair(tmp_path_factory) -> tuple[Path, Path]:
    """A sealed file (no stack needed: a local owner and sealing key) and a copy with one payload byte flipped."""
    folder = tmp_path_factory.mktemp("inspect")
    source = folder / "cohort.csv"
    pcsv.write_csv(cohort(), source)
    good = seal_local(source, folder / "good.sealed", chunk_size=64)
    return good, flip_payload_byte(good, folder / "damaged.sealed", offset=200)


def seal_local(source: Path, out: Path, **options) -> Path:
    return seal_file(source, out, app_id=b"\x11" * 20, compose_hash=hashlib.sha256(b"recipe").digest(),
                     owner_key=eth_keys.PrivateKey(hashlib.sha256(b"owner").digest()),
                     owner_seal_pubkey=X25519PrivateKey.from_private_bytes(b"\x07" * 32).public_key(),
                     kms_root_address="0x" + "22" * 20, now=datetime(2026, 5, 1, tzinfo=UTC), **options).out_path


def test_seal_inspect_rehashes_the_payload_by_default(sealed_pair):
    good, _damaged = sealed_pair
    result = runner.invoke(seal_cli, ["inspect", str(good)])
    assert result.exit_code == 0, result.output
    assert "signature          valid" in result.stdout
    assert "payload            valid: the ciphertext matches the signed ciphertext_sha256" in result.stdout
    record = json.loads(runner.invoke(seal_cli, ["inspect", str(good), "--json"]).stdout)
    assert record["signature"] == "valid" and record["payload"] == "valid"


def test_seal_inspect_reports_a_damaged_payload_with_exit_1(sealed_pair):
    """Finding 1, the owner's side. Before the fix: exit 0 and "signature valid" for this file."""
    _good, damaged = sealed_pair
    for extra in ([], ["--json"]):
        result = runner.invoke(seal_cli, ["inspect", str(damaged), *extra])
        assert result.exit_code == 1, result.output
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and str(damaged) in errors[0]
        assert "does not hash to the ciphertext_sha256 its owner signed" in result.stderr
        assert "valid" not in result.stdout


def test_seal_inspect_quick_says_the_payload_was_not_checked(sealed_pair):
    _good, damaged = sealed_pair
    result = runner.invoke(seal_cli, ["inspect", str(damaged), "--quick"])
    assert result.exit_code == 0, result.output                # --quick cannot see payload damage, by design
    assert "payload            NOT CHECKED (--quick)" in result.stdout
    assert json.loads(runner.invoke(seal_cli, ["inspect", str(damaged), "--quick", "--json"]).stdout)[
        "payload"] == "not checked"


# ----------------------------------------------------------------------------------------- verify_payload


def test_verify_payload_finds_every_flipped_payload_byte_and_only_those(sealed_pair):
    good, _damaged = sealed_pair
    data = good.read_bytes()
    envelope = read_envelope(good)
    assert verify_payload(io.BytesIO(data)) == envelope
    start = envelope.payload_offset
    end = start + envelope.header.plaintext_bytes + 16 * envelope.header.chunk_count
    for position in (start, start + 1, (start + end) // 2, end - 1):
        changed = bytearray(data)
        changed[position] ^= 0x80
        with pytest.raises(PayloadDigestMismatch, match=envelope.ciphertext_sha256.hex()):
            verify_payload(io.BytesIO(bytes(changed)))


def test_hash_stream_is_sha256_whatever_the_buffer_size():
    data = bytes(range(256)) * 41
    for size in (1, 7, 256, len(data), 1 << 20):
        source = io.BytesIO(b"head" + data + b"tail")
        source.seek(4)
        assert hash_stream(source, len(data), buffer_size=size) == hashlib.sha256(data).digest()
        assert source.tell() == 4 + len(data)


def test_verify_payload_memory_does_not_grow_with_the_file(tmp_path):
    source = tmp_path / "big.csv"
    row = b"123456789,0.123456789,abcdefghij\n"
    with source.open("wb") as out:
        out.write(b"id,value,tag\n")
        for _ in range((40 << 20) // (len(row) * 4096)):
            out.write(row * 4096)
    sealed = seal_local(source, tmp_path / "big.sealed")
    size = sealed.stat().st_size
    tracemalloc.start()
    try:
        verify_payload(sealed)
        _now, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert size > 35 << 20 and peak < 10 << 20, (size, peak)   # two 4 MiB buffers, not the file


# ----------------------------------------------------------------------------------------- the validators


OWNERS = {"A": "0x" + "aa" * 20, "B": "0x" + "bb" * 20}


@dataclass
class FakeHeader:
    owner: bytes
    schema: tuple[SchemaField, ...]


@dataclass
class FakeEnvelope:
    header: FakeHeader
    rows: int


def envelope(who: str, columns: dict[str, str], rows: int = ROWS) -> FakeEnvelope:
    schema = tuple(SchemaField(name, kind) for name, kind in columns.items())
    return FakeEnvelope(FakeHeader(bytes.fromhex(OWNERS[who][2:]), schema), rows)


COLUMNS = {"site": "string", "age": "double", "visits": "int64", "smoker": "bool"}
INPUTS = [envelope("A", COLUMNS), envelope("B", COLUMNS)]


def refusal(params: dict, **manifest) -> ManifestRefused:
    with pytest.raises(ManifestRefused) as refused:
        check_inputs_against_manifest(manifest_for(OWNERS, params, **manifest), INPUTS)
    return refused.value


def mean(column: str = "age", **fields) -> dict:
    return {"kind": "mean", "name": "m", "column": column, "bounds": [18, 95], **fields}


@pytest.mark.parametrize(("params", "field", "reason"), [
    ({"max_rows": 100, "queries": [mean(colum="age")]}, "analysis.params.queries[0].colum",
     "unknown setting (did you mean 'column'?)"),
    ({"max_rows": 100, "queries": [mean()], "noise": 2}, "analysis.params.noise", "unknown setting"),
    ({"max_rows": 100, "queries": [mean(bounds=[95, 18])]}, "analysis.params.queries[0].bounds", "lower < upper"),
    ({"max_rows": 100, "queries": [mean(bounds=[18])]}, "analysis.params.queries[0].bounds", "at least 2"),
    ({"max_rows": 100, "queries": [mean(bounds=["18", 95])]}, "analysis.params.queries[0].bounds[0]",
     "valid number"),
    ({"max_rows": 100, "queries": [{"kind": "sum", "name": "s", "column": "age"}]},
     "analysis.params.queries[0].bounds", "required setting is missing"),
    ({"max_rows": 0, "queries": [mean()]}, "analysis.params.max_rows", "greater than or equal to 1"),
    ({"max_rows": 10.5, "queries": [mean()]}, "analysis.params.max_rows", "valid integer"),
    ({"max_rows": True, "queries": [mean()]}, "analysis.params.max_rows", "valid integer"),
    ({"max_rows": 100, "queries": [mean(kind="median")]}, "analysis.params.queries[0].kind",
     "unknown query kind 'median'"),
    ({"max_rows": 100, "queries": [mean(kind="quantile", alpha=1.5)]}, "analysis.params.queries[0].alpha",
     "less than or equal to 1"),
    ({"max_rows": 100, "queries": [mean(kind="quantile", candidates=1)]}, "analysis.params.queries[0].candidates",
     "greater than or equal to 2"),
    ({"max_rows": 100, "queries": [{"kind": "histogram", "name": "h", "column": "age", "edges": [3, 2]}]},
     "analysis.params.queries[0].edges", "strictly increasing"),
    ({"max_rows": 100, "queries": [{"kind": "histogram", "name": "h", "column": "age"}]},
     "analysis.params.queries[0]", "either edges or categories"),
    ({"max_rows": 100, "queries": [{"kind": "histogram", "name": "h", "column": "site", "categories": ["a", 1]}]},
     "analysis.params.queries[0].categories", "all strings or all integers"),
    ({"max_rows": 100, "queries": [mean(), mean()]}, "analysis.params.queries[1].name", "used twice"),
    ({"max_rows": 100, "queries": []}, "analysis.params.queries", "non-empty list"),
    ({"max_rows": 100}, "analysis.params.queries", "required"),
])
def test_a_bad_dp_stats_setting_is_refused_with_the_field_named(params, field, reason):
    refused = refusal(params)
    assert isinstance(refused, ManifestInvalid)
    assert refused.field == field and reason in str(refused), str(refused)


@pytest.mark.parametrize(("overrides", "field", "reason"), [
    ({"lr": 0.1}, "analysis.params.lr", "unknown setting"),
    ({"features": {"age": [95, 18]}}, "analysis.params.features.age", "lower < upper"),
    ({"features": {"age": None}}, "analysis.params.features.age", "valid list"),
    ({"features": {}}, "analysis.params.features", "at least 1 item"),
    ({"label": "age"}, "analysis.params.label", "must not also be a feature"),
    ({"model": "forest"}, "analysis.params.model", "'logistic' or 'mlp'"),
    ({"epochs": 0}, "analysis.params.epochs", "greater than or equal to 1"),
    ({"batch_size": True}, "analysis.params.batch_size", "valid integer"),
    ({"learning_rate": -1.0}, "analysis.params.learning_rate", "greater than 0"),
    ({"held_out_fraction": 1.0}, "analysis.params.held_out_fraction", "less than 1"),
])
def test_a_bad_dp_sgd_setting_is_refused_with_the_field_named(overrides, field, reason):
    params = {"features": {"age": [18, 95]}, "label": "smoker", **overrides}
    refused = refusal(params, kind="dp_sgd", output="model_weights")
    assert isinstance(refused, ManifestInvalid)
    assert refused.field == field and reason in str(refused), str(refused)


def test_the_output_type_must_be_what_the_kind_releases_and_dp_sgd_needs_delta():
    refused = refusal({"max_rows": 100, "queries": [mean()]}, output="model_weights")
    assert refused.field == "output_type" and "releases 'aggregate_stats'" in str(refused)
    refused = refusal({"features": {"age": [18, 95]}, "label": "smoker"}, kind="dp_sgd", output="model_weights",
                      delta=0.0)
    assert refused.field == "delta" and "delta > 0" in str(refused)


@pytest.mark.parametrize(("params", "field", "reason"), [
    ({"max_rows": 100, "queries": [mean("agee")]}, "analysis.params.queries[0].column",
     "input 'cohort-A' has no column 'agee' (did you mean 'age'?)"),
    ({"max_rows": 100, "queries": [mean("site")]}, "analysis.params.queries[0].column",
     "column 'site' of input 'cohort-A' is string; the analysis needs numeric values"),
    ({"max_rows": 100, "queries": [mean("smoker")]}, "analysis.params.queries[0].column", "is bool"),
    ({"max_rows": 100, "queries": [{"kind": "histogram", "name": "h", "column": "age", "categories": ["x"]}]},
     "analysis.params.queries[0].column", "needs string values"),
    ({"max_rows": 100, "queries": [{"kind": "histogram", "name": "h", "column": "site", "categories": [1, 2]}]},
     "analysis.params.queries[0].column", "needs integer values"),
    ({"max_rows": 59, "queries": [mean()]}, "analysis.params.max_rows", "hold 60 rows (cohort-A 30, cohort-B 30), "
     "more than max_rows 59"),
    ({"max_rows": 100, "queries": [{"kind": "histogram", "name": "h", "column": "age", "edges": [20, 40, 60, 80]}]},
     "analysis.params", "would have 6 entries along one dimension, and the output gate lets out at most 5"),
    ({"features": {"age": [18, 95], "egfr": [5, 140]}, "label": "smoker"}, "analysis.params.features.egfr",
     "no column 'egfr'"),
    ({"features": {"age": [18, 95]}, "label": "site"}, "analysis.params.label", "needs numeric or boolean values"),
])
def test_inputs_that_do_not_fit_the_manifest_are_refused_with_the_field_named(params, field, reason):
    kind = "dp_sgd" if "features" in params else "dp_stats"
    refused = refusal(params, kind=kind, output="model_weights" if kind == "dp_sgd" else "aggregate_stats")
    assert isinstance(refused, InputsDoNotFitManifest)
    assert refused.field == field and reason in str(refused), str(refused)


def test_inputs_must_be_one_per_manifest_input_with_the_same_columns():
    manifest = manifest_for(OWNERS, {"max_rows": 100, "queries": [mean()]})
    check_inputs_against_manifest(manifest, INPUTS)
    with pytest.raises(InputsDoNotFitManifest, match=r"inputs\[1\]: no sealed file given for input 'cohort-B'"):
        check_inputs_against_manifest(manifest, INPUTS[:1])
    with pytest.raises(InputsDoNotFitManifest, match="two sealed files given for input 'cohort-A'"):
        check_inputs_against_manifest(manifest, [INPUTS[0], INPUTS[0], INPUTS[1]])
    reordered = envelope("B", dict(reversed(COLUMNS.items())))
    with pytest.raises(InputsDoNotFitManifest, match="same columns, in the same order, with the same types") as bad:
        check_inputs_against_manifest(manifest, [INPUTS[0], reordered])
    assert bad.value.field == "inputs[1]"
    with pytest.raises(InputsDoNotFitManifest, match="reads no sealed files"):
        check_inputs_against_manifest(manifest_for(OWNERS, _round_contract(), kind="fed_round",
                                                   output="round_record"), INPUTS)


def _round_contract() -> dict:
    return {"round": 1, "parent_digest": "0" * 64, "eligible_sites": list(OWNERS.values()), "local_epochs": 1,
            "local_batch_size": 32, "clip_norm": 1.0, "noise_multiplier": 1.0, "aggregator": "fedavg",
            "min_participants": 2, "deadline": 2_000_000_000, "epsilon_per_round": 0.5, "epsilon_total": 1.0,
            "delta": 1e-5}


def test_a_round_contract_is_checked_against_its_own_schema():
    validate_manifest(manifest_for(OWNERS, _round_contract(), kind="fed_round", output="round_record"))
    with pytest.raises(ManifestInvalid) as refused:
        validate_manifest(manifest_for(OWNERS, {**_round_contract(), "clip": 1.0}, kind="fed_round",
                                       output="round_record"))
    assert refused.value.field == "analysis.params.clip"


# ----------------------------------------------------------------------------------------- no looser than the CVM


# Every refusal the analyses' own parsers make (tests/test_dp_stats.py, tests/test_dpsgd.py), in manifest JSON.
STATS_REFUSED = [
    {"max_rows": 10, "queries": []},
    {"max_rows": 10, "queries": [{"kind": "median", "name": "q"}]},
    {"max_rows": 10, "queries": [{"kind": "count", "name": "a"}, {"kind": "count", "name": "a"}]},
    {"max_rows": 0, "queries": [{"kind": "count", "name": "a"}]},
    {"max_rows": 10, "queries": [{"kind": "count", "name": "a", "colour": "x"}]},
    {"max_rows": 10, "queries": [{"kind": "sum", "name": "s", "column": "x", "bounds": [5, 1]}]},
    {"max_rows": 10, "queries": [{"kind": "histogram", "name": "h", "column": "x", "edges": [2, 1]}]},
    {"max_rows": 10, "queries": [{"kind": "histogram", "name": "h", "column": "x", "edges": [1], "categories": [1]}]},
    {"max_rows": 10, "queries": [{"kind": "histogram", "name": "h", "column": "x", "categories": [1, "a"]}]},
    {"max_rows": 10, "queries": [{"kind": "quantile", "name": "q", "column": "x", "bounds": [0, 1], "alpha": 2}]},
    *({"max_rows": 10, "queries": [query]} for query in (
        {"kind": "sum", "name": "q", "column": "sbp"}, {"kind": "mean", "name": "q", "column": "sbp"},
        {"kind": "quantile", "name": "q", "column": "sbp", "alpha": 0.5}, {"kind": "histogram", "name": "q",
                                                                            "column": "sbp"},
        {"kind": "sum", "name": "q", "column": "sbp", "bounds": None},
        {"kind": "histogram", "name": "h", "column": "x", "categories": [True, False]},
        {"kind": "quantile", "name": "q", "column": "x", "bounds": [0, 1], "candidates": True},
        {"kind": "count", "name": ""})),
]
STATS_ACCEPTED = [
    STATS,
    {"max_rows": 1, "queries": [{"kind": "sum", "name": "s", "column": "x", "bounds": [-1.5, 2]}]},
    {"max_rows": 10, "queries": [
        {"kind": "quantile", "name": "q", "column": "x", "bounds": [0, 1]},
        {"kind": "quantile", "name": "q9", "column": "x", "bounds": [0, 1], "alpha": 0.9, "candidates": 2},
        {"kind": "histogram", "name": "h", "column": "x", "edges": [1, 2.5]},
        {"kind": "histogram", "name": "c", "column": "y", "categories": ["a", "b"]},
        {"kind": "histogram", "name": "i", "column": "z", "categories": [3, 1]}]},
]


@pytest.mark.parametrize("params", STATS_REFUSED)
def test_what_the_stats_parser_refuses_the_schema_refuses(params):
    from cvm.analyses.stats import StatsRequest

    with pytest.raises(ValueError):
        StatsRequest.from_params(params)
    with pytest.raises(ParamsInvalid):
        parse_params("dp_stats", params)


@pytest.mark.parametrize("params", STATS_ACCEPTED)
def test_what_the_schema_accepts_the_stats_parser_accepts(params):
    from cvm.analyses.stats import StatsRequest

    parsed = parse_params("dp_stats", params)
    request = StatsRequest.from_params(params)
    assert [q.name for q in request.queries] == [q.name for q in parsed.queries]


def test_what_the_training_parser_refuses_the_schema_refuses_and_the_reverse():
    from cvm.analyses.dpsgd import TrainingSpec

    base = {"features": {"age": [18, 95]}, "label": "y"}
    for overrides in ({"features": {}}, {"features": {"age": [95, 18]}}, {"features": {"age": None}},
                      {"features": {"age": [18, math.inf]}}, {"label": "age"}, {"label": ""},
                      {"model": "forest"}, {"epochs": 0}, {"hidden_units": 1.5}, {"batch_size": True},
                      {"learning_rate": -1.0}, {"max_grad_norm": 0}, {"held_out_fraction": 1.0}, {"noise": 0.0}):
        params = {**base, **overrides}
        with pytest.raises(ValueError):
            TrainingSpec.from_params(params)
        with pytest.raises(ParamsInvalid):
            parse_params("dp_sgd", params)
    for params in (base, {"features": {"age": [18, 95], "sbp": [80.5, 230]}, "label": "y", "model": "mlp",
                          "hidden_units": 4, "epochs": 1, "batch_size": 16, "learning_rate": 1,
                          "max_grad_norm": 0.5, "held_out_fraction": 0.5}):
        parse_params("dp_sgd", params)
        TrainingSpec.from_params(params)


@pytest.mark.parametrize("rows", [10, 19, 20, 40])
def test_the_predicted_gate_refusal_is_the_gate_s_own(rows):
    """check_inputs_against_manifest refuses too few rows exactly when the output gate would refuse the result."""
    from cvm.analyses import OutputGate, OutputRefused, PrivacyLoss, StatsRequest, run_dp_stats

    params = {"max_rows": 100, "queries": [{"kind": "count", "name": "n"},
                                           {"kind": "mean", "name": "m", "column": "age", "bounds": [18, 95]}]}
    half = rows // 2
    inputs = [envelope("A", COLUMNS, half), envelope("B", COLUMNS, rows - half)]
    try:
        check_inputs_against_manifest(manifest_for(OWNERS, params), inputs)
        predicted = True
    except InputsDoNotFitManifest:
        predicted = False
    result = run_dp_stats(pa.table({"age": [50.0] * rows}), StatsRequest.from_params(params), PrivacyLoss(1.0, 1e-6))
    try:
        OutputGate("aggregate_stats", 1.0, 1e-6, input_rows=rows).release(result)
        released = True
    except OutputRefused:
        released = False
    assert predicted == released
