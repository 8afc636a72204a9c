"""The reference losses (pure PyTorch), the choice of backend, and the loss modules.

:func:`reference_loss` computes any :class:`~apl.spec.LossSpec` with ordinary autograd ops; it
is the ground truth that the fused operator (:mod:`apl.fused`) is tested against. Every
formula, variant, clamp and edge case is defined in ``LOSSES.md``; this module only says how
it is computed. :func:`compute_loss` picks the fused operator or the reference, and the
modules (:class:`APLLoss`, :func:`get_loss`, the named subclasses) wrap it.
"""
from __future__ import annotations

import math
import warnings
from types import MappingProxyType

import torch
import torch.nn.functional as F
from torch import nn

from apl import fused
from apl.spec import (PROB_CLAMP, RCE_A, REDUCTIONS, Kind, LossSpec, check_num_classes, spec_for, validate_inputs,
                      validate_weight)

__all__ = [
    "BACKENDS", "reference_loss", "resolve_backend", "compute_loss", "APLLoss", "get_loss",
    "available_losses", "LOSSES", "CELoss", "FocalLoss", "MAELoss", "RCELoss", "GCELoss", "SCELoss", "NCELoss",
    "NFLLoss", "NCEMAELoss", "NCERCELoss", "NFLMAELoss", "NFLRCELoss",
]

BACKENDS = ("auto", "fused", "reference")
#: Keyword parameters that :func:`apl.spec.spec_for` understands.
SPEC_PARAMS = ("variant", "gamma", "q", "lam", "alpha", "beta")

_LOG_PROB_CLAMP = math.log(PROB_CLAMP)
_LN2 = math.log(2.0)


# --------------------------------------------------------------------------- reference math

def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, accurate on both sides of ``-ln 2`` (LOSSES.md)."""
    x = x.clamp(max=0.0)  # log_softmax is <= 0 in exact arithmetic; guard a rounding
    return torch.where(x > -_LN2, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _focal_weight(log1m: torch.Tensor, gamma: float) -> torch.Tensor:
    """``(1 - p)^gamma`` from ``log(1 - p)``: ``exp(gamma * log(1 - p))``, exactly 1 for gamma = 0.

    The gamma = 0 case is explicit because ``0 * log(0) = 0 * -inf`` would be NaN.
    """
    if gamma == 0:
        return torch.ones_like(log1m)
    return torch.exp(gamma * log1m)


class _lazy:
    """``functools.cached_property`` without its lock (Python < 3.12), which torch.compile cannot trace."""

    def __init__(self, fn):
        self.fn, self.name = fn, fn.__name__

    def __get__(self, obj, cls=None):
        if obj is None:
            return self
        value = self.fn(obj)
        setattr(obj, self.name, value)  # the instance attribute now shadows this descriptor
        return value


class _Rows:
    """Per-row quantities of one batch, each computed on first use and shared by both terms.

    ``target`` has ignored rows replaced by class 0 so gathers stay in range; their values are
    discarded by the caller, and every batch statistic reads ``valid``.
    """

    def __init__(self, z: torch.Tensor, target: torch.Tensor, valid: torch.Tensor):
        self.z, self.target, self.valid = z, target, valid
        self.num_classes = z.shape[1]

    @_lazy
    def onehot(self) -> torch.Tensor:
        return F.one_hot(self.target, self.num_classes).bool()

    @_lazy
    def log_p(self) -> torch.Tensor:
        return F.log_softmax(self.z, dim=1)

    @_lazy
    def p(self) -> torch.Tensor:
        return self.log_p.exp()

    @_lazy
    def log_p_y(self) -> torch.Tensor:
        return self.log_p.gather(1, self.target.unsqueeze(1)).squeeze(1)

    @_lazy
    def log1m_p_y(self) -> torch.Tensor:
        # log(1 - p_y) = logsumexp over the other classes of log p_k: exact when p_y rounds to 1.
        # The target's entry is -inf, where logsumexp's gradient is 0.
        return torch.logsumexp(self.log_p.masked_fill(self.onehot, float("-inf")), dim=1)

    @_lazy
    def n_valid(self) -> torch.Tensor:
        return self.valid.sum().to(self.z.dtype)

    @_lazy
    def label_entropy(self) -> torch.Tensor:
        """H of the non-ignored targets' class frequencies; ln C when one class (or none) occurs."""
        counts = torch.zeros(self.num_classes, dtype=self.z.dtype, device=self.z.device)
        counts.scatter_add_(0, self.target, self.valid.to(self.z.dtype))
        pi = counts / self.n_valid.clamp(min=1)
        entropy = -torch.xlogy(pi, pi).sum()
        single_class = (counts > 0).sum() <= 1
        return torch.where(single_class, torch.full_like(entropy, math.log(self.num_classes)), entropy)


