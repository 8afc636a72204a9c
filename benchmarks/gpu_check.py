"""GPU check: the fused losses' CUDA tests, speed, kernel launches and training-epoch times on one GPU.

Meant for a machine with an NVIDIA GPU and the pinned torch; ``scripts/gpu_check.sh`` builds
the kernels for that GPU first and then runs this script (about 8 minutes in all on an
H100-class GPU). The steps, each in its own time box:

- ``tests``: ``pytest -q tests -k "cuda or test_fused"`` (every CUDA-parametrised test and
  the whole of tests/test_fused.py); failed when pytest fails or the CUDA tests were skipped;
- ``bench``: forward + backward of the fused operator, the eager reference, the
  ``torch.compile``d reference (``dynamic=True``: one compile per loss and dtype) and, for CE,
  ``F.cross_entropy``, in float32 and bfloat16, median ms (``time_steps`` of
  benchmarks/bench_losses.py), achieved GB/s and the fraction of the GPU's peak memory
  bandwidth; then the (N, C, H, W) segmentation layout and distribution targets (probability
  targets, CE label smoothing) in float32; a contender that runs out of memory or takes too
  long is skipped with the reason;
- ``launches``: CUDA kernels per forward and per backward call of the fused operator
  (``torch.profiler``), for every loss x variant x reduction, against
  ``apl.fused.launch_counts(spec, reduction)`` where that exists;
- ``epochs``: one training epoch of the paper preset on a subset, scaled to the full
  50,000-image epoch, in fp32, bf16 autocast, channels_last on/off and torch.compile, and with
  several runs sharing the GPU; from these, the projected time of the paper grid.

``bench``, ``launches`` and ``epochs`` run in subprocesses of this script, so a crash, a hang
or a CUDA fault in one is recorded and the others still run. Everything goes to one folder
(default ``benchmarks/gpu_check/<gpu>-<UTC time>/``): ``gpu_check.json``, ``README.md`` and the
steps' logs. Exit status: 0 when the build (as reported by gpu_check.sh) and the tests passed,
1 when either failed, 2 for bad arguments or when no GPU is visible. Pick the GPU with
CUDA_VISIBLE_DEVICES.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
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
#: through a transposed copy on CUDA, whose cost this measures.
SEGMENTATION_SHAPE = (4, 21, 256, 256)
SEGMENTATION_LOSSES = ("CE", "NCE+RCE (ma2020)")
#: Shape of the distribution-target rows: the fused operator's distribution path, timed nowhere else on a GPU.
SOFT_SHAPE = (4096, 1000)
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


class UsageError(Exception):
    """A condition that ends the check with a one-line message and exit status 2."""


# --------------------------------------------------------------------------- pure helpers

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


def paper_grid_size() -> tuple[int, int]:
    """(runs, epochs per run) of the paper preset's grid (apl.grid.plan_grid), one seed."""
    from apl.grid import plan_grid

    plan = plan_grid("paper")
    epochs = {cfg.epochs for cfg in plan}
    if len(epochs) != 1:
        raise ValueError(f"the paper grid mixes epoch counts {sorted(epochs)}")
    return len(plan), epochs.pop()


def slug(text: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"``: a folder-name part."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "gpu"


def parse_pytest_summary(output: str) -> dict:
    """Counts of pytest's last summary line (``3 passed, 2 skipped in 1.2s``) and the skip reasons."""
    counts = {}
    for line in reversed(output.strip().splitlines()):
        found = re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)", line)
        if found:
            for num, word in found:
                counts["errors" if word.startswith("error") else word] = int(num)
            break
    skips = re.findall(r"^SKIPPED \[\d+\] (.*)$", output, flags=re.MULTILINE)
    return {"counts": counts, "skip_reasons": skips}


def cuda_tests_skipped(skip_reasons: list) -> list:
    """The skip reasons that say the CUDA tests did not run (no GPU, kernels not built)."""
    pattern = re.compile(r"(needs|requires|no) (a )?(GPU|CUDA)|CUDA kernels", re.IGNORECASE)
    return [r for r in skip_reasons if pattern.search(r)]


# --------------------------------------------------------------------------- report

def _fmt(v, digits=2, unit=""):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}{unit}"
    return f"{v}{unit}"


def _fmt_ms(seconds):
    if seconds is None:
        return "-"
    ms = seconds * 1e3
    return f"{ms:.3f}" if ms < 1 else f"{ms:.2f}" if ms < 100 else f"{ms:.0f}"


def _fmt_gbps(v):
    return "-" if v is None else f"{v:.0f}" if v >= 100 else f"{v:.1f}" if v >= 1 else f"{v:.3f}"


def _hours(seconds):
    return "-" if seconds is None else f"{seconds / 3600:.2f} h"


def _table(header, rows) -> list:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out


