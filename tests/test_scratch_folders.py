"""No command deletes what it did not create: `seal demo` empties only a folder it made (it carries the demo's
marker), refuses anyone else's folder and a folder where a stack runs, and `seal dataset` never replaces a file
that is not a sealed file (least of all its own input)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from eth_account import Account
from typer.testing import CliRunner

from compose.stack_file import STACK_FILE
from sealing_cli.main import app as seal_cli
from sealing_cli.scratch import MARKER, ScratchRefused, prepare_scratch_folder

SEAL = Path(sys.executable).parent / "seal"


@pytest.mark.parametrize("mode", [[], ["--federated"]], ids=["study", "federated"])
def test_seal_demo_refuses_a_folder_holding_a_user_file_and_leaves_it(tmp_path, mode):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("my own notes\n")
    result = subprocess.run([SEAL, "demo", *mode, "--state-dir", str(folder)], capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith("error: ") and "was not made by seal demo" in result.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]
    assert (folder / "notes.txt").read_text() == "my own notes\n"


def test_a_folder_where_a_stack_runs_is_refused_even_if_the_demo_made_it(tmp_path):
    folder = prepare_scratch_folder(tmp_path / "demo", made_by="seal demo")
    (folder / STACK_FILE).write_text(json.dumps({"supervisor_pid": os.getpid()}))   # this process: alive
    with pytest.raises(ScratchRefused, match="a stack is running"):
        prepare_scratch_folder(folder, made_by="seal demo")
    assert (folder / STACK_FILE).exists()


def test_only_a_marked_folder_is_emptied(tmp_path):
    made = prepare_scratch_folder(tmp_path / "new" / "demo", made_by="seal demo")   # created, with parents
    assert [p.name for p in made.iterdir()] == [MARKER]
    (made / "chain").mkdir()
    (made / "chain" / "state.json").write_text("{}")
    (made / "attestation.json").write_text("{}")
    outside = tmp_path / "outside.txt"
    outside.write_text("keep")
    (made / "link").symlink_to(outside)
    assert prepare_scratch_folder(made, made_by="seal demo") == made
    assert [p.name for p in made.iterdir()] == [MARKER]
    assert outside.read_text() == "keep"                       # a link is removed, never followed

    empty = tmp_path / "empty"
    empty.mkdir()
    prepare_scratch_folder(empty, made_by="seal demo")         # an empty folder is fine: nothing to lose
    assert (empty / MARKER).is_file()

    forged = tmp_path / "forged"
    forged.mkdir()
    (forged / MARKER).write_text("not json")
    (forged / "data.csv").write_text("a\n")
    with pytest.raises(ScratchRefused):
        prepare_scratch_folder(forged, made_by="seal demo")
    assert (forged / "data.csv").exists()

    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ScratchRefused):
        prepare_scratch_folder(a_file, made_by="seal demo")
    assert a_file.read_text() == "x"


def test_seal_dataset_never_replaces_a_file_it_did_not_make(tmp_path, monkeypatch):
    source = tmp_path / "cohort.csv"
    source.write_text("age\n40\n")
    other = tmp_path / "report.txt"
    other.write_text("mine")
    monkeypatch.setenv("SEAL_OWNER_KEY", Account.create().key.hex())
    common = ["--app-id", "0x" + "11" * 20, "--compose-hash", "0x" + "22" * 32, "--kms-url", "http://127.0.0.1:9",
              "--kms-root", "0x" + "33" * 20]
    for out in (source, other):
        result = CliRunner().invoke(seal_cli, ["dataset", str(source), *common, "--out", str(out)])
        assert result.exit_code == 2, result.output
        assert "left as it is" in result.output
    assert source.read_text() == "age\n40\n" and other.read_text() == "mine"
