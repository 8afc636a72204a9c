"""The successors' report: a table per noise family and a figure of final test accuracy against eta.

For a grid of the successors' preset (:data:`apl.presets.SUCCESSORS`): APL's successors and
its baselines under the cited work's protocol, each loss trained as its own paper trains it.
Per noise family (symmetric, asymmetric) a table (Markdown and long CSV: final- and best-epoch
test accuracy, the published number and the difference) and a figure (PNG and PDF: final
test accuracy against eta, published numbers as crosses), then a README saying how each loss
trained (read back from its run records), the realised noise rates of each noise rule, and
where the published numbers come from. Deterministic: the same records give the same files.
"""
from __future__ import annotations

import csv
import io
import json
import statistics
from pathlib import Path

from matplotlib.lines import Line2D

from apl.losses.spec import LOSS_NAMES
from apl.paper import successor_accuracy, successor_numbers
from apl.presets import NOISE_FAMILIES, PRESETS, SUCCESSOR_LOSSES, SUCCESSOR_NOISE, SUCCESSOR_SETTINGS, noise_family
from apl.records import read_number
from apl.report.cells import METRICS, loss_label, noise_heading
from apl.report.figures import accuracy_figure, chance_handle, finish_figure, line_style
from apl.report.stamp import describe_protocol, preset_banner
from apl.report.tables import DASH, our_cell, two_decimals

__all__ = ["successor_cells", "successor_rows", "trained_as", "make_successor_report"]

#: How the report names each noise rule (the noise types of :data:`apl.presets.NOISE_RULES`).
_RULE_NAMES = {"ma2020_symmetric": "APL-style", "asymmetric": "APL-style (cascading pairs)",
               "exact_symmetric": "exact counts", "exact_asymmetric": "exact counts"}
#: Marker of each paper's losses in the figures (colours cycle; markers keep the papers apart).
_MARKERS = {"the cited work": "o", "ALFs": "s", "ANL": "^", "JAL": "D", "epsilon-softmax": "v"}


def _family_of(record: dict) -> str:
    return "symmetric" if float(record["noise"]) == 0.0 else noise_family(record.get("noise_type", ""))


def successor_cells(records: list[dict]) -> dict[str, dict[tuple[str, float], list[dict]]]:
    """``{family: {(loss, noise): [records sorted by seed]}}``; the clean runs (eta 0) are symmetric.
    Two records of one cell and seed are an error (two grids in one folder)."""
    cells: dict[str, dict] = {f: {} for f in NOISE_FAMILIES}
    for record in records:
        family, key = _family_of(record), (record["loss"], round(float(record["noise"]), 4))
        cell = cells[family].setdefault(key, [])
        twin = next((r for r in cell if int(r["seed"]) == int(record["seed"])), None)
        if twin is not None:
            raise ValueError(f"runs {twin['_run']} and {record['_run']} are the same cell ({family} noise, "
                             f"loss {key[0]}, noise {key[1]}, seed {record['seed']}); keep one grid per folder")
        cell.append(record)
    for family_cells in cells.values():
        for recs in family_cells.values():
            recs.sort(key=lambda r: int(r["seed"]))
    return cells


def _losses(cells: dict, preset_losses) -> list[str]:
    """The rows: the preset's losses (a dash where a loss has no runs), then any other loss with runs."""
    extra = {loss for loss, _ in cells} - set(preset_losses)
    return list(preset_losses) + sorted(extra, key=lambda n: (LOSS_NAMES.index(n) if n in LOSS_NAMES else 99, n))


def _rates(family: str, cells: dict) -> list[float]:
    return sorted(set(SUCCESSOR_NOISE[family]) | {n for _, n in cells})


def _values(configs: list[dict], key: str, fmt=str) -> str:
    vals = sorted({json.dumps(c.get(key)) for c in configs})
    return "/".join(fmt(json.loads(v)) for v in vals)


