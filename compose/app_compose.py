"""app-compose.json for a study, its compose hash, and reading the study manifest back out of it.

docs/design.md §1 and "dstack formats: Compose hash and RTMR3". dstack measures ``sha256`` of the exact bytes of
app-compose.json; these bytes are produced once, with dstack's normalised JSON (keys sorted recursively,
separators ``,``/``:``, UTF-8 unescaped, NaN/±Inf as null, top-level ``None`` fields dropped — the same
rules as ``dstack_sdk.get_compose_hash``), and then shipped verbatim, never re-serialised.

The study manifest is embedded in the measured bytes as a docker-compose ``configs`` entry named
``sealroom_study`` whose ``content`` is the manifest's normalised JSON, mounted read-only into the study
service at ``/etc/sealroom/study.json``. Changing any byte of the manifest changes the compose hash.

Errors::

    ComposeError                  base of this module's outcomes
    └── InvalidAppCompose(reason) bytes that are not a Sealroom app-compose.json with a valid manifest

Caller mistakes (bad YAML handed to the builder, wrong argument types) raise ``ValueError``/``TypeError``.
JSON and YAML are parsed through ``compose.safe_parse``: nested deeper than 64 levels, they are refused before a
recursive parser sees them (``InvalidAppCompose`` when reading; ``safe_parse.TooDeeplyNested``, a ``ValueError``,
from the builder).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from typing import Any

import yaml
from pydantic import ValidationError

from compose import safe_parse
from compose.manifest import StudyManifest

__all__ = [
    "MANIFEST_CONFIG_NAME",
    "MANIFEST_MOUNT_PATH",
    "ComposeError",
    "InvalidAppCompose",
    "normalized_json_bytes",
    "compose_hash",
    "build_app_compose",
    "manifest_from_app_compose",
]

MANIFEST_CONFIG_NAME = "sealroom_study"
MANIFEST_MOUNT_PATH = "/etc/sealroom/study.json"

# The settings every Sealroom compose carries (dstack AppCompose fields). Keys come only from the KMS,
# nothing is reachable from outside, and logs and system info stay private: analysis output leaves
# only through the output gate. manifest_from_app_compose refuses a compose that differs.
_REQUIRED_SETTINGS: dict[str, Any] = {
    "manifest_version": 2,
    "runner": "docker-compose",
    "kms_enabled": True,
    "key_provider": "kms",
    "local_key_provider_enabled": False,
    "gateway_enabled": False,
    "public_logs": False,
    "public_sysinfo": False,
    "allowed_envs": [],
    "no_instance_id": False,
    "secure_time": False,
}
# Scripts dstack runs in the CVM outside the containers; a study needs none, so none may be smuggled in.
_FORBIDDEN_FIELDS = ("pre_launch_script", "init_script", "bash_script")


class ComposeError(Exception):
    """Base of the outcomes of this module."""


class InvalidAppCompose(ComposeError):
    """The bytes are not a Sealroom app-compose.json carrying a valid study manifest."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _nan_to_null(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {key: _nan_to_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nan_to_null(item) for item in value]
    return value


