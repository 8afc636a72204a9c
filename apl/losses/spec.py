"""What a loss *is*, independent of how it is computed.

Every loss of the project is ``alpha * active + beta * passive`` where each term is one
:class:`Kind` (a per-row loss, possibly with a batch-level normaliser). The reference
implementation (:mod:`apl.losses`) and the fused operator (:mod:`apl.fused`) both take a
:class:`LossSpec`, so the mapping from a user-facing name (``"nce+rce"``, variant, weights)
to the math lives here and only here. Formulas and sources: ``LOSSES.md``.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass

__all__ = [
    "Kind", "LossSpec", "LOSS_NAMES", "VARIANTS", "REDUCTIONS", "RCE_A", "PROB_CLAMP", "LABEL_CLAMP",
    "spec_for", "canonical_name", "PAPER_LAMBDA", "AUTHOR_LAMBDA", "DEFAULT_GAMMA", "AUTHOR_SMOOTHING",
    "AUTHOR_TARGET_CLIP", "author_affine", "SOFT_TARGET_KINDS", "FOCAL_KINDS",
]

#: RCE's constant: the official code clamps the one-hot label at 1e-4 before the log,
#: so A = -log(1e-4) (the paper text of Ma et al. quotes A = -4; the code is what ran).
LABEL_CLAMP = 1e-4  # the official code's clamp of the label distribution before the log
RCE_A = -math.log(LABEL_CLAMP)
#: Lower clamp the official code applies to probabilities inside RCE and GCE.
PROB_CLAMP = 1e-7
#: The seed paper's author's RCE: a smoothed target, 1 - s on the label and s / (C - 1) elsewhere,
#: clamped to [clip, 1 - clip] (facts: docs/sources.md#the-authors-code).
AUTHOR_SMOOTHING = 0.1
AUTHOR_TARGET_CLIP = 1e-7


class Kind(enum.IntEnum):
    """One per-row loss term. The integer values are the operator's ABI (csrc/loss_row.h)."""

    NONE = 0
    CE = 1           # -log p_y
    FL = 2           # -(1-p_y)^g log p_y, gradient through the weight (Lin et al. 2017)
    FL_DETACHED = 3  # same value, weight detached (Ma et al. official code)
    NCE_MA2020 = 4   # log p_y / sum_k log p_k
    NFL_MA2020 = 5   # per-row normalised focal loss, weights detached
    NCE_PAPER = 6    # -log p_y / H(batch label distribution)
    NFL_PAPER = 7    # FL_i / mean_j (1-p_{y_j})^g, full gradient
    MAE = 8          # 1 - p_y
    RCE = 9          # A * sum_{k!=y} clamp(p_k, 1e-7, 1)
    GCE = 10         # (1 - clamp(p_y, 1e-7, 1)^q) / q
    MAE_AUTHOR = 11  # mean over the C classes of |p_k - onehot_k| = (2 / C) (1 - p_y)
    RCE_AUTHOR = 12  # -sum_k p_k log t_k, t the smoothed target: affine in 1 - p_y


LOSS_NAMES = ("ce", "fl", "mae", "rce", "gce", "sce", "nce", "nfl",
              "nce+mae", "nce+rce", "nfl+mae", "nfl+rce")
#: Kinds with a focal exponent ``gamma``.
FOCAL_KINDS = frozenset({Kind.FL, Kind.FL_DETACHED, Kind.NFL_MA2020, Kind.NFL_PAPER})
#: Kinds defined for probability targets t (LOSSES.md "Soft targets"): CE -sum t_k log p_k
#: (F.cross_entropy), MAE as |p - t|_1 / 2 and the author's as its mean over classes, RCE as
#: -sum clamp(p_k) log clamp(t_k, 1e-4, 1) (Wang et al.'s definition for any label distribution).
SOFT_TARGET_KINDS = (Kind.CE, Kind.MAE, Kind.MAE_AUTHOR, Kind.RCE)
#: The forms of the losses (LOSSES.md "Three forms"): the cited work's official code, the seed
#: paper's printed formulas, and the code the seed paper's author ran.
VARIANTS = ("ma2020", "paper", "author")
REDUCTIONS = ("mean", "sum", "none")

