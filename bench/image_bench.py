"""The study image and the container backend: how long a build takes, and how long a run takes to attest.

    .venv/bin/python -m bench.image_bench [--runs 3] [--skip-build] [--cold-downloads]

1. Image build (``compose.image.build_study_image``), into throwaway folders:
   - cold: an empty layer cache (every layer built again, bytecode compiled), the downloads already cached — with
     ``--cold-downloads``, an empty download cache too (fetches ~1.5 GB from Debian and PyPI);
   - warm: everything cached, nothing changed (what ``seal up`` and ``seal demo`` pay on every start);
   - warm after a one-byte change to the CVM code: the app layer and its bytecode only.
2. Time to first attestation, container backend vs process backend, on a real local stack: from ``launch()``
   (the SIMULATED CVM's agent boots, measures the recipe and gets the app key from the KMS) to the study's first
   attestation — its first ``GetQuote`` to the guest agent, the quote it shows the KMS for the owners' keys —
   and to the signed result. The first container run of an image also loads it into the engine; that load is
   reported apart (``load_s``). Each backend runs ``--runs`` times; the medians are reported. The container
   backend is measured with the image's bytecode, and once more with it ignored (the study's Python run with
   ``-X pycache_prefix=`` an empty folder: what a run cost before the image carried bytecode).

Results land in bench/out/image_bench.json. Numbers are wall clock on this machine, shared with whatever else runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

from eth_keys import keys as eth_keys

from compose.app_compose import build_app_compose, compose_hash, normalized_json_bytes
from compose.backends import process as process_module
from compose.backends.choice import make_backend
from compose.backends.engine import connect_engine
from compose.image import build_study_image, default_cache_dir, default_image_dir
from compose.image.build import APP_PACKAGES, _PROJECT_ROOT
from compose.manifest import StudyManifest
from compose.stack_file import read_keystore
from contracts.chain import DstackApp
from cvm.analyses.cohorts import generate_site, write_parquet
from cvm.sealed import seal_file
from kms_client.client import KmsClient
from sealing_cli.stack import LocalStack

SITES = {"A": "EU-West", "B": "APAC"}
PARAMS = {"max_rows": 10_000, "queries": [{"kind": "count", "name": "patients"},
                                          {"kind": "mean", "name": "mean_age", "column": "age", "bounds": [18, 95]}]}
quiet = lambda line: None  # noqa: E731


# --- 1. building the image ------------------------------------------------------------------------------------------

def _seed_downloads(cache: Path) -> None:
    """A fresh cache that already holds the pinned downloads (hard links into the usual cache) but no layers."""
    usual = default_cache_dir()
    for kind in ("debs", "wheels"):
        if (usual / kind).is_dir():
            shutil.copytree(usual / kind, cache / kind, copy_function=os.link, dirs_exist_ok=True)


def bench_build(cold_downloads: bool) -> dict:
    result = {}
    with tempfile.TemporaryDirectory(prefix="image-bench-", dir=default_cache_dir().parent) as tmp:
        tmp_path = Path(tmp)
        cache = tmp_path / "cache"
        cache.mkdir()
        if not cold_downloads:
            _seed_downloads(cache)
        started = time.perf_counter()
        cold = build_study_image(tmp_path / "cold", cache_dir=cache, log=quiet)
        result["cold_s"] = round(time.perf_counter() - started, 1)
        result["cold_steps_s"] = cold.document["seconds"]
        result["cold_downloads"] = cold_downloads
        started = time.perf_counter()
        warm = build_study_image(tmp_path / "warm", cache_dir=cache, log=quiet)
        result["warm_s"] = round(time.perf_counter() - started, 1)
        assert warm.digest == cold.digest, "two builds of the same inputs disagree"
        sources = tmp_path / "sources"
        for package in APP_PACKAGES:
            shutil.copytree(_PROJECT_ROOT / package, sources / package,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        run = sources / "cvm" / "run.py"
        run.write_bytes(run.read_bytes() + b" ")
        started = time.perf_counter()
        changed = build_study_image(tmp_path / "changed", root=sources, cache_dir=cache, log=quiet)
        result["warm_one_byte_change_s"] = round(time.perf_counter() - started, 1)
        assert changed.digest != cold.digest
        result["digest"] = cold.digest
        result["layers"] = {layer["name"]: layer["size"] for layer in cold.document["layers"]}
    return result


# --- 2. time to first attestation ------------------------------------------------------------------------------------

class _Marks:
    """When the study first asked the guest agent for a quote (bench-only instrumentation of the agent relay)."""

    def __init__(self) -> None:
        self.first_quote: float | None = None
        self._lock = threading.Lock()

    def observe(self, request: bytes) -> None:
        if b"GetQuote" in request:
            with self._lock:
                if self.first_quote is None:
                    self.first_quote = time.perf_counter()


MARKS = _Marks()


class _TimedForwarder(process_module._Forwarder):
    def __init__(self, listener, connect, *, observe=None):
        if observe is not None:            # the agent relay (the only one the backends observe)
            inner = observe

            def observe(request: bytes, inner=inner) -> None:
                MARKS.observe(request)
                inner(request)
        super().__init__(listener, connect, observe=observe)


def _instrument() -> None:
    from compose.backends import container as container_module

    process_module._Forwarder = _TimedForwarder
    container_module._Forwarder = _TimedForwarder


def _recipe(owners: dict, image: str, study: str, command: str = "[python, -m, cvm.run]") -> bytes:
    manifest = StudyManifest.model_validate({
        "study": study, "inputs": [{"owner": owners[n].address, "name": site} for n, site in SITES.items()],
        "analysis": {"kind": "dp_stats", "params": PARAMS}, "epsilon": 0.1, "delta": 1e-6,
        "output_type": "aggregate_stats"})
    yaml_text = f"services:\n  study:\n    image: {image}\n    command: {command}\n"
    return normalized_json_bytes(build_app_compose(study, yaml_text, manifest))


def _approved_and_sealed(stack: LocalStack, owners: dict, body: bytes, name: str, rows: int
                         ) -> tuple[Path, list[Path]]:
    d = stack.description
    compose_path = stack.state_dir / f"{name}.app-compose.json"
    compose_path.write_bytes(body)
    h = compose_hash(body)
    study = DstackApp(stack.chain, d.dstack_app)
    study.propose(h, compose_path.as_uri(), owners["A"])
    for owner in SITES:
        study.approve(h, owners[owner])
    sealed = []
    with KmsClient(d.services["kms"]["url"]) as kms:
        root = kms.meta().root_address
        for owner, site in SITES.items():
            source = stack.state_dir / f"{site}-{h.hex()[:8]}.parquet"
            write_parquet(generate_site(site, rows, seed=7), source)
            out = source.with_suffix(".sealed")
            seal_pubkey = kms.owner_seal_key(d.dstack_app, h, owners[owner].address, pinned_root_address=root)
            seal_file(source, out, app_id=bytes.fromhex(d.dstack_app[2:]), compose_hash=h,
                      owner_key=eth_keys.PrivateKey(owners[owner].key), owner_seal_pubkey=seal_pubkey,
                      kms_root_address=root)
            sealed.append(out)
    return compose_path, sealed


def _one_run(backend, run_dir: Path, compose_path: Path, sealed: list[Path]) -> dict:
    MARKS.first_quote = None
    started = time.perf_counter()
    handle = backend.launch(run_dir, compose_path, sealed)
    booted = time.perf_counter()
    try:
        while (status := handle.poll()).state not in ("done", "failed"):
            time.sleep(0.02)
        ended = time.perf_counter()
    finally:
        handle.stop()
    if status.state != "done":
        raise RuntimeError(f"the bench run failed: {status.reason}")
    return {"boot_s": booted - started, "first_attestation_s": (MARKS.first_quote or ended) - started,
            "result_s": ended - started}


def _median(runs: list[dict]) -> dict:
    return {key: round(statistics.median(run[key] for run in runs), 2) for key in runs[0]}


def bench_runs(count: int, rows: int) -> dict:
    _instrument()
    with tempfile.TemporaryDirectory(prefix="image-bench-stack-") as tmp, \
            LocalStack(Path(tmp) / "stack", owner_names=tuple(SITES), threshold=2, epsilon_budget=100.0,
                       notify=quiet) as stack:
        d = stack.description
        state = stack.state_dir
        owners = {o.name: read_keystore(o.keystore, d.dev_keystore_password) for o in d.owners}
        image = build_study_image(default_image_dir(state), log=quiet).reference
        engine = connect_engine(state)
        try:
            backends = {
                "process": make_backend("process", stack=d, stack_dir=state),
                "container": make_backend("container", stack=d, stack_dir=state, engine=engine,
                                          image_dir=default_image_dir(state)),
            }
            result: dict = {"rows_per_site": rows, "runs": count, "isolation": {
                name: backend.isolation.description for name, backend in backends.items()}}
            compose_path, sealed = _approved_and_sealed(stack, owners, _recipe(owners, image, "image-bench"),
                                                        "image-bench", rows)
            # The image's first container run loads it into the engine: timed apart (and said when the engine had
            # it already: its storage is shared with every other stack on this machine).
            config_digest = json.loads((default_image_dir(state) / "build-record.json").read_text())["config_digest"]
            try:
                engine.client.images.get(config_digest)
                result["container_image_already_loaded"] = True
            except Exception:   # noqa: BLE001 - docker.errors.ImageNotFound
                result["container_image_already_loaded"] = False
            started = time.perf_counter()
            backends["container"].ensure_image(image.split("@", 1)[1])
            result["container_image_load_s"] = round(time.perf_counter() - started, 1)
            for name, backend in backends.items():
                runs = [_one_run(backend, state / "runs" / f"{name}-{i}", compose_path, sealed) for i in range(count)]
                result[name] = _median(runs)
                print(f"{name:<9} boot {result[name]['boot_s']:5.2f} s  first attestation "
                      f"{result[name]['first_attestation_s']:5.2f} s  signed result {result[name]['result_s']:5.2f} s "
                      f"(median of {count})", flush=True)
            # The same study with the image's bytecode ignored (its pycache looked for in an empty folder): what a
            # container run cost before the image carried bytecode. Another command is another recipe.
            nopyc_path, nopyc_sealed = _approved_and_sealed(
                stack, owners, _recipe(owners, image, "image-bench-nopyc",
                                       "[python, -X, pycache_prefix=/tmp/no-bytecode, -m, cvm.run]"),
                "image-bench-nopyc", rows)
            runs = [_one_run(backends["container"], state / "runs" / f"nopyc-{i}", nopyc_path, nopyc_sealed)
                    for i in range(count)]
            result["container_without_bytecode"] = _median(runs)
            print(f"container without bytecode: first attestation "
                  f"{result['container_without_bytecode']['first_attestation_s']:5.2f} s  signed result "
                  f"{result['container_without_bytecode']['result_s']:5.2f} s", flush=True)
        finally:
            engine.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rows", type=int, default=1_000, help="synthetic rows per site")
    parser.add_argument("--skip-build", action="store_true", help="only the runs")
    parser.add_argument("--cold-downloads", action="store_true", help="the cold build fetches its inputs too")
    args = parser.parse_args()
    result: dict = {}
    if not args.skip_build:
        result["build"] = bench_build(args.cold_downloads)
        b = result["build"]
        fetched = "downloads too" if args.cold_downloads else "downloads cached"
        print(f"image build: cold {b['cold_s']} s ({fetched}), warm {b['warm_s']} s, warm after a one-byte CVM code "
              f"change {b['warm_one_byte_change_s']} s", flush=True)
    result["first_attestation"] = bench_runs(args.runs, args.rows)
    r = result["first_attestation"]
    ratio = r["container"]["first_attestation_s"] / r["process"]["first_attestation_s"]
    loaded = " (it was loaded already)" if r["container_image_already_loaded"] else ""
    print(f"time to first attestation: container {r['container']['first_attestation_s']} s vs process "
          f"{r['process']['first_attestation_s']} s ({ratio:.2f}×); image load into the engine "
          f"{r['container_image_load_s']} s once{loaded}", flush=True)
    out = Path("bench/out")
    out.mkdir(parents=True, exist_ok=True)
    (out / "image_bench.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
