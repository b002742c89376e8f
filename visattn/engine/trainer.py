"""The training loop: one process, or many under ``torchrun`` (DDP, SyncBatchNorm), CPU or GPU.

Sampling is a pure function of ``(seed, iteration)``: the global batch of iteration ``it`` is the
positions ``it * B .. (it + 1) * B - 1`` of a stream of per-epoch permutations, each process taking its
slice of every accumulation step, and each sample's augmentation is seeded by its stream position. So
a resumed run, or a run with another process count and the same global batch, sees the same data.

Nothing is lost: a fresh run refuses a work dir that holds a run (:class:`RunExistsError`; ``replace=True``
moves the old files aside), ``resume`` checks the checkpoint, the config and the state dict before
anything on disk changes (:class:`ResumeError`) and falls back past a damaged newest checkpoint, and
SIGINT / SIGTERM stop after the current iteration with a checkpoint saved (:class:`TrainingInterrupted`).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import yaml

from ..data import build_dataset, build_train_transform, build_val_transform
from ..errors import VisattnError
from ..models.segmentor import build_segmentor
from .checkpoint import (
    atomic_write_text,
    checkpoint_iteration,
    checkpoint_prefix,
    find_intact_checkpoint,
    latest_checkpoint,
    read_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .dist import barrier, get_rank, get_world_size, init_distributed, is_main
from .evaluate import evaluate, format_table

__all__ = [
    "RESUME_MAY_CHANGE",
    "PolyLR",
    "ResumeError",
    "ResumeFallbackWarning",
    "RunExistsError",
    "SampleStream",
    "TrainingInterrupted",
    "train",
]

# Config keys that may differ between a run and its resume: they change how a run is watched, saved or
# executed, never the sequence of weights it computes (train.iters is not here: it reshapes the schedule).
RESUME_MAY_CHANGE = frozenset(
    {
        "train.work_dir",
        "train.device",
        "train.log_interval",
        "train.ckpt_interval",
        "train.eval_interval",
        "train.tensorboard",
        "data.num_workers",
    }
)
# What a run writes into its work dir besides its iter_<n> checkpoints: any of them means "a run is here".
RUN_FILES = ("config.yaml", "latest", "log.jsonl", "eval.json", "curves.png", "tb")


class RunExistsError(VisattnError):
    """A fresh run was started in a work dir that already holds a run; nothing was changed."""


class ResumeError(VisattnError):
    """A resume that cannot continue (no checkpoint, another config, another model); nothing was changed."""


class ResumeFallbackWarning(UserWarning):
    """The newest checkpoint was damaged and an older intact one is resumed instead."""


class TrainingInterrupted(VisattnError):
    """SIGINT or SIGTERM stopped training after a checkpoint was saved; ``exit_code`` is 128 + signal
    number (130, 143) and ``checkpoint`` the saved prefix."""

    def __init__(self, message: str, *, exit_code: int, checkpoint: str | None) -> None:
        super().__init__(message)
        self.exit_code, self.checkpoint = exit_code, checkpoint


class PolyLR:
    """mmseg's ``PolyLR`` (``(base - min) * (1 - it / max) ** power + min``) after a linear warm-up from
    ``warmup_ratio * lr``; sets every param group's lr for iteration ``it``."""

    def __init__(
        self, optimizer, max_iters: int, *, power=0.9, min_lr=1e-4, warmup_iters=0, warmup_ratio=1e-6
    ):
        self.optimizer = optimizer
        self.base = [g["lr"] for g in optimizer.param_groups]
        self.max_iters, self.power, self.min_lr = max_iters, power, min_lr
        self.warmup_iters, self.warmup_ratio = warmup_iters, warmup_ratio
        self.iteration = 0

    def lr_at(self, base: float, it: int) -> float:
        lr = (base - self.min_lr) * (1 - min(it, self.max_iters) / self.max_iters) ** self.power + self.min_lr
        if it < self.warmup_iters:
            lr *= 1 - (1 - self.warmup_ratio) * (1 - it / self.warmup_iters)
        return lr

    def step_to(self, it: int) -> None:
        self.iteration = it
        for g, base in zip(self.optimizer.param_groups, self.base):
            g["lr"] = self.lr_at(base, it)

    def state_dict(self) -> dict[str, Any]:
        return {"iteration": self.iteration, "base": list(self.base)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.base = list(state["base"])
        self.step_to(int(state["iteration"]))


class SampleStream:
    """Stream position ``p`` -> (dataset index, augmentation seed), epochs reshuffled by ``seed``."""

    def __init__(self, length: int, seed: int) -> None:
        self.length, self.seed = length, seed
        self._perm: tuple[int, torch.Tensor] | None = None

    def __call__(self, position: int) -> tuple[int, int]:
        epoch, offset = divmod(position, self.length)
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perm = (epoch, torch.randperm(self.length, generator=g))
        return int(self._perm[1][offset]), self.seed * 1_000_000_007 + position


class _Augmented(torch.utils.data.Dataset):
    """``dataset[(index, aug_seed)]``: the sample with its augmentation drawn from a private RNG state,
    leaving the global RNG (dropout) untouched."""

    def __init__(self, dataset, transform) -> None:
        self.dataset, self.transform = dataset, transform

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        image, mask = self.dataset[index]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed % (2**63))
            return self.transform(image, mask)


