"""The `seal` command.

Exit codes (stable, documented in docs/cli.md):
    0  success
    1  refused: the contract, the KMS or a verifier said no (the `error:` line says why)
    2  usage error (bad arguments)
    3  the local stack or chain is not reachable
    4  the owner key could not be loaded (keystore, password, environment)
"""

from __future__ import annotations

import enum
import hashlib
import re
import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_keys import keys as eth_keys
from eth_utils import is_address, to_checksum_address
from rich.markup import escape
from rich.progress import Progress
from rich.table import Table

from auditor.verify import NotAReceipt, load_receipt, render_checklist, verify_receipt
from compose.backends.launcher import ServiceStartError
from compose.safe_parse import restore_recursion_limit
from compose.stack_file import (
    StackDeployment,
    StackDescription,
    StackError,
    StackRefused,
    default_state_dir,
    read_keystore,
)
from contracts.chain import (
    Chain,
    ChainError,
    ChainUnreachable,
    ComposeStatus,
    DstackApp,
    DstackKms,
)
from cvm.attest.os_image import OsImageRegistry, OsRecordConflict, OsRecordInvalid, load_record
from cvm.sealed.dataset import (
    SealedFileError,
    read_envelope,
    seal_file,
    verify_payload,
)
from kms_client.client import KmsClient, KmsError, KmsUnreachable
from sealing_cli.common import (
    EXIT_INTERNAL,
    EXIT_KEY,
    EXIT_REFUSED,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    ComposeHashOpt,
    JsonFlag,
    KeystoreOpt,
    OneLineErrors,
    OwnerOpt,
    StateDir,
    chain_refused,
    err,
    fail,
    load_signer,
    load_stack,
    open_app,
    open_chain,
    out,
    parse_compose_hash,
)
from sealing_cli.consortium import DEPLOYER_PASSWORD_ENV, ConsortiumError, load_consortium, write_starter
from sealing_cli.deploy_cli import deploy_app
from sealing_cli.image_cli import image_app
from sealing_cli.devchain import ANVIL_FUNDER_KEY, DevChainError
from sealing_cli.os_images import kms_os_images_dir, register_os_image
from sealing_cli.site_cli import site_app
from sealing_cli.stack import DEFAULT_OWNER_NAMES, LocalStack
from sealing_cli.study_cli import study_app

# `seal` is `sealing_cli.main:app`: this module's import is its entry point. eth_account's py_ecc raised the
# recursion limit to 100 000; back at the default, a crafted file nested deep fails cleanly instead of crashing.
restore_recursion_limit()

# No pretty tracebacks: they print local variables, which may hold keys. Every failure is one `error:` line.
app = typer.Typer(cls=OneLineErrors, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="Sealroom: sealed datasets, k-of-n consent on-chain, attested DP studies.")


class BackendChoice(str, enum.Enum):
    container = "container"
    process = "process"


BackendOpt = Annotated[BackendChoice, typer.Option(
    "--backend", help="Where study CVMs run: `container` (a container of the pinned study image, on podman or "
    "docker; no engine: refused, never a silent fallback) or the `process` fallback (this checkout's code on the "
    "host's Python, under bubblewrap when there is one; NOT the image the compose pins)")]


def _print_version(value: bool) -> None:
    if value:
        out.print(f"seal {_installed_version()}")
        raise typer.Exit()


def _installed_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sealroom")
    except PackageNotFoundError:
        return "unknown (not installed as a package)"


@app.callback()
def _options(
    show_version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                               help="Print the version and exit")] = False,
) -> None:
    """Sealroom: sealed datasets, k-of-n consent on-chain, attested DP studies."""


def _print_status(status: ComposeStatus, names: dict[str, str]) -> None:
    state = "REVOKED" if status.revoked else ("allowed" if status.allowed else
                                              ("pending" if status.proposed else "not proposed"))
    out.print(f"compose hash  0x{status.compose_hash.hex()}")
    out.print(f"state         {state}  ({status.approvals}/{len(status.owners)} approvals, threshold {status.threshold})")
    if status.uri:
        out.print(f"uri           {status.uri}")
    table = Table("owner", "address", "approved")
    for address in status.owners:
        table.add_row(names.get(address, ""), address, "yes" if address in status.approvers else "no")
    out.print(table)


@app.command()
def init(
    folder: Annotated[Path, typer.Argument(help="Where to write consortium.toml: a new folder, or an empty one "
                                           "(default: the current folder, if empty)")] = Path("."),
) -> None:
    """Write a starter consortium.toml (commented): the study, its owners, threshold, ε budget and chain, for
    `seal up --consortium`. It never replaces a file."""
    try:
        path = write_starter(folder)
    except ConsortiumError as exc:
        fail(str(exc), EXIT_USAGE, "give a new or an empty folder: `seal init FOLDER`")
    except OSError as exc:
        fail(f"cannot write into {folder}: {exc.strerror or exc}", EXIT_USAGE)
    out.print(f"wrote {path}")
    out.print(f"next: put in the owners' names and addresses (and the chain), then `seal up --consortium {path}`")