def render_markdown(results: dict) -> str:
    """The README.md of a check's folder, from the dict :func:`write_report` saves as JSON."""
    env = results.get("environment", {})
    steps = results.get("steps", {})
    gpu = env.get("gpu_name", "unknown GPU")
    lines = [f"# GPU check: {gpu}, {env.get('date', '')}", ""]
    peak = env.get("peak_bandwidth_gbps")
    machine = [
        ("GPU", f"{gpu} (compute capability {env.get('compute_capability', '?')}, "
                f"{_fmt(env.get('gpu_memory_gib'), 1)} GiB, {env.get('sm_count', '?')} SMs)"),
        ("peak memory bandwidth", f"{peak} GB/s ({env.get('peak_bandwidth_source', 'data sheet')})"
         if peak else "unknown (no entry for this GPU; --peak-gbps sets it)"),
        ("driver", env.get("driver_version") or "unknown"),
        ("torch / CUDA / cuDNN", f"{env.get('torch_version')} / {env.get('cuda_version')} / "
                                 f"{env.get('cudnn_version')}"),
        ("git commit", f"{env.get('git_commit')}" + (" (uncommitted changes)" if env.get("git_dirty") else "")),
        ("python, platform", f"{env.get('python_version')}, {env.get('platform')}"),
        ("command", f"`{env.get('command', '')}`"),
    ]
    lines += [f"- {k}: {v}" for k, v in machine] + [""]

    lines += ["## Summary", ""]
    rows = []
    for name in ("build",) + STEPS:
        st = steps.get(name)
        if st is None:
            continue
        rows.append([name, st.get("status", "?"), _fmt(st.get("seconds"), 0), st.get("error") or st.get("note", "")])
    lines += _table(["step", "status", "seconds", "note"], rows) + [""]

    build = steps.get("build")
    if build and build.get("status") != "skipped":
        lines += ["## Build", "", f"`scripts/setup_env.sh --test --cuda` for TORCH_CUDA_ARCH_LIST="
                  f"`{build.get('archs', '?')}`: exit {build.get('rc')}, {_fmt(build.get('seconds'), 0)} s "
                  f"(log: `{build.get('log', '-')}`).", ""]

    tests = steps.get("tests")
    if tests and tests.get("status") != "skipped":
        counts = tests.get("counts", {})
        lines += ["## Tests", "", f"`{tests.get('command', '')}`: exit {tests.get('rc')}, "
                  + (", ".join(f"{v} {k}" for k, v in counts.items()) or "no summary line")
                  + f" (log: `{tests.get('log', '-')}`)."]
        if tests.get("cuda_skips"):
            lines += ["", "CUDA tests skipped: " + "; ".join(tests["cuda_skips"])]
        lines += [""]

    bench = steps.get("bench")
    if bench and bench.get("rows"):
        lines += ["## Loss speed: forward + backward, median ms", "",
                  f"GB/s: {BYTES_MODEL}. % peak: fused GB/s over the peak above. Compiled: "
                  f"`torch.compile(dynamic=True)`, one compile per loss and dtype.", ""]
        header = ["loss", "dtype", "N", "C", "fused", "reference", "compiled", "F.cross_entropy",
                  "fused GB/s", "fused % peak", "reference/fused", "compiled/fused", "fused/F.ce", "skipped"]
        rows = []
        for r in bench["rows"]:
            ms = r.get("seconds", {})
            f = ms.get("fused")
            ratio = lambda a, b: "-" if a is None or b is None else f"{a / b:.2f}x"  # noqa: E731
            frac = (r.get("fraction_of_peak") or {}).get("fused")
            rows.append([r["loss"], r["dtype"], r["n"], r["c"], _fmt_ms(f), _fmt_ms(ms.get("reference")),
                         _fmt_ms(ms.get("compiled")), _fmt_ms(ms.get("F.cross_entropy")),
                         _fmt_gbps((r.get("gbps") or {}).get("fused")),
                         "-" if frac is None else f"{100 * frac:.0f}%",
                         ratio(ms.get("reference"), f), ratio(ms.get("compiled"), f),
                         ratio(f, ms.get("F.cross_entropy")),
                         "; ".join(f"{k}: {v}" for k, v in (r.get("skipped") or {}).items()) or ""])
        lines += _table(header, rows) + [""]

    if bench and bench.get("segmentation"):
        lines += ["## Segmentation layout: forward + backward, median ms, float32", "",
                  "`fused`: the (N, C, H, W) logits as users pass them (on CUDA through a transposed copy); "
                  "`fused on rows`: the same positions already laid out as (N*H*W, C).", ""]
        rows = []
        for r in bench["segmentation"]:
            ms = r.get("seconds", {})
            f, ce = ms.get("fused"), ms.get("F.cross_entropy")
            rows.append([r["loss"], "x".join(map(str, r["shape"])), _fmt_ms(f), _fmt_ms(ms.get("fused on rows")),
                         _fmt_ms(ce), "-" if f is None or ce is None else f"{f / ce:.2f}x",
                         "; ".join(f"{k}: {v}" for k, v in (r.get("skipped") or {}).items())])
        lines += _table(["loss", "shape", "fused", "fused on rows", "F.cross_entropy", "fused/F.ce", "skipped"],
                        rows) + [""]

    if bench and bench.get("soft"):
        lines += ["## Distribution targets: forward + backward, median ms, float32", "",
                  "Probability targets (a floating target of the logits' shape), and CE `label_smoothing` on "
                  "class indices, through the module on each backend.", ""]
        rows = []
        for r in bench["soft"]:
            ms = r.get("seconds", {})
            f, ref, ce = ms.get("fused"), ms.get("reference"), ms.get("F.cross_entropy")
            rows.append([r["loss"], "x".join(map(str, r["shape"])), _fmt_ms(f), _fmt_ms(ref), _fmt_ms(ce),
                         "-" if f is None or ref is None else f"{ref / f:.2f}x",
                         "-" if f is None or ce is None else f"{f / ce:.2f}x",
                         "; ".join(f"{k}: {v}" for k, v in (r.get("skipped") or {}).items())])
        lines += _table(["loss", "shape", "fused", "reference", "F.cross_entropy", "reference/fused", "fused/F.ce",
                         "skipped"], rows) + [""]

    launches = steps.get("launches")
    if launches and launches.get("rows"):
        n, c = launches.get("shape", LAUNCH_SHAPE)
        lines += ["## Kernel launches per call", "",
                  f"CUDA kernels (memcpy/memset not counted) `torch.profiler` records for one call at "
                  f"N = {n}, C = {c}, after warm-up; backward with a given output gradient, so "
                  f"autograd adds no kernel of its own. Expected: `apl.fused.launch_counts(spec, reduction)`.",
                  ""]
        header = ["loss", "reduction", "fused forward", "fused backward", "expected", "match",
                  "memcpy/memset (fwd+bwd)", "reference forward", "reference backward"]
        rows = []
        for r in launches["rows"]:
            exp = r.get("expected")
            rows.append([r["loss"], r["reduction"], _fmt(r.get("forward")), _fmt(r.get("backward")),
                         "n/a" if exp is None else f"{exp[0]} / {exp[1]}", r.get("match", "n/a"),
                         _fmt(r.get("copies")), _fmt(r.get("reference_forward")),
                         _fmt(r.get("reference_backward"))])
        lines += _table(header, rows) + [""]

    epochs = steps.get("epochs")
    if epochs and (epochs.get("modes") or epochs.get("shared")):
        p = epochs.get("params", {})
        lines += ["## Training epoch (paper preset)", "",
                  f"Loss {p.get('loss')}, batch {p.get('batch_size')}, {p.get('train_subset')} training "
                  f"images, two epochs per mode (the first warms up); data: {epochs.get('data_source', '?')}. "
                  f"Full epoch = epoch 2's training time x {FULL_TRAIN} / subset + its evaluation time "
                  f"scaled to {FULL_TEST} test images; warm-up = epoch 1 - epoch 2, once per run.", ""]
        rows = []
        for m in epochs.get("modes", []):
            if m.get("error"):
                rows.append([m["mode"], "-", "-", "-", m["error"]])
                continue
            rows.append([m["mode"], _fmt(m.get("train_images_per_s"), 0), _fmt(m.get("full_epoch_s"), 2),
                         _fmt(m.get("warmup_s"), 1), ""])
        sh = epochs.get("shared")
        if sh:
            rows.append([f"{sh.get('runs')} x {sh.get('mode')} sharing the GPU",
                         _fmt(sh.get("aggregate_images_per_s"), 0) + " (all runs)",
                         _fmt(sh.get("full_epoch_s"), 2) + " (each run)", _fmt(sh.get("warmup_s"), 1),
                         sh.get("error", "")])
        lines += _table(["mode", "train images/s", "full epoch s", "warm-up s", "note"], rows) + [""]

    proj = results.get("projection")
    if proj and proj.get("rows"):
        lines += ["## Projected paper grid", "",
                  f"{proj['runs']} runs x {proj['epochs']} epochs (apl.grid.plan_grid('paper'), one seed): "
                  f"runs x (warm-up + epochs x full epoch), or with k runs sharing the GPU "
                  f"ceil(runs / k) x the same with the shared epoch time (`--devices cuda:0,cuda:0,...`). "
                  f"Data loading and process start are not included; a compile mode's warm-up is its "
                  f"first compile, which later runs of one grid worker partly reuse from torch's caches.", ""]
        lines += _table(["mode", "runs at once", "grid time"],
                        [[r["mode"], r["concurrent"], _hours(r["seconds"])] for r in proj["rows"]]) + [""]

    failed = [f"- {name}: {st.get('error')}" for name, st in steps.items() if st.get("error")]
    if failed:
        lines += ["## Errors", ""] + failed + [""]
    return "\n".join(lines)


