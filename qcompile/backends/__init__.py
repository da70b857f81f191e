"""Backends for integer-stage graphs: the reference executor (the spec), the fast executor, ONNX export."""

from qcompile.backends import (
    elementwise,  # noqa: E402,F401 - registers IntRescale's and IntSub's
    linear_nd,  # noqa: E402,F401 - exports Linear on rank-3/4 inputs
    pool_table,  # noqa: E402,F401 - registers IntAvgPoolTable's kernels and emitters
)
