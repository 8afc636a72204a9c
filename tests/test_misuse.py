"""Every mistake a user can make ends in one line and loses nothing: the misuse table.

Each row is one mistake, made through the real command line in a subprocess (``python -m apl``,
``./reproduce.sh``; what a command line cannot cause is injected by ``tests/fault_hooks.py``) on tiny
generated data. Each row asserts the exit status (:mod:`apl.errors`, the table ``python -m apl --help``
prints), that stderr holds one line ``apl: error: ...`` naming the thing (besides the grid's own
``[grid]`` progress lines and the hooks' ``fault:`` lines) and no traceback, and that no file that
existed before changed or went (lock files aside), and, for a refusal, that nothing was written. Then
the same command with the mistake removed (and the way out the message names, e.g. ``--fresh``) runs in
this process and gives the undisturbed run's record. Rows whose mistake the command recovers from on its
own (a damaged result) print one ``apl: warning: ...`` line instead and exit 0.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import assert_same_records, comparable_record

from apl.cli import build_parser, config_from_args, main
from apl.data import FOLDER, write_cifar10_folder
from apl.errors import (
    BUSY,
    CANNOT_WRITE,
    DAMAGED,
    INTERRUPTED,
    NO_DATA,
    NO_RAY,
    OK,
    STATUS_TABLE,
    USAGE,
)
from apl.train import train

ROOT = Path(__file__).resolve().parent.parent
HOOKS = ROOT / "tests" / "fault_hooks.py"
#: One run of 2 epochs (2 batches each) on 40 of the generated images, one thread.
TRAIN = ("train", "--loss", "nce+rce", "--noise", "0.2", "--epochs", "2", "--width", "0.0625", "--batch-size", "20",
         "--train-subset", "40", "--test-subset", "20", "--device", "cpu", "--num-threads", "1", "--quiet",
         "--data-dir", "{data}", "--out", "{out}")
#: The same run as a grid of one run (the quick preset's NCE+RCE of the paper's form).
_TINY = ("epochs=2", "train_subset=40", "test_subset=20", "width=0.0625", "batch_size=20")
_GRID_RUN = ("--losses", "nce+rce", "--noise", "0.2", "--variants", "paper", "--no-progress",
             *(arg for setting in _TINY for arg in ("--set", setting)))
_ANY_ENGINE = ("grid", "--preset", "quick", *_GRID_RUN, "--data-dir", "{data}", "--out", "{grid}")
GRID = (*_ANY_ENGINE, "--devices", "cpu")
REPORT = ("report", "--runs", "{grid}", "--out", "{figures}", "--no-figures")
#: reproduce.sh on that grid: its own flags, then (after --, each row's ``tail``) the grid's.
REPRODUCE = ("reproduce.sh", "--data-dir", "{data}", "--out", "{scene}/repro")
REPRODUCE_GRID = ("--", "--no-download", *_GRID_RUN)
LOCK_FILES = (".lock", ".manifest.lock")
HOLD = textwrap.dedent("""
    import sys, time
    from apl.runlock import run_lock
    with run_lock(sys.argv[1]):
        print("held", flush=True)
        time.sleep(600)
""")


@dataclasses.dataclass(frozen=True)
class Mistake:
    """One row: ``command`` (placeholders ``{data}``, ``{out}``, ``{grid}``, ``{figures}``, ``{scene}``) with
    the ``mistake`` appended (then ``tail``) ends with ``status`` and one line that ``says`` this."""

    command: tuple
    mistake: tuple
    status: int
    says: str
    setup: Callable | None = None  # (scene, refs) -> None, or a teardown called after the command
    faults: dict = dataclasses.field(default_factory=dict)  # environment: fault hooks (tests/fault_hooks.py)
    during: Callable | None = None  # (process, scene): what the user does while it runs (signals)
    check: Callable | None = None  # (scene, stderr): what else must hold after the command
    fix: tuple = ()  # the rerun's arguments in place of ``mistake``: the way out the message names
    tail: tuple = ()
    writes: tuple = ()  # files (globs under the scene) the command may write or change; None: any new file
    line: str = "error"  # "warning": the command recovers on its own, exits 0 and says so


# --------------------------------------------------------------------------- the scenes rows set up

def _parsed(scene: dict, *extra: str):
    return build_parser().parse_args([a.format(**scene) for a in TRAIN + extra])


class _Stop(Exception):
    """Raised after a run's first epoch, to leave its checkpoint behind."""


