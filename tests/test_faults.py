"""Fault injection: damaged checkpoints and results, a full disk mid-write, signals mid-epoch, two grids
on one folder, a read-only output folder, a data folder that disappears, a stop sent to the grid
process of a parallel grid. Each fault ends in a clear message and exit status; once it is removed,
a rerun's run records equal an undisturbed run's, epoch by epoch (timing fields aside).

Each fault is caused in a subprocess running the tiny grid (4 runs of 2 epochs on 40 of 50
generated images); what the command line cannot cause is injected by ``tests/fault_hooks.py``. The rerun,
like the undisturbed reference, runs the same command line in this process (``apl.cli.main``:
a subprocess costs seconds of imports). Every grid trains with as many threads as a worker of
``--devices cpu,cpu`` (:data:`THREADS`), so that all round alike and compare exactly.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import assert_same_records, comparable_record

from apl.cli import main
from apl.config import TrainConfig
from apl.data import FOLDER, write_cifar10_folder
from apl.errors import BUSY, CANNOT_WRITE, NO_DATA, RUNS_FAILED
from apl.plan import plan_grid
from apl.train import train

ROOT = Path(__file__).resolve().parent.parent
HOOKS = ROOT / "tests" / "fault_hooks.py"
#: Threads of each worker under --devices cpu,cpu (apl.devices.parse_devices); every command here uses as many.
THREADS = max(1, (os.cpu_count() or 1) // 2)
LOSSES = ("ce", "nce", "nfl", "nce+rce")
TINY = {"epochs": 2, "train_subset": 40, "test_subset": 20, "width": 0.0625, "batch_size": 20}
SUBSET = dict(losses=list(LOSSES), noise=[0.2], variants=["paper"])
GRID_ARGS = ["--preset", "quick", "--losses", *LOSSES, "--noise", "0.2", "--variants", "paper", "--no-progress",
             *(arg for key, value in TINY.items() for arg in ("--set", f"{key}={value}"))]
#: Seconds added to each training batch where a signal must land mid-epoch (2 batches an epoch).
SLOW = {"APL_FAULT_BATCH_DELAY": "0.5"}


class _Stop(Exception):
    """Raised after a run's first epoch, to leave its checkpoint behind."""


def _stop_after_first_epoch(record: dict) -> None:
    raise _Stop


def _env(faults: dict | None) -> dict:
    return dict(os.environ, OMP_NUM_THREADS=str(THREADS), PYTHONWARNINGS="ignore", PYTHONPATH=str(ROOT),
                **(faults or {}))


def _grid_cmd(data: Path, out: Path, *extra: str, devices: str, faults: dict | None) -> list[str]:
    entry = [str(HOOKS)] if faults else ["-m", "apl"]
    return [sys.executable, *entry, "grid", *GRID_ARGS, "--data-dir", str(data), "--out", str(out),
            "--devices", devices, *extra]


def _grid(data: Path, out: Path, *extra: str, devices: str = "cpu", faults: dict | None = None):
    """Run the tiny grid into ``out`` (with ``faults`` injected) and wait for it."""
    return subprocess.run(_grid_cmd(data, out, *extra, devices=devices, faults=faults), env=_env(faults),
                          capture_output=True, text=True, timeout=240)


def _rerun(data: Path, out: Path, *extra: str) -> None:
    """The tiny grid in this process, with THREADS threads as the subprocesses; it must succeed."""
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        assert main(["grid", *GRID_ARGS, "--data-dir", str(data), "--out", str(out), "--devices", "cpu",
                     *extra]) == 0
    finally:
        torch.set_num_threads(threads)


