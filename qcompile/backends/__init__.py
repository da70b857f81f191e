"""Backends for integer-stage graphs: the reference executor (the spec), the fast executor, ONNX export."""

from qcompile.backends import (
    elementwise,  # noqa: E402,F401 - registers IntRescale's and IntSub's
    pool_table,  # noqa: E402,F401 - registers IntAvgPoolTable's kernels and emitters
)
