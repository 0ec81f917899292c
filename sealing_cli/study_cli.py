"""`seal study …`: the analyst's commands — write a recipe, submit it, run it on sealed files, fetch the result.

Everything goes through the analysts' REST API with the typed client (`compose.client`); recipes are read and
checked by `compose.recipe` before anything is sent, so a recipe with an unknown setting, an out-of-range bound or
a value still reading "FILL IN" is refused here, with the field named, and nothing is proposed on-chain.

The API is `--api URL`, else the local stack's (its stack.json); the analyst's token is `SEAL_API_TOKEN` (issued
by `seal analyst-token NAME`), never a command-line argument. Exit codes are docs/cli.md's: 1 the API (or a local
check) refused, 2 usage, 3 the API or its chain is unreachable, 4 no token or a token the API refuses.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn, Optional

import typer
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

from compose.stack_file import default_state_dir
from sealing_cli.common import (
    EXIT_KEY,
    EXIT_REFUSED,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    JsonFlag,
    StateDir,
    err,
    fail,
    load_stack,
    out,
)

TOKEN_ENV = "SEAL_API_TOKEN"

study_app = typer.Typer(no_args_is_help=True, help="The analyst's side: write a recipe, submit it, run it on the "
                                                   "owners' sealed files, fetch the signed result (over the REST API).")

ApiOpt = Annotated[Optional[str], typer.Option("--api", metavar="URL", help="The analysts' API (default: the local "
                                               "stack's); the token comes from $SEAL_API_TOKEN")]
_RUN_ID = re.compile(r"[0-9a-f]{16}")
_HASH = re.compile(r"(0x)?[0-9a-fA-F]{64}")


# ---- talking to the API ------------------------------------------------------------------------------------------

def _api_url(api: str | None, state_dir: Path | None) -> str:
    if api:
        if not re.match(r"https?://", api):
            fail(f"--api must be an http(s) URL, got {api!r}", EXIT_USAGE)
        return api
    service = load_stack(state_dir).services.get("api")
    if service is None:
        fail("the local stack runs no analysts' API", EXIT_UNREACHABLE, "pass --api URL, or start one with `seal up`")
    return service["url"]


def _token() -> str:
    token = os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        fail(f"no API token: ${TOKEN_ENV} is not set", EXIT_KEY,
             f"the operator issues one with `seal analyst-token NAME`; then export {TOKEN_ENV}=…")
    return token


def _api_failed(exc: Exception) -> NoReturn:
    from compose.client import ApiUnreachable, ServiceUnavailable, Unauthorized

    if isinstance(exc, (ApiUnreachable, ServiceUnavailable)):
        fail(str(exc), EXIT_UNREACHABLE, "is the stack (`seal up`) running, and is --api right?")
    if isinstance(exc, Unauthorized):
        fail(str(exc), EXIT_KEY, f"set {TOKEN_ENV} to a token from `seal analyst-token NAME` for this API")
    fail(str(exc), EXIT_REFUSED)


@contextmanager
def _client(api: str | None, state_dir: Path | None) -> Iterator[Any]:
    from compose.client import ApiError, SealroomClient

    url = _api_url(api, state_dir)
    try:
        with SealroomClient(url, _token()) as client:
            yield client
    except ApiError as exc:
        _api_failed(exc)


def _print_json(record: Any) -> None:
    out.print_json(json.dumps(record))


def _run_line(view: Any) -> str:
    line = f"run {view.run_id}: {view.state}"
    if view.training is not None and view.state in ("running", "signing", "done"):
        line += f"  (epoch {view.training.epochs_done}/{view.training.epochs})"
    if view.reason:
        line += f" — {view.reason}"
    return line


def _follow(client: Any, run_id: str, as_json: bool) -> Any:
    """Follow the run to done or failed, one line per change of stage or epoch (stderr)."""
    show = (lambda view: None) if as_json else (lambda view: err.print(escape(_run_line(view)), highlight=False))
    return client.wait(run_id, on_progress=show)


def _check_run_id(run_id: str) -> str:
    if not _RUN_ID.fullmatch(run_id):
        fail(f"a run id is 16 lowercase hex digits, got {run_id!r}", EXIT_USAGE, "`seal study list` shows your runs")
    return run_id


def _check_hash(value: str) -> str:
    if not _HASH.fullmatch(value):
        fail(f"a compose hash is 64 hex digits (0x optional), got {value!r}", EXIT_USAGE)
    return value.removeprefix("0x").lower()


def _run_record(view: Any) -> dict:
    return view.model_dump(mode="json")


def _print_run(view: Any) -> None:
    out.print(escape(_run_line(view)), highlight=False)
    out.print(f"compose hash  0x{view.compose_hash}", highlight=False)
    stages = "  ".join(step.state for step in view.progress)
    out.print(f"stages        {stages}", highlight=False)
    if view.training is not None:
        out.print(f"training      epoch {view.training.epochs_done} of {view.training.epochs}", highlight=False)
    for item in view.inputs:
        out.print(f"input         {escape(item.file)}  {item.bytes} bytes  owner {item.owner}", highlight=False)
    out.print(f"platform      {'SIMULATED TDX' if view.simulated else 'TDX'}; {escape(view.isolation)}",
              highlight=False)
    if view.result_url:
        out.print(f"result        `seal study result {view.run_id}`", highlight=False)


def _print_compose(view: Any) -> None:
    a = view.approval
    out.print(f"compose hash  0x{view.compose_hash}  ({escape(view.name or 'unnamed')})", highlight=False)
    out.print(f"state         {a.state}  ({a.approvals}/{len(a.owners)} approvals, threshold {a.threshold})",
              highlight=False)
    out.print(f"review        {view.app_compose_url}", highlight=False)
    out.print(f"budget        ε spent {a.epsilon_spent:g} of {a.epsilon_budget:g}, {a.epsilon_remaining:g} left",
              highlight=False)


# ---- schema, new ------------------------------------------------------------------------------------------------

@study_app.command("schema")
def schema(
    kind: Annotated[str, typer.Argument(metavar="KIND", help="recipe (the default), manifest, or an analysis "
                                        "kind's params: dp_stats, dp_sgd, fed_round")] = "recipe",
) -> None:
    """Print the JSON Schema of a recipe file, a study manifest, or one analysis kind's params (docs/recipes.md).
    Generated from the models the API and the CVM validate with."""
    from compose.recipe import SCHEMA_NAMES, json_schema

    if kind not in SCHEMA_NAMES:
        fail(f"no schema {kind!r}", EXIT_USAGE, f"KIND is one of: {', '.join(SCHEMA_NAMES)}")
    sys.stdout.write(json.dumps(json_schema(kind), indent=2, ensure_ascii=False) + "\n")


def _input_name(path: Path) -> str:
    """A sealed file's input name: its file name without .sealed and the source's .parquet / .csv."""
    name = path.name.removesuffix(".sealed")
    for suffix in (".parquet", ".csv"):
        name = name.removesuffix(suffix)
    return name or path.name


def _study_image(image: str | None, state_dir: Path | None) -> str | None:
    if image:
        return image
    from compose.image import ImageNotBuilt, current_study_image

    try:
        return current_study_image(state_dir or default_state_dir())
    except (ImageNotBuilt, OSError, ValueError, KeyError):   # none built here, a stale one, an unreadable record:
        return None                                          # the recipe asks for one instead


@study_app.command("new")
def new(
    sealed: Annotated[list[Path], typer.Option("--from", metavar="SEALED_FILE", help="A sealed file whose public "
                                               "envelope (owner, columns, types, rows) the recipe is written for; "
                                               "repeat, or list more files after it", exists=True, dir_okay=False,
                                               readable=True)],
    more: Annotated[Optional[list[Path]], typer.Argument(metavar="SEALED_FILE", help="More sealed files",
                                                         exists=True, dir_okay=False, readable=True,
                                                         show_default=False)] = None,
    kind: Annotated[str, typer.Option("--kind", help="dp_stats (counts, means, histograms) or dp_sgd (a model)")]
    = "dp_stats",
    name: Annotated[str, typer.Option("--name", help="The study's and the app's name")] = "study",
    image: Annotated[Optional[str], typer.Option("--image", help="The study image, pinned by digest (default: the "
                                                 "one `seal image build` made here, else left to fill in)")] = None,
    out_file: Annotated[Path, typer.Option("--out", help="Where to write the recipe (.json for JSON, else YAML); "
                                           "'-' for stdout; an existing file is never replaced")] = Path("recipe.yaml"),
    state_dir: StateDir = None,
) -> None:
    """Write a starter recipe for sealed files: inputs, columns and types from their envelopes; every bound, ε and
    δ reads "FILL IN: …", and the recipe is refused until each is filled in. Needs no key and no API."""
    from compose.manifest import unfilled_fields
    from compose.recipe import StarterRefused, render_recipe, starter_recipe
    from cvm.sealed import SealedFileError, read_envelope

    if kind not in ("dp_stats", "dp_sgd"):
        fail(f"--kind must be dp_stats or dp_sgd, got {kind!r}", EXIT_USAGE,
             "a fed_round recipe is the round contract (docs/federated.md)")
    files = [*sealed, *(more or [])]
    to_stdout = str(out_file) == "-"
    if not to_stdout and (out_file.exists() or out_file.is_symlink()):
        fail(f"--out: {out_file} exists; it is left as it is", EXIT_USAGE, "give another --out")
    inputs = []
    for path in files:
        try:
            inputs.append((_input_name(path), read_envelope(path)))
        except SealedFileError as exc:
            fail(f"{path}: {exc}", EXIT_REFUSED)
    try:
        recipe = starter_recipe(inputs, kind=kind, name=name, image=_study_image(image, state_dir))
    except StarterRefused as exc:
        fail(str(exc), EXIT_REFUSED)
    text = render_recipe(recipe, as_json=out_file.suffix.lower() == ".json")
    if to_stdout:
        sys.stdout.write(text)
    else:
        try:
            with out_file.open("x", encoding="utf-8") as f:
                f.write(text)
        except OSError as exc:
            fail(f"--out: {exc}", EXIT_USAGE)
    todo = [field for field, _ in unfilled_fields(recipe, "")]
    todo += ["docker_compose (the image)"] if "FILL IN" in recipe["docker_compose"] else []
    where = "it" if to_stdout else str(out_file)
    err.print(f"wrote a {kind} recipe for {len(inputs)} input(s) to {'stdout' if to_stdout else escape(where)}; "
              f"fill in {len(todo)} value(s) before `seal study submit`:", highlight=False)
    for field in todo:
        err.print(f"  {escape(field.removeprefix('.'))}", highlight=False)


# ---- submit -----------------------------------------------------------------------------------------------------

@study_app.command("submit")
def submit(
    recipe_file: Annotated[Path, typer.Argument(metavar="RECIPE", help="The recipe file (YAML, or .json)",
                                                exists=True, dir_okay=False, readable=True)],
    check: Annotated[bool, typer.Option("--check", help="Only check the recipe here and print its compose hash; "
                                        "send nothing")] = False,
    api: ApiOpt = None, state_dir: StateDir = None, as_json: JsonFlag = False,
) -> None:
    """Check a recipe here (every problem named), then submit it: the API builds app-compose.json and proposes its
    hash on-chain for the owners to approve. A refused recipe proposes nothing."""
    from compose.recipe import RecipeInvalid, load_recipe

    try:
        recipe = load_recipe(recipe_file)
    except RecipeInvalid as refused:
        for field, reason in refused.problems[1:]:
            err.print(f"  {escape(field)}: {escape(reason)}", highlight=False)
        fail(f"{recipe_file}: {refused.problems[0][0]}: {refused.problems[0][1]}"
             + (f" (and {len(refused.problems) - 1} more, above)" if len(refused.problems) > 1 else ""),
             EXIT_REFUSED, "nothing was submitted or proposed; `seal study schema` and docs/recipes.md say what "
             "each setting takes")
    except OSError as exc:
        fail(f"{recipe_file}: {exc}", EXIT_USAGE)
    if check:
        record = {"recipe": str(recipe_file), "valid": True, "compose_hash": recipe.compose_hash,
                  "kind": recipe.submission.manifest.analysis.kind}
        if as_json:
            _print_json(record)
        else:
            out.print(f"recipe {escape(str(recipe_file))} is valid; it builds compose hash 0x{recipe.compose_hash} "
                      "(nothing was sent)", highlight=False)
        return
    with _client(api, state_dir) as client:
        submitted = client.submit(recipe.body())
    if submitted.compose_hash != recipe.compose_hash:
        err.print(f"note: the API built compose hash 0x{submitted.compose_hash}, not 0x{recipe.compose_hash} as "
                  "this seal does (another version?); owners review the API's bytes", highlight=False)
    if as_json:
        _print_json(submitted.model_dump(mode="json", exclude={"app_compose"}))
        return
    out.print(f"submitted {escape(submitted.name or recipe.submission.name)}: compose hash "
              f"0x{submitted.compose_hash}", highlight=False)
    out.print(f"proposed on-chain in tx {submitted.proposal.tx} (block {submitted.proposal.block}); "
              f"{submitted.approval.state}, {submitted.approval.approvals}/{submitted.approval.threshold} approvals",
              highlight=False)
    out.print(f"owners review {submitted.app_compose_url} and approve with "
              f"`seal approve --compose-hash 0x{submitted.compose_hash}`", highlight=False)


# ---- run, status, result, list ----------------------------------------------------------------------------------

@study_app.command("run")
def run(
    compose_hash: Annotated[str, typer.Argument(metavar="HASH", help="The approved compose hash")],
    files: Annotated[list[Path], typer.Argument(metavar="FILES", help="The owners' sealed files, one per input "
                                                "of the manifest", exists=True, dir_okay=False, readable=True)],
    detach: Annotated[bool, typer.Option("--detach", help="Return once the run is started; follow it with `seal "
                                         "study status RUN --wait`")] = False,
    api: ApiOpt = None, state_dir: StateDir = None, as_json: JsonFlag = False,
) -> None:
    """Start a run of an approved compose on the owners' sealed files (streamed up), and follow it: its stages and,
    for DP-SGD, its epochs. Exit 1 when the API refuses the start or the run fails."""
    h = _check_hash(compose_hash)
    total = sum(path.stat().st_size for path in files)
    with _client(api, state_dir) as client:
        with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                      TransferSpeedColumn(), console=err, transient=True,
                      disable=as_json or not err.is_terminal) as bar:
            task = bar.add_task(f"uploading {len(files)} sealed file(s)", total=total)
            started = client.start_run(h, files, on_upload=lambda sent, _total: bar.update(task, completed=sent))
        if not as_json:
            err.print(f"run {started.run_id} started on compose 0x{h} ({len(files)} file(s), {total} bytes)"
                      + ("" if started.isolated else f"; {escape(started.isolation)}"), highlight=False)
        view = started if detach else _follow(client, started.run_id, as_json)
    _finish(view, as_json)


def _finish(view: Any, as_json: bool) -> None:
    if as_json:
        _print_json(_run_record(view))
    elif view.state == "done":
        out.print(f"run {view.run_id} done; fetch its result with `seal study result {view.run_id}`",
                  highlight=False)
    elif view.state != "failed":
        out.print(f"run {view.run_id} is {view.state}; follow it with `seal study status {view.run_id} --wait`",
                  highlight=False)
    if view.state == "failed":
        fail(f"run {view.run_id} failed: {view.reason or 'no reason given'}", EXIT_REFUSED)


@study_app.command("status")
def status(
    ref: Annotated[str, typer.Argument(metavar="RUN", help="A run id (16 hex), or a compose hash (64 hex) for its "
                                       "approval state")],
    wait: Annotated[bool, typer.Option("--wait", help="Follow the run until it is done or failed")] = False,
    api: ApiOpt = None, state_dir: StateDir = None, as_json: JsonFlag = False,
) -> None:
    """Show a run (stages, epochs for DP-SGD, inputs, isolation, why it failed) or a compose's approval state and
    the study's budget. Exit 1 for a failed run."""
    is_compose = _HASH.fullmatch(ref) is not None
    if is_compose and wait:
        fail("--wait follows a run, not a compose hash", EXIT_USAGE)
    with _client(api, state_dir) as client:
        if is_compose:
            view = client.compose(_check_hash(ref))
            if as_json:
                _print_json(view.model_dump(mode="json"))
            else:
                _print_compose(view)
            return
        run_id = _check_run_id(ref)
        view = _follow(client, run_id, as_json) if wait else client.run(run_id)
    if as_json:
        _print_json(_run_record(view))
    else:
        _print_run(view)
    if view.state == "failed":
        fail(f"run {view.run_id} failed: {view.reason or 'no reason given'}", EXIT_REFUSED)


