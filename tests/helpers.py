"""Shared test helpers (imported by test modules; not a conftest so names stay explicit)."""

from __future__ import annotations

import torch

import visattn


def perturb_(module: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> torch.nn.Module:
    """Add seeded noise to every floating parameter.

    Zero-initialised output projections and gammas make many checks (causality, batch independence,
    state_dict round trips) pass trivially; perturbed weights make them able to fail.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.is_floating_point():
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype).to(p.device) * scale)
    return module


def build(name: str, channels: int = 32, *, seed: int = 0, perturb: bool = True, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    block = visattn.create_attn(name, channels, **kwargs)
    return perturb_(block, seed) if perturb else block


def feature_map(
    b: int, c: int, h: int, w: int, *, seed: int = 0, requires_grad: bool = False
) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, h, w, generator=g).requires_grad_(requires_grad)


def raster_jacobian_support(block: torch.nn.Module, c: int, h: int, w: int) -> torch.Tensor:
    """(N, N) bool: entry [p, q] is True when output position p has a non-zero gradient w.r.t.
    input position q (raster order), for a random input."""
    x = feature_map(1, c, h, w, seed=1, requires_grad=True)
    out = block(x)
    n = h * w
    support = torch.zeros(n, n, dtype=torch.bool)
    g = torch.Generator().manual_seed(2)
    weights = torch.randn(c, generator=g)
    for p in range(n):
        i, j = divmod(p, w)
        (grad,) = torch.autograd.grad((out[0, :, i, j] * weights).sum(), x, retain_graph=True)
        support[p] = grad[0].abs().sum(0).flatten() > 0
    return support


def autograd_node_names(*tensors: torch.Tensor | None) -> set[str]:
    """The class names of every autograd node behind ``tensors`` (e.g. ``AmaxBackward0``): what a backward
    pass will run, for tests that pin down which operations a forward records."""
    seen, stack, names = set(), [t.grad_fn for t in tensors if t is not None and t.grad_fn is not None], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(n for n, _ in node.next_functions)
    return names


def draw_zero_parameters_(
    module: torch.nn.Module, seed: int = 0, scale: float = 0.1, generator: torch.Generator | None = None
) -> torch.nn.Module:
    """Replace every all-zero floating parameter (residual gates, zero-initialised output projections) by
    seeded N(0, scale²) draws, so a check sees the attention path instead of the identity. ``generator``
    (instead of ``seed``): draw from it, so a caller can go on drawing its inputs from the same stream."""
    g = generator if generator is not None else torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.is_floating_point() and p.numel() and not p.any():
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return module


def fixed_state_function(module: torch.nn.Module, names: list[str], seed: int = 3):
    """``fn(x, *params)``: ``module`` called with ``params`` as its parameters ``names`` (the rest as they are),
    a fresh copy of its current buffers and the global seed set to ``seed`` every call, so the repeated
    forwards of gradcheck evaluate one function (EMA updates, in-place redraws and random draws included)."""
    buffers = {n: b.detach().clone() for n, b in module.named_buffers()}

    def fn(x, *params):
        state = {n: b.clone() for n, b in buffers.items()}
        state.update(zip(names, params))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return torch.func.functional_call(module, state, (x,))

    return fn
