import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from vit_helpers import NAME, TINY, random_dense_state  # noqa: E402

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


# The tiny ViT of the ViT-mixer tests (tests/vit_helpers.py), one of each per test module.
@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("vit") / "tiny_vit.safetensors"
    save_file(random_dense_state(**TINY), str(path))
    return path


@pytest.fixture(scope="module")
def soft_file(tmp_path_factory):
    """Milder q/k (FAVOR+ random features converge only for moderate q·k, as the Performer paper notes)."""
    path = tmp_path_factory.mktemp("vit") / "soft_vit.safetensors"
    save_file(random_dense_state(qk_gain=0.5, **TINY), str(path))
    return path


@pytest.fixture(scope="module")
def dense(tiny_file):
    return timm.create_model(
        NAME, pretrained=True, pretrained_cfg_overlay=dict(file=str(tiny_file)), **TINY
    ).eval()


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(1)
    return {
        "224": torch.randn(1, 3, 224, 224, generator=g),
        "160x96": torch.randn(2, 3, 160, 96, generator=g),
    }
