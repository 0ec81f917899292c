"""Sealing benchmark: seal_file vs age vs `openssl speed`, peak memory, and unwrap-to-tensor.

Run: ``.venv/bin/python -m bench.seal_bench [--size-mib 1024] [--chunk-mib 4]``

In one run, in a temporary directory (deleted afterwards):

1. generate a Parquet input of about ``--size-mib`` (random and sequential numeric columns) and a
   100 MiB one, and read both once so every timing starts from the page cache;
2. time ``seal_file`` (which includes its fsync) against Debian's ``age`` encrypting the same file to
   an X25519 recipient (installed with apt-get if missing) — age does not fsync, so age + an fsync
   of its output is reported too, and the seal/age ratio is given against both; once writing to the
   disk and once to /dev/shm (tmpfs: no device, fsync is free), which isolates the CPU-bound part;
3. ``openssl speed -evp aes-256-gcm -seconds 3`` (one core, 16384-byte blocks) as the AES-GCM ceiling,
   next to single-thread SHA-256 and cryptography's own AES-GCM, which cap what sealing can reach;
4. peak RSS of sealing 100 MiB and the full size, each in a fresh child process that reports its
   own high-water mark (VmHWM), and of a child that only imports and builds keys — the floor that
   streaming adds to;
5. ``open_sealed(...).to_torch()`` against ``pyarrow.parquet.read_table(plaintext)`` → the same
   NumPy conversion → torch.

Prints a table and writes bench/out/seal_bench-<UTC time>.json. Nothing here is simulated. The load
average before and after is recorded: on a shared 2-core machine, other processes skew every timing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

MIB = 1 << 20
OUT_DIR = Path(__file__).resolve().parent / "out"
REPEATS = 3
TARGETS = {"seal/age": 4.0, "seal/openssl": 0.5, "peak_rss_mb": 64.0, "unwrap/plain read": 1.3}
APP_ID = bytes.fromhex("be7c" * 10)
COMPOSE_HASH = hashlib.sha256(b"seal_bench app-compose.json").digest()
KMS_ROOT = "0x" + "00" * 19 + "01"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024, help="input size for the timings (default 1024)")
    parser.add_argument("--chunk-mib", type=int, default=4, help="seal_file chunk size in MiB (default 4)")
    parser.add_argument("--child", nargs=3, metavar=("MODE", "INPUT", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(*args.child, chunk_size=args.chunk_mib * MIB)
        return
    results = run(args.size_mib, args.chunk_mib * MIB)
    print_table(results)
    OUT_DIR.mkdir(exist_ok=True)
    out = OUT_DIR / f"seal_bench-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nresults: {out}")


def run(size_mib: int, chunk_size: int) -> dict[str, Any]:
    import torch  # imported up front so neither unwrap timing pays for it
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from eth_keys import keys

    from cvm.sealed.dataset import open_sealed, seal_file
    from cvm.sealed.tabular import table_to_numpy

    results: dict[str, Any] = {"machine": _machine(), "chunk_size": chunk_size, "load_average_before": _load()}
    owner_key, seal_key = keys.PrivateKey(os.urandom(32)), X25519PrivateKey.generate()
    with tempfile.TemporaryDirectory(prefix="seal_bench-") as scratch:
        work = Path(scratch)
        big, small = work / "input.parquet", work / "input-100mib.parquet"
        print(f"generating {size_mib} MiB and 100 MiB Parquet inputs in {work} ...", flush=True)
        make_parquet(big, size_mib * MIB)
        make_parquet(small, 100 * MIB)
        size = results["input_bytes"] = big.stat().st_size
        _warm(big)
        recipient = age_recipient(work)

        def time_writers(out_dir: Path) -> dict[str, Any]:
            sealed = out_dir / "input.sealed"

            def seal_once() -> None:
                seal_file(big, sealed, app_id=APP_ID, compose_hash=COMPOSE_HASH, owner_key=owner_key,
                          owner_seal_pubkey=seal_key.public_key(), kms_root_address=KMS_ROOT,
                          chunk_size=chunk_size)  # fmt: skip

            print(f"timing seal_file and age writing to {out_dir} ...", flush=True)
            seal = _rate(size, _runs(seal_once, output=sealed))
            age = time_age(big, out_dir / "input.age", recipient) if isinstance(recipient, str) else recipient
            return {"seal": seal, "age": age}

        results["disk"] = time_writers(work)
        with tempfile.TemporaryDirectory(prefix="seal_bench-", dir="/dev/shm") as in_memory:
            results["tmpfs"] = time_writers(Path(in_memory))

        print("running openssl speed (3 s) ...", flush=True)
        results["openssl_aes_256_gcm_MBps"] = openssl_speed()
        results["single_core_bounds_MBps"] = single_core_bounds(chunk_size)

        print("measuring peak RSS in child processes ...", flush=True)
        results["peak_rss_mb"] = {
            "imports_and_keys_only": _child_peak_rss("imports", big, work / "unused.sealed", chunk_size),
            "seal_100MiB": _child_peak_rss("seal", small, work / "small.sealed", chunk_size),
            f"seal_{size_mib}MiB": _child_peak_rss("seal", big, work / "big.sealed", chunk_size),
        }

        print("timing unwrap-to-tensor ...", flush=True)
        sealed = work / "input.sealed"
        _warm(sealed)

        def unwrap() -> None:
            opened = open_sealed(sealed, seal_key, expected_app_id=APP_ID, expected_compose_hash=COMPOSE_HASH)
            opened.to_torch()

        def plain_read() -> None:
            import pyarrow.parquet as pq

            torch.from_numpy(table_to_numpy(pq.read_table(big)))

        plain_runs, unwrap_runs = _runs(plain_read), _runs(unwrap)
        results["unwrap_to_torch"] = {
            "open_sealed_to_torch_s": min(unwrap_runs), "read_table_to_torch_s": min(plain_runs),
            "open_sealed_runs_s": unwrap_runs, "read_table_runs_s": plain_runs,
        }  # fmt: skip

    results["load_average_after"] = _load()
    results["ratios"] = ratios(results)
    return results


def make_parquet(path: Path, target_bytes: int) -> None:
    """Write row groups of mixed numeric columns until the file reaches ``target_bytes`` (constant memory)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    generator = np.random.default_rng(20260314)  # benchmark data only; not a DP or crypto path
    rows_per_group = 1 << 20
    first_id = 0
    with pq.ParquetWriter(path, pa.schema([("id", pa.int64()), ("x", pa.float64()), ("y", pa.float32()),
                                           ("label", pa.int8())])) as writer:  # fmt: skip
        while path.stat().st_size < target_bytes:
            ids = np.arange(first_id, first_id + rows_per_group, dtype=np.int64)
            writer.write_table(pa.table({
                "id": ids,
                "x": generator.standard_normal(rows_per_group),
                "y": generator.random(rows_per_group, dtype=np.float32),
                "label": generator.integers(0, 10, rows_per_group, dtype=np.int8),
            }))  # fmt: skip
            first_id += rows_per_group


