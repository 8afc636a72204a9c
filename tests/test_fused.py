"""Tests of the fused loss operator (apl.fused, csrc/): parity with the pure-PyTorch reference,
gradients, registration (opcheck, torch.compile, meta), bad input and NaN handling, and on CUDA
host syncs, CUDA graphs, launch counts and the target-check switch.

Ground truth is ``apl.losses.reference_loss`` (LOSSES.md), always evaluated on the CPU. float32
results of the operator are compared with the reference evaluated in float64 on the same
(float32-rounded) inputs, so the tolerance measures the operator's own rounding. Tolerances are
relative to a scale: the largest expected value, or the natural size of a gradient (upstream
gradient times the terms' weights), whichever is larger. Tests taking ``device`` run on the CPU
and, where present, on cuda and cuda:1 (tests/conftest.py); CUDA-only tests are skipped with the
reason where no GPU (or no CUDA build) exists.
"""
import copy
import enum
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from conftest import IGNORE_INDEX as IGNORE
from conftest import op_args, random_batch, requires_cuda, requires_fused, requires_two_gpus
from torch.autograd import DeviceType

import apl.losses.fused as fused
from apl.losses import get_loss, reference_loss
from apl.losses.spec import LOSS_NAMES, RCE_A, VARIANTS, Kind, LossSpec, rce_scale, spec_for

pytestmark = requires_fused

REPO = Path(__file__).resolve().parents[1]
REDUCTIONS = ("none", "mean", "sum")
# Every kind as the active term alone, then the APL sums (both weightings) and SCE.
SINGLE = [LossSpec(k) for k in Kind if k != Kind.NONE]
SUMS = [spec_for(n, variant=v) for n in ("nce+mae", "nce+rce", "nfl+mae", "nfl+rce")
        for v in VARIANTS] + [spec_for("sce")]
ALL_SPECS = SINGLE + SUMS
# Kinds with detached weights: their autograd gradient is by definition not the derivative.
DETACHED = (Kind.FL_DETACHED, Kind.NFL_MA2020, Kind.NNFL, Kind.EFL)
# Every loss name with each variant that changes its spec (ce, gce, sce have one form).
NAME_VARIANTS = [(n, v) for n in LOSS_NAMES for v in VARIANTS if v == "ma2020" or spec_for(n, variant=v) != spec_for(n)]
# Tolerance of the operator against the float64 reference, by logits dtype (half types: the
# final rounding of a float32 result).
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
# random_batch options of the parity batches: mixed row regimes, a quarter of the rows ignored.
MIXED = dict(regimes=True, ignore_frac=0.25)


def reference_dtype(device, cpu_dtype):
    """dtype of the CPU reference a result on `device` is compared with: the CPU tests keep their
    `cpu_dtype` reference, other devices are compared with float64."""
    return cpu_dtype if device == "cpu" else torch.float64


def spec_id(spec):
    """Readable test id of a spec."""
    name = spec.active.name + ("+" + spec.passive.name if spec.passive != Kind.NONE else "")
    return f"{name}(a={spec.alpha:g},b={spec.beta:g})"


def class_weights(c, seed, dtype=torch.float64):
    """Positive per-class weights spread over two orders of magnitude."""
    g = torch.Generator().manual_seed(seed)
    return (10 ** (2 * torch.rand(c, generator=g, dtype=torch.float64) - 1)).to(dtype)


def weight_scale(spec, c):
    """Size of the gradient coefficients of a spec at C classes: |alpha| + |beta|, each times its term's
    constant (A for the RCE kinds, A (C - 1) / 4 for NRCE)."""
    def size(kind):
        if kind == Kind.NRCE:
            return rce_scale(kind, c)
        return RCE_A if kind in (Kind.RCE, Kind.RCE_AUTHOR) else 1.0
    return abs(spec.alpha) * size(spec.active) + abs(spec.beta) * size(spec.passive)


def run_both(spec, z, target, reduction, dtype, device="cpu", ref_dtype=torch.float64):
    """Loss and gradient of the fused op (in `dtype`, on `device`) and of the reference (in
    `ref_dtype` on the CPU, on the same rounded inputs), with the same random upstream gradient.
    Returns both pairs (on the CPU) and the upstream gradient's size per row."""
    z_in = z.to(dtype)
    z_fused = z_in.to(device, copy=True).requires_grad_()
    z_ref = z_in.to(ref_dtype, copy=True).requires_grad_()
    loss_f = fused.fused_loss(z_fused, target.to(device), spec, reduction, IGNORE)
    loss_r = reference_loss(z_ref, target, spec, reduction, IGNORE)
    assert loss_f.device == z_fused.device
    upstream = torch.randn(loss_r.shape, dtype=ref_dtype, generator=torch.Generator().manual_seed(7))
    (loss_f * upstream.to(device, dtype)).sum().backward()
    (loss_r * upstream).sum().backward()
    n_valid = max(int((target != IGNORE).sum()), 1)
    per_row = upstream.abs().max().item() if upstream.numel() else 0.0
    if reduction == "mean":
        per_row /= n_valid
    return (loss_f.detach().cpu(), z_fused.grad.cpu()), (loss_r.detach(), z_ref.grad), per_row


