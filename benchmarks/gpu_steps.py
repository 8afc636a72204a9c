"""The GPU check's steps as its parent process runs them (``benchmarks.gpu_check``): each step in its
time box, the worker processes it starts (``benchmarks.gpu_measures.worker_command``), and the dict
its results become in ``gpu_check.json``.

``tests`` runs pytest here; ``bench``, ``launches`` and ``epochs`` run in worker processes
(:mod:`benchmarks.gpu_workers`, :mod:`benchmarks.gpu_epochs`), so a crash, a hang or a CUDA fault in
one is recorded and the others still run; a worker stopped by its time box keeps the rows it wrote.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from apl.config import TrainConfig
from apl.plan import plan_grid
from benchmarks.gpu_measures import (
    BATCH_STEP_SHAPES,
    BENCH_CS,
    BENCH_DTYPES,
    BENCH_LOSSES,
    BENCH_NS,
    EPOCH_MODES,
    LAUNCH_SHAPE,
    QUICK_BENCH_CS,
    QUICK_BENCH_LOSSES,
    QUICK_EPOCH_MODES,
    ROW_GROUP_SHAPE,
    SEGMENTATION_LOSSES,
    SEGMENTATION_SHAPE,
    SHARED_MODE,
    SOFT_SHAPE,
    TEST_SELECTION,
    project_grid,
    worker_command,
)

__all__ = ["parse_pytest_summary", "cuda_tests_skipped", "step_tests", "step_bench", "step_launches", "step_epochs",
           "paper_grid_size", "projection"]

#: The checkout's root: where pytest and the workers run.
ROOT = Path(__file__).resolve().parent.parent


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


def _spawn(step: str, params: dict, out_dir: Path, tag: str):
    """Start a worker process for ``step``; returns (process, result file, log file)."""
    result_file = out_dir / "logs" / f"{tag}.json"
    log_file = out_dir / "logs" / f"{tag}.log"
    result_file.unlink(missing_ok=True)
    log = open(log_file, "w", encoding="utf-8")
    proc = subprocess.Popen(worker_command(step, params, result_file), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
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
              "batch_step_shapes": [list(shape) for shape in BATCH_STEP_SHAPES],
              "row_group_shape": list(ROW_GROUP_SHAPE),
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


def paper_grid_size() -> tuple[int, int]:
    """(runs, epochs per run) of the paper preset's grid (apl.plan.plan_grid), one seed."""
    plan = plan_grid("paper")
    epochs = {cfg.epochs for cfg in plan}
    if len(epochs) != 1:
        raise ValueError(f"the paper grid mixes epoch counts {sorted(epochs)}")
    return len(plan), epochs.pop()
