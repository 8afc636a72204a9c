"""What the GPU check measures (``python -m benchmarks.gpu_check``): its steps, shapes and time boxes, the
arithmetic of its numbers, and how its worker processes are started.

The arithmetic: bytes a loss step moves at least (:data:`BYTES_MODEL`), GB/s and the fraction of the
GPU's peak memory bandwidth (:data:`PEAK_BANDWIDTH_GBPS`, vendor data sheets), a full training epoch
from a two-epoch subset run, and the paper grid's time from that. A worker is
``python -m <module> STEP PARAMS_JSON OUT`` (:func:`worker_command`, :func:`run_worker`): it writes its
results to OUT as it goes, so a step stopped by its time box keeps what it measured.
"""
from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

from apl.jsonio import jsonable, save_json

#: The check's steps, in the order they run.
STEPS = ("tests", "bench", "launches", "epochs")
#: Default time box per step, seconds: together with the build they fit 8 minutes.
TIME_BOXES = {"tests": 150, "bench": 75, "launches": 25, "epochs": 90, "shared": 40}
TEST_SELECTION = "cuda or test_fused"
#: Losses of the speed table (names of benchmarks/bench_losses.py's LOSSES, plus NFL (paper)).
BENCH_LOSSES = ("CE", "NCE+RCE (ma2020)", "NFL (paper)")
QUICK_BENCH_LOSSES = ("CE", "NCE+RCE (ma2020)")
BENCH_NS = (128, 4096)
BENCH_CS = (10, 1000, 32000, 128000)
QUICK_BENCH_CS = (10, 32000)
BENCH_DTYPES = ("float32", "bfloat16")
#: F.cross_entropy's segmentation layout (N, C, H, W): the kernels read it in place on the CPU and
#: on CUDA a thread per position; this measures it against the same positions as rows.
SEGMENTATION_SHAPE = (4, 21, 256, 256)
SEGMENTATION_LOSSES = ("CE", "NCE+RCE (ma2020)")
#: Shape of the distribution-target rows: the fused operator's distribution path, timed nowhere else on a GPU.
SOFT_SHAPE = (4096, 1000)
#: The batch step's shapes: segmentation-sized (262,144 rows) and 33M rows (two classes, to keep the
#: logits and stats in memory), where a single block would be latency-bound.
BATCH_STEP_SHAPES = ((262_144, 10), (33_554_432, 2))
#: The small-C shape at which the CUDA row groups are compared (CIFAR-10's classes), and the groups:
#: threads per row forced (0: the launch plan's own choice) and their labels.
ROW_GROUP_SHAPE = (128, 10)
ROW_GROUPS = {0: "plan", 1: "thread per row", 16: "16 lanes", 32: "warp per row"}
#: Shape of the kernel-launch count (C <= 1024: the warp-per-row kernel).
LAUNCH_SHAPE = (512, 1000)
#: Training modes timed one after another in one process: (name, amp, compile, channels_last).
EPOCH_MODES = (("fp32", None, False, True), ("bf16", "bf16", False, True),
               ("fp32 NCHW", None, False, False), ("bf16 NCHW", "bf16", False, False),
               ("fp32 compile", None, True, True), ("bf16 compile", "bf16", True, True))
QUICK_EPOCH_MODES = EPOCH_MODES[:2]
#: The mode the shared-GPU runs use: the grid's default (reproduce.sh passes no --amp/--compile).
SHARED_MODE = "fp32"
#: CIFAR-10's split: the full epoch the subset timings are scaled to.
FULL_TRAIN, FULL_TEST = 50_000, 10_000
#: Peak memory bandwidth (GB/s, vendor data sheets) by device name, first match wins.
PEAK_BANDWIDTH_GBPS = (
    (r"GH200", None),  # 96 GB HBM3 and 144 GB HBM3e versions share the name
    (r"H200", 4800),
    (r"H100.*PCIe", 2000),
    (r"H100.*NVL", 3900),
    (r"H100.*(SXM|HBM3)", 3350),
    (r"A100.*80GB.*PCIe|A100.*PCIe.*80GB", 1935),
    (r"A100.*80GB", 2039),
    (r"A100.*40GB", 1555),
    (r"B200", 8000),
    (r"L40S?\b", 864),
    (r"\bL4\b", 300),
    (r"\bA10G?\b", 600),
    (r"\bT4\b", 320),
    (r"RTX 5090", 1792),
    (r"RTX 4090", 1008),
    (r"RTX 3090", 936),
)
BYTES_MODEL = ("bytes = 3 * N * C * s + 8 * N: the logits read twice (forward, backward) and the "
               "gradient written once, s bytes each, plus the int64 targets; the least any "
               "implementation moves, so every contender's GB/s uses the same model")


