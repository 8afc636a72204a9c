"""The backend choice (apl.losses.backend): the fused operator where it can run, else the reference,
decided once per (backend, spec, device) and warned about once; a fake fused module stands in
for the extension, so every branch runs on any machine."""
import types
import warnings

import pytest
import torch
from conftest import random_batch

import apl.losses.backend as B
import apl.losses.functional as AF
import apl.losses.fused as fused_module
import apl.losses.modules as M
from apl.losses import get_loss, reference_loss
from apl.losses.spec import Kind, LossSpec, spec_for


def ref(name, logits, target):
    return reference_loss(logits, target, spec_for(name))


def _fake_fused(monkeypatch, available, calls=None, cuda=False):
    """Replace the fused module the losses use by a fake one (and forget earlier backend choices)."""
    mod = types.ModuleType("apl.fused")
    mod.is_available = lambda: available
    mod.cuda_launch_problem = lambda device: "" if available and cuda else "no CUDA kernels (test)"
    mod.supports = lambda spec: spec.passive in (Kind.NONE, Kind.MAE, Kind.RCE)
    mod.unsupported_reason = lambda spec: "" if mod.supports(spec) else f"no {spec.passive.name} (test)"
    mod.unavailable_reason = lambda: "" if available else "extension apl._C not built (test)"
    mod.op_args = lambda spec, reduction="mean", ignore_index=-100: (spec, reduction, ignore_index)

    def apply(logits, target, args, weight=None):
        assert weight is None
        calls.append(args)
        return torch.tensor(42.0)
    mod.apply = apply
    mod.fused_loss = lambda logits, target, spec, reduction="mean", ignore_index=-100, weight=None: apply(
        logits, target, mod.op_args(spec, reduction, ignore_index), weight)
    monkeypatch.setattr(B, "fused", mod)
    monkeypatch.setattr(M, "fused", mod)
    monkeypatch.setattr(B, "_CHOICES", {})
    monkeypatch.setattr(B, "_fallback_warned", False)
    return mod


def test_auto_falls_back_to_reference_with_one_warning(monkeypatch):
    _fake_fused(monkeypatch, False)
    z, t = random_batch(5, 10, seed=21)
    with pytest.warns(RuntimeWarning, match="not built \\(test\\).*pure-PyTorch reference"):
        got = get_loss("nce+rce")(z, t)
    torch.testing.assert_close(got, ref("nce+rce", z, t), rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second warning would raise here
        AF.nfl(z, t)
        get_loss("nfl+rce")(z, t)
    with pytest.raises(ValueError, match="backend='fused' was requested .* not built"):
        get_loss("ce", backend="fused")(z, t)


def test_auto_and_fused_use_the_fused_operator_when_available(monkeypatch):
    calls = []
    _fake_fused(monkeypatch, True, calls)
    z, t = random_batch(5, 10, seed=23)
    assert get_loss("nfl+mae", variant="paper", reduction="sum", ignore_index=3)(z, t).item() == 42.0
    assert AF.gce(z, t, q=0.5, fused=True).item() == 42.0
    assert calls == [(spec_for("nfl+mae", variant="paper"), "sum", 3), (spec_for("gce", q=0.5), "mean", -100)]
    assert AF.gce(z, t, q=0.5, fused=False).item() != 42.0  # fused=False: always the reference
    assert len(calls) == 2


def test_auto_uses_the_reference_where_the_fused_operator_cannot_compute(monkeypatch):
    _fake_fused(monkeypatch, True, [])
    unsupported = LossSpec(Kind.CE, Kind.NCE_MA2020, 1.0, 1.0)  # a hand-built spec
    assert B.resolve_backend("auto", spec_for("nce+rce"), "cpu") == ("fused", "")
    chosen, why = B.resolve_backend("auto", unsupported, "cpu")
    assert chosen == "reference" and "NCE_MA2020" in why
    chosen, why = B.resolve_backend("auto", spec_for("ce"), "cuda")  # no usable CUDA kernels
    assert chosen == "reference" and "no CUDA kernels (test)" in why
    with pytest.raises(ValueError, match="cannot be used: .*no CUDA kernels"):
        B.resolve_backend("fused", spec_for("ce"), "cuda")
    z, t = random_batch(5, 10, seed=24)
    with pytest.warns(RuntimeWarning, match="NCE_MA2020"):
        got = B.compute_loss(z, t, unsupported)
    torch.testing.assert_close(got, reference_loss(z, t, unsupported), rtol=0, atol=0)


def test_the_choice_is_made_once_per_device(monkeypatch):
    """A module decides its backend on first use per device and keeps it (no per-call lookups)."""
    mod = _fake_fused(monkeypatch, True, [])
    probes = []
    mod.cuda_launch_problem = lambda device: probes.append(device) or ""
    loss = get_loss("ce")
    z, t = random_batch(5, 10, seed=25)
    for _ in range(3):
        loss(z, t)
        AF.ce(z, t)
    assert loss._backends == {torch.device("cpu"): "fused"}
    assert B.resolve_backend("auto", spec_for("ce"), "cuda:0") == ("fused", "")
    assert probes == [torch.device("cuda:0")]


@pytest.mark.skipif(not fused_module.cuda_available(), reason="needs the extension built with its CUDA kernels")
def test_cuda_kernels_that_cannot_run_fall_back_with_the_reason(monkeypatch):
    """A CUDA build whose kernels cannot launch on the GPU (no kernel image for its architecture)
    is found by the one-row probe, once per device: 'auto' uses the reference with one warning
    naming the reason, 'fused' raises it."""
    monkeypatch.setattr(B, "_CHOICES", {})
    monkeypatch.setattr(B, "_fallback_warned", False)
    monkeypatch.setattr(fused_module, "_LAUNCH_PROBLEMS", {})
    spec = spec_for("ce")
    if not torch.cuda.is_available():  # the real case on a machine without a GPU
        assert B.resolve_backend("auto", spec, "cuda:0") == ("reference", "no CUDA device is available to this process")
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    probes = []

    def failing_probe(device):
        probes.append(device)
        raise RuntimeError("CUDA error: no kernel image is available for execution on the device\nmore")
    monkeypatch.setattr(fused_module, "_probe", failing_probe)
    problem = "the CUDA kernels do not run on cuda:0 (CUDA error: no kernel image is available for execution " \
              "on the device)"
    assert B.resolve_backend("auto", spec, "cuda:0") == ("reference", problem)
    with pytest.raises(ValueError, match="cannot be used: the CUDA kernels do not run on cuda:0"):
        B.resolve_backend("fused", spec, "cuda:0")
    with pytest.warns(RuntimeWarning, match="no kernel image"):
        assert B.backend_for("auto", spec, torch.device("cuda:0")) == "reference"
    assert probes == ["cuda:0"]