@study_app.command("result")
def result(
    run_id: Annotated[str, typer.Argument(metavar="RUN", help="The run id")],
    out_file: Annotated[Optional[Path], typer.Option("--out", help="Where to write attestation.json (default: "
                                                     "attestation-RUN.json); '-' for stdout; an existing file is "
                                                     "never replaced")] = None,
    api: ApiOpt = None, state_dir: StateDir = None, as_json: JsonFlag = False,
) -> None:
    """Download a done run's attestation.json verbatim (the signed DP result and everything to verify it) and
    summarise the result; check it with `seal verify`."""
    _check_run_id(run_id)
    target = out_file or Path(f"attestation-{run_id}.json")
    to_stdout = str(target) == "-"
    if not to_stdout and (target.exists() or target.is_symlink()):
        fail(f"--out: {target} exists; it is left as it is", EXIT_USAGE, "give another --out")
    with _client(api, state_dir) as client:
        fetched = client.result(run_id)
    if to_stdout:
        sys.stdout.buffer.write(fetched.attestation)
        sys.stdout.flush()
        return
    try:
        with target.open("xb") as f:
            f.write(fetched.attestation)
    except OSError as exc:
        fail(f"--out: {exc}", EXIT_USAGE)
    try:
        envelope = fetched.json()["envelope"]
        payload = envelope["payload"]
    except (ValueError, KeyError, TypeError):
        fail(f"the result of run {run_id} is not a receipt (written to {target} as it came)", EXIT_REFUSED)
    record = {"run_id": run_id, "out": str(target), "bytes": len(fetched.attestation), "simulated": fetched.simulated,
              "compose_hash": envelope.get("compose_hash"), "epsilon_spent": envelope.get("epsilon_spent"),
              "output_type": payload.get("output_type"), "payload": payload}
    if as_json:
        _print_json(record)
        return
    out.print(f"wrote {escape(str(target))} ({len(fetched.attestation)} bytes): the signed result of run {run_id}"
              + (" on SIMULATED TDX" if fetched.simulated else ""), highlight=False)
    _print_payload(payload)
    flags = " --allow-simulated" if fetched.simulated else ""
    out.print(f"check it link by link: `seal verify {escape(str(target))}{flags}`", highlight=False)


