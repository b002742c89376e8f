"""float64 stays float64 (issue 16): visattn.layers.precision's rule, float64 references of the blocks
and ViT cores that used to compute a step in float32 (sinkhorn, sac, the informer and sinkhorn cores),
and a dtype spy over every block and every ViT mixer core.

The spy is a TorchDispatchMode that sees every aten op of a float64 forward and backward and records
each one that returns a float32 tensor. A float32 tensor inside a float64 run is how a bare ``.float()``,
``.to(torch.float32)`` or a factory without ``dtype=`` shows up, wherever it hides.
"""

from __future__ import annotations

import math
import traceback
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from helpers import build
from test_contract import RANDOM_IN_TRAINING, _gates_drawn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import visattn
from visattn.attn.informer import hashed_uniform
from visattn.attn.sac import distance_encoding
from visattn.attn.sinkhorn import sinkhorn
from visattn.layers import accuracy_dtype, upcast_for_accuracy
from visattn.models.vit import MIXERS

F64 = torch.float64
_ROOT = Path(visattn.__file__).resolve().parent.parent


# --- the rule ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [
        (torch.float16, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float8_e4m3fn, torch.float32),
        (torch.float32, torch.float32),
        (torch.float64, torch.float64),
        (torch.int64, torch.float32),
        (torch.bool, torch.float32),
    ],
)
def test_accuracy_dtype_table(dtype, expected):
    assert accuracy_dtype(dtype) == expected
    t = torch.zeros(3).to(dtype)
    assert upcast_for_accuracy(t).dtype == expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_upcast_keeps_full_precision_tensors_as_they_are(dtype):
    t = torch.randn(4, dtype=dtype)
    assert upcast_for_accuracy(t) is t


def test_upcast_is_differentiable_and_exact_for_half_types():
    x = torch.tensor([0.1, -2.5, 3.0], dtype=torch.bfloat16, requires_grad=True)
    y = upcast_for_accuracy(x)
    assert torch.equal(y, x.detach().float())
    (y * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert x.grad.dtype == torch.bfloat16 and x.grad.tolist() == [1.0, 2.0, 3.0]


# --- float64 references --------------------------------------------------------------------------------


def naive_sinkhorn(logits, iters, allowed=None, causal=False):
    """Sinkhorn balancing in linear space (exp, then divide by row sums and by column sums, or by the
    column's running sum down to the row when causal), float64 throughout."""
    p = logits.exp()
    if allowed is not None:
        p = p * allowed

    def rows(p):
        s = p.sum(-1, keepdim=True)
        return torch.where(s > 0, p / torch.where(s > 0, s, 1), 0)

    for _ in range(iters):
        p = rows(p)
        c = p.cumsum(-2) if causal else p.sum(-2, keepdim=True)
        p = torch.where(c > 0, p / torch.where(c > 0, c, 1), 0)
    return rows(p) if causal else p


@pytest.mark.parametrize("causal", [False, True])
def test_sinkhorn_float64_equals_linear_space_reference(causal):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 6, 6, generator=g, dtype=F64) * 2
    allowed = None
    if causal:
        rows = torch.arange(6) // 2  # windows of earlier window-rows, as the block's causal sort
        allowed = rows.view(1, -1) < rows.view(-1, 1)
    s = sinkhorn(logits, 7, allowed, causal=causal)
    assert s.dtype == F64
    torch.testing.assert_close(s, naive_sinkhorn(logits, 7, allowed, causal), atol=1e-12, rtol=0)


def windowed_sorted_attention(q, k, v, s_q, temperature, iters):
    """(B, h, nW, t, d) windows: Sinkhorn-sorted keys and values (S = sinkhorn(ReLU(s_q·k̄/sqrt d)/tau))
    and softmax over [own window; sorted window], written out."""
    d = q.shape[-1]
    r = F.relu(torch.einsum("bhid,bhjd->bhij", s_q, k.mean(-2)) / math.sqrt(d))
    s = naive_sinkhorn(r / temperature, iters)
    keys = torch.cat([k, torch.einsum("bhij,bhjtd->bhitd", s, k)], -2)
    values = torch.cat([v, torch.einsum("bhij,bhjtd->bhitd", s, v)], -2)
    weights = (q @ keys.transpose(-1, -2) / math.sqrt(d)).softmax(-1)
    return weights @ values


