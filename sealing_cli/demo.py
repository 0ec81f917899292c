"""The demo study, run by `make demo` / `seal demo` on the embedded local stack.

Every step a person would take is a real `seal` invocation (shown with a `$` prompt) against a real anvil chain.
"""

from __future__ import annotations

import shlex
import shutil
from pathlib import Path

import typer
from rich.console import Console
from rich.rule import Rule

from sealing_cli.stack import LocalStack

console = Console()


def seal(*args: str) -> int:
    """Run one `seal` command in this process, echoing it like a shell transcript."""
    from sealing_cli.main import app

    console.print(f"[bold cyan]$ seal {shlex.join(args)}[/]")
    code = typer.main.get_command(app).main(list(args), prog_name="seal", standalone_mode=False)
    return code or 0


def expect(code: int, wanted: int = 0) -> None:
    if code != wanted:
        raise SystemExit(f"demo: a step exited with {code}, expected {wanted}")


def demo_compose_hash(workdir: Path) -> tuple[bytes, Path]:
    """The study's app-compose.json (written verbatim) and its compose hash."""
    from compose.app_compose import build_app_compose, compose_hash, normalized_json_bytes
    from compose.manifest import StudyManifest

    manifest = StudyManifest.model_validate({
        "version": "sealroom-study/v1",
        "name": "cardio-renal-risk",
        "inputs": [],
        "analysis": {"kind": "dp_sgd", "params": {"model": "logistic_regression"}},
        "epsilon": 1.5,
        "delta": 1e-6,
        "output_type": "model_weights",
    })
    yaml = "services:\n  study:\n    image: sealroom/study-runner@sha256:" + "0" * 64 + "\n"
    body = normalized_json_bytes(build_app_compose("cardio-renal-risk", yaml, manifest))
    path = workdir / "app-compose.json"
    path.write_bytes(body)
    return compose_hash(body), path


def run_demo(state_dir: Path) -> None:
    if state_dir.exists():
        shutil.rmtree(state_dir)  # the demo always starts from a clean, throwaway stack
    state_dir.mkdir(parents=True)
    sd = ["--state-dir", str(state_dir)]
    console.print(Rule("Sealroom demo: a five-owner consortium on a local chain"))
    with LocalStack(state_dir, threshold=5, epsilon_budget=3.0) as stack:
        d = stack.description
        console.print(f"local stack: anvil chain {d.chain_id} at {d.rpc_url}; DstackApp (app_id) {d.dstack_app}; "
                      f"{len(d.owners)} owners, threshold {d.threshold}/{len(d.owners)}, ε budget {d.epsilon_budget:g}")
        h, compose_path = demo_compose_hash(state_dir)
        hx = "0x" + h.hex()

        console.print(Rule("The analyst proposes the study's recipe (its compose hash)"))
        expect(seal("propose", "--compose-hash", hx, "--uri", compose_path.as_uri(), "--owner", d.owners[0].name, *sd))

        console.print(Rule("Each owner reviews and approves"))
        for owner in d.owners:
            expect(seal("approve", "--compose-hash", hx, "--owner", owner.name, *sd))
        expect(seal("status", "--compose-hash", hx, *sd))

        console.print(Rule("One owner (CH) revokes: final, and the recipe is no longer allowed"))
        expect(seal("revoke", "--compose-hash", hx, "--owner", "CH", *sd))
        expect(seal("status", "--compose-hash", hx, *sd))

        console.print(Rule("A refused action: approving a revoked recipe"))
        expect(seal("approve", "--compose-hash", hx, "--owner", "EU-West", *sd), wanted=1)
    console.print("local stack stopped; no process left behind")
