"""TrainConfig, train() (results, checkpoints, exact resume) and the `apl train` CLI.

The resume test follows the brief (uninterrupted vs killed-and-resumed, compared exactly),
with 4 epochs killed after 2 so that a resumed scheduler is exercised too.
"""
import json
import math

import pytest
import torch

import apl.train as train_mod
from apl.__main__ import main
from apl.config import TrainConfig
from apl.data import load_cifar10, write_cifar10_folder
from apl.train import CHECKPOINT_FILE, MODEL_FILE, RESULT_FILE, train

RESULT_KEYS = {"loss", "variant", "noise", "noise_type", "seed", "config", "history", "final_test_acc",
               "best_test_acc", "best_epoch", "noise_record", "param_count", "device", "device_name",
               "torch_version", "cuda_version", "data_source", "wall_time_s", "loss_backend", "finished_at"}
TIME_KEYS = {"train_time_s", "epoch_time_s"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    write_cifar10_folder(root, n_train=400, n_test=200, seed=0)
    return root


@pytest.fixture(scope="module")
def arrays(data_dir):
    return load_cifar10(data_dir, download=False)


def small(protocol="paper", **kw):
    base = dict(width=0.125, batch_size=32, epochs=2, device="cpu", num_threads=1)
    base.update(kw)
    return getattr(TrainConfig, protocol)(**base)


def strip_times(history):
    return [{k: v for k, v in h.items() if k not in TIME_KEYS} for h in history]


# --------------------------------------------------------------------------- config

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
    assert TrainConfig.paper(loss="nfl", noise=0.2, device="cpu", data_dir="/x", num_threads=2).run_name() == base.run_name()
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


# --------------------------------------------------------------------------- train

def test_two_epochs_learn_and_write_result(tmp_path, arrays):
    cfg = small(loss="ce")
    calls = []
    r = train(cfg, tmp_path / "run", progress=False, data=arrays, on_epoch=calls.append)
    assert RESULT_KEYS <= set(r)
    assert len(r["history"]) == 2 and [c["epoch"] for c in calls] == [1, 2]
    h0, h1 = r["history"]
    assert h1["train_loss"] < h0["train_loss"]
    assert r["final_test_acc"] > 30.0  # chance is 10 %
    assert r["final_test_acc"] == h1["test_acc"]
    assert r["best_test_acc"] == max(h0["test_acc"], h1["test_acc"])
    assert r["noise_record"]["realised_rate"] == 0.0
    assert r["device"] == "cpu" and r["loss_backend"] in ("fused", "reference")
    assert r["config"] == cfg.to_dict() and "synthetic" in r["data_source"]
    assert set(h0) >= {"train_loss", "train_acc_noisy", "train_acc_clean", "test_acc", "test_loss", "epoch_time_s"}
    on_disk = json.loads((tmp_path / "run" / RESULT_FILE).read_text())
    assert on_disk == r
    assert (tmp_path / "run" / MODEL_FILE).exists() and not (tmp_path / "run" / CHECKPOINT_FILE).exists()


def test_noisy_and_clean_train_accuracy_differ_under_noise(tmp_path, arrays):
    r = train(small(loss="ce", noise=0.6, epochs=2), tmp_path / "run", progress=False, data=arrays)
    assert r["noise_record"]["realised_rate"] > 0.4
    h = r["history"][-1]
    assert h["train_acc_clean"] != h["train_acc_noisy"]


class Killed(Exception):
    pass


def _kill_after(n):
    def hook(record):
        if record["epoch"] == n:
            raise Killed
    return hook


@pytest.mark.parametrize("protocol, kw", [
    ("paper", dict(loss="nfl+mae", noise=0.4)),  # Adam, dropout
    ("ma2020", dict(loss="nce+rce", noise=0.4, width=0.125)),  # SGD, cosine, augmentation, clipping
])
def test_resume_equals_uninterrupted_run(tmp_path, arrays, protocol, kw):
    # 4 epochs, killed after 2: epoch 4's learning rate depends on the restored scheduler.
    cfg = small(protocol, epochs=4, **kw)
    full = train(cfg, tmp_path / "full", progress=False, data=arrays)
    with pytest.raises(Killed):
        train(cfg, tmp_path / "cut", progress=False, data=arrays, on_epoch=_kill_after(2))
    assert (tmp_path / "cut" / CHECKPOINT_FILE).exists() and not (tmp_path / "cut" / RESULT_FILE).exists()
    ckpt = torch.load(tmp_path / "cut" / CHECKPOINT_FILE, weights_only=False)
    assert ckpt["epoch"] == 2 and len(ckpt["history"]) == 2  # the kill lost no finished epoch
    seen = []
    resumed = train(cfg, tmp_path / "cut", progress=False, data=arrays, on_epoch=seen.append)
    assert [s["epoch"] for s in seen] == [3, 4]  # only the missing epochs ran
    assert strip_times(resumed["history"]) == strip_times(full["history"])
    skip = {"history", "wall_time_s", "finished_at", "resumed_at_epochs"}
    assert {k: v for k, v in resumed.items() if k not in skip} == {k: v for k, v in full.items() if k not in skip}
    assert resumed["resumed_at_epochs"] == [2]
    a = torch.load(tmp_path / "full" / MODEL_FILE)
    b = torch.load(tmp_path / "cut" / MODEL_FILE)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_finished_run_is_returned_without_training(tmp_path, arrays):
    cfg = small(epochs=1)
    first = train(cfg, tmp_path, progress=False, data=arrays)
    again = train(cfg, tmp_path, progress=False, data=arrays, on_epoch=_kill_after(1))
    assert again == first
    calls = []
    fresh = train(cfg, tmp_path, resume=False, progress=False, data=arrays, on_epoch=calls.append)
    assert len(calls) == 1 and fresh["finished_at"] >= first["finished_at"]
    assert strip_times(fresh["history"]) == strip_times(first["history"])  # same seed, same run


def test_other_config_in_the_same_folder_is_refused(tmp_path, arrays):
    train(small(epochs=1), tmp_path, progress=False, data=arrays)
    with pytest.raises(ValueError, match="different config.*lr"):
        train(small(epochs=1, lr=0.5), tmp_path, progress=False, data=arrays)
    with pytest.raises(Killed):
        train(small(epochs=2, seed=1), tmp_path / "b", progress=False, data=arrays, on_epoch=_kill_after(1))
    with pytest.raises(ValueError, match="different config.*seed"):
        train(small(epochs=2, seed=2), tmp_path / "b", progress=False, data=arrays)


def test_unreadable_checkpoint_is_a_clear_error(tmp_path, arrays):
    (tmp_path / CHECKPOINT_FILE).write_bytes(b"truncated")
    with pytest.raises(ValueError, match="cannot be read as a checkpoint.*resume=False"):
        train(small(epochs=1), tmp_path, progress=False, data=arrays)
    r = train(small(epochs=1), tmp_path, resume=False, progress=False, data=arrays)
    assert r["epochs_completed"] == 1


def test_callers_rng_is_left_alone(tmp_path, arrays):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train(small(epochs=1), tmp_path, progress=False, data=arrays)
    assert torch.equal(torch.rand(3), expected)


def test_non_finite_loss_is_recorded_not_fatal(tmp_path, arrays, monkeypatch):
    real = train_mod._build_loss

    def nan_loss(config):
        inner = real(config)
        return lambda logits, target: inner(logits, target) * float("nan")
    monkeypatch.setattr(train_mod, "_build_loss", nan_loss)
    r = train(small(epochs=2), tmp_path, progress=False, data=arrays)
    assert r["diverged"] and len(r["history"]) == 2
    assert r["history"][0]["nonfinite_batches"] == math.ceil(400 / 32)
    assert r["history"][0]["train_loss"] is None  # NaN is null in JSON
    text = (tmp_path / RESULT_FILE).read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))


