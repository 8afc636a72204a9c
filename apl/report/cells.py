"""The report's numbers: run records grouped into Table 1's cells, and the statistics of a cell.

A cell is one (loss, noise rate) of one loss variant, holding the runs of every seed. A cell's
number is the mean and sample standard deviation over seeds, next to the published number.
"""
from __future__ import annotations

import statistics

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
    symmetric = noise == 0.0 or record.get("noise_type") in ("symmetric", "ma2020_symmetric")
    return record["loss"] in GRID_LOSSES and noise in GRID_NOISE and symmetric


def group_runs(records: list[dict]) -> dict[str, dict[tuple[str, float], list[dict]]]:
    """``{variant: {(loss, noise): [records sorted by seed]}}`` for the runs of the paper's grid.

    A loss whose definition does not depend on the variant (CE) is listed under every
    variant: the same runs serve both tables. Records outside the grid (other losses,
    asymmetric noise) are left out. Two records for the same cell and seed are an error
    (two different grids in one folder).
    """
    seen: dict[tuple, str] = {}
    groups: dict[str, dict[tuple[str, float], list[dict]]] = {v: {} for v in GRID_VARIANTS}
    for record in records:
        if not _in_grid(record):
            continue
        loss, noise, seed = record["loss"], _noise_key(record["noise"]), int(record["seed"])
        free = is_variant_free(loss)
        if not free and record["variant"] not in GRID_VARIANTS:
            raise ValueError(f"run {record['_run']} has unknown variant {record['variant']!r}")
        key = (loss, None if free else record["variant"], noise, seed)
        if key in seen:
            raise ValueError(f"runs {seen[key]} and {record['_run']} are the same grid cell "
                             f"(loss {loss}, noise {noise}, seed {seed}); keep one grid per folder")
        seen[key] = record["_run"]
        for variant in (GRID_VARIANTS if free else (record["variant"],)):
            groups[variant].setdefault((loss, noise), []).append(record)
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


def curve(recs: list[dict]) -> tuple[list[int], list[float], list[float] | None]:
    """Mean (and std when several seeds) of test accuracy per epoch, over the epochs all share."""
    n = min(len(r["history"]) for r in recs)
    epochs = [int(recs[0]["history"][i]["epoch"]) for i in range(n)]
    per_epoch = [[read_number(r["history"][i]["test_acc"]) for r in recs] for i in range(n)]
    means = [statistics.fmean(v) for v in per_epoch]
    stds = [statistics.stdev(v) for v in per_epoch] if len(recs) > 1 else None
    return epochs, means, stds
