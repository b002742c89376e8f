"""The tiny timm ViT the ViT-mixer tests share (tests/test_vit*.py): its configuration, a "pretrained"
state dict written to a local file (no network), and a builder. The fixtures over them (``tiny_file``,
``soft_file``, ``dense``, ``images``) are in conftest.py.

The q/k weights are scaled up so that attention is far from uniform, otherwise every approximation would
look exact.
"""

from __future__ import annotations

import timm
import torch

import visattn

NAME = "vit_small_patch16_224"
TINY = dict(embed_dim=32, depth=2, num_heads=2, reg_tokens=1, dynamic_img_size=True)


def random_dense_state(qk_gain: float = 2.0, **kwargs) -> dict[str, torch.Tensor]:
    """A dense timm ViT state (``kwargs``: timm's config) with unit-gain weights and q/k rows scaled by
    ``qk_gain`` (peaked attention maps)."""
    torch.manual_seed(0)
    model = timm.create_model(NAME, **kwargs)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    for k, v in state.items():
        # timm's 0.02-std init makes every residual branch tiny; unit-gain weights make attention matter.
        if v.dim() == 2 and k != "head.weight":
            v.normal_(0, v.shape[1] ** -0.5, generator=g)
        if k.endswith("attn.qkv.weight"):  # q and k rows: peaked attention maps
            v[: 2 * v.shape[1]] *= qk_gain
    return state


def build_vit(attn, path, **attn_kwargs):
    """The tiny ViT with mixer ``attn`` (``attn_kwargs``), timm's weights from the file ``path``, in eval."""
    return visattn.create_model(
        NAME,
        attn,
        attn_kwargs=attn_kwargs or None,
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(path)),
        **TINY,
    ).eval()
