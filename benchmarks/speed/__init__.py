"""Benchmark scripts: speed (run with ``python -m benchmarks.speed.<script> --help``)."""
