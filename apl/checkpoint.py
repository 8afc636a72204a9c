"""A run folder's binary files: the checkpoint written after every epoch, and the final weights.

``checkpoint.pt`` holds everything an exact resume needs (model, optimizer, scheduler, every
RNG state, history, the noisy labels it trained on); it is replaced atomically, so a killed
run loses at most the epoch in progress. A finished run keeps only ``model.pt`` (the final
weights) next to its ``result.json``.
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from apl.config import TrainConfig
from apl.records import RESULT_FILE, atomic_write_bytes

__all__ = ["CHECKPOINT_FILE", "MODEL_FILE", "check_same_run", "clear_run", "save_checkpoint",
           "restore_checkpoint", "save_model"]

CHECKPOINT_FILE = "checkpoint.pt"
MODEL_FILE = "model.pt"
_FORMAT = 1


def check_same_run(saved: dict, config: TrainConfig, what: str, out_dir: Path) -> None:
    """Raise ``ValueError`` unless the config dict ``saved`` (of ``what`` in ``out_dir``) is ``config``'s run."""
    old = TrainConfig.from_dict(saved)
    if old.identity() != config.identity():
        diff = sorted(k for k, v in config.identity().items() if old.identity().get(k) != v)
        raise ValueError(f"{out_dir} holds {what} of a different config (differs in {', '.join(diff)}); "
                         f"use another out_dir or resume=False (--fresh) to overwrite it")


def clear_run(out_dir: Path) -> None:
    """Delete a run folder's result, checkpoint and weights, and any half-written copies."""
    for name in (RESULT_FILE, CHECKPOINT_FILE, MODEL_FILE):
        for p in (out_dir / name, out_dir / (name + ".tmp")):
            if p.exists():
                p.unlink()


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


def save_checkpoint(path: Path, *, config: TrainConfig, epoch: int, history: list, model, optimizer,
                    scheduler, device: torch.device, noisy_labels: torch.Tensor, noise_record: dict,
                    wall_time_s: float, resumed_at: list) -> None:
    """Replace ``path`` atomically by the state after ``epoch`` (1-based) epochs."""
    state = {"format": _FORMAT, "config": config.to_dict(), "epoch": epoch, "history": history,
             "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict() if scheduler is not None else None,
             "rng": _rng_states(device), "noisy_labels": noisy_labels.cpu(),
             "noise_record": noise_record, "wall_time_s": wall_time_s, "resumed_at_epochs": resumed_at}
    atomic_write_bytes(path, lambda f: torch.save(state, f))


def restore_checkpoint(path: Path, *, config: TrainConfig, out_dir: Path, model, optimizer, scheduler,
                       device: torch.device, noisy_labels: torch.Tensor) -> dict:
    """Load ``path`` into the model, optimizer, scheduler and RNGs; return the checkpoint.

    Raises ``ValueError`` (saying to start over with ``resume=False``) when the file is not
    a checkpoint of this format, holds another config's run, or trained on other noisy labels.
    """
    # Our own file, holding numpy/python RNG states: not loadable with weights_only=True.
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated or foreign file: say which and what to do
        raise ValueError(f"{path} cannot be read as a checkpoint ({type(e).__name__}: {e}); "
                         f"use resume=False (--fresh) to start over") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != _FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path} has checkpoint format {found!r}, expected "
                         f"{_FORMAT}; use resume=False (--fresh)")
    check_same_run(ckpt["config"], config, "a checkpoint", out_dir)
    if not torch.equal(ckpt["noisy_labels"], noisy_labels.cpu()):
        raise ValueError(f"{path}: the regenerated noisy labels differ from the checkpoint's "
                         f"(changed data or noise code); use resume=False (--fresh)")
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(ckpt["scheduler"])
    _set_rng_states(ckpt["rng"], device)
    return ckpt


def save_model(out_dir: Path, model) -> None:
    """Write the final weights (``model.pt``) atomically."""
    atomic_write_bytes(out_dir / MODEL_FILE, lambda f: torch.save(model.state_dict(), f))
