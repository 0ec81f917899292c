"""Federated round: our attested aggregator against Flower's SecAgg+, per round, on the same update sizes.

    .venv/bin/python -m bench.fed_bench [--parameters 1000000] [--ours 10,100,1000] [--secagg 10,100]

Ours: ``run_round`` with full validation (signature recovery, eligibility, round, parent, replay, NaN/Inf,
norm), anomaly scores, the aggregator, and DP noise on (the contract's "opacus" source; the cost of the
"opendp" source on the same model is measured separately). Site work is timed too: clip, sign, verify the
aggregator's (SIMULATED) quote, frame and seal the update to its key; and the aggregator's opening of each. The
1,000 updates of 1M float32 are 4 GB; they are held once in memory and the aggregators read them in
32 MB column blocks (no stacked copy).

SecAgg+: Flower's own client code (the four stages of ``flwr.client.mod.secaggplus_mod``: key
generation, Shamir shares of the mask seed and key, encrypted share exchange, quantisation, the
private and pairwise PRG masks, serialisation) and its primitives on the server (share forwarding,
summing the masked vectors, Shamir reconstruction, mask removal, dequantisation) in the order
``SecAggPlusWorkflow`` runs them, in one process, no network. Configuration: num_shares=3,
reconstruction_threshold=2 (each client masks with 2 neighbours, the cheapest SecAgg+ graph: this favours
SecAgg+), no dropouts (also the cheapest case), Flower's default quantisation. Reported per round: total
work (clients + server, all on this machine) and the critical path (slowest client per stage + server).
Client counts not measured are extrapolated linearly from the largest one measured (with a fixed
neighbour count every client's work is constant and the server's is linear in the clients) and marked so.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import platform
import random
import tempfile
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from eth_keys import keys
from flwr.app import ConfigRecord
from flwr.client.mod.secure_aggregation.secaggplus_mod import (
    SecAggPlusState,
    _collect_masked_vectors,
    _setup,
    _share_keys,
    _unmask,
)
from flwr.common import bytes_to_ndarray, ndarrays_to_parameters
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.ndarrays_arithmetic import (
    factor_extract,
    get_parameters_shape,
    parameters_addition,
    parameters_mod,
    parameters_subtraction,
)
from flwr.common.secure_aggregation.quantization import dequantize
from flwr.common.secure_aggregation.secaggplus_constants import Key
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen

from cvm.aggregator import aggregator_report_data, update_from_bytes, update_to_bytes
from cvm.attest.simulated import SimulatedTdx
from cvm.attest.verify import verify_quote
from cvm.federated import (
    AccountantState,
    OpenDPGaussian,
    RoundContract,
    clip,
    run_round,
    sign_update,
    vector_digest,
)
from cvm.federated.robust import score_updates
from cvm.federated.strategies import fedavg, trimmed_mean
from cvm.federated.validation import validate_updates
from kms_client.box import open_bytes, raw_public, seal_to_bytes

CLIP_NORM = 1.0
EXAMPLES_PER_SITE = 100
# Flower's SecAggPlusWorkflow defaults for quantisation and weights.
QUANTISATION = {"clipping_range": 8.0, "quantization_range": 2**22, "modulus_range": 2**32, "max_weight": 1000.0}


def minimal_graph(clients: int) -> tuple[int, int]:
    """(num_shares, threshold) = (3, 2): two neighbours per client, the cheapest SecAgg+ graph."""
    return 3, 2


def log_degree_graph(clients: int) -> tuple[int, int]:
    """num_shares = 2⌈log₂ n⌉ + 1 (odd, as the workflow wants), threshold = half of it rounded up: the
    O(log n) neighbourhood SecAgg+ (Bell et al. 2020) calls for; capped at n."""
    shares = min(clients, 2 * math.ceil(math.log2(clients)) + 1)
    return shares, max(2, (shares + 1) // 2)


GRAPHS = {"minimal_k3": minimal_graph, "log_degree": log_degree_graph}


# ----------------------------------------------------------------------------------------- ours


def site_key(index: int) -> bytes:
    return (index + 1).to_bytes(32, "big")  # bench-only keys


@dataclass
class Aggregator:
    """The attested aggregator the sites talk to: its update key and its SIMULATED quote (as GET /attestation)."""

    key: X25519PrivateKey
    quote: bytes
    root_der: bytes
    box_context: bytes

    @classmethod
    def create(cls, directory: Path) -> Aggregator:
        key = X25519PrivateKey.generate()
        tdx = SimulatedTdx.load_or_create(directory)
        report_data = aggregator_report_data(b"\x07" * 32, raw_public(key))
        return cls(key, tdx.make_quote(report_data, rtmr3=bytes(48)), tdx.root_der, b"bench-round-1")


@dataclass
class SiteTimes:
    clip_and_sign_s: float = 0.0
    protect_s: float = 0.0     # site side: verify the aggregator's quote, frame, seal to its key
    open_s: float = 0.0        # aggregator side: open the box, parse the update


def make_updates(count: int, size: int, parent_digest: str, rng: np.random.Generator, aggregator: Aggregator):
    """Simulated sites: a shared direction plus noise, clipped and signed; each site verifies the aggregator's
    quote, frames its update and seals it to the attested key; the aggregator opens and parses each one, as
    ``seal site train`` and ``POST /update`` do (minus the loopback HTTP). Returns (received updates, times)."""
    direction = rng.standard_normal(size, dtype=np.float32)
    direction *= 0.5 / np.linalg.norm(direction)
    received, times = [], SiteTimes()
    public = raw_public(aggregator.key)
    for index in range(count):
        delta = direction + rng.standard_normal(size, dtype=np.float32) * np.float32(0.5 / np.sqrt(size))
        start = time.perf_counter()
        clipped = clip(delta, CLIP_NORM)
        update = sign_update(site_key(index), round_number=1, parent_digest=parent_digest,
                             num_examples=EXAMPLES_PER_SITE, vector=clipped)
        signed = time.perf_counter()
        verify_quote(aggregator.quote, now=int(time.time()), allow_simulated=True,
                     simulated_root_der=aggregator.root_der)
        body = seal_to_bytes(update_to_bytes(update), nonce=aggregator.box_context, cvm_pub=public)
        sealed = time.perf_counter()
        plaintext = open_bytes(body, nonce=aggregator.box_context, cvm_key=aggregator.key)
        received.append(update_from_bytes(plaintext))
        opened = time.perf_counter()
        times.clip_and_sign_s += signed - start
        times.protect_s += sealed - signed
        times.open_s += opened - sealed
        del delta, clipped, update, body, plaintext
    return received, times


def contract_for(count: int, parent_digest: str, aggregator: str) -> RoundContract:
    sites = [keys.PrivateKey(site_key(i)).public_key.to_checksum_address() for i in range(count)]
    return RoundContract(
        round=1, parent_digest=parent_digest, eligible_sites=sites, local_epochs=1, local_batch_size=32,
        clip_norm=CLIP_NORM, noise_multiplier=1.0, noise="opacus", aggregator=aggregator,
        trim_fraction=0.1 if aggregator == "trimmed_mean" else None, min_participants=count, deadline=0,
        epsilon_per_round=10.0, epsilon_total=10.0, delta=1e-5,
    )


def timed(function, *args, **kwargs):
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start


def bench_ours(count: int, size: int, breakdown: bool, aggregator: Aggregator) -> dict:
    parent = np.zeros(size, dtype=np.float32)
    parent_digest = vector_digest(parent)
    updates, times = make_updates(count, size, parent_digest, np.random.default_rng(count), aggregator)
    sites_s = times.clip_and_sign_s + times.protect_s
    result = {"updates": count, "parameters": size, "update_bytes": count * size * 4,
              "site_clip_and_sign_s_per_site": times.clip_and_sign_s / count,
              "site_attest_and_seal_s_per_site": times.protect_s / count,
              "aggregator_open_s_per_update": times.open_s / count,
              "protection_s": times.protect_s + times.open_s}
    for aggregator_name in ("fedavg", "trimmed_mean"):
        contract = contract_for(count, parent_digest, aggregator_name)
        (_, record, _), seconds = timed(run_round, contract, parent, updates, now=1, accountant_state=AccountantState())
        assert len(record.joined) == count and not record.rejected
        result[aggregator_name] = {"round_s": seconds, "total_s": seconds + times.open_s + sites_s,
                                   "flagged": len(record.flagged)}
        print(f"  ours {aggregator_name:<13} {count:>5} × {size:,}: {seconds:7.2f} s per round + opening the "
              f"updates {times.open_s:.2f} s + sites' clip, sign, attest, seal {sites_s:.2f} s = "
              f"{result[aggregator_name]['total_s']:.2f} s total work", flush=True)
    if breakdown:
        contract = contract_for(count, parent_digest, "fedavg")
        validation, validate_s = timed(validate_updates, contract, updates, num_parameters=size)
        _, scores_s = timed(score_updates, validation.accepted)
        aggregate, fedavg_s = timed(fedavg, validation.accepted)
        _, trimmed_s = timed(trimmed_mean, validation.accepted, 0.1)
        result["breakdown_s"] = {"validate": validate_s, "anomaly_scores": scores_s, "fedavg": fedavg_s,
                                 "trimmed_mean": trimmed_s}
        print(f"    breakdown: validate {validate_s:.2f} s, anomaly scores {scores_s:.2f} s, "
              f"fedavg {fedavg_s:.2f} s, trimmed mean {trimmed_s:.2f} s", flush=True)
    del updates
    gc.collect()
    return result


def bench_opendp_noise(size: int) -> float:
    vector = np.zeros(size, dtype=np.float32)
    _, seconds = timed(OpenDPGaussian().add, vector, l2_sensitivity=CLIP_NORM / 100, noise_multiplier=1.0)
    print(f"  OpenDP Gaussian noise on {size:,} float32: {seconds:.1f} s", flush=True)
    return seconds


# ----------------------------------------------------------------------------------------- SecAgg+


class StageClock:
    """Per-stage client times (for the sum and the slowest client) and server time."""

    def __init__(self) -> None:
        self.client: dict[str, list[float]] = {}
        self.server = 0.0

    def run_client(self, stage: str, function, *args):
        result, seconds = timed(function, *args)
        self.client.setdefault(stage, []).append(seconds)
        return result

    def run_server(self, function, *args):
        result, seconds = timed(function, *args)
        self.server += seconds
        return result

    def summary(self) -> dict:
        client_total = sum(sum(times) for times in self.client.values())
        slowest = sum(max(times) for times in self.client.values())
        return {"clients_total_s": client_total, "server_s": self.server, "total_work_s": client_total + self.server,
                "critical_path_s": slowest + self.server,
                "client_s_per_stage_mean": {k: sum(v) / len(v) for k, v in self.client.items()}}


def secaggplus_round(vectors: list[np.ndarray], num_shares: int, threshold: int, clock: StageClock) -> np.ndarray:
    """One SecAgg+ round over ``vectors`` (FedAvg weights all equal); returns the unmasked weighted mean."""
    count = len(vectors)
    node_ids = list(range(1, count + 1))
    shuffled = node_ids.copy()
    random.Random(0).shuffle(shuffled)
    half = num_shares >> 1  # neighbours on a ring, as SecAggPlusWorkflow.setup_stage builds them
    neighbours = {nid: {shuffled[(i + o) % count] for o in range(-half, half + 1)} for i, nid in enumerate(shuffled)}
    states = {}
    for nid in node_ids:
        states[nid] = SecAggPlusState()
        states[nid].nid = nid

    setup = {Key.SAMPLE_NUMBER: count, Key.SHARE_NUMBER: num_shares, Key.THRESHOLD: threshold,
             Key.CLIPPING_RANGE: QUANTISATION["clipping_range"], Key.TARGET_RANGE: QUANTISATION["quantization_range"],
             Key.MOD_RANGE: QUANTISATION["modulus_range"], Key.MAX_WEIGHT: QUANTISATION["max_weight"]}
    public_keys = {}
    for nid in node_ids:  # stage 0: key pairs
        reply = clock.run_client("setup", _setup, states[nid], ConfigRecord(dict(setup)))
        public_keys[nid] = [reply[Key.PUBLIC_KEY_1], reply[Key.PUBLIC_KEY_2]]

    forwarded: dict[int, list[tuple[int, bytes]]] = {nid: [] for nid in node_ids}
    for nid in node_ids:  # stage 1: Shamir shares, encrypted to each neighbour, forwarded by the server
        config = ConfigRecord({str(peer): public_keys[peer] for peer in neighbours[nid]})
        reply = clock.run_client("share_keys", _share_keys, states[nid], config)
        clock.run_server(lambda: [forwarded[dst].append((nid, ct)) for dst, ct in
                                  zip(reply[Key.DESTINATION_LIST], reply[Key.CIPHERTEXT_LIST])])

    masked = None
    for nid, vector in zip(node_ids, vectors):  # stage 2: quantise, mask, send
        config = ConfigRecord({Key.CIPHERTEXT_LIST: [ct for _, ct in forwarded[nid]],
                               Key.SOURCE_LIST: [src for src, _ in forwarded[nid]]})
        reply = clock.run_client("collect_masked_vectors", _collect_masked_vectors, states[nid],
                                 config, EXAMPLES_PER_SITE, ndarrays_to_parameters([vector]))

        def add(reply=reply):
            arrays = [bytes_to_ndarray(b) for b in reply[Key.MASKED_PARAMETERS]]
            return arrays if masked is None else parameters_addition(masked, arrays)

        masked = clock.run_server(add)
    masked = clock.run_server(parameters_mod, masked, QUANTISATION["modulus_range"])

    shares: dict[int, list[bytes]] = {nid: [] for nid in node_ids}
    for nid in node_ids:  # stage 3: shares of the mask seeds of the (all active) neighbours
        config = ConfigRecord({Key.ACTIVE_NODE_ID_LIST: sorted(neighbours[nid]), Key.DEAD_NODE_ID_LIST: []})
        reply = clock.run_client("unmask", _unmask, states[nid], config)
        for owner, share in zip(reply[Key.NODE_ID_LIST], reply[Key.SHARE_LIST]):
            shares[owner].append(share)

    def unmask(masked):
        for nid in node_ids:
            seed = combine_shares(shares[nid])
            masked = parameters_subtraction(
                masked, pseudo_rand_gen(seed, QUANTISATION["modulus_range"], get_parameters_shape(masked)))
        masked = parameters_mod(masked, QUANTISATION["modulus_range"])
        total_ratio, quantised = factor_extract(masked)
        (summed,) = dequantize(quantised, QUANTISATION["clipping_range"], QUANTISATION["quantization_range"])
        summed += -(count - 1) * QUANTISATION["clipping_range"]
        return summed * (QUANTISATION["quantization_range"] / total_ratio)

    return clock.run_server(unmask, masked)


def bench_secaggplus(count: int, size: int, graph: str) -> dict:
    num_shares, threshold = GRAPHS[graph](count)
    rng = np.random.default_rng(count)
    vectors = [(rng.standard_normal(size, dtype=np.float32) * np.float32(0.5 / np.sqrt(size))) for _ in range(count)]
    clock = StageClock()
    aggregate = secaggplus_round(vectors, num_shares, threshold, clock)
    error = float(np.max(np.abs(aggregate - np.mean(vectors, axis=0, dtype=np.float64))))
    assert error < 1e-3, f"SecAgg+ result is off by {error}"
    plain_s = timed(np.mean, vectors, axis=0, dtype=np.float64)[1]   # the same sum, unprotected
    summary = clock.summary() | {"plain_mean_s": plain_s, "clients": count, "parameters": size,
                                 "num_shares": num_shares, "threshold": threshold,
                                 "max_abs_error_vs_plain_mean": error}
    print(f"  SecAgg+ {graph:<10} (k={num_shares:>2}) {count:>5} × {size:,}: {summary['total_work_s']:7.2f} s total "
          f"work (clients {summary['clients_total_s']:.2f} s, server {summary['server_s']:.2f} s), critical path "
          f"{summary['critical_path_s']:.2f} s", flush=True)
    return summary


def extrapolated(measured: dict, count: int, graph: str) -> float:
    """Total work at ``count`` clients from a measurement at fewer: each client's work grows with its share
    count k (one PRG mask per neighbour), the server's linearly with the clients."""
    k_measured, _ = GRAPHS[graph](measured["clients"])
    k_target, _ = GRAPHS[graph](count)
    scale = count / measured["clients"]
    return measured["clients_total_s"] * scale * (k_target + 1) / (k_measured + 1) + measured["server_s"] * scale


