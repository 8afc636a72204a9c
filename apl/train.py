"""One training run: :func:`train` (the contract the grid builds on) and the ``apl train`` CLI.

A run lives in one folder. After every epoch ``checkpoint.pt`` is replaced atomically
(model, optimizer, scheduler, every RNG state, history, noisy labels), so a killed run loses
at most the epoch in progress and, resumed, ends exactly as an uninterrupted run would on
CPU. At the end ``result.json`` is written atomically and the checkpoint is replaced by the
final weights alone (``model.pt``), to keep a grid's disk use small.

A diverged run is a result, not an error: a non-finite training loss is counted in the
epoch's ``nonfinite_batches`` and training goes on (NaN weights then predict one class:
chance accuracy, the paper's 10.00 entries). Non-finite numbers appear as ``null`` in the
history and result.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import logging
import math
import os
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from apl.config import TrainConfig
from apl.data import CIFAR10Arrays, DeviceData, load_cifar10
from apl.losses import get_loss, resolve_backend
from apl.models import build_model, param_count
from apl.spec import spec_for

__all__ = ["train", "resolve_device", "device_name", "save_json", "add_cli", "config_from_args",
           "RESULT_FILE", "CHECKPOINT_FILE", "MODEL_FILE"]

RESULT_FILE = "result.json"
CHECKPOINT_FILE = "checkpoint.pt"
MODEL_FILE = "model.pt"
_CHECKPOINT_FORMAT = 1
_EVAL_BATCH = 1000
log = logging.getLogger("apl.train")


# --------------------------------------------------------------------------- helpers

def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> CUDA when available else CPU; otherwise the named device, checked to exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"unknown device {name!r} ({e})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was requested but CUDA is not available here")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {name!r}")
    return device


def device_name(device: torch.device) -> str:
    """A human-readable name of ``device``: the GPU model, or the CPU model from /proc/cpuinfo."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _backend_used(config, device) -> str:
    """Which loss implementation the run's loss resolves to on ``device``."""
    spec = spec_for(config.loss, variant=config.variant, **config.loss_params)
    return resolve_backend(config.backend, spec, device)[0]


def _finite_or_none(v):
    """JSON has no NaN/inf: they become ``null``."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return _finite_or_none(obj)


def _atomic_write_bytes(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_json(path: Path, obj) -> None:
    """Write ``obj`` as strict JSON (no NaN) to ``path`` atomically (temp file + os.replace)."""
    _atomic_write_bytes(path, lambda f: f.write(json.dumps(obj, indent=1, allow_nan=False).encode()))


def _rng_states(device: torch.device) -> dict:
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_states(states: dict, device: torch.device) -> None:
    torch.set_rng_state(states["torch"])
    if device.type == "cuda" and states.get("cuda") is not None:
        torch.cuda.set_rng_state(states["cuda"], device)
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])


def _build_loss(config: TrainConfig):
    return get_loss(config.loss, num_classes=10, variant=config.variant, backend=config.backend,
                    **config.loss_params)


def _build_optimizer(config: TrainConfig, model: torch.nn.Module):
    if config.optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                              weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=config.epochs, eta_min=0.0) \
        if config.scheduler == "cosine" else None
    return opt, sched


def _check_same_run(saved: dict, config: TrainConfig, what: str, out_dir: Path) -> None:
    old = TrainConfig.from_dict(saved)
    if old.identity() != config.identity():
        diff = sorted(k for k, v in config.identity().items() if old.identity().get(k) != v)
        raise ValueError(f"{out_dir} holds {what} of a different config (differs in {', '.join(diff)}); "
                         f"use another out_dir or resume=False (--fresh) to overwrite it")


def _clear(out_dir: Path) -> None:
    for name in (RESULT_FILE, CHECKPOINT_FILE, MODEL_FILE):
        for p in (out_dir / name, out_dir / (name + ".tmp")):
            if p.exists():
                p.unlink()


# --------------------------------------------------------------------------- one epoch

def _train_epoch(model, batches, num_batches, loss_fn, opt, config, autocast, device, bar):
    """One pass over the training set; returns the epoch's training statistics."""
    model.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    nonfinite = torch.zeros((), dtype=torch.int64, device=device)
    correct_noisy = torch.zeros((), dtype=torch.int64, device=device)
    correct_clean = torch.zeros((), dtype=torch.int64, device=device)
    seen = 0
    batches_done = 0
    for i, (x, y_noisy, y_clean) in enumerate(batches):
        with autocast():
            logits = model(x)
        loss = loss_fn(logits.float(), y_noisy)  # the loss in float32 even under bf16 autocast
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        opt.step()
        with torch.no_grad():
            # Accumulate on the device: no host sync per batch.
            loss_sum += loss.detach().double()
            nonfinite += (~torch.isfinite(loss.detach())).long()
            pred = logits.detach().argmax(dim=1)
            correct_noisy += (pred == y_noisy).sum()
            correct_clean += (pred == y_clean).sum()
        seen += y_noisy.shape[0]
        batches_done += 1
        if bar is not None:
            bar.update(1)
            if i % 10 == 0 or i == num_batches - 1:
                bar.set_postfix(loss=f"{loss.item():.4f}", acc=f"{100.0 * correct_noisy.item() / seen:.1f}")
    return {"train_loss": loss_sum.item() / max(batches_done, 1),
            "train_acc_noisy": 100.0 * correct_noisy.item() / max(seen, 1),
            "train_acc_clean": 100.0 * correct_clean.item() / max(seen, 1),
            "nonfinite_batches": int(nonfinite.item())}


