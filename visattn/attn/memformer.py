"""Memformer: A Memory-Augmented Transformer for Sequence Modeling — https://arxiv.org/abs/2010.06891

2D adaptation: the map is a sequence of row-bands (the paper's segments) in raster order, recurrent through k
external memory slots. Pixels of a band read the slots by attention over [memory; band]; after the band, each
slot is rewritten by slot attention over [itself; band outputs] and forgets by biased memory normalization.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers import factory_kwargs, multihead_sdpa, resolve_heads, to_map, to_tokens
from ..layers.streaming import BandRecurrentBlock, BandState
from ..registry import register_attn


def biased_normalize(written: torch.Tensor, bias: torch.Tensor, norm: float) -> torch.Tensor:
    """The paper's forgetting (biased memory normalization): ``norm·(m + b) / ||m + b||`` over the last dim.
    With ``written = 0`` it is the terminal state, the initial memory. Shared with the ViT mixer
    (:class:`visattn.layers.mixers.memory.MemformerCore`)."""
    return F.normalize(written + bias.to(written.dtype), dim=-1, eps=1e-6) * norm


def slot_write_mask(slots: int, tokens: int, device=None) -> torch.Tensor:
    """(slots, slots + tokens) bool: slot i's write attends to itself among the slots, and to every token."""
    eye = torch.eye(slots, dtype=torch.bool, device=device)
    return torch.cat([eye, eye.new_ones(slots, tokens)], dim=1)


