"""train() (apl.train): results, checkpoints, exact resume, divergence, progress lines.

The resume test follows the brief (uninterrupted vs killed-and-resumed, compared exactly),
with 4 epochs killed after 2 so that a resumed scheduler is exercised too.
"""
import json
import math
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SYNTHETIC_TRAIN

import apl.train as train_mod
from apl.checkpoint import CHECKPOINT_FILE, MODEL_FILE
from apl.config import TrainConfig
from apl.records import RESULT_FILE
from apl.train import train

RESULT_KEYS = {"loss", "variant", "noise", "noise_type", "seed", "config", "history", "final_test_acc",
               "best_test_acc", "best_epoch", "noise_record", "param_count", "device", "device_name",
               "torch_version", "cuda_version", "data_source", "wall_time_s", "loss_backend", "finished_at"}
TIME_KEYS = {"train_time_s", "epoch_time_s"}


def small(protocol="paper", **kw):
    base = dict(width=0.125, batch_size=32, epochs=2, device="cpu", num_threads=1)
    base.update(kw)
    return getattr(TrainConfig, protocol)(**base)


def strip_times(history):
    return [{k: v for k, v in h.items() if k not in TIME_KEYS} for h in history]


# --------------------------------------------------------------------------- train

def test_two_epochs_learn_and_write_result(tmp_path, cifar_arrays):
    cfg = small(loss="ce")
    calls = []
    r = train(cfg, tmp_path / "run", progress=False, data=cifar_arrays, on_epoch=calls.append)
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


def test_noisy_and_clean_train_accuracy_differ_under_noise(tmp_path, cifar_arrays):
    r = train(small(loss="ce", noise=0.6, epochs=2), tmp_path / "run", progress=False, data=cifar_arrays)
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
def test_resume_equals_uninterrupted_run(tmp_path, cifar_arrays, protocol, kw):
    # 4 epochs, killed after 2: epoch 4's learning rate depends on the restored scheduler.
    cfg = small(protocol, epochs=4, **kw)
    full = train(cfg, tmp_path / "full", progress=False, data=cifar_arrays)
    with pytest.raises(Killed):
        train(cfg, tmp_path / "cut", progress=False, data=cifar_arrays, on_epoch=_kill_after(2))
    assert (tmp_path / "cut" / CHECKPOINT_FILE).exists() and not (tmp_path / "cut" / RESULT_FILE).exists()
    ckpt = torch.load(tmp_path / "cut" / CHECKPOINT_FILE, weights_only=True)
    assert ckpt["epoch"] == 2 and len(ckpt["history"]) == 2  # the kill lost no finished epoch
    seen = []
    resumed = train(cfg, tmp_path / "cut", progress=False, data=cifar_arrays, on_epoch=seen.append)
    assert [s["epoch"] for s in seen] == [3, 4]  # only the missing epochs ran
    assert strip_times(resumed["history"]) == strip_times(full["history"])
    skip = {"history", "wall_time_s", "finished_at", "resumed_at_epochs"}
    assert {k: v for k, v in resumed.items() if k not in skip} == {k: v for k, v in full.items() if k not in skip}
    assert resumed["resumed_at_epochs"] == [2]
    a = torch.load(tmp_path / "full" / MODEL_FILE)
    b = torch.load(tmp_path / "cut" / MODEL_FILE)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_finished_run_is_returned_without_training(tmp_path, cifar_arrays):
    cfg = small(epochs=1)
    first = train(cfg, tmp_path, progress=False, data=cifar_arrays)
    again = train(cfg, tmp_path, progress=False, data=cifar_arrays, on_epoch=_kill_after(1))
    assert again == first
    calls = []
    fresh = train(cfg, tmp_path, resume=False, progress=False, data=cifar_arrays, on_epoch=calls.append)
    assert len(calls) == 1 and fresh["finished_at"] >= first["finished_at"]
    assert strip_times(fresh["history"]) == strip_times(first["history"])  # same seed, same run