def _make_optimizer(model: nn.Module, cfg: dict[str, Any]) -> torch.optim.Optimizer:
    o = cfg["optim"]
    if o["type"] == "sgd":
        return torch.optim.SGD(
            model.parameters(),
            lr=o["lr"],
            momentum=o["momentum"],
            weight_decay=o["weight_decay"],
            nesterov=o["nesterov"],
        )
    return torch.optim.AdamW(
        model.parameters(), lr=o["lr"], betas=tuple(o["betas"]), weight_decay=o["weight_decay"]
    )


def _resolve_device(cfg: dict[str, Any], local_rank: int) -> str:
    dev = cfg["train"]["device"] or ("cuda" if torch.cuda.is_available() else "cpu")
    if dev.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError("train.device is cuda but torch.cuda.is_available() is False")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 or dev == "cuda":
            dev = f"cuda:{local_rank}"  # set_device needs an index
        torch.cuda.set_device(torch.device(dev))
    return dev


class _Logger:
    def __init__(self, work_dir: Path, tensorboard: bool) -> None:
        self.path = work_dir / "log.jsonl"
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(work_dir / "tb"))

    def log(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "iter":
                    self.tb.add_scalar(k, v, record.get("iter", 0))


def train(
    cfg: dict[str, Any],
    *,
    resume: str | bool | None = None,
    progress: bool = True,
    plot: bool = False,
    replace: bool = False,
):
    """Train from a validated config (:func:`visattn.engine.config.load_config`); returns the final
    metrics (mIoU, aAcc, mAcc, per-class IoU, train_time_s).

    ``resume=True``: continue from the newest intact checkpoint of ``train.work_dir`` (a damaged newer
    one is skipped with a :class:`ResumeFallbackWarning`); a string: that checkpoint (prefix, its
    .safetensors or .state.pt file, or a work dir). The config must equal the run's saved config.yaml
    except for :data:`RESUME_MAY_CHANGE`, else :class:`ResumeError` before anything is written.

    Without ``resume`` a work dir that already holds a run raises :class:`RunExistsError`; with
    ``replace=True`` that run's files are moved to a sibling folder ``<work_dir>.replaced-<UTC time>``.

    SIGINT / SIGTERM (handlers installed for the duration of the training loop) finish the current
    iteration, save a checkpoint and raise :class:`TrainingInterrupted`."""
    if resume and replace:
        raise ValueError("train: pass either resume (continue the run) or replace (move it aside), not both")
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        return _train(cfg, resume=resume, progress=progress, plot=plot, replace=replace)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)


