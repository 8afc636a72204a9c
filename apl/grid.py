"""The paper's experiment grid: every loss x noise rate x loss variant x seed, resumable.

``python -m apl grid --preset quick|paper|ma2020 --out O`` trains each run of the grid into
``O/runs/<run name>/`` with :func:`apl.train.train` (finished runs are skipped, an
interrupted one resumes from its checkpoint) and keeps ``O/manifest.json`` (machine,
versions, command, per-run config and wall time) up to date. Runs go in a fixed order,
either in this process or, with ``--devices cuda:0,cuda:1`` (or ``cpu,cpu``), in one worker
process per device taking runs from a shared queue; each run's result depends only on its
config, so both give the same records.

CE's loss does not depend on the variant (``is_variant_free``): it runs once per noise rate
and seed and serves both variants' tables (:mod:`apl.report`).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import fields
from functools import lru_cache
from pathlib import Path

from apl.spec import spec_for

__all__ = [
    "GRID_LOSSES", "GRID_NOISE", "GRID_VARIANTS", "PRESETS", "QUICK_OVERRIDES",
    "is_variant_free", "loss_label", "preset_config", "plan_grid", "parse_devices",
    "run_grid", "describe_protocol", "preset_banner", "add_cli", "main",
]

#: The paper's eight losses, in the row order of its Table 1.
GRID_LOSSES = ("nce", "nfl", "ce", "fl", "nce+mae", "nfl+rce", "nfl+mae", "nce+rce")
#: Symmetric noise rates: the paper's four plus a clean reference.
GRID_NOISE = (0.0, 0.2, 0.4, 0.6, 0.8)
#: Loss variants (LOSSES.md): the seed paper's formulas and the cited work's.
GRID_VARIANTS = ("paper", "ma2020")
PRESETS = ("quick", "paper", "ma2020")
#: The quick preset: the paper's protocol scaled to run the whole grid (75 runs) in at most
#: 10 minutes on a 2-core CPU (measured; see the project README): a class-balanced subset
#: of CIFAR-10, fewer epochs, a narrower PaperCNN.
QUICK_OVERRIDES = {"train_subset": 4000, "test_subset": 1000, "epochs": 5, "width": 0.125,
                   "batch_size": 32}
#: CPU worker processes the quick preset uses when --devices is not given (measured).
QUICK_CPU_WORKERS = 2
_DEFAULT_SEEDS = {"quick": 1, "paper": 1, "ma2020": 3}
_DEFAULT_VARIANTS = {"quick": GRID_VARIANTS, "paper": GRID_VARIANTS, "ma2020": ("ma2020",)}
#: Config fields the grid itself sets: not allowed in --set.
_GRID_FIELDS = ("loss", "variant", "noise", "seed", "device", "data_dir", "num_threads")
_MANIFEST = "manifest.json"


# --------------------------------------------------------------------------- the grid

@lru_cache(maxsize=None)
def is_variant_free(loss: str) -> bool:
    """True when ``loss`` is the same function in both variants (CE): one run serves both."""
    return spec_for(loss, variant="paper") == spec_for(loss, variant="ma2020")


def loss_label(loss: str) -> str:
    """The display name of a loss, as the paper prints it (``"nce+rce"`` -> ``"NCE+RCE"``)."""
    return loss.upper()


def _factory(preset: str):
    from apl.config import TrainConfig

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; use one of {', '.join(PRESETS)}")
    return TrainConfig.ma2020 if preset == "ma2020" else TrainConfig.paper


def _canonical_variant(preset: str) -> str:
    """The variant label a variant-free loss's run carries: the preset's own default."""
    return _factory(preset)().variant


def preset_config(preset: str, *, loss: str, variant: str, noise: float, seed: int,
                  overrides: dict | None = None):
    """The :class:`~apl.config.TrainConfig` of one grid cell under ``preset``.

    ``paper``: ``TrainConfig.paper`` (Adam 1e-3, 30 epochs, lam 0.6); ``quick``: the same
    scaled by :data:`QUICK_OVERRIDES`; ``ma2020``: ``TrainConfig.ma2020`` (the cited work's
    protocol). ``overrides`` (e.g. ``{"epochs": 1}``) apply last. Under every preset the
    variant changes only the loss forms; the weights follow the preset.
    """
    factory = _factory(preset)
    kwargs = dict(QUICK_OVERRIDES) if preset == "quick" else {}
    kwargs.update(overrides or {})
    bad = sorted(set(kwargs) & set(_GRID_FIELDS))
    if bad:
        raise ValueError(f"{', '.join(bad)} cannot be overridden: the grid sets them "
                         "(use --losses/--noise/--variants/--seeds/--devices/--data-dir)")
    return factory(loss=loss, variant=variant, noise=noise, seed=seed, **kwargs)


def _check_choice(values, allowed, what: str) -> tuple:
    values = tuple(values)
    if not values:
        raise ValueError(f"no {what} selected")
    unknown = [v for v in values if v not in allowed]
    if unknown:
        raise ValueError(f"unknown {what} {unknown}; the grid has {', '.join(map(str, allowed))}")
    return values


def plan_grid(preset: str, *, seeds: int | None = None, losses=None, noise=None, variants=None,
              overrides: dict | None = None) -> list:
    """The grid's configs in run order (seed, variant, noise, loss), variant-free losses once.

    ``seeds`` K gives seeds 0..K-1 (default: 1, or 3 for the ma2020 preset); ``losses``,
    ``noise``, ``variants`` restrict the grid to a subset of its values.
    """
    _factory(preset)
    seeds = _DEFAULT_SEEDS[preset] if seeds is None else seeds
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds must be an integer >= 1 (seeds 0..K-1), got {seeds!r}")
    losses = _check_choice(GRID_LOSSES if losses is None else losses, GRID_LOSSES, "loss(es)")
    noise = _check_choice(GRID_NOISE if noise is None else [round(float(n), 4) for n in noise],
                          GRID_NOISE, "noise rate(s)")
    variants = _check_choice(_DEFAULT_VARIANTS[preset] if variants is None else variants,
                             GRID_VARIANTS, "variant(s)")
    canonical = _canonical_variant(preset)
    plan, names = [], set()
    # The grid's own order, whatever order the selection was given in.
    for seed in range(seeds):
        for variant in (v for v in GRID_VARIANTS if v in variants):
            for eta in (n for n in GRID_NOISE if n in noise):
                for loss in (l for l in GRID_LOSSES if l in losses):
                    v = canonical if is_variant_free(loss) else variant
                    cfg = preset_config(preset, loss=loss, variant=v, noise=eta, seed=seed,
                                        overrides=overrides)
                    if cfg.run_name() not in names:
                        names.add(cfg.run_name())
                        plan.append(cfg)
    return plan


# --------------------------------------------------------------------------- devices

def parse_devices(spec: str | None, preset: str = "paper") -> list[tuple[str, int | None]]:
    """``"cuda:0,cuda:1"`` / ``"cpu,cpu"`` / ``"auto"`` -> ``[(device, threads per worker)]``.

    ``auto`` (or None): every visible GPU, else the preset's CPU default (the quick preset:
    :data:`QUICK_CPU_WORKERS` workers). CPU workers share the cores evenly. Each device is
    checked to exist (``ValueError`` otherwise).
    """
    import torch

    from apl.train import resolve_device

    if spec is None or spec.strip() in ("", "auto"):
        if torch.cuda.is_available():
            names = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        else:
            workers = QUICK_CPU_WORKERS if preset == "quick" else 1
            names = ["cpu"] * max(1, min(workers, os.cpu_count() or 1))
    else:
        names = [s.strip() for s in spec.split(",")]
        if any(not s for s in names):
            raise ValueError(f"empty entry in --devices {spec!r}; e.g. cuda:0,cuda:1 or cpu,cpu")
    for name in names:
        resolve_device(name)
        if name.startswith("cuda:") and int(name.split(":")[1]) >= torch.cuda.device_count():
            raise ValueError(f"device {name} does not exist ({torch.cuda.device_count()} GPU(s) here)")
    n_cpu = sum(1 for n in names if n == "cpu")
    threads = max(1, (os.cpu_count() or 1) // n_cpu) if n_cpu > 1 else None
    return [(n, threads if n == "cpu" else None) for n in names]


# --------------------------------------------------------------------------- manifest

def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _git_state() -> tuple[str | None, bool | None]:
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("APL_GIT_COMMIT"), None
    if commit.returncode != 0:  # not a checkout (e.g. the Docker image): the build may say
        return os.environ.get("APL_GIT_COMMIT"), None
    return commit.stdout.strip(), bool(dirty.stdout.strip()) if dirty.returncode == 0 else None


def _environment(devices) -> dict:
    import torch
    import torchvision

    from apl.train import device_name, resolve_device

    commit, dirty = _git_state()
    return {
        "git_commit": commit, "git_dirty": dirty, "python_version": platform.python_version(),
        "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "torch_version": torch.__version__, "torchvision_version": torchvision.__version__,
        "cuda_version": torch.version.cuda,
        "cudnn_version": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
        "devices": [{"device": d, "threads": t, "name": device_name(resolve_device(d))}
                    for d, t in devices],
    }


class _Manifest:
    """``<out>/manifest.json``: written atomically, rewritten whenever a run finishes."""

    def __init__(self, out: Path, fresh: bool):
        self.path = out / _MANIFEST
        old = {}
        if self.path.exists() and not fresh:
            try:
                old = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                old = {}  # a manifest is a record, not an input: start a new one
        self.data = {"runs": old.get("runs", {}), "invocations": old.get("invocations", [])}

    def start(self, **info) -> None:
        self.data.update(info)
        self.data["finished_at"] = None
        self.data["invocations"].append({"command": info["command"], "started_at": info["started_at"],
                                         "finished_at": None})
        self.save()

    def run(self, name: str, **fields_) -> None:
        self.data["runs"].setdefault(name, {}).update(fields_)

    def finish(self) -> None:
        self.data["finished_at"] = self.data["invocations"][-1]["finished_at"] = _now()
        self.save()

    def save(self) -> None:
        from apl.train import save_json

        save_json(self.path, dict(sorted(self.data.items())))


def _summary(result: dict) -> dict:
    keys = ("final_test_acc", "best_test_acc", "best_epoch", "wall_time_s", "device",
            "device_name", "loss_backend", "data_source", "finished_at")
    return {"status": "done", **{k: result.get(k) for k in keys}}


# --------------------------------------------------------------------------- running

def _finished_result(run_dir: Path, cfg) -> dict | None:
    """The run's result when it finished with this very config; else None (train decides:
    it resumes a checkpoint, and refuses a folder holding another config's run)."""
    from apl.config import TrainConfig
    from apl.train import RESULT_FILE

    try:
        result = json.loads((run_dir / RESULT_FILE).read_text(encoding="utf-8"))
        same = TrainConfig.from_dict(result["config"]).identity() == cfg.identity()
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return result if same else None


