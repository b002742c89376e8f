"""Export a block, a timm model with attention or a segmentor: `python tools/export.py NAME -o FILE`."""

import sys

from visattn.cli import main

if __name__ == "__main__":
    sys.exit(main(["export", *sys.argv[1:]]))
