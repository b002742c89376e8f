"""Hugging Face layout save/load (issue 19): ``save_pretrained`` and the ``local-dir:`` / ``hf-hub:`` sources.

Round trips compare outputs bitwise on weights moved off their initialisation (an identity-at-init block
would hide a block that was not rebuilt). The hub path reads a cache filled here in huggingface_hub's
layout, with ``HF_HUB_OFFLINE`` on and every socket connection refused, so no test touches the network.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

import visattn
from visattn.hub import CheckpointError
from visattn.models import hf

SEG_CFG = {
    "backbone": "resnet18",
    "output_stride": 8,
    "head": "attn",
    "attn": "efficient_attention",
    "head_kwargs": {"channels": 16},
    "aux_kwargs": {"channels": 16},
    "num_classes": 5,
    "data": {"crop_size": [48, 48]},
}
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _perturb(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def image():
    return torch.randn(2, 3, 40, 56, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A saved segmentor and a saved backbone (gcnet in two chosen stages, block kwargs, 7 classes)."""
    root = tmp_path_factory.mktemp("saved")
    seg = _perturb(visattn.create_segmentor(SEG_CFG), seed=0)
    run = root / "run"
    run.mkdir()
    (run / "config.yaml").write_text("model: {backbone: resnet18}\ntrain: {iters: 2}\neval: {mode: slide}\n")
    (run / "eval.json").write_text(json.dumps({"mIoU": 12.34, "aAcc": 56.7, "mAcc": 8.9, "IoU": {"0": 1.0}}))
    seg.save_pretrained(root / "seg", run_dir=run)
    model = visattn.create_model(
        "resnet18", "gcnet", attn_kwargs={"reduction": 8}, stages=(1, 3), num_classes=7
    )
    model = _perturb(model, seed=1)
    hf.save_pretrained(model, root / "bb")
    return {"root": root, "seg": seg, "bb": model}


def test_segmentor_local_dir_round_trip_is_bitwise(saved, image):
    folder = saved["root"] / "seg"
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    loaded = visattn.create_segmentor(f"local-dir:{folder}").eval()
    with torch.no_grad():
        assert torch.equal(loaded(image), saved["seg"](image))
    assert loaded.random_weights is False
    assert loaded.config == {**saved["seg"].config, "backbone_pretrained": False}
    assert loaded.data_cfg == saved["seg"].data_cfg
    config = json.loads((folder / "config.json").read_text())
    assert config["visattn"] == {
        "kind": "segmentor",
        "format_version": 1,
        "library_version": visattn.__version__,
    }
    assert config["num_classes"] == 5 and config["classes"] == ["0", "1", "2", "3", "4"]
    assert len(config["palette"]) == 5 and config["normalization"]["mean"] == [123.675, 116.28, 103.53]
    # The run's eval section is the recorded test mode; the card shows the run's results and config.
    assert config["test"]["mode"] == "slide" and config["test"]["crop_size"] == [48, 48]
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: visattn\n")
    assert "| mIoU | 12.34 |" in card and "iters: 2" in card and "efficient_attention" in card


def test_zoo_segmentor_config_carries_dataset_classes_and_palette(tmp_path):
    from visattn.models.palettes import DATASETS

    model = visattn.create_segmentor("fcn_r50-d8_cityscapes-512x1024", backbone="resnet18", aux=False)
    model.save_pretrained(tmp_path / "zoo")
    config = json.loads((tmp_path / "zoo" / "config.json").read_text())
    assert config["name"] == "fcn_r50-d8_cityscapes-512x1024"
    assert config["classes"] == list(DATASETS["cityscapes"]["classes"])
    assert config["palette"] == [list(c) for c in DATASETS["cityscapes"]["palette"]]
    assert config["test"]["scale"] == [2048, 1024] and config["config"]["data"]["dataset"] == "cityscapes"


def test_any_create_model_result_round_trips_through_visattn_and_timm(saved, image):
    folder = saved["root"] / "bb"
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "visattn_model" and config["num_classes"] == 7
    assert config["model_args"] == {
        "backbone": "resnet18",
        "attn": "gcnet",
        "attn_kwargs": {"reduction": 8},
        "stages": [1, 3],
        "placement": "block",
        "num_classes": 7,
    }
    with torch.no_grad():
        expected = saved["bb"](image)
        by_visattn = visattn.create_model(f"local-dir:{folder}").eval()
        by_timm = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
        assert torch.equal(by_visattn(image), expected)
        assert torch.equal(by_timm(image), expected)
    # The blocks themselves were rebuilt (same names and types), not only the weights.
    blocks = {n: type(m) for n, m in saved["bb"].named_modules() if getattr(type(m), "attn_name", "")}
    assert blocks and blocks == {
        n: type(m) for n, m in by_timm.named_modules() if getattr(type(m), "attn_name", "")
    }


