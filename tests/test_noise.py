"""Label noise generators (apl.noise): rates, never-own-class, exact counts, determinism, errors."""
import json
import math
import random

import numpy as np
import pytest
import torch

from apl.noise import (
    AUTHOR_NOISE_SEED,
    CIFAR10_ASYMMETRIC_MAP,
    NoiseRecord,
    apply_noise,
    asymmetric_noise,
    author_symmetric_noise,
    exact_asymmetric_noise,
    exact_symmetric_noise,
    ma2020_symmetric_noise,
    symmetric_noise,
)

C = 10


def balanced(n_per_class=2000, seed=0):
    rng = np.random.default_rng(seed)
    return rng.permutation(np.repeat(np.arange(C), n_per_class)).astype(np.int64)


@pytest.mark.parametrize("eta", [0.0, 0.2, 0.4, 0.6, 0.8, 0.95])
def test_symmetric_rate_within_binomial_bound(eta):
    y = balanced()
    noisy, rec = symmetric_noise(y, eta, C, seed=1)
    n = y.size
    rate = float((noisy != y).mean())
    # Every flip changes the label, so the changed count is Binomial(n, eta): 5 sigma.
    assert abs(rate - eta) <= 5 * math.sqrt(eta * (1 - eta) / n) + 1e-12
    assert rec.realised_rate == pytest.approx(rate)
    assert rec.eta == eta and rec.kind == "symmetric" and rec.num_samples == n


def test_symmetric_never_keeps_own_class_when_flipped():
    # If a flip could land on the own class, eta=0.999 would change only ~0.999*0.9 of labels.
    y = balanced(1000)
    noisy, rec = symmetric_noise(y, 0.999, C, seed=3)
    assert (noisy != y).mean() > 0.99
    t = np.array(rec.transition)
    assert t.trace() == int((noisy == y).sum())


def test_symmetric_off_diagonal_is_uniform():
    y = balanced(5000)
    eta = 0.6
    noisy, rec = symmetric_noise(y, eta, C, seed=7)
    t = np.array(rec.transition)
    assert t.sum() == y.size
    assert (t.sum(axis=1) == 5000).all()  # rows are the clean classes
    expected = 5000 * eta / (C - 1)
    off = t[~np.eye(C, dtype=bool)]
    assert np.all(np.abs(off - expected) < 5 * math.sqrt(expected))
    # and the transition matrix is what the labels say
    for i in range(C):
        for j in range(C):
            assert t[i, j] == int(((y == i) & (noisy == j)).sum())


@pytest.mark.parametrize("fn", [symmetric_noise, ma2020_symmetric_noise])
def test_deterministic_from_seed_and_no_global_rng(fn):
    y = balanced(300)
    np.random.seed(0)
    torch.manual_seed(0)
    a, _ = fn(y, 0.5, C, seed=11)
    np.random.seed(999)
    torch.manual_seed(999)
    b, _ = fn(y, 0.5, C, seed=11)
    c, _ = fn(y, 0.5, C, seed=12)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_input_not_modified_and_type_preserved():
    y_np = balanced(200).astype(np.int32)
    y_t = torch.from_numpy(balanced(200))
    keep_np, keep_t = y_np.copy(), y_t.clone()
    out_np, _ = symmetric_noise(y_np, 0.5, C, seed=0)
    out_t, _ = ma2020_symmetric_noise(y_t, 0.5, C, seed=0)
    out_a, _ = asymmetric_noise(y_t, 0.5, seed=0)
    assert np.array_equal(y_np, keep_np) and torch.equal(y_t, keep_t)
    assert isinstance(out_np, np.ndarray) and out_np.dtype == np.int32
    assert isinstance(out_t, torch.Tensor) and out_t.dtype == torch.int64
    assert isinstance(out_a, torch.Tensor)
    assert not np.array_equal(out_np, y_np)


def test_ma2020_exact_counts_per_class_even_unbalanced():
    rng = np.random.default_rng(0)
    counts = np.array([500, 300, 1000, 250, 40, 700, 333, 90, 610, 5])
    y = rng.permutation(np.repeat(np.arange(C), counts))
    for eta in (0.2, 0.45, 0.8):
        noisy, rec = ma2020_symmetric_noise(y, eta, C, seed=5)
        for c in range(C):
            changed = int(((y == c) & (noisy != y)).sum())
            assert changed == int(eta * counts[c])
        assert rec.realised_rate == pytest.approx(sum(int(eta * k) for k in counts) / y.size)


