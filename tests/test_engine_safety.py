"""Training never loses a run (issue 18, items 1-5): a fresh run refuses a used work dir, a resume checks
everything before writing, SIGINT/SIGTERM save a checkpoint, a damaged newest checkpoint is skipped, and
the log of a resumed run continues without repeating iterations.

One reference run (5 iterations, checkpoints at 2, 4 and 5) is trained once per module; the tests copy it
and shape the copy into the state each case needs (finished, unfinished, damaged).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_engine import ROOT, TINY, _env

from visattn.engine import load_config
from visattn.engine.checkpoint import find_intact_checkpoint, read_checkpoint
from visattn.engine.cli import main_train
from visattn.engine.trainer import (
    RESUME_MAY_CHANGE,
    ResumeError,
    ResumeFallbackWarning,
    RunExistsError,
    TrainingInterrupted,
    train,
)
from visattn.hub import CheckpointError

SETS = [*TINY, "train.iters=5", "train.ckpt_interval=2", "train.deterministic=true", "model.dropout=0.3"]


def _cfg(work_dir: Path, *extra: str) -> dict:
    return load_config(None, [*SETS, *extra, f"train.work_dir={work_dir}"])


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``folder`` with its bytes and modification time: equal snapshots mean untouched."""
    return {
        str(f.relative_to(folder)): (f.read_bytes(), f.stat().st_mtime_ns)
        for f in sorted(folder.rglob("*"))
        if f.is_file()
    }


def _log_iters(work_dir: Path, key: str = "loss") -> list[int]:
    rows = [json.loads(x) for x in (work_dir / "log.jsonl").read_text().splitlines()]
    return [r["iter"] for r in rows if key in r]


def _args(work_dir: Path, *sets: str) -> list[str]:
    out = ["--no-progress", "--work-dir", str(work_dir)]
    for s in [*SETS, *sets]:
        out += ["--set", s]
    return out


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The subprocesses run with one thread; bit-identical comparisons need the same here.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted, finished run: iter_2, iter_4, iter_5, eval.json, a log with every iteration."""
    work = tmp_path_factory.mktemp("reference") / "run"
    train(_cfg(work), progress=False)
    return work


def _copy(reference: Path, dest: Path, *, unfinished_at: int | None = None) -> Path:
    """A copy of the reference run; ``unfinished_at``: as if it had died after checkpoint ``iter_<n>``
    (later checkpoints and eval.json gone, ``latest`` at n, the log still holding later entries)."""
    shutil.copytree(reference, dest)
    if unfinished_at is not None:
        (dest / "eval.json").unlink()
        for f in dest.glob("iter_*"):
            if int(f.name.split(".")[0][len("iter_") :]) > unfinished_at:
                f.unlink()
        (dest / "latest").write_text(f"iter_{unfinished_at}\n")
    return dest


def _assert_same_weights(a: Path, b: Path) -> None:
    x, y = load_file(str(a)), load_file(str(b))
    assert x.keys() == y.keys()
    for k in x:
        assert torch.equal(x[k], y[k]), k


# 1. A fresh run never touches a run already in its work dir.


def test_fresh_run_refuses_a_finished_run_and_changes_nothing(reference, tmp_path, capsys):
    """Old code: the second run overwrote config.yaml and eval.json, moved `latest` and appended to the log."""
    work = _copy(reference, tmp_path / "w")
    before = _snapshot(work)
    miou = json.loads((work / "eval.json").read_text())["mIoU"]
    with pytest.raises(RunExistsError) as err:
        train(_cfg(work, "train.iters=3"), progress=False)
    msg = str(err.value)
    assert "finished run" in msg and "iteration 5 of 5" in msg and f"mIoU {miou:.2f}" in msg
    assert "--resume" in msg and "--work-dir" in msg and "--replace" in msg and "nothing was changed" in msg
    assert _snapshot(work) == before
    assert main_train(_args(work, "train.iters=3")) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert (
        len(lines) == 1
        and lines[0].startswith("visattn train: train.work_dir")
        and "finished run" in lines[0]
    )
    assert _snapshot(work) == before


def test_fresh_run_refuses_an_unfinished_run(reference, tmp_path):
    """Old code: trained over the unfinished run, mixing two runs' checkpoints and logs."""
    work = _copy(reference, tmp_path / "w", unfinished_at=4)
    before = _snapshot(work)
    with pytest.raises(RunExistsError, match=r"unfinished run \(latest checkpoint: iteration 4 of 5\)"):
        train(_cfg(work), progress=False)
    assert _snapshot(work) == before
    only_log = tmp_path / "log_only"
    only_log.mkdir()
    (only_log / "log.jsonl").write_text('{"iter": 1, "loss": 1.0}\n')
    with pytest.raises(RunExistsError, match=r"without a checkpoint \(log\.jsonl\)"):
        train(_cfg(only_log), progress=False)
    assert (only_log / "log.jsonl").read_text() == '{"iter": 1, "loss": 1.0}\n'
    assert list(only_log.iterdir()) == [only_log / "log.jsonl"]


