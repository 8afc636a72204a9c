"""The losses as ``nn.Module``s: :class:`APLLoss`, one named class per loss, and :func:`get_loss`.

A module holds its :class:`~apl.losses.spec.LossSpec`, the call options and optional per-class
weights (a buffer); it decides its backend (:mod:`apl.losses.backend`) once per device and calls the
fused operator with arguments checked once, at construction. Formulas: ``LOSSES.md``.
"""
from __future__ import annotations

from types import MappingProxyType

import torch
from torch import nn

import apl.losses.fused as fused
from apl.losses.backend import backend_for, check_backend
from apl.losses.checks import check_call, check_num_classes
from apl.losses.reference import reference_loss
from apl.losses.spec import (
    A_KINDS,
    ALIASES,
    M_KINDS,
    MIN_PROB_KINDS,
    Q_KINDS,
    Kind,
    LossSpec,
    canonical_name,
    spec_for,
)

__all__ = [
    "APLLoss", "get_loss", "available_losses", "LOSSES", "SPEC_PARAMS", "CELoss", "FocalLoss", "MAELoss", "RCELoss",
    "GCELoss", "SCELoss", "NCELoss", "NFLLoss", "NCEMAELoss", "NCERCELoss", "NFLMAELoss", "NFLRCELoss",
    "AGCELoss", "AULLoss", "AELLoss", "NCEAGCELoss", "NCEAULLoss", "NCEAELLoss", "NNCELoss", "NNFLLoss", "ANLCELoss",
    "ANLFLLoss", "AMSELoss", "NCEAMSELoss", "NFLAMSELoss", "ECELoss", "EFLLoss", "ECEMAELoss", "EFLMAELoss",
    "NGCELoss", "NMAELoss", "NRCELoss", "NGCEMAELoss", "NGCERCELoss",
]

#: Keyword parameters that :func:`apl.losses.spec.spec_for` understands.
SPEC_PARAMS = ("variant", "gamma", "q", "lam", "alpha", "beta", "label_smoothing", "a", "m", "min_prob")


def _describe(spec: LossSpec) -> str:
    parts = [f"active={spec.active.name}", f"alpha={spec.alpha:g}"]
    if spec.passive != Kind.NONE:
        parts += [f"passive={spec.passive.name}", f"beta={spec.beta:g}"]
    if spec.uses_gamma:
        parts.append(f"gamma={spec.gamma:g}")
    for param, kinds in (("q", Q_KINDS), ("a", A_KINDS), ("m", M_KINDS), ("min_prob", MIN_PROB_KINDS)):
        if spec.kinds & kinds:
            parts.append(f"{param}={getattr(spec, param):g}")
    if spec.smoothing:
        parts.append(f"label_smoothing={spec.smoothing:g}")
    return ", ".join(parts)


_MODULE_PARAMS = ("reduction", "ignore_index", "backend", "num_classes", "weight")


