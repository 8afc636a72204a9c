"""Tests of the reference losses (apl.losses.reference), the functional API and the loss modules.

Expected values come from computations written independently of apl.losses: plain `math`
on hand-sized cases, numpy, literal formulas from LOSSES.md with torch.softmax, or
properties (symmetry, equivalence with F.cross_entropy, subset equivalence for ignore_index).
"""
import inspect
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import LOSS_CASES, random_batch

import apl.losses as L
import apl.losses.functional as AF
from apl.losses import APLLoss, available_losses, compute_loss, get_loss, reference_loss
from apl.losses.spec import APL_NAMES, LOSS_NAMES, RCE_A, VARIANTS, Kind, LossSpec, spec_for

ALL = [(name, variant) for name in APL_NAMES for variant in VARIANTS]  # the successors: tests/test_successors.py
REDUCTIONS = ("mean", "sum", "none")
# Kinds whose weights are detached: autograd's gradient is not the numerical derivative.
DETACHED = {("fl", "ma2020"), ("nfl", "ma2020"), ("nfl+mae", "ma2020"), ("nfl+rce", "ma2020")}


def ref(name, logits, target, variant="ma2020", reduction="mean", ignore_index=-100, **params):
    """The reference loss of a named loss."""
    return reference_loss(logits, target, spec_for(name, variant=variant, **params),
                          reduction=reduction, ignore_index=ignore_index)


def functional_of(name):
    """apl.functional's function for a loss name ('+' and '-' spelled '_')."""
    return getattr(AF, name.replace("+", "_").replace("-", "_"))


def call_functional(name, logits, target, variant, **kw):
    """Call the functional form, passing `variant` only where the function takes it."""
    fn = functional_of(name)
    if "variant" in inspect.signature(fn).parameters:
        kw["variant"] = variant
    return fn(logits, target, fused=False, **kw)


def logits_and_targets(n, c, seed=0, scale=1.0, dtype=torch.float64):
    return random_batch(n, c, seed, dtype=dtype, scale=scale)


# ----------------------------------------------------------------------------- hand values

def _hand_values(z, y, q=0.7):
    """Per-loss values for one row, from math on the softmax (LOSSES.md's table, by hand).
    The focal exponent is each variant's default: 0.5 for ma2020, 2 for paper and author."""
    s = sum(math.exp(v) for v in z)
    p = [math.exp(v) / s for v in z]
    c = len(z)
    ce = -math.log(p[y])
    mae = 1 - p[y]
    rce = RCE_A * sum(max(pk, 1e-7) for k, pk in enumerate(p) if k != y)
    gce = (1 - max(p[y], 1e-7) ** q) / q
    out = {}
    for v, gamma in (("ma2020", 0.5), ("paper", 2.0), ("author", 2.0)):
        w = [(1 - pk) ** gamma for pk in p]
        fl = w[y] * ce
        out.update({("ce", v): ce, ("fl", v): fl, ("gce", v): gce, ("sce", v): 0.1 * ce + rce})
        if v == "ma2020":
            out[("nce", v)] = math.log(p[y]) / sum(math.log(pk) for pk in p)
            out[("nfl", v)] = w[y] * math.log(p[y]) / sum(wk * math.log(pk) for wk, pk in zip(w, p))
        else:
            out[("nce", v)] = ce / math.log(c)  # one row: H = 0 -> ln C
            out[("nfl", v)] = fl / w[y]  # one row: B = w_y
        if v == "author":  # mean |p - onehot| over the C entries; RCE against the smoothed target
            out[("mae", v)] = sum(abs(pk - (k == y)) for k, pk in enumerate(p)) / c
            out[("rce", v)] = -sum(pk * math.log(0.9 if k == y else 0.1 / (c - 1)) for k, pk in enumerate(p))
        else:
            out[("mae", v)], out[("rce", v)] = mae, rce
        lam = {"ma2020": None, "paper": 0.6, "author": 0.4}[v]
        for act in ("nce", "nfl"):
            for pas in ("mae", "rce"):
                a, b = (1.0, 1.0) if lam is None else (lam, 1 - lam)
                out[(f"{act}+{pas}", v)] = a * out[(act, v)] + b * out[(pas, v)]
    return out