@torch.no_grad()
def _evaluate(model, data: DeviceData, autocast, device):
    """Accuracy (percent) and mean cross entropy on the clean test set."""
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    for x, y in data.test_batches(_EVAL_BATCH):
        with autocast():
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").double()
        correct += (logits.argmax(dim=1) == y).sum()
    n = max(data.num_test, 1)
    return {"test_acc": 100.0 * correct.item() / n, "test_loss": loss_sum.item() / n}


# --------------------------------------------------------------------------- the run

def train(config: TrainConfig, out_dir, *, resume: bool = True, progress: bool = True,
          data: CIFAR10Arrays | None = None, on_epoch=None) -> dict:
    """Train one configuration into ``out_dir`` and return its result (also in ``result.json``).

    ``resume=True``: a finished run (``result.json`` of the same config) is returned as is;
    a checkpoint continues from its next epoch. ``resume=False`` deletes both and starts
    fresh. A folder holding another config's run raises ``ValueError``. ``data`` reuses
    already loaded arrays (else ``config.data_dir`` is loaded). ``on_epoch(record)`` is
    called with each epoch's history record after its checkpoint is written. ``progress``
    shows a tqdm bar per epoch and prints each epoch's summary and time.

    The result holds the config, the per-epoch history (accuracies in percent), the final
    and best test accuracy, the noise record, model size, device and software versions,
    data source, wall time and the loss backend used; see the module docstring for NaNs.
    """
    if not isinstance(config, TrainConfig):
        raise ValueError(f"config must be a TrainConfig, got {type(config).__name__}")
    if on_epoch is not None and not callable(on_epoch):
        raise ValueError("on_epoch must be callable or None")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result_path, ckpt_path = out_dir / RESULT_FILE, out_dir / CHECKPOINT_FILE
    if not resume:
        _clear(out_dir)
    elif result_path.exists():
        try:
            result = json.loads(result_path.read_text())
            saved_config = result["config"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{result_path} is not a readable result ({type(e).__name__}: {e}); "
                             f"use resume=False (--fresh) to run again") from e
        _check_same_run(saved_config, config, "a finished run", out_dir)
        _say(progress, f"{result_path} exists: returning the finished run without training")
        return result

    device = resolve_device(config.device)
    old_threads = torch.get_num_threads()
    py_state, np_state = random.getstate(), np.random.get_state()
    cuda_devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    try:
        if config.num_threads is not None:
            torch.set_num_threads(config.num_threads)
        # fork_rng: the run seeds and restores torch's global RNG without touching the caller's.
        with torch.random.fork_rng(devices=cuda_devices):
            return _run(config, out_dir, device, data, progress, on_epoch, resume, ckpt_path, result_path)
    finally:
        torch.set_num_threads(old_threads)
        random.setstate(py_state)
        np.random.set_state(np_state)