def _term(kind: Kind, spec: LossSpec, rows: _Rows) -> torch.Tensor:
    """The per-row value (N,) of one term; LOSSES.md defines each kind."""
    if kind == Kind.CE:
        return -rows.log_p_y
    if kind in (Kind.FL, Kind.FL_DETACHED):
        weight = _focal_weight(rows.log1m_p_y, spec.gamma)
        if kind == Kind.FL_DETACHED:
            weight = weight.detach()
        return -weight * rows.log_p_y
    if kind == Kind.MAE:
        return rows.log1m_p_y.exp()  # 1 - p_y, without the cancellation of 1 - exp(log p_y)
    if kind == Kind.RCE:
        others = rows.p.clamp(PROB_CLAMP, 1.0).masked_fill(rows.onehot, 0.0)
        return RCE_A * others.sum(dim=1)
    if kind == Kind.GCE:
        # (1 - clamp(p_y)^q) / q with the clamp taken on log p_y (same zero gradient below it)
        # and expm1 for accuracy near p_y = 1.
        return -torch.expm1(spec.q * rows.log_p_y.clamp(min=_LOG_PROB_CLAMP)) / spec.q
    if kind == Kind.NCE_MA2020:
        # sum_k log p_k = sum_k (z_k - m) - C * logsumexp(z - m): no big sums of big numbers.
        shifted = rows.z - rows.z.amax(dim=1, keepdim=True).detach()
        denominator = shifted.sum(dim=1) - rows.num_classes * torch.logsumexp(shifted, dim=1)
        return rows.log_p_y / denominator
    if kind == Kind.NFL_MA2020:
        # Every weight (1-p_k)^g is detached and comes from log1mexp(log p_k), the target's too,
        # so the numerator is exactly the k = y term of the denominator.
        weights = _focal_weight(_log1mexp(rows.log_p.detach()), spec.gamma)
        weighted = weights * rows.log_p
        numerator = weighted.gather(1, rows.target.unsqueeze(1)).squeeze(1)
        return numerator / weighted.sum(dim=1)
    if kind == Kind.NCE_PAPER:
        return -rows.log_p_y / rows.label_entropy
    if kind == Kind.NFL_PAPER:
        # FL_i / B = -log p_i * w_i / mean_j w_j = -log p_i * N * softmax_j(g log(1-p_{y_j}))_i.
        # In log space there is no 0/0 when every w_j underflows: log p_y is then exactly 0,
        # so the value and gradient are 0, the B = 0 limit that LOSSES.md defines.
        log_weight = (spec.gamma * rows.log1m_p_y).masked_fill(~rows.valid, float("-inf"))
        # With no valid row at all, a softmax over all -inf is NaN; those rows are discarded.
        log_weight = torch.where(rows.valid.any(), log_weight, torch.zeros_like(log_weight))
        share = torch.softmax(log_weight, dim=0)
        return -rows.log_p_y * rows.n_valid * share
    raise ValueError(f"unsupported loss kind {kind!r}")


def _reduce(per_row: torch.Tensor, valid: torch.Tensor, reduction: str,
            row_weight: torch.Tensor | None) -> torch.Tensor:
    """``none`` keeps rows (ignored ones 0), ``sum`` adds, ``mean`` divides by the non-ignored
    count, or by the sum of the non-ignored rows' weights when there are per-class weights."""
    if reduction == "none":
        return per_row
    total = per_row.sum()
    if reduction == "sum":
        return total
    denominator = valid.sum().to(per_row.dtype) if row_weight is None else row_weight.sum()
    return total / denominator  # 0 / 0 = NaN when every row is ignored


