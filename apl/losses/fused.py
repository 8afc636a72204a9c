"""The fused loss operator: softmax, both loss terms, the reduction and the gradient in C++/CUDA.

``fused_loss(logits, target, spec)`` computes the same function as
:func:`apl.losses.reference_loss` (formulas: ``LOSSES.md``) with the operators
``torch.ops.apl.apl_loss`` / ``apl_loss_backward`` of the compiled extension ``apl._C``
(sources in ``csrc/``). The forward is one row kernel (max, log-sum-exp and every per-row
quantity of the active and the passive term) writing a small per-row ``stats`` tensor, then,
unless it is ``reduction="none"`` of a per-row loss, one batch step over the N rows (the paper
forms' statistic H or B, the per-class weights, the reduction) that also writes the ``batch``
terms the backward reads. The backward is one pass per row (NFL (paper) with ``"none"``: one
step more), no atomics. :func:`launch_counts` gives the numbers per loss. On CUDA nothing
reads tensor data on the host: a call never syncs and can be captured in a CUDA graph; targets
are checked on the device (an assert), or on the host with a named ``ValueError`` after
:func:`set_sync_target_check`. The autograd formula is registered in C++
(``csrc/autograd.cpp``) to keep Python out of the training step; the fake (meta) kernels are
registered here.

Supported: logits float16/bfloat16/float32/float64 (half types computed in float32), any C >= 2,
any :class:`~apl.losses.spec.LossSpec` whose passive term is not a paper form (every loss of
:func:`apl.losses.spec.spec_for`), label smoothing, and probability targets for the losses LOSSES.md
"Soft targets" extends (a second row path of the same operator: csrc/loss_row.h, "soft targets").
Works with ``torch.compile(fullgraph=True)``, the ``torch.func`` transforms (``grad``, ``vjp``,
``jacrev``, ``vmap``), on meta tensors and with ``torch.library.opcheck``. Double backward is not
supported: it raises.

Importing this module never fails: :func:`is_available` tells whether the extension is built.
"""
from __future__ import annotations

import json
from collections import namedtuple
from pathlib import Path

import torch

from apl.losses.checks import (
    INDEX_DTYPES,
    check_call,
    check_positions,
    check_probabilities_shape,
    positions_as_rows,
    validate_weight,
)
from apl.losses.spec import Kind, LossSpec

__all__ = ["is_available", "unavailable_reason", "cuda_available", "cuda_launch_problem", "supports",
           "unsupported_reason", "OpArgs",
           "fused_loss", "op_args", "apply", "launch_counts", "set_sync_target_check", "sync_target_check",
           "NUM_STATS", "NUM_BATCH", "REDUCTION_CODES"]

#: ``reduction`` string -> the operator's integer code.
REDUCTION_CODES = {"none": 0, "mean": 1, "sum": 2}
#: Passive kinds the operator accepts: every kind but the paper forms', whose batch statistic scales the
#: active term.
SUPPORTED_PASSIVE = tuple(k for k in Kind if k not in (Kind.NCE_PAPER, Kind.NFL_PAPER))

#: Beside the extension, the torch release it was built against (setup.py writes it with the build).
_BUILD_RECORD = Path(__file__).resolve().parent.parent / "_C_build.json"


def _torch_mismatch() -> str:
    """Why apl._C must not be loaded into this torch: it was built against another release ('' when it
    was built against this one, or did not record which)."""
    try:
        built = json.loads(_BUILD_RECORD.read_text(encoding="utf-8"))["torch"]
    except (OSError, ValueError, KeyError, TypeError):
        return ""  # a build without the record (an older or a hand-made one): loading it is the only test
    if built == torch.__version__:
        return ""
    return (f"the extension apl._C was built against torch {built}, but this is torch {torch.__version__}; "
            f"install torch=={built}, or rebuild apl against this torch (`pip install --no-build-isolation -e .`)")


_IMPORT_ERROR = _torch_mismatch()
if _IMPORT_ERROR:  # a library built for another torch's ABI may crash the process when loaded: not loaded
    _C = None
else:
    try:
        from apl import _C  # noqa: F401  (loading the library registers torch.ops.apl.*)
    except ImportError as exc:  # not built, or its library does not link against this torch
        _C = None
        _IMPORT_ERROR = f"the extension apl._C is not importable ({exc}); build it with " \
                        f"`pip install --no-build-isolation -e .`"


