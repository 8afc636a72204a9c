"""One training run: :func:`train`, the contract the grid builds on.

A run lives in one folder. After every epoch ``checkpoint.pt`` is replaced atomically
(:mod:`apl.checkpoint`), so a killed run loses at most the epoch in progress and, resumed,
ends exactly as an uninterrupted run would on CPU. At the end ``result.json`` is written
atomically and the checkpoint is replaced by the final weights alone (``model.pt``), to keep
a grid's disk use small.

A diverged run is a result, not an error: a non-finite training loss is counted in the
epoch's ``nonfinite_batches`` and training goes on (NaN weights then predict one class:
chance accuracy, the paper's 10.00 entries). Non-finite numbers appear as ``null`` in the
history and result.
"""
from __future__ import annotations

import contextlib
import logging
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from apl import __version__ as apl_version
from apl.checkpoint import (
    CHECKPOINT_FILE,
    MODEL_FILE,
    check_same_run,
    clear_run,
    restore_checkpoint,
    save_checkpoint,
    save_model,
)
from apl.config import TrainConfig
from apl.data import NORMALIZATIONS, CIFAR10Arrays, DeviceData, load_cifar10
from apl.devices import device_name, resolve_device
from apl.errors import DamagedFile, DataError, OutputError
from apl.interrupts import StopRequest, graceful_stop
from apl.jsonio import jsonable
from apl.losses import get_loss, resolve_backend
from apl.losses.spec import spec_for
from apl.models import build_model, param_count
from apl.records import RESULT_FILE, number_text, read_result, save_result, set_aside_result, utc_now, verify_result
from apl.runlock import run_lock

__all__ = ["train", "RESULT_FILE", "CHECKPOINT_FILE", "MODEL_FILE"]

_EVAL_BATCH = 1000
log = logging.getLogger("apl.train")


# --------------------------------------------------------------------------- what a run trains with

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


def _backend_used(config: TrainConfig, device: torch.device) -> str:
    """Which loss implementation the run's loss resolves to on ``device``."""
    spec = spec_for(config.loss, variant=config.variant, **config.loss_params)
    return resolve_backend(config.backend, spec, device)[0]


@dataclass
class _Trainer:
    """The model, loss and optimizer of one run, and the two passes an epoch makes with them."""

    model: torch.nn.Module      # the weights a checkpoint saves
    run_model: torch.nn.Module  # what is called: ``model`` itself, or compiled
    loss_fn: object
    optimizer: torch.optim.Optimizer
    scheduler: object
    autocast: object
    grad_clip: float | None
    device: torch.device
    l1: float = 0.0             # delta of the L1 regulariser delta * sum |theta| (TrainConfig.l1)

    @classmethod
    def build(cls, config: TrainConfig, device: torch.device) -> _Trainer:
        """Build everything from ``config``; the caller seeds the RNGs first."""
        model = build_model(config.model, 10, config.width, config.init).to(device)
        if config.channels_last:
            model = model.to(memory_format=torch.channels_last)
        loss_fn = _build_loss(config)
        opt, sched = _build_optimizer(config, model)
        run_model = torch.compile(model) if config.compile else model
        if config.amp == "bf16":
            autocast = lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)  # noqa: E731
        else:
            autocast = contextlib.nullcontext
        return cls(model, run_model, loss_fn, opt, sched, autocast, config.grad_clip, device, config.l1)

    def train_epoch(self, batches, num_batches: int, bar, stop: StopRequest) -> dict:
        """One pass over the training set; returns the epoch's training statistics. A stop
        request abandons the pass after the batch in progress (:class:`Interrupted`).

        Each step's gradient is the loss's plus, with ``l1 > 0``, the L1 term's, then clipped to
        ``grad_clip`` as one vector: the step of ``loss + l1 * sum |theta|``. The recorded
        ``train_loss`` is the loss function's alone (comparable across regularisers)."""
        model, opt, device = self.run_model, self.optimizer, self.device
        model.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        nonfinite = torch.zeros((), dtype=torch.int64, device=device)
        correct_noisy = torch.zeros((), dtype=torch.int64, device=device)
        correct_clean = torch.zeros((), dtype=torch.int64, device=device)
        seen = 0
        batches_done = 0
        for i, (x, y_noisy, y_clean) in enumerate(batches):
            with self.autocast():
                logits = model(x)
            loss = self.loss_fn(logits.float(), y_noisy)  # the loss in float32 even under bf16 autocast
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if self.l1:
                _add_l1_subgradient(self.model.parameters(), self.l1)
            if self.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), self.grad_clip)
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
            stop.check()
            if bar is not None:
                bar.update(1)
                if i % 10 == 0 or i == num_batches - 1:
                    bar.set_postfix(loss=f"{loss.item():.4f}", acc=f"{100.0 * correct_noisy.item() / seen:.1f}")
        return {"train_loss": loss_sum.item() / max(batches_done, 1),
                "train_acc_noisy": 100.0 * correct_noisy.item() / max(seen, 1),
                "train_acc_clean": 100.0 * correct_clean.item() / max(seen, 1),
                "nonfinite_batches": int(nonfinite.item())}

    @torch.no_grad()
    def evaluate(self, data: DeviceData) -> dict:
        """Accuracy (percent) and mean cross entropy on the clean test set."""
        self.run_model.eval()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        for x, y in data.test_batches(_EVAL_BATCH):
            with self.autocast():
                logits = self.run_model(x)
            loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").double()
            correct += (logits.argmax(dim=1) == y).sum()
        n = max(data.num_test, 1)
        return {"test_acc": 100.0 * correct.item() / n, "test_loss": loss_sum.item() / n}


