"""`seal demo --small` and `seal demo --federated` as a user runs them: real processes, clean exits, nothing left."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def run_demo(state_dir: Path, *args: str) -> str:
    """Run `seal demo ARGS` in a real process; return its stdout after checking it exited 0 and left nothing."""
    seal = Path(sys.executable).parent / "seal"
    result = subprocess.run([seal, "demo", *args, "--state-dir", str(state_dir)],
                            capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    leftover = subprocess.run(["pgrep", "-f", str(state_dir)], capture_output=True, text=True)
    assert leftover.stdout.strip() == "", f"processes left behind: {leftover.stdout}"
    return result.stdout


def _engine_available(tmp_path: Path) -> bool:
    from compose.backends.engine import EngineUnavailable, connect_engine

    try:
        connect_engine(tmp_path / "probe").close()
    except EngineUnavailable as error:
        print(f"\nNO CONTAINER ENGINE ({error}): the small demo runs on the explicit process fallback", file=sys.stderr)
        return False
    return True


def test_small_demo_runs_end_to_end_and_leaves_no_process(tmp_path):
    """What `make demo` runs (at full size): the study in a container of the pinned study image, and its receipt
    verified with `--rebuild` of this checkout (link 8, image). Without a container engine: the process fallback,
    named as such."""
    container = _engine_available(tmp_path)
    out = run_demo(tmp_path / "demo", "--small", *([] if container else ["--backend", "process"]))
    assert ("study runs: container backend (" if container else "study runs: PROCESS BACKEND") in out
    assert "signed aggregate: model_weights" in out and "SIMULATED TEE: True" in out
    assert "--rebuild " in out and "8 image" in out and "rebuilt bit for bit from the source folder" in out
    assert "verdict: VERIFIED — SIMULATED TEE" in out
    assert "refused (409)" in out and "Compose hash revoked" in out
    assert "ε spent 1.5 of 3, 1.5 left" in out          # the refused run spent nothing


def test_federated_demo_runs_three_rounds_with_a_dropout_and_a_poisoner(tmp_path):
    out = run_demo(tmp_path / "fed", "--federated")
    metrics = [line for line in out.splitlines() if line.startswith("round ") and " metrics (signed record)" in line]
    assert len(metrics) == 3
    assert "participation 4/5 (dropped 1)" in metrics[1]
    poisoner = out.split("poisoner APAC = ")[1].split()[0]
    assert all(f"poisoning alerts ['{poisoner[:10]}']" in line for line in metrics)
    assert "global AUC 0.5000 -> " in metrics[0]            # the zero model first, scored in the CVM
    total = metrics[-1].split("ε round ")[1]
    spent = total.split("total ")[1].split(",")[0]
    assert f"(on-chain: spent {spent}," in total              # the records' ε is the on-chain spend
