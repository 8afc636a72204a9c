"""Figures 1-3 of one form as PNG and PDF (no dates or versions in the files).

Figure 1: accuracy per epoch at the captions' noise rate for NCE, NFL, CE, FL; Figure 2: the
same for all eight losses. As the paper drew them, the left panel is the training accuracy on
the noisy labels the run trained on (``train_acc_noisy``, the running accuracy of each epoch in
train mode: what the author's code plotted); the right panel is clean test accuracy. Figure 3:
final test accuracy per noise rate, with the published numbers as crosses. Drawn on bare
:class:`matplotlib.figure.Figure` objects: no pyplot state and no display are needed.
"""
from __future__ import annotations

import statistics
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from apl.paper import reference_accuracy
from apl.presets import GRID_LOSSES, GRID_NOISE
from apl.records import read_number
from apl.report.cells import curve, loss_label, noise_heading

__all__ = ["FIGURE_NOISE", "FIGURE1_LOSSES", "EPOCH_PANELS", "CHANCE", "line_style", "stamp_figure", "save_figure",
           "chance_handle", "accuracy_figure", "finish_figure", "draw_epoch_figure", "epoch_figure", "noise_figure"]

#: The noise rate of Figures 1 and 2 (the paper's captions).
FIGURE_NOISE = 0.6
#: Figure 1's losses (paper Sec. 4.1).
FIGURE1_LOSSES = ("nce", "nfl", "ce", "fl")
#: The panels of Figures 1-2, left to right: history key, panel title, y-axis label.
EPOCH_PANELS = (
    ("train_acc_noisy", "training accuracy on the noisy labels (as the paper plots)",
     "train accuracy on noisy labels (%)"),
    ("test_acc", "clean test accuracy", "test accuracy (%)"),
)
#: Test accuracy (%) of a constant prediction on CIFAR-10's balanced test set.
CHANCE = 10.0


def line_style(loss: str, i: int) -> dict:
    """The line of the ``i``-th loss of :data:`apl.presets.GRID_LOSSES` (colour, dashes), in every figure."""
    # APL sums dashed, single losses solid: the paper's two families stay apart in print.
    return dict(color=f"C{i}", linestyle="--" if "+" in loss else "-", linewidth=1.6)


def chance_handle() -> Line2D:
    """The legend entry of the chance line."""
    return Line2D([], [], color="0.45", linestyle=":", linewidth=1.0)


def _axes(fig, rect, title: str, ylabel: str):
    """One accuracy panel at ``rect``, with the chance line."""
    ax = fig.add_axes(rect)
    ax.set_title(title, fontsize=11)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    # Ten balanced classes: 10% is what a collapsed model scores (the paper's 10.00 cells).
    ax.axhline(CHANCE, color="0.45", linestyle=":", linewidth=1.0)
    return ax


def stamp_figure(fig, stamp: list[str]) -> None:
    """The report's stamp (what the figure was made from) in small print at the bottom left."""
    fig.text(0.01, 0.01, "\n".join(stamp), fontsize=6.2, va="bottom", ha="left", wrap=True)


def accuracy_figure(title: str, stamp: list[str]):
    """A one-panel test-accuracy figure titled ``title``, with the chance line and ``stamp``: ``(fig, ax)``."""
    fig = Figure(figsize=(8.0, 5.6), dpi=150)
    ax = _axes(fig, (0.09, 0.19, 0.66, 0.72), title, "test accuracy (%)")
    stamp_figure(fig, stamp)
    return fig, ax


def finish_figure(fig, ax, handles, labels, stem: Path) -> list[Path]:
    """Legend right of ``ax``, then the PNG and PDF of ``stem``."""
    ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8,
              frameon=False)
    return save_figure(fig, stem)


