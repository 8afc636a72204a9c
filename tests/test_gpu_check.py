"""The GPU check's parts that need no GPU: options, bandwidth arithmetic, the peak table, the
grid projection, the report writer, the launch-count comparison, the no-GPU exit, the shell
scripts' syntax and setup_env.sh's choice of CUDA architectures."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import requires_fused

import apl.losses.fused as fused
from apl.plan import plan_grid
from benchmarks import bench_losses, gpu_check, gpu_epochs, gpu_measures, gpu_report, gpu_steps, gpu_workers
from benchmarks.gpu_measures import ROW_GROUPS

ROOT = Path(__file__).resolve().parent.parent
#: How users (and scripts/gpu_check.sh) run the check: from the checkout's root.
CHECK = [sys.executable, "-m", "benchmarks.gpu_check"]


# --------------------------------------------------------------------------- options

def test_defaults_and_quick():
    args = gpu_check.parse_args([])
    assert args.steps == gpu_measures.STEPS and not args.quick
    assert (args.train_subset, args.shared_runs) == (10240, 4)
    assert args.train_subset % 128 == 0  # one batch shape for torch.compile
    assert args.bench_timeout == gpu_measures.TIME_BOXES["bench"]
    quick = gpu_check.parse_args(["--quick"])
    assert (quick.train_subset, quick.shared_runs) == (5120, 2)


def test_steps_and_skip_tests():
    assert gpu_check.parse_args(["--steps", "bench,launches"]).steps == ("bench", "launches")
    assert gpu_check.parse_args(["--skip-tests"]).steps == ("bench", "launches", "epochs")
    assert gpu_check.parse_args(["--steps", "tests,epochs", "--skip-tests"]).steps == ("epochs",)
    explicit = gpu_check.parse_args(["--train-subset", "2048", "--shared-runs", "3", "--quick", "--out", "x"])
    assert (explicit.train_subset, explicit.shared_runs, explicit.out) == (2048, 3, "x")


@pytest.mark.parametrize("argv, message", [
    (["--steps", "bench,nonsense"], "unknown step(s) nonsense"),
    (["--steps", ","], "unknown step(s) (none given)"),
    (["--steps", "tests", "--skip-tests"], "leaves no step"),
    (["--bench-timeout", "0"], "must be > 0"),
    (["--train-subset", "many"], "not a number"),
    (["--epoch-loss", "hinge"], "--epoch-loss must be one of"),
])
def test_bad_options_exit_2_with_the_reason(capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        gpu_check.parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_help_names_every_step_and_option():
    proc = subprocess.run(CHECK + ["--help"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    for word in ("--out", "--steps", "--quick", "--skip-tests", "--data-dir", "--peak-gbps",
                 "tests,bench,launches,epochs", "--build-rc"):
        assert word in proc.stdout
    assert "--worker" not in proc.stdout  # the subprocess interface stays out of the help


# --------------------------------------------------------------------------- arithmetic

@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 3350),
    ("NVIDIA H100 PCIe", 2000),
    ("NVIDIA H100 NVL", 3900),
    ("NVIDIA H200", 4800),
    ("NVIDIA A100-SXM4-40GB", 1555),
    ("NVIDIA A100-PCIE-40GB", 1555),
    ("NVIDIA A100-SXM4-80GB", 2039),
    ("NVIDIA A100 80GB PCIe", 1935),
    ("NVIDIA L4", 300),
    ("NVIDIA L40S", 864),
    ("NVIDIA A10G", 600),
    ("NVIDIA GH200 480GB", None),  # two memory versions under one name
    ("NVIDIA GeForce GTX 1080", None),
    ("", None),
])
def test_peak_bandwidth_lookup(name, peak):
    assert gpu_measures.peak_bandwidth_gbps(name) == peak


def test_bytes_gbps_and_fraction_of_peak():
    # 4096 x 32000 float32: logits read twice, gradient written once, int64 targets.
    nbytes = gpu_measures.loss_bytes(4096, 32000, 4)
    assert nbytes == 3 * 4096 * 32000 * 4 + 4096 * 8
    assert gpu_measures.loss_bytes(4096, 32000, 2) == 3 * 4096 * 32000 * 2 + 4096 * 8
    gbps = gpu_measures.achieved_gbps(nbytes, 1e-3)
    assert gbps == pytest.approx(nbytes / 1e-3 / 1e9)
    assert gpu_measures.fraction_of_peak(gbps, 3350) == pytest.approx(gbps / 3350)
    assert gpu_measures.fraction_of_peak(gbps, None) is None
    assert gpu_measures.achieved_gbps(nbytes, None) is None and gpu_measures.achieved_gbps(nbytes, 0.0) is None


def test_full_epoch_estimate_scales_the_second_epoch():
    history = [{"train_time_s": 9.0, "epoch_time_s": 12.0}, {"train_time_s": 2.0, "epoch_time_s": 2.5}]
    est = gpu_measures.full_epoch_estimate(history, num_train=10000, num_test=5000)
    assert est["full_epoch_s"] == pytest.approx(2.0 * 5 + 0.5 * 2)
    assert est["warmup_s"] == pytest.approx(9.5)
    assert est["train_images_per_s"] == pytest.approx(5000)
    with pytest.raises(ValueError, match="two epochs"):
        gpu_measures.full_epoch_estimate(history[:1], 10000, 5000)


def test_grid_projection():
    assert gpu_measures.project_grid(10.0, 5.0, runs=75, epochs=30) == pytest.approx(75 * (5 + 300))
    # Four at a time: ceil(75 / 4) = 19 rounds, each as long as one (slower) shared run.
    assert gpu_measures.project_grid(20.0, 5.0, runs=75, epochs=30, concurrent=4) == pytest.approx(19 * (5 + 600))
    with pytest.raises(ValueError):
        gpu_measures.project_grid(1.0, 0.0, runs=0, epochs=30)


def test_paper_grid_size_comes_from_the_grid_plan():
    runs, epochs = gpu_steps.paper_grid_size()
    assert (runs, epochs) == (len(plan_grid("paper")), plan_grid("paper")[0].epochs)
    assert epochs == 30


def test_projection_uses_each_timed_mode():
    step = {"modes": [{"mode": "fp32", "full_epoch_s": 4.0, "warmup_s": 2.0},
                      {"mode": "fp32 compile", "error": "RuntimeError: x"}],
            "shared": {"mode": "fp32", "runs": 4, "full_epoch_s": 8.0, "warmup_s": 3.0}}
    proj = gpu_steps.projection(step)
    runs, _ = gpu_steps.paper_grid_size()
    assert [(r["mode"], r["concurrent"]) for r in proj["rows"]] == [("fp32", 1), ("fp32", 4)]
    assert proj["rows"][0]["seconds"] == pytest.approx(runs * (2 + 30 * 4))
    assert proj["rows"][1]["seconds"] == pytest.approx(-(-runs // 4) * (3 + 30 * 8))


def test_pytest_summary_and_skipped_gpu_tests():
    out = ("....s\n=== short test summary info ===\n"
           "SKIPPED [4] tests/test_fused.py:181: needs a GPU and the extension built with its CUDA kernels\n"
           "SKIPPED [2] tests/test_fused.py:190: needs CUDA: the extension has no CUDA kernels\n"
           "SKIPPED [2] tests/test_fused.py:190: needs two GPUs: 1 visible\n"
           "SKIPPED [1] tests/test_x.py:3: hypothesis not installed\n"
           "3 failed, 40 passed, 9 skipped, 120 deselected, 1 error in 12.3s\n")
    s = gpu_steps.parse_pytest_summary(out)
    assert s["counts"] == {"failed": 3, "passed": 40, "skipped": 9, "deselected": 120, "errors": 1}
    # A one-GPU machine skips the two-GPU tests legitimately; the others mean CUDA never ran.
    assert gpu_steps.cuda_tests_skipped(s["skip_reasons"]) == [
        "tests/test_fused.py:181: needs a GPU and the extension built with its CUDA kernels",
        "tests/test_fused.py:190: needs CUDA: the extension has no CUDA kernels"]
    assert gpu_steps.parse_pytest_summary("no tests ran in 0.01s\n")["counts"] == {}


def test_slug():
    assert gpu_check.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert gpu_check.slug("  /// ") == "gpu"


# --------------------------------------------------------------------------- report

def fabricated_results():
    return {
        "environment": {"date": "2026-12-01T10:00:00+00:00", "gpu_name": "NVIDIA H100 80GB HBM3",
                        "compute_capability": "9.0", "gpu_memory_gib": 79.6, "sm_count": 132,
                        "driver_version": "580.65.06", "peak_bandwidth_gbps": 3350,
                        "torch_version": "2.14.1+cu130", "cuda_version": "13.0", "cudnn_version": 91000,
                        "git_commit": "abc123", "git_dirty": True, "python_version": "3.11.7",
                        "platform": "Linux", "command": "gpu_check.py --quick"},
        "steps": {
            "build": {"status": "ok", "rc": 0, "seconds": 95.0, "archs": "9.0+PTX", "log": "logs/build.log"},
            "tests": {"status": "failed", "rc": 1, "seconds": 80.0, "command": "pytest -q tests -k 'cuda'",
                      "counts": {"failed": 1, "passed": 99}, "error": "pytest exit 1: 1 failed, 99 passed",
                      "log": "logs/tests.log", "cuda_skips": []},
            "bench": {"status": "ok", "seconds": 60.0, "rows": [
                {"loss": "CE", "dtype": "float32", "n": 4096, "c": 32000,
                 "seconds": {"fused": 0.5e-3, "reference": 2e-3, "compiled": 1e-3, "F.cross_entropy": 0.6e-3},
                 "gbps": {"fused": 3145.8}, "fraction_of_peak": {"fused": 0.939}, "skipped": {}},
                {"loss": "NFL (paper)", "dtype": "bfloat16", "n": 4096, "c": 128000,
                 "seconds": {"fused": 2e-3}, "gbps": {"fused": 1572.9, "reference": float("nan")},
                 "fraction_of_peak": {"fused": 0.47}, "skipped": {"reference": "out of memory"}}],
                "segmentation": [
                    {"loss": "CE", "shape": [4, 21, 256, 256],
                     "seconds": {"fused": 2e-3, "fused on rows": 1e-3, "F.cross_entropy": 4e-3}, "skipped": {}},
                    {"loss": "NCE+RCE (ma2020)", "shape": [4, 21, 256, 256], "seconds": {},
                     "skipped": {"all": "time box"}}],
                "soft": [
                    {"loss": "CE (label_smoothing 0.1)", "shape": [4096, 1000],
                     "seconds": {"fused": 1e-3, "reference": 3e-3, "F.cross_entropy": 2e-3}, "skipped": {}},
                    {"loss": "RCE (probabilities)", "shape": [4096, 1000], "seconds": {},
                     "skipped": {"all": "time box"}}]},
            "launches": {"status": "ok", "seconds": 10.0, "shape": [512, 1000], "rows": [
                {"loss": "nce+rce (ma2020)", "reduction": "mean", "forward": 2, "backward": 1, "copies": 1,
                 "expected": [2, 1], "match": "yes", "reference_forward": 31, "reference_backward": 40},
                {"loss": "ce", "reduction": "none", "forward": 3, "backward": 1, "copies": 0,
                 "expected": None, "match": "n/a"}]},
            "epochs": {"status": "failed", "seconds": 100.0, "error": "shared runs: shared1.log: timed out",
                       "params": {"loss": "nce+rce", "train_subset": 10240, "batch_size": 128},
                       "data_source": "synthetic", "modes": [
                           {"mode": "fp32", "train_images_per_s": 25000.0, "full_epoch_s": 2.25, "warmup_s": 1.5},
                           {"mode": "fp32 compile", "error": "RuntimeError: compile failed"}],
                       "shared": {"runs": 4, "mode": "fp32", "error": "shared1.log: timed out"}},
        },
        "projection": {"runs": 75, "epochs": 30, "rows": [{"mode": "fp32", "concurrent": 1, "seconds": 5175.0}]},
    }


def test_report_writer(tmp_path):
    json_path, md_path = gpu_report.write_report(fabricated_results(), tmp_path / "out")
    data = json.loads(json_path.read_text())  # strict JSON: the NaN became null
    assert data["steps"]["bench"]["rows"][1]["gbps"]["reference"] is None
    assert data["environment"]["gpu_name"] == "NVIDIA H100 80GB HBM3"
    md = md_path.read_text()
    assert md.startswith("# GPU check: NVIDIA H100 80GB HBM3, 2026-12-01T10:00:00+00:00")
    for text in ("580.65.06", "2.14.1+cu130", "abc123 (uncommitted changes)", "3350 GB/s", "9.0+PTX",
                 "1 failed, 99 passed", "3 * N * C * s + 8 * N",
                 "| CE | float32 | 4096 | 32000 | 0.500 | 2.00 | 1.00 | 0.600 | 3146 | 94% | 4.00x | 2.00x | 0.83x "
                 "|  |",
                 "reference: out of memory",
                 "| CE | 4x21x256x256 | 2.00 | 1.00 | 4.00 | 0.50x |  |",
                 "| NCE+RCE (ma2020) | 4x21x256x256 | - | - | - | - | all: time box |",
                 "## Distribution targets: forward + backward, median ms, float32",
                 "| CE (label_smoothing 0.1) | 4096x1000 | 1.00 | 3.00 | 2.00 | 3.00x | 0.50x |  |",
                 "| RCE (probabilities) | 4096x1000 | - | - | - | - | - | all: time box |",
                 "| nce+rce (ma2020) | mean | 2 | 1 | 2 / 1 | yes | 1 | 31 | 40 |",
                 "| ce | none | 3 | 1 | n/a | n/a |",
                 "| fp32 | 25000 | 2.25 | 1.5 |  |",
                 "| fp32 compile | - | - | - | RuntimeError: compile failed |",
                 "4 x fp32 sharing the GPU", "75 runs x 30 epochs", "| fp32 | 1 | 1.44 h |",
                 "- tests: pytest exit 1: 1 failed, 99 passed"):
        assert text in md, text
    summary = md.split("## Summary")[1].split("##")[0]
    assert "| tests | failed | 80 | pytest exit 1: 1 failed, 99 passed |" in summary
    assert "| build | ok | 95 | " in summary


def test_report_of_an_unknown_gpu_with_skipped_steps(tmp_path):
    results = {"environment": {"date": "d", "gpu_name": "Some GPU", "peak_bandwidth_gbps": None},
               "steps": {"build": {"status": "skipped", "note": "not built by this check"},
                         "tests": {"status": "skipped", "note": "not selected"}}}
    _, md_path = gpu_report.write_report(results, tmp_path)
    md = md_path.read_text()
    assert "peak memory bandwidth: unknown" in md
    assert "| tests | skipped | - | not selected |" in md
    assert "## Build" not in md and "## Loss speed" not in md and "## Errors" not in md


@requires_fused
def test_segmentation_rows_time_each_contender():
    """The segmentation timing of the bench step, run on the CPU at a tiny shape (on a GPU it
    runs at gpu_measures.SEGMENTATION_SHAPE)."""
    p = {"segmentation_shape": [2, 5, 4, 4], "segmentation_losses": ["CE", "NCE+RCE (ma2020)"],
         "min_time": 0.0, "max_repeats": 5}
    rows = gpu_workers.segmentation_rows(p, gpu_workers.bench_specs(), "cpu", float("inf"))
    assert [(r["loss"], r["shape"], r["skipped"]) for r in rows] == [
        ("CE", [2, 5, 4, 4], {}), ("NCE+RCE (ma2020)", [2, 5, 4, 4], {})]
    assert set(rows[0]["seconds"]) == {"fused", "F.cross_entropy", "fused on rows"}
    assert set(rows[1]["seconds"]) == {"fused", "fused on rows"}
    assert all(v > 0 for r in rows for v in r["seconds"].values())
    assert gpu_workers.segmentation_rows(p, gpu_workers.bench_specs(), "cpu", 0.0)[0]["skipped"] \
        == {"all": "time box"}


@requires_fused
def test_soft_rows_time_each_contender():
    """The distribution-target timing of the bench step, run on the CPU at a tiny shape (on a GPU
    it runs at gpu_measures.SOFT_SHAPE)."""
    p = {"soft_shape": [8, 5], "min_time": 0.0, "max_repeats": 5}
    soft = bench_losses.SOFT_LOSSES
    rows = gpu_workers.soft_rows(p, "cpu", float("inf"))
    assert [(r["loss"], r["shape"], r["skipped"]) for r in rows] == [(name, [8, 5], {}) for name in soft]
    for r in rows:
        expected = {"fused", "reference"} | ({"F.cross_entropy"} if r["loss"].startswith("CE ") else set())
        assert set(r["seconds"]) == expected, r["loss"]
    assert all(v > 0 for r in rows for v in r["seconds"].values())
    skipped = gpu_workers.soft_rows(p, "cpu", 0.0)
    assert [r["skipped"] for r in skipped] == [{"all": "time box"}] * len(soft)


@requires_fused
def test_batch_step_rows_time_the_row_pass_and_the_step():
    """The batch-step timing of the bench step, run on the CPU at small shapes (on a GPU it runs at
    gpu_measures.BATCH_STEP_SHAPES): each forward timed, the step as the difference of two."""
    p = {"batch_step_shapes": [[64, 10], [5000, 2]], "min_time": 0.0, "max_repeats": 5}
    rows = gpu_workers.batch_step_rows(p, "cpu", float("inf"))
    assert [(r["shape"], r["skipped"]) for r in rows] == [([64, 10], {}), ([5000, 2], {})]
    for r in rows:
        s = r["seconds"]
        assert set(s) == {"CE none", "CE mean", "NCE (paper) mean", "batch step"}
        assert s["batch step"] == s["CE mean"] - s["CE none"] and all(s[k] > 0 for k in ("CE none", "CE mean"))
    assert gpu_workers.batch_step_rows(p, "cpu", 0.0)[0]["skipped"] == {"all": "time box"}


def test_row_group_rows_need_a_gpu_and_report_each_group(tmp_path):
    """Without a GPU the row-group comparison is one skipped row; the report's table has a column per group."""
    rows = gpu_workers.row_group_rows({"row_group_shape": [128, 10]}, "cpu", float("inf"))
    assert rows == [{"loss": "CE", "shape": [128, 10], "seconds": {},
                     "skipped": {"all": "the CUDA row groups need a GPU"}}]
    bench = {"status": "ok", "rows": [], "row_groups": [{"loss": "CE", "shape": [128, 10], "skipped": {},
                                                         "seconds": {label: 1e-4 for label in ROW_GROUPS.values()}}],
             "batch_step": [{"loss": "CE, NCE (paper)", "shape": [262144, 10], "skipped": {},
                             "seconds": {"CE none": 2e-3, "CE mean": 2.5e-3, "batch step": 5e-4,
                                         "NCE (paper) mean": 3e-3}}]}
    _, md_path = gpu_report.write_report({"environment": {}, "steps": {"bench": bench}}, tmp_path)
    md = md_path.read_text()
    assert "## CUDA row groups at small C" in md and "| CE | 128x10 | 0.100 |" in md
    assert "## Batch step: forward alone" in md
    assert "| CE, NCE (paper) | 262144x10 | 2.00 | 2.50 | 0.500 | 3.00 | 0.25x |" in md