def trained_as(recs: list[dict]) -> str:
    """How the runs of one loss trained, from their configs: its paper, regulariser, noise rule."""
    configs = [r.get("config") or {} for r in recs]
    paper = SUCCESSOR_SETTINGS[recs[0]["loss"]].paper.split(" (")[0] if recs[0]["loss"] in SUCCESSOR_SETTINGS \
        else "—"
    l1 = _values(configs, "l1", lambda v: f"{v or 0:g}")
    regulariser = f"L1 {l1}" if l1 != "0" else f"L2 {_values(configs, 'weight_decay', lambda v: f'{v:g}')}"
    rule = _values(configs, "noise_type", lambda t: _RULE_NAMES.get(t, str(t)))
    params = _values(configs, "loss_params", lambda p: ", ".join(f"{k}={v:g}" for k, v in p.items()) or "defaults")
    return f"{paper}: {regulariser}, {rule} noise, {params}"


def successor_rows(family: str, cells: dict, metric: str, preset_losses=SUCCESSOR_LOSSES) -> list[dict]:
    """One row per (loss, noise) of ``family``'s table: ``loss``, ``noise``, ``n``, ``seeds``, ``mean``,
    ``std`` (sample std, None for one seed), ``reference`` (published or None), ``diff``."""
    key = METRICS[metric][0]
    rows = []
    for loss in _losses(cells, preset_losses):
        for noise in _rates(family, cells):
            recs = cells.get((loss, noise), [])
            values = [read_number(r[key]) for r in recs]
            mean = statistics.fmean(values) if values else None
            std = statistics.stdev(values) if len(values) > 1 else None
            ref = successor_accuracy(loss, noise, family)
            rows.append(dict(loss=loss, noise=noise, n=len(recs), seeds=[int(r["seed"]) for r in recs],
                             mean=mean, std=std, reference=ref,
                             diff=None if mean is None or ref is None else mean - ref))
    return rows


class _Stamp:
    """What every table and figure of the report is stamped with."""

    def __init__(self, records: list[dict], manifest: dict | None):
        manifest = manifest or {}
        self.preset = manifest.get("preset")
        self.overrides = manifest.get("overrides") or {}
        configs = [r.get("config") or {} for r in records]
        self.banner = preset_banner(self.preset, "ma2020", "successors", describe_protocol(configs),
                                    self.overrides)
        sources = sorted({str(r.get("data_source")) for r in records if r.get("data_source")})
        self.data = "Data: " + ("; ".join(sources) if sources else "source not recorded")
        published = successor_numbers()
        self.reference = (f"Published: {published['source']}; {published['metric']}; protocol: "
                          f"{published['protocol']}.")
        seeds = sorted({int(r["seed"]) for r in records})
        self.cells = (f"mean ± sample std over seeds {', '.join(map(str, seeds))}" if len(seeds) > 1
                      else f"single run per cell (seed {seeds[0]})")

    def lines(self) -> list[str]:
        return [self.banner, self.data, self.reference, f"Cells: {self.cells}; Δ = ours − published."]


def render_markdown(family: str, cells: dict, stamp: _Stamp, preset_losses) -> str:
    """The table of one noise family as Markdown: final- and best-epoch sections."""
    rates = _rates(family, cells)
    out = [f"# APL's successors: test accuracy under {family} label noise", ""]
    out += [f"> {line}  " for line in stamp.lines()]
    for metric, (_, title) in METRICS.items():
        rows = {(r["loss"], r["noise"]): r for r in successor_rows(family, cells, metric, preset_losses)}
        head = ["Loss"] + [f"{noise_heading(n)} {what}" for n in rates for what in ("ours", "publ.", "Δ")]
        out += ["", f"## {title}", "", "| " + " | ".join(head) + " |",
                "| --- |" + " ---: |" * (len(head) - 1)]
        for loss in _losses(cells, preset_losses):
            line = [loss_label(loss)]
            for n in rates:
                r = rows[(loss, n)]
                line += [our_cell(r, " ± "), two_decimals(r["reference"]) or DASH,
                         two_decimals(r["diff"], signed=True) or DASH]
            out.append("| " + " | ".join(line) + " |")
    out += ["", "## How each loss trained (from its run records)", "", "| Loss | trained as |", "| --- | --- |"]
    for loss in _losses(cells, preset_losses):
        recs = [r for (name, _), rs in sorted(cells.items()) if name == loss for r in rs]
        out.append(f"| {loss_label(loss)} | {trained_as(recs) if recs else 'no runs'} |")
    return "\n".join(out) + "\n"


