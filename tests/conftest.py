"""Shared test helpers: the devices a test can run on, a seeded random-batch builder, synthetic CIFAR-10.

``requires_fused`` marks tests of the compiled operator and ``BACKENDS`` lists both backends of
the public losses; ``IGNORE_INDEX`` is the ignored rows' target. ``DEVICES`` (also the ``device``
fixture) is ``"cpu"``, always run, then ``"cuda"`` and ``"cuda:1"``, each skipped with its reason
where it cannot run. ``requires_cuda`` and
``requires_two_gpus`` mark tests that only make sense on a GPU. ``random_batch`` builds logits
and targets the same way on every device. ``cifar_dir`` and ``cifar_arrays`` are one
synthetic CIFAR-10 (folder and loaded arrays) shared by the data, training and grid tests.
Test modules import these names (``from conftest import ...``: pytest puts this directory on
``sys.path``).
"""
import json
import signal
from pathlib import Path

import pytest
import torch

import apl.losses.fused as fused
from apl.data import load_cifar10, write_cifar10_folder
from apl.losses.spec import APL_NAMES, SUCCESSOR_NAMES, VARIANTS, Kind, LossSpec
from apl.records import comparable_record

#: The target value of ignored rows (as F.cross_entropy's default).
IGNORE_INDEX = -100


def _cuda_skip_reason() -> str:
    """Why the fused operator cannot run on CUDA here ('' when it can)."""
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible (torch.cuda.is_available() is False)"
    if not fused.is_available():
        return f"the fused operator is not built: {fused.unavailable_reason()}"
    if not fused.cuda_available():
        return "the apl extension was built without its CUDA kernels (rebuild with scripts/setup_env.sh --cuda)"
    return ""


#: Every public loss as (name, variant): the APL losses in each of their forms, the successors in their one form.
LOSS_CASES = [(name, variant) for name in APL_NAMES for variant in VARIANTS] + \
    [(name, "ma2020") for name in SUCCESSOR_NAMES]


def op_args(spec=None, reduction="mean", ignore_index=IGNORE_INDEX, **replaced):
    """The operator's scalar arguments (``apl.fused.OpArgs``) of ``spec`` (CE when None), any field
    replaced by name, also by values the public API refuses (to test the operator's own checks)."""
    return fused.op_args(spec or LossSpec(Kind.CE), reduction, ignore_index)._replace(**replaced)


#: Tests of the compiled operator: skipped, with the reason, where the extension is not built.
requires_fused = pytest.mark.skipif(not fused.is_available(),
                                    reason=f"the fused operator is not built: {fused.unavailable_reason()}")
#: The two backends every public loss offers, for ``pytest.mark.parametrize("backend", BACKENDS)``.
BACKENDS = ["reference", pytest.param("fused", marks=requires_fused)]

CUDA_SKIP_REASON = _cuda_skip_reason()
CUDA_OK = not CUDA_SKIP_REASON
TWO_GPUS = CUDA_OK and torch.cuda.device_count() >= 2

requires_cuda = pytest.mark.skipif(not CUDA_OK, reason=f"needs CUDA: {CUDA_SKIP_REASON}")
requires_two_gpus = pytest.mark.skipif(
    not TWO_GPUS, reason=f"needs two GPUs: {CUDA_SKIP_REASON or f'{torch.cuda.device_count()} visible'}")

#: Devices for ``pytest.mark.parametrize("device", DEVICES)``; cuda:1 runs while cuda:0 is current.
DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda), pytest.param("cuda:1", marks=requires_two_gpus)]


def pytest_configure(config):
    """Ctrl-C as a terminal delivers it, however the suite was started: a shell's background job (`cmd &`)
    and some CI runners start it with SIGINT ignored, which every child would inherit, so the tests of
    the first and second Ctrl-C would see no signal at all."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(params=DEVICES)
def device(request):
    """Each available device in turn (the others are reported as skipped, with the reason)."""
    return request.param


def random_batch(n, c, seed, *, dtype=torch.float64, device="cpu", scale=1.0, regimes=False,
                 ignore_frac=0.0, ignore_index=IGNORE_INDEX):
    """Logits (n, c) and int64 targets (n,) drawn from a CPU generator seeded with ``seed``.

    The draws are float64 on the CPU, then cast to ``dtype`` and moved to ``device``, so every
    device gets the same batch. ``scale`` multiplies the logits. ``regimes=True`` mixes row
    regimes: each row's scale is one of 1, 5, 30 or 1e4 (times ``scale``; p_y rounds to 0 or 1
    at the larger ones) and a fifth of the rows have a target logit 40 above the row's max.
    A fraction ``ignore_frac`` of the rows (drawn at random) get ``ignore_index`` as target;
    the first row is kept unless ``ignore_frac >= 1``, which ignores every row.
    """
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, c, generator=g, dtype=torch.float64) * scale
    if regimes:
        scales = torch.tensor([1.0, 5.0, 30.0, 1e4], dtype=torch.float64)
        z = z * scales[torch.randint(0, 4, (n,), generator=g)][:, None]
    target = torch.randint(0, c, (n,), generator=g)
    if regimes:
        dominant = torch.rand(n, generator=g) < 0.2
        rows = torch.arange(n)
        z[rows[dominant], target[dominant]] = z[dominant].amax(dim=1) + 40.0
    if ignore_frac >= 1:
        target[:] = ignore_index
    elif ignore_frac > 0:
        ignored = torch.rand(n, generator=g) < ignore_frac
        ignored[:1] = False
        target[ignored] = ignore_index
    return z.to(device=device, dtype=dtype), target.to(device)


#: Size of the synthetic CIFAR-10 the data, training and grid tests share (balanced classes).
SYNTHETIC_TRAIN, SYNTHETIC_TEST = 400, 200


@pytest.fixture(scope="session")
def cifar_dir(tmp_path_factory):
    """A synthetic CIFAR-10 folder (:func:`apl.data.write_cifar10_folder`), written once per session."""
    return write_cifar10_folder(tmp_path_factory.mktemp("cifar"), n_train=SYNTHETIC_TRAIN,
                                n_test=SYNTHETIC_TEST, seed=0)


@pytest.fixture(scope="session")
def cifar_arrays(cifar_dir):
    """The arrays of ``cifar_dir``, loaded once per session (tests must not modify them)."""
    return load_cifar10(cifar_dir, download=False)


def run_results(out) -> dict[str, dict]:
    """Run name -> result.json of the grid written to ``out``."""
    return {p.parent.name: json.loads(p.read_text()) for p in (Path(out) / "runs").glob("*/result.json")}


def assert_same_records(out, reference) -> dict[str, dict]:
    """The grid in ``out`` has the reference grid's runs, each with an equal record; returns them."""
    got, want = run_results(out), run_results(reference)
    assert sorted(got) == sorted(want)
    for name in want:
        assert comparable_record(got[name]) == comparable_record(want[name]), name
    return got


def value_and_grad(fn, z, y):
    """``fn(z, y)`` and its gradient with respect to a fresh leaf copy of ``z``, for a fixed random
    upstream gradient of the loss's shape (so reductions "none" compare every entry)."""
    z = z.detach().clone().requires_grad_()
    out = fn(z, y)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype).to(out.device)
    (grad,) = torch.autograd.grad((out * upstream).sum(), z)
    return out.detach(), grad