def age_recipient(work: Path) -> str | dict[str, str]:
    """An X25519 age recipient (age-keygen), installing Debian's age first if it is not on PATH."""
    if shutil.which("age") is None:
        install = subprocess.run(["apt-get", "install", "-y", "age"], capture_output=True, text=True)
        if install.returncode != 0 or shutil.which("age") is None:
            return {"error": f"age not installed: apt-get exited {install.returncode}: {install.stderr.strip()[-300:]}"}
    identity = work / "age-identity.txt"
    subprocess.run(["age-keygen", "-o", str(identity)], check=True, capture_output=True)
    keygen = subprocess.run(["age-keygen", "-y", str(identity)], check=True, capture_output=True, text=True)
    return keygen.stdout.strip()


def time_age(source: Path, out: Path, recipient: str) -> dict[str, Any]:
    """Best-of time for `age -r <recipient> -o out source`, and the fsync of its output (age does none)."""
    version = subprocess.run(["age", "--version"], capture_output=True, text=True).stdout.strip()

    def encrypt() -> None:
        subprocess.run(["age", "-r", recipient, "-o", str(out), str(source)], check=True)

    age_runs = _runs(encrypt, output=out)
    started = time.perf_counter()
    with out.open("rb+") as handle:
        os.fsync(handle.fileno())
    fsync_s = time.perf_counter() - started
    size = source.stat().st_size
    return {"version": version, **_rate(size, age_runs), "fsync_s": fsync_s,
            "with_fsync": _rate(size, [min(age_runs) + fsync_s])}  # fmt: skip