def _load_deployer(path: Path) -> LocalAccount:
    """The account that pays for an external chain's deployment; its password from $SEAL_DEPLOYER_PASSWORD."""
    password = os.environ.get(DEPLOYER_PASSWORD_ENV)
    if password is None:
        if not sys.stdin.isatty():
            fail(f"no password for the deployer keystore {path}: {DEPLOYER_PASSWORD_ENV} is not set and there is "
                 "no terminal to ask on", EXIT_KEY, f"set {DEPLOYER_PASSWORD_ENV}")
        password = typer.prompt(f"password of the deployer keystore {path}", hide_input=True)
    try:
        return read_keystore(path, password)
    except (OSError, ValueError, KeyError, TypeError) as exc:   # ValueError("MAC mismatch"): a wrong password
        fail(f"could not open the deployer keystore {path}: {type(exc).__name__}: {exc}", EXIT_KEY,
             f"check the path and {DEPLOYER_PASSWORD_ENV}")


@app.command()
def up(
    ctx: typer.Context,
    state_dir: StateDir = None,
    consortium_file: Annotated[Optional[Path], typer.Option(
        "--consortium", metavar="FILE", help="A consortium file (`seal init` writes one): the study, its owners, "
        "threshold, ε budget and chain; used by the first start in a folder, checked by later ones")] = None,
    owners: Annotated[int, typer.Option(help="Number of dev owners (named after the demo's five sites); "
                                        "fixed by the first start in a folder")] = 5,
    threshold: Annotated[Optional[int], typer.Option(help="Approvals needed (default: all owners); fixed by "
                                                     "the first start in a folder")] = None,
    epsilon_budget: Annotated[float, typer.Option("--epsilon-budget", help="The study's total ε; fixed by the "
                                                  "first start in a folder")] = 3.0,
    compose: Annotated[Optional[Path], typer.Option("--compose", exists=True, dir_okay=False,
                                                    help="Also boot a SIMULATED CVM for this app-compose.json "
                                                         "(its compose hash must be approved on-chain)")] = None,
    backend: BackendOpt = BackendChoice.container,
    image_digests: Annotated[Optional[list[str]], typer.Option(
        "--image-digest", metavar="sha256:…", help="A study image digest composes may name (repeatable; default: "
        "the study image built from this checkout in STATE/study-image, which the container backend builds when "
        "missing)")] = None,
) -> None:
    """Start the local stack (anvil, contracts, KMS, API) and keep it running until Ctrl-C; started again in the
    same folder, it comes back with the same chain, contracts, KMS root and analysts' tokens."""
    if not 1 <= owners <= len(DEFAULT_OWNER_NAMES):
        fail(f"--owners must be between 1 and {len(DEFAULT_OWNER_NAMES)}", EXIT_USAGE)
    if threshold is not None and not 1 <= threshold <= owners:
        fail(f"--threshold must be between 1 and the number of owners ({owners}), got {threshold}", EXIT_USAGE)
    if not (math.isfinite(epsilon_budget) and epsilon_budget > 0):
        fail(f"--epsilon-budget must be a finite number above 0, got {epsilon_budget}", EXIT_USAGE)
    for digest in image_digests or ():
        if not re.fullmatch(r"sha256:[0-9a-f]{64}", digest) or set(digest[7:]) == {"0"}:   # not the placeholder
            fail(f"--image-digest must be a study image's digest, sha256:<64 hex digits>, got {digest!r}", EXIT_USAGE)
    directory = state_dir or default_state_dir()
    # Options left at their defaults mean "as deployed" when the folder already holds a stack.
    given = {name: getattr(ctx.get_parameter_source(name), "name", "DEFAULT") not in ("DEFAULT", "DEFAULT_MAP")
             for name in ("owners", "epsilon_budget")}
    consortium, deployer = None, None
    if consortium_file is not None:
        if given["owners"] or given["epsilon_budget"] or threshold is not None:
            fail("--consortium gives the owners, threshold and ε budget: leave out --owners, --threshold and "
                 "--epsilon-budget", EXIT_USAGE)
        try:
            consortium = load_consortium(consortium_file)
        except ConsortiumError as exc:
            fail(str(exc), EXIT_USAGE)
    try:
        recorded = StackDeployment.load(directory.resolve())
    except StackRefused as exc:
        fail(str(exc), EXIT_USAGE)
    deployer_keystore = (consortium.chain.deployer_keystore if consortium is not None else
                         Path(recorded.deployer_keystore) if recorded and recorded.rpc_url else None)
    if deployer_keystore is not None:
        deployer = _load_deployer(deployer_keystore)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # `seal down`: unwind through the stack's clean-up
    try:
        with LocalStack(directory, owner_names=DEFAULT_OWNER_NAMES[:owners] if given["owners"] else None,
                        threshold=threshold, epsilon_budget=epsilon_budget if given["epsilon_budget"] else None,
                        with_api=True, notify=lambda line: err.print(f"note: {escape(line)}", highlight=False),
                        consortium=consortium, deployer=deployer, backend=backend.value,
                        image_digests=tuple(image_digests) if image_digests else None) as stack:
            d = stack.description
            where = (f"external, a transaction counts after {d.confirmations} confirmation(s)"
                     if d.chain == "external" else "embedded anvil")
            out.print(f"[green]local stack up[/]  chain {d.chain_id} at {d.rpc_url} ({where})")
            if d.study:
                out.print(f"study {escape(d.study)}: owners {escape(', '.join(o.name for o in d.owners))}")
            if stack.resumed:
                out.print(f"resumed the stack saved in {stack.state_dir}: same chain (block "
                          f"{stack.chain.w3.eth.block_number}), contracts, KMS root and analysts' tokens")
            out.print(f"DstackKms {d.dstack_kms}   DstackApp (app_id) {d.dstack_app}   threshold {d.threshold}/{len(d.owners)}")
            out.print(f"KMS {d.services['kms']['url']} (dev mode: accepts SIMULATED quotes), root {d.services['kms']['root_address']}")
            out.print(f"analysts' REST API {d.services['api']['url']} (OpenAPI at /docs); issue a token with "
                      "`seal analyst-token NAME`")
            if "console" in d.services:
                out.print(f"owners' approval console {d.services['console']['url']} (review, co-sign, revoke)")
            style = "" if stack.study_backend.kind == "container" else "bold red"
            out.print(f"[{style}]study runs: {escape(stack.study_backend.label)}[/]" if style else
                      f"study runs: {escape(stack.study_backend.label)}", highlight=False)
            out.print(f"stack description: {directory / 'stack.json'}   (Ctrl-C or `seal down` stops everything)")
            if compose is not None:
                _boot_when_approved(stack, compose.resolve())
            stack.supervise()   # until Ctrl-C or `seal down`: a service that dies is started again
    except KeyboardInterrupt:
        pass
    except StackRefused as exc:
        fail(str(exc), EXIT_USAGE)
    except DevChainError as exc:
        fail(str(exc), EXIT_UNREACHABLE, exc.hint)
    except (StackError, ChainError, ServiceStartError) as exc:
        fail(str(exc), EXIT_UNREACHABLE)
    out.print("local stack stopped")


