"""Deployment: ONNX (dynamo exporter) + onnxruntime parity, torch.export, driven by AttnInfo flags.

The full matrix over every block is `pytest -m slow`; the default run checks a representative subset.
"""

from __future__ import annotations

import pytest
import torch

import visattn
from visattn import cli, export

pytest.importorskip("onnxruntime")

EXPORTABLE = [n for n in visattn.list_attns() if visattn.attn_info(n).exportable]
# Covers dense, criss-cross, gating, the sparse-pattern engine (dynamic) and a fixed-size export (reformer).
REPRESENTATIVE = ["axial", "ccnet", "cbam", "gcnet", "nonlocal", "longformer", "reformer"]


def _params(names):
    return [n if n in REPRESENTATIVE else pytest.param(n, marks=pytest.mark.slow) for n in names]


@pytest.mark.parametrize("name", _params(EXPORTABLE))
def test_onnx_parity(name, tmp_path):
    """ONNX at 2x32x16x20 equals eager within 1e-4; again at a second H x W when dynamic H, W are declared."""
    dynamic = visattn.attn_info(name).export_dynamic_hw
    block = export._perturbed(name, 32)
    x = torch.randn(*export.EXAMPLE_SHAPE)
    path = export.export_onnx(block, x, tmp_path / f"{name}.onnx", dynamic=dynamic)
    assert export.onnx_max_error(path, block, x) <= export.ONNX_TOL
    if dynamic:
        x2 = torch.randn(2, 32, *export.SECOND_HW)
        assert export.onnx_max_error(path, block, x2) <= export.ONNX_TOL


@pytest.mark.parametrize("name", _params(EXPORTABLE))
def test_torch_export(name):
    """torch.export succeeds for every exportable block; dynamic H, W where the program's shape guards
    hold at a second size (docs/support.md records which), else at the example shape."""
    block = export._perturbed(name, 32)
    x = torch.randn(*export.EXAMPLE_SHAPE)
    x2 = torch.randn(2, 32, *export.SECOND_HW)
    program, dynamic = export.torch_export_check(block, x, x2)
    assert program is not None
    x_check = x2 if dynamic else torch.randn(*export.EXAMPLE_SHAPE)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x_check), block(x_check), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", _params(visattn.list_attns()))
def test_declared_flags_match_measurement(name):
    row = export.support_row(name)
    info = visattn.attn_info(name)
    assert row.onnx_parity == info.exportable, row.note
    if info.exportable:
        assert row.dynamic_hw == info.export_dynamic_hw, row.note
    if info.compile_fullgraph:
        assert row.compile_fullgraph, f"{name}: {row.graph_breaks} graph breaks"


def test_timm_model_with_attention_exports(tmp_path):
    model = visattn.create_model("resnet18", "ccnet", num_classes=5).eval()
    for m in model.modules():
        if getattr(type(m), "attn_name", "") == "ccnet":
            torch.nn.init.constant_(m.gamma, 0.5)  # make the attention visible in the output
    x = torch.randn(1, 3, 64, 64)
    path = export.export_onnx(model, x, tmp_path / "r18.onnx")
    assert export.onnx_max_error(path, model, x) <= 1e-4
    assert export.onnx_max_error(path, model, torch.randn(1, 3, 48, 80)) <= 1e-4


def test_export_cli_refuses_non_exportable_with_reason(tmp_path, capsys):
    names = [n for n in visattn.list_attns() if not visattn.attn_info(n).exportable]
    if not names:
        pytest.skip("every block is exportable")
    assert cli.main(["export", names[0], "-o", str(tmp_path / "x.onnx")]) == 2
    err = capsys.readouterr().err
    assert "not exportable" in err and visattn.attn_info(names[0]).export_note in err


def test_export_cli_falls_back_to_fixed_size_where_dynamic_is_not_declared(tmp_path, capsys, monkeypatch):
    import dataclasses

    from visattn import registry

    cls, info = registry._REGISTRY["cbam"]
    info = dataclasses.replace(info, export_dynamic_hw=False, export_note="a test reason")
    monkeypatch.setitem(registry._REGISTRY, "cbam", (cls, info))
    out = tmp_path / "cbam.onnx"
    assert cli.main(["export", "cbam", "-o", str(out), "--size", "8x6"]) == 0
    assert "fixed size 8x6: a test reason" in capsys.readouterr().err
    import onnx

    dims = [d.dim_value for d in onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim]
    assert dims[2:] == [8, 6]


def test_export_cli_writes_checked_onnx(tmp_path, capsys):
    out = tmp_path / "cbam.onnx"
    assert cli.main(["export", "cbam", "-o", str(out)]) == 0
    assert out.stat().st_size > 0 and "max abs error" in capsys.readouterr().out


def test_support_doc_lists_every_block():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "support.md").read_text()
    for name in visattn.list_attns():
        assert f"| `{name}` |" in text, (
            f"docs/support.md lacks {name}: run `visattn support -o docs/support.md`"
        )


def test_segmentor_exports(tmp_path):
    """ccnet R-50-D8 (random weights) to ONNX at a fixed size (torch.export cannot prove the backbone's
    stride guards for free H, W), checked with onnxruntime."""
    torch.manual_seed(0)
    model = visattn.create_segmentor("ccnet_r50-d8_cityscapes-512x1024").eval()
    for m in model.modules():
        if getattr(type(m), "attn_name", "") == "ccnet":
            torch.nn.init.constant_(m.gamma, 0.5)
    x = torch.randn(1, 3, 64, 64)
    path = export.export_onnx(model, x, tmp_path / "ccnet_seg.onnx", dynamic=False)
    assert export.onnx_max_error(path, model, x) <= 1e-4


def test_support_row_survives_a_dynamic_graph_that_does_not_run():
    """compressive's dynamic ONNX graph fails inside onnxruntime even at its example size (its band windows
    are sized from H): the support check must record that and measure the fixed-size export, as the block
    declares, instead of stopping `visattn support` with an onnxruntime error (it did)."""
    from visattn import export

    row = export.support_row("compressive")
    assert row.onnx_parity and not row.dynamic_hw
    assert "onnx dynamic at (16, 20)" in row.note
