"""Sweeps: lists of values for the APL weight λ, the focal γ and any config field, expanded into runs.

A sweep maps an *axis* to its values (``{"lam": [0.2, 0.4], "lr": [0.01, 0.001]}``). ``lam`` and
``gamma`` are loss parameters and apply only to the losses that have them (λ to the
active+passive sums, γ to the losses with a focal term); any other axis is a
:class:`~apl.config.TrainConfig` field and applies to every run. :func:`expand` replaces each
planned config by one config per point of the cartesian product of the axes that apply to it. A
run's name hashes its config, so every point trains in a folder of its own and a rerun finds it.
"""
from __future__ import annotations

import itertools
import json
from dataclasses import fields

from apl.config import TrainConfig
from apl.presets import WEIGHT_PARAMS

__all__ = ["LOSS_AXES", "parse_numbers", "parse_set", "make_sweep", "applies", "axis_value", "at_point",
           "expand"]

#: Sweep axes that are loss parameters (``--lam``, ``--gamma``), not config fields.
LOSS_AXES = ("lam", "gamma")
_FIELDS = tuple(f.name for f in fields(TrainConfig))


def parse_numbers(values, flag: str) -> list[float] | None:
    """``["0.2,0.4", "0.6"]`` -> ``[0.2, 0.4, 0.6]`` (a list flag takes spaces or commas); None stays None."""
    if values is None:
        return None
    items = [v for item in values for v in str(item).split(",")]
    try:
        numbers = [float(v) for v in items]
    except ValueError:
        raise ValueError(f"{flag} takes numbers separated by commas or spaces, got {' '.join(values)}") from None
    if not numbers:
        raise ValueError(f"{flag} needs at least one value")
    return numbers


def _split_top_level(raw: str) -> list[str]:
    """``'a,{"x":1,"y":2},b'`` -> ``['a', '{"x":1,"y":2}', 'b']``: commas inside brackets or quotes stay."""
    parts, depth, quoted, start = [], 0, False, 0
    for i, ch in enumerate(raw):
        if ch == '"' and (i == 0 or raw[i - 1] != "\\"):
            quoted = not quoted
        elif not quoted and ch in "[{":
            depth += 1
        elif not quoted and ch in "]}":
            depth -= 1
        elif not quoted and depth == 0 and ch == ",":
            parts.append(raw[start:i])
            start = i + 1
    parts.append(raw[start:])
    return parts


def _value(text: str):
    """One ``--set`` value: JSON (numbers, true/false, null, ``{"gamma": 1}``), else the plain string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # plain strings: --set optimizer=sgd


def parse_set(items) -> dict[str, list]:
    """``["lr=0.1,0.01", "optimizer=sgd"]`` -> ``{"lr": [0.1, 0.01], "optimizer": ["sgd"]}``.

    A value that is JSON as a whole (``loss_params={"gamma": 1, "q": 0.7}``) is one value;
    otherwise commas outside brackets separate values. A key given twice keeps its last list.
    ``ValueError`` for an item without ``=``, an unknown field or an empty value.
    """
    out: dict[str, list] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set takes KEY=VALUE or KEY=V1,V2,..., got {item!r}")
        if key not in _FIELDS:
            hint = f" (the sweep flag is --{key})" if key in LOSS_AXES else ""
            raise ValueError(f"--set {key}: no such config field{hint}; known: {', '.join(sorted(_FIELDS))}")
        try:
            json.loads(raw)
            texts = [raw]
        except json.JSONDecodeError:
            texts = _split_top_level(raw)
        if any(not t.strip() for t in texts):
            raise ValueError(f"--set {item}: empty value")
        out[key] = [_value(t.strip()) for t in texts]
    return out


def make_sweep(*, lam=None, gamma=None, sets: dict | None = None) -> dict[str, list]:
    """The sweep of ``--lam``, ``--gamma`` and the ``--set`` keys given several values, axes in that order;
    duplicate values dropped (first kept). A single ``--lam``/``--gamma`` value is a one-point axis: it
    sets λ/γ of the losses that have one."""
    sweep = {}
    for axis, values in (("lam", lam), ("gamma", gamma), *((k, v) for k, v in (sets or {}).items() if len(v) > 1)):
        if values is not None:
            unique = []
            for v in values:
                if not any(v == u and type(v) is type(u) for u in unique):
                    unique.append(v)
            sweep[axis] = unique
    return sweep


def applies(config: TrainConfig, axis: str) -> bool:
    """Whether sweeping ``axis`` changes ``config``'s run: λ only weights an active+passive sum, γ only a
    loss with a focal term (whose config always records its γ); a config field applies to every run."""
    if axis == "lam":
        return "+" in config.loss
    if axis == "gamma":
        return "gamma" in config.loss_params
    return True


def axis_value(config: TrainConfig, axis: str):
    """``config``'s value on ``axis`` (None for a loss parameter it does not have)."""
    if axis in LOSS_AXES:
        return config.loss_params.get(axis)
    return getattr(config, axis)


def at_point(config: TrainConfig, point: dict) -> TrainConfig:
    """``config`` moved to ``point`` (axis -> value) on the axes that apply to it; ``ValueError`` naming
    the field for a value the config refuses (e.g. λ outside [0, 1])."""
    d = config.to_dict()
    for axis, value in point.items():
        if axis not in LOSS_AXES and applies(config, axis):
            d[axis] = value
    params = dict(d["loss_params"])
    if "lam" in point and applies(config, "lam"):
        # λ is the whole weighting: the protocol's alpha/beta (if any) give way to it.
        params = {k: v for k, v in params.items() if k not in WEIGHT_PARAMS}
        params["lam"] = point["lam"]
    if "gamma" in point and applies(config, "gamma"):
        params["gamma"] = point["gamma"]
    d["loss_params"] = params
    return TrainConfig.from_dict(d)


def expand(plan: list, sweep: dict | None, *, fixed=()) -> list:
    """``plan``'s configs, each replaced by one per point of the ``sweep`` axes that apply to it
    (cartesian product, in the order of ``plan`` then of the axes' values); configs a sweep does not
    change appear once. ``fixed``: config fields a sweep may not vary (the grid's own axes).
    ``ValueError`` for such an axis, an empty axis, or a loss axis no planned loss has."""
    if not sweep:
        return list(plan)
    for axis, values in sweep.items():
        if axis in fixed:
            raise ValueError(f"{axis} cannot be swept with --set: the grid sets it "
                             "(use --losses/--noise/--variants/--seeds)")
        if axis not in LOSS_AXES and axis not in _FIELDS:
            raise ValueError(f"cannot sweep {axis!r}: not a config field or one of {', '.join(LOSS_AXES)}")
        if not values:
            raise ValueError(f"the sweep over {axis} has no values")
        if axis in LOSS_AXES and not any(applies(c, axis) for c in plan):
            what = ("an active+passive sum (nce+mae, ...)" if axis == "lam"
                    else "a loss with a focal term (fl, nfl, ...)")
            raise ValueError(f"--{axis}: none of the planned losses ({', '.join(sorted({c.loss for c in plan}))}) "
                             f"is {what}")
    # Config fields first, then λ and γ, so that a swept loss_params cannot undo them.
    order = sorted(sweep, key=lambda a: a in LOSS_AXES)
    out, names = [], set()
    for config in plan:
        axes = [a for a in order if applies(config, a)]
        for values in itertools.product(*(sweep[a] for a in axes)):
            moved = at_point(config, dict(zip(axes, values)))
            if moved.run_name() not in names:
                names.add(moved.run_name())
                out.append(moved)
    return out
