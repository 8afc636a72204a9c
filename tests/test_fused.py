"""Tests of the fused loss operator (apl.fused, csrc/): parity with the pure-PyTorch reference,
gradients, registration (opcheck, torch.compile, meta), bad input and NaN handling.

Ground truth is ``apl.losses.reference_loss`` (LOSSES.md). float32 results of the operator are
compared with the reference evaluated in float64 on the same (float32-rounded) inputs, so the
tolerance measures the operator's own rounding. Tolerances are relative to a scale: the largest
expected value, or the natural size of a gradient (upstream gradient times the terms' weights),
whichever is larger.
"""
import math
import os
import subprocess
import sys

import pytest
import torch

import apl.fused as fused
from apl.losses import reference_loss
from apl.spec import RCE_A, Kind, LossSpec, spec_for

pytestmark = pytest.mark.skipif(not fused.is_available(),
                                reason=f"fused operator not built: {fused.unavailable_reason()}")

IGNORE = -100
REDUCTIONS = ("none", "mean", "sum")
# Every kind as the active term alone, then the APL sums (both weightings) and SCE.
SINGLE = [LossSpec(k) for k in Kind if k != Kind.NONE]
SUMS = [spec_for(n, variant=v) for n in ("nce+mae", "nce+rce", "nfl+mae", "nfl+rce")
        for v in ("ma2020", "paper")] + [spec_for("sce")]
ALL_SPECS = SINGLE + SUMS
# Kinds with detached weights: their autograd gradient is by definition not the derivative.
DETACHED = (Kind.FL_DETACHED, Kind.NFL_MA2020)

cuda_ok = torch.cuda.is_available() and fused.cuda_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not cuda_ok, reason="needs a GPU and the extension built with its CUDA kernels"))]


def spec_id(spec):
    """Readable test id of a spec."""
    name = spec.active.name + ("+" + spec.passive.name if spec.passive != Kind.NONE else "")
    return f"{name}(a={spec.alpha:g},b={spec.beta:g})"


def make_batch(n, c, seed, *, ignore_frac=0.25):
    """float64 logits mixing regimes row by row, and targets with some ignored rows.

    Rows have logit scales 1, 5, 30 or 1e4 (p_y rounds to 0 or 1 at the larger ones), and a
    fifth of the rows have a dominating target logit. The first row is never ignored.
    """
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, c, generator=g, dtype=torch.float64)
    scales = torch.tensor([1.0, 5.0, 30.0, 1e4], dtype=torch.float64)
    z = z * scales[torch.randint(0, 4, (n,), generator=g)][:, None]
    target = torch.randint(0, c, (n,), generator=g)
    rows = torch.arange(n)
    dominant = torch.rand(n, generator=g) < 0.2
    z[rows[dominant], target[dominant]] = z[dominant].amax(dim=1) + 40.0
    ignored = torch.rand(n, generator=g) < ignore_frac
    ignored[0] = False
    target[ignored] = IGNORE
    return z, target


def class_weights(c, seed, dtype=torch.float64):
    """Positive per-class weights spread over two orders of magnitude."""
    g = torch.Generator().manual_seed(seed)
    return (10 ** (2 * torch.rand(c, generator=g, dtype=torch.float64) - 1)).to(dtype)


def weight_scale(spec):
    """Size of the gradient coefficients of a spec: |alpha| + |beta| (x A for RCE terms)."""
    a = abs(spec.alpha) * (RCE_A if spec.active == Kind.RCE else 1.0)
    b = abs(spec.beta) * (RCE_A if spec.passive == Kind.RCE else 1.0)
    return a + b


