"""The GPU check's report: ``gpu_check.json`` (strict JSON) and the ``README.md`` rendered from it.

:func:`write_report` replaces both files whole (the check rewrites them after every step, so a killed
check still leaves a readable report); :func:`render_markdown` turns the results dict of
``benchmarks.gpu_check`` into the Markdown tables. The number formats are bench_losses.py's.
"""
from __future__ import annotations

import json
from pathlib import Path

from apl.jsonio import jsonable, save_text
from benchmarks.bench_losses import fmt_ms, markdown_header, markdown_row, ratio
from benchmarks.gpu_measures import BYTES_MODEL, FULL_TEST, FULL_TRAIN, LAUNCH_SHAPE, ROW_GROUPS, STEPS

__all__ = ["write_report", "render_markdown"]


def write_report(results: dict, out_dir) -> tuple[Path, Path]:
    """Write ``gpu_check.json`` (strict JSON) and ``README.md`` into ``out_dir``; return both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "gpu_check.json", out / "README.md"
    save_text(json_path, json.dumps(jsonable(results), indent=1, allow_nan=False) + "\n")
    save_text(md_path, render_markdown(results) + "\n")
    return json_path, md_path


def _fmt(v, digits=2, unit=""):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}{unit}"
    return f"{v}{unit}"


def _fmt_gbps(v):
    return "-" if v is None else f"{v:.0f}" if v >= 100 else f"{v:.1f}" if v >= 1 else f"{v:.3f}"


def _hours(seconds):
    return "-" if seconds is None else f"{seconds / 3600:.2f} h"


def _table(header, rows) -> list:
    return markdown_header(header) + [markdown_row(r) for r in rows]


def _skipped(row: dict) -> str:
    """What a timing row left out, and why."""
    return "; ".join(f"{k}: {v}" for k, v in (row.get("skipped") or {}).items())


def _shape_table(rows: list, timed: tuple, ratios: tuple) -> list:
    """A table of (loss, shape) timing rows: each ``timed`` contender's median ms, then each ratio
    ``(label, a, b)`` as a / b, then what was skipped."""
    header = ["loss", "shape", *timed, *(label for label, _, _ in ratios), "skipped"]
    body = []
    for r in rows:
        ms = r.get("seconds", {})
        body.append([r["loss"], "x".join(map(str, r["shape"])), *(fmt_ms(ms.get(k)) for k in timed),
                     *(ratio(ms.get(a), ms.get(b)) for _, a, b in ratios), _skipped(r)])
    return _table(header, body)


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
            frac = (r.get("fraction_of_peak") or {}).get("fused")
            rows.append([r["loss"], r["dtype"], r["n"], r["c"], fmt_ms(f), fmt_ms(ms.get("reference")),
                         fmt_ms(ms.get("compiled")), fmt_ms(ms.get("F.cross_entropy")),
                         _fmt_gbps((r.get("gbps") or {}).get("fused")),
                         "-" if frac is None else f"{100 * frac:.0f}%",
                         ratio(ms.get("reference"), f), ratio(ms.get("compiled"), f),
                         ratio(f, ms.get("F.cross_entropy")), _skipped(r)])
        lines += _table(header, rows) + [""]

    if bench and bench.get("segmentation"):
        lines += ["## Segmentation layout: forward + backward, median ms, float32", "",
                  "`fused`: the (N, C, H, W) logits as users pass them (read in place); "
                  "`fused on rows`: the same positions already laid out as (N*H*W, C).", ""]
        lines += _shape_table(bench["segmentation"], ("fused", "fused on rows", "F.cross_entropy"),
                              (("fused/F.ce", "fused", "F.cross_entropy"),)) + [""]

    if bench and bench.get("soft"):
        lines += ["## Distribution targets: forward + backward, median ms, float32", "",
                  "Probability targets (a floating target of the logits' shape), and CE `label_smoothing` on "
                  "class indices, through the module on each backend.", ""]
        lines += _shape_table(bench["soft"], ("fused", "reference", "F.cross_entropy"),
                              (("reference/fused", "reference", "fused"), ("fused/F.ce", "fused", "F.cross_entropy"))) \
            + [""]

    if bench and bench.get("batch_step"):
        lines += ["## Batch step: forward alone, median ms, float32", "",
                  "CE with `reduction=\"none\"` is the row kernel alone; `\"mean\"` adds the batch step (a block "
                  "per 4096 rows, the last combining); `batch step` is their difference; NCE (paper) adds its "
                  "label histogram.", ""]
        lines += _shape_table(bench["batch_step"], ("CE none", "CE mean", "batch step", "NCE (paper) mean"),
                              (("step/row pass", "batch step", "CE none"),)) + [""]

    if bench and bench.get("row_groups"):
        lines += ["## CUDA row groups at small C: forward + backward, median ms, float32", "",
                  "CE with each group of threads per row forced; `plan` is the launch plan's own choice "
                  "(16 lanes at C = 10).", ""]
        groups = tuple(ROW_GROUPS.values())
        lines += _shape_table(bench["row_groups"], groups,
                              tuple((f"{g}/plan", g, "plan") for g in groups[1:])) + [""]

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