# ----------------------------------------------------------------------------------------- main


def counts(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--parameters", type=int, default=1_000_000)
    parser.add_argument("--ours", type=counts, default=[10, 100, 1000])
    parser.add_argument("--secagg", type=counts, default=[10, 100])
    parser.add_argument("--skip-opendp", action="store_true", help="skip the OpenDP noise timing (~30 s per 1M)")
    args = parser.parse_args()
    size = args.parameters
    logging.getLogger("flwr").setLevel(logging.WARNING)  # Flower logs every client stage at DEBUG by default
    print(f"Federated round bench: {size:,} float32 parameters per update, SIMULATED sites and CVM, "
          f"{platform.machine()}, {os.cpu_count()} shared cores")

    with tempfile.TemporaryDirectory() as directory:
        aggregator = Aggregator.create(Path(directory))
    ours = {count: bench_ours(count, size, count == 100, aggregator) for count in args.ours}
    secagg = {graph: {count: bench_secaggplus(count, size, graph) for count in args.secagg} for graph in GRAPHS}
    opendp_s = None if args.skip_opendp else bench_opendp_noise(size)

    comparison = {}
    print("\nPer round, total work on this machine. Ours: every site's clip, sign, attest and seal + the aggregator "
          "opening the updates + its round (validation, anomaly scores, aggregate, DP noise). SecAgg+: clients + "
          "server. Protection only: ours = attest + frame + seal + open; SecAgg+ = its total minus a plain mean.")
    for count in args.ours:
        row = {"ours_total_s": {a: ours[count][a]["total_s"] for a in ("fedavg", "trimmed_mean")},
               "ours_protection_s": ours[count]["protection_s"]}
        if opendp_s is not None:  # the "opendp" source replaces the ~0.2 s Opacus draw with OpenDP's sampler
            row["ours_fedavg_total_with_opendp_noise_s"] = ours[count]["fedavg"]["total_s"] + opendp_s
        for graph, measured in secagg.items():
            largest = measured[max(measured)]
            if count in measured:
                secagg_s, plain_s = measured[count]["total_work_s"], measured[count]["plain_mean_s"]
            else:
                secagg_s = extrapolated(largest, count, graph)
                plain_s = largest["plain_mean_s"] * count / largest["clients"]
            row[graph] = {
                "secaggplus_total_work_s": secagg_s,
                "secaggplus_protection_s": secagg_s - plain_s,
                "measured": count in measured,
                "ratio_over_ours_fedavg_total": secagg_s / row["ours_total_s"]["fedavg"],
                "ratio_over_ours_trimmed_mean_total": secagg_s / row["ours_total_s"]["trimmed_mean"],
                "protection_ratio": (secagg_s - plain_s) / row["ours_protection_s"],
            }
            label = "measured" if count in measured else f"EXTRAPOLATED from {largest['clients']}"
            r = row[graph]
            print(f"  {count:>5} updates, SecAgg+ {graph:<10} {secagg_s:8.2f} s ({label}): ÷ ours FedAvg "
                  f"{row['ours_total_s']['fedavg']:.2f} s = {r['ratio_over_ours_fedavg_total']:5.1f}×, ÷ ours "
                  f"trimmed mean {row['ours_total_s']['trimmed_mean']:.2f} s = "
                  f"{r['ratio_over_ours_trimmed_mean_total']:5.1f}×; protection only {secagg_s - plain_s:.2f} s "
                  f"÷ {row['ours_protection_s']:.2f} s = {r['protection_ratio']:5.1f}×")
        comparison[count] = row
    if 100 in comparison:
        print("  target: ours ≥ 20× faster at 100 × 1M. Whole round (FedAvg): "
              + ", ".join(f"{g} {comparison[100][g]['ratio_over_ours_fedavg_total']:.1f}×" for g in GRAPHS)
              + "; protection only: "
              + ", ".join(f"{g} {comparison[100][g]['protection_ratio']:.1f}×" for g in GRAPHS))

    result = {"parameters": size, "versions": {p: version(p) for p in ("flwr", "opendp", "opacus", "numpy", "torch")},
              "secaggplus_quantisation": QUANTISATION,
              "secaggplus_graphs": {g: GRAPHS[g].__doc__ for g in GRAPHS},
              "noise": "opacus (contract noise='opacus')", "opendp_noise_s": opendp_s,
              "ours": ours, "secaggplus": secagg, "comparison": comparison, "simulated": True}
    out = Path("bench/out")
    out.mkdir(parents=True, exist_ok=True)
    (out / "fed_bench.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out / 'fed_bench.json'}")


if __name__ == "__main__":
    main()
