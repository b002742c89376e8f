"""The ViT mixer cores, split by family into :mod:`visattn.layers.mixers`; this module re-exports them
(``visattn.models.vit`` and users import the cores from here)."""

from __future__ import annotations

from .mixers import *  # noqa: F403
from .mixers import __all__  # noqa: F401