def test_other_config_in_the_same_folder_is_refused(tmp_path, cifar_arrays):
    train(small(epochs=1), tmp_path, progress=False, data=cifar_arrays)
    with pytest.raises(ValueError, match="different config.*lr"):
        train(small(epochs=1, lr=0.5), tmp_path, progress=False, data=cifar_arrays)
    with pytest.raises(Killed):
        train(small(epochs=2, seed=1), tmp_path / "b", progress=False, data=cifar_arrays, on_epoch=_kill_after(1))
    with pytest.raises(ValueError, match="different config.*seed"):
        train(small(epochs=2, seed=2), tmp_path / "b", progress=False, data=cifar_arrays)


def test_a_finished_run_of_the_earlier_version_is_never_taken_for_this_one(tmp_path, cifar_arrays):
    """Same fields except what the earlier version did not write (init, normalize, the focal
    exponent it left implicit at 0.5): refused, although this version would read it back equal."""
    cfg = small(loss="nfl", epochs=1, normalize="cifar")  # the dataclass defaults: what the earlier version did
    result = train(cfg, tmp_path, progress=False, data=cifar_arrays)
    old = {k: v for k, v in result["config"].items() if k not in ("init", "normalize")}
    old["loss_params"] = {}
    assert TrainConfig.from_dict(old).identity() == cfg.identity()  # the trap: defaults fill it in
    (tmp_path / RESULT_FILE).write_text(json.dumps({**result, "config": old}))
    with pytest.raises(ValueError, match="different config .differs in init, loss_params, normalize"):
        train(cfg, tmp_path, progress=False, data=cifar_arrays)


def test_unreadable_checkpoint_is_a_clear_error(tmp_path, cifar_arrays):
    (tmp_path / CHECKPOINT_FILE).write_bytes(b"truncated")
    with pytest.raises(ValueError, match="cannot be read safely as a checkpoint.*resume=False"):
        train(small(epochs=1), tmp_path, progress=False, data=cifar_arrays)
    r = train(small(epochs=1), tmp_path, resume=False, progress=False, data=cifar_arrays)
    assert r["epochs_completed"] == 1


class _RunsCode:
    """A pickle payload that writes a marker file when unpickled (what a hostile checkpoint does)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_checkpoint_that_would_run_code_is_refused_without_running_it(tmp_path, cifar_arrays):
    """Resuming reads checkpoint.pt with weights_only=True: a planted pickle that would run code
    (here: create a file) is refused with the file's name and the way out, and nothing ran."""
    marker = tmp_path / "code_ran"
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    torch.save({"format": 2, "payload": _RunsCode(marker)}, run_dir / CHECKPOINT_FILE)
    with pytest.raises(ValueError, match=rf"{CHECKPOINT_FILE} cannot be read safely .*--fresh"):
        train(small(epochs=1), run_dir, progress=False, data=cifar_arrays)
    assert not marker.exists()
    with zipfile.ZipFile(run_dir / CHECKPOINT_FILE) as archive:  # the payload is live: plain unpickling runs it
        pickle.loads(archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl"))))
    assert marker.exists()


def test_an_old_pickled_checkpoint_is_refused(tmp_path, cifar_arrays):
    """A format-1 checkpoint (numpy and Python RNG objects) cannot be loaded safely: a clear error."""
    torch.save({"format": 1, "rng": {"numpy": np.random.get_state()}}, tmp_path / CHECKPOINT_FILE)
    with pytest.raises(ValueError, match="cannot be read safely as a checkpoint of this version"):
        train(small(epochs=1), tmp_path, progress=False, data=cifar_arrays)


def test_callers_rng_is_left_alone(tmp_path, cifar_arrays):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train(small(epochs=1), tmp_path, progress=False, data=cifar_arrays)
    assert torch.equal(torch.rand(3), expected)


def test_non_finite_loss_is_recorded_not_fatal(tmp_path, cifar_arrays, monkeypatch):
    real = train_mod._build_loss

    def nan_loss(config):
        inner = real(config)
        return lambda logits, target: inner(logits, target) * float("nan")
    monkeypatch.setattr(train_mod, "_build_loss", nan_loss)
    r = train(small(epochs=2), tmp_path, progress=False, data=cifar_arrays)
    assert r["diverged"] and len(r["history"]) == 2
    assert r["history"][0]["nonfinite_batches"] == math.ceil(SYNTHETIC_TRAIN / 32)
    assert r["history"][0]["train_loss"] is None  # NaN is null in JSON
    text = (tmp_path / RESULT_FILE).read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))


