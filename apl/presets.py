"""The experiments as data: the grids' axes, the training protocols, the forms, the presets.

A *protocol* is how one run trains (:meth:`apl.config.TrainConfig.from_protocol` builds configs
from it); a *form* is one table of the grid, a loss variant trained under a protocol; a *preset*
is what ``python -m apl grid --preset NAME`` runs: its forms, losses and noise rates, the config
fields it changes, and the grid's default seeds and CPU workers. Two experiments: the paper's grid
(symmetric noise, three forms) and the successors' (APL's successors and baselines under the cited
work's protocol, each loss with its own paper's setting, symmetric and asymmetric noise). Every
number that defines them is written once, here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache

from apl.losses.spec import APL_NAMES, AUTHOR_LAMBDA, PAPER_LAMBDA, VARIANTS, canonical_name, spec_for
from apl.noise import ASYMMETRIC_NOISE_TYPES

__all__ = [
    "GRID_LOSSES", "GRID_NOISE", "GRID_VARIANTS", "WEIGHT_PARAMS", "NOISE_FAMILIES", "NOISE_RULES", "noise_family",
    "PaperSetting", "Protocol", "PROTOCOLS", "SUCCESSOR_SETTINGS", "SUCCESSOR_LOSSES", "SUCCESSOR_NOISE",
    "SUCCESSOR_L1",
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
#: The successors' grid (the cited work's protocol, each loss as its own paper trains it): the baselines
#: every successor paper reports, then ALFs, ANL, JAL and epsilon-softmax, in that order.
SUCCESSOR_LOSSES = ("ce", "gce", "sce", "nce+rce",
                    "agce", "aul", "ael", "nce+agce", "nce+aul", "nce+ael",
                    "anl-ce", "anl-fl",
                    "nce+amse", "nfl+amse",
                    "ece", "efl", "ece+mae", "efl+mae")
#: Their noise rates per family: each paper's CIFAR-10 grid.
SUCCESSOR_NOISE = {"symmetric": GRID_NOISE, "asymmetric": (0.1, 0.2, 0.3, 0.4)}

# --------------------------------------------------------------------------- noise families and rules

#: Noise families: symmetric (a flipped label goes to any other class) and CIFAR-10's asymmetric class pairs.
NOISE_FAMILIES = ("symmetric", "asymmetric")
#: How a paper draws each family (apl.noise): ``"apl"`` the cited work's generators (exact counts per
#: class for symmetric; cascading pairs, whose realised rate is below eta, for asymmetric), ``"exact"``
#: the exact-count transition matrices of Active Negative Loss and the Joint Asymmetric Loss.
NOISE_RULES = {"apl": {"symmetric": "ma2020_symmetric", "asymmetric": "asymmetric"},
               "exact": {"symmetric": "exact_symmetric", "asymmetric": "exact_asymmetric"}}


def noise_family(noise_type: str) -> str:
    """The family of a noise type (:data:`apl.noise.NOISE_TYPES`): ``"asymmetric"`` or ``"symmetric"``."""
    return "asymmetric" if noise_type in ASYMMETRIC_NOISE_TYPES else "symmetric"


@cache
def is_variant_free(loss: str) -> bool:
    """True when ``loss`` is the same function in every variant (CE), whatever gamma is.

    Such a loss needs one run per protocol, not one per variant: under one protocol a single
    run serves every form (never across protocols, which train differently).
    """
    if canonical_name(loss) not in APL_NAMES:  # a successor has one form, its code's, in every variant
        return True
    # gamma fixed: the variants' default exponents differ, but a loss without a focal term ignores it
    return len({spec_for(loss, variant=v, gamma=1.0) for v in VARIANTS}) == 1


# --------------------------------------------------------------------------- protocols

#: The loss parameters that weight a loss: a protocol's default weights apply when none is given.
WEIGHT_PARAMS = ("lam", "alpha", "beta")


@dataclass(frozen=True)
class PaperSetting:
    """How one paper trains its losses on top of a shared protocol: its regularisation (config
    fields), its noise rule (a key of :data:`NOISE_RULES`), and the loss parameters that it sets per
    noise family (``{loss: {family: params}}``; epsilon-softmax's switch on the noise)."""

    paper: str
    fields: dict
    noise_rule: str
    noise_params: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Protocol:
    """How one run trains: config fields, default loss weights per loss name, and, for a protocol
    whose losses come from several papers, each loss's own paper's setting (``settings``)."""

    fields: dict
    loss_weights: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)

    def noise_type(self, loss: str, family: str) -> str:
        """The noise type ``loss`` trains with under noise of ``family`` (:data:`NOISE_FAMILIES`):
        its paper's rule, else the protocol's own symmetric rule or the cited work's asymmetric one."""
        if family not in NOISE_FAMILIES:
            raise ValueError(f"unknown noise family {family!r}; use one of {', '.join(NOISE_FAMILIES)}")
        setting = self.settings.get(canonical_name(loss))
        if setting is not None:
            return NOISE_RULES[setting.noise_rule][family]
        return self.fields["noise_type"] if family == "symmetric" else NOISE_RULES["apl"]["asymmetric"]

    def loss_fields(self, loss: str) -> dict:
        """The config fields ``loss``'s own paper changes in this protocol (its regularisation and the
        noise type of its symmetric rule); empty when the protocol has no setting for it."""
        setting = self.settings.get(canonical_name(loss))
        if setting is None:
            return {}
        return {**setting.fields, "noise_type": NOISE_RULES[setting.noise_rule]["symmetric"]}

    def noise_params(self, loss: str, noise_type: str) -> dict:
        """The loss parameters ``loss``'s paper sets for the family of ``noise_type`` (often none)."""
        setting = self.settings.get(canonical_name(loss))
        if setting is None:
            return {}
        return dict(setting.noise_params.get(canonical_name(loss), {}).get(noise_family(noise_type), {}))