def _check_common(spec, ignore_index) -> None:
    if not isinstance(spec, LossSpec):
        raise ValueError(f"spec must be an apl.spec.LossSpec, got {type(spec).__name__}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")


def reference_loss(logits: torch.Tensor, target: torch.Tensor, spec: LossSpec,
                   reduction: str = "mean", ignore_index: int = -100,
                   weight: torch.Tensor | None = None) -> torch.Tensor:
    """``spec.alpha * active + spec.beta * passive`` per row, reduced: the pure-PyTorch reference.

    ``logits`` (N, C) floating, ``target`` (N,) class indices. Rows whose target is
    ``ignore_index`` add 0 and are left out of every batch statistic (the paper forms' H and B)
    and of the ``mean`` denominator; ``mean`` of a batch with no valid row is NaN, like
    ``F.cross_entropy``. ``weight`` (C,), optional per-class weights: row i's loss is scaled
    by ``weight[target[i]]`` and ``mean`` divides by the sum of those weights, as
    ``F.cross_entropy`` (the paper forms' batch statistics stay unweighted). Formulas,
    variants, clamps and edge cases: ``LOSSES.md``.
    Differentiable by autograd; float32/float64 are kept, float16/bfloat16 are computed in
    float32 and the result cast back to the input dtype.
    """
    _check_common(spec, ignore_index)
    target = validate_inputs(logits, target, reduction=reduction, ignore_index=ignore_index)
    weight = validate_weight(weight, logits)
    compute_dtype = torch.float32 if logits.dtype in (torch.float16, torch.bfloat16) else logits.dtype
    z = logits.to(compute_dtype)
    valid = target != ignore_index
    rows = _Rows(z, torch.where(valid, target, torch.zeros_like(target)), valid)

    per_row = spec.alpha * _term(spec.active, spec, rows)
    if spec.passive != Kind.NONE:
        per_row = per_row + spec.beta * _term(spec.passive, spec, rows)
    per_row = torch.where(valid, per_row, torch.zeros_like(per_row))
    row_weight = None
    if weight is not None:
        row_weight = torch.where(valid, weight.to(compute_dtype)[rows.target], torch.zeros_like(per_row))
        per_row = per_row * row_weight
    return _reduce(per_row, valid, reduction, row_weight).to(logits.dtype)


# --------------------------------------------------------------------------- backend choice

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
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not isinstance(spec, LossSpec):
        raise ValueError(f"spec must be an apl.spec.LossSpec, got {type(spec).__name__}")
    if backend == "reference":
        return "reference", "the reference was requested"
    device = torch.device(device)
    if not fused.is_available():
        reason = fused.unavailable_reason()
    elif not fused.supports(spec):
        reason = f"the fused operator does not compute {spec.passive.name} as a passive term"
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


def _backend_for(backend: str, spec: LossSpec, device: torch.device) -> str:
    """The backend a call uses: :func:`resolve_backend`, decided once per (backend, spec, device)
    and warned about once (``"auto"`` falling back)."""
    if torch.compiler.is_compiling():  # traced once per graph; no global state to mutate
        return resolve_backend(backend, spec, device)[0]
    key = (backend, spec, device)
    chosen = _CHOICES.get(key)
    if chosen is None:
        chosen, reason = resolve_backend(backend, spec, device)
        if chosen == "reference" and backend == "auto" and not torch.compiler.is_compiling():
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
    if _backend_for(backend, spec, device) == "fused":
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


# --------------------------------------------------------------------------- modules

def _canonical_name(name) -> str:
    """``"NCE_RCE"`` -> ``"nce+rce"``; the functional API spells ``+`` as ``_``."""
    if not isinstance(name, str):
        raise ValueError(f"loss name must be a string, got {type(name).__name__}")
    return name.lower().strip().replace("_", "+")


def _describe(spec: LossSpec) -> str:
    parts = [f"active={spec.active.name}", f"alpha={spec.alpha:g}"]
    if spec.passive != Kind.NONE:
        parts += [f"passive={spec.passive.name}", f"beta={spec.beta:g}"]
    kinds = (spec.active, spec.passive)
    if any(k in (Kind.FL, Kind.FL_DETACHED, Kind.NFL_MA2020, Kind.NFL_PAPER) for k in kinds):
        parts.append(f"gamma={spec.gamma:g}")
    if Kind.GCE in kinds:
        parts.append(f"q={spec.q:g}")
    return ", ".join(parts)