def _train(cfg: dict[str, Any], *, resume: str | bool | None, progress: bool, plot: bool, replace: bool):
    t_cfg = cfg["train"]
    init_distributed(t_cfg["device"] or ("cuda" if torch.cuda.is_available() else "cpu"))
    rank, world = get_rank(), get_world_size()
    device = _resolve_device(cfg, int(os.environ.get("LOCAL_RANK", "0")))
    if t_cfg["deterministic"]:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    per_step = t_cfg["batch_size"] // t_cfg["accum_steps"]
    if per_step * t_cfg["accum_steps"] != t_cfg["batch_size"] or per_step % world:
        raise ValueError(
            f"train.batch_size {t_cfg['batch_size']} must split evenly into accum_steps "
            f"{t_cfg['accum_steps']} x {world} processes"
        )
    local_bs = per_step // world
    work_dir = Path(t_cfg["work_dir"])
    # Every check below only reads; the first write comes after the barrier that ends them.
    existing = [] if resume else _run_files(work_dir)
    if existing and not replace:
        raise RunExistsError(_run_exists_message(work_dir, existing))

    torch.manual_seed(t_cfg["seed"])  # model init: identical in every process
    model = build_segmentor(cfg["model"]).to(device)
    mean, std = model.data_cfg["mean"], model.data_cfg["std"]
    train_set = _Augmented(build_dataset(cfg["data"], True), build_train_transform(cfg["data"], mean, std))
    val_set = build_dataset(cfg["data"], False, build_val_transform(mean, std))
    stream = SampleStream(len(train_set.dataset), t_cfg["seed"])
    optimizer = _make_optimizer(model, cfg)
    sched = PolyLR(optimizer, t_cfg["iters"], **cfg["sched"])
    amp = t_cfg["amp"] if device.startswith("cuda") else None
    scaler = torch.amp.GradScaler("cuda", enabled=amp == "fp16")

    start = 0
    if resume:
        prefix, tensors, state = _find_resume(resume, work_dir)
        start = _check_resume(cfg, work_dir, prefix, tensors, state, model)
        finished = _finished_metrics(work_dir) if start >= t_cfg["iters"] else None
        if finished is not None:
            if is_main():
                print(
                    f"visattn train: the run in {work_dir} already finished {start} iterations: nothing to do"
                )
                print(format_table(finished))
            barrier()
            return finished
        try:
            # Into memory only: a state that does not fit fails here, before anything on disk changes.
            model.load_state_dict(tensors, strict=True)
            optimizer.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"]) if state.get("scaler") else None
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise ResumeError(
                f"--resume: the training state in {prefix}.state.pt does not fit this run's optimiser or "
                f"scheduler ({type(err).__name__}: {err}); nothing was changed"
            ) from None
        rngs = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]
        set_rng_state(rngs[rank] if rank < len(rngs) else rngs[0])  # another process count: rank 0's
        del tensors

    barrier()  # every process has passed its checks: only now does the work dir change
    if is_main():
        if existing:
            moved = _move_aside(work_dir, existing)
            print(
                f"visattn train: moved the previous run's files from {work_dir} to {moved}", file=sys.stderr
            )
        work_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(work_dir / "config.yaml", yaml.safe_dump(cfg, sort_keys=False))
        if resume:
            _truncate_log(work_dir / "log.jsonl", start)
    barrier()
    net: nn.Module = model
    if world > 1:
        if t_cfg["sync_bn"] and device.startswith("cuda"):
            net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
        elif t_cfg["sync_bn"] and is_main():
            # torch's SyncBatchNorm is CUDA-only: on CPU (gloo) each process normalises its own batch.
            print("visattn: SyncBatchNorm needs CUDA; CPU processes keep per-process BatchNorm statistics")
        net = nn.parallel.DistributedDataParallel(
            net, device_ids=[device] if device.startswith("cuda") else None
        )
    crash_at = int(os.environ.get("VISATTN_CRASH_AT_ITER", "-1"))  # test hook: SIGKILL mid-run
    signal_at, signal_num = _signal_hook()  # test hook: SIGINT/SIGTERM in the middle of an iteration
    logger = _Logger(work_dir, t_cfg["tensorboard"]) if is_main() else None
    bar = None
    if progress and is_main():
        from tqdm import tqdm

        bar = tqdm(total=t_cfg["iters"], initial=start, desc="train", dynamic_ncols=True)
    num_workers = cfg["data"]["num_workers"]

    def keys():
        for it in range(start, t_cfg["iters"]):
            for step in range(t_cfg["accum_steps"]):
                first = it * t_cfg["batch_size"] + step * per_step + rank * local_bs
                yield [stream(first + k) for k in range(local_bs)]

    loader = iter(
        torch.utils.data.DataLoader(
            train_set,
            batch_sampler=keys(),
            num_workers=num_workers,
            collate_fn=_collate,
            pin_memory=device.startswith("cuda"),
            # Its own generator: creating the iterator would otherwise draw from the global RNG (dropout),
            # shifting it after a resume.
            generator=torch.Generator().manual_seed(t_cfg["seed"]),
            worker_init_fn=_ignore_stop_signals if num_workers else None,
        )
    )

    def set_train() -> None:
        net.train()
        if t_cfg["norm_eval"]:  # mmseg's norm_eval: frozen BN statistics, affine parameters still trained
            for m in net.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()

    set_train()
    t0, metrics = time.time(), {}
    saved_at = start
    stop_code = 0
    with _StopSignals(single_process=world == 1, after_bar=bar is not None) as stop:
        for it in range(start, t_cfg["iters"]):
            sched.step_to(it)
            optimizer.zero_grad(set_to_none=True)
            loss_sum, parts_sum = 0.0, {}
            for step in range(t_cfg["accum_steps"]):
                images, masks = (t.to(device, non_blocking=True) for t in next(loader))
                sync = step == t_cfg["accum_steps"] - 1 or world == 1
                ctx = net.no_sync() if not sync else _null()
                with ctx:
                    with torch.autocast(
                        "cuda",
                        dtype=torch.bfloat16 if amp == "bf16" else torch.float16,
                        enabled=amp is not None,
                    ):
                        outputs = net(images)
                        loss, parts = model.loss(outputs, masks, ignore_index=t_cfg["ignore_index"])
                    scaler.scale(loss / t_cfg["accum_steps"]).backward()
                if it + 1 == signal_at and step == 0 and is_main():
                    os.kill(os.getpid(), signal_num)  # mid-iteration, so the deferral is what gets tested
                loss_sum += loss.item() / t_cfg["accum_steps"]
                for k, v in parts.items():
                    parts_sum[k] = parts_sum.get(k, 0.0) + v.item() / t_cfg["accum_steps"]
            if t_cfg["grad_clip"]:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), t_cfg["grad_clip"])
            scaler.step(optimizer)
            scaler.update()
            done = it + 1
            lr = optimizer.param_groups[0]["lr"]
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_sum:.4f}", lr=f"{lr:.2e}")
            if logger is not None and (done % t_cfg["log_interval"] == 0 or done == t_cfg["iters"]):
                logger.log(
                    {
                        "iter": done,
                        "loss": loss_sum,
                        **{f"loss_{k}": v for k, v in parts_sum.items()},
                        "lr": lr,
                        "time": round(time.time() - t0, 3),
                    }
                )
            if done % t_cfg["ckpt_interval"] == 0 or done == t_cfg["iters"]:
                sched.iteration = done
                _save(work_dir, model, optimizer, sched, scaler, done, f"iter_{done}")
                saved_at = done
            if done == crash_at:
                os.kill(os.getpid(), signal.SIGKILL)
            # Every process stops at the same iteration, whichever of them got the signal.
            stop_code = _agree_on_stop(stop.exit_code, device)
            if stop_code:
                break
            if t_cfg["eval_interval"] and done % t_cfg["eval_interval"] == 0 and done != t_cfg["iters"]:
                metrics = evaluate(
                    model,
                    val_set,
                    num_classes=cfg["data"]["num_classes"],
                    eval_cfg=cfg["eval"],
                    ignore_index=t_cfg["ignore_index"],
                    device=device,
                )
                if logger is not None:
                    logger.log({"iter": done, "mIoU": metrics["mIoU"], "aAcc": metrics["aAcc"]})
                set_train()
        if stop_code:
            if saved_at != done:
                sched.iteration = done
                _save(work_dir, model, optimizer, sched, scaler, done, f"iter_{done}")
    # The handlers are restored here: a signal during the final evaluation stops at once, as the
    # last checkpoint is already on disk and a resume redoes only the evaluation.
    if bar is not None:
        bar.close()
    if stop_code:
        raise _interrupted(stop_code, work_dir / f"iter_{done}", done, t_cfg["iters"])
    metrics = evaluate(
        model,
        val_set,
        num_classes=cfg["data"]["num_classes"],
        eval_cfg=cfg["eval"],
        ignore_index=t_cfg["ignore_index"],
        device=device,
        out_json=str(work_dir / "eval.json"),
    )
    metrics["train_time_s"] = round(time.time() - t0, 2)
    if logger is not None:
        logger.log({"iter": t_cfg["iters"], "mIoU": metrics["mIoU"], "aAcc": metrics["aAcc"]})
        print(format_table(metrics))
        print(f"trained {t_cfg['iters'] - start} iterations in {metrics['train_time_s']:.1f} s; {work_dir}")
        if plot:
            plot_log(work_dir / "log.jsonl", work_dir / "curves.png")
    barrier()
    return metrics


