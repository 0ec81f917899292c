"""What every `seal` command shares: the documented exit codes, the one-line `error:` / `hint:` output, and the
loaders for the stack description, the chain and the acting owner's key. The command modules import this; it
imports none of them.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Iterator, NoReturn, Optional

import typer
from eth_account import Account
from eth_account.signers.local import LocalAccount
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from compose.stack_file import StackDescription, StackError, read_keystore
from contracts.chain import Chain, ChainError, ChainUnreachable, DstackApp

try:  # typer >= 0.25 carries its own copy of click, and raises that copy's exceptions
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover - older typer uses click itself
    from click import exceptions as click_exceptions

EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_KEY = 1, 2, 3, 4
EXIT_INTERNAL = 5   # a failure no command foresaw: a bug in seal

# `seal site …` defaults, here so that the site's logic (which imports torch) and its commands share them.
DEFAULT_GATE_TOLERANCE = 0.02   # log-loss (nats) the local update may add on local validation
DEFAULT_ACCEPT_TOLERANCE = 0.01  # AUC the global candidate may lose against the champion

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


def report_error(message: str, hint: str | None = None) -> None:
    """One `error:` line, and a `hint:` line where one helps. Both are escaped: messages may quote user input."""
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    if hint:
        err.print(f"[bold]hint:[/] {escape(hint)}", highlight=False)


def fail(message: str, code: int, hint: str | None = None) -> NoReturn:
    report_error(message, hint)
    raise typer.Exit(code)


class OneLineErrors(TyperGroup):
    """Usage errors print as every other error does, one `error:` line and a `hint:` (typer's default draws a box
    around them). A caller that asks for non-standalone mode (the demo's transcript) gets click's exceptions."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click_exceptions.NoArgsIsHelpError as exc:
            exc.show()   # `seal` alone, or a command group alone: its help
            sys.exit(exc.exit_code)
        except click_exceptions.ClickException as exc:
            where = exc.ctx.command_path if getattr(exc, "ctx", None) else "seal"
            report_error(exc.format_message(), f"`{where} -h` lists what it takes")
            sys.exit(exc.exit_code)
        except typer.Abort:
            report_error("aborted")
            sys.exit(EXIT_REFUSED)
        sys.exit(code if isinstance(code, int) else 0)


StateDir = Annotated[Optional[Path], typer.Option("--state-dir", help="Stack state folder (default: $SEALROOM_HOME or ./.sealroom)")]
JsonFlag = Annotated[bool, typer.Option("--json", help="Machine-readable output")]
OwnerOpt = Annotated[Optional[str], typer.Option("--owner", help="A dev owner of the local stack, by name or address")]
KeystoreOpt = Annotated[Optional[Path], typer.Option("--keystore", help="An encrypted eth-account keystore (password from SEAL_KEYSTORE_PASSWORD)")]
ComposeHashOpt = Annotated[str, typer.Option("--compose-hash", help="The compose hash (0x + 64 hex digits)")]


def load_stack(state_dir: Path | None) -> StackDescription:
    try:
        return StackDescription.load(state_dir)
    except StackError as exc:
        fail(str(exc), EXIT_UNREACHABLE, "run `seal up` in another terminal, or pass --state-dir")


@contextmanager
def open_chain(stack: StackDescription) -> Iterator[Chain]:
    """The stack's chain; on an external one, transactions wait for the stack's confirmations."""
    try:
        chain = stack.connect()
    except ChainUnreachable as exc:
        fail(str(exc), EXIT_UNREACHABLE, "is `seal up` still running?")
    with chain:
        yield chain


@contextmanager
def open_app(stack: StackDescription) -> Iterator[DstackApp]:
    with open_chain(stack) as chain:
        yield DstackApp(chain, stack.dstack_app)


def parse_compose_hash(value: str) -> bytes:
    raw = value.removeprefix("0x")
    if len(raw) != 64:
        fail(f"a compose hash is 32 bytes (64 hex digits), got {len(raw)} digits", EXIT_USAGE)
    try:
        return bytes.fromhex(raw)
    except ValueError:
        fail(f"compose hash is not hex: {value!r}", EXIT_USAGE)


def load_signer(stack: StackDescription | None, owner: str | None, keystore: Path | None) -> LocalAccount:
    """The acting owner's key: --keystore, then --owner (dev stack), then SEAL_OWNER_KEY."""
    chosen = [x for x in (owner, keystore) if x is not None]
    if len(chosen) > 1:
        fail("give either --owner or --keystore, not both", EXIT_USAGE)
    try:
        if keystore is not None:
            return read_keystore(keystore, _keystore_password())
        if owner is not None:
            if stack is None:
                fail("--owner names a dev owner of the local stack, and no stack is running", EXIT_UNREACHABLE)
            entry = stack.owner(owner)
            if entry.kind == "address":   # a consortium file's owner known by address: their key is theirs
                fail(f"owner {entry.name} ({entry.address}) signs with their own key, which this stack does not hold",
                     EXIT_KEY, "pass --keystore FILE (that owner's keystore), or set SEAL_OWNER_KEY")
            if entry.kind == "keystore":  # the owner's own keystore, named in the consortium file
                return read_keystore(entry.keystore, _keystore_password())
            return read_keystore(entry.keystore, stack.dev_keystore_password)
        if key := os.environ.get("SEAL_OWNER_KEY"):
            return Account.from_key(key)
    except StackError as exc:
        fail(str(exc), EXIT_KEY)
    except (OSError, ValueError, KeyError, TypeError) as exc:  # KeyError/TypeError: a JSON file that is no keystore
        # eth-account raises ValueError("MAC mismatch") for a wrong password; never echo key material.
        fail(f"could not load the owner key: {type(exc).__name__}: {exc}", EXIT_KEY,
             "check the keystore path and SEAL_KEYSTORE_PASSWORD")
    fail("no owner key given", EXIT_KEY, "use --owner NAME (local stack), --keystore PATH, or set SEAL_OWNER_KEY")


def _keystore_password() -> str:
    password = os.environ.get("SEAL_KEYSTORE_PASSWORD")
    if password is None:
        if not sys.stdin.isatty():
            fail("no keystore password: SEAL_KEYSTORE_PASSWORD is not set and there is no terminal to ask on",
                 EXIT_KEY, "set SEAL_KEYSTORE_PASSWORD")
        password = typer.prompt("keystore password", hide_input=True)
    return password


def chain_refused(exc: ChainError) -> NoReturn:
    if isinstance(exc, ChainUnreachable):
        fail(str(exc), EXIT_UNREACHABLE, "is `seal up` still running?")
    fail(str(exc), EXIT_REFUSED)