def _start_grid(data: Path, out: Path, *, devices: str = "cpu", faults: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(_grid_cmd(data, out, devices=devices, faults=faults), env=_env(faults),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for_checkpoint(proc: subprocess.Popen, out: Path) -> Path:
    """The run folder of the first checkpoint ``proc`` writes under ``out`` (one finished epoch)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        found = sorted((out / "runs").glob("*/checkpoint.pt"))
        if found:
            return found[0].parent
        assert proc.poll() is None, "the grid ended before its first checkpoint: " + proc.communicate()[1][-3000:]
        time.sleep(0.02)
    raise AssertionError("no checkpoint within 120 s")


def _assert_same_records(out: Path, reference: Path) -> dict[str, dict]:
    """``out`` holds the reference grid's runs, each with records equal to the reference's; returns them."""
    got = assert_same_records(out, reference)
    assert not list(out.rglob("*.tmp"))  # no half-written file left behind
    return got


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def _plan() -> dict[str, TrainConfig]:
    """The tiny grid's config of each loss."""
    return {c.loss: c for c in plan_grid("quick", overrides=TINY, **SUBSET)}


def _names() -> dict[str, str]:
    """The tiny grid's run name of each loss."""
    return {loss: config.run_name() for loss, config in _plan().items()}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A synthetic CIFAR-10 of 50 training and 20 test images (balanced classes)."""
    return write_cifar10_folder(tmp_path_factory.mktemp("faults") / "data", n_train=50, n_test=20, seed=0)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Path:
    """The tiny grid, run undisturbed."""
    out = tmp_path_factory.mktemp("reference")
    _rerun(data, out)
    return out


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garble(path: Path) -> None:
    """Garbage over 64 bytes in the middle of ``path`` (a checkpoint: inside a tensor)."""
    raw = bytearray(path.read_bytes())
    middle = len(raw) // 2
    raw[middle:middle + 64] = b"\xde\xad\xbe\xef" * 16
    path.write_bytes(bytes(raw))


# --------------------------------------------------------------------------- damaged files, full disk

def test_damaged_checkpoints_are_refused_by_name_and_damaged_results_retrained(data, reference, tmp_path):
    """A damaged checkpoint fails its run (named, with --fresh as the way out); a damaged result, even one
    that still parses, is named, set aside whole and its run trained again, never taken as finished."""
    names, runs = _names(), tmp_path / "runs"
    for loss in ("ce", "nce"):  # a checkpoint after epoch 1 of 2
        config = TrainConfig.from_dict({**_plan()[loss].to_dict(), "device": "cpu", "data_dir": str(data)})
        with pytest.raises(_Stop):
            train(config, runs / names[loss], progress=False, on_epoch=_stop_after_first_epoch)
    for loss in ("nfl", "nce+rce"):  # a finished run
        shutil.copytree(reference / "runs" / names[loss], runs / names[loss])
    damaged = {"ce": runs / names["ce"] / "checkpoint.pt", "nce": runs / names["nce"] / "checkpoint.pt",
               "nfl": runs / names["nfl"] / "result.json", "nce+rce": runs / names["nce+rce"] / "result.json"}
    _truncate(damaged["ce"])
    _garble(damaged["nce"])
    _truncate(damaged["nfl"])
    result = json.loads(damaged["nce+rce"].read_text())
    result["final_test_acc"] += 10  # still a valid record, with a better number: only the checksum knows
    damaged["nce+rce"].write_text(json.dumps(result, indent=1))
    damaged_bytes = {loss: damaged[loss].read_bytes() for loss in ("nfl", "nce+rce")}

    proc = _grid(data, tmp_path)
    assert proc.returncode == RUNS_FAILED, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    failed = [name for name in names.values() if name in (names["ce"], names["nce"])]  # in run order
    assert f"apl: error: 2 run(s) failed: {', '.join(failed)} (details in {tmp_path / 'manifest.json'})" \
        in proc.stderr, proc.stderr
    refused = {"ce": f"{damaged['ce']} cannot be read safely as a checkpoint of this version",
               "nce": f"{damaged['nce']} is damaged (its content does not match its checksum"}
    entries = _manifest(tmp_path)["runs"]
    for loss, message in refused.items():
        assert f"[grid] run {names[loss]} failed: DamagedFile: {message}" in proc.stderr
        assert entries[names[loss]]["status"] == "failed" and message in entries[names[loss]]["error"]
        assert "(--fresh)" in entries[names[loss]]["error"]  # the way out, as the message says
    retrained = {"nfl": f"{damaged['nfl']} is damaged: not a readable run record",
                 "nce+rce": f"{damaged['nce+rce']} is damaged: its bytes do not match the checksum in "
                            "result.json.sha256"}
    for loss, message in retrained.items():
        assert f"apl: warning: {message}" in proc.stderr and proc.stderr.count(str(damaged[loss])) == 1
        assert (damaged[loss].parent / "result.json.damaged").read_bytes() == damaged_bytes[loss]
        assert entries[names[loss]]["status"] == "done"
    for loss in retrained:  # trained again, to the undisturbed record
        assert comparable_record(json.loads(damaged[loss].read_text())) == \
            comparable_record(json.loads((reference / "runs" / names[loss] / "result.json").read_text()))

    _rerun(data, tmp_path, "--fresh")
    _assert_same_records(tmp_path, reference)
    assert {e["status"] for e in _manifest(tmp_path)["runs"].values()} == {"done"}


def test_a_full_disk_mid_write_loses_nothing_written_before(data, reference, tmp_path):
    """The disk fills while the grid's manifest is written (the grid stops), then while epoch 2's
    checkpoint of one run and the result of another are written (both runs fail): each names its file,
    the files before stay whole, and the rerun resumes both runs."""
    names, runs = _names(), tmp_path / "runs"
    manifest = tmp_path / "manifest.json"
    proc = _grid(data, tmp_path, faults={"APL_FAULT_FULL_DISK": "manifest.json:2"})  # its first update
    assert proc.returncode == CANNOT_WRITE, proc.stderr[-3000:]
    assert f"apl: error: [Errno 28] cannot write {manifest} (No space left on device); it is as it was " \
        "before" in proc.stderr and "Traceback" not in proc.stderr
    assert _manifest(tmp_path)["runs"] == {} and not list(runs.iterdir())  # as written at the start

    checkpoint, result = runs / names["ce"] / "checkpoint.pt", runs / names["nce"] / "result.json"
    faults = {"APL_FAULT_FULL_DISK": f"{names['ce']}/checkpoint.pt:2,{names['nce']}/result.json:1"}
    proc = _grid(data, tmp_path, faults=faults)
    assert proc.returncode == RUNS_FAILED, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    for path in (checkpoint, result):
        assert f"fault: {path}: wrote" in proc.stderr  # the fault fired, midway through the file
        assert f"OSError: [Errno 28] cannot write {path} (No space left on device); it is as it was before" \
            in proc.stderr
    failed = [name for name in names.values() if name in (names["ce"], names["nce"])]  # in run order
    assert f"apl: error: 2 run(s) failed: {', '.join(failed)} (details in" in proc.stderr
    assert torch.load(checkpoint, weights_only=True)["epoch"] == 1  # the previous checkpoint, whole
    assert not result.exists() and torch.load(result.parent / "checkpoint.pt", weights_only=True)["epoch"] == 2
    assert not list(tmp_path.rglob("*.tmp"))

    _rerun(data, tmp_path)
    got = _assert_same_records(tmp_path, reference)
    assert got[names["ce"]]["resumed_at_epochs"] == [1] and got[names["nce"]]["resumed_at_epochs"] == [2]


# --------------------------------------------------------------------------- signals

def test_sigint_mid_epoch_stops_the_grid_at_a_safe_point_and_the_rerun_resumes(data, reference, tmp_path):
    proc = _start_grid(data, tmp_path, faults=SLOW)
    run = _wait_for_checkpoint(proc, tmp_path)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGINT, err[-3000:]
    assert err.count("stopped by SIGINT at a safe point") == 1 and "Traceback" not in err
    entries = _manifest(tmp_path)["runs"]
    assert entries[run.name]["status"] == "interrupted"
    assert not (run / "result.json").exists() and torch.load(run / "checkpoint.pt", weights_only=True)["epoch"] == 1

    _rerun(data, tmp_path)
    assert _assert_same_records(tmp_path, reference)[run.name]["resumed_at_epochs"] == [1]


def test_sigterm_to_the_parallel_grid_process_alone_stops_its_workers_at_a_safe_point(data, reference, tmp_path):
    proc = _start_grid(data, tmp_path, devices="cpu,cpu", faults=SLOW)
    run = _wait_for_checkpoint(proc, tmp_path)
    proc.send_signal(signal.SIGTERM)  # to the grid process only, not its process group
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert err.count("stopped by SIGTERM at a safe point") == 1 and "Traceback" not in err
    entries = _manifest(tmp_path)["runs"]
    interrupted = [name for name, e in entries.items() if e["status"] == "interrupted"]
    assert run.name in interrupted and not any(e["status"] in ("failed", "running") for e in entries.values())
    for name in interrupted:  # each worker reported its run, unfinished (the other may be in its first epoch)
        assert not (tmp_path / "runs" / name / "result.json").exists()
    assert torch.load(run / "checkpoint.pt", weights_only=True)["epoch"] == 1

    _rerun(data, tmp_path)
    assert _assert_same_records(tmp_path, reference)[run.name]["resumed_at_epochs"] == [1]


# --------------------------------------------------------------------------- folders

def test_two_grids_started_at_once_on_one_folder_share_its_runs_and_manifest(data, reference, tmp_path):
    """Each run is trained once; a grid that ends while the other still trains a run it left to it exits
    with BUSY (try later) and says which, one that ends after everything finished with 0."""
    slow = {"APL_FAULT_BATCH_DELAY": "0.25"}  # runs long enough for the grids to meet
    procs = [_start_grid(data, tmp_path, faults=slow) for _ in range(2)]
    errs = [p.communicate(timeout=240)[1] for p in procs]
    assert {p.returncode for p in procs} <= {0, BUSY} and 0 in {p.returncode for p in procs}, errs
    for proc, err in zip(procs, errs):
        assert "Traceback" not in err
        assert ("apl: error: " in err) == (proc.returncode == BUSY)
        assert proc.returncode == 0 or "left to the other process(es) training them" in err
    _assert_same_records(tmp_path, reference)
    manifest = _manifest(tmp_path)
    assert sorted(manifest["runs"]) == sorted(_names().values())  # every run once, none lost
    assert {e["status"] for e in manifest["runs"].values()} == {"done"}
    assert len(manifest["invocations"]) == 2 and all(i["finished_at"] for i in manifest["invocations"])


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders (chmod does not stop it)")
def test_a_read_only_output_folder_is_a_clear_error(data, reference, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o555)
    try:
        proc = _grid(data, out)
    finally:
        out.chmod(0o755)
    assert proc.returncode == CANNOT_WRITE, proc.stderr[-3000:]
    assert f"apl: error: cannot create {out / 'runs'} (Permission denied): the output folder must be writable" \
        in proc.stderr
    assert list(out.iterdir()) == []
    _rerun(data, out)
    _assert_same_records(out, reference)


def test_a_data_folder_that_disappears_mid_grid_stops_it_once_and_the_rerun_completes(data, reference, tmp_path):
    """The folder goes after the grid started its workers, before they read it: the grid stops with one
    error naming it (not one failure per run), and no run is marked failed."""
    gone = data.with_name(data.name + ".gone")
    try:
        proc = _grid(data, tmp_path, devices="cpu,cpu", faults={"APL_FAULT_DATA_GONE": str(data)})
        assert gone.is_dir() and not data.exists()
    finally:
        if gone.is_dir():
            gone.rename(data)
    assert proc.returncode == NO_DATA, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("apl:")]
    assert len(errors) == 1 and errors[0].startswith(
        f"apl: error: CIFAR-10 not found: expected the CIFAR-10 python folder {data / FOLDER}"), proc.stderr
    assert "failed" not in proc.stderr
    statuses = [e["status"] for e in _manifest(tmp_path)["runs"].values()]
    assert "interrupted" in statuses and set(statuses) <= {"interrupted", "pending"}

    _rerun(data, tmp_path)
    _assert_same_records(tmp_path, reference)