def _add_l1_subgradient(params, l1: float) -> None:
    """Add ``l1 * sign(theta)`` to each parameter's gradient: the gradient of ``l1 * sum |theta|``
    (sign(0) = 0, autograd's choice for |x|), exact and without a second pass through the graph."""
    with torch.no_grad():
        for p in params:
            if p.grad is None:
                p.grad = l1 * p.sign()
            else:
                p.grad.add_(p.sign(), alpha=l1)


# --------------------------------------------------------------------------- the run

def train(config: TrainConfig, out_dir, *, resume: bool = True, progress: bool = True,
          data: CIFAR10Arrays | None = None, on_epoch=None) -> dict:
    """Train one configuration into ``out_dir`` and return its result (also in ``result.json``).

    ``resume=True``: a finished run (``result.json`` of the same config) is returned as is;
    a checkpoint continues from its next epoch; a damaged result (:func:`apl.records.verify_result`)
    is set aside (``result.json.damaged``, with a warning naming it) and the run trained again.
    ``resume=False`` deletes result and checkpoint and starts fresh. A folder holding another
    config's run, or a damaged checkpoint, raises :class:`apl.errors.DamagedFile` (a ``ValueError``);
    one that cannot be written (or disappears) :class:`apl.errors.OutputError`; a run another process is
    training raises :class:`apl.runlock.RunInUse` (one trainer per run); SIGINT or SIGTERM stops
    it after the batch in progress with :class:`apl.interrupts.Interrupted` (its epoch abandoned,
    the checkpoint kept: the same call resumes). ``data`` reuses already loaded arrays (else
    ``config.data_dir`` is loaded). ``on_epoch(record)`` is called with each epoch's history
    record after its checkpoint is written. ``progress`` shows a tqdm bar per epoch and prints
    each epoch's summary and time.

    The result holds the config, the per-epoch history (accuracies in percent), the final
    and best test accuracy, the noise record, model size, device and software versions,
    data source, wall time and the loss backend used; see the module docstring for NaNs.
    """
    if not isinstance(config, TrainConfig):
        raise ValueError(f"config must be a TrainConfig, got {type(config).__name__}")
    if on_epoch is not None and not callable(on_epoch):
        raise ValueError("on_epoch must be callable or None")
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create the run folder {out_dir} ({e.strerror}): the output folder must be "
                          f"writable; fix that and run the same command again") from e
    # RunInUse when another process trains this run; Interrupted after SIGINT/SIGTERM, at a safe point
    with run_lock(out_dir), graceful_stop() as stop:
        return _train_locked(config, out_dir, resume=resume, progress=progress, data=data, on_epoch=on_epoch,
                             stop=stop)


