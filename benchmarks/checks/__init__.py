"""Benchmark scripts: checks (run with ``python -m benchmarks.checks.<script> --help``)."""
