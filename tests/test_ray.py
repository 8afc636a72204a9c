"""The Ray engine (apl.ray_engine) on real Ray clusters on this machine: a two-node cluster shared by the
module (ray.cluster_utils.Cluster) and the local cluster a driver starts for itself (ray.init).

A grid under Ray gives the in-process grid's run records; a worker killed mid-run is retried and
resumes from its checkpoint; a driver killed and rerun loses and duplicates nothing; a lambda sweep
gives its runs and its figure. Marked ``ray`` (``pytest -m "not ray"`` skips them); skipped where
Ray is not installed. Every run trains with one thread, as the Ray tasks do (one CPU each).
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import assert_same_records, comparable_record, run_results

from apl.cli import main
from apl.config import TrainConfig
from apl.data import FOLDER, write_cifar10_folder
from apl.errors import NO_RAY, DataError
from apl.grid import run_grid
from apl.plan import plan_grid
from apl.ray_engine import _storage_problem, check_options
from apl.records import load_manifest, load_run_records
from apl.report import make_report
from apl.report.sweep import split_sweep, sweep_points
from apl.runner import Progress
from apl.train import train

try:
    import ray
    from ray.cluster_utils import Cluster
except ImportError:  # the optional extra is missing: the Ray tests skip, the no-Ray message is still tested
    ray = None

requires_ray = pytest.mark.skipif(ray is None, reason="ray is not installed (pip install '.[ray]')")

LOSSES = ("ce", "nce", "nfl", "nce+rce")
TINY = {"epochs": 2, "train_subset": 40, "test_subset": 20, "width": 0.0625, "batch_size": 20}
SUBSET = dict(losses=list(LOSSES), noise=[0.2], variants=["paper"])
GRID_ARGS = ["--preset", "quick", "--losses", *LOSSES, "--noise", "0.2", "--variants", "paper", "--no-progress",
             *(arg for key, value in TINY.items() for arg in ("--set", f"{key}={value}"))]
def _assert_same_records(out: Path, reference: Path) -> dict[str, dict]:
    """As conftest's, and no run trained an epoch twice."""
    got = assert_same_records(out, reference)
    for name, result in got.items():
        assert [h["epoch"] for h in result["history"]] == list(range(1, TINY["epochs"] + 1)), name
    return got


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A synthetic CIFAR-10 of 200 training and 20 test images (balanced classes)."""
    return write_cifar10_folder(tmp_path_factory.mktemp("ray") / "data", n_train=200, n_test=20, seed=0)


@pytest.fixture(scope="module")
def one_thread():
    """This process trains with one thread while the module runs, as each Ray task does."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(data, one_thread, tmp_path_factory) -> Path:
    """The tiny grid, run in this process."""
    out = tmp_path_factory.mktemp("reference")
    run_grid("quick", data, out, devices="cpu", overrides=TINY, progress=False, **SUBSET)
    return out


@pytest.fixture(scope="module")
def cluster():
    """Two Ray nodes of one CPU each on this machine, this process their driver."""
    if ray is None:
        pytest.skip("ray is not installed")
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    nodes.add_node(num_cpus=1)
    nodes.wait_for_nodes()
    ray.init(address=nodes.address, log_to_driver=False)
    yield nodes
    ray.shutdown()
    nodes.shutdown()


class _Counted(Progress):
    """The grid's bar, counting the epochs reported to it."""

    reported: list = []

    def epoch(self, run: str, epoch_time: float) -> None:
        _Counted.reported.append(run)
        super().epoch(run, epoch_time)


