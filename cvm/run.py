"""The study run inside the CVM: unwrap the sealed inputs, run the manifest's analysis, gate, sign, attest.

    python -m cvm.run --sealed A.sealed B.sealed … --kms-url URL --rpc-url URL --dstack-kms ADDR --out attestation.json

The guest agent is found the way dstack-sdk finds it (`DSTACK_SIMULATOR_ENDPOINT`, else dstack's sockets), so the
same command runs in a real dstack CVM. The only file it writes is the receipt, which holds the DP aggregate; the
plaintext lives in this process's memory and nowhere else.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
from dstack_sdk import DstackClient

from compose.safe_parse import restore_recursion_limit
from contracts.chain import Chain, ChainError
from cvm.analyses import (
    AnalysisError,
    OutputGate,
    PrivacyLoss,
    StatsRequest,
    run_dp_stats,
)
from cvm.labels import EPOCH_PROGRESS
from cvm.receipt import (
    build_envelope,
    chain_evidence,
    sign_and_attest,
    write_attestation,
)
from cvm.sealed import SealedFileError
from cvm.unwrap import UnwrapError, unwrap_datasets
from kms_client.client import KmsClient, KmsError


class StudyRunError(Exception):
    """The study cannot run (the message says why); nothing was released."""


@dataclass
class StudyOutcome:
    attestation: dict[str, Any]
    seconds: dict[str, float] = field(default_factory=dict)   # where the time went, for bench/


def result_payload(result: Any) -> dict[str, Any]:
    """The gated result as public JSON."""
    spent = {"epsilon": result.spent.epsilon, "delta": result.spent.delta}
    if result.output_type == "aggregate_stats":
        return {"output_type": result.output_type, "measure": result.measure, "spent": spent,
                "results": [{"name": r.name, "kind": r.kind, "value": dict(r.value) if isinstance(r.value, dict)
                             else r.value, "noise_scales": list(r.noise_scales)} for r in result.results],
                "postprocessing": list(getattr(result, "postprocessing", ()))}
    # a model result: torch is loaded already
    from cvm.analyses.dpsgd import STANDARDISATION

    model = {"output_type": result.output_type, "architecture": result.architecture}
    if result.architecture == "mlp":
        model["hidden_units"] = result.hidden_units   # meaningless for the logistic model: absent there
    return model | {
            # the model's input, in order: each feature BY NAME, its public bounds and the standardisation
            "features": [{"name": name, "bounds": [float(low), float(high)], "standardisation": STANDARDISATION}
                         for name, (low, high) in result.feature_bounds.items()],
            "label": result.label, "label_rule": "1 when the label is >= 0.5, else 0 (null = 0)",
            "score": "logit; probability = sigmoid(logit)", "released_metrics": [],
            "feature_bounds": {k: list(v) for k, v in result.feature_bounds.items()},
            "weights": {name: {"shape": list(w.shape), "values": np.asarray(w, dtype=np.float64).ravel().tolist()}
                        for name, w in result.weights.items()},
            "spent": spent, "accountant": result.accountant, "noise_multiplier": result.noise_multiplier,
            "sample_rate": result.sample_rate, "steps": result.steps, "max_grad_norm": result.max_grad_norm,
            "noise_source": result.noise_source}


def _report_epoch(done: int, epochs: int) -> None:
    """One line per finished epoch on stdout (the run's log), read back into the API's run view."""
    print(f"{EPOCH_PROGRESS} {done}/{epochs}", flush=True)


def run_study(sealed_files: Sequence[Path], *, dstack: DstackClient, kms: KmsClient, chain: Chain,
              dstack_kms: str) -> StudyOutcome:
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    inputs = unwrap_datasets(sealed_files, dstack=dstack, kms=kms, chain=chain)
    table = pa.concat_tables([d.to_arrow() for d in inputs.datasets.values()], promote_options="none")
    seconds["unwrap"] = time.perf_counter() - start

    manifest = inputs.manifest
    budget = PrivacyLoss(manifest.epsilon, manifest.delta)
    start = time.perf_counter()
    if manifest.analysis.kind == "dp_stats":
        result = run_dp_stats(table, StatsRequest.from_params(manifest.analysis.params), budget)
    elif manifest.analysis.kind == "dp_sgd":
        from cvm.analyses.dpsgd import (  # torch and Opacus, only when training
            TrainingSpec,
            run_dp_sgd,
        )

        result = run_dp_sgd(table, TrainingSpec.from_params(manifest.analysis.params), budget,
                            on_epoch=_report_epoch).model
    else:
        raise StudyRunError(f"analysis kind {manifest.analysis.kind!r} is not run by a study CVM")
    released = OutputGate(manifest.output_type, manifest.epsilon, manifest.delta,
                          input_rows=table.num_rows).release(result)
    seconds["analysis"] = time.perf_counter() - start

    start = time.perf_counter()
    release = inputs.release
    evidence = chain_evidence(chain, app_id=inputs.app_id, dstack_kms=dstack_kms, compose_hash=inputs.compose_hash,
                              release_id=release.release_id)
    envelope = build_envelope(
        payload=result_payload(released), app_id=inputs.app_id, compose_hash=inputs.compose_hash, chain=evidence,
        epsilon_spent=release.epsilon_spent, epsilon_remaining=release.epsilon_remaining,
        inputs={i.name: {"owner": i.owner, "ciphertext_sha256": inputs.ciphertext_sha256[i.name]}
                for i in manifest.inputs},
        release={"release_id": release.release_id, "tx": release.release_tx}, simulated=release.simulated,
    )
    attestation = sign_and_attest(envelope, dstack=dstack, app_compose=inputs.app_compose, chain=evidence)
    seconds["sign_and_attest"] = time.perf_counter() - start
    return StudyOutcome(attestation, seconds)


def main(argv: list[str] | None = None) -> int:
    restore_recursion_limit()  # eth_account's py_ecc raised it: deep input must fail, not overflow the stack
    parser = argparse.ArgumentParser(prog="python -m cvm.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sealed", type=Path, nargs="+", required=True)
    parser.add_argument("--kms-url", required=True)
    parser.add_argument("--rpc-url", required=True)
    parser.add_argument("--dstack-kms", required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    dstack = DstackClient()
    try:
        with dstack, KmsClient(args.kms_url) as kms, Chain(args.rpc_url) as chain:
            outcome = run_study(args.sealed, dstack=dstack, kms=kms, chain=chain, dstack_kms=args.dstack_kms)
    except (StudyRunError, UnwrapError, SealedFileError, KmsError, ChainError, AnalysisError, ValueError) as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    write_attestation(outcome.attestation, args.out)
    timings = ", ".join(f"{k} {v:.2f} s" for k, v in outcome.seconds.items())
    print(f"receipt written to {args.out} ({timings})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
