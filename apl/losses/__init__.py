"""The losses' public API in one import: the reference, the backend choice, the modules.

``from apl.losses import get_loss, reference_loss, compute_loss`` is what the README shows and
other projects use; the jobs live in :mod:`apl.losses.reference` (the pure-PyTorch math),
:mod:`apl.losses.backend` (fused operator or reference) and :mod:`apl.losses.modules` (the ``nn.Module``s).
"""
from apl.losses.backend import BACKENDS, compute_loss, resolve_backend
from apl.losses.modules import (
    LOSSES,
    SPEC_PARAMS,
    AELLoss,
    AGCELoss,
    AMSELoss,
    ANLCELoss,
    ANLFLLoss,
    APLLoss,
    AULLoss,
    CELoss,
    ECELoss,
    ECEMAELoss,
    EFLLoss,
    EFLMAELoss,
    FocalLoss,
    GCELoss,
    MAELoss,
    NCEAELLoss,
    NCEAGCELoss,
    NCEAMSELoss,
    NCEAULLoss,
    NCELoss,
    NCEMAELoss,
    NCERCELoss,
    NFLAMSELoss,
    NFLLoss,
    NFLMAELoss,
    NFLRCELoss,
    NGCELoss,
    NGCEMAELoss,
    NGCERCELoss,
    NMAELoss,
    NNCELoss,
    NNFLLoss,
    NRCELoss,
    RCELoss,
    SCELoss,
    available_losses,
    get_loss,
)
from apl.losses.reference import reference_loss

__all__ = [
    "BACKENDS", "reference_loss", "resolve_backend", "compute_loss", "APLLoss", "get_loss", "available_losses",
    "LOSSES", "SPEC_PARAMS", "CELoss", "FocalLoss", "MAELoss", "RCELoss", "GCELoss", "SCELoss", "NCELoss",
    "NFLLoss", "NCEMAELoss", "NCERCELoss", "NFLMAELoss", "NFLRCELoss", "AGCELoss", "AULLoss", "AELLoss",
    "NCEAGCELoss", "NCEAULLoss", "NCEAELLoss", "NNCELoss", "NNFLLoss", "ANLCELoss", "ANLFLLoss", "AMSELoss",
    "NCEAMSELoss", "NFLAMSELoss", "ECELoss", "EFLLoss", "ECEMAELoss", "EFLMAELoss", "NGCELoss", "NMAELoss",
    "NRCELoss", "NGCEMAELoss", "NGCERCELoss",
]