class APLLoss(nn.Module):
    """A loss of the project as a module: ``alpha * active + beta * passive`` (LOSSES.md).

    Built from a name (``"nce+rce"``, ``"nfl"``, ... see :data:`apl.losses.spec.LOSS_NAMES`; ``_``
    may replace ``+``) with the parameters of :func:`apl.losses.spec.spec_for` (``variant``,
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
            self.name = canonical_name(loss)
            self.spec = spec_for(self.name, **params)
        check_call(self.spec, reduction, ignore_index)
        check_backend(backend)
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
        """The loss of ``logits`` (N, C) against ``target`` (N,), or (N, C, d1, ..., dK) against
        (N, d1, ..., dK), or against probabilities of the logits' shape, as ``F.cross_entropy``,
        reduced by ``self.reduction``."""
        check_num_classes(logits, self.num_classes)  # the backend checks the rest
        device = logits.device if isinstance(logits, torch.Tensor) else torch.device("cpu")
        chosen = self._backends.get(device)
        if chosen is None:
            chosen = backend_for(self.backend, self.spec, device)
            if not torch.compiler.is_compiling():  # a traced call must not mutate the module
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
    """Mean absolute error (LOSSES.md ``mae``): ``1 - p_y``, or ``(2/C)(1 - p_y)`` for ``variant="author"``."""
    loss_name = "mae"


class RCELoss(_NamedLoss):
    """Reverse cross entropy (LOSSES.md ``rce``); ``variant="author"`` uses a smoothed target."""
    loss_name = "rce"


class GCELoss(_NamedLoss):
    """Generalised cross entropy, parameter ``q`` (LOSSES.md ``gce``)."""
    loss_name = "gce"


class SCELoss(_NamedLoss):
    """Symmetric cross entropy ``alpha*CE + beta*RCE`` (LOSSES.md ``sce``)."""
    loss_name = "sce"


class NCELoss(_NamedLoss):
    """Normalised cross entropy (LOSSES.md ``nce``).

    The seed paper prints a different function from the work it cites: ``"ma2020"`` (default)
    is the cited, symmetric per-sample form; ``"paper"`` and ``"author"`` divide by the batch's
    label entropy as the paper's Sec. 2.3 writes. ``alpha`` scales it.
    """
    loss_name = "nce"


class NFLLoss(_NamedLoss):
    """Normalised focal loss (LOSSES.md ``nfl``), focal exponent ``gamma``.

    The seed paper prints a different function from the work it cites: ``"ma2020"`` (default)
    normalises each sample over all labels (detached weights, symmetric); ``"paper"`` and
    ``"author"`` divide by the batch-mean focal weight. ``alpha`` scales it.
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


class AGCELoss(_NamedLoss):
    """Asymmetric generalised cross entropy ``((a+1)^q - (a+p_y)^q) / q`` (LOSSES.md ``agce``)."""
    loss_name = "agce"


class AULLoss(_NamedLoss):
    """Asymmetric unhinged loss ``((a-p_y)^q - (a-1)^q) / q``, ``a > 1`` (LOSSES.md ``aul``)."""
    loss_name = "aul"


class AELLoss(_NamedLoss):
    """Asymmetric exponential loss ``exp(-p_y / a)`` (LOSSES.md ``ael``)."""
    loss_name = "ael"


class NCEAGCELoss(_NamedLoss):
    """``alpha*NCE + beta*AGCE`` (LOSSES.md ``nce+agce``)."""
    loss_name = "nce+agce"


class NCEAULLoss(_NamedLoss):
    """``alpha*NCE + beta*AUL`` (LOSSES.md ``nce+aul``)."""
    loss_name = "nce+aul"


class NCEAELLoss(_NamedLoss):
    """``alpha*NCE + beta*AEL`` (LOSSES.md ``nce+ael``)."""
    loss_name = "nce+ael"


class NNCELoss(_NamedLoss):
    """Normalised negative cross entropy, probabilities clamped at ``min_prob`` (LOSSES.md ``nnce``)."""
    loss_name = "nnce"


class NNFLLoss(_NamedLoss):
    """Normalised negative focal loss (LOSSES.md ``nnfl``)."""
    loss_name = "nnfl"


class ANLCELoss(_NamedLoss):
    """Active Negative Loss ``alpha*NCE + beta*NNCE`` (LOSSES.md ``anl-ce``); train it with the L1 term."""
    loss_name = "anl-ce"


class ANLFLLoss(_NamedLoss):
    """Active Negative Loss ``alpha*NFL + beta*NNFL`` (LOSSES.md ``anl-fl``); train it with the L1 term."""
    loss_name = "anl-fl"


class AMSELoss(_NamedLoss):
    """Asymmetric mean square error, the mean over classes of ``(p_k - a onehot_k)^2`` (LOSSES.md ``amse``)."""
    loss_name = "amse"


class NCEAMSELoss(_NamedLoss):
    """Joint Asymmetric Loss JAL-CE ``alpha*NCE + beta*AMSE`` (LOSSES.md ``nce+amse``)."""
    loss_name = "nce+amse"


