"""Compressive Transformers for Long-Range Sequence Modelling — https://arxiv.org/abs/1911.05507

2D adaptation: the map is a sequence of row-bands (the paper's segments) in raster order. Each band attends
to [compressed memory; memory; itself]; the memory keeps the last rows of past bands (the block's input, as
Transformer-XL keeps layer inputs) and rows evicted from it are compressed along the row by a strided
1 x c convolution (the paper's 1-D conv over the raster sequence, rate c = 3) into the compressed memory.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers import accuracy_dtype, factory_kwargs, multihead_sdpa, resolve_heads, to_map, to_tokens
from ..layers.streaming import BandRecurrentBlock, BandState
from ..registry import register_attn


def band_windows(
    kv: torch.Tensor, ckv: torch.Tensor | None, height: int, band_rows: int, mem_rows: int, cmem_rows: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every band's key/value window [compressed memory; memory; band], cut from per-row features at once.

    ``kv`` (B, m + nb·b, W, C'): the rows' keys/values with ``m = mem_rows`` empty rows on top (the memory of
    the first bands) and the last band padded to ``b = band_rows`` rows. ``ckv`` (B, m + cm + n_comp, wc, C')
    or None: the compressed rows 0..n_comp-1 (``n_comp = (nb - 1)·b - m``, the rows some band sees
    compressed) with ``m + cm`` empty rows on top (``cm = cmem_rows``). Returns the windows (B, nb, L, C')
    and ``key_ok`` (nb, L), False where a window key is a padding row (before row 0 or past ``height``).
    Used by :class:`CompressiveAttention` on its projected input rows and by the ViT mixer
    (:class:`visattn.layers.mixers.memory.CompressiveCore`) on the pretrained keys/values.
    """
    b, m, cm = band_rows, mem_rows, cmem_rows
    bsz, rows, width, dim = kv.shape
    nb, dev = (rows - m) // b, kv.device
    band_top = torch.arange(nb, device=dev)[:, None] * b
    # Band t's raw window: padded rows [t*b, t*b + m + b) = memory rows then the band's rows.
    row = band_top + torch.arange(m + b, device=dev)  # (nb, m + b)
    token = (row[..., None] * width + torch.arange(width, device=dev)).flatten(1)
    key_ok = ((row >= m) & (row < m + height)).repeat_interleave(width, dim=1)  # padded rows -> real rows
    source = kv.flatten(1, 2)
    if ckv is not None:
        wc = ckv.shape[2]
        # Compressed row r sits at padded index r + m + cm; band t's window is [t*b, t*b + cm).
        crow = band_top + torch.arange(cm, device=dev)
        ctoken = (crow[..., None] * wc + torch.arange(wc, device=dev)).flatten(1) + rows * width
        source = torch.cat([source, ckv.flatten(1, 2)], dim=1)
        token = torch.cat([ctoken, token], dim=1)
        key_ok = torch.cat([(crow >= m + cm).repeat_interleave(wc, dim=1), key_ok], dim=1)
    # One gather of token rows: its backward is one index_add, several times cheaper on CPU than the
    # backward of the overlapping unfold windows this replaced (same values and gradients).
    win = source.index_select(1, token.flatten()).view(bsz, nb, token.shape[1], dim)
    return win, key_ok


def compress_rows(conv: nn.Module, rows: torch.Tensor, rate: int) -> torch.Tensor:
    """``conv`` (kernel = stride = (1, rate)) on a (B, C, rows, W) map, W zero-padded on the right to a
    multiple of ``rate``: (B, C', rows, ceil(W / rate)), the paper's compression along the raster order."""
    pad = -rows.shape[3] % rate
    return conv(F.pad(rows, (0, pad)) if pad else rows)


