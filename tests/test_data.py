"""Datasets for their folder layouts (tiny fake trees), label conversions, joint transforms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from visattn.data import (
    ADE20K,
    CITYSCAPES_ID_TO_TRAIN_ID,
    Cityscapes,
    PascalVOC,
    RandomCropCatMax,
    SyntheticSegmentation,
    build_dataset,
    build_train_transform,
    cityscapes_label_to_train_id,
)
from visattn.engine import load_config


def _save_rgb(path, h=6, w=8, value=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), value, np.uint8)).save(path)


def _save_label(path, arr, palette=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(np.asarray(arr, np.uint8), mode="L")
    if palette:
        im = im.convert("P")
        im.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
    im.save(path)


def test_data_cityscapes_id_to_train_id_table():
    assert len(CITYSCAPES_ID_TO_TRAIN_ID) == 19 and sorted(CITYSCAPES_ID_TO_TRAIN_ID.values()) == list(
        range(19)
    )
    ids = torch.arange(34)
    out = cityscapes_label_to_train_id(ids)
    assert out[7] == 0 and out[26] == 13 and out[33] == 18  # road, car, bicycle
    assert (out[[0, 1, 2, 3, 4, 5, 6, 9, 10, 14, 15, 16, 18, 29, 30]] == 255).all()
    assert (out != 255).sum() == 19


def test_data_cityscapes_layout_train_ids_and_label_ids(tmp_path):
    root = tmp_path / "cityscapes"
    _save_rgb(root / "leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png", value=10)
    _save_label(
        root / "gtFine/train/aachen/aachen_000000_000019_gtFine_labelTrainIds.png", np.full((6, 8), 3)
    )
    _save_rgb(root / "leftImg8bit/train/bremen/bremen_000001_000019_leftImg8bit.png", value=20)
    label_ids = np.full((6, 8), 26)
    label_ids[0, 0] = 4  # "static": ignored
    _save_label(root / "gtFine/train/bremen/bremen_000001_000019_gtFine_labelIds.png", label_ids)
    ds = Cityscapes(root, "train")
    assert len(ds) == 2
    img, mask = ds[0]
    assert isinstance(img, tv_tensors.Image) and isinstance(mask, tv_tensors.Mask)
    assert img.shape == (3, 6, 8) and img.dtype == torch.uint8 and int(img[0, 0, 0]) == 10
    assert mask.shape == (6, 8) and (mask == 3).all()
    _, mask = ds[1]  # labelIds only: converted 34 -> 19
    assert mask[0, 0] == 255 and (mask.flatten()[1:] == 13).all()
    with pytest.raises(FileNotFoundError, match="leftImg8bit"):
        Cityscapes(root, "val")


def test_data_ade20k_reduce_zero_label(tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    ann = np.array([[0, 1, 2, 150], [150, 0, 3, 1]])
    for split in ("training", "validation"):
        Image.fromarray(np.zeros((2, 4, 3), np.uint8)).save(_mk(root / "images" / split / "ADE_x_0001.jpg"))
        _save_label(root / "annotations" / split / "ADE_x_0001.png", ann)
    _, mask = ADE20K(root, "training")[0]
    assert mask.tolist() == [[255, 0, 1, 149], [149, 255, 2, 0]]
    _, raw = ADE20K(root, "val", reduce_zero_label=False)[0]
    assert raw.tolist() == ann.tolist()
    ds = build_dataset(
        load_config(None, ["data.dataset=ade20k", f"data.root={root}", "model.num_classes=150"])["data"],
        False,
    )
    assert isinstance(ds, ADE20K) and len(ds) == 1 and ds.reduce_zero_label


def _mk(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def test_data_voc_layout_palette_and_aug(tmp_path):
    root = tmp_path / "VOC2012"
    ann = np.array([[0, 15, 15], [255, 1, 20]])
    for name in ("2007_000032", "2007_000039"):
        Image.fromarray(np.zeros((2, 3, 3), np.uint8)).save(_mk(root / "JPEGImages" / f"{name}.jpg"))
        _save_label(root / "SegmentationClass" / f"{name}.png", ann, palette=True)
        _save_label(root / "SegmentationClassAug" / f"{name}.png", np.full((2, 3), 7))
    seg = _mk(root / "ImageSets" / "Segmentation" / "train.txt")
    seg.write_text("2007_000032\n")
    (seg.parent / "aug.txt").write_text("2007_000032\n2007_000039\n")
    ds = PascalVOC(root, "train")
    _, mask = ds[0]
    assert len(ds) == 1 and mask.tolist() == ann.tolist()  # palette indices are the classes
    aug = PascalVOC(root, "aug")
    assert len(aug) == 2 and (aug[1][1] == 7).all()
    with pytest.raises(FileNotFoundError, match="val.txt"):
        PascalVOC(root, "val")


def test_data_synthetic_deterministic_and_varied():
    a = SyntheticSegmentation(6, 8, 32, seed=1)
    b = SyntheticSegmentation(6, 8, 32, seed=1)
    img, mask = a[3]
    assert torch.equal(img, b[3][0]) and torch.equal(mask, b[3][1])
    assert not torch.equal(img, a[4][0])
    assert not torch.equal(img, SyntheticSegmentation(6, 8, 32, seed=2)[3][0])
    masks = torch.stack([a[i][1] for i in range(8)])
    assert set(masks.unique().tolist()) <= set(range(6)) and len(masks.unique()) >= 4


def _coded_pair(h=40, w=56):
    """An image whose red channel is 40 * the mask, in blocks, so alignment can be read back."""
    mask = torch.zeros(h, w, dtype=torch.int64)
    mask[:, w // 2 :] = 1
    mask[h // 2 :, : w // 3] = 2
    mask[h // 4 : h // 2, w // 4 : w // 2] = 3
    image = torch.zeros(3, h, w, dtype=torch.uint8)
    image[0] = (mask * 40).to(torch.uint8)
    image[1] = torch.arange(w).expand(h, w).to(torch.uint8)  # a horizontal ramp: flips are visible
    return tv_tensors.Image(image), tv_tensors.Mask(mask)


@pytest.mark.parametrize("ratio", [(1.0, 1.0), (0.5, 2.0)])
def test_data_joint_transforms_keep_image_and_mask_aligned(ratio):
    cfg = {
        "crop_size": [24, 24],
        "ratio_range": list(ratio),
        "scale": None,
        "cat_max_ratio": 0.75,
        "flip": True,
        "photometric": False,
    }
    t = build_train_transform(cfg, mean=[0, 0, 0], std=[1, 1, 1])
    flipped = 0
    for seed in range(12):
        torch.manual_seed(seed)
        image, mask = t(*_coded_pair())
        assert image.shape == (3, 24, 24) and image.dtype == torch.float32
        assert mask.shape == (24, 24) and mask.dtype == torch.int64
        valid = mask != 255
        decoded = (image[0] / 40).round().long()
        agree = (decoded[valid] == mask[valid]).float().mean()
        if ratio == (1.0, 1.0):
            assert agree == 1.0  # no resize: exact
        else:
            assert agree > 0.85  # bilinear image vs nearest mask differ on block edges only
        ramp = image[1, 0]
        flipped += int(ramp[0] > ramp[-1])
    assert 0 < flipped < 12  # both flipped and unflipped crops occurred


def test_data_crop_pads_with_ignore_and_respects_cat_max_ratio():
    image = tv_tensors.Image(torch.zeros(3, 4, 5, dtype=torch.uint8))
    mask = tv_tensors.Mask(torch.ones(4, 5, dtype=torch.int64))
    im, m = RandomCropCatMax((6, 8), ignore_index=255)(image, mask)
    assert (
        im.shape == (3, 6, 8) and (m[:4, :5] == 1).all() and (m[4:] == 255).all() and (m[:, 5:] == 255).all()
    )
    # a mask that is almost all class 0: the crop is retried until class 1 is present
    mask = torch.zeros(64, 64, dtype=torch.int64)
    mask[40:56, 40:56] = 1
    hits = 0
    for seed in range(10):
        torch.manual_seed(seed)
        _, m = RandomCropCatMax((16, 16), cat_max_ratio=0.9)(
            tv_tensors.Image(torch.zeros(3, 64, 64)), tv_tensors.Mask(mask)
        )
        hits += int((m == 1).any())
    assert hits >= 8  # a uniform crop would contain class 1 in ~ (31/49)^2 = 40% of draws
