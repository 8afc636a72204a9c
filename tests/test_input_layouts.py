"""The input layouts of ``F.cross_entropy`` through the public entry points: (N, C, d1, ..., dK)
logits with (N, d1, ..., dK) targets (segmentation), and unbatched (C,) logits with a 0-D target.

CE is compared with ``F.cross_entropy`` itself (values and gradients, every reduction, weights,
``ignore_index``, float32 and float64); every other loss with its own (N*D, C) computation on
the same positions moved to rows, which is what LOSSES.md defines (the paper forms' batch
statistics over every position of the batch).
"""
import pytest
import torch
import torch.nn.functional as F
from conftest import BACKENDS, LOSS_CASES, op_args, requires_fused, value_and_grad

import apl.functional as AF
from apl.losses import get_loss
from apl.losses.spec import spec_for

IGNORE = -100
# (N, C, d1, ..., dK) shapes: K = 1, 2, 3
SHAPES = [(3, 5, 7), (2, 4, 3, 5), (2, 3, 2, 3, 2)]


def seg_batch(shape, seed, dtype=torch.float64, ignore_frac=0.2):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    target_shape = (shape[0], *shape[2:])
    y = torch.randint(0, shape[1], target_shape, generator=g)
    y[torch.rand(target_shape, generator=g) < ignore_frac] = IGNORE
    y.view(-1)[0] = 0  # at least one position counts
    return z, y


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_ce_matches_f_cross_entropy(shape, backend, reduction, weighted, dtype):
    z, y = seg_batch(shape, seed=len(shape), dtype=dtype)
    weight = torch.rand(shape[1], generator=torch.Generator().manual_seed(2), dtype=dtype) + 0.5 \
        if weighted else None
    module = get_loss("ce", num_classes=shape[1], reduction=reduction, ignore_index=IGNORE, backend=backend,
                      weight=weight)
    got = value_and_grad(module, z, y)
    fn = value_and_grad(lambda a, b: AF.ce(a, b, reduction=reduction, ignore_index=IGNORE, weight=weight,
                                           fused=backend == "fused"), z, y)
    want = value_and_grad(lambda a, b: F.cross_entropy(a, b, weight=weight, reduction=reduction,
                                                       ignore_index=IGNORE), z, y)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    for result in (got, fn):
        assert result[0].shape == want[0].shape
        torch.testing.assert_close(result[0], want[0], **tol)
        torch.testing.assert_close(result[1], want[1], **tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unbatched_ce_matches_f_cross_entropy(backend):
    z = torch.randn(6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    for reduction in ("mean", "sum", "none"):
        module = get_loss("ce", num_classes=6, reduction=reduction, backend=backend)
        got = value_and_grad(module, z, torch.tensor(4))
        want = value_and_grad(lambda a, b: F.cross_entropy(a, b, reduction=reduction), z, torch.tensor(4))
        assert got[0].shape == want[0].shape == ()
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name, variant", [(n, v) for n, v in LOSS_CASES if n != "ce"])
def test_every_loss_computes_positions_as_rows(name, variant, backend):
    """K-dimensional input = the same positions as rows of an (N*D, C) batch; 'none' keeps the
    target's shape; the paper forms' batch statistics span every position."""
    shape = (2, 6, 3, 4)
    z, y = seg_batch(shape, seed=5)
    rows = z.movedim(1, -1).reshape(-1, shape[1])
    for reduction in ("mean", "none"):
        module = get_loss(name, num_classes=shape[1], variant=variant, reduction=reduction, backend=backend)
        got_value, got_grad = value_and_grad(module, z, y)
        want_value, want_rows_grad = value_and_grad(module, rows, y.reshape(-1))
        assert got_value.shape == (y.shape if reduction == "none" else ())
        torch.testing.assert_close(got_value.reshape(-1), want_value.reshape(-1), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got_grad, want_rows_grad.reshape(2, 3, 4, 6).movedim(-1, 1),
                                   rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_layouts_are_named(backend):
    z = torch.randn(2, 5, 3, 4)
    module = get_loss("nce+rce", num_classes=5, backend=backend)
    with pytest.raises(ValueError, match=r"target of shape \(2, 3\) does not match logits of shape \(2, 5, 3, 4\)"):
        module(z, torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"target of shape \(2, 4, 3\) does not match"):
        AF.nce_rce(z, torch.zeros(2, 4, 3, dtype=torch.long), fused=backend == "fused")
    with pytest.raises(ValueError, match="unbatched logits of shape \\(5,\\) need a 0-D target"):
        module(torch.randn(5), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="logits have C=4 classes but the loss was built for 5"):
        module(torch.randn(2, 4, 3), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="target 7 .*out of range for C=5"):
        module(z, torch.full((2, 3, 4), 7))


@pytest.mark.parametrize("backend", BACKENDS)
def test_segmentation_layout_compiles_without_graph_breaks(backend):
    shape = (2, 4, 3, 5)
    z, y = seg_batch(shape, seed=7)
    for reduction in ("mean", "none"):
        module = get_loss("nfl+rce", num_classes=4, variant="paper", reduction=reduction, backend=backend)
        compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(value_and_grad(compiled, z, y), value_and_grad(module, z, y))


@requires_fused
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("c", [5, 130], ids=["read-in-place", "copied-to-rows"])
@pytest.mark.parametrize("n, hw", [(3, (5, 3)), (3, (9, 8)), (1, (4,))],
                         ids=["blocks-straddle-samples", "whole-groups-of-blocks", "one-sample"])
def test_operator_layout_paths_agree_with_rows(c, dtype, n, hw):
    """The CPU kernels read the (N, C, D) layout in place for float32/float64 up to C = 112 and
    compute on a transposed copy otherwise; both give what the same positions give as rows.
    D = 15 makes vector blocks straddle two samples; D = 72 lets the backward take groups of
    four blocks of one sample (and a remainder) as well; one sample's copy is a strided view
    before it is made contiguous."""
    shape = (n, c, *hw)
    z, y = seg_batch(shape, seed=c, dtype=dtype)
    rows = z.movedim(1, -1).reshape(-1, c)
    for name, variant in (("nfl+rce", "ma2020"), ("nce+mae", "paper"), ("ce", "ma2020")):
        for reduction in ("sum", "none"):
            module = get_loss(name, num_classes=c, variant=variant, reduction=reduction, backend="fused")
            got_value, got_grad = value_and_grad(module, z, y)
            want_value, want_grad = value_and_grad(module, rows, y.reshape(-1))
            torch.testing.assert_close(got_value.reshape(-1), want_value.reshape(-1))
            torch.testing.assert_close(got_grad, want_grad.reshape(n, *hw, c).movedim(-1, 1))


@requires_fused
def test_operator_opcheck_on_the_segmentation_layout():
    z, y = seg_batch((2, 4, 3, 5), seed=11)
    for reduction in ("none", "mean"):
        args = (z.requires_grad_(), y, *op_args(spec_for("nce+rce", variant="paper"), reduction), None)
        torch.library.opcheck(torch.ops.apl.apl_loss.default, args)
