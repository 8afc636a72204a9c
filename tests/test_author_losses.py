"""The ``author`` form of every loss against formulas written directly from the facts of the
seed paper's code (docs/sources.md#the-authors-code), through the public entry points: the
``get_loss`` modules and ``apl.functional``, reference and fused backends, on the CPU.

The facts' formulas keep the author's ``1e-8`` terms (inside the focal losses' log, in the NCE
and NFL denominators); the project drops them (LOSSES.md "Three forms"), which changes a value
by less than ``1e-8 / p_y`` relative: the batches here keep p_y above 1e-4, where that is far
below the tolerance, and one test checks the bound LOSSES.md states.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import BACKENDS

import apl.functional as AF
from apl.losses import get_loss
from apl.losses.spec import AUTHOR_LAMBDA, DEFAULT_GAMMA, Kind, spec_for

EPS = 1e-8  # the author's epsilon
GAMMA = 2.0
CLASSES = (10, 7, 100)


# --------------------------------------------------------------------------- the facts, as written

def fact_fl(z, y):
    p = torch.softmax(z, dim=1).gather(1, y[:, None]).squeeze(1)
    return (-(1 - p) ** GAMMA * torch.log(p + EPS)).mean()


def fact_nce(z, y):
    numerator = -torch.log_softmax(z, dim=1).gather(1, y[:, None]).squeeze(1).mean()
    share = F.one_hot(y, z.shape[1]).to(z.dtype).mean(dim=0)
    entropy = -(share * torch.log(share + EPS)).sum()
    return numerator / (entropy + EPS)


def fact_nfl(z, y):
    p = torch.softmax(z, dim=1).gather(1, y[:, None]).squeeze(1)
    w = (1 - p) ** GAMMA
    return (-w * torch.log(p + EPS)).mean() / (w.mean() + EPS)


def fact_mae(z, y):
    return (torch.softmax(z, dim=1) - F.one_hot(y, z.shape[1]).to(z.dtype)).abs().mean()


def fact_rce(z, y):
    c = z.shape[1]
    t = torch.full_like(z, 0.1 / (c - 1)).scatter(1, y[:, None], 0.9).clamp(1e-7, 1 - 1e-7)
    return -(torch.softmax(z, dim=1) * torch.log(t)).sum(dim=1).mean()


FACTS = {"ce": lambda z, y: F.cross_entropy(z, y), "fl": fact_fl, "nce": fact_nce, "nfl": fact_nfl,
         "mae": fact_mae, "rce": fact_rce}
for _act in ("nce", "nfl"):
    for _pas in ("mae", "rce"):
        # the author's APL: (1 - a) active + a passive with a = 0.6
        FACTS[f"{_act}+{_pas}"] = (lambda act, pas: lambda z, y: 0.4 * FACTS[act](z, y) + 0.6 * FACTS[pas](z, y))(
            _act, _pas)


def batch(c, seed, n=64, dtype=torch.float64, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(n, c, generator=g, dtype=torch.float64) * scale).to(dtype)
    return z, torch.randint(0, c, (n,), generator=g)


def epsilon_bound(z, y):
    """LOSSES.md's bound on the effect of the dropped 1e-8 terms: 2e-8 / min p_y, relative."""
    return 2 * EPS / float(torch.softmax(z, dim=1).gather(1, y[:, None]).min())


def value_and_grad(fn, z, y):
    z = z.detach().clone().requires_grad_()
    loss = fn(z, y)
    (grad,) = torch.autograd.grad(loss, z)
    return loss.detach(), grad


# --------------------------------------------------------------------------- tests

@pytest.mark.parametrize("c", CLASSES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(FACTS))
def test_module_matches_the_facts(name, backend, c):
    """get_loss(name, variant="author") gives the author's value and gradient (float64)."""
    z, y = batch(c, seed=c)
    module = get_loss(name, num_classes=c, variant="author", backend=backend)
    loss, grad = value_and_grad(module, z, y)
    want_loss, want_grad = value_and_grad(FACTS[name], z, y)
    rtol = 1e-9 + epsilon_bound(z, y)
    torch.testing.assert_close(loss, want_loss, rtol=rtol, atol=1e-12)
    # entries are compared on the scale of the largest one (small entries come from cancellations)
    torch.testing.assert_close(grad, want_grad, rtol=rtol, atol=rtol * float(want_grad.abs().max()))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(FACTS))
