"""The CVM's own refusals of its inputs (cvm/unwrap.py), each with a reason naming the problem, and each before the
KMS is asked: nothing is spent on-chain and nothing is measured into RTMR3.

The good path (tests/test_unwrap.py) is repeated once here as the control for the same stack and files, and to
check the release id the real KMS records against its documented layout."""

from __future__ import annotations

import hashlib
import json

import pyarrow as pa
import pyarrow.csv as pcsv
import pytest
from dstack_sdk import DstackClient
from eth_account import Account
from eth_keys import keys as eth_keys

from compose.app_compose import build_app_compose, compose_hash, normalized_json_bytes
from compose.manifest import StudyManifest
from compose.stack_file import read_keystore
from contracts.chain import DstackApp
from cvm.labels import INPUTS_EVENT
from cvm.sealed import SealedForAnotherRecipe, read_envelope, seal_file
from cvm.unwrap import UnwrapError, unwrap_datasets
from kms_client.client import KmsClient
from sealing_cli.stack import LocalStack

YAML = "services:\n  study:\n    image: sealroom/study@sha256:" + "4" * 64 + "\n"
PARAMS = {"max_rows": 1000, "queries": [{"kind": "count", "name": "n"}]}   # a dp_stats analysis that can run
NAMED_DIGEST = "ab" * 32     # a ciphertext digest the manifest names, which no file sealed for it can have


class Recipe:
    def __init__(self, state, name: str, inputs: list[dict], params: dict = PARAMS):
        manifest = StudyManifest.model_validate({
            "study": name, "inputs": inputs, "analysis": {"kind": "dp_stats", "params": params},
            "epsilon": 0.25, "delta": 1e-6, "output_type": "aggregate_stats"})
        self.body = normalized_json_bytes(build_app_compose(name, YAML, manifest))
        self.path = state / f"{name}.app-compose.json"
        self.path.write_bytes(self.body)
        self.hash = compose_hash(self.body)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    state = tmp_path_factory.mktemp("unwrap-refusals")
    with LocalStack(state, owner_names=("A", "B", "C"), threshold=2, epsilon_budget=1.0) as stack:
        d = stack.description
        owners = {o.name: read_keystore(o.keystore, d.dev_keystore_password) for o in d.owners}
        owners["stranger"] = Account.create()          # signs a file, but is no owner of the DstackApp
        study = DstackApp(stack.chain, d.dstack_app)
        plain = Recipe(state, "refusals", [{"owner": owners[n].address, "name": f"cohort-{n}"} for n in "AB"])
        named = Recipe(state, "refusals-named", [
            {"owner": owners["A"].address, "name": "cohort-A", "ciphertext_sha256": NAMED_DIGEST},
            {"owner": owners["B"].address, "name": "cohort-B"}])
        both = [{"owner": owners[n].address, "name": f"cohort-{n}"} for n in "AB"]
        unfit = Recipe(state, "refusals-unfit", both, params={**PARAMS, "queries": [
            {"kind": "mean", "name": "mean_weight", "column": "weight", "bounds": [0, 200]}]})  # no such column
        cannot_run = Recipe(state, "refusals-cannot-run", both, params={})
        for recipe in (plain, named, unfit, cannot_run):
            study.propose(recipe.hash, "", owners["A"])
            study.approve(recipe.hash, owners["A"])
            study.approve(recipe.hash, owners["B"])

        source = state / "cohort.csv"
        pcsv.write_csv(pa.table({"age": [61, 47, 70] * 4, "egfr": [55.5, 90.1, 38.2] * 4}), source)
        root = d.services["kms"]["root_address"]
        app_id = bytes.fromhex(d.dstack_app[2:])

        def seal(recipe: Recipe, who: str, tag: str = "") -> object:
            with KmsClient(d.services["kms"]["url"]) as kms:
                pub = kms.owner_seal_key(d.dstack_app, recipe.hash, owners[who].address, pinned_root_address=root)
            out = state / f"{recipe.path.stem}-{who}{tag}.sealed"
            seal_file(source, out, app_id=app_id, compose_hash=recipe.hash,
                      owner_key=eth_keys.PrivateKey(bytes(owners[who].key)), owner_seal_pubkey=pub,
                      kms_root_address=root)
            return out

        files = {who: seal(plain, who) for who in ("A", "B", "C", "stranger")}
        files["A-again"] = seal(plain, "A", "-again")
        files["named-A"], files["named-B"] = seal(named, "A"), seal(named, "B")
        for key, recipe in (("unfit", unfit), ("cannot-run", cannot_run)):
            files[f"{key}-A"], files[f"{key}-B"] = seal(recipe, "A"), seal(recipe, "B")
        recipes = {"plain": plain, "named": named, "unfit": unfit, "cannot-run": cannot_run}
        cvms = {key: stack.start_cvm(recipe.path, name=f"cvm-{key}") for key, recipe in recipes.items()}
        yield stack, study, owners, recipes, files, cvms


