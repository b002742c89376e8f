"""Evaluate a checkpoint: ``python tools/test.py config.yaml --checkpoint work_dir/iter_80000``."""

import sys

from visattn.engine.cli import main_test

if __name__ == "__main__":
    sys.exit(main_test())
