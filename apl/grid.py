"""The paper's experiment grid run: every loss x noise rate x form x seed, resumable.

:func:`run_grid` trains each run of :func:`apl.plan.plan_grid` into ``O/runs/<run name>/`` with
:func:`apl.train.train` (finished runs are skipped, an interrupted one resumes from its
checkpoint), here, in one worker per device (:mod:`apl.runner`) or on Ray (:mod:`apl.ray_engine`),
and keeps ``O/manifest.json`` (:mod:`apl.records`) up to date.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

from apl.data import ensure_cifar10
from apl.devices import parse_devices
from apl.errors import OutputError, RunInUse, RunsFailed
from apl.plan import ENGINES, plan_grid
from apl.presets import get_preset
from apl.ray_engine import check_options, run_ray
from apl.records import Manifest, environment, finished_result, run_summary, utc_now
from apl.runner import Progress, run_parallel, run_sequential

__all__ = ["run_grid"]


def run_grid(preset: str, data_dir, out, *, seeds: int | None = None, devices: str | None = None,
             fresh: bool = False, losses=None, noise=None, variants=None,
             overrides: dict | None = None, progress: bool = True,
             command: str | None = None, sweep: dict | None = None, engine: str = "local",
             ray_options: dict | None = None, download: bool | None = None) -> dict:
    """Run (or finish) the grid into ``out``; return the manifest.

    Finished runs are kept, interrupted ones resume; ``fresh=True`` first deletes the
    planned runs' folders and the manifest. Grids started at once on one ``out`` share it: each
    run is trained by one of them (the others leave it, status ``busy``) and the manifest keeps
    every grid's entries. CIFAR-10 is looked for (and downloaded as ``download`` says,
    :func:`apl.data.ensure_cifar10`) before anything is written, when a run is left to train.
    Raises :class:`~apl.errors.RunsFailed` naming the runs that failed (the others still run to the
    end), :class:`~apl.errors.RunInUse` naming the runs left unfinished to other processes,
    :class:`~apl.errors.OutputError` when ``out`` cannot be written, :class:`~apl.errors.DataError`
    when the data is missing or damaged (a parallel grid stops at once). ``engine="ray"`` trains on a
    Ray cluster (:func:`apl.ray_engine.run_ray` with ``ray_options``) instead of ``devices``.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if engine == "ray" and devices is not None:
        raise ValueError("--devices is for the local engine; on Ray use --gpus-per-run/--cpus-per-run")
    ray_options = check_options(**(ray_options or {})) if engine == "ray" else None
    plan = plan_grid(preset, seeds=seeds, losses=losses, noise=noise, variants=variants,
                     overrides=overrides, sweep=sweep)
    device_list = parse_devices(devices, preset)
    t0 = time.perf_counter()
    out = Path(out)
    runs_dir = out / "runs"
    if fresh:
        for cfg in plan:
            shutil.rmtree(runs_dir / cfg.run_name(), ignore_errors=True)
    finished = {c.run_name(): r for c in plan if (r := finished_result(runs_dir / c.run_name(), c)) is not None}
    if len(finished) < len(plan):
        ensure_cifar10(data_dir, download)  # no data, no grid: said once, before anything is written
    try:
        runs_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create {runs_dir} ({e.strerror}): the output folder must be writable; "
                          f"fix that and run the same command again") from e
    manifest = Manifest(out, fresh)
    manifest.start(
        preset=preset, command=command or f"python -m apl grid --preset {preset} --out {out}",
        started_at=utc_now(), data_dir=str(Path(data_dir).absolute()),
        seeds=list(range(max(c.seed for c in plan) + 1)),
        losses=sorted({c.loss for c in plan}, key=get_preset(preset).losses.index),
        noise=sorted({c.noise for c in plan}), variants=sorted({c.variant for c in plan}),
        forms=[[v, p] for v, p in get_preset(preset).forms if variants is None or v in variants],
        overrides=dict(sorted((overrides or {}).items())), sweep=dict(sweep or {}), engine=engine,
        **environment(device_list))
    pending = []
    for cfg in plan:
        name = cfg.run_name()
        manifest.run(name, config=cfg.to_dict())
        done = finished.get(name)
        if done is not None:
            manifest.run(name, **run_summary(done))
        else:
            manifest.run(name, status="pending")
            pending.append(cfg)
    manifest.save()
    workers = len(device_list)
    bar = Progress(sum(c.epochs for c in pending), min(workers, max(len(pending), 1)), progress)
    bar.say(f"[grid] preset {preset}: {len(plan)} runs, {len(plan) - len(pending)} already finished, "
            f"{len(pending)} to run on "
            f"{'a Ray cluster' if engine == 'ray' else ', '.join(d for d, _ in device_list)} -> {runs_dir}")
    try:
        if not pending:
            failures = []
        elif engine == "ray":
            failures = run_ray(pending, runs_dir, data_dir, manifest, bar, **ray_options)
        elif workers == 1:
            failures = run_sequential(pending, runs_dir, device_list[0], data_dir, manifest, bar,
                                      progress)
        else:
            failures = run_parallel(pending, runs_dir, device_list, data_dir, manifest, bar)
    finally:
        bar.close()
    busy = _still_busy(plan, runs_dir, manifest)
    manifest.finish(wall_time_s=round(time.perf_counter() - t0, 1))
    left = f"{len(busy)} run(s) left to the other process(es) training them: {', '.join(busy)}" if busy else ""
    if failures:
        raise RunsFailed(f"{len(failures)} run(s) failed: {', '.join(failures)} (details in {manifest.path})"
                         + (f"; {left}" if left else "") + "; fix the cause and run the same command again")
    if busy:
        raise RunInUse(f"{left}; run the same command again once they end")
    return manifest.data


def _still_busy(plan: list, runs_dir: Path, manifest: Manifest) -> list[str]:
    """This grid's runs left to other processes that have not finished since (those that have are
    recorded done); the manifest may list other grids' runs too."""
    busy = []
    for cfg in plan:
        name = cfg.run_name()
        if manifest.data["runs"][name].get("status") != "busy":
            continue
        done = finished_result(runs_dir / name, cfg)
        if done is None:
            busy.append(name)
        else:
            manifest.run(name, **run_summary(done))
    return sorted(busy)
