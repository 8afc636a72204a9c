"""reproduce.sh end to end (quick preset, scaled down, on generated data) and its option checks."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from apl.data import write_cifar10_folder
from apl.presets import GRID_LOSSES, GRID_VARIANTS

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "reproduce.sh"
# The quick preset shrunk to seconds: tiny subsets, one epoch, two noise rates, a tiny net.
SHRINK = ["--", "--noise", "0.0", "0.6", "--epochs", "1", "--set", "train_subset=40",
          "--set", "test_subset=20", "--set", "width=0.0625", "--set", "batch_size=20",
          "--no-progress"]


def _env(**extra) -> dict:
    # PYTHON: the interpreter running the tests already has apl and torch, so reproduce.sh
    # must use it and never set an environment up.
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHON=sys.executable,
                **extra)


def test_quick_reproduction_writes_runs_tables_and_figures(tmp_path):
    write_cifar10_folder(tmp_path / "data", n_train=100, n_test=40, seed=0)
    # Relative paths are the caller's: run from tmp_path with relative --data-dir/--out.
    proc = subprocess.run(["bash", str(SCRIPT), "--quick", "--data-dir", "data", "--out", "o",
                           "--devices", "cpu,cpu", *SHRINK], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "setting up the environment" not in proc.stdout
    runs, figures = tmp_path / "o" / "runs" / "quick", tmp_path / "o" / "paper_figures" / "quick"
    manifest = json.loads((runs / "manifest.json").read_text())
    assert manifest["preset"] == "quick" and manifest["overrides"]["epochs"] == 1
    expected = (len(GRID_LOSSES) * len(GRID_VARIANTS) - 1) * 2  # per noise rate: CE once per protocol
    assert len(list((runs / "runs").glob("*/result.json"))) == len(manifest["runs"]) == expected
    for variant in GRID_VARIANTS:
        for ext in ("md", "csv", "tex"):
            assert (figures / f"table1_{variant}.{ext}").stat().st_size > 500
        for n in (1, 2, 3):
            for ext in ("png", "pdf"):
                assert (figures / f"figure{n}_{variant}.{ext}").stat().st_size > 5_000
    md = (figures / "table1_paper.md").read_text()
    assert "QUICK PRESET" in md and "synthetic" in md
    assert "## Where the paper's text and its code differ" in (figures / "README.md").read_text()
    assert "README.md" in proc.stdout and (figures / "README.md").exists()


def test_script_rejects_bad_options_before_any_work(tmp_path):
    for args, message in [(["--preset", "fast"], "unknown preset"), (["--data-dir"], "needs a value")]:
        proc = subprocess.run(["bash", str(SCRIPT), *args], cwd=tmp_path, env=_env(),
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and message in proc.stderr
    assert list(tmp_path.iterdir()) == []
    usage = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert usage.returncode == 0 and "--quick" in usage.stdout and "--fresh" in usage.stdout
    assert all(f"--preset {name}" in usage.stdout for name in ("author", "ma2020"))
