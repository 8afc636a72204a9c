"""The GPU check's loss measurements, each run in a worker process of its own (``python -m
benchmarks.gpu_workers STEP PARAMS_JSON OUT``, started by ``benchmarks.gpu_check``).

- ``bench``: forward + backward of the fused operator and its contenders per loss, dtype and shape
  (:func:`worker_bench`), then the segmentation layout (:func:`segmentation_rows`), the soft
  targets (:func:`soft_rows`), whose contenders are bench_losses.py's, the batch step at large N
  (:func:`batch_step_rows`) and the CUDA row groups at small C (:func:`row_group_rows`);
- ``launches``: CUDA kernels per forward and backward call, by ``torch.profiler``, against
  ``apl.fused.launch_counts`` (:func:`worker_launches`).

Each writes its results to OUT after every row, so a worker stopped by its time box keeps what it measured.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

import apl.losses.fused as fused
from apl.losses import APLLoss, reference_loss
from apl.losses.spec import LOSS_NAMES, VARIANTS, spec_for
from benchmarks.bench_losses import (
    LOSSES,
    SOFT_LOSSES,
    layout_rows,
    soft_contenders,
    sync,
    time_steps,
    with_cross_entropy,
)
from benchmarks.gpu_measures import (
    ROW_GROUPS,
    achieved_gbps,
    fraction_of_peak,
    loss_bytes,
    run_worker,
    save_results,
)

__all__ = ["bench_specs", "worker_bench", "segmentation_rows", "soft_rows", "batch_step_rows", "row_group_rows",
           "count_kernels", "loss_variants", "worker_launches"]


def bench_specs() -> dict:
    """The speed table's losses: bench_losses.py's, plus NFL (paper)."""
    return {**LOSSES, "NFL (paper)": spec_for("nfl", variant="paper")}


def _free(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()


def worker_bench(p: dict, out: Path) -> None:
    """The ``bench`` step: the speed table's rows, then :func:`segmentation_rows` and :func:`soft_rows`."""
    device = p.get("device", "cuda")
    specs = bench_specs()
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
                    contenders = with_cross_entropy(contenders, spec)
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
                    row["seconds"] = _time_contenders(contenders, logits, target, device, p, row)
                    nbytes = loss_bytes(n, c, logits.element_size(), target.element_size())
                    row["bytes"] = nbytes
                    row["gbps"] = {k: achieved_gbps(nbytes, v) for k, v in row["seconds"].items()}
                    row["fraction_of_peak"] = {k: fraction_of_peak(v, peak) for k, v in row["gbps"].items()}
                    del logits, target
                    _free(device)
                    result["rows"] = rows
                    save_results(out, result)
    result["rows"] = rows
    result["segmentation"] = segmentation_rows(p, specs, device, deadline)
    result["soft"] = soft_rows(p, device, deadline)
    result["batch_step"] = batch_step_rows(p, device, deadline)
    result["row_groups"] = row_group_rows(p, device, deadline)
    save_results(out, result)


def segmentation_rows(p, specs, device, deadline) -> list:
    """Forward + backward of the (N, C, H, W) layout as users pass it, of the same positions as
    (N*H*W, C) rows, and of F.cross_entropy (CE), in float32."""
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
        contenders = with_cross_entropy({"fused": module}, specs[loss_name])
        row["seconds"] = _time_contenders(contenders, logits, target, device, p, row)
        as_rows, rows_target = layout_rows(logits, target)
        on_rows = _time_contenders({"rows": module}, as_rows, rows_target, device, p, row)
        if "rows" in on_rows:
            row["seconds"]["fused on rows"] = on_rows["rows"]
        del logits, target, as_rows, rows_target
        _free(device)
    return rows


def soft_rows(p, device, deadline) -> list:
    """Forward + backward of distribution targets (bench_losses.SOFT_LOSSES: probability targets,
    and CE label smoothing on class indices) through the module on each backend, and of
    F.cross_entropy (CE alone), in float32."""
    n, c = p["soft_shape"]
    rows = []
    for loss_name, (spec, probabilities) in SOFT_LOSSES.items():
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
        row["seconds"] = _time_contenders(soft_contenders(spec), logits, target, device, p, row)
        del logits, target
        _free(device)
    return rows


