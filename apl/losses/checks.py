"""The losses' input checks: every argument and tensor a loss call takes, with a ``ValueError``
naming the problem (the reference, the fused operator's Python side and the modules share them).
"""
from __future__ import annotations

import torch

from apl.losses.spec import REDUCTIONS, LossSpec

__all__ = [
    "check_call", "positions_as_rows", "check_positions", "check_probabilities_shape", "validate_inputs",
    "check_num_classes", "validate_weight", "INDEX_DTYPES",
]



def check_call(spec, reduction: str, ignore_index) -> None:
    """Raise ``ValueError`` naming the problem unless ``spec`` is a :class:`LossSpec`,
    ``reduction`` one of :data:`REDUCTIONS` and ``ignore_index`` an int: the arguments every
    entry point (reference, fused operator, modules) takes besides the tensors."""
    if not isinstance(spec, LossSpec):
        raise ValueError(f"spec must be an apl.losses.spec.LossSpec, got {type(spec).__name__}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")


_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: Integer dtypes accepted as class-index targets (converted to int64).
INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def positions_as_rows(logits, target):
    """``F.cross_entropy``'s layouts as the rows every loss computes on: ``(logits, target, shape)``.

    Logits (N, C, d1, ..., dK) with class dimension 1 and targets (N, d1, ..., dK) become
    (N*d1*...*dK, C) and (N*d1*...*dK,), one row per position (a copy: the class dimension is
    moved last); an unbatched (C,) with a 0-D target becomes one row. ``shape`` is the target's
    shape, what ``reduction="none"`` returns, or None for (N, C) logits, which pass through
    unchanged (as does anything that is not a tensor: :func:`validate_inputs` names it).
    """
    if not isinstance(logits, torch.Tensor) or not isinstance(target, torch.Tensor) or logits.dim() == 2:
        return logits, target, None
    soft = target.is_floating_point()  # probability targets: the logits' shape, classes in dimension 1
    if logits.dim() == 1:
        if target.dim() != (1 if soft else 0):
            raise ValueError(f"unbatched logits of shape {tuple(logits.shape)} need a 0-D target (or probabilities "
                             f"of their shape), got shape {tuple(target.shape)}")
        return logits[None], target[None], logits.shape[:0]
    if logits.dim() == 0:
        raise ValueError("logits must be (N, C), (N, C, d1, ..., dK) or unbatched (C,), got a 0-D tensor")
    check_positions(logits, target)
    shape = (logits.shape[0], *logits.shape[2:])
    rows_target = target.movedim(1, -1).reshape(-1, logits.shape[1]) if soft else target.reshape(-1)
    return logits.movedim(1, -1).reshape(-1, logits.shape[1]), rows_target, torch.Size(shape)


