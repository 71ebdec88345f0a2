"""The benchmark suites behind ``python -m lowband bench``.

``harness`` times each case against NumPy, torch (CPU) and a plain copy of the
same data; every other module here is one suite (``cases(ctx) -> list[Case]``)
and is discovered by name.  Importing this package imports no suite.
"""