def write_report(results: dict, out_dir) -> tuple[Path, Path]:
    """Write ``gpu_check.json`` (strict JSON) and ``README.md`` into ``out_dir``; return both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "gpu_check.json", out / "README.md"
    json_path.write_text(json.dumps(_jsonable(results), indent=1, allow_nan=False) + "\n", encoding="utf-8")
    md_path.write_text(render_markdown(results) + "\n", encoding="utf-8")
    return json_path, md_path


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _write_json_atomic(path, obj) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_jsonable(obj), allow_nan=False), encoding="utf-8")
    os.replace(tmp, path)


# --------------------------------------------------------------------------- arguments

def _steps_arg(text: str) -> tuple:
    steps = tuple(s.strip() for s in text.split(",") if s.strip())
    bad = [s for s in steps if s not in STEPS]
    if bad or not steps:
        raise argparse.ArgumentTypeError(f"unknown step(s) {', '.join(bad) or '(none given)'}; "
                                         f"choose from {','.join(STEPS)}")
    return steps


def _positive(kind):
    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not v > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return v
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gpu_check.py", description=__doc__.split("\n\n")[0],
        epilog="scripts/gpu_check.sh builds the kernels for this GPU and then runs this script with "
               "the --build-* options; run this script directly (no build) with --steps or "
               "--skip-tests for a part.")
    p.add_argument("--out", metavar="DIR", help="folder for gpu_check.json, README.md and logs "
                                 "(default benchmarks/gpu_check/<gpu>-<UTC time>/)")
    p.add_argument("--steps", type=_steps_arg, default=STEPS, metavar="LIST",
                   help=f"comma-separated steps to run (default: all of {','.join(STEPS)})")
    p.add_argument("--skip-tests", action="store_true", help="leave out the tests step")
    p.add_argument("--quick", action="store_true",
                   help="fewer losses and shapes, no torch.compile in the loss table, launch counts for "
                        "reduction mean only, two training modes on 5,120 images, 2 shared runs")
    p.add_argument("--data-dir", metavar="DIR", help="folder holding cifar-10-batches-py for the epoch timings "
                                      "(default: synthetic CIFAR-10-shaped data, 50,000 + 10,000 images)")
    p.add_argument("--train-subset", type=_positive(int), default=None, metavar="N",
                   help="training images per timed epoch (default 10240, --quick 5120: multiples of the "
                        "batch, so torch.compile sees one batch shape)")
    p.add_argument("--shared-runs", type=_positive(int), default=None, metavar="K",
                   help="training processes sharing the GPU at once (default 4, --quick 2)")
    p.add_argument("--epoch-loss", default="nce+rce", metavar="LOSS", help="loss of the timed epochs (default nce+rce)")
    p.add_argument("--peak-gbps", type=_positive(float), default=None, metavar="GBPS",
                   help="the GPU's peak memory bandwidth in GB/s, for a GPU missing from the table")
    boxes = p.add_argument_group("time boxes (seconds; a step past its box is stopped and recorded)")
    for step, default in TIME_BOXES.items():
        what = "the shared-GPU epoch runs" if step == "shared" else f"the {step} step"
        boxes.add_argument(f"--{step}-timeout", type=_positive(float), default=default, metavar="S",
                           help=f"{what} (default {default})")
    build = p.add_argument_group("set by scripts/gpu_check.sh (the build it ran)")
    build.add_argument("--build-rc", type=int, default=None, metavar="RC", help="exit status of the build")
    build.add_argument("--build-seconds", type=float, default=None, metavar="S", help="its wall time")
    build.add_argument("--build-archs", default=None, metavar="LIST", help="its TORCH_CUDA_ARCH_LIST")
    build.add_argument("--build-log", default=None, metavar="FILE", help="its log, copied into the output folder")
    # The steps' subprocesses: this script again, with one step's parameters.
    p.add_argument("--worker", choices=("bench", "launches", "epochs"), help=argparse.SUPPRESS)
    p.add_argument("--worker-params", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """Parse and complete the options (``--quick`` defaults, ``--skip-tests``)."""
    args = build_parser().parse_args(argv)
    steps = tuple(s for s in args.steps if not (args.skip_tests and s == "tests"))
    if not steps:
        build_parser().error("--skip-tests leaves no step to run")
    args.steps = steps
    if args.train_subset is None:
        args.train_subset = 5120 if args.quick else 10240
    if args.shared_runs is None:
        args.shared_runs = 2 if args.quick else 4
    from apl.losses.spec import LOSS_NAMES

    if args.epoch_loss not in LOSS_NAMES:
        build_parser().error(f"--epoch-loss must be one of {', '.join(LOSS_NAMES)}, got {args.epoch_loss!r}")
    return args


# --------------------------------------------------------------------------- workers (subprocesses)

def _bench_losses():
    """benchmarks/bench_losses.py as a module: its ``time_steps``, ``LOSSES`` and ``SOFT_LOSSES``."""
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    import bench_losses

    return bench_losses


def _bench_specs() -> dict:
    from apl.losses.spec import spec_for

    specs = dict(_bench_losses().LOSSES)
    specs["NFL (paper)"] = spec_for("nfl", variant="paper")
    return specs


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _free(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.empty_cache()


def _worker_bench(p: dict, out: Path) -> None:
    import torch
    import torch.nn.functional as F

    import apl.losses.fused as fused
    from apl.losses import reference_loss

    time_steps = _bench_losses().time_steps
    device = p.get("device", "cuda")
    specs = _bench_specs()
    deadline = time.monotonic() + p["budget_s"]
    peak = p.get("peak_gbps")
    rows, result = [], {"rows": [], "compile_s": {}}
    for loss_name in p["losses"]:
        spec = specs[loss_name]
        for dtype_name in p["dtypes"]:
            dtype = getattr(torch, dtype_name)
            compiled, compiled_ready = None, False
            if p["compile"]:
                torch._dynamo.reset()
                compiled = torch.compile(lambda x, y, s=spec: reference_loss(x, y, s), dynamic=True)
            for n in p["ns"]:
                for c in p["cs"]:
                    row = {"loss": loss_name, "dtype": dtype_name, "n": n, "c": c, "seconds": {}, "skipped": {}}
                    rows.append(row)
                    if time.monotonic() > deadline:
                        row["skipped"]["all"] = "time box"
                        continue
                    contenders = {"fused": lambda x, y, s=spec: fused.fused_loss(x, y, s),
                                  "reference": lambda x, y, s=spec: reference_loss(x, y, s)}
                    if compiled is not None:
                        # A first compile can take longer than the box has left; a compiled one is cheap.
                        if compiled_ready or deadline - time.monotonic() > p["compile_reserve_s"]:
                            contenders["compiled"] = compiled
                        else:
                            row["skipped"]["compiled"] = "time box"
                    if loss_name == "CE":
                        contenders["F.cross_entropy"] = lambda x, y: F.cross_entropy(x, y)
                    try:
                        g = torch.Generator(device=device).manual_seed(0)
                        logits = (torch.randn(n, c, device=device, generator=g) * 3).to(dtype)
                        target = torch.randint(0, c, (n,), device=device, generator=g)
                    except torch.OutOfMemoryError:
                        row["skipped"]["all"] = "out of memory for the logits"
                        _free(device)
                        continue
                    for name in list(contenders):
                        reason = _probe(contenders[name], logits, target, device, p["max_step_s"], result, name,
                                        f"{loss_name} {dtype_name}")
                        if reason:
                            row["skipped"][name] = reason
                            del contenders[name]
                        elif name == "compiled":
                            compiled_ready = True
                    row["seconds"] = _time_contenders(time_steps, contenders, logits, target, device, p, row)
                    nbytes = loss_bytes(n, c, logits.element_size(), target.element_size())
                    row["bytes"] = nbytes
                    row["gbps"] = {k: achieved_gbps(nbytes, v) for k, v in row["seconds"].items()}
                    row["fraction_of_peak"] = {k: fraction_of_peak(v, peak) for k, v in row["gbps"].items()}
                    del logits, target
                    _free(device)
                    result["rows"] = rows
                    _write_json_atomic(out, result)
    result["rows"] = rows
    result["segmentation"] = _segmentation_rows(p, specs, time_steps, device, deadline)
    result["soft"] = _soft_rows(p, time_steps, device, deadline)
    _write_json_atomic(out, result)


def _segmentation_rows(p, specs, time_steps, device, deadline) -> list:
    """Forward + backward of the (N, C, H, W) layout as users pass it, of the same positions as
    (N*H*W, C) rows, and of F.cross_entropy (CE), in float32."""
    import torch
    import torch.nn.functional as F

    from apl.losses import APLLoss

    n, c, *rest = p["segmentation_shape"]
    rows = []
    for loss_name in p["segmentation_losses"]:
        row = {"loss": loss_name, "shape": list(p["segmentation_shape"]), "seconds": {}, "skipped": {}}
        rows.append(row)
        if time.monotonic() > deadline:
            row["skipped"]["all"] = "time box"
            continue
        module = APLLoss(specs[loss_name], backend="fused")
        g = torch.Generator(device=device).manual_seed(0)
        logits = torch.randn(n, c, *rest, device=device, generator=g) * 3
        target = torch.randint(0, c, (n, *rest), device=device, generator=g)
        contenders = {"fused": module}
        if loss_name == "CE":
            contenders["F.cross_entropy"] = lambda x, y: F.cross_entropy(x, y)
        row["seconds"] = _time_contenders(time_steps, contenders, logits, target, device, p, row)
        as_rows = logits.movedim(1, -1).reshape(-1, c)
        on_rows = _time_contenders(time_steps, {"rows": module}, as_rows, target.reshape(-1), device, p, row)
        if "rows" in on_rows:
            row["seconds"]["fused on rows"] = on_rows["rows"]
        del logits, target, as_rows
        _free(device)
    return rows


def _soft_rows(p, time_steps, device, deadline) -> list:
    """Forward + backward of distribution targets (bench_losses.SOFT_LOSSES: probability targets,
    and CE label smoothing on class indices) through the module on each backend, and of
    F.cross_entropy (CE alone), in float32."""
    import torch
    import torch.nn.functional as F

    from apl.losses import APLLoss
    from apl.losses.spec import Kind

    n, c = p["soft_shape"]
    rows = []
    for loss_name, (spec, probabilities) in _bench_losses().SOFT_LOSSES.items():
        row = {"loss": loss_name, "shape": list(p["soft_shape"]), "seconds": {}, "skipped": {}}
        rows.append(row)
        if time.monotonic() > deadline:
            row["skipped"]["all"] = "time box"
            continue
        g = torch.Generator(device=device).manual_seed(0)
        logits = torch.randn(n, c, device=device, generator=g) * 3
        if probabilities:
            target = torch.softmax(torch.randn(n, c, device=device, generator=g) * 3, dim=1)
        else:
            target = torch.randint(0, c, (n,), device=device, generator=g)
        contenders = {"fused": APLLoss(spec, backend="fused"), "reference": APLLoss(spec, backend="reference")}
        if spec.active == Kind.CE and spec.passive == Kind.NONE:
            contenders["F.cross_entropy"] = lambda x, y, e=spec.smoothing: F.cross_entropy(x, y, label_smoothing=e)
        row["seconds"] = _time_contenders(time_steps, contenders, logits, target, device, p, row)
        del logits, target
        _free(device)
    return rows


def _time_contenders(time_steps, contenders, logits, target, device, p, row) -> dict:
    """Median seconds per contender, taking turns; one at a time when together they do not fit."""
    import torch

    if not contenders:
        return {}
    kw = dict(min_time=p["min_time"], max_repeats=p["max_repeats"])
    try:
        return time_steps(contenders, logits, target, device, **kw)
    except torch.OutOfMemoryError:
        _free(device)
    except Exception as e:  # recorded in the row; the next shape still runs
        row["skipped"]["all"] = f"error: {type(e).__name__}: {e}"
        return {}
    times = {}
    for name, fn in contenders.items():
        try:
            times.update(time_steps({name: fn}, logits, target, device, **kw))
        except torch.OutOfMemoryError:
            row["skipped"][name] = "out of memory"
        _free(device)
    return times


def _probe(fn, logits, target, device, max_step_s, result, name, key):
    """Run two steps of ``fn`` (the first may compile); the reason to skip it, or None."""
    import torch

    x = logits.detach().clone().requires_grad_()
    dt = 0.0
    try:
        for i in range(2):
            t0 = time.perf_counter()
            fn(x, target).backward()
            x.grad = None
            _sync(device)
            dt = time.perf_counter() - t0
            if i == 0 and name == "compiled":
                result["compile_s"].setdefault(key, dt)
    except torch.OutOfMemoryError:
        del x
        _free(device)
        return "out of memory"
    except Exception as e:  # a failing contender is a finding; the others are still timed
        return f"error: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    if dt > max_step_s:
        return f"too slow ({dt:.1f} s a step)"
    return None


def _count_kernels(fn) -> tuple[int, int]:
    """(kernels, memcpy + memset) the GPU ran for ``fn()``, by torch.profiler."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    kernels = copies = 0
    for evt in prof.events():
        if evt.device_type != DeviceType.CUDA:
            continue
        if evt.name.startswith(("Memcpy", "Memset")):
            copies += 1
        else:
            kernels += 1
    return kernels, copies


