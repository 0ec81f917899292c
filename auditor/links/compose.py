"""Link 3, ``compose``: ``sha256(app-compose.json as shipped)`` is the measured compose hash, so the study
manifest inside it (inputs, analysis, ε, δ, output type) is the one that ran."""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from auditor.links.base import Broken, Held, Notes, Recipe, need_recipe, recipe_note
from auditor.receipt import Receipt
from compose.app_compose import InvalidAppCompose, compose_hash, manifest_from_app_compose
from compose.manifest import StudyManifest

__all__ = ["CHECK", "NAME", "NUMBER", "ComposeProof", "check"]

NUMBER, NAME = 3, "compose"
CHECK = "sha256(app-compose.json as shipped) is the measured compose hash; the manifest inside"


@dataclass(frozen=True)
class ComposeProof:
    """The study manifest of the compose that was measured."""

    manifest: StudyManifest


def check(receipt: Receipt, recipe: Recipe | None) -> Held[ComposeProof]:
    """``recipe``: the measured compose hash (see :func:`auditor.links.event_log.recipe`)."""
    notes = Notes()
    with notes.breaking():
        proof = _check(notes, receipt, recipe)
    return notes.held(proof)


def _check(notes: Notes, receipt: Receipt, recipe: Recipe | None) -> ComposeProof:
    body = receipt.app_compose.get()
    shipped = compose_hash(body)
    notes.facts["sha256"] = shipped.hex()
    measured = need_recipe(recipe).compose_hash
    recipe_note(notes, recipe)
    if not hmac.compare_digest(shipped, measured):
        raise Broken(f"sha256(app-compose.json) is {shipped.hex()}, but the CVM was measured as "
                     f"{measured.hex()}: this is not the compose that ran")
    try:
        manifest = manifest_from_app_compose(body)
    except InvalidAppCompose as exc:
        raise Broken(f"the compose carries no valid study manifest: {exc.reason}") from None
    notes.facts["manifest"] = manifest.model_dump(mode="json")
    inputs = ", ".join(f"{item.name} ({item.owner})" for item in manifest.inputs)
    notes.summary = (f"study {manifest.study!r}: {manifest.analysis.kind} on {inputs}; "
                     f"ε={manifest.epsilon:g}, δ={manifest.delta:g}; output {manifest.output_type}")
    return ComposeProof(manifest)
