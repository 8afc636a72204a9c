"""The grid (apl.grid, apl.runner): its plan, presets, manifest, resume after SIGKILL, workers."""
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
from conftest import assert_same_records, run_results

from apl.config import TrainConfig
from apl.grid import run_grid
from apl.plan import plan_grid, preset_config
from apl.presets import GRID_LOSSES, GRID_NOISE, GRID_VARIANTS, PRESETS, is_variant_free
from apl.records import load_manifest

TINY = {"epochs": 3, "train_subset": 200, "test_subset": 50, "width": 0.0625, "batch_size": 50}
TINY_ARGS = ["--epochs", "3", "--set", "train_subset=200", "--set", "test_subset=50",
             "--set", "width=0.0625", "--set", "batch_size=50"]
SUBSET = dict(losses=["nce", "ce"], noise=[0.2], variants=["paper"])
SUBSET_ARGS = ["--losses", "nce", "ce", "--noise", "0.2", "--variants", "paper"]
# Per-epoch timings and timestamps differ between two runs of the same config.


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def _grid_cmd(data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "apl", "grid", "--preset", "quick", "--data-dir", str(data),
            "--out", str(out), "--no-progress", *SUBSET_ARGS, *TINY_ARGS, *extra]


@pytest.fixture(scope="module")
def reference(cifar_dir, tmp_path_factory):
    """The tiny grid, run once uninterrupted in this process with 1 thread, as the subprocess
    grids run (OMP_NUM_THREADS=1): a float sum over another thread count rounds differently."""
    return _reference_grid(cifar_dir, tmp_path_factory.mktemp("reference"), 1)


