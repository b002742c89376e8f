"""The CPU speed-ups of gcnet, cbam and compressive (issue 16) compute what the code before them computed.

Each block's previous forward is kept here, verbatim, as the reference. The faster code (gcnet and cbam:
hand-written backward passes for the pooling steps; compressive: key windows gathered in one index_select,
compression as one matmul over token rows) must give the same outputs and the same input and parameter
gradients, in float32 and float64, on odd sizes, batches > 1, channels-last inputs and inputs with
ties in the max-pooling; and the fast path must actually run (a test that only exercised the reference
would pass on anything).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from helpers import autograd_node_names
from hypothesis import given, settings
from hypothesis import strategies as st

import visattn
from visattn.attn.compressive import band_windows
from visattn.bench.measure import saved_activation_bytes
from visattn.layers import multihead_sdpa, to_map, to_tokens

TOL = {torch.float32: dict(rtol=1e-6, atol=1e-6), torch.float64: dict(rtol=1e-12, atol=1e-12)}


def gcnet_reference(self, x: torch.Tensor) -> torch.Tensor:
    """GlobalContextBlock._forward before issue 16."""
    weights = rearrange(self.attn_logits(x), "b 1 h w -> b (h w) 1").softmax(dim=1)
    context = torch.bmm(rearrange(x, "b c h w -> b c (h w)"), weights)  # (B, C, 1)
    return x + self.transform(context.unsqueeze(-1))


def cbam_reference(self, x: torch.Tensor) -> torch.Tensor:
    """CBAM._forward before issue 16."""
    channel_logits = self.mlp(x.mean((2, 3), keepdim=True)) + self.mlp(x.amax((2, 3), keepdim=True))
    x = x * channel_logits.sigmoid()
    pooled = torch.cat([x.amax(1, keepdim=True), x.mean(1, keepdim=True)], dim=1)
    return x * self.spatial(pooled).sigmoid()


REFERENCES = {"gcnet": gcnet_reference, "cbam": cbam_reference}
# The autograd node each fast path puts in the graph.
FAST_NODES = {"gcnet": "_ContextPoolBackward", "cbam": "_MeanMaxPoolBackward"}


def _block(name: str, channels: int, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """The block with every parameter random (gcnet's last conv is zero at init, which would hide the
    transform's and the pooling's gradients)."""
    torch.manual_seed(seed)
    block = visattn.create_attn(name, channels).to(dtype)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.3)
    return block


def _graph_nodes(out: torch.Tensor) -> set[str]:
    return autograd_node_names(out)


def _outputs_and_grads(fn, block, x, grad_out):
    x = x.detach().requires_grad_(x.requires_grad)
    out = fn(x)
    inputs = [x] if x.requires_grad else []
    inputs += list(block.parameters())
    grads = torch.autograd.grad(out, inputs, grad_out)
    return out, grads, _graph_nodes(out)


def _check_equal(name, block, x, *, seed=1):
    """Outputs and gradients of the block (fast path) equal the reference forward's."""
    gen = torch.Generator().manual_seed(seed)
    grad_out = torch.randn(x.shape, generator=gen, dtype=x.dtype)
    fast, fast_grads, nodes = _outputs_and_grads(block, block, x, grad_out)
    ref, ref_grads, _ = _outputs_and_grads(lambda t: REFERENCES[name](block, t), block, x, grad_out)
    assert FAST_NODES[name] in nodes, f"{name}: the fast path did not run"
    # The forward runs the reference's own ops: bit-identical.
    assert torch.equal(fast, ref)
    assert len(fast_grads) == len(ref_grads)
    for got, want in zip(fast_grads, ref_grads):
        torch.testing.assert_close(got, want, **TOL[x.dtype])


SHAPES = [(3, 24, 5, 7), (2, 16, 1, 1), (1, 40, 9, 2), (4, 8, 3, 11)]


