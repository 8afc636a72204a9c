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
from apl.losses.spec import (
    AFFINE_KINDS,
    EPS_SOFTMAX_CLAMP,
    LABEL_CLAMP,
    PROB_CLAMP,
    Kind,
    LossSpec,
    affine,
    rce_scale,
)

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
        # a comparison, not F.one_hot: it has no data-dependent check, so it runs under torch.func.vmap
        return torch.arange(self.num_classes, device=self.target.device) == self.target.unsqueeze(1)

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
    def p_y(self) -> torch.Tensor:
        return self.log_p_y.exp()

    @_lazy
    def one_minus_p_y(self) -> torch.Tensor:
        return self.log1m_p_y.exp()  # 1 - p_y, without the cancellation of 1 - exp(log p_y)

    @_lazy
    def n_valid(self) -> torch.Tensor:
        return self.valid.sum().to(self.z.dtype)

    @_lazy
    def label_entropy(self) -> torch.Tensor:
        """H of the non-ignored targets' class frequencies; ln C when one class (or none) occurs."""
        # the histogram as a sum of the one-hot rows (out of place, so torch.func.vmap batches it)
        counts = (self.onehot & self.valid.unsqueeze(1)).to(self.z.dtype).sum(dim=0)
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
        return rows.one_minus_p_y
    if kind in (Kind.RCE, Kind.NRCE):
        others = rows.p.clamp(PROB_CLAMP, 1.0).masked_fill(rows.onehot, 0.0)
        return rce_scale(kind, rows.num_classes) * others.sum(dim=1)
    if kind in AFFINE_KINDS:
        offset, slope = affine(kind, rows.num_classes)
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
    return _successor_term(kind, spec, rows)


def _successor_term(kind: Kind, spec: LossSpec, rows: _Rows) -> torch.Tensor:
    """The per-row value of the successors' kinds, as their authors' code defines them (LOSSES.md
    "Successors"): the same clamps, the same detached factors, computed without cancellations."""
    c = rows.num_classes
    if kind == Kind.AGCE:  # ((a+1)^q - (a+p_y)^q) / q
        return ((spec.a + 1) ** spec.q - (spec.a + rows.p_y) ** spec.q) / spec.q
    if kind == Kind.AUL:  # ((a-p_y)^q - (a-1)^q) / q, with a - p_y = (a - 1) + (1 - p_y) exactly
        return ((spec.a - 1 + rows.one_minus_p_y) ** spec.q - (spec.a - 1) ** spec.q) / spec.q
    if kind == Kind.AEL:
        return torch.exp(-rows.p_y / spec.a)
    if kind == Kind.AMSE:  # mean over classes of (p_k - a onehot_k)^2
        return (rows.p - spec.a * rows.onehot.to(rows.p.dtype)).square().mean(dim=1)
    if kind == Kind.NNCE:  # 1 - v_y / sum_k v_k, v = A + ln clamp(p, m0, 1), A = -ln m0
        log_m0 = math.log(spec.min_prob)
        v = rows.log_p.clamp(log_m0, 0.0) - log_m0
        return 1 - _at_target(v, rows) / v.sum(dim=1)
    if kind == Kind.NNFL:  # 1 - (A - FL_y) / (C A - sum_k FL_k), FL_k = -w_k l_k, l = max(log p, ln m0)
        log_m0 = math.log(spec.min_prob)
        lp = rows.log_p.clamp(min=log_m0)
        fl = -_focal_weight(_log1mexp(lp.detach()), spec.gamma) * lp
        big_a = -((1 - spec.min_prob) ** spec.gamma) * log_m0
        return 1 - (big_a - _at_target(fl, rows)) / (c * big_a - fl.sum(dim=1))
    if kind in (Kind.ECE, Kind.EFL):
        log_q, one_minus_q = _eps_softmax(spec.m, rows)
        if kind == Kind.ECE:
            return -log_q
        return -_focal_weight(torch.log(one_minus_q).detach(), spec.gamma) * log_q
    if kind == Kind.NGCE:  # (1 - p~_y^q) / (C - sum_k p~_k^q), p~ = clamp(p, 1e-7, 1)
        log_pq = spec.q * rows.log_p.clamp(_LOG_PROB_CLAMP, 0.0)
        return -torch.expm1(_at_target(log_pq, rows)) / (c - log_pq.exp().sum(dim=1))
    raise ValueError(f"unsupported loss kind {kind!r}")


def _at_target(values: torch.Tensor, rows: _Rows) -> torch.Tensor:
    """The target's entry of each row of ``values`` (N, C)."""
    return values.gather(1, rows.target.unsqueeze(1)).squeeze(1)


def _eps_softmax(m: float, rows: _Rows) -> tuple[torch.Tensor, torch.Tensor]:
    """``log q^_y`` and ``1 - q^_y`` of epsilon-softmax: q = (p + m e_j) / (1 + m), j = argmax (the first on
    ties; a selection, no gradient), q^ = max(q, 1e-8)."""
    top = rows.z.argmax(dim=1) == rows.target
    log1p_m = math.log1p(m)
    # y = j: ln((p_y + m) / (1 + m)) = -log1p((1 - p_y) / (p_y + m)), exact as p_y -> 1
    log_top = -torch.log1p(rows.one_minus_p_y / (rows.p_y + m))
    log_other = rows.log_p_y - log1p_m
    log_q = torch.where(top, log_top, log_other).clamp(min=math.log(EPS_SOFTMAX_CLAMP))
    one_minus_q = torch.where(top, rows.one_minus_p_y / (1 + m), -torch.expm1(log_q))
    return log_q, one_minus_q


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
