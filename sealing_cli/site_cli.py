"""`seal site …`: the commands a site runs in federated rounds (logic in `sealing_cli.site`).

Kept apart from that module so that every other `seal` command starts without importing torch: the heavy
imports happen when a site command runs.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from compose.stack_file import default_state_dir
from sealing_cli.common import (
    DEFAULT_ACCEPT_TOLERANCE,
    DEFAULT_GATE_TOLERANCE,
    EXIT_REFUSED,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    fail,
    load_signer,
    load_stack,
    open_app,
    out,
)

# ---- `seal site …` -----------------------------------------------------------------------------------------------------

site_app = typer.Typer(no_args_is_help=True, help="A site's side of federated rounds: train, accept, reject.")

_AllowSimulated = Annotated[bool, typer.Option("--allow-simulated", help="Accept a SIMULATED aggregator quote "
                                                                        "(dev stacks only; needs --simulated-root)")]
_SimulatedRoot = Annotated[Optional[Path], typer.Option("--simulated-root", help="The pinned simulated TDX root "
                                                        "certificate (DER)", exists=True, dir_okay=False)]
_Data = Annotated[Path, typer.Option("--data", help="The site's own table (parquet); it never leaves",
                                     exists=True, dir_okay=False)]


def _root(allow_simulated: bool, simulated_root: Path | None) -> bytes | None:
    if allow_simulated and simulated_root is None:
        fail("--allow-simulated needs --simulated-root (the pinned simulated TDX root)", EXIT_USAGE)
    return simulated_root.read_bytes() if allow_simulated and simulated_root else None


def _site_data(path: Path):
    """The site's own table, read before anything else happens: a wrong file is a usage error."""
    from sealing_cli.site import SiteDataInvalid, load_site_data

    try:
        return load_site_data(path)
    except SiteDataInvalid as exc:
        fail(str(exc), EXIT_USAGE, "--data is the site's own Parquet table with the round task's columns")


def _refuse(exc: Exception) -> None:
    from sealing_cli.site import AggregatorNotTrusted, AggregatorUnreachable

    if isinstance(exc, AggregatorUnreachable):
        fail(str(exc), EXIT_UNREACHABLE, "is the round's aggregator running?")
    hint = None
    if isinstance(exc, AggregatorNotTrusted) and "SIMULATED" in exc.reason:
        hint = "on a dev stack, pass --allow-simulated --simulated-root <state-dir>/simulated-tdx/root.der"
    fail(str(exc), EXIT_REFUSED, hint)


@site_app.command()
def train(
    round_compose: Annotated[Path, typer.Option("--round-compose", help="The round's app-compose.json, as approved",
                                                exists=True, dir_okay=False)],
    aggregator: Annotated[str, typer.Option("--aggregator", help="The round aggregator's URL")],
    data: _Data,
    owner: Annotated[Optional[str], typer.Option("--owner", help="A dev owner of the local stack")] = None,
    keystore: Annotated[Optional[Path], typer.Option("--keystore", help="The site's eth-account keystore")] = None,
    allow_simulated: _AllowSimulated = False,
    simulated_root: _SimulatedRoot = None,
    gate_tolerance: Annotated[float, typer.Option("--gate-tolerance", min=0.0)] = DEFAULT_GATE_TOLERANCE,
    state_dir: Annotated[Optional[Path], typer.Option("--state-dir")] = None,
) -> None:
    """Attest the round's aggregator, train locally, gate, clip, sign, seal to the aggregator and send."""
    from contracts.chain import ChainError
    from sealing_cli.site import SiteError, SiteState, train_round

    root = _root(allow_simulated, simulated_root)
    site_data = _site_data(data)
    stack = load_stack(state_dir)
    account = load_signer(stack, owner, keystore)
    state = SiteState(state_dir or default_state_dir(), account.address)
    with open_app(stack) as app:
        try:
            outcome = train_round(aggregator_url=aggregator, app_compose=round_compose.read_bytes(), app=app,
                                  account=account, data=site_data, state=state, now=int(time.time()),
                                  allow_simulated=allow_simulated, simulated_root_der=root,
                                  gate_tolerance=gate_tolerance)
        except (SiteError, ChainError) as exc:
            _refuse(exc)
    simulated = " (SIMULATED TEE)" if allow_simulated else ""
    out.print(f"round {outcome.round}: aggregator attested{simulated}; local validation AUC "
                  f"{outcome.parent.auc:.4f} -> {outcome.trained.auc:.4f}, log-loss {outcome.parent.loss:.4f} -> "
                  f"{outcome.trained.loss:.4f}; update norm {outcome.raw_norm:.3f} clipped to {outcome.sent_norm:.3f}; "
                  f"sent signed and sealed (sha256 {outcome.update_sha256[:16]}…)", highlight=False)


