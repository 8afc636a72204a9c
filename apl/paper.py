"""The published numbers our runs are compared with (package data ``paper_numbers.json`` and
``successor_numbers.json``).

Two sources for the paper's grid, kept apart: ``"paper"`` is the seed paper's printed Table 1,
``"ma2020"`` the cited work's protocol as re-run and published (see
``docs/sources.md#the-cited-work``). The successors' grid is compared with one table, the
epsilon-softmax paper's (NeurIPS 2024) Table 2: its successor rows are in
``successor_numbers.json``, its baseline rows are the ``"ma2020"`` numbers.
"""
from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources

__all__ = ["SOURCES", "paper_numbers", "reference_accuracy", "successor_numbers", "successor_accuracy"]

SOURCES = ("paper", "ma2020")


@lru_cache(maxsize=2)
def _load(name: str = "paper_numbers.json") -> dict:
    with resources.files("apl").joinpath(name).open("r", encoding="utf-8") as f:
        return json.load(f)


def paper_numbers(source: str) -> dict:
    """The stored record of one source: ``source``, ``metric`` and per-noise-type tables.

    Each table maps a loss name (as in :data:`apl.losses.spec.LOSS_NAMES`) to ``{noise rate as
    "0.2": accuracy in percent}``. Returns a fresh copy, so callers may modify it.
    """
    if source not in SOURCES:
        raise ValueError(f"unknown source of published numbers {source!r}; use one of {SOURCES}")
    return json.loads(json.dumps(_load()[source]))


def reference_accuracy(source: str, loss: str, noise: float,
                       noise_type: str = "symmetric") -> float | None:
    """The published accuracy (percent) of ``loss`` at ``noise``, or None when not published."""
    if source not in SOURCES:
        raise ValueError(f"unknown source of published numbers {source!r}; use one of {SOURCES}")
    table = _load()[source].get(noise_type)
    if table is None:
        raise ValueError(f"source {source!r} has no {noise_type!r} table")
    return table.get(loss, {}).get(f"{float(noise):.1f}")


def successor_numbers() -> dict:
    """The successors' published numbers: ``source``, ``protocol``, ``metric`` and per-noise-family
    tables ``{loss: {noise rate as "0.2": accuracy in percent}}``, the baselines (the ``"ma2020"``
    rows of the same table) included. A fresh copy."""
    own = _load("successor_numbers.json")
    baselines = _load()["ma2020"]
    merged = json.loads(json.dumps(own))
    for family in ("symmetric", "asymmetric"):
        merged[family] = {**json.loads(json.dumps(baselines[family])), **merged[family]}
    return merged


def successor_accuracy(loss: str, noise: float, family: str = "symmetric") -> float | None:
    """The published accuracy (percent) of ``loss`` at ``noise`` under the successors' protocol
    (:func:`successor_numbers`), or None when none was found."""
    if family not in ("symmetric", "asymmetric"):
        raise ValueError(f"unknown noise family {family!r}; use 'symmetric' or 'asymmetric'")
    table = _load("successor_numbers.json")[family]
    key = f"{float(noise):.1f}"
    if loss in table:
        return table[loss].get(key)
    return _load()["ma2020"][family].get(loss, {}).get(key)
