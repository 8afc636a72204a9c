"""TrainConfig (apl.config): protocols, round trips, run names, validation."""
import json
import re

import pytest

from apl.config import TrainConfig
from apl.presets import PROTOCOLS
from apl.records import is_current


def test_config_round_trip_and_json():
    c = TrainConfig.ma2020(loss="nfl", noise=0.4, seed=2, train_subset=1000)
    d = json.loads(json.dumps(c.to_dict()))
    assert TrainConfig.from_dict(d) == c
    with pytest.raises(ValueError, match="unknown TrainConfig field"):
        TrainConfig.from_dict({**d, "colour": "red"})


def test_presets():
    p = TrainConfig.paper(loss="nce+rce", noise=0.6)
    assert (p.model, p.optimizer, p.lr, p.epochs, p.batch_size, p.augment) == ("paper", "adam", 1e-3, 30, 64, False)
    assert (p.init, p.normalize) == ("kaiming", "half")
    assert p.loss_params == {"lam": 0.6} and p.variant == "paper" and p.noise_type == "symmetric"
    assert TrainConfig.paper(loss="nce").loss_params == {}
    a = TrainConfig.author(loss="nfl+mae", noise=0.6)
    assert (a.model, a.init, a.normalize, a.optimizer, a.lr, a.weight_decay, a.scheduler, a.epochs,
            a.batch_size, a.augment) == ("paper", "torch", "half", "adam", 1e-3, 0.0, "none", 30, 64, False)
    assert a.loss_params == {"gamma": 2.0, "lam": 0.4} and a.noise_type == "author_symmetric"
    m = TrainConfig.ma2020(loss="nfl")
    assert (m.model, m.optimizer, m.lr, m.momentum, m.weight_decay, m.scheduler, m.epochs) == \
        ("ma2020", "sgd", 0.01, 0.9, 1e-4, "cosine", 120)
    assert m.augment and m.grad_clip == 5.0 and m.noise_type == "ma2020_symmetric"
    assert (m.init, m.normalize) == ("kaiming", "cifar")
    assert m.loss_params == {"alpha": 10.0, "gamma": 0.5}
    assert TrainConfig.ma2020(loss="nce+rce").loss_params == {}


def test_a_focal_loss_records_its_gamma():
    """The variant's default exponent is written into the config (so the run JSON says it); a
    given one is kept; a loss without a focal term records none."""
    assert TrainConfig(loss="fl", variant="paper").loss_params == {"gamma": 2.0}
    assert TrainConfig(loss="nfl+rce", variant="ma2020").loss_params == {"gamma": 0.5}
    assert TrainConfig(loss="nfl", variant="author", loss_params={"gamma": 1}).loss_params == {"gamma": 1.0}
    assert TrainConfig(loss="nce+mae", variant="author").loss_params == {}
    assert TrainConfig(loss="ce", variant="paper").loss_params == {}


def test_a_successor_records_the_parameters_it_trains_with():
    """A successor's defaults are its paper's CIFAR-10 values: the config writes them out (so a run's
    record says them and a changed default is another run); given ones are kept; APL's losses are as
    before (their run names stay)."""
    assert TrainConfig(loss="anl-ce", variant="ma2020").loss_params == {"alpha": 5.0, "beta": 5.0, "min_prob": 1e-7}
    assert TrainConfig(loss="nce+agce", variant="ma2020").loss_params == {"a": 6.0, "alpha": 1.0, "beta": 4.0,
                                                                          "q": 1.5}
    assert TrainConfig(loss="efl", variant="ma2020", loss_params={"m": 1e3}).loss_params == {"gamma": 0.1, "m": 1e3}
    assert TrainConfig(loss="jal-fl", variant="ma2020", loss_params={"lam": 0.5}).loss_params == {
        "a": 30.0, "gamma": 0.5, "lam": 0.5}
    assert TrainConfig(loss="nmae", variant="ma2020").loss_params == {}
    assert TrainConfig(loss="gce", variant="ma2020").loss_params == TrainConfig(loss="nce+rce").loss_params == {}
    with pytest.raises(ValueError, match="min_prob"):
        TrainConfig(loss="nce+agce", variant="ma2020", loss_params={"min_prob": 1e-6})