def run_both(spec, z, target, reduction, dtype, device="cpu", ref_dtype=torch.float64):
    """Loss and gradient of the fused op (in `dtype`) and of the reference (in `ref_dtype` on the
    same rounded inputs), with the same random upstream gradient. Returns both pairs and the
    upstream gradient's size per row."""
    z_in = z.to(dtype)
    z_fused = z_in.to(device, copy=True).requires_grad_()
    z_ref = z_in.to(ref_dtype, copy=True).requires_grad_()
    loss_f = fused.fused_loss(z_fused, target.to(device), spec, reduction, IGNORE)
    loss_r = reference_loss(z_ref, target, spec, reduction, IGNORE)
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
    """The fused op agrees with the reference in value and gradient."""
    tol = {torch.float64: 1e-10, torch.float32: 1e-5}[dtype]
    z, target = make_batch(n, c, seed)
    (lf, gf), (lr, gr), per_row = run_both(spec, z, target, reduction, dtype, device)
    assert lf.dtype == dtype and gf.dtype == dtype
    assert_scaled_close(lf, lr, tol, 1.0, f"loss {spec_id(spec)} N={n} C={c} {reduction} {dtype}")
    assert_scaled_close(gf, gr, tol, per_row * weight_scale(spec),
                        f"grad {spec_id(spec)} N={n} C={c} {reduction} {dtype}")


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


@pytest.mark.parametrize("spec", [spec_for("ce"), spec_for("nce+rce")], ids=spec_id)
def test_parity_huge_c(spec):
    """C = 128000 works (no size limit in the row kernels)."""
    check_parity(spec, 3, 128000, "none", torch.float32, seed=5)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 3e-3), (torch.bfloat16, 2e-2)], ids=["f16", "bf16"])
@pytest.mark.parametrize("spec", [spec_for("ce"), spec_for("nce+rce"), spec_for("nfl+mae", variant="paper"),
                                  spec_for("gce"), LossSpec(Kind.NFL_MA2020)], ids=spec_id)
def test_parity_half_types(spec, dtype, tol):
    """float16/bfloat16 logits are computed in float32: compare with the float32 reference on the
    same rounded inputs; only the final rounding to the input dtype differs."""
    g = torch.Generator().manual_seed(11)
    z = torch.randn(64, 50, generator=g, dtype=torch.float64) * 4
    target = torch.randint(0, 50, (64,), generator=g)
    target[::5] = IGNORE
    for reduction in REDUCTIONS:
        (lf, gf), (lr, gr), per_row = run_both(spec, z, target, reduction, dtype, ref_dtype=torch.float32)
        assert lf.dtype == dtype and gf.dtype == dtype
        assert_scaled_close(lf, lr, tol, 1.0, f"loss {reduction}")
        assert_scaled_close(gf, gr, tol, per_row * weight_scale(spec), f"grad {reduction}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spec", [spec_for("ce"), spec_for("nce+rce"), spec_for("nfl+rce"),
                                  spec_for("nfl+mae", variant="paper"), spec_for("nce+rce", variant="paper"),
                                  spec_for("gce"), spec_for("fl", variant="paper")], ids=spec_id)
def test_parity_devices(spec, device):
    """The same parity on every available device (CUDA only where a GPU is present), both
    row-kernel layouts there (a warp per row for C <= 1024, a block per row above)."""
    shapes = [(7, 10), (128, 1000), (33, 1025), (16, 32000)]
    if device == "cuda":
        shapes.append((4, 128000))
    for i, (n, c) in enumerate(shapes):
        for dtype in (torch.float64, torch.float32):
            check_parity(spec, n, c, "mean", dtype, seed=i, device=device)
    if device == "cuda":
        (lf, gf), (lr, gr), per_row = run_both(spec, *make_batch(64, 300, 9), "none", torch.bfloat16,
                                               device, ref_dtype=torch.float32)
        assert_scaled_close(lf, lr, 2e-2, 1.0, "bf16 loss")
        assert_scaled_close(gf, gr, 2e-2, per_row * weight_scale(spec), "bf16 grad")


