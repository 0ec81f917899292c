"""Every `seal` command answers bad input with one `error:` line and the exit code docs/cli.md documents.

The commands run in this process (typer's CliRunner), so an exception that no command foresaw surfaces here as a
test failure instead of being caught by the console entry point's last-resort handler (tested separately below).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from eth_account import Account
from typer.testing import CliRunner

from compose.stack_file import StackDescription, write_keystore
from sealing_cli.main import app
from sealing_cli.stack import LocalStack

REFUSED, USAGE, UNREACHABLE, KEY = 1, 2, 3, 4
H = "0x" + hashlib.sha256(b"cli errors").hexdigest()
ZERO_APP = "0x" + "11" * 20
runner = CliRunner()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    state = tmp_path_factory.mktemp("stack")
    with LocalStack(state, owner_names=("A", "B"), threshold=2, epsilon_budget=1.0) as s:
        yield s


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("inputs")
    made = {
        "csv": folder / "table.csv",
        "empty": folder / "empty.bin",
        "not_json": folder / "receipt.json",
        "empty_keystore": folder / "empty-keystore.json",
        "braces_keystore": folder / "braces-keystore.json",
        "list_keystore": folder / "list-keystore.json",
    }
    made["csv"].write_text("age,outcome\n40,1\n51,0\n")
    made["empty"].write_bytes(b"")
    made["not_json"].write_text("this is not json")
    made["empty_keystore"].write_text("")
    made["braces_keystore"].write_text("{}")
    made["list_keystore"].write_text("[1, 2, 3]")
    return made


@pytest.fixture(scope="module")
def dead_stack(stack, tmp_path_factory) -> Path:
    """A stack description whose chain no longer answers (a stack that died without cleaning up)."""
    folder = tmp_path_factory.mktemp("dead")
    description = StackDescription.load(stack.state_dir)
    description.rpc_url = "http://127.0.0.1:9"  # nothing listens on the discard port
    description.services = {name: {**service, "url": "http://127.0.0.1:9"} for name, service in
                            description.services.items()}
    description.save(folder)
    return folder


def _cases(stack: LocalStack, files: dict[str, Path], dead: Path, empty: Path) -> list[tuple[str, list[str], int, str]]:
    live = ["--state-dir", str(stack.state_dir)]
    gone = ["--state-dir", str(dead)]
    none = ["--state-dir", str(empty)]
    csv = str(files["csv"])
    return [
        # (case, argv, exit code, words the error line must hold)
        ("dataset: missing input", ["dataset", "/no/such.csv", "--app-id", ZERO_APP, "--compose-hash", H, *live],
         USAGE, "does not exist"),
        ("dataset: --out into a missing folder",
         ["dataset", csv, "--app-id", ZERO_APP, "--compose-hash", H, "--out", "/no/such/dir/x.sealed", "--owner", "A",
          *live], USAGE, "does not exist"),
        ("dataset: malformed app id", ["dataset", csv, "--app-id", "0x12", "--compose-hash", H, "--owner", "A", *live],
         USAGE, "--app-id"),
        ("dataset: malformed compose hash", ["dataset", csv, "--app-id", ZERO_APP, "--compose-hash", "0xzz" * 16,
                                             "--owner", "A", *live], USAGE, "compose hash"),
        ("inspect: missing file", ["inspect", "/no/such.sealed"], USAGE, "does not exist"),
        ("inspect: a CSV, not a sealed file", ["inspect", csv], REFUSED, "table.csv"),
        ("inspect: an empty file", ["inspect", str(files["empty"])], REFUSED, "empty.bin"),
        ("verify: missing file", ["verify", "/no/such.json", *live], USAGE, "does not exist"),
        ("verify: not JSON", ["verify", str(files["not_json"]), *live], REFUSED, "not JSON"),
        ("verify: no chain to check against", ["verify", str(files["not_json"]), *none], USAGE, "--rpc"),
        ("up: negative budget", ["up", "--epsilon-budget", "-1", *none], USAGE, "--epsilon-budget"),
        ("up: budget not a number", ["up", "--epsilon-budget", "nan", *none], USAGE, "--epsilon-budget"),
        ("up: threshold above the owner count", ["up", "--owners", "2", "--threshold", "3", *none], USAGE,
         "--threshold"),
        ("up: no owners", ["up", "--owners", "0", *none], USAGE, "--owners"),
        ("approve: malformed hex", ["approve", "--compose-hash", "0x" + "zz" * 32, "--owner", "A", *live], USAGE,
         "not hex"),
        ("approve: wrong owner name", ["approve", "--compose-hash", H, "--owner", "Nobody", *live], KEY,
         "no dev owner named"),
        ("approve: both --owner and --keystore",
         ["approve", "--compose-hash", H, "--owner", "A", "--keystore", csv, *live], USAGE, "not both"),
        ("approve: empty keystore", ["approve", "--compose-hash", H, "--keystore", str(files["empty_keystore"]),
                                     *live], KEY, "owner key"),
        ("approve: keystore holding {}", ["approve", "--compose-hash", H, "--keystore",
                                          str(files["braces_keystore"]), *live], KEY, "owner key"),
        ("approve: keystore holding a list", ["approve", "--compose-hash", H, "--keystore",
                                              str(files["list_keystore"]), *live], KEY, "owner key"),
        ("status: no stack", ["status", *none], UNREACHABLE, "seal up"),
        ("status: dead stack", ["status", *gone], UNREACHABLE, "unreachable"),
        ("approve: dead stack", ["approve", "--compose-hash", H, "--owner", "A", *gone], UNREACHABLE, "unreachable"),
        ("down: no stack", ["down", *none], UNREACHABLE, "seal up"),
        ("analyst-token: no stack", ["analyst-token", "alice", *none], UNREACHABLE, "seal up"),
        ("status: malformed compose hash", ["status", "--compose-hash", "0x1234", *live], USAGE, "64 hex digits"),
        ("site accept: a CSV as --data", ["site", "accept", "--round", "1", "--data", csv, "--owner", "A", *live],
         USAGE, "table.csv"),
    ]


def _check(result, code: int, words: str) -> None:
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"unforeseen {type(result.exception).__name__}: {result.exception}")
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    assert words.lower() in result.stderr.lower(), result.stderr
    assert result.exit_code == code, result.output


def test_every_bad_input_gets_one_error_line_and_its_exit_code(stack, files, dead_stack, tmp_path):
    problems = []
    for case, argv, code, words in _cases(stack, files, dead_stack, tmp_path):
        result = runner.invoke(app, argv, env={"SEAL_KEYSTORE_PASSWORD": "pw"} if "--keystore" in argv else None)
        try:
            _check(result, code, words)
        except AssertionError as exc:
            problems.append(f"{case}: {exc}")
    assert not problems, "\n\n".join(problems)


def test_a_keystore_prompt_without_a_terminal_is_a_key_error(stack, tmp_path):
    account = Account.create()
    path = tmp_path / "k.json"
    write_keystore(account, path, "pw")
    result = runner.invoke(app, ["approve", "--compose-hash", H, "--keystore", str(path),
                                 "--state-dir", str(stack.state_dir)], env={"SEAL_KEYSTORE_PASSWORD": None})
    _check(result, KEY, "SEAL_KEYSTORE_PASSWORD")


def test_proposing_from_an_account_without_funds_is_refused(stack, tmp_path):
    result = runner.invoke(app, ["propose", "--compose-hash", H, "--state-dir", str(stack.state_dir)],
                           env={"SEAL_OWNER_KEY": Account.create().key.hex()})
    _check(result, REFUSED, "funds")


def test_version_and_short_help():
    assert runner.invoke(app, ["--version"]).stdout.startswith("seal ")
    short = runner.invoke(app, ["-h"])
    assert short.exit_code == 0 and "Usage: " in short.stdout and "--version" in short.stdout


def test_the_console_entry_point_shows_no_traceback_for_an_unforeseen_failure():
    """The last resort: a failure no command foresaw is one `error:` line with exit code 5 and no traceback (which
    could print local variables); SEAL_DEBUG=1 shows it. Forced by a command that divides by zero."""
    program = ("import sealing_cli.main as cli\n"
               "cli.app.command('boom')(lambda: 1 / 0)\n"
               "cli.main()\n")
    argv = [sys.executable, "-c", program, "boom"]
    quiet = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert quiet.returncode == 5, quiet.stderr
    assert "Traceback" not in quiet.stderr and quiet.stderr.count("error:") == 1
    assert "ZeroDivisionError" in quiet.stderr and "SEAL_DEBUG" in quiet.stderr
    debug = subprocess.run(argv, capture_output=True, text=True, timeout=120, env={**os.environ, "SEAL_DEBUG": "1"})
    assert "Traceback" in debug.stderr
