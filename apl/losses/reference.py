"""The reference losses: every :class:`~apl.losses.spec.LossSpec` computed with ordinary PyTorch ops.

:func:`reference_loss` is the ground truth the fused operator (:mod:`apl.fused`) is tested
against. Every formula, variant, clamp and edge case is defined in ``LOSSES.md``; this module
only says how it is computed, differentiably by autograd.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from apl.losses.checks import check_call, positions_as_rows, validate_inputs, validate_weight
from apl.losses.spec import LABEL_CLAMP, PROB_CLAMP, RCE_A, Kind, LossSpec, author_affine

__all__ = ["reference_loss"]

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
    if kind in (Kind.MAE_AUTHOR, Kind.RCE_AUTHOR):
        offset, slope = author_affine(kind, rows.num_classes)
        return offset + slope * rows.log1m_p_y.exp()
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


def reference_loss(logits: torch.Tensor, target: torch.Tensor, spec: LossSpec,
                   reduction: str = "mean", ignore_index: int = -100,
                   weight: torch.Tensor | None = None) -> torch.Tensor:
    """``spec.alpha * active + spec.beta * passive`` per row, reduced: the pure-PyTorch reference.

    ``logits`` (N, C) floating, ``target`` (N,) class indices or (N, C) probabilities (for the
    losses LOSSES.md "Soft targets" extends); or, as ``F.cross_entropy``, (N, C, d1, ..., dK)
    and (N, d1, ..., dK) (or probabilities of the logits' shape), each position a row
    (:func:`positions_as_rows`; ``"none"`` returns the positions' shape). ``spec.smoothing`` is
    ``F.cross_entropy``'s ``label_smoothing`` (CE). Rows whose target is
    ``ignore_index`` add 0 and are left out of every batch statistic (the paper forms' H and B)
    and of the ``mean`` denominator; ``mean`` of a batch with no valid row is NaN, like
    ``F.cross_entropy``. ``weight`` (C,), optional per-class weights: row i's loss is scaled
    by ``weight[target[i]]`` and ``mean`` divides by the sum of those weights, as
    ``F.cross_entropy`` (the paper forms' batch statistics stay unweighted). Formulas,
    variants, clamps and edge cases: ``LOSSES.md``.
    Differentiable by autograd; float32/float64 are kept, float16/bfloat16 are computed in
    float32 and the result cast back to the input dtype.
    """
    check_call(spec, reduction, ignore_index)
    logits, target, shape = positions_as_rows(logits, target)
    target = validate_inputs(logits, target, reduction=reduction, ignore_index=ignore_index)
    weight = validate_weight(weight, logits)
    compute_dtype = torch.float32 if logits.dtype in (torch.float16, torch.bfloat16) else logits.dtype
    z = logits.to(compute_dtype)
    if target.is_floating_point():
        loss = _soft_target_loss(z, target.to(compute_dtype), spec, reduction, ignore_index, weight)
    else:
        loss = _index_target_loss(z, target, spec, reduction, ignore_index, weight)
    loss = loss.to(logits.dtype)
    return loss.reshape(shape) if shape is not None and reduction == "none" else loss


def _index_target_loss(z, target, spec, reduction, ignore_index, weight) -> torch.Tensor:
    """The loss of class-index targets (LOSSES.md's table), label smoothing as F.cross_entropy's."""
    compute_dtype = z.dtype
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
    if spec.smoothing:
        # (1 - e) CE + (e / C) sum_k w_k (-log p_k): the uniform part weighted per class, not by w_y
        uniform = -(rows.log_p if weight is None else rows.log_p * weight.to(compute_dtype)).sum(dim=1)
        uniform = torch.where(valid, uniform, torch.zeros_like(uniform))
        per_row = (1 - spec.smoothing) * per_row + spec.alpha * spec.smoothing / rows.num_classes * uniform
    return _reduce(per_row, valid, reduction, row_weight)


def _soft_target_loss(z, t, spec, reduction, ignore_index, weight) -> torch.Tensor:
    """The loss of probability targets ``t`` (N, C) (LOSSES.md "Soft targets")."""
    if not spec.soft_target_kinds:
        kinds = "+".join(k.name for k in (spec.active, spec.passive) if k != Kind.NONE)
        raise ValueError(f"probability targets are defined for CE, MAE and RCE terms (LOSSES.md \"Soft targets\"); "
                         f"{kinds} has no principled extension to them: pass class indices")
    if ignore_index != -100:
        raise ValueError(f"ignore_index={ignore_index} applies to class-index targets; probability targets have "
                         f"no ignored rows")
    if weight is not None and (spec.active, spec.passive) != (Kind.CE, Kind.NONE):
        raise ValueError("per-class weights with probability targets are defined for ce alone (F.cross_entropy's)")
    c = z.shape[1]
    if spec.smoothing:
        t = t * (1 - spec.smoothing) + spec.smoothing / c
    log_p = F.log_softmax(z, dim=1)

    def term(kind):
        if kind == Kind.CE:
            return -(t * log_p if weight is None else t * log_p * weight.to(z.dtype)).sum(dim=1)
        p = log_p.exp()
        if kind == Kind.MAE:
            return 0.5 * (p - t).abs().sum(dim=1)
        if kind == Kind.MAE_AUTHOR:
            return (p - t).abs().mean(dim=1)
        return -(p.clamp(PROB_CLAMP, 1.0) * t.clamp(LABEL_CLAMP, 1.0).log()).sum(dim=1)  # RCE

    per_row = spec.alpha * term(spec.active)
    if spec.passive != Kind.NONE:
        per_row = per_row + spec.beta * term(spec.passive)
    if reduction == "none":
        return per_row
    return per_row.sum() if reduction == "sum" else per_row.mean()