def test_parity_hypothesis():
    """Random shapes, scales, kinds, weights and reductions agree with the reference (float64)."""
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies

    passive_kinds = [Kind.NONE, Kind.CE, Kind.FL, Kind.FL_DETACHED, Kind.MAE, Kind.RCE, Kind.GCE]

    @hypothesis.settings(max_examples=60, deadline=None, derandomize=True)
    @hypothesis.given(n=st.integers(1, 40), c=st.integers(2, 70), seed=st.integers(0, 2**31 - 1),
                      active=st.sampled_from([k for k in Kind if k != Kind.NONE]),
                      passive=st.sampled_from(passive_kinds),
                      alpha=st.floats(-2, 10), beta=st.floats(-2, 10), gamma=st.sampled_from([0.0, 0.5, 2.0]),
                      q=st.sampled_from([0.1, 0.7, 1.0]), reduction=st.sampled_from(REDUCTIONS))
    def prop(n, c, seed, active, passive, alpha, beta, gamma, q, reduction):
        spec = LossSpec(active, passive, alpha, beta if passive != Kind.NONE else 0.0, gamma, q)
        z, target = make_batch(n, c, seed)
        (lf, gf), (lr, gr), per_row = run_both(spec, z, target, reduction, torch.float64)
        assert_scaled_close(lf, lr, 1e-9, 1.0, "loss")
        assert_scaled_close(gf, gr, 1e-9, per_row * max(weight_scale(spec), 1.0), "grad")

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


def _op_args(spec, reduction, dtype=torch.float64, n=8, c=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, c, generator=g, dtype=dtype, requires_grad=True)
    target = torch.randint(0, c, (n,), generator=g)
    target[1] = IGNORE
    return (z, target, int(spec.active), int(spec.passive), spec.alpha, spec.beta, spec.gamma, spec.q,
            fused.REDUCTION_CODES[reduction], IGNORE)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("spec", [spec_for("ce"), spec_for("nce+rce"), spec_for("nfl+rce"),
                                  spec_for("nfl+mae", variant="paper"), spec_for("nce", variant="paper")],
                         ids=spec_id)
