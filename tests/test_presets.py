"""The experiment as data (apl.presets): every preset and protocol is a valid, complete config."""
from __future__ import annotations

from dataclasses import fields

import pytest

from apl.config import TrainConfig
from apl.presets import GRID_LOSSES, GRID_VARIANTS, PRESETS, PROTOCOLS, WEIGHT_PARAMS, get_preset, is_variant_free
from apl.spec import PAPER_LAMBDA, spec_for

CONFIG_FIELDS = {f.name for f in fields(TrainConfig)}


def test_protocols_and_presets_name_only_config_fields():
    for protocol in PROTOCOLS.values():
        assert set(protocol.fields) <= CONFIG_FIELDS
        for loss, weights in protocol.loss_weights.items():
            assert set(weights) <= set(WEIGHT_PARAMS)
            spec_for(loss, variant=protocol.fields["variant"], **weights)  # a valid loss and weighting
    for preset in PRESETS.values():
        assert preset.protocol in PROTOCOLS and set(preset.overrides) <= CONFIG_FIELDS
        assert preset.seeds >= 1 and preset.cpu_workers >= 1
        assert preset.variants and set(preset.variants) <= set(GRID_VARIANTS)


def test_every_preset_builds_every_cell_of_the_grid():
    for name, preset in PRESETS.items():
        for loss in GRID_LOSSES:
            for variant in preset.variants:
                cfg = TrainConfig.from_protocol(preset.protocol, loss=loss, variant=variant,
                                                **preset.overrides)
                assert cfg.loss == loss and cfg.variant == variant, name


def test_the_papers_weight_is_the_spec_constant():
    assert {w["lam"] for w in PROTOCOLS["paper"].loss_weights.values()} == {PAPER_LAMBDA}
    assert sorted(PROTOCOLS["paper"].loss_weights) == sorted(loss for loss in GRID_LOSSES if "+" in loss)


def test_variant_free_losses_and_unknown_presets():
    assert [loss for loss in GRID_LOSSES if is_variant_free(loss)] == ["ce"]
    assert get_preset("quick") is PRESETS["quick"]
    with pytest.raises(ValueError, match="unknown preset 'fast'; use one of quick, paper, ma2020"):
        get_preset("fast")
