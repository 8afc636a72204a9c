"""The losses' public API in one import: the reference, the backend choice, the modules.

``from apl.losses import get_loss, reference_loss, compute_loss`` is what the README shows and
other projects use; the jobs live in :mod:`apl.losses.reference` (the pure-PyTorch math),
:mod:`apl.losses.backend` (fused operator or reference) and :mod:`apl.losses.modules` (the ``nn.Module``s).
"""
from apl.losses.backend import BACKENDS, compute_loss, resolve_backend
from apl.losses.modules import (
                         LOSSES,
                         SPEC_PARAMS,
                         APLLoss,
                         CELoss,
                         FocalLoss,
                         GCELoss,
                         MAELoss,
                         NCELoss,
                         NCEMAELoss,
                         NCERCELoss,
                         NFLLoss,
                         NFLMAELoss,
                         NFLRCELoss,
                         RCELoss,
                         SCELoss,
                         available_losses,
                         get_loss,
)
from apl.losses.reference import reference_loss

__all__ = [
    "BACKENDS", "reference_loss", "resolve_backend", "compute_loss", "APLLoss", "get_loss",
    "available_losses", "LOSSES", "SPEC_PARAMS", "CELoss", "FocalLoss", "MAELoss", "RCELoss", "GCELoss", "SCELoss",
    "NCELoss", "NFLLoss", "NCEMAELoss", "NCERCELoss", "NFLMAELoss", "NFLRCELoss",
]
