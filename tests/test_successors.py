"""The successors of APL (ALFs, ANL, JAL, epsilon-softmax) and the cited work's other normalised losses,
through what users call: ``get_loss`` with each official config, ``apl.functional``, both backends.

The oracle is the official formula (benchmarks/official_losses.py, eager, as the authors' code computes it)
and the reference values gathered from the official classes (tests/golden/successor_reference_values.tsv).
Where a formula has a hazard (a clamp that freezes a row, a normaliser as coded), the official value is kept
and the test pins it (LOSSES.md "Successors").
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import BACKENDS, random_batch, value_and_grad

import apl.functional as AF
from apl.losses import get_loss, reference_loss
from apl.losses.spec import ALIASES, SUCCESSOR_NAMES, Kind, LossSpec, spec_for
from benchmarks.official_losses import official_loss

GOLDEN = Path(__file__).resolve().parent / "golden" / "successor_reference_values.tsv"

#: Each repository's configs, CIFAR-10 and CIFAR-100 (docs/sources.md "The successors"), as get_loss takes them.
OFFICIAL_CONFIGS = {
    "agce": [dict(a=0.6, q=0.6)], "aul": [dict(a=5.5, q=3.0)], "ael": [dict(a=2.5)],
    "nce+agce": [dict(alpha=1, beta=4, a=6, q=1.5), dict(alpha=10, beta=0.1, a=1.8, q=3)],
    "nce+aul": [dict(alpha=1, beta=4, a=6.3, q=1.5), dict(alpha=10, beta=0.015, a=6, q=3)],
    "nce+ael": [dict(alpha=1, beta=4, a=5), dict(alpha=10, beta=0.1, a=1.5)],
    "nnce": [dict(min_prob=1e-7)], "nnfl": [dict(gamma=0.5, min_prob=1e-7)],
    "anl-ce": [dict(alpha=5, beta=5, min_prob=1e-7), dict(alpha=10, beta=1, min_prob=1e-7)],
    "anl-fl": [dict(alpha=5, beta=5, gamma=0.5, min_prob=1e-7), dict(alpha=10, beta=1, gamma=0.5, min_prob=1e-7)],
    "amse": [dict(a=30)],
    "nce+amse": [dict(alpha=1, beta=1, a=30), dict(alpha=5, beta=1, a=20)],
    "nfl+amse": [dict(alpha=1, beta=1, a=30, gamma=0.5), dict(alpha=5, beta=1, a=20, gamma=0.5)],
    "ece": [dict(m=1e5)], "efl": [dict(m=1e5, gamma=0.1)],
    "ece+mae": [dict(alpha=0.01, beta=5, m=1e5), dict(alpha=0.02, beta=5, m=1e3), dict(alpha=0.1, beta=1, m=1e4),
                dict(alpha=0.004, beta=1, m=1e2)],
    "efl+mae": [dict(alpha=0.01, beta=5, m=1e5), dict(alpha=0.02, beta=5, m=1e3)],
    "ngce": [dict(q=0.1), dict(q=0.7)], "nmae": [{}], "nrce": [{}],
    "ngce+mae": [dict(alpha=1, beta=1, q=0.1), dict(alpha=10, beta=1, q=0.7)],
    "ngce+rce": [dict(alpha=1, beta=1, q=0.1), dict(alpha=10, beta=0.1, q=0.7)],
}
CONFIG_CASES = [(name, config) for name, configs in OFFICIAL_CONFIGS.items() for config in configs]


def test_every_successor_has_its_official_configs_here():
    assert set(OFFICIAL_CONFIGS) == set(SUCCESSOR_NAMES)


def _golden_rows():
    rows = []
    for line in GOLDEN.read_text().splitlines():
        if line and not line.startswith("#"):
            name, params, y0, y2 = line.split("\t")
            rows.append((name, json.loads(params), float(y0), float(y2)))
    return rows


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name, params, y0, y2", _golden_rows())
def test_the_official_classes_reference_values(name, params, y0, y2, backend):
    z = torch.tensor([[0.5, -1.0, 2.0, 0.0]] * 2, dtype=torch.float64)
    loss_fn = get_loss(name, num_classes=4, reduction="none", backend=backend, **params)
    got = loss_fn(z, torch.tensor([0, 2]))
    torch.testing.assert_close(got, torch.tensor([y0, y2], dtype=torch.float64), rtol=0, atol=1.5e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("c", [10, 100])
@pytest.mark.parametrize("name, config", CONFIG_CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CONFIG_CASES)])
def test_get_loss_with_an_official_config_is_the_official_loss(name, config, c, backend):
    """Value and gradient of get_loss(name, num_classes=C, **config) equal the official formula's (float64),
    its clamps, detached factors and hidden constants included."""
    z, t = random_batch(48, c, seed=c + len(name), scale=3.0)
    loss_fn = get_loss(name, num_classes=c, backend=backend, **config)
    got = value_and_grad(loss_fn, z, t)
    want = value_and_grad(lambda x, y: official_loss(name, x, y, **config), z, t)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("name", SUCCESSOR_NAMES)
def test_defaults_are_the_cifar10_configs(name):
    spec = spec_for(name)
    assert spec == spec_for(name, **OFFICIAL_CONFIGS[name][0])
    assert spec == spec_for(name, variant="paper") == spec_for(name, variant="author")  # one form each


def test_functions_modules_and_aliases_name_the_same_losses():
    z, t = random_batch(6, 10, seed=4)
    for name in SUCCESSOR_NAMES:
        fn = getattr(AF, name.replace("+", "_").replace("-", "_"))
        torch.testing.assert_close(fn(z, t, fused=False), get_loss(name, backend="reference")(z, t), rtol=0, atol=0)
    for alias, name in ALIASES.items():
        assert get_loss(alias).spec == get_loss(name).spec == get_loss(alias.replace("-", "_")).spec
    assert get_loss("ANL_CE").spec == spec_for("anl-ce") and AF.jal_fl is AF.nfl_amse


@pytest.mark.parametrize("name", [n for n in SUCCESSOR_NAMES if not spec_for(n).kinds & {
    Kind.NFL_MA2020, Kind.NNFL, Kind.EFL}])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck_of_the_reference(name, reduction):
    """Losses without detached factors: autograd's gradient is the numerical derivative."""
    z, t = random_batch(5, 4, seed=9)
    t[2] = -100
    spec = spec_for(name)
    assert torch.autograd.gradcheck(lambda x: reference_loss(x, t, spec, reduction=reduction),
                                    (z.clone().requires_grad_(),), eps=1e-6, atol=1e-7)


