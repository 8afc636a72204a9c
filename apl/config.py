"""One training run's configuration: :class:`TrainConfig`, validated on construction.

:meth:`TrainConfig.from_protocol` (and :meth:`~TrainConfig.author`, :meth:`~TrainConfig.paper`,
:meth:`~TrainConfig.ma2020`) build a config from a protocol of :mod:`apl.presets`. Every field is
validated on construction (``ValueError`` naming the field), so a bad grid entry fails before any
data is loaded.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, fields

from apl.data import NORMALIZATIONS
from apl.losses import BACKENDS
from apl.losses.spec import APL_NAMES, LOSS_NAMES, VARIANTS, Kind, canonical_name, spec_for
from apl.models import MODEL_INITS, MODEL_NAMES
from apl.noise import ASYMMETRIC_NOISE_TYPES, NOISE_TYPES
from apl.presets import PROTOCOLS, WEIGHT_PARAMS

__all__ = ["TrainConfig", "LOSS_PARAM_NAMES", "OPTIMIZERS", "SCHEDULERS", "AMP_MODES"]

#: Keys allowed in ``TrainConfig.loss_params`` (the parameters of :func:`apl.losses.spec.spec_for`).
LOSS_PARAM_NAMES = ("gamma", "q", "lam", "alpha", "beta", "a", "m", "min_prob")
OPTIMIZERS = ("adam", "sgd")
SCHEDULERS = ("none", "cosine")
AMP_MODES = (None, "bf16")

#: Fields that change *how* a run executes but not *what* it computes (up to float
#: reordering): left out of :meth:`TrainConfig.run_name`'s identity.
_EXECUTION_FIELDS = ("data_dir", "device", "num_threads", "compile", "channels_last", "backend")
#: Fields that say what a run learns with and from (its loss and its grid cell), not how it
#: trains: left out of :meth:`TrainConfig.training_identity`.
_LOSS_AND_CELL_FIELDS = ("loss", "variant", "loss_params", "noise", "seed")
#: Fields added after runs had been recorded, with the value every earlier run trained with: at that
#: value they stay out of :meth:`TrainConfig.identity`, so the earlier runs keep their names.
_LATER_FIELDS = {"l1": 0.0}
_NOISE_TAGS = {"symmetric": "sym", "ma2020_symmetric": "msym", "author_symmetric": "auth",
               "asymmetric": "asym", "exact_symmetric": "xsym", "exact_asymmetric": "xasym"}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _successor_params(loss: str, variant: str, params: dict, spec) -> dict:
    """``params`` with every parameter the successor ``loss`` takes filled in from its resolved
    ``spec``: the weights of a sum (unless ``lam`` is given) and each shape parameter that
    :func:`apl.losses.spec.spec_for` accepts for it (it refuses those a loss does not take)."""
    out = dict(params)
    if spec.passive != Kind.NONE and "lam" not in params:
        out.setdefault("alpha", spec.alpha)
        out.setdefault("beta", spec.beta)
    for name in ("gamma", "q", "a", "m", "min_prob"):
        if name in out:
            continue
        try:
            spec_for(loss, variant=variant, **{**params, name: getattr(spec, name)})
        except ValueError:  # not a parameter of this loss
            continue
        out[name] = getattr(spec, name)
    return out


@dataclass
class TrainConfig:
    """Everything that defines one training run; :func:`apl.train.train` runs it.

    ``loss``/``variant``/``loss_params`` select the loss (:func:`apl.losses.get_loss`;
    formulas in LOSSES.md); a loss with a focal term always records its ``gamma`` in
    ``loss_params`` (the variant's default, :data:`apl.losses.spec.DEFAULT_GAMMA`, when none is given),
    so a run's record says it and a changed default can never relabel an earlier run.
    ``noise``/``noise_type`` the training-label noise (:mod:`apl.noise`);
    ``model``/``width``/``init`` the network and its initialisation (:mod:`apl.models`);
    ``normalize`` the image normalisation (:data:`apl.data.NORMALIZATIONS`);
    ``train_subset``/``test_subset`` take the first K of a class-balanced ordering seeded
    by ``subset_seed`` (:func:`apl.data.balanced_subset`). ``seed`` seeds the model
    initialisation, dropout, the noise (except ``author_symmetric``, whose seed is the
    author's fixed 42) and the batch order. ``amp="bf16"`` autocasts the
    forward pass to bfloat16 (meant for CUDA); the loss is computed in float32.
    ``channels_last`` is the memory format of images and weights
    (benchmarks/train_epoch_time.py times both formats).
    ``weight_decay`` is the optimizer's L2 decay; ``l1`` adds ``l1 * sum |theta|`` over every
    model parameter (conv and linear weights, biases, BatchNorm's affine; a plain sum) to the
    training loss, as Active Negative Loss and the Joint Asymmetric Loss train (with
    ``weight_decay=0``): its subgradient ``l1 * sign(theta)`` joins the loss's gradient before
    ``grad_clip`` (:mod:`apl.train`).
    """

    loss: str = "ce"
    variant: str = "paper"
    loss_params: dict = field(default_factory=dict)
    noise: float = 0.0
    noise_type: str = "symmetric"
    seed: int = 0
    model: str = "paper"
    width: float = 1.0
    init: str = "kaiming"
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    l1: float = 0.0
    scheduler: str = "none"
    epochs: int = 30
    batch_size: int = 128
    augment: bool = False
    normalize: str = "cifar"
    grad_clip: float | None = None
    train_subset: int | None = None
    test_subset: int | None = None
    subset_seed: int = 0
    data_dir: str = "data"
    device: str = "auto"
    amp: str | None = None
    compile: bool = False
    channels_last: bool = True
    backend: str = "auto"
    num_threads: int | None = None

    def __post_init__(self):
        if not isinstance(self.loss, str) or canonical_name(self.loss) not in LOSS_NAMES:
            raise ValueError(f"loss must be one of {', '.join(LOSS_NAMES)}, got {self.loss!r}")
        self.loss = canonical_name(self.loss)
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if not isinstance(self.loss_params, dict):
            raise ValueError(f"loss_params must be a dict, got {type(self.loss_params).__name__}")
        unknown = sorted(set(self.loss_params) - set(LOSS_PARAM_NAMES))
        if unknown:
            raise ValueError(f"unknown loss_params {unknown}; known: {', '.join(LOSS_PARAM_NAMES)}")
        for k, v in self.loss_params.items():
            if not _is_num(v):
                raise ValueError(f"loss_params[{k!r}] must be a finite number, got {v!r}")
        params = {k: float(v) for k, v in self.loss_params.items()}
        spec = spec_for(self.loss, variant=self.variant, **params)  # raises on a bad combination
        if spec.uses_gamma:  # the resolved gamma is part of the run's identity, never an implicit default
            params.setdefault("gamma", spec.gamma)
        if self.loss not in APL_NAMES:  # a successor's defaults are its paper's values: the record says them
            params = _successor_params(self.loss, self.variant, params, spec)
        self.loss_params = dict(sorted(params.items()))

        if self.noise_type not in NOISE_TYPES:
            raise ValueError(f"noise_type must be one of {NOISE_TYPES}, got {self.noise_type!r}")
        pairs = self.noise_type in ASYMMETRIC_NOISE_TYPES  # eta = 1 flips every source class: still defined
        upper_ok = (lambda e: e <= 1.0) if pairs else (lambda e: e < 1.0)
        if not (_is_num(self.noise) and self.noise >= 0 and upper_ok(self.noise)):
            interval = "[0, 1]" if pairs else "[0, 1)"
            raise ValueError(f"noise must be in {interval} for {self.noise_type} noise, got {self.noise!r}")
        self.noise = float(self.noise)
        for name in ("seed", "subset_seed"):
            if not (_is_int(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"{name} must be a non-negative integer, got {getattr(self, name)!r}")
        if self.model not in MODEL_NAMES:
            raise ValueError(f"model must be one of {MODEL_NAMES}, got {self.model!r}")
        if not (_is_num(self.width) and self.width > 0):
            raise ValueError(f"width must be a number > 0, got {self.width!r}")
        self.width = float(self.width)
        if self.init not in MODEL_INITS:
            raise ValueError(f"init must be one of {MODEL_INITS}, got {self.init!r}")
        if self.normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {tuple(NORMALIZATIONS)}, got {self.normalize!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if not (_is_num(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a number > 0, got {self.lr!r}")
        for name in ("momentum", "weight_decay", "l1"):
            if not (_is_num(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"{name} must be a number >= 0, got {getattr(self, name)!r}")
        self.lr, self.momentum, self.weight_decay = float(self.lr), float(self.momentum), float(self.weight_decay)
        self.l1 = float(self.l1)
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {self.scheduler!r}")
        if not (_is_int(self.epochs) and self.epochs >= 1):
            raise ValueError(f"epochs must be an integer >= 1, got {self.epochs!r}")
        if not (_is_int(self.batch_size) and self.batch_size >= 2):
            raise ValueError(f"batch_size must be an integer >= 2 (BatchNorm), got {self.batch_size!r}")
        if self.grad_clip is not None:
            if not (_is_num(self.grad_clip) and self.grad_clip > 0):
                raise ValueError(f"grad_clip must be None or a number > 0, got {self.grad_clip!r}")
            self.grad_clip = float(self.grad_clip)
        for name in ("train_subset", "test_subset"):
            v = getattr(self, name)
            if v is not None and not (_is_int(v) and v >= 1):
                raise ValueError(f"{name} must be None or an integer >= 1, got {v!r}")
        if not isinstance(self.data_dir, str):
            self.data_dir = str(self.data_dir)  # accept a Path; stored as str for JSON
        if not (isinstance(self.device, str) and self.device):
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        if self.amp not in AMP_MODES:
            raise ValueError(f"amp must be None or 'bf16', got {self.amp!r}")
        for name in ("augment", "compile", "channels_last"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.num_threads is not None and not (_is_int(self.num_threads) and self.num_threads >= 1):
            raise ValueError(f"num_threads must be None or an integer >= 1, got {self.num_threads!r}")

    # ------------------------------------------------------------------ protocols

    @classmethod
    def from_protocol(cls, protocol: str, **overrides) -> TrainConfig:
        """A config following ``protocol`` (:data:`apl.presets.PROTOCOLS`), ``overrides`` last.

        Where the protocol has a setting for the loss (the successors' protocol), the loss's own
        paper's regularisation and noise rule come before ``overrides``, and the loss parameters it
        sets for the family of the noise type (epsilon-softmax's) fill those ``loss_params`` lacks.
        The protocol's default loss weights apply unless ``loss_params`` names a weight.
        """
        if protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {protocol!r}; use one of {', '.join(PROTOCOLS)}")
        rules = PROTOCOLS[protocol]
        loss = overrides.get("loss", cls.loss)
        known = isinstance(loss, str) and canonical_name(loss) in LOSS_NAMES  # else __post_init__ names it
        base = {**rules.fields, **(rules.loss_fields(loss) if known else {}), **overrides}
        params = dict(base.get("loss_params") or {})
        if known:
            weighted = bool(params.keys() & set(WEIGHT_PARAMS))
            for k, v in rules.noise_params(loss, base["noise_type"]).items():
                if k not in WEIGHT_PARAMS or not weighted:
                    params.setdefault(k, v)
            if not weighted:
                params.update(rules.loss_weights.get(canonical_name(loss), {}))
        base["loss_params"] = params
        return cls(**base)

    @classmethod
    def author(cls, **overrides) -> TrainConfig:
        """The seed paper's author's code (:data:`apl.presets.AUTHOR_PROTOCOL`), ``overrides`` last."""
        return cls.from_protocol("author", **overrides)

    @classmethod
    def paper(cls, **overrides) -> TrainConfig:
        """The seed paper's protocol (:data:`apl.presets.PAPER_PROTOCOL`), ``overrides`` last."""
        return cls.from_protocol("paper", **overrides)

    @classmethod
    def ma2020(cls, **overrides) -> TrainConfig:
        """The cited work's protocol (:data:`apl.presets.MA2020_PROTOCOL`), ``overrides`` last."""
        return cls.from_protocol("ma2020", **overrides)

    @classmethod
    def successors(cls, **overrides) -> TrainConfig:
        """The successors' protocol (:data:`apl.presets.SUCCESSORS_PROTOCOL`: the cited work's, each
        loss with its own paper's regularisation, noise rule and parameters), ``overrides`` last."""
        return cls.from_protocol("successors", **overrides)

    # ------------------------------------------------------------------ (de)serialisation

    def to_dict(self) -> dict:
        """A JSON-serialisable dict of every field."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError``."""
        if not isinstance(d, dict):
            raise ValueError(f"a TrainConfig dict is needed, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s) {unknown}")
        return cls(**d)

    def identity(self) -> dict:
        """The fields that define *what* the run computes (not where or how fast). A field added
        after runs were recorded is left out at the value those runs trained with (``l1 = 0``),
        so that they keep their names."""
        d = self.to_dict()
        for name in _EXECUTION_FIELDS:
            d.pop(name)
        for name, earlier in _LATER_FIELDS.items():
            if d[name] == earlier:
                d.pop(name)
        return d

    def differences(self, saved: dict) -> list[str]:
        """The :meth:`identity` fields in which ``saved``, a config dict as a run wrote it, differs
        from this config, sorted (``ValueError`` for a dict that is no config). A field ``saved``
        lacks differs too: it was written by an earlier version, whose default for that field (or
        for the focal exponent, implicit before) need not be this version's."""
        TrainConfig.from_dict(saved)
        mine = self.identity()
        differ = {k for k, v in mine.items() if k not in saved or saved[k] != v}
        # a later field at its earlier value is out of ``mine``; the saved run may still have another value
        differ |= {k for k, earlier in _LATER_FIELDS.items() if k not in mine and saved.get(k, earlier) != earlier}
        return sorted(differ)

    def training_identity(self) -> dict:
        """:meth:`identity` without the loss and the grid cell (loss, variant, loss_params, noise,
        seed): how the run trains. A variant-free loss's run serves exactly the forms whose runs
        share it (:func:`apl.report.cells.group_runs`)."""
        d = self.identity()
        for name in _LOSS_AND_CELL_FIELDS:
            d.pop(name)
        return d

    def run_name(self) -> str:
        """A filesystem-safe name, e.g. ``"nce+rce_paper_sym0.6_s0_1a2b3c4d"``.

        Loss, variant, noise type and rate, seed, then a short hash of :meth:`identity`: two
        configs share a name only when they compute the same run, and a run written under an
        earlier definition of the config (other fields or defaults) never shares a folder, or a
        record name (:func:`apl.records.is_current`), with one of this version.
        """
        head = f"{self.loss}_{self.variant}_{_NOISE_TAGS[self.noise_type]}{self.noise:g}_s{self.seed}"
        digest = hashlib.sha1(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:8]
        return f"{head}_{digest}"
