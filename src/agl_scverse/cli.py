"""Command line: ``agl-scverse demo | fit | predict | benchmark``."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="agl-scverse")
    parser.parse_args(argv)
    return 0