def _spec_values(spec: LossSpec, reduction: str, ignore_index: int) -> dict:
    """Every scalar argument of the operator by its schema name (csrc/ops.h APL_SCALAR_ARGS)."""
    return dict(active=int(spec.active), passive=int(spec.passive), alpha=float(spec.alpha), beta=float(spec.beta),
                gamma=float(spec.gamma), q=float(spec.q), a=float(spec.a), m=float(spec.m),
                min_prob=float(spec.min_prob), label_smoothing=float(spec.smoothing),
                reduction=REDUCTION_CODES[reduction], ignore_index=int(ignore_index))


def _abi_mismatch() -> str:
    """Why the built extension cannot serve this apl.losses.spec ('' when its loss kinds are Kind's and
    its scalar arguments the ones :func:`op_args` fills)."""
    built = list(torch.ops.apl._kind_names())
    ours = [k.name for k in Kind]
    if built != ours or any(k.value != i for i, k in enumerate(Kind)):
        return (f"the extension apl._C was built from other sources (its loss kinds {built} are not "
                f"apl.losses.spec.Kind {ours}); rebuild it with `pip install --no-build-isolation -e .`")
    names = sorted(torch.ops.apl._scalar_args()) if hasattr(torch.ops.apl, "_scalar_args") else None
    if names != sorted(_spec_values(LossSpec(Kind.CE), "mean", -100)):
        return (f"the extension apl._C was built from other sources (its scalar arguments {names} are not the ones "
                f"apl.losses.fused fills); rebuild it with `pip install --no-build-isolation -e .`")
    return ""


if _C is not None and not _IMPORT_ERROR:
    _IMPORT_ERROR = _abi_mismatch()
    if _IMPORT_ERROR:
        _C = None
#: Columns of the per-row statistics and entries of the batch terms the forward saves
#: (csrc/loss_row.h, enums Stat and BatchTerm; None without the extension).
NUM_STATS, NUM_BATCH = (tuple(int(v) for v in torch.ops.apl._layout()) if _C is not None else (None, None))
# Constants, so the backend choice is plain Python that torch.compile folds.
_AVAILABLE = _C is not None
_CUDA_BUILT = _AVAILABLE and torch._C._dispatch_has_kernel_for_dispatch_key("apl::apl_loss", "CUDA")
_OP = torch.ops.apl.apl_loss.default if _AVAILABLE else None
#: The operator's scalar arguments as one named tuple, in the schema's order (taken from the extension:
#: csrc/ops.h APL_SCALAR_ARGS is the one list): what :func:`op_args` returns and :func:`apply` takes.
OpArgs = namedtuple("OpArgs", tuple(torch.ops.apl._scalar_args()) if _AVAILABLE else ())


def is_available() -> bool:
    """True when the compiled operator is loaded and usable (CPU kernels at least)."""
    return _AVAILABLE


def unavailable_reason() -> str:
    """Why :func:`is_available` is False (empty string when it is True)."""
    return _IMPORT_ERROR


def cuda_available() -> bool:
    """True when the extension was built with its CUDA kernels (a GPU is a separate question:
    see :func:`cuda_launch_problem`)."""
    return _CUDA_BUILT


#: device -> '' (the kernels run there) or why not; filled by cuda_launch_problem.
_LAUNCH_PROBLEMS: dict[str, str] = {}


def cuda_launch_problem(device) -> str:
    """``""`` when the CUDA kernels run on ``device``, else why not (e.g. the build has no
    kernel image for that GPU's architecture). Proved once per device by a one-row call in
    eager mode; under ``torch.compile`` or CUDA graph capture an unproved device is assumed fine."""
    device = torch.device(device)
    if not _CUDA_BUILT:
        return "the extension was built without its CUDA kernels"
    if torch.compiler.is_compiling():
        return _LAUNCH_PROBLEMS.get(str(device), "")
    if not torch.cuda.is_available():
        return "no CUDA device is available to this process"
    key = f"cuda:{device.index if device.index is not None else torch.cuda.current_device()}"
    known = _LAUNCH_PROBLEMS.get(key)
    if known is not None:
        return known
    if torch.cuda.is_current_stream_capturing():  # a probe would sync inside the capture
        return ""
    try:
        _probe(key)
        problem = ""
    except (RuntimeError, AssertionError) as exc:  # no kernel image for this GPU, a failed launch
        problem = f"the CUDA kernels do not run on {key} ({str(exc).strip().splitlines()[0]})"
    _LAUNCH_PROBLEMS[key] = problem
    return problem


