"""Command line: ``python -m apl <command>`` or ``apl <command>``.

Each subcommand's parser is built by an ``add_cli(subparsers)`` function in its own module
(``apl.train``, ``apl.grid``, ``apl.report``), which sets
``func``: the handler returning the exit status.
"""
from __future__ import annotations

import argparse
import sys

from apl import grid, report, train


def build_parser() -> argparse.ArgumentParser:
    """The ``apl`` argument parser with every available subcommand."""
    parser = argparse.ArgumentParser(prog="apl", description="Robust losses under label noise (NCE, NFL, APL): "
                                                             "training runs on CIFAR-10.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (train, grid, report):
        module.add_cli(sub)
    return parser


def main(argv=None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), run the subcommand, return its exit status.

    Bad values (``ValueError``) and missing data (``FileNotFoundError``) print one line
    ``apl: error: ...`` to stderr and return 2 instead of a traceback.
    """
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        print(f"apl: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