# --------------------------------------------------------------------------- arithmetic

def peak_bandwidth_gbps(gpu_name: str):
    """Peak memory bandwidth of ``gpu_name`` in GB/s from :data:`PEAK_BANDWIDTH_GBPS`; None if unknown."""
    for pattern, gbps in PEAK_BANDWIDTH_GBPS:
        if re.search(pattern, gpu_name or "", flags=re.IGNORECASE):
            return gbps
    return None


def loss_bytes(n: int, c: int, itemsize: int, target_itemsize: int = 8) -> int:
    """Bytes one forward + backward moves at least (:data:`BYTES_MODEL`)."""
    return 3 * n * c * itemsize + n * target_itemsize


def achieved_gbps(nbytes: int, seconds):
    """GB/s (1e9 bytes) of moving ``nbytes`` in ``seconds``; None when there is no time."""
    if seconds is None or not seconds > 0:
        return None
    return nbytes / seconds / 1e9


def fraction_of_peak(gbps, peak):
    """``gbps / peak`` (0.5 = half the peak), None when either is unknown."""
    if gbps is None or not peak:
        return None
    return gbps / peak


def full_epoch_estimate(history: list, num_train: int, num_test: int,
                        full_train: int = FULL_TRAIN, full_test: int = FULL_TEST) -> dict:
    """Scale a two-epoch subset run to the full epoch.

    Epoch 2 is the steady state: its training time per image times ``full_train`` plus its
    evaluation time scaled to ``full_test``. ``warmup_s`` is what epoch 1 took beyond epoch 2
    (cuDNN autotuning, torch.compile), paid once per run.
    """
    if len(history) < 2:
        raise ValueError("need two epochs (the first warms up)")
    h1, h2 = history[0], history[1]
    train_s = h2["train_time_s"]
    eval_s = h2["epoch_time_s"] - train_s
    return {"train_images_per_s": num_train / train_s if train_s > 0 else None,
            "full_epoch_s": train_s * full_train / num_train + eval_s * full_test / max(num_test, 1),
            "warmup_s": max(0.0, h1["epoch_time_s"] - h2["epoch_time_s"])}


def project_grid(full_epoch_s: float, warmup_s: float, runs: int, epochs: int, concurrent: int = 1) -> float:
    """Seconds for ``runs`` runs of ``epochs`` epochs, ``concurrent`` at a time on one GPU, each
    run paying ``warmup_s`` once and ``full_epoch_s`` per epoch (the epoch time measured with
    that many runs sharing the GPU)."""
    if runs < 1 or epochs < 1 or concurrent < 1:
        raise ValueError("runs, epochs and concurrent must be >= 1")
    return math.ceil(runs / concurrent) * (warmup_s + epochs * full_epoch_s)


#: The module each worker step runs in: the loss measurements, and the training epochs (which load the training stack).
WORKER_MODULES = {"bench": "benchmarks.gpu_workers", "launches": "benchmarks.gpu_workers",
                  "epochs": "benchmarks.gpu_epochs"}


def worker_command(step: str, params: dict, out: Path) -> list[str]:
    """The command line of a worker process for ``step`` (run in the checkout's root)."""
    return [sys.executable, "-m", WORKER_MODULES[step], step, json.dumps(params), str(out)]


def save_results(out: Path, result: dict) -> None:
    """A worker's results so far (strict JSON), replacing the last ones whole: a worker killed mid-write
    leaves the previous ones."""
    save_json(out, jsonable(result), indent=None)


def run_worker(workers: dict, argv=None) -> int:
    """A worker process's entry: ``workers[STEP](params, out)`` for the command line of :func:`worker_command`."""
    step, params, out = sys.argv[1:] if argv is None else argv
    workers[step](json.loads(params), Path(out))
    return 0
