"""danet: position + channel attention against naive float64 references."""

from __future__ import annotations

import pytest
import torch
from helpers import build, feature_map

import visattn
from visattn.attn.danet import channel_attention


def naive_pam(pam, x):
    b, c, h, w = x.shape
    q = pam.query_project(x).flatten(2)
    k = pam.key_project(x).flatten(2)
    v = pam.value_project(x).flatten(2)
    out = torch.zeros_like(v)
    for s in range(b):
        for i in range(h * w):
            p = torch.softmax(torch.stack([q[s][:, i] @ k[s][:, j] for j in range(h * w)]), dim=0)
            out[s][:, i] = sum(p[j] * v[s][:, j] for j in range(h * w))
    return out.reshape(b, c, h, w)


def naive_cam(x):
    b, c, h, w = x.shape
    f = x.flatten(2)
    out = torch.zeros_like(f)
    for s in range(b):
        for i in range(c):
            energy = torch.stack([f[s][i] @ f[s][j] for j in range(c)])
            p = torch.softmax(energy.max() - energy, dim=0)  # the paper's code: max(E) - E
            out[s][i] = sum(p[j] * f[s][j] for j in range(c))
    return out.reshape(b, c, h, w)


def test_matches_naive_reference():
    block = build("danet", 16).double().eval()
    x = feature_map(2, 16, 3, 4).double()
    with torch.no_grad():
        ref = x + block.pam.gamma * naive_pam(block.pam, x) + block.cam.gamma * naive_cam(x)
        torch.testing.assert_close(block(x), ref, atol=1e-10, rtol=1e-8)


def test_modules_are_mmseg_pam_and_cam():
    block = build("danet", 16).double().eval()
    x = feature_map(1, 16, 4, 3).double()
    with torch.no_grad():
        torch.testing.assert_close(block.pam(x), x + block.pam.gamma * naive_pam(block.pam, x))
        torch.testing.assert_close(block.cam(x), x + block.cam.gamma * naive_cam(x))
        torch.testing.assert_close(channel_attention(x), naive_cam(x))


def test_channel_attention_is_shift_invariant_softmax_of_minus_energy():
    x = feature_map(1, 6, 2, 3).double()
    f = x.flatten(2)
    energy = f @ f.transpose(1, 2)
    ref = (torch.softmax(-energy, dim=-1) @ f).view_as(x)
    torch.testing.assert_close(channel_attention(x), ref, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("kwargs", [{"reduction": 0}, {"reduction": 2.0}])
def test_invalid_hyperparameters(kwargs):
    with pytest.raises(ValueError, match="^danet: "):
        visattn.create_attn("danet", 16, **kwargs)
