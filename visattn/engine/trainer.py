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

import importlib.util
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import yaml

from ..atomic import atomic_write_text
from ..data import build_dataset, build_train_transform, build_val_transform
from ..models.segmentor import build_segmentor
from .checkpoint import rng_state, save_checkpoint, set_rng_state
from .dist import barrier, get_rank, get_world_size, init_distributed, is_main
from .evaluate import evaluate, format_table
from .interrupt import (
    StopSignals,
    TrainingInterrupted,
    agree_on_stop,
    ignore_stop_signals,
    interrupted,
    signal_hook,
)
from .rundir import (
    RESUME_MAY_CHANGE,
    ResumeError,
    ResumeFallbackWarning,
    RunExistsError,
    check_resume,
    find_resume,
    finished_metrics,
    move_aside,
    run_exists_message,
    run_files,
    truncate_log,
)

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
    if t_cfg["tensorboard"] and importlib.util.find_spec("tensorboard") is None:
        raise ValueError(
            "train.tensorboard is true but the tensorboard package is not installed: "
            "`pip install tensorboard`, or set train.tensorboard: false (log.jsonl is written either way)"
        )
    existing = [] if resume else run_files(work_dir)
    if existing and not replace:
        raise RunExistsError(run_exists_message(work_dir, existing))

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
        prefix, tensors, state = find_resume(resume, work_dir)
        start = check_resume(cfg, work_dir, prefix, tensors, state, model)
        finished = finished_metrics(work_dir) if start >= t_cfg["iters"] else None
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
            moved = move_aside(work_dir, existing)
            print(
                f"visattn train: moved the previous run's files from {work_dir} to {moved}", file=sys.stderr
            )
        work_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(work_dir / "config.yaml", yaml.safe_dump(cfg, sort_keys=False))
        if resume:
            truncate_log(work_dir / "log.jsonl", start)
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
    signal_at, signal_num = signal_hook()  # test hook: SIGINT/SIGTERM in the middle of an iteration
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
            worker_init_fn=ignore_stop_signals if num_workers else None,
        )
    )

    def set_train() -> None:
        net.train()
        if t_cfg["norm_eval"]:  # mmseg's norm_eval: frozen BN statistics, affine parameters still trained
            for m in net.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()

    def run_eval(out_json: str | None = None) -> dict[str, Any]:
        return evaluate(
            model,
            val_set,
            num_classes=cfg["data"]["num_classes"],
            eval_cfg=cfg["eval"],
            ignore_index=t_cfg["ignore_index"],
            device=device,
            out_json=out_json,
        )

    set_train()
    t0, metrics = time.time(), {}
    saved_at = start
    stop_code = 0
    with StopSignals(single_process=world == 1, after_bar=bar is not None) as stop:
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
            stop_code = agree_on_stop(stop.exit_code, device)
            if stop_code:
                break
            if t_cfg["eval_interval"] and done % t_cfg["eval_interval"] == 0 and done != t_cfg["iters"]:
                metrics = run_eval()
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
        raise interrupted(stop_code, work_dir / f"iter_{done}", done, t_cfg["iters"])
    metrics = run_eval(out_json=str(work_dir / "eval.json"))
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
