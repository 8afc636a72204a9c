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
    "AUTHOR_TARGET_CLIP", "affine", "rce_scale", "AFFINE_KINDS", "SOFT_TARGET_KINDS", "FOCAL_KINDS",
    "APL_NAMES", "SUCCESSOR_NAMES", "ALIASES", "Q_KINDS", "A_KINDS", "M_KINDS", "MIN_PROB_KINDS", "ANL_MIN_PROB",
    "EPS_SOFTMAX_CLAMP",
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
    AGCE = 13        # ((a+1)^q - (a+p_y)^q) / q                      (Zhou et al. 2021)
    AUL = 14         # ((a-p_y)^q - (a-1)^q) / q, a > 1                (Zhou et al. 2021)
    AEL = 15         # exp(-p_y / a)                                     (Zhou et al. 2021)
    NNCE = 16        # 1 - v_y / sum_k v_k, v_k = -ln m0 + ln clamp(p_k, m0, 1)   (Ye et al. 2023)
    NNFL = 17        # 1 - (A - FL_y) / (C A - sum_k FL_k), clamped logs, weights detached (Ye et al. 2023)
    AMSE = 18        # mean over the C classes of (p_k - a onehot_k)^2   (Wang et al. 2025)
    ECE = 19         # -ln max((p_y + m [y = argmax]) / (1 + m), 1e-8)   (Wang et al. 2024)
    EFL = 20         # the same with a detached focal weight (1 - q_y)^g (Wang et al. 2024)
    MAE2 = 21        # 2 (1 - p_y): the MAE of the ALFs and epsilon-softmax code (scale 2)
    NGCE = 22        # (1 - p~_y^q) / (C - sum_k p~_k^q), p~ = clamp(p, 1e-7, 1)   (Ma et al. 2020)
    NMAE = 23        # (1 - p_y) / (2 (C - 1))                           (Ma et al. 2020's code)
    NRCE = 24        # RCE (C - 1) / 4, the normaliser as Ma et al.'s code computes it


#: The seed paper's and the cited work's losses, in every variant (LOSSES.md "Three forms").
APL_NAMES = ("ce", "fl", "mae", "rce", "gce", "sce", "nce", "nfl",
             "nce+mae", "nce+rce", "nfl+mae", "nfl+rce")
#: APL's successors and the cited work's other normalised losses: one form each, as their authors' code computes
#: them, with each one's CIFAR-10 hyperparameters as defaults (LOSSES.md "Successors").
SUCCESSOR_NAMES = ("agce", "aul", "ael", "nce+agce", "nce+aul", "nce+ael",
                   "nnce", "nnfl", "anl-ce", "anl-fl",
                   "amse", "nce+amse", "nfl+amse",
                   "ece", "efl", "ece+mae", "efl+mae",
                   "ngce", "nmae", "nrce", "ngce+mae", "ngce+rce")
LOSS_NAMES = APL_NAMES + SUCCESSOR_NAMES
#: Other names of the same losses (the names their papers use).
ALIASES = {"jal-ce": "nce+amse", "jal-fl": "nfl+amse"}
#: Kinds with a focal exponent ``gamma``.
FOCAL_KINDS = frozenset({Kind.FL, Kind.FL_DETACHED, Kind.NFL_MA2020, Kind.NFL_PAPER, Kind.NNFL, Kind.EFL})
#: Kinds with the exponent ``q``, those with ``a``, ``m`` (epsilon-softmax) and ``min_prob`` (ANL's clamp).
Q_KINDS = frozenset({Kind.GCE, Kind.AGCE, Kind.AUL, Kind.NGCE})
A_KINDS = frozenset({Kind.AGCE, Kind.AUL, Kind.AEL, Kind.AMSE})
M_KINDS = frozenset({Kind.ECE, Kind.EFL})
MIN_PROB_KINDS = frozenset({Kind.NNCE, Kind.NNFL})
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