def render_csv(family: str, cells: dict, preset_losses) -> str:
    """The table of one noise family as long CSV: one line per metric, loss and noise rate."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["family", "metric", "loss", "noise", "n_seeds", "seeds", "ours_mean", "ours_std",
                "published", "diff"])
    for metric in METRICS:
        for r in successor_rows(family, cells, metric, preset_losses):
            w.writerow([family, metric, r["loss"], f"{r['noise']:.1f}", r["n"], " ".join(map(str, r["seeds"])),
                        two_decimals(r["mean"]), two_decimals(r["std"]), two_decimals(r["reference"]),
                        two_decimals(r["diff"], signed=True)])
    return buf.getvalue()


def noise_figure(family: str, cells: dict, stamp: _Stamp, out: Path, preset_losses) -> list[Path]:
    """Final test accuracy against eta for ``family``, one line per loss, published numbers as crosses."""
    rates = _rates(family, cells)
    fig, ax = accuracy_figure(f"APL's successors: final test accuracy vs {family} noise rate",
                              [stamp.banner, stamp.data])
    handles, labels = [], []
    for i, loss in enumerate(_losses(cells, preset_losses)):
        paper = SUCCESSOR_SETTINGS[loss].paper.split(" (")[0] if loss in SUCCESSOR_SETTINGS else ""
        style = {**line_style(loss, i), "marker": _MARKERS.get(paper, "o")}
        pts = [(n, statistics.fmean(read_number(r["final_test_acc"]) for r in cells[(loss, n)]))
               for n in rates if cells.get((loss, n))]
        ref = [(n, a) for n in rates if (a := successor_accuracy(loss, n, family)) is not None]
        if pts:
            ax.plot(*zip(*pts), markersize=4, **style)
        if ref:
            ax.plot(*zip(*ref), linestyle="none", marker="x", markersize=7, color=style["color"])
        if pts or ref:
            handles.append(Line2D([], [], markersize=4, **style))
            labels.append(loss_label(loss) + ("" if pts else " (no runs)"))
    handles += [chance_handle(), Line2D([], [], linestyle="none", marker="x", color="black")]
    labels += ["chance (10%)", "× published (ε-softmax\npaper, Table 2)"]
    ax.set_xticks(rates, [noise_heading(n) for n in rates])
    ax.set_xlabel(f"{family} noise rate η")
    return finish_figure(fig, ax, handles, labels, out / f"figure_{family}")


def _realised_lines(records: list[dict]) -> list[str]:
    """The realised noise rate of each noise rule at each nominal rate (mean over the runs)."""
    rates: dict[tuple[str, float], list[float]] = {}
    for r in records:
        rec = r.get("noise_record") or {}
        if "realised_rate" in rec and float(r["noise"]) > 0:
            rates.setdefault((r.get("noise_type", "?"), float(r["noise"])), []).append(float(rec["realised_rate"]))
    if not rates:
        return []
    lines = ["", "## Realised noise rates", "",
             "The fraction of training labels each noise rule changed (mean over the runs; the cited work's "
             "asymmetric rule cascades, so it lands below η; the exact-count rules flip floor(T_ij n_i) "
             "per class pair):", "", "| noise type | rule | η | realised |", "| --- | --- | ---: | ---: |"]
    for (kind, eta), values in sorted(rates.items()):
        lines.append(f"| `{kind}` | {_RULE_NAMES.get(kind, kind)} | {eta:.1f} | {statistics.fmean(values):.4f} |")
    return lines


def _readme(files: dict, records: list[dict], manifest: dict | None, stamp: _Stamp, command: str,
            notes: list[str], missing: list[str]) -> str:
    expected = len((manifest or {}).get("runs", {})) or None
    wall = sum(float(r.get("wall_time_s") or 0.0) for r in records)
    lines = ["# APL's successors: reproduction report", "", stamp.banner, "", stamp.data, "",
             f"Report command: `{command}`", "",
             f"Runs found: {len(records)}" + (f" of {expected} planned" if expected else "")
             + f" (total training wall time {wall / 3600:.2f} h, summed over runs).", "",
             "Each loss trains under the cited work's CIFAR-10 protocol with its own paper's regularisation, "
             "noise rule and parameters (`apl.presets.SUCCESSOR_SETTINGS`); the tables end with how each "
             "loss's runs actually trained, read from their records.", "",
             "## Published numbers", "", stamp.reference,
             "No published number was found for: " + (", ".join(loss_label(n) for n in missing) or "none")
             + " (those cells show —)."]
    lines += _realised_lines(records)
    if manifest:
        lines += ["", "## Machine and grid", "",
                  f"- grid command: `{manifest.get('command')}`",
                  "- devices: " + ", ".join(f"{d.get('device')} ({d.get('name')})"
                                            for d in manifest.get("devices", [])),
                  f"- torch: {manifest.get('torch_version')}", f"- git commit: {manifest.get('git_commit')}",
                  f"- grid started: {manifest.get('started_at')}",
                  f"- grid finished: {manifest.get('finished_at') or 'not finished'}"]
    lines += ["", "## Files", "", "| file | what it is |", "| --- | --- |"]
    lines += [f"| `{name}` | {what} |" for name, what in files.items()]
    lines += ["", "## How to read", "",
              "- Cells are our test accuracy in percent (mean ± sample std with several seeds), the published "
              "number and Δ = ours − published; — where there is no run or no published number.",
              "- The final-epoch table is the headline (the papers report the last epoch); the best-epoch "
              "table shows what late memorisation of noisy labels costs.",
              "- A quick preset's cells are short runs on a subset: read trends, not single cells.",
              "- Loss definitions, defaults and hazards: LOSSES.md at the project root."]
    lines += [f"- {s}" for s in notes]
    return "\n".join(lines) + "\n"


def make_successor_report(records: list[dict], manifest: dict | None, out: Path, *, command: str,
                          figures: bool = True, notes: list[str] | None = None) -> list[Path]:
    """Write the successors' tables, figures and README for ``records`` into ``out``; the written paths."""
    preset = PRESETS.get((manifest or {}).get("preset") or "")
    preset_losses = preset.losses if preset is not None and preset.report == "successors" else SUCCESSOR_LOSSES
    cells = successor_cells(records)
    stamp = _Stamp(records, manifest)
    family_stamps = {f: _Stamp([r for recs in cells[f].values() for r in recs], manifest)
                     for f in NOISE_FAMILIES if cells[f]}
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    written: list[Path] = []
    notes = list(notes or [])
    for family in NOISE_FAMILIES:
        if not cells[family]:
            notes.append(f"Not written: the {family} table and figure (no {family} runs).")
            continue
        for ext, text in (("md", render_markdown(family, cells[family], family_stamps[family], preset_losses)),
                          ("csv", render_csv(family, cells[family], preset_losses))):
            path = out / f"table_{family}.{ext}"
            path.write_text(text, encoding="utf-8")
            written.append(path)
            files[path.name] = f"{family} noise ({ext}): final- and best-epoch accuracy, published number, difference"
        if figures:
            for path in noise_figure(family, cells[family], family_stamps[family], out, preset_losses):
                written.append(path)
                files[path.name] = f"{family} noise: final test accuracy vs η, published numbers as ×"
    missing = [loss for loss in preset_losses
               if all(successor_accuracy(loss, n, f) is None for f in NOISE_FAMILIES for n in SUCCESSOR_NOISE[f])]
    files["README.md"] = "this file"
    readme = out / "README.md"
    readme.write_text(_readme(files, records, manifest, stamp, command, notes, missing), encoding="utf-8")
    written.append(readme)
    return sorted(written)
