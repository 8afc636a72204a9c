"""``apl.functional`` is :mod:`apl.losses.functional` under its public name (the same module object)."""
import sys

from apl.losses import functional

sys.modules[__name__] = functional