def _boot_when_approved(stack: LocalStack, compose: Path) -> None:
    """The owners' keys exist only once the stack is up, so the CVM boots as soon as they have approved."""
    h = hashlib.sha256(compose.read_bytes()).digest()
    study = DstackApp(stack.chain, stack.description.dstack_app)
    out.print(f"waiting for the owners to approve compose hash 0x{h.hex()} before booting its SIMULATED CVM …")
    checked = [0.0]

    def approved() -> bool:   # asked once a second, while the stack's services are supervised
        if time.monotonic() - checked[0] < 1:
            return False
        checked[0] = time.monotonic()
        try:
            return study.status(h).allowed
        except ChainError:    # the chain is down for a moment: the supervisor starts it again
            return False

    stack.supervise(until=approved)
    out.print(f"SIMULATED CVM guest agent: DSTACK_SIMULATOR_ENDPOINT={stack.start_cvm(compose)}")


@app.command("analyst-token")
def analyst_token(
    name: Annotated[Optional[str], typer.Argument(metavar="NAME", help="The analyst to issue a token for")] = None,
    rotate: Annotated[bool, typer.Option("--rotate", help="Replace NAME's token: the old one stops working at "
                                         "once")] = False,
    list_names: Annotated[bool, typer.Option("--list", help="List the analysts who hold a token")] = False,
    revoke: Annotated[Optional[str], typer.Option("--revoke", metavar="NAME", help="Revoke NAME's token")] = None,
    state_dir: StateDir = None, as_json: JsonFlag = False,
) -> None:
    """Issue an API token for an analyst (printed once, alone on stdout; only its hash is kept), or --rotate,
    --list or --revoke tokens. A name that holds a token is replaced only with --rotate."""
    from compose.auth import AnalystExists, UnknownAnalyst, analyst_names, issue_token, revoke_token

    if sum((name is not None, list_names, revoke is not None)) != 1:
        fail("give one of NAME, --list or --revoke NAME", EXIT_USAGE, "`seal analyst-token -h` lists what it takes")
    if rotate and name is None:
        fail("--rotate goes with NAME", EXIT_USAGE)
    stack = load_stack(state_dir)
    api = stack.services.get("api")
    if api is None:
        fail("the local stack runs no analysts' API", EXIT_UNREACHABLE, "start the stack with `seal up`")
    api_state = Path(api["state_dir"])
    try:
        if list_names:
            names = analyst_names(api_state)
            if as_json:
                out.print_json(json.dumps({"analysts": names}))
            else:
                for analyst in names:
                    out.print(analyst, highlight=False)
            return
        if revoke is not None:
            revoke_token(api_state, revoke)
            if as_json:
                out.print_json(json.dumps({"revoked": revoke}))
            else:
                err.print(f"revoked the token of analyst {revoke!r}: the API refuses it from now on", highlight=False)
            return
        token = issue_token(api_state, name, rotate=rotate)
    except AnalystExists as exc:
        fail(str(exc), EXIT_REFUSED, f"`seal analyst-token {name} --rotate` replaces it on purpose")
    except UnknownAnalyst as exc:
        fail(str(exc), EXIT_REFUSED, "`seal analyst-token --list` shows who holds one")
    except ValueError as exc:
        fail(str(exc), EXIT_USAGE)
    verb = "rotated" if rotate else "issued"
    err.print(f"token {verb} for analyst {name!r} (shown once; send it as `Authorization: Bearer …`, or set "
              "SEAL_API_TOKEN for `seal study`):", highlight=False)
    sys.stdout.write(token + "\n")   # alone on stdout, never wrapped or styled
    sys.stdout.flush()