def _stop(record: dict) -> None:
    raise _Stop


def _checkpoint(scene: dict, refs, *extra: str) -> None:
    """The train command's run (or with ``extra`` flags another config's), stopped after epoch 1 of 2."""
    args = _parsed(scene, *extra)
    with pytest.raises(_Stop):
        train(config_from_args(args), Path(args.out), progress=False, on_epoch=_stop)


def _finished(scene: dict, refs) -> None:
    shutil.copytree(refs.train, scene["out"])


def _grid_finished(scene: dict, refs) -> None:
    shutil.copytree(refs.grid, scene["grid"])


def _hold(folder: Path) -> Callable:
    """A process holding ``folder``'s run lock (as a trainer does) until the returned teardown."""
    folder.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True,
                            env=_env({}))
    assert proc.stdout.readline().strip() == "held"

    def release() -> None:
        proc.kill()
        proc.wait()
    return release


def _bad_data(scene: dict, damage: Callable[[Path], None]) -> None:
    """A copy of the data at ``{scene}/bad`` with ``damage`` done to its folder."""
    shutil.copytree(scene["data"], Path(scene["scene"]) / "bad")
    damage(Path(scene["scene"]) / "bad" / FOLDER)


class _RunsCode:
    """Pickles as a call of ``os.system``: loading it would run a command (here, touch a file)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _pickle_that_runs_code(path: Path, scene: dict) -> None:
    import pickle

    with open(path, "wb") as f:
        pickle.dump(_RunsCode(Path(scene["scene"]) / "code-ran"), f, protocol=2)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garble(path: Path) -> None:
    """Garbage over 64 bytes in the middle of ``path`` (a checkpoint: inside a tensor)."""
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2:len(raw) // 2 + 64] = b"\xde\xad\xbe\xef" * 16
    path.write_bytes(bytes(raw))


def _better_number(path: Path) -> None:
    """A result that still parses, with a better accuracy than the run reached: only its checksum knows."""
    result = json.loads(path.read_text())
    result["final_test_acc"] += 10
    path.write_text(json.dumps(result, indent=1))


def _grid_run(scene: dict) -> Path:
    (run,) = (Path(scene["grid"]) / "runs").iterdir()
    return run


def _wait_for(pattern: str, folder: Path, proc: subprocess.Popen) -> Path:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        found = sorted(folder.glob(pattern))
        if found:
            return found[0]
        assert proc.poll() is None, "the command ended before: " + proc.communicate()[1][-3000:]
        time.sleep(0.02)
    raise AssertionError(f"no {pattern} under {folder} within 120 s")


def _ctrl_c_at_once(proc: subprocess.Popen, scene: dict) -> None:
    """Ctrl-C 0.3 s after the start: while Python loads torch (or, on a machine that loads it faster, in the
    run, which stops at its first safe point: the same status and one line either way)."""
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)


def _ctrl_c_after_epoch_1(proc: subprocess.Popen, scene: dict) -> None:
    _wait_for("checkpoint.pt", Path(scene["out"]), proc)
    proc.send_signal(signal.SIGINT)


def _ctrl_c_twice(proc: subprocess.Popen, scene: dict) -> None:
    """Two Ctrl-C, 0.2 s apart, while the grid's run sleeps in a 1 s batch of epoch 2: the second comes
    before the first is acted on, and stops the grid at once."""
    _wait_for("runs/*/checkpoint.pt", Path(scene["grid"]), proc)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)


def _epoch(path: Path) -> int:
    return torch.load(path, weights_only=True)["epoch"]


def _stopped_after_epoch_1(run: Path) -> None:
    assert _epoch(run / "checkpoint.pt") == 1 and not (run / "result.json").exists()
    assert not list(run.glob("*.tmp"))


def _no_code_ran(scene: dict, stderr: str) -> None:
    assert not (Path(scene["scene"]) / "code-ran").exists()


def _no_download_tried(scene: dict, stderr: str) -> None:
    assert "fault: a download was attempted" not in stderr, stderr


def _download_tried(scene: dict, stderr: str) -> None:
    assert "fault: a download was attempted" in stderr, stderr


def _other_config_finished(scene: dict, refs) -> None:
    assert main([a.format(**scene) for a in TRAIN + ("--epochs", "1")]) == 0


def _manifest_says_interrupted(scene: dict, stderr: str) -> None:
    run = _grid_run(scene)
    _stopped_after_epoch_1(run)
    entry = json.loads((Path(scene["grid"]) / "manifest.json").read_text())["runs"][run.name]
    assert entry["status"] == "interrupted" and "second Ctrl-C" in entry["error"]


def _set_aside_whole(scene: dict, stderr: str) -> None:
    out = Path(scene["out"])
    assert (out / "result.json.damaged").read_bytes() == scene["damaged_bytes"]


_RAY_ANSWERS = ("no Ray cluster answers at 127.0.0.1:1" if importlib.util.find_spec("ray") is not None
                else "--engine ray needs Ray")
_SLOW = {"APL_FAULT_BATCH_DELAY": "0.5"}

# --------------------------------------------------------------------------- the table

MISTAKES = {
    # a run in use
    "run-in-use": Mistake(
        TRAIN, (), BUSY, "{out} is being trained by another process (pid",
        setup=lambda scene, refs: (_checkpoint(scene, refs), _hold(Path(scene["out"])))[1]),
    "grid-run-in-use": Mistake(
        GRID, (), BUSY, "1 run(s) left to the other process(es) training them: ",
        setup=lambda scene, refs: _hold(Path(scene["grid"]) / "runs" / refs.grid_run),
        writes=("grid/manifest.json",)),
    # bad flags and values
    "bad-value": Mistake(TRAIN, ("--noise", "1.5"), USAGE, "noise"),
    "bad-flag": Mistake(TRAIN, ("--protocol", "nope"), USAGE,
                        "argument --protocol: invalid choice: 'nope'"),
    "bad-grid-override": Mistake(GRID, ("--set", "nosuch=1"), USAGE, "nosuch"),
    "bad-report-flag": Mistake(REPORT, ("--reference", "nope"), USAGE, "argument --reference: invalid choice",
                               setup=_grid_finished),
    "report-of-no-grid": Mistake(REPORT, ("--runs", "{scene}/nowhere"), USAGE,
                                 "runs folder {scene}/nowhere does not exist", setup=_grid_finished),
    # missing or damaged data
    "missing-data": Mistake(
        TRAIN, ("--data-dir", "{scene}/nowhere", "--no-download"), NO_DATA,
        "CIFAR-10 not found: expected the CIFAR-10 python folder {scene}/nowhere/" + FOLDER),
    "missing-data-in-docker": Mistake(  # the image, no data mounted: the message, no download tried
        GRID, ("--data-dir", "{scene}/nowhere"), NO_DATA, "-v /path/on/host:{scene}/nowhere:ro",
        faults={"APL_IN_DOCKER": "1", "APL_FAULT_NO_DOWNLOAD": "1"}, check=_no_download_tried),
    "download-asked-in-docker-offline": Mistake(  # asked for: tried (and here, offline, failed)
        GRID, ("--data-dir", "{scene}/nowhere", "--download"), NO_DATA,
        "CIFAR-10 not found and the download failed", faults={"APL_IN_DOCKER": "1", "APL_FAULT_NO_DOWNLOAD": "1"},
        check=_download_tried),
    "incomplete-data": Mistake(
        TRAIN, ("--data-dir", "{scene}/bad"), NO_DATA, "is incomplete (missing test_batch)",
        setup=lambda scene, refs: _bad_data(scene, lambda folder: (folder / "test_batch").unlink())),
    "damaged-data": Mistake(
        TRAIN, ("--data-dir", "{scene}/bad"), NO_DATA, f"{{scene}}/bad/{FOLDER}/data_batch_3 is not a CIFAR-10 file",
        setup=lambda scene, refs: _bad_data(scene, lambda folder: _truncate(folder / "data_batch_3"))),
    "data-that-would-run-code": Mistake(
        TRAIN, ("--data-dir", "{scene}/bad"), NO_DATA, "it would load posix.system",
        setup=lambda scene, refs: _bad_data(scene, lambda f: _pickle_that_runs_code(f / "data_batch_2", scene)),
        check=_no_code_ran),
    # a read-only, full or vanished output folder
    "read-only-output": Mistake(
        TRAIN, (), CANNOT_WRITE, "cannot lock the run folder {out} (Read-only file system)",
        setup=_checkpoint, faults={"APL_FAULT_READ_ONLY": "{out}"}),
    "read-only-grid-output": Mistake(
        GRID, (), CANNOT_WRITE, "cannot create {grid}/runs (Read-only file system)",
        setup=lambda scene, refs: Path(scene["grid"]).mkdir(), faults={"APL_FAULT_READ_ONLY": "{grid}"}),
    "full-disk": Mistake(
        TRAIN, (), CANNOT_WRITE, "cannot write {out}/checkpoint.pt (No space left on device); it is as it was before",
        faults={"APL_FAULT_FULL_DISK": "checkpoint.pt:2"}, writes=None,
        check=lambda scene, stderr: _stopped_after_epoch_1(Path(scene["out"]))),
    "output-folder-vanishes": Mistake(
        TRAIN, (), CANNOT_WRITE, "the run folder {out} disappeared while the run trained",
        faults={"APL_FAULT_FOLDER_GONE": "checkpoint.pt:2"}, writes=None),
    # damaged or foreign checkpoints and results
    "truncated-checkpoint": Mistake(
        TRAIN, (), DAMAGED, "{out}/checkpoint.pt cannot be read safely as a checkpoint", fix=("--fresh",),
        setup=lambda scene, refs: (_checkpoint(scene, refs), _truncate(Path(scene["out"]) / "checkpoint.pt"))),
    "garbled-checkpoint": Mistake(
        TRAIN, (), DAMAGED, "{out}/checkpoint.pt is damaged (its content does not match its checksum",
        fix=("--fresh",),
        setup=lambda scene, refs: (_checkpoint(scene, refs), _garble(Path(scene["out"]) / "checkpoint.pt"))),
    "checkpoint-that-would-run-code": Mistake(
        TRAIN, (), DAMAGED, "{out}/checkpoint.pt cannot be read safely as a checkpoint", fix=("--fresh",),
        setup=lambda scene, refs: (Path(scene["out"]).mkdir(), torch.save(
            {"format": 3, "model": _RunsCode(Path(scene["scene"]) / "code-ran")},
            Path(scene["out"]) / "checkpoint.pt")),
        check=_no_code_ran),
    "another-configs-checkpoint": Mistake(
        TRAIN, (), DAMAGED, "{out} holds a checkpoint of a different config (differs in lr)",
        fix=("--out", "{scene}/elsewhere"), setup=lambda scene, refs: _checkpoint(scene, refs, "--lr", "0.0123")),
    "another-configs-result": Mistake(
        TRAIN, (), DAMAGED, "{out} holds a finished run of a different config (differs in epochs)",
        fix=("--out", "{scene}/elsewhere"), setup=_other_config_finished),
    "damaged-result": Mistake(  # recovered: named, set aside whole, the run trained again
        TRAIN, (), OK, "{out}/result.json is damaged: its bytes do not match the checksum in result.json.sha256; "
                       "set aside as result.json.damaged", line="warning",
        setup=lambda scene, refs: (_finished(scene, refs), _better_number(Path(scene["out"]) / "result.json"),
                                   scene.update(damaged_bytes=(Path(scene["out"]) / "result.json").read_bytes())),
        writes=("run/result.json", "run/result.json.sha256", "run/model.pt", "run/result.json.damaged",
                "run/result.json.sha256.damaged"), check=_set_aside_whole),
    "damaged-result-reported": Mistake(
        REPORT, (), DAMAGED, "1 run record(s) cannot be used: ",
        setup=lambda scene, refs: (_grid_finished(scene, refs), _better_number(_grid_run(scene) / "result.json")),
        fix=("--rerun-the-grid-first",)),
    # an interrupted run
    "interrupted": Mistake(
        TRAIN, (), INTERRUPTED + signal.SIGINT, "stopped by SIGINT at a safe point", faults=_SLOW,
        during=_ctrl_c_after_epoch_1, writes=None, check=lambda scene, stderr: _stopped_after_epoch_1(
            Path(scene["out"]))),
    "ctrl-c-while-starting": Mistake(
        TRAIN, (), INTERRUPTED + signal.SIGINT, "interrupted", during=_ctrl_c_at_once, writes=None),
    "second-ctrl-c": Mistake(
        GRID, (), INTERRUPTED + signal.SIGINT, "interrupted at once (a second Ctrl-C)",
        faults={"APL_FAULT_BATCH_DELAY": "1.0"}, during=_ctrl_c_twice, writes=None, check=_manifest_says_interrupted),
    # Ray absent or unreachable (ids without the word: they start no cluster, and `-k "not ray"` keeps them)
    "cluster-engine-not-installed": Mistake(
        _ANY_ENGINE, ("--engine", "ray"), NO_RAY, "--engine ray needs Ray, an optional dependency not installed here",
        faults={"APL_FAULT_NO_RAY": "1"}, fix=("--devices", "cpu")),
    "cluster-unreachable": Mistake(_ANY_ENGINE, ("--engine", "ray", "--address", "127.0.0.1:1"), NO_RAY,
                                   _RAY_ANSWERS, fix=("--devices", "cpu")),
    # reproduce.sh: its own flags, and the grid's errors passed on as they are
    "reproduce-unknown-preset": Mistake(REPRODUCE, ("--preset", "fast"), USAGE, "unknown preset 'fast'",
                                        fix=("--quick",), tail=REPRODUCE_GRID),
    "reproduce-missing-data": Mistake(REPRODUCE, ("--quick", "--data-dir", "{scene}/nowhere"), NO_DATA,
                                      "CIFAR-10 not found: expected", fix=("--quick",), tail=REPRODUCE_GRID),
}


# --------------------------------------------------------------------------- running a row

def _env(faults: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("APL_IN_DOCKER", "APL_DEBUG", "APL_DATA_DIR")}
    return dict(env, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONPATH=str(ROOT), PYTHON=sys.executable,
                **faults)


def _argv(row: Mistake, scene: dict, middle: tuple) -> list[str]:
    args = [a.format(**scene) for a in row.command + middle + row.tail]
    if args[0] == "reproduce.sh":
        return ["bash", str(ROOT / "reproduce.sh"), *args[1:]]
    entry = [str(HOOKS)] if row.faults else ["-m", "apl"]
    return [sys.executable, *entry, *args]


def _files(*roots: Path) -> dict[Path, str]:
    """Every file under ``roots`` (lock files aside) and the SHA-256 of its bytes."""
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for root in roots if root.exists()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name not in LOCK_FILES}


def _one_line(stderr: str, line: str) -> str:
    """The one line ``apl: <line>: ...`` of ``stderr``, beside the grid's progress and the hooks' lines."""
    assert "Traceback" not in stderr, stderr
    said = [s for s in stderr.splitlines() if s.strip() and not s.startswith(("[grid] ", "fault: "))]
    assert len(said) == 1 and said[0].startswith(f"apl: {line}: "), stderr
    return said[0]


def _out_of(args: list[str], flag: str) -> Path:
    return Path(args[len(args) - 1 - args[::-1].index(flag) + 1])


def _rerun(row: Mistake, scene: dict, refs) -> None:
    """The command with the mistake removed (and the row's way out), in this process with one thread as the
    subprocesses: it succeeds, and its record is the undisturbed run's."""
    if row.command[0] == "reproduce.sh":  # bash: a subprocess, with OMP_NUM_THREADS=1
        proc = subprocess.run(_argv(row, scene, row.fix), env=_env({}), capture_output=True, text=True,
                              timeout=600, cwd=scene["scene"])
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert_same_records(Path(scene["scene"]) / "repro" / "runs" / "quick", refs.grid)
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if row.fix == ("--rerun-the-grid-first",):  # the way out the report names: the grid sets it aside
            assert main([a.format(**scene) for a in GRID]) == 0
            fix = ()
        else:
            fix = row.fix
        args = [a.format(**scene) for a in row.command + fix]
        assert main(args) == 0
    finally:
        torch.set_num_threads(threads)
    if row.command[0] == "train":
        got = json.loads((_out_of(args, "--out") / "result.json").read_text())
        assert comparable_record(got) == comparable_record(json.loads((refs.train / "result.json").read_text()))
    else:
        assert_same_records(Path(scene["grid"]), refs.grid)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """The generated CIFAR-10 every row trains on (50 training, 20 test images); no row changes it."""
    return write_cifar10_folder(tmp_path_factory.mktemp("misuse") / "data", n_train=50, n_test=20, seed=0)


@pytest.fixture(scope="module")
def refs(data, tmp_path_factory):
    """The undisturbed train run and grid, in this process with one thread."""
    root = tmp_path_factory.mktemp("undisturbed")
    scene = {"data": str(data), "out": str(root / "run"), "grid": str(root / "grid")}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([a.format(**scene) for a in TRAIN]) == 0
        assert main([a.format(**scene) for a in GRID]) == 0
    finally:
        torch.set_num_threads(threads)
    (grid_run,) = (root / "grid" / "runs").iterdir()
    return SimpleNamespace(train=root / "run", grid=root / "grid", grid_run=grid_run.name)


@pytest.mark.parametrize("name", list(MISTAKES))
def test_a_mistake_ends_in_one_line_and_loses_nothing(name, data, refs, tmp_path):
    row = MISTAKES[name]
    scene = {"data": str(data), "scene": str(tmp_path), "out": str(tmp_path / "run"), "grid": str(tmp_path / "grid"),
             "figures": str(tmp_path / "figures")}
    teardown = row.setup(scene, refs) if row.setup is not None else None
    before = _files(tmp_path, data)
    faults = {k: v.format(**scene) for k, v in row.faults.items()}
    try:
        if row.during is None:
            proc = subprocess.run(_argv(row, scene, row.mistake), env=_env(faults), capture_output=True, text=True,
                                  timeout=300, cwd=tmp_path)
            status, stderr = proc.returncode, proc.stderr
        else:
            popen = subprocess.Popen(_argv(row, scene, row.mistake), env=_env(faults), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, cwd=tmp_path)
            row.during(popen, scene)
            stderr = popen.communicate(timeout=120)[1]
            status = popen.returncode
    finally:
        if callable(teardown):
            teardown()

    assert status == row.status, stderr[-3000:]
    assert row.says.format(**scene) in _one_line(stderr, row.line)
    after = _files(tmp_path, data)
    may_change = [str(tmp_path / pattern) for pattern in row.writes or ()]
    for path, digest in before.items():  # nothing already written was lost or changed
        if not any(fnmatch.fnmatch(str(path), pattern) for pattern in may_change):
            assert after.get(path) == digest, f"{path} was lost or changed"
    if row.writes is not None:  # and nothing but what the row expects was written
        new = [p for p in after if p not in before and not any(fnmatch.fnmatch(str(p), g) for g in may_change)]
        assert new == [], new
    if row.check is not None:
        row.check(scene, stderr)

    _rerun(row, scene, refs)


def test_the_help_and_the_docs_list_every_status_the_table_expects():
    proc = subprocess.run([sys.executable, "-m", "apl", "--help"], env=_env({}), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    listed = proc.stdout.split("exit statuses:")[1]
    docs = (ROOT / "docs" / "reproducing.md").read_text()
    for status, meaning in STATUS_TABLE:
        assert f"  {status} " in listed and meaning.split()[0] in listed
        assert f"\n| {status} | " in docs, status  # the "What survives what" table
    documented = {int(s) for status, _ in STATUS_TABLE for s in status.split(", ")}
    assert {row.status for row in MISTAKES.values()} <= documented


@pytest.mark.parametrize("how", [("--debug",), ()], ids=["--debug", "APL_DEBUG=1"])
def test_a_traceback_only_when_asked_for(how, data, tmp_path, capsys, monkeypatch):
    """The same mistake, its status unchanged, and the traceback above the one line."""
    if not how:
        monkeypatch.setenv("APL_DEBUG", "1")
    scene = {"data": str(data), "out": str(tmp_path / "run")}
    assert main([*how, *(a.format(**scene) for a in TRAIN), "--noise", "1.5"]) == USAGE
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and err.rstrip().splitlines()[-1].startswith("apl: error: ")
    monkeypatch.delenv("APL_DEBUG", raising=False)
    assert main([*(a.format(**scene) for a in TRAIN), "--noise", "1.5"]) == USAGE
    assert "Traceback" not in capsys.readouterr().err