def test_features_only_and_stage_placement_round_trip(tmp_path, image):
    model = visattn.create_model(
        "resnet18", "ccnet", placement="stage", stages=(2,), features_only=True, out_indices=(2, 3)
    )
    model = _perturb(model, seed=2)
    hf.save_pretrained(model, tmp_path / "feat")
    with torch.no_grad():
        expected = model(image)
        for loaded in (
            visattn.create_model(f"local-dir:{tmp_path / 'feat'}"),
            timm.create_model(f"local-dir:{tmp_path / 'feat'}", pretrained=True),
        ):
            got = loaded.eval()(image)
            assert len(got) == 2 and all(torch.equal(a, b) for a, b in zip(got, expected))


def _fill_hub_cache(cache: Path, repo: str, folder: Path) -> None:
    """huggingface_hub's cache layout: blobs, a snapshot of links to them, and refs/main -> commit."""
    base = cache / f"models--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(COMMIT)
    snapshot = base / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (base / "blobs").mkdir()
    for file in folder.iterdir():
        blob = base / "blobs" / f"blob-{file.name}"
        blob.write_bytes(file.read_bytes())
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    return cache


def test_hf_hub_sources_load_from_an_offline_cache(saved, offline_hub, image):
    _fill_hub_cache(offline_hub, "someone/tiny-seg", saved["root"] / "seg")
    _fill_hub_cache(offline_hub, "someone/tiny-backbone", saved["root"] / "bb")
    with torch.no_grad():
        seg = visattn.create_segmentor("hf-hub:someone/tiny-seg").eval()
        assert torch.equal(seg(image), saved["seg"](image))
        expected = saved["bb"](image)
        assert torch.equal(visattn.create_model("hf-hub:someone/tiny-backbone").eval()(image), expected)
        by_timm = timm.create_model("hf-hub:someone/tiny-backbone", pretrained=True).eval()
        assert torch.equal(by_timm(image), expected)
        # A pinned revision reads the same snapshot.
        pinned = visattn.create_segmentor(f"hf-hub:someone/tiny-seg@{COMMIT}").eval()
        assert torch.equal(pinned(image), saved["seg"](image))


def test_hf_hub_source_not_cached_offline_is_one_clear_error(offline_hub):
    with pytest.raises(CheckpointError) as err:
        visattn.create_segmentor("hf-hub:someone/not-there")
    msg = str(err.value)
    assert "hf-hub:someone/not-there" in msg and "config.json is not in the Hugging Face cache" in msg
    assert "HF_HUB_OFFLINE is set" in msg and "local-dir:" in msg


