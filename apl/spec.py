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

import torch

__all__ = [
    "Kind", "LossSpec", "LOSS_NAMES", "VARIANTS", "REDUCTIONS", "RCE_A", "PROB_CLAMP",
    "spec_for", "canonical_name", "check_call", "positions_as_rows", "check_positions", "validate_inputs",
    "check_num_classes", "validate_weight", "INDEX_DTYPES", "PAPER_LAMBDA", "AUTHOR_LAMBDA", "DEFAULT_GAMMA",
    "AUTHOR_SMOOTHING", "AUTHOR_TARGET_CLIP", "author_affine", "SOFT_TARGET_KINDS", "LABEL_CLAMP", "FOCAL_KINDS",
]

#: RCE's constant: the official code clamps the one-hot label at 1e-4 before the log,
#: so A = -log(1e-4) (the paper text of Ma et al. quotes A = -4; the code is what ran).
LABEL_CLAMP = 1e-4  # the official code's clamp of the label distribution before the log
RCE_A = -math.log(LABEL_CLAMP)
#: Lower clamp the official code applies to probabilities inside RCE and GCE.
PROB_CLAMP = 1e-7
#: The seed paper's author's RCE: a smoothed target, 1 - s on the label and s / (C - 1) elsewhere,
#: clamped to [clip, 1 - clip] (facts: ../shared/notes/seed_code.md).
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


def check_call(spec, reduction: str, ignore_index) -> None:
    """Raise ``ValueError`` naming the problem unless ``spec`` is a :class:`LossSpec`,
    ``reduction`` one of :data:`REDUCTIONS` and ``ignore_index`` an int: the arguments every
    entry point (reference, fused operator, modules) takes besides the tensors."""
    if not isinstance(spec, LossSpec):
        raise ValueError(f"spec must be an apl.spec.LossSpec, got {type(spec).__name__}")
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
    under ``torch.compile`` it is skipped too (a data-dependent branch would split the graph),
    as PyTorch's own losses leave it to their kernels.
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
    if check_range and n > 0 and target.device.type != "meta" and not torch.compiler.is_compiling():
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
