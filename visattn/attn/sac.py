"""SAC: Accelerating and Structuring Self-Attention via Sparse Adaptive Connection
— https://arxiv.org/abs/2003.09833

Pixels are the graph's nodes: a learned edge predictor scores, for every pixel, candidate edges (a
local window plus a coarse grid of far anchors) from their 2D distance encoding and content, keeps
alpha edges per pixel (alpha·N in all), and attention runs along those edges only, by gather.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from einops import rearrange

from ..layers import AttnBlock, factory_kwargs, resolve_heads, to_map, to_tokens, upcast_for_accuracy
from ..layers.gather_attention import gather_attend
from ..registry import register_attn


def _anchors(size: int, count: int) -> torch.Tensor:
    """min(count, size) distinct coordinates spread evenly over [0, size)."""
    g = min(count, size)
    # floor((i + 0.5) * size / g) in integers: exact at any size, and no float tensor in a float64 run.
    return (torch.arange(g) * 2 + 1) * size // (2 * g)


def distance_encoding(dy: torch.Tensor, dx: torch.Tensor, freqs: int) -> torch.Tensor:
    """(..., 2 + 4·freqs) features of integer offsets: signed log-distance and sin/cos at periods 2^f."""
    feats = [dy.sign() * dy.abs().log1p(), dx.sign() * dx.abs().log1p()]
    for f in range(freqs):
        w = math.pi / 2**f
        feats += [torch.sin(dy * w), torch.cos(dy * w), torch.sin(dx * w), torch.cos(dx * w)]
    return torch.stack(feats, dim=-1)


@register_attn(
    "sac",
    title="SAC: Accelerating and Structuring Self-Attention via Sparse Adaptive Connection",
    arxiv="2003.09833",
    year=2020,
    family="sparse",
    complexity="O(N·(M·e + alpha·D))",
    flops_exponent=1.0,
    native_2d=True,
    causal=False,
    identity_init=True,
    idea="a learned edge predictor over 2D distance encodings + content keeps alpha·N edges; attention along them",
    reference="none",
    # Straight-through gate on the hard top-alpha edge choice: exact for q/k/v and the output projection.
    surrogate_gradient_exact=("qkv.", "proj."),
)
class SAC(AttnBlock):
    """Sparse adaptive connection, ``x + proj(attn(x))`` with a zero-initialised projection.

    Candidates of pixel p (M of them): the (2r+1)² window around p and a ``anchors`` x ``anchors`` grid
    of far pixels spread over the map (those inside the window are dropped, so no key repeats). The
    edge predictor gives each candidate (p, j) the logit
    ``s_pj = MLP(enc(Δy, Δx)) + e_q(x_p)·e_k(x_j) / sqrt(e)``: the MLP is evaluated once per distinct
    offset of the map (a (2H-1)(2W-1) table, O(N)) and gathered. The ``alpha`` best candidates of every
    pixel become its edges (alpha·N edges in all, a balanced budget), shared by the heads, and multi-head
    softmax attention runs along them.

    Estimator: the paper trains its (LSTM) edge predictor with REINFORCE; here the hard top-alpha choice
    is trained with a straight-through estimator: every chosen edge's value is scaled by
    ``g = 1 + σ(s) - stop_grad(σ(s))``, which is exactly 1 in the forward pass (the output is plain
    attention along the chosen edges) and passes ``∂L/∂s = σ'(s)·p·(v·∂L/∂out)`` to the predictor.
    An MLP replaces the paper's LSTM, which is sequential in N (methods.md pitfall). With r >= max(H, W)
    and alpha >= N every pixel is an edge and the block is full attention. Defaults are ours (the paper
    tunes alpha per task).

    Args:
        channels: input channels C.
        heads: attention heads (default: ``default_heads(C)``).
        alpha: edges per pixel.
        window: radius r of the local candidate window.
        anchors: far candidates per axis (a coarse grid of anchors x anchors pixels).
        edge_dim: e, width of the content part of the predictor.
        hidden: hidden width of the distance-encoding MLP.
        freqs: sin/cos frequencies of the distance encoding.
        qkv_bias: bias of the q/k/v projections.
    """

    def __init__(
        self,
        channels: int,
        *,
        heads: int | None = None,
        alpha: int = 16,
        window: int = 3,
        anchors: int = 8,
        edge_dim: int = 8,
        hidden: int = 32,
        freqs: int = 4,
        qkv_bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(channels)
        heads = resolve_heads(channels, heads, "sac")
        for name, value, low in (
            ("alpha", alpha, 1),
            ("window", window, 0),
            ("anchors", anchors, 0),
            ("edge_dim", edge_dim, 1),
            ("hidden", hidden, 1),
            ("freqs", freqs, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"sac: {name} must be an int >= {low}, got {value!r}")
        dd = factory_kwargs(device, dtype)
        self.heads, self.alpha, self.window, self.anchors = heads, alpha, window, anchors
        self.edge_dim, self.freqs = edge_dim, freqs
        self.qkv = nn.Linear(channels, 3 * channels, bias=qkv_bias, **dd)
        self.edge_content = nn.Linear(channels, 2 * edge_dim, **dd)
        self.edge_mlp = nn.Sequential(
            nn.Linear(2 + 4 * freqs, hidden, **dd), nn.GELU(), nn.Linear(hidden, 1, **dd)
        )
        self.proj = nn.Linear(channels, channels, **dd)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def candidates(
        self, height: int, width: int, device=None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Key ids, offset-table ids and validity, each (N, M), of every pixel's candidate edges."""
        r = self.window
        rows = torch.arange(height, device=device).view(-1, 1, 1)
        cols = torch.arange(width, device=device).view(1, -1, 1)
        wy, wx = torch.meshgrid(
            torch.arange(-r, r + 1, device=device), torch.arange(-r, r + 1, device=device), indexing="ij"
        )
        ay, ax = torch.meshgrid(
            _anchors(height, self.anchors).to(device), _anchors(width, self.anchors).to(device), indexing="ij"
        )
        size = (height, width, -1)
        ky = torch.cat([(rows + wy.reshape(1, 1, -1)).expand(size), ay.reshape(1, 1, -1).expand(size)], -1)
        kx = torch.cat([(cols + wx.reshape(1, 1, -1)).expand(size), ax.reshape(1, 1, -1).expand(size)], -1)
        dy, dx = ky - rows, kx - cols
        inside = (ky >= 0) & (ky < height) & (kx >= 0) & (kx < width)
        # Anchors inside the window are already candidates: dropping them keeps every key once.
        is_local = torch.arange(ky.shape[-1], device=device) < (2 * r + 1) ** 2
        valid = inside & (is_local | (dy.abs() > r) | (dx.abs() > r))
        key = (ky.clamp(0, height - 1) * width + kx.clamp(0, width - 1)).flatten(0, 1)
        # Offsets of invalid candidates may leave the table's range; they are masked anyway.
        ty, tx = (dy + height - 1).clamp(0, 2 * height - 2), (dx + width - 1).clamp(0, 2 * width - 2)
        table = ty * (2 * width - 1) + tx
        return key, table.flatten(0, 1), valid.flatten(0, 1)

    def edge_logits(self, tokens: torch.Tensor, height: int, width: int):
        """Predictor logits (B, N, M) of every candidate (-inf where invalid), and its key ids (N, M)."""
        key, table, valid = self.candidates(height, width, tokens.device)
        oy = torch.arange(-(height - 1), height, device=tokens.device, dtype=tokens.dtype)
        ox = torch.arange(-(width - 1), width, device=tokens.device, dtype=tokens.dtype)
        gy, gx = torch.meshgrid(oy, ox, indexing="ij")
        prior = self.edge_mlp(distance_encoding(gy.reshape(-1), gx.reshape(-1), self.freqs)).squeeze(-1)
        eq, ek = self.edge_content(tokens).chunk(2, dim=-1)  # (B, N, e)
        b, n, e = eq.shape
        ek_c = ek[:, key.reshape(-1)].view(b, n, -1, e)
        content = torch.einsum("bne,bnme->bnm", eq, ek_c) / math.sqrt(e)
        # The top-alpha choice and its sigmoid gate in at least float32 (ties and saturation in half types).
        logits = upcast_for_accuracy(prior[table].unsqueeze(0) + content)
        return logits.masked_fill(~valid, float("-inf")), key

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        tokens = to_tokens(x)
        logits, key = self.edge_logits(tokens, height, width)
        b, n, m = logits.shape
        top, pick = logits.topk(min(self.alpha, m), dim=-1)  # (B, N, alpha)
        edges = key.unsqueeze(0).expand(b, -1, -1).gather(-1, pick)
        chosen = torch.isfinite(top)
        soft = torch.sigmoid(top.masked_fill(~chosen, 0.0))
        gate = 1.0 + (soft - soft.detach())  # exactly 1 forward; d gate / d logit = σ'
        q, k, v = rearrange(self.qkv(tokens), "b n (s h d) -> s b h n d", s=3, h=self.heads)
        index = edges.unsqueeze(1).expand(-1, self.heads, -1, -1)
        out = gather_attend(q, k, v, index, mask=chosen.unsqueeze(1), value_scale=gate.unsqueeze(1))
        return x + to_map(self.proj(rearrange(out, "b h n d -> b n (h d)")), height, width)

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, heads={self.heads}, alpha={self.alpha}, window={self.window}, "
            f"anchors={self.anchors}"
        )