def _save(work_dir, model, optimizer, sched, scaler, it: int, name: str) -> None:
    # Every process's RNG (dropout) state goes into the one file, so a resume restores each rank's.
    rng = rng_state()
    if get_world_size() > 1:
        gathered: list[Any] = [None] * get_world_size()
        torch.distributed.all_gather_object(gathered, rng)
        rng = gathered
    if is_main():
        state = {
            "iteration": it,
            "optimizer": optimizer.state_dict(),
            "scheduler": sched.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else {},
            "rng": rng,
        }
        save_checkpoint(work_dir, model, state, name)
    barrier()


def _run_files(work_dir: Path) -> list[Path]:
    """The files and folders of a run in ``work_dir`` (empty when there is none)."""
    if not work_dir.is_dir():
        return []
    found = [work_dir / name for name in RUN_FILES if (work_dir / name).exists()]
    found += sorted(
        f
        for f in work_dir.iterdir()
        if checkpoint_prefix(f.name) != f.name and checkpoint_iteration(f.name) is not None
    )
    return found


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _saved_iters(work_dir: Path) -> int | None:
    try:
        saved = yaml.safe_load((work_dir / "config.yaml").read_text())
        return int(saved["train"]["iters"])
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError):
        return None


def _run_exists_message(work_dir: Path, files: list[Path]) -> str:
    latest = latest_checkpoint(work_dir) if (work_dir / "latest").is_file() else None
    iterations = [checkpoint_iteration(f.name) for f in files]
    newest = (
        checkpoint_iteration(latest)
        if latest
        else max((n for n in iterations if n is not None), default=None)
    )
    total = _saved_iters(work_dir)
    of = f" of {total}" if total else ""
    result = _read_json(work_dir / "eval.json")
    if isinstance(result, dict) and isinstance(result.get("mIoU"), (int, float)):
        at = f"iteration {newest}{of}, " if newest is not None else ""
        what = f"a finished run ({at}mIoU {result['mIoU']:.2f} in eval.json)"
        resume = "--resume only re-reports a finished run"
    elif newest is not None:
        what = f"an unfinished run (latest checkpoint: iteration {newest}{of})"
        resume = "continue it with --resume"
    else:
        what = f"an unfinished run without a checkpoint ({', '.join(f.name for f in files)})"
        resume = "--resume needs a checkpoint, which it lacks"
    return (
        f"train.work_dir {str(work_dir)!r} already holds {what}; nothing was changed. {resume[0].upper()}"
        f"{resume[1:]}; or train into another folder with --work-dir DIR (--set train.work_dir=DIR); or pass "
        f"--replace (train(..., replace=True)) to move its files to {work_dir.name}.replaced-<UTC time> "
        "beside it and start anew here"
    )