def _print_payload(payload: dict) -> None:
    spent = payload.get("spent", {})
    out.print(f"{payload.get('output_type')}: ε {spent.get('epsilon')}, δ {spent.get('delta')} spent", highlight=False)
    if payload.get("output_type") == "aggregate_stats":
        for item in payload.get("results", []):
            out.print(f"  {escape(str(item.get('name')))} ({item.get('kind')}): {escape(str(item.get('value')))}",
                      highlight=False)
    elif payload.get("output_type") == "model_weights":
        shapes = ", ".join(f"{name} {w.get('shape')}" for name, w in payload.get("weights", {}).items())
        out.print(f"  {payload.get('architecture')} model, {payload.get('steps')} steps; weights {shapes}; features "
                  f"{', '.join(payload.get('feature_bounds', {}))}", highlight=False)


@study_app.command("list")
def list_(api: ApiOpt = None, state_dir: StateDir = None, as_json: JsonFlag = False) -> None:
    """List the composes submitted to the API, with their approval state, and your runs (newest first)."""
    with _client(api, state_dir) as client:
        composes, runs = client.composes(), client.runs()
    if as_json:
        _print_json({"composes": [c.model_dump(mode="json") for c in composes],
                     "runs": [_run_record(r) for r in runs]})
        return
    out.print(f"{len(composes)} compose(s)", highlight=False)
    for c in composes:
        a = c.approval
        out.print(f"  0x{c.compose_hash}  {a.state:<12} {a.approvals}/{a.threshold}  {escape(c.name or '')}",
                  highlight=False)
    out.print(f"{len(runs)} run(s) of yours", highlight=False)
    for r in runs:
        out.print(f"  {r.run_id}  {r.state:<8} compose 0x{r.compose_hash[:16]}…"
                  + (f"  {escape(r.reason)}" if r.reason else ""), highlight=False)