def test_run_name():
    assert re.fullmatch(r"nce\+rce_paper_sym0\.6_s0_[0-9a-f]{8}",
                        TrainConfig.paper(loss="nce+rce", noise=0.6).run_name())
    assert re.fullmatch(r"nce\+rce_ma2020_msym0\.4_s1_[0-9a-f]{8}",
                        TrainConfig.ma2020(loss="nce+rce", noise=0.4, seed=1).run_name())
    assert TrainConfig.author(loss="nce", noise=0.8).run_name().startswith("nce_author_auth0.8_s0_")
    base = TrainConfig.paper(loss="nfl", noise=0.2)
    names = {base.run_name(), TrainConfig.paper(loss="nfl", noise=0.2, lr=1e-4).run_name(),
             TrainConfig.paper(loss="nfl", noise=0.2, loss_params={"gamma": 1.0}).run_name(),
             TrainConfig.paper(loss="nfl", noise=0.2, width=0.25).run_name(),
             TrainConfig.paper(loss="nfl", noise=0.2, seed=1).run_name(),
             TrainConfig.paper(loss="nfl", noise=0.2, init="torch").run_name(),
             TrainConfig.paper(loss="nfl", noise=0.2, normalize="cifar").run_name()}
    assert len(names) == 7
    # where and how fast it runs does not change what it is
    elsewhere = TrainConfig.paper(loss="nfl", noise=0.2, device="cpu", data_dir="/x", num_threads=2)
    assert elsewhere.run_name() == base.run_name()
    assert all(ch.isalnum() or ch in "+_.-" for ch in TrainConfig.paper(loss="nfl", noise=0.2, lr=0.5).run_name())


@pytest.mark.parametrize("kw, match", [
    ({"loss": "hinge"}, "loss"), ({"variant": "x"}, "variant"), ({"noise": 1.0}, "noise"),
    ({"noise": -0.1}, "noise"), ({"noise_type": "pair"}, "noise_type"), ({"epochs": 0}, "epochs"),
    ({"batch_size": 1}, "batch_size"), ({"loss": "nce", "loss_params": {"lam": 0.5}}, "lam"),
    ({"loss_params": {"tau": 1}}, "tau"), ({"optimizer": "lbfgs"}, "optimizer"), ({"width": 0}, "width"),
    ({"amp": "fp16"}, "amp"), ({"train_subset": 0}, "train_subset"), ({"grad_clip": -1.0}, "grad_clip"),
    ({"seed": -1}, "seed"), ({"backend": "cuda"}, "backend"), ({"augment": "yes"}, "augment"),
    ({"init": "xavier"}, "init"), ({"normalize": "imagenet"}, "normalize"),
    ({"noise": 1.0, "noise_type": "author_symmetric"}, "noise"),
    ({"noise": 1.0, "noise_type": "exact_symmetric"}, "noise"), ({"l1": -1e-5}, "l1"),
    ({"l1": float("nan")}, "l1"), ({"l1": "5e-5"}, "l1"),
])
def test_bad_config_values(kw, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kw)


def test_asymmetric_noise_allows_one():
    assert TrainConfig(noise=1.0, noise_type="asymmetric").noise == 1.0
    assert TrainConfig(noise=1.0, noise_type="exact_asymmetric").noise == 1.0


def test_the_exact_count_noise_rules_have_their_own_run_names():
    names = {TrainConfig.ma2020(loss="ce", noise=0.4, noise_type=t).run_name()
             for t in ("ma2020_symmetric", "exact_symmetric", "asymmetric", "exact_asymmetric")}
    assert len(names) == 4
    assert TrainConfig.ma2020(loss="ce", noise=0.4, noise_type="exact_symmetric").run_name().startswith(
        "ce_ma2020_xsym0.4_s0_")
    assert TrainConfig.ma2020(loss="ce", noise=0.2, noise_type="exact_asymmetric").run_name().startswith(
        "ce_ma2020_xasym0.2_s0_")


