"""Synthetic label noise for the training set: the seed paper's rule, its author's code, the cited work's,
and the exact-count transition matrices of the cited work's successors (ANL, JAL).

Six generators, each deterministic (a private ``numpy`` generator; the global RNGs are never
touched) and each returning ``(noisy_labels, NoiseRecord)``:

- :func:`symmetric_noise`: the seed paper's rule (Sec. 2.1): *each sample independently*
  with probability ``eta`` gets a label drawn uniformly from the other C-1 classes. The
  realised rate is Binomial(N, eta) / N, so it only approximates ``eta``.
- :func:`ma2020_symmetric_noise`: the cited work's protocol: *exactly* ``int(eta * N_c)``
  samples of each class c (chosen without replacement) are relabelled uniformly among the
  other C-1 classes, so the realised rate is ``eta`` up to rounding. (The official code
  computes ``int(int(eta * N) / C)`` per class, which is the same number on a balanced set
  such as CIFAR-10; on an unbalanced subset this per-class form keeps each class's rate.)
- :func:`author_symmetric_noise`: the seed paper's author's code (docs/sources.md#the-authors-code):
  *exactly* ``int(eta * N)`` samples of the whole set, drawn with numpy's legacy generator
  seeded 42 at every call, so the noisy sets are nested across ``eta``; each chosen label is
  replaced by a uniform draw among the other classes. Call for call the author's procedure,
  so on the official CIFAR-10 training labels, in their order, it gives the author's labels.
- :func:`asymmetric_noise`: the cited work's CIFAR-10 class mapping truck->automobile,
  bird->airplane, cat->dog, dog->cat, deer->horse, applied in that order to the labels *as
  they are at that step* (so dog->cat counts, and may flip back, the cats just made dogs,
  as the official code does).

Labels may be a 1-D integer ``torch.Tensor`` or ``numpy`` array; they are never modified
and the noisy labels come back as the same type (and dtype/device).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

__all__ = [
    "NoiseRecord", "NOISE_TYPES", "SYMMETRIC_NOISE_TYPES", "CIFAR10_ASYMMETRIC_MAP", "symmetric_noise",
    "ma2020_symmetric_noise", "author_symmetric_noise", "AUTHOR_NOISE_SEED", "asymmetric_noise",
    "ASYMMETRIC_NOISE_TYPES", "exact_symmetric_noise", "exact_asymmetric_noise", "apply_noise",
]

#: Source -> target class of the cited work's CIFAR-10 asymmetric noise, in the order applied.
#: (CIFAR-10 indices: 0 airplane, 1 automobile, 2 bird, 3 cat, 4 deer, 5 dog, 6 frog,
#: 7 horse, 8 ship, 9 truck.)
CIFAR10_ASYMMETRIC_MAP = ((9, 1), (2, 0), (3, 5), (5, 3), (4, 7))

#: Names accepted by :func:`apply_noise` (and ``TrainConfig.noise_type``).
NOISE_TYPES = ("symmetric", "ma2020_symmetric", "author_symmetric", "asymmetric", "exact_symmetric",
               "exact_asymmetric")
#: The symmetric ones (each flipped label goes to one of the other classes, none preferred).
SYMMETRIC_NOISE_TYPES = ("symmetric", "ma2020_symmetric", "author_symmetric", "exact_symmetric")
#: The CIFAR-10 class-pair ones (:data:`CIFAR10_ASYMMETRIC_MAP`): eta may be 1 (every source flipped).
ASYMMETRIC_NOISE_TYPES = ("asymmetric", "exact_asymmetric")
#: The seed the author's noise script passes to ``np.random.seed`` on every call.
AUTHOR_NOISE_SEED = 42


@dataclass
class NoiseRecord:
    """What a noise generator did: enough to report and to regenerate it.

    ``transition[i][j]`` counts samples whose clean label is ``i`` and noisy label ``j``;
    ``realised_rate`` is the fraction of samples whose label changed.
    """

    kind: str
    eta: float
    realised_rate: float
    transition: list
    seed: int
    num_classes: int
    num_samples: int

    def to_dict(self) -> dict:
        """A JSON-serialisable dict (plain ints, floats, lists)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> NoiseRecord:
        """Inverse of :meth:`to_dict`."""
        return cls(**d)


def _as_numpy_labels(labels, num_classes: int) -> np.ndarray:
    """Validate ``labels`` and return them as a fresh int64 numpy array."""
    if isinstance(labels, torch.Tensor):
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise ValueError(f"labels must be an integer tensor, got dtype {labels.dtype}")
        arr = labels.detach().cpu().numpy().astype(np.int64)  # astype copies
    elif isinstance(labels, np.ndarray):
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be an integer array, got dtype {labels.dtype}")
        arr = labels.astype(np.int64)
    else:
        raise ValueError(f"labels must be a torch.Tensor or numpy.ndarray, got {type(labels).__name__}")
    if arr.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {arr.shape}")
    if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
        bad = arr[(arr < 0) | (arr >= num_classes)][0]
        raise ValueError(f"label {int(bad)} is out of range for {num_classes} classes (valid: 0..{num_classes - 1})")
    return arr


