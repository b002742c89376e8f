"""Train a segmentor: ``python tools/train.py [config.yaml] [--set key=value ...] [--resume]``.

No config: the synthetic demo (configs/demo.yaml). Multi-GPU / multi-node:
``torchrun --nproc_per_node=8 tools/train.py configs/<name>.yaml``.
"""

import sys

from visattn.engine.cli import main_train

if __name__ == "__main__":
    sys.exit(main_train())