def test_functional_matches_the_facts_float32(name, backend):
    """apl.functional.<name>(..., variant="author") in float32 (the author trained in float32)."""
    z, y = batch(10, seed=3, dtype=torch.float32)
    fn = getattr(AF, name.replace("+", "_"))
    kwargs = {} if name == "ce" else {"variant": "author"}
    loss, grad = value_and_grad(lambda a, b: fn(a, b, fused=backend == "fused", **kwargs), z, y)
    want_loss, want_grad = value_and_grad(FACTS[name], z.double(), y)
    rtol = 1e-5 + epsilon_bound(z.double(), y)
    torch.testing.assert_close(loss.double(), want_loss, rtol=rtol, atol=1e-6)
    torch.testing.assert_close(grad.double(), want_grad, rtol=rtol, atol=rtol * float(want_grad.abs().max()))


def test_the_printed_constants_at_ten_classes():
    """At C = 10 the author's MAE is 0.2 (1 - p_y) and RCE 0.1054 + 4.3944 (1 - p_y) (facts)."""
    z, y = batch(10, seed=5, n=16)
    one_minus = 1 - torch.softmax(z, dim=1).gather(1, y[:, None]).squeeze(1)
    mae = AF.mae(z, y, variant="author", reduction="none")
    rce = AF.rce(z, y, variant="author", reduction="none")
    torch.testing.assert_close(mae, 0.2 * one_minus)
    torch.testing.assert_close(rce, 0.1054 + 4.3944 * one_minus, rtol=0, atol=1e-4)
    # the cited work's RCE at C = 10 is 9.2103 (1 - p_y): a different function
    assert not torch.allclose(AF.rce(z, y, reduction="none"), rce, atol=1e-2)


def test_the_defaults_follow_the_code():
    """Weights 0.4 active + 0.6 passive, gamma 2, overridable; CE is CE in every form."""
    assert AUTHOR_LAMBDA == 0.4 and DEFAULT_GAMMA["author"] == 2.0
    spec = spec_for("nfl+rce", variant="author")
    assert (spec.active, spec.passive, spec.alpha, spec.beta, spec.gamma) == \
        (Kind.NFL_PAPER, Kind.RCE_AUTHOR, 0.4, 0.6, 2.0)
    assert spec_for("nce+mae", variant="author", lam=0.7).alpha == 0.7
    assert spec_for("fl", variant="author", gamma=0.5).gamma == 0.5
    assert spec_for("ce", variant="author") == spec_for("ce")
    z, y = batch(10, seed=9)
    torch.testing.assert_close(get_loss("ce", variant="author")(z, y), F.cross_entropy(z, y))


@pytest.mark.parametrize("name", ["fl", "nfl", "nce"])
def test_the_dropped_epsilon_stays_within_the_stated_bound(name):
    """LOSSES.md: dropping the author's 1e-8 terms changes a value by at most 2e-8 / min p_y
    relative. At p_y = 1e-4 the bound holds; at p_y = 1e-9 the author's FL and NFL rows saturate
    at -log(1e-8) and differ visibly, while NCE (log_softmax, no epsilon in its log) does not."""
    z, y = batch(10, seed=11, scale=1.0)
    for p_small in (1e-4, 1e-9):
        z[::8, :] = 0.0
        z[::8, 0] = math.log(p_small * 9 / (1 - p_small))  # p_0 = p_small on every eighth row ...
        y[::8] = 0  # ... whose target is class 0
        got = float(get_loss(name, variant="author", backend="reference")(z, y))
        want = float(FACTS[name](z, y))
        if p_small > EPS or name == "nce":
            assert abs(got - want) <= min(epsilon_bound(z, y), 1e-4) * abs(want), (p_small, got, want)
        else:
            assert abs(got - want) > 1e-2 * abs(want), (p_small, got, want)
