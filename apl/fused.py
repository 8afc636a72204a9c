"""``apl.fused`` is :mod:`apl.losses.fused` under the name the README has always shown (the same module object)."""
import sys

from apl.losses import fused

sys.modules[__name__] = fused
