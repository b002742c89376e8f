"""Segmentor.predict (PIL / numpy / tensor, whole and sliding window) and `visattn predict`."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from PIL import Image
from test_segmentor import randomize_

from visattn.models import create_segmentor
from visattn.models.palettes import DATASETS
from visattn.predict_cli import add_predict_parser, overlay, palette_for

CONFIG = {
    "backbone": "resnet10t",
    "head": "fcn",
    "head_kwargs": {"channels": 16},
    "aux": False,
    "num_classes": 19,
    "data": {"dataset": "cityscapes", "crop_size": [24, 32]},
}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return randomize_(create_segmentor(CONFIG), seed=3).eval()


def image(h=40, w=52, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def test_every_input_type_gives_the_same_labels(model):
    img = image(21, 26)
    ref = model.predict(img)
    assert ref.shape == (21, 26) and ref.dtype == torch.int64 and 0 <= ref.min() and ref.max() < 19
    chw = torch.from_numpy(img).permute(2, 0, 1)
    for variant in (Image.fromarray(img), chw, chw[None], chw.float() / 255.0):
        torch.testing.assert_close(model.predict(variant), ref, atol=0, rtol=0)
    assert [p.shape for p in model.predict([img, img[:16]])] == [(21, 26), (16, 26)]
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        model.predict(chw.float())
    with pytest.raises(ValueError, match="numpy image"):
        model.predict(img[..., :2])


def test_predict_is_normalise_forward_argmax(model):
    img = image(32, 32, seed=1)
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float()
    mean = torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1)
    std = torch.tensor([58.395, 57.12, 57.375]).view(1, 3, 1, 1)
    with torch.no_grad():
        logits = model((x - mean) / std)[0]
    torch.testing.assert_close(model.predict(img, return_logits=True), logits)
    torch.testing.assert_close(model.predict(img), logits.argmax(0))


def test_slide_mode_averages_the_windows(model):
    img = image(40, 52, seed=2)
    x = model.preprocess(img)
    with torch.no_grad():
        whole = model.inference(x)
        slide = model.inference(x, mode="slide", crop_size=(24, 32), stride=(16, 20))
        # Windows: rows start at 0, 16 (last aligned to 40 - 24); columns at 0, 20 (52 - 32).
        ref = torch.zeros_like(whole)
        count = torch.zeros(1, 1, 40, 52)
        for y in (0, 16):
            for xx in (0, 20):
                ref[:, :, y : y + 24, xx : xx + 32] += model(x[:, :, y : y + 24, xx : xx + 32])
                count[:, :, y : y + 24, xx : xx + 32] += 1
        torch.testing.assert_close(slide, ref / count)
        # A window at least as large as the image is the whole image.
        torch.testing.assert_close(model.inference(x, mode="slide", crop_size=(64, 64)), whole)
    labels = model.predict(img, mode="slide")  # crop from the config, stride 2/3 of it
    assert labels.shape == (40, 52)
    with pytest.raises(ValueError, match="'whole' or 'slide'"):
        model.inference(x, mode="tiles")


def test_test_time_resize_follows_mmseg_rescale():
    with torch.device("meta"):
        city = create_segmentor("fcn_r50-d8_cityscapes-512x1024")
        ade = create_segmentor("fcn_r50-d8_ade20k-512x512")
    assert city.test_size(1024, 2048) == (1024, 2048)
    assert city.test_size(512, 1024) == (1024, 2048)
    assert ade.test_size(375, 500) == (512, 683)  # min(2048 / 500, 512 / 375) = 1.365
    assert ade.test_size(512, 2048) == (512, 2048)


def test_predict_resizes_back_to_the_image_size():
    torch.manual_seed(0)
    model = randomize_(
        create_segmentor({**CONFIG, "data": {"dataset": "ade20k", "test_scale": [96, 48]}})
    ).eval()
    img = image(30, 41)
    assert model.test_size(30, 41) == (48, 66)
    labels = model.predict(img)
    assert labels.shape == (30, 41)
    assert model.predict(img, resize=False).shape == (30, 41)


def test_palettes():
    assert len(DATASETS["cityscapes"]["palette"]) == 19 and len(DATASETS["ade20k"]["palette"]) == 150
    assert DATASETS["cityscapes"]["classes"][0] == "road" and DATASETS["ade20k"]["classes"][0] == "wall"
    assert len(set(DATASETS["cityscapes"]["palette"])) == 19
    assert len(set(DATASETS["ade20k"]["palette"])) == 149  # mmseg's ADE20K palette repeats one colour
    assert palette_for("cityscapes", 19)[0].tolist() == [128, 64, 128]
    assert palette_for(None, 7).shape == (7, 3)
    labels = np.array([[0, 1]])
    blended = overlay(np.zeros((1, 2, 3), np.uint8), labels, palette_for("cityscapes", 19), alpha=1.0)
    assert blended.tolist() == [[[128, 64, 128], [244, 35, 232]]]


def _cli(argv):
    parser = argparse.ArgumentParser(prog="visattn")
    add_predict_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_writes_label_map_and_overlay(tmp_path, capsys):
    import yaml

    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(CONFIG))
    src = tmp_path / "scene.png"
    Image.fromarray(image(45, 61, seed=4)).save(src)
    out = tmp_path / "out" / "pred.png"
    assert _cli(["predict", str(cfg), str(src), "-o", str(out)]) == 0
    labels = Image.open(out)
    assert labels.mode == "L" and labels.size == (61, 45)
    assert np.asarray(labels).max() < 19
    over = Image.open(tmp_path / "out" / "pred_overlay.png")
    assert over.mode == "RGB" and over.size == (61, 45)
    assert "randomly initialised" in capsys.readouterr().err
    # Sliding-window mode and an explicit overlay path.
    assert (
        _cli(
            [
                "predict",
                str(cfg),
                str(src),
                "-o",
                str(out),
                "--mode",
                "slide",
                "--crop-size",
                "24x32",
                "--overlay",
                str(tmp_path / "o.png"),
            ]
        )
        == 0
    )
    assert Image.open(tmp_path / "o.png").size == (61, 45)
    assert _cli(["predict", str(cfg), str(tmp_path / "missing.png"), "-o", str(out)]) == 2


def test_cli_is_wired_into_visattn_command(tmp_path):
    import yaml

    from visattn import cli

    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    if "predict" not in sub.choices:
        pytest.skip("`visattn predict` is not wired into visattn/cli.py yet")
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(CONFIG))
    src = tmp_path / "scene.jpg"
    Image.fromarray(image(33, 47, seed=5)).save(src)
    assert cli.main(["predict", str(cfg), str(src), "-o", str(tmp_path / "p.png")]) == 0
    assert Image.open(tmp_path / "p.png").size == (47, 33)
