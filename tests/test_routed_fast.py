"""Content-routed attention's fast paths against the implementations they replaced (issue 16).

``_reference_reformer`` is reformer's forward as it was before the fast path (logit bias built in full,
keys and values gathered then rolled, every round compared in the de-duplication count), kept here as
the oracle: the new code must give the same outputs and input / parameter gradients in float32.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

import visattn
from visattn.attn.reformer import SELF_PENALTY
from visattn.layers import to_map, to_tokens
from visattn.layers.hashing import (
    angular_buckets,
    attend_lse,
    factor_buckets,
    gather_tokens,
    hash_draw,
    merge_rounds,
    sort_with_inverse,
)

# float32: the fast path sums in another order (fused matmul epilogue, one index_add for the keys), so
# entries differ by rounding; bounded relative to each tensor's scale (a parameter gradient is a sum over
# every token, so its small entries carry the absolute rounding of its large terms).
REL = 1e-6


def _assert_equal_to_rounding(name, new, ref):
    scale = ref.abs().max().clamp_min(1.0)
    err = (new - ref).abs().max()
    assert err <= REL * scale, f"{name}: max |new - ref| = {err:.3g} > {REL:g} * {scale:.3g}"
    assert new.isfinite().all() == ref.isfinite().all(), name


def _look_back(x, chunk_dim, back):
    if back == 0:
        return x
    return torch.cat([x] + [x.roll(k, dims=chunk_dim) for k in range(1, back + 1)], dim=chunk_dim + 1)


def _old_codes(block, buckets, inv, m, nb):
    n_pad = buckets.shape[-1]
    blocks = n_pad // m + 2
    chunks = inv // m
    if block.causal:
        sizes = torch.zeros(*buckets.shape[:-1], nb + 1, dtype=torch.long)
        sizes = sizes.scatter_add(-1, buckets, torch.ones_like(buckets))
        first = sizes.cumsum(-1) - sizes
        codes = buckets * blocks + (inv - first.gather(-1, buckets)) // m
        return codes, codes + 1
    nc = n_pad // m
    codes = chunks if block.attend_across_buckets else buckets * blocks + chunks
    return codes, codes - chunks + (chunks + 1) % nc


def _old_bias(block, qpos, kpos, scodes, kcodes, knexts, n):
    m, w = qpos.shape[-1], kpos.shape[-1]
    allowed = (kpos < n).unsqueeze(-2)
    if block.causal:
        allowed = allowed & (kpos.unsqueeze(-2) <= qpos.unsqueeze(-1))
    if block.causal or not block.attend_across_buckets:
        q = scodes.unsqueeze(-1)
        allowed = allowed & ((q == kcodes.unsqueeze(-2)) | (q == knexts.unsqueeze(-2)))
    own = torch.eye(m, w, dtype=torch.bool)
    bias = torch.zeros(()).masked_fill(~(allowed | own), float("-inf"))
    return bias - own * SELF_PENALTY


def _old_counts(block, codes, nexts, qpos, back):
    flat = qpos.flatten(2)
    w = qpos.shape[-1] * (back + 1)
    counts = torch.zeros(*qpos.shape, w, dtype=torch.int32)
    for r in range(block.n_hashes):
        code_q = codes[:, :, r].gather(-1, flat).view_as(qpos)
        counts += code_q.unsqueeze(-1) == _look_back(code_q, 3, back).unsqueeze(-2)
        if back:
            code_next = nexts[:, :, r].gather(-1, flat).view_as(qpos)
            counts += code_q.unsqueeze(-1) == _look_back(code_next, 3, back).unsqueeze(-2)
    return counts.clamp_min_(1).float()


def _reference_reformer(block, x):
    """Reformer's forward before the fast path (commit dfe5765), step for step."""
    b, _, height, width = x.shape
    n = height * width
    m = min(block.chunk_size, n)
    n_pad = -(-n // m) * m
    nc, nb = n_pad // m, block.buckets_for(n_pad)
    back = min(2 if block.causal else 1, nc - 1)
    qk, v = rearrange(block.qkv(block.norm(to_tokens(x))), "b n (t h d) -> t b h n d", t=2, h=block.heads)
    if n_pad > n:
        qk, v = F.pad(qk, (0, 0, 0, n_pad - n)), F.pad(v, (0, 0, 0, n_pad - n))
    pos = torch.arange(n_pad)
    with torch.no_grad():
        rotations = hash_draw(block.rotations, block.training)
        buckets = angular_buckets(qk, rotations, factor_buckets(nb)).masked_fill(pos >= n, nb)
        perm, inv = sort_with_inverse(buckets * n_pad + pos)
        qpos = perm.unflatten(-1, (nc, m))
        kpos = _look_back(qpos, 3, back)
        codes, nexts = _old_codes(block, buckets, inv, m, nb)
        scodes = codes.gather(-1, perm).unflatten(-1, (nc, m))
        snexts = nexts.gather(-1, perm).unflatten(-1, (nc, m))
        bias = _old_bias(
            block, qpos, kpos, scodes, _look_back(scodes, 3, back), _look_back(snexts, 3, back), n
        )
        if not (block.allow_duplicates or block.n_hashes == 1):
            bias = bias - _old_counts(block, codes, nexts, qpos, back).log_()
    sq = gather_tokens(qk, perm).unflatten(3, (nc, m))
    sk = _look_back(gather_tokens(F.normalize(qk, dim=-1), perm).unflatten(3, (nc, m)), 3, back)
    sv = _look_back(gather_tokens(v, perm).unflatten(3, (nc, m)), 3, back)
    out, lse = attend_lse(sq @ sk.transpose(-1, -2) + bias, sv)
    out = gather_tokens(out.flatten(3, 4), inv)
    out = merge_rounds(out, lse.flatten(3).gather(-1, inv), dim=2)[:, :, :n]
    out = block.proj(rearrange(out, "b h n d -> b n (h d)"))
    return x + to_map(out, height, width)


def _grads(block, fn, x, seed):
    """Output, input gradient and parameter gradients of ``fn(block, x)`` under a weighted sum loss
    (training draws its hash rotations from the global RNG: seeded the same for both sides)."""
    block.zero_grad()
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)
    out = fn(block, x)
    weight = torch.linspace(-1, 1, out.numel()).view_as(out)
    (out * weight).sum().backward()
    return [out.detach(), x.grad] + [p.grad.clone() for p in block.parameters()]