def _reference_grid(cifar_dir, out, threads):
    """The tiny grid run in this process with ``threads`` threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        run_grid("quick", cifar_dir, out, devices="cpu", overrides=TINY, progress=False, **SUBSET)
    finally:
        torch.set_num_threads(before)
    return out


# --------------------------------------------------------------------------- plan

def test_full_grid_has_every_cell_once_and_ce_once_per_protocol():
    plan = plan_grid("quick")
    # three forms; CE once per protocol and noise rate: the paper and ma2020 forms share the paper protocol's
    per_seed = len(GRID_LOSSES) * len(GRID_NOISE) * len(GRID_VARIANTS) - len(GRID_NOISE)
    assert len(plan) == per_seed
    names = [c.run_name() for c in plan]
    assert len(set(names)) == len(names)
    cells = {(c.loss, c.variant, c.noise) for c in plan}
    for loss in GRID_LOSSES:
        for noise in GRID_NOISE:
            variants = {v for (name, v, n) in cells if name == loss and n == noise}
            assert variants == ({"author", "paper"} if loss == "ce" else set(GRID_VARIANTS))
    # the author form's CE trains as the author's code, the shared one as the paper's protocol
    ce = {c.variant: c for c in plan if c.loss == "ce" and c.noise == 0.6}
    assert (ce["author"].init, ce["author"].noise_type) == ("torch", "author_symmetric")
    assert (ce["paper"].init, ce["paper"].noise_type) == ("kaiming", "symmetric")
    assert is_variant_free("ce") and not any(is_variant_free(name) for name in GRID_LOSSES if name != "ce")
    assert len(plan_grid("quick", seeds=3)) == 3 * per_seed
    assert [c.seed for c in plan_grid("quick", seeds=2)] == sorted(c.seed for c in plan_grid("quick", seeds=2))


def test_presets_follow_the_protocols():
    for variant, protocol in PRESETS["quick"].forms:
        quick = preset_config("quick", loss="nce+rce", variant=variant, noise=0.4, seed=1)
        full = TrainConfig.from_protocol(protocol, loss="nce+rce", variant=variant, noise=0.4, seed=1)
        for key, value in full.to_dict().items():
            assert getattr(quick, key) == PRESETS["quick"].overrides.get(key, value), (variant, key)
    quick = preset_config("quick", loss="nce+rce", variant="paper", noise=0.4, seed=1)
    assert quick.loss_params == {"lam": 0.6} and quick.optimizer == "adam" and quick.lr == 1e-3
    full = preset_config("paper", loss="nce", variant="ma2020", noise=0.2, seed=0)
    assert full == TrainConfig.paper(loss="nce", variant="ma2020", noise=0.2, seed=0)
    ma = plan_grid("ma2020")
    assert {c.variant for c in ma} == {"ma2020"} and {c.seed for c in ma} == {0, 1, 2}
    assert all(c.optimizer == "sgd" and c.epochs == 120 and c.noise_type == "ma2020_symmetric"
               for c in ma)
    overridden = preset_config("quick", loss="ce", variant="paper", noise=0.0, seed=0,
                               overrides={"epochs": 1, "amp": "bf16"})
    assert overridden.epochs == 1 and overridden.amp == "bf16"


def test_plan_restricts_and_rejects_bad_values():
    plan = plan_grid("paper", losses=["nce+mae"], noise=[0.6, 0.2], variants=["ma2020"], seeds=2)
    assert [(c.loss, c.variant, c.noise, c.seed) for c in plan] == [
        ("nce+mae", "ma2020", 0.2, 0), ("nce+mae", "ma2020", 0.6, 0),
        ("nce+mae", "ma2020", 0.2, 1), ("nce+mae", "ma2020", 0.6, 1)]
    # CE keeps one run name whatever variants are selected, so grids share it.
    assert plan_grid("paper", losses=["ce"], variants=["ma2020"])[0].run_name() == \
        plan_grid("paper", losses=["ce"], variants=["paper"])[0].run_name()
    with pytest.raises(ValueError, match="unknown variant"):
        plan_grid("author", variants=["paper"])  # not a form of the author preset
    for kwargs, message in [(dict(losses=["gce"]), "unknown loss"), (dict(noise=[0.3]), "unknown noise"),
                            (dict(variants=["other"]), "unknown variant"), (dict(seeds=0), "seeds must be"),
                            (dict(losses=[]), "no loss"), (dict(overrides={"seed": 3}), "cannot be overridden"),
                            (dict(overrides={"epochs": 0}), "epochs must be")]:
        with pytest.raises(ValueError, match=message):
            plan_grid("quick", **kwargs)
    with pytest.raises(ValueError, match="unknown preset"):
        plan_grid("fast")


# --------------------------------------------------------------------------- running

def test_manifest_records_runs_and_a_rerun_skips_finished_runs(reference, cifar_dir):
    manifest = json.loads((reference / "manifest.json").read_text())
    assert manifest["preset"] == "quick" and manifest["overrides"] == TINY
    assert manifest["torch_version"] and manifest["devices"][0]["device"] == "cpu"
    assert manifest["data_source"].startswith("synthetic") and manifest["finished_at"]
    results = run_results(reference)
    assert set(manifest["runs"]) == set(results) and len(results) == 2
    for name, entry in manifest["runs"].items():
        assert entry["status"] == "done" and entry["config"]["loss"] == results[name]["loss"]
        assert entry["wall_time_s"] == results[name]["wall_time_s"] > 0
    mtimes = {p: p.stat().st_mtime_ns for p in (reference / "runs").glob("*/result.json")}
    run_grid("quick", cifar_dir, reference, devices="cpu", overrides=TINY, progress=False, **SUBSET)
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    assert len(json.loads((reference / "manifest.json").read_text())["invocations"]) == 2


def test_a_second_grid_on_the_folder_adds_to_the_manifest_and_overwrites_nothing(reference, cifar_dir, tmp_path):
    """Another subset run into the same folder: the top-level lists hold both grids' values, the first
    grid's runs stay, started_at is the first invocation's and finished_at the latest one's."""
    out = tmp_path / "grid"
    shutil.copytree(reference, out)
    run_grid("quick", cifar_dir, out, devices="cpu", overrides=TINY, progress=False, losses=["nce"], noise=[0.4],
             variants=["paper"])
    manifest = load_manifest(out)
    assert sorted(manifest["losses"]) == ["ce", "nce"] and manifest["noise"] == [0.2, 0.4]
    assert len(manifest["runs"]) == 3 and {e["status"] for e in manifest["runs"].values()} == {"done"}
    first, second = manifest["invocations"][-2:]
    assert manifest["started_at"] == manifest["invocations"][0]["started_at"] <= second["started_at"]
    assert manifest["finished_at"] == second["finished_at"] and first["finished_at"]


