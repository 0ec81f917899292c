"""`seal` installed like a package: the project's wheel, installed on its own (``pip install --no-deps --target``),
finds its contract artifacts as package data and finds anvil through $SEALROOM_ANVIL or PATH, not through the
checkout, and says how to install anvil when there is none.

The wheel is built from a copy of the sources (building writes build/ and *.egg-info next to them), and every
check runs ``python -S`` with PYTHONPATH set to the install target and then the venv's site-packages: neither the
checkout nor the venv's editable install of it can be imported."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from sealing_cli.devchain import ANVIL_BIN

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("auditor", "compose", "console", "contracts", "cvm", "kms", "kms_client", "sealing_cli")
SITE_PACKAGES = sysconfig.get_paths()["purelib"]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("wheel")
    source = work / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    for package in PACKAGES:
        shutil.copytree(ROOT / package, source / package,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "out", "cache", "*.sealed"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", "-q"]
    built = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(work / "dist"),
                            str(source)], capture_output=True, text=True, timeout=240)
    assert built.returncode == 0, built.stderr
    wheel = next((work / "dist").glob("sealroom-*.whl"))
    target = work / "target"
    done = subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)],
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    return target


def run_installed(target: Path, code: str | None = None, *argv: str, env: dict | None = None,
                  cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``python -S`` (no site, so no editable install of the checkout) with only the install target and the venv's
    dependencies on the path, run away from the checkout."""
    base = {k: v for k, v in os.environ.items() if k not in ("SEALROOM_ANVIL", "SEALROOM_FORGE", "PYTHONPATH")}
    environment = {**base, "PYTHONPATH": f"{target}{os.pathsep}{SITE_PACKAGES}", **(env or {})}
    command = [sys.executable, "-S", *(["-c", code] if code is not None else []), *argv]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env=environment,
                          cwd=cwd or target.parent)


def test_the_installed_package_is_not_the_checkout_and_finds_its_contract_artifacts(installed):
    result = run_installed(installed, """
import json, contracts, sealing_cli
from contracts.chain import ARTIFACTS, load_artifact
from sealing_cli.devchain import CHECKOUT_TOOLS
print(json.dumps({"contracts": contracts.__file__, "cli": sealing_cli.__file__, "artifacts": str(ARTIFACTS),
                  "names": sorted(p.name for p in ARTIFACTS.glob("*.json")),
                  "abi": len(load_artifact("DstackApp")["abi"]), "bytecode": load_artifact("DstackKms")["bytecode"][:2],
                  "checkout_tools": CHECKOUT_TOOLS.exists()}))
""")
    assert result.returncode == 0, result.stderr
    import json

    found = json.loads(result.stdout)
    for key in ("contracts", "cli", "artifacts"):
        assert found[key].startswith(str(installed)), (key, found[key])
    assert found["names"] == ["DstackApp.json", "DstackKms.json"]
    assert found["abi"] > 10 and found["bytecode"] == "0x"
    assert not found["checkout_tools"], "an installed package has no tools/ of its own"


def test_seal_version_and_help_work_from_the_installed_script(installed):
    script = installed / "bin" / "seal"
    assert script.is_file()
    version = run_installed(installed, None, str(script), "--version")
    assert version.returncode == 0 and version.stdout.startswith("seal 0.1.0"), version.stderr
    helped = run_installed(installed, None, str(script), "-h")
    assert helped.returncode == 0 and "init" in helped.stdout and "up" in helped.stdout


def test_anvil_is_found_through_sealroom_anvil_and_path_and_runs(installed, tmp_path):
    assert ANVIL_BIN.exists(), "the checkout's anvil (make setup) stands in for one installed elsewhere"
    check = """
from sealing_cli.devchain import Anvil, find_tool
from contracts.chain import Chain
print(find_tool("anvil"))
with Anvil() as node, Chain(node.rpc_url) as chain:
    print(chain.chain_id)
"""
    by_variable = run_installed(installed, check, env={"SEALROOM_ANVIL": str(ANVIL_BIN), "PATH": "/usr/bin:/bin"})
    assert by_variable.returncode == 0, by_variable.stderr
    assert by_variable.stdout.split() == [str(ANVIL_BIN), "31337"]
    on_path = tmp_path / "bin"
    on_path.mkdir()
    (on_path / "anvil").symlink_to(ANVIL_BIN.resolve())
    by_path = run_installed(installed, 'from sealing_cli.devchain import find_tool; print(find_tool("anvil"))',
                            env={"PATH": f"{on_path}:/usr/bin:/bin"})
    assert by_path.returncode == 0 and by_path.stdout.strip() == str(on_path / "anvil"), by_path.stderr


def test_no_anvil_anywhere_is_one_clear_error_that_says_how_to_install_it(installed, tmp_path):
    assert shutil.which("anvil", path="/usr/bin:/bin") is None
    script = installed / "bin" / "seal"
    up = run_installed(installed, None, str(script), "up", "--state-dir", str(tmp_path / "state"),
                       env={"PATH": "/usr/bin:/bin"})
    assert up.returncode == 3, up.stdout + up.stderr
    errors = [line for line in up.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "anvil not found" in errors[0] and "SEALROOM_ANVIL" in errors[0], up.stderr
    assert "Traceback" not in up.stderr
    assert "hint:" in up.stderr and "npm install" in up.stderr and "@foundry-rs/anvil" in up.stderr

    wrong = run_installed(installed, 'from sealing_cli.devchain import find_tool; find_tool("forge")',
                          env={"SEALROOM_FORGE": str(tmp_path / "no-such-forge"), "PATH": "/usr/bin:/bin"})
    assert wrong.returncode != 0 and "$SEALROOM_FORGE is" in wrong.stderr and "not an executable" in wrong.stderr