# --------------------------------------------------------------------------- launch counts

def test_loss_variants_list_each_distinct_spec_once():
    from apl.losses.spec import LOSS_NAMES

    labels = [label for label, _ in gpu_workers.loss_variants()]
    assert len(labels) == len(set(labels))
    assert "ce" in labels and "ce (paper)" not in labels  # CE is the same in both variants
    assert {"nce (paper)", "nce (ma2020)", "nfl+rce (paper)"} <= set(labels)
    assert {label.split(" ")[0] for label in labels} == set(LOSS_NAMES)


@requires_fused
def test_launch_rows_compare_with_launch_counts(tmp_path, monkeypatch):
    from apl.losses.spec import spec_for

    # The profiler's counting is replaced (no GPU here): the comparison and the table are tested.
    monkeypatch.setattr(gpu_workers, "count_kernels", lambda fn: (fn(), (1, 0))[1])
    monkeypatch.setattr(gpu_workers, "loss_variants", lambda: [("ce", spec_for("ce"))])
    monkeypatch.setattr(fused, "launch_counts", lambda spec, reduction: (1, 1) if reduction == "mean" else (2, 1),
                        raising=False)
    out = tmp_path / "launches.json"
    gpu_workers.worker_launches({"device": "cpu", "shape": [8, 10], "reductions": ["mean", "sum"], "reference": True,
                         "budget_s": 60}, out)
    rows = json.loads(out.read_text())["rows"]
    assert [(r["reduction"], r["forward"], r["backward"], r["expected"], r["match"]) for r in rows] == [
        ("mean", 1, 1, [1, 1], "yes"), ("sum", 1, 1, [2, 1], "NO")]
    assert rows[0]["reference_forward"] == 1 and "reference_forward" not in rows[1]
    monkeypatch.delattr(fused, "launch_counts")
    gpu_workers.worker_launches({"device": "cpu", "shape": [8, 10], "reductions": ["mean"], "reference": False,
                         "budget_s": 60}, out)
    data = json.loads(out.read_text())
    assert not data["launch_counts_available"]
    assert [(r["expected"], r["match"]) for r in data["rows"]] == [(None, "n/a")]


