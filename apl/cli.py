"""The command line: ``python -m apl train|grid|report`` (or ``apl ...``), every command's flags.

``train`` runs one configuration (:func:`apl.train.train`), ``grid`` the paper's grid
(:func:`apl.grid.run_grid`), ``report`` Table 1 and Figures 1-3 from a grid's run records
(:func:`apl.report.make_report`). Every error a user can cause (a bad flag or value, missing or
damaged data, an output folder that cannot be written, a damaged or foreign run folder, a run in
use, a stop by a signal, Ray absent) ends the command with one line ``apl: error: ...`` and the
status :mod:`apl.errors` gives it (the table ``python -m apl --help`` prints); a traceback only
with ``--debug`` or ``APL_DEBUG=1``.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import textwrap
import traceback
from pathlib import Path

from apl.config import TrainConfig
from apl.data import NORMALIZATIONS, ensure_cifar10
from apl.errors import STATUS_TABLE, USAGE, debug_requested, error_line, exit_status, show_warnings
from apl.losses import BACKENDS
from apl.losses.spec import LOSS_NAMES, VARIANTS
from apl.models import MODEL_INITS, MODEL_NAMES
from apl.noise import NOISE_TYPES
from apl.plan import ENGINES, plan_grid
from apl.presets import GRID_LOSSES, PRESETS, PROTOCOLS, SUCCESSOR_LOSSES
from apl.records import RESULT_FILE, number_text
from apl.report import REFERENCES, make_report
from apl.sweeps import make_sweep, parse_numbers, parse_set

__all__ = ["build_parser", "main", "config_from_args", "overrides_from_args", "sweep_from_args",
           "ray_options_from_args"]

#: The loss parameters ``train`` takes as flags (``--min-prob`` for min_prob), in the order its help lists them.
_LOSS_PARAM_FLAGS = ("gamma", "lam", "alpha", "beta", "q", "a", "m", "min_prob")
#: ``train`` flags that override the protocol only when given.
_TRAIN_OPTIONAL = ("variant", "noise_type", "epochs", "batch_size", "lr", "width", "model", "init",
                   "normalize", "train_subset", "test_subset", "augment", "num_threads", "amp",
                   "backend", "channels_last", "weight_decay", "l1")
_DOWNLOAD_HELP = ("download CIFAR-10 into --data-dir when it is missing (default: yes, except in the Docker "
                  "image, where the download would be lost with the container)")
_DEBUG_HELP = "on an error, print its traceback too (as APL_DEBUG=1 does)"


class _Parser(argparse.ArgumentParser):
    """argparse with the command line's one-line errors: ``apl: error: ...; see ... --help``, status 2."""

    def error(self, message: str):
        print(f"apl: error: {message}; see python -m {self.prog} --help", file=sys.stderr)
        sys.exit(USAGE)


def _add_debug(p) -> None:
    """``--debug`` after the command too (``SUPPRESS``: an unset one leaves the top-level flag as it is)."""
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=_DEBUG_HELP)


# --------------------------------------------------------------------------- train