def _like(noisy: np.ndarray, labels):
    """Return ``noisy`` as the same type, dtype (and device) as ``labels``."""
    if isinstance(labels, torch.Tensor):
        return torch.from_numpy(noisy).to(dtype=labels.dtype, device=labels.device)
    return noisy.astype(labels.dtype)


def _check_eta(eta, upper_inclusive: bool) -> float:
    try:
        eta = float(eta)
    except (TypeError, ValueError):
        raise ValueError(f"eta must be a number, got {eta!r}") from None
    ok = math.isfinite(eta) and 0.0 <= eta and (eta <= 1.0 if upper_inclusive else eta < 1.0)
    if not ok:
        interval = "[0, 1]" if upper_inclusive else "[0, 1)"
        raise ValueError(f"noise rate eta must be in {interval}, got {eta}")
    return eta


def _check_common(num_classes, seed) -> tuple[int, int]:
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return int(num_classes), int(seed)


def _record(kind, eta, clean, noisy, seed, num_classes) -> NoiseRecord:
    transition = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(transition, (clean, noisy), 1)
    n = clean.size
    rate = float((clean != noisy).sum() / n) if n else 0.0
    return NoiseRecord(kind=kind, eta=float(eta), realised_rate=rate, transition=transition.tolist(),
                       seed=seed, num_classes=num_classes, num_samples=int(n))


