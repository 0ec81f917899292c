"""DP-SGD vs non-private training on the demo cohort: utility, ε spent, wall time.

    .venv/bin/python -m bench.dp_model_bench [--rows 1600000] [--models logistic mlp]

Generates the five sites' synthetic cohorts (scaled to ``--rows``), standardises with the manifest bounds,
makes one random train/held-out split, then for each model trains the DP version (Opacus, production
randomness) and the non-private baseline on the same split and scores both on the held-out rows.
Target (issue 5): DP AUC at ε = 1.5 ≥ 97 % of the non-private AUC. The ground-truth model's AUC on the
same rows is printed as the ceiling. Runs on 2 CPU threads.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pyarrow as pa
import torch

from cvm.analyses.cohorts import (
    FEATURE_BOUNDS,
    GROUND_TRUTH,
    OUTCOME,
    SITE_SIZES,
    generate_cohorts,
)
from cvm.analyses.dpsgd import (
    Features,
    TrainingSpec,
    prepare_features,
    roc_auc,
    scores,
    split_held_out,
    train_dp,
    train_non_private,
)
from cvm.analyses.loss import PrivacyLoss

TARGET_RATIO = 0.97


def _ground_truth_auc(held_out: Features) -> float:
    # Cohort values already lie within FEATURE_BOUNDS, so standardisation is exactly invertible here.
    raw = {}
    for index, (name, (low, high)) in enumerate(FEATURE_BOUNDS.items()):
        raw[name] = low + (held_out.x[:, index].numpy().astype(np.float64) + 1.0) / 2.0 * (high - low)
    return roc_auc(GROUND_TRUTH.logit(raw), held_out.y.numpy())


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=sum(SITE_SIZES.values()))
    parser.add_argument("--models", nargs="+", choices=("logistic", "mlp"), default=["logistic", "mlp"])
    parser.add_argument("--epsilon", type=float, default=1.5)
    parser.add_argument("--delta", type=float, default=1e-6)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8192)
    parser.add_argument("--data-seed", type=int, default=2026, help="seed of the synthetic cohort (owner side)")
    return parser.parse_args()


def main() -> None:
    args = _arguments()
    torch.set_num_threads(2)
    budget = PrivacyLoss(args.epsilon, args.delta)
    total = sum(SITE_SIZES.values())
    sizes = {site: max(1, n * args.rows // total) for site, n in SITE_SIZES.items()}

    started = time.perf_counter()
    table = pa.concat_tables(generate_cohorts(args.data_seed, sizes).values())
    generated = time.perf_counter() - started
    spec = TrainingSpec(features=dict(FEATURE_BOUNDS), label=OUTCOME)
    data = prepare_features(table, spec)
    train, held_out = split_held_out(data, 0.2, torch.Generator().manual_seed(args.data_seed))
    print(f"cohort: {table.num_rows} rows from {len(sizes)} sites, generated in {generated:.1f} s; "
          f"train {len(train)}, held-out {len(held_out)}; event rate {float(data.y.mean()):.3f}")
    print(f"ground-truth model AUC on held-out rows (ceiling): {_ground_truth_auc(held_out):.4f}")

    for architecture in args.models:
        spec = TrainingSpec(
            features=dict(FEATURE_BOUNDS),
            label=OUTCOME,
            model=architecture,
            epochs=args.epochs,
            batch_size=args.batch_size,
            learning_rate=0.05 if architecture == "logistic" else 0.02,
        )
        started = time.perf_counter()
        model = train_dp(train, spec, budget)
        dp_seconds = time.perf_counter() - started
        dp_auc = roc_auc(scores(model.module(), held_out), held_out.y.numpy())

        started = time.perf_counter()
        baseline = train_non_private(train, spec, torch.Generator().manual_seed(args.data_seed))
        baseline_seconds = time.perf_counter() - started
        baseline_auc = roc_auc(scores(baseline, held_out), held_out.y.numpy())

        ratio = dp_auc / baseline_auc
        verdict = "meets" if ratio >= TARGET_RATIO else "MISSES"
        print(f"\n[{architecture}] epochs {spec.epochs}, expected batch {spec.batch_size}, lr {spec.learning_rate}")
        print(f"  DP-SGD       AUC {dp_auc:.4f}   wall {dp_seconds:6.1f} s   "
              f"epsilon {model.spent.epsilon:.3f} at delta {model.spent.delta:g} ({model.accountant}), "
              f"sigma {model.noise_multiplier:.3f}, q {model.sample_rate:.5f}, {model.steps} steps, clip {model.max_grad_norm}")
        print(f"  non-private  AUC {baseline_auc:.4f}   wall {baseline_seconds:6.1f} s")
        print(f"  ratio {ratio:.4f} ({verdict} the {TARGET_RATIO:.0%} target)")
        print(f"  noise source: {model.noise_source}")


if __name__ == "__main__":
    main()
