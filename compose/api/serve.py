"""``python -m compose.api``: serve the analysts' API for the local stack (runs on SIMULATED TDX)."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import uvicorn

from compose.api.app import DEFAULT_MAX_UPLOAD_BYTES, ApiConfig, create_app
from compose.backends import LocalProcessBackend
from compose.safe_parse import restore_recursion_limit
from compose.stack_file import StackDescription, StackError, read_keystore
from contracts.chain import Chain, ChainError, DstackApp

__all__ = ["PROPOSER_PASSWORD_ENV", "main"]

PROPOSER_PASSWORD_ENV = "SEALROOM_API_PROPOSER_PASSWORD"


def main(argv: list[str] | None = None) -> int:
    restore_recursion_limit()
    parser = argparse.ArgumentParser(prog="python -m compose.api", description="Serve the analysts' REST API for "
                                     "the local stack (runs on SIMULATED TDX).")
    parser.add_argument("--stack-state-dir", type=Path, required=True, help="the local stack's state folder")
    parser.add_argument("--state-dir", type=Path, help="the API's own folder (default: STACK_STATE_DIR/api)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--proposer-keystore", type=Path, required=True,
                        help="keystore of the funded account that proposes composes; its password in "
                             f"${PROPOSER_PASSWORD_ENV}")
    parser.add_argument("--max-upload-bytes", type=int, default=DEFAULT_MAX_UPLOAD_BYTES,
                        help="the most a run's sealed files may total (default: %(default)s)")
    args = parser.parse_args(argv)
    stack_dir = args.stack_state_dir.resolve()
    state_dir = (args.state_dir or stack_dir / "api").resolve()
    # Taken out of the environment so that no child (a study run) inherits it.
    password = os.environ.pop(PROPOSER_PASSWORD_ENV, None)
    if password is None:
        print(f"error: set {PROPOSER_PASSWORD_ENV} to the proposer keystore's password", file=sys.stderr)
        return 2
    try:
        stack = StackDescription.load(stack_dir)
        proposer = read_keystore(args.proposer_keystore, password)
    except (StackError, OSError, ValueError) as unusable:
        print(f"error: {unusable}", file=sys.stderr)
        return 2
    backend = LocalProcessBackend(app_id=stack.dstack_app, kms_url=stack.services["kms"]["url"],
                                  rpc_url=stack.rpc_url, dstack_kms=stack.dstack_kms,
                                  simulated_tdx_dir=stack_dir / "simulated-tdx", bwrap=shutil.which("bwrap"),
                                  hidden=[stack_dir, state_dir])
    if not backend.isolation.isolated:
        print(f"warning: study runs are {backend.isolation.description}", file=sys.stderr, flush=True)
    try:
        chain = Chain(stack.rpc_url)
    except ChainError as down:
        print(f"error: {down}", file=sys.stderr)
        return 2
    with chain:
        config = ApiConfig(state_dir=state_dir, public_url=f"http://{args.host}:{args.port}",
                           study=DstackApp(chain, stack.dstack_app), proposer=proposer, backend=backend,
                           max_upload_bytes=args.max_upload_bytes)
        uvicorn.run(create_app(config), host=args.host, port=args.port, log_level="warning")
    return 0