def _move_aside(work_dir: Path, files: list[Path]) -> Path:
    """Move a run's files into a new sibling folder ``<work_dir>.replaced-<UTC time>``; returns it."""
    base = work_dir.resolve()
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    dest, n = base.with_name(f"{base.name}.replaced-{stamp}"), 1
    while dest.exists():  # two replacements within one second keep both old runs
        dest, n = base.with_name(f"{base.name}.replaced-{stamp}-{n}"), n + 1
    dest.mkdir()
    for f in files:
        os.replace(f, dest / f.name)  # same file system: a rename, nothing copied or lost midway
    return dest


def _find_resume(resume: str | bool, work_dir: Path) -> tuple[str, dict[str, torch.Tensor], dict[str, Any]]:
    """The checkpoint to resume (prefix, tensors, state), read completely. A folder (``resume=True``: the
    work dir) falls back past damaged newer checkpoints with a warning; a named checkpoint must read."""
    folder = work_dir if resume is True else Path(os.fspath(resume)).expanduser()
    if folder.is_dir():
        found = find_intact_checkpoint(folder)
        if found is None:
            raise ResumeError(
                f"--resume: no checkpoint (iter_<n>.safetensors + .state.pt) in {str(folder)!r}; start "
                "without --resume, or pass the checkpoint to continue"
            )
        prefix, tensors, state, problems = found
        if problems:
            warnings.warn(
                f"--resume: skipped {len(problems)} damaged checkpoint(s) ({'; '.join(problems)}); "
                f"resuming from {prefix} (iteration {state['iteration']})",
                ResumeFallbackWarning,
                stacklevel=3,
            )
        return prefix, tensors, state
    text = os.fspath(resume)
    if not text.endswith((".safetensors", ".state.pt")) and Path(text).is_file():
        raise ResumeError(
            f"--resume {text!r}: not a visattn training checkpoint; give a prefix such as "
            "runs/x/iter_300 (its .safetensors and .state.pt files) or a work dir"
        )
    tensors, state = read_checkpoint(text, require_state=True)
    return checkpoint_prefix(text), tensors, state


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and tree:
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def _may_change(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in RESUME_MAY_CHANGE)


