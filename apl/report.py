"""Table 1 and Figures 1-3 of the paper, rebuilt from a grid's run records alone.

``python -m apl report --runs O --out paper_figures`` reads ``O/runs/*/result.json`` (and
``O/manifest.json`` when present, for the preset name and the machine) and writes, for each
loss variant: Table 1 as Markdown, CSV and LaTeX (final-epoch and best-epoch accuracy, each
next to the published number and the difference), Figures 1-3 as PNG and PDF, and a
``README.md`` describing every file. No training happens here, so the report can be rebuilt
at any time, also from a partly finished grid (missing cells print as an em dash).

Tables are deterministic: the same run records give byte-identical table files.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import shlex
import statistics
import sys
from pathlib import Path

from apl.grid import (GRID_LOSSES, GRID_NOISE, GRID_VARIANTS, describe_protocol, is_variant_free,
                      loss_label, preset_banner)
from apl.paper import paper_numbers, reference_accuracy

__all__ = ["load_run_records", "load_manifest", "group_runs", "table_rows", "make_report",
           "add_cli", "main"]

#: The metrics a table reports: result.json key, heading.
METRICS = {
    "final": ("final_test_acc", "Final-epoch test accuracy (%)"),
    "best": ("best_test_acc", "Best-epoch test accuracy (%)"),
}
#: The noise rate of Figures 1 and 2 (the paper's captions).
FIGURE_NOISE = 0.6
#: Test accuracy (%) of a constant prediction on CIFAR-10's balanced test set.
CHANCE = 10.0
#: Figure 1's losses (paper Sec. 4.1).
FIGURE1_LOSSES = ("nce", "nfl", "ce", "fl")
_REQUIRED_KEYS = ("loss", "variant", "noise", "seed", "history", "final_test_acc", "best_test_acc")
_DASH = "—"


# --------------------------------------------------------------------------- reading

def _runs_dir(root: Path) -> Path:
    return root / "runs" if (root / "runs").is_dir() else root


def load_run_records(root) -> list[dict]:
    """Every finished run under ``root`` (a grid output folder or its ``runs/``), sorted by path.

    Each record is the run's ``result.json`` with ``_run`` (the run folder's name) added.
    Raises ``ValueError`` when the folder does not exist or a record is unreadable.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"runs folder {root} does not exist")
    records = []
    for path in sorted(_runs_dir(root).glob("*/result.json")):
        try:
            rec = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read run record {path}: {e}") from None
        if not isinstance(rec, dict):
            raise ValueError(f"run record {path} is not a JSON object")
        missing = [k for k in _REQUIRED_KEYS if k not in rec]
        if missing:
            raise ValueError(f"run record {path} lacks {', '.join(missing)}")
        rec["_run"] = path.parent.name
        records.append(rec)
    return records


def load_manifest(root) -> dict | None:
    """The grid's ``manifest.json`` under ``root``, or None when there is none."""
    path = Path(root) / "manifest.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read manifest {path}: {e}") from None


def _noise_key(noise) -> float:
    return round(float(noise), 4)


def _in_grid(rec: dict) -> bool:
    noise = _noise_key(rec["noise"])
    symmetric = noise == 0.0 or rec.get("noise_type") in ("symmetric", "ma2020_symmetric")
    return rec["loss"] in GRID_LOSSES and noise in GRID_NOISE and symmetric