def assert_scaled_close(actual, expected, tol, scale, what):
    """max |actual - expected| <= tol * max(scale, max |expected|); NaN must match NaN."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.double(), expected.double()
    assert torch.equal(a.isnan(), e.isnan()), f"{what}: NaN pattern differs"
    a, e = a.nan_to_num(0.0), e.nan_to_num(0.0)
    if e.numel() == 0:
        return
    ref_scale = max(scale, e.abs().max().item())
    err = (a - e).abs().max().item()
    assert err <= tol * ref_scale, f"{what}: max error {err:.3g} > {tol:g} * {ref_scale:.3g}"


def check_parity(spec, n, c, reduction, dtype, seed, device="cpu"):
    """The fused op (on `device`) agrees with the float64 CPU reference in value and gradient.
    Low-precision sums over a row's C classes round with an error that grows like sqrt(C): the
    tolerance does too, above C = 10000 (RCE's clamped mass over 128000 classes in float32)."""
    tol = TOL[dtype] * (max(1.0, (c / 10000) ** 0.5) if dtype != torch.float64 else 1.0)
    z, target = random_batch(n, c, seed, **MIXED)
    (lf, gf), (lr, gr), per_row = run_both(spec, z, target, reduction, dtype, device)
    assert lf.dtype == dtype and gf.dtype == dtype
    what = f"{spec_id(spec)} N={n} C={c} {reduction} {dtype} {device}"
    assert_scaled_close(lf, lr, tol, 1.0, "loss " + what)
    assert_scaled_close(gf, gr, tol, per_row * weight_scale(spec, c), "grad " + what)


# --------------------------------------------------------------------------- parity

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("spec", ALL_SPECS, ids=spec_id)
def test_parity_every_spec(spec, reduction, dtype):
    """Every kind, variant and APL sum, every reduction, on small and medium shapes."""
    for i, (n, c) in enumerate([(1, 2), (7, 10), (128, 100), (7, 1000)]):
        check_parity(spec, n, c, reduction, dtype, seed=100 * i + 1)


@pytest.mark.parametrize("n", [1, 7, 128, 1000])
@pytest.mark.parametrize("c", [2, 10, 100, 1000, 32000])
def test_parity_shapes(n, c):
    """The full shape grid in float32 for a loss that runs every optional pass (NCE_MA2020's
    sum of logits, RCE's clamp pass)."""
    check_parity(spec_for("nce+rce"), n, c, "mean", torch.float32, seed=n * 7 + c)


@pytest.mark.parametrize("spec", [spec_for("nce+rce"), spec_for("nfl+mae", variant="paper")], ids=spec_id)
def test_parity_layout_boundaries(spec):
    """Around the CPU kernels' switch from rows-in-lanes to one-row-at-a-time (C = 128) and
    around the vector width in rows and classes, in both dtypes."""
    for n in (15, 16, 17, 33):
        for c in (15, 16, 17, 127, 128, 129):
            for dtype in (torch.float64, torch.float32):
                check_parity(spec, n, c, "none", dtype, seed=n * 1000 + c)


@pytest.mark.parametrize("spec", [spec_for("ce"), spec_for("nfl"), spec_for("nfl+rce", variant="paper"),
                                  spec_for("nce", variant="paper")], ids=spec_id)
def test_parity_large(spec):
    """N=1000, C=32000 float32 for a sample of losses (the other kinds are covered above)."""
    check_parity(spec, 1000, 32000, "mean", torch.float32, seed=3)


HALF_SPECS = [spec_for("ce"), spec_for("nce+rce"), spec_for("nfl+mae", variant="paper"), spec_for("gce"),
              LossSpec(Kind.NFL_MA2020)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("spec", HALF_SPECS, ids=spec_id)
def test_parity_half_types(spec, dtype, device):
    """float16/bfloat16 logits are computed in float32: compare with the reference on the same
    rounded inputs (float32 for the CPU, float64 elsewhere); only the final rounding to the input
    dtype differs. Both CUDA row layouts (C <= 1024 and above); for bfloat16 also mixed row
    regimes (their sums overflow float16)."""
    tol = TOL[dtype]
    batches = [random_batch(64, 50, 11, scale=4.0, ignore_frac=0.2),
               random_batch(16, 1025, 12, scale=4.0, ignore_frac=0.2)]
    if dtype == torch.bfloat16:
        batches.append(random_batch(64, 300, 9, **MIXED))
    for z, target in batches:
        for reduction in REDUCTIONS:
            (lf, gf), (lr, gr), per_row = run_both(spec, z, target, reduction, dtype, device,
                                                   ref_dtype=reference_dtype(device, torch.float32))
            assert lf.dtype == dtype and gf.dtype == dtype
            what = f"{spec_id(spec)} N={len(target)} C={z.shape[1]} {reduction} {dtype} {device}"
            assert_scaled_close(lf, lr, tol, 1.0, "loss " + what)
            assert_scaled_close(gf, gr, tol, per_row * weight_scale(spec, z.shape[1]), "grad " + what)


# Rows per class count C in the shape sweep: few on the CPU (the reference's time), more on a GPU
# (there N also exercises the batch step over many rows).
SWEEP_ROWS = {"cpu": {2: 64, 10: 64, 1000: 16, 1025: 16, 32000: 4, 128000: 3},
              "gpu": {2: 4096, 10: 4096, 1000: 256, 1025: 256, 32000: 16, 128000: 4}}


@pytest.mark.parametrize("c", [2, 10, 1000, 1025, 32000, 128000])
@pytest.mark.parametrize("spec", [spec_for("ce"), spec_for("nce+rce"), spec_for("nfl+rce"),
                                  spec_for("nfl+mae", variant="paper"), spec_for("nce+rce", variant="paper"),
                                  spec_for("gce"), spec_for("fl", variant="paper")], ids=spec_id)
def test_parity_shape_sweep(spec, c, device):
    """Parity in float64 and float32, per row and reduced, from C = 2 to C = 128000 (no size
    limit; on CUDA a warp per row up to C = 1024, a block per row above) on every device,
    against the float64 reference on the CPU."""
    n = SWEEP_ROWS["cpu" if device == "cpu" else "gpu"][c]
    for dtype in (torch.float64, torch.float32):
        for reduction in ("none", "mean"):
            check_parity(spec, n, c, reduction, dtype, seed=c + n, device=device)


def test_parity_hypothesis():
    """Random shapes, scales, kinds, weights and reductions agree with the reference (float64)."""
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies


    @hypothesis.settings(max_examples=60, deadline=None, derandomize=True)
    @hypothesis.given(n=st.integers(1, 40), c=st.integers(2, 70), seed=st.integers(0, 2**31 - 1),
                      active=st.sampled_from([k for k in Kind if k != Kind.NONE]),
                      passive=st.sampled_from(fused.SUPPORTED_PASSIVE),
                      alpha=st.floats(-2, 10), beta=st.floats(-2, 10), gamma=st.sampled_from([0.0, 0.5, 2.0]),
                      q=st.sampled_from([0.1, 0.7, 1.0]), reduction=st.sampled_from(REDUCTIONS))
    def prop(n, c, seed, active, passive, alpha, beta, gamma, q, reduction):
        spec = LossSpec(active, passive, alpha, beta if passive != Kind.NONE else 0.0, gamma, q)
        z, target = random_batch(n, c, seed, **MIXED)
        (lf, gf), (lr, gr), per_row = run_both(spec, z, target, reduction, torch.float64)
        assert_scaled_close(lf, lr, 1e-9, 1.0, "loss")
        assert_scaled_close(gf, gr, 1e-9, per_row * max(weight_scale(spec, c), 1.0), "grad")

    prop()


# --------------------------------------------------------------------------- gradients, registration

GRADCHECK_SPECS = [s for s in ALL_SPECS if s.active not in DETACHED and s.passive not in DETACHED]


@pytest.mark.parametrize("spec", GRADCHECK_SPECS, ids=spec_id)
def test_gradcheck(spec):
    """The fused backward is the numerical derivative of the fused forward (float64), for every
    spec without detached weights, through every reduction."""
    g = torch.Generator().manual_seed(3)
    z = (torch.randn(6, 5, generator=g, dtype=torch.float64) * 2).requires_grad_()
    target = torch.tensor([0, 4, IGNORE, 2, 2, 1])
    for reduction in REDUCTIONS:
        assert torch.autograd.gradcheck(lambda x: fused.fused_loss(x, target, spec, reduction, IGNORE), (z,))


def _op_args(spec, reduction, dtype=torch.float64, n=8, c=5, seed=0, device="cpu", weighted=False):
    """Arguments of torch.ops.apl.apl_loss on `device` (logits requiring grad, one ignored row)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, c, generator=g, dtype=dtype).to(device).requires_grad_()
    target = torch.randint(0, c, (n,), generator=g)
    target[1] = IGNORE
    args = (z, target.to(device), *op_args(spec, reduction))
    return args + (class_weights(c, seed + 1, dtype).to(device),) if weighted else args


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("spec", [spec_for("ce"), spec_for("nce+rce"), spec_for("nfl+rce"),
                                  spec_for("nfl+mae", variant="paper"), spec_for("nce", variant="paper")],
                         ids=spec_id)
def test_opcheck(spec, reduction, weighted, device):
    """Schema, autograd registration, fake tensor kernel and AOT dispatch (dynamic shapes) of
    both operators, with and without per-class weights, on every device. The forward returns
    (loss, stats, batch); the backward takes batch after stats."""
    args = _op_args(spec, reduction, device=device, weighted=weighted)
    torch.library.opcheck(torch.ops.apl.apl_loss.default, args)
    loss, stats, batch = torch.ops.apl.apl_loss(*args)
    grad_loss = torch.randn(loss.shape, dtype=loss.dtype, generator=torch.Generator().manual_seed(1)).to(device)
    torch.library.opcheck(torch.ops.apl.apl_loss_backward.default,
                          (grad_loss, args[0].detach(), args[1], stats.detach(), batch.detach()) + args[2:],
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_torch_compile_fullgraph(weighted):
    """fused_loss compiles without a graph break and matches eager in value and gradient, with
    and without per-class weights."""
    spec = spec_for("nfl+rce", variant="paper")
    w = class_weights(10, 3, torch.float32) if weighted else None

    def step(x, y):
        return fused.fused_loss(x * 2.0, y, spec, weight=w) + 0.5 * fused.fused_loss(x, y, spec_for("ce"), "sum")

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(16, 10, generator=g, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    y = torch.randint(0, 10, (16,), generator=g)
    out_c, out_e = compiled(x1, y), step(x2, y)
    out_c.backward()
    out_e.backward()
    torch.testing.assert_close(out_c, out_e)
    torch.testing.assert_close(x1.grad, x2.grad)


@pytest.mark.parametrize("reduction,shape", [("none", (6,)), ("mean", ()), ("sum", ())])
def test_meta_tensors(reduction, shape):
    """On meta tensors the op gives the output shape and dtype without data."""
    z = torch.empty(6, 9, device="meta", dtype=torch.bfloat16)
    t = torch.empty(6, device="meta", dtype=torch.int64)
    out = fused.fused_loss(z, t, spec_for("nce+rce"), reduction)
    assert out.device.type == "meta" and out.shape == shape and out.dtype == torch.bfloat16
    loss, stats, batch = torch.ops.apl.apl_loss(z, t, *op_args(spec_for("nce+rce"), reduction))
    assert loss.device.type == "meta" and loss.shape == shape and loss.dtype == torch.bfloat16
    assert stats.device.type == "meta" and stats.shape == (6, fused.NUM_STATS) and stats.dtype == torch.float32
    assert batch.device.type == "meta" and batch.dim() == 1 and batch.dtype == torch.float32


def test_double_backward_raises():
    """Second derivatives are not supported, and say so instead of returning zeros."""
    z = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    loss = fused.fused_loss(z, torch.tensor([0, 1, 2, 0]), spec_for("nce+rce"))
    (grad,) = torch.autograd.grad(loss, z, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        grad.sum().backward()


# --------------------------------------------------------------------------- edge cases

# NaN columns per row: the target's own (row 0), then, at C = 1000, one in each of the CPU max
# pass's accumulator chains for float32 and float64 vectors, its tail and the partial vector;
# at C = 2000 (a block per row on CUDA) the first and second chunk and the last column.
NAN_COLUMNS = {6: [1, 5], 1000: [1, 13, 29, 37, 53, 970, 999], 2000: [1, 1024, 1999, 1025]}


@pytest.mark.parametrize("c, dtype", [(6, torch.float64), (6, torch.float32), (1000, torch.float64),
                                      (1000, torch.float32), (2000, torch.float32)])
@pytest.mark.parametrize("spec", ALL_SPECS, ids=spec_id)
def test_nan_logits_give_nan(spec, c, dtype, device):
    """A NaN logit (in the target's column or elsewhere) makes that row's loss NaN, and the mean
    NaN; the other rows are unaffected (the batch statistic of NFL_PAPER spreads it, as in the
    reference). C = 6 and 1000 run the two CPU forward layouts, 1000 and 2000 the two CUDA ones."""
    z, _ = random_batch(8, c, seed=c, dtype=dtype)
    target = torch.tensor([1, 2, 3, 4, 0, 0, 0, 0])
    for row, col in enumerate(NAN_COLUMNS[c]):
        z[row, col] = float("nan")
    ref_dtype = reference_dtype(device, dtype)
    tol = TOL[dtype]
    for reduction in REDUCTIONS:
        out = fused.fused_loss(z.to(device), target.to(device), spec, reduction).cpu()
        expected = reference_loss(z.to(ref_dtype), target, spec, reduction)
        assert out.isnan().any(), f"{reduction}: a NaN logit gave a finite loss {out}"
        assert torch.equal(out.isnan(), expected.isnan()), f"{reduction}: NaN pattern {out} != {expected}"
        torch.testing.assert_close(out.nan_to_num(0.0).double(), expected.nan_to_num(0.0).double(),
                                   rtol=tol, atol=tol)
    x, xr = z.to(device, copy=True).requires_grad_(), z.to(ref_dtype, copy=True).requires_grad_()
    (grad,) = torch.autograd.grad(fused.fused_loss(x, target.to(device), spec, "sum"), x)
    (grad_ref,) = torch.autograd.grad(reference_loss(xr, target, spec, "sum"), xr)
    assert torch.equal(grad.isnan().any(dim=1).cpu(), grad_ref.isnan().any(dim=1)), "rows with a NaN gradient differ"


EDGE_SPECS = [spec_for("nce+rce"), spec_for("nfl+rce", variant="paper"), spec_for("nce", variant="paper")]


@pytest.mark.parametrize("spec", EDGE_SPECS, ids=spec_id)
def test_all_rows_ignored(spec, device):
    """No valid row: mean is NaN (like F.cross_entropy), sum 0, none all 0, gradient 0."""
    z, target = random_batch(3, 4, seed=2, device=device, ignore_frac=1.0)
    z.requires_grad_()
    assert bool((target == IGNORE).all())
    assert fused.fused_loss(z, target, spec, "mean").isnan()
    assert fused.fused_loss(z, target, spec, "sum").item() == 0.0
    assert torch.equal(fused.fused_loss(z, target, spec, "none"), torch.zeros(3, dtype=torch.float64, device=device))
    fused.fused_loss(z, target, spec, "sum").backward()
    assert torch.equal(z.grad, torch.zeros_like(z))


@pytest.mark.parametrize("spec", EDGE_SPECS, ids=spec_id)
def test_empty_batch(spec, device):
    """N = 0: 'none' is empty, 'sum' 0, 'mean' NaN, the gradient empty (no kernel over no rows)."""
    z = torch.empty(0, 5, device=device, requires_grad=True)
    target = torch.empty(0, dtype=torch.int64, device=device)
    none = fused.fused_loss(z, target, spec, "none")
    assert none.shape == (0,) and none.device == z.device
    assert fused.fused_loss(z, target, spec, "sum").item() == 0.0
    assert fused.fused_loss(z, target, spec, "mean").isnan()
    fused.fused_loss(z, target, spec, "sum").backward()
    assert z.grad.shape == (0, 5) and z.grad.device == z.device


def test_paper_edge_cases(device):
    """NCE_PAPER with one class in the batch uses H = ln C (value and gradient); NFL_PAPER with
    every p_y = 1 is 0 with zero gradient, for every reduction (LOSSES.md, defined edge cases)."""
    tol = 1e-12 if device == "cpu" else TOL[torch.float64]
    z, _ = random_batch(5, 7, seed=21)
    target = torch.tensor([3, 3, IGNORE, 3, 3])
    x, xr = z.to(device, copy=True).requires_grad_(), z.clone().requires_grad_()
    nce = fused.fused_loss(x, target.to(device), spec_for("nce", variant="paper"))
    ce = F.cross_entropy(xr, target, ignore_index=IGNORE) / math.log(7)
    nce.backward()
    ce.backward()
    torch.testing.assert_close(nce.detach().cpu(), ce.detach(), rtol=tol, atol=0)
    torch.testing.assert_close(x.grad.cpu(), xr.grad, rtol=tol, atol=tol)

    y = torch.tensor([0, 1, 2, 0])
    for dtype in (torch.float64, torch.float32):
        z = torch.zeros(4, 3, dtype=dtype)
        z[torch.arange(4), y] = 1e4
        for reduction in REDUCTIONS:
            x = z.to(device, copy=True).requires_grad_()
            loss = fused.fused_loss(x, y.to(device), spec_for("nfl", variant="paper"), reduction)
            loss.sum().backward()
            assert torch.equal(loss.detach().cpu(), torch.zeros_like(loss, device="cpu")), (dtype, reduction, loss)
            assert torch.equal(x.grad.cpu(), torch.zeros_like(z)), (dtype, reduction)


@pytest.mark.parametrize("ignore_index", [-1, 3], ids=["negative", "a-class-index"])
@pytest.mark.parametrize("spec", [spec_for("ce"), spec_for("nce+rce"), spec_for("nfl+rce", variant="paper"),
                                  spec_for("nce+mae", variant="paper")], ids=spec_id)
def test_ignore_index(spec, ignore_index, device):
    """Rows whose target is ignore_index (negative, or a class index as F.cross_entropy allows)
    add 0 and get a zero gradient, stay out of the mean and of the paper forms' batch statistics,
    so their logits do not matter; the other rows agree with the reference (float64)."""
    z, target = random_batch(24, 7, seed=30 + ignore_index, ignore_frac=0.3, ignore_index=ignore_index)
    ignored = target == ignore_index
    assert 0 < int(ignored.sum()) < len(target)
    other = z.clone()
    other[ignored] = 1e3 * torch.randn(other[ignored].shape, dtype=torch.float64,
                                       generator=torch.Generator().manual_seed(5))
    n_valid = int((~ignored).sum())
    for reduction in REDUCTIONS:
        results = []
        for logits in (z, other):
            x = logits.to(device, copy=True).requires_grad_()
            loss = fused.fused_loss(x, target.to(device), spec, reduction, ignore_index)
            loss.sum().backward()
            results.append((loss.detach().cpu(), x.grad.cpu()))
        xr = z.clone().requires_grad_()
        ref = reference_loss(xr, target, spec, reduction, ignore_index)
        ref.sum().backward()
        (loss, grad), (loss_other, grad_other) = results
        what = f"{spec_id(spec)} ignore_index={ignore_index} {reduction} {device}"
        assert_scaled_close(loss, ref.detach(), TOL[torch.float64], 1.0, "loss " + what)
        grad_scale = weight_scale(spec, z.shape[1]) / (n_valid if reduction == "mean" else 1)
        assert_scaled_close(grad, xr.grad, TOL[torch.float64], grad_scale, "grad " + what)
        assert torch.equal(grad[ignored], torch.zeros_like(grad[ignored])), what
        if reduction == "none":
            assert torch.equal(loss[ignored], torch.zeros_like(loss[ignored])), what
        torch.testing.assert_close(loss_other, loss, rtol=1e-12, atol=1e-12, msg=f"ignored logits changed {what}")
        torch.testing.assert_close(grad_other, grad, rtol=1e-12, atol=1e-12, msg=f"ignored logits changed {what}")


def test_noncontiguous_inputs_through_wrapper():
    """fused_loss accepts strided inputs and int32 targets (it makes them contiguous int64)."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(12, 20, generator=g, dtype=torch.float64)
    z = base[::2, ::2]
    target = torch.randint(0, 10, (12,), generator=g).to(torch.int32)[::2]
    spec = spec_for("nce+rce")
    torch.testing.assert_close(fused.fused_loss(z, target, spec), reference_loss(z, target, spec),
                               rtol=1e-10, atol=1e-12)


def test_threads_do_not_change_results():
    """The row split over threads is deterministic: 1 and 2 threads give identical bits."""
    z, target = random_batch(300, 700, 4, **MIXED)
    spec = spec_for("nfl+rce")
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            x = z.float().requires_grad_()
            loss = fused.fused_loss(x, target, spec, "none")
            loss.sum().backward()
            results.append((loss.detach(), x.grad))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


_ISA_SCRIPT = r"""
import torch, apl.fused as fused
from apl.losses import reference_loss
from apl.losses.spec import spec_for
print(torch.ops.apl._cpu_kernel_isa())
g = torch.Generator().manual_seed(0)
for spec in (spec_for("nce+rce"), spec_for("nfl+rce"), spec_for("nfl+mae", variant="paper")):
    for n, c in ((5, 3), (40, 37), (9, 1000)):
        for dtype in (torch.float32, torch.float64):
            z = (torch.randn(n, c, generator=g, dtype=torch.float64) * 5).to(dtype)
            t = torch.randint(0, c, (n,), generator=g)
            a, b = z.clone().requires_grad_(), z.double().requires_grad_()
            la, lb = fused.fused_loss(a, t, spec, "sum"), reference_loss(b, t, spec, "sum")
            la.backward(); lb.backward()
            tol = 1e-10 if dtype == torch.float64 else 1e-5
            assert abs(la.item() - lb.item()) <= tol * max(1.0, abs(lb.item())), (spec, n, c, dtype)
            assert (a.grad.double() - b.grad).abs().max() <= tol * 10, (spec, n, c, dtype)
print("ok")
"""


@pytest.mark.parametrize("capability,isa", [("default", "default"), ("avx2", "avx2"), ("avx512", "avx512")])
def test_cpu_isa_variants(capability, isa):
    """Each instruction-set build of the row kernels (chosen by ATen's CPU capability, which
    ATEN_CPU_CAPABILITY overrides) is used and agrees with the reference."""
    if isa != "default" and not torch.backends.cpu.get_cpu_capability().lower().startswith(
            "avx512" if isa == "avx512" else "avx"):
        pytest.skip(f"this CPU does not support {isa}")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", _ISA_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.split()
    assert lines[0] == isa and lines[-1] == "ok", out.stdout


# --------------------------------------------------------------------------- bad input

def _call(z, t, weight=None, **scalars):
    """torch.ops.apl.apl_loss with CE's arguments, the named ones replaced."""
    return torch.ops.apl.apl_loss(z, t, *op_args()._replace(**scalars), weight)


Z = torch.randn(4, 3)
T = torch.tensor([0, 1, 2, 0])


@pytest.mark.parametrize("args,match", [
    ((Z, torch.tensor([0, 1, 3, 0])), r"target 3 \(row 2\) is out of range for C=3"),
    ((Z, torch.tensor([0, -1, 2, 0])), r"target -1 \(row 1\) is out of range"),
    ((Z, torch.tensor([0, -100, 2, 0]), dict(ignore_index=-1)), r"target -100 .*ignore_index=-1"),
    ((Z.long(), T), "logits must be a floating tensor"),
    ((Z, T.float()), "target must be an int64 tensor"),
    ((Z, T.int()), "target must be an int64 tensor"),
    ((Z[0], T), r"logits must be 2-D"),
    ((Z.unsqueeze(0), T), r"target of shape \[\d+\] does not match logits of shape \[1, \d+, \d+\]"),
    ((Z, T[None]), r"target must be 1-D"),
    ((Z, T[:3]), r"logits have N=4 rows but target has 3"),
    ((Z[:, :1], T * 0), r"at least 2 classes"),
    ((torch.randn(3, 4).t(), T), "logits must be contiguous"),
    ((Z, torch.tensor([0, 0, 1, 1, 2, 2, 0, 0])[::2]), "target must be contiguous"),
    ((Z, T, dict(active=0)), "active kind 0 is not a loss kind"),
    ((Z, T, dict(active=len(Kind))), f"active kind {len(Kind)} is not a loss kind"),
    ((Z, T, dict(passive=6, beta=1.0)), r"passive kind 6 \(NCE_PAPER\) is not supported"),
    ((Z, T, dict(passive=7, beta=1.0)), r"passive kind 7 \(NFL_PAPER\) is not supported"),
    ((Z, T, dict(active=2, gamma=-0.5)), "gamma must be finite and >= 0"),
    ((Z, T, dict(active=10, q=0.0)), r"q must be in \(0, 1\]"),
    ((Z, T, dict(active=10, q=1.5)), r"q must be in \(0, 1\]"),
    ((Z, T, dict(active=int(Kind.NGCE), q=1.5)), r"q must be in \(0, 1\]"),
    ((Z, T, dict(active=int(Kind.AGCE), q=0.0, a=1.0)), r"q must be a finite number > 0"),
    ((Z, T, dict(active=int(Kind.AUL), a=1.0)), r"AUL needs a > 1"),
    ((Z, T, dict(active=int(Kind.AEL), a=0.0)), r"AGCE and AEL need a > 0"),
    ((Z, T, dict(active=int(Kind.ECE), m=-1.0)), r"m must be a finite number >= 0"),
    ((Z, T, dict(active=int(Kind.NNCE), min_prob=0.0)), r"min_prob must be in \(0, 1\)"),
    ((Z, T, dict(alpha=float("inf"))), "alpha and beta must be finite"),
    ((Z, T, dict(reduction=3)), "reduction must be 0"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_op_rejects_bad_input(args, match):
    """The operator itself raises ValueError naming the problem (before reading the logits)."""
    with pytest.raises(ValueError, match=match):
        _call(*args[:2], **(args[2] if len(args) > 2 else {}))


def test_backward_op_rejects_bad_input():
    """apl_loss_backward checks its stats, batch and gradient shapes and dtypes and the target range."""
    loss, stats, batch = _call(Z, T)
    tail = op_args()
    backward = torch.ops.apl.apl_loss_backward
    with pytest.raises(ValueError, match="stats must have shape"):
        backward(loss, Z, T, stats[:, :5].contiguous(), batch, *tail)
    with pytest.raises(ValueError, match="stats must have dtype"):
        backward(loss, Z, T, stats.double(), batch, *tail)
    with pytest.raises(ValueError, match="batch must have shape"):
        backward(loss, Z, T, stats, torch.cat([batch, batch]), *tail)
    with pytest.raises(ValueError, match="batch must have dtype"):
        backward(loss, Z, T, stats, batch.double(), *tail)
    with pytest.raises(ValueError, match="grad_loss must be a scalar"):
        backward(torch.ones(4), Z, T, stats, batch, *tail)
    with pytest.raises(ValueError, match=r"grad_loss must have shape \[4\]"):
        backward(torch.ones(()), Z, T, stats, batch, *op_args(reduction="none"))
    with pytest.raises(ValueError, match="out of range"):
        backward(loss, Z, torch.tensor([0, 1, 5, 0]), stats, batch, *tail)


def test_wrapper_rejects_bad_input():
    """fused_loss reports shape/dtype problems and out-of-range targets as ValueError too."""
    spec = spec_for("nce+rce")
    with pytest.raises(ValueError, match="out of range"):
        fused.fused_loss(Z, torch.tensor([0, 1, 7, 0]), spec)
    with pytest.raises(ValueError, match="unbatched logits of shape .* need a 0-D target"):
        fused.fused_loss(Z[0], T, spec)
    with pytest.raises(ValueError, match="NCE_MA2020\\+RCE has no principled extension to them"):
        fused.fused_loss(Z, torch.softmax(Z, 1), spec)
    with pytest.raises(ValueError, match="reduction"):
        fused.fused_loss(Z, T, spec, "avg")
    with pytest.raises(ValueError, match="LossSpec"):
        fused.fused_loss(Z, T, "nce+rce")
    unsupported = LossSpec(Kind.CE, Kind.NFL_PAPER, 1.0, 1.0)
    assert not fused.supports(unsupported) and all(fused.supports(s) for s in ALL_SPECS)
    with pytest.raises(ValueError, match="passive term"):
        fused.fused_loss(Z, T, unsupported)


# --------------------------------------------------------------------------- per-class weights

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_weighted_ce_matches_f_cross_entropy(reduction, dtype):
    """CE with per-class weights is F.cross_entropy(weight=...): the loss rows are scaled by
    their target's weight and 'mean' divides by the sum of those weights (ignored rows out)."""
    z, target = random_batch(128, 100, 5, **MIXED)
    w = class_weights(100, 6, dtype)
    x1 = z.to(dtype).requires_grad_()
    x2 = z.to(dtype).requires_grad_()
    got = fused.fused_loss(x1, target, spec_for("ce"), reduction, IGNORE, weight=w)
    want = torch.nn.functional.cross_entropy(x2, target, weight=w, reduction=reduction, ignore_index=IGNORE)
    upstream = torch.randn(want.shape, dtype=dtype, generator=torch.Generator().manual_seed(1))
    (got * upstream).sum().backward()
    (want * upstream).sum().backward()
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=tol, atol=tol * float(upstream.abs().max()))


def check_weighted_parity(spec, n, c, reduction, seed, device="cpu"):
    """With per-class weights, the fused op (float64, on `device`) agrees with the reference."""
    z, target = random_batch(n, c, seed, **MIXED)
    w = class_weights(c, seed + 1)
    x1 = z.to(device, copy=True).requires_grad_()
    x2 = z.clone().requires_grad_()
    lf = fused.fused_loss(x1, target.to(device), spec, reduction, IGNORE, weight=w.to(device))
    lr = reference_loss(x2, target, spec, reduction, IGNORE, weight=w)
    upstream = torch.randn(lr.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    (lf * upstream.to(device)).sum().backward()
    (lr * upstream).sum().backward()
    per_row = float(upstream.abs().max()) * float(w.max()) if upstream.numel() else 0.0
    if reduction == "mean":
        per_row /= float(w[target[target != IGNORE]].sum())
    what = f"{device} weighted {spec_id(spec)} N={n} C={c} {reduction}"
    assert_scaled_close(lf.detach().cpu(), lr.detach(), 1e-10, 1.0, "loss " + what)
    assert_scaled_close(x1.grad.cpu(), x2.grad, 1e-10, per_row * weight_scale(spec, c), "grad " + what)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("spec", ALL_SPECS, ids=spec_id)
def test_weighted_parity_every_spec(spec, reduction):
    """Every spec with per-class weights: the fused op agrees with the reference (float64), the
    paper forms' batch statistics included (they stay unweighted, LOSSES.md)."""
    for i, (n, c) in enumerate([(7, 10), (128, 100), (5, 1000)]):
        check_weighted_parity(spec, n, c, reduction, seed=40 + 10 * i)


def test_weights_change_the_loss_as_defined():
    """Unit weights change nothing; scaling every weight by k leaves the mean unchanged and
    multiplies the sum by k; a zero weight removes its class's rows from the sum."""
    spec = spec_for("nfl+rce", variant="paper")
    z, target = random_batch(64, 10, 8, **MIXED)
    plain = fused.fused_loss(z, target, spec, "none", IGNORE)
    ones = torch.ones(10, dtype=torch.float64)
    torch.testing.assert_close(fused.fused_loss(z, target, spec, "none", IGNORE, weight=ones), plain)
    w = class_weights(10, 9)
    for_mean = fused.fused_loss(z, target, spec, "mean", IGNORE, weight=w)
    torch.testing.assert_close(fused.fused_loss(z, target, spec, "mean", IGNORE, weight=3 * w), for_mean)
    torch.testing.assert_close(fused.fused_loss(z, target, spec, "sum", IGNORE, weight=3 * w),
                               3 * fused.fused_loss(z, target, spec, "sum", IGNORE, weight=w))
    drop = ones.clone()
    drop[target[0]] = 0
    kept = (target != target[0]) & (target != IGNORE)
    torch.testing.assert_close(fused.fused_loss(z, target, spec, "sum", IGNORE, weight=drop), plain[kept].sum())


def test_weighted_gradcheck():
    """gradcheck through the weighted op, every reduction (opcheck with weights: test_opcheck)."""
    spec = spec_for("nce+rce")
    w = class_weights(5, 2)
    g = torch.Generator().manual_seed(4)
    z = (torch.randn(6, 5, generator=g, dtype=torch.float64) * 2).requires_grad_()
    target = torch.tensor([0, 4, IGNORE, 2, 2, 1])
    for reduction in REDUCTIONS:
        assert torch.autograd.gradcheck(lambda x: fused.fused_loss(x, target, spec, reduction, IGNORE, weight=w), (z,))


def test_all_weight_zero_mean_is_nan():
    """'mean' over rows whose weights are all 0 is 0/0 = NaN, as F.cross_entropy."""
    z, target = random_batch(8, 10, 1, **MIXED)
    w = torch.zeros(10, dtype=torch.float64)
    assert math.isnan(fused.fused_loss(z, target, spec_for("ce"), "mean", IGNORE, weight=w).item())
    assert math.isnan(torch.nn.functional.cross_entropy(z, target, weight=w, ignore_index=IGNORE).item())


@pytest.mark.parametrize("weight,match", [
    (torch.ones(4), r"weight must be 1-D with one entry per class \(3\)"),
    (torch.ones(3, 1), r"weight must be 1-D"),
    (torch.ones(3, dtype=torch.int64), "weight must be a floating tensor"),
    (torch.ones(3, device="meta"), "weight is on meta"),
], ids=["length", "2-D", "int", "device"])
def test_bad_weight_is_rejected(weight, match):
    """By the operator itself and by the Python wrapper, as ValueError naming the problem."""
    with pytest.raises(ValueError, match=match):
        _call(Z, T, weight)
    with pytest.raises(ValueError, match=match):
        fused.fused_loss(Z, T, spec_for("ce"), weight=weight)


def test_weight_requiring_grad_is_rejected():
    """No gradient is computed for the weights, so a weight that asks for one is an error
    rather than a silently missing gradient."""
    w = torch.ones(3, requires_grad=True)
    with pytest.raises(ValueError, match="weight must not require grad"):
        _call(Z, T, w)
    with pytest.raises(ValueError, match="weight must not require grad"):
        fused.fused_loss(Z, T, spec_for("ce"), weight=w)
    with pytest.raises(ValueError, match="weight must not require grad"):
        reference_loss(Z, T, spec_for("ce"), weight=w)


def test_weighted_parity_devices(device):
    """Weighted losses on every available device (CUDA only where a GPU is present) agree with
    the reference on the CPU, every reduction, both CUDA row layouts included."""
    for i, (n, c) in enumerate([(7, 10), (33, 1025)]):
        for spec in (spec_for("ce"), spec_for("nfl+rce", variant="paper"), spec_for("nce+mae")):
            for reduction in REDUCTIONS:
                check_weighted_parity(spec, n, c, reduction, seed=60 + 10 * i, device=device)


# --------------------------------------------------------------------------- a second GPU

@requires_two_gpus
@pytest.mark.parametrize("spec", [spec_for("ce"), spec_for("nce+rce"), spec_for("nfl+rce", variant="paper"),
                                  spec_for("nce", variant="paper")], ids=spec_id)
def test_second_gpu_matches_first(spec):
    """Logits, target and weights on cuda:1 while cuda:0 is the current device: the op runs on
    the tensors' device (row kernels and batch step) and gives cuda:0's loss and gradient."""
    for c in (10, 2000):
        z, target = random_batch(64, c, seed=c, dtype=torch.float32, **MIXED)
        w = class_weights(c, c + 1, torch.float32)
        for reduction in REDUCTIONS:
            results = {}
            with torch.cuda.device(0):
                for dev in ("cuda:0", "cuda:1"):
                    x = z.to(dev).requires_grad_()
                    loss = fused.fused_loss(x, target.to(dev), spec, reduction, IGNORE, weight=w.to(dev))
                    loss.sum().backward()
                    assert loss.device == torch.device(dev) and x.grad.device == torch.device(dev)
                    assert torch.cuda.current_device() == 0, "the op changed the current device"
                    results[dev] = (loss.detach().cpu(), x.grad.cpu())
            (loss0, grad0), (loss1, grad1) = results["cuda:0"], results["cuda:1"]
            what = f"{spec_id(spec)} C={c} {reduction}"
            torch.testing.assert_close(loss1, loss0, msg=lambda m: f"loss {what}: {m}")
            torch.testing.assert_close(grad1, grad0, msg=lambda m: f"grad {what}: {m}")


# --------------------------------------------------------------------------- CUDA only

@pytest.fixture
def target_check_off():
    """The CUDA target check off (its default) during the test, whatever APL_SYNC_TARGET_CHECK says."""
    previous = fused.set_sync_target_check(False)
    yield
    fused.set_sync_target_check(previous)


@requires_cuda
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name,variant", NAME_VARIANTS)
def test_cuda_no_host_sync(name, variant, reduction, target_check_off):
    """Forward and backward of every loss module on CUDA never wait for the GPU: under
    torch.cuda.set_sync_debug_mode("error") any synchronizing call (.item(), a device-to-host
    copy, nonzero, ...) raises. Both CUDA row layouts, with ignored rows; the loss is checked
    against the reference afterwards."""
    spec = spec_for(name, variant=variant)
    for n, c in ((64, 10), (8, 2000)):
        loss_fn = get_loss(name, num_classes=c, variant=variant, reduction=reduction, backend="fused").cuda()
        z, target = random_batch(n, c, seed=c, dtype=torch.float32, device="cuda", **MIXED)
        z.requires_grad_()
        assert fused.cuda_launch_problem(z.device) == ""  # the once-per-device kernel probe syncs by design
        torch.cuda.synchronize()
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            loss = loss_fn(z, target)
            (loss.sum() if reduction == "none" else loss).backward()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
        assert z.grad is not None and z.grad.shape == z.shape
        expected = reference_loss(z.detach().cpu().double(), target.cpu(), spec, reduction, IGNORE)
        assert_scaled_close(loss.detach().cpu(), expected, TOL[torch.float32], 1.0, f"loss N={n} C={c}")


@requires_cuda
@pytest.mark.parametrize("name,variant", [("nce+rce", "ma2020"), ("nce+rce", "paper"), ("nfl", "paper")])
def test_cuda_graph_capture(name, variant, target_check_off):
    """One training step (a Linear model, the loss module, backward) captured in a CUDA graph and
    replayed on new batches gives the eager step's loss and gradients: the op does not sync
    during capture and bakes no batch value (the paper forms' H and B) into the graph."""
    n, d, c = 64, 32, 10
    torch.manual_seed(0)
    model = torch.nn.Linear(d, c).cuda()
    eager_model = copy.deepcopy(model)
    loss_fn = get_loss(name, num_classes=c, variant=variant, backend="fused").cuda()

    def batch(seed):
        x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) * 3
        _, y = random_batch(n, c, seed, ignore_frac=0.25)
        return x.cuda(), y.cuda()

    static_x, static_y = batch(0)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream before capture, as the CUDA-graphs docs require
        for _ in range(3):
            model.zero_grad(set_to_none=True)
            loss_fn(model(static_x), static_y).backward()
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    model.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        static_loss = loss_fn(model(static_x), static_y)
        static_loss.backward()

    for seed in (1, 2):
        x, y = batch(seed)
        if seed == 2:
            y = y.where(y == IGNORE, y % 2)  # two classes only: another label entropy H than at capture
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
        eager_model.zero_grad(set_to_none=True)
        eager_loss = loss_fn(eager_model(x), y)
        eager_loss.backward()
        torch.cuda.synchronize()
        torch.testing.assert_close(static_loss.detach(), eager_loss.detach(), msg=lambda m: f"loss, batch {seed}: {m}")
        for (pname, p), q in zip(model.named_parameters(), eager_model.parameters()):
            torch.testing.assert_close(p.grad, q.grad, msg=lambda m: f"{pname}.grad, batch {seed}: {m}")


@requires_cuda
def test_cuda_compile_reduce_overhead(target_check_off):
    """torch.compile(mode="reduce-overhead") of a function calling the nce+rce module: every call
    (warm-up, CUDA-graph recording, replay) matches eager in loss and gradient, and no graph was
    left out of CUDA graphs."""
    from torch._dynamo.utils import counters

    loss_fn = get_loss("nce+rce", num_classes=10, backend="fused").cuda()

    def step(z, y):
        return loss_fn(z * 2.0, y)

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(step, mode="reduce-overhead")
    for i in range(3):
        torch.compiler.cudagraph_mark_step_begin()
        z, y = random_batch(64, 10, seed=i, dtype=torch.float32, device="cuda", **MIXED)
        zc, ze = z.clone().requires_grad_(), z.clone().requires_grad_()
        out_c = compiled(zc, y)
        out_c.backward()
        out_e = step(ze, y)
        out_e.backward()
        torch.testing.assert_close(out_c.detach(), out_e.detach(), msg=lambda m: f"loss, call {i}: {m}")
        torch.testing.assert_close(zc.grad, ze.grad, msg=lambda m: f"grad, call {i}: {m}")
    assert counters["inductor"]["cudagraph_skips"] == 0, f"CUDA graphs skipped: {dict(counters['inductor'])}"


def count_cuda_launches(fn):
    """(count, names) of the kernels and memsets `fn` puts on the GPU, from torch.profiler; the
    other device events (memcpys, syncs, annotations) are not launches of ours."""
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events()
             if e.device_type == DeviceType.CUDA and e.activity_type in ("kernel", "gpu_memset")]
    return len(names), names


@requires_cuda
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name,variant", NAME_VARIANTS)
def test_cuda_launch_counts(name, variant, reduction, target_check_off):
    """One forward call (no grad) and one backward call launch exactly the kernels that
    apl.fused.launch_counts(spec, reduction) states, in both CUDA row layouts."""
    spec = spec_for(name, variant=variant)
    expected = tuple(fused.launch_counts(spec, reduction))
    for n, c in ((64, 10), (16, 2000)):
        z, target = random_batch(n, c, seed=c, dtype=torch.float32, device="cuda", **MIXED)
        z.requires_grad_()
        grad_out = torch.ones((n,) if reduction == "none" else (), device="cuda")
        for _ in range(2):  # warm-up: one-time set-up is not part of a step
            torch.autograd.grad(fused.fused_loss(z, target, spec, reduction), z, grad_out)
        with torch.no_grad():
            forward, forward_names = count_cuda_launches(lambda: fused.fused_loss(z, target, spec, reduction))
        loss = fused.fused_loss(z, target, spec, reduction)
        backward, backward_names = count_cuda_launches(lambda: torch.autograd.grad(loss, z, grad_out))
        assert (forward, backward) == expected, \
            f"N={n} C={c}: forward {forward_names}, backward {backward_names}; launch_counts says {expected}"


_SYNC_CHECK_SCRIPT = r"""
import os, re, torch, apl.fused as fused
from apl.losses.spec import spec_for
spec = spec_for("nce+rce")
z = torch.randn(4, 3, device="cuda")
assert fused.set_sync_target_check(True) is False, "the switch is not off by default"
try:
    for bad, row in (([0, 1, 7, 0], 2), ([0, -3, 2, 0], 1)):
        try:
            fused.fused_loss(z, torch.tensor(bad, device="cuda"), spec)
        except ValueError as exc:
            assert re.search(rf"target {bad[row]} \(row {row}\)", str(exc)), str(exc)
        else:
            raise AssertionError(f"target {bad[row]} (row {row}) was accepted")
    fused.fused_loss(z, torch.tensor([0, 1, -100, 2], device="cuda"), spec)  # in-range and ignored pass
finally:
    fused.set_sync_target_check(False)
assert fused.set_sync_target_check(False) is False, "the switch was not restored"
fused.fused_loss(z, torch.tensor([0, 1, -100, 2], device="cuda"), spec)
torch.cuda.synchronize()
print("checked", flush=True)
try:  # last: without the switch a bad target is a device-side assert, which ends the CUDA context
    fused.fused_loss(z, torch.tensor([0, 1, 7, 0], device="cuda"), spec)
    torch.cuda.synchronize()
except RuntimeError:
    print("device-assert", flush=True)
else:
    print("silent", flush=True)
os._exit(0)
"""


@requires_cuda
def test_cuda_sync_target_check():
    """apl.fused.set_sync_target_check(True) makes an out-of-range target on CUDA raise a
    ValueError naming its row and value (valid and ignored targets still pass); off (the
    default) a bad target is a device-side error, never a silent result. In a subprocess, so
    that device-side assert cannot break the CUDA context of the other tests."""
    env = {k: v for k, v in os.environ.items() if k != "APL_SYNC_TARGET_CHECK"}
    out = subprocess.run([sys.executable, "-c", _SYNC_CHECK_SCRIPT], env=env, cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert out.stdout.split() == ["checked", "device-assert"], out.stdout + out.stderr[-3000:]


# --------------------------------------------------------------------------- the eager entry and the autograd node

def test_eager_entry_takes_any_integer_target_and_layout():
    """Modules call the op through apl._C.loss: int32/uint8 targets and non-contiguous logits give
    the int64, contiguous result (value and gradient)."""
    z, target = random_batch(9, 12, seed=90)
    loss_fn = get_loss("nce+rce", num_classes=12, backend="fused")
    want_x = z.clone().requires_grad_()
    want = loss_fn(want_x, target)
    want.backward()
    for t in (target.int(), target.to(torch.uint8)):
        x = z.t().contiguous().t().requires_grad_()  # same values, column-major
        got = loss_fn(x, t)
        got.backward()
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        torch.testing.assert_close(x.grad, want_x.grad, rtol=0, atol=0)


def test_torch_function_modes_and_subclasses_see_the_op():
    """A tensor subclass or an active TorchFunctionMode takes the torch.ops path, so
    __torch_function__ sees apl_loss, with the same result."""
    seen = []

    class Spy(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(getattr(func, "__name__", str(func)))
            return func(*args, **(kwargs or {}))

    class Sub(torch.Tensor):
        pass

    z, target = random_batch(6, 10, seed=91)
    loss_fn = get_loss("ce", backend="fused")
    want = loss_fn(z, target)
    with Spy():
        got = loss_fn(z, target)
    assert any("apl_loss" in name for name in seen), seen
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(loss_fn(z.as_subclass(Sub), target), want, rtol=0, atol=0)


def test_autograd_node_saves_safely():
    """The loss's grad_fn is the op's node; it guards its saved logits against in-place change,
    frees them after backward, and refuses forward-mode AD with a clear error."""
    z, target = random_batch(5, 10, seed=92)
    x = z.clone().requires_grad_()
    y = x * 1.0
    loss = fused.fused_loss(y, target, spec_for("nfl+rce"))
    assert loss.grad_fn.name() == "AplLossBackward"
    y.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    loss = fused.fused_loss(x, target, spec_for("ce"))
    loss.backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.backward()
    with fwAD.dual_level():
        dual = fwAD.make_dual(z, torch.ones_like(z))
        with pytest.raises(RuntimeError, match="forward-mode AD is not supported"):
            fused.fused_loss(dual, target, spec_for("ce"))


def test_python_and_cpp_agree_on_the_abi(monkeypatch):
    """apl.losses.spec.Kind is the C++ kind table (names by code), and the stats/batch sizes come from
    C++; a Kind that differs makes the extension unusable with a reason, not wrong numbers."""
    assert list(torch.ops.apl._kind_names()) == [k.name for k in Kind]
    assert (fused.NUM_STATS, fused.NUM_BATCH) == tuple(torch.ops.apl._layout())
    assert fused._abi_mismatch() == ""
    monkeypatch.setattr(fused, "Kind", enum.IntEnum("Kind", [("NONE", 0), ("CE", 1)]))
    assert "built from other sources" in fused._abi_mismatch()
