"""Devices: a config's device name checked and resolved, a readable device name, the grid's workers."""
from __future__ import annotations

import os
import platform

import torch

from apl.presets import get_preset

__all__ = ["resolve_device", "device_name", "parse_devices"]


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


def parse_devices(spec: str | None, preset: str = "paper") -> list[tuple[str, int | None]]:
    """``"cuda:0,cuda:1"`` / ``"cpu,cpu"`` / ``"auto"`` -> ``[(device, threads per worker)]``.

    ``auto`` (or None): every visible GPU, else the preset's CPU workers
    (:attr:`apl.presets.Preset.cpu_workers`, at most one per core). CPU workers share the
    cores evenly. Each device is checked to exist (``ValueError`` otherwise).
    """
    if spec is None or spec.strip() in ("", "auto"):
        if torch.cuda.is_available():
            names = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        else:
            workers = get_preset(preset).cpu_workers
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
