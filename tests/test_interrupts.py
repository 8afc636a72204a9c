"""SIGINT and SIGTERM stop a run at a safe point (apl.interrupts): the batch in progress ends, the
epoch is abandoned, the command exits with 128 + the signal's number, and running it again
resumes to the result of an uninterrupted run. A second signal acts at once."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import comparable_record

from apl.interrupts import Interrupted, graceful_stop


def test_the_first_signal_asks_the_second_acts(monkeypatch):
    with graceful_stop() as stop:
        stop.check()  # nothing asked yet
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signum == signal.SIGINT
        with pytest.raises(Interrupted, match="stopped by SIGINT at a safe point") as info:
            stop.check()
        assert info.value.status == 130
        with pytest.raises(KeyboardInterrupt):  # the second Ctrl-C: Python's own handler, at once
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers restored after the block


def test_nested_blocks_share_the_outer_request_and_on_stop_hears_the_first_signal():
    """A grid's (or a worker's) block around its runs: a signal between two runs stops the next one,
    and the grid passes it on to its workers from ``on_stop``."""
    heard = []
    with graceful_stop(on_stop=heard.append) as outer:
        with graceful_stop(on_stop=lambda signum: heard.append(("inner", signum))) as run:
            assert run is outer
        os.kill(os.getpid(), signal.SIGTERM)  # between runs
        assert outer.signum == signal.SIGTERM and heard == [signal.SIGTERM]
        with graceful_stop() as next_run, pytest.raises(Interrupted, match="stopped by SIGTERM"):
            next_run.check()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def _train_cmd(data, out, epochs):
    return [sys.executable, "-m", "apl", "train", "--loss", "nce+rce", "--noise", "0.2", "--epochs", str(epochs),
            "--width", "0.0625", "--batch-size", "20", "--device", "cpu", "--num-threads", "1", "--quiet",
            "--data-dir", str(data), "--out", str(out)]


def _history(out):
    result = json.loads((out / "result.json").read_text())
    return comparable_record(result)["history"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signalled_run_stops_at_a_safe_point_and_resumes(signum, cifar_dir, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    subprocess.run(_train_cmd(cifar_dir, tmp_path / "whole", 6), env=env, check=True, capture_output=True)
    cut = tmp_path / "cut"
    proc = subprocess.Popen(_train_cmd(cifar_dir, cut, 6), env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (cut / "checkpoint.pt").exists():  # at least one finished epoch
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.05)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err
    assert f"stopped by {signal.Signals(signum).name} at a safe point" in err
    assert "Traceback" not in err
    assert not (cut / "result.json").exists() and (cut / "checkpoint.pt").exists()
    subprocess.run(_train_cmd(cifar_dir, cut, 6), env=env, check=True, capture_output=True)
    assert _history(cut) == _history(tmp_path / "whole")
