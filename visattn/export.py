"""Deployment checks: torch.compile, torch.export and ONNX (dynamo exporter) with onnxruntime parity.

``support_row`` runs every check on one block and is what generates docs/support.md, so the
support matrix is measured, never written by hand. ``resolve_exportable`` and ``export_to_file`` are
``visattn export``: a block, a timm model, a zoo segmentor with its pretrained weights, a segmentor config
with a checkpoint, or a checkpoint, exported with dynamic H, W where the model allows, checked with
onnxruntime before the file is put in place.
"""

from __future__ import annotations

import copy
import difflib
import io
import os
import re
import tempfile
import warnings
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .atomic import atomic_path
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
    "Exportable",
    "ExportReport",
    "ExportMismatchError",
    "export_to_file",
    "min_input_size",
    "perturbed",
    "resolve_exportable",
]

EXAMPLE_SHAPE = (2, 32, 16, 20)
SECOND_HW = (13, 9)


class NotExportableError(VisattnError, RuntimeError):
    """The block's method cannot be exported (its AttnInfo says so)."""


class ExportMismatchError(VisattnError, RuntimeError):
    """The exported graph disagrees with eager PyTorch (nothing was written)."""


def _dynamic_hw(min_hw: int = 1, *, strict: bool = True) -> tuple:
    # Positional (one entry per forward argument), so the spec fits whatever the module calls its input:
    # blocks take ``x``, segmentors ``images``.
    if not strict:
        # A whole network divides H, W by strides and feeds the result to blocks; sympy cannot prove
        # guards such as 1 % (1 + (H - 1) // 8) != 0 for every H >= 9, so named Dims fail to export.
        # DYNAMIC keeps H, W symbolic and turns such guards into range constraints and run-time checks;
        # export_to_file then checks the graph at a second size.
        hint = torch.export.Dim.DYNAMIC(min=min_hw, max=4096)
        return ({2: hint, 3: hint},)
    h = torch.export.Dim("height", min=min_hw, max=4096)
    w = torch.export.Dim("width", min=min_hw, max=4096)
    return ({2: h, 3: w},)


def min_input_size(module: torch.nn.Module) -> int:
    """The smallest H (and W) declared for a dynamic export of ``module``: 1 for a block; for a model
    with a timm backbone, one more than its largest stride, since the exporter specialises feature maps
    of size 1 (broadcasting) and cannot prove a graph traced on larger ones valid there."""
    for candidate in (getattr(module, "backbone", None), module):
        info = getattr(candidate, "feature_info", None)
        if info is None:
            continue
        entries = getattr(info, "info", info)
        try:
            return max(int(e["reduction"]) for e in entries) + 1
        except (TypeError, KeyError, ValueError):
            continue
    return 1


def export_program(
    module: torch.nn.Module, x: torch.Tensor, *, dynamic: bool = True, min_hw: int = 1, strict: bool = True
):
    """``torch.export.export`` with dynamic H and W (>= ``min_hw``; ``strict=False``: H, W kept symbolic
    with the guards the model needs, as for whole networks), or static shapes."""
    module = module.eval()
    shapes = _dynamic_hw(min_hw, strict=strict) if dynamic else None
    return torch.export.export(module, (x,), dynamic_shapes=shapes)


def export_onnx(
    module: torch.nn.Module,
    x: torch.Tensor,
    path: str | Path,
    *,
    dynamic: bool = True,
    min_hw: int = 1,
    strict: bool = True,
) -> Path:
    """Export to ONNX with the dynamo exporter (onnxscript); H and W dynamic (>= ``min_hw``, see
    :func:`export_program` for ``strict``) unless ``dynamic=False``."""
    path = Path(path)
    module = module.eval()
    shapes = _dynamic_hw(min_hw, strict=strict) if dynamic else None
    with warnings.catch_warnings(), redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, (x,), dynamo=True, dynamic_shapes=shapes, verbose=False)
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


def _perturb_(module: torch.nn.Module, *, scale: float, seed: int, relative: bool) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if not p.is_floating_point():
                continue
            noise = torch.randn(p.shape, generator=g).to(p) * scale
            # Relative noise keeps a deep network's activations in range; a constant parameter (a zero
            # gate, a zero output projection: what makes a block the identity) gets absolute noise.
            spread = float(p.float().std()) if relative and p.numel() > 1 else 0.0
            p.add_(noise * spread if spread > 0 else noise)
    return module