def normalized_json_bytes(obj: Mapping[str, Any]) -> bytes:
    """dstack's normalised JSON of an app-compose mapping, as UTF-8 bytes (docs/normalized-app-compose.md).

    NaN/±Inf become ``null`` at any depth, then top-level ``None`` fields are dropped (both as
    dstack-sdk's ``AppCompose`` does for a dict); keys are sorted recursively, separators are ``,`` and
    ``:``, non-ASCII is written as UTF-8.
    """
    if not isinstance(obj, Mapping):
        raise TypeError("an app-compose must be a mapping")
    # dstack-sdk turns top-level NaN/±Inf into None first and then drops None fields; do the same.
    present = {key: value for key, value in _nan_to_null(obj).items() if value is not None}
    text = json.dumps(present, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return text.encode("utf-8")


def compose_hash(app_compose_bytes: bytes) -> bytes:
    """The 32-byte compose hash: ``sha256`` of exactly these app-compose.json bytes (dstack's measure_app_info)."""
    if not isinstance(app_compose_bytes, bytes):
        raise TypeError("app_compose_bytes must be bytes")
    return hashlib.sha256(app_compose_bytes).digest()


def _manifest_text(manifest: StudyManifest) -> str:
    return normalized_json_bytes(manifest.model_dump(mode="json")).decode("utf-8")


def _pick_study_service(services: dict[str, Any], study_service: str | None) -> dict[str, Any]:
    if study_service is None:
        if len(services) != 1:
            raise ValueError("the compose has several services; name the one that runs the study (study_service=)")
        (study_service,) = services
    service = services.get(study_service)
    if not isinstance(service, dict):
        raise ValueError(f"no service named {study_service!r} in the compose")
    return service


def build_app_compose(
    name: str, docker_compose_yaml: str, manifest: StudyManifest, *, study_service: str | None = None
) -> dict[str, Any]:
    """A dstack app-compose (manifest_version 2) for one study, with the manifest inside the measured YAML.

    ``docker_compose_yaml`` is the analyst's compose; the manifest is added as the top-level config
    ``sealroom_study`` and mounted into ``study_service`` (which may be omitted when there is one service).
    The YAML is re-emitted by PyYAML, so comments in the input are not kept. Serialise the result with
    :func:`normalized_json_bytes` once and ship those bytes verbatim.
    """
    if not isinstance(name, str) or not name:
        raise ValueError("name must be a non-empty string")
    if not isinstance(manifest, StudyManifest):
        raise TypeError("manifest must be a StudyManifest")
    try:
        document = safe_parse.load_yaml(docker_compose_yaml)
    except safe_parse.TooDeeplyNested:
        raise  # a ValueError too, told apart so that a service can answer it as a refused size, not a typo
    except yaml.YAMLError as exc:
        raise ValueError(f"docker_compose_yaml is not valid YAML: {exc}") from exc
    if not isinstance(document, dict) or not isinstance(document.get("services"), dict) or not document["services"]:
        raise ValueError("docker_compose_yaml must be a mapping with at least one service under 'services'")
    configs = document.get("configs") or {}
    if not isinstance(configs, dict):
        raise ValueError("the top-level 'configs' must be a mapping")
    if MANIFEST_CONFIG_NAME in configs:
        raise ValueError(f"docker_compose_yaml must not define the config {MANIFEST_CONFIG_NAME!r} itself")
    service = _pick_study_service(document["services"], study_service)
    service_configs = service.get("configs") or []
    if not isinstance(service_configs, list):
        raise ValueError("the study service's 'configs' must be a list")

    configs[MANIFEST_CONFIG_NAME] = {"content": _manifest_text(manifest)}
    document["configs"] = configs
    service["configs"] = [*service_configs, {"source": MANIFEST_CONFIG_NAME, "target": MANIFEST_MOUNT_PATH}]
    # A very wide line width keeps the manifest JSON on one line instead of folding it.
    docker_compose_file = yaml.safe_dump(document, sort_keys=False, allow_unicode=True, width=2**30)
    return {"name": name, "docker_compose_file": docker_compose_file, **_REQUIRED_SETTINGS}


def _refuse_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    duplicates = sorted({key for key in keys if keys.count(key) > 1})
    if duplicates:
        raise InvalidAppCompose(f"duplicate JSON keys {duplicates}")
    return dict(pairs)


def _strict_json(text: str, what: str) -> Any:
    try:
        return safe_parse.loads(text, object_pairs_hook=_refuse_duplicate_keys)
    except ValueError as exc:  # JSONDecodeError (JsonTooDeep is one), or an int of more than 4300 digits
        raise InvalidAppCompose(f"{what} is not valid JSON: {exc}") from exc


def _mounts_manifest(service: Any) -> bool:
    entries = service.get("configs", []) if isinstance(service, dict) else []
    return any(
        entry == MANIFEST_CONFIG_NAME or (isinstance(entry, dict) and entry.get("source") == MANIFEST_CONFIG_NAME)
        for entry in (entries if isinstance(entries, list) else [])
    )


def manifest_from_app_compose(app_compose_bytes: bytes) -> StudyManifest:
    """Read the study manifest out of measured app-compose.json bytes (for the KMS and auditors).

    Refuses, with :class:`InvalidAppCompose` naming the reason: bytes that are not JSON (or repeat a
    key), a compose without Sealroom's settings (see ``_REQUIRED_SETTINGS``) or with a script dstack would
    run outside the containers (``pre_launch_script``, ``init_script``, ``bash_script``), YAML without the
    ``sealroom_study`` config or with no service mounting it, and a manifest that is invalid or not in
    normalised form (so one manifest has exactly one encoding, hence one compose hash).
    """
    if not isinstance(app_compose_bytes, bytes):
        raise TypeError("app_compose_bytes must be bytes")
    try:
        text = app_compose_bytes.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidAppCompose("app-compose.json is not UTF-8") from exc
    app_compose = _strict_json(text, "app-compose.json")
    if not isinstance(app_compose, dict):
        raise InvalidAppCompose("app-compose.json must be a JSON object")
    for field, required in _REQUIRED_SETTINGS.items():
        value = app_compose.get(field)
        # The type check keeps JSON's 1 from passing for true (1 == True in Python).
        if type(value) is not type(required) or value != required:
            raise InvalidAppCompose(f"{field} must be {json.dumps(required)} in a Sealroom compose")
    for field in _FORBIDDEN_FIELDS:
        if field in app_compose:
            raise InvalidAppCompose(f"{field} is not allowed in a Sealroom compose")
    yaml_text = app_compose.get("docker_compose_file")
    if not isinstance(yaml_text, str):
        raise InvalidAppCompose("docker_compose_file must be a string")
    try:
        document = safe_parse.load_yaml(yaml_text)
    except (yaml.YAMLError, ValueError) as exc:  # YamlTooDeep is one; ValueError: a scalar PyYAML cannot
        # construct (an int of more than 4300 digits, a timestamp such as 2001-13-45, "!!int x")
        raise InvalidAppCompose(f"docker_compose_file is not valid YAML: {exc}") from exc

    configs = document.get("configs") if isinstance(document, dict) else None
    entry = configs.get(MANIFEST_CONFIG_NAME) if isinstance(configs, dict) else None
    content = entry.get("content") if isinstance(entry, dict) else None
    if not isinstance(content, str):
        raise InvalidAppCompose(f"no study manifest: configs.{MANIFEST_CONFIG_NAME}.content is missing")
    services = document.get("services")
    if not isinstance(services, dict) or not any(_mounts_manifest(service) for service in services.values()):
        raise InvalidAppCompose("no service mounts the study manifest")

    try:
        manifest = StudyManifest.model_validate(_strict_json(content, "the study manifest"))
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc']) or 'manifest'}: {error['msg']}" for error in exc.errors()
        )
        raise InvalidAppCompose(f"invalid study manifest: {problems}") from exc
    try:
        normalised = _manifest_text(manifest)
    except UnicodeEncodeError:  # a string with a lone surrogate (a \ud800 escape): UTF-8 cannot hold it
        raise InvalidAppCompose("the study manifest holds text that is not valid Unicode") from None
    if normalised != content:
        raise InvalidAppCompose("the study manifest is not in normalised JSON form")
    return manifest