def test_sinkhorn_block_float64_equals_reference():
    """No padding, eval (no Gumbel draw): the block is the written-out Sinkhorn attention to 1e-10."""
    block = build("sinkhorn", 16, window_size=2).double().eval()
    x = torch.randn(2, 16, 4, 6, generator=torch.Generator().manual_seed(1), dtype=F64)
    with torch.no_grad():
        out = block(x)
        p, heads = 2, block.heads
        win = rearrange(x, "b c (Y y) (X x) -> b (Y X) (y x) c", y=p, x=p)
        q, k, v = rearrange(block.qkv(win), "b w t (s h d) -> s b h w t d", s=3, h=heads)
        s_q = rearrange(block.sort_net(win.mean(-2)), "b w (h d) -> b h w d", h=heads)
        att = windowed_sorted_attention(q, k, v, s_q, block.temperature, block.sinkhorn_iter)
        ref = block.proj(rearrange(att, "b h w t d -> b w t (h d)"))
        ref = x + rearrange(ref, "b (Y X) (y x) c -> b c (Y y) (X x)", Y=2, y=p)
    assert out.dtype == F64
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)


def naive_sac(block, x):
    """SAC written out in float64 on dense (N x N) masks: the edge logits, the top-alpha edges, the
    straight-through gate 1 + σ(s) - stop_grad(σ(s)) on each edge's value, softmax over the edges."""
    b, c, height, width = x.shape
    tokens = x.flatten(2).transpose(1, 2)
    key, table, valid = block.candidates(height, width)
    oy, ox = (torch.arange(-(n - 1), n, dtype=F64) for n in (height, width))
    gy, gx = torch.meshgrid(oy, ox, indexing="ij")
    prior = block.edge_mlp(distance_encoding(gy.reshape(-1), gx.reshape(-1), block.freqs)).squeeze(-1)
    eq, ek = block.edge_content(tokens).chunk(2, dim=-1)
    content = torch.einsum("bne,bnme->bnm", eq, ek[:, key]) / math.sqrt(eq.shape[-1])
    logits = (prior[table] + content).masked_fill(~valid, float("-inf"))
    top, pick = logits.topk(min(block.alpha, logits.shape[-1]), dim=-1)
    edges = key.expand(b, -1, -1).gather(-1, pick)
    chosen = torch.isfinite(top)
    soft = torch.sigmoid(top.masked_fill(~chosen, 0.0))
    n = height * width
    gate = torch.zeros(b, n, n, dtype=F64).scatter(-1, edges, 1.0 + soft - soft.detach())
    on = torch.zeros(b, n, n, dtype=torch.bool).scatter(-1, edges, chosen)
    q, k, v = rearrange(block.qkv(tokens), "b n (s h d) -> s b h n d", s=3, h=block.heads)
    scores = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(~on.unsqueeze(1), float("-inf"))
    out = (scores.softmax(-1) * gate.unsqueeze(1)) @ v
    out = block.proj(rearrange(out, "b h n d -> b n (h d)"))
    return x + out.transpose(1, 2).reshape(b, c, height, width)


def test_sac_float64_output_and_predictor_gradient_equal_reference():
    """The gate is exactly 1 forward, so float32 edge logits showed only in the predictor's gradient
    (σ'(s) in float32): output and every parameter's gradient equal the float64 reference to 1e-10."""
    block = build("sac", 16, alpha=6, window=1, anchors=3).double().train()
    x = torch.randn(2, 16, 5, 6, generator=torch.Generator().manual_seed(2), dtype=F64)
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=F64)
    params = dict(block.named_parameters())
    out = block(x)
    grads = torch.autograd.grad((out * w).sum(), list(params.values()))
    ref = naive_sac(block, x)
    ref_grads = torch.autograd.grad((ref * w).sum(), list(params.values()))
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)
    for name, grad, ref_grad in zip(params, grads, ref_grads):
        assert grad.abs().max() > 1e-3, f"{name}: no gradient to compare"
        torch.testing.assert_close(grad, ref_grad, atol=1e-10, rtol=0, msg=f"sac: gradient of {name}")