def group_runs(records: list[dict]) -> dict[str, dict[tuple[str, float], list[dict]]]:
    """``{variant: {(loss, noise): [records sorted by seed]}}`` for the runs of the paper's grid.

    A loss whose definition does not depend on the variant (CE) is listed under every
    variant: the same runs serve both tables. Records outside the grid (other losses,
    asymmetric noise) are left out. Two records for the same cell and seed are an error
    (two different grids in one folder).
    """
    seen: dict[tuple, str] = {}
    groups: dict[str, dict[tuple[str, float], list[dict]]] = {v: {} for v in GRID_VARIANTS}
    for rec in records:
        if not _in_grid(rec):
            continue
        loss, noise, seed = rec["loss"], _noise_key(rec["noise"]), int(rec["seed"])
        free = is_variant_free(loss)
        if not free and rec["variant"] not in GRID_VARIANTS:
            raise ValueError(f"run {rec['_run']} has unknown variant {rec['variant']!r}")
        key = (loss, None if free else rec["variant"], noise, seed)
        if key in seen:
            raise ValueError(f"runs {seen[key]} and {rec['_run']} are the same grid cell "
                             f"(loss {loss}, noise {noise}, seed {seed}); keep one grid per folder")
        seen[key] = rec["_run"]
        for variant in (GRID_VARIANTS if free else (rec["variant"],)):
            groups[variant].setdefault((loss, noise), []).append(rec)
    for cells in groups.values():
        for recs in cells.values():
            recs.sort(key=lambda r: int(r["seed"]))
    return groups


def _reported_variants(groups) -> list[str]:
    """Variants with runs of their own; CE alone does not make a variant worth a table."""
    own = [v for v in GRID_VARIANTS
           if any(not is_variant_free(loss) for loss, _ in groups[v])]
    return own or [v for v in GRID_VARIANTS if groups[v]]


# --------------------------------------------------------------------------- numbers

def _num(value) -> float:
    """A recorded number; ``null`` (train writes non-finite numbers so) reads as NaN."""
    return float("nan") if value is None else float(value)


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def table_rows(cells: dict, metric: str, reference: str) -> list[dict]:
    """One row per (loss, noise) of the paper's grid, in Table 1's order.

    Row keys: ``loss``, ``noise``, ``n`` (seeds), ``seeds``, ``mean``, ``std`` (sample std,
    None for one seed), ``reference`` (published accuracy or None), ``diff`` (mean - reference).
    """
    key = METRICS[metric][0]
    rows = []
    for loss in GRID_LOSSES:
        for noise in GRID_NOISE:
            recs = cells.get((loss, noise), [])
            mean, std = _mean_std([_num(r[key]) for r in recs])
            ref = reference_accuracy(reference, loss, noise)
            rows.append(dict(loss=loss, noise=noise, n=len(recs),
                             seeds=[int(r["seed"]) for r in recs], mean=mean, std=std,
                             reference=ref,
                             diff=None if mean is None or ref is None else mean - ref))
    return rows


def _f(x: float | None, signed: bool = False) -> str:
    if x is None:
        return ""
    s = f"{x:+.2f}" if signed else f"{x:.2f}"
    return "+0.00" if s == "-0.00" else s


def _ours(row: dict, pm: str) -> str:
    if row["mean"] is None:
        return _DASH
    return _f(row["mean"]) + (f"{pm}{_f(row['std'])}" if row["std"] is not None else "")


# --------------------------------------------------------------------------- context

class _Context:
    """What every table and figure is stamped with, computed once from records + manifest."""

    def __init__(self, records: list[dict], manifest: dict | None, reference: str):
        self.preset = (manifest or {}).get("preset")
        self.overrides = (manifest or {}).get("overrides") or {}
        configs = [r.get("config") or {} for r in records]
        self.banner = preset_banner(self.preset, describe_protocol(configs), self.overrides)
        sources = sorted({str(r.get("data_source")) for r in records if r.get("data_source")})
        self.data = "Data: " + ("; ".join(sources) if sources else "source not recorded")
        self.reference = reference
        pub = paper_numbers(reference)
        self.ref_label = "paper" if reference == "paper" else "publ."
        self.ref_line = f"Reference: {pub['source']}; {pub['metric']}."
        self.ref_has_clean = any("0.0" in t for t in pub["symmetric"].values())

    def stamp_lines(self, variant: str, seeds: list[int]) -> list[str]:
        seed_text = (f"mean ± sample std over seeds {', '.join(map(str, seeds))}"
                     if len(seeds) > 1 else f"single run per cell (seed {seeds[0]})"
                     if seeds else "no finished runs")
        return [self.banner, self.data,
                f"Loss variant: {variant} (definitions in LOSSES.md); CE does not depend on "
                f"the variant, so the same CE runs appear in every variant's table.",
                self.ref_line, f"Cells: {seed_text}; Δ = ours − reference."]


