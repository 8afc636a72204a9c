"""Rerun some committed run records and compare them with what this checkout trains, record for record.

A committed report (``paper_figures/quick/`` and ``paper_figures/successors_quick/`` keep their run
records) must be the current code's output. Exact equality of a rerun holds on the same kind of CPU
(same instruction set, one thread per run, as the quick presets train), so this is a script, not a
test: it picks ``--runs`` records (spread over the losses and forms), trains each one's config again
into a scratch folder on the CPU, and prints one row per run: the committed and the rerun final test
accuracy, and whether the whole record agrees (:func:`apl.records.comparable_record`: everything but
times, device and thread count). Exit status 0 when every rerun agrees, 1 otherwise.

    python -m benchmarks.rerun_records --data-dir /path/holding/cifar-10-batches-py
    python -m benchmarks.rerun_records --records paper_figures/successors_quick/run_records --runs 4
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

import torch

from apl.config import TrainConfig
from apl.records import comparable_record
from apl.train import train
from benchmarks.bench_losses import markdown_header, markdown_row

ROOT = Path(__file__).resolve().parent.parent


def pick(results: list[dict], count: int) -> list[dict]:
    """``count`` records spread over the grid: sorted by run name, taken at even steps."""
    ordered = sorted(results, key=lambda r: r["run_name"])
    if count >= len(ordered):
        return ordered
    step = len(ordered) / count
    return [ordered[int(i * step)] for i in range(count)]


def differing_fields(a: dict, b: dict) -> list[str]:
    """The top-level fields of two comparable records that differ."""
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=Path, default=ROOT / "paper_figures" / "quick" / "run_records",
                        help="a report's run records (default: paper_figures/quick/run_records)")
    parser.add_argument("--runs", type=int, default=3, help="how many records to rerun (default 3)")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="the folder holding cifar-10-batches-py (default: the one each record names)")
    args = parser.parse_args(argv)
    results = [json.loads(p.read_text()) for p in sorted(args.records.glob("**/result.json"))]
    if not results:
        print(f"no run records under {args.records}", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    chosen = pick(results, args.runs)
    print(f"# Reruns of {len(chosen)} of the {len(results)} records in {args.records}\n")
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"row kernels {torch.ops.apl._cpu_kernel_isa()}\n")
    print("\n".join(markdown_header(["run", "committed final acc", "rerun final acc", "same record",
                                     "fields that differ"])))
    same_all = True
    with tempfile.TemporaryDirectory() as scratch:
        for committed in chosen:
            moved = {} if args.data_dir is None else {"data_dir": str(args.data_dir)}
            config = TrainConfig.from_dict({**committed["config"], **moved})
            rerun = train(config, Path(scratch) / committed["run_name"], progress=False)
            a, b = comparable_record(committed), comparable_record(rerun)
            differ = differing_fields(a, b)
            same_all &= not differ
            print(markdown_row([committed["run_name"], f"{committed['final_test_acc']:.2f}",
                                f"{rerun['final_test_acc']:.2f}", "yes" if not differ else "no",
                                ", ".join(differ) or "-"]), flush=True)
    return 0 if same_all else 1


if __name__ == "__main__":
    sys.exit(main())