def _core(name, **overrides):
    spec = MIXERS[name]
    torch.manual_seed(0)
    return spec.core(16, 2, **spec.fixed, **{**spec.params, **overrides}).double()


def test_sinkhorn_vit_core_float64_equals_reference():
    """The sinkhorn ViT core (2 x 2 windows of a 4 x 6 grid, no prefix, eval) is the written-out Sinkhorn
    attention over the patch windows, with the SortNet on the windows' mean value, to 1e-10."""
    core = _core("sinkhorn", window_size=2).eval()
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 2, 24, 8, generator=g, dtype=F64) for _ in range(3))
    with torch.no_grad():
        out = core(q, k, v, (4, 6), 0)
        wq, wk, wv = (rearrange(t, "b h (Y y X x) d -> b h (Y X) (y x) d", y=2, X=3, x=2) for t in (q, k, v))
        s_q = rearrange(
            core.sort_net(rearrange(wv.mean(-2), "b h w d -> b w (h d)")), "b w (h d) -> b h w d", h=2
        )
        block = core.holder.block
        att = windowed_sorted_attention(wq, wk, wv, s_q, block.temperature, block.sinkhorn_iter)
        ref = rearrange(att, "b h (Y X) (y x) d -> b h (Y y X x) d", Y=2, y=2)
    assert out.dtype == F64
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)


def test_informer_vit_core_float64_selects_by_float64_scores():
    """ProbSparse picks its active queries by their score spread. Two queries whose spreads differ by 1e-10
    (relative) tie in float32; in float64 the larger one is active, as in the written-out reference."""
    core = _core("informer", factor=1).eval()
    h, n, d = 2, 12, 8
    u = core.holder.block.budget(n)
    assert u == 3
    sample = hashed_uniform(n, core.holder.block.seed, h, None).topk(u, dim=-1).indices  # (h, u)
    g = torch.Generator().manual_seed(5)
    k, v = (torch.randn(1, h, n, d, generator=g, dtype=F64) for _ in range(2))
    for head in range(h):  # the sampled keys are e_0, e_1, e_2: a query's scores are its first 3 entries
        k[0, head, sample[head]] = torch.eye(u, d, dtype=F64)
    q = torch.zeros(1, h, n, d, dtype=F64)
    q[..., 3:] = torch.randn(1, h, n, d - 3, generator=g, dtype=F64)
    q[:, :, 0, 0], q[:, :, 2, 0] = 10.0, 9.0  # clearly active
    q[:, :, 4, 0], q[:, :, 9, 0] = 1.0 + 1e-10, 1.0  # query 4 wins by 1e-10 (float32 ties them and took 9)
    with torch.no_grad():
        out = core(q, k, v, (3, 4), 0)
    active = torch.tensor([0, 2, 4])
    ref = v.mean(2, keepdim=True).expand(-1, -1, n, -1).clone()
    ref[:, :, active] = ((q[:, :, active] @ k.transpose(-1, -2)) / math.sqrt(d)).softmax(-1) @ v
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)


# --- the dtype spy -------------------------------------------------------------------------------------


_ALLOCATIONS = (torch.ops.aten.empty, torch.ops.aten.empty_strided, torch.ops.aten.empty_like)


class Float32Spy(TorchDispatchMode):
    """Records every op that returns a float32 tensor, as 'op at file:line (function)' of the innermost
    visattn frame ('autograd backward' for ops the backward pass runs).

    ``allowed``: 'path:function' of functions whose float32 results are deliberate; ops inside them, and
    ops whose float32 inputs all came from such ops, are recorded in ``allowed_hits`` instead."""

    def __init__(self, allowed=frozenset()):
        super().__init__()
        self.allowed = allowed
        self.found: list[str] = []
        self.allowed_hits: set[str] = set()
        # Kept alive for the run, so that no id is reused.
        self._from_allowed: dict[int, torch.Tensor] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if not any(t.dtype == torch.float32 for t in outs):
            return out
        if func.overloadpacket in _ALLOCATIONS:
            # Computes nothing (torch 2.11's non-reentrant checkpoint makes one); an op that fills or reads it
            # in float32 is still recorded.
            return out
        ins = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        ins32 = [t for t in ins if t.dtype == torch.float32]
        frames = [f for f in traceback.extract_stack() if f.filename.startswith(str(_ROOT / "visattn"))]
        names = {f"{Path(f.filename).relative_to(_ROOT)}:{f.name}" for f in frames}
        hit = names & self.allowed
        if hit or (ins32 and all(id(t) in self._from_allowed for t in ins32)):
            self.allowed_hits |= hit
            self._from_allowed.update((id(t), t) for t in outs)
            return out
        where = "autograd backward"
        if frames:
            f = frames[-1]
            where = f"{Path(f.filename).relative_to(_ROOT)}:{f.lineno} ({f.name})"
        self.found.append(f"{func} at {where}")
        return out