#: The successors' defaults, CIFAR-10 (LOSSES.md "Successors" gives CIFAR-100's): name -> (active, passive,
#: parameters). ALFs (Zhou et al. 2021), ANL (Ye et al. 2023), JAL (Wang et al. 2025), epsilon-softmax (Wang et
#: al. 2024) and the cited work's own normalised losses, each as its official config sets it.
_SUCCESSORS = {
    "agce": (Kind.AGCE, Kind.NONE, dict(a=0.6, q=0.6)),
    "aul": (Kind.AUL, Kind.NONE, dict(a=5.5, q=3.0)),
    "ael": (Kind.AEL, Kind.NONE, dict(a=2.5)),
    "nce+agce": (Kind.NCE_MA2020, Kind.AGCE, dict(alpha=1.0, beta=4.0, a=6.0, q=1.5)),
    "nce+aul": (Kind.NCE_MA2020, Kind.AUL, dict(alpha=1.0, beta=4.0, a=6.3, q=1.5)),
    "nce+ael": (Kind.NCE_MA2020, Kind.AEL, dict(alpha=1.0, beta=4.0, a=5.0)),
    "nnce": (Kind.NNCE, Kind.NONE, dict(min_prob=1e-7)),
    "nnfl": (Kind.NNFL, Kind.NONE, dict(gamma=0.5, min_prob=1e-7)),
    "anl-ce": (Kind.NCE_MA2020, Kind.NNCE, dict(alpha=5.0, beta=5.0, min_prob=1e-7)),
    "anl-fl": (Kind.NFL_MA2020, Kind.NNFL, dict(alpha=5.0, beta=5.0, gamma=0.5, min_prob=1e-7)),
    "amse": (Kind.AMSE, Kind.NONE, dict(a=30.0)),
    "nce+amse": (Kind.NCE_MA2020, Kind.AMSE, dict(alpha=1.0, beta=1.0, a=30.0)),
    "nfl+amse": (Kind.NFL_MA2020, Kind.AMSE, dict(alpha=1.0, beta=1.0, a=30.0, gamma=0.5)),
    "ece": (Kind.ECE, Kind.NONE, dict(m=1e5)),
    "efl": (Kind.EFL, Kind.NONE, dict(m=1e5, gamma=0.1)),
    "ece+mae": (Kind.ECE, Kind.MAE2, dict(alpha=0.01, beta=5.0, m=1e5)),
    "efl+mae": (Kind.EFL, Kind.MAE2, dict(alpha=0.01, beta=5.0, m=1e5, gamma=0.1)),
    "ngce": (Kind.NGCE, Kind.NONE, dict(q=0.1)),
    "nmae": (Kind.NMAE, Kind.NONE, {}),
    "nrce": (Kind.NRCE, Kind.NONE, {}),
    "ngce+mae": (Kind.NGCE, Kind.MAE, dict(alpha=1.0, beta=1.0, q=0.1)),
    "ngce+rce": (Kind.NGCE, Kind.RCE, dict(alpha=1.0, beta=1.0, q=0.1)),
}
#: ``a`` and ``m`` of a :class:`LossSpec` built without them: the standalone loss's default.
_KIND_DEFAULTS = {Kind.AGCE: dict(a=0.6), Kind.AUL: dict(a=5.5), Kind.AEL: dict(a=2.5), Kind.AMSE: dict(a=30.0),
                  Kind.ECE: dict(m=1e5), Kind.EFL: dict(m=1e5)}
#: ANL's probability clamp (min_prob) and epsilon-softmax's clamp of the transformed probability.
ANL_MIN_PROB = 1e-7
EPS_SOFTMAX_CLAMP = 1e-8


