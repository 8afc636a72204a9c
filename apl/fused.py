"""The fused loss operator: softmax, both loss terms, the reduction and the gradient in C++/CUDA.

``fused_loss(logits, target, spec)`` computes the same function as
:func:`apl.losses.reference_loss` (formulas: ``LOSSES.md``) with the operators
``torch.ops.apl.apl_loss`` / ``apl_loss_backward`` of the compiled extension ``apl._C``
(sources in ``csrc/``). The forward is one row kernel (max, log-sum-exp and every per-row
quantity of the active and the passive term) that writes a small per-row ``stats`` tensor; the
batch statistic of the paper's forms (label entropy H for ``NCE_PAPER``, mean focal weight B
for ``NFL_PAPER``), the optional per-class weights and the reduction are a short second step
inside the op over the N rows (plain loops on CPU, ATen reductions and one tiny kernel on
CUDA). The backward is one pass per row from the saved stats, no atomics. The autograd
formula (save logits, target, stats, weight; call
``apl_loss_backward``) is registered in C++ (``csrc/autograd.cpp``) to keep Python out of the
training step; the fake (meta) kernels are registered here.

Supported: logits float16/bfloat16/float32/float64 (half types computed in float32), any C >= 2,
any :class:`~apl.spec.LossSpec` whose passive term is NONE, CE, FL, FL_DETACHED, MAE, RCE or
GCE (every loss of :func:`apl.spec.spec_for`). Works with ``torch.compile(fullgraph=True)``,
on meta tensors and with ``torch.library.opcheck``. Double backward is not supported: it raises.
On CUDA, the target range check costs one device sync.

Importing this module never fails: :func:`is_available` tells whether the extension is built.
"""
from __future__ import annotations

import torch

from apl.spec import REDUCTIONS, Kind, LossSpec, validate_inputs, validate_weight

__all__ = ["is_available", "unavailable_reason", "cuda_available", "supports", "fused_loss",
           "NUM_STATS", "REDUCTION_CODES"]

#: Columns of the per-row statistics the forward saves (csrc/loss_row.h, enum Stat).
NUM_STATS = 13
#: ``reduction`` string -> the operator's integer code.
REDUCTION_CODES = {"none": 0, "mean": 1, "sum": 2}
#: Passive kinds the operator accepts (they need no normaliser and no batch statistic).
SUPPORTED_PASSIVE = (Kind.NONE, Kind.CE, Kind.FL, Kind.FL_DETACHED, Kind.MAE, Kind.RCE, Kind.GCE)

try:
    from apl import _C  # noqa: F401  (loading the library registers torch.ops.apl.*)
except ImportError as exc:  # not built, or built against another torch
    _C = None
    _IMPORT_ERROR = f"the extension apl._C is not importable ({exc}); build it with " \
                    f"`pip install --no-build-isolation -e .`"
else:
    _IMPORT_ERROR = ""


def is_available() -> bool:
    """True when the compiled operator is loaded and usable (CPU kernels at least)."""
    return _C is not None


def unavailable_reason() -> str:
    """Why :func:`is_available` is False (empty string when it is True)."""
    return _IMPORT_ERROR


def cuda_available() -> bool:
    """True when the extension was built with its CUDA kernels (a GPU is a separate question)."""
    return is_available() and torch._C._dispatch_has_kernel_for_dispatch_key("apl::apl_loss", "CUDA")


def supports(spec: LossSpec) -> bool:
    """True when the operator computes ``spec`` (any active kind; passive NONE, CE, FL,
    FL_DETACHED, MAE, RCE or GCE: every loss :func:`apl.spec.spec_for` builds)."""
    return isinstance(spec, LossSpec) and spec.passive in SUPPORTED_PASSIVE


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fake_apl_loss(logits, target, active, passive, alpha, beta, gamma, q, reduction, ignore_index, weight=None):
    """Shapes and dtypes of ``apl_loss``'s outputs: loss [] (or [N] for 'none'), stats [N, NUM_STATS]."""
    torch._check(logits.dim() == 2, lambda: "apl_loss: logits must be 2-D (N, C)")
    torch._check(target.dim() == 1, lambda: "apl_loss: target must be 1-D (N,)")
    if weight is not None:  # as the C++ check, for meta and fake tensors
        validate_weight(weight.detach(), logits)
    n = logits.shape[0]
    loss = logits.new_empty((n,) if reduction == 0 else ())
    stats = logits.new_empty((n, NUM_STATS), dtype=_stats_dtype(logits.dtype))
    return loss, stats


def _fake_apl_loss_backward(grad_loss, logits, target, stats, active, passive, alpha, beta, gamma,
                            q, reduction, ignore_index, weight=None):
    """``apl_loss_backward`` returns a gradient shaped like the logits."""
    return torch.empty_like(logits)


if _C is not None:
    # Shapes for torch.compile, meta tensors and opcheck. The autograd formula is registered in
    # C++ (csrc/autograd.cpp): a Python one (torch.library.register_autograd) costs ~60 us of
    # interpreter time per step, more than the whole loss at small batch sizes.
    torch.library.register_fake("apl::apl_loss", _fake_apl_loss)
    torch.library.register_fake("apl::apl_loss_backward", _fake_apl_loss_backward)


def fused_loss(logits: torch.Tensor, target: torch.Tensor, spec: LossSpec, reduction: str = "mean",
               ignore_index: int = -100, weight: torch.Tensor | None = None) -> torch.Tensor:
    """``spec.alpha * active + spec.beta * passive`` per row, reduced, by the fused operator.

    Same contract as :func:`apl.losses.reference_loss` (formulas and edge cases: ``LOSSES.md``):
    ``logits`` (N, C) floating, ``target`` (N,) integer class indices, rows whose target is
    ``ignore_index`` add 0 and are left out of the mean and of the paper forms' batch
    statistic; ``weight`` (C,) are optional per-class weights, as there. Returns a tensor of the
    logits' dtype. Raises ``ValueError`` naming the problem for bad input (the operator checks
    the target range and the weight) or when the operator is not built.
    """
    if not is_available():
        raise ValueError(f"apl.fused is unavailable: {unavailable_reason()}")
    if not isinstance(spec, LossSpec):
        raise ValueError(f"spec must be an apl.spec.LossSpec, got {type(spec).__name__}")
    if not supports(spec):
        raise ValueError(f"the fused operator does not support {spec.passive.name} as the passive "
                         f"term (supported: {', '.join(k.name for k in SUPPORTED_PASSIVE)}); "
                         f"use apl.losses.reference_loss")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    target = validate_inputs(logits, target, reduction=reduction, ignore_index=ignore_index,
                             check_range=False)
    weight = validate_weight(weight, logits)
    loss, _ = torch.ops.apl.apl_loss(
        logits.contiguous(), target.contiguous(), int(spec.active), int(spec.passive),
        float(spec.alpha), float(spec.beta), float(spec.gamma), float(spec.q),
        REDUCTION_CODES[reduction], ignore_index, weight)
    return loss