def _with_execution(cfg, device: str, threads: int | None, data_dir: str):
    from apl.config import TrainConfig

    d = cfg.to_dict()
    d.update(device=device, num_threads=threads, data_dir=str(data_dir))
    return TrainConfig.from_dict(d)


def _hms(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class _Progress:
    """The grid's bar (one step per epoch, so its ETA is meaningful) and the time projection."""

    def __init__(self, total_epochs: int, workers: int, show: bool):
        self.remaining = total_epochs
        self.workers = workers
        self.projected = False
        self.bar = None
        if show and total_epochs:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total_epochs, desc="grid", unit="epoch", position=0,
                            dynamic_ncols=True, file=sys.stderr)

    def say(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr, flush=True)

    def epoch(self, run: str, epoch_time: float) -> None:
        self.remaining -= 1
        if not self.projected:
            self.projected = True
            eta = epoch_time * self.remaining / self.workers
            self.say(f"[grid] first epoch ({run}) took {epoch_time:.1f} s; projected time for the "
                     f"remaining {self.remaining} epochs on {self.workers} worker(s): ~{_hms(eta)}")
        if self.bar is not None:
            self.bar.update(1)

    def skip(self, epochs: int) -> None:
        """A run ended without reporting every epoch (it resumed, or failed)."""
        self.remaining -= epochs
        if self.bar is not None:
            self.bar.update(epochs)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _run_sequential(pending, runs_dir: Path, device, data_dir, manifest, progress, show) -> list:
    from apl.data import load_cifar10
    from apl.train import train

    failures = []
    data = load_cifar10(data_dir, download=True)
    for cfg in pending:
        cfg = _with_execution(cfg, device[0], device[1], data_dir)
        name = cfg.run_name()
        seen = []

        def on_epoch(record, name=name, seen=seen):
            seen.append(record["epoch"])
            progress.epoch(name, record["epoch_time_s"])

        manifest.run(name, status="running", device=device[0])
        manifest.save()
        try:
            result = train(cfg, runs_dir / name, resume=True, progress=show, data=data,
                           on_epoch=on_epoch)
        except Exception as e:  # noqa: BLE001 - one failed run must not stop a long grid
            failures.append(name)
            manifest.run(name, status="failed", error=f"{type(e).__name__}: {e}")
            progress.say(f"[grid] run {name} failed: {type(e).__name__}: {e}")
        else:
            manifest.run(name, **_summary(result))
        progress.skip(cfg.epochs - len(seen))
        manifest.save()
    return failures


