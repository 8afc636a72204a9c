"""The paper's experiment grid: every loss x noise rate x form x seed, planned and run, resumable.

:func:`plan_grid` lists a preset's runs (:mod:`apl.presets`) in a fixed order;
:func:`run_grid` trains each into ``O/runs/<run name>/`` with :func:`apl.train.train`
(finished runs are skipped, an interrupted one resumes from its checkpoint), here or in one
worker per device (:mod:`apl.runner`), and keeps ``O/manifest.json`` (:mod:`apl.records`)
up to date.

A form is a loss variant trained under its protocol (:data:`apl.presets.FORMS`). CE's loss does
not depend on the variant (:func:`apl.presets.is_variant_free`): it runs once per protocol,
noise rate and seed, labelled with the protocol's own variant, and serves the tables of every
form trained under that protocol (:mod:`apl.report`), never a form of another protocol.
"""
from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

from apl.config import TrainConfig
from apl.devices import parse_devices
from apl.presets import GRID_LOSSES, GRID_NOISE, Preset, get_preset, is_variant_free, protocol_variant
from apl.ray_engine import check_options, run_ray
from apl.records import Manifest, environment, finished_result, run_summary, utc_now
from apl.runner import Progress, run_parallel, run_sequential
from apl.sweeps import expand

__all__ = ["GRID_FIELDS", "ENGINES", "preset_config", "plan_grid", "run_grid"]

#: Config fields the grid itself sets: not allowed as overrides.
GRID_FIELDS = ("loss", "variant", "noise", "seed", "device", "data_dir", "num_threads")
#: Where runs train: here or in local worker processes (apl.runner), or on a Ray cluster (apl.ray_engine).
ENGINES = ("local", "ray")


def preset_config(preset: str, *, loss: str, variant: str, noise: float, seed: int,
                  overrides: dict | None = None) -> TrainConfig:
    """The :class:`~apl.config.TrainConfig` of one grid cell under ``preset``.

    The protocol of ``variant``'s form in the preset, then the preset's own overrides
    (:data:`apl.presets.PRESETS`), then ``overrides`` (e.g. ``{"epochs": 1}``). The loss
    weights follow that protocol (so the paper preset's ma2020 form weights its sums as the
    paper does). ``ValueError`` when ``variant`` is not one of the preset's forms.
    """
    rules = get_preset(preset)
    return _cell_config(rules, rules.protocol_of(variant), loss=loss, variant=variant, noise=noise,
                        seed=seed, overrides=overrides)


def _cell_config(rules: Preset, protocol: str, *, loss: str, variant: str, noise: float, seed: int,
                 overrides: dict | None) -> TrainConfig:
    """:func:`preset_config` with the protocol given."""
    kwargs = {**rules.overrides, **(overrides or {})}
    bad = sorted(set(kwargs) & set(GRID_FIELDS))
    if bad:
        raise ValueError(f"{', '.join(bad)} cannot be overridden: the grid sets them "
                         "(use --losses/--noise/--variants/--seeds/--devices/--data-dir)")
    return TrainConfig.from_protocol(protocol, loss=loss, variant=variant, noise=noise, seed=seed,
                                     **kwargs)


def _check_choice(values, allowed, what: str) -> tuple:
    values = tuple(values)
    if not values:
        raise ValueError(f"no {what} selected")
    unknown = [v for v in values if v not in allowed]
    if unknown:
        raise ValueError(f"unknown {what} {unknown}; the grid has {', '.join(map(str, allowed))}")
    return values