def test_opcheck(spec, reduction):
    """Schema, autograd registration, fake tensor kernel and AOT dispatch (dynamic shapes) of
    both operators."""
    args = _op_args(spec, reduction)
    torch.library.opcheck(torch.ops.apl.apl_loss.default, args)
    loss, stats = torch.ops.apl.apl_loss(*args)
    grad_loss = torch.randn(loss.shape, dtype=loss.dtype)
    torch.library.opcheck(torch.ops.apl.apl_loss_backward.default,
                          (grad_loss, args[0].detach(), args[1], stats) + args[2:],
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
    loss, stats = torch.ops.apl.apl_loss(z, t, 4, 9, 1.0, 1.0, 0.5, 0.7, fused.REDUCTION_CODES[reduction], IGNORE)
    assert stats.shape == (6, fused.NUM_STATS) and stats.dtype == torch.float32


def test_double_backward_raises():
    """Second derivatives are not supported, and say so instead of returning zeros."""
    z = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    loss = fused.fused_loss(z, torch.tensor([0, 1, 2, 0]), spec_for("nce+rce"))
    (grad,) = torch.autograd.grad(loss, z, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        grad.sum().backward()


# --------------------------------------------------------------------------- edge cases

# NaN columns per row: the target's own (row 0), then, at C = 1000, one in each of the max
# pass's accumulator chains for float32 and float64 vectors, its tail and the partial vector.
NAN_COLUMNS = {6: [1, 5], 1000: [1, 13, 29, 37, 53, 970, 999]}


@pytest.mark.parametrize("c, dtype", [(6, torch.float64), (6, torch.float32), (1000, torch.float64),
                                      (1000, torch.float32)])
@pytest.mark.parametrize("spec", ALL_SPECS, ids=spec_id)
def test_nan_logits_give_nan(spec, c, dtype):
    """A NaN logit (in the target's column or elsewhere) makes that row's loss NaN, and the mean
    NaN; the other rows are unaffected (the batch statistic of NFL_PAPER spreads it, as in the
    reference). C = 6 and 1000 run the two forward layouts."""
    z = torch.randn(8, c, dtype=torch.float64).to(dtype)
    target = torch.tensor([1, 2, 3, 4, 0, 0, 0, 0])
    for row, col in enumerate(NAN_COLUMNS[c]):
        z[row, col] = float("nan")
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    for reduction in ("none", "mean", "sum"):
        out = fused.fused_loss(z, target, spec, reduction)
        expected = reference_loss(z, target, spec, reduction)
        assert out.isnan().any(), f"{reduction}: a NaN logit gave a finite loss {out}"
        assert torch.equal(out.isnan(), expected.isnan())
        torch.testing.assert_close(out.nan_to_num(0.0), expected.nan_to_num(0.0), rtol=tol, atol=tol)
    x, xr = z.clone().requires_grad_(), z.clone().requires_grad_()
    (grad,) = torch.autograd.grad(fused.fused_loss(x, target, spec, "sum"), x)
    (grad_ref,) = torch.autograd.grad(reference_loss(xr, target, spec, "sum"), xr)
    assert torch.equal(grad.isnan().any(dim=1), grad_ref.isnan().any(dim=1)), "rows with a NaN gradient differ"


@pytest.mark.parametrize("spec", [spec_for("nce+rce"), spec_for("nfl+rce", variant="paper"),
                                  spec_for("nce", variant="paper")], ids=spec_id)
def test_all_rows_ignored(spec):
    """No valid row: mean is NaN (like F.cross_entropy), sum 0, none all 0, gradient 0."""
    z = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    target = torch.full((3,), IGNORE)
    assert fused.fused_loss(z, target, spec, "mean").isnan()
    assert fused.fused_loss(z, target, spec, "sum").item() == 0.0
    assert torch.equal(fused.fused_loss(z, target, spec, "none"), torch.zeros(3, dtype=torch.float64))
    fused.fused_loss(z, target, spec, "sum").backward()
    assert torch.equal(z.grad, torch.zeros_like(z))


def test_empty_batch():
    """N = 0: 'none' is empty, 'sum' 0, 'mean' NaN."""
    z = torch.empty(0, 5, requires_grad=True)
    target = torch.empty(0, dtype=torch.int64)
    spec = spec_for("nce+rce")
    assert fused.fused_loss(z, target, spec, "none").shape == (0,)
    assert fused.fused_loss(z, target, spec, "sum").item() == 0.0
    assert fused.fused_loss(z, target, spec, "mean").isnan()
    fused.fused_loss(z, target, spec, "sum").backward()
    assert z.grad.shape == (0, 5)


def test_paper_edge_cases():
    """NCE_PAPER with one class in the batch uses H = ln C; NFL_PAPER with every p_y = 1 is 0 with
    zero gradient (LOSSES.md, defined edge cases)."""
    z = torch.randn(5, 7, dtype=torch.float64)
    target = torch.tensor([3, 3, IGNORE, 3, 3])
    ce = torch.nn.functional.cross_entropy(z, target, ignore_index=IGNORE)
    nce = fused.fused_loss(z, target, spec_for("nce", variant="paper"))
    torch.testing.assert_close(nce, ce / math.log(7), rtol=1e-12, atol=0)

    z = torch.zeros(4, 3, dtype=torch.float64)
    z[torch.arange(4), torch.tensor([0, 1, 2, 0])] = 1e4
    z.requires_grad_()
    loss = fused.fused_loss(z, torch.tensor([0, 1, 2, 0]), spec_for("nfl", variant="paper"))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(z.grad, torch.zeros_like(z))


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
    z, target = make_batch(300, 700, 4)
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
from apl.spec import spec_for
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

def _call(z, t, active=1, passive=0, alpha=1.0, beta=0.0, gamma=0.5, q=0.7, reduction=1, ignore_index=IGNORE,
          weight=None):
    return torch.ops.apl.apl_loss(z, t, active, passive, alpha, beta, gamma, q, reduction, ignore_index, weight)


Z = torch.randn(4, 3)
T = torch.tensor([0, 1, 2, 0])


@pytest.mark.parametrize("args,match", [
    ((Z, torch.tensor([0, 1, 3, 0])), r"target 3 \(row 2\) is out of range for C=3"),
    ((Z, torch.tensor([0, -1, 2, 0])), r"target -1 \(row 1\) is out of range"),
    ((Z, torch.tensor([0, -100, 2, 0]), 1, 0, 1.0, 0.0, 0.5, 0.7, 1, -1), r"target -100 .*ignore_index=-1"),
    ((Z.long(), T), "logits must be a floating tensor"),
    ((Z, T.float()), "target must be an int64 tensor"),
    ((Z, T.int()), "target must be an int64 tensor"),
    ((Z[0], T), r"logits must be 2-D"),
    ((Z.unsqueeze(0), T), r"logits must be 2-D"),
    ((Z, T[None]), r"target must be 1-D"),
    ((Z, T[:3]), r"logits have N=4 rows but target has 3"),
    ((Z[:, :1], T * 0), r"at least 2 classes"),
    ((torch.randn(3, 4).t(), T), "logits must be contiguous"),
    ((Z, torch.tensor([0, 0, 1, 1, 2, 2, 0, 0])[::2]), "target must be contiguous"),
    ((Z, T, 0), "active kind 0 is not a loss kind"),
    ((Z, T, 11), "active kind 11 is not a loss kind"),
    ((Z, T, 1, 4, 1.0, 1.0), r"passive kind 4 \(NCE_MA2020\) is not supported"),
    ((Z, T, 1, 7, 1.0, 1.0), r"passive kind 7 \(NFL_PAPER\) is not supported"),
    ((Z, T, 2, 0, 1.0, 0.0, -0.5), "gamma must be finite and >= 0"),
    ((Z, T, 10, 0, 1.0, 0.0, 0.5, 0.0), r"q must be in \(0, 1\]"),
    ((Z, T, 10, 0, 1.0, 0.0, 0.5, 1.5), r"q must be in \(0, 1\]"),
    ((Z, T, 1, 0, float("inf")), "alpha and beta must be finite"),
    ((Z, T, 1, 0, 1.0, 0.0, 0.5, 0.7, 3), "reduction must be 0"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_op_rejects_bad_input(args, match):
    """The operator itself raises ValueError naming the problem (before reading the logits)."""
    with pytest.raises(ValueError, match=match):
        _call(*args)


def test_backward_op_rejects_bad_input():
    """apl_loss_backward checks its stats and gradient shapes and the target range."""
    loss, stats = _call(Z, T)
    base = (Z, T, stats, 1, 0, 1.0, 0.0, 0.5, 0.7, 1, IGNORE)
    with pytest.raises(ValueError, match="stats must have shape"):
        torch.ops.apl.apl_loss_backward(loss, Z, T, stats[:, :5].contiguous(), *base[3:])
    with pytest.raises(ValueError, match="stats must have dtype"):
        torch.ops.apl.apl_loss_backward(loss, Z, T, stats.double(), *base[3:])
    with pytest.raises(ValueError, match="grad_loss must be a scalar"):
        torch.ops.apl.apl_loss_backward(torch.ones(4), *base)
    with pytest.raises(ValueError, match=r"grad_loss must have shape \(4\)"):
        torch.ops.apl.apl_loss_backward(torch.ones(()), Z, T, stats, 1, 0, 1.0, 0.0, 0.5, 0.7, 0, IGNORE)
    with pytest.raises(ValueError, match="out of range"):
        torch.ops.apl.apl_loss_backward(loss, Z, torch.tensor([0, 1, 5, 0]), stats, *base[3:])


def test_wrapper_rejects_bad_input():
    """fused_loss reports shape/dtype problems and out-of-range targets as ValueError too."""
    spec = spec_for("nce+rce")
    with pytest.raises(ValueError, match="out of range"):
        fused.fused_loss(Z, torch.tensor([0, 1, 7, 0]), spec)
    with pytest.raises(ValueError, match="2-D"):
        fused.fused_loss(Z[0], T, spec)
    with pytest.raises(ValueError, match="reduction"):
        fused.fused_loss(Z, T, spec, "avg")
    with pytest.raises(ValueError, match="LossSpec"):
        fused.fused_loss(Z, T, "nce+rce")
    unsupported = LossSpec(Kind.CE, Kind.NCE_MA2020, 1.0, 1.0)
    assert not fused.supports(unsupported) and all(fused.supports(s) for s in ALL_SPECS)
    with pytest.raises(ValueError, match="passive term"):
        fused.fused_loss(Z, T, unsupported)


# --------------------------------------------------------------------------- per-class weights

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_weighted_ce_matches_f_cross_entropy(reduction, dtype):
    """CE with per-class weights is F.cross_entropy(weight=...): the loss rows are scaled by
    their target's weight and 'mean' divides by the sum of those weights (ignored rows out)."""
    z, target = make_batch(128, 100, 5)
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
    z, target = make_batch(n, c, seed)
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
    assert_scaled_close(x1.grad.cpu(), x2.grad, 1e-10, per_row * weight_scale(spec), "grad " + what)


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
    z, target = make_batch(64, 10, 8)
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


def test_weighted_gradcheck_and_opcheck():
    """gradcheck through the weighted op (every reduction) and opcheck with a weight argument."""
    spec = spec_for("nce+rce")
    w = class_weights(5, 2)
    g = torch.Generator().manual_seed(4)
    z = (torch.randn(6, 5, generator=g, dtype=torch.float64) * 2).requires_grad_()
    target = torch.tensor([0, 4, IGNORE, 2, 2, 1])
    for reduction in REDUCTIONS:
        assert torch.autograd.gradcheck(lambda x: fused.fused_loss(x, target, spec, reduction, IGNORE, weight=w), (z,))
        args = _op_args(spec, reduction) + (w,)
        torch.library.opcheck(torch.ops.apl.apl_loss.default, args)
        loss, stats = torch.ops.apl.apl_loss(*args)
        torch.library.opcheck(torch.ops.apl.apl_loss_backward.default,
                              (torch.ones_like(loss), args[0].detach(), args[1], stats) + args[2:],
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_all_weight_zero_mean_is_nan():
    """'mean' over rows whose weights are all 0 is 0/0 = NaN, as F.cross_entropy."""
    z, target = make_batch(8, 10, 1)
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
        _call(Z, T, 1, 0, 1.0, 0.0, 0.5, 0.7, 1, IGNORE, weight)
    with pytest.raises(ValueError, match=match):
        fused.fused_loss(Z, T, spec_for("ce"), weight=weight)


def test_weight_requiring_grad_is_rejected():
    """No gradient is computed for the weights, so a weight that asks for one is an error
    rather than a silently missing gradient."""
    w = torch.ones(3, requires_grad=True)
    with pytest.raises(ValueError, match="weight must not require grad"):
        _call(Z, T, 1, 0, 1.0, 0.0, 0.5, 0.7, 1, IGNORE, w)
    with pytest.raises(ValueError, match="weight must not require grad"):
        fused.fused_loss(Z, T, spec_for("ce"), weight=w)
    with pytest.raises(ValueError, match="weight must not require grad"):
        reference_loss(Z, T, spec_for("ce"), weight=w)


@pytest.mark.parametrize("device", DEVICES)
def test_weighted_parity_devices(device):
    """Weighted losses on every available device (CUDA only where a GPU is present) agree with
    the reference on the CPU, both CUDA row layouts included."""
    for i, (n, c) in enumerate([(7, 10), (33, 1025)]):
        for spec in (spec_for("ce"), spec_for("nfl+rce", variant="paper"), spec_for("nce+mae")):
            check_weighted_parity(spec, n, c, "mean", seed=60 + 10 * i, device=device)