@pytest.mark.parametrize("row, y", [([2.0, 0.0, -1.0], 0), ([2.0, 0.0, -1.0], 2),
                                    ([0.3, -0.2, 1.1, 0.0, -2.0], 3)])
@pytest.mark.parametrize("name, variant", ALL)
def test_hand_computed_single_row(name, variant, row, y):
    expected = _hand_values(row, y)[(name, variant)]
    got = ref(name, torch.tensor([row], dtype=torch.float64), torch.tensor([y]), variant)
    assert got.item() == pytest.approx(expected, rel=1e-12, abs=1e-14)


def test_hand_computed_two_rows_paper_forms():
    z = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    t = torch.tensor([0, 2])
    ce = [math.log(math.exp(2) + 1 + math.exp(-1)) - 2, math.log(2 + math.e)]
    p_y = [math.exp(-v) for v in ce]
    w = [(1 - p) ** 2 for p in p_y]  # the paper form's default gamma
    assert ref("nce", z, t, "paper").item() == pytest.approx(sum(ce) / 2 / math.log(2), rel=1e-12)
    assert ref("nfl", z, t, "paper").item() == pytest.approx(
        (w[0] * ce[0] + w[1] * ce[1]) / (w[0] + w[1]), rel=1e-12)


# ----------------------------------------------------------------------------- symmetry