def _all_seeds(cells) -> list[int]:
    return sorted({int(r["seed"]) for recs in cells.values() for r in recs})


def _noise_heading(noise: float) -> str:
    return "clean" if noise == 0.0 else f"η={noise:.1f}"


def _columns(ctx: _Context) -> list[tuple[float, bool]]:
    """(noise, with reference and Δ columns) for every noise column of a table."""
    return [(n, n != 0.0 or ctx.ref_has_clean) for n in GRID_NOISE]


# --------------------------------------------------------------------------- tables

def render_markdown(variant: str, cells, ctx: _Context) -> str:
    """Table 1 of one variant as Markdown (final- and best-epoch tables)."""
    out = [f"# Table 1: test accuracy under symmetric label noise, variant `{variant}`", ""]
    out += [f"> {line}  " for line in ctx.stamp_lines(variant, _all_seeds(cells))]
    for metric, (_, title) in METRICS.items():
        rows = {(r["loss"], r["noise"]): r for r in table_rows(cells, metric, ctx.reference)}
        head, rule = ["Loss"], ["---"]
        for noise, with_ref in _columns(ctx):
            h = _noise_heading(noise)
            head += [f"{h} ours"] + ([f"{h} {ctx.ref_label}", f"{h} Δ"] if with_ref else [])
            rule += ["---:"] * (3 if with_ref else 1)
        out += ["", f"## {title}", "", "| " + " | ".join(head) + " |",
                "| " + " | ".join(rule) + " |"]
        for loss in GRID_LOSSES:
            line = [loss_label(loss)]
            for noise, with_ref in _columns(ctx):
                r = rows[(loss, noise)]
                line.append(_ours(r, " ± "))
                if with_ref:
                    line += [_f(r["reference"]) or _DASH, _f(r["diff"], signed=True) or _DASH]
            out.append("| " + " | ".join(line) + " |")
    return "\n".join(out) + "\n"


