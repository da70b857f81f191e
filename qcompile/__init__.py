"""qcompile: compile trained networks into mixed-precision, integer-only graphs with bit-exact ONNX export.

    import qcompile
    cm = qcompile.compile(model, torch.randn(1, 1, 8, 8), data=qcompile.load_data("digits"), policy="aqt")
    logits = cm(x)                       # integer graph, fast executor
    cm.save_onnx("model.onnx")           # integer-only ONNX, bit-exact in onnxruntime
    print(cm.verify(x))                  # mismatching output elements vs the reference executor
"""

import warnings

from qcompile.api import CompiledModel, compile
from qcompile.backends.ort import VerifyResult
from qcompile.data import Dataset, load_data
from qcompile.ir.meta import IntType, NodeInfo, Stage
from qcompile.passes import PASSES, Pass, PassContext, PassResult, parse_pipeline, register_pass
from qcompile.passes.base import QCompileError
from qcompile.quant.tables import register_table_function

# torch's own pytree deprecation, raised while copying exported programs; not actionable for users
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*", category=FutureWarning)

__version__ = "0.1.0"
__all__ = [
    "PASSES", "CompiledModel", "Dataset", "IntType", "NodeInfo", "Pass", "PassContext", "PassResult",
    "QCompileError", "Stage", "VerifyResult", "compile", "load_data", "parse_pipeline", "register_pass",
    "register_table_function",
]
