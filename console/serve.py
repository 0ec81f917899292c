"""`python -m console`: serve the owners' console for the local stack (loopback only)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import uvicorn

from compose.stack_file import StackDescription, StackError, read_keystore
from console.app import ConsoleConfig, create_app
from contracts.chain import ChainError, DstackApp

RELAYER_PASSWORD_ENV = "SEALROOM_CONSOLE_RELAYER_PASSWORD"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m console", description="Serve the owners' approval console.")
    parser.add_argument("--stack-state-dir", type=Path, required=True, help="the local stack's state folder")
    parser.add_argument("--composes-dir", type=Path, help="stored app-compose.json files (default: "
                        "STACK_STATE_DIR/api/composes)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--relayer-keystore", type=Path,
                        help=f"funded account that relays owners' signed approvals; password in ${RELAYER_PASSWORD_ENV}")
    args = parser.parse_args(argv)
    stack_dir = args.stack_state_dir.resolve()
    password = os.environ.pop(RELAYER_PASSWORD_ENV, None)
    try:
        stack = StackDescription.load(stack_dir)
        relayer = read_keystore(args.relayer_keystore, password or "") if args.relayer_keystore else None
    except (StackError, OSError, ValueError) as unusable:
        print(f"error: {unusable}", file=sys.stderr)
        return 2
    try:
        chain = stack.connect()
    except ChainError as down:
        print(f"error: {down}", file=sys.stderr)
        return 2
    with chain:
        config = ConsoleConfig(study=DstackApp(chain, stack.dstack_app),
                               composes_dir=(args.composes_dir or stack_dir / "api" / "composes").resolve(),
                               owner_names={o.address: o.name for o in stack.owners}, relayer=relayer)
        uvicorn.run(create_app(config), host=args.host, port=args.port, log_level="warning")
    return 0
