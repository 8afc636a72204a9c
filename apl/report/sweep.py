"""A sweep in the report: which runs Table 1 shows, and a figure of accuracy vs each swept value.

A grid run with ``--lam``, ``--gamma`` or ``--set KEY=V1,V2`` (:mod:`apl.sweeps`) holds several runs
per cell of Table 1, one per point of the sweep; its manifest names the sweep's axes and values.
:func:`split_sweep` keeps for Table 1 and Figures 1-3 the run of each cell at the grid's own value
of every swept axis (the value the grid has without the sweep, e.g. λ = 0.6 under the paper's
protocol) when the sweep holds it, else at the sweep's first value. :func:`sweep_figures` draws,
per form and swept axis, the final test accuracy against the axis's values, one panel per noise
rate, one line per loss the axis applies to, the other axes at Table 1's values.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure

from apl.config import TrainConfig
from apl.plan import preset_config
from apl.presets import GRID_LOSSES, GRID_NOISE
from apl.records import read_number
from apl.report.cells import loss_label, noise_heading
from apl.report.figures import CHANCE, line_style, save_figure, stamp_figure
from apl.sweeps import applies, at_point, axis_value

__all__ = ["Sweep", "split_sweep", "sweep_points", "sweep_figures"]

#: How a figure names an axis: in its title, on its x axis.
_AXIS_LABELS = {"lam": "λ (weight of the active term)", "gamma": "γ (focal exponent)"}
_AXIS_SYMBOLS = {"lam": "λ", "gamma": "γ"}


@dataclass
class Sweep:
    """The sweep of a report: its axes and values (from the manifest), and every run with its
    config and the config Table 1 shows for its cell (None when the grid does not plan that cell)."""

    axes: dict
    runs: list  # (record, config, the cell's config at Table 1's values or None)


def _table_config(config: TrainConfig, preset: str, overrides: dict, axes: dict) -> TrainConfig | None:
    """``config``'s cell as Table 1 shows it: the grid's config of that cell, each swept axis at the
    grid's own value when the sweep holds it, else at the sweep's first value."""
    try:
        grid = preset_config(preset, loss=config.loss, variant=config.variant, noise=config.noise,
                             seed=config.seed, overrides=overrides)
    except ValueError:
        return None  # a cell this preset does not plan (e.g. a run copied in from another grid)
    point = {}
    for axis, values in axes.items():
        if applies(grid, axis):
            own = axis_value(grid, axis)
            point[axis] = own if own in values else values[0]
    return at_point(grid, point)


def split_sweep(records: list[dict], manifest: dict | None) -> tuple[list[dict], Sweep | None]:
    """(the records Table 1 and Figures 1-3 use, the sweep or None). Without a sweep in the manifest
    the records are returned as they are."""
    axes = (manifest or {}).get("sweep") or {}
    if not axes:
        return records, None
    preset, overrides = manifest.get("preset"), manifest.get("overrides") or {}
    runs, table = [], []
    for record in records:
        config = TrainConfig.from_dict(record["config"])
        shown = _table_config(config, preset, overrides, axes)
        runs.append((record, config, shown))
        if shown is not None and shown.identity() == config.identity():
            table.append(record)
    return table, Sweep(axes, runs)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def sweep_points(sweep: Sweep, axis: str) -> dict:
    """``{variant: {noise: {loss: {value: [final accuracies]}}}}`` of the runs on ``axis``'s line: every
    other axis at Table 1's value."""
    out: dict = {}
    for record, config, shown in sweep.runs:
        if shown is None or not applies(config, axis):
            continue
        value = axis_value(config, axis)
        if at_point(shown, {axis: value}).identity() != config.identity():
            continue
        cell = out.setdefault(config.variant, {}).setdefault(round(config.noise, 4), {})
        cell.setdefault(config.loss, {}).setdefault(value, []).append(read_number(record["final_test_acc"]))
    return out