def _loss_variants() -> list:
    """(label, spec) for every loss name x variant, each distinct spec once."""
    from apl.losses.spec import LOSS_NAMES, VARIANTS, spec_for

    out = []
    for name in LOSS_NAMES:
        specs = {variant: spec_for(name, variant=variant) for variant in VARIANTS}
        if len(set(specs.values())) == 1:
            out.append((name, specs[VARIANTS[0]]))
        else:
            out += [(f"{name} ({variant})", spec) for variant, spec in specs.items()]
    return out


def _worker_launches(p: dict, out: Path) -> None:
    import torch

    import apl.losses.fused as fused
    from apl.losses import reference_loss

    launch_counts = getattr(fused, "launch_counts", None)
    deadline = time.monotonic() + p["budget_s"]
    device = p.get("device", "cuda")
    n, c = p["shape"]
    g = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(n, c, device=device, generator=g) * 3
    target = torch.randint(0, c, (n,), device=device, generator=g)
    probe = torch.zeros(16, device=device)
    result = {"shape": [n, c], "rows": [], "launch_counts_available": launch_counts is not None}
    try:
        calibration = _count_kernels(lambda: probe.add_(1))[0]
    except Exception as e:  # no CUDA profiling at all: say so instead of a table of zeros
        calibration = f"{type(e).__name__}: {e}"
    result["calibration_kernels"] = calibration
    if calibration != 1:
        seen = f"{calibration} kernels" if isinstance(calibration, int) else calibration
        result["error"] = (f"the profiler does not record CUDA kernels here (one in-place add: {seen}, "
                           f"expected 1 kernel; CUPTI missing?)")
        _write_json_atomic(out, result)
        return

    def counts(loss_fn):
        x = logits.detach().clone().requires_grad_()
        for _ in range(2):  # warm-up: caching allocator, lazy initialisation
            loss = loss_fn(x)
            torch.autograd.backward(loss, torch.ones_like(loss))
            x.grad = None
        holder = {}
        fwd = _count_kernels(lambda: holder.__setitem__("loss", loss_fn(x)))
        grad_out = torch.ones_like(holder["loss"])
        bwd = _count_kernels(lambda: torch.autograd.backward(holder["loss"], grad_out))
        return fwd, bwd

    for label, spec in _loss_variants():
        for reduction in p["reductions"]:
            row = {"loss": label, "reduction": reduction}
            result["rows"].append(row)
            if time.monotonic() > deadline:
                row["error"] = "time box"
                continue
            try:
                fwd, bwd = counts(lambda x, s=spec, r=reduction: fused.fused_loss(x, target, s, reduction=r))
                row.update(forward=fwd[0], backward=bwd[0], copies=fwd[1] + bwd[1])
                if p["reference"] and reduction == "mean":
                    rf, rb = counts(lambda x, s=spec: reference_loss(x, target, s))
                    row.update(reference_forward=rf[0], reference_backward=rb[0])
            except Exception as e:  # one failing loss is a finding; the table goes on
                row["error"] = f"{type(e).__name__}: {e}"
                _write_json_atomic(out, result)
                continue
            if launch_counts is None:
                row["expected"], row["match"] = None, "n/a"
            else:
                try:
                    exp = tuple(int(v) for v in launch_counts(spec, reduction))
                    row["expected"] = list(exp)
                    row["match"] = "yes" if exp == (row["forward"], row["backward"]) else "NO"
                except Exception as e:  # a bad expectation is reported, not fatal
                    row["expected"], row["match"] = None, f"launch_counts raised {type(e).__name__}: {e}"
            _write_json_atomic(out, result)
    _write_json_atomic(out, result)