def _apl_weights(lam: float) -> dict:
    """``lam`` for every active+passive sum."""
    return {name: {"lam": lam} for name in APL_NAMES if "+" in name}


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

#: ANL's and JAL's L1 weight delta on CIFAR-10 (both official configs), with L2 weight decay 0.
SUCCESSOR_L1 = 5e-5
#: epsilon-softmax's CIFAR-10 parameters per noise family (its code switches on the noise type):
#: alpha, beta of the sums with MAE, and the boost m; the single losses take m alone.
_EPS_SOFTMAX = {"symmetric": dict(alpha=0.01, beta=5.0, m=1e5), "asymmetric": dict(alpha=0.02, beta=5.0, m=1e3)}

#: Each successor loss's own paper's setting under the cited work's protocol (docs/sources.md): the
#: cited work's baselines, ALFs and epsilon-softmax keep its L2 decay and its noise rule; ANL and JAL
#: replace the decay by an L1 term and draw the noise as exact-count transition matrices.
SUCCESSOR_SETTINGS = {
    **dict.fromkeys(("ce", "gce", "sce", "nce+rce", "ngce", "nmae", "nrce", "ngce+mae", "ngce+rce"), PaperSetting(
        "the cited work (Ma et al., ICML 2020)", {}, "apl")),
    **dict.fromkeys(("agce", "aul", "ael", "nce+agce", "nce+aul", "nce+ael"), PaperSetting(
        "ALFs (Zhou et al., ICML 2021)", {}, "apl")),
    **dict.fromkeys(("nnce", "nnfl", "anl-ce", "anl-fl"), PaperSetting(
        "ANL (Ye et al., NeurIPS 2023)", {"weight_decay": 0.0, "l1": SUCCESSOR_L1}, "exact")),
    **dict.fromkeys(("amse", "nce+amse", "nfl+amse"), PaperSetting(
        "JAL (Wang et al., 2025)", {"weight_decay": 0.0, "l1": SUCCESSOR_L1}, "exact")),
    **dict.fromkeys(("ece", "efl", "ece+mae", "efl+mae"), PaperSetting(
        "epsilon-softmax (Wang et al., NeurIPS 2024)", {}, "apl", noise_params={
            **{name: {f: {"m": p["m"]} for f, p in _EPS_SOFTMAX.items()} for name in ("ece", "efl")},
            **{name: _EPS_SOFTMAX for name in ("ece+mae", "efl+mae")}})),
}

#: The successors' shared protocol: the cited work's (MaCNN, SGD 0.01 momentum 0.9, cosine over 120
#: epochs, batch 128, clip 5, crop + flip, CIFAR-10 normalisation), each loss with its own paper's
#: regularisation, noise rule and parameters (:data:`SUCCESSOR_SETTINGS`); its NCE and NFL are the
#: cited work's (variant ma2020), as in the successors' code.
SUCCESSORS_PROTOCOL = Protocol(fields=dict(MA2020_PROTOCOL.fields), settings=SUCCESSOR_SETTINGS)

PROTOCOLS = {"author": AUTHOR_PROTOCOL, "paper": PAPER_PROTOCOL, "ma2020": MA2020_PROTOCOL,
             "successors": SUCCESSORS_PROTOCOL}


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
    ("ma2020", "successors"): FormRole(
        "the successors under the cited work's protocol",
        "APL's successors (ALFs, ANL, JAL, epsilon-softmax) and its baselines, each trained as its own "
        "paper trains it: do we reproduce their published numbers, and how do they rank?"),
}

#: The paper's grid in three forms, in the report's order.
PAPER_FORMS = (("author", "author"), ("paper", "paper"), ("ma2020", "paper"))


# --------------------------------------------------------------------------- presets

@dataclass(frozen=True)
class Preset:
    """What ``python -m apl grid --preset NAME`` runs by default: its forms, (variant,
    protocol) pairs of :data:`FORMS` with one protocol per variant, its losses and noise rates
    per family (the paper's grid by default), and the rest. ``report`` names the report its runs
    get: the paper's Table 1 and Figures 1-3, or the successors' tables per noise family."""

    forms: tuple
    overrides: dict
    seeds: int
    cpu_workers: int
    losses: tuple = GRID_LOSSES
    noise: dict = field(default_factory=lambda: {"symmetric": GRID_NOISE})
    report: str = "paper"

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

#: APL's successors and its baselines under the cited work's protocol, each loss with its own paper's
#: regularisation, noise rule and parameters; symmetric and asymmetric noise; three seeds, as the papers.
SUCCESSORS = Preset(forms=(("ma2020", "successors"),), overrides={}, seeds=3, cpu_workers=1,
                    losses=SUCCESSOR_LOSSES, noise=SUCCESSOR_NOISE, report="successors")

#: The successors' grid scaled down to the quick budget (at most 10 minutes on a 2-core CPU, set-up
#: excluded): fewer training images than the paper's quick preset, as it has more runs.
SUCCESSORS_QUICK = Preset(forms=SUCCESSORS.forms,
                          overrides={"train_subset": 1500, "test_subset": 1000, "epochs": 5, "width": 0.125},
                          seeds=1, cpu_workers=2, losses=SUCCESSOR_LOSSES, noise=SUCCESSOR_NOISE,
                          report="successors")

PRESETS = {"quick": QUICK, "paper": PAPER, "author": AUTHOR, "ma2020": MA2020, "successors": SUCCESSORS,
           "successors_quick": SUCCESSORS_QUICK}


def get_preset(name: str) -> Preset:
    """The preset called ``name``; ``ValueError`` naming the known ones otherwise."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; use one of {', '.join(PRESETS)}")
    return PRESETS[name]
