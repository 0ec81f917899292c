"""``python -m compose.api``: serve the analysts' API for the local stack (runs on SIMULATED TDX)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import uvicorn

from compose.api.app import DEFAULT_MAX_UPLOAD_BYTES, ApiConfig, create_app
from compose.backends.choice import BACKENDS, DEFAULT_BACKEND, backend_label, make_backend
from compose.backends.engine import EngineUnavailable, connect_engine, engine_at
from compose.image.build import default_image_dir
from compose.image.policy import ImageAllowlist
from compose.safe_parse import restore_recursion_limit
from compose.stack_file import StackDescription, StackError, read_keystore
from contracts.chain import ChainError, DstackApp

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
    parser.add_argument("--backend", choices=BACKENDS, default=DEFAULT_BACKEND,
                        help="where study CVMs run: a container of the pinned study image (default), or the "
                             "process fallback (this checkout's code on the host's Python)")
    parser.add_argument("--engine-url", help="the container engine to run on, unix://… (the stack passes the one "
                        "it started; default: one found or started for STACK_STATE_DIR, see compose.backends.engine)")
    parser.add_argument("--image-dir", type=Path, help="the study image build the container backend runs "
                        "(default: STACK_STATE_DIR/study-image)")
    parser.add_argument("--image-digest", action="append", dest="image_digests", metavar="sha256:…",
                        help="a study image digest composes may name (repeatable; default: the current study image "
                             "built in STACK_STATE_DIR/study-image, read at each submission)")
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
    try:
        images = (ImageAllowlist(args.image_digests) if args.image_digests else
                  ImageAllowlist(state_dir=stack_dir))
    except ValueError as unusable:
        print(f"error: --image-digest: {unusable}", file=sys.stderr)
        return 2
    engine = None
    if args.backend == "container":
        try:   # the stack's engine; without one named, the engine found or started here (stopped on exit)
            engine = engine_at(args.engine_url) if args.engine_url else connect_engine(stack_dir)
        except EngineUnavailable as down:
            print(f"error: NO CONTAINER ENGINE: {down}; study runs cannot start", file=sys.stderr)
            return 2
    backend = make_backend(args.backend, stack=stack, stack_dir=stack_dir, hidden=[state_dir], engine=engine,
                           image_dir=args.image_dir or default_image_dir(stack_dir), allowed_digests=args.image_digests)
    print(f"study runs: {backend_label(args.backend, backend)}", file=sys.stderr, flush=True)
    if not backend.isolation.isolated:
        print(f"warning: study runs are {backend.isolation.description}", file=sys.stderr, flush=True)
    try:
        chain = stack.connect()
    except ChainError as down:
        print(f"error: {down}", file=sys.stderr)
        return 2
    with chain:
        config = ApiConfig(state_dir=state_dir, public_url=f"http://{args.host}:{args.port}",
                           study=DstackApp(chain, stack.dstack_app), proposer=proposer, backend=backend,
                           max_upload_bytes=args.max_upload_bytes, images=images)
        try:
            uvicorn.run(create_app(config), host=args.host, port=args.port, log_level="warning")
        finally:
            if engine is not None:
                engine.close()      # the connection; and the podman service, if this process started it
    return 0