def test_without_ray_engine_ray_says_how_to_install_it(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    assert main(["grid", *GRID_ARGS, "--out", str(tmp_path), "--engine", "ray"]) == NO_RAY
    err = capsys.readouterr().err
    assert "pip install '.[ray]'" in err and "--engine ray" in err
    assert not (tmp_path / "manifest.json").exists()  # refused before anything was written
    assert main(["grid", *GRID_ARGS, "--out", str(tmp_path), "--address", "auto"]) == 2
    assert "--address need(s) --engine ray" in capsys.readouterr().err


@requires_ray
@pytest.mark.parametrize("options, message", [
    (dict(gpus_per_run=-1), "--gpus-per-run must be"), (dict(gpus_per_run=1.5), "whole number"),
    (dict(cpus_per_run=0), "--cpus-per-run must be"), (dict(max_retries=-1), "--max-retries must be"),
    (dict(address="127.0.0.1:1"), "no Ray cluster answers at 127.0.0.1:1"),  # Ray itself would retry for ever
])
def test_bad_engine_options_are_value_errors(options, message):
    with pytest.raises(ValueError, match=message):
        check_options(**options)


def test_storage_check_names_the_folder_and_the_node(tmp_path):
    node = {"host": "worker-7", "ip": "10.0.0.7", "id": "ab" * 28}
    runs = tmp_path / "runs"
    runs.mkdir()
    problem = _storage_problem(runs, ".ray-driver-x", runs / "ce_run", node)
    assert str(runs) in problem and "worker-7 (10.0.0.7" in problem and "same path" in problem
    (runs / ".ray-driver-x").write_text("")
    assert _storage_problem(runs, ".ray-driver-x", runs / "ce_run", node) is None
    (runs / "blocked").write_text("a file where the run folder should be")
    problem = _storage_problem(runs, ".ray-driver-x", runs / "blocked", node)
    assert "cannot write the run folder" in problem and str(runs / "blocked") in problem and "worker-7" in problem


@pytest.mark.usefixtures("one_thread")
@pytest.mark.ray
@requires_ray
def test_ray_grid_gives_the_in_process_records_and_names_each_node(cluster, data, reference, tmp_path, monkeypatch):
    monkeypatch.setattr("apl.grid.Progress", _Counted)
    _Counted.reported = []
    run_grid("quick", data, tmp_path, overrides=TINY, progress=True, engine="ray",
             ray_options={"address": cluster.address}, **SUBSET)
    _assert_same_records(tmp_path, reference)
    # Every epoch of every run reached the driver's bar through the cluster.
    assert sorted(_Counted.reported) == sorted(name for name in run_results(reference) for _ in range(TINY["epochs"]))
    manifest = _manifest(tmp_path)
    node_ids = {n["NodeID"] for n in ray.nodes()}
    assert manifest["engine"] == "ray" and len(manifest["runs"]) == len(LOSSES)
    for entry in manifest["runs"].values():
        assert entry["status"] == "done" and entry["node"]["id"] in node_ids and entry["node"]["host"]
    assert not list((tmp_path / "runs").glob(".ray-driver-*"))  # the storage marker is removed

    # A task that does not see the driver's folder fails the run, naming the folder and the node.
    task = ray.remote(__import__("apl.ray_engine", fromlist=["_run_task"])._run_task)
    cfg = plan_grid("quick", overrides=TINY, **SUBSET)[0]
    outcome = ray.get(task.remote(cfg.to_dict(), str(tmp_path / "elsewhere"), ".ray-driver-none", str(data),
                                  "cpu", 1, None))
    assert outcome["kind"] == "failed" and str(tmp_path / "elsewhere") in outcome["payload"]
    assert outcome["node"]["id"] in outcome["payload"] or outcome["node"]["id"][:12] in outcome["payload"]


@pytest.mark.usefixtures("one_thread")
@pytest.mark.ray
@requires_ray
def test_data_no_task_can_load_stops_the_grid_once_and_the_driver_names_a_damaged_result(cluster, data, reference,
                                                                                         tmp_path, caplog):
    """Damaged data stops a Ray grid with that one error (no run marked failed); a damaged result, which a
    task sets aside and trains again, is named by the driver (a task's own output is not shown)."""
    bad = write_cifar10_folder(tmp_path / "bad", n_train=50, n_test=20, seed=0)
    (bad / FOLDER / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="test_batch is not a CIFAR-10 file"):
        run_grid("quick", bad, tmp_path / "stopped", overrides=TINY, progress=False, engine="ray",
                 ray_options={"address": cluster.address}, **SUBSET)
    statuses = [e["status"] for e in load_manifest(tmp_path / "stopped")["runs"].values()]
    assert "interrupted" in statuses and set(statuses) <= {"interrupted", "pending"}

    out = tmp_path / "grid"
    shutil.copytree(reference, out)
    result = sorted((out / "runs").glob("*/result.json"))[0]
    record = json.loads(result.read_text())
    record["final_test_acc"] += 10  # still parses: only its checksum knows
    result.write_text(json.dumps(record, indent=1))
    with caplog.at_level(logging.WARNING, logger="apl"):
        run_grid("quick", data, out, overrides=TINY, progress=False, engine="ray",
                 ray_options={"address": cluster.address}, **SUBSET)
    assert f"{result} is damaged: its bytes do not match the checksum" in caplog.text
    assert (result.parent / "result.json.damaged").exists()
    _assert_same_records(out, reference)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.ray
@requires_ray
def test_a_worker_killed_mid_run_is_retried_and_resumes_from_its_checkpoint(cluster, data, tmp_path):
    longer = dict(TINY, epochs=6, train_subset=200)
    (cfg,) = plan_grid("quick", overrides=longer, losses=["nce+rce"], noise=[0.4], variants=["paper"])
    expected = train(TrainConfig.from_dict(dict(cfg.to_dict(), num_threads=1, data_dir=str(data))),
                     tmp_path / "reference", progress=False)
    run_dir = tmp_path / "grid" / "runs" / cfg.run_name()
    killed: list[int] = []

    def kill_the_trainer() -> None:
        """SIGKILL the process training the run (the pid in its lock file) once it has a checkpoint."""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (run_dir / "result.json").exists():
            if (run_dir / "checkpoint.pt").exists():
                pid = int((run_dir / ".lock").read_text().split()[0])
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
            time.sleep(0.005)

    killer = threading.Thread(target=kill_the_trainer)
    killer.start()
    try:
        run_grid("quick", data, tmp_path / "grid", overrides=longer, progress=False, losses=["nce+rce"],
                 noise=[0.4], variants=["paper"], engine="ray",
                 ray_options={"address": cluster.address, "max_retries": 2})
    finally:
        killer.join()
    assert killed, "the run finished before a checkpoint was seen"
    result = json.loads((run_dir / "result.json").read_text())
    assert result["resumed_at_epochs"] and result["resumed_at_epochs"][0] >= 1  # resumed, not restarted
    assert comparable_record(result) == comparable_record(expected)
    assert _manifest(tmp_path / "grid")["runs"][cfg.run_name()]["status"] == "done"


def _finished(runs: Path) -> dict[str, int]:
    """Run name -> its result's mtime, for the runs that finished."""
    return {p.parent.name: p.stat().st_mtime_ns for p in runs.glob("*/result.json")}


def _mid_run(runs: Path) -> list[Path]:
    """The run folders holding a checkpoint and no result."""
    return [p.parent for p in runs.glob("*/checkpoint.pt") if not (p.parent / "result.json").exists()]


def _wait_until_no_trainer(runs: Path, timeout: float = 60.0) -> None:
    """Wait until no process holds a run folder's lock (apl.runlock)."""
    deadline = time.monotonic() + timeout
    for lock in runs.glob("*/.lock"):
        fd = os.open(lock, os.O_RDWR)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    assert time.monotonic() < deadline, f"{lock} is still held"
                    time.sleep(0.05)
        finally:
            os.close(fd)


@pytest.mark.ray
@requires_ray
def test_a_killed_driver_rerun_loses_nothing_and_runs_nothing_twice(data, reference, tmp_path):
    """The driver starts its own local cluster (ray.init with this machine's CPUs); SIGKILL takes the
    cluster down with it; the same command again skips the finished runs and resumes the others. A run
    caught mid-run may still finish before its worker goes down (on a loaded machine): then it is kept."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "apl", "grid", *GRID_ARGS, "--data-dir", str(data), "--out", str(tmp_path),
           "--engine", "ray"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    runs = tmp_path / "runs"
    deadline = time.monotonic() + 150
    caught: set[str] = set()  # the runs mid-run at the kill
    while time.monotonic() < deadline and proc.poll() is None:
        mid = _mid_run(runs)
        if _finished(runs) and mid:
            proc.send_signal(signal.SIGKILL)
            caught = {p.name for p in mid}
            break
        time.sleep(0.005)
    proc.wait(timeout=30)
    assert caught, "no moment with a finished run and one mid-run was seen: " + proc.stderr.read()[-2000:]
    _wait_until_no_trainer(runs)  # the cluster dies with its driver: its workers stop at a safe point
    finished = _finished(runs)
    assert finished

    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"{len(finished)} already finished" in rerun.stderr
    got = _assert_same_records(tmp_path, reference)
    # The runs finished before the kill were kept as they were, not trained again.
    assert {name: (runs / name / "result.json").stat().st_mtime_ns for name in finished} == finished
    for name in caught:  # each run caught mid-run resumed from its checkpoint, or had finished (kept above)
        assert name in finished or got[name]["resumed_at_epochs"], name
    manifest = _manifest(tmp_path)
    assert all(entry["status"] == "done" for entry in manifest["runs"].values())
    assert len(manifest["invocations"]) == 2
    assert not list(runs.glob(".ray-driver-*"))  # the killed driver's marker is cleared by the rerun


@pytest.mark.usefixtures("one_thread")
@pytest.mark.ray
@requires_ray
def test_a_lambda_sweep_under_ray_gives_its_runs_and_its_figure(cluster, data, tmp_path):
    sweep = {"lam": [0.2, 0.6]}
    one = dict(losses=["ce", "nce+mae"], noise=[0.2], variants=["paper"])
    run_grid("quick", data, tmp_path / "grid", overrides=TINY, progress=False, sweep=sweep, engine="ray",
             ray_options={"address": cluster.address}, **one)
    results = list(run_results(tmp_path / "grid").values())
    apl_runs = sorted((r["noise"], r["config"]["loss_params"]["lam"]) for r in results if r["loss"] == "nce+mae")
    assert apl_runs == [(0.2, 0.2), (0.2, 0.6)]
    assert [r["noise"] for r in results if r["loss"] == "ce"] == [0.2]  # CE has no λ: one run

    paths = {p.name for p in make_report(tmp_path / "grid", tmp_path / "report")}
    assert {"sweep_lam_paper.png", "sweep_lam_paper.pdf", "table1_paper.csv"} <= paths
    # Table 1 shows the grid's own λ (0.6 under the paper's protocol); the figure shows both.
    table, swept = split_sweep(load_run_records(tmp_path / "grid"), load_manifest(tmp_path / "grid"))
    assert sorted((r["loss"], r["noise"], r["config"]["loss_params"].get("lam")) for r in table) == [
        ("ce", 0.2, None), ("nce+mae", 0.2, 0.6)]
    lines = sweep_points(swept, "lam")["paper"]
    assert {noise: sorted(lines[noise]["nce+mae"]) for noise in lines} == {0.2: [0.2, 0.6]}
