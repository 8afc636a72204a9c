"""The paper's experiment as data: the grid's axes, the training protocols, the forms, the presets.

A *protocol* is how one run trains (:meth:`apl.config.TrainConfig.from_protocol` builds configs
from it); a *form* is one table of the grid, a loss variant trained under a protocol; a *preset*
is what ``python -m apl grid --preset NAME`` runs: its forms, the config fields it changes, and
the grid's default seeds and CPU workers. Every number that defines the reproduction is written
once, here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache

from apl.losses.spec import AUTHOR_LAMBDA, LOSS_NAMES, PAPER_LAMBDA, VARIANTS, spec_for

__all__ = [
    "GRID_LOSSES", "GRID_NOISE", "GRID_VARIANTS", "WEIGHT_PARAMS", "Protocol", "PROTOCOLS",
    "FormRole", "FORMS", "PAPER_FORMS", "Preset", "PRESETS", "get_preset", "is_variant_free", "protocol_variant",
]

# --------------------------------------------------------------------------- the grid's axes

#: The paper's eight losses, in the row order of its Table 1.
GRID_LOSSES = ("nce", "nfl", "ce", "fl", "nce+mae", "nfl+rce", "nfl+mae", "nce+rce")
#: Symmetric noise rates: the paper's four plus a clean reference.
GRID_NOISE = (0.0, 0.2, 0.4, 0.6, 0.8)
#: Loss variants (LOSSES.md "Three forms"), in the order the report shows their tables: the
#: author's code first (the faithful reproduction), then the paper's text, then the cited work.
GRID_VARIANTS = ("author", "paper", "ma2020")


@cache
def is_variant_free(loss: str) -> bool:
    """True when ``loss`` is the same function in every variant (CE), whatever gamma is.

    Such a loss needs one run per protocol, not one per variant: under one protocol a single
    run serves every form (never across protocols, which train differently).
    """
    # gamma fixed: the variants' default exponents differ, but a loss without a focal term ignores it
    return len({spec_for(loss, variant=v, gamma=1.0) for v in VARIANTS}) == 1


# --------------------------------------------------------------------------- protocols

#: The loss parameters that weight a loss: a protocol's default weights apply when none is given.
WEIGHT_PARAMS = ("lam", "alpha", "beta")


@dataclass(frozen=True)
class Protocol:
    """How one run trains: config fields, and default loss weights per loss name."""

    fields: dict
    loss_weights: dict = field(default_factory=dict)


def _apl_weights(lam: float) -> dict:
    """``lam`` for every active+passive sum."""
    return {name: {"lam": lam} for name in LOSS_NAMES if "+" in name}


#: The code the seed paper's author ran for Table 1 (docs/sources.md#the-authors-code): PaperCNN with
#: PyTorch's default initialisation and conv biases, Adam lr 1e-3 (default betas, no weight decay,
#: no scheduler), 30 epochs, batch 64 shuffled with the last partial batch kept,
#: ToTensor + Normalize(0.5, 0.5), no augmentation, exactly int(eta * N) labels flipped (numpy
#: seed 42), the author's losses (gamma 2, apl.losses.spec's default for the variant) with
#: 0.4 active + 0.6 passive.
AUTHOR_PROTOCOL = Protocol(
    fields=dict(variant="author", noise_type="author_symmetric", model="paper", width=1.0,
                init="torch", normalize="half", optimizer="adam", lr=1e-3, momentum=0.9,
                weight_decay=0.0, scheduler="none", epochs=30, batch_size=64, augment=False,
                grad_clip=None),
    loss_weights=_apl_weights(AUTHOR_LAMBDA))

#: The seed paper's protocol as its text states it (Sec. 2-3): PaperCNN with Kaiming normal
#: initialisation, Adam lr 1e-3, 30 epochs, symmetric noise (each label flipped with
#: probability eta), lam = PAPER_LAMBDA on the active term, its printed NCE/NFL. Where the text
#: is silent it follows the author's code: batch 64, Normalize(0.5, 0.5), gamma 2 (the variant's
#: default), no augmentation, no weight decay, no scheduler, no gradient clipping.
PAPER_PROTOCOL = Protocol(
    fields=dict(AUTHOR_PROTOCOL.fields, variant="paper", noise_type="symmetric", init="kaiming"),
    loss_weights=_apl_weights(PAPER_LAMBDA))

#: The cited work's CIFAR-10 protocol (Ma et al. 2020, official configs): MaCNN, SGD lr 0.01
#: momentum 0.9 weight decay 1e-4, cosine annealing over 120 epochs (per epoch, to 0), batch
#: 128, random crop (pad 4) + horizontal flip, gradient-norm clip 5, its normalisation
#: constants, its NCE/NFL with gamma 0.5 (the variant's default), APL weights alpha = beta = 1
#: (spec_for's default) and NFL alone scaled by 10, symmetric noise with exact per-class counts.
MA2020_PROTOCOL = Protocol(
    fields=dict(variant="ma2020", noise_type="ma2020_symmetric", model="ma2020", width=1.0,
                init="kaiming", normalize="cifar", optimizer="sgd", lr=0.01, momentum=0.9,
                weight_decay=1e-4, scheduler="cosine", epochs=120, batch_size=128, augment=True,
                grad_clip=5.0),
    loss_weights={"nfl": {"alpha": 10.0}})

PROTOCOLS = {"author": AUTHOR_PROTOCOL, "paper": PAPER_PROTOCOL, "ma2020": MA2020_PROTOCOL}


def protocol_variant(protocol: str) -> str:
    """The variant ``protocol`` trains by default: the label of its variant-free runs (CE)."""
    return PROTOCOLS[protocol].fields["variant"]


# --------------------------------------------------------------------------- forms

@dataclass(frozen=True)
class FormRole:
    """What one form's table is: a short title and the question it answers."""

    title: str
    question: str


