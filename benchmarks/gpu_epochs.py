"""The GPU check's training-epoch timings, run in a worker process (``python -m benchmarks.gpu_epochs
epochs PARAMS_JSON OUT``, started by ``benchmarks.gpu_check``): two epochs of the paper preset per
training mode, on a subset of CIFAR-10 or of synthetic data of its shape, scaled to the full epoch
(:func:`benchmarks.gpu_measures.full_epoch_estimate`). Several such workers started at once time the
GPU shared: a barrier lines up their timed epochs. The results go to OUT after every mode.
"""
from __future__ import annotations

import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from apl.config import TrainConfig
from apl.data import CIFAR10_CLASSES, CIFAR10Arrays, load_cifar10
from apl.train import train
from benchmarks.gpu_measures import FULL_TEST, FULL_TRAIN, full_epoch_estimate, run_worker, save_results

__all__ = ["synthetic_cifar10", "worker_epochs"]


def synthetic_cifar10(n_train: int = FULL_TRAIN, n_test: int = FULL_TEST, seed: int = 0):
    """Random CIFAR-10-shaped arrays (uint8 images, balanced labels), for timing where no
    CIFAR-10 is at hand: the epoch's cost does not depend on what the pixels show."""
    rng = np.random.default_rng(seed)

    def split(n):
        return (rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8),
                rng.permutation(np.arange(n) % len(CIFAR10_CLASSES)).astype(np.int64))

    train_x, train_y = split(n_train)
    test_x, test_y = split(n_test)
    return CIFAR10Arrays(train_x, train_y, test_x, test_y, CIFAR10_CLASSES,
                         source=f"synthetic: random CIFAR-10-shaped images ({n_train} train, {n_test} test), "
                                f"timing only", official=False)


def worker_epochs(p: dict, out: Path) -> None:
    """The ``epochs`` step (or one shared-GPU run of it): each of ``p["modes"]`` for two epochs."""
    if p.get("data_dir"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the non-official-copy note; the report names the source
            data = load_cifar10(p["data_dir"], download=False)
    else:
        data = synthetic_cifar10(*p.get("synthetic_sizes", (FULL_TRAIN, FULL_TEST)))
    result = {"data_source": data.source, "modes": []}
    barrier = p.get("barrier")

    def wait_for_all(record):
        # Shared runs: every process finishes its warm-up epoch before the timed one starts.
        if barrier and record["epoch"] == 1:
            Path(barrier["dir"], f"ready.{barrier['index']}").touch()
            stop = time.monotonic() + barrier["timeout_s"]
            while len(list(Path(barrier["dir"]).glob("ready.*"))) < barrier["count"]:
                if time.monotonic() > stop:
                    result["barrier_timed_out"] = True
                    break
                time.sleep(0.01)

    for name, amp, compile_, channels_last in p["modes"]:
        entry = {"mode": name, "amp": amp, "compile": compile_, "channels_last": channels_last}
        result["modes"].append(entry)
        cfg = TrainConfig.paper(loss=p["loss"], epochs=2, train_subset=p["train_subset"],
                                test_subset=p.get("test_subset"), width=p.get("width", 1.0),
                                device=p.get("device", "cuda"), amp=amp, compile=compile_,
                                channels_last=channels_last, data_dir=p.get("data_dir") or "data")
        try:
            with tempfile.TemporaryDirectory() as run_dir, warnings.catch_warnings():
                warnings.simplefilter("ignore")
                r = train(cfg, run_dir, resume=False, progress=False, data=data, on_epoch=wait_for_all)
        except Exception as e:  # a failing mode is a finding; the next one still runs
            entry["error"] = f"{type(e).__name__}: {e}"
            save_results(out, result)
            continue
        entry.update(history=r["history"], num_train=r["num_train"], num_test=r["num_test"],
                     batch_size=cfg.batch_size, loss_backend=r.get("loss_backend"),
                     **full_epoch_estimate(r["history"], r["num_train"], r["num_test"]))
        save_results(out, result)
    save_results(out, result)


if __name__ == "__main__":
    sys.exit(run_worker({"epochs": worker_epochs}))
