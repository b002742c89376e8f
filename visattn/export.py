"""Deployment checks: torch.compile, torch.export and ONNX (dynamo exporter) with onnxruntime parity.

``support_row`` runs every check on one block and is what generates docs/support.md, so the
support matrix is measured, never written by hand.
"""

from __future__ import annotations

import io
import re
import tempfile
import warnings
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .errors import VisattnError
from .registry import attn_info, create_attn, list_attns

__all__ = [
    "export_onnx",
    "onnx_max_error",
    "export_program",
    "torch_export_check",
    "graph_breaks",
    "support_row",
    "SupportRow",
    "support_markdown",
    "NotExportableError",
    "dynamic_hw_supported",
    "ONNX_TOL",
]

EXAMPLE_SHAPE = (2, 32, 16, 20)
SECOND_HW = (13, 9)


class NotExportableError(VisattnError, RuntimeError):
    """The block's method cannot be exported (its AttnInfo says so)."""


def _dynamic_hw(x: torch.Tensor) -> dict:
    h = torch.export.Dim("height", min=1, max=4096)
    w = torch.export.Dim("width", min=1, max=4096)
    return {"x": {2: h, 3: w}}


def export_program(module: torch.nn.Module, x: torch.Tensor, *, dynamic: bool = True):
    """``torch.export.export`` with dynamic H and W (or static shapes)."""
    module = module.eval()
    return torch.export.export(module, (x,), dynamic_shapes=_dynamic_hw(x) if dynamic else None)


def export_onnx(module: torch.nn.Module, x: torch.Tensor, path: str | Path, *, dynamic: bool = True) -> Path:
    """Export to ONNX with the dynamo exporter (onnxscript); H and W dynamic unless ``dynamic=False``."""
    path = Path(path)
    module = module.eval()
    with warnings.catch_warnings(), redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module, (x,), dynamo=True, dynamic_shapes=_dynamic_hw(x) if dynamic else None, verbose=False
        )
    program.save(str(path))
    return path