def refused(world, cvm: str, names: list[str], *, dstack=None, error: type[Exception] = UnwrapError) -> str:
    """Run unwrap_datasets on the files `names` in CVM `cvm`; it must refuse, and nothing may be spent or measured.
    Returns the refusal's message."""
    stack, study, _owners, _recipes, files, cvms = world
    spent = study.budget().spent_micro
    client = DstackClient(cvms[cvm])
    with client, KmsClient(stack.description.services["kms"]["url"]) as kms:
        calls = []
        real_call = kms._call
        kms._call = lambda method, *args: calls.append(method) or real_call(method, *args)
        with pytest.raises(error) as refusal:
            unwrap_datasets([files[n] for n in names], dstack=dstack or client, kms=kms, chain=stack.chain)
        log = json.loads(client.get_quote(b"after a refusal").event_log)
    assert calls == []                                       # the KMS was never asked
    assert study.budget().spent_micro == spent               # so nothing was spent
    assert not [e for e in log if e["event"] == INPUTS_EVENT]  # and no input was measured
    return str(refusal.value)


def test_a_file_signed_by_someone_who_is_no_owner_on_chain_is_refused(world):
    _stack, _study, owners, _recipes, files, _cvms = world
    message = refused(world, "plain", ["A", "B", "stranger"])
    assert files["stranger"].name in message and owners["stranger"].address in message
    assert "not an owner of the study's DstackApp" in message


def test_a_file_of_an_owner_who_is_not_an_input_of_the_manifest_is_refused(world):
    _stack, _study, owners, _recipes, files, _cvms = world
    message = refused(world, "plain", ["A", "B", "C"])
    assert files["C"].name in message and owners["C"].address in message
    assert "is not an input of the study manifest" in message


def test_a_ciphertext_other_than_the_one_the_manifest_names_is_refused(world):
    _stack, _study, _owners, _recipes, files, _cvms = world
    message = refused(world, "named", ["named-A", "named-B"])
    assert files["named-A"].name in message
    assert "is not the ciphertext the manifest names for input 'cohort-A'" in message


@pytest.mark.parametrize("names", [["A", "A-again", "B"], ["A", "B", "A"]], ids=["resealed", "same-file-twice"])
def test_two_files_for_one_input_are_refused(world, names):
    assert "two sealed files given for input 'cohort-A'" in refused(world, "plain", names)


@pytest.mark.parametrize(("names", "missing"), [(["A"], "cohort-B"), (["B"], "cohort-A"), ([], "cohort-A, cohort-B")])
def test_a_missing_input_file_is_refused(world, names, missing):
    assert refused(world, "plain", names).endswith(f"no sealed file given for input(s): {missing}")


def test_a_file_sealed_for_another_recipe_is_refused(world):
    """(A SealedFileError, not an UnwrapError: the owner must seal again, for this recipe.)"""
    _stack, _study, _owners, recipes, files, _cvms = world
    message = refused(world, "plain", ["named-A", "B"], error=SealedForAnotherRecipe)
    assert files["named-A"].name in message and recipes["named"].hash.hex() in message
    assert recipes["plain"].hash.hex() in message


def test_a_file_that_is_not_a_sealed_file_is_refused(world):
    _stack, _study, _owners, _recipes, files, _cvms = world
    broken = files["B"].with_name("broken.sealed")
    data = bytearray(files["B"].read_bytes())
    data[-3] ^= 0x01                                         # inside the tail's signature hex
    broken.write_bytes(bytes(data))
    files["broken"] = broken
    try:
        message = refused(world, "plain", ["A", "broken"])
    finally:
        del files["broken"]
    assert message.startswith("broken.sealed: ")


