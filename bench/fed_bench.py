"""Federated round: our attested aggregator against Flower's SecAgg+, per round, on the same update sizes.

    .venv/bin/python -m bench.fed_bench [--parameters 1000000] [--ours 10,100,1000] [--secagg 10,100]

Ours: ``run_round`` with full validation (signature recovery, eligibility, round, parent, replay, NaN/Inf,
norm), anomaly scores, the aggregator, and DP noise on (the contract's "opacus" source; the cost of the
"opendp" source on the same model is measured separately). Site work (clip + sign) is timed too. The
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
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
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


def make_updates(count: int, size: int, parent_digest: str, rng: np.random.Generator):
    """Simulated sites: a shared direction plus noise, clipped and signed. Returns (updates, site seconds)."""
    direction = rng.standard_normal(size, dtype=np.float32)
    direction *= 0.5 / np.linalg.norm(direction)
    updates, site_seconds = [], 0.0
    for index in range(count):
        delta = direction + rng.standard_normal(size, dtype=np.float32) * np.float32(0.5 / np.sqrt(size))
        start = time.perf_counter()
        clipped = clip(delta, CLIP_NORM)
        updates.append(sign_update(site_key(index), round_number=1, parent_digest=parent_digest,
                                   num_examples=EXAMPLES_PER_SITE, vector=clipped))
        site_seconds += time.perf_counter() - start
        del delta, clipped
    return updates, site_seconds


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


def bench_ours(count: int, size: int, breakdown: bool) -> dict:
    parent = np.zeros(size, dtype=np.float32)
    parent_digest = vector_digest(parent)
    updates, site_seconds = make_updates(count, size, parent_digest, np.random.default_rng(count))
    result = {"updates": count, "parameters": size, "update_bytes": count * size * 4,
              "site_clip_and_sign_s_per_site": site_seconds / count}
    for aggregator in ("fedavg", "trimmed_mean"):
        contract = contract_for(count, parent_digest, aggregator)
        (_, record, _), seconds = timed(run_round, contract, parent, updates, now=1, accountant_state=AccountantState())
        assert len(record.joined) == count and not record.rejected
        result[aggregator] = {"round_s": seconds, "round_plus_sites_s": seconds + site_seconds,
                              "flagged": len(record.flagged)}
        print(f"  ours {aggregator:<13} {count:>5} × {size:,}: {seconds:7.2f} s per round "
              f"(+ sites' clip+sign {site_seconds:.2f} s in total)", flush=True)
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
    summary = clock.summary() | {"clients": count, "parameters": size, "num_shares": num_shares,
                                 "threshold": threshold, "max_abs_error_vs_plain_mean": error}
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

    ours = {count: bench_ours(count, size, breakdown=count == 100) for count in args.ours}
    secagg = {graph: {count: bench_secaggplus(count, size, graph) for count in args.secagg} for graph in GRAPHS}
    opendp_s = None if args.skip_opendp else bench_opendp_noise(size)

    comparison = {}
    print("\nPer round, total work. Ours: the aggregator's round (ours_round) and that plus every site's clip+sign "
          "(ours_total). SecAgg+: clients + server.")
    for count in args.ours:
        row = {"ours_round_s": {a: ours[count][a]["round_s"] for a in ("fedavg", "trimmed_mean")},
               "ours_total_s": {a: ours[count][a]["round_plus_sites_s"] for a in ("fedavg", "trimmed_mean")}}
        if opendp_s is not None:  # the "opendp" source replaces the ~0.2 s Opacus draw with OpenDP's sampler
            row["ours_fedavg_round_with_opendp_noise_s"] = ours[count]["fedavg"]["round_s"] + opendp_s
        for graph, measured in secagg.items():
            largest = measured[max(measured)]
            secagg_s = measured[count]["total_work_s"] if count in measured else extrapolated(largest, count, graph)
            row[graph] = {
                "secaggplus_total_work_s": secagg_s,
                "measured": count in measured,
                "ratio_over_ours_fedavg_round": secagg_s / row["ours_round_s"]["fedavg"],
                "ratio_over_ours_fedavg_total": secagg_s / row["ours_total_s"]["fedavg"],
                "ratio_over_ours_trimmed_mean_total": secagg_s / row["ours_total_s"]["trimmed_mean"],
            }
            label = "measured" if count in measured else f"EXTRAPOLATED from {largest['clients']}"
            print(f"  {count:>5} updates, SecAgg+ {graph:<10} {secagg_s:8.2f} s ({label}): "
                  f"÷ ours FedAvg round {row['ours_round_s']['fedavg']:.2f} s = "
                  f"{row[graph]['ratio_over_ours_fedavg_round']:5.1f}×, ÷ ours FedAvg total "
                  f"{row['ours_total_s']['fedavg']:.2f} s = {row[graph]['ratio_over_ours_fedavg_total']:5.1f}×, "
                  f"÷ ours trimmed-mean total {row['ours_total_s']['trimmed_mean']:.2f} s = "
                  f"{row[graph]['ratio_over_ours_trimmed_mean_total']:5.1f}×")
        comparison[count] = row
    if 100 in comparison:
        print("  target: ours ≥ 20× faster at 100 × 1M; FedAvg round: "
              + ", ".join(f"{g} {comparison[100][g]['ratio_over_ours_fedavg_round']:.1f}×" for g in GRAPHS))

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