def _probe(device: str) -> None:
    """One row of CE through the operator on ``device``, synchronised: raises if it cannot run."""
    x = torch.zeros(1, 2, device=device)
    _OP(x, torch.zeros(1, dtype=torch.int64, device=device), *op_args(LossSpec(Kind.CE)), None)
    torch.cuda.synchronize(device)


def supports(spec: LossSpec) -> bool:
    """True when the operator computes ``spec``: any active kind, a passive kind of
    :data:`SUPPORTED_PASSIVE` (every loss :func:`apl.losses.spec.spec_for` builds)."""
    return not unsupported_reason(spec)


def unsupported_reason(spec: LossSpec) -> str:
    """Why the operator does not compute ``spec`` ('' when it does)."""
    if not isinstance(spec, LossSpec):
        return f"spec must be an apl.losses.spec.LossSpec, got {type(spec).__name__}"
    if spec.passive not in SUPPORTED_PASSIVE:
        return (f"the fused operator does not support {spec.passive.name} as the passive term (supported: "
                f"{', '.join(k.name for k in SUPPORTED_PASSIVE)})")
    return ""


def launch_counts(spec: LossSpec, reduction: str = "mean") -> tuple[int, int]:
    """Kernel launches of one forward and one backward call on CUDA (N > 0; the same steps run
    on the CPU): the row kernel, plus the batch step unless ``reduction="none"`` of a per-row
    loss; the backward adds one step for NFL (paper) with ``"none"``."""
    _require(spec, reduction)
    forward, backward = torch.ops.apl._launch_counts(int(spec.active), REDUCTION_CODES[reduction])
    return int(forward), int(backward)


def set_sync_target_check(enabled: bool) -> bool:
    """Debug switch: on CUDA, check targets on the host before the kernels (one device sync
    per forward) so that a bad target raises ``ValueError`` naming its row and value, instead
    of the kernels' device-side assert (which ends the CUDA context). Returns the previous
    setting. The CPU always checks on the host. Also set by ``APL_SYNC_TARGET_CHECK=1``."""
    _require_built()
    return bool(torch.ops.apl._set_sync_target_check(bool(enabled)))


def sync_target_check() -> bool:
    """Whether :func:`set_sync_target_check` is on."""
    _require_built()
    return bool(torch.ops.apl._sync_target_check())


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _scalars_and_weight(args: tuple, weight) -> tuple[OpArgs, torch.Tensor | None]:
    """The scalar arguments of a call of either operator and its weight (the schema's last argument,
    positional or by keyword)."""
    n = len(OpArgs._fields)
    return OpArgs(*args[:n]), (args[n] if len(args) > n else weight)


