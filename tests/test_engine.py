"""Training engine: configs, resume equality, learning on the synthetic set, DDP equivalence."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from visattn.engine import ConfigError, PolyLR, apply_overrides, load_config, metrics_from_confusion
from visattn.engine.evaluate import confusion_matrix
from visattn.engine.trainer import SampleStream, train

ROOT = Path(__file__).resolve().parents[1]
# A tiny, fast setting of the demo for the tests.
TINY = [
    "model.backbone=resnet10t",
    "model.head_kwargs={channels: 16}",
    "model.aux_kwargs={channels: 16}",
    "model.attn_kwargs={}",
    "data.synthetic={train_length: 32, val_length: 4, size: [32, 32]}",
    "data.crop_size=[32, 32]",
    "train.batch_size=4",
    "train.log_interval=1",
    "eval.max_images=2",
]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("VISATTN_CRASH_AT_ITER", None)
    return env


def test_engine_overrides_parse_yaml_values():
    cfg = apply_overrides(
        {"optim": {"lr": 0.01}}, ["optim.lr=0.02", "data.crop_size=[16, 8]", "train.amp=null"]
    )
    assert cfg == {"optim": {"lr": 0.02}, "data": {"crop_size": [16, 8]}, "train": {"amp": None}}
    cfg = load_config(None, ["optim.lr=0.5", "train.iters=7"])
    assert cfg["optim"]["lr"] == 0.5 and cfg["train"]["iters"] == 7
    assert (
        cfg["model"]["backbone"] == "resnet18" and cfg["data"]["num_classes"] == cfg["model"]["num_classes"]
    )


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("optim.lrr=0.1", "optim.lrr"),
        ("traim.iters=3", "traim"),
        ("train.iters=ten", "train.iters"),
        ("train.deterministic=3", "train.deterministic"),
        ("optim.type=adam", "optim.type"),
        ("model.hed=fcn", "hed"),
        ("data.dataset=cityscapes", "data.root"),
        ("train.batch_size=0", "train.batch_size"),
        ("data.synthetic={lenght: 3}", "data.synthetic.lenght"),
    ],
)
def test_engine_bad_config_names_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config(None, [override])


def test_engine_missing_dataset_folder_named(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError, match="nope"):
        load_config(None, ["data.dataset=ade20k", f"data.root={missing}", "model.num_classes=150"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_engine_cli_bad_config_exits_before_training(tmp_path, capsys):
    from visattn.engine.cli import main_train

    assert main_train(["--set", "optim.momentun=0.5", "--work-dir", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err
    assert "optim.momentun" in err and "optim.momentum" in err
    assert not (tmp_path / "w").exists()


def test_engine_poly_lr_with_warmup():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.01)
    s = PolyLR(opt, 100, power=0.9, min_lr=1e-4, warmup_iters=10, warmup_ratio=0.1)
    s.step_to(0)
    assert opt.param_groups[0]["lr"] == pytest.approx(((0.01 - 1e-4) + 1e-4) * 0.1)
    s.step_to(50)
    assert opt.param_groups[0]["lr"] == pytest.approx((0.01 - 1e-4) * 0.5**0.9 + 1e-4)
    s.step_to(100)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-4)


def test_engine_sample_stream_is_a_permutation_per_epoch():
    s = SampleStream(10, seed=3)
    first = [s(p)[0] for p in range(10)]
    second = [s(p)[0] for p in range(10, 20)]
    assert sorted(first) == list(range(10)) == sorted(second) and first != second
    assert SampleStream(10, seed=3)(13) == s(13)


def test_engine_metrics_from_confusion_matches_hand_count():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 3]])
    conf = confusion_matrix(pred, target, 4)
    assert conf.sum() == 7 and conf[0, 0] == 1 and conf[0, 1] == 1 and conf[1, 3] == 1
    m = metrics_from_confusion(conf)
    # IoU: c0 1/(2+2-1)=1/3; c1 2/(3+3-2)=1/2; c2 1/(2+1-1)=1/2; c3 0/(0+1-0)=0 (predicted, never true)
    assert m["IoU"] == {"0": 33.33, "1": 50.0, "2": 50.0, "3": 0.0}
    assert m["mIoU"] == pytest.approx(100 * (1 / 3 + 1 / 2 + 1 / 2 + 0) / 4, abs=0.01)
    assert m["aAcc"] == pytest.approx(100 * 4 / 7, abs=0.01)


def test_engine_kill_and_resume_is_exact(tmp_path):
    """A run SIGKILLed after iteration 3 (checkpoint at 2) and resumed ends bit-identical to an
    uninterrupted run of 5 iterations (deterministic CPU mode)."""
    sets = [*TINY, "train.iters=5", "train.ckpt_interval=2", "train.deterministic=true", "model.dropout=0.3"]
    crashed = tmp_path / "crashed"
    args = [sys.executable, "tools/train.py", "--no-progress", "--work-dir", str(crashed)]
    for s in sets:
        args += ["--set", s]
    r = subprocess.run(
        args,
        cwd=ROOT,
        env={**_env(), "VISATTN_CRASH_AT_ITER": "3"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == -9, r.stderr[-2000:]  # really SIGKILLed
    assert (crashed / "latest").read_text().strip() == "iter_2"
    assert not (crashed / "iter_4.safetensors").exists()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the subprocess ran with one thread
    try:
        train(load_config(None, [*sets, f"train.work_dir={crashed}"]), resume=True, progress=False)
        whole = tmp_path / "whole"
        train(load_config(None, [*sets, f"train.work_dir={whole}"]), progress=False)
    finally:
        torch.set_num_threads(threads)
    a, b = load_file(str(crashed / "iter_5.safetensors")), load_file(str(whole / "iter_5.safetensors"))
    assert a.keys() == b.keys()
    start = load_file(str(crashed / "iter_2.safetensors"))
    assert any(not torch.equal(start[k], b[k]) for k in b)  # the resumed part really trained
    for k in a:
        assert torch.equal(a[k], b[k]), k
    state = torch.load(crashed / "iter_5.state.pt", weights_only=True)
    assert state["iteration"] == 5 and state["scheduler"]["iteration"] == 5


def test_engine_demo_config_learns(tmp_path):
    """The demo config (short schedule, fixed seed) beats chance by far on the synthetic validation set.
    Chance (all background) is mIoU ~ 100 * bg_fraction / 6 < 15."""
    work = tmp_path / "demo"
    metrics = train(
        load_config(
            None,
            [
                "train.iters=24",
                "data.synthetic={val_length: 8}",
                "train.log_interval=4",
                "train.ckpt_interval=1000",
                f"train.work_dir={work}",
            ],
        ),
        progress=False,
    )
    assert metrics["mIoU"] > 35.0, metrics
    saved = json.loads((work / "eval.json").read_text())
    assert saved["mIoU"] == metrics["mIoU"]
    losses = [json.loads(x)["loss"] for x in (work / "log.jsonl").read_text().splitlines() if "loss" in x]
    assert losses[-1] < losses[0]


@pytest.mark.skipif(
    shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
    reason="torchrun not installed",
)
def test_engine_torchrun_two_processes_equal_one(tmp_path):
    """Two gloo processes (batch 2 each) give the weights of one process with batch 4. torch's
    SyncBatchNorm is CUDA-only, so BN statistics are frozen (norm_eval) to make the two equal on CPU."""
    sets = [
        *TINY,
        "train.iters=3",
        "train.ckpt_interval=3",
        "model.dropout=0.0",
        "train.deterministic=true",
        "train.norm_eval=true",
    ]
    torchrun = str(Path(sys.executable).parent / "torchrun")
    args = [
        torchrun,
        "--standalone",
        "--nproc_per_node=2",
        "tools/train.py",
        "--no-progress",
        "--work-dir",
        str(tmp_path / "ddp"),
    ]
    for s in sets:
        args += ["--set", s]
    r = subprocess.run(args, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    train(load_config(None, [*sets, f"train.work_dir={tmp_path / 'one'}"]), progress=False)
    a = load_file(str(tmp_path / "ddp" / "iter_3.safetensors"))
    b = load_file(str(tmp_path / "one" / "iter_3.safetensors"))
    from visattn.models.segmentor import build_segmentor

    torch.manual_seed(0)  # the initial weights (train.seed 0): the runs must have moved away from them
    init = build_segmentor(load_config(None, sets)["model"]).state_dict()
    assert any(not torch.allclose(init[k], b[k]) for k in b if b[k].is_floating_point())
    for k in b:
        if b[k].is_floating_point():
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def test_engine_zoo_configs_validate():
    import yaml

    from visattn import hub
    from visattn.engine.config import validate_config

    names = hub.list_pretrained()
    for name in names:
        path = ROOT / "configs" / f"{name}.yaml"
        assert path.is_file(), f"missing {path} (python tools/make_configs.py)"
        cfg = validate_config(yaml.safe_load(path.read_text()), check_paths=False)
        city = cfg["data"]["dataset"] == "cityscapes"
        assert cfg["train"]["iters"] == (80000 if city else 160000)
        assert cfg["train"]["batch_size"] == (8 if city else 16)
        assert cfg["data"]["crop_size"] == ([512, 1024] if city else [512, 512])
        assert cfg["optim"] == {
            **cfg["optim"],
            "type": "sgd",
            "lr": 0.01,
            "momentum": 0.9,
            "weight_decay": 5e-4,
        }
        assert cfg["sched"]["power"] == 0.9 and cfg["sched"]["min_lr"] == 1e-4
        assert cfg["model"]["name"] == name


def test_engine_test_tool_reproduces_predictions(tmp_path):
    """`visattn test` on a saved checkpoint gives the confusion of the model's own predict()."""
    from visattn.data import build_dataset
    from visattn.engine import save_checkpoint
    from visattn.engine.cli import main_test
    from visattn.models.segmentor import build_segmentor

    cfg = load_config(None, [*TINY, "eval.max_images=null", f"train.work_dir={tmp_path}"])
    torch.manual_seed(0)
    model = build_segmentor(cfg["model"]).eval()
    save_checkpoint(tmp_path, model, {"iteration": 0}, "converted")
    out = tmp_path / "result.json"
    assert (
        main_test(
            [
                *sum((["--set", s] for s in TINY), []),
                "--set",
                "eval.max_images=null",
                "--checkpoint",
                str(tmp_path / "converted.safetensors"),
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    got = json.loads(out.read_text())
    raw = build_dataset(cfg["data"], False)
    conf = sum(
        confusion_matrix(model.predict(raw.generate(i)[0]), raw.generate(i)[1], 6) for i in range(len(raw))
    )
    want = metrics_from_confusion(conf)
    assert got["mIoU"] == want["mIoU"] and got["IoU"] == want["IoU"] and got["aAcc"] == want["aAcc"]


def test_engine_gradient_accumulation_equals_full_batch(tmp_path):
    """Batch 4 as 2 accumulation steps of 2 equals one step of 4 (BN frozen, no dropout)."""
    sets = [*TINY, "train.iters=2", "train.ckpt_interval=2", "model.dropout=0.0", "train.norm_eval=true"]
    train(load_config(None, [*sets, f"train.work_dir={tmp_path / 'a'}"]), progress=False)
    train(
        load_config(None, [*sets, "train.accum_steps=2", f"train.work_dir={tmp_path / 'b'}"]), progress=False
    )
    a = load_file(str(tmp_path / "a" / "iter_2.safetensors"))
    b = load_file(str(tmp_path / "b" / "iter_2.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=k)


def test_engine_slide_flip_and_scales_evaluate():
    from visattn.data import build_dataset, build_val_transform
    from visattn.engine import evaluate
    from visattn.models.segmentor import build_segmentor

    cfg = load_config(None, TINY)
    torch.manual_seed(0)
    model = build_segmentor(cfg["model"])
    ds = build_dataset(cfg["data"], False, build_val_transform(model.data_cfg["mean"], model.data_cfg["std"]))
    whole = evaluate(model, ds, num_classes=6, eval_cfg={"mode": "whole"})
    same = evaluate(model, ds, num_classes=6, eval_cfg={"mode": "slide", "crop_size": 32, "stride": 32})
    assert whole == same  # one window covering the image is whole-image inference
    tta = evaluate(model, ds, num_classes=6, eval_cfg={"scales": [0.75, 1.0], "flip": True})
    slide = evaluate(model, ds, num_classes=6, eval_cfg={"mode": "slide", "crop_size": 16, "stride": 8})
    for m in (tta, slide):
        assert 0 <= m["mIoU"] <= 100 and 0 <= m["aAcc"] <= 100
    assert model.training  # mode restored