def _config_differences(saved: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key.path: old -> new`` for every key that differs and may not change on resume."""
    a, b = _flatten(saved), _flatten(new)
    absent = "(absent)"
    return [
        f"{k}: {a.get(k, absent)!r} -> {b.get(k, absent)!r}"
        for k in sorted(set(a) | set(b))
        if not _may_change(k) and a.get(k, absent) != b.get(k, absent)
    ]


def _check_resume(cfg, work_dir: Path, prefix: str, tensors, state, model: nn.Module) -> int:
    """Check a resume before anything is written: the config against the run's saved config.yaml (that
    of the checkpoint's folder and of the work dir), the weights against the model. Returns the start
    iteration."""
    from .config import ConfigError, validate_config

    for path in dict.fromkeys(
        p.resolve() for p in (Path(prefix).parent / "config.yaml", work_dir / "config.yaml")
    ):
        if not path.is_file():
            continue
        try:
            saved = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as err:
            raise ResumeError(
                f"--resume: cannot read the run's config {path} ({err}); nothing was changed"
            ) from None
        if not isinstance(saved, dict):
            raise ResumeError(f"--resume: the run's config {path} is not a mapping; nothing was changed")
        try:
            # Defaults added since the run was saved are filled in, so only real differences remain.
            saved = validate_config(saved, check_paths=False)
        except ConfigError:
            pass
        diffs = _config_differences(saved, cfg)
        if diffs:
            raise ResumeError(
                f"--resume: the config differs from the run's {path} in {len(diffs)} key(s): "
                f"{'; '.join(diffs)}. Only {', '.join(sorted(RESUME_MAY_CHANGE))} may change on resume; "
                "resume with the saved config, or start a new run in another --work-dir. Nothing was changed"
            )
    from ..models.convert import load_state_dict_strict

    try:
        load_state_dict_strict(model, tensors, source=f"{prefix}.safetensors", load=False)
    except ValueError as err:
        raise ResumeError(f"--resume: {err} Nothing was changed") from None
    start = state["iteration"]
    total = cfg["train"]["iters"]
    if not isinstance(start, int) or not 0 <= start <= total:
        raise ResumeError(
            f"--resume: {prefix}.state.pt is at iteration {start!r}, outside this run's 0..{total} "
            "(train.iters); nothing was changed"
        )
    return start


def _finished_metrics(work_dir: Path) -> dict[str, Any] | None:
    result = _read_json(work_dir / "eval.json")
    return result if isinstance(result, dict) and "mIoU" in result and "IoU" in result else None


def _truncate_log(path: Path, start: int) -> None:
    """Drop the log entries past iteration ``start`` (written by the run that died after the checkpoint),
    and any line it left half-written, so the resumed log continues without repeating iterations."""
    if not path.is_file():
        return
    keep, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        it = record.get("iter") if isinstance(record, dict) else None
        if isinstance(it, int) and it <= start:
            keep.append(line + "\n")
        elif line.strip():
            dropped += 1
    if dropped:
        atomic_write_text(path, "".join(keep))


def _signal_hook() -> tuple[int, int]:
    """``VISATTN_SIGNAL_AT_ITER="3:INT"`` (or ``3:TERM``): the test hook that signals this process in the
    middle of iteration 3; (-1, 0) when unset."""
    text = os.environ.get("VISATTN_SIGNAL_AT_ITER", "").strip()
    if not text:
        return -1, 0
    it, _, name = text.partition(":")
    if not it.isdigit() or name not in ("INT", "TERM"):
        raise ValueError(f"VISATTN_SIGNAL_AT_ITER must look like 3:INT or 3:TERM, got {text!r}")
    return int(it), int(getattr(signal, "SIG" + name))


def _ignore_stop_signals(_worker_id: int) -> None:
    # A Ctrl-C reaches the whole process group: data workers must not die under the main process, which
    # still needs them to finish the iteration it then saves; they exit when it does.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class _StopSignals:
    """SIGINT / SIGTERM handlers for the training loop: the first signal only records a request to stop
    (``exit_code`` 128 + signal number) so the loop can finish its iteration and save; a second SIGINT in a
    single process stops at once (KeyboardInterrupt). Previous handlers come back on exit. Outside the
    main thread, where Python allows no handlers, nothing is installed."""

    def __init__(self, *, single_process: bool, after_bar: bool = False) -> None:
        self.single_process, self.after_bar = single_process, after_bar
        self.exit_code = 0
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, _frame) -> None:
        if self.exit_code and signum == signal.SIGINT and self.single_process:
            raise KeyboardInterrupt
        if not self.exit_code:
            self.exit_code = 128 + signum
            if is_main():
                print(
                    ("\n" if self.after_bar else "")  # off the progress bar's line
                    + f"visattn train: {signal.Signals(signum).name} received: stopping after this iteration "
                    "to save a checkpoint"
                    + (" (Ctrl-C again: stop now, unsaved)" if self.single_process else ""),
                    file=sys.stderr,
                )

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> bool:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


def _agree_on_stop(code: int, device: str) -> int:
    """The stop request of any process, so that every process stops after the same iteration."""
    if get_world_size() == 1:
        return code
    flag = torch.tensor([code], dtype=torch.int64, device=device if device.startswith("cuda") else "cpu")
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return int(flag.item())


def _interrupted(code: int, prefix: Path, done: int, total: int) -> TrainingInterrupted:
    name = signal.Signals(code - 128).name
    message = (
        f"stopped by {name} after iteration {done} of {total}; checkpoint saved to {prefix} "
        "(resume: the same command with --resume)"
    )
    if is_main():
        print(f"visattn train: {message}", file=sys.stderr)
    return TrainingInterrupted(message, exit_code=code, checkpoint=str(prefix))


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _collate(samples):
    return (
        torch.stack([torch.as_tensor(im) for im, _ in samples]),
        torch.stack([torch.as_tensor(m) for _, m in samples]),
    )


def plot_log(log_path: Path, out_path: Path) -> None:
    """Loss and mIoU curves from the JSONL log, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]
    loss = [(r["iter"], r["loss"]) for r in rows if "loss" in r]
    miou = [(r["iter"], r["mIoU"]) for r in rows if "mIoU" in r]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    if loss:
        axes[0].plot(*zip(*loss))
    axes[0].set(title="loss", xlabel="iteration")
    if miou:
        axes[1].plot(*zip(*miou), marker="o")
    axes[1].set(title="mIoU (%)", xlabel="iteration")
    fig.tight_layout()
    fig.savefig(out_path)
    plt.close(fig)