def _fake_apl_loss(logits, target, *args, weight=None):
    """Shapes and dtypes of ``apl_loss``'s outputs: loss [] (or the positions' shape (N, d1, ...,
    dK) for 'none'), stats [rows, NUM_STATS] (a row per position), batch [NUM_BATCH]."""
    scalars, weight = _scalars_and_weight(args, weight)
    torch._check(logits.dim() >= 2, lambda: "apl_loss: logits must be (N, C) or (N, C, d1, ..., dK)")
    torch._check(target.dim() == logits.dim() - (0 if target.is_floating_point() else 1),
                 lambda: "apl_loss: target must be (N,) or (N, d1, ..., dK), or probabilities of the logits' shape")
    if weight is not None:  # as the C++ check, for meta and fake tensors
        validate_weight(weight.detach(), logits)
    positions = (logits.shape[0], *logits.shape[2:])
    loss = logits.new_empty(positions if scalars.reduction == 0 else ())
    stats = logits.new_empty((logits.numel() // logits.shape[1], NUM_STATS), dtype=_stats_dtype(logits.dtype))
    batch = logits.new_empty((NUM_BATCH,), dtype=_stats_dtype(logits.dtype))
    return loss, stats, batch


def _fake_apl_loss_backward(grad_loss, logits, target, stats, batch, *args, weight=None):
    """``apl_loss_backward`` returns a gradient shaped like the logits."""
    return torch.empty_like(logits)


def _vmap_by_sample(op):
    """A torch.func.vmap rule for ``op``: the call once per sample of the vmapped dimension, outputs stacked
    (a loss's batch statistic and reduction belong to each sample's own batch, so samples are not merged)."""
    def rule(info, in_dims, *args):
        outputs = [op(*(a.select(d, i) if d is not None else a for a, d in zip(args, in_dims)))
                   for i in range(info.batch_size)]
        if isinstance(outputs[0], tuple):
            return tuple(torch.stack(parts) for parts in zip(*outputs)), (0,) * len(outputs[0])
        return torch.stack(outputs), 0
    return rule


if _C is not None:
    # Shapes for torch.compile, meta tensors and opcheck; vmap rules for torch.func. The autograd
    # formula is registered in C++ (csrc/autograd.cpp), keeping Python out of the training step.
    torch.library.register_fake("apl::apl_loss", _fake_apl_loss)
    torch.library.register_fake("apl::apl_loss_backward", _fake_apl_loss_backward)
    torch.library.register_vmap("apl::apl_loss", _vmap_by_sample(torch.ops.apl.apl_loss.default))
    torch.library.register_vmap("apl::apl_loss_backward", _vmap_by_sample(torch.ops.apl.apl_loss_backward.default))


def _require_built() -> None:
    if not _AVAILABLE:
        raise ValueError(f"apl.fused is unavailable: {_IMPORT_ERROR}")


def _require(spec: LossSpec, reduction: str, ignore_index: int = -100) -> None:
    """Raise ``ValueError`` unless the arguments are valid and the operator computes ``spec``."""
    check_call(spec, reduction, ignore_index)
    reason = unsupported_reason(spec)
    if reason:
        raise ValueError(f"{reason}; use apl.losses.reference_loss")


def op_args(spec: LossSpec, reduction: str = "mean", ignore_index: int = -100) -> OpArgs:
    """The operator's scalar arguments for ``spec`` (an :data:`OpArgs`), checked (``ValueError`` naming the
    problem): build them once and pass them to :func:`apply` on every call."""
    _require_built()
    _require(spec, reduction, ignore_index)
    return OpArgs(**_spec_values(spec, reduction, ignore_index))


def apply(logits: torch.Tensor, target: torch.Tensor, args: OpArgs,
          weight: torch.Tensor | None = None) -> torch.Tensor:
    """The fused loss with the scalar arguments of :func:`op_args`: the per-call path of the
    modules and functions. The operator itself checks the tensors (``ValueError``).
    ``F.cross_entropy``'s (N, C, d1, ..., dK) layout goes to the operator as it is; an unbatched
    (C,) is one row (:func:`apl.losses.spec.positions_as_rows`). Probability targets (floating, the
    logits' shape) are checked here for their shape, in the reference's words."""
    if isinstance(target, torch.Tensor) and target.is_floating_point() and isinstance(logits, torch.Tensor):
        check_probabilities_shape(logits, target)
    if isinstance(logits, torch.Tensor) and logits.dim() != 2 and isinstance(target, torch.Tensor):
        if logits.dim() > 2:
            check_positions(logits, target)  # named in Python's shape notation, as the reference does
        else:
            rows, rows_target, shape = positions_as_rows(logits, target)
            loss = apply(rows, rows_target, args, weight)
            return loss.reshape(shape) if args.reduction == REDUCTION_CODES["none"] else loss
    if not torch.compiler.is_compiling():  # eager: straight to the dispatcher (csrc/python_module.cpp)
        loss = _C.loss(logits, target, args, weight)
        if loss is not NotImplemented:
            return loss
    if not isinstance(logits, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise ValueError("logits and target must be torch.Tensors")
    if weight is not None and not isinstance(weight, torch.Tensor):
        raise ValueError(f"weight must be a torch.Tensor of per-class weights or None, got {type(weight).__name__}")
    if target.dtype != torch.int64 and target.dtype in INDEX_DTYPES:
        target = target.long()
    return _OP(logits.contiguous(), target.contiguous(), *args, weight)[0]


def fused_loss(logits: torch.Tensor, target: torch.Tensor, spec: LossSpec, reduction: str = "mean",
               ignore_index: int = -100, weight: torch.Tensor | None = None) -> torch.Tensor:
    """``spec.alpha * active + spec.beta * passive`` per row, reduced, by the fused operator.

    Same contract as :func:`apl.losses.reference_loss` (formulas and edge cases: ``LOSSES.md``):
    ``logits`` (N, C) floating, ``target`` (N,) integer class indices, rows whose target is
    ``ignore_index`` add 0 and are left out of the mean and of the paper forms' batch
    statistic, or (N, C) probabilities for the losses LOSSES.md "Soft targets" extends;
    ``weight`` (C,) are optional per-class weights, and ``spec.smoothing`` CE's label smoothing,
    as there. Returns a tensor of the
    logits' dtype. Raises ``ValueError`` naming the problem for bad input (the operator checks
    the tensors, the target range and the weight) or when the operator is not built.
    """
    return apply(logits, target, op_args(spec, reduction, ignore_index), weight)
