"""docs/cli.md cannot drift from the `seal` command: every command and every option is documented, nothing documented
is gone, and the exit-code table is exactly the codes the commands use (sealing_cli/common.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer

from sealing_cli import common
from sealing_cli.main import app

DOC = Path(__file__).resolve().parent.parent / "docs" / "cli.md"
_HEADING = re.compile(r"^### `(seal(?: [a-z-]+)*)`\s*$", re.M)


def _leaf_commands() -> dict[str, object]:
    """'seal up', 'seal site train', …: every runnable command, walked from the typer app as click sees it."""
    found: dict[str, object] = {}

    def walk(command, path: str) -> None:
        subcommands = getattr(command, "commands", None)
        if subcommands:
            for name, sub in subcommands.items():
                if not getattr(sub, "hidden", False):
                    walk(sub, f"{path} {name}")
        else:
            found[path] = command

    walk(typer.main.get_command(app), "seal")
    return found


def _sections() -> dict[str, str]:
    """Each `### \\`seal …\\`` section of the reference, up to the next heading."""
    text = DOC.read_text()
    reference = text[text.index("## Commands and options"):]
    sections = {}
    for heading in _HEADING.finditer(reference):
        ends = [reference.find(mark, heading.end()) for mark in ("\n### ", "\n## ")]
        end = min([e for e in ends if e != -1], default=len(reference))
        sections[heading.group(1)] = reference[heading.end():end]
    return sections


def _names(command) -> tuple[set[str], set[str]]:
    """The command's long option names and its arguments' metavars (what the docs must show)."""
    options, arguments = set(), set()
    for param in command.params:
        if param.param_type_name == "argument":
            arguments.add((param.metavar or param.name).upper().strip("[]."))
        else:
            options.update(opt for opt in param.opts if opt.startswith("--") and opt != "--help")
    return options, arguments


def test_every_command_has_a_section_and_every_section_a_command():
    commands, sections = set(_leaf_commands()), set(_sections())
    assert commands - sections == set(), f"undocumented in docs/cli.md: {sorted(commands - sections)}"
    assert sections - commands == set(), f"documented but not a command: {sorted(sections - commands)}"


@pytest.mark.parametrize("path", sorted(_leaf_commands()))
def test_every_option_and_argument_is_documented_and_nothing_else(path):
    command = _leaf_commands()[path]
    section = _sections().get(path, "")
    options, arguments = _names(command)
    documented = set(re.findall(r"`(--[a-z][a-z0-9-]*)", section))
    assert options - documented == set(), f"{path}: options missing from docs/cli.md: {sorted(options - documented)}"
    assert documented - options == set(), f"{path}: docs/cli.md names options it does not have: " \
                                          f"{sorted(documented - options)}"
    for argument in arguments:
        assert f"`{argument}`" in section, f"{path}: argument {argument} is not documented"


def test_the_exit_code_table_is_exactly_the_codes_in_use():
    used = {0} | {value for name, value in vars(common).items() if name.startswith("EXIT_")}
    text = DOC.read_text()
    table = text[text.index("## Exit codes"):]
    table = table[:table.index("\n\n", table.index("| code |"))]
    documented = {int(code) for code in re.findall(r"^\| (\d+) \|", table, re.M)}
    assert documented == used