@register_attn(
    "memformer",
    title="Memformer: A Memory-Augmented Transformer for Sequence Modeling",
    arxiv="2010.06891",
    year=2020,
    family="memory",
    complexity="O(N·(k + n_s + k²/n_s)·D), k slots, n_s = b·W tokens per band",
    flops_exponent=1.5,
    native_2d=False,
    causal=True,
    identity_init=True,
    export_dynamic_hw=False,
    export_note="the recurrence over row-bands unrolls in the exported graph, so H is fixed at export",
    idea="k memory slots read by the pixels of each row-band, rewritten slot-wise with biased normalization",
    reference="https://github.com/lucidrains/memformer",
)
class MemformerAttention(BandRecurrentBlock):
    """Row-band recurrence through k memory slots M (B, k, C): read, then write with forgetting.

    Read (per band X, output H): ``H = X + W_o MHA(X, [M; X])``: one softmax over the slots and the band (the
    encoder's memory cross-attention fused with its self-attention, keys/values by shared projections).

    Write (the paper's memory slot attention): each slot i attends only to itself and to the band outputs,
    ``m'_i = softmax(q_i [k(m_i); k(H)]ᵀ / (τ·sqrt(d))) [m_i; v(H)]`` per head (its own value is the raw
    slot), with temperature τ < 1 sharpening the weights; then biased memory normalization (forgetting)
    ``m_i <- s·(m'_i + b_i) / ||m'_i + b_i||``. The initial memory is the terminal state ``s·b_i/||b_i||``,
    which memory drifts back to when nothing is written (with one head, a fixed point of such a write).
    ``s = sqrt(C)`` where the paper uses 1: slots then have the norm of unit-variance pixel features, with
    which they share the key/value projections (the only change a constant scale can make). The paper's
    Memory Replay Back-Propagation is a memory-saving scheme for training on long streams; a one-shot
    forward here simply backpropagates through all bands.

    Causal (``causal=True``): raster-order masking inside the band; slots are always visible (they were
    written by past bands only). Non-causal: full attention inside the band plus the slots, so a band sees
    the rows above it only through the k slots and never the rows below: the block is not global.
    Content-only attention (no positional terms).

    Streaming: ``state = init_state(B, W)``; ``out, state = step(band, state)`` (see
    :mod:`visattn.layers.streaming`); the state is the (B, k, C) memory, whatever the number of bands.

    Args:
        channels: input channels C.
        num_slots: memory slots k (paper: 64).
        band_rows: rows per band (segment) b; 2 gives several segments even on small maps.
        write_temperature: τ of the slot attention (paper: τ < 1, value not stated in the text read; 0.5).
        heads: attention heads of read and write (default: ``default_heads(C)``).
        causal: raster-order causal masking.
    """

    def __init__(
        self,
        channels: int,
        *,
        num_slots: int = 64,
        band_rows: int = 2,
        write_temperature: float = 0.5,
        heads: int | None = None,
        causal: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(channels)
        for name, value in (("num_slots", num_slots), ("band_rows", band_rows)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"memformer: {name} must be a positive int, got {value!r}")
        if not isinstance(write_temperature, (int, float)) or not 0 < write_temperature <= 1:
            raise ValueError(f"memformer: write_temperature must be in (0, 1], got {write_temperature!r}")
        heads = resolve_heads(channels, heads, "memformer")
        dd = factory_kwargs(device, dtype)
        self.num_slots, self.band_rows, self.heads, self.causal = num_slots, band_rows, heads, causal
        self.write_temperature = float(write_temperature)
        self.slot_norm = math.sqrt(channels)
        # Read: queries from pixels, keys/values of [slots; band] by one projection.
        self.q = nn.Linear(channels, channels, **dd)
        self.kv = nn.Linear(channels, 2 * channels, **dd)
        self.proj = nn.Linear(channels, channels, **dd)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        # Write: slot queries, keys of [slot; band outputs], values of the band outputs.
        self.write_q = nn.Linear(channels, channels, **dd)
        self.write_k = nn.Linear(channels, channels, **dd)
        self.write_v = nn.Linear(channels, channels, **dd)
        # v_bias of biased memory normalization: its size relative to s sets the forgetting speed.
        self.forget_bias = nn.Parameter(torch.randn(num_slots, channels, **dd))

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, num_slots={self.num_slots}, band_rows={self.band_rows}, "
            f"write_temperature={self.write_temperature}, heads={self.heads}, causal={self.causal}"
        )

    def _normalize(self, slots: torch.Tensor) -> torch.Tensor:
        return F.normalize(slots, dim=-1, eps=1e-6) * self.slot_norm

    def terminal_state(self) -> torch.Tensor:
        """(k, C): the memory that forgetting converges to, and the initial memory."""
        return biased_normalize(torch.zeros_like(self.forget_bias), self.forget_bias, self.slot_norm)

    def init_state(self, batch: int, width: int, *, device=None, dtype=None) -> BandState:
        """``memory`` (B, k, C) = the terminal state for every sample (``width`` is not needed)."""
        memory = self.terminal_state().to(device=device, dtype=dtype)
        return {"memory": memory.unsqueeze(0).expand(batch, -1, -1)}

    def _check_state(self, band: torch.Tensor, state: BandState) -> str | None:
        memory = state.get("memory")
        if memory is None or memory.shape[1:] != (self.num_slots, self.channels):
            return (
                f"state['memory'] must be (B, {self.num_slots}, {self.channels}); create it with init_state"
            )
        return None

    def _step(self, band: torch.Tensor, state: BandState) -> tuple[torch.Tensor, BandState]:
        _, _, rows, width = band.shape
        memory = state["memory"]
        tokens = to_tokens(band)
        k_slots, n = memory.shape[1], tokens.shape[1]
        k, v = self.kv(torch.cat([memory.to(tokens.dtype), tokens], dim=1)).chunk(2, dim=-1)
        mask = None
        if self.causal:
            offset = torch.arange(k_slots + n, device=band.device) - k_slots
            mask = offset[None, :] <= torch.arange(n, device=band.device)[:, None]
        read = multihead_sdpa(self.q(tokens), k, v, self.heads, attn_mask=mask)
        outputs = tokens + self.proj(read)
        return to_map(outputs, rows, width), {"memory": self._write(memory, outputs)}

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """The band loop with everything that does not depend on the memory taken out of it; equal to
        ``_reference_forward`` (the loop of ``_step``, which ``step`` follows).

        Band t's read needs the memory written by band t-1, and that write is a softmax over band t-1's
        outputs, so the loop over bands is truly sequential (no scan form). Outside it, for all bands at
        once: the bands' queries and keys/values (the largest projections) and the masks. Inside it, per
        band: one projection of the k slots (read keys/values, write queries and keys fused), the read
        SDPA over [slots; band], the output projection, one projection of the outputs (write keys and
        values fused), the write SDPA and the normalization. The read stays one fused SDPA over [slots;
        band] rather than a band-only SDPA for all bands merged with a slot-only one: the merge needs the
        band part's log-sum-exp, which fused SDPA does not return, and computing it explicitly would keep
        B·heads·N·band_rows·W attention weights for the backward instead of O(N·C).
        """
        bsz, c, height, width = x.shape
        tokens = to_tokens(x)
        q = self.q(tokens)
        kv = self.kv(tokens)
        w_write = torch.cat([self.write_k.weight, self.write_v.weight])  # (2C, C)
        b_write = torch.cat([self.write_k.bias, self.write_v.bias])
        w_mem = torch.cat([self.kv.weight, self.write_q.weight, self.write_k.weight])  # (4C, C)
        b_mem = torch.cat([self.kv.bias, self.write_q.bias, self.write_k.bias])
        k_slots, n_max = self.num_slots, self.band_rows * width
        dev = x.device
        read_mask = None
        if self.causal:
            offset = torch.arange(k_slots + n_max, device=dev) - k_slots
            read_mask = offset[None, :] <= torch.arange(n_max, device=dev)[:, None]
        write_mask = slot_write_mask(k_slots, n_max, dev)
        write_scale = 1.0 / (self.write_temperature * math.sqrt(c // self.heads))
        bias = self.forget_bias
        memory = self.terminal_state().to(x.dtype).unsqueeze(0).expand(bsz, -1, -1)
        # Per-band pieces by one split each: slicing the whole tensors per band would make every band's
        # backward fill and add a gradient of the whole map (quadratic in the number of bands).
        x_bands, q_bands, k_bands, v_bands = (
            t.split(n_max, dim=1) for t in (tokens, q, *kv.chunk(2, dim=-1))
        )
        outs = []
        for t, (x_t, q_t, k_t, v_t) in enumerate(zip(x_bands, q_bands, k_bands, v_bands)):
            n = q_t.shape[1]
            k_m, v_m, wq_m, wk_m = F.linear(memory.to(q.dtype), w_mem, b_mem).split(c, dim=-1)
            k = torch.cat([k_m, k_t], dim=1)
            v = torch.cat([v_m, v_t], dim=1)
            mask = None if read_mask is None else read_mask[:n, : k_slots + n]
            read = multihead_sdpa(q_t, k, v, self.heads, attn_mask=mask)
            outputs = x_t + self.proj(read)
            outs.append(outputs)
            if t == len(q_bands) - 1:
                break  # the memory after the last band is not part of the output
            wk_o, wv_o = F.linear(outputs, w_write, b_write).chunk(2, dim=-1)
            keys = torch.cat([wk_m, wk_o], dim=1)
            values = torch.cat([memory.to(wv_o.dtype), wv_o], dim=1)
            written = multihead_sdpa(
                wq_m, keys, values, self.heads, attn_mask=write_mask[:, : k_slots + n], scale=write_scale
            )
            memory = biased_normalize(written, bias, self.slot_norm)
        return to_map(torch.cat(outs, dim=1), height, width)

    def _write(self, memory: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
        k_slots, n = memory.shape[1], outputs.shape[1]
        memory = memory.to(outputs.dtype)
        keys = torch.cat([self.write_k(memory), self.write_k(outputs)], dim=1)
        values = torch.cat([memory, self.write_v(outputs)], dim=1)
        # Slot i sees only itself among the slots, and every band output.
        mask = slot_write_mask(k_slots, n, memory.device)
        scale = 1.0 / (self.write_temperature * math.sqrt(self.channels // self.heads))
        written = multihead_sdpa(self.write_q(memory), keys, values, self.heads, attn_mask=mask, scale=scale)
        return biased_normalize(written, self.forget_bias, self.slot_norm)
