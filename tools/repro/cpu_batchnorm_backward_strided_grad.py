"""Repro (issue 16): torch's eager CPU BatchNorm backward is wrong at batch 1 on a channels-last gradient
whose batch stride is C; inductor is right. Plain torch, no visattn. Run: ``python <this file>``.

Found as "lambda's input gradient is wrong under inductor" (visattn bench --compiled lambda, B=1): eager
and aot_eager agreed and inductor differed, so inductor looked guilty. An explicit BatchNorm formula
and fp64 gradcheck show the opposite: eager's ``native_batch_norm_backward`` (aot_eager calls the
same kernel) returns a wrong input, weight and bias gradient when ``grad_output`` has shape
(1, C, H, W) and strides (C, 1, W·C, C) — channels-last, batch stride C, which is what matmul's
backward produces for ``k @ bn(x).reshape(1, C, N).transpose(1, 2)``. The same values in ordinary
channels-last strides (batch stride H·W·C), or at batch 2, come out right; slicing is not needed.

torch 2.14.1 (CPU, 1 thread), this script's output:

    direct, float64, grad_output strides (4, 1, 20, 4) vs same values contiguous: x 2.52  w 6.32  b 11.7
    direct, float64, grad_output strides (60, 1, 20, 4) vs same values contiguous: x 2.2e-16 w 8.9e-16 ...
    k @ bn(x)^T, B=1 float32 vs explicit reference: eager 28    aot_eager 28    inductor 2.9e-06 (max 25)
    k @ bn(x)^T, B=1 float64 vs explicit reference: eager 40.5  aot_eager 40.5  inductor 1.4e-14 (max 32.1)
    k @ bn(x)^T, B=2 float64 vs explicit reference: eager 2.5e-14  aot_eager 2.5e-14  inductor 1.4e-14

(max |error| of the input gradient; the exact numbers printed may differ in the last digits.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def direct(dtype: torch.dtype) -> None:
    """BatchNorm backward fed the same gradient values in two stride layouts."""
    torch.manual_seed(0)
    c, h, w = 4, 3, 5
    x = torch.randn(1, c, h, w, dtype=dtype, requires_grad=True)
    weight = torch.randn(c, dtype=dtype, requires_grad=True)
    bias = torch.randn(c, dtype=dtype, requires_grad=True)
    g = torch.randn(1, h, w, c, dtype=dtype).permute(0, 3, 1, 2)
    for strides in [(c, 1, w * c, c), g.stride()]:
        gg = g.as_strided(g.shape, strides)
        y = F.batch_norm(x, None, None, weight, bias, training=True)
        got = torch.autograd.grad(y, (x, weight, bias), gg, retain_graph=True)
        ref = torch.autograd.grad(y, (x, weight, bias), gg.contiguous())
        errs = "  ".join(f"{n} {(a - r).abs().max().item():.3g}" for n, a, r in zip("xwb", got, ref))
        print(f"direct, {dtype}, grad_output strides {tuple(strides)} vs same values contiguous: {errs}")


def via_matmul(dtype: torch.dtype, batch: int) -> None:
    """The shape that lambda's content lambda had: k @ bn(x)ᵀ, against an explicit BatchNorm formula."""
    torch.manual_seed(0)
    c, s = 16, 16
    x = torch.randn(batch, c, s, s, dtype=dtype, requires_grad=True)
    k = torch.randn(batch, 16, s * s, dtype=dtype)
    weight = torch.randn(c, dtype=dtype, requires_grad=True)
    bias = torch.randn(c, dtype=dtype, requires_grad=True)

    def bn(t):
        return F.batch_norm(t, None, None, weight, bias, training=True)

    def explicit(t):
        mean = t.mean((0, 2, 3), keepdim=True)
        var = t.var((0, 2, 3), keepdim=True, unbiased=False)
        return (t - mean) / torch.sqrt(var + 1e-5) * weight.view(1, c, 1, 1) + bias.view(1, c, 1, 1)

    def f(norm, t):
        return torch.matmul(k, norm(t).reshape(batch, c, s * s).transpose(1, 2))

    def grad_x(fn):
        return torch.autograd.grad(fn(x).sum(), x)[0]

    ref = grad_x(lambda t: f(explicit, t))
    errs = []
    for backend in ("eager", "aot_eager", "inductor"):
        torch._dynamo.reset()
        fn = (lambda t: f(bn, t)) if backend == "eager" else torch.compile(f, backend=backend, fullgraph=True)
        g = grad_x(fn if backend == "eager" else (lambda t, fn=fn: fn(bn, t)))
        errs.append(f"{backend} {(g - ref).abs().max().item():.3g}")
    print(f"k @ bn(x)^T, B={batch} {dtype}: vs explicit reference  " + "  ".join(errs), end="")
    print(f"  (max |grad x| {ref.abs().max().item():.3g})")


if __name__ == "__main__":
    print("torch", torch.__version__)
    direct(torch.float64)
    for dtype, batch in [(torch.float32, 1), (torch.float64, 1), (torch.float64, 2)]:
        via_matmul(dtype, batch)
