"""The report folder's README.md: what was run, on which machine, what every file is, and where
the paper's text and its author's code differ (with the grid's own measured NCE/CE pair)."""
from __future__ import annotations

import math
import statistics

from apl.data import NORMALIZATIONS
from apl.losses.spec import AUTHOR_LAMBDA, DEFAULT_GAMMA, PAPER_LAMBDA, RCE_A, Kind, affine
from apl.noise import AUTHOR_NOISE_SEED
from apl.paper import reference_accuracy
from apl.presets import GRID_NOISE, PROTOCOLS
from apl.records import read_number
from apl.report.cells import noise_heading
from apl.report.figures import FIGURE1_LOSSES, FIGURE_NOISE
from apl.report.stamp import Stamp

__all__ = ["render_readme", "differences", "nce_ce_pair"]

#: CIFAR-10's classes and training-set size, for the differences' worked numbers.
_C, _N_TRAIN = 10, 50_000


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


def _passive_ratio(lam: float, slope: float) -> float:
    """With NCE active, a passive term ``slope * (1 - p_y)``'s logit gradient over NCE's, per unit p_y.

    NCE's is ``(p - onehot) / H`` and the passive term's ``slope * p_y * (p - onehot)``; H of a
    balanced batch is ln C."""
    return (1.0 - lam) * slope * math.log(_C) / lam


def differences() -> list[str]:
    """Each difference between the paper's text and its author's code (facts:
    docs/sources.md#the-authors-code), and what it predicts, as Markdown bullets; every number comes
    from the project's constants."""
    author, paper = PROTOCOLS["author"].fields, PROTOCOLS["paper"].fields
    _, mae_slope = affine(Kind.MAE_AUTHOR, _C)
    rce_offset, rce_slope = affine(Kind.RCE_AUTHOR, _C)
    mean, std = NORMALIZATIONS[author["normalize"]]
    ratio = {name: _passive_ratio(lam, slope) for name, lam, slope in (
        ("author mae", AUTHOR_LAMBDA, mae_slope), ("author rce", AUTHOR_LAMBDA, rce_slope),
        ("text mae", PAPER_LAMBDA, 1.0), ("text rce", PAPER_LAMBDA, RCE_A))}
    nce_rce_high = reference_accuracy("paper", "nce+rce", max(GRID_NOISE))
    spread = 100 * math.sqrt(FIGURE_NOISE * (1 - FIGURE_NOISE) / _N_TRAIN)
    return [
        f"- **APL weights.** Text (Sec. 2.4): λ = {PAPER_LAMBDA} on the active term. Code: "
        f"{AUTHOR_LAMBDA:g} · active + {1 - AUTHOR_LAMBDA:g} · passive, the reverse.",
        f"- **MAE and RCE.** Code: MAE is the mean of |p − onehot| over all B × C entries, "
        f"{mae_slope:g} (1 − p_y) at C = {_C} (a tenth of the sum's 2 (1 − p_y)); RCE uses a smoothed "
        f"target, {rce_offset:.4f} + {rce_slope:.4f} (1 − p_y) (the cited work's: {RCE_A:.4f} (1 − p_y)). "
        f"Predicts, with the weights above and NCE as the active term, a passive gradient "
        f"{ratio['author mae']:.2f} p_y (NCE+MAE) and {ratio['author rce']:.1f} p_y (NCE+RCE) times "
        f"the active one (the text's forms: {ratio['text mae']:.2f} p_y and {ratio['text rce']:.1f} p_y): "
        f"the author's NCE+MAE trains mostly as NCE, its NCE+RCE mostly as a bounded loss that fits "
        f"flipped labels slowly, the most robust at high noise (the paper's one cell above chance "
        f"at η = {max(GRID_NOISE)} is NCE+RCE's {nce_rce_high:.2f}).",
        "- **NCE.** Text and code: batch-mean CE over the entropy H of the batch's label "
        f"frequencies, which depends on the labels only and is close to ln {_C} = {math.log(_C):.2f} "
        f"for every batch: NCE is CE times a near-constant (about {1 / math.log(_C):.2f}). Adam's "
        "step is invariant to a constant loss scale (up to its ε), so NCE and CE should train "
        "almost alike: the measured pair is below.",
        f"- **Focal exponent.** Text: none stated. Code: γ = {DEFAULT_GAMMA['author']:g} in FL and "
        "NFL, NFL with its gradient through the batch-mean focal weight it divides by (the cited "
        f"work's CIFAR-10 runs use γ = {DEFAULT_GAMMA['ma2020']:g}). The paper form follows the code.",
        "- **Initialisation.** Text: Kaiming normal. Code: PyTorch's defaults, conv biases kept. "
        "Predicts a small effect: BatchNorm follows every convolution.",
        f"- **Batch and normalisation.** Text: silent. Code: batch {author['batch_size']} (the last "
        f"partial batch kept), Normalize({mean[0]:g}, {std[0]:g}) to [−1, 1], no augmentation. The "
        f"paper form follows the code (batch {paper['batch_size']}).",
        f"- **Noise.** Text: each label flipped with probability η. Code: exactly int(η N) labels, "
        f"numpy seed {AUTHOR_NOISE_SEED} reset at every call, so every loss and run sees the same "
        "noisy set and the sets are nested across η. Predicts a realised rate of exactly η (the "
        f"text's rule scatters it by ±{spread:.1f} points at N = {_N_TRAIN:,}, η = {FIGURE_NOISE}): "
        "differences between losses at one η are not from different noisy sets.",
        f"- **What is plotted.** Table 1 and Figure 3: clean test accuracy of the final epoch's "
        f"weights. Figures 1–2: training accuracy on the noisy labels per epoch (train mode), not "
        f"test accuracy. Predicts: a network that learned the clean labels scores "
        f"{100 * (1 - FIGURE_NOISE):.0f}% on them at η = {FIGURE_NOISE}; above that it is fitting "
        "flipped labels, while its test accuracy falls (the right panels here).",
        "- **Seeds.** Code: no torch seed, so its runs differ from run to run (its two figures at "
        "η = 0.6 come from different runs). Ours are seeded: one run per cell unless `--seeds K`.",
    ]


