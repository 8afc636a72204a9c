"""The JSON records (apl.records): strict atomic writes, finished-run lookup, the manifest."""
from __future__ import annotations

import json
import math

import pytest

from apl.config import TrainConfig
from apl.records import (
    MANIFEST_FILE,
    RESULT_FILE,
    Manifest,
    finished_result,
    jsonable,
    load_manifest,
    number_text,
    read_number,
    run_summary,
    save_json,
)


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
