"""GPU check: the fused losses' CUDA tests, speed, kernel launches and training-epoch times on one GPU.

``python -m benchmarks.gpu_check [options]`` from the checkout's root. Meant for a machine with an
NVIDIA GPU and the pinned torch; ``scripts/gpu_check.sh`` builds the kernels for that GPU first and
then runs this module (about 8 minutes in all on an H100-class GPU). The steps, each in its own
time box (:mod:`benchmarks.gpu_steps`):

- ``tests``: ``pytest -q tests -k "cuda or test_fused"`` (every CUDA-parametrised test and
  the whole of tests/test_fused.py); failed when pytest fails or the CUDA tests were skipped;
- ``bench``: forward + backward of the fused operator, the eager reference, the
  ``torch.compile``d reference (``dynamic=True``: one compile per loss and dtype) and, for CE,
  ``F.cross_entropy``, in float32 and bfloat16, median ms (``time_steps`` of
  benchmarks/bench_losses.py), achieved GB/s and the fraction of the GPU's peak memory
  bandwidth; then the (N, C, H, W) segmentation layout, soft targets (probability targets, CE
  label smoothing), the batch step at 262,144 and 33M rows and the CUDA row groups at 128 x 10,
  in float32; a contender that runs out of memory or takes too long is skipped with the reason;
- ``launches``: CUDA kernels per forward and per backward call of the fused operator
  (``torch.profiler``), for every loss x variant x reduction, against
  ``apl.fused.launch_counts(spec, reduction)`` where that exists;
- ``epochs``: one training epoch of the paper preset on a subset, scaled to the full
  50,000-image epoch, in fp32, bf16 autocast, channels_last on/off and torch.compile, and with
  several runs sharing the GPU; from these, the projected time of the paper grid.

``bench``, ``launches`` and ``epochs`` run in worker processes (:mod:`benchmarks.gpu_workers`,
:mod:`benchmarks.gpu_epochs`), so a crash, a hang or a CUDA fault in one is recorded and the others
still run. Everything goes to one folder (default ``benchmarks/gpu_check/<gpu>-<UTC time>/``):
``gpu_check.json``, ``README.md`` (:mod:`benchmarks.gpu_report`) and the steps' logs. Exit status:
0 when the build (as reported by gpu_check.sh) and the tests passed, 1 when either failed, 2 for
bad arguments or when no GPU is visible. Pick the GPU with CUDA_VISIBLE_DEVICES. What each step
measures, and its shapes and time boxes: :mod:`benchmarks.gpu_measures`.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

import apl.losses.fused as fused
from apl.jsonio import git_state
from apl.losses.spec import LOSS_NAMES
from benchmarks.gpu_measures import STEPS, TIME_BOXES, peak_bandwidth_gbps
from benchmarks.gpu_report import write_report
from benchmarks.gpu_steps import projection, step_bench, step_epochs, step_launches, step_tests

#: The default output folder's parent: benchmarks/gpu_check/<gpu>-<UTC time>/.
HERE = Path(__file__).resolve().parent


class UsageError(Exception):
    """A condition that ends the check with a one-line message and exit status 2."""


# --------------------------------------------------------------------------- helpers

def slug(text: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"``: a folder-name part."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "gpu"


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
        prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0],
        epilog="scripts/gpu_check.sh builds the kernels for this GPU and then runs this module with "
               "the --build-* options; run the module directly (no build) with --steps or "
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

    if args.epoch_loss not in LOSS_NAMES:
        build_parser().error(f"--epoch-loss must be one of {', '.join(LOSS_NAMES)}, got {args.epoch_loss!r}")
    return args


# --------------------------------------------------------------------------- the machine and the build

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


def environment(args, now: _dt.datetime) -> dict:


    props = torch.cuda.get_device_properties(0)
    name = torch.cuda.get_device_name(0)
    peak = args.peak_gbps or peak_bandwidth_gbps(name)
    commit, dirty = git_state()
    return {
        "date": now.isoformat(timespec="seconds"), "gpu_name": name,
        "compute_capability": f"{props.major}.{props.minor}", "gpu_memory_gib": props.total_memory / 2**30,
        "sm_count": props.multi_processor_count, "gpu_count": torch.cuda.device_count(),
        "driver_version": _nvidia_smi("driver_version"), "peak_bandwidth_gbps": peak,
        "peak_bandwidth_source": "--peak-gbps" if args.peak_gbps else "data sheet table in benchmarks/gpu_measures.py",
        "torch_version": torch.__version__, "cuda_version": torch.version.cuda,
        "cudnn_version": torch.backends.cudnn.version(), "git_commit": commit, "git_dirty": dirty,
        "python_version": platform.python_version(), "platform": platform.platform(),
        "fused_available": fused.is_available(), "fused_cuda_available": fused.cuda_available(),
        "launch_counts_available": getattr(fused, "launch_counts", None) is not None,
        "command": " ".join(["python -m benchmarks.gpu_check"] + sys.argv[1:]),
    }


def check_gpu() -> None:
    """Raise :class:`UsageError` unless torch sees a CUDA GPU."""

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
