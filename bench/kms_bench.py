"""KMS key release: GetAppKey latency (p50/p99), releases per second, and where the time goes.

    .venv/bin/python -m bench.kms_bench [--releases 300] [--threads 4]

Runs against a real local stack (anvil + the KMS service over HTTP). A release here is the whole protocol as a CVM
sees it: GetNonce, a fresh SIMULATED quote, GetAppKey, opening the box and checking the KMS signature. The split of
the KMS's own work is measured in-process on the same evidence: quote verification, event-log replay, the OS image
gate (MRTD and RTMR0-2 against the registered record), chain call.
Targets: p50 ≤ 20 ms, ≥ 100 releases/s on 2 cores.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from compose.stack_file import read_keystore
from contracts.chain import DstackApp, DstackKms
from cvm.agent_sim.agent import GuestAgentSimulator
from cvm.attest.eventlog import replay_event_log
from cvm.attest.os_image import OS_IMAGES_DIR, OsImageRegistry
from cvm.attest.verify import verify_quote
from kms.service import _boot_info
from kms_client.box import attestation_report_data
from kms_client.client import KmsClient
from sealing_cli.stack import LocalStack

RECIPE_COMPOSE = b'{"name":"kms-bench"}'
RECIPE = hashlib.sha256(RECIPE_COMPOSE).digest()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--releases", type=int, default=300)
    parser.add_argument("--threads", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, LocalStack(Path(tmp), owner_names=("A", "B"), threshold=2) as stack:
        d = stack.description
        app = DstackApp(stack.chain, d.dstack_app)
        owners = [read_keystore(o.keystore, d.dev_keystore_password) for o in d.owners]
        app.propose(RECIPE, "", owners[0])
        for owner in owners:
            app.approve(RECIPE, owner)
        app_id = bytes.fromhex(d.dstack_app[2:])
        url = d.services["kms"]["url"]
        root = bytes.fromhex(KmsClient(url).meta().k256_pubkey)
        # The CVM measures this KMS as its key provider and boots the stack's registered simulated OS image.
        machine = GuestAgentSimulator.measure_boot(RECIPE_COMPOSE, app_id, root, stack.state_dir / "simulated-tdx")

        def release(client: KmsClient) -> float:
            start = time.perf_counter()
            client.get_app_key(machine.attest, app_id=app_id, pinned_root_pubkey=root)
            return time.perf_counter() - start

        with KmsClient(url) as client:
            for _ in range(20):
                release(client)  # warm-up: connections, caches
            latencies = [release(client) for _ in range(args.releases)]

        clients = [KmsClient(url) for _ in range(args.threads)]
        start = time.perf_counter()
        with ThreadPoolExecutor(args.threads) as pool:
            list(pool.map(lambda i: release(clients[i % args.threads]), range(args.releases)))
        throughput = args.releases / (time.perf_counter() - start)
        for c in clients:
            c.close()

        # In-process split of the KMS's checks on one piece of evidence.
        sim_root = (stack.state_dir / "simulated-tdx" / "root.der").read_bytes()
        registry = DstackKms(stack.chain, d.dstack_kms)
        quote, log = machine.attest(attestation_report_data(b"\x01" * 32, b"\x02" * 32))
        n = 200
        t0 = time.perf_counter()
        for _ in range(n):
            claims = verify_quote(quote, now=int(time.time()), allow_simulated=True, simulated_root_der=sim_root)
        t1 = time.perf_counter()
        for _ in range(n):
            replay_event_log(log, claims.rtmr3)
        t2 = time.perf_counter()
        from cvm.attest.verify import verify_attestation

        verified = verify_attestation(quote, log, now=int(time.time()), allow_simulated=True,
                                      simulated_root_der=sim_root)
        for _ in range(n):
            registry.is_app_allowed(_boot_info(verified))
        t3 = time.perf_counter()
        os_images = OsImageRegistry(stack.state_dir / "kms" / OS_IMAGES_DIR)   # the folder the KMS reads
        for _ in range(n):
            os_images.gate(verified.os_image_hash, verified.claims)
        t4 = time.perf_counter()

    p50, p99 = percentile(latencies, 0.5) * 1e3, percentile(latencies, 0.99) * 1e3
    split = {"quote_verification_ms": (t1 - t0) / n * 1e3, "event_log_replay_ms": (t2 - t1) / n * 1e3,
             "chain_call_ms": (t3 - t2) / n * 1e3, "os_image_gate_ms": (t4 - t3) / n * 1e3}
    result = {"releases": args.releases, "p50_ms": p50, "p99_ms": p99, "mean_ms": statistics.mean(latencies) * 1e3,
              "releases_per_s": throughput, "threads": args.threads, **split,
              "share_of_p50": {k: v / p50 for k, v in split.items()}, "quotes": "SIMULATED"}
    print("KMS GetAppKey (SIMULATED quotes, anvil chain, HTTP on loopback)")
    print(f"  latency p50 {p50:.2f} ms   p99 {p99:.2f} ms   (target p50 ≤ 20 ms: ratio {p50 / 20:.2f})")
    print(f"  throughput {throughput:.0f} releases/s with {args.threads} client threads (target ≥ 100: ratio "
          f"{throughput / 100:.2f})")
    for name, ms in split.items():
        print(f"  {name:<24} {ms:6.2f} ms  ({ms / p50:5.1%} of p50)")
    out = Path("bench/out")
    out.mkdir(parents=True, exist_ok=True)
    (out / "kms_bench.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
