"""Built-in passes, one per module; importing this package registers them all."""

from qcompile.passes import (  # noqa: F401 - imported for registration
    assign_bitwidths,
    calibrate,
    canonicalize,
    fold_batchnorm,
    insert_quantizers,
    limit_weight_bits,
    lower_integer,
    prune_channels,
    share_scales,
)
from qcompile.passes.base import PASSES, Pass, PassContext, PassError, PassResult, register_pass
from qcompile.passes.manager import PassManager
from qcompile.passes.pipeline import Pipeline, parse_pipeline
from qcompile.search import apot as _apot  # noqa: F401 - registers the built-in learned searches
from qcompile.search import aqt as _aqt  # noqa: F401
from qcompile.search import bayesian_bits as _bayesian_bits  # noqa: F401
from qcompile.search import bsq as _bsq  # noqa: F401

DEFAULT_PIPELINE = (
    "canonicalize,fold-batchnorm,insert-quantizers,calibrate,assign-bitwidths,share-scales,lower-integer"
)

__all__ = [
    "DEFAULT_PIPELINE", "PASSES", "Pass", "PassContext", "PassError", "PassManager", "PassResult", "Pipeline",
    "parse_pipeline", "register_pass",
]