def _train_locked(config: TrainConfig, out_dir: Path, *, resume: bool, progress: bool, data, on_epoch,
                  stop: StopRequest) -> dict:
    """:func:`train` once it holds the run folder's lock."""
    result_path = out_dir / RESULT_FILE
    if not resume:
        clear_run(out_dir)
    else:
        result = _finished_run(config, out_dir)
        if result is not None:
            _print_or_log(progress, f"{result_path} exists: returning the finished run without training")
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
            return _train_run(config, out_dir, device, data, progress=progress, on_epoch=on_epoch,
                              resume=resume, stop=stop)
    except FileNotFoundError as e:
        if isinstance(e, DataError) or out_dir.is_dir():
            raise
        raise OutputError(f"the run folder {out_dir} disappeared while the run trained (deleted or unmounted): "
                          f"{e.strerror or e}; run the same command again to start the run over") from e
    finally:
        torch.set_num_threads(old_threads)
        random.setstate(py_state)
        np.random.set_state(np_state)


def _finished_run(config: TrainConfig, out_dir: Path) -> dict | None:
    """The run's result when it finished and is intact; None when it did not finish, or when its result is
    damaged (set aside and named: the run trains again). ``DamagedFile`` when the folder holds another
    config's run (checked first: a folder of someone else's run is never trained over)."""
    try:
        result = read_result(out_dir)
    except DamagedFile as e:
        return _set_aside(out_dir, e)
    if result is None:
        return None
    check_same_run(result["config"], config, "a finished run", out_dir)
    try:
        verify_result(out_dir)
    except DamagedFile as e:
        return _set_aside(out_dir, e)
    return result


def _set_aside(out_dir: Path, damage: DamagedFile) -> None:
    """Set a damaged result aside (:func:`apl.records.set_aside_result`) and say so, once."""
    path = set_aside_result(out_dir)
    log.warning(f"{damage}; set aside as {path.name}, the run trains again")


def _train_run(config: TrainConfig, out_dir: Path, device: torch.device, data, *, progress: bool,
               on_epoch, resume: bool, stop: StopRequest) -> dict:
    """:func:`train` after its checks, inside its own RNG state."""
    t_start = time.perf_counter()
    ckpt_path, result_path = out_dir / CHECKPOINT_FILE, out_dir / RESULT_FILE
    if data is None:
        data = load_cifar10(config.data_dir)
    elif not isinstance(data, CIFAR10Arrays):
        raise ValueError(f"data must be a CIFAR10Arrays (apl.data.load_cifar10) or None, got {type(data).__name__}")
    mean, std = NORMALIZATIONS[config.normalize]
    on_device = DeviceData(data, device=device, noise=config.noise, noise_type=config.noise_type,
                           seed=config.seed, train_subset=config.train_subset,
                           test_subset=config.test_subset, subset_seed=config.subset_seed,
                           augment=config.augment, channels_last=config.channels_last, mean=mean, std=std)

    torch.manual_seed(config.seed)
    random.seed(config.seed)
    np.random.seed(config.seed)
    trainer = _Trainer.build(config, device)

    history: list = []
    start_epoch, prior_wall, resumed_at = 0, 0.0, []
    if resume and ckpt_path.exists():
        ckpt = restore_checkpoint(ckpt_path, config=config, out_dir=out_dir, model=trainer.model,
                                  optimizer=trainer.optimizer, scheduler=trainer.scheduler,
                                  device=device, noisy_labels=on_device.train_y_noisy)
        history, start_epoch = ckpt["history"], ckpt["epoch"]
        prior_wall, resumed_at = ckpt["wall_time_s"], ckpt["resumed_at_epochs"] + [ckpt["epoch"]]
        _print_or_log(progress, f"resuming {out_dir} after epoch {start_epoch}/{config.epochs}")

    batch_size = config.batch_size
    num_batches = on_device.num_train // batch_size + (1 if on_device.num_train % batch_size >= 2 else 0)
    for epoch in range(start_epoch, config.epochs):
        t0 = time.perf_counter()
        lr = trainer.optimizer.param_groups[0]["lr"]
        bar = None
        if progress:
            bar = tqdm(total=num_batches, desc=f"epoch {epoch + 1}/{config.epochs}", leave=False,
                       file=sys.stderr, dynamic_ncols=True)
        try:
            stats = trainer.train_epoch(on_device.train_batches(epoch, batch_size), num_batches, bar, stop)
        finally:
            if bar is not None:
                bar.close()
        t_train = time.perf_counter() - t0
        if trainer.scheduler is not None:
            trainer.scheduler.step()
        stats.update(trainer.evaluate(on_device))
        record = jsonable({"epoch": epoch + 1, "lr": lr, **stats, "train_time_s": t_train,
                           "epoch_time_s": time.perf_counter() - t0})
        history.append(record)
        _print_or_log(progress, _epoch_line(record, config.epochs))
        save_checkpoint(ckpt_path, config=config, epoch=epoch + 1, history=history, model=trainer.model,
                        optimizer=trainer.optimizer, scheduler=trainer.scheduler, device=device,
                        noisy_labels=on_device.train_y_noisy, noise_record=on_device.noise_record.to_dict(),
                        wall_time_s=prior_wall + time.perf_counter() - t_start, resumed_at=resumed_at)
        if on_epoch is not None:
            on_epoch(record)
        if epoch + 1 < config.epochs:
            stop.check()  # between epochs: the checkpoint just written is the safe point

    result = _result(config, history, on_device, data, trainer.model, device,
                     wall=prior_wall + time.perf_counter() - t_start, resumed_at=resumed_at)
    save_model(out_dir, trainer.model)  # before result.json, whose presence marks the run finished
    save_result(out_dir, result)
    if ckpt_path.exists():
        ckpt_path.unlink()
    _print_or_log(progress, f"{config.run_name()}: final test acc {number_text(result['final_test_acc'], 2)}  best "
                            f"{number_text(result['best_test_acc'], 2)} (epoch {result['best_epoch']})  "
                            f"{result['wall_time_s']:.1f} s  -> {result_path}")
    return result