def openssl_speed() -> float | dict[str, str]:
    """MB/s (10^6 bytes) of `openssl speed -evp aes-256-gcm -seconds 3`, 16384-byte column, one core."""
    run = subprocess.run(["openssl", "speed", "-evp", "aes-256-gcm", "-seconds", "3"], capture_output=True, text=True)
    # The result line reads: AES-256-GCM  <16 B>k <64 B>k <256 B>k <1024 B>k <8192 B>k <16384 B>k (1000s of bytes/s)
    for line in run.stdout.splitlines():
        if line.upper().startswith("AES-256-GCM"):
            return float(line.split()[-1].rstrip("k")) / 1000
    return {"error": f"could not parse openssl speed output: {run.stdout[-300:]} {run.stderr[-300:]}"}


def single_core_bounds(chunk_size: int) -> dict[str, float]:
    """Single-thread MB/s of SHA-256 (hashlib) and AES-256-GCM encrypt_into (cryptography) on chunk-sized buffers."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    data = bytearray(os.urandom(chunk_size))
    out = bytearray(chunk_size + 16)
    aead = AESGCM(os.urandom(32))
    total = 512 * MIB
    rounds = max(1, total // chunk_size)
    digest = hashlib.sha256()
    sha_s = _timed(lambda: [digest.update(data) for _ in range(rounds)])
    aes_s = _timed(lambda: [aead.encrypt_into(i.to_bytes(12, "big"), data, b"", out) for i in range(rounds)])
    moved = rounds * chunk_size
    return {"sha256_MBps": moved / sha_s / 1e6, "cryptography_aes_256_gcm_MBps": moved / aes_s / 1e6}


def _child_peak_rss(mode: str, source: Path, out: Path, chunk_size: int) -> float:
    """Peak RSS in MB (10^6) of a fresh child running ``mode`` (``seal`` or ``imports``).

    The child reports its own VmHWM. ``ru_maxrss`` from ``RUSAGE_CHILDREN``/``wait4`` would not do:
    Linux carries the pre-exec high-water mark of the forked copy of this (torch-sized) parent into it.
    """
    command = [sys.executable, "-m", "bench.seal_bench", "--chunk-mib", str(chunk_size // MIB),
               "--child", mode, str(source), str(out)]  # fmt: skip
    repo = Path(__file__).resolve().parent.parent
    child = subprocess.run(command, cwd=repo, capture_output=True, text=True, check=True)
    return int(child.stdout.split()[-1]) * 1024 / 1e6  # VmHWM is in kB


def _child(mode: str, source: str, out: str, *, chunk_size: int) -> None:
    """Child process: imports only what sealing needs (no torch, no numpy), seals or not, prints VmHWM (kB)."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from eth_keys import keys

    from cvm.sealed.dataset import seal_file

    owner_key, seal_public = keys.PrivateKey(os.urandom(32)), X25519PrivateKey.generate().public_key()
    if mode == "seal":
        seal_file(source, out, app_id=APP_ID, compose_hash=COMPOSE_HASH, owner_key=owner_key,
                  owner_seal_pubkey=seal_public, kms_root_address=KMS_ROOT, chunk_size=chunk_size)  # fmt: skip
    elif mode == "imports":
        import pyarrow.parquet  # noqa: F401  - what inspecting a Parquet input loads
    else:
        raise ValueError(f"unknown child mode {mode!r}")
    status = Path("/proc/self/status").read_text()
    print(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))


def ratios(results: dict[str, Any]) -> dict[str, float | None]:
    openssl = results["openssl_aes_256_gcm_MBps"]
    unwrap = results["unwrap_to_torch"]
    found: dict[str, float | None] = {}
    for place in ("disk", "tmpfs"):
        seal, age = results[place]["seal"]["MBps"], results[place]["age"]
        found[f"seal/age, {place}"] = seal / age["MBps"] if "MBps" in age else None
        found[f"seal/(age+fsync), {place}"] = seal / age["with_fsync"]["MBps"] if "MBps" in age else None
        found[f"seal/openssl, {place}"] = seal / openssl if isinstance(openssl, float) else None
    found["unwrap/plain read"] = unwrap["open_sealed_to_torch_s"] / unwrap["read_table_to_torch_s"]
    return found


