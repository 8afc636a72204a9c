"""What every table and figure is stamped with: the preset, the form, how its runs trained, data, reference.

The stamp keeps a quick or overridden grid from being read as the paper's protocol: it names
the preset and the form (a loss variant under its protocol, :data:`apl.presets.FORMS`), the
training settings read back from that form's run records, and what the form's table answers.
"""
from __future__ import annotations

import json

from apl.paper import paper_numbers
from apl.presets import FORMS, GRID_NOISE, PRESETS

__all__ = ["describe_protocol", "preset_banner", "Stamp"]

_MODEL_NAMES = {"paper": "PaperCNN", "ma2020": "MaCNN"}
_INIT_NAMES = {"kaiming": "Kaiming init", "torch": "PyTorch default init"}
_NORMALIZE_NAMES = {"cifar": "CIFAR-10 mean/std normalisation", "half": "Normalize(0.5, 0.5)"}
#: Presets that run their protocols unchanged (no overrides of their own).
_FULL_PRESETS = ("paper", "author", "ma2020", "successors")


def describe_protocol(configs: list[dict]) -> str:
    """One line saying how runs were trained, from their config dicts (values joined by '/').

    E.g. ``"PaperCNN width 0.125 (PyTorch default init), adam lr 0.001, epochs 4, batch 64,
    Normalize(0.5, 0.5), train subset 2000, test subset 1000, no augmentation, noise
    author_symmetric"``.
    """
    def values(key, fmt=str):
        vals = sorted({json.dumps(c.get(key)) for c in configs if key in c})
        return "/".join(fmt(json.loads(v)) for v in vals) if vals else "?"

    def subset(v):
        return "full" if v is None else str(v)

    model = values("model", lambda m: _MODEL_NAMES.get(m, str(m)))
    augment = values("augment", lambda a: "augmentation" if a else "no augmentation")
    return (f"{model} width {values('width', lambda w: f'{w:g}')} "
            f"({values('init', lambda i: _INIT_NAMES.get(i, str(i)))}), {values('optimizer')} lr "
            f"{values('lr', lambda x: f'{x:g}')}, epochs {values('epochs')}, batch "
            f"{values('batch_size')}, {values('normalize', lambda n: _NORMALIZE_NAMES.get(n, str(n)))}, "
            f"train subset {values('train_subset', subset)}, test subset {values('test_subset', subset)}, "
            f"{augment}, noise {values('noise_type')}")


def preset_banner(preset: str | None, variant: str, protocol: str | None, training: str,
                  overrides: dict | None = None) -> str:
    """A form's stamp line: preset, form, how it trained (``training``), whose protocol it is.

    ``protocol`` is the form's protocol (None when no manifest says it).
    """
    changed = ", ".join(f"{k}={v}" for k, v in sorted((overrides or {}).items()))
    name = f"{preset.upper()} PRESET" if preset else "PRESET UNKNOWN (no manifest.json)"
    role = FORMS.get((variant, protocol))
    form = f"form {variant}" + (f" ({role.title})" if role else "")
    text = f"{name}, {form}: {training}" + (f" (overridden: {changed})" if changed else "")
    if preset in _FULL_PRESETS and not changed:
        return text + " — the full protocol"
    return text + " — not the paper's protocol"


class Stamp:
    """The stamp of one report, computed once from its records, manifest and reference."""

    def __init__(self, records: list[dict], manifest: dict | None, reference: str):
        manifest = manifest or {}
        self.preset = manifest.get("preset")
        self.overrides = manifest.get("overrides") or {}
        forms = manifest.get("forms")
        if forms is None and self.preset in PRESETS:
            forms = PRESETS[self.preset].forms
        #: variant -> the protocol it trained under in this grid (empty without a manifest).
        self.protocols = {v: p for v, p in forms or ()}
        sources = sorted({str(r.get("data_source")) for r in records if r.get("data_source")})
        self.data = "Data: " + ("; ".join(sources) if sources else "source not recorded")
        self.reference = reference
        published = paper_numbers(reference)
        self.ref_label = "paper" if reference == "paper" else "publ."
        self.ref_line = f"Reference: {published['source']}; {published['metric']}."
        self.ref_has_clean = any("0.0" in t for t in published["symmetric"].values())

    def role(self, variant: str):
        """The :class:`~apl.presets.FormRole` of form ``variant`` in this grid, or None."""
        return FORMS.get((variant, self.protocols.get(variant)))

    def banner(self, variant: str, cells) -> str:
        """The first stamp line of form ``variant``, from its runs' configs."""
        configs = [r.get("config") or {} for recs in cells.values() for r in recs]
        return preset_banner(self.preset, variant, self.protocols.get(variant),
                             describe_protocol(configs), self.overrides)

    def lines(self, variant: str, cells) -> list[str]:
        """The stamp of one form's table (a figure carries the first two lines)."""
        seeds = sorted({int(r["seed"]) for recs in cells.values() for r in recs})
        seed_text = (f"mean ± sample std over seeds {', '.join(map(str, seeds))}"
                     if len(seeds) > 1 else f"single run per cell (seed {seeds[0]})"
                     if seeds else "no finished runs")
        role = self.role(variant)
        return [self.banner(variant, cells), self.data,
                f"Loss variant: {variant} (definitions in LOSSES.md); CE does not depend on the "
                f"variant: one CE run serves every form trained under the same protocol."
                + (f" This table: {role.question}" if role else ""),
                self.ref_line, f"Cells: {seed_text}; Δ = ours − reference."]

    def columns(self) -> list[tuple[float, bool]]:
        """(noise, with reference and Δ columns) for every noise column of a table."""
        return [(n, n != 0.0 or self.ref_has_clean) for n in GRID_NOISE]
