"""The JSON records runs leave behind: each run's ``result.json``, the grid's manifest.

A run folder's ``result.json`` is written by :func:`apl.train.train`, with the SHA-256 of its bytes
beside it (``result.json.sha256``, ``sha256sum``'s format): a result damaged after it was written, even
one that still parses, is named and never taken for a finished run (:func:`verify_result`). A grid folder holds
``runs/<run name>/result.json`` and ``manifest.json`` (what was planned, on which machine and
software, with which command, and each run's status; grids sharing a folder update it under a lock).
:mod:`apl.grid` keeps the manifest, :mod:`apl.report` reads both. Strict JSON throughout:
non-finite numbers are written ``null``, and every file is replaced atomically (:mod:`apl.jsonio`).
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
from pathlib import Path

import torch

from apl.config import TrainConfig
from apl.devices import device_name, resolve_device
from apl.errors import DamagedFile
from apl.jsonio import atomic_write_bytes, git_state, save_json, save_text
from apl.runlock import manifest_lock, run_is_locked

__all__ = [
    "RESULT_FILE", "RESULT_CHECKSUM_FILE", "DAMAGED_SUFFIX", "MANIFEST_FILE", "utc_now", "read_number",
    "number_text", "save_result", "read_result", "verify_result", "set_aside_result", "finished_result",
    "is_current", "comparable_record", "RUN_TIME_FIELDS", "EPOCH_TIME_FIELDS", "load_run_records", "load_manifest",
    "environment", "Manifest", "run_summary",
]

RESULT_FILE = "result.json"
#: Beside each result.json: the SHA-256 of its bytes, as ``sha256sum`` writes it (``sha256sum -c`` checks it).
RESULT_CHECKSUM_FILE = RESULT_FILE + ".sha256"
#: Added to a damaged result's name (and its checksum's) when it is set aside for its run to train again.
DAMAGED_SUFFIX = ".damaged"
MANIFEST_FILE = "manifest.json"
#: What a run record must hold for the report to use it.
_REQUIRED_KEYS = ("loss", "variant", "noise", "seed", "history", "final_test_acc", "best_test_acc")
#: A run's result fields the manifest repeats, so that one file shows how the grid went.
_SUMMARY_KEYS = ("final_test_acc", "best_test_acc", "best_epoch", "wall_time_s", "device",
                 "device_name", "loss_backend", "data_source", "finished_at")


def utc_now() -> str:
    """The current UTC time, ISO 8601 to the second (the timestamps of every record)."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- numbers

def read_number(value) -> float:
    """A recorded number as a float; ``null`` (how non-finite numbers are written) reads as NaN."""
    return float("nan") if value is None else float(value)


def number_text(value, digits: int = 4) -> str:
    """A recorded number as fixed-point text; ``null`` reads ``"nan"``."""
    return "nan" if value is None else f"{value:.{digits}f}"


# --------------------------------------------------------------------------- a run's result

def save_result(run_dir: Path, result: dict) -> None:
    """Write ``run_dir/result.json`` atomically (strict JSON, as :func:`apl.jsonio.save_json`), its checksum
    first: a kill between the two leaves no result, so the run resumes and writes both again."""
    data = json.dumps(result, indent=1, allow_nan=False).encode()
    save_text(Path(run_dir) / RESULT_CHECKSUM_FILE, f"{hashlib.sha256(data).hexdigest()}  {RESULT_FILE}\n")
    atomic_write_bytes(Path(run_dir) / RESULT_FILE, lambda f: f.write(data))


def read_result(run_dir: Path) -> dict | None:
    """``run_dir``'s result.json, parsed (None when there is none); :class:`~apl.errors.DamagedFile` when
    it is not a readable run record (truncated, garbled: no JSON object with a config)."""
    path = Path(run_dir) / RESULT_FILE
    try:
        result = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except ValueError as e:  # not JSON, not UTF-8
        raise DamagedFile(f"{path} is damaged: not a readable run record ({type(e).__name__}: {e})") from None
    if not isinstance(result, dict) or not isinstance(result.get("config"), dict):
        raise DamagedFile(f"{path} is damaged: not a run record (no config in a JSON object)")
    return result


def verify_result(run_dir: Path) -> None:
    """:class:`~apl.errors.DamagedFile` unless ``run_dir``'s result.json has the bytes its checksum was taken
    of; a result without a checksum (written before results had one) passes unchecked."""
    path, checksum = Path(run_dir) / RESULT_FILE, Path(run_dir) / RESULT_CHECKSUM_FILE
    try:
        expected = checksum.read_text(encoding="ascii", errors="replace").split()[:1]
    except FileNotFoundError:
        return
    if [hashlib.sha256(path.read_bytes()).hexdigest()] != expected:
        raise DamagedFile(f"{path} is damaged: its bytes do not match the checksum in {checksum.name}")


