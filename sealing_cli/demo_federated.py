"""`seal demo --federated`: three federated rounds with five sites on the embedded local stack (DESIGN.md §7).

Five sites (the cohorts of ``cvm.analyses.cohorts``: each site's patient mix differs, a non-IID split of one
task) train a logistic risk model together. Each round is its own recipe: its round contract (parent model,
eligible sites, clip norm, noise, trimmed-mean aggregator, deadline, ε) is in the measured compose, the five
sites approve it on-chain, and only then does a SIMULATED CVM boot the aggregator for it. In round 2 one site
drops out; in every round one site poisons (a sign-flipped, scaled update, clipped so it passes the norm
check: the robust aggregator and the anomaly flags are what limit it). Every site step is a real `seal`
invocation, shown with a `$` prompt. The metrics printed per round come from the signed round record: global
quality and the per-site quality distribution and worst-site regression (AUC on a public reference cohort drawn
from each site's population, named by digest in the contract and scored inside the CVM), participation,
rejections, poisoning flags; and the rollbacks the sites' own accept decisions made.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
from rich.console import Console
from rich.rule import Rule

from compose.backends.launcher import ManagedProcess, free_loopback_port
from compose.stack_file import read_keystore
from sealing_cli.demo import SealCommand, expect, pinned_study_image
from sealing_cli.scratch import prepare_scratch_folder
from sealing_cli.stack import LocalStack

console = Console(soft_wrap=True)
SITE_ROWS = 6_000
REFERENCE_ROWS = 4_000
ROUNDS = 3
DROPOUT = {2: "US-East"}
POISONER = "APAC"
EPSILON_PER_ROUND = 5.0
EPSILON_TOTAL = 10.0
DELTA = 1e-5
ON_TIME_S = 45.0        # each round's deadline, counted from when its recipe is written (the aggregator CVM boots
                        # inside it: about 5 s on an idle 2-core machine, up to 25 s on a loaded one)


def start_round_aggregator(stack: LocalStack, compose_path: Path, parent_path: Path, out_dir: Path, *, name: str,
                           previous: Path | None = None, evaluation: Path | None = None) -> tuple[ManagedProcess, str]:
    """Boot a SIMULATED CVM for the round compose and start ``python -m cvm.aggregator`` inside it; return
    the process and its loopback URL. Raises ServiceStartError when the CVM may not boot (not approved)."""
    d = stack.description
    endpoint = stack.start_cvm(compose_path, name=name)
    port = free_loopback_port()
    url = f"http://127.0.0.1:{port}"
    root = stack.state_dir / "simulated-tdx" / "root.der"
    argv = [sys.executable, "-m", "cvm.aggregator", "--port", str(port), "--kms-url", d.services["kms"]["url"],
            "--rpc-url", d.rpc_url, "--dstack-kms", d.dstack_kms, "--parent", str(parent_path),
            "--out-dir", str(out_dir)]
    if evaluation is not None:
        argv += ["--evaluation", str(evaluation)]
    if previous is not None:
        argv += ["--previous", str(previous), "--allow-simulated", "--simulated-root", str(root)]

    def answers() -> bool:
        try:
            return httpx.get(f"{url}/result", timeout=1.0).status_code == 200
        except httpx.TransportError:
            return False

    process = ManagedProcess(f"{name}-aggregator", argv, ready=answers, log_path=stack.state_dir / f"{name}-aggregator.log",
                             env={"DSTACK_SIMULATOR_ENDPOINT": endpoint}, timeout_s=60.0)
    return process, url


def wait_for_result(url: str, timeout_s: float) -> dict:
    """Poll GET /result until the round is no longer open."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = httpx.get(f"{url}/result", timeout=10.0).json()
        if status["state"] != "open":
            return status
        time.sleep(0.2)
    raise SystemExit("demo: the round did not close in time")


@dataclass
class _Site:
    name: str
    address: str
    key: bytes
    data: Path


