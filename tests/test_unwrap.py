"""The owners' half of the promise, end to end: a dataset sealed for recipe H opens only inside a CVM measured
as H, only while H stands, and nothing but ciphertext ever touches disk."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.csv as pcsv
import pytest
from dstack_sdk import DstackClient
from typer.testing import CliRunner

from compose.app_compose import build_app_compose, compose_hash, normalized_json_bytes
from compose.manifest import StudyManifest
from compose.stack_file import read_keystore
from contracts.chain import DstackApp
from cvm.labels import INPUTS_EVENT
from cvm.sealed import SealedForAnotherRecipe
from cvm.unwrap import unwrap_datasets
from kms_client.client import KmsClient, KmsRefused
from sealing_cli.main import app as seal_cli
from sealing_cli.stack import LocalStack

YAML = "services:\n  study:\n    image: sealroom/study@sha256:" + "2" * 64 + "\n"
MARKER = "PLAINTEXT-MARKER-7f3a"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    state = tmp_path_factory.mktemp("unwrap")
    with LocalStack(state, owner_names=("A", "B", "C"), threshold=2, epsilon_budget=1.0) as stack:
        d = stack.description
        owners = {o.name: read_keystore(o.keystore, d.dev_keystore_password) for o in d.owners}
        study = DstackApp(stack.chain, d.dstack_app)

        def recipe(epsilon):
            manifest = StudyManifest.model_validate({
                "study": "unwrap-test", "inputs": [{"owner": owners[n].address, "name": f"cohort-{n}"} for n in "AB"],
                "analysis": {"kind": "dp_stats", "params": {"max_rows": 1000, "queries": [{"kind": "count", "name": "n"}]}},
                "epsilon": epsilon, "delta": 1e-6,
                "output_type": "aggregate_stats",
            })
            body = normalized_json_bytes(build_app_compose("unwrap-test", YAML, manifest))
            path = state / f"app-compose-{epsilon}.json"
            path.write_bytes(body)
            return path, compose_hash(body)

        compose_h, h = recipe(0.25)
        compose_h2, h2 = recipe(0.26)   # one byte different in the measured recipe
        compose_h3, h3 = recipe(0.27)   # the recipe the revocation test revokes: its own, so test order is free
        for digest in (h, h2, h3):
            study.propose(digest, "", owners["A"])
            study.approve(digest, owners["A"])
            study.approve(digest, owners["B"])

        def seal_for(digest: bytes) -> dict:
            sealed = {}
            for name in "AB":
                source = state / f"cohort-{name}.csv"
                # 12 rows: the output gate releases a count only above its minimum group size
                table = pa.table({"age": [61, 47, 70] * 4, "egfr": [55.5, 90.1, 38.2] * 4,
                                  "note": [MARKER, "x", "y"] * 4})
                pcsv.write_csv(table, source)
                out = state / f"cohort-{name}-{digest.hex()[:8]}.sealed"
                result = CliRunner().invoke(seal_cli, [
                    "dataset", str(source), "--app-id", d.dstack_app, "--compose-hash", "0x" + digest.hex(),
                    "--out", str(out), "--owner", name, "--state-dir", str(state), "--json"])
                assert result.exit_code == 0, result.output
                sealed[name] = (source, out, json.loads(result.stdout))
            return sealed

        files = seal_for(h)
        yield stack, study, owners, (compose_h, h), (compose_h2, h2), files, (compose_h3, h3, seal_for(h3))


def test_sealed_for_h_opens_in_a_cvm_measured_as_h(world):
    stack, study, _owners, (compose_h, _h), _, files, _ = world
    dstack = DstackClient(stack.start_cvm(compose_h, name="cvm-h"))
    with dstack, KmsClient(stack.description.services["kms"]["url"]) as kms:
        inputs = unwrap_datasets([files["A"][1], files["B"][1]], dstack=dstack, kms=kms, chain=stack.chain)
        log = json.loads(dstack.get_quote(b"after").event_log)
    table = inputs.datasets["cohort-A"].to_arrow()
    assert table.column("note").to_pylist() == [MARKER, "x", "y"] * 4
    assert inputs.release.simulated
    assert inputs.ciphertext_sha256["cohort-B"] == files["B"][2]["ciphertext_sha256"]
    assert study.budget().spent_micro == 250_000
    # the inputs actually opened are now measured: every later quote names them
    assert [e for e in log if e["event"] == INPUTS_EVENT]


def test_same_file_in_a_cvm_measured_as_h_prime_is_refused_and_spends_nothing(world):
    stack, study, _owners, _, (compose_h2, _h2), files, _ = world
    spent = study.budget().spent_micro
    dstack = DstackClient(stack.start_cvm(compose_h2, name="cvm-h2"))
    with dstack, KmsClient(stack.description.services["kms"]["url"]) as kms, \
            pytest.raises(SealedForAnotherRecipe, match="sealed for another recipe"):
        unwrap_datasets([files["A"][1], files["B"][1]], dstack=dstack, kms=kms, chain=stack.chain)
    assert study.budget().spent_micro == spent


def test_after_one_owner_revokes_the_kms_refuses_and_nothing_is_spent(world):
    stack, study, owners, _, _, _, (compose_h3, h3, files) = world
    dstack = DstackClient(stack.start_cvm(compose_h3, name="cvm-h-late"))  # booted while H3 was allowed
    study.revoke(h3, owners["C"])
    spent = study.budget().spent_micro
    with dstack, KmsClient(stack.description.services["kms"]["url"]) as kms, \
            pytest.raises(KmsRefused, match="Compose hash revoked"):
        unwrap_datasets([files["A"][1], files["B"][1]], dstack=dstack, kms=kms, chain=stack.chain)
    assert study.budget().spent_micro == spent


def test_no_plaintext_or_key_material_on_disk_or_in_logs(world):
    stack, _study, owners, _, _, files, _ = world
    inputs = {source for source, _out, _summary in files.values()}
    secrets = [MARKER.encode(), *(o.key for o in owners.values()), *(o.key.hex().encode() for o in owners.values())]
    for path in stack.state_dir.rglob("*"):
        if path.is_file() and path not in inputs and path.suffix != ".sock":
            content = path.read_bytes()
            for secret in secrets:
                assert secret not in content, f"{path.name} holds plaintext or key material"
