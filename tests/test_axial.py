import pytest
import torch
import torch.nn.functional as F
from helpers import build, feature_map

import visattn


def dense_masked(mha, tokens, mask):
    """Full softmax attention over all N tokens with an explicit boolean (N, N) mask."""
    k, v = mha.kv(tokens).chunk(2, -1)
    q = mha.q(tokens)
    split = lambda t: t.unflatten(-1, (mha.heads, -1)).transpose(1, 2)  # noqa: E731
    out = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=mask)
    return mha.proj(out.transpose(1, 2).flatten(2))


@pytest.mark.parametrize("causal", [False, True])
def test_equals_dense_attention_restricted_to_column_then_row(causal):
    h, w = 4, 5
    block = build("axial", 32, heads=2, causal=causal).eval()
    x = feature_map(2, 32, h, w)
    i, j = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    i, j = i.flatten(), j.flatten()
    same_col = j[:, None] == j[None, :]
    same_row = i[:, None] == i[None, :]
    if causal:
        same_col &= i[None, :] <= i[:, None]
        same_row &= j[None, :] <= j[:, None]
    t = x.flatten(2).transpose(1, 2)
    with torch.no_grad():
        t = t + dense_masked(block.attn_h, t, same_col)
        t = t + dense_masked(block.attn_w, t, same_row)
        expected = t.transpose(1, 2).reshape_as(x)
        torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-5)


def test_causal_receptive_field_is_upper_left_rectangle():
    block = build("axial", 32, causal=True).eval()
    x = feature_map(1, 32, 5, 7, requires_grad=True)
    (grad,) = torch.autograd.grad(block(x)[0, :, 2, 3].sum(), x)
    reached = grad[0].abs().sum(0) > 0
    expected = torch.zeros(5, 7, dtype=torch.bool)
    expected[:3, :4] = True
    assert torch.equal(reached, expected)


def test_heads_must_divide_channels():
    with pytest.raises(ValueError, match="heads"):
        visattn.create_attn("axial", 32, heads=3)
