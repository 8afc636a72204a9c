"""The losses as functions: ``apl.functional.nce_rce(logits, target, ...)`` and friends.

Each takes logits (N, C) and integer targets (N,) (or F.cross_entropy's (N, C, d1, ..., dK) with
(N, d1, ..., dK)), only the parameters that apply to it (``None``: the loss's official CIFAR-10
default, LOSSES.md), and
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
           "nce_mae", "nce_rce", "nfl_mae", "nfl_rce",
           "agce", "aul", "ael", "nce_agce", "nce_aul", "nce_ael", "nnce", "nnfl", "anl_ce", "anl_fl",
           "amse", "nce_amse", "nfl_amse", "jal_ce", "jal_fl", "ece", "efl", "ece_mae", "efl_mae",
           "ngce", "nmae", "nrce", "ngce_mae", "ngce_rce"]


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


# --------------------------------------------------------------------------- the successors (LOSSES.md "Successors")

def agce(logits, target, *, a=None, q=None, alpha=1.0, reduction="mean", ignore_index=-100, weight=None, fused=True):
    """Asymmetric generalised cross entropy ``((a+1)^q - (a+p_y)^q) / q`` (ALFs; a 0.6, q 0.6)."""
    return _call("agce", logits, target, fused, reduction, ignore_index, weight, a=a, q=q, alpha=alpha)


def aul(logits, target, *, a=None, q=None, alpha=1.0, reduction="mean", ignore_index=-100, weight=None, fused=True):
    """Asymmetric unhinged loss ``((a-p_y)^q - (a-1)^q) / q``, ``a > 1`` (ALFs; a 5.5, q 3)."""
    return _call("aul", logits, target, fused, reduction, ignore_index, weight, a=a, q=q, alpha=alpha)


def ael(logits, target, *, a=None, alpha=1.0, reduction="mean", ignore_index=-100, weight=None, fused=True):
    """Asymmetric exponential loss ``exp(-p_y / a)`` (ALFs; a 2.5)."""
    return _call("ael", logits, target, fused, reduction, ignore_index, weight, a=a, alpha=alpha)


def nce_agce(logits, target, *, alpha=None, beta=None, a=None, q=None, reduction="mean", ignore_index=-100,
             weight=None, fused=True):
    """``alpha*NCE + beta*AGCE`` (ALFs; alpha 1, beta 4, a 6, q 1.5)."""
    return _call("nce+agce", logits, target, fused, reduction, ignore_index, weight, alpha=alpha, beta=beta, a=a, q=q)


def nce_aul(logits, target, *, alpha=None, beta=None, a=None, q=None, reduction="mean", ignore_index=-100,
            weight=None, fused=True):
    """``alpha*NCE + beta*AUL`` (ALFs; alpha 1, beta 4, a 6.3, q 1.5)."""
    return _call("nce+aul", logits, target, fused, reduction, ignore_index, weight, alpha=alpha, beta=beta, a=a, q=q)


def nce_ael(logits, target, *, alpha=None, beta=None, a=None, reduction="mean", ignore_index=-100, weight=None,
            fused=True):
    """``alpha*NCE + beta*AEL`` (ALFs; alpha 1, beta 4, a 5)."""
    return _call("nce+ael", logits, target, fused, reduction, ignore_index, weight, alpha=alpha, beta=beta, a=a)


def nnce(logits, target, *, min_prob=None, alpha=1.0, reduction="mean", ignore_index=-100, weight=None, fused=True):
    """Normalised negative cross entropy, probabilities clamped at ``min_prob`` (ANL; 1e-7)."""
    return _call("nnce", logits, target, fused, reduction, ignore_index, weight, min_prob=min_prob, alpha=alpha)


def nnfl(logits, target, *, gamma=None, min_prob=None, alpha=1.0, reduction="mean", ignore_index=-100, weight=None,
         fused=True):
    """Normalised negative focal loss (ANL; gamma 0.5, min_prob 1e-7)."""
    return _call("nnfl", logits, target, fused, reduction, ignore_index, weight, gamma=gamma, min_prob=min_prob,
                 alpha=alpha)


def anl_ce(logits, target, *, alpha=None, beta=None, min_prob=None, reduction="mean", ignore_index=-100, weight=None,
           fused=True):
    """Active Negative Loss ``alpha*NCE + beta*NNCE`` (ANL; alpha 5, beta 5). Train with the L1 term."""
    return _call("anl-ce", logits, target, fused, reduction, ignore_index, weight, alpha=alpha, beta=beta,
                 min_prob=min_prob)


def anl_fl(logits, target, *, alpha=None, beta=None, gamma=None, min_prob=None, reduction="mean", ignore_index=-100,
           weight=None, fused=True):
    """Active Negative Loss ``alpha*NFL + beta*NNFL`` (ANL; alpha 5, beta 5, gamma 0.5). Train with the L1 term."""
    return _call("anl-fl", logits, target, fused, reduction, ignore_index, weight, alpha=alpha, beta=beta,
                 gamma=gamma, min_prob=min_prob)


def amse(logits, target, *, a=None, alpha=1.0, reduction="mean", ignore_index=-100, weight=None, fused=True):
    """Asymmetric mean square error, the mean over classes of ``(p_k - a onehot_k)^2`` (JAL; a 30)."""
    return _call("amse", logits, target, fused, reduction, ignore_index, weight, a=a, alpha=alpha)


def nce_amse(logits, target, *, alpha=None, beta=None, a=None, reduction="mean", ignore_index=-100, weight=None,
             fused=True):
    """Joint Asymmetric Loss JAL-CE ``alpha*NCE + beta*AMSE`` (JAL; alpha 1, beta 1, a 30). Train with the L1 term."""
    return _call("nce+amse", logits, target, fused, reduction, ignore_index, weight, alpha=alpha, beta=beta, a=a)


def nfl_amse(logits, target, *, alpha=None, beta=None, a=None, gamma=None, reduction="mean", ignore_index=-100,
             weight=None, fused=True):
    """Joint Asymmetric Loss JAL-FL ``alpha*NFL + beta*AMSE`` (JAL; alpha 1, beta 1, a 30, gamma 0.5)."""
    return _call("nfl+amse", logits, target, fused, reduction, ignore_index, weight, alpha=alpha, beta=beta, a=a,
                 gamma=gamma)


jal_ce = nce_amse
jal_fl = nfl_amse


def ece(logits, target, *, m=None, alpha=1.0, reduction="mean", ignore_index=-100, weight=None, fused=True):
    """Cross entropy of the epsilon-softmax (top probability boosted by ``m``; 1e5)."""
    return _call("ece", logits, target, fused, reduction, ignore_index, weight, m=m, alpha=alpha)


def efl(logits, target, *, m=None, gamma=None, alpha=1.0, reduction="mean", ignore_index=-100, weight=None,
        fused=True):
    """Focal loss of the epsilon-softmax (m 1e5, gamma 0.1)."""
    return _call("efl", logits, target, fused, reduction, ignore_index, weight, m=m, gamma=gamma, alpha=alpha)


def ece_mae(logits, target, *, alpha=None, beta=None, m=None, reduction="mean", ignore_index=-100, weight=None,
            fused=True):
    """``alpha*ECE + beta*2(1 - p_y)``, the epsilon-softmax code's sum (alpha 0.01, beta 5, m 1e5: its CIFAR-10
    symmetric-noise setting; asymmetric noise uses alpha 0.02, m 1e3)."""
    return _call("ece+mae", logits, target, fused, reduction, ignore_index, weight, alpha=alpha, beta=beta, m=m)


def efl_mae(logits, target, *, alpha=None, beta=None, m=None, gamma=None, reduction="mean", ignore_index=-100,
            weight=None, fused=True):
    """``alpha*EFL + beta*2(1 - p_y)`` (defaults as :func:`ece_mae`, gamma 0.1)."""
    return _call("efl+mae", logits, target, fused, reduction, ignore_index, weight, alpha=alpha, beta=beta, m=m,
                 gamma=gamma)


def ngce(logits, target, *, q=None, alpha=1.0, reduction="mean", ignore_index=-100, weight=None, fused=True):
    """Normalised generalised cross entropy (the cited work; q 0.1)."""
    return _call("ngce", logits, target, fused, reduction, ignore_index, weight, q=q, alpha=alpha)


def nmae(logits, target, *, alpha=1.0, reduction="mean", ignore_index=-100, weight=None, fused=True):
    """Normalised MAE ``(1 - p_y) / (2 (C - 1))`` as the cited work's code computes it."""
    return _call("nmae", logits, target, fused, reduction, ignore_index, weight, alpha=alpha)


def nrce(logits, target, *, alpha=1.0, reduction="mean", ignore_index=-100, weight=None, fused=True):
    """Normalised RCE as the cited work's code computes it: RCE times ``(C - 1) / 4`` (LOSSES.md)."""
    return _call("nrce", logits, target, fused, reduction, ignore_index, weight, alpha=alpha)


def ngce_mae(logits, target, *, alpha=None, beta=None, q=None, reduction="mean", ignore_index=-100, weight=None,
             fused=True):
    """``alpha*NGCE + beta*MAE`` (the cited work; alpha 1, beta 1, q 0.1)."""
    return _call("ngce+mae", logits, target, fused, reduction, ignore_index, weight, alpha=alpha, beta=beta, q=q)


def ngce_rce(logits, target, *, alpha=None, beta=None, q=None, reduction="mean", ignore_index=-100, weight=None,
             fused=True):
    """``alpha*NGCE + beta*RCE`` (the cited work; alpha 1, beta 1, q 0.1)."""
    return _call("ngce+rce", logits, target, fused, reduction, ignore_index, weight, alpha=alpha, beta=beta, q=q)
