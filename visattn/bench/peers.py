"""Public implementations of the same methods, built at settings close to ours, measured in the same run.

Peers are optional (the `bench` extra or a manual ``pip install``); a peer that is not installed or
fails to build is reported with the reason, never silently dropped. Sequence peers run on the
flattened map through the same adapter our sequence blocks use, plus the residual our blocks
include, so both sides compute ``x + attn(x)`` on (B, C, H, W).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..layers import to_map, to_tokens
from .runner import BenchRow, bench_block

__all__ = ["PEERS", "PeerSpec", "compare", "format_ratios"]


class TokenPeer(nn.Module):
    """Runs a (B, N, C) -> (B, N, C) module on a (B, C, H, W) map, with a residual."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(to_tokens(x))
        out = out[0] if isinstance(out, (tuple, list)) else out
        return x + to_map(out, *x.shape[-2:])


class MapPeer(nn.Module):
    """Adds the residual to a (B, C, H, W) module that returns only its attention branch."""

    def __init__(self, inner: nn.Module, residual: bool = True) -> None:
        super().__init__()
        self.inner, self.residual = inner, residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        return x + out if self.residual else out


class CompressiveBandsPeer(nn.Module):
    """compressive-transformer-pytorch's SelfAttention run over the raster sequence in segments of
    ``band_rows`` image rows, each segment reading the memories the previous one wrote (the peer's own
    recurrence), with our block's segment, memory and compressed-memory lengths and rate."""

    def __init__(self, channels: int, width: int, band_rows: int = 2, heads: int = 8) -> None:
        super().__init__()
        from compressive_transformer_pytorch.compressive_transformer_pytorch import SelfAttention

        self.segment = band_rows * width
        compressed_width = (width + 2) // 3
        self.attn = SelfAttention(
            channels,
            seq_len=self.segment,
            mem_len=self.segment,
            cmem_len=3 * band_rows * compressed_width,
            cmem_ratio=3,
            heads=heads,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens, memories, outs = to_tokens(x), None, []
        for start in range(0, tokens.shape[1], self.segment):  # the peer's segment recurrence
            out, memories, _ = self.attn(tokens[:, start : start + self.segment], memories=memories)
            outs.append(out)
        return x + to_map(torch.cat(outs, dim=1), *x.shape[-2:])


@dataclass(frozen=True)
class PeerSpec:
    label: str
    package: str  # module to import; its absence is reported as "not installed"
    build: Callable[[int, tuple[int, int]], nn.Module]  # (channels, (H, W)) -> module on (B, C, H, W)
    settings: str = ""


def _timm_layer(path: str, **kw):
    module, _, cls = path.rpartition(".")

    def build(c, hw):
        return getattr(importlib.import_module(module), cls)(c, **kw)

    return build


def _lucid(module: str, cls: str, wrap: str = "tokens", **kw):
    def build(c, hw):
        mod = importlib.import_module(module)
        args = {k: (v(c, hw) if callable(v) else v) for k, v in kw.items()}
        inner = getattr(mod, cls)(**args)
        return TokenPeer(inner) if wrap == "tokens" else MapPeer(inner)

    return build


PEERS: dict[str, list[PeerSpec]] = {
    "cbam": [
        PeerSpec(
            "timm CbamModule",
            "timm",
            _timm_layer("timm.layers.cbam.CbamModule", rd_ratio=1 / 16),
            "r=16, 7x7",
        )
    ],
    "gcnet": [
        PeerSpec(
            "timm GlobalContext (gca)",
            "timm",
            _timm_layer(
                "timm.layers.global_context.GlobalContext", fuse_add=True, fuse_scale=False, rd_ratio=1 / 16
            ),
            "r=16, add",
        )
    ],
    "nonlocal": [
        PeerSpec(
            "timm NonLocalAttn",
            "timm",
            _timm_layer(
                "timm.layers.non_local_attn.NonLocalAttn", use_scale=False, rd_ratio=1 / 2, rd_divisor=1
            ),
            "C/2, no scale",
        )
    ],
    "lambda": [
        PeerSpec(
            "timm LambdaLayer",
            "timm",
            _timm_layer("timm.layers.lambda_layer.LambdaLayer", r=23),
            "r=23, k=16, heads=4",
        ),
        PeerSpec(
            "lambda-networks",
            "lambda_networks",
            _lucid(
                "lambda_networks",
                "LambdaLayer",
                wrap="map",
                dim=lambda c, hw: c,
                dim_out=lambda c, hw: c,
                r=23,
                dim_k=16,
                heads=4,
                dim_u=1,
            ),
            "r=23, k=16, heads=4",
        ),
    ],
    "efficient_attention": [
        PeerSpec(
            "linear-attention-transformer ImageLinearAttention",
            "linear_attention_transformer",
            _lucid(
                "linear_attention_transformer.images",
                "ImageLinearAttention",
                wrap="map",
                chan=lambda c, hw: c,
                heads=8,
                key_dim=lambda c, hw: c // 8,
                value_dim=lambda c, hw: c // 8,
            ),
            "8 heads",
        )
    ],
    "kronecker": [
        PeerSpec(
            "kronecker-attention-pytorch",
            "kronecker_attention_pytorch",
            _lucid(
                "kronecker_attention_pytorch",
                "KroneckerSelfAttention",
                wrap="map",
                dim=lambda c, hw: c,
                heads=8,
                dim_heads=lambda c, hw: c // 8,
            ),
            "8 heads",
        )
    ],
    "isab": [
        PeerSpec(
            "isab-pytorch ISAB",
            "isab_pytorch",
            _lucid("isab_pytorch", "ISAB", dim=lambda c, hw: c, heads=4, num_latents=16),
            "4 heads, m=16",
        )
    ],
    "performer": [
        PeerSpec(
            "performer-pytorch SelfAttention",
            "performer_pytorch",
            _lucid(
                "performer_pytorch",
                "SelfAttention",
                dim=lambda c, hw: c,
                heads=8,
                dim_head=lambda c, hw: c // 8,
            ),
            "8 heads",
        )
    ],
    "linformer": [
        PeerSpec(
            "linformer LinformerSelfAttention",
            "linformer",
            _lucid(
                "linformer",
                "LinformerSelfAttention",
                dim=lambda c, hw: c,
                seq_len=lambda c, hw: hw[0] * hw[1],
                k=256,
                heads=8,
            ),
            "k=256, 8 heads",
        )
    ],
    "nystrom": [
        PeerSpec(
            "nystrom-attention NystromAttention",
            "nystrom_attention",
            _lucid(
                "nystrom_attention",
                "NystromAttention",
                dim=lambda c, hw: c,
                heads=8,
                dim_head=lambda c, hw: c // 8,
                num_landmarks=256,
            ),
            "8 heads, 256 landmarks",
        )
    ],
    "memory_compressed": [
        PeerSpec(
            "memory-compressed-attention",
            "memory_compressed_attention",
            _lucid(
                "memory_compressed_attention",
                "MemoryCompressedAttention",
                dim=lambda c, hw: c,
                heads=8,
                compression_factor=3,
            ),
            "8 heads, factor 3",
        )
    ],
    "reformer": [
        PeerSpec(
            "reformer-pytorch LSHSelfAttention",
            "reformer_pytorch",
            _lucid(
                "reformer_pytorch",
                "LSHSelfAttention",
                dim=lambda c, hw: c,
                heads=8,
                bucket_size=64,
                n_hashes=8,
            ),
            "8 heads, bucket 64, 8 hashes (our defaults)",
        )
    ],
    "compressive": [
        PeerSpec(
            "compressive-transformer-pytorch SelfAttention",
            "compressive_transformer_pytorch",
            lambda c, hw: CompressiveBandsPeer(c, hw[1]),
            "8 heads, segments of 2 rows, memory 2 rows, compressed memory at rate 3 (our defaults)",
        )
    ],
    "pkm": [
        PeerSpec(
            "product-key-memory PKM",
            "product_key_memory",
            _lucid(
                "product_key_memory",
                "PKM",
                dim=lambda c, hw: c,
                heads=4,
                num_keys=lambda c, hw: min(512, c),
                topk=32,
                dim_head=lambda c, hw: min(512, c),
            ),
            "4 heads, min(512, C) sub-keys, top-32 (our defaults)",
        )
    ],
}


def compare(
    names: list[str],
    *,
    batch: int = 2,
    channels: int = 256,
    size: tuple[int, int] = (64, 64),
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    min_run_time: float = 0.2,
) -> list[tuple[BenchRow, BenchRow | None, str]]:
    """(ours, peer or None, peer label / failure reason) for every name with a known peer."""
    out = []
    for name in names:
        specs = PEERS.get(name, [])
        if not specs:
            continue
        ours = bench_block(
            name,
            batch=batch,
            channels=channels,
            size=size,
            dtype=dtype,
            device=device,
            min_run_time=min_run_time,
        )
        for spec in specs:
            try:
                importlib.import_module(spec.package)
            except ImportError as err:
                out.append((ours, None, f"{spec.label}: not installed ({err.name})"))
                continue
            try:
                torch.manual_seed(0)
                module = spec.build(channels, size)
                row = bench_block(
                    name,
                    batch=batch,
                    channels=channels,
                    size=size,
                    dtype=dtype,
                    device=device,
                    module=module,
                    label=spec.label,
                    min_run_time=min_run_time,
                )
                out.append((ours, row, f"{spec.label} ({spec.settings})"))
            except Exception as err:  # a broken peer is a finding to report, not a crash
                out.append((ours, None, f"{spec.label}: failed: {type(err).__name__}: {str(err)[:80]}"))
    return out


def format_ratios(rows: list[tuple[BenchRow, BenchRow | None, str]]) -> str:
    lines = [f"{'block':<20} {'time ratio':>10} {'memory ratio':>12}  peer", "-" * 78]
    for ours, peer, label in rows:
        if peer is None:
            lines.append(f"{ours.name:<20} {'-':>10} {'-':>12}  {label}")
            continue
        t = ours.fwd_bwd_ms / peer.fwd_bwd_ms if peer.fwd_bwd_ms else math.nan
        m = ours.saved_mib / peer.saved_mib if peer.saved_mib else math.nan
        lines.append(f"{ours.name:<20} {t:>10.2f} {m:>12.2f}  {label}")
    return "\n".join(lines)