def compress_token_rows(conv: nn.Module, rows: torch.Tensor, rate: int) -> torch.Tensor:
    """:func:`compress_rows` on token rows (B, R, W, C) -> (B, R, ceil(W / rate), C'), as one matmul.

    Each output token is the conv over ``rate`` neighbouring pixels of a row, so it is a linear map of
    their concatenated channels: no layout change of the rows and no convolution backward (which on
    CPU costs several times its forward for this strided 1 x c kernel).
    """
    pad = -rows.shape[2] % rate
    if pad:
        rows = F.pad(rows, (0, 0, 0, pad))
    patches = rows.unflatten(2, (-1, rate)).flatten(3)  # (B, R, W / rate, rate * C), pixel-major
    weight = conv.weight.squeeze(2).transpose(1, 2).flatten(1)  # (C', rate * C), the same order
    return F.linear(patches, weight, conv.bias)


def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"compressive: {name} must be an int >= {low}, got {value!r}")
    return value


@register_attn(
    "compressive",
    title="Compressive Transformers for Long-Range Sequence Modelling",
    arxiv="1911.05507",
    year=2019,
    family="memory",
    complexity="O(N·(n_s + n_m + n_cm)·D), n_s = b·W tokens per band",
    flops_exponent=1.5,
    native_2d=False,
    causal=True,
    identity_init=True,
    export_dynamic_hw=False,
    export_note="the number of row-bands and their key windows are fixed from H in the graph, so H is fixed",
    idea="row-bands as segments attending to [compressed memory; memory; band]; evicted rows conv-compressed",
    reference="https://github.com/lucidrains/compressive-transformer-pytorch",
)
class CompressiveAttention(BandRecurrentBlock):
    """``x + W_o MHA(band, [cmem; mem; band])`` band by band, with FIFO memory and conv-compressed eviction.

    The map is cut into row-bands of ``band_rows`` rows (the last band keeps the remaining rows; no padding).
    Band t's queries attend, in one softmax, to the keys/values of the compressed memory (``cmem_rows``
    compressed rows of ``ceil(W/c)`` tokens), the memory (the last ``mem_rows`` input rows before the band)
    and the band itself. Then the band's input rows are pushed into the memory; rows pushed out are
    compressed by ``Conv2d(C, C, (1, c), stride=(1, c))`` (right zero-padding W to a multiple of c) and
    pushed into the compressed memory, whose oldest rows are dropped. Defaults follow the paper's
    n_s = n_m = n_cm, c = 3 (verify): one band of memory and 3·band_rows compressed rows (as many tokens as a
    band, covering three bands). Memory rows keep their gradient inside a one-shot forward (the whole image is
    one backward, not truncated BPTT).

    The compression network is also trained by the paper's attention-reconstruction loss: in training mode,
    every eviction adds ``mse(attn(q, compress(old)), attn(q, old))`` with stop-gradients everywhere except
    into the conv; the sum over a forward is ``self.aux_loss`` (None in eval). A segmentor's ``loss`` adds it to the task
    loss (:func:`visattn.models.pop_attention_aux_losses`); other callers add it themselves.

    Causal (``causal=True``): within a band, raster-order masking (band tokens are contiguous in raster
    order); memories only hold rows of past bands, so output p depends only on inputs <= p. Non-causal: full
    attention inside the band, memories of past bands only: a band never sees the rows below it, and it
    sees at most ``mem_rows + cmem_rows`` rows above it (compression is along the row), so the block is not
    global in either mode. Content-only attention (Transformer-XL's relative position terms are not used).

    The one-shot forward attends all bands at once (the memories hold input rows, so nothing is truly
    recurrent); ``step`` and ``_reference_forward`` run the band loop it equals.

    Streaming: ``state = init_state(B, W)``; ``out, state = step(band, state)`` (see
    :mod:`visattn.layers.streaming`); the state holds at most ``mem_rows`` memory rows (with their cached
    keys/values) and the keys/values of ``cmem_rows`` compressed rows.

    Args:
        channels: input channels C.
        band_rows: rows per band (segment) b; 2 gives several segments even on small maps (the paper's
            512-token segment would be 8 rows of a 64-wide map).
        mem_rows: rows of uncompressed memory n_m (default: ``band_rows``); 0 disables it.
        cmem_rows: rows of compressed memory n_cm (default: ``3 * band_rows``); 0 disables it.
        compression: compression rate c, kernel = stride of the compressing conv (paper: 3).
        heads: attention heads (default: ``default_heads(C)``).
        causal: raster-order causal masking.
    """

    def __init__(
        self,
        channels: int,
        *,
        band_rows: int = 2,
        mem_rows: int | None = None,
        cmem_rows: int | None = None,
        compression: int = 3,
        heads: int | None = None,
        causal: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(channels)
        self.band_rows = _check_int("band_rows", band_rows, 1)
        self.mem_rows = _check_int("mem_rows", band_rows if mem_rows is None else mem_rows, 0)
        self.cmem_rows = _check_int("cmem_rows", 3 * band_rows if cmem_rows is None else cmem_rows, 0)
        self.compression = _check_int("compression", compression, 1)
        heads = resolve_heads(channels, heads, "compressive")
        self.heads, self.causal = heads, causal
        dd = factory_kwargs(device, dtype)
        self.q = nn.Linear(channels, channels, **dd)
        self.kv = nn.Linear(channels, 2 * channels, **dd)
        self.compress = nn.Conv2d(channels, channels, (1, compression), stride=(1, compression), **dd)
        self.proj = nn.Linear(channels, channels, **dd)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        self.aux_loss: torch.Tensor | None = None

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, band_rows={self.band_rows}, mem_rows={self.mem_rows}, "
            f"cmem_rows={self.cmem_rows}, compression={self.compression}, heads={self.heads}, "
            f"causal={self.causal}"
        )

    def init_state(self, batch: int, width: int, *, device=None, dtype=None) -> BandState:
        """Empty memories for ``batch`` samples of width ``width``: the memory rows ``mem`` (B, C, 0, W), their
        keys/values ``mem_kv`` (B, 2C, 0, W) and the keys/values of the compressed rows ``cmem_kv``
        (B, 2C, 0, ceil(W/c)); they fill up to ``mem_rows`` and ``cmem_rows`` rows."""
        c, wc = self.channels, -(-width // self.compression)
        dd = {"device": device, "dtype": dtype}
        return {
            "mem": torch.zeros(batch, c, 0, width, **dd),
            "mem_kv": torch.zeros(batch, 2 * c, 0, width, **dd),
            "cmem_kv": torch.zeros(batch, 2 * c, 0, wc, **dd),
        }

    def _check_state(self, band: torch.Tensor, state: BandState) -> str | None:
        if (
            set(state) - {"aux_loss"} != {"mem", "mem_kv", "cmem_kv"}
            or state["mem"].shape[3] != band.shape[3]
        ):
            return (
                f"the state does not fit a band of shape {tuple(band.shape)}; create it with init_state(B, W)"
            )
        return None

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """All bands at once; equal to the band loop (``_reference_forward``, which ``step`` follows).

        The memories hold *input* rows (and their compression), never outputs, so band t's context is known
        before any band is processed: memory = input rows ``[T - mem_rows, T)`` and compressed memory = the
        compression of rows ``[T - mem_rows - cmem_rows, T - mem_rows)`` (T = the band's top row; rows
        before 0 do not exist). Nothing is recurrent: every band attends to its window of keys in one batched
        SDPA, the windows cut from the keys/values of all rows, projected once.
        """
        bsz, _, height, width = x.shape
        b, m, cm = self.band_rows, self.mem_rows, self.cmem_rows
        nb = -(-height // b)
        h_pad, n = nb * b, b * width
        dev = x.device
        # Rows padded with m empty rows on top (memory of the first bands) and up to a whole last band.
        x_pad = F.pad(x, (0, 0, m, h_pad - height))
        # One layout copy that the q and kv projections and the compression all read.
        tokens = to_tokens(x_pad).contiguous()
        q = self.q(tokens[:, m * width :])
        kv = self.kv(tokens).unflatten(1, (m + h_pad, width))
        # Rows that some band sees compressed: those evicted before the last band starts.
        n_comp = (nb - 1) * b - m if cm else 0
        ckv = None
        if n_comp > 0:
            rows = tokens.unflatten(1, (m + h_pad, width))[:, m : m + n_comp]  # x's rows [0, n_comp)
            comp = compress_token_rows(self.compress, rows, self.compression)
            ckv = self.kv(F.pad(comp, (0, 0, 0, 0, m + cm, 0)))  # (B, m + cm + n_comp, wc, 2C)
        raw, key_ok = band_windows(kv, ckv, height, b, m, cm)
        n_keys = raw.shape[2]
        k, v = raw.flatten(0, 1).chunk(2, dim=-1)
        mask = key_ok[:, None, :]  # (nb, 1, L)
        if self.causal:
            # Memories are all in the past; the band itself (the last n keys) is masked in raster order.
            offset = torch.arange(n_keys, device=dev) - (n_keys - n)
            mask = mask & (offset[None, :] <= torch.arange(n, device=dev)[:, None])
        mask = mask.unsqueeze(0).expand(bsz, -1, -1, -1).flatten(0, 1).unsqueeze(1)
        out = multihead_sdpa(q.unflatten(1, (nb, n)).flatten(0, 1), k, v, self.heads, attn_mask=mask)
        out = out.unflatten(0, (bsz, nb)).flatten(1, 2)[:, : height * width]
        self.aux_loss = None
        if self.training and cm and height > m:
            self.aux_loss = self._batched_reconstruction_loss(x, q, kv[:, :h_pad], height, tokens)
        return x + to_map(self.proj(out), height, width)

    def _batched_reconstruction_loss(
        self, x: torch.Tensor, q: torch.Tensor, kv: torch.Tensor, height: int, tokens: torch.Tensor
    ) -> torch.Tensor:
        """The sum over bands of :meth:`_reconstruction_loss` for the rows each band evicts, in one SDPA.

        Band t (top row T, r rows) evicts rows ``[T - m, T + r - m)`` (those >= 0): with the m-row top padding
        of ``kv`` these are padded rows ``[T, T + b)``, i.e. band t's own slot, valid where ``m <= row < H``.
        ``tokens`` holds the same padded rows of the input (its rows past H are never valid, so the input
        rows compressed there do not matter: they are masked out).
        """
        bsz, _, _, width = x.shape
        b, m = self.band_rows, self.mem_rows
        nb, h_pad = q.shape[1] // (b * width), kv.shape[1]
        first = m // b  # bands before it evict nothing (their rows fit in the memory)
        rows = tokens.detach().unflatten(1, (-1, width))[:, :h_pad]
        comp = compress_token_rows(self.compress, rows, self.compression)  # (B, h_pad, wc, C)
        wc = comp.shape[2]
        kv_c = F.linear(comp.flatten(1, 2), self.kv.weight.detach(), self.kv.bias.detach())
        k_c, v_c = kv_c.chunk(2, dim=-1)
        k_old, v_old = kv.detach().flatten(1, 2).to(k_c.dtype).chunk(2, dim=-1)
        dev = x.device
        band_row = torch.arange(first, nb, device=dev)[:, None] * b

        def per_band(t: torch.Tensor, cols: int) -> torch.Tensor:
            return t.unflatten(1, (nb, b * cols))[:, first:].flatten(0, 1)

        def valid(cols: int) -> torch.Tensor:
            rows = band_row + torch.arange(b, device=dev).repeat_interleave(cols)
            ok = (rows >= m) & (rows < height)
            return ok[None, :, None, None, :].expand(bsz, -1, -1, -1, -1).flatten(0, 1)

        qd = per_band(q.detach(), width)
        target = multihead_sdpa(
            qd, per_band(k_old, width), per_band(v_old, width), self.heads, attn_mask=valid(width)
        )
        approx = multihead_sdpa(qd, per_band(k_c, wc), per_band(v_c, wc), self.heads, attn_mask=valid(wc))
        acc = accuracy_dtype(target.dtype)
        sq = (approx.to(acc) - target.to(acc)).square().unflatten(0, (bsz, nb - first))
        # Each band's loss is a mean over its own real tokens (the last band may be short): weight 1/count.
        rows_in_band = (height - torch.arange(first, nb, device=dev) * b).clamp(max=b)
        query_ok = torch.arange(b * width, device=dev) < (rows_in_band * width)[:, None]
        weight = query_ok.to(acc) / (bsz * rows_in_band * width * x.shape[1])[:, None]
        return (sq.sum(-1) * weight).sum()

    def _compress(self, rows: torch.Tensor) -> torch.Tensor:
        return compress_rows(self.compress, rows, self.compression)

    def _step(self, band: torch.Tensor, state: BandState) -> tuple[torch.Tensor, BandState]:
        _, _, rows, width = band.shape
        mem, mem_kv, cmem_kv = state["mem"], state["mem_kv"], state["cmem_kv"]
        tokens = to_tokens(band)
        q, kv = self.q(tokens), self.kv(tokens)
        # Keys/values of memory rows were computed when the rows were a band (or were compressed): the
        # state caches them instead of projecting the memories again at every band.
        past = torch.cat([to_tokens(cmem_kv), to_tokens(mem_kv)], dim=1).to(kv.dtype)
        k, v = torch.cat([past, kv], dim=1).chunk(2, dim=-1)
        n, n_past = tokens.shape[1], past.shape[1]
        mask = None
        if self.causal and n_past:
            # Memories are all in the past; the band itself is masked in raster order.
            offset = torch.arange(n_past + n, device=band.device) - n_past
            mask = offset[None, :] <= torch.arange(n, device=band.device)[:, None]
        out = multihead_sdpa(q, k, v, self.heads, causal=self.causal and not n_past, attn_mask=mask)
        out = band + to_map(self.proj(out), rows, width)

        seq = torch.cat([mem, band], dim=2)
        seq_kv = torch.cat([mem_kv, to_map(kv, rows, width).to(mem_kv.dtype)], dim=2)
        n_evict = max(seq.shape[2] - self.mem_rows, 0)
        new_state = {"mem": seq[:, :, n_evict:], "mem_kv": seq_kv[:, :, n_evict:], "cmem_kv": cmem_kv}
        if "aux_loss" in state:
            new_state["aux_loss"] = state["aux_loss"]
        if n_evict and self.cmem_rows:
            compressed = self._compress(seq[:, :, :n_evict])
            compressed_kv = to_map(self.kv(to_tokens(compressed)), n_evict, compressed.shape[3])
            cmem_kv = torch.cat([cmem_kv, compressed_kv.to(cmem_kv.dtype)], dim=2)
            new_state["cmem_kv"] = cmem_kv[:, :, max(cmem_kv.shape[2] - self.cmem_rows, 0) :]
            if self.training:
                loss = self._reconstruction_loss(q, seq[:, :, :n_evict], seq_kv[:, :, :n_evict])
                new_state["aux_loss"] = loss + new_state["aux_loss"] if "aux_loss" in new_state else loss
        return out, new_state

    def _reconstruction_loss(
        self, q: torch.Tensor, evicted: torch.Tensor, evicted_kv: torch.Tensor
    ) -> torch.Tensor:
        """The paper's attention-reconstruction loss; only the compression conv receives its gradient."""
        compressed = to_tokens(self._compress(evicted.detach()))
        k_c, v_c = F.linear(compressed, self.kv.weight.detach(), self.kv.bias.detach()).chunk(2, dim=-1)
        k_old, v_old = to_tokens(evicted_kv).detach().to(k_c.dtype).chunk(2, dim=-1)
        q = q.detach()
        target = multihead_sdpa(q, k_old, v_old, self.heads)
        # At least float32 (bf16 squared errors lose too much), float64 kept.
        acc = accuracy_dtype(target.dtype)
        return F.mse_loss(multihead_sdpa(q, k_c, v_c, self.heads).to(acc), target.to(acc))

    def _finish(self, state: BandState) -> None:
        self.aux_loss = state.get("aux_loss") if self.training else None
