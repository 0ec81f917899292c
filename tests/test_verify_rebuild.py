"""`seal verify --rebuild SOURCE` (issue 12 part 3): link 8, ``image`` — the study image the measured compose pins
is the one rebuilt bit for bit from SOURCE, so this receipt came from this source code.

One real SIMULATED study run whose compose pins the study image built from a snapshot of this checkout's sources
(a copy, so that edits made meanwhile in the working tree do not count). The link is checked alone first, then
through `seal verify`: the snapshot (a folder, and the same files as a git commit) rebuilds to the pinned digest;
a one-byte change to its CVM code does not, and `seal verify` fails naming link 8.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from auditor.links import image as image_link
from auditor.links.base import Broken
from auditor.links.compose import ComposeProof
from auditor.rebuild import rebuild_study_image
from auditor.receipt import parse_receipt
from auditor.verify import RebuiltImage
from compose.app_compose import manifest_from_app_compose
from compose.image import build_study_image, default_image_dir
from compose.image.build import APP_PACKAGES
from sealing_cli.main import app
from tests.study_world import build_study_world, start_study_stack

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()
pytestmark = pytest.mark.timeout(900)


def snapshot(target: Path) -> Path:
    """The packages the image is built from, copied (no caches): a source tree as an auditor would get it."""
    for package in APP_PACKAGES:
        shutil.copytree(ROOT / package, target / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return target


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    source = snapshot(tmp_path_factory.mktemp("source"))
    with start_study_stack(tmp_path_factory.mktemp("rebuild")) as stack:
        record = build_study_image(default_image_dir(stack.state_dir), root=source, log=lambda line: None)
        study = build_study_world(stack, image=record.reference)
        yield study, source, record


def verify(world, *args: str):
    study, _, _ = world
    return runner.invoke(app, ["verify", str(study.receipt_path), "--allow-simulated", *args, "--state-dir",
                               str(study.stack.state_dir)])


# --- the link alone -------------------------------------------------------------------------------------------------

def test_the_link_holds_for_the_pinned_digest_and_breaks_for_any_other(world):
    study, _, record = world
    receipt = parse_receipt(study.receipt)
    proof = ComposeProof(manifest_from_app_compose(study.receipt["app_compose"].encode()))
    held = image_link.check(receipt, proof, RebuiltImage("the source folder S", digest=record.digest))
    assert held.proven == record.digest and held.facts["pinned"] == [record.digest]
    assert held.summary == f"{record.digest} rebuilt bit for bit from the source folder S" and not held.warnings
    other = "sha256:" + "ab" * 32
    with pytest.raises(Broken, match=f"the compose pins {record.digest}, but the source folder S rebuilds to "
                                     f"{other}: this receipt did not come from this source code"):
        image_link.check(receipt, proof, RebuiltImage("the source folder S", digest=other))
    with pytest.raises(Broken, match="could not be rebuilt from the source folder S: no builder"):
        image_link.check(receipt, proof, RebuiltImage("the source folder S", error="no builder"))


def test_a_compose_that_names_its_image_by_tag_ties_to_no_source(world):
    study, _, record = world
    body = json.loads(study.receipt["app_compose"])
    body["docker_compose_file"] = body["docker_compose_file"].replace(record.reference, "sealroom/study-runner:latest")
    tagged = parse_receipt({**study.receipt, "app_compose": json.dumps(body)})
    with pytest.raises(Broken, match="does not name its image by a sha256 digest") as broken:
        image_link.check(tagged, None, RebuiltImage("S", digest=record.digest))
    assert "not proven to be the measured one" in broken.value.facts["compose_from"]   # link 3 would have failed


# --- rebuilding -------------------------------------------------------------------------------------------------------

def test_the_source_folder_and_the_same_files_as_a_git_commit_rebuild_to_the_pinned_digest(world, tmp_path):
    _, source, record = world
    rebuilt = rebuild_study_image(source)
    assert (rebuilt.digest, rebuilt.error, rebuilt.commit) == (record.digest, None, None)
    assert rebuilt.source == f"the source folder {source}"
    repository = shutil.copytree(source, tmp_path / "repository")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    for command in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "snapshot"]):
        subprocess.run([*git, *command], cwd=repository, check=True, capture_output=True)
    (repository / "cvm" / "run.py").write_bytes(b"# an uncommitted edit is not in the commit\n")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repository, check=True, capture_output=True,
                            text=True).stdout.strip()
    from_git = rebuild_study_image("HEAD", repository=repository)
    assert (from_git.digest, from_git.commit) == (record.digest, commit)
    assert from_git.source == f"git commit {commit} of {repository}"
    nothing = rebuild_study_image("no-such-thing", repository=repository)
    assert nothing.digest is None and "neither a folder nor a git commit" in nothing.error
    (tmp_path / "empty").mkdir()
    assert "no study image builder" in rebuild_study_image(tmp_path / "empty").error


def test_seal_verify_rebuild_shows_link_8_and_verifies(world):
    _, source, record = world
    result = verify(world, "--rebuild", str(source))
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert sum("✔ ok" in line for line in lines) == 8
    (index,) = [i for i, line in enumerate(lines) if " 8 image " in line]
    assert "✔ ok" in lines[index] and "this source code ran" in lines[index]
    assert f"{record.digest} rebuilt bit for bit from the source folder {source}" in lines[index + 1]
    assert "rebuilding the study image from" in result.stderr
    report = json.loads(verify(world, "--rebuild", str(source), "--json").stdout)
    assert report["links"][-1]["name"] == "image" and report["links"][-1]["facts"]["rebuilt"] == record.digest


def test_a_one_byte_change_to_the_cvm_code_fails_seal_verify_rebuild_naming_the_image_link(world, tmp_path):
    _, source, record = world
    changed = shutil.copytree(source, tmp_path / "changed")
    run = changed / "cvm" / "run.py"
    run.write_bytes(run.read_bytes() + b" ")
    result = verify(world, "--rebuild", str(changed))
    assert result.exit_code == 1, result.output
    assert "error: link 8 (image) is broken: the compose pins " + record.digest in result.stderr
    assert "this receipt did not come from this source code" in result.stderr
    assert sum("✔ ok" in line for line in result.stdout.splitlines()) == 7      # the other seven still hold
    missing = verify(world, "--rebuild", str(tmp_path / "not-there"))
    assert missing.exit_code == 1 and "link 8 (image) is broken" in missing.stderr