def test_l1_is_part_of_the_run_and_runs_recorded_before_it_keep_their_names():
    """l1 > 0 is another run; at 0 (what every earlier run trained with) the field stays out of the
    identity, so a record written before the field existed is still this version's run."""
    base = TrainConfig.ma2020(loss="nce+rce", noise=0.4)
    with_l1 = TrainConfig.ma2020(loss="nce+rce", noise=0.4, weight_decay=0.0, l1=5e-5)
    assert base.l1 == 0.0 and "l1" not in base.identity() and with_l1.identity()["l1"] == 5e-5
    assert with_l1.run_name() != TrainConfig.ma2020(loss="nce+rce", noise=0.4, weight_decay=0.0).run_name()
    assert "l1" in with_l1.training_identity()
    earlier = {k: v for k, v in base.to_dict().items() if k != "l1"}  # written before the field existed
    assert TrainConfig.from_dict(earlier) == base and base.differences(earlier) == []
    assert is_current({"config": earlier, "run_name": base.run_name()})
    # a saved run with an l1 differs from one without, whichever side has it
    assert base.differences(with_l1.to_dict()) == ["l1", "weight_decay"]
    assert with_l1.differences(earlier) == ["l1", "weight_decay"]
    assert TrainConfig.from_dict(json.loads(json.dumps(with_l1.to_dict()))) == with_l1


def test_protocol_weights_yield_to_the_callers():
    assert TrainConfig.paper(loss="nce+rce", loss_params={"alpha": 2}).loss_params == {"alpha": 2.0}
    assert TrainConfig.ma2020(loss="nfl", loss_params={"alpha": 3}).loss_params == {"alpha": 3.0, "gamma": 0.5}
    assert TrainConfig.paper(loss="NCE_MAE").loss_params == {"lam": 0.6}
    for name in PROTOCOLS:
        assert TrainConfig.from_protocol(name, loss="nce") == getattr(TrainConfig, name)(loss="nce")
    with pytest.raises(ValueError, match="unknown protocol"):
        TrainConfig.from_protocol("fast")


def test_a_run_written_before_gamma_and_the_new_fields_is_another_run():
    """A paper-variant run of the earlier version (implicit gamma 0.5, batch 128, no init or
    normalize field) reads back as itself, never as the run the same cell is now: other identity,
    other name, and its stored name no longer matches its config (the report leaves it out)."""
    old = {k: v for k, v in TrainConfig.paper(loss="nfl", noise=0.6).to_dict().items()
           if k not in ("init", "normalize")}
    old.update(batch_size=128, loss_params={})
    old_name = "nfl_paper_sym0.6_s0"  # the earlier version's name of a protocol-default run
    read_back = TrainConfig.from_dict(old)
    now = TrainConfig.paper(loss="nfl", noise=0.6)
    assert read_back.identity() != now.identity() and read_back.run_name() != now.run_name() != old_name
    assert not is_current({"config": old, "run_name": old_name})
    assert now.differences(old) == ["batch_size", "init", "loss_params", "normalize"]
    assert now.differences(now.to_dict()) == []
    assert is_current({"config": now.to_dict(), "run_name": now.run_name()})


def test_training_identity_leaves_out_only_the_loss_and_the_cell():
    a = TrainConfig.paper(loss="ce", noise=0.2, seed=1)
    b = TrainConfig.paper(loss="nfl+rce", variant="ma2020", noise=0.8, seed=0)
    assert a.training_identity() == b.training_identity()
    assert TrainConfig.author(loss="ce").training_identity() != a.training_identity()
    assert {"loss", "variant", "loss_params", "noise", "seed"}.isdisjoint(a.training_identity())