def _add_train(subparsers) -> None:
    p = subparsers.add_parser("train", help="train one configuration and print its result",
                              description="Train one configuration. Unset options follow the protocol "
                                          "(--protocol author: the seed paper's author's code; paper: "
                                          "the seed paper's text; ma2020: the cited work; successors: the "
                                          "cited work's, with the loss's own paper's regularisation, noise "
                                          "rule and parameters).")
    p.add_argument("--protocol", choices=tuple(PROTOCOLS), default="paper")
    p.add_argument("--loss", default="ce", help=", ".join(LOSS_NAMES))
    p.add_argument("--variant", choices=VARIANTS, help="loss form (default: the protocol's)")
    p.add_argument("--noise", type=float, default=0.0, help="noise rate eta")
    p.add_argument("--noise-type", choices=NOISE_TYPES)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--width", type=float)
    p.add_argument("--model", choices=MODEL_NAMES)
    p.add_argument("--init", choices=MODEL_INITS, help="the model's Kaiming init or PyTorch's defaults")
    p.add_argument("--normalize", choices=tuple(NORMALIZATIONS),
                   help="image normalisation: CIFAR-10 mean/std, or 0.5/0.5 to [-1, 1]")
    p.add_argument("--train-subset", type=int)
    p.add_argument("--test-subset", type=int)
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None)
    for name in _LOSS_PARAM_FLAGS:
        p.add_argument(f"--{name.replace('_', '-')}", type=float, help=f"loss parameter {name} (LOSSES.md)")
    p.add_argument("--weight-decay", type=float, help="the optimizer's L2 weight decay (default: the protocol's)")
    p.add_argument("--l1", type=float, help="delta of the L1 term delta * sum |theta| over every parameter, added "
                                            "to the loss before the gradient clip (ANL, JAL: 5e-5 with weight "
                                            "decay 0; default: the protocol's)")
    p.add_argument("--data-dir", default="data", help="folder holding cifar-10-batches-py")
    p.add_argument("--download", action=argparse.BooleanOptionalAction, default=None, help=_DOWNLOAD_HELP)
    p.add_argument("--out", help="run folder (default: runs/<run name>)")
    p.add_argument("--device", default="auto")
    p.add_argument("--num-threads", type=int)
    p.add_argument("--amp", choices=("bf16",))
    p.add_argument("--compile", action="store_true")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last memory format (default on)")
    p.add_argument("--backend", choices=BACKENDS)
    p.add_argument("--fresh", action="store_true", help="discard an existing result/checkpoint in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")
    _add_debug(p)
    p.set_defaults(func=_run_train)


def config_from_args(args) -> TrainConfig:
    """The :class:`TrainConfig` of parsed ``apl train`` arguments (unset ones: the protocol's)."""
    overrides = {"loss": args.loss, "noise": args.noise, "seed": args.seed, "data_dir": args.data_dir,
                 "device": args.device}
    for name in _TRAIN_OPTIONAL:
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if args.compile:
        overrides["compile"] = True
    params = {k: getattr(args, k) for k in _LOSS_PARAM_FLAGS if getattr(args, k) is not None}
    if params:
        overrides["loss_params"] = params
    return TrainConfig.from_protocol(args.protocol, **overrides)


def _run_train(args) -> int:
    from apl.train import train  # here, not at the top: ``report`` and ``--help`` never load the training stack

    config = config_from_args(args)
    out = Path(args.out) if args.out else Path("runs") / config.run_name()
    if args.download is not None:  # asked for (or against): settled before the run folder is touched
        ensure_cifar10(config.data_dir, download=args.download)
    if not args.quiet:
        print(f"run {config.run_name()} -> {out}", flush=True)
    r = train(config, out, resume=not args.fresh, progress=not args.quiet)
    noise = r["noise_record"]
    print(f"{r['run_name']}: final test acc {number_text(r['final_test_acc'], 2)}  "
          f"best {number_text(r['best_test_acc'], 2)} "
          f"(epoch {r['best_epoch']})  realised noise {noise['realised_rate']:.4f} ({noise['kind']})  "
          f"{r['epochs_completed']} epochs  {r['wall_time_s']:.1f} s on {r['device']}  "
          f"loss backend {r['loss_backend']}  -> {out / RESULT_FILE}")
    return 0


# --------------------------------------------------------------------------- grid