def test_a_file_whose_payload_was_damaged_is_refused_before_the_spend(world):
    """The envelope and its signature are intact; the payload no longer hashes to the signed ciphertext_sha256."""
    _stack, _study, _owners, _recipes, files, _cvms = world
    damaged = files["B"].with_name("damaged.sealed")
    data = bytearray(files["B"].read_bytes())
    data[read_envelope(files["B"]).payload_offset + 3] ^= 0x01
    damaged.write_bytes(bytes(data))
    files["damaged"] = damaged
    try:
        message = refused(world, "plain", ["A", "damaged"])
    finally:
        del files["damaged"]
    assert message.startswith("damaged.sealed: ") and "ciphertext_sha256" in message


def test_a_file_rewritten_between_its_checks_is_refused(world, monkeypatch):
    """The CVM reads each file through one descriptor; if the bytes behind it change after the envelope was read
    (here: rewritten in place with another valid file of the same owner), the re-hash notices."""
    import cvm.unwrap

    _stack, _study, _owners, _recipes, files, _cvms = world
    swapped = files["A"].with_name("swapped.sealed")
    swapped.write_bytes(files["A"].read_bytes())
    real_check = cvm.unwrap.check_inputs_against_manifest

    def check_then_rewrite(manifest, envelopes):
        real_check(manifest, envelopes)
        with open(swapped, "r+b") as same_inode:
            same_inode.write(files["A-again"].read_bytes())
            same_inode.truncate()

    monkeypatch.setattr(cvm.unwrap, "check_inputs_against_manifest", check_then_rewrite)
    files["swapped"] = swapped
    try:
        message = refused(world, "plain", ["swapped", "B"])
    finally:
        del files["swapped"]
    assert message == "swapped.sealed: the file changed while it was being checked"


def test_inputs_that_do_not_fit_the_analysis_are_refused(world):
    message = refused(world, "unfit", ["unfit-A", "unfit-B"])
    assert message.startswith("the sealed inputs do not fit the study manifest") and "weight" in message


def test_a_manifest_whose_analysis_cannot_run_is_refused(world):
    message = refused(world, "cannot-run", ["cannot-run-A", "cannot-run-B"])
    assert message.startswith("the study manifest cannot run") and "max_rows" in message


def test_an_agent_whose_recipe_does_not_hash_to_its_measured_compose_hash_is_refused(world):
    _stack, _study, _owners, _recipes, _files, cvms = world

    class MisreportingAgent:
        """The real agent, except that Info reports app-compose.json with one byte more."""

        def __init__(self, real):
            self._real = real

        def info(self):
            info = self._real.info()
            tcb = info.tcb_info.model_copy(update={"app_compose": info.tcb_info.app_compose + " "})
            return info.model_copy(update={"tcb_info": tcb})

        def __getattr__(self, name):
            return getattr(self._real, name)

    real = DstackClient(cvms["plain"])
    with real:  # (the SDK's __enter__ returns its async twin, so keep our own reference)
        message = refused(world, "plain", ["A", "B"], dstack=MisreportingAgent(real))
    assert "does not hash to the measured compose hash" in message


def test_the_control_opens_and_the_kms_records_the_documented_release_id(world):
    """The same stack and files, in the right set: they open, and the KMS's release id is
    sha256(b"sealroom-release/v1:" ‖ nonce ‖ compose_hash) over the nonce it handed out."""
    stack, study, _owners, recipes, files, _cvms = world
    spent = study.budget().spent_micro
    nonces = []
    dstack = DstackClient(stack.start_cvm(recipes["plain"].path, name="cvm-control"))   # its own RTMR3
    with dstack, KmsClient(stack.description.services["kms"]["url"]) as kms:
        real_call = kms._call

        def spy(method, *args):
            answer = real_call(method, *args)
            if method == "GetNonce":
                nonces.append(bytes.fromhex(answer.nonce))
            return answer

        kms._call = spy
        inputs = unwrap_datasets([files["B"], files["A"]], dstack=dstack, kms=kms, chain=stack.chain)
    assert sorted(inputs.datasets) == ["cohort-A", "cohort-B"]
    assert study.budget().spent_micro == spent + 250_000
    (nonce,) = nonces
    expected = hashlib.sha256(b"sealroom-release/v1:" + nonce + recipes["plain"].hash).hexdigest()
    assert inputs.release.release_id == expected
