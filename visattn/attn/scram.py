"""SCRAM: Spatially Coherent Randomized Attention Maps — https://arxiv.org/abs/1905.10308

Native 2D: for every pixel query PatchMatch searches the H x W key grid for its k best keys
(random init, propagation of the neighbours' matches shifted by the neighbour offset, random search
at shrinking radii), all pixels at once; softmax attention then runs over those k keys only.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn
from einops import rearrange

from ..layers import AttnBlock, factory_kwargs, resolve_heads, to_map, to_tokens
from ..layers.compat import is_exporting
from ..layers.gather_attention import gather_attend
from ..layers.hashing import gather_tokens, resolve_seed
from ..layers.precision import upcast_for_accuracy
from ..registry import register_attn

_MASK31 = (1 << 31) - 1


def hash_ints(seed: torch.Tensor, *counters: torch.Tensor) -> torch.Tensor:
    """Pseudo-random int64 in [0, 2^31) from a counter-based hash of ``seed`` and broadcast ``counters``.

    Stateless (compiles, no ``torch.Generator``), identical on every device and for every batch.
    """
    h = seed.to(torch.int64) & _MASK31
    for i, c in enumerate(counters):
        h = h + c.to(torch.int64) * (0x2F0B3A49 + 0x1B873593 * i)
        # 31-bit xorshift-multiply rounds: products stay below 2^62, so int64 never overflows. In place
        # on this function's own tensor: the last rounds run over every (head, pixel, slot).
        h.bitwise_and_(_MASK31).bitwise_xor_(h >> 15)
        h.mul_(0x5BD1E995 & _MASK31).bitwise_and_(_MASK31)
    h.bitwise_xor_(h >> 13)
    h.mul_(0x27D4EB2F).bitwise_and_(_MASK31)
    return h.bitwise_xor_(h >> 16)


def _mod(a: torch.Tensor, n: int) -> torch.Tensor:
    """``a % n`` for a >= 0; by a floor division, because ONNX conversion of ``tensor % size`` fails
    when the size is symbolic (dynamic H, W)."""
    return a - a // n * n


def search_levels(radius: int, device=None) -> torch.Tensor:
    """Random-search levels max(1, ceil(log2(radius)) + 1) as a 0-d tensor, from integer comparisons
    (``math.log2`` of a symbolic size would fix the count at the example's value in an exported graph)."""
    return ((1 << torch.arange(31, device=device)) < radius).sum() + 1


def _fused_scores(q: torch.Tensor) -> bool:
    """Whether :func:`listed_scores` takes its sampled-matmul path: eager CPU float32 or float64 (sparse
    tensors do not trace into compiled or exported graphs; on a GPU the gather path is fast)."""
    return (
        q.device.type == "cpu"
        and q.dtype in (torch.float32, torch.float64)
        and not (torch.compiler.is_compiling() or is_exporting() or torch.jit.is_tracing())
    )


def listed_scores(q: torch.Tensor, k: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """q·k of every query with each key of its list: q, k (B, h, N, d), ids (B, h, N, u) key ids ->
    (B, h, N, u) scores in ``accuracy_dtype(q.dtype)``.

    Eager on CPU (float32, float64) one sampled dense-dense matmul (``torch.sparse.sampled_addmm`` on a
    CSR pattern holding each query's ids): the (B, h, N, u, d) tensor of gathered keys is never written,
    and a score's bits depend only on its query and key, not on u or the key's place in the list.
    Elsewhere the keys are gathered and multiplied in a batched matmul, whose rounding depends on u.
    """
    if not _fused_scores(q):
        return upcast_for_accuracy(torch.einsum("bhnd,bhnud->bhnu", q, gather_tokens(k, ids)))
    b, h, n, d = q.shape
    u = ids.shape[-1]
    if u > n:  # a CSR pattern holds at most N x N entries (small maps: lists longer than the map)
        return torch.cat([listed_scores(q, k, part) for part in ids.split(n, dim=-1)], dim=-1)
    rows = torch.arange(0, n * u + 1, u, device=q.device).expand(b * h, n + 1).contiguous()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta", UserWarning)
        # beta=0 does not skip the pattern's values (0 * NaN is NaN): they are zeros.
        pattern = torch.sparse_csr_tensor(
            rows,
            ids.reshape(b * h, n * u),
            q.new_zeros(b * h, n * u),
            size=(b * h, n, n),
            check_invariants=False,
        )
        out = torch.sparse.sampled_addmm(
            pattern, q.reshape(b * h, n, d), k.reshape(b * h, n, d).transpose(1, 2), beta=0.0
        )
    return out.values().view(b, h, n, u)


@register_attn(
    "scram",
    title="SCRAM: Spatially Coherent Randomized Attention Maps",
    arxiv="1905.10308",
    year=2019,
    family="sparse",
    complexity="O(N·k·T·D)",
    flops_exponent=1.0,
    native_2d=True,
    causal=False,
    identity_init=True,
    idea="PatchMatch finds each pixel's k best keys on the 2D grid; softmax attention over those k only",
    reference="none",
    random_in_training=True,  # PatchMatch's random initial candidates and random search
)
class SCRAM(AttnBlock):
    """PatchMatch-sparse self-attention, ``x + proj(attn(x))`` with a zero-initialised projection.

    Per head, each query p keeps a list of k distinct key positions: a random initial list (a random
    per-pixel shift of k distinct random offsets, so k = N holds every key); then ``iterations`` rounds
    of (1) propagation — the lists of two grid neighbours p + δ (up/left on even rounds, down/right on
    odd rounds, the vectorised form of PatchMatch's alternating scan order), each key shifted by -δ; and
    (2) random search — one proposal per list entry, uniform in a square of radius max(H, W)·2^-l,
    the level l cycling over entries and rounds. After each round the k best distinct keys of the union
    by q·k are kept; a kept key's score is carried, not recomputed, so each round scores only its
    3k new proposals (in the input's dtype: float64 stays float64). The search runs without gradient
    (the match field is discrete); gradients reach q, k and v through the softmax over the chosen keys.
    With k >= N this is full attention.

    Randomness comes from a counter hash of (seed, round, head, pixel, entry): eval output is
    deterministic and the same for every sample of a batch; in training the seed is redrawn per call.
    The paper gives no single (k, iterations); the defaults are ours.

    Args:
        channels: input channels C.
        heads: attention heads (default: ``default_heads(C)``).
        k: keys per query (clamped to N).
        iterations: PatchMatch rounds of propagation + random search.
        qkv_bias: bias of the q/k/v projections.
        seed: seed of the eval-time search (None: drawn from the global RNG at construction).
    """

    def __init__(
        self,
        channels: int,
        *,
        heads: int | None = None,
        k: int = 16,
        iterations: int = 4,
        qkv_bias: bool = True,
        seed: int | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(channels)
        heads = resolve_heads(channels, heads, "scram")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"scram: k must be a positive int, got {k!r}")
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
            raise ValueError(f"scram: iterations must be an int >= 0, got {iterations!r}")
        dd = factory_kwargs(device, dtype)
        self.heads, self.k, self.iterations = heads, k, iterations
        self.register_buffer("seed", torch.tensor(resolve_seed(seed) & _MASK31, device=device))
        self.qkv = nn.Linear(channels, 3 * channels, bias=qkv_bias, **dd)
        self.proj = nn.Linear(channels, channels, **dd)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    @torch.no_grad()
    def patchmatch(self, q: torch.Tensor, k: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """(B, h, N, d) queries and keys on a height x width grid -> (B, h, N, m) distinct key ids,
        m = min(k, N), sorted by descending score (in the initial random order when ``iterations=0``).

        Scores are computed in the input's dtype (float16 and bfloat16 compare in float32). A kept
        candidate's score is carried from the round that proposed it; each round scores only its 3m new
        proposals.
        """
        b, h, n, d = q.shape
        m = min(self.k, n)
        seed, cand = self._initial(q, n, m)
        if self.iterations == 0:
            return cand
        cand_scores = listed_scores(q, k, cand)
        for t in range(self.iterations):
            new = self._proposals(seed, t, cand, height, width)
            # Keys are sorted so that duplicates are neighbours: the sorted union, and so the order in
            # which topk sees ties, is the one of re-scoring everything (_reference_patchmatch). A key
            # proposed again has its carried score's bits on the fused path; on the gather path the
            # two may differ in the last bit, and either one is kept (ONNX has no stable sort).
            union, order = torch.cat([cand, new], dim=-1).sort(dim=-1)
            scores = torch.cat([cand_scores, listed_scores(q, k, new)], dim=-1).gather(-1, order)
            scores[..., 1:].masked_fill_(union[..., 1:] == union[..., :-1], float("-inf"))
            cand_scores, top = scores.topk(m, dim=-1)
            cand = union.gather(-1, top)
        return cand

    def _initial(self, q: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This call's seed and the random initial lists (B, h, N, m): a random per-pixel shift of m
        distinct random offsets."""
        b, h = q.shape[:2]
        dev = q.device
        seed = torch.randint(0, _MASK31, (), device=dev) if self.training else self.seed
        head = torch.arange(h, device=dev).view(h, 1, 1)
        pix = torch.arange(n, device=dev)
        # m distinct offsets in [0, n): the top m of unique keys (hash, position), so that no tie is
        # left to the topk implementation (onnxruntime and torch break ties differently).
        offsets = (hash_ints(seed, pix) * n + pix).topk(m).indices
        shift = _mod(hash_ints(seed + 1, head, pix.view(1, n, 1)), n)
        return seed, _mod(shift + offsets.view(1, 1, m), n).expand(b, h, n, m)

    def _proposals(
        self, seed: torch.Tensor, t: int, cand: torch.Tensor, height: int, width: int
    ) -> torch.Tensor:
        """Round ``t``'s 3m proposals per query (B, h, N, 3m): the lists of the vertical and the
        horizontal neighbour, each key shifted by minus the neighbour offset (clamped to the grid), then
        one random-search proposal per list entry."""
        b, h, n, m = cand.shape
        dev = cand.device
        crow = cand // width
        ccol = cand - crow * width
        step = -1 if t % 2 == 0 else 1

        def neighbour(ids: torch.Tensor, dim: int) -> torch.Tensor:
            # The list of the grid neighbour at +step along ``dim`` (rows 2, columns 3 of the grid
            # view); a pixel on the border has no such neighbour and takes its own list.
            grid = ids.view(b, h, height, width, m)
            size = grid.shape[dim]
            if step < 0:
                parts = (grid.narrow(dim, 0, 1), grid.narrow(dim, 0, size - 1))
            else:
                parts = (grid.narrow(dim, 1, size - 1), grid.narrow(dim, size - 1, 1))
            return torch.cat(parts, dim=dim).view(b, h, n, m)

        # Shifting a key one row by -step leaves the grid exactly when its id leaves [0, n); one column
        # when its column leaves [0, width). Such a key stays where it is (the clamp of the grid).
        above = neighbour(cand, 2)
        moved = above - step * width
        vertical = torch.where((moved >= 0) & (moved < n), moved, above)
        beside = neighbour(cand, 3)
        col = neighbour(ccol, 3) - step
        horizontal = torch.where((col >= 0) & (col < width), beside - step, beside)

        head = torch.arange(h, device=dev).view(h, 1, 1)
        pix = torch.arange(n, device=dev).view(1, n, 1)
        slot = torch.arange(m, device=dev).view(1, 1, m)
        radius0 = max(height, width)
        # floor(radius0 / 2^level), from integers (exact, and no float32 step in a float64 forward).
        level = (slot + t) % search_levels(radius0, dev)
        radius = (radius0 // (1 << torch.arange(31, device=dev))[level]).clamp_min(1)
        span = 2 * radius + 1
        dr = hash_ints(seed + 2 + 2 * t, head, pix, slot) % span - radius
        dc = hash_ints(seed + 3 + 2 * t, head, pix, slot) % span - radius
        rand = (crow + dr).clamp(0, height - 1) * width + (ccol + dc).clamp(0, width - 1)
        return torch.cat([vertical, horizontal, rand], dim=-1)

    @torch.no_grad()
    def _reference_patchmatch(
        self, q: torch.Tensor, k: torch.Tensor, height: int, width: int
    ) -> torch.Tensor:
        """:meth:`patchmatch` as it was before issue 16, for tests: every round gathers and scores the
        whole union again (kept candidates included), neighbours' lists are gathered per pixel. Scores
        are in the input's dtype (float16/bfloat16: float32), as in :meth:`patchmatch`."""
        b, h, n, d = q.shape
        m = min(self.k, n)
        dev = q.device
        seed, cand = self._initial(q, n, m)
        head = torch.arange(h, device=dev).view(h, 1, 1)
        pix = torch.arange(n, device=dev).view(1, n, 1)
        slot = torch.arange(m, device=dev).view(1, 1, m)
        rows = pix // width
        cols = pix - rows * width

        def best(union: torch.Tensor) -> torch.Tensor:
            union, _ = union.sort(dim=-1)
            scores = listed_scores(q, k, union)
            dup = torch.zeros_like(union, dtype=torch.bool)
            dup[..., 1:] = union[..., 1:] == union[..., :-1]
            scores = scores.masked_fill(dup, float("-inf"))
            return union.gather(-1, scores.topk(m, dim=-1).indices)

        radius0 = max(height, width)
        levels = search_levels(radius0, dev)
        for t in range(self.iterations):
            crow = cand // width
            ccol = cand - crow * width
            proposals = [cand]
            step = -1 if t % 2 == 0 else 1
            for di, dj in ((step, 0), (0, step)):
                nr, nc = (rows + di).clamp(0, height - 1), (cols + dj).clamp(0, width - 1)
                nbr = (nr * width + nc).view(1, 1, n, 1).expand(b, h, n, m)
                ncand = cand.gather(2, nbr)
                sr = (ncand // width - di).clamp(0, height - 1)
                sc = (_mod(ncand, width) - dj).clamp(0, width - 1)
                proposals.append(sr * width + sc)
            level = (slot + t) % levels
            radius = (radius0 * torch.pow(0.5, level.float())).floor().clamp_min(1).long()
            span = 2 * radius + 1
            dr = hash_ints(seed + 2 + 2 * t, head, pix, slot) % span - radius
            dc = hash_ints(seed + 3 + 2 * t, head, pix, slot) % span - radius
            proposals.append((crow + dr).clamp(0, height - 1) * width + (ccol + dc).clamp(0, width - 1))
            cand = best(torch.cat(proposals, dim=-1))
        return cand

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        q, k, v = rearrange(self.qkv(to_tokens(x)), "b n (s h d) -> s b h n d", s=3, h=self.heads)
        index = self.patchmatch(q, k, height, width)
        out = gather_attend(q, k, v, index)
        return x + to_map(self.proj(rearrange(out, "b h n d -> b n (h d)")), height, width)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, heads={self.heads}, k={self.k}, iterations={self.iterations}"
