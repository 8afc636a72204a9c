"""A grid's plan: the config of each cell of a preset, and the grid's runs in order (pure, no training).

:func:`plan_grid` lists a preset's runs (:mod:`apl.presets`) in a fixed order, which
:mod:`apl.grid` trains and :mod:`apl.report` reads back (a sweep's Table 1 cells are the plan's
cells, :func:`preset_config`). Nothing here trains, writes or imports the training stack.

A form is a loss variant trained under its protocol (:data:`apl.presets.FORMS`). CE's loss does
not depend on the variant (:func:`apl.presets.is_variant_free`): it runs once per protocol,
noise rate and seed, labelled with the protocol's own variant, and serves the tables of every
form trained under that protocol (:mod:`apl.report`), never a form of another protocol.
"""
from __future__ import annotations

from apl.config import TrainConfig
from apl.losses.spec import canonical_name
from apl.presets import PROTOCOLS, Preset, get_preset, is_variant_free, protocol_variant
from apl.sweeps import expand

__all__ = ["GRID_FIELDS", "ENGINES", "preset_config", "plan_grid"]

#: Config fields the grid itself sets: not allowed as overrides.
GRID_FIELDS = ("loss", "variant", "noise", "seed", "device", "data_dir", "num_threads")
#: Where a grid's runs train: here or in local worker processes (apl.runner), or on a Ray cluster (apl.ray_engine).
ENGINES = ("local", "ray")


def preset_config(preset: str, *, loss: str, variant: str, noise: float, seed: int,
                  overrides: dict | None = None, family: str = "symmetric") -> TrainConfig:
    """The :class:`~apl.config.TrainConfig` of one grid cell under ``preset``.

    The protocol of ``variant``'s form in the preset, then the preset's own overrides
    (:data:`apl.presets.PRESETS`), then ``overrides`` (e.g. ``{"epochs": 1}``). The loss
    weights follow that protocol (so the paper preset's ma2020 form weights its sums as the
    paper does), and so does the noise type of ``family`` (symmetric or asymmetric: the loss's
    own paper's rule in the successors' protocol). ``ValueError`` when ``variant`` is not one of
    the preset's forms.
    """
    rules = get_preset(preset)
    return _cell_config(rules, rules.protocol_of(variant), loss=loss, variant=variant, noise=noise,
                        seed=seed, overrides=overrides, family=family)


def _cell_config(rules: Preset, protocol: str, *, loss: str, variant: str, noise: float, seed: int,
                 overrides: dict | None, family: str) -> TrainConfig:
    """:func:`preset_config` with the protocol given."""
    kwargs = {**rules.overrides, **(overrides or {})}
    bad = sorted(set(kwargs) & set(GRID_FIELDS))
    if bad:
        raise ValueError(f"{', '.join(bad)} cannot be overridden: the grid sets them "
                         "(use --losses/--noise/--variants/--seeds/--devices/--data-dir)")
    kwargs = {"noise_type": PROTOCOLS[protocol].noise_type(loss, family), **kwargs}  # --set noise_type wins
    return TrainConfig.from_protocol(protocol, loss=loss, variant=variant, noise=noise, seed=seed,
                                     **kwargs)


def _check_choice(values, allowed, what: str) -> tuple:
    values = tuple(values)
    if not values:
        raise ValueError(f"no {what} selected")
    unknown = [v for v in values if v not in allowed]
    if unknown:
        raise ValueError(f"unknown {what} {unknown}; the grid has {', '.join(map(str, allowed))}")
    return values


def plan_grid(preset: str, *, seeds: int | None = None, losses=None, noise=None, variants=None,
              overrides: dict | None = None, sweep: dict | None = None) -> list:
    """The grid's configs in run order (seed, form, noise family, noise, loss), variant-free losses
    once per protocol.

    ``seeds`` K gives seeds 0..K-1 (default: the preset's); ``losses``, ``noise`` (rates, in every
    family that has them), ``variants`` (the preset's forms, by variant) restrict the grid to a
    subset of its values; ``sweep`` (axis -> values, :func:`apl.sweeps.expand`) multiplies the runs
    it applies to.
    """
    rules = get_preset(preset)
    seeds = rules.seeds if seeds is None else seeds
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds must be an integer >= 1 (seeds 0..K-1), got {seeds!r}")
    losses = _check_choice(rules.losses if losses is None else [canonical_name(n) for n in losses],
                           rules.losses, "loss(es)")
    rates = tuple(sorted({n for etas in rules.noise.values() for n in etas}))
    noise = _check_choice(rates if noise is None else [round(float(n), 4) for n in noise], rates,
                          "noise rate(s)")
    variants = _check_choice(rules.variants if variants is None else variants,
                             rules.variants, "variant(s)")
    plan, names = [], set()
    # The grid's own order, whatever order the selection was given in.
    for seed in range(seeds):
        for variant, protocol in (f for f in rules.forms if f[0] in variants):
            for family, etas in rules.noise.items():
                for eta in (n for n in etas if n in noise):
                    for loss in (name for name in rules.losses if name in losses):
                        # A variant-free loss's run carries its protocol's own variant: one run per protocol.
                        v = protocol_variant(protocol) if is_variant_free(loss) else variant
                        cfg = _cell_config(rules, protocol, loss=loss, variant=v, noise=eta, seed=seed,
                                           overrides=overrides, family=family)
                        if cfg.run_name() not in names:
                            names.add(cfg.run_name())
                            plan.append(cfg)
    return expand(plan, sweep, fixed=GRID_FIELDS)