def test_replace_moves_the_old_run_aside_intact(reference, tmp_path):
    """Old code had no way to start anew without overwriting; --replace keeps every old byte."""
    work = _copy(reference, tmp_path / "w")
    (work / "notes.txt").write_text("mine")  # not a run file: stays where it is
    before = {k: v[0] for k, v in _snapshot(work).items() if k != "notes.txt"}
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with pytest.raises(ValueError, match="resume.*replace"):
        train(_cfg(work, "train.iters=1"), resume=True, replace=True)
    train(_cfg(work, "train.iters=1"), progress=False, replace=True)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers  # restored
    (aside,) = tmp_path.glob("w.replaced-*")
    assert {k: v[0] for k, v in _snapshot(aside).items()} == before
    assert (work / "latest").read_text() == "iter_1\n" and (work / "notes.txt").read_text() == "mine"
    assert sorted(f.name for f in work.glob("iter_*")) == ["iter_1.safetensors", "iter_1.state.pt"]
    assert _log_iters(work) == [1]


# 2. A resume is checked before anything on disk changes.


def test_resume_with_another_config_changes_nothing(reference, tmp_path, capsys):
    """Old code: `--resume --set model.attn=ccnet` rewrote config.yaml, then failed on the state dict."""
    work = _copy(reference, tmp_path / "w", unfinished_at=4)
    before = _snapshot(work)
    with pytest.raises(ResumeError) as err:
        train(_cfg(work, "model.attn=ccnet", "optim.lr=0.5", "train.log_interval=2"), resume=True)
    msg = str(err.value)
    assert "2 key(s)" in msg and "model.attn: 'efficient_attention' -> 'ccnet'" in msg
    assert "optim.lr: 0.001 -> 0.5" in msg and "Nothing was changed" in msg
    assert "train.log_interval:" not in msg  # may change on resume
    assert _snapshot(work) == before
    assert main_train([*_args(work, "model.attn=ccnet"), "--resume"]) == 2
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert len(err_lines) == 1 and "model.attn: 'efficient_attention' -> 'ccnet'" in err_lines[0]
    assert _snapshot(work) == before


def test_resume_from_a_checkpoint_that_does_not_fit_the_model(reference, tmp_path):
    """Without a config.yaml beside it, the state dict itself is checked (keys, shapes) before writing.
    Old code: created the work dir and wrote config.yaml, then raised torch's RuntimeError."""
    lone = tmp_path / "lone"
    lone.mkdir()
    for f in reference.glob("iter_4.*"):
        shutil.copy2(f, lone / f.name)
    target = tmp_path / "new"
    with pytest.raises(ResumeError, match=r"shape mismatches: .*Nothing was changed"):
        train(_cfg(target, "model.head_kwargs={channels: 8}"), resume=str(lone / "iter_4"))
    assert not target.exists()


def test_resume_may_change_is_what_is_documented():
    assert "train.iters" not in RESUME_MAY_CHANGE and "train.log_interval" in RESUME_MAY_CHANGE


# 3. SIGINT / SIGTERM save a checkpoint and resume exactly.