def _read_rows(path: Path):
    """A CSV or Parquet file of rows, as a pyarrow table (columns by name)."""
    import pyarrow.csv as pa_csv
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path) if path.suffix.lower() in (".parquet", ".pq") else pa_csv.read_csv(path)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the caller's mistake, named
        fail(f"--data: {path} cannot be read as {'Parquet' if path.suffix.lower() in ('.parquet', '.pq') else 'CSV'}:"
             f" {exc}", EXIT_USAGE)


@study_app.command("model")
def model(
    receipt_file: Annotated[Path, typer.Argument(metavar="RECEIPT", help="A run's attestation.json", exists=True,
                                                 dir_okay=False, readable=True)],
    data: Annotated[Path, typer.Option("--data", help="Rows to score, CSV or Parquet, with the model's feature "
                                       "columns by name", exists=True, dir_okay=False, readable=True)],
    out_file: Annotated[Optional[Path], typer.Option("--out", help="Where to write the predictions CSV (default: "
                                                     "stdout); an existing file is never replaced")] = None,
    rpc: Annotated[Optional[str], typer.Option("--rpc", help="The chain's JSON-RPC URL (default: the local "
                                               "stack's)")] = None,
    kms_root: Annotated[Optional[str], typer.Option("--kms-root", help="Pin the KMS root address (default: the "
                                                    "local stack's)")] = None,
    allow_simulated: Annotated[bool, typer.Option("--allow-simulated", help="Accept a SIMULATED TDX quote")] = False,
    simulated_root: Annotated[Optional[Path], typer.Option("--simulated-root", help="The simulated TDX root to pin, "
                                                           "DER (default: the local stack's)", exists=True,
                                                           dir_okay=False, readable=True)] = None,
    state_dir: StateDir = None, as_json: JsonFlag = False,
) -> None:
    """Verify a model receipt (as `seal verify` does) and score a file with the released model: one probability
    per row, features taken by column name and standardised as the signed payload declares."""
    import time

    from eth_utils import is_address

    from auditor.verify import NotAReceipt, load_receipt
    from compose.model import ReceiptNotVerified, load_model
    from compose.stack_file import StackDescription, StackError
    from contracts.chain import Chain, ChainUnreachable
    from cvm.attest.os_image import OsImageRegistry
    from sealing_cli.os_images import kms_os_images_dir

    if out_file is not None and (out_file.exists() or out_file.is_symlink()):
        fail(f"--out: {out_file} exists; it is left as it is", EXIT_USAGE, "give another --out")
    try:
        stack = StackDescription.load(state_dir)
    except StackError:
        stack = None
    rpc_url = rpc or (stack.rpc_url if stack else None)
    if rpc_url is None:
        fail("no chain to check the receipt against", EXIT_USAGE, "pass --rpc URL, or start a local stack (`seal up`)")
    if kms_root is not None and not (kms_root.startswith("0x") and is_address(kms_root)):
        fail(f"--kms-root must be a 0x-prefixed address, got {kms_root!r}", EXIT_USAGE)
    pinned_root = kms_root or (stack.services.get("kms", {}).get("root_address") if stack else None)
    root_der = None
    if allow_simulated:
        root_path = simulated_root or ((state_dir or default_state_dir()) / "simulated-tdx" / "root.der"
                                       if stack else None)
        if root_path is None or not root_path.is_file():
            fail("--allow-simulated needs a simulated TDX root to pin", EXIT_USAGE, "pass --simulated-root FILE (DER)")
        root_der = root_path.read_bytes()
    os_records = OsImageRegistry(kms_os_images_dir(state_dir or default_state_dir())).records() if stack else []
    try:
        receipt = load_receipt(receipt_file.read_bytes())
    except NotAReceipt as exc:
        fail(f"{receipt_file}: {exc}", EXIT_REFUSED)
    rows = _read_rows(data)
    try:
        chain = Chain(rpc_url)
    except ChainUnreachable as exc:
        fail(str(exc), EXIT_UNREACHABLE)
    try:
        loaded = load_model(receipt, now=int(time.time()), chain=chain, kms_root=pinned_root,
                            allow_simulated=allow_simulated, simulated_root_der=root_der, os_measurements=os_records)
    except ReceiptNotVerified as exc:
        first = exc.report.first_failure
        fail(f"{exc}; nothing was scored", EXIT_UNREACHABLE if first is not None and first.unreachable
             else EXIT_REFUSED, "a SIMULATED receipt passes only with --allow-simulated"
             if exc.report.simulated and not allow_simulated else "check it with `seal verify`")
    finally:
        chain.close()
    if not hasattr(loaded, "predict_proba"):
        fail(f"{receipt_file} releases statistics, not a model: see `seal study result`", EXIT_REFUSED)
    try:
        probabilities = loaded.predict_proba(rows)
    except ValueError as exc:
        fail(f"--data: {exc}", EXIT_USAGE, f"the model needs the columns {', '.join(loaded.features)}")
    lines = "probability\n" + "".join(f"{p!r}\n" for p in probabilities.tolist())
    if out_file is None and not as_json:
        sys.stdout.write(lines)
        sys.stdout.flush()
    elif out_file is not None:
        try:
            with out_file.open("x") as f:
                f.write(lines)
        except OSError as exc:
            fail(f"--out: {exc}", EXIT_USAGE)
    if as_json:
        _print_json({"rows": len(probabilities), "out": None if out_file is None else str(out_file),
                     "verified": True, "architecture": loaded.architecture, "features": list(loaded.features),
                     "label": loaded.label} | ({"probabilities": probabilities.tolist()} if out_file is None else {}))
    elif out_file is not None:
        out.print(f"receipt VERIFIED; scored {len(probabilities)} rows of {escape(str(data))} with the "
                  f"{loaded.architecture} model ({', '.join(loaded.features)} -> P({escape(loaded.label)})): "
                  f"{escape(str(out_file))}", highlight=False)
