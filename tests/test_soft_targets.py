"""Probability targets and label smoothing through the public entry points, as F.cross_entropy
takes them, on both backends: CE against F.cross_entropy itself; MAE, RCE and SCE against their
one-hot values and LOSSES.md's "Soft targets" formulas; the fused operator's distribution path
against the reference over shapes, dtypes and devices, opcheck and the step plan; every undefined
combination is a named ValueError.
"""
import itertools

import pytest
import torch
import torch.nn.functional as F
from conftest import BACKENDS, op_args, requires_fused, value_and_grad

import apl.functional as AF
import apl.losses.fused as fused
from apl.losses import get_loss
from apl.losses.reference import reference_loss
from apl.losses.spec import LABEL_CLAMP, PROB_CLAMP, SOFT_TARGET_KINDS, Kind, LossSpec

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


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name, variant", [("mae", "ma2020"), ("mae", "author"), ("rce", "ma2020"),
                                           ("sce", "ma2020")])
def test_one_hot_probabilities_give_the_class_index_loss(name, variant, backend):
    """The extension to probabilities reduces to the loss's definition on one-hot targets."""
    z, _, y = batch((8, 5), seed=4)
    y = y.clamp(min=0)
    one_hot = F.one_hot(y, 5).double()
    kwargs = {} if name == "sce" else {"variant": variant}
    module = get_loss(name, num_classes=5, reduction="none", backend=backend, **kwargs)
    torch.testing.assert_close(value_and_grad(module, z, one_hot), value_and_grad(module, z, y))


@pytest.mark.parametrize("backend", BACKENDS)
def test_soft_mae_and_rce_follow_their_formulas(backend):
    z, probs, _ = batch((7, 4), seed=5)
    p = torch.softmax(z, dim=1)

    def loss(name, **kwargs):
        return get_loss(name, num_classes=4, reduction="none", backend=backend, **kwargs)(z, probs)
    torch.testing.assert_close(loss("mae"), 0.5 * (p - probs).abs().sum(1))
    torch.testing.assert_close(loss("mae", variant="author"), (p - probs).abs().mean(1))
    torch.testing.assert_close(loss("rce"), -(p.clamp(PROB_CLAMP, 1) * probs.clamp(LABEL_CLAMP, 1).log()).sum(1))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name, variant", [("nce", "ma2020"), ("nce", "paper"), ("nfl", "ma2020"),
                                           ("fl", "author"), ("gce", "ma2020"), ("rce", "author"),
                                           ("nce+rce", "ma2020"), ("nfl+mae", "author")])
def test_losses_without_a_soft_definition_reject_probabilities(name, variant, backend):
    z, probs, _ = batch((4, 5), seed=6)
    with pytest.raises(ValueError, match="no principled extension to them: pass class indices"):
        get_loss(name, num_classes=5, variant=variant, backend=backend)(z, probs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_combinations_are_named(backend):
    z, probs, y = batch((4, 5), seed=7)

    def ce(**kwargs):
        return get_loss("ce", num_classes=None, backend=backend, **kwargs)
    with pytest.raises(ValueError, match="ignore_index=3 applies to class-index targets"):
        ce(ignore_index=3)(z, probs)
    with pytest.raises(ValueError, match=r"probability targets must have the logits' shape \(4, 5\), got \(4, 4\)"):
        ce()(z, probs[:, :4])
    with pytest.raises(ValueError, match=r"probability targets must have the logits' shape \(2, 5, 3\)"):
        ce()(torch.randn(2, 5, 3), torch.rand(2, 3, 5))
    with pytest.raises(ValueError, match="label_smoothing is defined for ce alone"):
        get_loss("nce+rce", label_smoothing=0.1, backend=backend)
    with pytest.raises(ValueError, match="label_smoothing is defined for ce alone"):
        get_loss("sce", label_smoothing=0.1, backend=backend)
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\], got 1.5"):
        ce(label_smoothing=1.5)
    with pytest.raises(ValueError, match="per-class weights with probability targets are defined for ce alone"):
        get_loss("mae", num_classes=5, backend=backend, weight=torch.ones(5, dtype=torch.float64))(z, probs)


# ---------------------------------------------------------------- the fused operator's distribution path

SOFT_SPECS = {  # every sum of soft-target kinds the library builds, and CE with smoothing
    "ce": LossSpec(Kind.CE), "mae": LossSpec(Kind.MAE), "mae-author": LossSpec(Kind.MAE_AUTHOR),
    "rce": LossSpec(Kind.RCE), "sce": LossSpec(Kind.CE, Kind.RCE, 0.1, 1.0),
    "ce+mae": LossSpec(Kind.CE, Kind.MAE, 0.7, 0.3), "mae+rce": LossSpec(Kind.MAE, Kind.RCE, 0.4, 0.6),
}
SMOOTHED = LossSpec(Kind.CE, smoothing=0.15)


