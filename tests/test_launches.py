"""The fused operator's steps per call (kernel launches on CUDA), counted on the CPU, whose
implementation runs the same plan (csrc/ops.h launch_plan), through the public modules."""
import re
from pathlib import Path

import pytest
import torch
from conftest import LOSS_CASES, requires_fused

import apl.losses.fused as fused
from apl.losses import get_loss
from apl.losses.spec import REDUCTIONS, Kind, spec_for

pytestmark = requires_fused

OPERATOR_DOC = Path(__file__).resolve().parent.parent / "docs" / "operator.md"
CASES = LOSS_CASES


def _steps() -> int:
    return torch.ops.apl._steps_run()


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name,variant", CASES, ids=[f"{n}-{v}" for n, v in CASES])
def test_steps_per_call_follow_the_plan(name, variant, reduction):
    """A module's forward and backward run exactly the steps launch_counts states."""
    loss_fn = get_loss(name, variant=variant, reduction=reduction, backend="fused")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 10, generator=g, requires_grad=True)
    y = torch.randint(0, 10, (12,), generator=g)
    y[3] = -100
    before = _steps()
    loss = loss_fn(x, y)
    forward = _steps() - before
    before = _steps()
    (loss.sum() if reduction == "none" else loss).backward()
    backward = _steps() - before
    assert (forward, backward) == fused.launch_counts(loss_fn.spec, reduction)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name,variant", CASES, ids=[f"{n}-{v}" for n, v in CASES])
def test_launch_goals(name, variant, reduction):
    """The goals: one row kernel plus at most one batch step forward (none for 'none' of a per-row
    loss), one launch backward (two for NFL (paper) 'none', the only loss whose backward needs a
    batch sum of the upstream gradient)."""
    spec = spec_for(name, variant=variant)
    forward, backward = fused.launch_counts(spec, reduction)
    assert forward == (1 if reduction == "none" and not spec.batch_level else 2)
    assert backward == (2 if spec.active == Kind.NFL_PAPER and reduction == "none" else 1)


def test_the_docs_state_the_launch_counts_of_the_code():
    """docs/operator.md's launch table (one row per loss form) says what launch_counts returns."""
    rows = re.findall(r"^\| `([^`]+)` \| (\d) \| (\d) \| (\d) \| (\d) \|$", OPERATOR_DOC.read_text(), re.MULTILINE)
    assert rows, "docs/operator.md has no launch table"
    seen = set()
    for label, fwd_reduced, fwd_none, bwd_reduced, bwd_none in rows:
        name, _, variant = label.partition(" ")
        spec = spec_for(name, variant=variant.strip("()") or "ma2020")
        assert (int(fwd_reduced), int(bwd_reduced)) == fused.launch_counts(spec, "mean") == \
            fused.launch_counts(spec, "sum")
        assert (int(fwd_none), int(bwd_none)) == fused.launch_counts(spec, "none")
        seen.add((spec.active, spec.passive))
    assert {(spec_for(n, variant=v).active, spec_for(n, variant=v).passive) for n, v in CASES
            if fused.supports(spec_for(n, variant=v))} <= seen


def test_launch_counts_rejects_what_the_operator_does_not_compute():
    with pytest.raises(ValueError, match="reduction must be one of"):
        fused.launch_counts(spec_for("ce"), "avg")
    with pytest.raises(ValueError, match="spec must be an apl.losses.spec.LossSpec"):
        fused.launch_counts("ce")


def test_sync_target_check_switch():
    """The debug switch reports and restores its setting; on the CPU a bad target is a named
    ValueError either way (CUDA: tests/test_fused.py)."""
    previous = fused.set_sync_target_check(True)
    try:
        assert fused.sync_target_check() is True
        assert fused.set_sync_target_check(False) is True
        assert fused.sync_target_check() is False
        for enabled in (False, True):
            fused.set_sync_target_check(enabled)
            with pytest.raises(ValueError, match=r"target 10 \(row 1\) is out of range for C=10"):
                get_loss("ce")(torch.zeros(2, 10), torch.tensor([0, 10]))
    finally:
        fused.set_sync_target_check(previous)
