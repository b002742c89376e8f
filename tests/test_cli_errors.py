"""The command line under a careless user: every bad argument of every subcommand is one line on stderr
and exit code 2 (argparse's own errors too), checked before any expensive work; ``--debug`` /
``VISATTN_DEBUG=1`` show the traceback; checkpoint paths take every form; the offline hint names the CLI
flag; ``visattn bench`` prints no CUDA_HOME warning on a CPU-only machine. The hypothesis fuzzers feed
random argv (valid and invalid tokens) to each subcommand in-process, with the heavy back ends faked.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from urllib.error import URLError

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st
from PIL import Image

from visattn import cli
from visattn.engine import load_config, save_checkpoint
from visattn.engine.cli import main_test, main_train
from visattn.models.segmentor import build_segmentor

ROOT = Path(__file__).resolve().parents[1]
ZOO = "ccnet_r50-d8_cityscapes-512x1024"
# The engine's tiny setting (as in test_engine.py): resnet10t, 16-channel heads, 4 synthetic 32x32 images.
TINY = [
    "model.backbone=resnet10t",
    "model.head_kwargs={channels: 16}",
    "model.aux_kwargs={channels: 16}",
    "model.attn_kwargs={}",
    "data.synthetic={train_length: 8, val_length: 2, size: [32, 32]}",
    "data.crop_size=[32, 32]",
    "train.batch_size=2",
    "eval.max_images=1",
]


def _one_line_error(code: int, err: str, command: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"visattn {command}:" if command else "visattn:"), lines[0]
    assert "Traceback" not in err


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Inputs good and bad: an image, a non-image, a tiny config and its checkpoint in every form."""
    d = tmp_path_factory.mktemp("cli")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (9, 11, 3), dtype=np.uint8)).save(d / "img.png")
    (d / "garbage.png").write_bytes(b"this is not an image")
    (d / "garbage.pth").write_bytes(b"\x00\x01 not a checkpoint")
    (d / "afile.txt").write_text("a file, not a folder\n")
    (d / "adir").mkdir()
    (d / "bad.yaml").write_text("model: {backbone: [unclosed\n")
    (d / "empty.yaml").write_text("")
    cfg = load_config(None, [*TINY, f"train.work_dir={d / 'unused_run'}"])
    (d / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    torch.manual_seed(0)
    model = build_segmentor(cfg["model"]).eval()
    save_checkpoint(d / "run", model, {"iteration": 1}, "iter_1")
    good = (d / "run" / "iter_1.safetensors").read_bytes()
    (d / "trunc").mkdir()
    (d / "trunc" / "iter_1.safetensors").write_bytes(good[: len(good) // 3])
    (d / "trunc" / "latest").write_text("iter_1\n")
    return SimpleNamespace(dir=d, cfg=cfg, model=model)


# ---------------------------------------------------------------------------------- argparse errors


@pytest.mark.parametrize(
    ("argv", "command", "needle"),
    [
        (["bench", "--sizes", "3x"], "bench", "'3x'"),
        (["bench", "--sizes", "0"], "bench", "'0'"),
        (["bench", "--sizes", "32,,64"], "bench", "''"),
        (["bench", "--batch", "-1"], "bench", "--batch"),
        (["bench", "--channels", "0"], "bench", "--channels"),
        (["bench", "--min-run-time", "nan"], "bench", "--min-run-time"),
        (["bench", "--device", "gpu7"], "bench", "gpu7"),
        (["export", "cbam", "-o", "x.onnx", "--batch", "-2"], "export", "--batch"),
        (["predict", "m.yaml", "i.png", "--crop-size", "abc"], "predict", "'abc'"),
        (["predict", "m.yaml", "i.png", "--alpha", "1.5"], "predict", "--alpha"),
        (["predict", "m.yaml"], "predict", "image"),
        (["list", "--bogus"], "list", "--bogus"),
        (["train", "--bogus"], "train", "--bogus"),
        (["test", "--mode", "tiles"], "test", "tiles"),
        (["nosuchcommand"], "", "nosuchcommand"),
        ([], "", "command"),
    ],
)
def test_argparse_errors_are_one_line_and_exit_2(argv, command, needle, capsys, tmp_path, monkeypatch):
    from visattn.bench import runner

    def no_sweep(*args, **kwargs):
        raise AssertionError("a bad argument reached the sweep")

    monkeypatch.setattr(runner, "run_sweep", no_sweep)
    monkeypatch.chdir(tmp_path)
    code = cli.main(argv)
    err = capsys.readouterr().err
    _one_line_error(code, err, command)
    assert needle in err
    assert err.rstrip().endswith(f"(see {' '.join(['visattn', command]).strip()} --help)")


def test_help_returns_0_and_debug_is_accepted_after_the_subcommand(capsys):
    assert cli.main(["list", "--help"]) == 0
    assert "usage: visattn list" in capsys.readouterr().out
    assert cli.main(["list", "axial", "--debug"]) == 0


def test_debug_flag_and_env_show_the_traceback(capsys, monkeypatch):
    assert cli.main(["info", "ccnt"]) == 2
    _one_line_error(2, capsys.readouterr().err, "info")
    for argv in (["--debug", "info", "ccnt"], ["info", "ccnt", "--debug"]):
        with pytest.raises(ValueError, match="did you mean 'ccnet'"):
            cli.main(argv)
    monkeypatch.setenv("VISATTN_DEBUG", "1")
    with pytest.raises(ValueError, match="ccnt"):
        cli.main(["info", "ccnt"])


def test_tools_scripts_are_the_same_commands(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main_train(["--bogus"]) == 2
    _one_line_error(2, capsys.readouterr().err, "train")
    assert main_test(["--scales", "1,-1"]) == 2
    err = capsys.readouterr().err
    _one_line_error(2, err, "test")
    assert "--scales" in err
    with pytest.raises(ValueError, match="--scales"):
        main_test(["--scales", "x", "--debug"])


# ---------------------------------------------------------------------------------- paths


def test_unwritable_outputs_fail_before_any_work(files, capsys, monkeypatch):
    from visattn.bench import runner

    def no_sweep(*args, **kwargs):
        raise AssertionError("the sweep ran before the output path was checked")

    monkeypatch.setattr(runner, "run_sweep", no_sweep)
    d = files.dir
    inside_file = str(d / "afile.txt" / "x.csv")
    cases = [
        (["bench", "cbam", "--csv", str(d / "adir")], "bench", str(d / "adir")),
        (["bench", "cbam", "--json", inside_file], "bench", str(d / "afile.txt")),
        (["bench", "cbam", "--plot", str(d / "afile.txt")], "bench", str(d / "afile.txt")),
        (["docs", "-o", str(d / "adir")], "docs", str(d / "adir")),
        (["support", "cbam", "-o", inside_file], "support", str(d / "afile.txt")),
        (["predict", str(d / "tiny.yaml"), str(d / "img.png"), "-o", str(d / "adir")], "predict", "adir"),
        (["predict", str(d / "tiny.yaml"), str(d / "img.png"), "-o", str(d / "x.jpg")], "predict", "x.jpg"),
        (
            ["test", str(d / "tiny.yaml"), "--checkpoint", str(d / "run"), "--out", inside_file],
            "test",
            "afile",
        ),
    ]
    before = sorted(p.name for p in d.rglob("*"))
    for argv, command, needle in cases:
        code = cli.main(argv)
        err = capsys.readouterr().err
        _one_line_error(code, err, command)
        assert needle in err, (argv, err)
    assert sorted(p.name for p in d.rglob("*")) == before  # nothing written anywhere


def test_folder_without_write_permission_is_named(tmp_path, capsys, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running with permissions that ignore the folder's mode (root)")
        code = cli.main(["docs", "-o", str(locked / "sub" / "blocks.md")])
        err = capsys.readouterr().err
        _one_line_error(code, err, "docs")
        assert "no write permission" in err and str(locked) in err
    finally:
        locked.chmod(0o700)


def test_not_an_image_and_not_a_checkpoint_name_the_file(files, capsys):
    d = files.dir
    out = str(d / "o" / "p.png")
    cases = [
        (["predict", str(d / "tiny.yaml"), str(d / "garbage.png"), "-o", out], "predict", "garbage.png"),
        (["predict", str(d / "tiny.yaml"), str(d / "adir"), "-o", out], "predict", "adir"),
        (
            [
                "predict",
                str(d / "tiny.yaml"),
                str(d / "img.png"),
                "--checkpoint",
                str(d / "garbage.pth"),
                "-o",
                out,
            ],
            "predict",
            "garbage.pth",
        ),
        (
            [
                "predict",
                str(d / "tiny.yaml"),
                str(d / "img.png"),
                "--checkpoint",
                str(d / "trunc"),
                "-o",
                out,
            ],
            "predict",
            "iter_1.safetensors",
        ),
        (["test", str(d / "tiny.yaml"), "--checkpoint", str(d / "garbage.pth")], "test", "garbage.pth"),
        (["test", str(d / "tiny.yaml"), "--checkpoint", str(d / "trunc" / "iter_1")], "test", "iter_1"),
        (["test", str(d / "tiny.yaml"), "--checkpoint", str(d / "nothing_here")], "test", "nothing_here"),
    ]
    for argv, command, needle in cases:
        code = cli.main(argv)
        err = capsys.readouterr().err
        _one_line_error(code, err, command)
        assert needle in err, (argv, err)
    assert not (d / "o" / "p.png").exists()


def test_predict_error_is_the_only_line_and_notice_comes_after_outputs(files, capsys):
    """Found by the fuzzer: the random-weights notice used to precede a failure, making it two lines."""
    d = files.dir
    code = cli.main(["predict", str(d / "tiny.yaml"), str(d / "img.png"), "--mode", "slide", "-o", "x.png"])
    err = capsys.readouterr().err
    _one_line_error(code, err, "predict")
    assert "--crop-size" in err
    out = d / "notice" / "p.png"
    assert cli.main(["predict", str(d / "tiny.yaml"), str(d / "img.png"), "-o", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "random" in captured.err and out.is_file()


def test_predict_and_test_accept_every_checkpoint_form(files, capsys, monkeypatch):
    evaluate_mod = importlib.import_module("visattn.engine.evaluate")  # the package re-exports the function

    d = files.dir
    want = files.model.predict(np.asarray(Image.open(d / "img.png").convert("RGB"))).numpy()
    forms = [d / "run" / "iter_1", d / "run" / "iter_1.safetensors", d / "run" / "iter_1.state.pt", d / "run"]
    for i, form in enumerate(forms):
        out = d / "forms" / f"{i}.png"
        assert (
            cli.main(
                [
                    "predict",
                    str(d / "tiny.yaml"),
                    str(d / "img.png"),
                    "--checkpoint",
                    str(form),
                    "-o",
                    str(out),
                ]
            )
            == 0
        )
        np.testing.assert_array_equal(np.asarray(Image.open(out)), want)
    assert "random" not in capsys.readouterr().err

    loaded = []

    def fake_evaluate(model, *args, **kwargs):
        loaded.append({k: v.clone() for k, v in model.state_dict().items()})
        return {"mIoU": 1.0, "aAcc": 1.0, "mAcc": 1.0}

    monkeypatch.setattr(evaluate_mod, "evaluate", fake_evaluate)
    monkeypatch.setattr(evaluate_mod, "format_table", lambda metrics: "table")
    for form in (d / "run", d / "run" / "iter_1.state.pt"):
        assert cli.main(["test", str(d / "tiny.yaml"), "--checkpoint", str(form), "--no-progress"]) == 0
    reference = files.model.state_dict()
    for state in loaded:
        assert all(torch.equal(state[k], reference[k]) for k in reference)
    assert len(loaded) == 2


def test_offline_predict_names_the_cli_flag(files, capsys, monkeypatch, tmp_path):
    import visattn

    def offline(url, dst, *args, **kwargs):
        raise URLError("no network in this test")

    monkeypatch.setenv("VISATTN_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    code = cli.main(["predict", ZOO, str(files.dir / "img.png"), "-o", str(tmp_path / "p.png")])
    err = capsys.readouterr().err
    _one_line_error(code, err, "predict")
    assert "--checkpoint PATH" in err and "checkpoint_path=" not in err
    assert str(tmp_path / "home" / "checkpoints") in err
    with pytest.raises(visattn.hub.CheckpointError, match="checkpoint_path="):
        visattn.create_segmentor(ZOO, pretrained=True)


def test_bench_prints_no_cuda_home_warning_without_cuda(tmp_path):
    # CUDA_HOME makes torch's guess succeed, so without the filter the warning would be printed.
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), CUDA_HOME=str(tmp_path))
    env.pop("VISATTN_DEBUG", None)
    argv = ["bench", "cbam", "--sizes", "4", "--batch", "1", "--channels", "8", "--min-run-time", "0.001"]
    res = subprocess.run(
        [sys.executable, "-m", "visattn.cli", *argv, "--no-progress"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert "cbam" in res.stdout
    if not torch.cuda.is_available():
        assert res.stderr == ""


# ---------------------------------------------------------------------------------- fuzzers

FUZZ = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
BAD_NUMBERS = ["0", "-1", "-3", "nan", "inf", "abc", "", "1e9x"]
GOOD_SIZES = ["8", "8x12", "4,8", "6X10"]
BAD_SIZES = ["3x", "x3", "0", "-4", "8x0", "abc", "8x8x8", ",", "4,,8"]
GOOD_BLOCKS = ["cbam", "gcnet", "axial"]
BAD_BLOCKS = ["ccnt", "cbma", "performr", "*", ""]


def _paths(d: Path, *names: str) -> list[str]:
    return [str(d / name) for name in names]


def _bad_outputs(d: Path) -> list[str]:
    """Paths no file can be written to: a folder, a path under a file, an empty name."""
    return [*_paths(d, "adir", "afile.txt/x.out", "afile.txt/sub/x.out"), ""]


def _bad_inputs(d: Path) -> list[str]:
    """Files that are missing, folders, or not what they claim (garbage image, checkpoint, YAML)."""
    return _paths(d, "missing.png", "adir", "garbage.png", "garbage.pth", "bad.yaml", "empty.yaml", "trunc")


def _choice(good: list[str], bad: list[str]):
    """A value: good two times in three, so that valid command lines (which run) are common too."""
    return (
        st.one_of(st.sampled_from(good), st.sampled_from(good), st.sampled_from(bad))
        if bad
        else st.sampled_from(good)
    )


def _argv(command: str, positionals, options: dict[str, tuple[list[str], list[str]]], switches: list[str]):
    """argv for ``command``: the positionals (a strategy of lists), some options with good or bad values,
    some switches, and one time in three a stray token."""
    kinds = []
    if options:
        flag = st.sampled_from(sorted(options))
        kinds.append(flag.flatmap(lambda f: _choice(*options[f]).map(lambda v: [f, v])))
    if switches:
        kinds.append(st.sampled_from(switches).map(lambda f: [f]))
    part = st.one_of(kinds) if kinds else st.just([])
    stray = st.sampled_from([[], [], [], [], [], [], ["--bogus"], ["extra"], ["-1"]])
    return st.tuples(positionals, st.lists(part, max_size=3), stray).map(
        lambda t: [command, *t[0], *(tok for p in t[1] for tok in p), *t[2]]
    )


def _check_result(command: str, argv: list[str], code: int, err: str) -> None:
    note(f"argv={argv} code={code} stderr={err!r}")
    event(f"exit {code}")
    assert code in (0, 2), f"exit {code} (an internal error) for {argv}: {err}"
    assert "Traceback" not in err
    if code == 2:
        _one_line_error(code, err, command)


@pytest.fixture
def fuzz_env(files, monkeypatch, tmp_path):
    """cwd in a scratch folder (default outputs land there), no network, heavy back ends faked."""
    from visattn import export
    from visattn.bench import compiled, peers, plots, runner, vs_dense

    evaluate_mod = importlib.import_module("visattn.engine.evaluate")  # the package re-exports the function
    trainer = importlib.import_module("visattn.engine.trainer")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VISATTN_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("VISATTN_DEBUG", raising=False)

    def offline(url, dst, *args, **kwargs):
        raise URLError("offline")

    def fake_export_to_file(exp, out, *, size, batch=1, dynamic=True, fmt="onnx"):
        return export.ExportReport(Path(out), fmt, dynamic, 1, [size], [0.0], "fake", [])

    def fake(row):
        """A sweep that answers one made-up row per block, size and dtype: ``row(name, B, C, H, W, dtype,
        device, options)``."""

        def sweep(names, sizes, *, batch=1, channels=64, dtypes=(torch.float32,), device="cpu", **kw):
            dts = [str(dt).replace("torch.", "") for dt in dtypes]
            return [
                row(n, batch, channels, h, w, dt, device, kw) for n in names for h, w in sizes for dt in dts
            ]

        return sweep

    fake_sweep = fake(lambda *a: runner.BenchRow(*a[:7], 1, 1.0, 2.0, a[3] * a[4], 1.0, None, 0.5))
    fake_vs_dense = fake(
        lambda *a: vs_dense.DenseRatio(*a[:7], "eager", 1, a[7]["rounds"], 1, 2, 0.5, 1, 2, 0.5)
    )
    fake_compiled = fake(
        lambda *a: compiled.CompiledRow(
            *a[:7], a[7]["backend"], "default", a[7]["rounds"], 2, 1, 0.5, 1, 0, 1, 0, 0, 1e-5, 1
        )
    )

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    monkeypatch.setattr(runner, "run_sweep", fake_sweep)
    monkeypatch.setattr(vs_dense, "sweep_vs_dense", fake_vs_dense)
    monkeypatch.setattr(compiled, "sweep_compiled", fake_compiled)
    monkeypatch.setattr(peers, "compare", lambda *a, **k: [])
    monkeypatch.setattr(peers, "format_ratios", lambda rows: "")
    monkeypatch.setattr(plots, "plot_scaling", lambda rows, out_dir, **k: [])
    monkeypatch.setattr(export, "export_to_file", fake_export_to_file)
    monkeypatch.setattr(
        export, "support_row", lambda name: export.SupportRow(name, True, 0, True, True, 0.0, True)
    )
    monkeypatch.setattr(trainer, "train", lambda cfg, **kwargs: None)
    monkeypatch.setattr(evaluate_mod, "evaluate", lambda *a, **k: {"mIoU": 1.0, "aAcc": 1.0, "mAcc": 1.0})
    monkeypatch.setattr(evaluate_mod, "format_table", lambda metrics: "table")
    return files.dir


def _run(command, argv, capsys):
    capsys.readouterr()
    code = cli.main(argv)
    _check_result(command, argv, code, capsys.readouterr().err)


@FUZZ
@given(data=st.data())
def test_fuzz_list_info_docs(fuzz_env, capsys, data):
    d = fuzz_env
    argv = data.draw(
        st.one_of(
            _argv("list", st.lists(st.sampled_from(["*", "perf*", "zzz", ""]), max_size=2), {}, ["--causal"]),
            _argv("info", st.lists(_choice(GOOD_BLOCKS, BAD_BLOCKS), max_size=2), {}, []),
            _argv("docs", st.just([]), {"-o": (["blocks.md", "new/b.md"], _bad_outputs(d))}, []),
        )
    )
    _run(argv[0], argv, capsys)


@FUZZ
@given(data=st.data())
def test_fuzz_bench(fuzz_env, capsys, data):
    d = fuzz_env
    options = {
        "--sizes": (GOOD_SIZES, BAD_SIZES),
        "--batch": (["1", "2"], BAD_NUMBERS),
        "--channels": (["8", "16"], BAD_NUMBERS),
        "--min-run-time": (["0.01", "1"], BAD_NUMBERS),
        "--dtype": (["float32", "bfloat16"], ["float64", ""]),
        "--device": (["cpu"], ["cuda", "cuda:1", "meta", "tpu", ""]),
        "--filter": (["perf*", "*"], ["zzz"]),
        "--csv": (["b.csv", "new/b.csv"], _bad_outputs(d)),
        "--json": (["b.json"], _bad_outputs(d)),
        "--plot": (["plots", "new/plots"], _paths(d, "afile.txt", "afile.txt/sub")),
        "--rounds": (["1", "3"], BAD_NUMBERS),
        "--backend": (["eager", "aot_eager"], ["cudagraphs", ""]),
    }
    names = st.lists(_choice(GOOD_BLOCKS, BAD_BLOCKS), max_size=2)
    flags = ["--quick", "--peers", "--no-progress", "--vs-dense", "--compiled"]
    argv = data.draw(_argv("bench", names, options, flags))
    _run("bench", argv, capsys)


@FUZZ
@given(data=st.data())
def test_fuzz_support(fuzz_env, capsys, data):
    names = st.lists(_choice(GOOD_BLOCKS, BAD_BLOCKS), max_size=2)
    argv = data.draw(_argv("support", names, {"-o": (["s.md", "new/s.md"], _bad_outputs(fuzz_env))}, []))
    _run("support", argv, capsys)


@settings(FUZZ, max_examples=40)
@given(data=st.data())
def test_fuzz_export(fuzz_env, capsys, data):
    d = fuzz_env
    options = {
        "--size": (["8", "16x20", "40x48"], BAD_SIZES),
        "--batch": (["1", "2"], BAD_NUMBERS),
        "--channels": (["8", "16"], BAD_NUMBERS),
        "--format": (["onnx", "export"], ["tflite"]),
        "--checkpoint": (_paths(d, "run", "run/iter_1", "run/iter_1.state.pt"), _bad_inputs(d)),
        "--attn": (["cbam"], ["ccnt"]),
    }
    # A zoo name fails offline before anything is built (its download is faked to fail).
    name = _choice(["cbam", "gcnet", str(d / "tiny.yaml")], ["ccnt", ZOO, *_bad_inputs(d)])
    out = _choice(["x.onnx", "new/x.onnx", "x.pt2"], _bad_outputs(d))
    head = st.tuples(name, out).map(lambda t: [t[0], "-o", t[1]])
    argv = data.draw(_argv("export", head, options, ["--static", "--random-weights"]))
    _run("export", argv, capsys)


@settings(FUZZ, max_examples=40)
@given(data=st.data())
def test_fuzz_predict(fuzz_env, capsys, data):
    d = fuzz_env
    ckpts = _paths(d, "run", "run/iter_1", "run/iter_1.safetensors", "run/iter_1.state.pt")
    options = {
        "-o": (["p.png", "new/p.png", "p.tif"], ["p.jpg", "p", *_bad_outputs(d)]),
        "--overlay": (["o.png", "o.jpg"], ["o.xyz", *_bad_outputs(d)]),
        "--checkpoint": (ckpts, _bad_inputs(d)),
        "--mode": (["whole", "slide"], ["tiles"]),
        "--crop-size": (["8", "6x10"], BAD_SIZES),
        "--stride": (["4", "3x5"], BAD_SIZES),
        "--alpha": (["0", "0.3", "1"], ["-0.1", "1.5", "nan", "abc"]),
        "--device": (["cpu"], ["cuda", "bogus"]),
    }
    # No zoo name here: with --no-pretrained it would build a ResNet-50 (test_offline_* covers the zoo).
    model = _choice([str(d / "tiny.yaml")], [*_bad_inputs(d), "ccnet_r50-d8_cityscapess"])
    image = _choice([str(d / "img.png")], _bad_inputs(d))
    head = st.tuples(model, image).map(list)
    argv = data.draw(_argv("predict", head, options, ["--no-pretrained", "--no-resize"]))
    _run("predict", argv, capsys)


@FUZZ
@given(data=st.data())
def test_fuzz_train(fuzz_env, capsys, data):
    d = fuzz_env
    options = {
        "--set": (
            ["train.iters=3", "optim.lr=0.1", "train.iters=3 optim.lr=0.1"],
            ["train.iters=-1", "optim.lr=abc", "nokey", "model.attn=ccnnet", "a.b=1", "data.crop_size=[48]"],
        ),
        "--work-dir": (["runs/x", "new/run"], _paths(d, "afile.txt", "afile.txt/x")),
        "--resume": (_paths(d, "run", "run/iter_1"), _bad_inputs(d)),
    }
    config = st.lists(_choice([str(d / "tiny.yaml")], _bad_inputs(d)), max_size=1)
    argv = data.draw(_argv("train", config, options, ["--resume", "--replace", "--plot", "--no-progress"]))
    # "a=1 b=2" stands for several pairs after one --set.
    argv = [tok for a in argv for tok in (a.split(" ") if "=" in a else [a])]
    _run("train", argv, capsys)


@settings(FUZZ, max_examples=40)
@given(data=st.data())
def test_fuzz_test(fuzz_env, capsys, data):
    d = fuzz_env
    ckpts = _paths(d, "run", "run/iter_1", "run/iter_1.safetensors", "run/iter_1.state.pt")
    options = {
        "--checkpoint": (ckpts, _bad_inputs(d)),
        "--mode": (["whole", "slide"], ["tiles"]),
        "--scales": (["0.5,1.0", "1"], ["0", "-1", "a,b", "", "1,,2"]),
        "--out": (["r.json", "new/r.json"], _bad_outputs(d)),
        "--set": (["eval.flip=true", "eval.max_images=1"], ["eval.max_images=-1", "model.num_classes=7"]),
        "--work-dir": (_paths(d, "run"), _paths(d, "afile.txt", "missing")),
    }
    config = st.lists(_choice([str(d / "tiny.yaml")], _bad_inputs(d)), max_size=1, min_size=1)
    argv = data.draw(_argv("test", config, options, ["--flip", "--no-progress"]))
    _run("test", argv, capsys)


def test_bench_vs_dense_and_compiled_runs_through_the_cli(fuzz_env, capsys):
    """The two bench modes the fuzzer draws, spelled out once: their rows reach the JSON and CSV, and a bad
    --rounds is one line with exit 2 (the fakes keep it fast; the real sweeps have their own tests)."""
    for flag, stem in (("--vs-dense", "vs"), ("--compiled", "cmp")):
        argv = [
            "bench",
            "cbam",
            flag,
            "--rounds",
            "2",
            "--sizes",
            "8",
            "--json",
            f"{stem}.json",
            "--csv",
            f"{stem}.csv",
        ]
        assert cli.main(argv) == 0, capsys.readouterr().err
        rows = json.loads(Path(f"{stem}.json").read_text())["rows"]
        assert [(r["name"], r["rounds"]) for r in rows] == [("cbam", 2)]
        assert Path(f"{stem}.csv").read_text().startswith("name,")
    capsys.readouterr()
    assert cli.main(["bench", "cbam", "--compiled", "--rounds", "0"]) == 2
    _one_line_error(2, capsys.readouterr().err, "bench")
