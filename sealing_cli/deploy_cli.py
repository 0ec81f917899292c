"""`seal deploy --target dstack`: write what a dstack VMM or Phala Cloud deployment of an approved study takes (logic
in `compose.deploy`; docs/real-tdx.md says how an operator uses it).

The KMS, the chain and the study's DstackApp default to the local stack's (its stack.json); each can be named
instead, for a deployment whose KMS and chain are elsewhere. Exit codes are docs/cli.md's: 1 refused (the bytes are
not the approved ones, the chain does not allow them, the KMS and the chain disagree, a dev KMS, an environment the
compose does not allow, an output folder in use), 2 usage, 3 the KMS or the chain is unreachable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from sealing_cli.common import (
    EXIT_REFUSED,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    ComposeHashOpt,
    JsonFlag,
    StateDir,
    err,
    fail,
    load_stack,
    out,
    parse_compose_hash,
)

deploy_app = typer.Typer(no_args_is_help=True, subcommand_metavar="",
                         help="Write what a dstack VMM or Phala Cloud deployment of an approved study takes: the "
                              "approved app-compose.json bytes, the KMS and chain settings, any environment sealed "
                              "to the KMS's env key.")

TARGETS = ("dstack",)


@deploy_app.callback(invoke_without_command=True)
def deploy(
    target: Annotated[str, typer.Option("--target", help="Where the study runs: dstack (a dstack VMM, or Phala "
                                        "Cloud, on real TDX)")],
    compose: Annotated[Path, typer.Option("--compose", help="The approved app-compose.json, byte for byte",
                                          exists=True, dir_okay=False, readable=True)],
    compose_hash: ComposeHashOpt,
    out_dir: Annotated[Path, typer.Option("--out", help="Output folder (new, or empty)")],
    kms_url: Annotated[Optional[str], typer.Option("--kms-url", help="The KMS the CVM gets its keys from "
                                                   "(default: the local stack's)")] = None,
    rpc_url: Annotated[Optional[str], typer.Option("--rpc-url", help="A node of the chain that decides (default: "
                                                   "the local stack's)")] = None,
    dstack_app: Annotated[Optional[str], typer.Option("--dstack-app", help="The study's DstackApp address, its "
                                                      "app id (default: the local stack's)")] = None,
    dstack_kms: Annotated[Optional[str], typer.Option("--dstack-kms", help="The DstackKms address (default: the "
                                                      "KMS's own; checked against it)")] = None,
    chain_id: Annotated[Optional[int], typer.Option("--chain-id", help="The chain id to insist on")] = None,
    kms_root: Annotated[Optional[str], typer.Option("--kms-root", help="Pin the KMS root: its address, or its "
                                                    "compressed public key in hex")] = None,
    env_file: Annotated[Optional[Path], typer.Option("--env-file", help="KEY=VALUE lines to seal to the KMS's env "
                                                     "key; each name must be in the compose's allowed_envs",
                                                     exists=True, dir_okay=False, readable=True)] = None,
    name: Annotated[Optional[str], typer.Option("--name", help="The VM's name (default: the compose's)")] = None,
    image: Annotated[str, typer.Option("--image", help="The dstack OS image the VMM boots")] = "dstack-0.5.4",
    vcpu: Annotated[int, typer.Option("--vcpu", min=1, help="vCPUs")] = 2,
    memory: Annotated[int, typer.Option("--memory", min=1, help="Memory, in MB")] = 4096,
    disk: Annotated[int, typer.Option("--disk", min=1, help="Disk, in GB")] = 20,
    allow_dev_kms: Annotated[bool, typer.Option("--allow-dev-kms", help="Accept a KMS in dev mode (it accepts "
                                                "SIMULATED quotes): for rehearsals only")] = False,
    state_dir: StateDir = None,
    as_json: JsonFlag = False,
) -> None:
    """Check that COMPOSE hashes to the approved --compose-hash, that the study's DstackApp allows it and that the
    KMS and the chain agree, then write app-compose.json (verbatim), vmm-create-vm.json (the VMM's CreateVm body),
    deployment.json and, with --env-file, encrypted-env.hex into --out."""
    from compose.deploy import (
        DeployError,
        VmSpec,
        prepare_dstack_deployment,
        write_deployment,
    )
    from contracts.chain import ChainError, ChainUnreachable
    from kms_client.client import KmsError, KmsUnreachable

    if target not in TARGETS:
        fail(f"unknown --target {target!r}", EXIT_USAGE, f"targets: {', '.join(TARGETS)}")
    approved = parse_compose_hash(compose_hash)
    if None in (kms_url, rpc_url, dstack_app):
        stack = load_stack(state_dir)
        kms_service = stack.services.get("kms")
        if kms_url is None and kms_service is None:
            fail("the local stack runs no KMS", EXIT_UNREACHABLE, "pass --kms-url")
        kms_url = kms_url or kms_service["url"]
        rpc_url = rpc_url or stack.rpc_url
        dstack_app = dstack_app or stack.dstack_app
        dstack_kms = dstack_kms or stack.dstack_kms
        chain_id = chain_id if chain_id is not None else stack.chain_id
    env = _read_env_file(env_file) if env_file is not None else None
    try:
        vm = VmSpec(name=name, image=image, vcpu=vcpu, memory_mb=memory, disk_gb=disk)
        deployment = prepare_dstack_deployment(
            compose.read_bytes(), approved_compose_hash=approved, kms_url=kms_url, rpc_url=rpc_url,
            dstack_app=dstack_app, dstack_kms=dstack_kms, chain_id=chain_id, pinned_kms_root=kms_root, vm=vm,
            env=env, allow_dev_kms=allow_dev_kms)
        written = write_deployment(deployment, out_dir)
    except ValueError as exc:   # a malformed address, a bad VM size
        fail(str(exc), EXIT_USAGE)
    except DeployError as exc:
        fail(str(exc), EXIT_REFUSED)
    except (ChainUnreachable, KmsUnreachable) as exc:
        fail(str(exc), EXIT_UNREACHABLE, "check --kms-url and --rpc-url (or that `seal up` runs)")
    except (ChainError, KmsError) as exc:
        fail(str(exc), EXIT_REFUSED)
    except OSError as exc:
        fail(f"could not write {out_dir}: {exc}", EXIT_REFUSED)
    settings = deployment.settings
    if settings.kms_is_dev:
        err.print("[bold yellow]WARNING:[/] the KMS runs in dev mode and accepts SIMULATED quotes: this deployment "
                  "is a rehearsal, not a confidential one", highlight=False)
    if as_json:
        out.print_json((out_dir / "deployment.json").read_text())
        return
    out.print(f"compose hash  {deployment.compose_hash.hex()}  (approved on DstackApp {settings.dstack_app})")
    out.print(f"KMS           {escape(settings.kms_url)}  root {settings.kms_root_address}"
              + ("  [dev mode]" if settings.kms_is_dev else ""))
    out.print(f"chain         {settings.chain_id} via {escape(settings.rpc_url)}  DstackKms {settings.dstack_kms}")
    if deployment.env_names:
        out.print(f"environment   {', '.join(deployment.env_names)} sealed to the app's env key")
    for path in written:
        out.print(f"wrote         {escape(str(path))}")


def _read_env_file(path: Path) -> dict[str, str]:
    """``KEY=VALUE`` per line; blank lines and ``#`` comments skipped; the value is everything after the first ``=``
    (no quote processing); a name given twice is refused."""
    env: dict[str, str] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"cannot read {path}: {exc}", EXIT_USAGE)
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not key:
            fail(f"{path}:{number}: not a KEY=VALUE line", EXIT_USAGE)
        if key in env:
            fail(f"{path}:{number}: {key} is given twice", EXIT_USAGE)
        env[key] = value
    return env
