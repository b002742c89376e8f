"""Pretrained weights offline (issue 18): fail fast with the file to place, load cached weights with no
network, and a zoo segmentor with random weights says so once. Nothing here reaches the internet: the hub
endpoint is a closed port on 127.0.0.1 or HF_HUB_OFFLINE is set, and every cache lives in tmp_path."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import yaml

import visattn
from visattn.hub import CheckpointError

SCRIPT = textwrap.dedent(
    """
    import json, os, sys, time

    import timm, torch
    from safetensors.torch import save_file

    import visattn
    from visattn.hub import CheckpointError

    out = {}
    t = time.perf_counter()
    try:
        visattn.create_model("resnet10t", "ccnet", pretrained=True)
    except CheckpointError as err:
        out["error"] = str(err)
    out["fail_s"] = time.perf_counter() - t

    # Fill the Hugging Face cache as `hf download timm/resnet10t.c3_in1k` would lay it out.
    repo = os.path.join(os.environ["HF_HOME"], "hub", "models--timm--resnet10t.c3_in1k")
    commit = "0123456789abcdef0123456789abcdef01234567"
    os.makedirs(os.path.join(repo, "snapshots", commit))
    os.makedirs(os.path.join(repo, "refs"))
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(commit)
    torch.manual_seed(1)
    state = {k: v.contiguous() for k, v in timm.create_model("resnet10t").state_dict().items()}
    save_file(state, os.path.join(repo, "snapshots", commit, "model.safetensors"))
    t = time.perf_counter()
    model = visattn.create_model("resnet10t", "ccnet", pretrained=True)
    out["cached_s"] = time.perf_counter() - t
    loaded = model.state_dict()
    out["same"] = all(torch.equal(loaded[k], v) for k, v in state.items() if "num_batches" not in k)
    out["cache"] = repo
    print(json.dumps(out))
    """
)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once it is closed: connections are refused at once


def test_uncached_weights_fail_fast_and_cached_weights_load_offline(tmp_path):
    """Before: huggingface_hub retried for ~47 s, then failed with no hint. Now: a CheckpointError within
    seconds naming the file, where timm looks and the options; once cached, the weights load with the hub
    unreachable."""
    env = {
        k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy") and not k.startswith("HF_")
    }
    env.update(
        HF_HOME=str(tmp_path / "hf"),
        TORCH_HOME=str(tmp_path / "torch"),
        HF_ENDPOINT=f"http://127.0.0.1:{_closed_port()}",
        NO_PROXY="*",
        OMP_NUM_THREADS="1",
    )
    script = tmp_path / "offline.py"
    script.write_text(SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["fail_s"] < 10, out
    msg = out["error"]
    assert "resnet10t" in msg and "model.safetensors" in msg and "cannot be reached" in msg
    assert (
        f"{tmp_path / 'hf' / 'hub'}/models--timm--resnet10t.c3_in1k/snapshots/<commit>/model.safetensors"
        in msg
    )
    assert "pretrained_cfg_overlay=dict(file=" in msg and "pretrained=False" in msg
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / "resnet10t_176_c3-f3215ab1.pth") in msg
    assert out["same"] and out["cached_s"] < 10, out


@pytest.fixture
def hub_offline(tmp_path, monkeypatch):
    """HF_HUB_OFFLINE in this process (huggingface_hub read it at import, so patch its constant), with
    empty caches in tmp_path: even a call that slipped past the check could not touch the network."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path


def test_hf_hub_offline_fails_at_once_and_names_the_flag(hub_offline):
    with pytest.raises(CheckpointError, match="HF_HUB_OFFLINE is set") as info:
        visattn.create_model("resnet10t", pretrained=True)
    assert "pretrained_cfg_overlay=dict(file=" in str(info.value)


def test_local_weights_file_is_used_and_a_missing_one_named(hub_offline):
    torch.manual_seed(2)
    import timm

    state = timm.create_model("resnet10t").state_dict()
    path = hub_offline / "r10t.pth"
    torch.save(state, path)
    model = visattn.create_model("resnet10t", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert torch.equal(model.conv1[0].weight, state["conv1.0.weight"])
    missing = hub_offline / "nope.safetensors"
    with pytest.raises(CheckpointError, match="nope.safetensors"):
        visattn.create_model("resnet10t", pretrained=True, pretrained_cfg_overlay=dict(file=str(missing)))


TINY = {
    "backbone": "resnet10t",
    "head": "fcn",
    "num_classes": 3,
    "aux": False,
    "head_kwargs": {"channels": 8},
}


@pytest.fixture
def tiny_zoo(tmp_path, monkeypatch):
    zoo = {
        "models": [{"name": "tiny_seg", "config": TINY, "url": "https://example.invalid/tiny_seg-0000.pth"}]
    }
    (tmp_path / "zoo.yaml").write_text(yaml.safe_dump(zoo))
    monkeypatch.setenv("VISATTN_ZOO", str(tmp_path / "zoo.yaml"))
    return "tiny_seg"


def _predict_warnings(model) -> list[str]:
    image = torch.zeros(3, 20, 24, dtype=torch.uint8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.predict(image)
        model.predict(image)
    return [
        str(w.message) for w in caught if issubclass(w.category, UserWarning) and "random" in str(w.message)
    ]


def test_zoo_segmentor_without_weights_warns_once(tiny_zoo):
    messages = _predict_warnings(visattn.create_segmentor(tiny_zoo))
    assert len(messages) == 1
    assert "tiny_seg has random weights" in messages[0]
    assert (
        "pretrained=True" in messages[0] and "load_weights" in messages[0] and "--checkpoint" in messages[0]
    )


def test_loading_weights_clears_the_warning_and_configs_never_warn(tiny_zoo):
    model = visattn.create_segmentor(tiny_zoo)
    model.load_state_dict(visattn.create_segmentor(TINY).state_dict())
    assert not model.random_weights and _predict_warnings(model) == []
    assert _predict_warnings(visattn.create_segmentor(TINY)) == []


def test_a_checkpoint_replaces_the_backbone_init_so_nothing_is_downloaded(tmp_path, monkeypatch):
    """A model whose weights come from a checkpoint (create_segmentor(checkpoint_path=), ``visattn test``,
    ``visattn predict/export --checkpoint``) must not fetch the backbone's init first: offline that
    download fails, and its weights would be overwritten anyway. Before, the config's
    ``backbone_pretrained`` was honoured and timm (or open-mmlab) was asked for weights."""
    from safetensors.torch import save_file

    from visattn.engine.cli import main_test
    from visattn.models import segmentor as seg

    cfg = {**TINY, "backbone_pretrained": True}
    path = tmp_path / "w.safetensors"
    save_file(seg.build_segmentor(cfg, init_backbone=False).state_dict(), str(path))
    asked = []
    real = seg.create_model

    def spy(*args, **kwargs):
        asked.append(kwargs["pretrained"])
        return real(*args, **{**kwargs, "pretrained": False})

    monkeypatch.setattr(seg, "create_model", spy)
    seg.create_segmentor(cfg, checkpoint_path=path)
    assert asked == [False]
    config = tmp_path / "cfg.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": cfg,
                "data": {"synthetic": {"train_length": 2, "val_length": 1, "size": [16, 16]}},
                "train": {"work_dir": str(tmp_path / "run")},
            }
        )
    )
    assert main_test([str(config), "--checkpoint", str(path), "--no-progress"]) == 0
    assert asked == [False, False]