# --------------------------------------------------------------------------- the hazards, kept as coded

@pytest.mark.parametrize("backend", BACKENDS)
def test_eps_softmax_freezes_rows_far_from_right(backend):
    """A misclassified row with p_y / (1 + m) <= 1e-8 sits on the clamp: value -ln 1e-8, no gradient."""
    m = 1e5
    z = torch.tensor([[0.0, 20.0, 0.0], [0.0, 2.0, 0.0]], dtype=torch.float64)  # p_0 ~ 2e-9 ; p_0 ~ 0.1
    loss_fn = get_loss("ece", num_classes=3, m=m, reduction="none", backend=backend)
    value, grad = value_and_grad(loss_fn, z, torch.tensor([0, 0]))
    assert value[0].item() == pytest.approx(-math.log(1e-8), rel=1e-12)
    assert torch.all(grad[0] == 0) and torch.all(grad[1] != 0)
    p0 = torch.softmax(z[1], 0)[0].item()
    assert value[1].item() == pytest.approx(math.log1p(m) - math.log(p0), rel=1e-12)  # CE plus a constant


@pytest.mark.parametrize("backend", BACKENDS)
def test_nnce_gives_no_gradient_below_min_prob(backend):
    """Classes with p_k <= min_prob add v_k = 0 and get no gradient of their own through the clamp."""
    z = torch.tensor([[0.0, 1.0, -40.0, 0.5]], dtype=torch.float64)  # p_2 ~ 1e-18 < 1e-7
    loss_fn = get_loss("nnce", num_classes=4, reduction="sum", backend=backend)
    _, grad = value_and_grad(loss_fn, z, torch.tensor([1]))
    want = value_and_grad(lambda x, y: official_loss("nnce", x, y), z, torch.tensor([1]))[1]
    torch.testing.assert_close(grad, want, rtol=1e-10, atol=1e-15)
    assert abs(grad[0, 2].item()) < 1e-15  # only the softmax's own -p_2 * sum, of order p_2