def synthetic_cifar10(n_train: int = FULL_TRAIN, n_test: int = FULL_TEST, seed: int = 0):
    """Random CIFAR-10-shaped arrays (uint8 images, balanced labels), for timing where no
    CIFAR-10 is at hand: the epoch's cost does not depend on what the pixels show."""
    import numpy as np

    from apl.data import CIFAR10_CLASSES, CIFAR10Arrays

    rng = np.random.default_rng(seed)

    def split(n):
        return (rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8),
                rng.permutation(np.arange(n) % len(CIFAR10_CLASSES)).astype(np.int64))

    train_x, train_y = split(n_train)
    test_x, test_y = split(n_test)
    return CIFAR10Arrays(train_x, train_y, test_x, test_y, CIFAR10_CLASSES,
                         source=f"synthetic: random CIFAR-10-shaped images ({n_train} train, {n_test} test), "
                                f"timing only", official=False)


def _worker_epochs(p: dict, out: Path) -> None:
    import warnings

    from apl.config import TrainConfig
    from apl.data import load_cifar10
    from apl.train import train

    if p.get("data_dir"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the non-official-copy note; the report names the source
            data = load_cifar10(p["data_dir"], download=False)
    else:
        data = synthetic_cifar10(*p.get("synthetic_sizes", (FULL_TRAIN, FULL_TEST)))
    result = {"data_source": data.source, "modes": []}
    barrier = p.get("barrier")

    def wait_for_all(record):
        # Shared runs: every process finishes its warm-up epoch before the timed one starts.
        if barrier and record["epoch"] == 1:
            Path(barrier["dir"], f"ready.{barrier['index']}").touch()
            stop = time.monotonic() + barrier["timeout_s"]
            while len(list(Path(barrier["dir"]).glob("ready.*"))) < barrier["count"]:
                if time.monotonic() > stop:
                    result["barrier_timed_out"] = True
                    break
                time.sleep(0.01)

    for name, amp, compile_, channels_last in p["modes"]:
        entry = {"mode": name, "amp": amp, "compile": compile_, "channels_last": channels_last}
        result["modes"].append(entry)
        cfg = TrainConfig.paper(loss=p["loss"], epochs=2, train_subset=p["train_subset"],
                                test_subset=p.get("test_subset"), width=p.get("width", 1.0),
                                device=p.get("device", "cuda"), amp=amp, compile=compile_,
                                channels_last=channels_last, data_dir=p.get("data_dir") or "data")
        try:
            with tempfile.TemporaryDirectory() as run_dir, warnings.catch_warnings():
                warnings.simplefilter("ignore")
                r = train(cfg, run_dir, resume=False, progress=False, data=data, on_epoch=wait_for_all)
        except Exception as e:  # a failing mode is a finding; the next one still runs
            entry["error"] = f"{type(e).__name__}: {e}"
            _write_json_atomic(out, result)
            continue
        entry.update(history=r["history"], num_train=r["num_train"], num_test=r["num_test"],
                     batch_size=cfg.batch_size, loss_backend=r.get("loss_backend"),
                     **full_epoch_estimate(r["history"], r["num_train"], r["num_test"]))
        _write_json_atomic(out, result)
    _write_json_atomic(out, result)


def worker_main(args) -> int:
    params = json.loads(args.worker_params)
    out = Path(args.worker_out)
    {"bench": _worker_bench, "launches": _worker_launches, "epochs": _worker_epochs}[args.worker](params, out)
    return 0


# --------------------------------------------------------------------------- the steps (parent)

def _spawn(step: str, params: dict, out_dir: Path, tag: str):
    """Start this script as a worker for ``step``; returns (process, result file, log file)."""
    result_file = out_dir / "logs" / f"{tag}.json"
    log_file = out_dir / "logs" / f"{tag}.log"
    result_file.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", step,
           "--worker-params", json.dumps(params), "--worker-out", str(result_file)]
    log = open(log_file, "w", encoding="utf-8")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    proc._apl_log = log
    return proc, result_file, log_file