def batch_step_rows(p, device, deadline) -> list:
    """Forward alone of CE with ``reduction="none"`` (the row kernel alone), ``"mean"`` (the row kernel
    and the batch step), and NCE (paper)'s ``"mean"`` (the batch step with its label histogram), at each
    of ``p["batch_step_shapes"]``; ``batch step`` is the difference of the first two, float32."""
    specs = {"CE none": (spec_for("ce"), "none"), "CE mean": (spec_for("ce"), "mean"),
             "NCE (paper) mean": (spec_for("nce", variant="paper"), "mean")}
    rows = []
    for n, c in p["batch_step_shapes"]:
        row = {"loss": "CE, NCE (paper)", "shape": [n, c], "seconds": {}, "skipped": {}}
        rows.append(row)
        if time.monotonic() > deadline:
            row["skipped"]["all"] = "time box"
            continue
        try:
            g = torch.Generator(device=device).manual_seed(0)
            logits = torch.randn(n, c, device=device, generator=g)
            target = torch.randint(0, c, (n,), device=device, generator=g)
            contenders = {name: lambda x, y, s=spec, r=reduction: fused.fused_loss(x, y, s, r)
                          for name, (spec, reduction) in specs.items()}
            row["seconds"].update(time_steps(contenders, logits, target, device, min_time=p["min_time"],
                                             max_repeats=p["max_repeats"], backward=False))
            row["seconds"]["batch step"] = row["seconds"]["CE mean"] - row["seconds"]["CE none"]
            del logits, target
        except torch.OutOfMemoryError:
            row["skipped"]["all"] = "out of memory"
        _free(device)
    return rows


def row_group_rows(p, device, deadline) -> list:
    """Forward + backward of CE at ``p["row_group_shape"]`` with each CUDA row group forced
    (:data:`ROW_GROUPS`; the launch plan's own is ``plan``), float32: does the plan's pay off?"""
    n, c = p["row_group_shape"]
    row = {"loss": "CE", "shape": [n, c], "seconds": {}, "skipped": {}}
    if device != "cuda":
        row["skipped"]["all"] = "the CUDA row groups need a GPU"
        return [row]
    if time.monotonic() > deadline:
        row["skipped"]["all"] = "time box"
        return [row]
    g = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(n, c, device=device, generator=g) * 3
    target = torch.randint(0, c, (n,), device=device, generator=g)
    spec = spec_for("ce")
    for threads, label in ROW_GROUPS.items():
        before = torch.ops.apl._set_cuda_row_group(threads)
        try:
            row["seconds"].update(_time_contenders({label: lambda x, y: fused.fused_loss(x, y, spec)},
                                                   logits, target, device, p, row))
        finally:
            torch.ops.apl._set_cuda_row_group(before)
    return [row]


def _time_contenders(contenders, logits, target, device, p, row) -> dict:
    """Median seconds per contender, taking turns; one at a time when together they do not fit."""
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
    x = logits.detach().clone().requires_grad_()
    dt = 0.0
    try:
        for i in range(2):
            t0 = time.perf_counter()
            fn(x, target).backward()
            x.grad = None
            sync(device)
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


def count_kernels(fn) -> tuple[int, int]:
    """(kernels, memcpy + memset) the GPU ran for ``fn()``, by torch.profiler."""
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


def loss_variants() -> list:
    """(label, spec) for every loss name x variant, each distinct spec once."""
    out = []
    for name in LOSS_NAMES:
        specs = {variant: spec_for(name, variant=variant) for variant in VARIANTS}
        if len(set(specs.values())) == 1:
            out.append((name, specs[VARIANTS[0]]))
        else:
            out += [(f"{name} ({variant})", spec) for variant, spec in specs.items()]
    return out


def worker_launches(p: dict, out: Path) -> None:
    """The ``launches`` step: kernels per call of every loss x variant x reduction, against launch_counts."""
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
        calibration = count_kernels(lambda: probe.add_(1))[0]
    except Exception as e:  # no CUDA profiling at all: say so instead of a table of zeros
        calibration = f"{type(e).__name__}: {e}"
    result["calibration_kernels"] = calibration
    if calibration != 1:
        seen = f"{calibration} kernels" if isinstance(calibration, int) else calibration
        result["error"] = (f"the profiler does not record CUDA kernels here (one in-place add: {seen}, "
                           f"expected 1 kernel; CUPTI missing?)")
        save_results(out, result)
        return

    def counts(loss_fn):
        x = logits.detach().clone().requires_grad_()
        for _ in range(2):  # warm-up: caching allocator, lazy initialisation
            loss = loss_fn(x)
            torch.autograd.backward(loss, torch.ones_like(loss))
            x.grad = None
        holder = {}
        fwd = count_kernels(lambda: holder.__setitem__("loss", loss_fn(x)))
        grad_out = torch.ones_like(holder["loss"])
        bwd = count_kernels(lambda: torch.autograd.backward(holder["loss"], grad_out))
        return fwd, bwd

    for label, spec in loss_variants():
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
                save_results(out, result)
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
            save_results(out, result)
    save_results(out, result)


WORKERS = {"bench": worker_bench, "launches": worker_launches}

if __name__ == "__main__":
    sys.exit(run_worker(WORKERS))
