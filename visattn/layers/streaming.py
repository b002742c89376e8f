"""Row-band recurrence and streaming, shared by the segment-recurrent blocks (Compressive, Memformer).

A sequence model with segment-level recurrence sees a (B, C, H, W) map as a sequence of row-bands in raster
order: band t holds rows ``[t*b, (t+1)*b)`` (``b = band_rows``; the last band holds the remaining rows, so no
padding is needed). The block processes one band at a time and carries a per-sample *state* (its memory)
from band to band; the state has a fixed maximum size, so a map of any height is processed with bounded
memory. ``forward`` is exactly ``init_state`` followed by ``step`` over the bands, which is what makes the
streaming API below equal to the one-shot forward.

Streaming API (every :class:`BandRecurrentBlock`)::

    state = block.init_state(batch, width, device=x.device, dtype=x.dtype)
    for band in split_bands(tall_image, block.band_rows):      # or bands read from disk one by one
        out, state = block.step(band, state)                   # out: (B, C, rows, W)

    outs = list(stream(block, bands))                          # the same loop as a generator

Feeding the bands of ``split_bands(x, block.band_rows)`` reproduces ``block(x)`` band by band; feeding bands
with another row count changes the segmentation (and so the result), as it would for the sequence model.
The state is a ``dict`` of tensors whose first dimension is the batch: samples never mix.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from .block import AttnBlock, check_feature_map

__all__ = ["BandRecurrentBlock", "BandState", "split_bands", "stream"]

BandState = dict[str, torch.Tensor]


def split_bands(x: torch.Tensor, band_rows: int) -> tuple[torch.Tensor, ...]:
    """Split a (B, C, H, W) map into consecutive row-bands of ``band_rows`` rows (the last one shorter)."""
    if band_rows < 1:
        raise ValueError(f"split_bands: band_rows must be >= 1, got {band_rows}")
    return torch.split(x, band_rows, dim=2)


class BandRecurrentBlock(AttnBlock):
    """Base of blocks that are recurrent over row-bands.

    Subclasses set ``self.band_rows`` and implement ``init_state(batch, width, *, device, dtype)`` and
    ``_step(band, state) -> (out, state)``; this class gives them ``forward`` (the loop over bands) and a
    validated public ``step``.
    """

    band_rows: int

    def init_state(self, batch: int, width: int, *, device=None, dtype=None) -> BandState:  # pragma: no cover
        raise NotImplementedError

    def _step(
        self, band: torch.Tensor, state: BandState
    ) -> tuple[torch.Tensor, BandState]:  # pragma: no cover
        raise NotImplementedError

    def step(self, band: torch.Tensor, state: BandState) -> tuple[torch.Tensor, BandState]:
        """Process one band (B, C, rows, W), 1 <= rows <= band_rows, given the state left by the previous
        bands; returns the band's output and the new state. The input state is not modified."""
        name = self._block_name()
        check_feature_map(band, self.channels, name)
        if band.shape[2] > self.band_rows:
            raise ValueError(
                f"{name}: a band has at most band_rows={self.band_rows} rows, got a band of shape "
                f"{tuple(band.shape)}; split the map with visattn.layers.streaming.split_bands"
            )
        for key, value in state.items():
            if value.dim() > 0 and value.shape[0] != band.shape[0]:
                raise ValueError(
                    f"{name}: state[{key!r}] holds a batch of {value.shape[0]} but the band has shape "
                    f"{tuple(band.shape)}; create the state with init_state({band.shape[0]}, ...)"
                )
        problem = self._check_state(band, state)
        if problem:
            raise ValueError(f"{name}: {problem}")
        return self._step(band, state)

    def _check_state(self, band: torch.Tensor, state: BandState) -> str | None:
        """A message when ``state`` does not fit ``band`` (e.g. was made for another width), else None."""
        return None

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._reference_forward(x)

    def _reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``init_state`` then ``_step`` band by band: the definition of the one-shot forward. A subclass may
        override ``_forward`` with a form vectorised across bands; this loop stays as its oracle (tests
        compare the two) and is what ``step``/``stream`` compute band by band."""
        state = self.init_state(x.shape[0], x.shape[3], device=x.device, dtype=x.dtype)
        outs = []
        for band in split_bands(x, self.band_rows):
            out, state = self._step(band, state)
            outs.append(out)
        self._finish(state)
        return torch.cat(outs, dim=2)

    def _finish(self, state: BandState) -> None:
        """Hook called with the final state of a one-shot forward (e.g. to expose an auxiliary loss)."""


def stream(
    block: BandRecurrentBlock, bands: Iterable[torch.Tensor], *, state: BandState | None = None
) -> Iterator[torch.Tensor]:
    """Yield ``block``'s output for each band of ``bands`` (an iterable of (B, C, rows, W) tensors, e.g. read
    lazily from a tall image), keeping only the block's bounded state between bands."""
    for band in bands:
        if state is None:
            state = block.init_state(band.shape[0], band.shape[3], device=band.device, dtype=band.dtype)
        out, state = block.step(band, state)
        yield out
