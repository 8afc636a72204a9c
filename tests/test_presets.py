"""The experiment as data (apl.presets): every preset, protocol and form is a valid, complete config."""
from __future__ import annotations

from dataclasses import fields

import pytest

from apl.config import TrainConfig
from apl.losses.spec import AUTHOR_LAMBDA, LOSS_NAMES, PAPER_LAMBDA, spec_for
from apl.plan import preset_config
from apl.presets import (
    FORMS,
    GRID_LOSSES,
    GRID_NOISE,
    GRID_VARIANTS,
    NOISE_FAMILIES,
    NOISE_RULES,
    PRESETS,
    PROTOCOLS,
    WEIGHT_PARAMS,
    get_preset,
    is_variant_free,
    protocol_variant,
)

CONFIG_FIELDS = {f.name for f in fields(TrainConfig)}


def test_protocols_and_presets_name_only_config_fields():
    for protocol in PROTOCOLS.values():
        assert set(protocol.fields) <= CONFIG_FIELDS
        for loss, weights in protocol.loss_weights.items():
            assert set(weights) <= set(WEIGHT_PARAMS)
            spec_for(loss, variant=protocol.fields["variant"], **weights)  # a valid loss and weighting
    for preset in PRESETS.values():
        assert set(preset.overrides) <= CONFIG_FIELDS
        assert preset.seeds >= 1 and preset.cpu_workers >= 1
        assert preset.forms and set(preset.forms) <= set(FORMS)
        variants = [v for v, _ in preset.forms]
        assert len(set(variants)) == len(variants) and set(variants) <= set(GRID_VARIANTS)  # one protocol per variant


def test_every_protocols_paper_settings_are_config_fields_noise_rules_and_valid_losses():
    for protocol in PROTOCOLS.values():
        for loss, setting in protocol.settings.items():
            assert set(setting.fields) <= CONFIG_FIELDS and setting.noise_rule in NOISE_RULES, loss
            for family in NOISE_FAMILIES:
                cfg = TrainConfig(**{**protocol.fields, **protocol.loss_fields(loss), "loss": loss,
                                     "noise_type": protocol.noise_type(loss, family),
                                     "loss_params": protocol.noise_params(loss, protocol.noise_type(loss, family))})
                assert cfg.loss == loss
    for name, preset in PRESETS.items():
        assert set(preset.losses) <= set(LOSS_NAMES) and set(preset.noise) <= set(NOISE_FAMILIES), name
        assert preset.report in ("paper", "successors"), name
    assert PRESETS["paper"].losses == GRID_LOSSES and PRESETS["quick"].noise == {"symmetric": GRID_NOISE}


def test_every_preset_builds_every_cell_of_the_grid():
    for name, preset in PRESETS.items():
        for loss in GRID_LOSSES:
            for variant, protocol in preset.forms:
                cfg = TrainConfig.from_protocol(protocol, loss=loss, variant=variant, **preset.overrides)
                assert cfg.loss == loss and cfg.variant == variant, name


def test_the_weights_are_the_spec_constants():
    assert {w["lam"] for w in PROTOCOLS["paper"].loss_weights.values()} == {PAPER_LAMBDA}
    assert {w["lam"] for w in PROTOCOLS["author"].loss_weights.values()} == {AUTHOR_LAMBDA}
    for protocol in ("paper", "author"):
        assert sorted(PROTOCOLS[protocol].loss_weights) == sorted(loss for loss in GRID_LOSSES if "+" in loss)


def test_the_paper_grid_runs_three_forms_author_first():
    assert PRESETS["paper"].forms == PRESETS["quick"].forms == (
        ("author", "author"), ("paper", "paper"), ("ma2020", "paper"))
    assert PRESETS["author"].forms == (("author", "author"),)
    assert PRESETS["ma2020"].forms == (("ma2020", "ma2020"),)
    assert GRID_VARIANTS[0] == "author"
    assert [protocol_variant(p) for p in ("author", "paper", "ma2020")] == ["author", "paper", "ma2020"]


def test_the_paper_preset_states_the_texts_protocol_and_the_codes_where_silent():
    """The paper preset's paper form: what the text states (Kaiming, lam 0.6, per-sample noise),
    and the author's code where it is silent (batch 64, gamma 2, Normalize 0.5)."""
    cfg = preset_config("paper", loss="nfl+rce", variant="paper", noise=0.6, seed=0)
    assert (cfg.batch_size, cfg.init, cfg.normalize, cfg.noise_type) == (64, "kaiming", "half", "symmetric")
    assert cfg.loss_params == {"gamma": 2.0, "lam": 0.6}
    assert (cfg.model, cfg.optimizer, cfg.lr, cfg.epochs, cfg.weight_decay, cfg.scheduler, cfg.augment) == \
        ("paper", "adam", 1e-3, 30, 0.0, "none", False)
    # its ma2020 form: the same protocol and weights, the cited work's losses and exponent
    ma = preset_config("paper", loss="nfl+rce", variant="ma2020", noise=0.6, seed=0)
    assert ma.training_identity() == cfg.training_identity() and ma.loss_params == {"gamma": 0.5, "lam": 0.6}
    author = preset_config("paper", loss="nfl+rce", variant="author", noise=0.6, seed=0)
    assert author == TrainConfig.author(loss="nfl+rce", noise=0.6, seed=0)
    with pytest.raises(ValueError, match="variant 'paper' is not a form of this preset"):
        preset_config("author", loss="nce", variant="paper", noise=0.2, seed=0)


def test_variant_free_losses_and_unknown_presets():
    assert [loss for loss in GRID_LOSSES if is_variant_free(loss)] == ["ce"]
    assert get_preset("quick") is PRESETS["quick"]
    with pytest.raises(ValueError, match="unknown preset 'fast'; use one of quick, paper, author, ma2020"):
        get_preset("fast")
