"""The published numbers (apl.paper): lookup, and the stored Table 1 against the seed paper's text."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from apl.paper import paper_numbers, reference_accuracy
from apl.presets import GRID_LOSSES

#: The seed paper's Table 1 as printed (its source is the file's first lines).
SEED_TABLE = Path(__file__).resolve().parent / "golden" / "seed_paper_table1.tsv"


def test_reference_lookup():
    assert reference_accuracy("paper", "nce+rce", 0.8) == 31.76
    assert reference_accuracy("paper", "nce", 0.0) is None
    assert reference_accuracy("ma2020", "nce", 0.2) is None  # not in the published table
    assert reference_accuracy("ma2020", "sce", 0.0) == 91.30
    with pytest.raises(ValueError, match="unknown source"):
        reference_accuracy("other", "ce", 0.2)


def _printed_table() -> tuple[list[str], dict[str, list[float]]]:
    """The noise rates of the header and ``{loss name as get_loss spells it: accuracies}``."""
    lines = [line for line in SEED_TABLE.read_text(encoding="utf-8").splitlines() if not line.startswith("#")]
    header, *rows = [line.split("\t") for line in lines if line.strip()]
    assert header[0] == "Noise Rate", header
    printed = {}
    for name, *values in rows:
        # "$\operatorname{FL}$" and "NCE + MAE" as the paper prints them -> "fl", "nce+mae"
        key = re.sub(r"\\operatorname\{(\w+)\}|\$", r"\1", name).replace(" ", "").lower()
        printed[key] = [float(v) for v in values]
    return header[1:], printed


def test_paper_numbers_are_the_seed_papers_table_1():
    rates, printed = _printed_table()
    stored = paper_numbers("paper")["symmetric"]
    assert sorted(printed) == sorted(stored) == sorted(GRID_LOSSES)
    for loss, values in printed.items():
        assert len(values) == len(rates), loss
        assert [stored[loss][rate] for rate in rates] == values, loss
        assert set(stored[loss]) == set(rates), f"{loss}: a stored cell the paper does not print"