def _final(recs: list[dict], key: str) -> float | None:
    """Mean over seeds of the final ``key`` of ``recs``; None without runs."""
    values = [read_number(r[key]) for r in recs if key in r]
    return statistics.fmean(values) if values else None


def nce_ce_pair(cells: dict) -> list[dict]:
    """The author form's CE and NCE per noise rate, final epoch: test accuracy and training
    accuracy on the noisy labels (mean over seeds), from the run records."""
    rows = []
    for noise in GRID_NOISE:
        ce, nce = cells.get(("ce", noise)), cells.get(("nce", noise))
        if ce and nce:
            rows.append({"noise": noise, **{f"{loss}_{what}": _final(recs, key)
                                            for loss, recs in (("ce", ce), ("nce", nce))
                                            for what, key in (("test", "final_test_acc"),
                                                              ("train", "final_train_acc_noisy"))}})
    return rows


def _number(x: float | None) -> str:
    return "—" if x is None or math.isnan(x) else f"{x:.2f}"


def _pair_lines(cells: dict) -> list[str]:
    rows = nce_ce_pair(cells)
    if not rows:
        return ["", "No author-form CE and NCE runs at a common noise rate in this report: the pair "
                "cannot be shown (run the `author` or `paper` preset)."]
    lines = ["", "Measured (the author form's own CE and NCE runs of this grid, final epoch, mean over "
             "seeds):", "",
             "| η | CE test | NCE test | NCE − CE | CE train (noisy labels) | NCE train (noisy labels) |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        diff = None if r["ce_test"] is None or r["nce_test"] is None else r["nce_test"] - r["ce_test"]
        lines.append(f"| {noise_heading(r['noise'])} | {_number(r['ce_test'])} | {_number(r['nce_test'])} | "
                     f"{'—' if diff is None or math.isnan(diff) else f'{diff:+.2f}'} | "
                     f"{_number(r['ce_train'])} | {_number(r['nce_train'])} |")
    return lines


def _exact_labels_line(cells: dict) -> str:
    """Whether the author form's noisy labels are the author's own (official files, full set)."""
    recs = [r for rs in cells.values() for r in rs]
    if not recs:
        return ""
    exact = all(r.get("data_official") and (r.get("config") or {}).get("train_subset") is None
                for r in recs)
    if exact:
        return ("- The author form's noisy labels are the author's own: the official CIFAR-10 files, "
                "in their order, the whole training set.")
    return ("- The author form's noisy labels follow the author's rule but are not the author's own "
            "labels: those need the official CIFAR-10 files in their original order and the whole "
            "training set (here: a different copy or order of the data, or a subset).")


def render_readme(files: dict[str, str], records: list[dict], manifest: dict | None, stamp: Stamp,
                  command: str, notes: list[str], groups: dict, forms: list[str]) -> str:
    """The README text: ``files`` maps each written file's name to what it is (in the order written);
    ``groups`` are the report's cells per form (:func:`apl.report.cells.group_runs`), ``forms`` the
    forms with tables, in order; ``notes`` what was left out, and why."""
    expected = len((manifest or {}).get("runs", {})) or None
    wall = sum(float(r.get("wall_time_s") or 0.0) for r in records)
    lines = ["# Reproduction report", "", stamp.data, "", f"Report command: `{command}`", "",
             f"Runs found: {len(records)}" + (f" of {expected} planned" if expected else "")
             + f" (total training wall time {wall / 3600:.2f} h, summed over runs).", "",
             "## Tables, one per form (the author's first)", ""]
    for i, variant in enumerate(forms, start=1):
        role = stamp.role(variant)
        lines += [f"{i}. `table1_{variant}.md` (.csv, .tex), Figures 1–3 `figure*_{variant}.*`"
                  + (f": **{role.title}**, {role.question}" if role else ""),
                  f"   {stamp.banner(variant, groups[variant])}."]
    author_cells = groups.get("author", {})
    lines += ["", "## Where the paper's text and its code differ", "",
              "What the code the paper's author published and ran does (GitHub "
              "`Anantha311/SAiDL-Spring-Assignment--2025`, folder `CoreMl/`), against the paper's "
              "text, and what each difference predicts. The `author` form runs the code; the "
              "`paper` form the text, with the code where the text is silent.", ""]
    lines += differences()
    lines += _pair_lines(author_cells)
    exact = _exact_labels_line(author_cells)
    lines += ["", exact] if exact else []
    lines += ["", "## Machine and grid", ""] + _machine_lines(manifest) + [
              "", "## Files", "", "| file | what it is |", "| --- | --- |"]
    lines += [f"| `{name}` | {what} |" for name, what in files.items()]
    lines += ["", "## How to read", "",
              "- Table cells are our test accuracy in percent; with several seeds, mean ± "
              "sample standard deviation. Next to each: the published number and Δ = ours − "
              "published. Cells without runs, or without a published number, show —.",
              "- The final-epoch table is the headline (the paper's Table 1 is the final epoch's "
              "test accuracy); the best-epoch table shows how much late-epoch memorisation of "
              "noisy labels costs.",
              f"- Figures 1–2 ({', '.join(loss.upper() for loss in FIGURE1_LOSSES)}; all eight): left, "
              "training accuracy on the noisy labels, as the paper plots it; right, clean test accuracy.",
              "- " + stamp.ref_line,
              "- CE does not depend on the loss variant: one CE run serves every form trained under "
              "the same protocol (the paper and ma2020 forms of the paper's grid), not the author form.",
              "- Loss definitions per variant: LOSSES.md at the project root."]
    lines += [f"- {s}" for s in notes]
    return "\n".join(lines) + "\n"