def _spy_run(fn, allowed):
    spy = Float32Spy(allowed)
    with spy:
        out = fn()
        (out * torch.ones_like(out)).sum().backward()
    assert out.dtype == F64
    return spy


# Deliberate float32 in a float64 run; each entry must be hit by the blocks that list it.
# Counter-hash sampling noise: only its ranks are used (which keys are sampled), and float32 makes a
# float64 model sample the same keys as a float32 one.
_HASH_NOISE = "visattn/attn/informer.py:hashed_uniform"
# ±1 hash codes and their dot products (Hamming distances) are small integers, exact in float32; they
# only choose clusters.
_CODES = {"visattn/attn/clustered.py:hyperplane_codes", "visattn/attn/clustered.py:hamming_kmeans"}
# An unfold of a map of ones: exact 0/1, compared into a bool mask.
_STAR_MASK = "visattn/attn/star.py:neighbourhood_mask"
ALLOWED = {
    "informer": {_HASH_NOISE},
    "clustered": _CODES,
    "star": {_STAR_MASK},
}


@pytest.mark.parametrize("name", visattn.list_attns())
def test_block_float64_forward_and_backward_stay_float64(name):
    """Every block, float64 (B=1, C=16, 5 x 6, training mode except the blocks that draw at random in
    training, zero parameters drawn as the contract's gradient check): no op returns a float32 tensor.
    emanet's and sac's surrogate gradients change what the backward computes, not its dtype: no exception."""
    block = _gates_drawn(name).double().train(name not in RANDOM_IN_TRAINING)
    x = torch.randn(1, 16, 5, 6, generator=torch.Generator().manual_seed(1), dtype=F64, requires_grad=True)
    allowed = ALLOWED.get(name, set())
    spy = _spy_run(lambda: block(x), allowed)
    assert not spy.found, f"{name}: float32 inside a float64 run:\n" + "\n".join(dict.fromkeys(spy.found))
    assert spy.allowed_hits == allowed, f"{name}: stale ALLOWED entries {allowed - spy.allowed_hits}"


@pytest.mark.parametrize(
    "kwargs", [dict(causal=True, window_size=2), dict(window_size=4)], ids=["causal", "padded"]
)
def test_sinkhorn_variants_stay_float64(kwargs):
    """The causal balancing (allowed mask, cumulative columns) and the padded mask, in training (Gumbel)."""
    block = build("sinkhorn", 16, **kwargs).double().train()
    x = torch.randn(2, 16, 5, 7, generator=torch.Generator().manual_seed(1), dtype=F64, requires_grad=True)
    spy = _spy_run(lambda: block(x), frozenset())
    assert not spy.found, "\n".join(dict.fromkeys(spy.found))


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_vit_core_float64_forward_and_backward_stay_float64(name):
    """Every ViT mixer core on float64 q, k, v (B=1, 2 heads, d=8, a 3 x 4 grid and one prefix token;
    training mode except the blocks that draw at random in training): no op returns a float32 tensor."""
    core = _core(name).train(name not in RANDOM_IN_TRAINING)
    if hasattr(core, "layer_index"):  # jukebox: which attention type this layer runs
        core.layer_index = 0
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 13, 8, generator=g, dtype=F64, requires_grad=True) for _ in range(3))
    allowed = ALLOWED.get(name, set())
    spy = _spy_run(lambda: core(q, k, v, (3, 4), 1), allowed)
    assert not spy.found, f"{name} core: float32 inside a float64 run:\n" + "\n".join(
        dict.fromkeys(spy.found)
    )
    assert spy.allowed_hits == allowed, f"{name} core: stale ALLOWED entries {allowed - spy.allowed_hits}"