def perturbed(
    module: torch.nn.Module, *, scale: float = 0.1, seed: int = 0, relative: bool = True
) -> torch.nn.Module:
    """A copy of ``module`` (eval mode) with every parameter moved off its initialisation, so a parity
    check cannot pass by comparing x with x (identity-at-init blocks) or zeros with zeros. ``relative``:
    noise of ``scale`` times each parameter's spread (absolute ``scale`` for constant parameters)."""
    return _perturb_(copy.deepcopy(module).eval(), scale=scale, seed=seed, relative=relative)


def _perturbed(name: str, channels: int) -> torch.nn.Module:
    torch.manual_seed(0)
    block = create_attn(name, channels).eval()
    return _perturb_(block, scale=0.1, seed=0, relative=False)  # the noise docs/support.md was measured with


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
        try:
            err1 = onnx_max_error(path, block, x)
        except Exception as err:  # a dynamic graph that does not even run at its own example size
            notes.append(f"onnx dynamic at {tuple(x.shape[2:])}: {_first_line(err)}")
            return _onnx_static_check(block, x, tmp, notes)
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
    return _onnx_static_check(block, x, tmp, notes)


def _onnx_static_check(block, x, tmp: Path, notes: list[str]) -> tuple[bool, float | None, bool]:
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


WEIGHT_OPTIONS = (
    "--checkpoint PATH (a checkpoint prefix such as runs/x/iter_300, its .safetensors, a work dir or a "
    ".pth/.safetensors file), or --random-weights to export the architecture with random weights"
)


@dataclass
class Exportable:
    """What ``visattn export NAME`` resolved to: the module (eval mode), its kind ("block", "timm",
    "segmentor"), where its weights came from (None: random or initialisation) and its input channels."""

    module: torch.nn.Module
    kind: str
    weights: str | None
    in_channels: int
    notes: list[str] = field(default_factory=list)


def _blocks_in(module: torch.nn.Module) -> list[str]:
    return sorted({type(m).attn_name for m in module.modules() if getattr(type(m), "attn_name", None)})


def _check_blocks_exportable(module: torch.nn.Module) -> None:
    for block in _blocks_in(module):
        info = attn_info(block)
        if not info.exportable:
            raise NotExportableError(
                f"the model contains block {block}, which is not exportable: {info.export_note} "
                "(docs/support.md); use it in eager mode or under torch.compile"
            )


def _config_beside(checkpoint: Path) -> Path | None:
    """The run config next to a checkpoint (a visattn work dir holds config.yaml beside its iter_*)."""
    candidate = checkpoint.parent / "config.yaml"
    return candidate if candidate.is_file() else None


def _zoo_name_of_file(file: Path) -> str | None:
    """The zoo entry whose published checkpoint has this file name (an mmseg .pth downloaded by hand)."""
    from . import hub

    for name, entry in hub.load_zoo().items():
        if entry.get("url") and os.path.basename(str(entry["url"])) == file.name:
            return name
    return None


def _segmentor_with_weights(source, *, checkpoint, random_weights: bool, what: str) -> Exportable:
    from .engine.checkpoint import load_weights, resolve_checkpoint
    from .models import create_segmentor

    if checkpoint is not None:
        file = resolve_checkpoint(checkpoint)
        model = create_segmentor(source)
        load_weights(model, file)
        return Exportable(model.eval(), "segmentor", f"checkpoint {file}", 3)
    if random_weights:
        return Exportable(create_segmentor(source).eval(), "segmentor", None, 3)
    raise ValueError(f"{what} has no weights to export: pass {WEIGHT_OPTIONS}")


