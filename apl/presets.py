"""The paper's experiment as data: the grid's axes, the two training protocols, the three presets.

A *protocol* is how one run trains (:meth:`apl.config.TrainConfig.paper` / ``.ma2020`` build
configs from it); a *preset* is what ``python -m apl grid --preset NAME`` runs: a protocol,
the config fields it changes, and the grid's default seeds, variants and CPU workers. Every
number that defines the reproduction is written once, here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache

from apl.spec import LOSS_NAMES, PAPER_LAMBDA, spec_for

__all__ = [
    "GRID_LOSSES", "GRID_NOISE", "GRID_VARIANTS", "WEIGHT_PARAMS", "Protocol", "PROTOCOLS",
    "Preset", "PRESETS", "get_preset", "is_variant_free",
]

# --------------------------------------------------------------------------- the grid's axes

#: The paper's eight losses, in the row order of its Table 1.
GRID_LOSSES = ("nce", "nfl", "ce", "fl", "nce+mae", "nfl+rce", "nfl+mae", "nce+rce")
#: Symmetric noise rates: the paper's four plus a clean reference.
GRID_NOISE = (0.0, 0.2, 0.4, 0.6, 0.8)
#: Loss variants (LOSSES.md): the seed paper's formulas and the cited work's.
GRID_VARIANTS = ("paper", "ma2020")


@cache
def is_variant_free(loss: str) -> bool:
    """True when ``loss`` is the same function in both variants (CE): one run serves both."""
    return spec_for(loss, variant="paper") == spec_for(loss, variant="ma2020")


# --------------------------------------------------------------------------- protocols

#: The loss parameters that weight a loss: a protocol's default weights apply when none is given.
WEIGHT_PARAMS = ("lam", "alpha", "beta")


@dataclass(frozen=True)
class Protocol:
    """How one run trains: config fields, and default loss weights per loss name."""

    fields: dict
    loss_weights: dict = field(default_factory=dict)


#: The seed paper's protocol (Sec. 2-3). Stated by the paper: PaperCNN, Adam lr 1e-3, 30
#: epochs, symmetric noise (per-sample rule), lam = PAPER_LAMBDA for the APL sums, its own
#: NCE/NFL. Our choice where it is silent: batch 128, no augmentation, no weight decay, no
#: scheduler, no gradient clipping, the cited work's normalisation constants and gamma
#: (apl.spec.spec_for's default, 0.5; not written into loss_params, which name the runs).
PAPER_PROTOCOL = Protocol(
    fields=dict(variant="paper", noise_type="symmetric", model="paper", width=1.0,
                optimizer="adam", lr=1e-3, momentum=0.9, weight_decay=0.0, scheduler="none",
                epochs=30, batch_size=128, augment=False, grad_clip=None),
    loss_weights={name: {"lam": PAPER_LAMBDA} for name in LOSS_NAMES if "+" in name})

#: The cited work's CIFAR-10 protocol (Ma et al. 2020, official configs): MaCNN, SGD lr 0.01
#: momentum 0.9 weight decay 1e-4, cosine annealing over 120 epochs (per epoch, to 0), batch
#: 128, random crop (pad 4) + horizontal flip, gradient-norm clip 5, its NCE/NFL, APL weights
#: alpha = beta = 1 (spec_for's default) and NFL alone scaled by 10, symmetric noise with
#: exact per-class counts.
MA2020_PROTOCOL = Protocol(
    fields=dict(variant="ma2020", noise_type="ma2020_symmetric", model="ma2020", width=1.0,
                optimizer="sgd", lr=0.01, momentum=0.9, weight_decay=1e-4, scheduler="cosine",
                epochs=120, batch_size=128, augment=True, grad_clip=5.0),
    loss_weights={"nfl": {"alpha": 10.0}})

PROTOCOLS = {"paper": PAPER_PROTOCOL, "ma2020": MA2020_PROTOCOL}


# --------------------------------------------------------------------------- presets

@dataclass(frozen=True)
class Preset:
    """What ``python -m apl grid --preset NAME`` runs by default."""

    protocol: str
    overrides: dict
    seeds: int
    variants: tuple
    cpu_workers: int


#: The paper's protocol on the paper's grid, one seed.
PAPER = Preset(protocol="paper", overrides={}, seeds=1, variants=GRID_VARIANTS, cpu_workers=1)

#: The paper's protocol scaled down so that the whole grid fits the quick budget (at most 10
#: minutes on a 2-core CPU): a class-balanced subset of CIFAR-10, fewer epochs, a narrower
#: PaperCNN, two CPU workers when no device is named.
QUICK = Preset(protocol="paper",
               overrides={"train_subset": 4000, "test_subset": 1000, "epochs": 5, "width": 0.125,
                          "batch_size": 32},
               seeds=1, variants=GRID_VARIANTS, cpu_workers=2)

#: The cited work's protocol and its variant only, three seeds.
MA2020 = Preset(protocol="ma2020", overrides={}, seeds=3, variants=("ma2020",), cpu_workers=1)

PRESETS = {"quick": QUICK, "paper": PAPER, "ma2020": MA2020}


def get_preset(name: str) -> Preset:
    """The preset called ``name``; ``ValueError`` naming the known ones otherwise."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; use one of {', '.join(PRESETS)}")
    return PRESETS[name]