def test_bad_arguments(tmp_path, arrays):
    with pytest.raises(ValueError, match="TrainConfig"):
        train({"loss": "ce"}, tmp_path)
    with pytest.raises(ValueError, match="CUDA is not available|device"):
        train(small(device="cuda:0") if not torch.cuda.is_available() else small(device="tpu"), tmp_path,
              data=arrays, progress=False)
    with pytest.raises(ValueError, match="CIFAR10Arrays"):
        train(small(), tmp_path / "x", data={"train_x": None}, progress=False)


def test_progress_prints_epoch_times(tmp_path, arrays, capsys):
    train(small(epochs=1), tmp_path, progress=True, data=arrays)
    out = capsys.readouterr().out
    assert "epoch 1/1" in out and " s)" in out and "final test acc" in out


# --------------------------------------------------------------------------- CLI

def test_cli_end_to_end(tmp_path, data_dir, capsys):
    out = tmp_path / "cli_run"
    code = main(["train", "--loss", "nce+rce", "--noise", "0.2", "--epochs", "1", "--width", "0.125",
                 "--batch-size", "32", "--data-dir", str(data_dir), "--out", str(out), "--device", "cpu",
                 "--num-threads", "1", "--quiet"])
    assert code == 0
    r = json.loads((out / RESULT_FILE).read_text())
    assert r["loss"] == "nce+rce" and r["variant"] == "paper" and r["config"]["loss_params"] == {"lam": 0.6}
    assert r["config"]["width"] == 0.125 and len(r["history"]) == 1
    printed = capsys.readouterr().out
    assert "final test acc" in printed and str(out) in printed


def test_cli_ma2020_protocol_and_params(tmp_path, data_dir):
    out = tmp_path / "m"
    code = main(["train", "--protocol", "ma2020", "--loss", "nfl+rce", "--alpha", "2", "--beta", "0.5",
                 "--noise", "0.4", "--epochs", "1", "--width", "0.125", "--batch-size", "32",
                 "--train-subset", "200", "--data-dir", str(data_dir), "--out", str(out), "--quiet",
                 "--device", "cpu"])
    assert code == 0
    r = json.loads((out / RESULT_FILE).read_text())
    c = r["config"]
    assert (c["model"], c["optimizer"], c["scheduler"], c["augment"], c["variant"]) == \
        ("ma2020", "sgd", "cosine", True, "ma2020")
    assert c["loss_params"] == {"alpha": 2.0, "beta": 0.5} and r["noise_record"]["kind"] == "ma2020_symmetric"
    assert r["num_train"] == 200


def test_cli_errors_are_one_line(tmp_path, data_dir, capsys, monkeypatch):
    assert main(["train", "--noise", "1.5", "--data-dir", str(data_dir), "--out", str(tmp_path / "a")]) == 2
    assert "noise" in capsys.readouterr().err
    import torchvision.datasets

    def offline(*a, **k):
        raise OSError("offline")
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    assert main(["train", "--epochs", "1", "--data-dir", str(tmp_path / "none"), "--out", str(tmp_path / "b"),
                 "--quiet"]) == 2
    assert "cifar-10-batches-py" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--protocol", "nope"])
