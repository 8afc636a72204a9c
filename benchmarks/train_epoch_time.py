"""Seconds per training epoch of the CNNs on real data, to size the grid's presets.

Runs ``apl.train.train`` for one epoch per (width, channels_last) on a class-balanced subset
and prints a table: measured train/eval seconds and the train time scaled to the full
50,000-image epoch. Example (2 threads, 5,000 images):

    OMP_NUM_THREADS=2 python -m benchmarks.train_epoch_time --data-dir data \
        --subset 5000 --widths 1,0.25,0.125 --threads 2

(``--data-dir``: the folder that holds ``cifar-10-batches-py``.)
"""
from __future__ import annotations

import argparse
import tempfile
import warnings

from apl.config import TrainConfig
from apl.data import load_cifar10
from apl.train import train


def main(argv=None) -> None:
    """Parse arguments, time one epoch per setting, print the table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--subset", type=int, default=5000, help="training images per timed epoch")
    p.add_argument("--test-subset", type=int, default=1000)
    p.add_argument("--widths", default="1,0.25,0.125")
    p.add_argument("--model", default="paper", choices=("paper", "ma2020"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--loss", default="ce")
    p.add_argument("--channels-last", default="both", choices=("both", "on", "off"))
    args = p.parse_args(argv)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the non-official-copy note; the table says the source
        data = load_cifar10(args.data_dir)
    layouts = {"both": (True, False), "on": (True,), "off": (False,)}[args.channels_last]
    print(f"data: {data.source}")
    print(f"{args.subset} train / {args.test_subset} test images, batch {args.batch_size}, "
          f"{args.threads} threads, device {args.device}, loss {args.loss}, model {args.model}")
    print(f"{'width':>6} {'ch_last':>7} {'params':>9} {'train s':>8} {'eval s':>7} {'s/50k epoch':>12}")
    for width in (float(w) for w in args.widths.split(",")):
        for cl in layouts:
            cfg = TrainConfig.paper(loss=args.loss, model=args.model, width=width, epochs=1,
                                    batch_size=args.batch_size, train_subset=args.subset,
                                    test_subset=args.test_subset, num_threads=args.threads,
                                    device=args.device, channels_last=cl, data_dir=args.data_dir)
            with tempfile.TemporaryDirectory() as out, warnings.catch_warnings():
                warnings.simplefilter("ignore")
                r = train(cfg, out, resume=False, progress=False, data=data)
            h = r["history"][0]
            t_train, t_eval = h["train_time_s"], h["epoch_time_s"] - h["train_time_s"]
            print(f"{width:>6g} {str(cl):>7} {r['param_count']:>9} {t_train:>8.1f} {t_eval:>7.1f} "
                  f"{t_train * 50000 / r['num_train']:>12.0f}", flush=True)


if __name__ == "__main__":
    main()