# The kind of each (loss, variant) that differs between variants; ce and gce are the same in all.
_BY_VARIANT = {
    ("nce", "ma2020"): Kind.NCE_MA2020, ("nce", "paper"): Kind.NCE_PAPER, ("nce", "author"): Kind.NCE_PAPER,
    ("nfl", "ma2020"): Kind.NFL_MA2020, ("nfl", "paper"): Kind.NFL_PAPER, ("nfl", "author"): Kind.NFL_PAPER,
    ("fl", "ma2020"): Kind.FL_DETACHED, ("fl", "paper"): Kind.FL, ("fl", "author"): Kind.FL,
    ("mae", "ma2020"): Kind.MAE, ("mae", "paper"): Kind.MAE, ("mae", "author"): Kind.MAE_AUTHOR,
    ("rce", "ma2020"): Kind.RCE, ("rce", "paper"): Kind.RCE, ("rce", "author"): Kind.RCE_AUTHOR,
}
_SIMPLE = {"ce": Kind.CE, "gce": Kind.GCE}

#: The APL weight lambda (lambda * active + (1 - lambda) * passive) of the seed paper's text
#: (Sec. 2.4) and of its author's code, which weights the passive term by 0.6.
PAPER_LAMBDA = 0.6
AUTHOR_LAMBDA = 0.4
_DEFAULT_LAMBDA = {"paper": PAPER_LAMBDA, "author": AUTHOR_LAMBDA}
#: The focal exponent when none is given: the cited work's CIFAR-10 configs use 0.5; the seed
#: paper does not state one and its author's code uses 2.
DEFAULT_GAMMA = {"ma2020": 0.5, "paper": 2.0, "author": 2.0}


@dataclass(frozen=True)
class LossSpec:
    """``alpha * active + beta * passive``, per row, then reduced.

    ``gamma`` is the focal exponent (FL/NFL kinds), ``q`` the GCE exponent, ``smoothing``
    ``F.cross_entropy``'s ``label_smoothing`` (CE alone; LOSSES.md "Soft targets").
    """

    active: Kind
    passive: Kind = Kind.NONE
    alpha: float = 1.0
    beta: float = 0.0
    gamma: float = 0.5
    q: float = 0.7
    smoothing: float = 0.0

    def __post_init__(self):
        if self.active == Kind.NONE:
            raise ValueError("a loss needs an active term (active=Kind.NONE given)")
        if not math.isfinite(self.alpha) or not math.isfinite(self.beta):
            raise ValueError(f"alpha and beta must be finite, got {self.alpha}, {self.beta}")
        if not (self.gamma >= 0 and math.isfinite(self.gamma)):
            raise ValueError(f"gamma must be a finite number >= 0, got {self.gamma}")
        if not (0 < self.q <= 1):
            raise ValueError(f"q must be in (0, 1], got {self.q}")
        if not 0.0 <= self.smoothing <= 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1], got {self.smoothing}")
        if self.smoothing and (self.active, self.passive) != (Kind.CE, Kind.NONE):
            raise ValueError(f"label_smoothing is defined for ce alone (F.cross_entropy's); "
                             f"{self.active.name}+{self.passive.name} has no published definition with it")

    @property
    def uses_gamma(self) -> bool:
        """True when a term has a focal exponent (FL and NFL kinds)."""
        return bool({self.active, self.passive} & FOCAL_KINDS)

    @property
    def soft_target_kinds(self) -> bool:
        """True when every term extends to probability targets (LOSSES.md "Soft targets")."""
        return self.active in SOFT_TARGET_KINDS and self.passive in SOFT_TARGET_KINDS + (Kind.NONE,)

    @property
    def batch_level(self) -> bool:
        """True when a row's value depends on the rest of the batch (the paper's forms)."""
        return self.active in (Kind.NCE_PAPER, Kind.NFL_PAPER)