_MODULE_PARAMS = ("reduction", "ignore_index", "backend", "num_classes", "weight")


class APLLoss(nn.Module):
    """A loss of the project as a module: ``alpha * active + beta * passive`` (LOSSES.md).

    Built from a name (``"nce+rce"``, ``"nfl"``, ... see :data:`apl.spec.LOSS_NAMES`; ``_``
    may replace ``+``) with the parameters of :func:`apl.spec.spec_for` (``variant``,
    ``gamma``, ``q``, ``lam`` or ``alpha``/``beta``), or from a ready :class:`LossSpec`.
    ``forward(logits, target)`` returns the loss reduced by ``reduction``. ``backend`` is
    ``"auto"`` (fused operator when available, else the reference with one warning),
    ``"fused"`` or ``"reference"``. ``num_classes``, when given, is checked against C.
    ``weight`` (C,), optional per-class weights (see :func:`reference_loss`), is kept as a
    buffer, so it moves with the module (``.to(device)``) and is saved in its ``state_dict``.
    """

    def __init__(self, loss: str | LossSpec = "nce+rce", *, num_classes: int | None = None,
                 reduction: str = "mean", ignore_index: int = -100, backend: str = "auto",
                 weight: torch.Tensor | None = None, **params):
        super().__init__()
        if isinstance(loss, LossSpec):
            if params:
                raise ValueError(f"parameters {sorted(params)} were given with a LossSpec, "
                                 f"which already fixes them")
            self.name, self.spec = None, loss
        else:
            unknown = sorted(set(params) - set(SPEC_PARAMS))
            if unknown:
                raise ValueError(f"unknown loss parameter(s) {unknown}; known: "
                                 f"{', '.join(SPEC_PARAMS + _MODULE_PARAMS)}")
            self.name = _canonical_name(loss)
            self.spec = spec_for(self.name, **params)
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        _check_common(self.spec, ignore_index)
        if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                        or num_classes < 2):
            raise ValueError(f"num_classes must be an int >= 2 or None, got {num_classes!r}")
        if weight is not None:
            if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or not weight.is_floating_point():
                raise ValueError(f"weight must be a 1-D floating tensor of per-class weights or None, got {weight!r}")
            if num_classes is not None and weight.shape[0] != num_classes:
                raise ValueError(f"weight has {weight.shape[0]} entries but num_classes={num_classes}")
            weight = weight.detach().clone()
        self.num_classes, self.reduction = num_classes, reduction
        self.ignore_index, self.backend = ignore_index, backend
        self.register_buffer("weight", weight)
        # The operator's arguments, checked once here rather than on every call.
        self._op_args = fused.op_args(self.spec, reduction, ignore_index) \
            if fused.is_available() and fused.supports(self.spec) else None
        self._backends: dict[torch.device, str] = {}  # device -> backend, decided on first use

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The loss of ``logits`` (N, C) against ``target`` (N,), reduced by ``self.reduction``."""
        check_num_classes(logits, self.num_classes)  # the backend checks the rest
        device = logits.device if isinstance(logits, torch.Tensor) else torch.device("cpu")
        chosen = None if torch.compiler.is_compiling() else self._backends.get(device)
        if chosen is None:
            chosen = _backend_for(self.backend, self.spec, device)
            if not torch.compiler.is_compiling():
                self._backends[device] = chosen
        if chosen == "fused":
            return fused.apply(logits, target, self._op_args, self.weight)
        return reference_loss(logits, target, self.spec, reduction=self.reduction,
                              ignore_index=self.ignore_index, weight=self.weight)

    def extra_repr(self) -> str:
        """The name, the spec's terms and weights, and the call options."""
        head = f"{self.name!r}, " if self.name else ""
        return (f"{head}{_describe(self.spec)}, reduction={self.reduction!r}, "
                f"ignore_index={self.ignore_index}, backend={self.backend!r}, "
                f"num_classes={self.num_classes}, weighted={self.weight is not None}")