def _wait(procs, timeout_s: float) -> list:
    """Wait for ``procs`` until ``timeout_s``; kill the rest. Exit statuses, None where killed."""
    stop = time.monotonic() + timeout_s
    codes = []
    for proc in procs:
        try:
            codes.append(proc.wait(timeout=max(0.0, stop - time.monotonic())))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            codes.append(None)
        proc._apl_log.close()
    return codes


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _log_tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])


def _run_worker_step(step: str, params: dict, out_dir: Path, timeout_s: float) -> dict:
    t0 = time.monotonic()
    proc, result_file, log_file = _spawn(step, params, out_dir, step)
    rc = _wait([proc], timeout_s)[0]
    data = _read_json(result_file) or {}
    st = {"seconds": time.monotonic() - t0, "rc": rc, "log": str(log_file.relative_to(out_dir)), **data}
    if rc is None:
        st["status"], st["note"] = "timed out", f"stopped after {timeout_s:.0f} s; partial results kept"
    elif rc != 0:
        st["status"] = "failed"
        st["error"] = f"exit {rc}: {_log_tail(log_file)}"
    elif data.get("error"):
        st["status"] = "failed"
    else:
        st["status"] = "ok"
    return st


def step_tests(args, out_dir: Path) -> dict:
    log_file = out_dir / "logs" / "tests.log"
    cmd = [sys.executable, "-m", "pytest", "-q", "tests", "-k", TEST_SELECTION, "-p", "no:cacheprovider"]
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.tests_timeout)
        rc, output = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        rc = None
        # What pytest printed before it was stopped (bytes, whatever text=True asked for).
        output = "".join(v.decode(errors="replace") if isinstance(v, bytes) else (v or "")
                         for v in (e.stdout, e.stderr))
    log_file.write_text(output, encoding="utf-8")
    summary = parse_pytest_summary(output)
    st = {"seconds": time.monotonic() - t0, "rc": rc, "command": "pytest -q tests -k '" + TEST_SELECTION + "'",
          "log": str(log_file.relative_to(out_dir)), "counts": summary["counts"],
          "cuda_skips": cuda_tests_skipped(summary["skip_reasons"])}
    counts = ", ".join(f"{v} {k}" for k, v in summary["counts"].items())
    if rc is None:
        st.update(status="failed", error=f"timed out after {args.tests_timeout:g} s")
    elif rc != 0:
        st.update(status="failed", error=f"pytest exit {rc}: {counts}")
    elif st["cuda_skips"]:
        st.update(status="failed", error="CUDA tests were skipped: " + st["cuda_skips"][0])
    else:
        st.update(status="ok", note=counts)
    return st