# --------------------------------------------------------------------------- worker processes

LAUNCHES_ON_CPU = {"device": "cpu", "shape": [8, 10], "reductions": ["mean"], "reference": False, "budget_s": 60}


def test_a_worker_step_runs_in_its_own_process_and_reports_back(tmp_path):
    """The parent's side of a step: it starts ``python -m benchmarks.gpu_workers``, waits and reads the
    worker's JSON. The launches worker on the CPU, where the profiler sees no CUDA kernel and says so."""
    (tmp_path / "logs").mkdir()
    st = gpu_steps._run_worker_step("launches", LAUNCHES_ON_CPU, tmp_path, timeout_s=120)
    assert (st["rc"], st["status"], st["log"]) == (0, "failed", "logs/launches.log")
    assert st["error"].startswith("the profiler does not record CUDA kernels here"), st
    saved = json.loads((tmp_path / "logs" / "launches.json").read_text())
    assert saved["error"] == st["error"] and saved["shape"] == [8, 10]


def test_a_worker_past_its_time_box_is_stopped_and_recorded(tmp_path):
    (tmp_path / "logs").mkdir()
    st = gpu_steps._run_worker_step("epochs", {"loss": "ce", "train_subset": 64, "modes": [["fp32", None, False, True]],
                                              "device": "cpu"}, tmp_path, timeout_s=0.5)
    assert st["rc"] is None and st["status"] == "timed out"
    assert st["note"] == "stopped after 0 s; partial results kept"


