"""What a user sees when something goes wrong: the exit statuses, the errors they map from, one line each.

Every command (``python -m apl train|grid|report``, ``reproduce.sh``, the Ray engine's driver)
ends a mistake the user can fix with one line ``apl: error: <what, and the way out>`` and one of
the statuses below; a traceback only with ``--debug`` (or ``APL_DEBUG=1``). The statuses, the
exception -> status rule (:func:`exit_status`) and the help table live here alone: the command
line uses them, and ``reproduce.sh`` reads them by running this file (``python3 apl/errors.py``
prints them as shell assignments). Standard library only, so that the shell can run this file
before the project's environment exists.
"""
from __future__ import annotations

import logging
import os
import signal
import sys

__all__ = [
    "OK", "RUNS_FAILED", "USAGE", "NO_DATA", "CANNOT_WRITE", "DAMAGED", "NO_RAY", "INTERNAL", "BUSY",
    "INTERRUPTED", "REPORT_ANYWAY", "STATUS_TABLE", "AplError", "DataError", "OutputError", "DamagedFile",
    "RayUnavailable", "RunInUse", "RunsFailed", "exit_status", "error_line", "debug_requested",
    "show_warnings", "shell_assignments",
]

OK = 0
#: The grid ran to its end and some runs failed (the others finished; the manifest names each failure).
RUNS_FAILED = 1
#: A bad flag or value (argparse's own errors too).
USAGE = 2
#: CIFAR-10 is missing, incomplete or damaged.
NO_DATA = 3
#: The output folder cannot be written: read-only, full, or gone.
CANNOT_WRITE = 4
#: A run folder holds a damaged checkpoint or result, or another config's run.
DAMAGED = 5
#: Ray is not installed, or no cluster answers at the address given.
NO_RAY = 6
#: An error no check anticipated: a bug (sysexits' EX_SOFTWARE).
INTERNAL = 70
#: Another process is training the run: try again once it ends (sysexits' EX_TEMPFAIL).
BUSY = 75
#: Plus the signal's number: stopped by SIGINT (130) or SIGTERM (143) at a safe point.
INTERRUPTED = 128
#: The grid statuses after which ``reproduce.sh`` still writes the report of the finished runs.
REPORT_ANYWAY = (RUNS_FAILED, BUSY)

#: (status, meaning and way out), as ``python -m apl --help`` and the docs list them.
STATUS_TABLE = (
    ("0", "done"),
    (str(RUNS_FAILED), "the grid ran; some runs failed, the others finished (the manifest says why): "
                       "fix the cause, run the same command again"),
    (str(USAGE), "a bad flag or value: fix the command (COMMAND --help lists the flags)"),
    (str(NO_DATA), "CIFAR-10 missing, incomplete or damaged: get or mount it as the message says"),
    (str(CANNOT_WRITE), "the output folder cannot be written (read-only, full or gone): fix it, run again"),
    (str(DAMAGED), "a run folder holds a damaged checkpoint or result, or another config's run: "
                   "--fresh, or another --out"),
    (str(NO_RAY), "--engine ray: Ray not installed, or no cluster answers at --address"),
    (str(INTERNAL), "an unexpected error (a bug): --debug or APL_DEBUG=1 shows its traceback"),
    (str(BUSY), "the run is being trained by another process: run again once it ends"),
    (f"{INTERRUPTED + signal.SIGINT}, {INTERRUPTED + signal.SIGTERM}",
     "stopped by Ctrl-C or SIGTERM: run the same command again to resume"),
    (str(INTERRUPTED + signal.SIGPIPE), "the reader of the output left (e.g. | head); nothing is said"),
)


class AplError(Exception):
    """An error the user caused and can fix; its message names the thing and the way out."""

    status = INTERNAL


class DataError(AplError):
    """CIFAR-10 is missing, incomplete or damaged (:mod:`apl.data` raises its subclasses)."""

    status = NO_DATA


class OutputError(AplError, OSError):
    """The output folder cannot be written: read-only, full, or gone."""

    status = CANNOT_WRITE


