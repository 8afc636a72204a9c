"""``python -m apl <command>`` (and the ``apl`` script): the command line of :mod:`apl.cli`."""
import signal
import sys

from apl.errors import INTERRUPTED

try:
    from apl.cli import main
except KeyboardInterrupt:  # Ctrl-C while torch loads: nothing has started, so nothing to resume
    print("apl: error: interrupted while starting; nothing was written", file=sys.stderr)
    sys.exit(INTERRUPTED + signal.SIGINT)

if __name__ == "__main__":
    sys.exit(main())
