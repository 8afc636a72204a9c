"""Exclusive access through OS file locks: one trainer per run, one manifest writer at a time.

Both locks are OS file locks (``flock``) on a file of their own (``<run folder>/.lock``,
``<grid folder>/.manifest.lock``): the kernel drops a lock when its holder exits, killed or not,
so no stale lock is ever left behind. A run's lock is held from the first read to the final
write and refused at once to a second trainer (the file records the holder's pid, for the
message it gets); the manifest's lock is held for one read-modify-write and waited for.
"""
from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path

from apl.errors import OutputError, RunInUse

__all__ = ["LOCK_FILE", "MANIFEST_LOCK_FILE", "RunInUse", "run_lock", "manifest_lock", "run_is_locked"]

LOCK_FILE = ".lock"
MANIFEST_LOCK_FILE = ".manifest.lock"


def _open_lock_file(folder, name: str, what: str) -> int:
    """A descriptor of ``folder/name``, created if need be; :class:`~apl.errors.OutputError` if the
    folder is not writable (or gone)."""
    try:
        return os.open(Path(folder) / name, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise OutputError(f"cannot lock the {what} {folder} ({e.strerror}): it must be writable; "
                          f"fix that and run the same command again") from e


@contextmanager
def run_lock(out_dir):
    """Hold ``out_dir``'s lock for the ``with`` block; raise :class:`RunInUse` at once if another
    process (or another trainer in this one) holds it, ``OutputError`` if the folder is not writable."""
    fd = _open_lock_file(out_dir, LOCK_FILE, "run folder")
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise RunInUse(f"{out_dir} is being trained by another process (pid {holder}); "
                           f"left to it: run the same command again once it ends") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


@contextmanager
def manifest_lock(folder):
    """Hold the grid folder ``folder``'s manifest lock for the ``with`` block, waiting while another
    writer holds it (for one read-modify-write); ``OutputError`` if the folder is not writable."""
    fd = _open_lock_file(folder, MANIFEST_LOCK_FILE, "grid folder")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def run_is_locked(out_dir) -> bool:
    """Whether a process holds ``out_dir``'s run lock now (False when the folder or its lock file is
    missing): a manifest's ``running`` run whose lock is free was killed."""
    try:
        fd = os.open(Path(out_dir) / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing the descriptor releases the shared lock taken to look
    return False