def _die_with_parent() -> None:
    """Linux: have the kernel kill this worker when the grid process dies (e.g. SIGKILL)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _worker(index: int, device: str, threads, data_dir: str, runs_dir: str, tasks, events) -> None:
    """Worker process ``index``: take configs from ``tasks`` until None, train each on ``device``.

    Reports ``(kind, index, run name, payload)`` on ``events``: start, epoch, done, failed, exit.
    """
    _die_with_parent()
    import torch

    from apl.config import TrainConfig
    from apl.data import load_cifar10
    from apl.train import train

    if threads:
        torch.set_num_threads(threads)
    data = None
    while True:
        item = tasks.get()
        if item is None:
            break
        cfg = _with_execution(TrainConfig.from_dict(item), device, threads, data_dir)
        name = cfg.run_name()
        events.put(("start", index, name, device))
        try:
            if data is None:
                data = load_cifar10(data_dir, download=False)
            result = train(cfg, Path(runs_dir) / name, resume=True, progress=False, data=data,
                           on_epoch=lambda rec: events.put(("epoch", index, name, rec["epoch_time_s"])))
        except Exception as e:  # noqa: BLE001 - reported to the grid, which carries on
            events.put(("failed", index, name, f"{type(e).__name__}: {e}"))
        else:
            events.put(("done", index, name, _summary(result)))
    events.put(("exit", index, None, None))


def _run_parallel(pending, runs_dir: Path, devices, data_dir, manifest, progress) -> list:
    import multiprocessing as mp
    import queue

    from apl.data import FOLDER, load_cifar10

    # A missing dataset is downloaded once, here, not by every worker at the same time.
    if not (Path(data_dir) / FOLDER).is_dir() and Path(data_dir).name != FOLDER:
        load_cifar10(data_dir, download=True)
    ctx = mp.get_context("spawn")  # no fork of a process that may hold CUDA or OpenMP state
    tasks, events = ctx.Queue(), ctx.Queue()
    for cfg in pending:
        tasks.put(cfg.to_dict())
    for _ in devices:
        tasks.put(None)
    # Not daemonic: torch.compile may start compile workers of its own.
    procs = [ctx.Process(target=_worker, args=(i, d, t, str(data_dir), str(runs_dir), tasks, events))
             for i, (d, t) in enumerate(devices)]
    for p in procs:
        p.start()
    epochs = {c.run_name(): c.epochs for c in pending}
    seen: dict[str, int] = {}
    current: dict[int, str | None] = {i: None for i in range(len(procs))}
    failures = []

    def finished(name: str, error: str | None, summary: dict | None) -> None:
        if error is not None:
            failures.append(name)
            manifest.run(name, status="failed", error=error)
            progress.say(f"[grid] run {name} failed: {error}")
        else:
            manifest.run(name, **summary)
        progress.skip(epochs[name] - seen.get(name, 0))
        manifest.save()

    try:
        while current:
            try:
                kind, index, name, payload = events.get(timeout=5.0)
            except queue.Empty:
                # A worker killed from outside (e.g. out of memory) never says goodbye.
                for i in [i for i in current if not procs[i].is_alive()]:
                    lost = current.pop(i)
                    if lost is not None:
                        finished(lost, f"worker {i} ({devices[i][0]}) died with exit code "
                                       f"{procs[i].exitcode}", None)
                continue
            if kind == "exit":
                current.pop(index, None)
            elif kind == "start":
                current[index] = name
                manifest.run(name, status="running", device=payload)
                manifest.save()
            elif kind == "epoch":
                seen[name] = seen.get(name, 0) + 1
                progress.epoch(name, payload)
            else:
                current[index] = None
                finished(name, payload if kind == "failed" else None,
                         payload if kind == "done" else None)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return failures


def run_grid(preset: str, data_dir, out, *, seeds: int | None = None, devices: str | None = None,
             fresh: bool = False, losses=None, noise=None, variants=None,
             overrides: dict | None = None, progress: bool = True,
             command: str | None = None) -> dict:
    """Run (or finish) the grid into ``out``; return the manifest.

    Finished runs are kept, interrupted ones resume; ``fresh=True`` first deletes the
    planned runs' folders and the manifest. Raises ``RuntimeError`` naming the runs that
    failed (the others still run to the end).
    """
    plan = plan_grid(preset, seeds=seeds, losses=losses, noise=noise, variants=variants,
                     overrides=overrides)
    device_list = parse_devices(devices, preset)
    t0 = time.perf_counter()
    out = Path(out)
    runs_dir = out / "runs"
    if fresh:
        for cfg in plan:
            shutil.rmtree(runs_dir / cfg.run_name(), ignore_errors=True)
    runs_dir.mkdir(parents=True, exist_ok=True)
    manifest = _Manifest(out, fresh)
    started = _now()
    manifest.start(
        preset=preset, command=command or f"python -m apl grid --preset {preset} --out {out}",
        started_at=started, data_dir=str(Path(data_dir).absolute()),
        seeds=list(range(max(c.seed for c in plan) + 1)),
        losses=sorted({c.loss for c in plan}, key=GRID_LOSSES.index),
        noise=sorted({c.noise for c in plan}), variants=sorted({c.variant for c in plan}),
        overrides=dict(sorted((overrides or {}).items())), **_environment(device_list))
    pending = []
    for cfg in plan:
        name = cfg.run_name()
        manifest.run(name, config=cfg.to_dict())
        done = _finished_result(runs_dir / name, cfg)
        if done is not None:
            manifest.run(name, **_summary(done))
        else:
            manifest.run(name, status="pending")
            pending.append(cfg)
    manifest.save()
    workers = len(device_list)
    bar = _Progress(sum(c.epochs for c in pending), min(workers, max(len(pending), 1)), progress)
    bar.say(f"[grid] preset {preset}: {len(plan)} runs, {len(plan) - len(pending)} already finished, "
            f"{len(pending)} to run on {', '.join(d for d, _ in device_list)} -> {runs_dir}")
    try:
        if not pending:
            failures = []
        elif workers == 1:
            failures = _run_sequential(pending, runs_dir, device_list[0], data_dir, manifest, bar,
                                       progress)
        else:
            failures = _run_parallel(pending, runs_dir, device_list, data_dir, manifest, bar)
    finally:
        bar.close()
    sources = {r.get("data_source") for r in manifest.data["runs"].values() if r.get("data_source")}
    manifest.data["data_source"] = "; ".join(sorted(sources)) or None
    manifest.data["invocations"][-1]["wall_time_s"] = round(time.perf_counter() - t0, 1)
    manifest.finish()
    if failures:
        raise RuntimeError(f"{len(failures)} run(s) failed: {', '.join(failures)} "
                           f"(details in {manifest.path})")
    return manifest.data


# --------------------------------------------------------------------------- stamps

def describe_protocol(configs: list[dict]) -> str:
    """One line saying how runs were trained, from their config dicts (values joined by '/').

    E.g. ``"PaperCNN width 0.125, adam lr 0.001, epochs 4, batch 64, train subset 2000,
    test subset 1000, no augmentation"``.
    """
    def values(key, fmt=str):
        vals = sorted({json.dumps(c.get(key)) for c in configs if key in c})
        return "/".join(fmt(json.loads(v)) for v in vals) if vals else "?"

    model = values("model", lambda m: {"paper": "PaperCNN", "ma2020": "MaCNN"}.get(m, str(m)))
    subset = lambda k: (lambda v: "full" if v is None else str(v))  # noqa: E731
    augment = values("augment", lambda a: "augmentation" if a else "no augmentation")
    return (f"{model} width {values('width', lambda w: f'{w:g}')}, {values('optimizer')} lr "
            f"{values('lr', lambda x: f'{x:g}')}, epochs {values('epochs')}, batch "
            f"{values('batch_size')}, train subset {values('train_subset', subset('train'))}, "
            f"test subset {values('test_subset', subset('test'))}, {augment}")


def preset_banner(preset: str | None, protocol: str, overrides: dict | None = None) -> str:
    """The stamp on every table and figure: preset, how it was trained, whose protocol it is."""
    changed = ", ".join(f"{k}={v}" for k, v in sorted((overrides or {}).items()))
    name = f"{preset.upper()} PRESET" if preset else "PRESET UNKNOWN (no manifest.json)"
    text = f"{name}: {protocol}" + (f" (overridden: {changed})" if changed else "")
    if preset == "paper" and not changed:
        return text + " — the paper's protocol (Sec. 3)"
    if preset == "ma2020" and not changed:
        return text + " — the cited work's protocol, not the seed paper's"
    return text + " — not the paper's protocol"


# --------------------------------------------------------------------------- CLI

def _split(values) -> list[str] | None:
    if values is None:
        return None
    return [v for item in values for v in item.split(",") if v]


def _parse_set(items) -> dict:
    from apl.config import TrainConfig

    known = {f.name for f in fields(TrainConfig)}
    out = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set takes KEY=VALUE, got {item!r}")
        if key not in known:
            raise ValueError(f"--set {key}: no such config field; known: {', '.join(sorted(known))}")
        try:
            out[key] = json.loads(raw)  # numbers, true/false, null, {"gamma": 1}
        except json.JSONDecodeError:
            out[key] = raw  # plain strings: --set optimizer=sgd
    return out


def overrides_from_args(args) -> dict:
    """The config overrides of parsed ``grid`` arguments (--epochs, --amp, --compile, --set)."""
    overrides = _parse_set(args.set)
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    if args.amp is not None:
        overrides["amp"] = args.amp
    if args.compile:
        overrides["compile"] = True
    return overrides


def add_cli(subparsers) -> argparse.ArgumentParser:
    """Register ``grid`` on an argparse subparsers object (``python -m apl grid``)."""
    p = subparsers.add_parser(
        "grid", help="train the paper's grid (losses x noise x variants x seeds), resumable",
        description="Train every run of the paper's grid into <out>/runs/<run name>/ and keep "
                    "<out>/manifest.json. Finished runs are skipped; interrupted ones resume.")
    p.add_argument("--preset", choices=PRESETS, default="paper",
                   help="paper: the paper's protocol; quick: a scaled-down grid (<= 10 min on a "
                        "2-core CPU); ma2020: the cited work's protocol")
    p.add_argument("--data-dir", default=os.environ.get("APL_DATA_DIR", "data"),
                   help="folder holding cifar-10-batches-py (default $APL_DATA_DIR or data)")
    p.add_argument("--out", help="output folder (default runs/<preset>)")
    p.add_argument("--seeds", type=int, help="K: seeds 0..K-1 (default 1; ma2020: 3)")
    p.add_argument("--devices", help="comma-separated, one worker each: cuda:0,cuda:1 or cpu,cpu "
                                     "(default: every GPU, else the preset's CPU default)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", dest="fresh", action="store_false", default=False,
                      help="keep finished runs, resume interrupted ones (default)")
    mode.add_argument("--fresh", dest="fresh", action="store_true",
                      help="delete this grid's runs and manifest first")
    p.add_argument("--losses", nargs="+", help=f"subset of {','.join(GRID_LOSSES)}")
    p.add_argument("--noise", nargs="+", help="subset of 0.0,0.2,0.4,0.6,0.8")
    p.add_argument("--variants", nargs="+", help="subset of paper,ma2020")
    p.add_argument("--epochs", type=int, help="override the preset's epochs")
    p.add_argument("--amp", choices=("bf16",), help="bfloat16 autocast of the forward pass")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override any other config field, e.g. --set train_subset=500 (repeat)")
    p.add_argument("--dry-run", action="store_true", help="print the planned runs and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_run_cli)
    return p


def _run_cli(args) -> int:
    noise = _split(args.noise)
    try:
        noise = None if noise is None else [float(n) for n in noise]
    except ValueError:
        raise ValueError(f"--noise takes numbers, got {args.noise}") from None
    kwargs = dict(seeds=args.seeds, losses=_split(args.losses), noise=noise,
                  variants=_split(args.variants), overrides=overrides_from_args(args))
    out = args.out or os.path.join("runs", args.preset)
    if args.dry_run:
        plan = plan_grid(args.preset, **kwargs)
        for cfg in plan:
            print(cfg.run_name())
        print(f"{len(plan)} runs, {sum(c.epochs for c in plan)} epochs -> {out}/runs")
        return 0
    command = "python -m apl " + shlex.join(sys.argv[1:]) if sys.argv[1:2] == ["grid"] else None
    try:
        run_grid(args.preset, args.data_dir, out, devices=args.devices, fresh=args.fresh,
                 progress=not args.no_progress, command=command, **kwargs)
    except RuntimeError as e:
        print(f"apl grid: {e}", file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    """``python -m apl.grid ...``: the ``grid`` command on its own."""
    from apl.__main__ import main as apl_main

    return apl_main(["grid", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