def _run(config, out_dir, device, data, progress, on_epoch, resume, ckpt_path, result_path) -> dict:
    t_start = time.perf_counter()
    if data is None:
        data = load_cifar10(config.data_dir)
    elif not isinstance(data, CIFAR10Arrays):
        raise ValueError(f"data must be a CIFAR10Arrays (apl.data.load_cifar10) or None, got {type(data).__name__}")
    dd = DeviceData(data, device=device, noise=config.noise, noise_type=config.noise_type, seed=config.seed,
                    train_subset=config.train_subset, test_subset=config.test_subset,
                    subset_seed=config.subset_seed, augment=config.augment,
                    channels_last=config.channels_last)

    torch.manual_seed(config.seed)
    random.seed(config.seed)
    np.random.seed(config.seed)
    model = build_model(config.model, 10, config.width).to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    loss_fn = _build_loss(config)
    opt, sched = _build_optimizer(config, model)
    run_model = torch.compile(model) if config.compile else model
    if config.amp == "bf16":
        autocast = lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)  # noqa: E731
    else:
        autocast = contextlib.nullcontext

    history: list = []
    start_epoch, prior_wall, resumed_at = 0, 0.0, []
    if resume and ckpt_path.exists():
        # Our own file, holding numpy/python RNG states: not loadable with weights_only=True.
        try:
            ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        except Exception as e:  # truncated or foreign file: say which and what to do
            raise ValueError(f"{ckpt_path} cannot be read as a checkpoint ({type(e).__name__}: {e}); "
                             f"use resume=False (--fresh) to start over") from e
        if not isinstance(ckpt, dict) or ckpt.get("format") != _CHECKPOINT_FORMAT:
            found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
            raise ValueError(f"{ckpt_path} has checkpoint format {found!r}, expected "
                             f"{_CHECKPOINT_FORMAT}; use resume=False (--fresh)")
        _check_same_run(ckpt["config"], config, "a checkpoint", out_dir)
        if not torch.equal(ckpt["noisy_labels"], dd.train_y_noisy.cpu()):
            raise ValueError(f"{ckpt_path}: the regenerated noisy labels differ from the checkpoint's "
                               f"(changed data or noise code); use resume=False (--fresh)")
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        if sched is not None:
            sched.load_state_dict(ckpt["scheduler"])
        _set_rng_states(ckpt["rng"], device)
        history, start_epoch = ckpt["history"], ckpt["epoch"]
        prior_wall, resumed_at = ckpt["wall_time_s"], ckpt["resumed_at_epochs"] + [ckpt["epoch"]]
        _say(progress, f"resuming {out_dir} after epoch {start_epoch}/{config.epochs}")

    bs = config.batch_size
    num_batches = dd.num_train // bs + (1 if dd.num_train % bs >= 2 else 0)
    for epoch in range(start_epoch, config.epochs):
        t0 = time.perf_counter()
        lr = opt.param_groups[0]["lr"]
        bar = None
        if progress:
            bar = tqdm(total=num_batches, desc=f"epoch {epoch + 1}/{config.epochs}", leave=False,
                       file=sys.stderr, dynamic_ncols=True)
        try:
            stats = _train_epoch(run_model, dd.train_batches(epoch, bs), num_batches, loss_fn, opt, config,
                                 autocast, device, bar)
        finally:
            if bar is not None:
                bar.close()
        t_train = time.perf_counter() - t0
        if sched is not None:
            sched.step()
        stats.update(_evaluate(run_model, dd, autocast, device))
        record = _jsonable({"epoch": epoch + 1, "lr": lr, **stats, "train_time_s": t_train,
                            "epoch_time_s": time.perf_counter() - t0})
        history.append(record)
        _say(progress, f"epoch {epoch + 1}/{config.epochs}  loss {_fmt(record['train_loss'])}  "
                       f"train acc noisy {_fmt(record['train_acc_noisy'], 2)} clean {_fmt(record['train_acc_clean'], 2)}  "
                       f"test acc {_fmt(record['test_acc'], 2)}  ({record['epoch_time_s']:.1f} s)"
                       + (f"  [{record['nonfinite_batches']} non-finite batches]" if record["nonfinite_batches"] else ""))
        ckpt = {"format": _CHECKPOINT_FORMAT, "config": config.to_dict(), "epoch": epoch + 1,
                "history": history, "model": model.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict() if sched is not None else None, "rng": _rng_states(device),
                "noisy_labels": dd.train_y_noisy.cpu(), "noise_record": dd.noise_record.to_dict(),
                "wall_time_s": prior_wall + time.perf_counter() - t_start, "resumed_at_epochs": resumed_at}
        _atomic_write_bytes(ckpt_path, lambda f: torch.save(ckpt, f))
        if on_epoch is not None:
            on_epoch(record)

    result = _result(config, history, dd, data, model, device, prior_wall + time.perf_counter() - t_start,
                     resumed_at)
    save_json(result_path, result)
    _atomic_write_bytes(out_dir / MODEL_FILE, lambda f: torch.save(model.state_dict(), f))
    if ckpt_path.exists():
        ckpt_path.unlink()
    _say(progress, f"{config.run_name()}: final test acc {_fmt(result['final_test_acc'], 2)}  best "
                   f"{_fmt(result['best_test_acc'], 2)} (epoch {result['best_epoch']})  "
                   f"{result['wall_time_s']:.1f} s  -> {result_path}")
    return result