@dataclass(frozen=True)
class LossSpec:
    """``alpha * active + beta * passive``, per row, then reduced.

    ``gamma`` is the focal exponent (:data:`FOCAL_KINDS`), ``q`` the exponent of GCE, NGCE, AGCE and
    AUL, ``a`` the offset of AGCE, AUL, AEL and AMSE, ``m`` epsilon-softmax's boost of the top
    probability, ``min_prob`` ANL's probability clamp (LOSSES.md gives each one's range), and
    ``smoothing`` ``F.cross_entropy``'s ``label_smoothing`` (CE alone; LOSSES.md "Soft targets").
    Terms share a parameter: a spec holds one value of each. ``a`` and ``m`` left as None become
    the standalone loss's default (:func:`spec_for` always sets them).
    """

    active: Kind
    passive: Kind = Kind.NONE
    alpha: float = 1.0
    beta: float = 0.0
    gamma: float = 0.5
    q: float = 0.7
    smoothing: float = 0.0
    a: float | None = None
    m: float | None = None
    min_prob: float = ANL_MIN_PROB

    def __post_init__(self):
        # a and m left out: the standalone loss's official default where a term uses one, else 0
        for param, kinds in (("a", A_KINDS), ("m", M_KINDS)):
            if getattr(self, param) is None:
                used = sorted(k for k in self.kinds if k in kinds)
                object.__setattr__(self, param, _KIND_DEFAULTS[used[0]][param] if used else 0.0)
        if self.active == Kind.NONE:
            raise ValueError("a loss needs an active term (active=Kind.NONE given)")
        if not math.isfinite(self.alpha) or not math.isfinite(self.beta):
            raise ValueError(f"alpha and beta must be finite, got {self.alpha}, {self.beta}")
        if not (self.gamma >= 0 and math.isfinite(self.gamma)):
            raise ValueError(f"gamma must be a finite number >= 0, got {self.gamma}")
        if self.kinds & {Kind.GCE, Kind.NGCE}:
            if not (0 < self.q <= 1):
                raise ValueError(f"q must be in (0, 1], got {self.q}")
        elif not (self.q > 0 and math.isfinite(self.q)):
            raise ValueError(f"q must be a finite number > 0, got {self.q}")
        if not math.isfinite(self.a):
            raise ValueError(f"a must be finite, got {self.a}")
        if Kind.AUL in self.kinds and not self.a > 1:
            raise ValueError(f"AUL needs a > 1 (its (a - p_y)^q must be defined for p_y = 1), got a={self.a}")
        if self.kinds & {Kind.AGCE, Kind.AEL} and not self.a > 0:
            raise ValueError(f"AGCE and AEL need a > 0, got a={self.a}")
        if not (self.m >= 0 and math.isfinite(self.m)):
            raise ValueError(f"m must be a finite number >= 0, got {self.m}")
        if not 0 < self.min_prob < 1:
            raise ValueError(f"min_prob must be in (0, 1), got {self.min_prob}")
        if not 0.0 <= self.smoothing <= 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1], got {self.smoothing}")
        if self.smoothing and (self.active, self.passive) != (Kind.CE, Kind.NONE):
            raise ValueError(f"label_smoothing is defined for ce alone (F.cross_entropy's); "
                             f"{self.active.name}+{self.passive.name} has no published definition with it")

    @property
    def kinds(self) -> frozenset:
        """The spec's terms' kinds (NONE left out)."""
        return frozenset({self.active, self.passive}) - {Kind.NONE}

    @property
    def uses_gamma(self) -> bool:
        """True when a term has a focal exponent (:data:`FOCAL_KINDS`)."""
        return bool(self.kinds & FOCAL_KINDS)

    @property
    def soft_target_kinds(self) -> bool:
        """True when every term extends to probability targets (LOSSES.md "Soft targets")."""
        return self.active in SOFT_TARGET_KINDS and self.passive in SOFT_TARGET_KINDS + (Kind.NONE,)

    @property
    def batch_level(self) -> bool:
        """True when a row's value depends on the rest of the batch (the paper's forms)."""
        return self.active in (Kind.NCE_PAPER, Kind.NFL_PAPER)


