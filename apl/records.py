"""The JSON records runs leave behind: atomic writes, each run's ``result.json``, the grid's manifest.

A run folder's ``result.json`` is written by :func:`apl.train.train`; a grid folder holds
``runs/<run name>/result.json`` and ``manifest.json`` (what was planned, on which machine and
software, with which command, and each run's status). :mod:`apl.grid` keeps the manifest,
:mod:`apl.report` reads both. Strict JSON throughout: non-finite numbers are written ``null``.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import subprocess
from pathlib import Path

import torch

from apl.config import TrainConfig
from apl.devices import device_name, resolve_device

__all__ = [
    "RESULT_FILE", "MANIFEST_FILE", "utc_now", "jsonable", "read_number", "number_text",
    "atomic_write_bytes", "save_json", "finished_result", "load_run_records", "load_manifest",
    "environment", "Manifest", "run_summary",
]

RESULT_FILE = "result.json"
MANIFEST_FILE = "manifest.json"
#: What a run record must hold for the report to use it.
_REQUIRED_KEYS = ("loss", "variant", "noise", "seed", "history", "final_test_acc", "best_test_acc")
#: A run's result fields the manifest repeats, so that one file shows how the grid went.
_SUMMARY_KEYS = ("final_test_acc", "best_test_acc", "best_epoch", "wall_time_s", "device",
                 "device_name", "loss_backend", "data_source", "finished_at")


def utc_now() -> str:
    """The current UTC time, ISO 8601 to the second (the timestamps of every record)."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- writing

def jsonable(obj):
    """``obj`` with every non-finite float replaced by None (JSON has no NaN or inf)."""
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def read_number(value) -> float:
    """A recorded number as a float; ``null`` (how non-finite numbers are written) reads as NaN."""
    return float("nan") if value is None else float(value)


def number_text(value, digits: int = 4) -> str:
    """A recorded number as fixed-point text; ``null`` reads ``"nan"``."""
    return "nan" if value is None else f"{value:.{digits}f}"


def atomic_write_bytes(path: Path, write) -> None:
    """Call ``write(file)`` on a temporary file next to ``path``, then replace ``path`` by it."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_json(path: Path, obj) -> None:
    """Write ``obj`` as strict JSON (no NaN) to ``path`` atomically (temp file + os.replace)."""
    atomic_write_bytes(path, lambda f: f.write(json.dumps(obj, indent=1, allow_nan=False).encode()))


# --------------------------------------------------------------------------- reading

def finished_result(run_dir: Path, config: TrainConfig) -> dict | None:
    """The run's result when it finished with this very config; else None (train decides:
    it resumes a checkpoint, and refuses a folder holding another config's run)."""
    try:
        result = json.loads((run_dir / RESULT_FILE).read_text(encoding="utf-8"))
        same = TrainConfig.from_dict(result["config"]).identity() == config.identity()
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return result if same else None


def _runs_dir(root: Path) -> Path:
    return root / "runs" if (root / "runs").is_dir() else root


def load_run_records(root) -> list[dict]:
    """Every finished run under ``root`` (a grid output folder or its ``runs/``), sorted by path.

    Each record is the run's ``result.json`` with ``_run`` (the run folder's name) added.
    Raises ``ValueError`` when the folder does not exist or a record is unreadable.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"runs folder {root} does not exist")
    records = []
    for path in sorted(_runs_dir(root).glob(f"*/{RESULT_FILE}")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read run record {path}: {e}") from None
        if not isinstance(record, dict):
            raise ValueError(f"run record {path} is not a JSON object")
        missing = [k for k in _REQUIRED_KEYS if k not in record]
        if missing:
            raise ValueError(f"run record {path} lacks {', '.join(missing)}")
        record["_run"] = path.parent.name
        records.append(record)
    return records


def load_manifest(root) -> dict | None:
    """The grid's ``manifest.json`` under ``root``, or None when there is none."""
    path = Path(root) / MANIFEST_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read manifest {path}: {e}") from None


# --------------------------------------------------------------------------- the machine

def _git_state() -> tuple[str | None, bool | None]:
    """(commit, dirty) of the checkout this package runs from; the build's commit elsewhere."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("APL_GIT_COMMIT"), None
    if commit.returncode != 0:  # not a checkout (e.g. the Docker image): the build may say
        return os.environ.get("APL_GIT_COMMIT"), None
    return commit.stdout.strip(), bool(dirty.stdout.strip()) if dirty.returncode == 0 else None


def environment(devices) -> dict:
    """The machine and software a grid runs on; ``devices`` as from :func:`apl.devices.parse_devices`."""
    # Here, for its version alone: importing torchvision loads torch._dynamo, a cost every command would pay.
    import torchvision

    commit, dirty = _git_state()
    return {
        "git_commit": commit, "git_dirty": dirty, "python_version": platform.python_version(),
        "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "torch_version": torch.__version__, "torchvision_version": torchvision.__version__,
        "cuda_version": torch.version.cuda,
        "cudnn_version": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
        "devices": [{"device": d, "threads": t, "name": device_name(resolve_device(d))}
                    for d, t in devices],
    }


# --------------------------------------------------------------------------- the manifest

def run_summary(result: dict) -> dict:
    """A finished run's manifest entry, from its result."""
    return {"status": "done", **{k: result.get(k) for k in _SUMMARY_KEYS}}


class Manifest:
    """``<out>/manifest.json``: written atomically, rewritten whenever a run's status changes."""

    def __init__(self, out: Path, fresh: bool):
        self.path = out / MANIFEST_FILE
        old = {}
        if self.path.exists() and not fresh:
            try:
                old = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                old = {}  # a manifest is a record, not an input: start a new one
        self.data = {"runs": old.get("runs", {}), "invocations": old.get("invocations", [])}

    def start(self, **info) -> None:
        """Record a new invocation (``info`` holds at least ``command`` and ``started_at``)."""
        self.data.update(info)
        self.data["finished_at"] = None
        self.data["invocations"].append({"command": info["command"], "started_at": info["started_at"],
                                         "finished_at": None})
        self.save()

    def run(self, name: str, **entry) -> None:
        """Update run ``name``'s entry (not saved until :meth:`save`)."""
        self.data["runs"].setdefault(name, {}).update(entry)

    def finish(self) -> None:
        self.data["finished_at"] = self.data["invocations"][-1]["finished_at"] = utc_now()
        self.save()

    def save(self) -> None:
        save_json(self.path, dict(sorted(self.data.items())))