@app.command()
def down(state_dir: StateDir = None) -> None:
    """Stop a stack started by `seal up`."""
    stack = load_stack(state_dir)
    try:
        os.kill(stack.supervisor_pid, signal.SIGTERM)
    except ProcessLookupError:
        fail(f"no `seal up` process {stack.supervisor_pid}; the stack description is stale", EXIT_UNREACHABLE,
             "the next `seal up` in this folder cleans it up and resumes the stack")
    out.print("stopping the local stack")


@app.command()
def propose(
    compose_hash: ComposeHashOpt,
    uri: Annotated[str, typer.Option(help="Where app-compose.json can be read")] = "",
    state_dir: StateDir = None, owner: OwnerOpt = None, keystore: KeystoreOpt = None, as_json: JsonFlag = False,
) -> None:
    """Propose a compose hash for approval (anyone may propose)."""
    _send("proposed", compose_hash, state_dir, owner, keystore, as_json,
          lambda study, h, signer: study.propose(h, uri, signer))


@app.command()
def approve(
    compose_hash: ComposeHashOpt,
    state_dir: StateDir = None, owner: OwnerOpt = None, keystore: KeystoreOpt = None, as_json: JsonFlag = False,
) -> None:
    """Approve a compose hash as one of the study's owners."""
    _send("approved", compose_hash, state_dir, owner, keystore, as_json, DstackApp.approve)


@app.command()
def revoke(
    compose_hash: ComposeHashOpt,
    state_dir: StateDir = None, owner: OwnerOpt = None, keystore: KeystoreOpt = None, as_json: JsonFlag = False,
) -> None:
    """Revoke a compose hash. Any single owner can; it is final."""
    _send("revoked", compose_hash, state_dir, owner, keystore, as_json, DstackApp.revoke)


def _send(action: str, compose_hash: str, state_dir: Path | None, owner: str | None, keystore: Path | None,
          as_json: bool, transaction: Callable[[DstackApp, bytes, LocalAccount], dict]) -> None:
    """One owner transaction on the study's DstackApp, with the CLI's errors and output."""
    stack = load_stack(state_dir)
    signer = load_signer(stack, owner, keystore)
    h = parse_compose_hash(compose_hash)
    try:
        with open_app(stack) as study:
            receipt = transaction(study, h, signer)
    except ChainError as exc:
        chain_refused(exc)
    _done(as_json, action, h, receipt, signer.address)


def _done(as_json: bool, action: str, h: bytes, receipt: dict, by: str | None = None) -> None:
    record = {"action": action, "compose_hash": "0x" + h.hex(), "tx": "0x" + receipt["transactionHash"].hex(),
              "block": receipt["blockNumber"]}
    if by:
        record["by"] = by
    if as_json:
        out.print_json(json.dumps(record))
    else:
        who = f" by {by}" if by else ""
        out.print(f"{action} 0x{h.hex()}{who}  (tx {record['tx']}, block {record['block']})")


