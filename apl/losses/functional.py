"""The losses as functions: ``apl.functional.nce_rce(logits, target, ...)`` and friends.

Each takes logits (N, C) and integer targets (N,) (or F.cross_entropy's (N, C, d1, ..., dK) with
(N, d1, ..., dK)), only the parameters that apply to it, and
``reduction`` ("mean" | "sum" | "none"), ``ignore_index``, ``weight`` (optional per-class
weights, see :func:`apl.losses.reference_loss`) and ``fused``: ``fused=True`` uses the
fused operator when it is available (else the pure-PyTorch reference, with one warning per
process), ``fused=False`` always the reference. Formulas: ``LOSSES.md``.
"""
from __future__ import annotations

from functools import lru_cache

import torch

from apl.losses.backend import compute_loss
from apl.losses.spec import spec_for

__all__ = ["ce", "fl", "mae", "rce", "gce", "sce", "nce", "nfl",
           "nce_mae", "nce_rce", "nfl_mae", "nfl_rce"]


_cached_spec = lru_cache(maxsize=512)(spec_for)


def _spec(name, **params):
    """The spec of ``name``, built once per parameter set in eager calls (torch.compile traces
    the call once anyway, and would warn about the cache)."""
    return spec_for(name, **params) if torch.compiler.is_compiling() else _cached_spec(name, **params)


def _call(name, logits, target, fused, reduction, ignore_index, weight, **params) -> torch.Tensor:
    """Build the spec of ``name`` and compute it with the backend ``fused`` selects."""
    return compute_loss(logits, target, _spec(name, **params), reduction=reduction,
                        ignore_index=ignore_index, weight=weight, backend="auto" if fused else "reference")


def ce(logits, target, *, reduction="mean", ignore_index=-100, weight=None, label_smoothing=0.0, fused=True):
    """Cross entropy ``-log p_y`` (LOSSES.md ``ce``), or ``-sum_k t_k log p_k`` of probability
    targets, with ``F.cross_entropy``'s ``label_smoothing``."""
    return _call("ce", logits, target, fused, reduction, ignore_index, weight, label_smoothing=label_smoothing)


def fl(logits, target, *, variant="ma2020", gamma=None, reduction="mean", ignore_index=-100, weight=None, fused=True):
    """Focal loss (LOSSES.md ``fl``): ``variant="ma2020"`` detaches the weight, ``"paper"`` and
    ``"author"`` (Lin) do not; ``gamma`` defaults to the variant's (0.5 ma2020, 2 otherwise)."""
    return _call("fl", logits, target, fused, reduction, ignore_index, weight, variant=variant, gamma=gamma)


def mae(logits, target, *, variant="ma2020", reduction="mean", ignore_index=-100, weight=None, fused=True):
    """Mean absolute error (LOSSES.md ``mae``): ``1 - p_y`` (the cited code's form, also
    ``"paper"``), or ``"author"``'s mean over the C classes, ``(2/C) (1 - p_y)``."""
    return _call("mae", logits, target, fused, reduction, ignore_index, weight, variant=variant)


def rce(logits, target, *, variant="ma2020", reduction="mean", ignore_index=-100, weight=None, fused=True):
    """Reverse cross entropy (LOSSES.md ``rce``): the cited work's clamped one-hot (also
    ``"paper"``), or ``"author"``'s smoothed target."""
    return _call("rce", logits, target, fused, reduction, ignore_index, weight, variant=variant)


def gce(logits, target, *, q=0.7, reduction="mean", ignore_index=-100, weight=None, fused=True):
    """Generalised cross entropy with exponent ``q`` (LOSSES.md ``gce``)."""
    return _call("gce", logits, target, fused, reduction, ignore_index, weight, q=q)


def sce(logits, target, *, alpha=0.1, beta=1.0, reduction="mean", ignore_index=-100, weight=None, fused=True):
    """Symmetric cross entropy ``alpha*CE + beta*RCE`` (LOSSES.md ``sce``)."""
    return _call("sce", logits, target, fused, reduction, ignore_index, weight, alpha=alpha, beta=beta)


def nce(logits, target, *, variant="ma2020", alpha=1.0, reduction="mean", ignore_index=-100, weight=None, fused=True):
    """Normalised cross entropy scaled by ``alpha`` (LOSSES.md ``nce``).

    ``variant="ma2020"`` is the cited work's symmetric per-sample form; ``"paper"`` and
    ``"author"`` are the seed paper's (batch CE over the batch label entropy). They differ
    because the paper prints a different function from the one it cites.
    """
    return _call("nce", logits, target, fused, reduction, ignore_index, weight, variant=variant, alpha=alpha)


def nfl(logits, target, *, variant="ma2020", gamma=None, alpha=1.0, reduction="mean",
        ignore_index=-100, weight=None, fused=True):
    """Normalised focal loss scaled by ``alpha`` (LOSSES.md ``nfl``).

    ``variant="ma2020"`` normalises each sample over all labels (cited work, symmetric);
    ``"paper"`` and ``"author"`` divide the batch focal loss by the batch-mean focal weight
    (seed paper). ``gamma`` defaults to the variant's (0.5 ma2020, 2 otherwise).
    """
    return _call("nfl", logits, target, fused, reduction, ignore_index, weight,
                 variant=variant, gamma=gamma, alpha=alpha)


def nce_mae(logits, target, *, variant="ma2020", lam=None, alpha=None, beta=None,
            reduction="mean", ignore_index=-100, weight=None, fused=True):
    """APL ``NCE + MAE``: ``lam`` or ``alpha``/``beta`` weights, default by variant; see spec_for."""
    return _call("nce+mae", logits, target, fused, reduction, ignore_index, weight,
                 variant=variant, lam=lam, alpha=alpha, beta=beta)


def nce_rce(logits, target, *, variant="ma2020", lam=None, alpha=None, beta=None,
            reduction="mean", ignore_index=-100, weight=None, fused=True):
    """APL ``NCE + RCE``: ``lam`` or ``alpha``/``beta`` weights, default by variant; see spec_for."""
    return _call("nce+rce", logits, target, fused, reduction, ignore_index, weight,
                 variant=variant, lam=lam, alpha=alpha, beta=beta)


def nfl_mae(logits, target, *, variant="ma2020", gamma=None, lam=None, alpha=None, beta=None,
            reduction="mean", ignore_index=-100, weight=None, fused=True):
    """APL ``NFL + MAE``: ``lam`` or ``alpha``/``beta`` weights, default by variant; see spec_for."""
    return _call("nfl+mae", logits, target, fused, reduction, ignore_index, weight,
                 variant=variant, gamma=gamma, lam=lam, alpha=alpha, beta=beta)


def nfl_rce(logits, target, *, variant="ma2020", gamma=None, lam=None, alpha=None, beta=None,
            reduction="mean", ignore_index=-100, weight=None, fused=True):
    """APL ``NFL + RCE``: ``lam`` or ``alpha``/``beta`` weights, default by variant; see spec_for."""
    return _call("nfl+rce", logits, target, fused, reduction, ignore_index, weight,
                 variant=variant, gamma=gamma, lam=lam, alpha=alpha, beta=beta)
