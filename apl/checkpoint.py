"""A run folder's binary files: the checkpoint written after every epoch, and the final weights.

``checkpoint.pt`` holds everything an exact resume needs (model, optimizer, scheduler, every
RNG state, history, the noisy labels it trained on); it is replaced atomically, so a killed
run loses at most the epoch in progress. A finished run keeps only ``model.pt`` (the final
weights) next to its ``result.json``. Both hold tensors and plain Python values only and are
read with ``torch.load(weights_only=True)``: a run folder copied from elsewhere can hold a
file that runs code when unpickled, and loading one is refused, not executed. The checkpoint
also holds the SHA-256 of its content: a torch file damaged inside a tensor loads without error,
and a truncated or corrupted checkpoint is refused by name, never resumed from.
"""
from __future__ import annotations

import hashlib
import io
import random
from pathlib import Path

import numpy as np
import torch

from apl.config import TrainConfig
from apl.errors import DamagedFile
from apl.jsonio import atomic_write_bytes, jsonable
from apl.records import RESULT_CHECKSUM_FILE, RESULT_FILE

__all__ = ["CHECKPOINT_FILE", "MODEL_FILE", "check_same_run", "clear_run", "save_checkpoint",
           "restore_checkpoint", "save_model"]

CHECKPOINT_FILE = "checkpoint.pt"
MODEL_FILE = "model.pt"
_FORMAT = 3  # 3: with its content's SHA-256; 2: tensors and plain types only; 1: held numpy/Python RNG objects


def check_same_run(saved: dict, config: TrainConfig, what: str, out_dir: Path) -> None:
    """Raise :class:`~apl.errors.DamagedFile` (a ``ValueError``) unless the config dict ``saved`` (of ``what``
    in ``out_dir``) is ``config``'s run."""
    diff = config.differences(saved)  # as written: a run of an earlier version never passes for this one
    if diff:
        raise DamagedFile(f"{out_dir} holds {what} of a different config (differs in {', '.join(diff)}); "
                         f"use another out_dir or resume=False (--fresh) to overwrite it")


def clear_run(out_dir: Path) -> None:
    """Delete a run folder's result (and its checksum), checkpoint and weights, and any half-written copies."""
    for name in (RESULT_FILE, RESULT_CHECKSUM_FILE, CHECKPOINT_FILE, MODEL_FILE):
        for p in (out_dir / name, out_dir / (name + ".tmp")):
            if p.exists():
                p.unlink()


def _serialized(obj) -> memoryview:
    """``obj`` as ``torch.save`` bytes: torch.save into a file turns a failed write (a full disk) into
    an unexplained RuntimeError, where writing these bytes raises the OSError itself."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getbuffer()


def _content_digest(state: dict) -> str:
    """SHA-256 of a checkpoint's content in order: each tensor's dtype, shape and bytes, each other
    value's type and repr (what torch.save stores and torch.load gives back unchanged)."""
    digest = hashlib.sha256()

    def add(value) -> None:
        if isinstance(value, torch.Tensor):
            flat = value.detach().cpu().contiguous().reshape(-1)
            digest.update(f"tensor {flat.dtype} {tuple(value.shape)}:".encode())
            digest.update(flat.view(torch.uint8).numpy())
        elif isinstance(value, dict):
            digest.update(b"{")
            for key, item in value.items():
                add(key)
                add(item)
            digest.update(b"}")
        elif isinstance(value, (list, tuple)):
            digest.update(b"[" if isinstance(value, list) else b"(")
            for item in value:
                add(item)
            digest.update(b"]")
        else:
            digest.update(f"{type(value).__name__} {value!r};".encode())

    add(state)
    return digest.hexdigest()


def _rng_states(device: torch.device) -> dict:
    """Every RNG's state as tensors and plain values (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    version, py_state, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
            "python": {"version": int(version), "state": torch.tensor(py_state, dtype=torch.int64),
                       "gauss_next": gauss_next}}


def _set_rng_states(states: dict, device: torch.device) -> None:
    torch.set_rng_state(states["torch"])
    if device.type == "cuda" and states.get("cuda") is not None:
        torch.cuda.set_rng_state(states["cuda"], device)
    n = states["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = states["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss_next"]))


def save_checkpoint(path: Path, *, config: TrainConfig, epoch: int, history: list, model, optimizer,
                    scheduler, device: torch.device, noisy_labels: torch.Tensor, noise_record: dict,
                    wall_time_s: float, resumed_at: list) -> None:
    """Replace ``path`` atomically by the state after ``epoch`` (1-based) epochs."""
    state = {"format": _FORMAT, "config": config.to_dict(), "epoch": epoch, "history": history,
             "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict() if scheduler is not None else None,
             "rng": _rng_states(device), "noisy_labels": noisy_labels.cpu(),
             "noise_record": jsonable(noise_record), "wall_time_s": float(wall_time_s),
             "resumed_at_epochs": list(resumed_at)}
    state["sha256"] = _content_digest(state)
    atomic_write_bytes(path, lambda f: f.write(_serialized(state)))


def restore_checkpoint(path: Path, *, config: TrainConfig, out_dir: Path, model, optimizer, scheduler,
                       device: torch.device, noisy_labels: torch.Tensor) -> dict:
    """Load ``path`` into the model, optimizer, scheduler and RNGs; return the checkpoint.

    Raises :class:`~apl.errors.DamagedFile` (a ``ValueError``, saying to start over with
    ``resume=False``) when the file is not a checkpoint of this format (or is truncated or
    corrupted), holds another config's run, or trained on other noisy labels.
    """
    try:  # weights_only: a file that would run code when unpickled is refused, never executed
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, foreign, older or unsafe file: say which and what to do
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DamagedFile(f"{path} cannot be read safely as a checkpoint of this version ({type(e).__name__}: "
                         f"{reason}); use resume=False (--fresh) to start the run over") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != _FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise DamagedFile(f"{path} has checkpoint format {found!r}, expected "
                         f"{_FORMAT}; use resume=False (--fresh)")
    if ckpt.pop("sha256", None) != _content_digest(ckpt):
        raise DamagedFile(f"{path} is damaged (its content does not match its checksum: truncated or "
                         f"corrupted); use resume=False (--fresh) to start the run over")
    check_same_run(ckpt["config"], config, "a checkpoint", out_dir)
    if not torch.equal(ckpt["noisy_labels"], noisy_labels.cpu()):
        raise DamagedFile(f"{path}: the regenerated noisy labels differ from the checkpoint's "
                         f"(changed data or noise code); use resume=False (--fresh)")
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(ckpt["scheduler"])
    _set_rng_states(ckpt["rng"], device)
    return ckpt


def save_model(out_dir: Path, model) -> None:
    """Write the final weights (``model.pt``) atomically."""
    atomic_write_bytes(out_dir / MODEL_FILE, lambda f: f.write(_serialized(model.state_dict())))