def test_fresh_retrains_and_a_failed_run_is_reported(cifar_dir, tmp_path):
    one = dict(losses=["ce"], noise=[0.2], variants=["paper"])
    run_grid("quick", cifar_dir, tmp_path, devices="cpu", overrides=TINY, progress=False, **one)
    (result,) = (tmp_path / "runs").glob("*/result.json")
    before = result.stat().st_mtime_ns
    run_grid("quick", cifar_dir, tmp_path, devices="cpu", overrides=TINY, progress=False, fresh=True, **one)
    assert result.stat().st_mtime_ns != before
    # A run folder holding another config's result: that run fails, the grid says which.
    other = json.loads(result.read_text())
    other["config"]["lr"] = 0.5
    result.write_text(json.dumps(other))
    with pytest.raises(RuntimeError, match=result.parent.name):
        run_grid("quick", cifar_dir, tmp_path, devices="cpu", overrides=TINY, progress=False, **one)
    entry = json.loads((tmp_path / "manifest.json").read_text())["runs"][result.parent.name]
    assert entry["status"] == "failed" and "different config" in entry["error"]


def test_author_preset_run_reads_back_the_authors_protocol(cifar_dir, tmp_path):
    """A tiny run of --preset author: its run JSON says batch 64, gamma 2, lam 0.4, PyTorch's
    default init, Normalize(0.5, 0.5), the author's noise rule (exactly int(eta * N) flips, seed 42)."""
    tiny = {k: v for k, v in TINY.items() if k != "batch_size"}
    manifest = run_grid("author", cifar_dir, tmp_path, devices="cpu", overrides={**tiny, "epochs": 1},
                        losses=["nfl+rce"], noise=[0.4], progress=False)
    assert manifest["forms"] == [["author", "author"]]
    (path,) = (tmp_path / "runs").glob("*/result.json")
    result = json.loads(path.read_text())
    config = TrainConfig.from_dict(result["config"])
    assert (config.batch_size, config.init, config.normalize, config.variant) == (64, "torch", "half", "author")
    assert config.loss_params == {"gamma": 2.0, "lam": 0.4} and config.model == "paper"
    assert (config.optimizer, config.lr, config.weight_decay, config.scheduler, config.augment) == \
        ("adam", 1e-3, 0.0, "none", False)
    noise = result["noise_record"]
    assert noise["kind"] == config.noise_type == "author_symmetric" and noise["seed"] == 42
    assert noise["realised_rate"] == int(0.4 * result["num_train"]) / result["num_train"]
    assert path.parent.name == result["run_name"] == config.run_name()


def test_sigkilled_grid_resumes_to_the_uninterrupted_result(reference, cifar_dir, tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen(_grid_cmd(cifar_dir, out, "--devices", "cpu"), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    killed_in = None
    while time.monotonic() < deadline and proc.poll() is None:
        ckpts = list((out / "runs").glob("*/checkpoint.pt")) if (out / "runs").is_dir() else []
        if ckpts:
            proc.send_signal(signal.SIGKILL)
            killed_in = ckpts[0].parent
            break
        time.sleep(0.005)
    proc.wait(timeout=30)
    assert killed_in is not None, "the grid finished before a checkpoint was seen: " + \
        proc.stderr.read().decode()[-2000:]
    assert proc.returncode == -signal.SIGKILL
    assert not (killed_in / "result.json").exists()  # really interrupted mid-run
    # The file says what the killed grid last wrote; read, a run whose lock is free is no longer running.
    assert json.loads((out / "manifest.json").read_text())["runs"][killed_in.name]["status"] == "running"
    entry = load_manifest(out)["runs"][killed_in.name]
    assert entry["status"] == "interrupted" and "killed" in entry["error"]

    rerun = subprocess.run(_grid_cmd(cifar_dir, out, "--devices", "cpu"), env=_env(),
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    got = assert_same_records(out, reference)
    assert all([h["epoch"] for h in r["history"]] == [1, 2, 3] for r in got.values())  # no duplicate rows
    assert got[killed_in.name]["resumed_at_epochs"]  # it did resume, not restart
    manifest = json.loads((out / "manifest.json").read_text())
    assert all(r["status"] == "done" for r in manifest["runs"].values())
    assert len(manifest["invocations"]) == 2


def test_two_cpu_workers_give_the_sequential_results(reference, cifar_dir, tmp_path):
    out = tmp_path / "grid"
    proc = subprocess.run(_grid_cmd(cifar_dir, out, "--devices", "cpu,cpu"), env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # each of two CPU workers takes half the cores (apl.devices.parse_devices): compare with a
    # sequential grid at that thread count, since another one rounds its float sums differently
    threads = max(1, (os.cpu_count() or 1) // 2)
    assert_same_records(out, reference if threads == 1 else _reference_grid(cifar_dir, tmp_path / "ref", threads))
    manifest = json.loads((out / "manifest.json").read_text())
    assert [d["device"] for d in manifest["devices"]] == ["cpu", "cpu"]
    assert "projected time" in proc.stderr