def draw_epoch_figure(number: int, losses, variant: str, cells, stamp: list[str]) -> Figure:
    """Figure 1 or 2 of form ``variant``: accuracy vs epoch at :data:`FIGURE_NOISE` for
    ``losses``, one panel per :data:`EPOCH_PANELS` entry (one line per loss, labelled as
    the paper prints it; the chance line unlabelled)."""
    fig = Figure(figsize=(12.0, 5.6), dpi=150)
    fig.suptitle(f"Figure {number}: accuracy vs epoch, symmetric η = {FIGURE_NOISE}, form {variant}",
                 fontsize=12)
    panels = [_axes(fig, (0.06 + 0.42 * i, 0.19, 0.35, 0.68), title, ylabel)
              for i, (_, title, ylabel) in enumerate(EPOCH_PANELS)]
    for ax, (key, _, _) in zip(panels, EPOCH_PANELS):
        for i, loss in enumerate(GRID_LOSSES):
            recs = cells.get((loss, FIGURE_NOISE))
            if loss not in losses or not recs:
                continue
            epochs, means, stds = curve(recs, key)
            ax.plot(epochs, means, label=loss_label(loss), marker=".", **line_style(loss, i))
            if stds:
                ax.fill_between(epochs, [m - s for m, s in zip(means, stds)],
                                [m + s for m, s in zip(means, stds)], color=f"C{i}", alpha=0.15)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
    stamp_figure(fig, stamp)
    handles, labels = panels[-1].get_legend_handles_labels()
    panels[-1].legend(handles + [chance_handle()], labels + ["chance (10%)"], loc="upper left",
                      bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False)
    return fig


def save_figure(fig, stem: Path) -> list[Path]:
    """The PNG and PDF of ``stem``."""
    paths = [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
    # No dates and no version strings in the files, so the same runs give the same bytes.
    fig.savefig(paths[0], dpi=150, metadata={"Software": None})
    fig.savefig(paths[1], metadata={"CreationDate": None, "Producer": None, "Creator": None})
    return paths


def epoch_figure(number: int, losses, variant: str, cells, stamp: list[str], out: Path) -> list[Path]:
    """:func:`draw_epoch_figure`, written to ``out/figure<number>_<variant>.png|.pdf``."""
    return save_figure(draw_epoch_figure(number, losses, variant, cells, stamp), out / f"figure{number}_{variant}")


def noise_figure(variant: str, cells, reference: str, stamp: list[str], out: Path) -> list[Path]:
    """Figure 3: final test accuracy vs noise rate, ``reference``'s published numbers as crosses."""
    fig, ax = accuracy_figure(f"Figure 3: test accuracy vs noise rate (final epoch), "
                          f"form {variant}", stamp)
    handles, labels = [], []
    for i, loss in enumerate(GRID_LOSSES):
        style = line_style(loss, i)
        pts = [(n, statistics.fmean(read_number(r["final_test_acc"]) for r in cells[(loss, n)]))
               for n in GRID_NOISE if cells.get((loss, n))]
        ref = [(n, reference_accuracy(reference, loss, n)) for n in GRID_NOISE]
        ref = [(n, a) for n, a in ref if a is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", markersize=4, **style)
        if ref:
            ax.plot(*zip(*ref), linestyle="none", marker="x", markersize=7, color=style["color"])
        if pts or ref:  # one legend entry per loss, also when only the published points exist
            handles.append(Line2D([], [], marker="o", markersize=4, **style))
            labels.append(loss_label(loss) + ("" if pts else " (no runs)"))
    handles.append(chance_handle())
    labels.append("chance (10%)")
    handles.append(Line2D([], [], linestyle="none", marker="x", color="black"))
    labels.append("× published:\n" + ("the paper's Table 1" if reference == "paper"
                                        else "cited work's protocol"))
    ax.set_xticks(list(GRID_NOISE), [noise_heading(n) for n in GRID_NOISE])
    ax.set_xlabel("symmetric noise rate η")
    return finish_figure(fig, ax, handles, labels, out / f"figure3_{variant}")