def spec_for(name: str, *, variant: str = "ma2020", gamma: float | None = None, q: float = 0.7,
             lam: float | None = None, alpha: float | None = None,
             beta: float | None = None, label_smoothing: float = 0.0) -> LossSpec:
    """Build the :class:`LossSpec` of a named loss.

    ``variant`` picks the form of NCE, NFL, FL, MAE and RCE: ``"ma2020"`` is the cited work's
    official definition, ``"paper"`` the seed paper's Sec. 2.3 formulas, ``"author"`` the code
    its author ran (LOSSES.md, "Three forms"). ``gamma`` defaults per variant
    (:data:`DEFAULT_GAMMA`). For the APL sums (``"nce+rce"`` ...) the weighting is either
    ``lam`` (``lam*active + (1-lam)*passive``) or the cited work's ``alpha``/``beta``; when
    neither is given it follows the variant (paper: lam = 0.6; author: lam = 0.4; ma2020:
    alpha = beta = 1).
    For a single loss, ``alpha`` scales it (the cited work trains NFL with scale 10).
    ``sce`` is ``alpha*CE + beta*RCE`` with the cited work's CIFAR-10 defaults 0.1 and 1;
    ``ce``, ``gce`` and ``sce`` are the same in every variant. ``label_smoothing`` is
    ``F.cross_entropy``'s, for ``ce`` only.
    """
    name = canonical_name(name)
    if name not in LOSS_NAMES:
        raise ValueError(f"unknown loss {name!r}; known: {', '.join(LOSS_NAMES)}")
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; use one of {', '.join(VARIANTS)}")
    if lam is not None and (alpha is not None or beta is not None):
        raise ValueError("give either lam (the paper's weighting) or alpha/beta, not both")
    if label_smoothing and name != "ce":
        raise ValueError(f"label_smoothing is defined for ce alone (F.cross_entropy's semantics); "
                         f"{name!r} has no published definition with it")
    common = dict(q=float(q))
    if gamma is not None or name.split("+")[0] in ("fl", "nfl"):  # other losses keep one spec in every variant
        common["gamma"] = DEFAULT_GAMMA[variant] if gamma is None else float(gamma)

    if "+" in name:
        act, pas = name.split("+")
        if lam is None and alpha is None and beta is None:
            lam = _DEFAULT_LAMBDA.get(variant)
        if lam is not None:
            if not 0.0 <= lam <= 1.0:
                raise ValueError(f"lam must be in [0, 1], got {lam}")
            a, b = float(lam), 1.0 - float(lam)
        else:
            a = 1.0 if alpha is None else float(alpha)
            b = 1.0 if beta is None else float(beta)
        return LossSpec(_BY_VARIANT[(act, variant)], _BY_VARIANT[(pas, variant)], a, b, **common)
    if lam is not None:
        raise ValueError(f"lam weights an active+passive sum; {name!r} is a single loss")
    if name == "sce":
        a = 0.1 if alpha is None else float(alpha)
        b = 1.0 if beta is None else float(beta)
        return LossSpec(Kind.CE, Kind.RCE, a, b, **common)
    if beta is not None:
        raise ValueError(f"beta weights a passive term; {name!r} has none")
    kind = _SIMPLE.get(name) or _BY_VARIANT[(name, variant)]
    return LossSpec(kind, Kind.NONE, 1.0 if alpha is None else float(alpha), 0.0, smoothing=float(label_smoothing),
                    **common)


def author_affine(kind: Kind, num_classes: int) -> tuple[float, float]:
    """``(offset, slope)`` of the author's passive terms, whose row value is
    ``offset + slope * (1 - p_y)`` (LOSSES.md "Three forms"; csrc/loss_row.h mirrors it)."""
    c = float(num_classes)
    if kind == Kind.MAE_AUTHOR:  # sum_k |p_k - onehot_k| = 2 (1 - p_y), averaged over the C entries
        return 0.0, 2.0 / c
    if kind == Kind.RCE_AUTHOR:  # -p_y log t_y - (1 - p_y) log t_o
        t_y = min(max(1.0 - AUTHOR_SMOOTHING, AUTHOR_TARGET_CLIP), 1.0 - AUTHOR_TARGET_CLIP)
        t_o = min(max(AUTHOR_SMOOTHING / (c - 1.0), AUTHOR_TARGET_CLIP), 1.0 - AUTHOR_TARGET_CLIP)
        return -math.log(t_y), math.log(t_y) - math.log(t_o)
    raise ValueError(f"{kind!r} is not one of the author's affine kinds")


def canonical_name(name) -> str:
    """``"NCE_RCE"`` -> ``"nce+rce"``: case and surrounding space ignored, ``_`` for ``+`` (as the
    functional API spells it). Raises ``ValueError`` for a non-string."""
    if not isinstance(name, str):
        raise ValueError(f"loss name must be a string, got {type(name).__name__}")
    return name.lower().strip().replace("_", "+")