def _decide(keep_candidate_if_good: bool, round_number: int, data: Path, owner: str | None, keystore: Path | None,
            allow_simulated: bool, simulated_root: Path | None, aggregator: str | None, tolerance: float,
            state_dir: Path | None) -> None:
    from contracts.chain import ChainError
    from cvm.aggregator import RoundRecordInvalid
    from sealing_cli.site import SiteError, SiteState, decide_round

    root = _root(allow_simulated, simulated_root)
    site_data = _site_data(data)
    stack = load_stack(state_dir)
    account = load_signer(stack, owner, keystore)
    state = SiteState(state_dir or default_state_dir(), account.address)
    with open_app(stack) as app:
        try:
            outcome = decide_round(round_number=round_number, keep_candidate_if_good=keep_candidate_if_good, app=app,
                                   data=site_data, state=state, now=int(time.time()),
                                   allow_simulated=allow_simulated, simulated_root_der=root,
                                   aggregator_url=aggregator, tolerance=tolerance)
        except (SiteError, RoundRecordInvalid, ChainError) as exc:
            _refuse(exc)
    d, record = outcome.decision, outcome.published.record
    kept = "adopted the global candidate" if d.keep == "candidate" else "stays on its champion (rollback)"
    out.print(f"round {round_number}: signed round record verified{' (SIMULATED TEE)' if outcome.published.simulated else ''}; "
                  f"candidate AUC {d.candidate_quality:.4f} vs champion {d.champion_quality:.4f} on local validation: "
                  f"{kept}; champion digest {d.kept_digest[:16]}…", highlight=False)
    out.print(f"  record: {len(record.joined)} joined, dropped {list(record.dropped)}, rejected "
                  f"{[(r.site, r.reason.value) for r in record.rejected]}, flagged {[f.site for f in record.flagged]}; "
                  f"ε round {record.privacy.epsilon_round:.3f}, total {record.privacy.epsilon_spent_total:.3f}, "
                  f"left {record.privacy.epsilon_left:.3f}", highlight=False)


_Round = Annotated[int, typer.Option("--round", min=1, help="The round number")]
_AggregatorOpt = Annotated[Optional[str], typer.Option("--aggregator", help="Override the aggregator URL used to train")]


@site_app.command()
def accept(round_number: _Round, data: _Data, owner: Annotated[Optional[str], typer.Option("--owner")] = None,
           keystore: Annotated[Optional[Path], typer.Option("--keystore")] = None,
           allow_simulated: _AllowSimulated = False, simulated_root: _SimulatedRoot = None,
           aggregator: _AggregatorOpt = None,
           tolerance: Annotated[float, typer.Option("--tolerance", min=0.0)] = DEFAULT_ACCEPT_TOLERANCE,
           state_dir: Annotated[Optional[Path], typer.Option("--state-dir")] = None) -> None:
    """Verify the round's signed record and adopt its model unless it is worse here than the champion."""
    _decide(True, round_number, data, owner, keystore, allow_simulated, simulated_root, aggregator, tolerance, state_dir)


@site_app.command()
def reject(round_number: _Round, data: _Data, owner: Annotated[Optional[str], typer.Option("--owner")] = None,
           keystore: Annotated[Optional[Path], typer.Option("--keystore")] = None,
           allow_simulated: _AllowSimulated = False, simulated_root: _SimulatedRoot = None,
           aggregator: _AggregatorOpt = None,
           state_dir: Annotated[Optional[Path], typer.Option("--state-dir")] = None) -> None:
    """Verify the round's signed record, score its model, and stay on the champion (checked by digest)."""
    _decide(False, round_number, data, owner, keystore, allow_simulated, simulated_root, aggregator, 0.0, state_dir)
