"""visattn.viz: exact query maps (numbers, not pictures), attention probabilities, ERF, the `viz` command."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import visattn
from visattn.viz import attention_probs, build_block, effective_receptive_field, query_map

pytest.importorskip("skimage")
pytest.importorskip("matplotlib")


def _support(m: torch.Tensor) -> set[tuple[int, int]]:
    """Non-zero cells as (row, col)."""
    return {(int(r), int(c)) for r, c in (m != 0).nonzero().tolist()}


def _window(row: int, col: int, h: int, w: int, r: int = 1) -> set[tuple[int, int]]:
    return {
        (i, j)
        for i in range(row - r, row + r + 1)
        for j in range(col - r, col + r + 1)
        if 0 <= i < h and 0 <= j < w
    }


@pytest.fixture(scope="module")
def x8():
    return torch.randn(1, 8, 7, 9, generator=torch.Generator().manual_seed(0))


# diet with kernel_size=3 (its default) is the registry's 3x3 neighbourhood block.
@pytest.mark.parametrize("col,row", [(4, 3), (0, 0), (8, 6), (0, 5)])
def test_window_block_map_is_exactly_the_3x3_window(x8, col, row):
    block = build_block("diet", 8, kernel_size=3)
    m = query_map(block, x8, [(col, row)])[0]
    assert _support(m) == _window(row, col, 7, 9)


@pytest.mark.parametrize("col,row", [(4, 3), (0, 0), (8, 6), (0, 5)])
def test_causal_window_block_map_is_the_window_past(x8, col, row):
    block = build_block("diet", 8, kernel_size=3, causal=True)
    m = query_map(block, x8, [(col, row)])[0]
    past = {(i, j) for i, j in _window(row, col, 7, 9) if i * 9 + j <= row * 9 + col}
    assert _support(m) == past
    assert len(past) == {(4, 3): 5, (0, 0): 1, (8, 6): 4, (0, 5): 3}[(col, row)]


def test_window_block_probabilities_and_key_set(x8):
    probs = attention_probs(build_block("diet", 8), x8, (4, 3))
    assert probs is not None and probs.source == "pattern"
    assert _support(probs.key_set) == _window(3, 4, 7, 9)
    assert _support(probs.mean) == _window(3, 4, 7, 9)
    torch.testing.assert_close(probs.per_head.sum(dim=(1, 2)), torch.ones(probs.per_head.shape[0]))
    causal = attention_probs(build_block("diet", 8, causal=True), x8, (4, 3))
    assert _support(causal.key_set) == {(2, 3), (2, 4), (2, 5), (3, 3), (3, 4)}


def test_ccnet_one_recurrence_is_its_row_and_column(x8):
    block = build_block("ccnet", 8, recurrence=1)
    m = query_map(block, x8, [(2, 4)])[0]
    assert _support(m) == {(4, j) for j in range(9)} | {(i, 2) for i in range(7)}


def test_ccnet_two_recurrences_reach_the_whole_image(x8):
    block = build_block("ccnet", 8, recurrence=2)
    m = query_map(block, x8, [(2, 4)])[0]
    assert _support(m) == {(i, j) for i in range(7) for j in range(9)}


def test_channel_gate_map_is_the_global_pooling_field():
    # GCNet pools the whole map into one context vector added to every pixel: every pixel contributes, and
    # it contributes the same to every query (the maps of two queries agree off the two query pixels).
    x = torch.randn(1, 16, 6, 7, generator=torch.Generator().manual_seed(1))
    block = build_block("gcnet", 16)
    m = query_map(block, x, [(1, 1), (5, 4)])
    assert _support(m[0]) == _support(m[1]) == {(i, j) for i in range(6) for j in range(7)}
    off = torch.ones(6, 7, dtype=torch.bool)
    off[1, 1] = off[4, 5] = False
    torch.testing.assert_close(m[0][off], m[1][off], rtol=1e-5, atol=1e-7)
    assert m[0][1, 1] > m[1][1, 1]  # the residual path at the query itself


def test_dense_softmax_probabilities_sum_to_one(x8):
    probs = attention_probs(build_block("nonlocal", 8), x8, (3, 2))
    assert probs is not None and probs.source == "dense"
    assert bool(probs.key_set.all())
    torch.testing.assert_close(probs.mean.sum(), torch.tensor(1.0))


def test_blocks_without_softmax_over_pixels_give_none(x8):
    assert attention_probs(build_block("gcnet", 8), x8, (3, 2)) is None


@pytest.mark.parametrize("name", visattn.list_attns())
def test_maps_are_finite_for_every_block(name):
    x = torch.randn(1, 8, 6, 6, generator=torch.Generator().manual_seed(2))
    block = build_block(name, 8)
    m = query_map(block, x, [(2, 3)])
    assert m.shape == (1, 6, 6)
    assert bool(torch.isfinite(m).all())
    assert float(m[0, 3, 2]) > 0  # the residual / gate path at the query itself
    p = attention_probs(block, x, (2, 3))
    if p is not None:
        assert bool(torch.isfinite(p.per_head).all())


def test_query_map_matches_a_full_jacobian():
    x = torch.randn(1, 4, 3, 4, generator=torch.Generator().manual_seed(3))
    block = build_block("nonlocal", 4)
    jac = torch.autograd.functional.jacobian(lambda t: block(t)[0, :, 1, 2], x)  # (C, 1, C, H, W)
    torch.testing.assert_close(query_map(block, x, [(2, 1)], chunk=3)[0], jac.abs().sum(dim=(0, 1, 2)))


def test_identity_at_init_without_perturbation_is_the_query_pixel_only(x8):
    m = query_map(build_block("ccnet", 8, perturb=False), x8, [(2, 4)])[0]
    assert _support(m) == {(4, 2)}


def test_erf_of_a_3x3_window_and_area_ratios():
    x = torch.randn(3, 8, 9, 9, generator=torch.Generator().manual_seed(4))
    erf = effective_receptive_field(build_block("diet", 8), x)
    assert erf.images == 3
    assert _support(erf.map) <= _window(4, 4, 9, 9)
    assert set(erf.area_ratio) == {0.2, 0.3, 0.5, 0.99}
    # The 99 % area is at most the 3x3 window; ratios grow with the threshold.
    assert erf.area_ratio[0.99] <= 9 / 81 + 1e-9
    assert erf.area_ratio[0.2] <= erf.area_ratio[0.5] <= erf.area_ratio[0.99]


def test_errors_name_the_thing(x8):
    with pytest.raises(ValueError, match="ccnet.*no causal mode"):
        build_block("ccnet", 8, causal=True)
    with pytest.raises(ValueError, match="outside the 9x7 feature map"):
        query_map(build_block("diet", 8), x8, [(9, 0)])


def test_import_visattn_does_not_import_viz():
    code = "import sys, visattn; print(any(m.startswith(('visattn.viz', 'skimage', 'matplotlib')) for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_cli_writes_png_of_the_asked_size(tmp_path):
    from PIL import Image

    from visattn.cli import main

    out = tmp_path / "ccnet.png"
    argv = ["viz", "ccnet", "--image", "astronaut", "--query", "100,80", "--grid", "12", "--channels", "8"]
    assert main([*argv, "--size", "320x200", "-o", str(out)]) == 0
    with Image.open(out) as im:
        assert im.size == (320, 200)
    out2 = tmp_path / "diet.png"
    assert (
        main(["viz", "diet", "--causal", "--probs", "--grid", "8", "--channels", "8", "-o", str(out2)]) == 0
    )
    with Image.open(out2) as im:
        assert im.size == (840, 900)  # two columns (bidirectional, causal), map and probability rows


def test_cli_refusals_are_one_line_and_write_nothing(tmp_path, capsys):
    from visattn.cli import main

    out = tmp_path / "x.png"
    cases = [
        (["viz", "ccnet", "--causal"], "no causal mode"),
        (["viz", "ccnet", "--query", "600,3"], "outside the 512x512 image"),
        (["viz", "ccnett"], "did you mean 'ccnet'"),
        (["viz", "ccnet", "--image", str(tmp_path / "none.jpg")], "does not exist"),
        (["viz", "ccnet", "--arg", "kernel=3"], "not a hyperparameter of ccnet"),
    ]
    for argv, msg in cases:
        assert main([*argv, "-o", str(out)]) == 2
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_predict_explain_writes_the_head_map_and_checks_the_pixel_first(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from visattn.cli import main

    cfg = tmp_path / "seg.yaml"
    cfg.write_text("backbone: resnet18\nhead: ccnet\nnum_classes: 3\n")
    img = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(img)
    out = tmp_path / "pred.png"
    assert main(["predict", str(cfg), str(img), "-o", str(out), "--explain", "90,10"]) == 2
    assert "--explain 90,10 lies outside the 80x64 image" in capsys.readouterr().err
    assert not out.exists()
    assert main(["predict", str(cfg), str(img), "-o", str(out), "--explain", "30,20"]) == 0
    assert "decode head's attention used for pixel 30,20" in capsys.readouterr().out
    with Image.open(tmp_path / "pred_explain.png") as im:
        assert im.size[0] >= 64