def test_nrce_keeps_the_official_normaliser_and_nmae_its_halved_mae():
    z, t = random_batch(7, 10, seed=3)
    rce = get_loss("rce", backend="reference", reduction="none")(z, t)
    mae = get_loss("mae", backend="reference", reduction="none")(z, t)
    torch.testing.assert_close(get_loss("nrce", backend="reference", reduction="none")(z, t), rce * 9 / 4)
    torch.testing.assert_close(get_loss("nmae", backend="reference", reduction="none")(z, t), mae / 18)


def test_amse_is_a_mean_over_classes_and_ece_mae_doubles_mae():
    z, t = random_batch(7, 10, seed=5)
    p = torch.softmax(z, 1)
    onehot = torch.nn.functional.one_hot(t, 10).double()
    torch.testing.assert_close(get_loss("amse", a=3.0, reduction="none", backend="reference")(z, t),
                               ((p - 3.0 * onehot) ** 2).sum(1) / 10)
    two_mae = get_loss("ece+mae", alpha=0.0, beta=1.0, reduction="none", backend="reference")(z, t)
    torch.testing.assert_close(two_mae, 2 * (1 - p.gather(1, t[:, None]).squeeze(1)))


# --------------------------------------------------------------------------- parameters

def test_parameters_a_loss_does_not_take_are_named():
    with pytest.raises(ValueError, match="m is a parameter of ece, efl, ece\\+mae, efl\\+mae; 'agce' has none"):
        get_loss("agce", m=10.0)
    with pytest.raises(ValueError, match="min_prob is a parameter of .*'ce' has none"):
        get_loss("ce", min_prob=1e-6)
    with pytest.raises(ValueError, match="a is a parameter of"):
        spec_for("ngce", a=2.0)
    with pytest.raises(ValueError, match="beta weights an active\\+passive sum; 'agce' is a single loss"):
        get_loss("agce", beta=1.0)


@pytest.mark.parametrize("spec_args, message", [
    (dict(active=Kind.AUL, a=1.0), "AUL needs a > 1"),
    (dict(active=Kind.AGCE, a=0.0), "AGCE and AEL need a > 0"),
    (dict(active=Kind.NGCE, q=1.5), r"q must be in \(0, 1\]"),
    (dict(active=Kind.AGCE, q=0.0), "q must be a finite number > 0"),
    (dict(active=Kind.ECE, m=-1.0), "m must be a finite number >= 0"),
    (dict(active=Kind.NNCE, min_prob=1.0), r"min_prob must be in \(0, 1\)"),
    (dict(active=Kind.AMSE, a=math.inf), "a must be finite"),
])
def test_bad_parameters_raise_value_errors(spec_args, message):
    with pytest.raises(ValueError, match=message):
        LossSpec(**spec_args)


def test_a_spec_without_a_or_m_takes_the_standalone_default():
    assert LossSpec(Kind.AUL).a == 5.5 and LossSpec(Kind.ECE).m == 1e5 and LossSpec(Kind.CE).a == 0.0
    assert LossSpec(Kind.NCE_MA2020, Kind.AMSE, 1.0, 1.0).a == 30.0
