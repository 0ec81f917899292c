"""`python -m kms`: run the KMS service on loopback (see kms.server)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import uvicorn
from eth_account import Account

from compose.safe_parse import restore_recursion_limit
from contracts.chain import Chain, ChainError, DstackKms
from cvm.attest.os_image import OS_IMAGES_DIR, OsImageRegistry
from kms.releases import RELEASES_DIR, ReleaseJournal
from kms.root_store import RootStoreError, load_or_create_root
from kms.server import create_app
from kms.service import TEST_CRASH_AFTER_SPEND_ENV, KeyManagementService


def main(argv: list[str] | None = None) -> None:
    restore_recursion_limit()  # eth_account's py_ecc raised it: JSON nested deep must fail, not overflow the stack
    parser = argparse.ArgumentParser(prog="python -m kms", description=__doc__)
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--rpc-url", required=True)
    parser.add_argument("--dstack-kms", required=True, help="DstackKms contract address")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--signer-keystore", type=Path, help="keystore of the account that records budget spends")
    parser.add_argument("--dev", action="store_true", help="accept SIMULATED quotes (never in production)")
    parser.add_argument("--simulated-root", type=Path, help="DER of the simulated TDX root to pin (dev mode)")
    parser.add_argument("--confirmations", type=int, default=0,
                        help="blocks on top before a transaction counts; chain state is read at latest - N")
    args = parser.parse_args(argv)

    passphrase = os.environ.get("SEALROOM_KMS_PASSPHRASE")
    if not passphrase:
        sys.exit("kms: error: set SEALROOM_KMS_PASSPHRASE (it encrypts the root keys at rest)")
    try:
        root = load_or_create_root(args.state_dir, passphrase.encode())
        if args.confirmations < 0:
            sys.exit("kms: error: --confirmations must be 0 or more")
        chain = Chain(args.rpc_url, confirmations=args.confirmations,
                      tx_timeout_s=30.0 if args.confirmations == 0 else 300.0)
    except (RootStoreError, ChainError) as exc:
        sys.exit(f"kms: error: {exc}")
    signer = None
    if args.signer_keystore:
        password = os.environ.get("SEALROOM_KMS_SIGNER_PASSWORD", "")
        try:
            signer = Account.from_key(Account.decrypt(json.loads(args.signer_keystore.read_text()), password))
        except (OSError, ValueError) as exc:
            sys.exit(f"kms: error: cannot open the signer keystore: {type(exc).__name__}")
    if args.dev and not args.simulated_root:
        sys.exit("kms: error: --dev needs --simulated-root (the simulated TDX root to pin)")
    service = KeyManagementService(
        root=root, chain=chain, registry=DstackKms(chain, args.dstack_kms), dev_mode=args.dev,
        simulated_root_der=args.simulated_root.read_bytes() if args.simulated_root else None, signer=signer,
        os_images=OsImageRegistry(args.state_dir / OS_IMAGES_DIR),   # the OS images it serves (seal os register)
        confirmations=args.confirmations,
        releases=ReleaseJournal(args.state_dir / RELEASES_DIR),   # a release request survives a restart
        test_crash_after_spend=os.environ.get(TEST_CRASH_AFTER_SPEND_ENV) == "1",   # test fault injection only
    )
    uvicorn.run(create_app(service), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
