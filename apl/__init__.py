"""apl-repro: robust losses under label noise (NCE, NFL and the Active-Passive Losses).

Importing ``apl`` never needs the compiled extension: :mod:`apl.fused` reports whether it is
built, and the losses fall back to the pure-PyTorch reference when it is not.
"""
__version__ = "0.1.0"
