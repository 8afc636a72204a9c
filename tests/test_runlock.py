"""One trainer per run (apl.runlock): a second trainer of the same run folder is refused at
once, a killed holder leaves no stale lock, and the grid leaves a run another process trains
to it (manifest status "busy") and finishes the rest."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

import apl.runlock as runlock
from apl.config import TrainConfig
from apl.errors import BUSY, OutputError, exit_status
from apl.grid import run_grid
from apl.plan import preset_config
from apl.runlock import LOCK_FILE, RunInUse, run_lock
from apl.train import train

TINY = {"epochs": 1, "train_subset": 200, "test_subset": 50, "width": 0.0625, "batch_size": 50}
HOLD = textwrap.dedent("""
    import sys, time
    from apl.runlock import run_lock
    with run_lock(sys.argv[1]):
        print("held", flush=True)
        time.sleep(600)
""")


def _hold_lock(folder):
    """A subprocess holding ``folder``'s lock until killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_lock_in_this_process_is_refused(tmp_path):
    with run_lock(tmp_path):
        with pytest.raises(RunInUse, match=rf"pid {os.getpid()}"):
            with run_lock(tmp_path):
                pass
    with run_lock(tmp_path):  # released on exit
        pass


def test_a_run_another_process_trains_is_refused_and_a_killed_holder_leaves_no_lock(tmp_path, cifar_arrays):
    cfg = TrainConfig.paper(device="cpu", num_threads=1, **TINY)
    holder = _hold_lock(tmp_path)
    try:
        with pytest.raises(RunInUse, match=rf"is being trained by another process \(pid {holder.pid}\)"):
            train(cfg, tmp_path, progress=False, data=cifar_arrays)
        assert not (tmp_path / "result.json").exists()  # nothing was written over the holder's run
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (tmp_path / LOCK_FILE).exists()  # the file stays; the kernel dropped the lock with its holder
    result = train(cfg, tmp_path, progress=False, data=cifar_arrays)
    assert result["epochs_completed"] == 1


def test_the_grid_leaves_a_busy_run_to_its_trainer(tmp_path, cifar_dir):
    """The grid trains the others, then ends with RunInUse (status 75: busy, try later) naming the run."""
    subset = dict(losses=["ce", "nce"], noise=[0.2], variants=["paper"])
    busy = preset_config("quick", loss="nce", variant="paper", noise=0.2, seed=0, overrides=TINY).run_name()
    (tmp_path / "runs" / busy).mkdir(parents=True)
    holder = _hold_lock(tmp_path / "runs" / busy)
    try:
        with pytest.raises(RunInUse, match=rf"1 run\(s\) left to the other process\(es\) training them: {busy}; "
                                           "run the same command again once they end") as info:
            run_grid("quick", cifar_dir, tmp_path, devices="cpu", overrides=TINY, progress=False, **subset)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert exit_status(info.value) == BUSY
    runs = json.loads((tmp_path / "manifest.json").read_text())["runs"]
    assert runs[busy]["status"] == "busy" and f"pid {holder.pid}" in runs[busy]["error"]
    assert [r["status"] for name, r in runs.items() if name != busy] == ["done"]
    run_grid("quick", cifar_dir, tmp_path, devices="cpu", overrides=TINY, progress=False, **subset)
    runs = json.loads((tmp_path / "manifest.json").read_text())["runs"]
    assert {r["status"] for r in runs.values()} == {"done"}


def test_a_run_folder_that_cannot_be_written_is_a_clear_error(tmp_path, monkeypatch):
    """(Root writes into read-only folders, so the refusal is simulated at the open.)"""
    def denied(path, flags, mode=0o777):
        raise PermissionError(13, "Permission denied", str(path))
    monkeypatch.setattr(runlock.os, "open", denied)
    with pytest.raises(OutputError, match=r"cannot lock the run folder .* \(Permission denied\): it must be writable"):
        with run_lock(tmp_path):
            pass