def test_hf_hub_offline_environment_in_a_fresh_process(saved, tmp_path):
    """HF_HOME and HF_HUB_OFFLINE as a user sets them: read by huggingface_hub when it is imported."""
    _fill_hub_cache(tmp_path / "hf" / "hub", "someone/tiny-seg", saved["root"] / "seg")
    expected = tmp_path / "expected.pt"
    image = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.save(
            {"image": image, "logits": saved["seg"](image), "state": saved["seg"].state_dict()}, expected
        )
    # Weights bitwise; logits to float rounding only: this process and the child may use different
    # thread counts, and a convolution's summation order follows them.
    code = (
        "import sys, torch, visattn\n"
        "d = torch.load(sys.argv[1], weights_only=True)\n"
        "m = visattn.create_segmentor('hf-hub:someone/tiny-seg').eval()\n"
        "state = m.state_dict()\n"
        "assert state.keys() == d['state'].keys() and all(torch.equal(state[k], d['state'][k]) for k in state)\n"
        "with torch.no_grad(): torch.testing.assert_close(m(d['image']), d['logits'], rtol=1e-5, atol=1e-5)\n"
        "print('ok')\n"
    )
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("HF_HUB_CACHE", None)
    done = subprocess.run(
        [sys.executable, "-c", code, str(expected)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


# -- damaged, mismatched and misused folders --------------------------------------------------------------
@pytest.fixture
def seg_copy(saved, tmp_path):
    folder = tmp_path / "seg"
    folder.mkdir()
    for name, data in _files(saved["root"] / "seg").items():
        (folder / name).write_bytes(data)
    return folder


def test_truncated_weights_are_one_error_naming_the_file(seg_copy):
    weights = seg_copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"cannot read .*model\.safetensors.*damaged"):
        visattn.create_segmentor(f"local-dir:{seg_copy}")


def test_corrupt_or_foreign_config_is_one_error(seg_copy):
    (seg_copy / "config.json").write_text('{"visattn": {"kind": "segm')
    with pytest.raises(CheckpointError, match=r"config\.json is not valid JSON"):
        visattn.create_segmentor(f"local-dir:{seg_copy}")
    (seg_copy / "config.json").write_text(json.dumps({"architecture": "resnet18", "num_classes": 5}))
    with pytest.raises(CheckpointError, match="not written by visattn's save_pretrained"):
        visattn.create_segmentor(f"local-dir:{seg_copy}")


def test_missing_files_are_named(seg_copy, tmp_path):
    (seg_copy / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors is missing"):
        visattn.create_segmentor(f"local-dir:{seg_copy}")
    with pytest.raises(CheckpointError, match="is not a folder"):
        visattn.create_model(f"local-dir:{tmp_path / 'nowhere'}")


def test_config_that_does_not_fit_the_weights_loads_nothing(seg_copy):
    config = json.loads((seg_copy / "config.json").read_text())
    config["config"]["num_classes"] = 6
    (seg_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as err:
        visattn.create_segmentor(f"local-dir:{seg_copy}")
    msg = str(err.value)
    assert "shape mismatches" in msg and "conv_seg.weight" in msg and "do not belong together" in msg


def test_backbone_config_that_does_not_fit_the_weights(saved, tmp_path):
    folder = tmp_path / "bb"
    folder.mkdir()
    for name, data in _files(saved["root"] / "bb").items():
        (folder / name).write_bytes(data)
    config = json.loads((folder / "config.json").read_text())
    config["model_args"]["stages"] = [2, 3]  # blocks elsewhere: the weights' keys no longer match
    (folder / "config.json").write_text(json.dumps(config))
    for load in (
        lambda: visattn.create_model(f"local-dir:{folder}"),
        lambda: timm.create_model(f"local-dir:{folder}", pretrained=True),
    ):
        with pytest.raises(CheckpointError, match="missing keys: .*unexpected keys: "):
            load()


def test_wrong_kind_and_conflicting_arguments(saved):
    seg, bb = saved["root"] / "seg", saved["root"] / "bb"
    with pytest.raises(CheckpointError, match=r"holds a segmentor.*visattn\.create_segmentor"):
        visattn.create_model(f"local-dir:{seg}")
    with pytest.raises(CheckpointError, match=r"holds a backbone.*visattn\.create_model"):
        visattn.create_segmentor(f"local-dir:{bb}")
    with pytest.raises(ValueError, match="'num_classes' cannot be changed"):
        visattn.create_segmentor(f"local-dir:{seg}", num_classes=3)
    with pytest.raises(ValueError, match="attn='ccnet' differs from the saved 'gcnet'"):
        visattn.create_model(f"local-dir:{bb}", "ccnet")
    with pytest.raises(ValueError, match="checkpoint_path= is for zoo names"):
        visattn.create_segmentor(f"local-dir:{seg}", checkpoint_path="x.pth")
    # Restating a saved value is fine.
    assert visattn.create_model(f"local-dir:{bb}", "gcnet", num_classes=7).num_classes == 7


# -- saving safely -----------------------------------------------------------------------------------------
def test_save_refuses_a_used_folder_and_overwrites_only_a_visattn_save(saved, tmp_path):
    seg = saved["seg"]
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(ValueError, match="notes"):
            seg.save_pretrained(other, overwrite=overwrite)
    assert _files(other) == {"todo.txt": b"keep me"}

    target = tmp_path / "model"
    hf.save_pretrained(saved["bb"], target)
    before = _files(target)
    with pytest.raises(ValueError, match="not empty.*overwrite=True"):
        seg.save_pretrained(target)
    assert _files(target) == before
    seg.save_pretrained(target, overwrite=True)
    assert json.loads((target / "config.json").read_text())["visattn"]["kind"] == "segmentor"
    (tmp_path / "empty").mkdir()
    seg.save_pretrained(tmp_path / "empty")  # an empty folder is free to use
    # Temporary folders are gone: only what the test made is left beside the targets.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "model", "notes"]


def test_failed_save_writes_nothing(tmp_path):
    model = visattn.create_model("resnet18", "gcnet", act_layer=torch.nn.ReLU)
    with pytest.raises(ValueError, match=r"act_layer.*cannot be written to config\.json"):
        hf.save_pretrained(model, tmp_path / "out")
    plain = timm.create_model("resnet18")
    with pytest.raises(ValueError, match="not built by visattn.create_model"):
        hf.save_pretrained(plain, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_interrupted_write_keeps_the_previous_save(saved, tmp_path, monkeypatch):
    target = tmp_path / "model"
    hf.save_pretrained(saved["bb"], target)
    before = _files(target)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("safetensors.torch.save_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        saved["seg"].save_pretrained(target, overwrite=True)
    assert _files(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