def resolve_exportable(
    name: str,
    *,
    channels: int = 32,
    attn: str | None = None,
    checkpoint: str | os.PathLike | None = None,
    random_weights: bool = False,
) -> Exportable:
    """Resolve ``visattn export NAME``.

    NAME is a registry block (exported at its initialisation, ``channels`` wide), a zoo segmentor (its
    pretrained checkpoint, downloaded or cached through :mod:`visattn.hub`, or ``checkpoint``), a timm
    model name (with block ``attn`` inserted; weights from ``checkpoint``), a segmentor config YAML (weights
    from ``checkpoint``) or a checkpoint itself in any form :func:`visattn.engine.checkpoint.resolve_checkpoint`
    accepts (its architecture from the run's config.yaml beside it, or from the zoo entry of the same file
    name). A model without weights is refused unless ``random_weights``.
    """
    from . import hub

    if name in list_attns():
        if checkpoint is not None:
            raise ValueError(f"--checkpoint loads a model's weights; {name!r} is a single block")
        info = attn_info(name)
        if not info.exportable:
            raise NotExportableError(
                f"{name} is not exportable: {info.export_note} (docs/support.md); use it in eager mode or "
                "under torch.compile"
            )
        torch.manual_seed(0)
        return Exportable(create_attn(name, channels).eval(), "block", None, channels)
    if name in hub.list_pretrained():
        if checkpoint is not None or random_weights:
            return _segmentor_with_weights(
                name, checkpoint=checkpoint, random_weights=random_weights, what=name
            )
        from .models import create_segmentor

        path = hub.pretrained_path(
            name, hint="pass the file with --checkpoint PATH (or --random-weights for random weights)"
        )
        model = create_segmentor(name, checkpoint_path=path)
        return Exportable(model.eval(), "segmentor", f"pretrained zoo checkpoint {path}", 3)
    import timm

    if timm.is_model(name):
        from .engine.checkpoint import load_weights
        from .models import create_model

        if attn is not None and not attn_info(attn).exportable:
            raise NotExportableError(f"{attn} is not exportable: {attn_info(attn).export_note}")
        model = timm.create_model(name) if name.startswith("visattn_") else create_model(name, attn)
        if checkpoint is not None:
            file = load_weights(model, checkpoint)
            return Exportable(model.eval(), "timm", f"checkpoint {file}", 3)
        if not random_weights:
            raise ValueError(f"timm model {name!r} has no weights to export: pass {WEIGHT_OPTIONS}")
        return Exportable(model.eval(), "timm", None, 3)
    path = Path(name).expanduser()
    if name.endswith((".yaml", ".yml")):
        if not path.is_file():
            raise FileNotFoundError(f"segmentor config {name!r} does not exist")
        return _segmentor_with_weights(
            str(path), checkpoint=checkpoint, random_weights=random_weights, what=f"config {name}"
        )
    from .engine.checkpoint import resolve_checkpoint

    try:
        file = resolve_checkpoint(name)
    except hub.CheckpointError:
        file = None
    if file is not None:
        if checkpoint is not None:
            raise ValueError(
                f"{name!r} is itself a checkpoint; give either it or --checkpoint, not both (to pair a "
                "config with a checkpoint: visattn export CONFIG.yaml --checkpoint PATH)"
            )
        config = _config_beside(file)
        source = str(config) if config is not None else _zoo_name_of_file(file)
        if source is None:
            raise ValueError(
                f"checkpoint {file} has no config.yaml beside it and is no zoo file, so its architecture is "
                "unknown: give the config, visattn export CONFIG.yaml --checkpoint " + name
            )
        return _segmentor_with_weights(source, checkpoint=file, random_weights=False, what=name)
    close = difflib.get_close_matches(name, [*list_attns(), *hub.list_pretrained()], n=5, cutoff=0.6)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ValueError(
        f"{name!r} is neither a visattn block, a zoo segmentor, a timm model, a config YAML nor a checkpoint."
        f"{hint} See `visattn list`, visattn.hub.list_pretrained() or timm.list_models()."
    )


def build_exportable(name: str, *, channels: int = 32, attn: str | None = None) -> torch.nn.Module:
    """The module of ``resolve_exportable`` with random weights allowed (kept for callers of the old API)."""
    return resolve_exportable(name, channels=channels, attn=attn, random_weights=True).module


@dataclass
class ExportReport:
    """What :func:`export_to_file` wrote and checked."""

    path: Path
    format: str
    dynamic: bool
    min_hw: int
    sizes: list[tuple[int, int]]
    max_errors: list[float]
    checked_on: str
    notes: list[str] = field(default_factory=list)