def test_bad_arguments(tmp_path, cifar_arrays):
    with pytest.raises(ValueError, match="TrainConfig"):
        train({"loss": "ce"}, tmp_path)
    with pytest.raises(ValueError, match="CUDA is not available|device"):
        train(small(device="cuda:0") if not torch.cuda.is_available() else small(device="tpu"), tmp_path,
              data=cifar_arrays, progress=False)
    with pytest.raises(ValueError, match="CIFAR10Arrays"):
        train(small(), tmp_path / "x", data={"train_x": None}, progress=False)


def test_progress_prints_epoch_times(tmp_path, cifar_arrays, capsys):
    train(small(epochs=1), tmp_path, progress=True, data=cifar_arrays)
    out = capsys.readouterr().out
    assert "epoch 1/1" in out and " s)" in out and "final test acc" in out


# --------------------------------------------------------------------------- the L1 regulariser (ANL, JAL)

def _one_step(config, model, x, y, *, l1_in_loss: bool):
    """One step of ``config``'s optimizer on ``model``: through the trainer, or (``l1_in_loss``) by the
    definition: backward of ``loss + l1 * sum |theta|`` over every parameter, clip the total, step."""
    trainer = train_mod._Trainer.build(config, torch.device("cpu"))
    trainer.model.load_state_dict(model.state_dict())
    if not l1_in_loss:
        trainer.train_epoch([(x, y, y)], 1, None, train_mod.StopRequest())
        return trainer.model
    m = trainer.model.train()
    total = trainer.loss_fn(m(x), y) + config.l1 * sum(p.abs().sum() for p in m.parameters())
    trainer.optimizer.zero_grad()
    total.backward()
    norm = torch.nn.utils.clip_grad_norm_(m.parameters(), config.grad_clip)
    assert norm > config.grad_clip  # the clip is active: it must scale the L1 term too
    trainer.optimizer.step()
    return m


def test_an_l1_step_is_the_step_of_the_regularised_loss_clipped_as_a_whole():
    """The trainer's step with l1 > 0 equals one of loss + l1 * sum|theta| (conv and linear weights,
    biases, BatchNorm affine), with the gradient-norm clip applied to the total: clipping before
    the L1 term is added would land elsewhere."""
    cfg = TrainConfig.ma2020(loss="nce+rce", width=0.125, device="cpu", weight_decay=0.0, l1=0.02,
                             grad_clip=0.05, channels_last=False)
    torch.manual_seed(0)
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    start = train_mod.build_model(cfg.model, 10, cfg.width, cfg.init)
    ours = _one_step(cfg, start, x, y, l1_in_loss=False)
    by_definition = _one_step(cfg, start, x, y, l1_in_loss=True)
    for (name, a), b in zip(ours.named_parameters(), by_definition.parameters()):
        assert torch.allclose(a, b, atol=1e-7, rtol=1e-6), name
    # without the term, or with it added after the clip, the step differs
    plain = _one_step(TrainConfig.from_dict({**cfg.to_dict(), "l1": 0.0}), start, x, y, l1_in_loss=False)
    assert not torch.allclose(torch.nn.utils.parameters_to_vector(plain.parameters()),
                              torch.nn.utils.parameters_to_vector(ours.parameters()), atol=1e-6)
    bn_bias = dict(ours.named_parameters())["features.1.bias"]  # BatchNorm's affine is regularised too
    assert not torch.equal(bn_bias, dict(plain.named_parameters())["features.1.bias"])


def test_training_with_l1_shrinks_the_weights_and_records_it(tmp_path, cifar_arrays):
    """Through train(): the same run with l1 > 0 ends with a smaller sum |theta| than without."""
    sums = {}
    for l1 in (0.0, 0.05):
        cfg = small("ma2020", loss="ce", epochs=1, weight_decay=0.0, l1=l1)
        r = train(cfg, tmp_path / f"l1_{l1}", progress=False, data=cifar_arrays)
        assert r["config"]["l1"] == l1
        state = torch.load(tmp_path / f"l1_{l1}" / MODEL_FILE, weights_only=True)
        params = dict(train_mod.build_model(cfg.model, 10, cfg.width, cfg.init).named_parameters())
        sums[l1] = sum(float(v.abs().sum()) for k, v in state.items() if k in params)
    assert sums[0.05] < 0.99 * sums[0.0]