@app.command()
def status(
    compose_hash: Annotated[Optional[str], typer.Option("--compose-hash", help="Show one compose hash in detail")] = None,
    state_dir: StateDir = None, as_json: JsonFlag = False,
) -> None:
    """Show the stack, the study's privacy budget and (with --compose-hash) approvals and revocation."""
    stack = load_stack(state_dir)
    h = parse_compose_hash(compose_hash) if compose_hash else None
    try:
        with open_app(stack) as study:
            budget = study.budget()
            detail = study.status(h) if h else None
    except ChainError as exc:
        chain_refused(exc)
    if as_json:
        record = {"chain_id": stack.chain_id, "rpc_url": stack.rpc_url, "chain": stack.chain,
                  "confirmations": stack.confirmations, "study": stack.study, "dstack_kms": stack.dstack_kms,
                  "dstack_app": stack.dstack_app, "threshold": stack.threshold, "owners": len(stack.owners),
                  "budget": budget.to_json(), "services": stack.services}
        if detail:
            record["compose"] = detail.to_json()
        out.print_json(json.dumps(record))
        return
    out.print(f"chain {stack.chain_id} at {stack.rpc_url}" + (
        f" (external, {stack.confirmations} confirmation(s))" if stack.chain == "external" else ""))
    if stack.study:
        out.print(f"study {escape(stack.study)}")
    out.print(f"DstackKms {stack.dstack_kms}   DstackApp (app_id) {stack.dstack_app}")
    for name, service in stack.services.items():
        where = service.get("url") or service.get("rpc_url") or service.get("endpoint", "")
        restart_keys = ("restarts", "last_exit_code", "last_restart_at")
        notes = "  ".join(f"{k}={v}" for k, v in service.items()
                          if k not in ("url", "rpc_url", "endpoint", "pid", "backend", *restart_keys))
        backend = service.get("backend")
        if isinstance(backend, dict):     # the API's: which backend runs the studies (sealing_cli.study_backend)
            notes += f"  backend={backend.get('kind')}" + (f" ({backend.get('engine_kind')}, image "
                                                          f"{backend.get('image')})" if backend.get("image") else "")
        if service.get("restarts"):
            notes += (f"  restarted {service['restarts']}x (last exit code {service.get('last_exit_code')}, "
                      f"last restart {service.get('last_restart_at')})")
        out.print(f"service {name:<6} {where}  pid {service.get('pid')}  {notes}")
    b = budget.to_json()
    out.print(f"privacy budget  ε spent {b['epsilon_spent']:g} of {b['epsilon_budget']:g}, "
              f"{b['epsilon_remaining']:g} left")
    if detail:
        _print_status(detail, {o.address: o.name for o in stack.owners})


def _pinned_kms_root(stack: StackDescription | None, kms_root: str | None) -> str:
    """The KMS root address the owner trusts: given explicitly, else the one registered in DstackKms."""
    if kms_root:
        return kms_root
    if stack is None:
        fail("no KMS root to pin", EXIT_USAGE, "pass --kms-root ADDRESS, or run against a local stack")
    try:
        with open_chain(stack) as chain:
            registered = DstackKms(chain, stack.dstack_kms).kms_root_pubkey()
    except ChainError as exc:
        chain_refused(exc)
    if not registered:
        fail("no KMS root is registered in DstackKms", EXIT_REFUSED)
    return eth_keys.PublicKey.from_compressed_bytes(registered).to_checksum_address()


def _refuse_foreign_output(out_path: Path, input_file: Path) -> None:
    """`seal dataset` replaces only what it made, an earlier sealed file: never its input, never any other file."""
    if not (out_path.exists() or out_path.is_symlink()):
        return
    if out_path.is_dir() or (out_path.exists() and out_path.samefile(input_file)):
        fail(f"--out: {out_path} is {'a folder' if out_path.is_dir() else 'the input file'}; it is left as it is",
             EXIT_USAGE)
    try:
        read_envelope(out_path)
    except (SealedFileError, OSError):
        fail(f"--out: {out_path} exists and is not a sealed file; sealing would replace it, so it is left as it is",
             EXIT_USAGE, "give another --out, or move that file away")