def onnx_max_error(path: str | Path, module: torch.nn.Module, x: torch.Tensor) -> float:
    """Max abs difference between onnxruntime (CPU) and eager on input ``x``."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.detach().cpu().numpy()})
    with torch.no_grad():
        ref = module.eval()(x)
    return float((torch.from_numpy(out) - ref.cpu()).abs().max())


def graph_breaks(module: torch.nn.Module, x: torch.Tensor) -> int:
    """Number of graph breaks dynamo hits on ``module(x)`` (0 means fullgraph works)."""
    import torch._dynamo

    torch._dynamo.reset()
    with torch.no_grad():
        return int(torch._dynamo.explain(module)(x).graph_break_count)


@dataclass
class SupportRow:
    name: str
    compile_fullgraph: bool
    graph_breaks: int | None
    torch_export: bool
    onnx_export: bool
    onnx_max_error: float | None
    dynamic_hw: bool
    note: str = ""
    torch_export_dynamic: bool = False

    @property
    def onnx_parity(self) -> bool:
        """Exported to ONNX and onnxruntime agrees with eager within ``ONNX_TOL`` (what ``exportable`` means)."""
        return self.onnx_export and self.onnx_max_error is not None and self.onnx_max_error <= ONNX_TOL


ONNX_TOL = 1e-4


def _perturbed(name: str, channels: int) -> torch.nn.Module:
    torch.manual_seed(0)
    block = create_attn(name, channels).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in block.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)  # so zero-initialised outputs do not hide errors
    return block


def _first_line(err: Exception) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))  # the exporter colours its messages
    return f"{type(err).__name__}: {text.splitlines()[0][:80] if text else ''}"


def _onnx_check(block, x, x2, tmp: Path, notes: list[str]) -> tuple[bool, float | None, bool]:
    """(exported, max abs error, dynamic): dynamic H, W first; a fixed-size export when that fails."""
    try:
        path = export_onnx(block, x, tmp / "dynamic.onnx")
    except Exception as err:
        notes.append(f"onnx dynamic: {_first_line(err)}")
    else:
        err1 = onnx_max_error(path, block, x)
        try:
            err2 = onnx_max_error(path, block, x2)
        except Exception as err:
            err2 = float("inf")
            notes.append(f"onnx at {tuple(x2.shape[2:])}: {_first_line(err)}")
        if err2 <= ONNX_TOL:
            return True, max(err1, err2), err1 <= ONNX_TOL
        if err2 < float("inf"):
            notes.append(f"onnx at {tuple(x2.shape[2:])}: max abs error {err2:.1e}")
        return True, err1, False  # the graph works at the example size (fixed-size export)
    try:
        path = export_onnx(block, x, tmp / "static.onnx", dynamic=False)
    except Exception as err:
        notes.append(f"onnx static: {_first_line(err)}")
        return False, None, False
    return True, onnx_max_error(path, block, x), False


def torch_export_check(block, x, x2, notes: list[str] | None = None):
    """``(program, dynamic)``: ``torch.export`` with dynamic H, W when the program also runs and agrees
    with eager at ``x2``'s size (its shape guards can hold), else at ``x``'s fixed size; ``(None, False)``
    when neither exports. Reasons go to ``notes``."""
    notes = [] if notes is None else notes
    try:
        program = export_program(block, x)
        with torch.no_grad():
            torch.testing.assert_close(program.module()(x2), block(x2), atol=1e-5, rtol=1e-5)
        return program, True
    except Exception as err:
        notes.append(f"torch.export dynamic: {type(err).__name__}")
    try:
        program = export_program(block, x, dynamic=False)
    except Exception as err:
        notes.append(f"torch.export static: {type(err).__name__}")
        return None, False
    notes.append("torch.export static: ok")
    return program, False


def support_row(name: str) -> SupportRow:
    """Run compile / export / ONNX checks on block ``name`` at 2x32x16x20 (and 13x9 for dynamic shapes)."""
    attn_info(name)
    b, c, h, w = EXAMPLE_SHAPE
    block = _perturbed(name, c)
    x = torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(1))
    x2 = torch.randn(b, c, *SECOND_HW, generator=torch.Generator().manual_seed(2))
    notes = []
    try:
        breaks = graph_breaks(block, x)
    except Exception as err:  # explain itself can fail on exotic ops
        breaks, _ = None, notes.append(f"dynamo: {type(err).__name__}")
    program, export_dynamic = torch_export_check(block, x, x2, notes)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_ok, err_max, dynamic = _onnx_check(block, x, x2, Path(tmp), notes)
    return SupportRow(
        name,
        breaks == 0,
        breaks,
        program is not None,
        onnx_ok,
        err_max,
        dynamic,
        "; ".join(notes),
        export_dynamic,
    )


def support_markdown(rows: list[SupportRow]) -> str:
    ok = lambda v: "yes" if v else "no"  # noqa: E731
    n = len(rows)
    parity = sum(r.onnx_parity for r in rows)
    dynamic = sum(r.onnx_parity and r.dynamic_hw for r in rows)
    lines = [
        "# Deployment support",
        "",
        "Generated by `visattn support` (runs every check; nothing here is written by hand). Each block is checked at",
        f"input {EXAMPLE_SHAPE} with perturbed weights, and at H x W = {SECOND_HW} for dynamic shapes, on CPU.",
        "",
        f"- ONNX export with onnxruntime parity (<= {ONNX_TOL:g}): {parity} / {n}, of which with dynamic H, W: "
        f"{dynamic} (the others export at a fixed input size)",
        f"- torch.compile fullgraph: {sum(r.compile_fullgraph for r in rows)} / {n}",
        f"- torch.export: {sum(r.torch_export for r in rows)} / {n}, of which with dynamic H, W: "
        f"{sum(r.torch_export_dynamic for r in rows)} (the others at a fixed size: their shape guards do not "
        "hold at a second size, see note)",
        "",
        "| block | compile fullgraph | graph breaks | torch.export | ONNX export | ORT max abs error | dynamic H, W |"
        " declared exportable | declared dynamic | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        info = attn_info(r.name)
        e = "-" if r.onnx_max_error is None else f"{r.onnx_max_error:.1e}"
        gb = "-" if r.graph_breaks is None else str(r.graph_breaks)
        tex = ("dynamic" if r.torch_export_dynamic else "static") if r.torch_export else "no"
        lines.append(
            f"| `{r.name}` | {ok(r.compile_fullgraph)} | {gb} | {tex} | {ok(r.onnx_export)} | {e} | "
            f"{ok(r.dynamic_hw)} | {ok(info.exportable)} | {ok(info.exportable and info.export_dynamic_hw)} | "
            f"{r.note} |"
        )
    limited = [(r.name, attn_info(r.name)) for r in rows]
    limited = [(n, i) for n, i in limited if not (i.exportable and i.export_dynamic_hw)]
    if limited:
        lines += [
            "",
            "Why a block does not export, or only at a fixed H, W (its `AttnInfo.export_note`):",
            "",
        ]
        lines += [
            f"- `{n}` ({'fixed size' if i.exportable else 'not exportable'}): {i.export_note}"
            for n, i in limited
        ]
    return "\n".join(lines) + "\n"


def support_table(names: list[str] | None = None) -> list[SupportRow]:
    return [support_row(n) for n in (names or list_attns())]


def as_dicts(rows: list[SupportRow]) -> list[dict]:
    return [asdict(r) for r in rows]


def dynamic_hw_supported(name: str, attn: str | None = None) -> bool:
    """Whether ``visattn export`` may declare H and W dynamic for this block (or model with ``attn``)."""
    block = name if name in list_attns() else attn
    return block is None or attn_info(block).export_dynamic_hw


def build_exportable(name: str, *, channels: int = 32, attn: str | None = None) -> torch.nn.Module:
    """Resolve ``name`` for ``visattn export``: a registry block, or a timm model name (optionally with
    ``attn`` inserted), or a segmentor zoo name when the segmentation models are available."""
    if name in list_attns():
        info = attn_info(name)
        if not info.exportable:
            raise NotExportableError(
                f"{name} is not exportable: {info.export_note} (docs/support.md); use it in eager mode or "
                "under torch.compile"
            )
        return create_attn(name, channels).eval()
    import timm

    if timm.is_model(name):
        from .models import create_model

        if attn is not None and not attn_info(attn).exportable:
            raise NotExportableError(f"{attn} is not exportable: {attn_info(attn).export_note}")
        if name.startswith("visattn_"):
            return timm.create_model(name).eval()
        return create_model(name, attn).eval()
    try:
        from .models import create_segmentor  # available once segmentation models exist
    except ImportError:
        create_segmentor = None
    if create_segmentor is not None:
        try:
            return create_segmentor(name).eval()
        except ValueError:
            pass
    raise ValueError(f"{name!r} is neither a visattn block, a timm model nor a segmentor name")