class _NamedLoss(APLLoss):
    """An :class:`APLLoss` whose name is fixed by the subclass; keyword arguments as APLLoss."""

    loss_name = ""

    def __init__(self, **kwargs):
        super().__init__(self.loss_name, **kwargs)


class CELoss(_NamedLoss):
    """Cross entropy (LOSSES.md ``ce``)."""
    loss_name = "ce"


class FocalLoss(_NamedLoss):
    """Focal loss (LOSSES.md ``fl``); ``variant="ma2020"`` detaches the weight like the cited code."""
    loss_name = "fl"


class MAELoss(_NamedLoss):
    """Mean absolute error, the cited code's form ``1 - p_y`` (LOSSES.md ``mae``)."""
    loss_name = "mae"


class RCELoss(_NamedLoss):
    """Reverse cross entropy (LOSSES.md ``rce``)."""
    loss_name = "rce"


class GCELoss(_NamedLoss):
    """Generalised cross entropy, parameter ``q`` (LOSSES.md ``gce``)."""
    loss_name = "gce"


class SCELoss(_NamedLoss):
    """Symmetric cross entropy ``alpha*CE + beta*RCE`` (LOSSES.md ``sce``)."""
    loss_name = "sce"


class NCELoss(_NamedLoss):
    """Normalised cross entropy (LOSSES.md ``nce``).

    Two variants because the seed paper prints a different function from the work it cites:
    ``"ma2020"`` (default) is the cited, symmetric per-sample form; ``"paper"`` divides by the
    batch's label entropy as the paper's Sec. 2.3 writes. ``alpha`` scales it.
    """
    loss_name = "nce"


class NFLLoss(_NamedLoss):
    """Normalised focal loss (LOSSES.md ``nfl``), focal exponent ``gamma``.

    Two variants because the seed paper prints a different function from the work it cites:
    ``"ma2020"`` (default) normalises each sample over all labels (detached weights,
    symmetric); ``"paper"`` divides by the batch-mean focal weight. ``alpha`` scales it.
    """
    loss_name = "nfl"


class NCEMAELoss(_NamedLoss):
    """APL ``NCE + MAE`` (LOSSES.md); weights ``lam`` or ``alpha``/``beta``, default by variant."""
    loss_name = "nce+mae"


class NCERCELoss(_NamedLoss):
    """APL ``NCE + RCE`` (LOSSES.md); weights ``lam`` or ``alpha``/``beta``, default by variant."""
    loss_name = "nce+rce"


class NFLMAELoss(_NamedLoss):
    """APL ``NFL + MAE`` (LOSSES.md); weights ``lam`` or ``alpha``/``beta``, default by variant."""
    loss_name = "nfl+mae"


class NFLRCELoss(_NamedLoss):
    """APL ``NFL + RCE`` (LOSSES.md); weights ``lam`` or ``alpha``/``beta``, default by variant."""
    loss_name = "nfl+rce"


#: name -> builder (a module class); ``LOSSES[name](num_classes=..., **params)`` builds the loss.
LOSSES = MappingProxyType({cls.loss_name: cls for cls in (
    CELoss, FocalLoss, MAELoss, RCELoss, GCELoss, SCELoss, NCELoss, NFLLoss,
    NCEMAELoss, NCERCELoss, NFLMAELoss, NFLRCELoss)})


def available_losses() -> tuple[str, ...]:
    """The names :func:`get_loss` accepts, in the order of :data:`apl.spec.LOSS_NAMES`."""
    return tuple(LOSSES)


def get_loss(name: str, num_classes: int | None = 10, **params) -> nn.Module:
    """Build the loss module called ``name`` (one of :func:`available_losses`; ``_`` may replace ``+``).

    ``params``: ``variant`` ("ma2020" | "paper"), ``gamma``, ``q``, ``lam`` or
    ``alpha``/``beta``, ``reduction``, ``ignore_index``, ``backend``, ``weight``. Any other name raises
    ``ValueError``. ``num_classes`` (default 10, CIFAR-10) is checked against the logits;
    ``None`` skips the check. Formulas: LOSSES.md.
    """
    key = _canonical_name(name)
    if key not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; known: {', '.join(LOSSES)}")
    return LOSSES[key](num_classes=num_classes, **params)