def test_the_check_runs_its_steps_and_writes_the_report_of_each(tmp_path, monkeypatch, capsys):
    """``main`` end to end without a GPU: the machine's description is faked, the launches step really
    runs (its worker fails on a machine without CUDA, or with one profiles it), the report is written."""
    env = fabricated_results()["environment"]
    monkeypatch.setattr(gpu_check, "check_gpu", lambda: None)
    monkeypatch.setattr(gpu_check, "environment", lambda args, now: env)
    out = tmp_path / "check"
    assert gpu_check.main(["--quick", "--steps", "launches", "--out", str(out), "--launches-timeout", "120"]) == 0
    data = json.loads((out / "gpu_check.json").read_text())
    assert data["steps"]["build"]["status"] == "skipped"
    assert {k: v["status"] for k, v in data["steps"].items() if k in ("tests", "bench", "epochs")} == \
        dict.fromkeys(("tests", "bench", "epochs"), "skipped")
    launches = data["steps"]["launches"]
    assert launches["log"] == "logs/launches.log" and (out / launches["log"]).exists()
    if not torch.cuda.is_available():  # the worker needs CUDA: it fails, and the step says how
        assert launches["status"] == "failed" and launches["error"].startswith("exit 1: "), launches
    readme = (out / "README.md").read_text()
    assert readme.startswith(f"# GPU check: {env['gpu_name']}") and f"| launches | {launches['status']} |" in readme
    assert f"[gpu_check] report: {out / 'README.md'}" in capsys.readouterr().out


