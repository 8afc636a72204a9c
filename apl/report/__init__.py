"""Table 1 and Figures 1-3 of the paper, rebuilt from a grid's run records alone.

:func:`make_report` reads ``O/runs/*/result.json`` (and ``O/manifest.json`` when present,
for the preset name, its forms and the machine; :mod:`apl.records`) and writes, for each form
(a loss variant under its protocol; the author's code first): Table 1 as Markdown, CSV and
LaTeX (:mod:`apl.report.tables`: final-epoch and best-epoch accuracy, each next to the
published number and the difference), Figures 1-3 as PNG and PDF (:mod:`apl.report.figures`),
and a ``README.md`` describing every file and where the paper's text and its code differ
(:mod:`apl.report.readme`). No training happens here, so the report can be rebuilt at any
time, also from a partly finished grid (missing cells print as an em dash). Run records
written under an earlier definition of the runs (:func:`apl.records.is_current`) are left out,
and the README names them.

Tables are deterministic: the same run records give byte-identical table files.

A grid of the successors' presets gets their own report instead (:mod:`apl.report.successors`:
a table and a figure per noise family).
"""
from __future__ import annotations

from pathlib import Path

from apl.losses.spec import APL_NAMES
from apl.paper import SOURCES
from apl.presets import GRID_LOSSES, PRESETS
from apl.records import is_current, load_manifest, load_run_records
from apl.report.cells import group_runs, reported_variants
from apl.report.figures import FIGURE1_LOSSES, FIGURE_NOISE, epoch_figure, noise_figure
from apl.report.readme import render_readme
from apl.report.stamp import Stamp
from apl.report.successors import make_successor_report
from apl.report.sweep import split_sweep, sweep_figures
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
    found = load_run_records(runs)
    records = [r for r in found if is_current(r)]
    stale = sorted(r["_run"] for r in found if not is_current(r))
    if not records:
        raise ValueError(f"no finished runs (result.json) under {runs}" + (
            f"; the {len(stale)} there were written by an earlier version (their names do not "
            f"match their configs): run the grid again" if stale else ""))
    manifest = load_manifest(runs)
    if _report_kind(records, manifest) == "successors":
        if reference != "auto":
            raise ValueError(f"--reference {reference} is for the paper's grid; the successors' report compares "
                             "with the successors' published numbers (apl/successor_numbers.json)")
        return make_successor_report(records, manifest, Path(out), figures=figures,
                                     command=command or f"python -m apl report --runs {runs} --out {out}",
                                     notes=[f"Left out: {len(stale)} run record(s) written by an earlier "
                                            f"version: {', '.join(stale)}."] if stale else [])
    records, sweep = split_sweep(records, manifest)  # a sweep: Table 1 shows one run per cell
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
    notes: list[str] = []
    if stale:
        notes.append(f"Left out: {len(stale)} run record(s) written by an earlier version, whose names "
                     f"do not match their configs under this one: {', '.join(stale)}.")
    written: list[Path] = []
    forms = reported_variants(groups)
    for variant in forms:
        cells = groups[variant]
        for ext, render in RENDERERS.items():
            path = out / f"table1_{variant}.{ext}"
            path.write_text(render(variant, cells, stamp), encoding="utf-8")
            written.append(path)
            files[path.name] = (f"Table 1, form {variant} ({ext}): final- and best-epoch "
                                f"accuracy, published number, difference")
        if not figures:
            continue
        figure_stamp = stamp.lines(variant, cells)[:2]
        if any((loss, FIGURE_NOISE) in cells for loss in GRID_LOSSES):
            for number, losses, what in ((1, FIGURE1_LOSSES, "NCE, NFL, CE, FL"),
                                         (2, GRID_LOSSES, "all eight losses")):
                for p in epoch_figure(number, losses, variant, cells, figure_stamp, out):
                    written.append(p)
                    files[p.name] = (f"Figure {number}, form {variant}: training accuracy on the "
                                     f"noisy labels (left, as the paper plots it) and clean test "
                                     f"accuracy (right) vs epoch at η = {FIGURE_NOISE}, {what}")
        else:
            notes.append(f"Not written: Figures 1-2 of form {variant} (no runs at η = {FIGURE_NOISE}).")
        for p in noise_figure(variant, cells, reference, figure_stamp, out):
            written.append(p)
            files[p.name] = (f"Figure 3, form {variant}: final test accuracy vs noise rate, "
                             f"published Table 1 points as ×")
    written += sweep_figures(sweep, stamp, out, files, notes, figures=figures)
    files["README.md"] = "this file"
    readme = out / "README.md"
    readme.write_text(render_readme(files, records, manifest, stamp,
                                    command or f"python -m apl report --runs {runs} --out {out}",
                                    notes, groups, forms), encoding="utf-8")
    written.append(readme)
    return sorted(written)


def _report_kind(records: list[dict], manifest: dict | None) -> str:
    """``"successors"`` for a grid of a successors preset (or, without a manifest, runs of a loss
    outside the paper's forms), else ``"paper"``."""
    preset = PRESETS.get((manifest or {}).get("preset") or "")
    if preset is not None:
        return preset.report
    return "successors" if any(r["loss"] not in APL_NAMES for r in records) else "paper"
