"""``python -m apl <command>`` (and the ``apl`` script): the command line of :mod:`apl.cli`."""
import sys

from apl.cli import main

if __name__ == "__main__":
    sys.exit(main())