def check_positions(logits: torch.Tensor, target: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``target`` is (N, d1, ..., dK) for (N, C, d1, ..., dK) ``logits``
    (or, floating, probabilities of the logits' own shape)."""
    if target.is_floating_point():
        return check_probabilities_shape(logits, target)
    expected = (logits.shape[0], *logits.shape[2:])
    if tuple(target.shape) != expected:
        raise ValueError(f"target of shape {tuple(target.shape)} does not match logits of shape "
                         f"{tuple(logits.shape)}: logits (N, C, d1, ..., dK) need a target (N, d1, ..., dK) "
                         f"= {expected}")


def check_probabilities_shape(logits: torch.Tensor, target: torch.Tensor) -> None:
    """Raise ``ValueError`` unless a floating ``target`` has the logits' shape (probabilities)."""
    if target.shape == logits.shape:
        return
    if target.dim() == logits.dim() - 1:  # the shape of class indices: float labels, a common slip
        raise ValueError(f"target must be an integer tensor of class indices (got dtype {target.dtype}), "
                         f"or probabilities of the logits' shape {tuple(logits.shape)}")
    raise ValueError(f"probability targets must have the logits' shape {tuple(logits.shape)}, "
                     f"got {tuple(target.shape)}")


def validate_inputs(logits: torch.Tensor, target: torch.Tensor, *, reduction: str = "mean",
                    ignore_index: int = -100, num_classes: int | None = None,
                    check_range: bool = True) -> torch.Tensor:
    """Raise ``ValueError`` naming the problem, or return ``target`` as int64 (class indices) or
    as it is (probabilities).

    Checks: logits are a 2-D floating tensor (N, C) with C >= 2; target is a 1-D integer
    tensor of length N on the same device, every target in [0, C) or equal to
    ``ignore_index``, or a floating (N, C) tensor of probabilities (values not checked, as
    ``F.cross_entropy``); ``reduction`` is known. NaN logits are *not* an error: they give a
    NaN loss. ``check_range=False`` skips the range check (it costs a device sync on GPU);
    under ``torch.compile`` and for a target batched by ``torch.func.vmap`` it is skipped too (a
    data-dependent branch would split the graph, or fail under vmap), as PyTorch's own losses leave it
    to their kernels.
    """
    if not isinstance(logits, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise ValueError("logits and target must be torch.Tensors")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if logits.dim() != 2:
        raise ValueError(f"logits must be (N, C), (N, C, d1, ..., dK) or (C,), got shape {tuple(logits.shape)}")
    if logits.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"logits must be a floating tensor, got dtype {logits.dtype}")
    n, c = logits.shape
    if c < 2:
        raise ValueError(f"logits need at least 2 classes, got C={c}")
    check_num_classes(logits, num_classes)
    if target.is_floating_point():
        check_probabilities_shape(logits, target)
        if target.device != logits.device:
            raise ValueError(f"target is on {target.device} but logits are on {logits.device}")
        return target
    if target.dim() != 1:
        raise ValueError(f"target must be 1-D (N,), got shape {tuple(target.shape)}")
    if target.dtype not in INDEX_DTYPES:
        raise ValueError(f"target must be an integer tensor of class indices, got dtype {target.dtype}")
    if target.shape[0] != n:
        raise ValueError(f"logits have N={n} rows but target has {target.shape[0]} entries")
    if target.device != logits.device:
        raise ValueError(f"target is on {target.device} but logits are on {logits.device}")
    target = target.long()
    if check_range and n > 0 and target.device.type != "meta" and not torch.compiler.is_compiling() \
            and not torch._C._functorch.is_functorch_wrapped_tensor(target):  # vmap: no data-dependent branch
        bad = ((target < 0) | (target >= c)) & (target != ignore_index)
        if bool(bad.any()):
            first = int(target[bad][0])
            raise ValueError(f"target {first} is out of range for C={c} classes "
                             f"(valid: 0..{c - 1}, or ignore_index={ignore_index})")
    return target


def check_num_classes(logits: torch.Tensor, num_classes: int | None) -> None:
    """Raise ``ValueError`` when ``logits`` do not have ``num_classes`` classes (None: any).

    Only the class count: the rest of the input is :func:`validate_inputs`' (or the fused
    operator's) to check, so a loss module that knows its C checks the input once.
    """
    if num_classes is not None and isinstance(logits, torch.Tensor) and logits.dim() >= 1:
        c = logits.shape[0 if logits.dim() == 1 else 1]  # unbatched (C,), else class dimension 1
        if c != num_classes:
            raise ValueError(f"logits have C={c} classes but the loss was built for {num_classes}")


def validate_weight(weight, logits: torch.Tensor) -> torch.Tensor | None:
    """Raise ``ValueError`` naming the problem, or return ``weight`` (None stays None).

    Per-class weights (LOSSES.md "Per-class weights"): a 1-D floating tensor with one entry per
    class, on the logits' device, not requiring grad (no loss here differentiates them).
    """
    if weight is None:
        return None
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"weight must be a torch.Tensor of per-class weights or None, got {type(weight).__name__}")
    c = logits.shape[1] if logits.dim() >= 2 else logits.shape[-1]  # class dimension 1, as F.cross_entropy
    if weight.dim() != 1 or weight.shape[0] != c:
        raise ValueError(f"weight must be 1-D with one entry per class ({c}), got shape {tuple(weight.shape)}")
    if weight.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"weight must be a floating tensor, got dtype {weight.dtype}")
    if weight.device != logits.device:
        raise ValueError(f"weight is on {weight.device} but logits are on {logits.device}")
    if weight.requires_grad:
        raise ValueError("weight must not require grad (no gradient is computed for it); pass weight.detach()")
    return weight