def print_table(results: dict[str, Any]) -> None:
    machine = results["machine"]
    print(f"\nmachine: {machine['cpu']} · {machine['cores']} cores · {machine['crypto_openssl']}")
    print(f"input: {results['input_bytes'] / MIB:.0f} MiB Parquet · chunk {results['chunk_size'] // MIB} MiB")
    before, after = results["load_average_before"], results["load_average_after"]
    print(f"load average (1/5/15 min) before {before} after {after} — other processes share the cores\n")
    rows: list[tuple[str, str]] = []
    for place, where in (("disk", "to disk (ext4)"), ("tmpfs", "to /dev/shm (tmpfs)")):
        age = results[place]["age"]
        rows.append((f"seal_file {where}, incl. fsync", _fmt_rate(results[place]["seal"])))
        if "MBps" in age:
            rows.append((f"age {age['version']} {where}", _fmt_rate(age)))
            rows.append((f"age {where} + fsync of its output", _fmt_rate(age["with_fsync"])))
        else:
            rows.append(("age", str(age["error"])))
    openssl = results["openssl_aes_256_gcm_MBps"]
    openssl_text = f"{openssl:8.0f} MB/s" if isinstance(openssl, float) else str(openssl)
    rows.append(("openssl speed aes-256-gcm, 16 KiB, 1 core", openssl_text))
    for name, value in results["single_core_bounds_MBps"].items():
        rows.append((f"bound: {name.removesuffix('_MBps')}, 1 thread", f"{value:8.0f} MB/s"))
    for name, value in results["peak_rss_mb"].items():
        rows.append((f"peak RSS, child: {name}", f"{value:8.1f} MB"))
    unwrap = results["unwrap_to_torch"]
    rows.append(("open_sealed(...).to_torch()", f"{unwrap['open_sealed_to_torch_s']:8.3f} s"))
    rows.append(("read_table(plaintext) -> torch", f"{unwrap['read_table_to_torch_s']:8.3f} s"))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    print()
    for name, value in results["ratios"].items():
        target = TARGETS.get(name.split(",")[0])
        direction = "≤" if name.startswith("unwrap") else "≥"
        goal = "" if target is None else f"  (target {direction} {target}×)"
        print(f"  {name:<{width}}  {'n/a' if value is None else f'{value:8.2f}×'}{goal}")
    print(f"  {'peak RSS target':<{width}}  ≤ {TARGETS['peak_rss_mb']:.0f} MB and flat across sizes")


def _rate(size: int, runs: list[float]) -> dict[str, Any]:
    """Throughput of the best run (the least disturbed by other processes), all runs kept."""
    return {"seconds": min(runs), "MBps": size / min(runs) / 1e6, "runs_s": [round(run, 3) for run in runs]}


def _fmt_rate(rate: dict[str, float]) -> str:
    return f"{rate['MBps']:8.0f} MB/s  (best {rate['seconds']:.3f} s of {rate['runs_s']})"


def _timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def _runs(action: Callable[[], object], output: Path | None = None) -> list[float]:
    """Time ``action`` REPEATS times; ``output`` is deleted before each run, untimed, so that no run
    pays for freeing the previous run's gigabyte (seal_file would replace it, age truncate it)."""
    runs = []
    for _ in range(REPEATS):
        if output is not None:
            output.unlink(missing_ok=True)
        runs.append(_timed(action))
    return runs


def _load() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]


def _warm(path: Path) -> None:
    """Read a file once so timings start from the page cache, as a re-run would."""
    with path.open("rb", buffering=0) as handle:
        buffer = bytearray(16 * MIB)
        while handle.readinto(buffer):
            pass


def _machine() -> dict[str, Any]:
    from cryptography.hazmat.backends.openssl.backend import backend

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())  # fmt: skip
    flags = set(re.findall(r"\b(aes|vaes|vpclmulqdq|sha_ni|avx512f)\b", Path("/proc/cpuinfo").read_text()))
    openssl_cli = subprocess.run(["openssl", "version"], capture_output=True, text=True).stdout.strip()
    return {"cpu": cpu, "cores": os.cpu_count(), "cpu_flags": sorted(flags), "python": platform.python_version(),
            "crypto_openssl": backend.openssl_version_text(), "openssl_cli": openssl_cli}  # fmt: skip


if __name__ == "__main__":
    main()
