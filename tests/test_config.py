"""TrainConfig (apl.config): protocols, round trips, run names, validation."""
import json

import pytest

from apl.config import TrainConfig
from apl.presets import PROTOCOLS


def test_config_round_trip_and_json():
    c = TrainConfig.ma2020(loss="nfl", noise=0.4, seed=2, train_subset=1000)
    d = json.loads(json.dumps(c.to_dict()))
    assert TrainConfig.from_dict(d) == c
    with pytest.raises(ValueError, match="unknown TrainConfig field"):
        TrainConfig.from_dict({**d, "colour": "red"})


def test_presets():
    p = TrainConfig.paper(loss="nce+rce", noise=0.6)
    assert (p.model, p.optimizer, p.lr, p.epochs, p.batch_size, p.augment) == ("paper", "adam", 1e-3, 30, 128, False)
    assert p.loss_params == {"lam": 0.6} and p.variant == "paper" and p.noise_type == "symmetric"
    assert TrainConfig.paper(loss="nce").loss_params == {}
    m = TrainConfig.ma2020(loss="nfl")
    assert (m.model, m.optimizer, m.lr, m.momentum, m.weight_decay, m.scheduler, m.epochs) == \
        ("ma2020", "sgd", 0.01, 0.9, 1e-4, "cosine", 120)
    assert m.augment and m.grad_clip == 5.0 and m.noise_type == "ma2020_symmetric"
    assert m.loss_params == {"alpha": 10.0}
    assert TrainConfig.ma2020(loss="nce+rce").loss_params == {}


def test_run_name():
    assert TrainConfig.paper(loss="nce+rce", noise=0.6).run_name() == "nce+rce_paper_sym0.6_s0"
    assert TrainConfig.ma2020(loss="nce+rce", noise=0.4, seed=1).run_name() == "nce+rce_ma2020_msym0.4_s1_ma2020"
    base = TrainConfig.paper(loss="nfl", noise=0.2)
    names = {base.run_name(), TrainConfig.paper(loss="nfl", noise=0.2, lr=1e-4).run_name(),
             TrainConfig.paper(loss="nfl", noise=0.2, loss_params={"gamma": 1.0}).run_name(),
             TrainConfig.paper(loss="nfl", noise=0.2, width=0.25).run_name(),
             TrainConfig.paper(loss="nfl", noise=0.2, seed=1).run_name()}
    assert len(names) == 5
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
])
def test_bad_config_values(kw, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kw)


def test_asymmetric_noise_allows_one():
    assert TrainConfig(noise=1.0, noise_type="asymmetric").noise == 1.0


def test_protocol_weights_yield_to_the_callers():
    assert TrainConfig.paper(loss="nce+rce", loss_params={"alpha": 2}).loss_params == {"alpha": 2.0}
    assert TrainConfig.ma2020(loss="nfl", loss_params={"alpha": 3}).loss_params == {"alpha": 3.0}
    assert TrainConfig.paper(loss="NCE_MAE").loss_params == {"lam": 0.6}
    for name in PROTOCOLS:
        assert TrainConfig.from_protocol(name, loss="nce") == getattr(TrainConfig, name)(loss="nce")
    with pytest.raises(ValueError, match="unknown protocol"):
        TrainConfig.from_protocol("fast")
