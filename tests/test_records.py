"""The JSON records (apl.records, apl.jsonio): strict atomic writes, finished-run lookup, the manifest."""
from __future__ import annotations

import json
import math
import subprocess
import threading
from pathlib import Path

import pytest

import apl.jsonio
from apl.config import TrainConfig
from apl.jsonio import git_state, jsonable, save_json, save_text
from apl.records import (
    MANIFEST_FILE,
    RESULT_FILE,
    Manifest,
    finished_result,
    load_manifest,
    number_text,
    read_number,
    run_summary,
)
from apl.runlock import MANIFEST_LOCK_FILE


def test_non_finite_numbers_are_written_as_null_and_read_back_as_nan(tmp_path):
    obj = {"a": [1.0, float("nan"), (float("inf"), 2)], "b": {"c": -float("inf")}, "d": "x"}
    assert jsonable(obj) == {"a": [1.0, None, [None, 2]], "b": {"c": None}, "d": "x"}
    save_json(tmp_path / "r.json", jsonable(obj))
    assert json.loads((tmp_path / "r.json").read_text())["b"] == {"c": None}
    assert not (tmp_path / "r.json.tmp").exists()
    with pytest.raises(ValueError):
        save_json(tmp_path / "bad.json", obj)  # strict JSON: NaN is refused, not written
    assert math.isnan(read_number(None)) and read_number(3) == 3.0
    assert number_text(None) == "nan" and number_text(1.23456, 2) == "1.23"


def test_save_text_replaces_the_file_whole_or_leaves_it_as_it_was(tmp_path):
    path = tmp_path / "README.md"
    save_text(path, "first\n")
    save_text(path, "second ü\n")
    assert path.read_text(encoding="utf-8") == "second ü\n" and not (tmp_path / "README.md.tmp").exists()
    with pytest.raises(OSError, match=r"cannot write .*missing.*it is as it was before"):
        save_text(tmp_path / "missing" / "x.md", "text")  # its folder does not exist


def test_git_state_names_this_checkout_or_the_build_argument(tmp_path, monkeypatch):
    here = subprocess.run(["git", "-C", str(Path(__file__).parent), "rev-parse", "HEAD"], capture_output=True,
                          text=True)
    if here.returncode != 0:
        pytest.skip("not run from a git checkout")
    commit, dirty = git_state()
    assert commit == here.stdout.strip() and isinstance(dirty, bool)
    monkeypatch.setattr(apl.jsonio, "_CHECKOUT", tmp_path)  # an installed copy: no checkout around it
    monkeypatch.setenv("APL_GIT_COMMIT", "abc123")
    assert git_state() == ("abc123", None)


def test_finished_result_needs_the_same_config(tmp_path):
    cfg = TrainConfig.paper(loss="nce", noise=0.2, epochs=1)
    assert finished_result(tmp_path, cfg) is None  # no result
    (tmp_path / RESULT_FILE).write_text("{not json")
    assert finished_result(tmp_path, cfg) is None
    result = {"config": TrainConfig.paper(loss="nce", noise=0.2, epochs=1, device="cpu").to_dict()}
    (tmp_path / RESULT_FILE).write_text(json.dumps(result))
    assert finished_result(tmp_path, cfg) == result  # where it ran does not matter
    assert finished_result(tmp_path, TrainConfig.paper(loss="nce", noise=0.4, epochs=1)) is None


def test_manifest_keeps_runs_and_invocations_across_restarts(tmp_path):
    first = Manifest(tmp_path, fresh=False)
    first.start(command="c1", started_at="t1", preset="quick")
    first.run("a", status="pending")
    first.run("a", **run_summary({"final_test_acc": 50.0, "device": "cpu"}))
    first.finish()
    data = load_manifest(tmp_path)
    assert data["runs"]["a"]["status"] == "done" and data["runs"]["a"]["final_test_acc"] == 50.0
    assert data["finished_at"] and data["invocations"][0]["command"] == "c1"
    again = Manifest(tmp_path, fresh=False)
    again.start(command="c2", started_at="t2")
    assert [i["command"] for i in load_manifest(tmp_path)["invocations"]] == ["c1", "c2"]
    assert load_manifest(tmp_path)["finished_at"] is None and "a" in load_manifest(tmp_path)["runs"]
    assert Manifest(tmp_path, fresh=True).data == {"runs": {}, "invocations": []}
    (tmp_path / MANIFEST_FILE).write_text("{broken")
    assert Manifest(tmp_path, fresh=False).data["runs"] == {}  # a broken record is started anew
    with pytest.raises(ValueError, match="cannot read manifest"):
        load_manifest(tmp_path)
    assert load_manifest(tmp_path / "none") is None


def test_manifest_writers_sharing_a_folder_keep_each_others_entries(tmp_path):
    """Grids sharing an output folder: each save is a read-modify-write under the folder's manifest
    lock (an flock per open file, so threads here exclude each other as processes do)."""
    def grid(k: int) -> None:
        manifest = Manifest(tmp_path, fresh=False)
        manifest.start(command=f"grid {k}", started_at="t")
        for i in range(15):
            manifest.run(f"run {k}.{i}", status="running")
            manifest.save()
            manifest.run(f"run {k}.{i}", status="done", data_source="synthetic")
            manifest.save()
        manifest.finish(wall_time_s=1.0)

    threads = [threading.Thread(target=grid, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    data = load_manifest(tmp_path)
    assert sorted(data["runs"]) == sorted(f"run {k}.{i}" for k in range(4) for i in range(15))
    assert {r["status"] for r in data["runs"].values()} == {"done"}
    assert sorted(i["command"] for i in data["invocations"]) == [f"grid {k}" for k in range(4)]
    assert all(i["finished_at"] and i["wall_time_s"] == 1.0 for i in data["invocations"])
    assert data["data_source"] == "synthetic" and data["finished_at"]
    assert (tmp_path / MANIFEST_LOCK_FILE).exists() and not (tmp_path / (MANIFEST_FILE + ".tmp")).exists()


def test_a_run_entry_keeps_the_latest_status_and_its_error_only(tmp_path):
    first, second = Manifest(tmp_path, fresh=False), Manifest(tmp_path, fresh=False)
    first.start(command="one", started_at="t1")
    second.start(command="two", started_at="t2")
    first.run("a", status="running")
    first.save()
    second.run("a", status="busy", error="trained by another process")  # while the first trains it
    second.save()
    assert load_manifest(tmp_path)["runs"]["a"] == {"status": "busy", "error": "trained by another process"}
    first.run("a", status="done", final_test_acc=50.0)
    first.save()
    assert load_manifest(tmp_path)["runs"]["a"] == {"status": "done", "final_test_acc": 50.0}  # no stale error
    second.run("a", status="busy", error="trained by another process")  # saved late: does not hide the result
    second.save()
    assert load_manifest(tmp_path)["runs"]["a"]["status"] == "done"
    assert [i["command"] for i in load_manifest(tmp_path)["invocations"]] == ["one", "two"]
    Manifest(tmp_path, fresh=True).save()  # a fresh grid starts the file anew
    assert load_manifest(tmp_path)["runs"] == {}
