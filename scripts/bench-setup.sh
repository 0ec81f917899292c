#!/usr/bin/env bash
# What only the benchmarks need, on top of `make setup`:
# - Flower's secure-aggregation code, for the SecAgg+ baseline of bench/fed_bench.py. flwr 1.41 pins older fastapi, rich,
#   typer and uvicorn than the project uses, so it goes in with --no-deps plus exactly the three packages its
#   secure-aggregation code imports.
# - Debian's age, the sealing baseline of bench/seal_bench.py (installed there if missing).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! .venv/bin/python -c "import flwr" 2>/dev/null; then
  echo "bench-setup: installing flwr (SecAgg+ baseline) into .venv"
  .venv/bin/pip install --quiet --no-deps 'flwr==1.41.0' 'protobuf==6.33.6' 'grpcio==1.85.1' 'iterators==0.0.2' 2>&1 \
    | { grep -v "is ignored: it is neither" || true; }
fi