def _second_size(h: int, w: int, min_hw: int) -> tuple[int, int]:
    # Different in both dimensions and not a stride multiple, so padding and resizing paths run.
    return max(min_hw, h * 3 // 4 + 1), max(min_hw, w * 3 // 4 + 3)


def _parity(errors: list[float], refs: list[float], tol: float) -> bool:
    return all(e <= tol * max(1.0, r) for e, r in zip(errors, refs))


def export_to_file(
    exp: Exportable,
    out: str | os.PathLike,
    *,
    size: tuple[int, int],
    batch: int = 1,
    dynamic: bool = True,
    fmt: str = "onnx",
) -> ExportReport:
    """Export ``exp.module`` to ``out`` (ONNX with the dynamo exporter, or a torch.export program) and
    check it before anything is written: the graph must agree with eager at ``size`` and, when H and W
    are dynamic, at a second size (within ``ONNX_TOL``, relative to the logits' magnitude when above 1).

    Random or initial weights are checked on a perturbed copy (:func:`perturbed`), exported the same way,
    so an identity-at-init block cannot pass by comparing x with x; real weights are checked as written.
    The file appears atomically (temporary file in the same folder, then ``os.replace``); a graph that
    disagrees raises :class:`ExportMismatchError` and leaves ``out`` untouched.
    """
    if fmt not in ("onnx", "export"):
        raise ValueError(f"export format must be 'onnx' or 'export', got {fmt!r}")
    out = Path(out)
    module = exp.module.eval()
    _check_blocks_exportable(module)
    notes = list(exp.notes)
    h, w = size
    if h < 1 or w < 1 or batch < 1:
        raise ValueError(f"export size {h}x{w} and batch {batch} must be positive")
    limited = [b for b in _blocks_in(module) if not attn_info(b).export_dynamic_hw]
    if dynamic and limited:
        notes.append(f"fixed size {h}x{w}: {attn_info(limited[0]).export_note}")
        dynamic = False
    min_hw = 1 if exp.kind == "block" else min_input_size(module)
    if dynamic and min(h, w) < min_hw:
        raise ValueError(
            f"--size {h}x{w}: a dynamic export of this model needs H, W >= {min_hw} (its largest stride + 1); "
            f"give --size of at least {min_hw}x{min_hw}, or --static"
        )
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, exp.in_channels, h, w, generator=g)
    sizes = [(h, w)] + ([_second_size(h, w, min_hw)] if dynamic else [])
    inputs = [x] + [torch.randn(batch, exp.in_channels, *hw, generator=g) for hw in sizes[1:]]
    if exp.weights is None:
        check = perturbed(module, relative=exp.kind != "block")
        checked_on = "a perturbed copy (random/initial weights moved off their initialisation)"
    else:
        check = module
        checked_on = f"the exported weights ({exp.weights})"
    with torch.no_grad():
        refs = [check(xi) for xi in inputs]
    with atomic_path(out) as tmp:
        try:
            errors = _write_checked(module, check, tmp, out, fmt, inputs, refs, dynamic, min_hw, exp.kind)
        except Exception as err:
            if not dynamic:
                raise
            # Dynamic H, W "where the model allows": a model the exporter cannot trace, serialise or
            # reproduce at a second size symbolically still exports at the example size, with the reason.
            notes.append(f"fixed size {h}x{w}: the dynamic export failed ({_first_line(err)})")
            dynamic, inputs, refs, sizes = False, inputs[:1], refs[:1], sizes[:1]
            errors = _write_checked(module, check, tmp, out, fmt, inputs, refs, dynamic, min_hw, exp.kind)
        if errors is None:
            notes.append("parity NOT checked: onnxruntime is not installed (pip install 'visattn[export]')")
            errors = []
    return ExportReport(out, fmt, dynamic, min_hw, sizes, errors, checked_on, notes)


def _write_checked(module, check, tmp: Path, out: Path, fmt: str, inputs, refs, dynamic, min_hw, kind):
    """Export ``module`` to ``tmp`` and return the max abs errors of the graph exported from ``check``
    (the same module, or its perturbed copy) at each input; ExportMismatchError beyond tolerance."""
    x = inputs[0]
    opts = dict(dynamic=dynamic, min_hw=min_hw, strict=kind == "block")
    if fmt == "onnx":
        export_onnx(module, x, tmp, **opts)
        with tempfile.TemporaryDirectory() as scratch:
            check_path = tmp if check is module else export_onnx(check, x, Path(scratch) / "c.onnx", **opts)
            errors = _ort_errors(check_path, inputs, refs)
    else:
        program = export_program(module, x, **opts)
        checked = program if check is module else export_program(check, x, **opts)
        with torch.no_grad():
            errors = [float((checked.module()(xi) - r).abs().max()) for xi, r in zip(inputs, refs)]
        torch.export.save(program, str(tmp))
    scales = [float(r.abs().max()) for r in refs]
    if errors is not None and not _parity(errors, scales, ONNX_TOL):
        shown = ", ".join(f"{e:.2e} at {tuple(xi.shape[2:])}" for e, xi in zip(errors, inputs))
        raise ExportMismatchError(
            f"the exported graph disagrees with eager PyTorch (max abs error {shown}; tolerance "
            f"{ONNX_TOL:g} x max(1, |output|)); nothing was written to {out}"
        )
    return errors


def _ort_errors(path: Path, inputs: list[torch.Tensor], refs: list[torch.Tensor]) -> list[float] | None:
    """onnxruntime's max abs error against ``refs`` at each input; None when onnxruntime is missing."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    errors = []
    for xi, ref in zip(inputs, refs):
        (got,) = session.run(None, {name: xi.numpy()})
        errors.append(float((torch.from_numpy(got) - ref.cpu()).abs().max()))
    return errors
