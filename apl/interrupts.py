"""Stopping a run at a safe point on SIGINT (Ctrl-C) or SIGTERM.

Inside :func:`graceful_stop` the first of these signals only asks the run to stop: the training
loop finishes the batch in progress, abandons the epoch (the previous epoch's checkpoint stays,
so running the same command again resumes there) and raises :class:`Interrupted`, whose
``status`` is the shell's 128 + signal number. A second signal takes the signal's default
action at once. Blocks nest: an inner block (a run inside a grid, or inside a grid's worker)
shares the outermost block's request, so a signal that came before the run started still stops it.
"""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

from apl.errors import INTERRUPTED, AplError

__all__ = ["Interrupted", "StopRequest", "graceful_stop"]

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(AplError):
    """A run stopped at a safe point because of a signal."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name} at a safe point: finished epochs are kept; "
                         f"run the same command again to resume")

    @property
    def status(self) -> int:
        """The shell's status for the signal: 128 + its number."""
        return INTERRUPTED + self.signum


class StopRequest:
    """The signal asking the run to stop (``None`` while none came)."""

    def __init__(self):
        self.signum: int | None = None

    def check(self) -> None:
        """Raise :class:`Interrupted` when a stop was asked for."""
        if self.signum is not None:
            raise Interrupted(self.signum)


#: The request of the outermost block open in the main thread (inner blocks share it).
_active: list[StopRequest] = []


@contextmanager
def graceful_stop(on_stop=None):
    """Within the block SIGINT and SIGTERM set the yielded :class:`StopRequest` (the first of
    them), call ``on_stop(signum)`` (e.g. to pass the stop on to worker processes) and restore the
    previous handlers (a second one acts at once). Inside another such block, the block shares that
    block's request and handlers (its own ``on_stop`` is not called). Signals can only be handled in
    the main thread: elsewhere the block runs with the handlers as they are."""
    if threading.current_thread() is not threading.main_thread():
        yield StopRequest()
        return
    if _active:
        yield _active[0]
        return
    request = StopRequest()
    previous = {s: signal.getsignal(s) for s in _SIGNALS}

    def ask_to_stop(signum, frame):
        request.signum = signum
        for s, handler in previous.items():
            signal.signal(s, handler)
        if on_stop is not None:
            on_stop(signum)

    for s in _SIGNALS:
        signal.signal(s, ask_to_stop)
    _active.append(request)
    try:
        yield request
    finally:
        _active.remove(request)
        for s, handler in previous.items():
            signal.signal(s, handler)
