"""Speed and GPU checks of the project, run from the checkout's root as modules: ``python -m benchmarks.<name>``.

Not installed with the package (``setup.py`` ships ``apl`` alone); measured runs are in ``RESULTS.md``.
"""
