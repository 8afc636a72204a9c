"""Files a crash cannot leave half-written: strict JSON values, atomic fsynced writes, the git state.

Used by :mod:`apl.records` (run records, the grid's manifest) and by the GPU check
(``benchmarks.gpu_check``). Standard library only, so that a tool which never trains imports it cheaply.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
from pathlib import Path

__all__ = ["jsonable", "atomic_write_bytes", "save_json", "save_text", "git_state"]

#: The checkout this package runs from (in an installed copy, a folder that is no checkout).
_CHECKOUT = Path(__file__).resolve().parent.parent


def jsonable(obj):
    """``obj`` with every non-finite float replaced by None (JSON has no NaN or inf)."""
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def atomic_write_bytes(path: Path, write) -> None:
    """Call ``write(file)`` on a temporary file next to ``path``, then replace ``path`` by it (fsynced).

    A write that fails (a full disk, a read-only folder) leaves ``path`` as it was and no temporary
    file behind, and raises ``OSError`` naming ``path``.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)  # a half-written copy only takes space (a full disk's)
        if isinstance(e, OSError) and e.errno is not None:
            raise OSError(e.errno, f"cannot write {path} ({e.strerror or e}); it is as it was before") from e
        raise
    # The rename itself reaches the disk only with its folder's entry.
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def save_json(path: Path, obj, indent: int | None = 1) -> None:
    """Write ``obj`` as strict JSON (no NaN: pass it through :func:`jsonable` first) to ``path`` atomically."""
    atomic_write_bytes(path, lambda f: f.write(json.dumps(obj, indent=indent, allow_nan=False).encode()))


def save_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, lambda f: f.write(text.encode("utf-8")))


def git_state() -> tuple[str | None, bool | None]:
    """(commit, dirty) of the checkout this package runs from; elsewhere (an installed copy, the
    Docker image) the commit the build recorded in ``APL_GIT_COMMIT``, and dirty None."""
    try:
        commit = subprocess.run(["git", "-C", str(_CHECKOUT), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(_CHECKOUT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("APL_GIT_COMMIT"), None
    if commit.returncode != 0:  # not a checkout
        return os.environ.get("APL_GIT_COMMIT"), None
    return commit.stdout.strip(), bool(dirty.stdout.strip()) if dirty.returncode == 0 else None
