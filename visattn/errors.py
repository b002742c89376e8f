"""User-facing errors and the one place where the command line turns them into a line and an exit code.

A :class:`VisattnError` (or a ``ValueError`` / ``OSError``, which the library raises for bad arguments,
bad files and unwritable paths) is the whole story for a user: ``visattn`` prints its message as one
line and exits with 2. Anything else is a bug: one line that says so, exit 1. ``--debug`` or
``VISATTN_DEBUG=1`` shows the traceback instead.

Bad arguments are refused before any work starts, in the same one-line form: :class:`ArgumentParser`
prints argparse's own errors as ``"visattn <cmd>: <message> (see visattn <cmd> --help)"``, and the
``type=`` functions below (:func:`positive_int`, :func:`size_list`, :func:`writable_file`, ...) reject
malformed numbers, sizes, devices and output paths while the command line is parsed.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "EXIT_INTERRUPTED",
    "EXIT_USAGE",
    "ArgumentParser",
    "VisattnError",
    "arg_type",
    "check_writable",
    "debug_enabled",
    "device_arg",
    "exit_code",
    "fraction",
    "parse_positive_floats",
    "parse_size",
    "parse_size_list",
    "positive_float",
    "positive_float_list",
    "positive_int",
    "run_command",
    "size_list",
    "size_pair",
    "user_message",
    "writable_dir",
    "writable_file",
]

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # the shell's code for a SIGINT


class VisattnError(Exception):
    """Base of errors whose message names the problem and the fix (bad checkpoint, existing run, ...)."""


# ArgumentTypeError: a type= check called outside argparse is still the user's bad value.
USER_ERRORS: tuple[type[BaseException], ...] = (VisattnError, ValueError, OSError, argparse.ArgumentTypeError)


def debug_enabled(argv_flag: bool = False) -> bool:
    return argv_flag or os.environ.get("VISATTN_DEBUG", "").strip() not in ("", "0", "false", "no")


def user_message(err: BaseException) -> str:
    """The error's message on one line (a multi-line message is joined, the first lines kept)."""
    text = " ".join(line.strip() for line in str(err).strip().splitlines() if line.strip())
    if isinstance(err, OSError) and not isinstance(err, VisattnError) and err.filename is not None:
        text = f"{err.strerror or type(err).__name__}: {err.filename}"
    return text or type(err).__name__