def set_aside_result(run_dir: Path) -> Path:
    """Rename a damaged result.json (then its checksum) with :data:`DAMAGED_SUFFIX`, kept for a look, so
    that its run trains again; return the result's new path. The caller holds the run's lock."""
    run_dir = Path(run_dir)
    for name in (RESULT_FILE, RESULT_CHECKSUM_FILE):
        if (run_dir / name).exists():
            os.replace(run_dir / name, run_dir / (name + DAMAGED_SUFFIX))
    return run_dir / (RESULT_FILE + DAMAGED_SUFFIX)


def finished_result(run_dir: Path, config: TrainConfig) -> dict | None:
    """The run's result when it finished with this very config and is intact; else None (train decides:
    it resumes a checkpoint, sets a damaged result aside and trains the run again, and refuses a folder
    holding another config's run)."""
    try:
        result = read_result(run_dir)
        if result is None or config.differences(result["config"]):
            return None
        verify_result(run_dir)
    except (OSError, ValueError, KeyError, TypeError):  # DamagedFile is a ValueError
        return None
    return result


# --------------------------------------------------------------------------- reading a grid


def is_current(record: dict) -> bool:
    """True when ``record`` (a result.json) is a run of this version: its run name is the one this
    version gives its config (:meth:`apl.config.TrainConfig.run_name` hashes every field that
    defines a run, so a record written under an earlier definition of the runs, e.g. before a
    default changed or a field was added, never passes for one of them)."""
    try:
        return TrainConfig.from_dict(record["config"]).run_name() == record["run_name"]
    except (KeyError, TypeError, ValueError):
        return False


#: What differs between two equal runs: when, how long and where they ran, whether they resumed.
RUN_TIME_FIELDS = ("wall_time_s", "finished_at", "resumed_at_epochs", "device", "num_threads")
EPOCH_TIME_FIELDS = ("epoch_time_s", "train_time_s")


def comparable_record(result: dict) -> dict:
    """A run's result.json without what differs between equal runs (:data:`RUN_TIME_FIELDS`, the epochs'
    times), its config as the run's identity: two runs of one config are the same run when these agree."""
    record = {k: v for k, v in result.items() if k not in RUN_TIME_FIELDS and k != "config"}
    record["identity"] = TrainConfig.from_dict(result["config"]).identity()
    record["history"] = [{k: v for k, v in h.items() if k not in EPOCH_TIME_FIELDS} for h in result["history"]]
    return record


def _runs_dir(root: Path) -> Path:
    return root / "runs" if (root / "runs").is_dir() else root


def load_run_records(root) -> list[dict]:
    """Every finished run under ``root`` (a grid output folder or its ``runs/``), sorted by path.

    Each record is the run's ``result.json`` with ``_run`` (the run folder's name) added.
    Raises ``ValueError`` when the folder does not exist, :class:`~apl.errors.DamagedFile` naming
    every record that cannot be read, lacks a field the report needs or does not match its checksum
    (:func:`verify_result`): none of them is ever reported.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"runs folder {root} does not exist")
    records, damaged = [], []
    for path in sorted(_runs_dir(root).glob(f"*/{RESULT_FILE}")):
        try:
            record = json.loads(path.read_bytes())
        except (OSError, ValueError) as e:
            damaged.append(f"cannot read run record {path}: {e}")
            continue
        if not isinstance(record, dict):
            damaged.append(f"run record {path} is not a JSON object")
            continue
        missing = [k for k in _REQUIRED_KEYS if k not in record]
        if missing:
            damaged.append(f"run record {path} lacks {', '.join(missing)}")
            continue
        try:
            verify_result(path.parent)
        except DamagedFile as e:
            damaged.append(str(e))
            continue
        record["_run"] = path.parent.name
        records.append(record)
    if damaged:
        raise DamagedFile(f"{len(damaged)} run record(s) cannot be used: {'; '.join(damaged)}. Run the grid "
                          f"again: it sets each aside ({RESULT_FILE}{DAMAGED_SUFFIX}) and trains its run again")
    return records


def load_manifest(root) -> dict | None:
    """The grid's ``manifest.json`` under ``root``, or None when there is none. A run it lists as
    ``running`` whose lock no process holds (its trainer was killed) reads as ``interrupted``."""
    path = Path(root) / MANIFEST_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read manifest {path}: {e}") from None
    runs = data.get("runs") if isinstance(data, dict) else None
    for name, entry in (runs or {}).items():
        if isinstance(entry, dict) and entry.get("status") == "running" and \
                not run_is_locked(Path(root) / "runs" / name):
            entry.update(status="interrupted", error="the process training it ended before the run did "
                                                     "(killed); run the grid again to resume it")
    return data


# --------------------------------------------------------------------------- the machine

def environment(devices) -> dict:
    """The machine and software a grid runs on; ``devices`` as from :func:`apl.devices.parse_devices`."""
    # Here, for its version alone: importing torchvision loads torch._dynamo, a cost every command would pay.
    import torchvision

    commit, dirty = git_state()
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


def _empty_manifest() -> dict:
    return {"runs": {}, "invocations": []}


def _merge_field(old, new):
    """A top-level manifest field as grids sharing the folder leave it: lists are joined (each value once,
    in the order first written), mappings merged key by key, other values the latest grid's."""
    if isinstance(old, list) and isinstance(new, list):
        return old + [v for v in new if v not in old]
    if isinstance(old, dict) and isinstance(new, dict):
        return {**old, **{k: _merge_field(old[k], v) if k in old else v for k, v in new.items()}}
    return new