def step_bench(args, out_dir: Path, peak) -> dict:
    params = {"losses": list(QUICK_BENCH_LOSSES if args.quick else BENCH_LOSSES), "dtypes": list(BENCH_DTYPES),
              "ns": list(BENCH_NS), "cs": list(QUICK_BENCH_CS if args.quick else BENCH_CS),
              "compile": not args.quick, "min_time": 0.05, "max_repeats": 100,
              "max_step_s": 1.0, "compile_reserve_s": 15.0, "peak_gbps": peak,
              "segmentation_shape": list(SEGMENTATION_SHAPE), "segmentation_losses": list(SEGMENTATION_LOSSES),
              "soft_shape": list(SOFT_SHAPE),
              # The worker stops starting rows a little before the hard limit, to write its results.
              "budget_s": max(1.0, args.bench_timeout - 10)}
    st = _run_worker_step("bench", params, out_dir, args.bench_timeout)
    st["params"] = params
    skipped = sum(1 for r in st.get("rows", []) if "all" in r.get("skipped", {}))
    if skipped:
        st.setdefault("note", f"{skipped} rows skipped (time box or memory)")
    return st


def step_launches(args, out_dir: Path) -> dict:
    params = {"shape": list(LAUNCH_SHAPE), "reductions": ["mean"] if args.quick else ["mean", "sum", "none"],
              "reference": not args.quick, "budget_s": max(1.0, args.launches_timeout - 5)}
    st = _run_worker_step("launches", params, out_dir, args.launches_timeout)
    rows = st.get("rows", [])
    mismatches = [r for r in rows if r.get("match") == "NO"]
    if not st.get("launch_counts_available", False) and st["status"] == "ok":
        st["note"] = "apl.fused.launch_counts not available: expected n/a"
    elif mismatches:
        st["note"] = f"{len(mismatches)} of {len(rows)} counts differ from launch_counts"
    return st


def step_epochs(args, out_dir: Path) -> dict:
    from apl.config import TrainConfig

    t_step = time.monotonic()
    modes = [list(m) for m in (QUICK_EPOCH_MODES if args.quick else EPOCH_MODES)]
    base = {"loss": args.epoch_loss, "train_subset": args.train_subset, "data_dir": args.data_dir}
    st = _run_worker_step("epochs", {**base, "modes": modes}, out_dir, args.epochs_timeout)
    st["params"] = {**base, "batch_size": TrainConfig.paper().batch_size, "modes": modes}
    done = {m["mode"] for m in st.get("modes", [])}
    st["modes"] = st.get("modes", []) + [{"mode": m[0], "error": "not reached"} for m in modes if m[0] not in done]
    for m in st["modes"]:
        if "full_epoch_s" not in m and "error" not in m:
            m["error"] = "stopped by the time box" if st["rc"] is None else "did not finish"

    shared_mode = next(m for m in modes if m[0] == SHARED_MODE)
    k = args.shared_runs
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as barrier_dir:
        spawned = [_spawn("epochs", {**base, "modes": [shared_mode],
                                     # Shorter than the step's box, so a run left alone still reports.
                                     "barrier": {"dir": barrier_dir, "index": i, "count": k,
                                                 "timeout_s": 0.6 * args.shared_timeout}},
                          out_dir, f"shared{i}") for i in range(k)]
        codes = _wait([s[0] for s in spawned], args.shared_timeout)
    shared = {"runs": k, "mode": SHARED_MODE, "seconds": time.monotonic() - t0, "rcs": codes}
    per_run = []
    for (_, result_file, log_file), rc in zip(spawned, codes):
        data = _read_json(result_file) or {}
        m = (data.get("modes") or [{}])[0]
        if rc != 0 or "full_epoch_s" not in m or data.get("barrier_timed_out"):
            why = "timed out" if rc is None else m.get("error") or (
                "did not start together" if data.get("barrier_timed_out") else f"exit {rc}: {_log_tail(log_file)}")
            shared["error"] = f"{log_file.name}: {why}"
            break
        per_run.append(m)
    if "error" not in shared:
        slowest = max(per_run, key=lambda m: m["history"][1]["train_time_s"])
        shared.update(
            full_epoch_s=slowest["full_epoch_s"], warmup_s=max(m["warmup_s"] for m in per_run),
            aggregate_images_per_s=sum(m["num_train"] for m in per_run) / slowest["history"][1]["train_time_s"])
    st["shared"] = shared
    st["seconds"] = time.monotonic() - t_step
    if st["status"] == "ok" and "error" in shared:
        st["status"], st["error"] = "failed", "shared runs: " + shared["error"]
    elif "error" in shared:
        st["error"] = (st.get("error", "") + "; shared runs: " + shared["error"]).lstrip("; ")
    return st