def _other_class(rng: np.random.Generator, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """A class drawn uniformly from the C-1 classes other than each label."""
    # label + uniform{1..C-1} (mod C) is uniform over the other classes and never the label.
    return (labels + rng.integers(1, num_classes, size=labels.shape)) % num_classes


def symmetric_noise(labels, eta: float, num_classes: int = 10, seed: int = 0):
    """The seed paper's symmetric noise: each label flips with probability ``eta``.

    A flipped label is drawn uniformly from the other ``num_classes - 1`` classes (never its
    own). ``eta`` must be in [0, 1). Returns ``(noisy_labels, NoiseRecord)``.
    """
    eta = _check_eta(eta, upper_inclusive=False)
    num_classes, seed = _check_common(num_classes, seed)
    clean = _as_numpy_labels(labels, num_classes)
    rng = np.random.default_rng(seed)
    flip = rng.random(clean.size) < eta
    noisy = np.where(flip, _other_class(rng, clean, num_classes), clean)
    return _like(noisy, labels), _record("symmetric", eta, clean, noisy, seed, num_classes)


def ma2020_symmetric_noise(labels, eta: float, num_classes: int = 10, seed: int = 0):
    """The cited work's symmetric noise: exactly ``int(eta * N_c)`` flips in each class c.

    The flipped samples of each class are chosen without replacement and relabelled
    uniformly among the other ``num_classes - 1`` classes. ``eta`` must be in [0, 1).
    Differs from :func:`symmetric_noise` only in fixing the count per class instead of
    flipping each sample independently. Returns ``(noisy_labels, NoiseRecord)``.
    """
    eta = _check_eta(eta, upper_inclusive=False)
    num_classes, seed = _check_common(num_classes, seed)
    clean = _as_numpy_labels(labels, num_classes)
    rng = np.random.default_rng(seed)
    noisy = clean.copy()
    for c in range(num_classes):
        idx = np.flatnonzero(clean == c)
        chosen = rng.choice(idx, size=int(eta * idx.size), replace=False)
        noisy[chosen] = _other_class(rng, clean[chosen], num_classes)
    return _like(noisy, labels), _record("ma2020_symmetric", eta, clean, noisy, seed, num_classes)


def author_symmetric_noise(labels, eta: float, num_classes: int = 10):
    """The seed paper's author's symmetric noise: exactly ``int(eta * N)`` labels changed.

    The author's procedure, call for call, on a private ``np.random.RandomState`` seeded with
    :data:`AUTHOR_NOISE_SEED` (the legacy global functions draw from the same stream): one
    ``choice(N, int(eta * N), replace=False)`` for the indices, then for each index in that
    order one ``choice`` among the other classes in ascending order. The index draw is a
    permutation prefix, so a smaller ``eta``'s noisy set is inside a larger one's. There is no
    seed argument (the author's is fixed); the record says 42. ``eta`` must be in [0, 1).
    Returns ``(noisy_labels, NoiseRecord)``.
    """
    eta = _check_eta(eta, upper_inclusive=False)
    num_classes, seed = _check_common(num_classes, AUTHOR_NOISE_SEED)
    clean = _as_numpy_labels(labels, num_classes)
    rng = np.random.RandomState(seed)  # the legacy stream np.random.seed(42) gives, never the global one
    noisy = clean.copy()
    chosen = rng.choice(clean.size, int(eta * clean.size), replace=False)
    for i in chosen:
        noisy[i] = rng.choice([c for c in range(num_classes) if c != clean[i]])
    return _like(noisy, labels), _record("author_symmetric", eta, clean, noisy, seed, num_classes)


def asymmetric_noise(labels, eta: float, seed: int = 0):
    """The cited work's CIFAR-10 asymmetric (class-dependent) noise.

    For each (source, target) of :data:`CIFAR10_ASYMMETRIC_MAP`, in order,
    ``int(eta * count)`` of the samples currently labelled ``source`` (chosen without
    replacement) are relabelled ``target``. ``eta`` must be in [0, 1]; labels in [0, 10).
    Returns ``(noisy_labels, NoiseRecord)``.
    """
    eta = _check_eta(eta, upper_inclusive=True)
    num_classes, seed = _check_common(10, seed)
    clean = _as_numpy_labels(labels, num_classes)
    rng = np.random.default_rng(seed)
    noisy = clean.copy()
    for source, target in CIFAR10_ASYMMETRIC_MAP:
        idx = np.flatnonzero(noisy == source)  # current labels: the official code flips in place
        chosen = rng.choice(idx, size=int(eta * idx.size), replace=False)
        noisy[chosen] = target
    return _like(noisy, labels), _record("asymmetric", eta, clean, noisy, seed, num_classes)


def _exact_count(rate: float, n: int) -> int:
    """``floor(rate * n)``, rounded to 9 decimals first: a product that is an integer in exact
    arithmetic (0.9 / 9 * 5000 = 500) is not floored to one below by a float error."""
    return math.floor(round(rate * n, 9))


def exact_symmetric_noise(labels, eta: float, num_classes: int = 10, seed: int = 0):
    """Symmetric noise as an exact-count transition matrix (Active Negative Loss, JAL).

    ``T[i, j] = eta / (C - 1)`` for ``j != i``: for each clean class i, one random order of its
    samples is cut into disjoint runs of ``floor(T[i, j] * n_i)`` samples, run j relabelled j.
    Every class loses exactly ``(C - 1) * floor(eta * n_i / (C - 1))`` labels (999 of 5,000 at
    eta = 0.2), a little under ``eta``. ``eta`` must be in [0, 1). Returns ``(noisy_labels, NoiseRecord)``.
    """
    eta = _check_eta(eta, upper_inclusive=False)
    num_classes, seed = _check_common(num_classes, seed)
    clean = _as_numpy_labels(labels, num_classes)
    rng = np.random.default_rng(seed)
    noisy = clean.copy()
    for i in range(num_classes):
        pool = rng.permutation(np.flatnonzero(clean == i))
        k = _exact_count(eta / (num_classes - 1), pool.size)
        targets = [j for j in range(num_classes) if j != i]
        for run, j in enumerate(targets):
            noisy[pool[run * k:(run + 1) * k]] = j
    return _like(noisy, labels), _record("exact_symmetric", eta, clean, noisy, seed, num_classes)


def exact_asymmetric_noise(labels, eta: float, seed: int = 0):
    """CIFAR-10 asymmetric noise as an exact-count transition matrix (Active Negative Loss, JAL).

    For each (source, target) of :data:`CIFAR10_ASYMMETRIC_MAP`, exactly ``floor(eta * n_source)``
    samples whose *clean* label is ``source`` (without replacement) get ``target``. No cascade,
    unlike :func:`asymmetric_noise`: dog->cat draws from the clean dogs only, so each source class
    loses exactly that many labels. ``eta`` must be in [0, 1]; labels in [0, 10). Returns
    ``(noisy_labels, NoiseRecord)``.
    """
    eta = _check_eta(eta, upper_inclusive=True)
    num_classes, seed = _check_common(10, seed)
    clean = _as_numpy_labels(labels, num_classes)
    rng = np.random.default_rng(seed)
    noisy = clean.copy()
    for source, target in CIFAR10_ASYMMETRIC_MAP:
        idx = np.flatnonzero(clean == source)  # the clean labels: no flip sees another's result
        chosen = rng.choice(idx, size=_exact_count(eta, idx.size), replace=False)
        noisy[chosen] = target
    return _like(noisy, labels), _record("exact_asymmetric", eta, clean, noisy, seed, num_classes)


def apply_noise(labels, kind: str, eta: float, num_classes: int = 10, seed: int = 0):
    """Dispatch on ``kind`` (one of :data:`NOISE_TYPES`); ``eta == 0`` still returns a record.

    ``seed`` does not apply to ``"author_symmetric"``, whose seed is the author's fixed 42.
    """
    if kind == "symmetric":
        return symmetric_noise(labels, eta, num_classes, seed)
    if kind == "ma2020_symmetric":
        return ma2020_symmetric_noise(labels, eta, num_classes, seed)
    if kind == "author_symmetric":
        return author_symmetric_noise(labels, eta, num_classes)
    if kind == "exact_symmetric":
        return exact_symmetric_noise(labels, eta, num_classes, seed)
    if kind in ASYMMETRIC_NOISE_TYPES:
        if num_classes != 10:
            raise ValueError(f"{kind} noise is the CIFAR-10 mapping (10 classes), got num_classes={num_classes}")
        return (asymmetric_noise if kind == "asymmetric" else exact_asymmetric_noise)(labels, eta, seed)
    raise ValueError(f"unknown noise type {kind!r}; known: {', '.join(NOISE_TYPES)}")