def _merge_run(entry: dict, change: dict) -> None:
    """Apply ``change`` to a run's manifest ``entry``: a new status drops the old status's error, and
    ``busy`` (another process trained the run) does not cover the ``done`` that process recorded since."""
    if change.get("status") == "busy" and entry.get("status") == "done":
        return
    if "status" in change:
        entry.pop("error", None)
    entry.update(change)


class Manifest:
    """``<out>/manifest.json``: what the grids run into ``out`` planned, where, and how each run went.

    Several grid drivers may share ``out``. Each keeps its changes since its last save; a save takes
    the folder's manifest lock (:func:`apl.runlock.manifest_lock`), reads the file, applies those
    changes to it and replaces it atomically, so no driver loses another's run entries, invocation
    or top-level values (:func:`_merge_field`: e.g. the losses of two grids on one folder are both
    listed). ``started_at`` is the first invocation's, ``finished_at`` the latest one's (None while it
    runs). ``data`` is the file as this driver last wrote it, with its changes since.
    """

    def __init__(self, out: Path, fresh: bool):
        self.path = Path(out) / MANIFEST_FILE
        self._fresh = fresh  # the first save starts the file anew
        self._fields: dict = {}  # top-level fields set since the last save
        self._run_changes: list[tuple[str, dict]] = []  # in the order made, since the last save
        self._invocation: dict | None = None  # this driver's entry in "invocations"
        self._slot: int | None = None  # and its index there
        self.data = _empty_manifest() if fresh else self._read()

    def _read(self) -> dict:
        try:
            old = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old = {}  # a manifest is a record, not an input: a missing or broken one is started anew
        if not isinstance(old, dict):
            old = {}
        runs, invocations = old.get("runs"), old.get("invocations")
        return {**old, "runs": runs if isinstance(runs, dict) else {},
                "invocations": invocations if isinstance(invocations, list) else []}

    def _set(self, **fields) -> None:
        self._fields.update(fields)
        self.data.update(fields)

    def start(self, **info) -> None:
        """Record a new invocation (``info`` holds at least ``command`` and ``started_at``) and save."""
        self._set(**info, finished_at=None)
        self._invocation = {"command": info["command"], "started_at": info["started_at"], "finished_at": None}
        self.save()

    def run(self, name: str, **entry) -> None:
        """Update run ``name``'s entry (not saved until :meth:`save`)."""
        self._run_changes.append((name, entry))
        _merge_run(self.data["runs"].setdefault(name, {}), entry)

    def finish(self, **info) -> None:
        """Record that this invocation ended (``info``: more of its fields, e.g. ``wall_time_s``) and save."""
        now = utc_now()
        self._invocation.update(info, finished_at=now)
        self._set(finished_at=now)
        self.save()

    def _place_invocation(self, invocations: list) -> None:
        """This invocation into the file's list: at its index, or appended the first time (or after
        another driver's fresh start emptied the list)."""
        mine, slot = self._invocation, self._slot
        ours = slot is not None and slot < len(invocations) and \
            (invocations[slot].get("command"), invocations[slot].get("started_at")) == \
            (mine["command"], mine["started_at"])
        if ours:
            invocations[slot] = dict(mine)
        else:
            self._slot = len(invocations)
            invocations.append(dict(mine))

    def save(self) -> None:
        """Apply this driver's changes since its last save to the file: read, change and replace it
        under the folder's manifest lock."""
        with manifest_lock(self.path.parent):
            data = _empty_manifest() if self._fresh else self._read()
            for key, value in self._fields.items():
                data[key] = _merge_field(data[key], value) if key in data else value
            for name, change in self._run_changes:
                _merge_run(data["runs"].setdefault(name, {}), change)
            if self._invocation is not None:
                self._place_invocation(data["invocations"])
            if data["invocations"]:
                data["started_at"] = data["invocations"][0].get("started_at")
                data["finished_at"] = data["invocations"][-1].get("finished_at")
            sources = sorted({r["data_source"] for r in data["runs"].values() if r.get("data_source")})
            data["data_source"] = "; ".join(sources) or None
            save_json(self.path, dict(sorted(data.items())))
        self.data = data
        self._fresh, self._fields, self._run_changes = False, {}, []
