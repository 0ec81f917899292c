"""`seal study …` and `seal analyst-token` on a real local stack with its REST API: tokens issued, rotated, listed
and revoked; recipes written from sealed files, refused with the field named until they are right (and then nothing
is proposed), submitted, run with progress, and their signed results fetched. Plus what needs no stack: the
published JSON Schemas, the recipe examples in docs/recipes.md, and the recipe checks themselves."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from typer.testing import CliRunner

from compose.auth import TOKEN_PREFIX
from compose.client import InvalidRequest, SealroomClient
from compose.recipe import (
    SCHEMA_NAMES,
    RecipeInvalid,
    StarterRefused,
    json_schema,
    load_recipe,
    parse_recipe,
    starter_recipe,
)
from compose.stack_file import read_keystore
from contracts.chain import DstackApp
from cvm.analyses.cohorts import FEATURE_BOUNDS, OUTCOME
from sealing_cli.main import app
from tests.study_world import SITES, STATS_PARAMS, YAML, start_study_stack
from tests.test_backend import seal_inputs

ROOT = Path(__file__).resolve().parent.parent
REFUSED, USAGE, UNREACHABLE, KEY = 1, 2, 3, 4
runner = CliRunner()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    state = tmp_path_factory.mktemp("study-cli")
    with start_study_stack(state, epsilon_budget=3.0) as stack:
        url = stack.start_api()
        d = stack.description
        yield SimpleNamespace(stack=stack, url=url, sd=["--state-dir", str(state)],
                              owners={o.name: read_keystore(o.keystore, d.dev_keystore_password) for o in d.owners},
                              study=DstackApp(stack.chain, d.dstack_app), work=tmp_path_factory.mktemp("analyst"))


def seal(world, *args: str, token: str | None = None):
    env = {"SEAL_API_TOKEN": token} if token is not None else {"SEAL_API_TOKEN": ""}
    return runner.invoke(app, [*args, *world.sd], env=env)


def error_line(result) -> str:
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    return errors[0]


@pytest.fixture(scope="module")
def token(world) -> str:
    issued = seal(world, "analyst-token", "analyst")
    assert issued.exit_code == 0, issued.output
    return issued.stdout.strip()


def approve(world, h: str) -> None:
    for owner in world.owners.values():
        world.study.approve(bytes.fromhex(h), owner)


def stats_recipe(world, study: str, params: dict | None = None) -> str:
    manifest = {"study": study, "inputs": [{"owner": world.owners[n].address, "name": site}
                                           for n, site in SITES.items()],
                "analysis": {"kind": "dp_stats", "params": params or STATS_PARAMS},
                "epsilon": 0.5, "delta": 1e-6, "output_type": "aggregate_stats"}
    return yaml.safe_dump({"name": study, "docker_compose": YAML, "manifest": manifest}, sort_keys=False)


def composes(world, token: str) -> set[str]:
    listed = seal(world, "study", "list", "--json", token=token)
    assert listed.exit_code == 0, listed.output
    return {c["compose_hash"] for c in json.loads(listed.stdout)["composes"]}


# ---- tokens ---------------------------------------------------------------------------------------------------------

def test_analyst_tokens_are_issued_once_rotated_listed_and_revoked(world):
    first = seal(world, "analyst-token", "alice")
    assert first.exit_code == 0, first.output
    assert first.stdout.splitlines() == [first.stdout.strip()] and first.stdout.startswith(TOKEN_PREFIX)
    assert "shown once" in first.stderr
    old = first.stdout.strip()
    assert seal(world, "study", "list", token=old).exit_code == 0

    again = seal(world, "analyst-token", "alice")
    assert again.exit_code == REFUSED and "already holds a token" in error_line(again) and again.stdout == ""
    assert "--rotate" in again.stderr
    rotated = seal(world, "analyst-token", "alice", "--rotate")
    assert rotated.exit_code == 0 and rotated.stdout.strip() != old
    stale = seal(world, "study", "list", token=old)
    assert stale.exit_code == KEY and "not one an analyst holds" in error_line(stale)
    assert seal(world, "study", "list", token=rotated.stdout.strip()).exit_code == 0

    bob = seal(world, "analyst-token", "bob").stdout.strip()
    listed = seal(world, "analyst-token", "--list")
    assert listed.exit_code == 0 and {"alice", "bob"} <= set(listed.stdout.split())
    assert TOKEN_PREFIX not in listed.stdout
    assert {"alice", "bob"} <= set(json.loads(seal(world, "analyst-token", "--list", "--json").stdout)["analysts"])
    revoked = seal(world, "analyst-token", "--revoke", "bob")
    assert revoked.exit_code == 0, revoked.output
    assert seal(world, "study", "list", token=bob).exit_code == KEY
    assert "bob" not in seal(world, "analyst-token", "--list").stdout.split()
    unknown = seal(world, "analyst-token", "--revoke", "nobody")
    assert unknown.exit_code == REFUSED and "no analyst 'nobody'" in error_line(unknown)


@pytest.mark.parametrize("argv", [[], ["alice", "--list"], ["--rotate"], ["--list", "--revoke", "alice"],
                                  ["not a name"]])
def test_analyst_token_usage_errors(world, argv):
    result = seal(world, "analyst-token", *argv)
    assert result.exit_code == USAGE and result.stdout == "", result.output
    error_line(result)


# ---- the analyst's flow: dp_stats ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stats_run(world, token):
    """A dp_stats recipe submitted, approved, sealed for, run and its result fetched, all through `seal study`."""
    recipe = world.work / "stats.yaml"
    recipe.write_text(stats_recipe(world, "cli-stats"))
    checked = seal(world, "study", "submit", str(recipe), "--check", "--json")
    submitted = seal(world, "study", "submit", str(recipe), "--json", token=token)
    assert submitted.exit_code == 0, submitted.output
    h = json.loads(submitted.stdout)["compose_hash"]
    pending = seal(world, "study", "status", h, "--json", token=token)
    approve(world, h)
    sealed = seal_inputs(world.stack, bytes.fromhex(h))
    ran = seal(world, "study", "run", "0x" + h, *map(str, sealed), token=token)
    assert ran.exit_code == 0, ran.output
    run_id = re.search(r"run ([0-9a-f]{16}) started", ran.stderr).group(1)
    return SimpleNamespace(recipe=recipe, h=h, checked=checked, submitted=json.loads(submitted.stdout),
                           pending=pending, sealed=sealed, ran=ran, run_id=run_id)


def test_a_recipe_is_checked_submitted_run_and_its_result_fetched(world, token, stats_run):
    checked = json.loads(stats_run.checked.stdout)
    assert stats_run.checked.exit_code == 0 and checked["valid"] and checked["compose_hash"] == stats_run.h
    assert stats_run.submitted["approval"]["state"] == "pending" and "app_compose" not in stats_run.submitted
    assert json.loads(stats_run.pending.stdout)["approval"]["state"] == "pending"
    assert load_recipe(stats_run.recipe).compose_hash == stats_run.h       # the API built what seal built
    stages = [line.split(": ", 1)[1] for line in stats_run.ran.stderr.splitlines()
              if line.startswith(f"run {stats_run.run_id}: ")]
    assert stages[-1] == "done" and "booting" in stages
    assert f"seal study result {stats_run.run_id}" in stats_run.ran.stdout

    status = seal(world, "study", "status", stats_run.run_id, "--json", token=token)
    view = json.loads(status.stdout)
    assert view["state"] == "done" and view["training"] is None and view["compose_hash"] == stats_run.h
    text = seal(world, "study", "status", stats_run.run_id, token=token)
    assert "stages        queued  booting" in text.stdout and "SIMULATED TDX" in text.stdout

    out = world.work / "stats-attestation.json"
    fetched = seal(world, "study", "result", stats_run.run_id, "--out", str(out), token=token)
    assert fetched.exit_code == 0, fetched.output
    receipt = json.loads(out.read_text())
    assert receipt["envelope"]["compose_hash"] == stats_run.h
    assert "patients (count)" in fetched.stdout and "seal verify" in fetched.stdout and "--allow-simulated" in \
        fetched.stdout
    twice = seal(world, "study", "result", stats_run.run_id, "--out", str(out), token=token)
    assert twice.exit_code == USAGE and "exists" in error_line(twice)
    as_json = json.loads(seal(world, "study", "result", stats_run.run_id, "--out", str(world.work / "r2.json"),
                              "--json", token=token).stdout)
    assert as_json["output_type"] == "aggregate_stats" and as_json["simulated"] is True

    listed = json.loads(seal(world, "study", "list", "--json", token=token).stdout)
    assert stats_run.h in {c["compose_hash"] for c in listed["composes"]}
    assert stats_run.run_id in {r["run_id"] for r in listed["runs"]}
    assert "cli-stats" in seal(world, "study", "list", token=token).stdout


def test_a_recipe_with_an_unknown_setting_or_a_bound_out_of_range_is_refused_and_nothing_is_proposed(world, token):
    before = composes(world, token)
    bad = world.work / "bad.yaml"
    bad.write_text(stats_recipe(world, "cli-bad", {"max_rowz": 10_000, "queries": [
        {"kind": "count", "name": "patients"},
        {"kind": "mean", "name": "mean_age", "column": "age", "bounds": [95, 18]},
        {"kind": "quantile", "name": "q", "column": "age", "bounds": [18, 95], "alpha": 1.5}]}))
    for argv in (["--check"], []):
        refused = seal(world, "study", "submit", str(bad), *argv, token=token)
        assert refused.exit_code == REFUSED, refused.output
        assert "manifest.analysis.params.max_rowz: unknown setting (did you mean 'max_rows'?)" in refused.stderr
        assert "manifest.analysis.params.queries[1].bounds: must be [lower, upper] with lower < upper" in \
            refused.stderr
        assert "manifest.analysis.params.queries[2].alpha" in refused.stderr
        assert "nothing was submitted" in refused.stderr
        error_line(refused)
    typo = world.work / "typo.yaml"
    document = yaml.safe_load(stats_recipe(world, "cli-typo"))
    document["manifest"]["epsilom"] = document["manifest"].pop("epsilon")
    typo.write_text(yaml.safe_dump(document))
    refused = seal(world, "study", "submit", str(typo), token=token)
    assert refused.exit_code == REFUSED and "manifest.epsilom: unknown setting (did you mean 'epsilon'?)" in \
        refused.stderr
    assert composes(world, token) == before                   # nothing reached the API, so nothing on-chain


def test_study_commands_answer_with_the_documented_exit_codes(world, token, stats_run):
    files = [str(p) for p in stats_run.sealed]
    cases = [
        (["study", "list"], "", KEY, "SEAL_API_TOKEN"),
        (["study", "list", "--api", "http://127.0.0.1:9"], token, UNREACHABLE, "did not answer"),
        (["study", "list", "--api", "ftp://x"], token, USAGE, "--api"),
        (["study", "status", "not-a-run"], token, USAGE, "run id"),
        (["study", "status", "0123456789abcdef"], token, REFUSED, "no run"),
        (["study", "status", "ab" * 32, "--wait"], token, USAGE, "--wait"),
        (["study", "status", "ab" * 32], token, REFUSED, "no compose"),
        (["study", "result", "0123456789abcdef", "--out", str(stats_run.recipe.parent / "none.json")], token,
         REFUSED, "no run"),
        (["study", "run", "12" * 32, *files], token, REFUSED, "no compose"),
        (["study", "run", "xyz", *files], token, USAGE, "compose hash"),
        (["study", "submit", str(stats_run.recipe)], token, REFUSED, "already"),   # proposed once only
        (["study", "submit", "/no/such.yaml"], token, USAGE, "does not exist"),
        (["study", "schema", "nope"], token, USAGE, "no schema"),
        (["study", "new", "--from", files[0], "--kind", "fed_round"], token, USAGE, "--kind"),
    ]
    for argv, tok, code, words in cases:
        result = runner.invoke(app, [*argv, *([] if argv[1] == "schema" else world.sd)],
                               env={"SEAL_API_TOKEN": tok})
        assert result.exit_code == code, (argv, result.output)
        assert words.lower() in error_line(result).lower(), (argv, result.stderr)


def test_a_run_on_a_compose_the_owners_have_not_approved_is_refused(world, token, stats_run):
    recipe = world.work / "pending.yaml"
    recipe.write_text(stats_recipe(world, "cli-pending"))
    h = json.loads(seal(world, "study", "submit", str(recipe), "--json", token=token).stdout)["compose_hash"]
    refused = seal(world, "study", "run", h, *map(str, stats_run.sealed), token=token)
    assert refused.exit_code == REFUSED and "does not allow compose" in error_line(refused)


# ---- the analyst's flow: a starter recipe for DP-SGD ---------------------------------------------------------------

def test_a_starter_recipe_is_refused_until_filled_in_then_trains_with_epochs_shown(world, token, stats_run):
    first, second = map(str, stats_run.sealed)
    starter = world.work / "risk.yaml"
    made = seal(world, "study", "new", "--from", first, second, "--kind", "dp_sgd", "--name", "cli-risk",
                "--out", str(starter))
    assert made.exit_code == 0, made.output
    assert "manifest.analysis.params.label" in made.stderr and "manifest.epsilon" in made.stderr
    again = seal(world, "study", "new", "--from", first, "--from", second, "--out", str(starter))
    assert again.exit_code == USAGE and "exists" in error_line(again)
    document = yaml.safe_load(starter.read_text())
    manifest = document["manifest"]
    assert [i["owner"] for i in manifest["inputs"]] == [world.owners[n].address for n in SITES]
    assert set(manifest["analysis"]["params"]["features"]) == {*FEATURE_BOUNDS, OUTCOME}
    assert manifest["analysis"]["params"]["epochs"] == 3 and manifest["output_type"] == "model_weights"

    refused = seal(world, "study", "submit", str(starter), token=token)
    assert refused.exit_code == REFUSED
    for field in ("manifest.epsilon", "manifest.delta", "manifest.analysis.params.label",
                  "manifest.analysis.params.features.age", "docker_compose"):
        assert f"{field}: not filled in: FILL IN" in refused.stderr, field

    # Everything filled in but the label, which would type-check as a string: the API refuses it too.
    params = manifest["analysis"]["params"]
    params["features"] = {name: list(bounds) for name, bounds in FEATURE_BOUNDS.items()}
    params.update(epochs=2, batch_size=256)
    manifest.update(epsilon=1.0, delta=1e-5)
    document["docker_compose"] = YAML
    with SealroomClient(world.url, token) as api:
        with pytest.raises(InvalidRequest) as unfilled:
            api.submit(document)
    assert unfilled.value.field == "analysis.params.label" and "not filled in" in unfilled.value.reason

    params["label"] = OUTCOME
    starter.write_text(yaml.safe_dump(document, sort_keys=False))
    submitted = seal(world, "study", "submit", str(starter), "--json", token=token)
    assert submitted.exit_code == 0, submitted.output
    h = json.loads(submitted.stdout)["compose_hash"]
    approve(world, h)
    sealed = seal_inputs(world.stack, bytes.fromhex(h))
    ran = seal(world, "study", "run", h, *map(str, sealed), "--json", token=token)
    assert ran.exit_code == 0, ran.output
    view = json.loads(ran.stdout)
    assert view["state"] == "done" and view["training"] == {"epochs_done": 2, "epochs": 2}, view
    text = seal(world, "study", "status", view["run_id"], token=token)
    assert "training      epoch 2 of 2" in text.stdout
    result = json.loads(seal(world, "study", "result", view["run_id"], "--out", str(world.work / "risk.json"),
                             "--json", token=token).stdout)
    assert result["output_type"] == "model_weights" and result["payload"]["steps"] > 0


# ---- no stack: schemas, docs examples, recipe checks ----------------------------------------------------------------

@pytest.mark.parametrize("name", SCHEMA_NAMES)
def test_the_published_schemas_are_the_generated_ones(name):
    published = json.loads((ROOT / "docs" / "schemas" / f"{name}.schema.json").read_text())
    assert published == json_schema(name), f"docs/schemas/{name}.schema.json is stale: regenerate it with " \
                                           f"`seal study schema {name}`"
    printed = runner.invoke(app, ["study", "schema", *([] if name == "recipe" else [name])])
    assert printed.exit_code == 0 and json.loads(printed.stdout) == published


def test_the_schemas_carry_each_kinds_params_and_output_type():
    manifest = json_schema("manifest")
    branches = {b["properties"]["kind"]["const"]: b["properties"]["params"]["$ref"]
                for b in manifest["$defs"]["Analysis"]["oneOf"]}
    assert branches == {"dp_stats": "#/$defs/StatsParams", "dp_sgd": "#/$defs/TrainingParams",
                        "fed_round": "#/$defs/RoundContract"}
    rules = {r["if"]["properties"]["analysis"]["properties"]["kind"]["const"]: r["then"]["properties"]
             for r in manifest["allOf"]}
    assert rules["dp_sgd"]["output_type"]["const"] == "model_weights"
    assert rules["dp_sgd"]["delta"] == {"exclusiveMinimum": 0}
    assert json_schema("dp_sgd")["properties"]["epochs"]["default"] == 3
    assert json_schema("dp_stats")["additionalProperties"] is False


def test_the_recipe_examples_in_the_docs_are_valid_recipes(tmp_path):
    blocks = re.findall(r"```yaml\n(.*?)```", (ROOT / "docs" / "recipes.md").read_text(), re.S)
    assert len(blocks) >= 2
    for index, block in enumerate(blocks):
        (tmp_path / f"example-{index}.yaml").write_text(block)
        assert load_recipe(tmp_path / f"example-{index}.yaml").submission.manifest.delta == 1e-6


def test_a_yaml_recipe_reads_1e_minus_6_as_a_number(tmp_path):
    path = tmp_path / "r.yaml"
    owners = {"A": SimpleNamespace(address="0x" + "11" * 20), "B": SimpleNamespace(address="0x" + "22" * 20)}
    fake = SimpleNamespace(owners=owners)
    path.write_text(stats_recipe(fake, "floats").replace("delta: 1.0e-06", "delta: 1e-6"))
    assert "delta: 1e-6" in path.read_text()
    assert load_recipe(path).submission.manifest.delta == 1e-6
    as_json = tmp_path / "r.json"
    as_json.write_text(json.dumps(yaml.safe_load(stats_recipe(fake, "floats"))))
    assert load_recipe(as_json).compose_hash == load_recipe(path).compose_hash
    path.write_text("name: [unclosed\n")
    with pytest.raises(RecipeInvalid, match="not valid YAML"):
        load_recipe(path)


def _envelope(owner: int, columns: tuple[tuple[str, str], ...], rows: int = 100) -> SimpleNamespace:
    schema = tuple(SimpleNamespace(name=name, type=kind) for name, kind in columns)
    return SimpleNamespace(header=SimpleNamespace(owner=bytes([owner]) * 20, schema=schema), rows=rows)


def test_a_starter_needs_inputs_that_can_share_a_recipe():
    columns = (("age", "double"), ("site", "string"), ("outcome", "bool"))
    with pytest.raises(StarterRefused, match="same owner"):
        starter_recipe([("a", _envelope(1, columns)), ("b", _envelope(1, columns))], kind="dp_stats", name="s")
    with pytest.raises(StarterRefused, match="same columns"):
        starter_recipe([("a", _envelope(1, columns)), ("b", _envelope(2, columns[:2]))], kind="dp_stats", name="s")
    with pytest.raises(StarterRefused, match="label and at least one feature"):
        starter_recipe([("a", _envelope(1, (("site", "string"), ("x", "double"))))], kind="dp_sgd", name="s")
    with pytest.raises(StarterRefused, match="fed_round"):
        starter_recipe([("a", _envelope(1, columns))], kind="fed_round", name="s")
    recipe = starter_recipe([("a", _envelope(1, columns)), ("b", _envelope(2, columns))], kind="dp_stats",
                            name="s", image="sealroom/study-runner@sha256:" + "3" * 64)
    queries = recipe["manifest"]["analysis"]["params"]["queries"]
    assert [(q["kind"], q.get("column")) for q in queries] == [("count", None), ("mean", "age"),
                                                               ("histogram", "site")]
    assert "200" in recipe["manifest"]["analysis"]["params"]["max_rows"]     # the rows, as a hint only
    with pytest.raises(RecipeInvalid) as refused:
        parse_recipe(recipe)
    assert {field for field, _ in refused.value.problems} == {
        "manifest.analysis.params.max_rows", "manifest.analysis.params.queries[1].bounds",
        "manifest.analysis.params.queries[2].categories", "manifest.epsilon", "manifest.delta"}
