"""SIGINT / SIGTERM during training: finish the iteration, save, stop with 128 + signal number."""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import torch

from ..errors import VisattnError
from .dist import get_world_size, is_main

__all__ = [
    "StopSignals",
    "TrainingInterrupted",
    "agree_on_stop",
    "ignore_stop_signals",
    "interrupted",
    "signal_hook",
]


class TrainingInterrupted(VisattnError):
    """SIGINT or SIGTERM stopped training after a checkpoint was saved; ``exit_code`` is 128 + signal
    number (130, 143) and ``checkpoint`` the saved prefix."""

    def __init__(self, message: str, *, exit_code: int, checkpoint: str | None) -> None:
        super().__init__(message)
        self.exit_code, self.checkpoint = exit_code, checkpoint


def signal_hook() -> tuple[int, int]:
    """``VISATTN_SIGNAL_AT_ITER="3:INT"`` (or ``3:TERM``): the test hook that signals this process in the
    middle of iteration 3; (-1, 0) when unset."""
    text = os.environ.get("VISATTN_SIGNAL_AT_ITER", "").strip()
    if not text:
        return -1, 0
    it, _, name = text.partition(":")
    if not it.isdigit() or name not in ("INT", "TERM"):
        raise ValueError(f"VISATTN_SIGNAL_AT_ITER must look like 3:INT or 3:TERM, got {text!r}")
    return int(it), int(getattr(signal, "SIG" + name))


def ignore_stop_signals(_worker_id: int) -> None:
    # A Ctrl-C reaches the whole process group: data workers must not die under the main process, which
    # still needs them to finish the iteration it then saves; they exit when it does.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class StopSignals:
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

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> bool:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


def agree_on_stop(code: int, device: str) -> int:
    """The stop request of any process, so that every process stops after the same iteration."""
    if get_world_size() == 1:
        return code
    flag = torch.tensor([code], dtype=torch.int64, device=device if device.startswith("cuda") else "cpu")
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return int(flag.item())


def interrupted(code: int, prefix: Path, done: int, total: int) -> TrainingInterrupted:
    name = signal.Signals(code - 128).name
    message = (
        f"stopped by {name} after iteration {done} of {total}; checkpoint saved to {prefix} "
        "(resume: the same command with --resume)"
    )
    if is_main():
        print(f"visattn train: {message}", file=sys.stderr)
    return TrainingInterrupted(message, exit_code=code, checkpoint=str(prefix))
