"""The published numbers our runs are compared with (package data ``paper_numbers.json``).

Two sources, kept apart: ``"paper"`` is the seed paper's printed Table 1, ``"ma2020"`` the
cited work's protocol as re-run and published (see ``docs/sources.md#the-cited-work``).
"""
from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources

__all__ = ["SOURCES", "paper_numbers", "reference_accuracy"]

SOURCES = ("paper", "ma2020")


@lru_cache(maxsize=1)
def _load() -> dict:
    with resources.files("apl").joinpath("paper_numbers.json").open("r", encoding="utf-8") as f:
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
