"""The report's numbers: run records grouped into Table 1's cells, and the statistics of a cell.

A cell is one (loss, noise rate) of one form (a loss variant under its protocol,
:data:`apl.presets.FORMS`; a grid runs each variant under one protocol, so the variant names
the form), holding the runs of every seed. A cell's number is the mean and sample standard
deviation over seeds, next to the published number.
"""
from __future__ import annotations

import json
import statistics

from apl.config import TrainConfig
from apl.noise import SYMMETRIC_NOISE_TYPES
from apl.paper import reference_accuracy
from apl.presets import GRID_LOSSES, GRID_NOISE, GRID_VARIANTS, is_variant_free
from apl.records import read_number

__all__ = ["METRICS", "group_runs", "reported_variants", "table_rows", "all_seeds", "curve",
           "loss_label", "noise_heading"]

#: The metrics a table reports: result.json key, heading.
METRICS = {
    "final": ("final_test_acc", "Final-epoch test accuracy (%)"),
    "best": ("best_test_acc", "Best-epoch test accuracy (%)"),
}


def loss_label(loss: str) -> str:
    """The display name of a loss, as the paper prints it (``"nce+rce"`` -> ``"NCE+RCE"``)."""
    return loss.upper()


def noise_heading(noise: float) -> str:
    """A noise column's heading: ``clean`` or ``η=0.6``."""
    return "clean" if noise == 0.0 else f"η={noise:.1f}"


def _noise_key(noise) -> float:
    return round(float(noise), 4)


def _in_grid(record: dict) -> bool:
    noise = _noise_key(record["noise"])
    symmetric = noise == 0.0 or record.get("noise_type") in SYMMETRIC_NOISE_TYPES
    return record["loss"] in GRID_LOSSES and noise in GRID_NOISE and symmetric


def _trained_as(record: dict) -> str:
    """How the record's run trained, as a comparable key (:meth:`TrainConfig.training_identity`)."""
    return json.dumps(TrainConfig.from_dict(record["config"]).training_identity(), sort_keys=True)


def group_runs(records: list[dict]) -> dict[str, dict[tuple[str, float], list[dict]]]:
    """``{variant: {(loss, noise): [records sorted by seed]}}`` for the runs of the paper's grid.

    A loss whose definition does not depend on the variant (CE) is listed under every form
    whose own runs trained exactly as it did (same protocol and overrides): one CE run serves
    the forms of its protocol, never a form trained differently; with no such runs, under its
    own variant. Records outside the grid (other losses, asymmetric noise) are left out. Two
    records for the same form, cell and seed are an error (two different grids in one folder).
    """
    grid = [r for r in records if _in_grid(r)]
    forms_trained_as: dict[str, set] = {}  # training key -> forms whose own runs trained so
    for record in grid:
        if is_variant_free(record["loss"]):
            continue
        if record["variant"] not in GRID_VARIANTS:
            raise ValueError(f"run {record['_run']} has unknown variant {record['variant']!r}")
        forms_trained_as.setdefault(_trained_as(record), set()).add(record["variant"])
    groups: dict[str, dict[tuple[str, float], list[dict]]] = {v: {} for v in GRID_VARIANTS}
    for record in grid:
        loss, noise, seed = record["loss"], _noise_key(record["noise"]), int(record["seed"])
        forms = {record["variant"]}
        if is_variant_free(loss):
            forms = forms_trained_as.get(_trained_as(record), forms)
        for variant in forms:
            cell = groups[variant].setdefault((loss, noise), [])
            twin = next((r for r in cell if int(r["seed"]) == seed), None)
            if twin is not None:
                raise ValueError(f"runs {twin['_run']} and {record['_run']} are the same grid cell "
                                 f"(form {variant}, loss {loss}, noise {noise}, seed {seed}); "
                                 "keep one grid per folder")
            cell.append(record)
    for cells in groups.values():
        for recs in cells.values():
            recs.sort(key=lambda r: int(r["seed"]))
    return groups


def reported_variants(groups) -> list[str]:
    """Variants with runs of their own; CE alone does not make a variant worth a table."""
    own = [v for v in GRID_VARIANTS
           if any(not is_variant_free(loss) for loss, _ in groups[v])]
    return own or [v for v in GRID_VARIANTS if groups[v]]


def all_seeds(cells) -> list[int]:
    """Every seed with a run in ``cells``, sorted."""
    return sorted({int(r["seed"]) for recs in cells.values() for r in recs})


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
            mean, std = _mean_std([read_number(r[key]) for r in recs])
            ref = reference_accuracy(reference, loss, noise)
            rows.append(dict(loss=loss, noise=noise, n=len(recs),
                             seeds=[int(r["seed"]) for r in recs], mean=mean, std=std,
                             reference=ref,
                             diff=None if mean is None or ref is None else mean - ref))
    return rows


def curve(recs: list[dict], key: str = "test_acc") -> tuple[list[int], list[float], list[float] | None]:
    """Mean (and std when several seeds) of the history's ``key`` per epoch, over the epochs all
    share (``test_acc``: clean test accuracy; ``train_acc_noisy``: the epoch's training accuracy
    on the noisy labels it trained on, what the paper's Figures 1-2 plot)."""
    n = min(len(r["history"]) for r in recs)
    epochs = [int(recs[0]["history"][i]["epoch"]) for i in range(n)]
    per_epoch = [[read_number(r["history"][i].get(key)) for r in recs] for i in range(n)]
    means = [statistics.fmean(v) for v in per_epoch]
    stds = [statistics.stdev(v) for v in per_epoch] if len(recs) > 1 else None
    return epochs, means, stds