@pytest.mark.parametrize("name", ["gcnet", "cbam"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fast_backward_equals_previous_forward(name, dtype, shape):
    block = _block(name, shape[1], dtype)
    x = torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(2)).requires_grad_()
    _check_equal(name, block, x)


@pytest.mark.parametrize("name", ["gcnet", "cbam"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ties_channels_last_and_frozen_input(name, dtype):
    """Max-pool ties (ReLU'd, rounded inputs: many equal maxima, zeros included) share the gradient as
    amax does; a channels-last input; an input that needs no gradient (only the parameters learn)."""
    block = _block(name, 24, dtype)
    gen = torch.Generator().manual_seed(3)
    tied = torch.randn(3, 24, 6, 5, generator=gen, dtype=dtype).mul(2).relu().round().requires_grad_()
    _check_equal(name, block, tied)
    channels_last = torch.randn(2, 24, 7, 6, generator=gen, dtype=dtype).to(memory_format=torch.channels_last)
    _check_equal(name, block, channels_last.requires_grad_())
    _check_equal(name, block, torch.randn(2, 24, 5, 5, generator=gen, dtype=dtype))


@pytest.mark.parametrize("name", ["gcnet", "cbam"])
def test_train_and_eval_modes_and_accumulation(name):
    """A training step through the block accumulates the same .grad as the reference, twice over (the
    fast backward adds into an existing .grad like any other), in train and eval mode."""
    for train in (True, False):
        block = _block(name, 16, torch.float64).train(train)
        ref_block = _block(name, 16, torch.float64).train(train)
        x = torch.randn(2, 16, 6, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        for _ in range(2):
            block(xa).square().sum().backward()
            REFERENCES[name](ref_block, xb).square().sum().backward()
        torch.testing.assert_close(xa.grad, xb.grad, **TOL[torch.float64])
        for p, q in zip(block.parameters(), ref_block.parameters()):
            torch.testing.assert_close(p.grad, q.grad, **TOL[torch.float64])


@pytest.mark.parametrize("name", ["gcnet", "cbam"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_second_derivatives_equal_previous_forward(name, channels_last):
    """create_graph=True (gradient penalties): the hand-written backward is itself differentiated, and
    the second derivatives w.r.t. the input and every parameter equal the reference's."""
    block = _block(name, 8, torch.float64)
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 8, 3, 4, dtype=torch.float64, generator=gen)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    grad_out = torch.randn(2, 8, 3, 4, dtype=torch.float64, generator=gen)
    inputs = [x, *block.parameters()]
    results = []
    for fn in (block, lambda t: REFERENCES[name](block, t)):
        (gx,) = torch.autograd.grad(fn(x), x, grad_out, create_graph=True)
        second = torch.autograd.grad(gx.square().sum(), inputs, allow_unused=True)
        results.append([torch.zeros_like(t) if g is None else g for g, t in zip(second, inputs)])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, **TOL[torch.float64])


@pytest.mark.parametrize("name", ["gcnet", "cbam"])
def test_plain_ops_where_the_fast_path_does_not_apply(name):
    """No grad, autocast and compiled graphs run the reference ops (no custom node), with equal values."""
    block = _block(name, 16, torch.float32)
    x = torch.randn(2, 16, 5, 6, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(block(x), REFERENCES[name](block, x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = block(x.requires_grad_())
        ref = REFERENCES[name](block, x)
    assert FAST_NODES[name] not in _graph_nodes(out)
    assert torch.equal(out, ref)
    compiled = torch.compile(block, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), REFERENCES[name](block, x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["gcnet", "cbam"])
def test_fast_path_keeps_no_more_activations(name):
    block = _block(name, 32, torch.float32)
    x = torch.randn(2, 32, 16, 16, requires_grad=True)
    fast = saved_activation_bytes(block, x)
    ref = saved_activation_bytes(lambda t: REFERENCES[name](block, t), x)
    assert fast <= ref, (fast, ref)


@settings(max_examples=12, derandomize=True, deadline=None, database=None)
@given(
    name=st.sampled_from(["gcnet", "cbam"]),
    batch=st.integers(1, 3),
    channels=st.sampled_from([8, 16, 24]),
    height=st.integers(1, 9),
    width=st.integers(1, 9),
    seed=st.integers(0, 2**16),
)
def test_fast_backward_equals_previous_forward_fuzzed(name, batch, channels, height, width, seed):
    block = _block(name, channels, torch.float64, seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, height, width, generator=gen, dtype=torch.float64)
    _check_equal(name, block, x.requires_grad_(), seed=seed + 1)


# --- compressive before issue 16 (verbatim but for names) ---


def band_windows_reference(
    kv: torch.Tensor, ckv: torch.Tensor | None, height: int, band_rows: int, mem_rows: int, cmem_rows: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """compressive.band_windows before issue 16 (overlapping unfold windows, then cat)."""
    b, m, cm = band_rows, mem_rows, cmem_rows
    nb, width, dev = (kv.shape[1] - m) // b, kv.shape[2], kv.device
    # Band t's raw window: padded rows [t*b, t*b + m + b) = memory rows then the band's rows.
    win = kv.unfold(1, m + b, b).permute(0, 1, 4, 2, 3).flatten(2, 3)  # (B, nb, (m+b)*W, C')
    row = torch.arange(m + b, device=dev).repeat_interleave(width) + torch.arange(nb, device=dev)[:, None] * b
    key_ok = (row >= m) & (row < m + height)  # padded rows -> real rows
    if ckv is not None:
        wc = ckv.shape[2]
        # Compressed row r sits at padded index r + m + cm; band t's window is [t*b, t*b + cm).
        cwin = ckv.unfold(1, cm, b)[:, :nb].permute(0, 1, 4, 2, 3).flatten(2, 3)  # (B, nb, cm*wc, C')
        crow = torch.arange(cm, device=dev).repeat_interleave(wc) + torch.arange(nb, device=dev)[:, None] * b
        win = torch.cat([cwin, win], dim=2)
        key_ok = torch.cat([crow >= m + cm, key_ok], dim=1)
    return win, key_ok


def compressive_reference(self, x: torch.Tensor) -> torch.Tensor:
    """CompressiveAttention._forward before issue 16 (conv compression of NCHW rows)."""
    bsz, _, height, width = x.shape
    b, m, cm = self.band_rows, self.mem_rows, self.cmem_rows
    nb = -(-height // b)
    h_pad, n = nb * b, b * width
    dev = x.device
    # Rows padded with m empty rows on top (memory of the first bands) and up to a whole last band.
    x_pad = F.pad(x, (0, 0, m, h_pad - height))
    tokens = to_tokens(x_pad)
    q = self.q(tokens[:, m * width :])
    kv = self.kv(tokens).unflatten(1, (m + h_pad, width))
    # Rows that some band sees compressed: those evicted before the last band starts.
    n_comp = (nb - 1) * b - m if cm else 0
    ckv = None
    if n_comp > 0:
        comp = self._compress(x[:, :, :n_comp])
        wc = comp.shape[3]
        ckv = self.kv(to_tokens(F.pad(comp, (0, 0, m + cm, 0)))).unflatten(1, (n_comp + m + cm, wc))
    raw, key_ok = band_windows_reference(kv, ckv, height, b, m, cm)
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
        self.aux_loss = _compressive_reference_loss(self, x, q, kv[:, :h_pad], height)
    return x + to_map(self.proj(out), height, width)


def _compressive_reference_loss(
    self, x: torch.Tensor, q: torch.Tensor, kv: torch.Tensor, height: int
) -> torch.Tensor:
    """CompressiveAttention._batched_reconstruction_loss before issue 16."""
    bsz, _, _, width = x.shape
    b, m = self.band_rows, self.mem_rows
    nb, h_pad = q.shape[1] // (b * width), kv.shape[1]
    first = m // b  # bands before it evict nothing (their rows fit in the memory)
    comp = self._compress(F.pad(x[:, :, : height - m].detach(), (0, 0, m, h_pad - height)))
    wc = comp.shape[3]
    k_c, v_c = F.linear(to_tokens(comp), self.kv.weight.detach(), self.kv.bias.detach()).chunk(2, dim=-1)
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
    acc = torch.promote_types(target.dtype, torch.float32)
    sq = (approx.to(acc) - target.to(acc)).square().unflatten(0, (bsz, nb - first))
    # Each band's loss is a mean over its own real tokens (the last band may be short): weight 1/count.
    rows_in_band = (height - torch.arange(first, nb, device=dev) * b).clamp(max=b)
    query_ok = torch.arange(b * width, device=dev) < (rows_in_band * width)[:, None]
    weight = query_ok.to(acc) / (bsz * rows_in_band * width * x.shape[1])[:, None]
    return (sq.sum(-1) * weight).sum()


COMPRESSIVE_CASES = [
    ({}, (11, 5)),
    ({"band_rows": 3, "mem_rows": 1, "cmem_rows": 4}, (11, 5)),
    ({"band_rows": 2, "mem_rows": 3, "cmem_rows": 2, "compression": 2}, (9, 7)),
    ({"compression": 4}, (13, 9)),
    ({"mem_rows": 0}, (7, 6)),
    ({"cmem_rows": 0}, (5, 3)),
    ({"band_rows": 4, "mem_rows": 5}, (13, 3)),
    ({}, (3, 4)),
    ({}, (1, 1)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("kwargs, size", COMPRESSIVE_CASES)
def test_compressive_equals_previous_forward(dtype, causal, train, kwargs, size):
    """Outputs, the reconstruction loss (training) and the gradients of the input and every parameter."""
    torch.manual_seed(0)
    block = visattn.create_attn("compressive", 16, heads=2, causal=causal, **kwargs).to(dtype).train(train)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.3)
    x = torch.randn(2, 16, *size, dtype=dtype, generator=torch.Generator().manual_seed(7))
    grad_out = torch.randn(x.shape, dtype=dtype, generator=torch.Generator().manual_seed(8))
    results = []
    for fn in (block, lambda t: compressive_reference(block, t)):
        xr = x.clone().requires_grad_()
        out = fn(xr)
        aux = block.aux_loss
        loss = (out * grad_out).sum() + (0 if aux is None else aux)
        results.append((out, aux, torch.autograd.grad(loss, [xr, *block.parameters()], allow_unused=True)))
    (out, aux, grads), (ref, ref_aux, ref_grads) = results
    torch.testing.assert_close(out, ref, **TOL[dtype])
    assert (aux is None) == (ref_aux is None)
    if aux is not None:
        torch.testing.assert_close(aux, ref_aux, **TOL[dtype])
    names = ["x"] + [name for name, _ in block.named_parameters()]
    for name, got, want in zip(names, grads, ref_grads):
        assert (got is None) == (want is None), name
        if got is None:
            continue
        tol = TOL[dtype]
        if dtype == torch.float32:
            # The compression is now a matmul, not oneDNN's convolution: the same sums in another order.
            # Parameter gradients sum thousands of terms, so float32 agrees to 1e-6 of the gradient's
            # scale (4x for the biases' cancelling sums), float64 to 1e-12 as everywhere.
            tol = dict(rtol=1e-6, atol=4e-6 * max(1.0, want.abs().max().item()))
        torch.testing.assert_close(got, want, **tol, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize(
    "b, m, cm, height, width, wc",
    [(2, 2, 6, 10, 8, 3), (3, 1, 4, 11, 5, 2), (2, 3, 2, 9, 7, 4), (4, 5, 0, 13, 3, 0), (1, 2, 3, 1, 1, 1)],
)
def test_band_windows_equal_previous(b, m, cm, height, width, wc):
    """The gathered windows are the unfolded ones bit for bit (the ViT mixer cuts its windows here too),
    with the same key mask and gradients."""
    nb = -(-height // b)
    gen = torch.Generator().manual_seed(9)
    kv = torch.randn(2, m + nb * b, width, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    n_comp = (nb - 1) * b - m if cm else 0
    ckv = None
    if n_comp > 0:
        ckv = torch.randn(2, m + cm + n_comp, wc, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    win, key_ok = band_windows(kv, ckv, height, b, m, cm)
    ref, ref_ok = band_windows_reference(kv, ckv, height, b, m, cm)
    assert torch.equal(win, ref) and torch.equal(key_ok, ref_ok)
    inputs = [kv] if ckv is None else [kv, ckv]
    grad = torch.randn(win.shape, dtype=torch.float64, generator=gen)
    for got, want in zip(torch.autograd.grad(win, inputs, grad), torch.autograd.grad(ref, inputs, grad)):
        torch.testing.assert_close(got, want, **TOL[torch.float64])