def _draw(axis: str, values: list, variant: str, by_noise: dict, stamp: list[str]) -> Figure:
    """The figure of one form: one panel per noise rate, one line per loss (mean over seeds, ± std)."""
    numeric = all(_is_number(v) for v in values)
    xs = {v: (v if numeric else i) for i, v in enumerate(values)}
    noises = [n for n in GRID_NOISE if n in by_noise]
    label = _AXIS_LABELS.get(axis, axis)
    fig = Figure(figsize=(2.9 * len(noises) + 2.4, 4.6), dpi=150)
    fig.suptitle(f"Final test accuracy vs {label}, form {variant}", fontsize=12)
    width = 0.72 / len(noises)
    panels = []
    for j, noise in enumerate(noises):
        ax = fig.add_axes((0.09 + j * width, 0.24, width * 0.9, 0.62), sharey=panels[0] if panels else None)
        ax.set_title(noise_heading(noise), fontsize=10)
        ax.axhline(CHANCE, color="0.45", linestyle=":", linewidth=1.0)
        ax.grid(True, alpha=0.3)
        for i, loss in enumerate(GRID_LOSSES):
            accs = by_noise[noise].get(loss)
            if not accs:
                continue
            pts = sorted((xs[v], statistics.fmean(a), statistics.stdev(a) if len(a) > 1 else 0.0)
                         for v, a in accs.items() if v in xs)
            x, mean, std = zip(*pts)
            ax.errorbar(x, mean, yerr=std if any(std) else None, marker="o", markersize=3.5, capsize=2,
                        label=loss_label(loss), **line_style(loss, i))
        if not numeric:
            ax.set_xticks(list(xs.values()), [str(v) for v in values])
        ax.set_xlabel(_AXIS_SYMBOLS.get(axis, axis))
        if j == 0:
            ax.set_ylabel("final test accuracy (%)")
        else:
            ax.tick_params(labelleft=False)  # the panels share the first one's y axis
        panels.append(ax)
    handles, labels = {}, {}
    for ax in panels:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
            labels[lab] = lab
    panels[-1].legend(list(handles.values()), list(labels), loc="upper left", bbox_to_anchor=(1.04, 1.0),
                      fontsize=8, frameon=False)
    stamp_figure(fig, stamp)
    return fig


def sweep_figures(sweep: Sweep | None, stamp, out: Path, files: dict, notes: list, *,
                  figures: bool = True) -> list[Path]:
    """Write ``sweep_<axis>_<form>.png|.pdf`` for every swept axis and form (``figures``), describe them
    in ``files`` and say in ``notes`` which runs Table 1 shows; return the written paths."""
    if sweep is None:
        return []
    axes_text = "; ".join(f"{axis} ∈ {{{', '.join(map(str, values))}}}" for axis, values in sweep.axes.items())
    notes.append(f"Sweep: {axes_text}. Table 1 and Figures 1-3 show the run of each cell at the grid's own "
                 f"value of every swept axis when the sweep holds it, else at the sweep's first value; the "
                 f"sweep_* figures show every value.")
    if not figures:
        return []
    written = []
    for axis, values in sweep.axes.items():
        for variant, by_noise in sorted(sweep_points(sweep, axis).items()):
            cells = {(loss, noise): [r for r, c, _ in sweep.runs if c.variant == variant and c.loss == loss
                                     and round(c.noise, 4) == noise]
                     for noise, losses in by_noise.items() for loss in losses}
            fig = _draw(axis, list(values), variant, by_noise, stamp.lines(variant, cells)[:2])
            paths = save_figure(fig, Path(out) / f"sweep_{axis}_{variant}")
            for p in paths:
                files[p.name] = (f"Sweep, form {variant}: final test accuracy vs {_AXIS_LABELS.get(axis, axis)} "
                                 f"at each noise rate (mean ± std over seeds where several)")
            written += paths
    return written
