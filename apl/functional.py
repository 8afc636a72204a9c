"""The losses as functions: ``apl.functional.nce_rce(logits, target, ...)`` and friends.

Each takes logits (N, C) and integer targets (N,), only the parameters that apply to it, and
``reduction`` ("mean" | "sum" | "none"), ``ignore_index``, ``weight`` (optional per-class
weights, see :func:`apl.losses.reference_loss`) and ``fused``: ``fused=True`` uses the
fused operator when it is available (else the pure-PyTorch reference, with one warning per
process), ``fused=False`` always the reference. Formulas: ``LOSSES.md``.
"""
from __future__ import annotations

from functools import lru_cache

import torch

from apl.backend import compute_loss
from apl.spec import spec_for

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


def ce(logits, target, *, reduction="mean", ignore_index=-100, weight=None, fused=True):
    """Cross entropy ``-log p_y`` (LOSSES.md ``ce``)."""
    return _call("ce", logits, target, fused, reduction, ignore_index, weight)


def fl(logits, target, *, variant="ma2020", gamma=0.5, reduction="mean", ignore_index=-100, weight=None, fused=True):
    """Focal loss (LOSSES.md ``fl``): ``variant="ma2020"`` detaches the weight, ``"paper"`` (Lin) does not."""
    return _call("fl", logits, target, fused, reduction, ignore_index, weight, variant=variant, gamma=gamma)


def mae(logits, target, *, reduction="mean", ignore_index=-100, weight=None, fused=True):
    """Mean absolute error in the cited code's form ``1 - p_y`` (LOSSES.md ``mae``)."""
    return _call("mae", logits, target, fused, reduction, ignore_index, weight)


def rce(logits, target, *, reduction="mean", ignore_index=-100, weight=None, fused=True):
    """Reverse cross entropy (LOSSES.md ``rce``)."""
    return _call("rce", logits, target, fused, reduction, ignore_index, weight)


def gce(logits, target, *, q=0.7, reduction="mean", ignore_index=-100, weight=None, fused=True):
    """Generalised cross entropy with exponent ``q`` (LOSSES.md ``gce``)."""
    return _call("gce", logits, target, fused, reduction, ignore_index, weight, q=q)


def sce(logits, target, *, alpha=0.1, beta=1.0, reduction="mean", ignore_index=-100, weight=None, fused=True):
    """Symmetric cross entropy ``alpha*CE + beta*RCE`` (LOSSES.md ``sce``)."""
    return _call("sce", logits, target, fused, reduction, ignore_index, weight, alpha=alpha, beta=beta)


def nce(logits, target, *, variant="ma2020", alpha=1.0, reduction="mean", ignore_index=-100, weight=None, fused=True):
    """Normalised cross entropy scaled by ``alpha`` (LOSSES.md ``nce``).

    ``variant="ma2020"`` is the cited work's symmetric per-sample form; ``"paper"`` is the seed
    paper's (batch CE over the batch label entropy). Both exist because the paper prints a
    different function from the one it cites.
    """
    return _call("nce", logits, target, fused, reduction, ignore_index, weight, variant=variant, alpha=alpha)


def nfl(logits, target, *, variant="ma2020", gamma=0.5, alpha=1.0, reduction="mean",
        ignore_index=-100, weight=None, fused=True):
    """Normalised focal loss scaled by ``alpha`` (LOSSES.md ``nfl``).

    ``variant="ma2020"`` normalises each sample over all labels (cited work, symmetric);
    ``"paper"`` divides the batch focal loss by the batch-mean focal weight (seed paper). Both
    exist because the paper prints a different function from the one it cites.
    """
    return _call("nfl", logits, target, fused, reduction, ignore_index, weight,
                 variant=variant, gamma=gamma, alpha=alpha)


def nce_mae(logits, target, *, variant="ma2020", lam=None, alpha=None, beta=None,
            reduction="mean", ignore_index=-100, weight=None, fused=True):
    """APL ``NCE + MAE``: ``lam`` (paper) or ``alpha``/``beta`` (cited work) weights; see spec_for."""
    return _call("nce+mae", logits, target, fused, reduction, ignore_index, weight,
                 variant=variant, lam=lam, alpha=alpha, beta=beta)


def nce_rce(logits, target, *, variant="ma2020", lam=None, alpha=None, beta=None,
            reduction="mean", ignore_index=-100, weight=None, fused=True):
    """APL ``NCE + RCE``: ``lam`` (paper) or ``alpha``/``beta`` (cited work) weights; see spec_for."""
    return _call("nce+rce", logits, target, fused, reduction, ignore_index, weight,
                 variant=variant, lam=lam, alpha=alpha, beta=beta)


def nfl_mae(logits, target, *, variant="ma2020", gamma=0.5, lam=None, alpha=None, beta=None,
            reduction="mean", ignore_index=-100, weight=None, fused=True):
    """APL ``NFL + MAE``: ``lam`` (paper) or ``alpha``/``beta`` (cited work) weights; see spec_for."""
    return _call("nfl+mae", logits, target, fused, reduction, ignore_index, weight,
                 variant=variant, gamma=gamma, lam=lam, alpha=alpha, beta=beta)


def nfl_rce(logits, target, *, variant="ma2020", gamma=0.5, lam=None, alpha=None, beta=None,
            reduction="mean", ignore_index=-100, weight=None, fused=True):
    """APL ``NFL + RCE``: ``lam`` (paper) or ``alpha``/``beta`` (cited work) weights; see spec_for."""
    return _call("nfl+rce", logits, target, fused, reduction, ignore_index, weight,
                 variant=variant, gamma=gamma, lam=lam, alpha=alpha, beta=beta)
