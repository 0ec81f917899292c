"""Benchmarks, run as modules (``python -m bench.seal_bench``); results go to bench/out/ (not committed)."""
