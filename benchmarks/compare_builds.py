"""Forward + backward time of the fused loss in two builds of the project, to check that a
change makes nothing slower (rows of bench_losses.py, without its other contenders).

Each build is timed in its own process (two builds of ``apl._C`` cannot share one), taking turns
so that a slow spell of the machine falls on both; the table shows each entry's median over the
rounds. Build the other commit beside this checkout first, e.g.

    git worktree add /tmp/apl-before 172e140 && (cd /tmp/apl-before && python setup.py build_ext --inplace)
    for r in 1 2 3; do
      PYTHONPATH=/tmp/apl-before python benchmarks/compare_builds.py time /tmp/before_$r.json
      python benchmarks/compare_builds.py time /tmp/now_$r.json
    done
    python benchmarks/compare_builds.py table --before /tmp/before_{1,2,3}.json --now /tmp/now_{1,2,3}.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

import apl.fused as fused  # the public name every build has

try:
    from apl.losses.spec import spec_for
except ImportError:  # a build from before the loss library became apl.losses (e.g. 172e140)
    from apl.spec import spec_for

LOSSES = {"CE": ("ce", "ma2020"), "NCE (ma2020)": ("nce", "ma2020"), "NFL (ma2020)": ("nfl", "ma2020"),
          "NCE+RCE (ma2020)": ("nce+rce", "ma2020"), "NFL+RCE (ma2020)": ("nfl+rce", "ma2020"),
          "NCE (paper)": ("nce", "paper")}
SHAPES = ((128, 10), (128, 100), (4096, 100), (8192, 10), (128, 1000), (1000, 1000), (128, 32000), (1000, 32000))


def time_build(min_time: float = 0.4) -> dict[str, float]:
    """Median seconds of one fused forward + backward per 'loss|N|C', with the build importable as apl."""
    torch.set_num_threads(1)
    out = {}
    for label, (name, variant) in LOSSES.items():
        spec = spec_for(name, variant=variant)
        for n, c in SHAPES:
            g = torch.Generator().manual_seed(0)
            x = (torch.randn(n, c, generator=g) * 3).requires_grad_()
            y = torch.randint(0, c, (n,), generator=g)

            def step():
                x.grad = None
                fused.fused_loss(x, y, spec).backward()

            for _ in range(3):
                step()
            times, end = [], time.perf_counter() + min_time
            while len(times) < 5 or (time.perf_counter() < end and len(times) < 200):
                t0 = time.perf_counter()
                step()
                times.append(time.perf_counter() - t0)
            out[f"{label}|{n}|{c}"] = statistics.median(times)
    return out


def table(before: list[dict], now: list[dict]) -> str:
    """Markdown: per entry the median over rounds of each build, and now/before."""
    lines = ["| loss | N | C | before, ms | now, ms | now/before |", "|---|---|---|---|---|---|"]
    ratios = []
    for key in before[0]:
        b = statistics.median(run[key] for run in before) * 1e3
        a = statistics.median(run[key] for run in now) * 1e3
        ratios.append(a / b)
        label, n, c = key.split("|")
        lines.append(f"| {label} | {n} | {c} | {b:.3f} | {a:.3f} | {a / b:.2f}x |")
    lines.append(f"\nnow/before: median {statistics.median(ratios):.2f}x, from {min(ratios):.2f}x "
                 f"to {max(ratios):.2f}x over {len(ratios)} entries")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("time", help="time the importable build, write JSON")
    t.add_argument("out")
    t.add_argument("--min-time", type=float, default=0.4)
    s = sub.add_parser("table", help="compare the JSON files of two builds")
    s.add_argument("--before", nargs="+", required=True, metavar="JSON")
    s.add_argument("--now", nargs="+", required=True, metavar="JSON")
    args = parser.parse_args(argv)
    if args.command == "time":
        if not fused.is_available():
            print(f"fused operator unavailable: {fused.unavailable_reason()}", file=sys.stderr)
            return 1
        with open(args.out, "w") as f:
            json.dump(time_build(args.min_time), f)
        return 0
    print(table([json.load(open(p)) for p in args.before], [json.load(open(p)) for p in args.now]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