def _result(config: TrainConfig, history: list, on_device: DeviceData, data: CIFAR10Arrays, model,
            device: torch.device, *, wall: float, resumed_at: list) -> dict:
    """The run's ``result.json``: its config, history, headline numbers and where it ran."""
    accs = [h["test_acc"] if h["test_acc"] is not None else -1.0 for h in history]
    best = int(np.argmax(accs))
    return jsonable({
        "run_name": config.run_name(), "loss": config.loss, "variant": config.variant,
        "noise": config.noise, "noise_type": config.noise_type, "seed": config.seed,
        "config": config.to_dict(), "history": history, "epochs_completed": len(history),
        "final_test_acc": history[-1]["test_acc"], "final_test_loss": history[-1]["test_loss"],
        "final_train_acc_clean": history[-1]["train_acc_clean"],
        "final_train_acc_noisy": history[-1]["train_acc_noisy"],
        "best_test_acc": history[best]["test_acc"], "best_epoch": history[best]["epoch"],
        "diverged": any(h["nonfinite_batches"] for h in history),
        "noise_record": on_device.noise_record.to_dict(), "num_train": on_device.num_train,
        "num_test": on_device.num_test, "param_count": param_count(model), "device": str(device),
        "device_name": device_name(device), "num_threads": torch.get_num_threads(),
        "torch_version": torch.__version__, "cuda_version": torch.version.cuda,
        "apl_version": apl_version, "data_source": data.source, "data_official": data.official,
        "wall_time_s": wall,
        "resumed_at_epochs": resumed_at, "loss_backend": _backend_used(config, device),
        "finished_at": utc_now(),
    })


def _epoch_line(record: dict, epochs: int) -> str:
    """The line a run prints after each epoch."""
    line = (f"epoch {record['epoch']}/{epochs}  loss {number_text(record['train_loss'])}  "
            f"train acc noisy {number_text(record['train_acc_noisy'], 2)} "
            f"clean {number_text(record['train_acc_clean'], 2)}  "
            f"test acc {number_text(record['test_acc'], 2)}  ({record['epoch_time_s']:.1f} s)")
    if record["nonfinite_batches"]:
        line += f"  [{record['nonfinite_batches']} non-finite batches]"
    return line


def _print_or_log(progress: bool, msg: str) -> None:
    """Print ``msg`` when the run shows progress; else log it at INFO (a grid worker's runs)."""
    if progress:
        print(msg, flush=True)
    else:
        log.info(msg)
