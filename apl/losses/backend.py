"""Which implementation computes a loss: the fused operator where it can, else the reference.

:func:`resolve_backend` decides for a (backend, spec, device) and says why not fused;
:func:`compute_loss` computes a loss with the decision, made once per (backend, spec, device)
and warned about once per process when ``"auto"`` falls back to the reference.
"""
from __future__ import annotations

import warnings

import torch

import apl.losses.fused as fused
from apl.losses.reference import reference_loss
from apl.losses.spec import LossSpec

__all__ = ["BACKENDS", "check_backend", "resolve_backend", "backend_for", "compute_loss"]

#: ``"auto"``: fused where it can run, else the reference; or either one by name.
BACKENDS = ("auto", "fused", "reference")


def check_backend(backend) -> None:
    """Raise ``ValueError`` unless ``backend`` is one of :data:`BACKENDS`."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


_fallback_warned = False
#: (backend, spec, device) -> the backend used; decided once, so a call costs a dict lookup.
_CHOICES: dict = {}


def resolve_backend(backend: str, spec: LossSpec, device) -> tuple[str, str]:
    """``("fused" | "reference", why not fused)`` for ``spec`` on ``device``.

    ``"auto"`` is fused when the extension is built, computes ``spec`` and its kernels run on
    the device (a CPU-only build has none for CUDA tensors; a CUDA device is proved once by a
    one-row call, :func:`apl.fused.cuda_launch_problem`); ``"fused"`` raises ``ValueError``
    naming the reason when it cannot be used.
    """
    check_backend(backend)
    if not isinstance(spec, LossSpec):
        raise ValueError(f"spec must be an apl.losses.spec.LossSpec, got {type(spec).__name__}")
    if backend == "reference":
        return "reference", "the reference was requested"
    device = torch.device(device)
    if not fused.is_available():
        reason = fused.unavailable_reason()
    elif fused.unsupported_reason(spec):
        reason = fused.unsupported_reason(spec)
    elif device.type == "cuda":
        reason = fused.cuda_launch_problem(device)
    elif device.type not in ("cpu", "meta"):
        reason = f"the fused operator has no kernels for {device.type} tensors"
    else:
        reason = ""
    if not reason:
        return "fused", ""
    if backend == "fused":
        raise ValueError(f"backend='fused' was requested but the fused operator cannot be used: "
                         f"{reason}; use backend='auto' or 'reference'")
    return "reference", reason


def backend_for(backend: str, spec: LossSpec, device: torch.device) -> str:
    """The backend a call uses: :func:`resolve_backend`, decided once per (backend, spec, device)
    and warned about once (``"auto"`` falling back)."""
    if torch.compiler.is_compiling():  # traced once per graph; no global state to mutate
        return resolve_backend(backend, spec, device)[0]
    key = (backend, spec, device)
    chosen = _CHOICES.get(key)
    if chosen is None:
        chosen, reason = resolve_backend(backend, spec, device)
        if chosen == "reference" and backend == "auto":
            _warn_fallback(reason)
        _CHOICES[key] = chosen
    return chosen


def compute_loss(logits: torch.Tensor, target: torch.Tensor, spec: LossSpec, *,
                 reduction: str = "mean", ignore_index: int = -100,
                 weight: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """The loss ``spec`` (LOSSES.md) on a batch, by the chosen backend.

    ``backend="reference"`` runs :func:`reference_loss`; ``"fused"`` runs
    :func:`apl.fused.fused_loss` and raises ``ValueError`` if it cannot (see
    :func:`resolve_backend`); ``"auto"`` uses the fused operator where it can, else the
    reference, warning once per process why.
    """
    device = logits.device if isinstance(logits, torch.Tensor) else torch.device("cpu")
    if backend_for(backend, spec, device) == "fused":
        return fused.fused_loss(logits, target, spec, reduction=reduction, ignore_index=ignore_index, weight=weight)
    return reference_loss(logits, target, spec, reduction=reduction, ignore_index=ignore_index, weight=weight)


def _warn_fallback(reason: str) -> None:
    """Warn once per process that the reference is used instead of the fused operator."""
    global _fallback_warned
    if _fallback_warned:
        return
    _fallback_warned = True
    warnings.warn(f"apl: the fused loss operator is unavailable ({reason}); using the pure-PyTorch "
                  f"reference (same values, slower). This warning is shown once.",
                  RuntimeWarning, stacklevel=3)