def run_command(prog: str, func: Callable[[], int], *, debug: bool = False) -> int:
    """Run a CLI command: user errors become ``"<prog>: <message>"`` and exit 2, a bug one line and
    exit 1, Ctrl-C exit 130; with ``debug`` (or ``VISATTN_DEBUG=1``) errors propagate with their traceback."""
    if debug_enabled(debug):
        return func()
    try:
        return func()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except USER_ERRORS as err:
        print(f"{prog}: {user_message(err)}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as err:  # noqa: BLE001 - a bug: one line, and how to see the traceback
        print(
            f"{prog}: internal error ({type(err).__name__}: {user_message(err)}); rerun with --debug "
            "(or VISATTN_DEBUG=1) for the traceback and report it",
            file=sys.stderr,
        )
        return 1


def exit_code(exc: SystemExit) -> int:
    """The integer exit status a ``SystemExit`` stands for (None: 0; a message: 1, as Python does)."""
    if exc.code is None:
        return 0
    return exc.code if isinstance(exc.code, int) else 1


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: ``"<prog>: <message> (see <prog> --help)"`` on stderr, exit 2.

    Subparsers inherit the class. Unrecognised arguments are reported by the subcommand they were
    given to, so its ``--help`` is the one named.
    """

    def error(self, message: str):
        text = " ".join(line.strip() for line in message.splitlines() if line.strip())
        self.exit(EXIT_USAGE, f"{self.prog}: {text} (see {self.prog} --help)\n")

    def parse_args(self, args=None, namespace=None):
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:
            self._innermost(namespace).error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace

    def _innermost(self, namespace: argparse.Namespace) -> argparse.ArgumentParser:
        # The extras surface at the top level; the subcommand that was chosen is the one to blame.
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                chosen = action.choices.get(getattr(namespace, action.dest, None) or "")
                if isinstance(chosen, ArgumentParser):
                    return chosen._innermost(namespace)
        return self


def arg_type(parse: Callable[[str], object], name: str) -> Callable[[str], object]:
    """An argparse ``type=`` from a parser raising ValueError: argparse shows the ValueError's own
    message (as ``argument --x: <message>``) instead of its generic "invalid value"."""

    def convert(text: str):
        try:
            return parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    convert.__name__ = name
    return convert


def _positive_int(text: str) -> int:
    try:
        value = int(str(text).strip())
    except ValueError:
        raise ValueError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise ValueError(f"must be a positive integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(str(text).strip())
    except ValueError:
        raise ValueError(f"must be a positive number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"must be a positive finite number, got {text!r}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(str(text).strip())
    except ValueError:
        raise ValueError(f"must be a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:  # also false for nan
        raise ValueError(f"must be a number in [0, 1], got {text!r}")
    return value


def parse_size(text: str) -> tuple[int, int]:
    """``"32"`` -> (32, 32), ``"64x48"`` -> (64, 48): positive integers ``H[xW]``; ValueError otherwise."""
    h, sep, w = str(text).strip().lower().partition("x")
    try:
        size = (int(h), int(w) if sep else int(h))
    except ValueError:
        raise ValueError(f"size {text!r} is not H or HxW with positive integers (e.g. 32 or 64x48)") from None
    if min(size) < 1:
        raise ValueError(f"size {text!r} must be positive (e.g. 32 or 64x48)")
    return size


def parse_size_list(text: str) -> list[tuple[int, int]]:
    """``"32,64x48"`` -> [(32, 32), (64, 48)]; ValueError naming the bad entry otherwise."""
    parts = str(text).split(",")
    if not any(p.strip() for p in parts):
        raise ValueError(f"size list {text!r} is empty; give comma-separated H[xW], e.g. 32,64x48")
    return [parse_size(p) for p in parts]


def parse_positive_floats(text: str) -> list[float]:
    """``"0.5,1.0,1.5"`` -> [0.5, 1.0, 1.5]: positive finite numbers; ValueError otherwise."""
    try:
        return [_positive_float(p) for p in str(text).split(",")]
    except ValueError:
        raise ValueError(
            f"{text!r} is not a comma-separated list of positive numbers (e.g. 0.5,1.0,1.5)"
        ) from None


def check_writable(path: str | os.PathLike, what: str = "output file") -> Path:
    """Check, without writing anything, that a file can be written at ``path`` (its folder exists and
    is writable, or can be created); ValueError naming the path otherwise. Returns the path."""
    p = Path(path).expanduser()
    if not str(path).strip():
        raise ValueError(f"{what} is an empty path")
    if p.is_dir():
        raise ValueError(f"{what} {str(path)!r} is a directory; give a file name inside it")
    if p.exists() and not os.access(p, os.W_OK):
        raise ValueError(f"{what} {str(path)!r} exists and is not writable")
    _check_creatable_dir(p.parent, what, path)
    return p


def _check_creatable_dir(folder: Path, what: str, path: str | os.PathLike) -> None:
    # Walk up to the first folder that exists: it must be a writable directory for the rest to be made.
    existing = folder.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{what} {str(path)!r} cannot be created: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {str(path)!r} cannot be written: no write permission in {existing}")


def _writable_dir(text: str) -> str:
    p = Path(text).expanduser()
    if not str(text).strip():
        raise ValueError("the folder is an empty path")
    if p.exists() and not p.is_dir():
        raise ValueError(f"{text!r} is a file, not a folder")
    _check_creatable_dir(p, "folder", text)
    return text


def _writable_file(text: str) -> str:
    check_writable(text)
    return text


def _device(text: str) -> str:
    import torch

    try:
        device = torch.device(str(text).strip())
    except (RuntimeError, ValueError):
        raise ValueError(f"unknown device {text!r}; give cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return str(text).strip()
    if device.type != "cuda":
        raise ValueError(f"device {text!r} is not supported here; give cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ValueError(
            f"device {text!r}: no CUDA device is available (torch.cuda.is_available() is False); use cpu"
        )
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {text!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return str(text).strip()


positive_int = arg_type(_positive_int, "positive_int")
positive_float = arg_type(_positive_float, "positive_float")
positive_float_list = arg_type(parse_positive_floats, "positive_float_list")
fraction = arg_type(_fraction, "fraction")
size_pair = arg_type(parse_size, "size_pair")
size_list = arg_type(parse_size_list, "size_list")
writable_file = arg_type(_writable_file, "writable_file")
writable_dir = arg_type(_writable_dir, "writable_dir")
device_arg = arg_type(_device, "device_arg")