# --------------------------------------------------------------------------- data

def test_synthetic_cifar10_has_cifar_shapes():
    data = gpu_epochs.synthetic_cifar10(n_train=50, n_test=20)
    assert data.train_x.shape == (50, 32, 32, 3) and data.test_x.shape == (20, 32, 32, 3)
    assert data.train_x.dtype.name == "uint8" and not data.official
    assert sorted(set(data.train_y.tolist())) == list(range(10)) and "synthetic" in data.source


# --------------------------------------------------------------------------- no GPU, shell scripts

@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message where no GPU is visible")
def test_without_a_gpu_exits_2_with_one_clear_line(tmp_path):
    proc = subprocess.run(CHECK + ["--out", str(tmp_path / "out")], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("gpu_check: no CUDA GPU is visible to torch")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("script", ["scripts/gpu_check.sh", "scripts/setup_env.sh"])
def test_shell_scripts_parse(script):
    proc = subprocess.run(["bash", "-n", str(ROOT / script)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr


def _archs(tmp_path, *flags, gpus=None, arch_list=None):
    """What setup_env.sh --print-cuda-archs says, with a fake nvidia-smi listing ``gpus``."""
    env = {k: v for k, v in os.environ.items() if k != "TORCH_CUDA_ARCH_LIST"}
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "nvidia-smi"
    if gpus is None:  # a driver-less machine: nvidia-smi exists and fails
        fake.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    else:
        fake.write_text("#!/bin/sh\nprintf '" + "".join(f"{g}\\n" for g in gpus) + "'\n")
    fake.chmod(0o755)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    if arch_list is not None:
        env["TORCH_CUDA_ARCH_LIST"] = arch_list
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "setup_env.sh"), *flags, "--print-cuda-archs"],
                          capture_output=True, text=True, timeout=30, env=env)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_setup_env_arch_list(tmp_path):
    # Visible GPUs: each capability once, ascending numerically, the highest with its PTX.
    assert _archs(tmp_path, gpus=["9.0", "8.6", "9.0", "12.0"]) == "8.6;9.0;12.0+PTX"
    assert _archs(tmp_path, "--test", gpus=["9.0"]) == "9.0+PTX"
    # No GPU: the documented default, or the one-architecture compile check for tests/CI.
    default = _archs(tmp_path)
    assert default == "8.0;8.6;8.9;9.0;10.0;12.0+PTX"
    assert _archs(tmp_path, "--test") == "9.0+PTX"
    # A list given by the user always wins.
    assert _archs(tmp_path, "--test", gpus=["9.0"], arch_list="8.0;8.6") == "8.0;8.6"


def test_dockerfile_builds_the_default_arch_list(tmp_path):
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert f'TORCH_CUDA_ARCH_LIST="{_archs(tmp_path)}"' in dockerfile
