"""Link 7, ``output``: the output type is the one the manifest allows; the analysis reports spending at most the
manifest's ε and δ; the on-chain release spent exactly the manifest's ε for exactly its input owners (and the
envelope's ε spent/remaining are the chain's record); the envelope's input digests are the ones the CVM measured
(the ``sealroom-inputs`` event)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from auditor.links.base import Broken, Held, Notes, same_json
from auditor.links.compose import ComposeProof
from auditor.links.event_log import EventLogProof
from auditor.links.on_chain import OnChainProof
from auditor.receipt import Envelope, Receipt
from compose import safe_parse
from compose.manifest import StudyManifest
from contracts.chain import EPSILON_SCALE, to_micro_epsilon
from cvm.labels import INPUTS_EVENT

__all__ = ["CHECK", "NAME", "NUMBER", "OutputProof", "check"]

NUMBER, NAME = 7, "output"
CHECK = "the output type, ε, δ and inputs match the manifest"


@dataclass(frozen=True)
class OutputProof:
    """The output type and the inputs (name → ciphertext sha256) the result was computed from."""

    output_type: str
    inputs: tuple[tuple[str, str], ...]


def check(receipt: Receipt, compose: ComposeProof | None, event_log: EventLogProof | None,
          on_chain: OnChainProof | None) -> Held[OutputProof]:
    """``compose``: the measured manifest (link 3); ``event_log``: the inputs the CVM measured (link 2);
    ``on_chain``: the release that spent the budget (link 4). Each is None when its link proved nothing."""
    notes = Notes()
    with notes.breaking():
        proof = _check(notes, receipt, compose, event_log, on_chain)
    return notes.held(proof)


def _check(notes: Notes, receipt: Receipt, compose: ComposeProof | None, event_log: EventLogProof | None,
           on_chain: OnChainProof | None) -> OutputProof:
    if compose is None:
        raise Broken("cannot be checked: no measured manifest (link 3)")
    manifest = compose.manifest
    envelope = receipt.envelope.get()
    payload = envelope.payload.get()
    output_types = {envelope.output_type.get(), payload.output_type.get()}
    if output_types != {manifest.output_type}:
        notes.problems.append(f"the output is {' / '.join(sorted(output_types))}, the manifest allows only "
                              f"{manifest.output_type}")
    spent = payload.spent.get()
    epsilon = spent.epsilon_micro.get()
    delta = spent.delta.get()
    if epsilon > to_micro_epsilon(manifest.epsilon) or delta > manifest.delta:
        notes.problems.append(f"the analysis spent (ε={epsilon / EPSILON_SCALE:g}, δ={delta:g}), more than "
                              f"the manifest's (ε={manifest.epsilon:g}, δ={manifest.delta:g})")
    notes.facts.update(output_type=manifest.output_type, analysis_spent={"epsilon": epsilon / EPSILON_SCALE,
                                                                         "delta": delta})
    inputs = _check_inputs(notes, envelope, manifest, event_log)
    _check_release_epsilon(notes, envelope, manifest, on_chain)
    notes.summary = (f"{' / '.join(sorted(output_types))}; analysis spent ε={epsilon / EPSILON_SCALE:g} of "
                     f"{manifest.epsilon:g}, δ={delta:g} of {manifest.delta:g}")
    return OutputProof(manifest.output_type, tuple(inputs.items()))


def _check_inputs(notes: Notes, envelope: Envelope, manifest: StudyManifest,
                  event_log: EventLogProof | None) -> dict[str, str]:
    inputs = envelope.inputs.get()
    by_name = {item.name: item for item in manifest.inputs}
    if set(inputs) != set(by_name):
        raise Broken(f"the envelope's inputs {sorted(inputs)} are not the manifest's {sorted(by_name)}")
    digests = {}
    for name, item in by_name.items():
        entry = inputs[name].get()
        digests[name] = entry.ciphertext_sha256.get()
        if entry.owner.get() != item.owner:
            notes.problems.append(f"input {name!r} names another owner than the manifest")
        if item.ciphertext_sha256 is not None and digests[name] != item.ciphertext_sha256:
            notes.problems.append(f"input {name!r} is not the ciphertext the manifest names")
    notes.facts["inputs"] = digests
    measured = _measured_inputs(event_log)
    if not same_json(measured, digests):
        notes.problems.append(f"the envelope's input digests are not the ones the CVM measured "
                              f"({INPUTS_EVENT!r} event)")
    return digests


def _measured_inputs(event_log: EventLogProof | None) -> Any:
    if event_log is None:
        raise Broken("cannot be checked: the inputs the CVM opened are measured in the event log (link 2)")
    events = [event for event in event_log.boot.app_events if event.name == INPUTS_EVENT]
    if len(events) != 1:
        raise Broken(f"the event log holds {len(events)} {INPUTS_EVENT!r} events, not one")
    try:
        return safe_parse.loads(events[0].payload)
    except ValueError:  # JSONDecodeError (nested too deep is one), UnicodeDecodeError, an int over 4300 digits
        raise Broken(f"the {INPUTS_EVENT!r} event is not JSON") from None


def _check_release_epsilon(notes: Notes, envelope: Envelope, manifest: StudyManifest,
                           on_chain: OnChainProof | None) -> None:
    release = on_chain.release if on_chain is not None else None
    budget_micro = on_chain.budget_micro if on_chain is not None else None
    if release is None or budget_micro is None:
        raise Broken("cannot be checked: ε is spent on-chain and the release was not found (link 4)")
    if release.epsilon_micro != to_micro_epsilon(manifest.epsilon):
        notes.problems.append(f"the release spent ε={release.epsilon_micro / EPSILON_SCALE:g} on-chain, "
                              f"not the manifest's {manifest.epsilon:g}")
    if set(release.owners) != {item.owner for item in manifest.inputs}:
        notes.problems.append("the release's owners are not the manifest's input owners")
    remaining = envelope.epsilon_remaining_micro.get()
    spent = envelope.epsilon_spent_micro.get()
    if (spent, remaining) != (budget_micro - release.remaining_micro, release.remaining_micro):
        notes.problems.append("the envelope's ε spent/remaining differ from the chain's record of the release")