def render_csv(variant: str, cells, ctx: _Context) -> str:
    """Table 1 of one variant as long-format CSV: one line per metric, loss and noise."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["variant", "metric", "loss", "noise", "n_seeds", "seeds", "ours_mean",
                "ours_std", "reference", "reference_source", "diff"])
    for metric in METRICS:
        for r in table_rows(cells, metric, ctx.reference):
            w.writerow([variant, metric, r["loss"], f"{r['noise']:.1f}", r["n"],
                        " ".join(map(str, r["seeds"])), _f(r["mean"]), _f(r["std"]),
                        _f(r["reference"]), ctx.reference, _f(r["diff"], signed=True)])
    return buf.getvalue()


_TEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                "^": r"\textasciicircum{}", "—": "---", "−": "$-$", "–": "--", "±": r"$\pm$",
                "η": r"$\eta$", "Δ": r"$\Delta$"}


def _tex(text: str) -> str:
    return "".join(_TEX_ESCAPES.get(ch, ch) for ch in text)


def render_latex(variant: str, cells, ctx: _Context) -> str:
    """Table 1 of one variant as LaTeX (needs ``booktabs`` and ``graphicx``)."""
    cols = _columns(ctx)
    ncols = 1 + sum(3 if with_ref else 1 for _, with_ref in cols)
    caption = " ".join(_tex(s.rstrip(".")) + "." for s in ctx.stamp_lines(variant, _all_seeds(cells)))
    out = ["% Generated by `python -m apl report`; needs \\usepackage{booktabs,graphicx}."]
    for metric, (_, title) in METRICS.items():
        rows = {(r["loss"], r["noise"]): r for r in table_rows(cells, metric, ctx.reference)}
        group = ["Loss"]
        sub = [""]
        rules = []
        col = 2
        for noise, with_ref in cols:
            width = 3 if with_ref else 1
            group.append(f"\\multicolumn{{{width}}}{{c}}{{{_tex(_noise_heading(noise))}}}")
            sub += ["ours"] + ([_tex(ctx.ref_label), r"$\Delta$"] if with_ref else [])
            rules.append(f"\\cmidrule(lr){{{col}-{col + width - 1}}}")
            col += width
        out += ["\\begin{table}[t]", "\\centering",
                f"\\caption{{{_tex(title)}, variant \\texttt{{{_tex(variant)}}}. {caption}}}",
                f"\\label{{tab:table1-{variant}-{metric}}}",
                "\\resizebox{\\textwidth}{!}{%",
                "\\begin{tabular}{l" + "r" * (ncols - 1) + "}", "\\toprule",
                " & ".join(group) + " \\\\", " ".join(rules), " & ".join(sub) + " \\\\",
                "\\midrule"]
        for loss in GRID_LOSSES:
            line = [_tex(loss_label(loss))]
            for noise, with_ref in cols:
                r = rows[(loss, noise)]
                line.append(_tex(_ours(r, "±")))
                if with_ref:
                    line += [_f(r["reference"]) or "---", _f(r["diff"], signed=True) or "---"]
            out.append(" & ".join(line) + " \\\\")
        out += ["\\bottomrule", "\\end{tabular}}", "\\end{table}", ""]
    return "\n".join(out)


# --------------------------------------------------------------------------- figures

def _curve(recs: list[dict]) -> tuple[list[int], list[float], list[float] | None]:
    """Mean (and std when several seeds) of test accuracy per epoch, over the epochs all share."""
    n = min(len(r["history"]) for r in recs)
    epochs = [int(recs[0]["history"][i]["epoch"]) for i in range(n)]
    per_epoch = [[_num(r["history"][i]["test_acc"]) for r in recs] for i in range(n)]
    means = [statistics.fmean(v) for v in per_epoch]
    stds = [statistics.stdev(v) for v in per_epoch] if len(recs) > 1 else None
    return epochs, means, stds


def _style(loss: str, i: int) -> dict:
    # APL sums dashed, single losses solid: the paper's two families stay apart in print.
    return dict(color=f"C{i}", linestyle="--" if "+" in loss else "-", linewidth=1.6)


def _new_figure(title: str, stamp: list[str]):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.0, 5.6), dpi=150)
    ax = fig.add_axes((0.09, 0.19, 0.66, 0.72))
    ax.set_title(title, fontsize=11)
    ax.grid(True, alpha=0.3)
    # Ten balanced classes: 10% is what a collapsed model scores (the paper's 10.00 cells).
    ax.axhline(CHANCE, color="0.45", linestyle=":", linewidth=1.0)
    fig.text(0.01, 0.01, "\n".join(stamp), fontsize=6.2, va="bottom", ha="left", wrap=True)
    return fig, ax


def _save(fig, stem: Path) -> list[Path]:
    paths = [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
    # No dates and no version strings in the files, so the same runs give the same bytes.
    fig.savefig(paths[0], dpi=150, metadata={"Software": None})
    fig.savefig(paths[1], metadata={"CreationDate": None, "Producer": None, "Creator": None})
    return paths


def _epoch_figure(number: int, losses, variant: str, cells, stamp, out: Path) -> list[Path]:
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    fig, ax = _new_figure(f"Figure {number}: test accuracy vs epoch, symmetric "
                          f"η = {FIGURE_NOISE}, variant {variant}", stamp)
    for i, loss in enumerate(GRID_LOSSES):
        recs = cells.get((loss, FIGURE_NOISE))
        if loss not in losses or not recs:
            continue
        epochs, means, stds = _curve(recs)
        ax.plot(epochs, means, label=loss_label(loss), marker=".", **_style(loss, i))
        if stds:
            ax.fill_between(epochs, [m - s for m, s in zip(means, stds)],
                            [m + s for m, s in zip(means, stds)], color=f"C{i}", alpha=0.15)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    handles, labels = ax.get_legend_handles_labels()
    handles.append(Line2D([], [], color="0.45", linestyle=":", linewidth=1.0))
    labels.append("chance (10%)")
    ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8,
              frameon=False)
    return _save(fig, out / f"figure{number}_{variant}")


def _noise_figure(variant: str, cells, ctx: _Context, stamp, out: Path) -> list[Path]:
    from matplotlib.lines import Line2D

    fig, ax = _new_figure(f"Figure 3: test accuracy vs noise rate (final epoch), "
                          f"variant {variant}", stamp)
    handles, labels = [], []
    for i, loss in enumerate(GRID_LOSSES):
        style = _style(loss, i)
        pts = [(n, statistics.fmean(_num(r["final_test_acc"]) for r in cells[(loss, n)]))
               for n in GRID_NOISE if cells.get((loss, n))]
        ref = [(n, reference_accuracy(ctx.reference, loss, n)) for n in GRID_NOISE]
        ref = [(n, a) for n, a in ref if a is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", markersize=4, **style)
        if ref:
            ax.plot(*zip(*ref), linestyle="none", marker="x", markersize=7, color=style["color"])
        if pts or ref:  # one legend entry per loss, also when only the published points exist
            handles.append(Line2D([], [], marker="o", markersize=4, **style))
            labels.append(loss_label(loss) + ("" if pts else " (no runs)"))
    handles.append(Line2D([], [], color="0.45", linestyle=":", linewidth=1.0))
    labels.append("chance (10%)")
    handles.append(Line2D([], [], linestyle="none", marker="x", color="black"))
    labels.append("× published:\n" + ("the paper's Table 1" if ctx.reference == "paper"
                                        else "cited work's protocol"))
    ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8,
              frameon=False)
    ax.set_xticks(list(GRID_NOISE), [_noise_heading(n) for n in GRID_NOISE])
    ax.set_xlabel("symmetric noise rate η")
    ax.set_ylabel("test accuracy (%)")
    return _save(fig, out / f"figure3_{variant}")


# --------------------------------------------------------------------------- README

def _machine_lines(manifest: dict | None) -> list[str]:
    if not manifest:
        return ["- no manifest.json next to the runs: machine and command unknown"]
    devices = ", ".join(f"{d.get('device')} ({d.get('name')})" for d in manifest.get("devices", []))
    keys = [("grid command", manifest.get("command")), ("devices", devices),
            ("torch", manifest.get("torch_version")),
            ("torchvision", manifest.get("torchvision_version")),
            ("CUDA", manifest.get("cuda_version")), ("python", manifest.get("python_version")),
            ("platform", manifest.get("platform")), ("git commit", manifest.get("git_commit")),
            ("grid started", manifest.get("started_at")),
            ("grid finished", manifest.get("finished_at") or "not finished")]
    return [f"- {k}: `{v}`" if k == "grid command" else f"- {k}: {v}" for k, v in keys]


def _readme(files: dict[str, str], records, manifest, ctx: _Context, command: str,
            skipped: list[str]) -> str:
    expected = len((manifest or {}).get("runs", {})) or None
    wall = sum(float(r.get("wall_time_s") or 0.0) for r in records)
    lines = ["# Reproduction report", "", f"**{ctx.banner}**", "", ctx.data, "",
             f"Report command: `{command}`", "",
             f"Runs found: {len(records)}" + (f" of {expected} planned" if expected else "")
             + f" (total training wall time {wall / 3600:.2f} h, summed over runs).", "",
             "## Machine and grid", ""] + _machine_lines(manifest) + [
             "", "## Files", "", "| file | what it is |", "| --- | --- |"]
    lines += [f"| `{name}` | {what} |" for name, what in sorted(files.items())]
    lines += ["", "## How to read", "",
              "- Table cells are our test accuracy in percent; with several seeds, mean ± "
              "sample standard deviation. Next to each: the published number and Δ = ours − "
              "published. Cells without runs, or without a published number, show —.",
              "- The final-epoch table is the headline (the published numbers are last-epoch "
              "or unspecified); the best-epoch table shows how much late-epoch memorisation "
              "of noisy labels costs.",
              "- " + ctx.ref_line,
              "- CE does not depend on the loss variant: its runs appear in every variant.",
              "- Loss definitions per variant: LOSSES.md at the project root."]
    lines += [f"- Not written: {s}." for s in skipped]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- entry point

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
    if reference not in ("paper", "ma2020"):
        raise ValueError(f"reference must be 'auto', 'paper' or 'ma2020', got {reference!r}")
    groups = group_runs(records)
    if not any(groups.values()):
        raise ValueError(f"none of the {len(records)} runs under {runs} belongs to the "
                         "paper's grid (losses x symmetric noise)")
    ctx = _Context(records, manifest, reference)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    skipped: list[str] = []
    written: list[Path] = []
    for variant in _reported_variants(groups):
        cells = groups[variant]
        for ext, render in (("md", render_markdown), ("csv", render_csv), ("tex", render_latex)):
            path = out / f"table1_{variant}.{ext}"
            path.write_text(render(variant, cells, ctx), encoding="utf-8")
            written.append(path)
            files[path.name] = (f"Table 1, variant {variant} ({ext}): final- and best-epoch "
                                f"accuracy, published number, difference")
        if not figures:
            continue
        stamp = ctx.stamp_lines(variant, _all_seeds(cells))[:2]
        if any((loss, FIGURE_NOISE) in cells for loss in GRID_LOSSES):
            for number, losses, what in ((1, FIGURE1_LOSSES, "NCE, NFL, CE, FL"),
                                         (2, GRID_LOSSES, "all eight losses")):
                for p in _epoch_figure(number, losses, variant, cells, stamp, out):
                    written.append(p)
                    files[p.name] = (f"Figure {number}, variant {variant}: test accuracy vs "
                                     f"epoch at η = {FIGURE_NOISE}, {what}")
        else:
            skipped.append(f"Figures 1-2 of variant {variant} (no runs at η = {FIGURE_NOISE})")
        for p in _noise_figure(variant, cells, ctx, stamp, out):
            written.append(p)
            files[p.name] = (f"Figure 3, variant {variant}: final test accuracy vs noise rate, "
                             f"published Table 1 points as ×")
    files["README.md"] = "this file"
    readme = out / "README.md"
    readme.write_text(_readme(files, records, manifest, ctx,
                              command or f"python -m apl report --runs {runs} --out {out}",
                              skipped), encoding="utf-8")
    written.append(readme)
    return sorted(written)


def add_cli(subparsers) -> argparse.ArgumentParser:
    """Register ``report`` on an argparse subparsers object (``python -m apl report``)."""
    p = subparsers.add_parser(
        "report", help="tables and figures from a grid's run records (no training)",
        description="Write Table 1 (md/csv/tex), Figures 1-3 (png/pdf) and a README for "
                    "each loss variant, from <runs>/runs/*/result.json alone.")
    p.add_argument("--runs", required=True, help="the grid's output folder (holds runs/)")
    p.add_argument("--out", required=True, help="folder for tables and figures")
    p.add_argument("--reference", default="auto", choices=("auto", "paper", "ma2020"),
                   help="published numbers to compare with (auto: by the grid's preset)")
    p.add_argument("--no-figures", action="store_true", help="tables and README only")
    p.set_defaults(func=_run_cli)
    return p


def _run_cli(args) -> int:
    command = shlex.join(["python", "-m", "apl", "report", "--runs", str(args.runs), "--out",
                          str(args.out)] + (["--reference", args.reference]
                                            if args.reference != "auto" else []))
    paths = make_report(args.runs, args.out, reference=args.reference, command=command,
                        figures=not args.no_figures)
    print(f"wrote {len(paths)} files to {args.out}")
    return 0


def main(argv=None) -> int:
    """``python -m apl.report ...``: the ``report`` command on its own."""
    from apl.__main__ import main as apl_main

    return apl_main(["report", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
