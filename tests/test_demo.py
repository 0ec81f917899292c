"""`seal demo --small` as a user runs it: a real process, a clean exit, nothing left running."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_small_demo_runs_end_to_end_and_leaves_no_process(tmp_path):
    seal = Path(sys.executable).parent / "seal"
    result = subprocess.run([seal, "demo", "--small", "--state-dir", str(tmp_path / "demo")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "signed aggregate: model_weights" in out and "SIMULATED TEE: True" in out
    assert "verdict: VERIFIED — SIMULATED TEE" in out
    assert "refused (409)" in out and "Compose hash revoked" in out
    assert "ε spent 1.5 of 3, 1.5 left" in out          # the refused run spent nothing
    leftover = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True)
    assert leftover.stdout.strip() == "", f"processes left behind: {leftover.stdout}"
