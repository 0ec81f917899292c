"""Recipes as the analyst writes them: the recipe file, its JSON Schemas, and the starter `seal study new` writes.

A *recipe file* (YAML or JSON, docs/recipes.md) is the body of ``POST /composes``
(``compose.api.schemas.ComposeSubmission``): the app's ``name``, the analyst's ``docker_compose`` YAML, the study
``manifest`` (``compose.manifest.StudyManifest``) and optionally ``study_service``. The API builds app-compose.json
from it; so does :func:`load_recipe`, locally, before anything is sent.

One source of truth. The JSON Schemas (:func:`json_schema`) are generated from the pydantic models the API and
the CVM validate with: ``ComposeSubmission``, ``StudyManifest``, and per analysis kind ``StatsParams`` and
``TrainingParams`` (``cvm.analyses.params``) and ``RoundContract`` (``cvm.federated.round_contract``). The
manifest's free-form ``analysis.params`` is replaced by one branch per kind, and the kind's output type and
DP-SGD's δ > 0 are added from ``compose.manifest.OUTPUT_TYPE_OF_KIND`` and ``validate_manifest``'s rules.
docs/schemas/ holds the published copies; a test fails when they differ from what this module generates.
A schema says a recipe's shape; :func:`load_recipe` says more (lower < upper, unique names, the kind's own
checks), because it runs the validators themselves.

:func:`starter_recipe` writes a recipe from sealed files' public envelopes (owners, columns and their types):
everything only the analyst can decide — bounds, ε, δ, ``max_rows``, the label, histogram categories — reads
``FILL IN: …`` (``compose.manifest.UNFILLED``), and such a recipe is refused (here, and by the API) until each is
replaced. Nothing is inferred from the data, and nothing that costs privacy budget is defaulted.

Errors: :class:`RecipeInvalid` (a ``compose.manifest.ManifestRefused``: ``problems`` as (field, reason), fields
named from the recipe's root, e.g. ``manifest.analysis.params.queries[1].bounds``); :class:`StarterRefused`
(a ``ValueError``) when sealed files cannot share one recipe.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from compose import safe_parse
from compose.api.schemas import ComposeSubmission
from compose.app_compose import build_app_compose, normalized_json_bytes
from compose.manifest import (
    OUTPUT_TYPE_OF_KIND,
    UNFILLED,
    ManifestInvalid,
    ManifestRefused,
    StudyManifest,
    unfilled_fields,
    validate_manifest,
)

__all__ = [
    "KINDS",
    "SCHEMA_NAMES",
    "CheckedRecipe",
    "RecipeInvalid",
    "StarterRefused",
    "json_schema",
    "load_recipe",
    "parse_recipe",
    "render_recipe",
    "starter_recipe",
]

KINDS = tuple(OUTPUT_TYPE_OF_KIND)                       # dp_stats, dp_sgd, fed_round
SCHEMA_NAMES = ("recipe", "manifest", *KINDS)
_DIALECT = "https://json-schema.org/draft/2020-12/schema"
_MAX_RECIPE_BYTES = 1 << 20                               # the API's cap on POST /composes


class RecipeInvalid(ManifestRefused):
    """The recipe cannot be submitted as it is; ``problems`` name each field (from the recipe's root)."""


class StarterRefused(ValueError):
    """The sealed files cannot be the inputs of one recipe (the message says why)."""


# ----------------------------------------------------------------------------------------- JSON Schemas

def _params_models() -> dict[str, type[BaseModel]]:
    from cvm.analyses.params import StatsParams, TrainingParams
    from cvm.federated.round_contract import RoundContract

    return {"dp_stats": StatsParams, "dp_sgd": TrainingParams, "fed_round": RoundContract}


def _merge_defs(into: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    """Move ``schema``'s $defs into ``into`` (one namespace: the models' names); return the rest of it."""
    schema = dict(schema)
    for name, definition in schema.pop("$defs", {}).items():
        if into.setdefault(name, definition) != definition:
            raise AssertionError(f"two different schema definitions are both named {name!r}")
    return schema


def _with_kinds(manifest: dict[str, Any], defs: dict[str, Any]) -> None:
    """Make the manifest schema node say what ``validate_manifest`` checks per kind (in place)."""
    branches = []
    for kind, model in _params_models().items():
        params = _merge_defs(defs, model.model_json_schema())
        defs[model.__name__] = params
        branches.append({"type": "object", "additionalProperties": False, "required": ["kind", "params"],
                         "properties": {"kind": {"const": kind}, "params": {"$ref": f"#/$defs/{model.__name__}"}}})
    defs["Analysis"] = {"title": "Analysis", "description": defs["Analysis"]["description"] + " One branch per "
                        "kind: its params schema.", "oneOf": branches}
    rules = []
    for kind, output_type in OUTPUT_TYPE_OF_KIND.items():
        then: dict[str, Any] = {"properties": {"output_type": {"const": output_type}}}
        if kind == "dp_sgd":   # its Gaussian mechanism needs δ > 0
            then["properties"]["delta"] = {"exclusiveMinimum": 0}
        rules.append({"if": {"required": ["analysis"], "properties": {"analysis": {
            "required": ["kind"], "properties": {"kind": {"const": kind}}}}}, "then": then})
    manifest["allOf"] = rules


def json_schema(name: str = "recipe") -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a recipe file, a study manifest, or one analysis kind's params.

    ``name`` is one of :data:`SCHEMA_NAMES`: ``recipe``, ``manifest``, ``dp_stats``, ``dp_sgd``, ``fed_round``.
    """
    if name not in SCHEMA_NAMES:
        raise ValueError(f"no schema {name!r}; there are: {', '.join(SCHEMA_NAMES)}")
    defs: dict[str, Any] = {}
    if name in KINDS:
        model = _params_models()[name]
        root = _merge_defs(defs, model.model_json_schema())
        title = f"Sealroom {name} analysis params (manifest analysis.params)"
    elif name == "manifest":
        root = _merge_defs(defs, StudyManifest.model_json_schema())
        _with_kinds(root, defs)
        title = "Sealroom study manifest, sealroom-study/v1"
    else:
        root = _merge_defs(defs, ComposeSubmission.model_json_schema())
        _with_kinds(defs["StudyManifest"], defs)
        title = "Sealroom recipe file (the body of POST /composes)"
    document = {"$schema": _DIALECT, "title": title, **{k: v for k, v in root.items() if k != "title"}}
    if defs:
        document["$defs"] = dict(sorted(defs.items()))
    return document


# ----------------------------------------------------------------------------------------- reading a recipe

@dataclass(frozen=True)
class CheckedRecipe:
    """A recipe that passed every local check: what to submit, and the app-compose.json it builds here."""

    submission: ComposeSubmission
    app_compose: bytes
    compose_hash: str                      # sha256 of app_compose, 64 hex

    def body(self) -> dict[str, Any]:
        """The ``POST /composes`` JSON body."""
        return self.submission.model_dump(mode="json", exclude_none=True)


class _RecipeLoader(safe_parse._DepthLimitedSafeLoader):   # the same package's nesting-limited loader
    """The nesting-limited safe loader, reading ``1e-6`` as a number (YAML 1.2 floats; YAML 1.1 wants a dot)."""


_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def _parse_text(text: str, suffix: str) -> Any:
    if suffix == ".json":
        return safe_parse.loads(text)
    loader = _RecipeLoader(text)
    loader.max_depth = safe_parse.MAX_NESTING
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _pydantic_problems(error: ValidationError, where: str = "") -> list[tuple[str, str]]:
    problems = []
    for item in sorted(error.errors(), key=lambda item: item["type"] != "extra_forbidden"):
        path = where
        for part in item["loc"]:
            path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
        given = item.get("input")
        if isinstance(given, str) and given.lstrip().startswith(UNFILLED):
            problems.append((path, f"not filled in: {given}"))
            continue
        if item["type"] == "extra_forbidden":
            reason = "unknown setting"
            parent = _model_at(item["loc"][:-1])
            if parent is not None:
                known = sorted(parent.model_fields)
                guess = difflib.get_close_matches(str(item["loc"][-1]), known, n=1)
                reason += (f" (did you mean {guess[0]!r}?)" if guess else "") + f"; known settings: {', '.join(known)}"
        elif item["type"] == "missing":
            reason = "required setting is missing"
        else:
            reason = item["msg"].removeprefix("Value error, ")
            if given is not None and not isinstance(given, (dict, list)):
                reason += f" (got {given!r})"
        problems.append((path, reason))
    return problems


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The model at ``loc`` of a ComposeSubmission, for naming the settings it has (None: not a model there)."""
    from compose.manifest import Analysis, StudyInput

    path = [part for part in loc if not isinstance(part, int)]
    return {(): ComposeSubmission, ("manifest",): StudyManifest, ("manifest", "inputs"): StudyInput,
            ("manifest", "analysis"): Analysis}.get(tuple(path))


def parse_recipe(document: Any) -> CheckedRecipe:
    """Check a recipe document (parsed YAML or JSON) as the API would, and build its app-compose.json here.

    Refused with :class:`RecipeInvalid`, every problem named: not a mapping; a value still reading ``FILL IN…``;
    the submission's or the manifest's schema (unknown settings, wrong types, out-of-range values);
    ``validate_manifest`` (the kind's params, output type, δ); a docker_compose YAML that does not build.
    """
    if not isinstance(document, dict):
        raise RecipeInvalid([("recipe", "must be a mapping with name, docker_compose and manifest")])
    problems = [(field.removeprefix("."), f"not filled in: {text}")
                for field, text in unfilled_fields(document, "")]
    compose_text = document.get("docker_compose")
    if isinstance(compose_text, str) and UNFILLED in compose_text:
        line = next(line for line in compose_text.splitlines() if UNFILLED in line)
        problems.append(("docker_compose", f"not filled in: {line[line.index(UNFILLED):].strip().rstrip(chr(34))}"))
    unfilled = {field for field, _ in problems}
    try:
        submission = ComposeSubmission.model_validate(document)
    except ValidationError as error:
        problems += [p for p in _pydantic_problems(error) if p[0] not in unfilled]
        raise RecipeInvalid(problems) from None
    try:
        validate_manifest(submission.manifest)
    except ManifestInvalid as invalid:
        problems += [(f"manifest.{field}", reason) for field, reason in invalid.problems
                     if f"manifest.{field}" not in unfilled]
    if problems:
        raise RecipeInvalid(problems)
    try:
        built = build_app_compose(submission.name, submission.docker_compose, submission.manifest,
                                  study_service=submission.study_service)
    except ValueError as bad:
        raise RecipeInvalid([("docker_compose", str(bad))]) from None
    body = normalized_json_bytes(built)
    return CheckedRecipe(submission, body, hashlib.sha256(body).hexdigest())


def load_recipe(path: Path) -> CheckedRecipe:
    """Read a recipe file (``.json`` as JSON, anything else as YAML) and check it (:func:`parse_recipe`).

    ``OSError`` when it cannot be read; :class:`RecipeInvalid` otherwise.
    """
    path = Path(path)
    raw = path.read_bytes()
    if len(raw) > _MAX_RECIPE_BYTES:
        raise RecipeInvalid([("recipe", f"{len(raw)} bytes; the API takes at most {_MAX_RECIPE_BYTES}")])
    try:
        document = _parse_text(raw.decode("utf-8"), path.suffix.lower())
    except UnicodeDecodeError:
        raise RecipeInvalid([("recipe", "is not UTF-8 text")]) from None
    except (ValueError, yaml.YAMLError) as bad:
        kind = "JSON" if path.suffix.lower() == ".json" else "YAML"
        raise RecipeInvalid([("recipe", f"is not valid {kind}: {bad}")]) from None
    return parse_recipe(document)


# ----------------------------------------------------------------------------------------- the starter

def _fill(what: str) -> str:
    return f"{UNFILLED}: {what}"


def _study_yaml(image: str) -> str:
    """The docker-compose YAML of a one-service study running ``python -m cvm.run`` from ``image``."""
    return f"services:\n  study:\n    image: {image}\n    command: [python, -m, cvm.run]\n"


def starter_recipe(inputs: Sequence[tuple[str, Any]], *, kind: str, name: str, image: str | None = None) -> dict:
    """A recipe for ``inputs`` — (input name, ``cvm.sealed.Envelope``) pairs, owner signatures already checked —
    with every choice that is the analyst's marked ``FILL IN: …`` (see the module docstring).

    ``kind``: ``dp_stats`` (a count, a mean per numeric column, a histogram per string column) or ``dp_sgd``
    (every numeric or boolean column a feature; the settings at their documented defaults). ``image``: the
    study image, pinned by digest; None leaves it to fill in. Raises :class:`StarterRefused` when the inputs
    cannot share a recipe (one owner twice, different columns) or the kind cannot use their columns.
    """
    from cvm.analyses.params import TrainingParams, column_type_fits

    if kind not in ("dp_stats", "dp_sgd"):
        raise StarterRefused(f"a starter recipe is for dp_stats or dp_sgd, not {kind!r} (a fed_round recipe is "
                             "the round contract: docs/federated.md)")
    if not inputs:
        raise StarterRefused("give at least one sealed file")
    owners: dict[bytes, str] = {}
    names = [label for label, _ in inputs]
    if len(set(names)) != len(names):
        raise StarterRefused(f"two sealed files would have the same input name: {names}")
    first_label, first = inputs[0]
    columns = [(field.name, field.type) for field in first.header.schema]
    for label, envelope in inputs:
        if envelope.header.owner in owners:
            raise StarterRefused(f"{label} and {owners[envelope.header.owner]} are sealed by the same owner; a "
                                 "recipe takes one input per owner")
        owners[envelope.header.owner] = label
        theirs = [(field.name, field.type) for field in envelope.header.schema]
        if theirs != columns:
            raise StarterRefused(f"{label} has columns {_columns(theirs)} and {first_label} has {_columns(columns)}; "
                                 "the inputs are joined row by row and need the same columns")
    rows = sum(envelope.rows for _, envelope in inputs)
    numeric = [(c, t) for c, t in columns if column_type_fits(t, "numeric")]
    if kind == "dp_stats":
        queries: list[dict[str, Any]] = [{"kind": "count", "name": "rows"}]
        queries += [{"kind": "mean", "name": f"mean_{c}", "column": c,
                     "bounds": _fill(f"[lower, upper], the public range of {c} ({t}); values outside are clamped")}
                    for c, t in numeric]
        queries += [{"kind": "histogram", "name": f"{c}_counts", "column": c,
                     "categories": _fill(f"the public list of {c}'s categories; other values count as 'other'")}
                    for c, t in columns if t == "string"]
        params: dict[str, Any] = {
            "max_rows": _fill(f"a public upper bound on the rows of all inputs together (these sealed files hold "
                              f"{rows}; a larger bound costs accuracy, a smaller one refuses the run)"),
            "queries": queries}
        delta = _fill("δ in [0, 1): 0 for pure ε-DP")
    else:
        usable = [(c, t) for c, t in columns if column_type_fits(t, "numeric or boolean")]
        if len(usable) < 2:
            raise StarterRefused(f"dp_sgd needs a 0/1 label and at least one feature, numeric or boolean; the "
                                 f"columns are {_columns(columns)}")
        labels = [c for c, t in usable if t == "bool" or column_type_fits(t, "integer")] or [c for c, _ in usable]
        params = {"features": {c: _fill(f"[low, high], the public range of {c} ({t}); values are clipped to it")
                               for c, t in usable},
                  "label": _fill(f"the 0/1 outcome column, one of: {', '.join(labels)}; then remove it from "
                                 "features")}
        params |= {field: info.default for field, info in TrainingParams.model_fields.items()
                   if field not in ("features", "label")}
        delta = _fill(f"δ in (0, 1), well below 1/{rows} (the sealed files hold {rows} rows)")
    manifest = {
        "study": name,
        "inputs": [{"owner": _checksum(envelope.header.owner), "name": label} for label, envelope in inputs],
        "analysis": {"kind": kind, "params": params},
        "epsilon": _fill("the ε one run spends, > 0; it comes out of the study's on-chain budget"),
        "delta": delta,
        "output_type": OUTPUT_TYPE_OF_KIND[kind],
    }
    compose = _study_yaml(image or json.dumps(_fill("the study image pinned by digest (`seal image digest`)")))
    return {"name": name, "docker_compose": compose, "manifest": manifest}


def _checksum(address: bytes) -> str:
    from eth_utils import to_checksum_address

    return to_checksum_address(address)


def _columns(columns: list[tuple[str, str]]) -> str:
    return "[" + ", ".join(f"{c}:{t}" for c, t in columns) + "]"


class _Dumper(yaml.SafeDumper):
    """Block style, multi-line strings (the docker-compose YAML) as literal blocks."""


_Dumper.add_representer(str, lambda dumper, value: dumper.represent_scalar(
    "tag:yaml.org,2002:str", value, style="|" if "\n" in value else None))


def render_recipe(recipe: dict, *, as_json: bool = False) -> str:
    """The recipe as a file: YAML with a header comment (or JSON). Keys keep their order."""
    if as_json:
        return json.dumps(recipe, indent=2, ensure_ascii=False) + "\n"
    unfilled = len(unfilled_fields(copy.deepcopy(recipe), "")) + (UNFILLED in recipe.get("docker_compose", ""))
    header = ("# A Sealroom recipe: the body of POST /composes (docs/recipes.md; schema: `seal study schema`).\n"
              f"# {unfilled} value(s) read \"{UNFILLED}: …\": each is a choice only you can make (bounds, ε, δ, …);\n"
              "# `seal study submit` refuses the recipe until every one is replaced. Remove the queries or\n"
              "# features you do not need: every one shares the run's ε.\n")
    return header + yaml.dump(recipe, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=100)
