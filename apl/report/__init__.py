"""Table 1 and Figures 1-3 of the paper, rebuilt from a grid's run records alone.

:func:`make_report` reads ``O/runs/*/result.json`` (and ``O/manifest.json`` when present,
for the preset name and the machine; :mod:`apl.records`) and writes, for each loss variant:
Table 1 as Markdown, CSV and LaTeX (:mod:`apl.report.tables`: final-epoch and best-epoch
accuracy, each next to the published number and the difference), Figures 1-3 as PNG and PDF
(:mod:`apl.report.figures`), and a ``README.md`` describing every file
(:mod:`apl.report.readme`). No training happens here, so the report can be rebuilt at any
time, also from a partly finished grid (missing cells print as an em dash).

Tables are deterministic: the same run records give byte-identical table files.
"""
from __future__ import annotations

from pathlib import Path

from apl.paper import SOURCES
from apl.presets import GRID_LOSSES
from apl.records import load_manifest, load_run_records
from apl.report.cells import all_seeds, group_runs, reported_variants
from apl.report.figures import FIGURE1_LOSSES, FIGURE_NOISE, epoch_figure, noise_figure
from apl.report.readme import render_readme
from apl.report.stamp import Stamp
from apl.report.tables import RENDERERS

__all__ = ["make_report", "REFERENCES"]

#: What a report can compare with: a source of published numbers, or "auto" (by the preset).
REFERENCES = ("auto", *SOURCES)


def make_report(runs, out, *, reference: str = "auto", command: str | None = None,
                figures: bool = True) -> list[Path]:
    """Write every table, figure and the README for the runs under ``runs`` into ``out``.

    ``reference`` is ``"paper"`` (the seed paper's Table 1), ``"ma2020"`` (the cited work's
    published numbers) or ``"auto"``: ``"ma2020"`` for the ma2020 preset, else ``"paper"``.
    Returns the written paths, sorted.
    """
    records = load_run_records(runs)
    if not records:
        raise ValueError(f"no finished runs (result.json) under {runs}")
    manifest = load_manifest(runs)
    if reference == "auto":
        reference = "ma2020" if (manifest or {}).get("preset") == "ma2020" else "paper"
    if reference not in SOURCES:
        raise ValueError(f"reference must be 'auto', 'paper' or 'ma2020', got {reference!r}")
    groups = group_runs(records)
    if not any(groups.values()):
        raise ValueError(f"none of the {len(records)} runs under {runs} belongs to the "
                         "paper's grid (losses x symmetric noise)")
    stamp = Stamp(records, manifest, reference)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    skipped: list[str] = []
    written: list[Path] = []
    for variant in reported_variants(groups):
        cells = groups[variant]
        for ext, render in RENDERERS.items():
            path = out / f"table1_{variant}.{ext}"
            path.write_text(render(variant, cells, stamp), encoding="utf-8")
            written.append(path)
            files[path.name] = (f"Table 1, variant {variant} ({ext}): final- and best-epoch "
                                f"accuracy, published number, difference")
        if not figures:
            continue
        figure_stamp = stamp.lines(variant, all_seeds(cells))[:2]
        if any((loss, FIGURE_NOISE) in cells for loss in GRID_LOSSES):
            for number, losses, what in ((1, FIGURE1_LOSSES, "NCE, NFL, CE, FL"),
                                         (2, GRID_LOSSES, "all eight losses")):
                for p in epoch_figure(number, losses, variant, cells, figure_stamp, out):
                    written.append(p)
                    files[p.name] = (f"Figure {number}, variant {variant}: test accuracy vs "
                                     f"epoch at η = {FIGURE_NOISE}, {what}")
        else:
            skipped.append(f"Figures 1-2 of variant {variant} (no runs at η = {FIGURE_NOISE})")
        for p in noise_figure(variant, cells, reference, figure_stamp, out):
            written.append(p)
            files[p.name] = (f"Figure 3, variant {variant}: final test accuracy vs noise rate, "
                             f"published Table 1 points as ×")
    files["README.md"] = "this file"
    readme = out / "README.md"
    readme.write_text(render_readme(files, records, manifest, stamp,
                                    command or f"python -m apl report --runs {runs} --out {out}",
                                    skipped), encoding="utf-8")
    written.append(readme)
    return sorted(written)