@pytest.mark.parametrize(("name", "code"), [("INT", 130), ("TERM", 143)])
def test_signal_saves_a_checkpoint_and_resumes_bit_identical(reference, tmp_path, name, code):
    """Old code: SIGINT was a KeyboardInterrupt and SIGTERM a kill, both saving nothing (iteration 3's
    work lost, `latest` left at iter_2)."""
    work = tmp_path / "w"
    r = subprocess.run(
        [sys.executable, "tools/train.py", *_args(work)],
        cwd=ROOT,
        env={**_env(), "VISATTN_SIGNAL_AT_ITER": f"3:{name}"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == code, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last == (
        f"visattn train: stopped by SIG{name} after iteration 3 of 5; checkpoint saved to {work / 'iter_3'} "
        "(resume: the same command with --resume)"
    )
    assert (work / "latest").read_text() == "iter_3\n" and not (work / "eval.json").exists()
    tensors, state = read_checkpoint(work / "iter_3", require_state=True)
    assert state["iteration"] == 3 and state["scheduler"]["iteration"] == 3 and "torch" in state["rng"]
    assert not list(work.glob(".*tmp*"))  # the save was atomic: no temporary files left
    train(_cfg(work), resume=True, progress=False)
    _assert_same_weights(work / "iter_5.safetensors", reference / "iter_5.safetensors")
    assert _log_iters(work) == [1, 2, 3, 4, 5]


def test_training_interrupted_is_a_user_error_with_its_exit_code():
    err = TrainingInterrupted("stopped", exit_code=143, checkpoint="w/iter_3")
    assert err.exit_code == 143 and err.checkpoint == "w/iter_3"
    from visattn.errors import VisattnError

    assert isinstance(err, VisattnError)


# 4. A damaged newest checkpoint is skipped by --resume and named by test.


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize("suffix", [".safetensors", ".state.pt"])
def test_resume_falls_back_past_a_truncated_newest_checkpoint(reference, tmp_path, suffix):
    """Old code: a raw SafetensorError / RuntimeError from torch.load stopped --resume."""
    work = _copy(reference, tmp_path / "w", unfinished_at=4)
    _truncate(work / f"iter_4{suffix}")
    with pytest.warns(ResumeFallbackWarning) as caught:
        train(_cfg(work, "train.log_interval=2"), resume=True, progress=False)  # log_interval may change
    (warning,) = [w for w in caught if w.category is ResumeFallbackWarning]
    text = str(warning.message)
    assert f"iter_4{suffix}" in text and f"resuming from {work / 'iter_2'} (iteration 2)" in text
    _assert_same_weights(work / "iter_5.safetensors", reference / "iter_5.safetensors")


@pytest.mark.parametrize("keep", [0.0, 0.3, 0.999])
def test_read_checkpoint_rejects_every_truncation(reference, tmp_path, keep):
    for suffix in (".safetensors", ".state.pt"):
        work = tmp_path / suffix.strip(".")
        work.mkdir()
        for f in reference.glob("iter_2.*"):
            shutil.copy2(f, work / f.name)
        _truncate(work / f"iter_2{suffix}", keep)
        with pytest.raises(CheckpointError, match=f"iter_2{suffix.replace('.', r'.')}.*damaged or truncated"):
            read_checkpoint(work / "iter_2")


def test_resume_without_an_intact_checkpoint_names_every_file(reference, tmp_path):
    work = _copy(reference, tmp_path / "w", unfinished_at=4)
    _truncate(work / "iter_4.safetensors")
    _truncate(work / "iter_2.state.pt", 0.999)
    before = _snapshot(work)
    with pytest.raises(
        CheckpointError, match=r"no intact checkpoint.*iter_4\.safetensors.*iter_2\.state\.pt"
    ):
        train(_cfg(work), resume=True, progress=False)
    assert _snapshot(work) == before
    assert find_intact_checkpoint(tmp_path / "empty_or_absent") is None


def test_test_tool_names_a_truncated_checkpoint(reference, tmp_path):
    """Old code: `internal error (SafetensorError: ...)`, exit 1, without the file's name."""
    work = _copy(reference, tmp_path / "w")
    _truncate(work / "iter_4.safetensors")
    args = [sys.executable, "tools/test.py", "--no-progress", "--checkpoint", str(work / "iter_4")]
    for s in SETS:
        args += ["--set", s]
    r = subprocess.run(args, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and str(work / "iter_4.safetensors") in lines[0], r.stderr


# 5. The log of a resumed run continues from the resumed iteration.


def test_log_continues_from_the_resumed_iteration(reference, tmp_path):
    """Old code: the log held iteration 3 twice (the killed run's and the resumed run's): a zigzag."""
    work = tmp_path / "w"
    r = subprocess.run(
        [sys.executable, "tools/train.py", *_args(work)],
        cwd=ROOT,
        env={**_env(), "VISATTN_CRASH_AT_ITER": "3"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == -9, r.stderr[-2000:]
    assert _log_iters(work) == [1, 2, 3] and (work / "latest").read_text() == "iter_2\n"
    with open(work / "log.jsonl", "a") as f:
        f.write('{"iter": 3, "lo')  # a line the kill cut in half
    train(_cfg(work), resume=True, progress=False)
    assert _log_iters(work) == [1, 2, 3, 4, 5] and _log_iters(work, "mIoU") == [5]
    ref = [json.loads(x) for x in (reference / "log.jsonl").read_text().splitlines()]
    got = [json.loads(x) for x in (work / "log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in got if "loss" in r] == [r["loss"] for r in ref if "loss" in r]


@pytest.mark.slow
@pytest.mark.skipif(not (Path(sys.executable).parent / "torchrun").exists(), reason="torchrun not installed")
def test_torchrun_processes_agree_to_stop_at_one_iteration(tmp_path):
    """Only rank 0 gets the signal; rank 1 learns of it through the all_reduce and stops after the same
    iteration (no hang in a collective, one checkpoint at that iteration). Old code: rank 0 died."""
    work = tmp_path / "ddp"
    torchrun = str(Path(sys.executable).parent / "torchrun")
    sets = [*SETS, "train.norm_eval=true"]
    args = [torchrun, "--standalone", "--nproc_per_node=2", "tools/train.py", "--no-progress"]
    args += ["--work-dir", str(work)] + sum((["--set", s] for s in sets), [])
    env = {**_env(), "VISATTN_SIGNAL_AT_ITER": "3:TERM"}
    r = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode != 0
    assert f"stopped by SIGTERM after iteration 3 of 5; checkpoint saved to {work / 'iter_3'}" in r.stderr
    assert (work / "latest").read_text() == "iter_3\n" and not (work / "iter_4.safetensors").exists()
    state = torch.load(work / "iter_3.state.pt", weights_only=True)
    assert state["iteration"] == 3 and len(state["rng"]) == 2  # both processes saved their RNG


def test_tensorboard_without_the_package_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    """Old code: wrote config.yaml into the work dir, then failed on the import inside the training loop, so the
    retry was refused as an existing run."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a)
    )
    work = tmp_path / "w"
    with pytest.raises(
        ValueError, match=r"train\.tensorboard is true but the tensorboard package is not installed"
    ):
        train(_cfg(work, "train.tensorboard=true"), progress=False)
    assert not work.exists()