def projection(epochs_step: dict) -> dict:
    """The paper grid's projected time per timed mode (see :func:`project_grid`)."""
    runs, epochs = paper_grid_size()
    rows = []
    for m in epochs_step.get("modes", []):
        if "full_epoch_s" in m:
            rows.append({"mode": m["mode"], "concurrent": 1,
                         "seconds": project_grid(m["full_epoch_s"], m["warmup_s"], runs, epochs)})
    sh = epochs_step.get("shared") or {}
    if "full_epoch_s" in sh:
        rows.append({"mode": sh["mode"], "concurrent": sh["runs"],
                     "seconds": project_grid(sh["full_epoch_s"], sh["warmup_s"], runs, epochs, sh["runs"])})
    return {"runs": runs, "epochs": epochs, "rows": rows}


def _nvidia_smi(query: str):
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        proc = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = proc.stdout.strip().splitlines()
    return lines[0].strip() if proc.returncode == 0 and lines else None


def _git_state():
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10)
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("APL_GIT_COMMIT"), None
    if commit.returncode != 0:  # not a checkout (the Docker image): the build argument may say
        return os.environ.get("APL_GIT_COMMIT"), None
    return commit.stdout.strip(), bool(dirty.stdout.strip()) if dirty.returncode == 0 else None


def environment(args, now: _dt.datetime) -> dict:
    import torch

    import apl.losses.fused as fused

    props = torch.cuda.get_device_properties(0)
    name = torch.cuda.get_device_name(0)
    peak = args.peak_gbps or peak_bandwidth_gbps(name)
    commit, dirty = _git_state()
    return {
        "date": now.isoformat(timespec="seconds"), "gpu_name": name,
        "compute_capability": f"{props.major}.{props.minor}", "gpu_memory_gib": props.total_memory / 2**30,
        "sm_count": props.multi_processor_count, "gpu_count": torch.cuda.device_count(),
        "driver_version": _nvidia_smi("driver_version"), "peak_bandwidth_gbps": peak,
        "peak_bandwidth_source": "--peak-gbps" if args.peak_gbps else "data sheet table in gpu_check.py",
        "torch_version": torch.__version__, "cuda_version": torch.version.cuda,
        "cudnn_version": torch.backends.cudnn.version(), "git_commit": commit, "git_dirty": dirty,
        "python_version": platform.python_version(), "platform": platform.platform(),
        "fused_available": fused.is_available(), "fused_cuda_available": fused.cuda_available(),
        "launch_counts_available": getattr(fused, "launch_counts", None) is not None,
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
    }


def check_gpu() -> None:
    """Raise :class:`UsageError` unless torch sees a CUDA GPU."""
    import torch

    if torch.version.cuda is None:
        raise UsageError(f"torch {torch.__version__} is a CPU-only build; the GPU check needs torch with CUDA")
    if not torch.cuda.is_available():
        raise UsageError("no CUDA GPU is visible to torch (torch.cuda.is_available() is False); run the GPU "
                         "check on a machine with an NVIDIA GPU and its driver")


def build_step(args, out_dir: Path) -> dict:
    if args.build_rc is None:
        return {"status": "skipped", "note": "not built by this check (scripts/gpu_check.sh builds)"}
    st = {"rc": args.build_rc, "seconds": args.build_seconds, "archs": args.build_archs}
    if args.build_log and Path(args.build_log).is_file():
        shutil.copyfile(args.build_log, out_dir / "logs" / "build.log")
        st["log"] = "logs/build.log"
    if args.build_rc == 0:
        st.update(status="ok", note=f"TORCH_CUDA_ARCH_LIST={args.build_archs}")
    else:
        st.update(status="failed", error=f"scripts/setup_env.sh --test --cuda exit {args.build_rc}")
    return st


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(args)
    try:
        check_gpu()
    except UsageError as e:
        print(f"gpu_check: {e}", file=sys.stderr)
        return 2
    now = _dt.datetime.now(_dt.timezone.utc)
    env = environment(args, now)
    out_dir = Path(args.out) if args.out else \
        HERE / "gpu_check" / f"{slug(env['gpu_name'])}-{now.strftime('%Y%m%d-%H%M%SZ')}"
    (out_dir / "logs").mkdir(parents=True, exist_ok=True)
    results = {"environment": env, "steps": {"build": build_step(args, out_dir)}}
    print(f"[gpu_check] {env['gpu_name']}, torch {env['torch_version']}: steps {','.join(args.steps)} -> {out_dir}",
          flush=True)
    runners = {"tests": lambda: step_tests(args, out_dir),
               "bench": lambda: step_bench(args, out_dir, env["peak_bandwidth_gbps"]),
               "launches": lambda: step_launches(args, out_dir),
               "epochs": lambda: step_epochs(args, out_dir)}
    for step in STEPS:
        if step not in args.steps:
            results["steps"][step] = {"status": "skipped", "note": "not selected"}
            continue
        print(f"[gpu_check] {step} ...", flush=True)
        t0 = time.monotonic()
        try:
            st = runners[step]()
        except Exception as e:  # a step's own failure is recorded; the next step still runs
            st = {"status": "failed", "error": f"{type(e).__name__}: {e}", "seconds": time.monotonic() - t0}
        results["steps"][step] = st
        print(f"[gpu_check] {step}: {st['status']} ({st.get('seconds', 0):.0f} s)"
              + (f": {st['error']}" if st.get("error") else ""), flush=True)
        if step == "epochs":
            try:
                results["projection"] = projection(st)
            except Exception as e:  # the projection needs apl.grid only; report why it is missing
                results["projection"] = {"error": f"{type(e).__name__}: {e}"}
        write_report(results, out_dir)  # after every step: a killed check still leaves a report
    json_path, md_path = write_report(results, out_dir)
    print(f"[gpu_check] report: {md_path} and {json_path.name}", flush=True)
    failed = [s for s in ("build", "tests") if results["steps"][s]["status"] == "failed"]
    if failed:
        print(f"[gpu_check] FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
