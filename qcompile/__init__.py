"""qcompile: compile trained networks into mixed-precision, integer-only graphs with bit-exact ONNX export.

    import torch, qcompile
    data = qcompile.load_data("digits")
    cm = qcompile.compile(model, data.x_train[:1], data=data, policy="aqt")
    logits = cm(data.x_test)             # integer graph, fast executor
    cm.save_onnx("model.onnx")           # integer-only ONNX, bit-exact in onnxruntime
    print(cm.verify(data.x_test))        # mismatching output elements vs the reference executor

The names below are imported on first use (PEP 562), so ``import qcompile`` and ``qcompile --help`` do
not pay for importing torch.
"""

from __future__ import annotations

import importlib
import warnings
from typing import TYPE_CHECKING, Any

# torch's own pytree deprecation, raised while copying exported programs; not actionable for users
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*", category=FutureWarning)

if TYPE_CHECKING:
    from qcompile.api import CompiledModel, compile
    from qcompile.backends.ort import VerifyResult
    from qcompile.data import Dataset, load_data
    from qcompile.errors import QCompileError
    from qcompile.ir.meta import IntType, NodeInfo, Stage
    from qcompile.passes import PASSES, Pass, PassContext, PassResult, parse_pipeline, register_pass
    from qcompile.quant.tables import register_table_function

__version__ = "0.1.0"

_EXPORTS = {
    "CompiledModel": "qcompile.api", "compile": "qcompile.api", "VerifyResult": "qcompile.backends.ort",
    "Dataset": "qcompile.data", "load_data": "qcompile.data", "IntType": "qcompile.ir.meta",
    "NodeInfo": "qcompile.ir.meta", "Stage": "qcompile.ir.meta", "PASSES": "qcompile.passes",
    "Pass": "qcompile.passes", "PassContext": "qcompile.passes", "PassResult": "qcompile.passes",
    "parse_pipeline": "qcompile.passes", "register_pass": "qcompile.passes", "QCompileError": "qcompile.passes.base",
    "register_table_function": "qcompile.quant.tables",
}
__all__ = [
    "PASSES", "CompiledModel", "Dataset", "IntType", "NodeInfo", "Pass", "PassContext", "PassResult",
    "QCompileError", "Stage", "VerifyResult", "compile", "load_data", "parse_pipeline", "register_pass",
    "register_table_function",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'qcompile' has no attribute '{name}'")
    importlib.import_module("qcompile.api")  # first: it imports the rest in an order without cycles
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