def _poison(site: _Site, url: str, compose: bytes, stack: LocalStack, root: bytes) -> None:
    """The malicious site: it follows the protocol but sends the sign-flipped, scaled delta, clipped to the norm."""
    from contracts.chain import DstackApp
    from cvm.federated import clip, sign_update
    from sealing_cli.site import (
        attest_aggregator,
        fetch_parent,
        load_site_data,
        send_update,
        train_locally,
    )

    with httpx.Client(base_url=url, timeout=30.0) as http:
        attested = attest_aggregator(http, app_compose=compose, app=DstackApp(stack.chain, stack.description.dstack_app),
                                     site=site.address, now=int(time.time()), allow_simulated=True,
                                     simulated_root_der=root)
        contract = attested.contract
        parent = fetch_parent(http, attested)
        data = load_site_data(site.data)
        honest = train_locally(parent, data.train, contract) - parent
        vector = clip((-10.0 * honest).astype("<f4"), contract.clip_norm)
        send_update(http, attested, sign_update(site.key, round_number=contract.round,
                                                parent_digest=contract.parent_digest,
                                                num_examples=len(data.train), vector=vector))
    console.print(f"[bold red]{site.name}[/] (malicious) sent a sign-flipped ×10 update clipped to the norm")


def run_federated_demo(state_dir: Path, *, seal: SealCommand) -> None:
    # A fresh throwaway folder: one this demo made is emptied; anyone else's folder is refused (ScratchRefused),
    # before the heavy imports, so that a refusal is immediate.
    state_dir = prepare_scratch_folder(state_dir, made_by="seal demo",
                                       notify=lambda line: console.print(f"note: {line}"))
    from compose.app_compose import compose_hash
    from cvm.aggregator import build_round_compose
    from cvm.analyses.cohorts import SITE_SIZES, generate_site, write_parquet
    from cvm.federated import RoundContract, vector_digest
    from cvm.federated.task import NUM_PARAMETERS
    from sealing_cli.site import SiteState

    sd = ["--state-dir", str(state_dir)]
    started = time.perf_counter()
    console.print(Rule(f"Sealroom federated demo: five sites, {ROUNDS} rounds, a SIMULATED attested aggregator"))
    with LocalStack(state_dir, owner_names=tuple(SITE_SIZES), threshold=3, epsilon_budget=EPSILON_TOTAL) as stack:
        d = stack.description
        root_path = state_dir / "simulated-tdx" / "root.der"
        root = root_path.read_bytes()
        sim = ["--allow-simulated", "--simulated-root", str(root_path)]
        console.print(f"local stack: anvil chain {d.chain_id}; KMS {d.services['kms']['url']} (dev mode: SIMULATED "
                      f"quotes); DstackApp {d.dstack_app}, 3-of-5, on-chain ε budget {EPSILON_TOTAL:g}")
        sites = []
        for i, owner in enumerate(d.owners):
            path = state_dir / "sites-data" / f"{owner.name}.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            write_parquet(generate_site(owner.name, SITE_ROWS, seed=300 + i), path)
            key = bytes(read_keystore(owner.keystore, d.dev_keystore_password).key)
            sites.append(_Site(owner.name, owner.address, key, path))
        console.print(f"each site holds {SITE_ROWS:,} synthetic patients with its own case mix (non-IID); "
                      f"{POISONER} is malicious; {', '.join(f'{s} drops out of round {r}' for r, s in DROPOUT.items())}")
        reference = state_dir / "reference-cohort.parquet"
        write_parquet(pa.concat_tables([generate_site(name, REFERENCE_ROWS, seed=2026) for name in SITE_SIZES]),
                      reference)
        reference_sha256 = hashlib.sha256(reference.read_bytes()).hexdigest()
        console.print(f"public reference cohort for central evaluation: {REFERENCE_ROWS:,} rows per site population, "
                      f"no site's own rows; sha256 {reference_sha256[:16]}… goes into every round contract")

        image = pinned_study_image(state_dir)
        image_digest = image.split("@", 1)[1]
        console.print(f"every round's recipe runs the aggregator from the study image {image} (built reproducibly "
                      "from this checkout)")
        parent = np.zeros(NUM_PARAMETERS, dtype="<f4")
        previous: Path | None = None
        rollbacks = 0
        records_dir = state_dir / "rounds"
        for round_number in range(1, ROUNDS + 1):
            console.print(Rule(f"Round {round_number}: the recipe, k-of-n approval, the attested aggregator"))
            parent_path = records_dir / f"round-{round_number}.parent.f32"
            parent_path.parent.mkdir(parents=True, exist_ok=True)
            parent_path.write_bytes(parent.tobytes())
            contract = RoundContract(
                round=round_number, parent_digest=vector_digest(parent),
                eligible_sites=tuple(s.address for s in sites), local_epochs=2, local_batch_size=256, clip_norm=1.0,
                noise_multiplier=1.0, noise="opendp", aggregator="trimmed_mean", trim_fraction=0.2,
                min_participants=3, deadline=int(time.time() + ON_TIME_S), epsilon_per_round=EPSILON_PER_ROUND,
                epsilon_total=EPSILON_TOTAL, delta=DELTA, evaluation_sha256=reference_sha256)
            compose = build_round_compose("cardio-fed", contract, {s.name: s.address for s in sites},
                                          image_digest=image_digest)
            compose_path = records_dir / f"round-{round_number}.app-compose.json"
            compose_path.write_bytes(compose)
            hx = "0x" + compose_hash(compose).hex()
            console.print(f"round contract {contract.digest()[:16]}…: parent {contract.parent_digest[:16]}…, "
                          f"trimmed mean (20%), clip 1.0, noise ×1.0 (OpenDP), ≥3 sites, ε ≤ {EPSILON_PER_ROUND:g}/round")
            expect(seal("propose", "--compose-hash", hx, "--uri", compose_path.as_uri(), "--owner", sites[0].name, *sd))
            for site in sites:
                expect(seal("approve", "--compose-hash", hx, "--owner", site.name, *sd))
            process, url = start_round_aggregator(stack, compose_path, parent_path, records_dir,
                                                  name=f"round-{round_number}", previous=previous,
                                                  evaluation=reference)
            try:
                console.print(f"[bold magenta]cvm[/] SIMULATED CVM booted; aggregator for round {round_number} at {url}")
                for site in sites:
                    if DROPOUT.get(round_number) == site.name:
                        console.print(f"[yellow]{site.name}[/] drops out of this round")
                    elif site.name == POISONER:
                        _poison(site, url, compose, stack, root)
                    else:
                        expect(seal("site", "train", "--round-compose", str(compose_path), "--aggregator", url,
                                    "--data", str(site.data), "--owner", site.name, *sim, *sd))
                if round_number in DROPOUT:
                    console.print(f"waiting for the deadline (a site is missing): "
                                  f"{max(0.0, contract.deadline - time.time()):.0f} s")
                status = wait_for_result(url, ON_TIME_S + 30)
                if status["state"] != "published":
                    raise SystemExit(f"demo: round {round_number} failed: {status['error']}")
                console.print(Rule(f"Round {round_number}: each site verifies the signed record and decides"))
                for site in sites:
                    if DROPOUT.get(round_number) == site.name or site.name == POISONER:
                        continue
                    before = SiteState(state_dir, site.address).load()["champion"]["digest"]
                    expect(seal("site", "accept", "--round", str(round_number), "--data", str(site.data),
                                "--owner", site.name, *sim, *sd))
                    rollbacks += SiteState(state_dir, site.address).load()["champion"]["digest"] == before
            finally:
                process.stop()
            attestation_path = records_dir / f"round-{round_number}.attestation.json"
            record = json.loads(attestation_path.read_text())["envelope"]["payload"]["record"]
            candidate = np.frombuffer((records_dir / f"round-{round_number}.model.f32").read_bytes(), "<f4").copy()
            m = record["metrics"]
            worst = m["worst_site_regression"]
            console.print(
                f"[bold]round {round_number} metrics[/] (signed record): global AUC "
                f"{m['parent_global_quality']:.4f} -> {m['global_quality']:.4f} on the reference cohort; per-site AUC "
                f"min {m['per_site_min']:.4f} / median {m['per_site_median']:.4f} / max {m['per_site_max']:.4f}; "
                f"worst-site regression: "
                f"{worst['site']} AUC {worst['parent_quality']:.4f} -> {worst['new_quality']:.4f}; "
                f"participation {len(record['joined'])}/{len(sites)} "
                f"(dropped {len(record['dropped'])}); rejections {len(record['rejected'])}; poisoning alerts "
                f"{[f['site'][:10] for f in record['flagged']]}; rollbacks so far {rollbacks}; ε round "
                f"{record['privacy']['epsilon_round']:.3f}, total {record['privacy']['epsilon_spent_total']:.3f}, "
                f"left {record['privacy']['epsilon_left']:.3f} (on-chain: {_on_chain(stack)})",
                highlight=False)
            console.print(f"signed round record (SIMULATED TEE): {attestation_path}")
            parent, previous = candidate, attestation_path
        console.print(f"poisoner {POISONER} = {next(s.address for s in sites if s.name == POISONER)}")
    console.print(f"local stack stopped; no process left behind. Total {time.perf_counter() - started:.1f} s.")


def _on_chain(stack: LocalStack) -> str:
    from contracts.chain import DstackApp

    budget = DstackApp(stack.chain, stack.description.dstack_app).budget().to_json()
    return f"spent {budget['epsilon_spent']:.3f}, left {budget['epsilon_remaining']:.3f}"