class DamagedFile(AplError, ValueError):
    """A run folder's checkpoint or result is damaged, or belongs to another config's run."""

    status = DAMAGED


class RayUnavailable(AplError, ValueError):
    """``--engine ray`` without Ray installed, or with no cluster answering at ``--address``."""

    status = NO_RAY


class RunInUse(AplError, RuntimeError):
    """Another process is training this run (it holds the run folder's lock)."""

    status = BUSY


class RunsFailed(AplError, RuntimeError):
    """The grid ran to its end, and some of its runs failed."""

    status = RUNS_FAILED


#: What to do, for an error that is not an :class:`AplError` and so carries no way out of its own.
_WAY_OUT = {
    USAGE: "fix the value (COMMAND --help lists the flags)",
    CANNOT_WRITE: "free space or make the folder writable, then run the same command again: finished runs and "
                  "epochs are kept",
}


def exit_status(error: BaseException) -> int:
    """The exit status of a command that ended with ``error`` (the one exception -> status rule)."""
    if isinstance(error, AplError):
        return error.status
    if isinstance(error, KeyboardInterrupt):  # a second Ctrl-C, or one outside a run's safe points
        return INTERRUPTED + signal.SIGINT
    if isinstance(error, BrokenPipeError):  # the reader of the output left (``| head``): as SIGPIPE ends tools
        return INTERRUPTED + signal.SIGPIPE
    if isinstance(error, ValueError):
        return USAGE
    if isinstance(error, OSError):  # a write the disk refused: full, read-only, a folder gone
        return CANNOT_WRITE
    return INTERNAL


def error_line(error: BaseException) -> str | None:
    """``error`` as the one line a command prints: ``apl: error: <message>``, with a way out where the
    message has none of its own; None for a reader that left (nothing to say, and no one to say it to)."""
    message = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, BrokenPipeError):
        return None
    if isinstance(error, AplError):
        return f"apl: error: {message}"
    if isinstance(error, KeyboardInterrupt):
        return ("apl: error: interrupted at once (a second Ctrl-C): finished runs and epochs are kept; "
                "run the same command again to resume")
    status = exit_status(error)
    if status == INTERNAL:
        return (f"apl: error: unexpected {type(error).__name__}: {message} (a bug: run again with --debug, or "
                f"APL_DEBUG=1, for its traceback)")
    return f"apl: error: {message}; {_WAY_OUT[status]}"


def debug_requested(flag: bool = False) -> bool:
    """Whether a command shows tracebacks: ``--debug``, or ``APL_DEBUG`` set to anything but ``0``."""
    return flag or os.environ.get("APL_DEBUG", "0") not in ("", "0")


class _WarningLine(logging.Handler):
    """A warning as one line ``apl: warning: ...`` on the stderr of the moment (tests swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            print(f"apl: warning: {' '.join(record.getMessage().split())}", file=sys.stderr, flush=True)
        except Exception:  # noqa: BLE001 - a warning that cannot be printed must not end the run
            self.handleError(record)


def show_warnings() -> None:
    """Print warnings of this package's loggers (``apl.*``) to stderr as one line each, ``apl: warning: ...``
    (in a command's process, or a grid worker's); once per process."""
    logger = logging.getLogger("apl")
    if not any(isinstance(h, _WarningLine) for h in logger.handlers):
        logger.addHandler(_WarningLine(logging.WARNING))


def shell_assignments() -> str:
    """The statuses as shell variable assignments, for ``reproduce.sh``: ``APL_STATUS_<NAME>=<n>``, and
    ``APL_REPORT_ANYWAY`` (a space-separated list)."""
    names = ("OK", "RUNS_FAILED", "USAGE", "NO_DATA", "CANNOT_WRITE", "DAMAGED", "NO_RAY", "INTERNAL", "BUSY")
    lines = [f"APL_STATUS_{name}={globals()[name]}" for name in names]
    lines.append(f"APL_REPORT_ANYWAY='{' '.join(map(str, REPORT_ANYWAY))}'")
    return "\n".join(lines)


if __name__ == "__main__":
    print(shell_assignments())
