"""torch.compile(fullgraph=True) over the public API: every get_loss module and every
apl.functional function, with the fused and the reference backend, matches eager (values and
gradients). The graph is traced by Dynamo and AOT autograd ("aot_eager"); one case per backend
also goes through Inductor."""
import inspect

import pytest
import torch
from conftest import BACKENDS, LOSS_CASES

import apl.losses.functional as AF
import apl.losses.fused as fused
from apl.losses import get_loss

CASES = LOSS_CASES
FUNCTIONS = sorted(AF.__all__)


def _data(c=10, n=12):
    g = torch.Generator().manual_seed(3)
    model = torch.nn.Linear(6, c).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    x = torch.randn(n, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, c, (n,), generator=g)
    y[1] = -100
    return model, x, y


def _step_matches_eager(loss_of, compile_backend="aot_eager"):
    """One training step (model and loss compiled with fullgraph=True, its compiled backward)
    equals eager."""
    model, x, y = _data()

    def forward(inp, target):
        return loss_of(model(inp), target)

    torch._dynamo.reset()
    got = torch.compile(forward, fullgraph=True, backend=compile_backend)(x, y)
    got.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    want = forward(x, y)
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    for g_got, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g_got, p.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,variant", CASES, ids=[f"{n}-{v}" for n, v in CASES])
def test_every_module_compiles_fullgraph(name, variant, backend):
    loss_fn = get_loss(name, variant=variant, backend=backend, ignore_index=-100)
    _step_matches_eager(loss_fn)


@pytest.mark.parametrize("fused_op", [pytest.param(True, id="fused"), pytest.param(False, id="reference")])
@pytest.mark.parametrize("name", FUNCTIONS)
def test_every_function_compiles_fullgraph(name, fused_op):
    if fused_op and not fused.is_available():
        pytest.skip("the fused operator is not built")
    fn = getattr(AF, name)
    kwargs = {"fused": fused_op, "reduction": "sum"}
    if "variant" in inspect.signature(fn).parameters:
        kwargs["variant"] = "paper"  # the batch-level forms, where they exist
    _step_matches_eager(lambda logits, target: fn(logits, target, **kwargs))


@pytest.mark.parametrize("backend", BACKENDS)
def test_inductor_compiles_a_module_with_weights(backend):
    weight = torch.linspace(0.5, 2.0, 10, dtype=torch.float64)
    loss_fn = get_loss("nfl+rce", variant="paper", backend=backend, weight=weight)
    _step_matches_eager(loss_fn, compile_backend="inductor")
