"""Benchmark scripts: accuracy (run with ``python -m benchmarks.accuracy.<script> --help``)."""
