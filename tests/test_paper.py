"""The published numbers (apl.paper): lookup, and the stored Table 1 against the seed paper's text."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from apl.paper import paper_numbers, reference_accuracy
from apl.presets import GRID_LOSSES

SEED_PAPER = Path("/work/shared/seed/000_751a3e17ea3f2e34.txt")


def test_reference_lookup():
    assert reference_accuracy("paper", "nce+rce", 0.8) == 31.76
    assert reference_accuracy("paper", "nce", 0.0) is None
    assert reference_accuracy("ma2020", "nce", 0.2) is None  # not in the published table
    assert reference_accuracy("ma2020", "sce", 0.0) == 91.30
    with pytest.raises(ValueError, match="unknown source"):
        reference_accuracy("other", "ce", 0.2)


@pytest.mark.skipif(not SEED_PAPER.exists(), reason="the seed paper's text is not on this machine")
def test_paper_numbers_are_the_seed_papers_table_1():
    text = SEED_PAPER.read_text()
    end = text.index("Table 1:")
    table = text[text.rindex("Noise Rate", 0, end):end]
    printed = {}
    for line in table.splitlines()[1:]:
        m = re.match(r"\s*(.+?)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s*$", line)
        if m:
            name = re.sub(r"\\operatorname\{(\w+)\}|\$", r"\1", m.group(1)).replace(" ", "").lower()
            printed[name] = [float(v) for v in m.groups()[1:]]
    stored = paper_numbers("paper")["symmetric"]
    assert sorted(printed) == sorted(stored) == sorted(GRID_LOSSES)
    for loss, values in printed.items():
        assert [stored[loss][k] for k in ("0.2", "0.4", "0.6", "0.8")] == values, loss
