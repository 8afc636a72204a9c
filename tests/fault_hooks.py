"""``python tests/fault_hooks.py <apl arguments>``: the apl command line with faults injected (tests/test_faults.py,
tests/test_misuse.py).

The faults named in these environment variables are patched in when this file is imported, so
that a grid's spawned workers, which import it as ``__mp_main__``, get them too:

- ``APL_FAULT_FULL_DISK="<path end>:<k>[,<path end>:<k>...]"``: the k-th atomic write (1-based,
  :func:`apl.jsonio.atomic_write_bytes`) of a file whose path ends with ``<path end>`` writes half
  its bytes, then fails as a full disk does (``OSError`` ENOSPC); the line ``fault: ...`` says so;
- ``APL_FAULT_BATCH_DELAY=<seconds>``: every training batch takes that much longer, so that a
  signal sent after the first checkpoint lands in the middle of an epoch;
- ``APL_FAULT_DATA_GONE=<folder>``: ``<folder>`` is renamed ``<folder>.gone`` just before a grid
  worker reads its data (after the grid itself found it there);
- ``APL_FAULT_FOLDER_GONE="<path end>:<k>"``: just before the k-th atomic write of a file whose path
  ends with ``<path end>``, that file's folder is deleted (a run folder removed, or unmounted, mid-run);
- ``APL_FAULT_READ_ONLY=<folder>``: every write under ``<folder>`` (open for writing, create, mkdir,
  rename, unlink) fails as on a read-only mount (``EROFS``), which root cannot write either;
- ``APL_FAULT_NO_DOWNLOAD=1``: a CIFAR-10 download fails as offline, after the line ``fault: a download
  was attempted`` (so that a test sees whether one was);
- ``APL_FAULT_NO_RAY=1``: ``import ray`` fails, as where Ray is not installed.
"""
from __future__ import annotations

import builtins
import contextlib
import errno
import os
import shutil
import sys
import time

import apl.jsonio
import apl.runner
from apl.cli import main
from apl.data import DeviceData


class _FullDisk:
    """A file open for writing that takes half of the first write, then fails with ENOSPC."""

    def __init__(self, file, path: str):
        self._file, self._path = file, path

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self._file.close()

    def write(self, data) -> int:
        data = memoryview(data).cast("B")
        self._file.write(data[: len(data) // 2])
        self._file.flush()
        print(f"fault: {self._path}: wrote {len(data) // 2} of {len(data)} bytes, then ENOSPC",
              file=sys.stderr, flush=True)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self._file, name)


def _on_kth_write(spec: str, fault) -> None:
    """At the k-th atomic write of a file whose path ends with ``<path end>`` (``spec``: ``<path end>:<k>,...``),
    open it with ``fault(target, opener)`` instead (``opener()`` opens it as asked)."""
    faults = {end: int(k) for end, _, k in (item.rpartition(":") for item in spec.split(","))}
    writes = dict.fromkeys(faults, 0)
    previous = getattr(apl.jsonio, "open", builtins.open)  # another fault's, or the builtin

    def open_for_atomic_write(path, mode="r", *args, **kwargs):
        target = str(path).removesuffix(".tmp")  # atomic_write_bytes writes <path>.tmp, then renames it
        for end, k in faults.items():
            if "w" in mode and target.endswith(end):
                writes[end] += 1
                if writes[end] == k:
                    return fault(target, lambda: previous(path, mode, *args, **kwargs))
        return previous(path, mode, *args, **kwargs)

    apl.jsonio.open = open_for_atomic_write  # the module's ``open``, shadowing the builtin


def _full_disk(spec: str) -> None:
    _on_kth_write(spec, lambda target, opener: _FullDisk(opener(), target))


def _folder_gone(spec: str) -> None:
    def remove_the_folder(target: str, opener):
        shutil.rmtree(os.path.dirname(target))
        print(f"fault: removed {os.path.dirname(target)} before writing {os.path.basename(target)}",
              file=sys.stderr, flush=True)
        return opener()

    _on_kth_write(spec, remove_the_folder)


def _read_only(folder: str) -> None:
    root = os.path.abspath(folder)

    def refuse_inside(path) -> None:
        where = os.path.abspath(os.fsdecode(path))
        if where == root or where.startswith(root + os.sep):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), where)

    real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir
    real_replace, real_rename, real_unlink = os.replace, os.rename, os.unlink

    def open_(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, bytes, os.PathLike)) and any(c in mode for c in "wax+"):
            refuse_inside(file)
        return real_open(file, mode, *args, **kwargs)

    def os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC):
            refuse_inside(path)
        return real_os_open(path, flags, *args, **kwargs)

    def mkdir(path, *args, **kwargs):
        if os.path.exists(path):  # as the kernel does: an existing folder is "exists", not "read-only"
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), os.fsdecode(path))
        refuse_inside(path)
        return real_mkdir(path, *args, **kwargs)

    def two_paths(real):
        def act(src, dst, *args, **kwargs):
            refuse_inside(src)
            refuse_inside(dst)
            return real(src, dst, *args, **kwargs)
        return act

    def unlink(path, *args, **kwargs):
        refuse_inside(path)
        return real_unlink(path, *args, **kwargs)

    builtins.open, os.open, os.mkdir, os.unlink = open_, os_open, mkdir, unlink
    os.replace, os.rename = two_paths(real_replace), two_paths(real_rename)


def _no_download() -> None:
    import torchvision.datasets

    def offline(*args, **kwargs):
        print("fault: a download was attempted", file=sys.stderr, flush=True)
        raise OSError(errno.ENETUNREACH, os.strerror(errno.ENETUNREACH))

    torchvision.datasets.CIFAR10 = offline


def _batch_delay(seconds: float) -> None:
    batches = DeviceData.train_batches

    def slow_batches(self, *args, **kwargs):
        for batch in batches(self, *args, **kwargs):
            yield batch
            time.sleep(seconds)

    DeviceData.train_batches = slow_batches


def _data_gone(folder: str) -> None:
    load = apl.runner.load_cifar10

    def load_after_the_folder_went(data_dir, download=None):
        with contextlib.suppress(FileNotFoundError):  # the other worker moved it already
            os.rename(folder, folder + ".gone")
        return load(data_dir, download)

    apl.runner.load_cifar10 = load_after_the_folder_went


if os.environ.get("APL_FAULT_FULL_DISK"):
    _full_disk(os.environ["APL_FAULT_FULL_DISK"])
if os.environ.get("APL_FAULT_BATCH_DELAY"):
    _batch_delay(float(os.environ["APL_FAULT_BATCH_DELAY"]))
if os.environ.get("APL_FAULT_DATA_GONE"):
    _data_gone(os.environ["APL_FAULT_DATA_GONE"])
if os.environ.get("APL_FAULT_FOLDER_GONE"):
    _folder_gone(os.environ["APL_FAULT_FOLDER_GONE"])
if os.environ.get("APL_FAULT_READ_ONLY"):
    _read_only(os.environ["APL_FAULT_READ_ONLY"])
if os.environ.get("APL_FAULT_NO_DOWNLOAD"):
    _no_download()
if os.environ.get("APL_FAULT_NO_RAY"):
    sys.modules["ray"] = None  # ``import ray`` now raises ImportError

if __name__ == "__main__":
    sys.exit(main())
