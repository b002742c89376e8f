"""Training and evaluation: configs, the training loop (DDP under torchrun), checkpoints, mIoU."""

from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import DEFAULTS, ConfigError, apply_overrides, load_config, validate_config
from .evaluate import confusion_matrix, evaluate, format_table, metrics_from_confusion
from .trainer import PolyLR, train

__all__ = [
    "DEFAULTS",
    "ConfigError",
    "PolyLR",
    "apply_overrides",
    "confusion_matrix",
    "evaluate",
    "format_table",
    "latest_checkpoint",
    "load_checkpoint",
    "load_config",
    "metrics_from_confusion",
    "save_checkpoint",
    "train",
    "validate_config",
]
