"""The demo study, run by `make demo` / `seal demo` on the embedded local stack.

Five owners (EU-West, EU-North, US-East, APAC, CH) hold synthetic cardio-renal cohorts with a known ground-truth
risk model (1.6 million rows; `--small`: 50,000). They co-approve one recipe 5-of-5 on a real anvil chain, seal their
cohorts to it, and a SIMULATED CVM trains the risk model with DP-SGD at ε = 1.5. Only the signed model leaves.
Every step an owner takes is a real `seal` invocation, shown with a `$` prompt.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Callable
from contextlib import ExitStack, closing
from pathlib import Path

import httpx
import typer
from rich.console import Console
from rich.rule import Rule

from sealing_cli.scratch import prepare_scratch_folder
from sealing_cli.stack import LocalStack

console = Console(soft_wrap=True)
EPSILON_BUDGET = 3.0
EPSILON_PER_RUN = 1.5
DELTA = 1e-6
SMALL_FRACTION = 50_000 / 1_600_000


SealCommand = Callable[..., int]


def transcript_runner(app: typer.Typer) -> SealCommand:
    """Runs `seal` commands of ``app`` in this process, echoing each like a shell transcript. The `seal` app
    hands itself in, so that the demos drive the real commands without importing the command module."""
    command = typer.main.get_command(app)

    def seal(*args: str) -> int:
        console.print(f"[bold cyan]$ seal {shlex.join(args)}[/]")
        return command.main(list(args), prog_name="seal", standalone_mode=False) or 0

    return seal


def expect(code: int, wanted: int = 0) -> None:
    if code != wanted:
        raise SystemExit(f"demo: a step exited with {code}, expected {wanted}")


STUDY_NAME = "cardio-renal-risk"


def study_yaml(image: str) -> str:
    """The analyst's compose: one service running the study from the study image, pinned by digest (``image`` is
    ``sealroom/study-runner@sha256:…``, see :func:`pinned_study_image`)."""
    return f"services:\n  study:\n    image: {image}\n    command: [python, -m, cvm.run]\n"


def pinned_study_image(state_dir: Path) -> str:
    """The study image the demo's recipe pins: the one built reproducibly from this checkout into
    STATE/study-image (`seal image build`), reused while it is current, else (re)built there — seconds when the
    download and layer cache is warm, a minute or two the first time on a machine."""
    from sealing_cli.study_backend import ensure_study_image

    return ensure_study_image(state_dir, lambda line: console.print(f"  {line}"))


def rebuild_source() -> Path | None:
    """The source tree this demo's code came from, when it is a checkout of the repository (not an installed
    package): the demo's auditor rebuilds the study image from it (`seal verify --rebuild`)."""
    from compose.image import build as image_build

    root = Path(image_build.__file__).resolve().parents[2]
    checkout = (root / "pyproject.toml").is_file() and (root / "compose" / "image" / "python.lock").is_file()
    return root if checkout else None


def study_manifest(owners: dict[str, str]) -> dict:
    """The analyst's manifest: DP-SGD logistic regression on the five cohorts, ε = 1.5, model weights out."""
    from cvm.analyses.cohorts import FEATURE_BOUNDS, OUTCOME

    return {
        "study": STUDY_NAME,
        "inputs": [{"owner": address, "name": site} for site, address in owners.items()],
        "analysis": {"kind": "dp_sgd", "params": {
            "features": {k: list(v) for k, v in FEATURE_BOUNDS.items()}, "label": OUTCOME, "model": "logistic",
            "epochs": 3, "batch_size": 8192}},
        "epsilon": EPSILON_PER_RUN, "delta": DELTA, "output_type": "model_weights",
    }


def study_recipe(owners: dict[str, str], image: str | None = None) -> bytes:
    """The app-compose.json bytes the analysts' API builds for that manifest (used by bench/study_bench.py);
    ``image`` defaults to :func:`pinned_study_image` in the default state folder."""
    from compose.app_compose import build_app_compose, normalized_json_bytes
    from compose.manifest import StudyManifest
    from compose.stack_file import default_state_dir

    manifest = StudyManifest.model_validate(study_manifest(owners))
    image = image or pinned_study_image(default_state_dir())
    return normalized_json_bytes(build_app_compose(STUDY_NAME, study_yaml(image), manifest))


