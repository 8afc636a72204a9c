"""Probability targets and label smoothing through the public entry points, as F.cross_entropy
takes them: CE against F.cross_entropy itself; MAE, RCE and SCE against their one-hot values and
LOSSES.md's "Soft targets" formulas; every undefined combination is a named ValueError.
"""
import pytest
import torch
import torch.nn.functional as F
from conftest import value_and_grad

import apl.fused as fused
from apl import functional as AF
from apl.losses import get_loss
from apl.spec import LABEL_CLAMP, PROB_CLAMP

IGNORE = -100
SHAPES = [(6, 5), (3, 4, 2, 3)]  # (N, C) and a segmentation layout


def batch(shape, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    probs = torch.softmax(torch.randn(shape, generator=g, dtype=torch.float64) * 2, dim=1).to(dtype)
    index_shape = (shape[0], *shape[2:])
    y = torch.randint(0, shape[1], index_shape, generator=g)
    y[torch.rand(index_shape, generator=g) < 0.2] = IGNORE
    y.view(-1)[0] = 0
    return z, probs, y


def assert_matches(got, want, dtype):
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    assert got[0].shape == want[0].shape
    torch.testing.assert_close(got[0], want[0], **tol)
    torch.testing.assert_close(got[1], want[1], **tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_ce_label_smoothing_and_probabilities_match_f_cross_entropy(shape, reduction, weighted, dtype):
    z, probs, y = batch(shape, seed=len(shape), dtype=dtype)
    weight = torch.linspace(0.5, 2.0, shape[1], dtype=dtype) if weighted else None
    for target, smoothing, ignore in ((y, 0.2, IGNORE), (probs, 0.0, -100), (probs, 0.15, -100)):
        def want_fn(a, b):
            return F.cross_entropy(a, b, weight=weight, reduction=reduction, ignore_index=ignore,
                                   label_smoothing=smoothing)
        want = value_and_grad(want_fn, z, target)
        module = get_loss("ce", num_classes=shape[1], label_smoothing=smoothing, reduction=reduction,
                          ignore_index=ignore, weight=weight)
        assert_matches(value_and_grad(module, z, target), want, dtype)
        for fused_flag in (True, False):
            def fn(a, b, fused_flag=fused_flag):
                return AF.ce(a, b, weight=weight, reduction=reduction, ignore_index=ignore,
                             label_smoothing=smoothing, fused=fused_flag)
            assert_matches(value_and_grad(fn, z, target), want, dtype)


def test_unbatched_probabilities_match_f_cross_entropy():
    z, probs, _ = batch((1, 6), seed=3)
    got = AF.ce(z[0], probs[0], reduction="none", label_smoothing=0.1)
    assert got.shape == ()
    torch.testing.assert_close(got, F.cross_entropy(z[0], probs[0], reduction="none", label_smoothing=0.1))


@pytest.mark.parametrize("name, variant", [("mae", "ma2020"), ("mae", "author"), ("rce", "ma2020"),
                                           ("sce", "ma2020")])
def test_one_hot_probabilities_give_the_class_index_loss(name, variant):
    """The extension to probabilities reduces to the loss's definition on one-hot targets."""
    z, _, y = batch((8, 5), seed=4)
    y = y.clamp(min=0)
    one_hot = F.one_hot(y, 5).double()
    fn = getattr(AF, name)
    kwargs = {} if name == "sce" else {"variant": variant}
    by_index = value_and_grad(lambda a, b: fn(a, b, reduction="none", **kwargs), z, y)
    by_probs = value_and_grad(lambda a, b: fn(a, b, reduction="none", **kwargs), z, one_hot)
    torch.testing.assert_close(by_probs, by_index)


def test_soft_mae_and_rce_follow_their_formulas():
    z, probs, _ = batch((7, 4), seed=5)
    p = torch.softmax(z, dim=1)
    torch.testing.assert_close(AF.mae(z, probs, reduction="none"), 0.5 * (p - probs).abs().sum(1))
    torch.testing.assert_close(AF.mae(z, probs, variant="author", reduction="none"), (p - probs).abs().mean(1))
    torch.testing.assert_close(AF.rce(z, probs, reduction="none"),
                               -(p.clamp(PROB_CLAMP, 1) * probs.clamp(LABEL_CLAMP, 1).log()).sum(1))


@pytest.mark.parametrize("name, variant", [("nce", "ma2020"), ("nce", "paper"), ("nfl", "ma2020"),
                                           ("fl", "author"), ("gce", "ma2020"), ("rce", "author"),
                                           ("nce+rce", "ma2020"), ("nfl+mae", "author")])
def test_losses_without_a_soft_definition_reject_probabilities(name, variant):
    z, probs, _ = batch((4, 5), seed=6)
    with pytest.raises(ValueError, match="no principled extension to them: pass class indices"):
        get_loss(name, num_classes=5, variant=variant)(z, probs)


def test_bad_combinations_are_named():
    z, probs, y = batch((4, 5), seed=7)
    with pytest.raises(ValueError, match="ignore_index=3 applies to class-index targets"):
        AF.ce(z, probs, ignore_index=3)
    with pytest.raises(ValueError, match=r"probability targets must have the logits' shape \(4, 5\), got \(4, 4\)"):
        AF.ce(z, probs[:, :4])
    with pytest.raises(ValueError, match=r"probability targets must have the logits' shape \(2, 5, 3\)"):
        AF.ce(torch.randn(2, 5, 3), torch.rand(2, 3, 5))
    with pytest.raises(ValueError, match="label_smoothing is defined for ce alone"):
        get_loss("nce+rce", label_smoothing=0.1)
    with pytest.raises(ValueError, match="label_smoothing is defined for ce alone"):
        get_loss("sce", label_smoothing=0.1)
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\], got 1.5"):
        AF.ce(z, y, label_smoothing=1.5)
    with pytest.raises(ValueError, match="per-class weights with probability targets are defined for ce alone"):
        AF.mae(z, probs, weight=torch.ones(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="backend='fused' was requested but the fused operator takes class-index"):
        get_loss("ce", num_classes=5, backend="fused")(z, probs)
    if fused.is_available():
        with pytest.raises(ValueError, match="the fused operator has no label smoothing"):
            get_loss("ce", num_classes=5, backend="fused", label_smoothing=0.1)(z, y)


def test_soft_targets_and_smoothing_compile_without_graph_breaks():
    z, probs, y = batch((3, 4, 2, 3), seed=8)
    for module, target in ((get_loss("ce", num_classes=4, label_smoothing=0.1), y),
                           (get_loss("sce", num_classes=4), probs)):
        compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(value_and_grad(compiled, z, target), value_and_grad(module, z, target))