#: Every form a preset may run, (variant, protocol), and what its Table 1 is.
FORMS = {
    ("author", "author"): FormRole(
        "the author's code",
        "the code the paper's author ran (losses, training, noise rule): the faithful "
        "reproduction of the paper's Table 1."),
    ("paper", "paper"): FormRole(
        "the paper's text",
        "the method as the paper's text states it (its printed NCE/NFL, 0.6 on the active term, "
        "Kaiming initialisation, per-sample noise), the author's code where the text is silent: "
        "do the stated formulas give the printed numbers?"),
    ("ma2020", "paper"): FormRole(
        "the paper's protocol, the cited work's losses",
        "the paper's protocol with the NCE/NFL of the work it cites (Ma et al. 2020): do the "
        "losses the paper cites rank as the paper reports?"),
    ("ma2020", "ma2020"): FormRole(
        "the cited work's protocol",
        "the cited work's own protocol and losses: do we reproduce Ma et al. 2020's numbers?"),
}

#: The paper's grid in three forms, in the report's order.
PAPER_FORMS = (("author", "author"), ("paper", "paper"), ("ma2020", "paper"))


# --------------------------------------------------------------------------- presets

@dataclass(frozen=True)
class Preset:
    """What ``python -m apl grid --preset NAME`` runs by default: its forms, (variant,
    protocol) pairs of :data:`FORMS` with one protocol per variant, and the rest."""

    forms: tuple
    overrides: dict
    seeds: int
    cpu_workers: int

    def protocol_of(self, variant: str) -> str:
        """The protocol ``variant`` trains under in this preset; ``ValueError`` if it has none."""
        for v, protocol in self.forms:
            if v == variant:
                return protocol
        raise ValueError(f"variant {variant!r} is not a form of this preset "
                         f"(its variants: {', '.join(v for v, _ in self.forms)})")

    @property
    def variants(self) -> tuple:
        """The variants of the preset's forms, in order."""
        return tuple(v for v, _ in self.forms)


#: The paper's grid in its three forms (author, paper, ma2020), one seed.
PAPER = Preset(forms=PAPER_FORMS, overrides={}, seeds=1, cpu_workers=1)

#: The paper's grid scaled down so that all three forms fit the quick budget (at most 10
#: minutes on a 2-core CPU, set-up excluded; benchmarks/RESULTS.md "Sizing the quick preset"): a
#: class-balanced subset of CIFAR-10, fewer epochs, a narrower PaperCNN, two CPU workers when
#: no device is named. Batch size, initialisation, normalisation and noise rule stay each form's.
QUICK = Preset(forms=PAPER_FORMS,
               overrides={"train_subset": 2000, "test_subset": 1000, "epochs": 5, "width": 0.125},
               seeds=1, cpu_workers=2)

#: The author's code alone: the faithful reproduction of Table 1, one seed.
AUTHOR = Preset(forms=(("author", "author"),), overrides={}, seeds=1, cpu_workers=1)

#: The cited work's protocol and its variant only, three seeds.
MA2020 = Preset(forms=(("ma2020", "ma2020"),), overrides={}, seeds=3, cpu_workers=1)

PRESETS = {"quick": QUICK, "paper": PAPER, "author": AUTHOR, "ma2020": MA2020}


def get_preset(name: str) -> Preset:
    """The preset called ``name``; ``ValueError`` naming the known ones otherwise."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; use one of {', '.join(PRESETS)}")
    return PRESETS[name]
