"""User-facing errors and the one place where the command line turns them into a line and an exit code.

A :class:`VisattnError` (or a ``ValueError`` / ``OSError``, which the library raises for bad arguments,
bad files and unwritable paths) is the whole story for a user: ``visattn`` prints its message as one
line and exits with 2. Anything else is a bug: one line that says so, exit 1. ``--debug`` or
``VISATTN_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

__all__ = ["EXIT_INTERRUPTED", "EXIT_USAGE", "VisattnError", "debug_enabled", "run_command", "user_message"]

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # the shell's code for a SIGINT


class VisattnError(Exception):
    """Base of errors whose message names the problem and the fix (bad checkpoint, existing run, ...)."""


USER_ERRORS: tuple[type[BaseException], ...] = (VisattnError, ValueError, OSError)


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