def soft_batch(n, c, seed, dtype, device, *, regimes=False):
    """Logits, probabilities (some exactly 0, a one-hot row), class indices with an ignored row."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.tensor([1.0, 5.0, 30.0, 300.0])[torch.randint(0, 4, (n, 1), generator=g)] if regimes else 1.0
    z = torch.randn(n, c, generator=g, dtype=torch.float64) * scale
    probs = torch.softmax(torch.randn(n, c, generator=g, dtype=torch.float64) * 3, dim=1)
    probs[:, 0] = 0.0
    probs = probs / probs.sum(1, keepdim=True)
    probs[-1] = F.one_hot(torch.tensor(c - 1), c).double()
    y = torch.randint(0, c, (n,), generator=g)
    y[min(1, n - 1)] = IGNORE
    return z.to(dtype).to(device), probs.to(dtype).to(device), y.to(device)


TOLERANCES = {torch.float64: dict(rtol=1e-9, atol=1e-11), torch.float32: dict(rtol=2e-5, atol=2e-6),
              torch.bfloat16: dict(rtol=2e-2, atol=2e-2), torch.float16: dict(rtol=5e-3, atol=5e-3)}


@requires_fused
@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
@pytest.mark.parametrize("c", [2, 10, 37, 1000])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fused_distribution_path_matches_the_reference(c, reduction, dtype, device):
    """Every soft-target loss, and CE with smoothing on class indices (weighted and not), on the
    fused operator against the reference: values and gradients, row lengths below, at and above a
    vector, half types computed in float32, confident rows included."""
    z, probs, y = soft_batch(9, c, seed=c, dtype=dtype, device=device, regimes=True)
    weight = torch.linspace(0.5, 2.0, c, dtype=dtype, device=device)
    cases = [(spec, probs, None) for spec in SOFT_SPECS.values()]
    cases += [(ce, probs, weight) for ce in (LossSpec(Kind.CE), SMOOTHED)]
    cases += [(SMOOTHED, y, None), (SMOOTHED, y, weight)]
    for spec, target, w in cases:
        got = value_and_grad(lambda a, b: fused.fused_loss(a, b, spec, reduction, weight=w), z, target)
        def want_fn(a, b, spec=spec, w=w):  # in float64, then rounded to the dtype under test
            b = b.double() if b.is_floating_point() else b
            return reference_loss(a.double(), b, spec, reduction, weight=None if w is None else w.double()).to(a.dtype)
        want = value_and_grad(want_fn, z, target)
        assert got[0].dtype == dtype and got[1].dtype == dtype
        torch.testing.assert_close(got, want, **TOLERANCES[dtype], msg=lambda m: f"{spec} {target.dtype}: {m}")


@requires_fused
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (3, 150, 16), (1, 6, 4)], ids=str)
def test_fused_distribution_path_reads_the_segmentation_layout(shape, dtype, device):
    """The (N, C, d1, ..., dK) layout (read in place on the CPU for float32/float64, any C; a
    transposed copy otherwise) gives what the same positions give as rows: D = 35 makes vector
    blocks straddle two samples, D = 16 fills whole blocks, D = 4 is one partial block."""
    g = torch.Generator().manual_seed(shape[1])
    z = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).to(device)
    probs = torch.softmax(torch.randn(shape, generator=g, dtype=torch.float64) * 2, dim=1).to(dtype).to(device)
    y = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=g)
    y.view(-1)[::3] = IGNORE
    y = y.to(device)
    weight = torch.linspace(0.5, 2.0, shape[1], dtype=dtype, device=device)
    c = shape[1]
    for name, target, kwargs in (("sce", probs, {}), ("mae", probs, {"variant": "author"}),
                                 ("ce", probs, {"weight": weight, "label_smoothing": 0.1}),
                                 ("ce", y, {"weight": weight, "label_smoothing": 0.2}), ("rce", probs, {})):
        for reduction in ("none", "mean"):
            module = get_loss(name, num_classes=c, reduction=reduction, backend="fused", **kwargs)
            rows_target = target.movedim(1, -1).reshape(-1, c) if target.is_floating_point() else target.reshape(-1)
            got = value_and_grad(module, z, target)
            want = value_and_grad(module, z.movedim(1, -1).reshape(-1, c), rows_target)
            torch.testing.assert_close(got[0].reshape(-1), want[0].reshape(-1), **TOLERANCES[dtype])
            torch.testing.assert_close(got[1], want[1].reshape(shape[0], *shape[2:], c).movedim(-1, 1),
                                       **TOLERANCES[dtype])


@requires_fused
def test_every_kind_pair_takes_probabilities_in_the_operator_as_in_the_spec():
    """The operator's rule (csrc/loss_row.h takes_distribution) is apl.losses.spec's SOFT_TARGET_KINDS."""
    z, probs, _ = soft_batch(3, 4, seed=1, dtype=torch.float64, device="cpu")
    for active, passive in itertools.product(list(Kind)[1:], fused.SUPPORTED_PASSIVE):
        spec = LossSpec(active, passive, 1.0, 0.0 if passive == Kind.NONE else 1.0, a=6.0)
        defined = spec.soft_target_kinds
        assert defined == (active in SOFT_TARGET_KINDS and passive in SOFT_TARGET_KINDS + (Kind.NONE,))
        try:
            fused.fused_loss(z, probs, spec)
        except ValueError as exc:
            assert not defined and "no principled extension" in str(exc), (spec, exc)
        else:
            assert defined, spec


@requires_fused
@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_operator_opcheck_on_distribution_targets(reduction, device):
    """Schema, autograd, fake kernel and AOT dispatch of both operators with probability targets
    (also in the segmentation layout) and with label smoothing."""
    z, probs, y = soft_batch(5, 6, seed=2, dtype=torch.float32, device=device)
    seg = torch.randn(2, 6, 3, 2, device=device)
    seg_probs = torch.softmax(torch.randn(2, 6, 3, 2, device=device), dim=1)
    cases = [(z, probs, int(Kind.CE), int(Kind.RCE), 0.0), (z, y, int(Kind.CE), int(Kind.NONE), 0.1),
             (seg, seg_probs, int(Kind.MAE), int(Kind.NONE), 0.0)]
    for logits, target, active, passive, smoothing in cases:
        scalars = op_args(reduction=("none", "mean", "sum")[reduction])._replace(
            active=active, passive=passive, beta=0.5, gamma=0.0, label_smoothing=smoothing)
        args = (logits.clone().requires_grad_(), target, *scalars, None)
        torch.library.opcheck(torch.ops.apl.apl_loss.default, args)
        loss, stats, batch_terms = torch.ops.apl.apl_loss(*args)
        grad_loss = torch.randn(loss.shape, dtype=loss.dtype, device=device)
        torch.library.opcheck(torch.ops.apl.apl_loss_backward.default,
                              (grad_loss, args[0].detach(), target, stats.detach(), batch_terms.detach()) + args[2:],
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


@requires_fused
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_distribution_path_runs_the_step_plan(reduction):
    """Probability targets and smoothing run the same steps (CUDA launches) as class indices."""
    z, probs, y = soft_batch(6, 5, seed=3, dtype=torch.float32, device="cpu")
    for name, target, kwargs in (("sce", probs, {}), ("ce", y, {"label_smoothing": 0.1})):
        module = get_loss(name, num_classes=5, reduction=reduction, backend="fused", **kwargs)
        x = z.clone().requires_grad_()
        before = torch.ops.apl._steps_run()
        loss = module(x, target)
        forward = torch.ops.apl._steps_run() - before
        before = torch.ops.apl._steps_run()
        loss.sum().backward()
        assert (forward, torch.ops.apl._steps_run() - before) == fused.launch_counts(module.spec, reduction)


@requires_fused
def test_empty_batches_follow_f_cross_entropy():
    z = torch.zeros(0, 4, requires_grad=True)
    for target, kwargs in ((torch.zeros(0, 4), {}), (torch.zeros(0, dtype=torch.long), {"label_smoothing": 0.1})):
        for reduction in ("mean", "sum", "none"):
            got = get_loss("ce", num_classes=4, reduction=reduction, backend="fused", **kwargs)(z, target)
            want = F.cross_entropy(z, target, reduction=reduction, **kwargs)
            torch.testing.assert_close(got, want, equal_nan=True)


def test_soft_targets_and_smoothing_compile_without_graph_breaks():
    z, probs, y = batch((3, 4, 2, 3), seed=8)
    for module, target in ((get_loss("ce", num_classes=4, label_smoothing=0.1), y),
                           (get_loss("sce", num_classes=4), probs)):
        compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(value_and_grad(compiled, z, target), value_and_grad(module, z, target))