def test_ma2020_flips_spread_over_other_classes():
    y = balanced(5000)
    noisy, rec = ma2020_symmetric_noise(y, 0.6, C, seed=2)
    t = np.array(rec.transition)
    assert (np.diag(t) == 2000).all()
    expected = 3000 / (C - 1)
    off = t[~np.eye(C, dtype=bool)]
    assert np.all(np.abs(off - expected) < 5 * math.sqrt(expected))


@pytest.mark.parametrize("eta", [0.1, 0.3, 0.4, 1.0])
def test_asymmetric_changes_only_the_mapping_with_the_right_counts(eta):
    rng = np.random.default_rng(1)
    counts = np.array([400, 410, 420, 430, 440, 450, 460, 470, 480, 490])
    y = rng.permutation(np.repeat(np.arange(C), counts))
    noisy, rec = asymmetric_noise(y, eta, seed=4)
    t = np.array(rec.transition)
    allowed = np.eye(C, dtype=bool)
    for s, d in CIFAR10_ASYMMETRIC_MAP:
        allowed[s, d] = True
    assert (t[~allowed] == 0).all()
    # one-way flips: exactly int(eta * count) each
    for s, d in [(9, 1), (2, 0), (4, 7)]:
        assert t[s, d] == int(eta * counts[s])
    # cat -> dog, then dog -> cat on the labels as they are (cats just made dogs included)
    k_cat = int(eta * counts[3])
    k_dog = int(eta * (counts[5] + k_cat))
    assert (noisy == 3).sum() == counts[3] - k_cat + k_dog
    assert (noisy == 5).sum() == counts[5] + k_cat - k_dog


def test_asymmetric_is_deterministic():
    y = balanced(300)
    a, _ = asymmetric_noise(y, 0.4, seed=1)
    b, _ = asymmetric_noise(y, 0.4, seed=1)
    c, _ = asymmetric_noise(y, 0.4, seed=2)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_record_is_json_serialisable_and_round_trips():
    _, rec = symmetric_noise(torch.arange(100) % C, 0.3, C, seed=9)
    d = json.loads(json.dumps(rec.to_dict()))
    assert NoiseRecord.from_dict(d) == rec
    assert d["seed"] == 9 and len(d["transition"]) == C


def test_apply_noise_dispatches():
    y = balanced(100)
    assert np.array_equal(apply_noise(y, "symmetric", 0.3, C, 1)[0], symmetric_noise(y, 0.3, C, 1)[0])
    assert np.array_equal(apply_noise(y, "ma2020_symmetric", 0.3, C, 1)[0], ma2020_symmetric_noise(y, 0.3, C, 1)[0])
    assert np.array_equal(apply_noise(y, "asymmetric", 0.3, C, 1)[0], asymmetric_noise(y, 0.3, 1)[0])
    # the author's seed is fixed: the seed argument does not apply, and the record says 42
    for seed in (0, 7):
        noisy, rec = apply_noise(y, "author_symmetric", 0.3, C, seed)
        assert np.array_equal(noisy, author_symmetric_noise(y, 0.3, C)[0]) and rec.seed == AUTHOR_NOISE_SEED
    with pytest.raises(ValueError, match="unknown noise type"):
        apply_noise(y, "pairflip", 0.3, C, 1)


@pytest.mark.parametrize("eta", [1.0, -0.1, 1.5, float("nan"), "a"])
def test_symmetric_eta_out_of_range(eta):
    with pytest.raises(ValueError, match="eta"):
        symmetric_noise(balanced(10), eta, C, 0)
    with pytest.raises(ValueError, match="eta"):
        ma2020_symmetric_noise(balanced(10), eta, C, 0)
    with pytest.raises(ValueError, match="eta"):
        author_symmetric_noise(balanced(10), eta, C)