CASES = [
    ("default", {}, (16, 16)),  # chunks 64, no padding: the unmasked fast path
    ("padded", {"chunk_size": 16}, (13, 11)),
    ("causal", {"causal": True, "chunk_size": 8}, (9, 7)),
    ("within-buckets", {"attend_across_buckets": False, "chunk_size": 8}, (7, 9)),
    ("duplicates", {"allow_duplicates": True, "chunk_size": 16}, (8, 8)),
    ("one-round", {"n_hashes": 1, "chunk_size": 16}, (5, 11)),
    ("one-chunk", {"n_hashes": 3}, (5, 7)),
    ("factorised", {"n_buckets": 256, "chunk_size": 4, "n_hashes": 2}, (10, 10)),
    ("causal-odd", {"causal": True, "n_hashes": 4, "chunk_size": 16}, (11, 13)),
    # codes too large for bytes: int16 (bucket-aligned windows, many buckets) and int32
    (
        "int16-codes",
        {"attend_across_buckets": False, "n_buckets": 64, "chunk_size": 4, "n_hashes": 3},
        (9, 9),
    ),
    ("int32-codes", {"causal": True, "n_buckets": 4096, "chunk_size": 4, "n_hashes": 2}, (16, 16)),
]


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("kwargs,size", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_reformer_fast_path_equals_reference(kwargs, size, train):
    torch.manual_seed(0)
    block = visattn.create_attn("reformer", 64, seed=3, **kwargs).train(train)
    with torch.no_grad():  # a non-zero output projection, so that gradients reach q, k and v
        block.proj.weight.normal_(std=0.2)
    x = torch.randn(2, 64, *size)
    new = _grads(block, lambda blk, t: blk(t), x, seed=11)
    old = _grads(block, _reference_reformer, x, seed=11)
    names = ["output", "input grad"] + [name for name, _ in block.named_parameters()]
    for name, a, b in zip(names, new, old, strict=True):
        _assert_equal_to_rounding(name, a, b)


def _old_core_counts(n_hashes, q_perm, q_inv, k_inv, kpos, m, nc):
    """ReformerCore._counts (the ViT mixer) before the byte form: float counters, bool comparisons."""
    shape = q_perm.shape
    counts = torch.zeros(*kpos.shape[:-1], m, kpos.shape[-1])
    for r in range(n_hashes):
        qc = (q_inv[:, :, r] // m).unsqueeze(2).expand(shape).gather(-1, q_perm).unflatten(-1, (nc, m))
        kc = (k_inv[:, :, r] // m).unsqueeze(2).expand(shape).gather(-1, kpos.flatten(3)).view_as(kpos)
        hit = qc.unsqueeze(-1) == kc.unsqueeze(-2)
        if nc > 1:
            hit |= ((qc - 1) % nc).unsqueeze(-1) == kc.unsqueeze(-2)
        counts += hit
    return counts.clamp_min_(1)


# (chunk m, chunks nc, rounds): one chunk, two chunks (the previous chunk is the next one), byte chunk ids,
# and more than 256 chunks (int32 ids).
@pytest.mark.parametrize("m,nc,rounds", [(4, 1, 3), (4, 2, 4), (3, 7, 8), (2, 300, 2)])
def test_vit_reformer_core_counts_equal_reference(m, nc, rounds):
    from visattn.layers.hashing import look_one_back, sort_with_inverse
    from visattn.layers.mixers.hashing import ReformerCore

    core = ReformerCore(32, 2, n_hashes=rounds, chunk_size=m)
    g = torch.Generator().manual_seed(m * 1000 + nc)
    n_pad = m * nc
    # Few distinct sort keys: many ties, so that queries and keys share chunks in several rounds.
    q_perm, q_inv = sort_with_inverse(torch.randint(0, 4, (2, 2, rounds, n_pad), generator=g))
    k_perm, k_inv = sort_with_inverse(torch.randint(0, 4, (2, 2, rounds, n_pad), generator=g))
    kpos = look_one_back(k_perm.unflatten(-1, (nc, m)), 3)
    new = core._counts(q_perm, q_inv, k_inv, kpos, m, nc)
    old = _old_core_counts(rounds, q_perm, q_inv, k_inv, kpos, m, nc)
    assert new.dtype == torch.float32
    assert torch.equal(new, old)
    assert old.max() > 1  # the case exercises de-duplication
