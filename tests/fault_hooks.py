"""``python tests/fault_hooks.py <apl arguments>``: the apl command line with faults injected (tests/test_faults.py).

The faults named in these environment variables are patched in when this file is imported, so
that a grid's spawned workers, which import it as ``__mp_main__``, get them too:

- ``APL_FAULT_FULL_DISK="<path end>:<k>[,<path end>:<k>...]"``: the k-th atomic write (1-based,
  :func:`apl.jsonio.atomic_write_bytes`) of a file whose path ends with ``<path end>`` writes half
  its bytes, then fails as a full disk does (``OSError`` ENOSPC); the line ``fault: ...`` says so;
- ``APL_FAULT_BATCH_DELAY=<seconds>``: every training batch takes that much longer, so that a
  signal sent after the first checkpoint lands in the middle of an epoch;
- ``APL_FAULT_DATA_GONE=<folder>``: ``<folder>`` is renamed ``<folder>.gone`` just before a grid
  worker reads its data (a grid of one worker reads in its own process, and would try a download).
"""
from __future__ import annotations

import builtins
import contextlib
import errno
import os
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


def _full_disk(spec: str) -> None:
    faults = {end: int(k) for end, _, k in (item.rpartition(":") for item in spec.split(","))}
    writes = dict.fromkeys(faults, 0)

    def open_for_atomic_write(path, mode="r", *args, **kwargs):
        file = builtins.open(path, mode, *args, **kwargs)
        target = str(path).removesuffix(".tmp")  # atomic_write_bytes writes <path>.tmp, then renames it
        for end, k in faults.items():
            if "w" in mode and target.endswith(end):
                writes[end] += 1
                if writes[end] == k:
                    return _FullDisk(file, target)
        return file

    apl.jsonio.open = open_for_atomic_write  # the module's ``open``, shadowing the builtin


def _batch_delay(seconds: float) -> None:
    batches = DeviceData.train_batches

    def slow_batches(self, *args, **kwargs):
        for batch in batches(self, *args, **kwargs):
            yield batch
            time.sleep(seconds)

    DeviceData.train_batches = slow_batches


def _data_gone(folder: str) -> None:
    load = apl.runner.load_cifar10

    def load_after_the_folder_went(data_dir, download=True):
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

if __name__ == "__main__":
    sys.exit(main())