def _result(config, history, dd: DeviceData, data: CIFAR10Arrays, model, device, wall, resumed_at) -> dict:
    accs = [h["test_acc"] if h["test_acc"] is not None else -1.0 for h in history]
    best = int(np.argmax(accs))
    import apl

    return _jsonable({
        "run_name": config.run_name(), "loss": config.loss, "variant": config.variant,
        "noise": config.noise, "noise_type": config.noise_type, "seed": config.seed,
        "config": config.to_dict(), "history": history, "epochs_completed": len(history),
        "final_test_acc": history[-1]["test_acc"], "final_test_loss": history[-1]["test_loss"],
        "final_train_acc_clean": history[-1]["train_acc_clean"],
        "final_train_acc_noisy": history[-1]["train_acc_noisy"],
        "best_test_acc": history[best]["test_acc"], "best_epoch": history[best]["epoch"],
        "diverged": any(h["nonfinite_batches"] for h in history),
        "noise_record": dd.noise_record.to_dict(), "num_train": dd.num_train, "num_test": dd.num_test,
        "param_count": param_count(model), "device": str(device), "device_name": device_name(device),
        "num_threads": torch.get_num_threads(), "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda, "apl_version": apl.__version__, "data_source": data.source,
        "wall_time_s": wall, "resumed_at_epochs": resumed_at, "loss_backend": _backend_used(config, device),
        "finished_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    })


def _fmt(v, digits: int = 4) -> str:
    return "nan" if v is None else f"{v:.{digits}f}"


def _say(progress: bool, msg: str) -> None:
    if progress:
        print(msg, flush=True)
    else:
        log.info(msg)


# --------------------------------------------------------------------------- CLI

def add_cli(subparsers) -> argparse.ArgumentParser:
    """Add the ``train`` subcommand to ``subparsers`` (an argparse subparsers action)."""
    p = subparsers.add_parser("train", help="train one configuration and print its result",
                              description="Train one configuration. Unset options follow the protocol preset "
                                          "(--protocol paper: the seed paper; ma2020: the cited work).")
    p.add_argument("--protocol", choices=("paper", "ma2020"), default="paper")
    p.add_argument("--loss", default="ce", help="ce, fl, mae, rce, gce, sce, nce, nfl, nce+mae, nce+rce, nfl+mae, nfl+rce")
    p.add_argument("--variant", choices=("paper", "ma2020"), help="NCE/NFL form (default: the protocol's)")
    p.add_argument("--noise", type=float, default=0.0, help="noise rate eta")
    p.add_argument("--noise-type", choices=("symmetric", "ma2020_symmetric", "asymmetric"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--width", type=float)
    p.add_argument("--model", choices=("paper", "ma2020"))
    p.add_argument("--train-subset", type=int)
    p.add_argument("--test-subset", type=int)
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None)
    for name in ("gamma", "lam", "alpha", "beta", "q"):
        p.add_argument(f"--{name}", type=float, help=f"loss parameter {name} (LOSSES.md)")
    p.add_argument("--data-dir", default="data", help="folder holding cifar-10-batches-py")
    p.add_argument("--out", help="run folder (default: runs/<run name>)")
    p.add_argument("--device", default="auto")
    p.add_argument("--num-threads", type=int)
    p.add_argument("--amp", choices=("bf16",))
    p.add_argument("--compile", action="store_true")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last memory format (default on)")
    p.add_argument("--backend", choices=("auto", "fused", "reference"))
    p.add_argument("--fresh", action="store_true", help="discard an existing result/checkpoint in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")
    p.set_defaults(func=_cli_train)
    return p


def config_from_args(args) -> TrainConfig:
    """The :class:`TrainConfig` of parsed ``apl train`` arguments (unset ones: the protocol's)."""
    overrides = {"loss": args.loss, "noise": args.noise, "seed": args.seed, "data_dir": args.data_dir,
                 "device": args.device}
    for name in ("variant", "noise_type", "epochs", "batch_size", "lr", "width", "model", "train_subset",
                 "test_subset", "augment", "num_threads", "amp", "backend", "channels_last"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if args.compile:
        overrides["compile"] = True
    params = {k: getattr(args, k) for k in ("gamma", "lam", "alpha", "beta", "q") if getattr(args, k) is not None}
    if params:
        overrides["loss_params"] = params
    preset = TrainConfig.paper if args.protocol == "paper" else TrainConfig.ma2020
    return preset(**overrides)


def _cli_train(args) -> int:
    config = config_from_args(args)
    out = Path(args.out) if args.out else Path("runs") / config.run_name()
    if not args.quiet:
        print(f"run {config.run_name()} -> {out}", flush=True)
    r = train(config, out, resume=not args.fresh, progress=not args.quiet)
    rec = r["noise_record"]
    print(f"{r['run_name']}: final test acc {_fmt(r['final_test_acc'], 2)}  best {_fmt(r['best_test_acc'], 2)} "
          f"(epoch {r['best_epoch']})  realised noise {rec['realised_rate']:.4f} ({rec['kind']})  "
          f"{r['epochs_completed']} epochs  {r['wall_time_s']:.1f} s on {r['device']}  "
          f"loss backend {r['loss_backend']}  -> {out / RESULT_FILE}")
    return 0