@app.command()
def dataset(
    input_file: Annotated[Path, typer.Argument(metavar="INPUT", help="CSV or Parquet file to seal", exists=True,
                                               dir_okay=False, readable=True)],
    app_id: Annotated[str, typer.Option("--app-id", help="The study's DstackApp address (app_id)")],
    compose_hash: ComposeHashOpt,
    out_file: Annotated[Optional[Path], typer.Option("--out", help="Output file (default: INPUT.sealed)")] = None,
    kms_url: Annotated[Optional[str], typer.Option("--kms-url", help="KMS URL (default: the local stack's)")] = None,
    kms_root: Annotated[Optional[str], typer.Option("--kms-root", help="KMS root address to pin "
                                                    "(default: the one registered in DstackKms)")] = None,
    state_dir: StateDir = None, owner: OwnerOpt = None, keystore: KeystoreOpt = None, as_json: JsonFlag = False,
) -> None:
    """Seal a dataset for one recipe: only a CVM measured as that compose hash can ever open it."""
    stack = None if (kms_url and kms_root and owner is None) else load_stack(state_dir)
    signer = load_signer(stack, owner, keystore)
    h = parse_compose_hash(compose_hash)
    if not is_address(app_id):
        fail(f"--app-id must be a 0x address (the DstackApp contract), got {app_id!r}", EXIT_USAGE)
    out_path = out_file or input_file.with_name(input_file.name + ".sealed")
    if not out_path.parent.is_dir():
        fail(f"--out: the folder {out_path.parent} does not exist", EXIT_USAGE)
    _refuse_foreign_output(out_path, input_file)
    root = _pinned_kms_root(stack, kms_root)
    url = kms_url or stack.services["kms"]["url"]
    try:
        with KmsClient(url) as kms:
            seal_pubkey = kms.owner_seal_key(app_id, h, signer.address, pinned_root_address=root)
    except KmsError as exc:
        fail(str(exc), EXIT_UNREACHABLE if isinstance(exc, KmsUnreachable) else EXIT_REFUSED)
    total = input_file.stat().st_size
    try:
        with Progress(console=err, transient=True, disable=not err.is_terminal or as_json) as bar:
            task = bar.add_task(f"sealing {input_file.name}", total=total)
            summary = seal_file(input_file, out_path, app_id=bytes.fromhex(app_id[2:]), compose_hash=h,
                                owner_key=eth_keys.PrivateKey(signer.key), owner_seal_pubkey=seal_pubkey,
                                kms_root_address=root, progress=lambda n: bar.advance(task, n))
    except (ValueError, SealedFileError) as exc:
        fail(str(exc), EXIT_REFUSED)
    record = {"out": str(summary.out_path), "rows": summary.rows, "bytes": summary.plaintext_bytes,
              "ciphertext_sha256": summary.ciphertext_sha256.hex(), "envelope_digest": summary.envelope_digest.hex(),
              "owner": signer.address, "app_id": to_checksum_address(app_id), "compose_hash": h.hex(),
              "kms_root": root}
    if as_json:
        out.print_json(json.dumps(record))
    else:
        out.print(f"sealed {input_file} -> {summary.out_path}  ({summary.rows} rows, {summary.plaintext_bytes} bytes)")
        out.print(f"ciphertext sha256 {record['ciphertext_sha256']}\nenvelope digest   {record['envelope_digest']}")


