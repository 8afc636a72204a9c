"""What every table and figure is stamped with: the preset, how the runs trained, data, reference.

The stamp keeps a quick or overridden grid from being read as the paper's protocol: it
names the preset, the training settings read back from the run records, and whose
protocol (if anyone's) that is.
"""
from __future__ import annotations

import json

from apl.paper import paper_numbers
from apl.presets import GRID_NOISE

__all__ = ["describe_protocol", "preset_banner", "Stamp"]

_MODEL_NAMES = {"paper": "PaperCNN", "ma2020": "MaCNN"}


def describe_protocol(configs: list[dict]) -> str:
    """One line saying how runs were trained, from their config dicts (values joined by '/').

    E.g. ``"PaperCNN width 0.125, adam lr 0.001, epochs 4, batch 64, train subset 2000,
    test subset 1000, no augmentation"``.
    """
    def values(key, fmt=str):
        vals = sorted({json.dumps(c.get(key)) for c in configs if key in c})
        return "/".join(fmt(json.loads(v)) for v in vals) if vals else "?"

    def subset(v):
        return "full" if v is None else str(v)

    model = values("model", lambda m: _MODEL_NAMES.get(m, str(m)))
    augment = values("augment", lambda a: "augmentation" if a else "no augmentation")
    return (f"{model} width {values('width', lambda w: f'{w:g}')}, {values('optimizer')} lr "
            f"{values('lr', lambda x: f'{x:g}')}, epochs {values('epochs')}, batch "
            f"{values('batch_size')}, train subset {values('train_subset', subset)}, "
            f"test subset {values('test_subset', subset)}, {augment}")


def preset_banner(preset: str | None, protocol: str, overrides: dict | None = None) -> str:
    """The stamp's first line: preset, how it was trained, whose protocol it is."""
    changed = ", ".join(f"{k}={v}" for k, v in sorted((overrides or {}).items()))
    name = f"{preset.upper()} PRESET" if preset else "PRESET UNKNOWN (no manifest.json)"
    text = f"{name}: {protocol}" + (f" (overridden: {changed})" if changed else "")
    if preset == "paper" and not changed:
        return text + " — the paper's protocol (Sec. 3)"
    if preset == "ma2020" and not changed:
        return text + " — the cited work's protocol, not the seed paper's"
    return text + " — not the paper's protocol"


class Stamp:
    """The stamp of one report, computed once from its records, manifest and reference."""

    def __init__(self, records: list[dict], manifest: dict | None, reference: str):
        self.preset = (manifest or {}).get("preset")
        self.overrides = (manifest or {}).get("overrides") or {}
        configs = [r.get("config") or {} for r in records]
        self.banner = preset_banner(self.preset, describe_protocol(configs), self.overrides)
        sources = sorted({str(r.get("data_source")) for r in records if r.get("data_source")})
        self.data = "Data: " + ("; ".join(sources) if sources else "source not recorded")
        self.reference = reference
        published = paper_numbers(reference)
        self.ref_label = "paper" if reference == "paper" else "publ."
        self.ref_line = f"Reference: {published['source']}; {published['metric']}."
        self.ref_has_clean = any("0.0" in t for t in published["symmetric"].values())

    def lines(self, variant: str, seeds: list[int]) -> list[str]:
        """The stamp of one variant's table (a figure carries the first two lines)."""
        seed_text = (f"mean ± sample std over seeds {', '.join(map(str, seeds))}"
                     if len(seeds) > 1 else f"single run per cell (seed {seeds[0]})"
                     if seeds else "no finished runs")
        return [self.banner, self.data,
                f"Loss variant: {variant} (definitions in LOSSES.md); CE does not depend on "
                f"the variant, so the same CE runs appear in every variant's table.",
                self.ref_line, f"Cells: {seed_text}; Δ = ours − reference."]

    def columns(self) -> list[tuple[float, bool]]:
        """(noise, with reference and Δ columns) for every noise column of a table."""
        return [(n, n != 0.0 or self.ref_has_clean) for n in GRID_NOISE]