@pytest.mark.parametrize("c", [2, 3, 10, 50])
@pytest.mark.parametrize("scale", [1.0, 5.0, 1e3])
def test_ma2020_nce_and_nfl_sum_to_one_over_labels(c, scale):
    z, _ = logits_and_targets(7, c, seed=c, scale=scale)
    for name, gamma in (("nce", 0.5), ("nfl", 0.0), ("nfl", 0.5), ("nfl", 2.0)):
        total = sum(ref(name, z, torch.full((7,), k), reduction="none", gamma=gamma) for k in range(c))
        torch.testing.assert_close(total, torch.ones(7, dtype=torch.float64), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("c", [2, 3, 10])
def test_mae_and_rce_sums_over_labels(c):
    z, _ = logits_and_targets(5, c, seed=c + 1)
    mae_total = sum(ref("mae", z, torch.full((5,), k), reduction="none") for k in range(c))
    torch.testing.assert_close(mae_total, torch.full((5,), c - 1.0, dtype=torch.float64))
    # No probability is below the clamp here, so RCE sums to A * (C - 1).
    assert torch.softmax(z, 1).min() > 1e-6
    rce_total = sum(ref("rce", z, torch.full((5,), k), reduction="none") for k in range(c))
    torch.testing.assert_close(rce_total, torch.full((5,), RCE_A * (c - 1), dtype=torch.float64))


def test_rce_sum_over_labels_with_the_clamp_active():
    # p_3 ~ 4e-18 is raised to 1e-7, so the sum is A * (C-1) * sum_k max(p_k, 1e-7) > A * (C-1).
    z = torch.tensor([[20.0, 0.0, 0.0, -20.0]], dtype=torch.float64)
    p = np.exp(z.numpy()[0]) / np.exp(z.numpy()[0]).sum()
    expected = RCE_A * 3 * np.maximum(p, 1e-7).sum()
    total = sum(ref("rce", z, torch.tensor([k]), reduction="none") for k in range(4))
    assert total.item() == pytest.approx(expected, rel=1e-12)
    assert total.item() > RCE_A * 3


# ----------------------------------------------------------------------------- paper forms

def _entropy_of_labels(t, c):
    counts = np.bincount(t, minlength=c).astype(np.float64)
    pi = counts[counts > 0] / counts.sum()
    return float(-(pi * np.log(pi)).sum())


def test_nce_paper_is_mean_ce_over_label_entropy():
    z, t = logits_and_targets(32, 10, seed=3)
    h = _entropy_of_labels(t.numpy(), 10)
    expected = F.cross_entropy(z, t).item() / h
    assert ref("nce", z, t, "paper").item() == pytest.approx(expected, rel=1e-12)


def test_nce_paper_entropy_ignores_ignored_rows():
    z, t = logits_and_targets(12, 4, seed=4)
    t[[1, 5, 6]] = -100
    keep = t != -100
    h = _entropy_of_labels(t[keep].numpy(), 4)
    expected = F.cross_entropy(z[keep], t[keep]).item() / h
    assert ref("nce", z, t, "paper").item() == pytest.approx(expected, rel=1e-12)


def test_nce_paper_single_class_batch_uses_ln_c():
    z, _ = logits_and_targets(6, 7, seed=5)
    t = torch.full((6,), 3)
    expected = F.cross_entropy(z, t).item() / math.log(7)
    assert ref("nce", z, t, "paper").item() == pytest.approx(expected, rel=1e-12)
    # A one-sample batch is the typical case of H = 0.
    assert ref("nce", z[:1], t[:1], "paper").item() == pytest.approx(
        F.cross_entropy(z[:1], t[:1]).item() / math.log(7), rel=1e-12)


def _nfl_paper_literal(z, t, gamma):
    """The paper's Sec. 2.3 NFL written out: mean focal loss over mean focal weight."""
    p_y = torch.softmax(z, 1).gather(1, t[:, None]).squeeze(1)
    w = (1 - p_y) ** gamma
    return (-(w * torch.log(p_y))).mean() / w.mean()


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_nfl_paper_matches_the_literal_formula_value_and_gradient(gamma):
    z, t = logits_and_targets(16, 10, seed=6, scale=2.0)
    z1, z2 = z.clone().requires_grad_(), z.clone().requires_grad_()
    got = ref("nfl", z1, t, "paper", gamma=gamma)
    expected = _nfl_paper_literal(z2, t, gamma)
    assert got.item() == pytest.approx(expected.item(), rel=1e-12)
    g1, = torch.autograd.grad(got, z1)
    g2, = torch.autograd.grad(expected, z2)
    torch.testing.assert_close(g1, g2, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dtype, big", [(torch.float64, 1000.0), (torch.float32, 150.0)])
def test_nfl_paper_all_certain_batch_gives_zero_loss_and_gradient(dtype, big):
    # Every p_y is exactly 1 in floating point: B = 0, the loss and its gradient are 0.
    z = torch.tensor([[big, 0.0, 0.0], [0.0, big, 0.0]], dtype=dtype, requires_grad=True)
    t = torch.tensor([0, 1])
    assert torch.all(torch.softmax(z, 1).gather(1, t[:, None]) == 1)
    for reduction in REDUCTIONS:
        loss = ref("nfl", z, t, "paper", reduction=reduction)
        assert torch.all(loss == 0)
        g, = torch.autograd.grad(loss.sum(), z)
        assert torch.all(g == 0)


@pytest.mark.parametrize("name", ["nce", "nfl", "nce+rce", "nfl+mae"])
def test_paper_forms_reduction_none_mean_and_sum_agree(name):
    z, t = logits_and_targets(20, 5, seed=7)
    t[[0, 9]] = -100
    none = ref(name, z, t, "paper", reduction="none")
    assert none.shape == (20,) and none[0] == 0 and none[9] == 0
    mean = ref(name, z, t, "paper", reduction="mean")
    total = ref(name, z, t, "paper", reduction="sum")
    assert none.sum().item() / 18 == pytest.approx(mean.item(), rel=1e-12)
    assert total.item() == pytest.approx(none.sum().item(), rel=1e-12)


def test_paper_apl_weights_default_to_lambda_0_6():
    z, t = logits_and_targets(9, 4, seed=8)
    got = ref("nfl+rce", z, t, "paper")
    expected = 0.6 * ref("nfl", z, t, "paper") + 0.4 * ref("rce", z, t)
    assert got.item() == pytest.approx(expected.item(), rel=1e-12)
    got = ref("nce+mae", z, t, "ma2020")
    assert got.item() == pytest.approx((ref("nce", z, t) + ref("mae", z, t)).item(), rel=1e-12)


# ----------------------------------------------------------------------------- gradients

DIFFERENTIABLE = [nv for nv in ALL if nv not in DETACHED]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name, variant", DIFFERENTIABLE)
def test_gradcheck(name, variant, reduction):
    z, t = logits_and_targets(5, 3, seed=9)
    t[2] = -100  # an ignored row must not change the gradient's correctness
    z.requires_grad_()
    spec = spec_for(name, variant=variant)
    assert torch.autograd.gradcheck(
        lambda x: reference_loss(x, t, spec, reduction=reduction), (z,), eps=1e-6, atol=1e-7)


def _frozen_weight_loss(z, t, w, normalised):
    """FL / NFL (ma2020) with the focal weights w (N, C) taken as constants."""
    log_p = torch.log_softmax(z, 1)
    own = (w * log_p).gather(1, t[:, None]).squeeze(1)
    return (own / (w * log_p).sum(1) if normalised else -own).mean()


@pytest.mark.parametrize("gamma", [0.5, 2.0])
@pytest.mark.parametrize("name", ["fl", "nfl"])
def test_detached_weight_gradients(name, gamma):
    z, t = logits_and_targets(6, 4, seed=10, scale=2.0)
    w = ((1 - torch.softmax(z, 1)) ** gamma).detach()
    z1, z2 = z.clone().requires_grad_(), z.clone().requires_grad_()
    got, = torch.autograd.grad(ref(name, z1, t, "ma2020", gamma=gamma), z1)
    expected, = torch.autograd.grad(_frozen_weight_loss(z2, t, w, name == "nfl"), z2)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    # The differentiable FL's gradient differs: it flows through the weight.
    if name == "fl":
        z3 = z.clone().requires_grad_()
        other, = torch.autograd.grad(ref("fl", z3, t, "paper", gamma=gamma), z3)
        assert not torch.allclose(got, other)


@pytest.mark.parametrize("passive", ["mae", "rce"])
def test_detached_apl_sum_gradient_is_sum_of_term_gradients(passive):
    z, t = logits_and_targets(6, 4, seed=11)
    grads = []
    for parts in ([f"nfl+{passive}"], ["nfl", passive]):
        x = z.clone().requires_grad_()
        grads.append(torch.autograd.grad(sum(ref(n, x, t) for n in parts), x)[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------- confident predictions

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name, variant", ALL)
def test_confident_predictions_are_finite(name, variant, dtype):
    for scale in (1e2, 1e3, 1e4):
        z, _ = logits_and_targets(6, 10, seed=12, scale=scale, dtype=dtype)
        top = z.argmax(1)
        for t in (top, (top + 1) % 10, torch.where(torch.arange(6) % 2 == 0, top, (top + 3) % 10)):
            for reduction in REDUCTIONS:
                x = z.clone().requires_grad_()
                loss = ref(name, x, t, variant, reduction=reduction)
                g, = torch.autograd.grad(loss.sum(), x)
                assert torch.isfinite(loss).all(), (scale, reduction, loss)
                assert torch.isfinite(g).all(), (scale, reduction)


def test_gce_clamp_below_1e_minus_7():
    # p_y ~ e^-30 < 1e-7: the value uses p_y = 1e-7 and the clamped p_y passes no gradient.
    z = torch.tensor([[0.0, 30.0, 0.0]], dtype=torch.float64, requires_grad=True)
    loss = ref("gce", z, torch.tensor([0]), q=0.5)
    assert loss.item() == pytest.approx((1 - 1e-7 ** 0.5) / 0.5, rel=1e-12)
    g, = torch.autograd.grad(loss, z)
    assert torch.all(g == 0)


def test_rce_clamped_probabilities_pass_no_gradient():
    # p_2 ~ e^-40 is clamped to 1e-7; only p_1 (unclamped) carries gradient:
    # d(A p_1)/dz_j = A p_1 ([j = 1] - p_j).
    z = torch.tensor([[0.0, 0.0, -40.0]], dtype=torch.float64, requires_grad=True)
    loss = ref("rce", z, torch.tensor([0]))
    p = torch.softmax(z.detach(), 1)[0]
    assert loss.item() == pytest.approx(RCE_A * (p[1].item() + 1e-7), rel=1e-12)
    g, = torch.autograd.grad(loss, z)
    expected = RCE_A * p[1] * (torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64) - p)
    torch.testing.assert_close(g[0], expected, rtol=1e-12, atol=1e-20)


@pytest.mark.parametrize("name, variant", ALL)
def test_nan_logits_give_nan(name, variant):
    z, t = logits_and_targets(4, 5, seed=13)
    t[1], t[2] = 0, 0
    z[1, 3] = float("nan")   # NaN elsewhere than the target
    z[2, 0] = float("nan")   # NaN at the target
    none = ref(name, z, t, variant, reduction="none")
    assert torch.isnan(none[1]) and torch.isnan(none[2])
    assert torch.isnan(ref(name, z, t, variant))
    assert torch.isnan(ref(name, z, t, variant, reduction="sum"))


# ----------------------------------------------------------------------------- ignore_index

@pytest.mark.parametrize("ignore_index", [-100, 2])
@pytest.mark.parametrize("name, variant", ALL)
def test_ignored_rows_are_skipped(name, variant, ignore_index):
    z, t = logits_and_targets(10, 4, seed=14)
    t[[0, 3, 4]] = ignore_index
    keep = t != ignore_index
    assert 0 < keep.sum() < 10
    sub_z, sub_t = z[keep], t[keep]
    for reduction in REDUCTIONS:
        x = z.clone().requires_grad_()
        got = ref(name, x, t, variant, reduction=reduction, ignore_index=ignore_index)
        xs = sub_z.clone().requires_grad_()
        expected = ref(name, xs, sub_t, variant, reduction=reduction, ignore_index=ignore_index)
        if reduction == "none":
            assert torch.all(got[~keep] == 0)
            torch.testing.assert_close(got[keep], expected, rtol=1e-12, atol=1e-14)
        else:
            torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)
        g, = torch.autograd.grad(got.sum(), x)
        gs, = torch.autograd.grad(expected.sum(), xs)
        assert torch.all(g[~keep] == 0)
        torch.testing.assert_close(g[keep], gs, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name, variant", ALL)
def test_all_rows_ignored(name, variant):
    z, _ = logits_and_targets(3, 4, seed=15)
    t = torch.full((3,), -100)
    x = z.clone().requires_grad_()
    assert torch.isnan(ref(name, x, t, variant))
    total = ref(name, x, t, variant, reduction="sum")
    assert total.item() == 0
    g, = torch.autograd.grad(total, x)
    assert torch.all(g == 0)
    assert torch.all(ref(name, x, t, variant, reduction="none") == 0)


@pytest.mark.parametrize("name, variant", ALL)
def test_empty_batch_behaves_like_cross_entropy(name, variant):
    z, t = torch.zeros(0, 5, requires_grad=True), torch.zeros(0, dtype=torch.long)
    assert torch.isnan(ref(name, z, t, variant)) and torch.isnan(F.cross_entropy(z, t))
    assert ref(name, z, t, variant, reduction="sum").item() == 0
    assert ref(name, z, t, variant, reduction="none").shape == (0,)


@pytest.mark.parametrize("ignore_index", [-100, 1])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_ce_matches_torch_cross_entropy(reduction, ignore_index):
    z, t = logits_and_targets(12, 6, seed=16, scale=3.0)
    t[[2, 7]] = ignore_index
    x1, x2 = z.clone().requires_grad_(), z.clone().requires_grad_()
    got = ref("ce", x1, t, reduction=reduction, ignore_index=ignore_index)
    expected = F.cross_entropy(x2, t, reduction=reduction, ignore_index=ignore_index)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)
    weights = torch.linspace(0.5, 2.0, got.numel(), dtype=torch.float64).reshape(got.shape)
    g1, = torch.autograd.grad((got * weights).sum(), x1)
    g2, = torch.autograd.grad((expected * weights).sum(), x2)
    torch.testing.assert_close(g1, g2, rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------- bad input

def _module_call(z, t, **kw):
    return get_loss("nce+rce", num_classes=None, backend="reference", **kw)(z, t)


def _functional_call(z, t, **kw):
    return AF.nce_rce(z, t, fused=False, **kw)


def _reference_call(z, t, **kw):
    return reference_loss(z, t, spec_for("nce+rce"), **kw)


CALLERS = [_reference_call, _functional_call, _module_call]
GOOD_Z = torch.zeros(4, 3)
GOOD_T = torch.tensor([0, 1, 2, 1])


@pytest.mark.parametrize("call", CALLERS)
@pytest.mark.parametrize("z, t, match", [
    (GOOD_Z, torch.tensor([0, 1, 3, 1]), r"target 3 is out of range for C=3"),
    (GOOD_Z, torch.tensor([0, -1, 2, 1]), r"target -1 is out of range"),
    (GOOD_Z, GOOD_T.float(), r"target must be an integer tensor"),
    (torch.zeros(4, 3, 2), GOOD_T, r"target of shape \(4,\) does not match logits of shape \(4, 3, 2\)"),
    (GOOD_Z, GOOD_T[:3], r"N=4 rows but target has 3"),
    (torch.zeros(4, 1), torch.zeros(4, dtype=torch.long), r"at least 2 classes"),
    (torch.zeros(4, 3, dtype=torch.long), GOOD_T, r"floating"),
    (GOOD_Z, GOOD_T[:, None], r"target must be 1-D"),
])
def test_bad_tensors_raise_value_error(call, z, t, match):
    with pytest.raises(ValueError, match=match):
        call(z, t)


@pytest.mark.parametrize("call", CALLERS)
def test_bad_options_raise_value_error(call):
    with pytest.raises(ValueError, match="reduction must be one of"):
        call(GOOD_Z, GOOD_T, reduction="average")
    with pytest.raises(ValueError, match="ignore_index must be an int"):
        call(GOOD_Z, GOOD_T, ignore_index=1.5)


def test_bad_loss_construction_raises_value_error():
    with pytest.raises(ValueError, match=r"unknown loss 'xyz'"):
        get_loss("xyz")
    with pytest.raises(ValueError, match=r"unknown loss 'nce\+xyz'"):
        APLLoss("nce+xyz")
    with pytest.raises(ValueError, match=r"unknown loss parameter\(s\) \['foo'\]"):
        get_loss("nce", foo=1)
    with pytest.raises(ValueError, match="either lam .* or alpha/beta"):
        get_loss("nce+rce", lam=0.5, alpha=1.0)
    with pytest.raises(ValueError, match="either lam .* or alpha/beta"):
        AF.nce_rce(GOOD_Z, GOOD_T, lam=0.5, beta=1.0, fused=False)
    with pytest.raises(ValueError, match="unknown variant 'ma'"):
        get_loss("nfl", variant="ma")
    with pytest.raises(ValueError, match="backend must be one of"):
        get_loss("ce", backend="cuda")
    with pytest.raises(ValueError, match="num_classes must be an int >= 2"):
        get_loss("ce", num_classes=1)
    with pytest.raises(ValueError, match=r"parameters \['gamma'\] were given with a LossSpec"):
        APLLoss(spec_for("nfl"), gamma=2.0)
    with pytest.raises(ValueError, match="spec must be an apl.losses.spec.LossSpec"):
        reference_loss(GOOD_Z, GOOD_T, "nce")
    for backend in L.BACKENDS:
        with pytest.raises(ValueError, match="spec must be an apl.losses.spec.LossSpec"):
            compute_loss(GOOD_Z, GOOD_T, "nce", backend=backend)
    with pytest.raises(ValueError, match="backend must be one of"):
        compute_loss(GOOD_Z, GOOD_T, spec_for("ce"), backend="gpu")


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_num_classes_mismatch_raises_value_error(backend):
    with pytest.raises(ValueError, match="C=3 classes but the loss was built for 10"):
        get_loss("nce+rce", backend=backend)(GOOD_Z, GOOD_T)
    with pytest.raises(ValueError, match="C=3 classes but the loss was built for 10"):  # unbatched (C,)
        get_loss("nce+rce", backend=backend)(GOOD_Z[0], GOOD_T[0])
    with pytest.raises(ValueError, match="unbatched logits of shape"):
        get_loss("nce+rce", num_classes=3, backend=backend)(GOOD_Z[0], GOOD_T[:1])


# ----------------------------------------------------------------------------- modules

def test_registry_lists_every_loss():
    assert available_losses() == LOSS_NAMES
    assert set(L.LOSSES) == set(LOSS_NAMES)


@pytest.mark.parametrize("name, variant", LOSS_CASES)
def test_get_loss_matches_functional_and_reference(name, variant):
    z, t = logits_and_targets(8, 10, seed=17)
    t[5] = -100
    for reduction in REDUCTIONS:
        module = get_loss(name, variant=variant, reduction=reduction, backend="reference")
        assert isinstance(module, APLLoss) and isinstance(module, torch.nn.Module)
        got = module(z, t)
        fn = call_functional(name, z, t, variant, reduction=reduction)
        expected = ref(name, z, t, variant, reduction=reduction)
        assert got.shape == ((8,) if reduction == "none" else ())
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        torch.testing.assert_close(fn, expected, rtol=0, atol=0)


def test_module_reductions_are_consistent():
    z, t = logits_and_targets(9, 10, seed=18)
    t[[1, 2]] = -100
    none = get_loss("nfl+rce", reduction="none", backend="reference")(z, t)
    total = get_loss("nfl+rce", reduction="sum", backend="reference")(z, t)
    mean = get_loss("nfl+rce", backend="reference")(z, t)
    assert total.item() == pytest.approx(none.sum().item(), rel=1e-12)
    assert mean.item() == pytest.approx(none.sum().item() / 7, rel=1e-12)


def test_module_parameters_reach_the_spec():
    m = get_loss("NFL_RCE", variant="paper", gamma=2.0, lam=0.3, backend="reference")
    assert m.spec == LossSpec(Kind.NFL_PAPER, Kind.RCE, 0.3, 0.7, gamma=2.0)
    assert "NFL_PAPER" in repr(m) and "gamma=2" in repr(m) and "beta=0.7" in repr(m)
    assert get_loss("sce", alpha=0.5, beta=2.0).spec == LossSpec(Kind.CE, Kind.RCE, 0.5, 2.0)
    assert get_loss("gce", q=0.4).spec.q == 0.4
    assert get_loss("nce", alpha=10.0).spec.alpha == 10.0
    assert L.NCERCELoss(variant="paper").spec == spec_for("nce+rce", variant="paper")
    assert APLLoss(spec_for("nfl")).spec == spec_for("nfl")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name, variant", LOSS_CASES)
def test_low_precision_inputs(name, variant, dtype):
    z, t = logits_and_targets(16, 10, seed=19, scale=2.0, dtype=dtype)
    x = z.clone().requires_grad_()
    for reduction in ("mean", "none"):
        got = get_loss(name, variant=variant, reduction=reduction, backend="reference")(x, t)
        assert got.dtype == dtype
        expected = ref(name, z.float(), t, variant, reduction=reduction)
        tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
        torch.testing.assert_close(got.float(), expected, rtol=tol, atol=tol)
    g, = torch.autograd.grad(got.float().sum(), x)
    assert g.dtype == dtype and torch.isfinite(g).all()


@pytest.mark.parametrize("reduction, shape", [("none", (6,)), ("mean", ()), ("sum", ())])
@pytest.mark.parametrize("name, variant", ALL)
def test_reference_on_meta_tensors(name, variant, reduction, shape):
    """Meta tensors hold no values: the reference skips its target range check and gives the
    output's shape and dtype, as the fused operator does."""
    z = torch.empty(6, 9, device="meta", dtype=torch.bfloat16)
    t = torch.empty(6, device="meta", dtype=torch.int64)
    out = reference_loss(z, t, spec_for(name, variant=variant), reduction=reduction,
                         weight=torch.empty(9, device="meta"))
    assert out.device.type == "meta" and out.shape == shape and out.dtype == torch.bfloat16


@pytest.mark.parametrize("name, variant", [("nce+rce", "ma2020"), ("nfl", "paper"), ("ce", "ma2020")])
def test_float32_stays_float32_and_matches_float64(name, variant):
    z, t = logits_and_targets(16, 10, seed=20, scale=3.0)
    got = ref(name, z.float(), t, variant)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(ref(name, z, t, variant).item(), rel=1e-5)


# --------------------------------------------------------------------------- per-class weights

@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_weighted_ce_matches_torch_cross_entropy(reduction):
    """The reference's per-class weights are F.cross_entropy's: rows scaled by their target's
    weight, 'mean' over the sum of the non-ignored rows' weights; value and gradient."""
    g = torch.Generator().manual_seed(11)
    z1 = torch.randn(40, 7, generator=g, dtype=torch.float64, requires_grad=True)
    z2 = z1.detach().clone().requires_grad_()
    t = torch.randint(0, 7, (40,), generator=g)
    t[::5] = -100
    w = torch.rand(7, generator=g, dtype=torch.float64) * 3
    got = reference_loss(z1, t, spec_for("ce"), reduction=reduction, weight=w)
    want = F.cross_entropy(z2, t, weight=w, reduction=reduction)
    torch.testing.assert_close(got, want)
    got.sum().backward()
    want.sum().backward()
    torch.testing.assert_close(z1.grad, z2.grad)


@pytest.mark.parametrize("name,variant", [("nce+rce", "ma2020"), ("nfl+mae", "paper"), ("nce", "paper")])
def test_weighted_loss_is_the_weighted_mean_of_row_losses(name, variant):
    """For any loss: 'mean' with weights = sum_i w[y_i] l_i / sum_i w[y_i] with l_i the
    unweighted 'none' rows (the paper forms' batch statistics stay unweighted)."""
    g = torch.Generator().manual_seed(12)
    z = torch.randn(30, 6, generator=g, dtype=torch.float64)
    t = torch.randint(0, 6, (30,), generator=g)
    t[3] = -100
    w = torch.rand(6, generator=g, dtype=torch.float64) + 0.1
    rows = ref(name, z, t, variant, reduction="none")
    valid = t != -100
    wy = torch.where(valid, w[t.clamp(min=0)], torch.zeros(()))
    torch.testing.assert_close(
        reference_loss(z, t, spec_for(name, variant=variant), reduction="none", weight=w), rows * wy)
    torch.testing.assert_close(
        reference_loss(z, t, spec_for(name, variant=variant), reduction="mean", weight=w),
        (rows * wy).sum() / wy.sum())


def test_weight_through_functional_and_modules():
    """`weight=` reaches the loss from apl.functional and from the modules, where it is a
    buffer: saved in the state_dict and moved by .to()."""
    g = torch.Generator().manual_seed(13)
    z = torch.randn(16, 10, generator=g)
    t = torch.randint(0, 10, (16,), generator=g)
    w = torch.rand(10, generator=g) + 0.5
    want = reference_loss(z, t, spec_for("nce+rce"), weight=w)
    torch.testing.assert_close(AF.nce_rce(z, t, weight=w, fused=False), want)
    module = get_loss("nce+rce", weight=w, backend="reference")
    torch.testing.assert_close(module(z, t), want)
    assert torch.equal(module.state_dict()["weight"], w) and "weighted=True" in repr(module)
    w.mul_(2)  # the module keeps its own copy
    torch.testing.assert_close(module(z, t), want)
    module = module.to(torch.float64)
    assert module.weight.dtype == torch.float64
    torch.testing.assert_close(module(z.double(), t), reference_loss(z.double(), t, spec_for("nce+rce"),
                                                                     weight=w.double() / 2))
    assert get_loss("ce").weight is None


def test_bad_weights_raise_value_error():
    z, t = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    for w, match in [(torch.ones(4), "one entry per class"), ([1.0, 1.0, 1.0], "must be a torch.Tensor"),
                     (torch.ones(3, dtype=torch.int64), "floating"),
                     (torch.ones(3, requires_grad=True), "must not require grad")]:
        with pytest.raises(ValueError, match=match):
            reference_loss(z, t, spec_for("ce"), weight=w)
    with pytest.raises(ValueError, match="weight has 4 entries but num_classes=3"):
        get_loss("ce", num_classes=3, weight=torch.ones(4))
    with pytest.raises(ValueError, match="1-D floating tensor"):
        APLLoss("ce", weight=torch.ones(3, dtype=torch.int64))