class Analyst:
    """The analyst, who only ever talks to the REST API (with a token the operator issued)."""

    def __init__(self, url: str, token: str):
        self.http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60)

    def call(self, method: str, path: str, **kwargs) -> httpx.Response:
        console.print(f"[bold yellow]analyst → {method} {path}[/]")
        return self.http.request(method, path, **kwargs)

    def run(self, compose_hash: str, sealed: list[Path]) -> tuple[httpx.Response, dict | None]:
        """Start a run on the sealed files and follow it; the result when done, else the refusal."""
        files = [("sealed", (p.name, p.read_bytes(), "application/octet-stream")) for p in sealed]
        started = self.call("POST", f"/composes/{compose_hash}/runs", files=files)
        if started.status_code != 202:
            return started, None
        run_id, seen = started.json()["run_id"], ""
        while True:
            view = self.http.get(f"/runs/{run_id}").json()
            if not seen and not view["isolated"]:
                console.print(f"  [bold red]{view['isolation']}[/]")
            if view["state"] != seen:
                seen = view["state"]
                console.print(f"  run {run_id}: {seen}" + (f" — {view['reason']}" if view["reason"] else ""))
            if seen in ("done", "failed"):
                break
            time.sleep(0.5)
        if seen == "failed":
            return started, None
        result = self.call("GET", f"/runs/{run_id}/result")
        return result, result.json()

    def close(self) -> None:
        self.http.close()


def held_out_auc(payload: dict, label: str, rows: int) -> tuple[float, float]:
    """The released model's AUC on a fresh cohort no owner holds, and the ground-truth model's AUC on it.

    The model is rebuilt from the signed payload alone and scored with the same feature mapping the CVM trained with.
    """

    from cvm.analyses.cohorts import FEATURES, GROUND_TRUTH, generate_site
    from cvm.analyses.dpsgd import (
        TrainingSpec,
        model_from_payload,
        prepare_features,
        roc_auc,
        scores,
    )

    model = model_from_payload(payload)
    fresh = generate_site("EU-West", rows, seed=2026)
    data = prepare_features(fresh, TrainingSpec(features=model.feature_bounds, label=label))
    labels = data.y.numpy()
    truth = GROUND_TRUTH.logit({f: fresh.column(f).to_numpy(zero_copy_only=False).astype(float) for f in FEATURES})
    return roc_auc(scores(model.module(), data), labels), roc_auc(truth, labels)


