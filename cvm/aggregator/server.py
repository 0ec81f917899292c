"""The federated aggregator service: one round, served from inside its (SIMULATED) CVM (DESIGN.md §7).

    python -m cvm.aggregator --port P --kms-url URL --rpc-url URL --dstack-kms ADDR --parent model.f32 \\
        --out-dir DIR [--evaluation reference.parquet] \\
        [--previous round-1.attestation.json --allow-simulated --simulated-root root.der]

The service talks to the guest agent only through dstack-sdk (``DstackClient``), like ``cvm.run``. Before it
opens the KMS or the chain it reads its measured round contract and, for round R > 1, verifies the previous
round's signed record (``--previous``: same DstackApp, round R − 1, lineage to this round's parent); the
accountant continues from it (``cvm.aggregator.record``).

HTTP on loopback (the wire models are ``cvm.aggregator.wire``, shared with the site side, ``sealing_cli.site``):

- ``GET /attestation?nonce=HEX``: a fresh quote whose report_data is
  ``sha512(b"sealroom-fed-aggregator/v1:" ‖ nonce ‖ X25519 public key)`` (the key lives only in this process),
  with the event log and app-compose.json verbatim. Sites verify it before they send anything.
- ``GET /parent``: the parent model (canonical float32 bytes, hex); sites check it against the contract.
- ``POST /update``: a signed update (``cvm.federated.SignedUpdate``, framed by ``update_to_bytes``) sealed
  to that key with ``kms_client.box`` (context ``b"sealroom-fed-update-box/v1:" ‖ contract digest``); the body
  is the box's bytes (``kms_client.box.seal_to_bytes``), ``application/octet-stream``, and a larger body than
  this model's update is refused unread (413). The TEE is the secure aggregation: updates are only ever
  decrypted in here. Updates received after the contract's deadline, or once the round is closing, are
  refused (409).
- ``POST /close``: ask the round to close now; it closes only when ``run_round`` allows it (every eligible
  site heard from, or the deadline passed). The service also closes by itself on both conditions.
- ``GET /result``: the round's outcome; once published, the candidate model and the signed round record.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import numpy as np
from dstack_sdk import DstackClient
from starlette.requests import (
    Request,  # module level: FastAPI resolves the endpoints' annotations here
)

from compose import safe_parse
from contracts.chain import Chain, ChainError
from cvm.aggregator.errors import AggregatorError, RoundClosed, UpdateUnreadable
from cvm.aggregator.recipe import round_contract_of
from cvm.aggregator.record import verify_previous_round
from cvm.aggregator.state import RoundAggregator
from cvm.aggregator.wire import AggregatorAttestation, RoundStatus, UpdateReceived
from cvm.attest.measured import MeasuredRecipeMismatch, measured_recipe
from cvm.federated import vector_digest
from kms_client.client import KmsClient, KmsError


def make_app(aggregator: RoundAggregator):
    """The FastAPI shell over a :class:`RoundAggregator` (loopback only; see the module docstring)."""
    from fastapi import FastAPI, HTTPException, Query
    from starlette.concurrency import run_in_threadpool

    app = FastAPI(title="Sealroom federated aggregator (SIMULATED CVM)")

    @app.get("/attestation")
    def attestation(nonce: str = Query(pattern="^[0-9a-f]{32,128}$")) -> AggregatorAttestation:
        return aggregator.attestation(bytes.fromhex(nonce))

    @app.get("/parent")
    def parent() -> dict[str, str]:
        return {"digest": vector_digest(aggregator.parent), "weights": aggregator.parent.tobytes().hex()}

    @app.post("/update")
    async def update(request: Request) -> UpdateReceived:
        declared = request.headers.get("content-length", "")
        if not declared.isdigit():
            raise HTTPException(411, "a sealed update needs a Content-Length")
        if int(declared) > aggregator.max_body_bytes():
            raise HTTPException(413, f"a sealed update for this round is at most {aggregator.max_body_bytes()} bytes")
        sealed = await request.body()
        try:
            received = await run_in_threadpool(aggregator.receive, sealed)
        except UpdateUnreadable as exc:
            raise HTTPException(400, str(exc)) from None
        except RoundClosed as exc:
            raise HTTPException(409, str(exc)) from None
        await run_in_threadpool(aggregator.try_close)
        return received

    @app.post("/close")
    def close() -> RoundStatus:
        return aggregator.try_close()

    @app.get("/result")
    def result() -> RoundStatus:
        return aggregator.status()

    return app


def main(argv: list[str] | None = None) -> int:
    safe_parse.restore_recursion_limit()  # eth_account's py_ecc raised it: deep input must fail, not overflow the stack
    parser = argparse.ArgumentParser(prog="python -m cvm.aggregator", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--kms-url", required=True)
    parser.add_argument("--rpc-url", required=True)
    parser.add_argument("--dstack-kms", required=True)
    parser.add_argument("--parent", type=Path, required=True, help="parent model: canonical float32 bytes")
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--previous", type=Path, help="the previous round's attestation.json (round > 1)")
    parser.add_argument("--allow-simulated", action="store_true", help="accept a SIMULATED previous record")
    parser.add_argument("--simulated-root", type=Path, help="the pinned simulated TDX root (DER)")
    parser.add_argument("--evaluation", type=Path, help="the public reference cohort the round contract names")
    args = parser.parse_args(argv)

    dstack = DstackClient()
    try:
        with dstack:   # (the SDK's __enter__ returns its async twin: keep our own reference)
            # Everything that can refuse the round without the KMS or the chain is checked before they are opened.
            app_id, _, app_compose = measured_recipe(dstack)
            _, contract = round_contract_of(app_compose)
            state = verify_previous_round(
                None if args.previous is None else safe_parse.loads(args.previous.read_text()), contract=contract,
                app_id=app_id, now=int(time.time()), allow_simulated=args.allow_simulated,
                simulated_root_der=args.simulated_root.read_bytes() if args.simulated_root else None)
            parent = np.frombuffer(args.parent.read_bytes(), "<f4").copy()
            reference = None
            if args.evaluation is not None:
                from cvm.federated.task import ReferenceCohort

                reference = ReferenceCohort.load(args.evaluation)
            with KmsClient(args.kms_url) as kms, Chain(args.rpc_url) as chain:
                aggregator = RoundAggregator(dstack=dstack, kms=kms, chain=chain, dstack_kms=args.dstack_kms,
                                             parent=parent, accountant_state=state, out_dir=args.out_dir,
                                             reference=reference)
                serve(aggregator, args.port)
    except (AggregatorError, MeasuredRecipeMismatch, KmsError, ChainError, OSError, ValueError) as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


def serve(aggregator: RoundAggregator, port: int) -> None:
    """Serve the round on 127.0.0.1:``port`` with its closer thread, until interrupted."""
    import uvicorn

    stop = threading.Event()
    closer = threading.Thread(target=aggregator.run_closer, args=(stop,), daemon=True)
    closer.start()
    print(f"SIMULATED CVM aggregator for round {aggregator.contract.round} on 127.0.0.1:{port}", flush=True)
    try:
        uvicorn.run(make_app(aggregator), host="127.0.0.1", port=port, log_level="warning")
    finally:
        stop.set()