class NFLAMSELoss(_NamedLoss):
    """Joint Asymmetric Loss JAL-FL ``alpha*NFL + beta*AMSE`` (LOSSES.md ``nfl+amse``)."""
    loss_name = "nfl+amse"


class ECELoss(_NamedLoss):
    """Cross entropy of the epsilon-softmax, top probability boosted by ``m`` (LOSSES.md ``ece``)."""
    loss_name = "ece"


class EFLLoss(_NamedLoss):
    """Focal loss of the epsilon-softmax (LOSSES.md ``efl``)."""
    loss_name = "efl"


class ECEMAELoss(_NamedLoss):
    """``alpha*ECE + beta*2(1 - p_y)`` as the epsilon-softmax code computes it (LOSSES.md ``ece+mae``)."""
    loss_name = "ece+mae"


class EFLMAELoss(_NamedLoss):
    """``alpha*EFL + beta*2(1 - p_y)`` as the epsilon-softmax code computes it (LOSSES.md ``efl+mae``)."""
    loss_name = "efl+mae"


class NGCELoss(_NamedLoss):
    """Normalised generalised cross entropy (LOSSES.md ``ngce``)."""
    loss_name = "ngce"


class NMAELoss(_NamedLoss):
    """Normalised MAE as the cited work's code computes it (LOSSES.md ``nmae``)."""
    loss_name = "nmae"


class NRCELoss(_NamedLoss):
    """Normalised RCE as the cited work's code computes it (LOSSES.md ``nrce``)."""
    loss_name = "nrce"


class NGCEMAELoss(_NamedLoss):
    """``alpha*NGCE + beta*MAE`` (LOSSES.md ``ngce+mae``)."""
    loss_name = "ngce+mae"


class NGCERCELoss(_NamedLoss):
    """``alpha*NGCE + beta*RCE`` (LOSSES.md ``ngce+rce``)."""
    loss_name = "ngce+rce"


#: name -> builder (a module class); ``LOSSES[name](num_classes=..., **params)`` builds the loss.
LOSSES = MappingProxyType({cls.loss_name: cls for cls in (
    CELoss, FocalLoss, MAELoss, RCELoss, GCELoss, SCELoss, NCELoss, NFLLoss,
    NCEMAELoss, NCERCELoss, NFLMAELoss, NFLRCELoss,
    AGCELoss, AULLoss, AELLoss, NCEAGCELoss, NCEAULLoss, NCEAELLoss, NNCELoss, NNFLLoss, ANLCELoss, ANLFLLoss,
    AMSELoss, NCEAMSELoss, NFLAMSELoss, ECELoss, EFLLoss, ECEMAELoss, EFLMAELoss,
    NGCELoss, NMAELoss, NRCELoss, NGCEMAELoss, NGCERCELoss)})


def available_losses() -> tuple[str, ...]:
    """The names :func:`get_loss` accepts, in the order of :data:`apl.losses.spec.LOSS_NAMES`."""
    return tuple(LOSSES)


def get_loss(name: str, num_classes: int | None = 10, **params) -> nn.Module:
    """Build the loss module called ``name`` (one of :func:`available_losses`; ``_`` may replace ``+``).

    ``params``: ``variant`` ("ma2020" | "paper" | "author"), ``gamma``, ``q``, ``lam`` or
    ``alpha``/``beta``, ``a``, ``m``, ``min_prob`` (each loss takes those of its formula, defaulting to its
    official CIFAR-10 values), ``reduction``, ``ignore_index``, ``backend``, ``weight``. Any other name raises
    ``ValueError``. ``num_classes`` (default 10, CIFAR-10) is checked against the logits;
    ``None`` skips the check. Formulas: LOSSES.md.
    """
    key = canonical_name(name)
    if key not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; known: {', '.join(LOSSES)} (aliases: {', '.join(ALIASES)})")
    return LOSSES[key](num_classes=num_classes, **params)