@app.command()
def inspect(
    sealed_file: Annotated[Path, typer.Argument(metavar="FILE", exists=True, dir_okay=False, readable=True)],
    quick: Annotated[bool, typer.Option("--quick", help="Check only the header and the owner signature; do not "
                                        "re-hash the payload (a damaged payload then goes unnoticed)")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Print a sealed file's envelope, check the owner's signature and re-hash the payload against the signed
    ciphertext digest (exit 1 if the file is damaged). Needs no key."""
    try:
        envelope = read_envelope(sealed_file) if quick else verify_payload(sealed_file)
    except SealedFileError as exc:
        fail(f"{sealed_file}: {exc}", EXIT_REFUSED)
    h = envelope.header
    record = {
        "format": "sealroom.sealed/v1", "owner": to_checksum_address(h.owner), "signature": "valid",
        "payload": "not checked" if quick else "valid",
        "app_id": to_checksum_address(h.app_id), "compose_hash": h.compose_hash.hex(),
        "kms_root": to_checksum_address(h.kms_root), "source_format": h.source_format,
        "schema": [{"name": f.name, "type": f.type} for f in h.schema], "rows": envelope.rows,
        "plaintext_bytes": h.plaintext_bytes, "chunk_size": h.chunk_size, "chunk_count": h.chunk_count,
        "ciphertext_sha256": envelope.ciphertext_sha256.hex(), "envelope_digest": envelope.digest.hex(),
        "created_at": h.created_at.isoformat(),
    }
    if as_json:
        out.print_json(json.dumps(record))
        return
    for key, value in record.items():
        if key == "schema":
            value = ", ".join(f"{f['name']}:{f['type']}" for f in value)
        elif key == "payload":
            value = ("NOT CHECKED (--quick): the ciphertext was not re-hashed against the signed digest" if quick
                     else "valid: the ciphertext matches the signed ciphertext_sha256")
        out.print(f"{key:<18} {value}")


@app.command()
def demo(
    state_dir: StateDir = None,
    small: Annotated[bool, typer.Option("--small", help="50,000 patients instead of 1.6 million (well under a minute)")] = False,
    federated: Annotated[bool, typer.Option("--federated", help="Run three federated rounds with five sites instead")] = False,
    backend: BackendOpt = BackendChoice.container,
) -> None:
    """Run the demo study end to end on the embedded local stack."""
    try:
        if federated:
            from sealing_cli.demo import transcript_runner
            from sealing_cli.demo_federated import run_federated_demo

            run_federated_demo(state_dir or default_state_dir() / "demo-federated", seal=transcript_runner(app))
            return
        from sealing_cli.demo import run_demo, transcript_runner

        run_demo(state_dir or default_state_dir() / "demo", seal=transcript_runner(app), small=small,
                 backend=backend.value)
    except StackRefused as exc:   # a folder the demo did not make, or where a stack runs: left untouched
        fail(str(exc), EXIT_USAGE, "`seal demo` empties its folder first; it only empties folders it made itself")
    except DevChainError as exc:
        fail(str(exc), EXIT_UNREACHABLE, exc.hint)


@app.command()
def verify(
    receipt_file: Annotated[Path, typer.Argument(metavar="ATTESTATION", help="A run's attestation.json", exists=True,
                                                 dir_okay=False, readable=True)],
    rpc: Annotated[Optional[str], typer.Option("--rpc", help="The chain's JSON-RPC URL (default: the local "
                                               "stack's)")] = None,
    kms_root: Annotated[Optional[str], typer.Option("--kms-root", help="Pin the KMS root address (default: the "
                                                    "local stack's; without one, only DstackKms's word, with a "
                                                    "warning)")] = None,
    collateral: Annotated[Optional[Path], typer.Option("--collateral", help="Intel DCAP collateral JSON for a real "
                                                       "quote (default: the receipt's)", exists=True, dir_okay=False,
                                                       readable=True)] = None,
    allow_simulated: Annotated[bool, typer.Option("--allow-simulated", help="Accept a SIMULATED TDX quote (it proves "
                                                  "nothing about hardware)")] = False,
    os_measurements: Annotated[Optional[list[Path]], typer.Option(
        "--os-measurements", help="Pin an OS image's measurement record (sealroom-os-measurement/v1); repeatable "
        "(default: the records the local stack's KMS holds)", exists=True, dir_okay=False, readable=True)] = None,
    simulated_root: Annotated[Optional[Path], typer.Option("--simulated-root", help="The simulated TDX root to pin, "
                                                           "DER (default: the local stack's)", exists=True,
                                                           dir_okay=False, readable=True)] = None,
    at: Annotated[Optional[int], typer.Option("--now", help="Judge certificates and collateral at this unix time "
                                              "(default: now)")] = None,
    block_hash: Annotated[Optional[str], typer.Option("--block-hash", help="The hash of the receipt's recorded block, "
                                                      "from a source you trust: link 4 checks the receipt's storage "
                                                      "proofs against it (default: the chain node's)")] = None,
    no_rpc: Annotated[bool, typer.Option("--no-rpc", help="Ask no chain node: link 4 needs --block-hash, the links "
                                         "that read the chain otherwise fail as unreachable")] = False,
    rebuild: Annotated[Optional[str], typer.Option(
        "--rebuild", metavar="SOURCE", help="Rebuild the study image from SOURCE (a folder, or a git commit of the "
        "repository here) with its own builder, and check (link 8, image) that its digest is the one the measured "
        "compose pins: this receipt came from this source code")] = None,
    state_dir: StateDir = None, as_json: JsonFlag = False,
) -> None:
    """Check a run's receipt link by link from raw evidence; exit 0 only when every link holds (docs/auditor.md)."""
    try:
        stack = StackDescription.load(state_dir)
    except StackError:
        stack = None
    rpc_url = None if no_rpc else rpc or (stack.rpc_url if stack else None)
    if no_rpc and rpc is not None:
        fail("--no-rpc and --rpc exclude each other", EXIT_USAGE)
    if block_hash is not None and not (block_hash.startswith("0x") and len(block_hash) == 66
                                       and all(c in "0123456789abcdefABCDEF" for c in block_hash[2:])):
        fail(f"--block-hash must be a 0x-prefixed 32-byte hash, got {block_hash!r}", EXIT_USAGE)
    if rpc_url is None and block_hash is None:
        fail("no chain to check the receipt against", EXIT_USAGE,
             "pass --rpc URL or --block-hash HASH, or start a local stack (`seal up`)")
    if kms_root is not None and not (kms_root.startswith("0x") and is_address(kms_root)):
        fail(f"--kms-root must be a 0x-prefixed address, got {kms_root!r}", EXIT_USAGE)
    pinned_root = kms_root or (stack.services.get("kms", {}).get("root_address") if stack else None)
    root_der = None
    if allow_simulated:
        # The receipt cannot vouch for its own simulated root: it is pinned here, never read from the receipt.
        root_path = simulated_root or ((state_dir or default_state_dir()) / "simulated-tdx" / "root.der"
                                       if stack else None)
        if root_path is None or not root_path.is_file():
            fail("--allow-simulated needs a simulated TDX root to pin", EXIT_USAGE,
                 "pass --simulated-root FILE (DER), or run against the local stack that made the receipt")
        root_der = root_path.read_bytes()
    # Like the roots, the OS measurements are the auditor's pins (or the local stack's), never the receipt's.
    try:
        os_records = ([load_record(path) for path in os_measurements] if os_measurements else
                      OsImageRegistry(kms_os_images_dir(state_dir or default_state_dir())).records() if stack else [])
    except OsRecordInvalid as exc:
        fail(str(exc), EXIT_USAGE)
    try:
        receipt = load_receipt(receipt_file.read_bytes())
    except NotAReceipt as exc:
        fail(f"{receipt_file}: {exc}", EXIT_REFUSED)  # fail() escapes: the reason may quote the file
    rebuilt = None
    if rebuild is not None:
        from auditor.rebuild import rebuild_study_image

        err.print(f"rebuilding the study image from {escape(rebuild)} (link 8) …", highlight=False)
        rebuilt = rebuild_study_image(rebuild)
        err.print(f"  {escape(rebuilt.digest or 'not rebuilt: ' + (rebuilt.error or ''))}"
                  + (f" in {rebuilt.seconds:.1f} s" if rebuilt.seconds is not None else ""), highlight=False)
    chain = None
    if rpc_url is not None:
        try:
            chain = Chain(rpc_url)
        except ChainUnreachable as exc:
            err.print(f"[bold red]error:[/] {escape(str(exc))}; the on-chain links cannot be checked"
                      + (" (link 4: only against --block-hash)" if block_hash else ""), highlight=False)
    try:
        report = verify_receipt(receipt, now=int(time.time()) if at is None else at, chain=chain,
                                kms_root=pinned_root, collateral=collateral.read_text() if collateral else None,
                                allow_simulated=allow_simulated, simulated_root_der=root_der,
                                os_measurements=os_records, block_hash=block_hash, rebuilt_image=rebuilt)
    finally:
        if chain is not None:
            chain.close()
    if as_json:
        out.print_json(json.dumps(report.to_json()))
    else:
        out.print(render_checklist(report), highlight=False)
    first = report.first_failure
    if first is not None:
        hint = ("a SIMULATED receipt passes only with --allow-simulated" if report.simulated and not allow_simulated
                else None)
        fail(f"link {first.number} ({first.name}) is broken: {first.reason}",
             EXIT_UNREACHABLE if first.unreachable else EXIT_REFUSED, hint)


app.add_typer(site_app, name="site")
app.add_typer(study_app, name="study")
os_app = typer.Typer(no_args_is_help=True, help="The OS images the local KMS serves (their measured MRTD and RTMR0-2).")
app.add_typer(os_app, name="os")


@os_app.command("register")
def os_register(
    record_file: Annotated[Path, typer.Argument(metavar="FILE", help="The image's measurement record, "
                                                "sealroom-os-measurement/v1 JSON (docs/protocol.md)", exists=True,
                                                dir_okay=False, readable=True)],
    state_dir: StateDir = None, as_json: JsonFlag = False,
) -> None:
    """Register an OS image with the local stack: its measurement record with the KMS, its hash on DstackKms. The
    KMS then serves CVMs that measure this os-image-hash only if their MRTD and RTMR0-2 are the record's."""
    stack = load_stack(state_dir)
    try:
        record = load_record(record_file)
    except OsRecordInvalid as exc:
        fail(str(exc), EXIT_USAGE)
    # The local stack's operator owns its DstackKms: the dev funder, or on an external chain the deployer.
    operator = Account.from_key(ANVIL_FUNDER_KEY)
    if stack.chain == "external":
        try:
            recorded = StackDeployment.load((state_dir or default_state_dir()).resolve())
        except StackRefused as exc:
            fail(str(exc), EXIT_USAGE)
        if recorded is None or not recorded.deployer_keystore:
            fail("the stack's chain is external, and its deployment names no deployer keystore", EXIT_KEY)
        operator = _load_deployer(Path(recorded.deployer_keystore))
    try:
        with open_chain(stack) as chain:
            done = register_os_image(state_dir or default_state_dir(), DstackKms(chain, stack.dstack_kms), record,
                                     operator)
    except OsRecordConflict as exc:
        fail(str(exc), EXIT_REFUSED)
    except ChainError as exc:
        chain_refused(exc)
    if as_json:
        out.print_json(json.dumps({"os_image_hash": record.os_image_hash.hex(), "name": record.name,
                                   "version": record.version, "record": str(done.path),
                                   "newly_recorded": done.recorded, "newly_allowed": done.allowed}))
        return
    out.print(f"OS image {record.name} {record.version}  os_image_hash {record.os_image_hash.hex()}")
    out.print(f"KMS record  {done.path} ({'registered' if done.recorded else 'already registered'})")
    out.print(f"DstackKms   {stack.dstack_kms}: {'now allows' if done.allowed else 'already allowed'} this image")
app.add_typer(image_app, name="image")
app.add_typer(deploy_app, name="deploy")


def main() -> None:
    """The `seal` console entry point. A failure the commands did not foresee is a bug: it still ends in one
    `error:` line (no traceback, which could print local variables), and SEAL_DEBUG=1 shows where it happened."""
    try:
        app()
    except Exception as exc:
        if os.environ.get("SEAL_DEBUG"):
            raise
        err.print(f"[bold red]error:[/] unexpected {type(exc).__name__}: {escape(str(exc))}", highlight=False)
        err.print("[bold]hint:[/] this is a bug in seal; rerun with SEAL_DEBUG=1 to see where, and report it",
                  highlight=False)
        sys.exit(EXIT_INTERNAL)