def spec_for(name: str, *, variant: str = "ma2020", gamma: float | None = None, q: float | None = None,
             lam: float | None = None, alpha: float | None = None,
             beta: float | None = None, label_smoothing: float = 0.0, a: float | None = None,
             m: float | None = None, min_prob: float | None = None) -> LossSpec:
    """Build the :class:`LossSpec` of a named loss (:data:`LOSS_NAMES`, or an alias of :data:`ALIASES`).

    ``variant`` picks the form of NCE, NFL, FL, MAE and RCE: ``"ma2020"`` is the cited work's
    official definition, ``"paper"`` the seed paper's Sec. 2.3 formulas, ``"author"`` the code
    its author ran (LOSSES.md, "Three forms"). ``gamma`` defaults per variant
    (:data:`DEFAULT_GAMMA`). For the APL sums (``"nce+rce"`` ...) the weighting is either
    ``lam`` (``lam*active + (1-lam)*passive``) or the cited work's ``alpha``/``beta``; when
    neither is given it follows the variant (paper: lam = 0.6; author: lam = 0.4; ma2020:
    alpha = beta = 1).
    For a single loss, ``alpha`` scales it (the cited work trains NFL with scale 10).
    ``sce`` is ``alpha*CE + beta*RCE`` with the cited work's CIFAR-10 defaults 0.1 and 1;
    ``ce``, ``gce`` and ``sce`` are the same in every variant; ``q`` is GCE's exponent (0.7).
    ``label_smoothing`` is ``F.cross_entropy``'s, for ``ce`` only.

    The successors (:data:`SUCCESSOR_NAMES`) have one form each, their official code's (the same
    in every variant, as ``ce``; their NCE and NFL are the cited work's), and take its parameters
    with its meaning (``alpha``, ``beta``, ``a``, ``q``, ``m``, ``gamma``, ``min_prob``), defaulting
    to its CIFAR-10 config (LOSSES.md "Successors"); ``lam`` may replace ``alpha``/``beta`` of a
    sum. A parameter the named loss does not use raises.
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
    if name in _SUCCESSORS:
        return _successor_spec(name, dict(gamma=gamma, q=q, a=a, m=m, min_prob=min_prob),
                               lam, alpha, beta)
    for param, value in (("a", a), ("m", m), ("min_prob", min_prob)):
        if value is not None:
            raise ValueError(f"{param} is a parameter of {_users(param)}; {name!r} has none")
    common = dict(q=0.7 if q is None else float(q))
    if gamma is not None or name.split("+")[0] in ("fl", "nfl"):  # other losses keep one spec in every variant
        common["gamma"] = DEFAULT_GAMMA[variant] if gamma is None else float(gamma)

    if "+" in name:
        act, pas = name.split("+")
        if lam is None and alpha is None and beta is None:
            lam = _DEFAULT_LAMBDA.get(variant)
        weights = _sum_weights(lam, alpha, beta, 1.0, 1.0)
        return LossSpec(_BY_VARIANT[(act, variant)], _BY_VARIANT[(pas, variant)], *weights, **common)
    if lam is not None:
        raise ValueError(f"lam weights an active+passive sum; {name!r} is a single loss")
    if name == "sce":
        return LossSpec(Kind.CE, Kind.RCE, *_sum_weights(None, alpha, beta, 0.1, 1.0), **common)
    if beta is not None:
        raise ValueError(f"beta weights a passive term; {name!r} has none")
    kind = _SIMPLE.get(name) or _BY_VARIANT[(name, variant)]
    return LossSpec(kind, Kind.NONE, 1.0 if alpha is None else float(alpha), 0.0, smoothing=float(label_smoothing),
                    **common)


def _sum_weights(lam, alpha, beta, default_alpha: float, default_beta: float) -> tuple[float, float]:
    """``(alpha, beta)`` of a sum from ``lam`` or ``alpha``/``beta`` (each defaulting when not given)."""
    if lam is not None:
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"lam must be in [0, 1], got {lam}")
        return float(lam), 1.0 - float(lam)
    return (default_alpha if alpha is None else float(alpha)), (default_beta if beta is None else float(beta))


_PARAM_KINDS = {"gamma": FOCAL_KINDS, "q": Q_KINDS, "a": A_KINDS, "m": M_KINDS, "min_prob": MIN_PROB_KINDS}


def _users(param: str) -> str:
    """The named losses that take ``param``, for an error message."""
    return ", ".join(n for n, (act, pas, _) in _SUCCESSORS.items() if {act, pas} & _PARAM_KINDS[param])


def _successor_spec(name, params, lam, alpha, beta) -> LossSpec:
    """A successor's spec: its official defaults, overridden by the parameters given."""
    active, passive, defaults = _SUCCESSORS[name]
    kinds = {active, passive}
    values = {}
    for param, value in params.items():
        if not kinds & _PARAM_KINDS[param]:
            if value is not None:
                raise ValueError(f"{param} is a parameter of {_users(param)}; {name!r} has none")
            continue
        values[param] = float(defaults[param] if value is None else value)
    if passive == Kind.NONE:
        if lam is not None or beta is not None:
            raise ValueError(f"{'lam' if lam is not None else 'beta'} weights an active+passive sum; "
                             f"{name!r} is a single loss")
        return LossSpec(active, passive, 1.0 if alpha is None else float(alpha), 0.0, **values)
    weights = _sum_weights(lam, alpha, beta, defaults["alpha"], defaults["beta"])
    return LossSpec(active, passive, *weights, **values)


