"""CBAM and GCNet against their equations written out."""

import torch
from helpers import build, feature_map


def test_cbam_equals_explicit_gates():
    block = build("cbam", 32).eval()
    x = feature_map(2, 32, 6, 9)
    with torch.no_grad():
        mlp = block.mlp
        avg = x.mean((2, 3), keepdim=True)
        mx = x.flatten(2).max(-1).values[..., None, None]
        channel = torch.sigmoid(mlp(avg) + mlp(mx))
        y = x * channel
        spatial = torch.sigmoid(
            block.spatial(torch.cat([y.max(1, keepdim=True).values, y.mean(1, keepdim=True)], 1))
        )
        torch.testing.assert_close(block(x), y * spatial, atol=1e-6, rtol=1e-6)


def test_cbam_shares_one_mlp_and_paper_kernel():
    block = build("cbam", 64, perturb=False)
    assert block.spatial.kernel_size == (7, 7)
    assert sum(isinstance(m, torch.nn.Conv2d) for m in block.mlp) == 2


def test_gcnet_equals_explicit_context_add():
    block = build("gcnet", 32).eval()
    x = feature_map(2, 32, 5, 7)
    with torch.no_grad():
        logits = block.attn_logits(x).flatten(1)  # (B, N)
        weights = logits.softmax(-1)
        context = torch.einsum("bn,bcn->bc", weights, x.flatten(2))[..., None, None]
        expected = x + block.transform(context)
        torch.testing.assert_close(block(x), expected, atol=1e-6, rtol=1e-6)
        # channel-add: the same vector is added to every pixel
        delta = block(x) - x
        torch.testing.assert_close(delta, delta[..., :1, :1].expand_as(delta))
