"""The 1.6M-row study: how much of the wall time is the confidential machinery, and what DP costs in AUC.

    .venv/bin/python -m bench.study_bench [--rows 1600000]

One run, on a real local stack (anvil + KMS + SIMULATED CVM agent), timed step by step:
- confidential machinery: sealing the five cohorts, booting the CVM (attestation, app key), the per-owner key
  release and in-memory unwrap, signing and quoting the result;
- the training itself (DP-SGD inside `run_study`, the same code path as `python -m cvm.run`);
- the baseline, in the same process: the same DP training on the plaintext union read straight from Parquet, and a
  non-private model on the same split for the AUC comparison.
Consent (propose/approve transactions) and data generation are reported apart: they are people's steps, not the
pipeline's. Targets: machinery ≤ 10 % of the wall time; DP AUC at ε = 1.5 ≥ 97 % of the non-private AUC.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from dstack_sdk import DstackClient
from eth_keys import keys as eth_keys

from compose.app_compose import compose_hash, manifest_from_app_compose
from compose.stack_file import read_keystore
from contracts.chain import DstackApp
from cvm.analyses.cohorts import SITE_SIZES, generate_site, write_parquet
from cvm.analyses.dpsgd import (
    TrainingSpec,
    prepare_features,
    roc_auc,
    run_dp_sgd,
    scores,
    split_held_out,
    train_non_private,
)
from cvm.analyses.loss import PrivacyLoss
from cvm.run import run_study
from cvm.sealed import seal_file
from kms_client.client import KmsClient
from sealing_cli.demo import DELTA, EPSILON_PER_RUN, study_recipe
from sealing_cli.stack import LocalStack


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=sum(SITE_SIZES.values()))
    args = parser.parse_args()
    torch.set_num_threads(2)
    scale = args.rows / sum(SITE_SIZES.values())
    t: dict[str, float] = {}
    wall = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, \
            LocalStack(Path(tmp), owner_names=tuple(SITE_SIZES), threshold=5, epsilon_budget=3.0) as stack:
        d = stack.description
        t["stack_up"] = time.perf_counter() - wall
        start = time.perf_counter()
        sources = {}
        for i, (site, n) in enumerate(SITE_SIZES.items()):
            sources[site] = Path(tmp) / f"{site}.parquet"
            write_parquet(generate_site(site, max(1, round(n * scale)), seed=100 + i), sources[site])
        t["data_generation"] = time.perf_counter() - start

        start = time.perf_counter()
        owners = {o.name: read_keystore(o.keystore, d.dev_keystore_password) for o in d.owners}
        recipe = study_recipe({name: a.address for name, a in owners.items()})
        compose_path = Path(tmp) / "app-compose.json"
        compose_path.write_bytes(recipe)
        h = compose_hash(recipe)
        study = DstackApp(stack.chain, d.dstack_app)
        study.propose(h, "", owners["EU-West"])
        for owner in owners.values():
            study.approve(h, owner)
        t["consent_on_chain"] = time.perf_counter() - start

        start = time.perf_counter()
        sealed = []
        app_id = bytes.fromhex(d.dstack_app[2:])
        with KmsClient(d.services["kms"]["url"]) as kms:
            root = kms.meta().root_address
            for site, owner in owners.items():
                seal_pubkey = kms.owner_seal_key(d.dstack_app, h, owner.address, pinned_root_address=root)
                out = sources[site].with_suffix(".sealed")
                seal_file(sources[site], out, app_id=app_id, compose_hash=h, owner_key=eth_keys.PrivateKey(owner.key),
                          owner_seal_pubkey=seal_pubkey, kms_root_address=root)
                sealed.append(out)
        t["sealing"] = time.perf_counter() - start

        start = time.perf_counter()
        endpoint = stack.start_cvm(compose_path)
        t["cvm_boot_attest_app_key"] = time.perf_counter() - start

        dstack = DstackClient(endpoint)
        with dstack, KmsClient(d.services["kms"]["url"]) as kms:
            outcome = run_study(sealed, dstack=dstack, kms=kms, chain=stack.chain, dstack_kms=d.dstack_kms)
        t["key_release_and_unwrap"] = outcome.seconds["unwrap"]
        t["training_in_cvm"] = outcome.seconds["analysis"]
        t["sign_and_attest"] = outcome.seconds["sign_and_attest"]
        t["total_wall"] = time.perf_counter() - wall

        # Baseline in the same run: the same DP training on the plaintext union, straight from Parquet.
        start = time.perf_counter()
        union = pa.concat_tables([pq.read_table(p) for p in sources.values()])
        spec = TrainingSpec.from_params(manifest_from_app_compose(recipe).analysis.params)
        plain_run = run_dp_sgd(union, spec, PrivacyLoss(EPSILON_PER_RUN, DELTA))
        t["baseline_plaintext_training"] = time.perf_counter() - start

    generator = torch.Generator().manual_seed(7)
    train, held_out = split_held_out(prepare_features(union, spec), 0.2, generator)  # the bench scores on its own 20%
    non_private = train_non_private(train, spec, generator)
    labels = held_out.y.numpy()
    auc_non_private = roc_auc(scores(non_private, held_out), labels)
    auc_dp = roc_auc(scores(plain_run.model.module(), held_out), labels)

    machinery = t["sealing"] + t["cvm_boot_attest_app_key"] + t["key_release_and_unwrap"] + t["sign_and_attest"]
    pipeline = machinery + t["training_in_cvm"]
    result = {**t, "rows": args.rows, "confidential_machinery": machinery, "pipeline": pipeline,
              "machinery_share_of_pipeline": machinery / pipeline, "machinery_share_of_total_wall": machinery / t["total_wall"],
              "training_overhead_vs_plaintext": t["training_in_cvm"] / t["baseline_plaintext_training"],
              "auc_dp": auc_dp, "auc_non_private": auc_non_private, "auc_ratio": auc_dp / auc_non_private,
              "cvm": "SIMULATED"}
    print(f"Study bench: {args.rows:,} rows, DP-SGD logistic at ε={EPSILON_PER_RUN} (SIMULATED CVM, anvil chain)")
    for key in ("stack_up", "data_generation", "consent_on_chain", "sealing", "cvm_boot_attest_app_key",
                "key_release_and_unwrap", "training_in_cvm", "sign_and_attest", "total_wall",
                "baseline_plaintext_training"):
        print(f"  {key:<30} {t[key]:8.2f} s")
    print(f"  confidential machinery          {machinery:8.2f} s = {machinery / pipeline:.1%} of the pipeline "
          f"(machinery + training), {machinery / t['total_wall']:.1%} of total wall (target ≤ 10%)")
    print(f"  training in CVM vs on plaintext  ×{result['training_overhead_vs_plaintext']:.2f}")
    print(f"  AUC: DP {auc_dp:.4f} vs non-private {auc_non_private:.4f} on the same split → "
          f"{auc_dp / auc_non_private:.1%} (target ≥ 97%)")
    out = Path("bench/out")
    out.mkdir(parents=True, exist_ok=True)
    (out / "study_bench.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