def test_asymmetric_eta_range_includes_one():
    asymmetric_noise(balanced(10), 1.0, 0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        asymmetric_noise(balanced(10), 1.01, 0)


@pytest.mark.parametrize("labels, match", [
    (np.array([0, 1, 10]), "out of range"),
    (np.array([0, -1, 2]), "out of range"),
    (np.array([0.0, 1.0]), "integer"),
    (np.zeros((2, 3), dtype=np.int64), "1-D"),
    ([0, 1, 2], "torch.Tensor or numpy"),
])
def test_bad_labels(labels, match):
    with pytest.raises(ValueError, match=match):
        symmetric_noise(labels, 0.2, C, 0)


def test_bad_num_classes_and_seed():
    with pytest.raises(ValueError, match="num_classes"):
        symmetric_noise(balanced(10), 0.2, 1, 0)
    with pytest.raises(ValueError, match="seed"):
        symmetric_noise(balanced(10), 0.2, C, -1)
    with pytest.raises(ValueError, match="out of range"):
        asymmetric_noise(np.array([0, 12]), 0.2, 0)


# --------------------------------------------------------------------------- the seed paper's author's rule

def authors_procedure(labels: np.ndarray, eta: float, num_classes: int) -> np.ndarray:
    """The author's noise script as the facts describe it (docs/sources.md#the-authors-code), on numpy's
    *global* legacy functions: seed 42, int(eta * N) indices without replacement, then per index, in
    that order, a choice among the other classes in ascending order. The global state is restored."""
    saved = np.random.get_state()
    try:
        np.random.seed(42)
        noisy = labels.copy()
        for i in np.random.choice(len(labels), int(eta * len(labels)), replace=False):
            others = list(range(num_classes))
            others.remove(labels[i])
            noisy[i] = np.random.choice(others)
        return noisy
    finally:
        np.random.set_state(saved)


@pytest.mark.parametrize("n, num_classes, eta", [(3000, 10, 0.2), (3000, 10, 0.6), (1234, 10, 0.8),
                                                 (999, 7, 0.45), (50, 3, 0.0)])
def test_author_noise_is_the_authors_procedure_call_for_call(n, num_classes, eta):
    labels = np.random.default_rng(n + num_classes).integers(0, num_classes, n)
    noisy, rec = author_symmetric_noise(labels, eta, num_classes)
    assert np.array_equal(noisy, authors_procedure(labels, eta, num_classes))
    assert rec.kind == "author_symmetric" and rec.seed == 42 and rec.eta == eta


def test_author_noise_flips_exactly_int_eta_n_never_to_the_clean_label():
    labels = np.random.default_rng(5).integers(0, C, 5003)
    for eta in (0.2, 0.4, 0.6, 0.8, 0.33):
        noisy, rec = author_symmetric_noise(labels, eta, C)
        changed = noisy != labels
        assert changed.sum() == int(eta * labels.size)  # every chosen label moves to another class
        assert rec.realised_rate == int(eta * labels.size) / labels.size
        assert np.trace(np.array(rec.transition)) == labels.size - int(eta * labels.size)


def test_author_noise_sets_are_nested_across_eta():
    labels = np.random.default_rng(6).integers(0, C, 4000)
    flipped = [set(np.flatnonzero(author_symmetric_noise(labels, eta, C)[0] != labels))
               for eta in (0.2, 0.4, 0.6, 0.8)]
    for smaller, larger in zip(flipped, flipped[1:]):
        assert smaller < larger


def test_author_noise_leaves_the_global_rng_alone_and_repeats():
    labels = torch.from_numpy(np.random.default_rng(8).integers(0, C, 800))
    np.random.seed(123)
    state = np.random.get_state()
    a, _ = author_symmetric_noise(labels, 0.5)
    after = np.random.get_state()
    assert after[0] == state[0] and np.array_equal(after[1], state[1]) and after[2:] == state[2:]
    b, _ = author_symmetric_noise(labels, 0.5)
    assert torch.equal(a, b) and a.dtype == labels.dtype  # seed 42 at every call, type kept


# --------------------------------------------------------------------------- exact-count transition matrices (ANL, JAL)

@pytest.mark.parametrize("eta, per_class", [(0.2, 999), (0.4, 1998), (0.6, 2997), (0.8, 3996)])
def test_exact_symmetric_flips_floor_t_ij_n_i_per_class_pair(eta, per_class):
    """5,000 per class: exactly floor(eta * 5000 / 9) samples of each class go to each other class
    (9 * that per class, a little under eta), and the record says the realised rate."""
    y = balanced(5000)
    noisy, rec = apply_noise(y, "exact_symmetric", eta, C, seed=3)
    t = np.array(rec.transition)
    off = t[~np.eye(C, dtype=bool)]
    assert (off == per_class // 9).all()
    assert (np.diag(t) == 5000 - per_class).all()
    assert rec.realised_rate == per_class * C / y.size == float((noisy != y).mean())
    assert rec.kind == "exact_symmetric" and rec.eta == eta and rec.seed == 3


def test_exact_symmetric_counts_follow_each_class_of_an_unbalanced_set():
    counts = np.array([500, 300, 1000, 250, 40, 700, 333, 90, 610, 9])
    y = np.random.default_rng(0).permutation(np.repeat(np.arange(C), counts))
    for eta in (0.3, 0.45, 0.9):
        _, rec = exact_symmetric_noise(y, eta, C, seed=5)
        t = np.array(rec.transition)
        for i in range(C):
            k = math.floor(round(eta / (C - 1) * counts[i], 9))
            assert all(t[i, j] == k for j in range(C) if j != i), (eta, i)
    # an exact product is not floored one below by float error: 0.9 / 9 * 5000 = 500
    _, rec = exact_symmetric_noise(balanced(5000), 0.9, C, seed=0)
    assert np.array(rec.transition)[0, 1] == 500


@pytest.mark.parametrize("eta", [0.1, 0.2, 0.3, 0.4, 1.0])
def test_exact_asymmetric_flips_floor_eta_n_of_each_clean_source_with_no_cascade(eta):
    counts = np.array([400, 410, 420, 430, 440, 450, 460, 470, 480, 490])
    y = np.random.default_rng(1).permutation(np.repeat(np.arange(C), counts))
    noisy, rec = apply_noise(y, "exact_asymmetric", eta, C, seed=4)
    t = np.array(rec.transition)
    expected = np.diag(counts).astype(np.int64)
    for s, d in CIFAR10_ASYMMETRIC_MAP:
        k = math.floor(round(eta * counts[s], 9))
        expected[s, d] += k
        expected[s, s] -= k
    # cat -> dog and dog -> cat each take floor(eta * n) of the clean pool: no cat flips back
    assert np.array_equal(t, expected)
    flips = sum(math.floor(round(eta * counts[s], 9)) for s, _ in CIFAR10_ASYMMETRIC_MAP)
    assert rec.realised_rate == flips / y.size and rec.kind == "exact_asymmetric"


def test_exact_asymmetric_reaches_the_nominal_rate_the_cascading_rule_misses():
    """CIFAR-10's 5,000 per class at eta 0.4: the exact rule flips 5 * 2,000 labels (20 %); the
    cited work's cascading rule flips fewer, since dog's pool holds the cats just made dogs."""
    y = balanced(5000)
    _, exact = exact_asymmetric_noise(y, 0.4, seed=0)
    _, cascade = asymmetric_noise(y, 0.4, seed=0)
    assert exact.realised_rate == 0.2
    assert cascade.realised_rate < 0.2


@pytest.mark.parametrize("kind", ["exact_symmetric", "exact_asymmetric"])
def test_exact_rules_repeat_per_seed_and_leave_the_global_rngs_alone(kind):
    y = torch.from_numpy(balanced(400))
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    a, _ = apply_noise(y, kind, 0.4, C, seed=11)
    after = random.getstate(), np.random.get_state(), torch.get_rng_state()
    assert after[0] == states[0] and torch.equal(after[2], states[2])
    assert after[1][0] == states[1][0] and np.array_equal(after[1][1], states[1][1]) and after[1][2:] == states[1][2:]
    b, _ = apply_noise(y, kind, 0.4, C, seed=11)
    c, _ = apply_noise(y, kind, 0.4, C, seed=12)
    assert torch.equal(a, b) and not torch.equal(a, c) and a.dtype == y.dtype
    assert torch.equal(y, torch.from_numpy(balanced(400)))  # the input is never modified


def test_exact_rules_check_their_arguments():
    with pytest.raises(ValueError, match=r"eta must be in \[0, 1\)"):
        exact_symmetric_noise(balanced(10), 1.0, C, 0)
    exact_asymmetric_noise(balanced(10), 1.0, 0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        exact_asymmetric_noise(balanced(10), 1.01, 0)
    with pytest.raises(ValueError, match="exact_asymmetric noise is the CIFAR-10 mapping"):
        apply_noise(balanced(10) % 5, "exact_asymmetric", 0.2, 5, 0)
    with pytest.raises(ValueError, match="out of range"):
        exact_symmetric_noise(np.array([0, 3]), 0.2, 3, 0)
    with pytest.raises(ValueError, match="seed"):
        exact_symmetric_noise(balanced(10), 0.2, C, -1)
