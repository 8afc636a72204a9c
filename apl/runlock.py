"""One trainer per run: an exclusive lock on the run folder, held from the first read to the final write.

The lock is an OS file lock (``flock``) on ``<run folder>/.lock``: the kernel drops it when its
holder exits, killed or not, so no stale lock is ever left behind. The file records the
holder's pid, for the message a second trainer gets.
"""
from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path

__all__ = ["LOCK_FILE", "RunInUse", "run_lock"]

LOCK_FILE = ".lock"


class RunInUse(RuntimeError):
    """Another process is training this run (it holds the run folder's lock)."""


@contextmanager
def run_lock(out_dir):
    """Hold ``out_dir``'s lock for the ``with`` block; raise :class:`RunInUse` at once if another
    process (or another trainer in this one) holds it, ``ValueError`` if the folder is not writable."""
    path = Path(out_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise ValueError(f"cannot lock the run folder {out_dir} ({e.strerror}): it must be writable") from e
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise RunInUse(f"{out_dir} is being trained by another process (pid {holder}); "
                           f"left to it, run again after it ends to pick up its result") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