#: Kinds whose row value is ``offset + slope * (1 - p_y)``, and the RCE kinds, ``scale * sum_{k != y} clamp(p_k)``.
AFFINE_KINDS = frozenset({Kind.MAE_AUTHOR, Kind.RCE_AUTHOR, Kind.MAE2, Kind.NMAE})


def affine(kind: Kind, num_classes: int) -> tuple[float, float]:
    """``(offset, slope)`` of an :data:`AFFINE_KINDS` term, whose row value is ``offset + slope * (1 - p_y)``
    (LOSSES.md; csrc/loss_row.h computes the same constants once per call)."""
    c = float(num_classes)
    if kind == Kind.MAE_AUTHOR:  # sum_k |p_k - onehot_k| = 2 (1 - p_y), averaged over the C entries
        return 0.0, 2.0 / c
    if kind == Kind.RCE_AUTHOR:  # -p_y log t_y - (1 - p_y) log t_o
        t_y = min(max(1.0 - AUTHOR_SMOOTHING, AUTHOR_TARGET_CLIP), 1.0 - AUTHOR_TARGET_CLIP)
        t_o = min(max(AUTHOR_SMOOTHING / (c - 1.0), AUTHOR_TARGET_CLIP), 1.0 - AUTHOR_TARGET_CLIP)
        return -math.log(t_y), math.log(t_y) - math.log(t_o)
    if kind == Kind.MAE2:
        return 0.0, 2.0
    if kind == Kind.NMAE:  # the cited work's normaliser 1 / (2 (C - 1)) of its (halved) MAE
        return 0.0, 1.0 / (2.0 * (c - 1.0))
    raise ValueError(f"{kind!r} is not an affine kind ({', '.join(k.name for k in sorted(AFFINE_KINDS))})")


def rce_scale(kind: Kind, num_classes: int) -> float:
    """The factor of ``sum_{k != y} clamp(p_k, 1e-7, 1)`` in RCE (A = -ln 1e-4) and NRCE (A (C - 1) / 4: the
    cited work's code computes its normaliser ``1 / 4 * (C - 1)``, an operator-precedence slip, LOSSES.md)."""
    if kind == Kind.RCE:
        return RCE_A
    if kind == Kind.NRCE:
        return RCE_A * (num_classes - 1) / 4.0
    raise ValueError(f"{kind!r} is not RCE or NRCE")


def canonical_name(name) -> str:
    """``"NCE_RCE"`` -> ``"nce+rce"``: case and surrounding space ignored, ``_`` for ``+`` (as the
    functional API spells it) except in ANL's and JAL's hyphenated names (``"anl_ce"`` -> ``"anl-ce"``),
    aliases (:data:`ALIASES`) resolved. Raises ``ValueError`` for a non-string."""
    if not isinstance(name, str):
        raise ValueError(f"loss name must be a string, got {type(name).__name__}")
    name = name.lower().strip()
    if name.replace("_", "-") in ("anl-ce", "anl-fl", "jal-ce", "jal-fl"):
        name = name.replace("_", "-")
    name = name.replace("_", "+")
    return ALIASES.get(name, name)
