"""Benchmark blocks: `python tools/benchmark.py [NAMES] [--quick] [--plot DIR]` (same as `visattn bench`)."""

import sys

from visattn.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
