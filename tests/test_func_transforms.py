"""torch.func's transforms through every public loss on both backends, as F.cross_entropy supports them:
``grad`` and ``vjp`` equal plain autograd, ``vmap(grad)`` (per-sample gradients, Opacus-style) equals a
loop of per-sample autograd, ``jacrev`` equals autograd's Jacobian. The fused operator's autograd is
plain nodes and its vmap rule runs each sample's call (apl/losses/fused.py), the reference is plain
torch ops: neither warns about a missing batching rule.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from conftest import BACKENDS, LOSS_CASES, random_batch
from torch.func import grad, jacrev, vjp, vmap

import apl.functional as AF
from apl.losses import get_loss

C, N = 7, 5


def _batch(seed=0):
    z, y = random_batch(N, C, seed, scale=2.0)
    return z, y


def _autograd(fn, z, y):
    x = z.clone().requires_grad_()
    (g,) = torch.autograd.grad(fn(x, y), x)
    return g


@pytest.fixture(autouse=True)
def _no_fallback_warning():
    """A missing batching rule shows as a warning (functorch's slow fallback): none may appear."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*batching rule.*")
        yield


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name, variant", LOSS_CASES)
def test_grad_and_per_sample_grads_of_every_module(name, variant, backend):
    loss_fn = get_loss(name, num_classes=C, variant=variant, backend=backend)
    z, y = _batch()
    torch.testing.assert_close(grad(lambda x: loss_fn(x, y))(z), _autograd(loss_fn, z, y), rtol=1e-10, atol=1e-12)
    # per sample: each row its own batch of one, as vmap hands it to the loss (unbatched (C,), 0-D target)
    per_sample = vmap(grad(lambda x, t: loss_fn(x, t)))(z, y)
    want = torch.stack([_autograd(loss_fn, z[i], y[i]) for i in range(N)])
    torch.testing.assert_close(per_sample, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name, variant", LOSS_CASES)
def test_vjp_and_jacrev_of_every_module(name, variant, backend):
    loss_fn = get_loss(name, num_classes=C, variant=variant, reduction="none", backend=backend)
    z, y = _batch(1)
    jac = jacrev(lambda x: loss_fn(x, y))(z)
    want = torch.autograd.functional.jacobian(lambda x: loss_fn(x, y), z)
    torch.testing.assert_close(jac, want, rtol=1e-10, atol=1e-12)
    cotangent = torch.randn(N, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    value, pullback = vjp(lambda x: loss_fn(x, y), z)
    torch.testing.assert_close(value, loss_fn(z, y))
    torch.testing.assert_close(pullback(cotangent)[0], torch.einsum("n,nk...->k...", cotangent, want),
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "reference"])
@pytest.mark.parametrize("name", sorted(AF.__all__))
def test_per_sample_grads_of_every_function(name, fused):
    fn = getattr(AF, name)
    z, y = _batch(3)
    per_sample = vmap(grad(lambda x, t: fn(x, t, fused=fused)))(z, y)
    want = torch.stack([_autograd(lambda x, t: fn(x, t, fused=fused), z[i], y[i]) for i in range(N)])
    torch.testing.assert_close(per_sample, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vmap_of_batches_keeps_each_batch_statistic(backend):
    """vmap over whole batches: the paper forms' batch statistic and the mean belong to each batch."""
    loss_fn = get_loss("nfl+rce", num_classes=C, variant="paper", backend=backend)
    zs = torch.stack([random_batch(N, C, seed)[0] for seed in range(3)])
    ys = torch.stack([random_batch(N, C, seed)[1] for seed in range(3)])
    torch.testing.assert_close(vmap(loss_fn)(zs, ys), torch.stack([loss_fn(z, y) for z, y in zip(zs, ys)]))
    grads = vmap(grad(lambda z, y: loss_fn(z, y)))(zs, ys)
    torch.testing.assert_close(grads, torch.stack([_autograd(loss_fn, z, y) for z, y in zip(zs, ys)]))