def _add_grid(subparsers) -> None:
    p = subparsers.add_parser(
        "grid", help="train the paper's grid (losses x noise x variants x seeds), resumable",
        description="Train every run of the paper's grid into <out>/runs/<run name>/ and keep "
                    "<out>/manifest.json. Finished runs are skipped; interrupted ones resume.")
    p.add_argument("--preset", choices=tuple(PRESETS), default="paper",
                   help="paper: the paper's grid in three forms (the author's code, the paper's "
                        "text, the cited work's losses); quick: the same scaled down (<= 10 min on a "
                        "2-core CPU); author: the author's code alone; ma2020: the cited work's protocol; "
                        "successors: APL's successors and baselines, each loss as its own paper trains it, "
                        "symmetric and asymmetric noise (successors_quick: scaled down, <= 10 min on 2 cores)")
    p.add_argument("--data-dir", default=os.environ.get("APL_DATA_DIR", "data"),
                   help="folder holding cifar-10-batches-py (default $APL_DATA_DIR or data)")
    p.add_argument("--download", action=argparse.BooleanOptionalAction, default=None, help=_DOWNLOAD_HELP)
    p.add_argument("--out", help="output folder (default runs/<preset>)")
    p.add_argument("--seeds", type=int, help="K: seeds 0..K-1 (default: the preset's, 1; ma2020: 3)")
    p.add_argument("--devices", help="comma-separated, one worker each: cuda:0,cuda:1 or cpu,cpu "
                                     "(default: every GPU, else the preset's CPU default)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", dest="fresh", action="store_false", default=False,
                      help="keep finished runs, resume interrupted ones (default)")
    mode.add_argument("--fresh", dest="fresh", action="store_true",
                      help="delete this grid's runs and manifest first")
    p.add_argument("--losses", nargs="+", help=f"subset of the preset's losses ({','.join(GRID_LOSSES)}; "
                                                f"successors: {','.join(SUCCESSOR_LOSSES)})")
    p.add_argument("--noise", nargs="+", help="subset of the preset's noise rates, in every noise family that has "
                                               "them (0.0,0.2,0.4,0.6,0.8; successors also asymmetric 0.1-0.4)")
    p.add_argument("--variants", nargs="+", help="subset of the preset's forms, by variant "
                                                 "(author,paper,ma2020 for paper and quick)")
    p.add_argument("--epochs", type=int, help="override the preset's epochs")
    p.add_argument("--amp", choices=("bf16",), help="bfloat16 autocast of the forward pass")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override any other config field, e.g. --set train_subset=500 (repeat); "
                        "several values sweep it: --set lr=0.01,0.001")
    p.add_argument("--lam", nargs="+", help="APL weight(s) lam of the active+passive sums, e.g. "
                                            "0.2,0.4,0.6,0.8: one run per value (a sweep)")
    p.add_argument("--gamma", nargs="+", help="focal exponent(s) gamma of FL/NFL and their sums: one run "
                                              "per value (a sweep)")
    p.add_argument("--engine", choices=ENGINES, default="local",
                   help="local: here or one worker per --devices entry (default); ray: a Ray cluster, "
                        "one task per run (pip install '.[ray]')")
    p.add_argument("--address", help="Ray: the cluster to join (auto: this machine's; default: start "
                                     "a local one)")
    p.add_argument("--gpus-per-run", type=float,
                   help="Ray: GPUs per run, e.g. 0.25 for four runs per GPU (default 1 where the "
                        "cluster has GPUs, else 0)")
    p.add_argument("--cpus-per-run", type=int, help="Ray: CPUs (threads) per run (default 1)")
    p.add_argument("--max-retries", type=int,
                   help="Ray: how often a run whose worker or node died is resumed elsewhere (default 3)")
    p.add_argument("--dry-run", action="store_true", help="print the planned runs and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_debug(p)
    p.set_defaults(func=_run_grid)


def _comma_separated(values) -> list[str] | None:
    """``["ce,nfl", "nce"]`` -> ``["ce", "nfl", "nce"]``: list flags take spaces or commas."""
    if values is None:
        return None
    return [v for item in values for v in item.split(",") if v]


def _parse_set(items) -> dict:
    """The ``--set`` keys given one value (a key given several is a sweep axis: :func:`sweep_from_args`)."""
    return {key: values[0] for key, values in parse_set(items).items() if len(values) == 1}


def sweep_from_args(args) -> dict:
    """The sweep of parsed ``grid`` arguments (--lam, --gamma, --set KEY=V1,V2), :func:`apl.sweeps.make_sweep`."""
    return make_sweep(lam=parse_numbers(args.lam, "--lam"), gamma=parse_numbers(args.gamma, "--gamma"),
                      sets=parse_set(args.set))


_RAY_FLAGS = ("address", "gpus_per_run", "cpus_per_run", "max_retries")


def ray_options_from_args(args) -> dict | None:
    """The Ray engine's options of parsed ``grid`` arguments (None for the local engine)."""
    given = {k: getattr(args, k) for k in _RAY_FLAGS if getattr(args, k) is not None}
    if args.engine != "ray":
        if given:
            raise ValueError(f"{', '.join('--' + k.replace('_', '-') for k in given)} need(s) --engine ray")
        return None
    return given


def overrides_from_args(args) -> dict:
    """The config overrides of parsed ``grid`` arguments (--epochs, --amp, --compile, --set)."""
    overrides = _parse_set(args.set)
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    if args.amp is not None:
        overrides["amp"] = args.amp
    if args.compile:
        overrides["compile"] = True
    return overrides


def _run_grid(args) -> int:
    from apl.grid import run_grid  # here, not at the top: the runner, Ray engine and training stack

    noise = _comma_separated(args.noise)
    try:
        noise = None if noise is None else [float(n) for n in noise]
    except ValueError:
        raise ValueError(f"--noise takes numbers, got {args.noise}") from None
    kwargs = dict(seeds=args.seeds, losses=_comma_separated(args.losses), noise=noise,
                  variants=_comma_separated(args.variants), overrides=overrides_from_args(args),
                  sweep=sweep_from_args(args))
    ray_options = ray_options_from_args(args)
    out = args.out or os.path.join("runs", args.preset)
    if args.dry_run:
        plan = plan_grid(args.preset, **kwargs)
        for cfg in plan:
            print(cfg.run_name())
        print(f"{len(plan)} runs, {sum(c.epochs for c in plan)} epochs -> {out}/runs")
        return 0
    command = "python -m apl " + shlex.join(sys.argv[1:]) if sys.argv[1:2] == ["grid"] else None
    run_grid(args.preset, args.data_dir, out, devices=args.devices, fresh=args.fresh,
             progress=not args.no_progress, command=command, engine=args.engine,
             ray_options=ray_options, download=args.download, **kwargs)
    return 0


# --------------------------------------------------------------------------- report

def _add_report(subparsers) -> None:
    p = subparsers.add_parser(
        "report", help="tables and figures from a grid's run records (no training)",
        description="Write Table 1 (md/csv/tex), Figures 1-3 (png/pdf) and a README for "
                    "each form of the grid, from <runs>/runs/*/result.json alone; for a successors "
                    "grid, a table (md/csv) and a figure per noise family and a README.")
    p.add_argument("--runs", required=True, help="the grid's output folder (holds runs/)")
    p.add_argument("--out", required=True, help="folder for tables and figures")
    p.add_argument("--reference", default="auto", choices=REFERENCES,
                   help="published numbers to compare with (auto: by the grid's preset; a successors "
                        "grid takes auto alone: apl/successor_numbers.json)")
    p.add_argument("--no-figures", action="store_true", help="tables and README only")
    _add_debug(p)
    p.set_defaults(func=_run_report)


def _run_report(args) -> int:
    command = shlex.join(["python", "-m", "apl", "report", "--runs", str(args.runs), "--out",
                          str(args.out)] + (["--reference", args.reference]
                                            if args.reference != "auto" else []))
    paths = make_report(args.runs, args.out, reference=args.reference, command=command,
                        figures=not args.no_figures)
    print(f"wrote {len(paths)} files to {args.out}")
    return 0


# --------------------------------------------------------------------------- entry point

def _status_table() -> str:
    """The exit statuses, for ``--help``."""
    return "exit statuses:\n" + "\n".join(
        textwrap.fill(meaning, 100, initial_indent=f"  {status:<9}", subsequent_indent=" " * 11)
        for status, meaning in STATUS_TABLE)


def build_parser() -> argparse.ArgumentParser:
    """The ``apl`` argument parser with every subcommand."""
    parser = _Parser(prog="apl", description="Robust losses under label noise (NCE, NFL, APL): training runs on "
                                             "CIFAR-10.", epilog=_status_table(),
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_train, _add_grid, _add_report):
        add(sub)
    return parser


def main(argv=None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), run the subcommand, return its exit status.

    An error ends the command with one line ``apl: error: ...`` on stderr (:func:`apl.errors.error_line`)
    and the status :func:`apl.errors.exit_status` gives it (a traceback too with ``--debug`` or
    ``APL_DEBUG=1``): 2 for a bad flag or value (argparse exits with it itself), 130 or 143 for a run
    stopped by SIGINT or SIGTERM at a safe point, the others as ``--help`` lists them.
    """
    args = build_parser().parse_args(argv)
    show_warnings()
    try:
        return int(args.func(args) or 0)
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 - every error ends in one line and its status
        if isinstance(e, BrokenPipeError):  # stdout's reader left: what is still buffered goes nowhere
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        if debug_requested(args.debug):
            traceback.print_exc()
        line = error_line(e)
        if line is not None:
            print(line, file=sys.stderr, flush=True)
        return exit_status(e)
