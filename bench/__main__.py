"""`make bench`: every benchmark, one after the other, each printing its ratios against a baseline run in the same
process or session. Results also land in bench/out/*.json. Pass names to run a subset: `python -m bench kms study`."""

from __future__ import annotations

import subprocess
import sys

BENCHES = {
    "kms": "bench.kms_bench",          # GetAppKey p50/p99, releases/s, time split
    "seal": "bench.seal_bench",        # seal vs age vs openssl, peak memory, unwrap vs Parquet
    "study": "bench.study_bench",      # 1.6M rows: machinery share, plaintext baseline, DP vs non-private AUC
    "dp": "bench.dp_model_bench",      # DP-SGD vs non-private, logistic and MLP
    "fed": "bench.fed_bench",          # rounds of 10/100/1000 × 1M updates vs Flower SecAgg+
    "image": "bench.image_bench",      # study image build cold/warm; first attestation, container vs process
}


def main(names: list[str]) -> int:
    unknown = set(names) - set(BENCHES)
    if unknown:
        print(f"unknown bench(es): {', '.join(sorted(unknown))}; choose from {', '.join(BENCHES)}", file=sys.stderr)
        return 2
    failed = []
    for name in names or list(BENCHES):
        print(f"\n=== bench {name} ===", flush=True)
        if subprocess.run([sys.executable, "-m", BENCHES[name]]).returncode != 0:
            failed.append(name)
    if failed:
        print(f"\nfailed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
