"""Done means: a new user goes from CSV files of their own — a credit-risk table the demo knows nothing about — to a
verified, scored model, with `seal` commands only, as docs/quickstart.md ("Your own data, end to end") gives them.

The stack is `seal up`'s, started by the test fixtures (two owners, A and B, on the process backend)."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from cvm.analyses.dpsgd import (
    TrainingSpec,
    model_from_payload,
    prepare_features,
    roc_auc,
    scores,
)
from sealing_cli.main import app
from tests.study_world import IMAGE_DIGEST, SITES, start_study_stack

ROOT = Path(__file__).resolve().parent.parent
IMAGE = f"sealroom/study-runner@{IMAGE_DIGEST}"
COLUMNS = ("income", "debt_ratio", "age_years", "defaulted")
BOUNDS = {"income": [10_000, 200_000], "debt_ratio": [0, 2], "age_years": [18, 90]}
PLACEHOLDER = "0x" + "00" * 32     # the hash the owners first seal for, so that the analyst can read the schema
runner = CliRunner()


def write_credit_csv(path: Path, rows: int, seed: int) -> None:
    """A credit-risk table: default is more likely with less income, more debt and youth."""
    rng = np.random.default_rng(seed)
    income = rng.lognormal(np.log(55_000), 0.5, rows).round(2)
    debt = rng.gamma(2.0, 0.2, rows).round(4)
    age = rng.integers(18, 90, rows)
    logit = -1.0 - 1.5 * (income - 60_000) / 30_000 + 2.5 * (debt - 0.4) / 0.3 - 0.4 * (age - 45) / 15
    defaulted = (rng.uniform(size=rows) < 1 / (1 + np.exp(-logit))).astype(int)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        writer.writerows(zip(income.tolist(), debt.tolist(), age.tolist(), defaulted.tolist()))


def test_quickstart_names_the_commands_this_test_runs():
    text = (ROOT / "docs" / "quickstart.md").read_text()
    section = text[text.index("## Your own data, end to end"):]
    for command in ("seal dataset", "seal study new --from", "seal study submit", "seal approve", "seal study run",
                    "seal study result", "seal verify", "seal study model"):
        assert command in section, command


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    state = tmp_path_factory.mktemp("new-user")
    with start_study_stack(state, epsilon_budget=3.0) as started:
        started.start_api()
        yield started


def test_a_new_user_gets_a_verified_scored_model_from_their_own_csv_files(stack, tmp_path):
    sd = ["--state-dir", str(stack.state_dir)]
    app_id = stack.description.dstack_app
    env = {"SEAL_API_TOKEN": ""}

    def seal(*args: str):
        result = runner.invoke(app, [*args, *sd], env=env)
        assert result.exit_code == 0, f"seal {' '.join(args)}\n{result.output}"
        return result

    env["SEAL_API_TOKEN"] = seal("analyst-token", "newcomer").stdout.strip()
    owners = {name: tmp_path / f"{site}.csv" for name, site in SITES.items()}
    for seed, (owner, csv_file) in enumerate(owners.items()):
        write_credit_csv(csv_file, 3_000, seed)
    holdout = tmp_path / "holdout.csv"
    write_credit_csv(holdout, 2_000, 99)

    # 1. the owners seal their files (for a placeholder hash: the analyst reads only the public envelopes)
    preview = []
    for owner, csv_file in owners.items():
        out = tmp_path / f"{csv_file.stem}.preview.sealed"
        seal("dataset", str(csv_file), "--app-id", app_id, "--compose-hash", PLACEHOLDER, "--out", str(out),
             "--owner", owner)
        preview.append(str(out))

    # 2. the analyst writes the recipe from them and fills in what only they can choose
    recipe = tmp_path / "recipe.yaml"
    seal("study", "new", "--from", *preview, "--kind", "dp_sgd", "--name", "credit-risk", "--image", IMAGE,
         "--out", str(recipe))
    document = yaml.safe_load(recipe.read_text())
    manifest = document["manifest"]
    params = manifest["analysis"]["params"]
    assert set(params["features"]) == set(COLUMNS)
    params["features"] = BOUNDS
    params.update(label="defaulted", epochs=3, batch_size=256, learning_rate=0.05)
    manifest.update(epsilon=2.0, delta=1e-5)
    recipe.write_text(yaml.safe_dump(document, sort_keys=False))
    h = json.loads(seal("study", "submit", str(recipe), "--json").stdout)["compose_hash"]

    # 3. the owners approve it and seal their files for it
    sealed = []
    for owner, csv_file in owners.items():
        seal("approve", "--compose-hash", h, "--owner", owner)
        out = tmp_path / f"{csv_file.stem}.sealed"
        seal("dataset", str(csv_file), "--app-id", app_id, "--compose-hash", h, "--out", str(out), "--owner", owner)
        sealed.append(str(out))

    # 4. the analyst runs it, fetches the receipt, verifies it and scores their own hold-out file
    view = json.loads(seal("study", "run", h, *sealed, "--json").stdout)
    assert view["state"] == "done", view
    receipt = tmp_path / "attestation.json"
    seal("study", "result", view["run_id"], "--out", str(receipt))
    verified = seal("verify", str(receipt), "--allow-simulated")
    assert "VERIFIED" in verified.stdout
    predictions = tmp_path / "preds.csv"
    seal("study", "model", str(receipt), "--data", str(holdout), "--out", str(predictions), "--allow-simulated")

    probabilities = np.array([float(line) for line in predictions.read_text().splitlines()[1:]])
    with holdout.open() as f:
        rows = list(csv.DictReader(f))
    labels = np.array([int(r["defaulted"]) for r in rows])
    assert len(probabilities) == len(rows) and np.all((0 < probabilities) & (probabilities < 1))
    auc = roc_auc(probabilities, labels)
    assert auc > 0.7, auc

    # the payload names the model's inputs; the client's scores are the CVM code path's, to float tolerance
    payload = json.loads(receipt.read_text())["envelope"]["payload"]
    # (the order is the measured manifest's, whose keys are normalised: the payload says which it is)
    assert sorted(f["name"] for f in payload["features"]) == sorted(BOUNDS) and payload["label"] == "defaulted"
    assert all(f["bounds"] == BOUNDS[f["name"]] for f in payload["features"])
    assert "hidden_units" not in payload and payload["released_metrics"] == []
    import pyarrow.csv as pa_csv

    table = pa_csv.read_csv(holdout)
    released = model_from_payload(payload)
    spec = TrainingSpec(features=released.feature_bounds, label="defaulted")
    logits = scores(released.module(), prepare_features(table, spec)).astype(np.float64)
    np.testing.assert_allclose(probabilities, 1 / (1 + np.exp(-logits)), rtol=1e-6, atol=1e-9)

    # a receipt that does not verify is refused, and nothing is scored
    tampered = json.loads(receipt.read_text())
    tampered["envelope"]["payload"]["weights"]["bias"]["values"][0] += 1.0
    bad = tmp_path / "tampered.json"
    bad.write_text(json.dumps(tampered))
    refused = runner.invoke(app, ["study", "model", str(bad), "--data", str(holdout), "--out",
                                  str(tmp_path / "no.csv"), "--allow-simulated", *sd], env=env)
    assert refused.exit_code == 1 and not (tmp_path / "no.csv").exists()
    assert re.search(r"not verified: link \d", refused.stderr), refused.output