def plan_grid(preset: str, *, seeds: int | None = None, losses=None, noise=None, variants=None,
              overrides: dict | None = None, sweep: dict | None = None) -> list:
    """The grid's configs in run order (seed, form, noise, loss), variant-free losses once per protocol.

    ``seeds`` K gives seeds 0..K-1 (default: the preset's); ``losses``, ``noise``,
    ``variants`` (the preset's forms, by variant) restrict the grid to a subset of its values;
    ``sweep`` (axis -> values, :func:`apl.sweeps.expand`) multiplies the runs it applies to.
    """
    rules = get_preset(preset)
    seeds = rules.seeds if seeds is None else seeds
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds must be an integer >= 1 (seeds 0..K-1), got {seeds!r}")
    losses = _check_choice(GRID_LOSSES if losses is None else losses, GRID_LOSSES, "loss(es)")
    noise = _check_choice(GRID_NOISE if noise is None else [round(float(n), 4) for n in noise],
                          GRID_NOISE, "noise rate(s)")
    variants = _check_choice(rules.variants if variants is None else variants,
                             rules.variants, "variant(s)")
    plan, names = [], set()
    # The grid's own order, whatever order the selection was given in.
    for seed in range(seeds):
        for variant, protocol in (f for f in rules.forms if f[0] in variants):
            for eta in (n for n in GRID_NOISE if n in noise):
                for loss in (name for name in GRID_LOSSES if name in losses):
                    # A variant-free loss's run carries its protocol's own variant: one run per protocol.
                    v = protocol_variant(protocol) if is_variant_free(loss) else variant
                    cfg = _cell_config(rules, protocol, loss=loss, variant=v, noise=eta, seed=seed,
                                       overrides=overrides)
                    if cfg.run_name() not in names:
                        names.add(cfg.run_name())
                        plan.append(cfg)
    return expand(plan, sweep, fixed=GRID_FIELDS)


def run_grid(preset: str, data_dir, out, *, seeds: int | None = None, devices: str | None = None,
             fresh: bool = False, losses=None, noise=None, variants=None,
             overrides: dict | None = None, progress: bool = True,
             command: str | None = None, sweep: dict | None = None, engine: str = "local",
             ray_options: dict | None = None) -> dict:
    """Run (or finish) the grid into ``out``; return the manifest.

    Finished runs are kept, interrupted ones resume; ``fresh=True`` first deletes the
    planned runs' folders and the manifest. Grids started at once on one ``out`` share it: each
    run is trained by one of them (the others leave it, status ``busy``) and the manifest keeps
    every grid's entries. Raises ``RuntimeError`` naming the runs that failed (the others still
    run to the end), ``ValueError`` when ``out`` cannot be written. ``engine="ray"`` trains on a
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
    try:
        runs_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create {runs_dir} ({e.strerror}): the output folder must be writable") from e
    manifest = Manifest(out, fresh)
    manifest.start(
        preset=preset, command=command or f"python -m apl grid --preset {preset} --out {out}",
        started_at=utc_now(), data_dir=str(Path(data_dir).absolute()),
        seeds=list(range(max(c.seed for c in plan) + 1)),
        losses=sorted({c.loss for c in plan}, key=GRID_LOSSES.index),
        noise=sorted({c.noise for c in plan}), variants=sorted({c.variant for c in plan}),
        forms=[[v, p] for v, p in get_preset(preset).forms if variants is None or v in variants],
        overrides=dict(sorted((overrides or {}).items())), sweep=dict(sweep or {}), engine=engine,
        **environment(device_list))
    pending = []
    for cfg in plan:
        name = cfg.run_name()
        manifest.run(name, config=cfg.to_dict())
        done = finished_result(runs_dir / name, cfg)
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
    manifest.finish(wall_time_s=round(time.perf_counter() - t0, 1))
    # This grid's runs that another process was training (the manifest may list other grids' runs too).
    busy = sorted(c.run_name() for c in plan if manifest.data["runs"][c.run_name()].get("status") == "busy")
    if busy:
        print(f"[grid] {len(busy)} run(s) left to the other process(es) training them: {', '.join(busy)}; "
              f"run the grid again once they end", file=sys.stderr)
    if failures:
        raise RuntimeError(f"{len(failures)} run(s) failed: {', '.join(failures)} "
                           f"(details in {manifest.path})")
    return manifest.data