def run_demo(state_dir: Path, *, seal: SealCommand, small: bool = False, backend: str = "container") -> None:
    # A fresh throwaway folder: one this demo made is emptied; anyone else's folder is refused (ScratchRefused),
    # before the heavy imports, so that a refusal is immediate.
    state_dir = prepare_scratch_folder(state_dir, made_by="seal demo",
                                       notify=lambda line: console.print(f"note: {line}"))
    from compose.auth import issue_token
    from cvm.analyses.cohorts import OUTCOME, SITE_SIZES, generate_site, write_parquet

    sd = ["--state-dir", str(state_dir)]
    sizes = {site: max(1, round(n * (SMALL_FRACTION if small else 1))) for site, n in SITE_SIZES.items()}
    started = time.perf_counter()
    console.print(Rule(f"Sealroom demo: five owners, {sum(sizes.values()):,} patients, one DP model"))
    with ExitStack() as cleanup:
        stack = cleanup.enter_context(LocalStack(state_dir, owner_names=tuple(SITE_SIZES), threshold=5,
                                                 epsilon_budget=EPSILON_BUDGET, backend=backend,
                                                 notify=lambda line: console.print(f"  {line}")))
        d = stack.description
        api_url = stack.start_api()
        label = stack.study_backend.label
        console.print(f"study runs: {label}", style=None if stack.study_backend.kind == "container" else "bold red")
        console.print(f"local stack: anvil chain {d.chain_id} at {d.rpc_url}; KMS {d.services['kms']['url']} "
                      f"(dev mode: accepts SIMULATED quotes); analysts' API {api_url}; DstackApp (app_id) "
                      f"{d.dstack_app}, threshold 5/5, ε budget {EPSILON_BUDGET:g}")
        console.print(f"owners' approval console {stack.start_console()} (review, co-sign, revoke)")
        analyst = cleanup.enter_context(closing(Analyst(api_url, issue_token(Path(d.services["api"]["state_dir"]),
                                                                             "demo-analyst"))))

        console.print(Rule("Each owner generates its cohort (synthetic, known ground truth) — it never leaves"))
        sources = {}
        for i, (site, n) in enumerate(sizes.items()):
            sources[site] = state_dir / "owners" / site / f"cohort-{site}.parquet"
            sources[site].parent.mkdir(parents=True)
            write_parquet(generate_site(site, n, seed=100 + i), sources[site])
            console.print(f"{site:<9} {n:>8,} patients  -> {sources[site]}")

        console.print(Rule("The analyst submits the recipe over REST: DP-SGD logistic regression, ε = 1.5"))
        image = pinned_study_image(state_dir)
        console.print(f"  the recipe pins the study image {image} (built reproducibly from this checkout)")
        submitted = analyst.call("POST", "/composes", json={
            "name": STUDY_NAME, "docker_compose": study_yaml(image),
            "manifest": study_manifest({o.name: o.address for o in d.owners})})
        if submitted.status_code != 201:
            raise SystemExit(f"demo: the API refused the compose: {submitted.text}")
        compose = submitted.json()
        hx = "0x" + compose["compose_hash"]
        console.print(f"  compose hash {hx}, proposed on-chain in tx {compose['proposal']['tx']}; "
                      f"app-compose.json for review at {compose['app_compose_url']}")

        console.print(Rule("Each owner reviews the recipe, approves it on-chain, and seals its cohort to it"))
        for owner in d.owners:
            expect(seal("approve", "--compose-hash", hx, "--owner", owner.name, *sd))
        sealed = []
        for owner in d.owners:
            out = sources[owner.name].with_suffix(".sealed")
            expect(seal("dataset", str(sources[owner.name]), "--app-id", d.dstack_app, "--compose-hash", hx,
                        "--out", str(out), "--owner", owner.name, *sd))
            sealed.append(out)
        expect(seal("status", "--compose-hash", hx, *sd))

        console.print(Rule("The analyst starts the run: a SIMULATED CVM attests, gets the keys, trains in memory"))
        run_started = time.perf_counter()
        response, attestation = analyst.run(compose["compose_hash"], sealed)
        if attestation is None:
            raise SystemExit(f"demo: the study run failed: {response.text}")
        receipt = state_dir / "attestation.json"
        receipt.write_bytes(response.content)
        run_seconds = time.perf_counter() - run_started
        envelope = attestation["envelope"]
        payload = envelope["payload"]
        auc, truth_auc = held_out_auc(payload, OUTCOME, 100_000)
        console.print(f"signed aggregate: {payload['output_type']} ({payload['architecture']}), "
                      f"{sum(len(w['values']) for w in payload['weights'].values())} parameters, "
                      f"ε spent {envelope['epsilon_spent']:g} (accountant {payload['accountant']}, δ {DELTA:g}), "
                      f"ε left {envelope['epsilon_remaining']:g}; SIMULATED TEE: {envelope['simulated']}")
        console.print(f"model AUC on a fresh cohort no owner holds: {auc:.4f} (ground-truth model: {truth_auc:.4f})")
        console.print(f"receipt: {receipt}  (envelope digest {attestation['envelope_digest'][:16]}…, run {run_seconds:.1f} s)")
        source = rebuild_source()
        rebuild = ["--rebuild", str(source)] if source else []
        if not source:
            console.print("  (no source checkout to rebuild the study image from: link 8, image, is not checked)")
        expect(seal("verify", str(receipt), "--allow-simulated", *rebuild, *sd))

        console.print(Rule("One owner (CH) revokes the recipe: final; the next run never starts and spends nothing"))
        expect(seal("revoke", "--compose-hash", hx, "--owner", "CH", *sd))
        refused, _ = analyst.run(compose["compose_hash"], sealed)
        if refused.status_code != 409:
            raise SystemExit("demo: a run on a revoked recipe was not refused")
        console.print(f"  refused ({refused.status_code}): {refused.json()['detail']}")
        expect(seal("status", "--compose-hash", hx, *sd))
    console.print(f"local stack stopped; no process left behind. Total {time.perf_counter() - started:.1f} s.")

